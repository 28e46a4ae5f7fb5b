"""The executed order of a lowered module: kernels, their tensors, and what each layer is.

``extract_program`` reads the straight-line ``main`` that :func:`lowering.lower_int8` leaves
(one ``R.call_tir`` per kernel) into plain Python data that the memory planner and the C
emitter share.  Tensors are the model input (the caller's buffer), the model output (the
caller's buffer), constants (flash) and activations (the arena).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from distillc.errors import PassError

from .lowering import KERNELS_ATTR
from .qdq_to_int8 import LAYERS_ATTR, read_quant_attr

INPUT, OUTPUT, CONST, ACTIVATION = "input", "output", "const", "activation"


@dataclass
class Tensor:
    """One tensor of the program."""

    id: int
    name: str
    shape: tuple
    dtype: str
    kind: str
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Step:
    """One kernel call: ``kernel(*args, out)``; ``args`` and ``out`` are tensor ids."""

    index: int
    name: str
    kernel: str
    args: list
    out: int
    op: str = ""
    node: str = ""
    macs: int = 0


@dataclass
class Program:
    """Tensors and steps in execution order, plus the model's input/output quantization."""

    tensors: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    input_id: int = -1
    output_id: int = -1
    quant: dict = field(default_factory=dict)

    def tensor(self, tid: int) -> Tensor:
        return self.tensors[tid]

    def activations(self) -> list:
        return [t for t in self.tensors if t.kind == ACTIVATION]

    def lifetimes(self) -> dict:
        """``{activation id: (first step, last step)}`` in the executed order."""
        spans: dict[int, list] = {}
        for step in self.steps:
            for tid in list(step.args) + [step.out]:
                if self.tensors[tid].kind != ACTIVATION:
                    continue
                span = spans.setdefault(tid, [step.index, step.index])
                span[1] = step.index
        return {tid: (s[0], s[1]) for tid, s in spans.items()}


def extract_program(mod, *, pass_name: str = "plan-memory") -> Program:
    """Read the kernel call sequence of a module produced by ``lower_int8``."""
    import tvm
    from tvm import relax

    func = mod["main"]
    prog = Program(quant=read_quant_attr(mod))
    layers = json.loads(str(mod.attrs[LAYERS_ATTR])) if LAYERS_ATTR in mod.attrs else {}
    kernels = json.loads(str(mod.attrs[KERNELS_ATTR])) if KERNELS_ATTR in mod.attrs else {}
    ids: dict = {}

    def add_tensor(name, ty, kind, data=None) -> int:
        shape = tuple(int(d) for d in ty.shape.values)
        tensor = Tensor(len(prog.tensors), name, shape, str(ty.dtype), kind, data)
        prog.tensors.append(tensor)
        return tensor.id

    (param,) = func.params
    prog.input_id = add_tensor(param.name, param.ty, INPUT)
    ids[param] = prog.input_id

    def arg_id(arg) -> int:
        if isinstance(arg, relax.Var):
            if arg not in ids:
                raise PassError(pass_name, f"kernel argument {arg.name} is not computed before use")
            return ids[arg]
        if isinstance(arg, tvm.ir.Constant):
            return add_tensor(f"const{len(prog.tensors)}", arg.ty, CONST, arg.value.numpy())
        raise PassError(pass_name, f"unexpected kernel argument {type(arg).__name__}")

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var):
                ids[binding.var] = ids[value]
                continue
            if not (isinstance(value, relax.Call) and str(getattr(value.op, "name", "")) == "relax.call_tir"):
                what = getattr(getattr(value, "op", None), "name", type(value).__name__)
                raise PassError(pass_name, f"main still contains '{what}' after lowering; "
                                           "expected only kernel calls")
            gvar, args = value.args[0], value.args[1]
            arg_ids = [arg_id(a) for a in args.fields]
            out_id = add_tensor(binding.var.name, binding.var.ty, ACTIVATION)
            ids[binding.var] = out_id
            info = kernels.get(gvar.name_hint) or layers.get(binding.var.name) or {}
            step = Step(len(prog.steps), info.get("var", binding.var.name), gvar.name_hint,
                        arg_ids, out_id, info.get("op", "elementwise"), info.get("node", ""))
            step.macs = int(info.get("macs", 0))
            prog.steps.append(step)

    out_var = func.body.body
    if out_var not in ids:
        raise PassError(pass_name, "the output of main is not a computed tensor")
    out_id = ids[out_var]
    if prog.tensors[out_id].kind != ACTIVATION:
        raise PassError(pass_name, "the model output is not computed by any kernel "
                                   "(an identity model has nothing to compile)")
    prog.tensors[out_id].kind = OUTPUT
    prog.output_id = out_id
    return prog
