"""The executed order of a lowered module: kernels, their tensors, and what each layer is.

``extract_program`` reads the straight-line ``main`` that :func:`lowering.lower_int8` leaves
(one ``R.call_tir`` per kernel) into plain Python data that the memory planner and the C
emitter share.  Tensors are the model input (the caller's buffer), the model output (the
caller's buffer), constants (flash) and activations (the arena).

A :class:`Program` whose kernels have been generated (``codegen.build_program``) no longer
needs TVM: it saves to a directory (``program.json``, ``constants.bin``, ``kernels.c``) and
loads back, which is how a pipeline can cache it.  TVM 0.27 itself cannot serialize a Relax
module that holds constants (``tvm.ir.save_json`` and ``script(show_meta=True)`` crash).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillc.errors import PassError

from .lowering import CALLS_ATTR, KERNELS_ATTR
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
    arg_shapes: list = field(default_factory=list)
    #: how the layer's weights are stored: ``{"bits", "values", "bytes"}`` (None: no weights)
    weights: dict | None = None
    #: a conv's window: ``{"strides", "padding", "dilation", "groups", "kernel"}`` (None: not a conv)
    conv: dict | None = None
    #: the C kernel that computes this step with its output over its input (:mod:`.inplace`), or ""
    inplace_kernel: str = ""


@dataclass
class Program:
    """Tensors and steps in execution order, plus the model's input/output quantization."""

    tensors: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    input_id: int = -1
    output_id: int = -1
    quant: dict = field(default_factory=dict)
    kernels_c: str = ""  # C definitions of the kernels (set by codegen.build_program)
    signatures: dict = field(default_factory=dict)  # kernel C name -> C parameter types
    #: kernels a memory schedule may call instead of a step's own (C name -> C definition); their
    #: parameter types are the step kernel's.  ``emit_c`` writes only those the plan uses.
    variants: dict = field(default_factory=dict)

    def save(self, directory) -> None:
        """Write ``program.json``, ``constants.bin`` and ``kernels.c`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = bytearray()
        tensors = []
        for t in self.tensors:
            entry = {"id": t.id, "name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                     "kind": t.kind}
            if t.data is not None:
                raw = np.ascontiguousarray(t.data, dtype=t.dtype).tobytes()
                entry["offset"], entry["nbytes"] = len(blob), len(raw)
                blob += raw
            tensors.append(entry)
        steps = [{"index": s.index, "name": s.name, "kernel": s.kernel, "args": list(s.args),
                  "out": s.out, "op": s.op, "node": s.node, "macs": s.macs,
                  "arg_shapes": [list(x) for x in s.arg_shapes], "weights": s.weights, "conv": s.conv,
                  "inplace_kernel": s.inplace_kernel} for s in self.steps]
        doc = {"format": 1, "tensors": tensors, "steps": steps, "input_id": self.input_id,
               "output_id": self.output_id, "quant": self.quant, "signatures": self.signatures,
               "variants": self.variants}
        (directory / "program.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        (directory / "constants.bin").write_bytes(bytes(blob))
        (directory / "kernels.c").write_text(self.kernels_c)

    @classmethod
    def load(cls, directory) -> "Program":
        """Read a program written by :meth:`save`."""
        directory = Path(directory)
        doc = json.loads((directory / "program.json").read_text())
        blob = (directory / "constants.bin").read_bytes()
        prog = cls(input_id=doc["input_id"], output_id=doc["output_id"], quant=doc["quant"],
                   kernels_c=(directory / "kernels.c").read_text(), signatures=doc["signatures"],
                   variants=doc.get("variants", {}))
        for entry in doc["tensors"]:
            data = None
            if "offset" in entry:
                raw = blob[entry["offset"]:entry["offset"] + entry["nbytes"]]
                data = np.frombuffer(raw, dtype=entry["dtype"]).reshape(entry["shape"]).copy()
            prog.tensors.append(Tensor(entry["id"], entry["name"], tuple(entry["shape"]),
                                       entry["dtype"], entry["kind"], data))
        for entry in doc["steps"]:
            prog.steps.append(Step(entry["index"], entry["name"], entry["kernel"], entry["args"],
                                   entry["out"], entry["op"], entry["node"], entry["macs"],
                                   [tuple(x) for x in entry["arg_shapes"]], entry.get("weights"),
                                   entry.get("conv"), entry.get("inplace_kernel", "")))
        return prog

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


def _shape(ty) -> tuple:
    return tuple(int(d) for d in ty.shape.values)


def extract_program(mod, *, pass_name: str = "plan-memory") -> Program:
    """Read the kernel call sequence of a module produced by ``lower_int8``."""
    import tvm
    from tvm import relax

    func = mod["main"]
    prog = Program(quant=read_quant_attr(mod))
    layers = json.loads(str(mod.attrs[LAYERS_ATTR])) if LAYERS_ATTR in mod.attrs else {}
    kernels = json.loads(str(mod.attrs[KERNELS_ATTR])) if KERNELS_ATTR in mod.attrs else {}
    calls = json.loads(str(mod.attrs[CALLS_ATTR])) if CALLS_ATTR in mod.attrs else {}
    ids: dict = {}
    shapes: dict = {}  # declared shape of every Relax var (views differ from their tensor)

    def add_tensor(name, ty, kind, data=None) -> int:
        shape = _shape(ty)
        tensor = Tensor(len(prog.tensors), name, shape, str(ty.dtype), kind, data)
        prog.tensors.append(tensor)
        return tensor.id

    (param,) = func.params
    prog.input_id = add_tensor(param.name, param.ty, INPUT)
    ids[param] = prog.input_id

    def arg_id(arg) -> int:
        if isinstance(arg, relax.Var):
            if arg not in ids:
                raise RuntimeError(f"{pass_name}: kernel argument {arg.name} is used before it is computed")
            return ids[arg]
        if isinstance(arg, tvm.ir.Constant):
            return add_tensor(f"const{len(prog.tensors)}", arg.ty, CONST, arg.value.numpy())
        raise RuntimeError(f"{pass_name}: unexpected kernel argument {type(arg).__name__}")

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var):
                ids[binding.var] = ids[value]
                continue
            if isinstance(value, relax.Call) and str(getattr(value.op, "name", "")) == "relax.reshape":
                # a view: same bytes as its operand (row-major reshape)
                ids[binding.var] = arg_id(value.args[0])
                shapes[binding.var] = _shape(binding.var.ty)
                continue
            if not (isinstance(value, relax.Call) and str(getattr(value.op, "name", "")) == "relax.call_tir"):
                what = getattr(getattr(value, "op", None), "name", type(value).__name__)
                raise RuntimeError(f"{pass_name}: main still contains '{what}' after lowering; "
                                   "expected only kernel calls")
            gvar, args = value.args[0], value.args[1]
            arg_ids = [arg_id(a) for a in args.fields]
            arg_shapes = [shapes.get(a, None) if isinstance(a, relax.Var) else None for a in args.fields]
            out_id = add_tensor(binding.var.name, binding.var.ty, ACTIVATION)
            ids[binding.var] = out_id
            info = calls.get(binding.var.name) or kernels.get(gvar.name_hint) or layers.get(binding.var.name) or {}
            step = Step(len(prog.steps), info.get("var", binding.var.name), gvar.name_hint,
                        arg_ids, out_id, info.get("op", "elementwise"), info.get("node", ""))
            step.arg_shapes = [s or prog.tensors[t].shape for s, t in zip(arg_shapes, arg_ids)]
            step.macs = int(info.get("macs", 0))
            step.weights = info.get("weights")
            step.conv = info.get("conv")
            prog.steps.append(step)

    out_var = func.body.body
    if out_var in shapes and prog.tensors[ids[out_var]].kind == ACTIVATION:
        # the model returns a view: give the tensor the declared output shape
        prog.tensors[ids[out_var]].shape = shapes[out_var]
    if out_var not in ids:
        raise RuntimeError(f"{pass_name}: the output of main is not a computed tensor")
    out_id = ids[out_var]
    if prog.tensors[out_id].kind != ACTIVATION:
        raise PassError(pass_name, "the model output is not computed by any kernel "
                                   "(an identity model has nothing to compile)")
    prog.tensors[out_id].kind = OUTPUT
    prog.output_id = out_id
    return prog
