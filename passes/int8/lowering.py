"""Lower the integer Relax graph to fused, scheduled TIR kernels (the ``tvm.int8`` stage).

``lower_int8`` = :func:`qdq_to_int8.qdq_to_int8` + TVM's ``LegalizeOps``,
``AnnotateTIROpPattern``, ``FuseOps``, ``FuseTIR`` + a small schedule per kernel.  After it,
``main`` is a straight line of ``R.call_tir`` calls, one per kernel, whose arguments are the
input, intermediate tensors and constants (weights, biases, multipliers).

``FoldConstant`` is deliberately not run: the rewrite already produced every constant in its
final integer form, and folding would widen the int32 multipliers to int64 arrays.

The schedule keeps kernels free of large temporaries (which TVM's C backend would put on the
stack): element-wise producers (padding, casts) are inlined into their consumer, the epilogue
of a reduction (bias, requantization, clamp, cast) is moved under the reduction's spatial loops
so its accumulator shrinks to one scalar, and the accumulator's initialisation is hoisted out of
the reduction loops.
"""

from __future__ import annotations

from distillc.errors import PassError

from .qdq_to_int8 import LAYERS_ATTR, PASS_NAME, qdq_to_int8

KERNELS_ATTR = "distillc.kernels"


def lower_int8(mod, *, allow_float_fallback: bool = False, pass_name: str = PASS_NAME):
    """Rewrite QCDQ ``mod`` to integers, fuse it into kernels and schedule them."""
    int_mod = qdq_to_int8(mod, allow_float_fallback=allow_float_fallback, pass_name=pass_name)
    return fuse_and_schedule(int_mod, pass_name=pass_name)


def fuse_and_schedule(int_mod, *, pass_name: str = PASS_NAME):
    """Legalize, fuse and schedule an integer Relax module (output of ``qdq_to_int8``)."""
    import json

    import tvm
    from tvm import relax, tirx

    layers = json.loads(str(int_mod.attrs[LAYERS_ATTR])) if LAYERS_ATTR in int_mod.attrs else {}
    try:
        grouped = tvm.transform.Sequential([
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
        ])(int_mod)
        kernels = _group_layers(grouped, layers)
        fused = tvm.transform.Sequential([
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(["main"]),
        ])(grouped)
    except Exception as err:  # TVM raises its own error types
        raise PassError(pass_name, f"TVM failed to legalize/fuse the int8 graph: {err}") from err
    fused = fused.with_attr(KERNELS_ATTR, json.dumps(kernels, sort_keys=True))
    updates = {}
    for gvar, func in fused.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                updates[gvar] = schedule_kernel(func)
            except Exception as err:
                raise PassError(pass_name, f"cannot schedule kernel {gvar.name_hint}: {err}") from err
    for gvar, func in updates.items():
        fused[gvar] = func
    return fused


def _group_layers(grouped, layers: dict) -> dict:
    """For each fused group: the layer (op kind, ONNX node) of its first recorded binding."""
    from tvm import relax

    table = {}
    for gvar, func in grouped.functions.items():
        if not isinstance(func, relax.Function) or gvar.name_hint == "main":
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                info = layers.get(binding.var.name)
                if info is not None and gvar.name_hint not in table:
                    table[gvar.name_hint] = {**info, "var": binding.var.name}
    return table


def schedule_kernel(func):
    """Inline element-wise stages and compact reduction accumulators of one fused PrimFunc."""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    _inline_elementwise(sch)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        iter_types = [iv.iter_type for iv in sch.get(block).iter_vars]
        if all(t == 0 for t in iter_types):
            continue
        n_spatial = 0
        for t in iter_types:
            if t != 0:
                break
            n_spatial += 1
        loops = sch.get_loops(block)
        if n_spatial == 0 or len(loops) != len(iter_types):
            continue
        for consumer in sch.get_consumers(block):
            sch.reverse_compute_at(consumer, loops[n_spatial - 1])
        sch.decompose_reduction(block, loops[n_spatial])
    return sch.mod["main"]


def _inline_elementwise(sch) -> None:
    """compute_inline every spatial, non-output block until none is left that can be inlined."""
    changed = True
    while changed:
        changed = False
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block in sch.get_child_blocks(root):
            stmt = sch.get(block)
            if stmt.name_hint in outputs or any(iv.iter_type != 0 for iv in stmt.iter_vars):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # not inlinable (e.g. read twice with different indices): keep it
                continue
            changed = True
            break
