"""Stage 4, the INT8 backend: QCDQ ONNX -> integer Relax -> fused TIR kernels -> dependency-free C.

The stage takes an ``OnnxModel`` (QCDQ) and makes a ``Bundle``, through three cached steps:
``tvm.int8`` (``tvm_int8.py``: ``OnnxModel -> Int8Program``, kernel C + call sequence + weights),
``plan-memory`` (``Int8Program -> Int8Program`` with the arena plan) and ``codegen.c``
(``codegen_c.py``: ``Int8Program -> Bundle``; features add C through ``codegen.CExtension``).
The library under them is plain functions:

==================  =============================================  ===============================
used by             function                                       result
==================  =============================================  ===============================
``tvm.int8``        :func:`import_onnx` (ONNX path -> IRModule)    Relax, QCDQ as quantize/dequantize
``tvm.int8``        :func:`lower_int8` (IRModule -> IRModule)      fused, scheduled int8 TIR kernels
``tvm.int8``        :func:`build_program` (IRModule -> Program)    kernel C + call sequence + weights
``plan-memory``     :func:`plan_memory` (Program -> MemoryPlan)    arena offsets, arena floor
``codegen.c``       :func:`emit_c` (Program, dir -> manifest)      include/ + src/ of the bundle
==================  =============================================  ===============================

:func:`compile_onnx_to_bundle` runs them all.  A ``Program`` and a ``MemoryPlan`` serialize
(``Program.save/load``, ``MemoryPlan.to_dict/from_dict``); TVM 0.27 cannot serialize a Relax
module holding constants, so a cache should store the ONNX file and the Program, not IRModules.
Heavy imports (tvm, torch, brevitas) happen inside the functions, so importing this package is
cheap.  ``testing.py`` builds random QCDQ networks for the tests.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "compile_onnx_to_bundle",
    "import_onnx",
    "lower_int8",
    "extract_program",
    "build_program",
    "load_program",
    "plan_memory",
    "emit_c",
    "quantize",
    "export_qcdq",
]


def import_onnx(onnx_path, *, pass_name: str = "tvm.import"):
    """ONNX file -> Relax IRModule (see :mod:`.onnx_import`)."""
    from .onnx_import import import_onnx as _import

    return _import(onnx_path, pass_name=pass_name)


def lower_int8(mod, allow_float_fallback: bool = False, *, pass_name: str = "tvm.int8"):
    """QCDQ Relax -> fused, scheduled int8 kernels (see :mod:`.qdq_to_int8`, :mod:`.lowering`)."""
    from .lowering import lower_int8 as _lower

    return _lower(mod, allow_float_fallback=allow_float_fallback, pass_name=pass_name)


def extract_program(mod, *, pass_name: str = "plan-memory"):
    """Lowered IRModule -> :class:`.program.Program` (tensors and kernel calls in order)."""
    from .program import extract_program as _extract

    return _extract(mod, pass_name=pass_name)


def build_program(mod, *, pass_name: str = "tvm.int8"):
    """Lowered IRModule -> :class:`.program.Program` with every kernel generated as C."""
    from .codegen import build_program as _build

    return _build(mod, pass_name=pass_name)


def load_program(directory):
    """A :class:`.program.Program` saved with ``Program.save(directory)``."""
    from .program import Program

    return Program.load(directory)


def plan_memory(prog_or_mod, *, schedule: str = "layer", ram_bytes: int | None = None,
                pass_name: str = "plan-memory"):
    """Program (or lowered IRModule) -> :class:`.memory.MemoryPlan` under ``schedule``
    (``"layer"``, ``"inplace"`` or ``"auto"``, which fits ``ram_bytes`` when given)."""
    from .memory import plan_memory as _plan
    from .program import Program

    prog = prog_or_mod if isinstance(prog_or_mod, Program) else extract_program(prog_or_mod)
    return _plan(prog, schedule=schedule, ram_bytes=ram_bytes, pass_name=pass_name)


def emit_c(prog_or_mod, bundle_dir, *, name: str, plan=None, pass_name: str = "codegen.c",
           extensions=()) -> dict:
    """Program (or lowered IRModule) -> C sources in ``bundle_dir``; returns the manifest
    entries.  With a Program this needs no TVM.  ``extensions``: ``codegen.CExtension``s."""
    from .codegen import emit_c as _emit
    from .program import Program

    prog = prog_or_mod if isinstance(prog_or_mod, Program) else build_program(prog_or_mod)
    return _emit(prog, bundle_dir, name=name, plan=plan, pass_name=pass_name, extensions=extensions)


def compile_onnx_to_bundle(onnx_path, bundle_dir, *, name: str,
                           allow_float_fallback: bool = False) -> dict:
    """QCDQ ONNX file -> bundle sources (include/, src/) in ``bundle_dir``; returns the manifest
    entries: input/output quantization, memory, layers, kernel count and MACs."""
    mod = import_onnx(onnx_path)
    prog = build_program(lower_int8(mod, allow_float_fallback))
    return emit_c(prog, Path(bundle_dir), name=name, plan=plan_memory(prog))


def quantize(model, calib, **kwargs):
    """Brevitas post-training quantization (see :func:`.brevitas.quantize`)."""
    from distillc.passes.quantize.brevitas_model import quantize as _quantize

    return _quantize(model, calib, **kwargs)


def export_qcdq(qmodel, example, path):
    """Brevitas QCDQ ONNX export (see :func:`.brevitas.export_qcdq`)."""
    from distillc.passes.quantize.brevitas_model import export_qcdq as _export

    return _export(qmodel, example, path)
