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
the reduction loops.  For the Cortex-M (no vector unit) a conv2d computes 4 output channels per
input load (register blocking) and small windows / channel loops are unrolled.

Failures here are bugs (the integer graph is ours), so they raise RuntimeError, not PassError.
"""

from __future__ import annotations

from . import depthwise, inplace, microkernels
from .packing import UNPACK_STAGE
from .qdq_to_int8 import LAYERS_ATTR, PASS_NAME, qdq_to_int8

KERNELS_ATTR = "distillc.kernels"
#: Module attribute: for each kernel call in ``main`` (by the name of the var it binds), its layer.
CALLS_ATTR = "distillc.calls"


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
        annotated = tvm.transform.Sequential([
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
        ])(int_mod)
        grouped = relax.transform.FuseOps()(_reductions_take_epilogues(annotated))
        kernels, calls = _group_layers(annotated, grouped, layers)
        fused = tvm.transform.Sequential([
            relax.transform.FuseTIR(),
            # a kernel that only reshapes becomes R.reshape: a view, no copy, no arena bytes
            relax.transform.RewriteDataflowReshape(),
            relax.transform.DeadCodeElimination(["main"]),
        ])(grouped)
    except Exception as err:  # an integer graph we built that TVM rejects is our bug
        raise RuntimeError(f"{pass_name}: TVM failed to legalize/fuse the int8 graph: {err}") from err
    fused = fused.with_attr(KERNELS_ATTR, json.dumps(kernels, sort_keys=True))
    fused = fused.with_attr(CALLS_ATTR, json.dumps(calls, sort_keys=True))
    updates = {}
    for gvar, func in fused.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                updates[gvar] = schedule_kernel(func)
                in_place = inplace.variant(func, updates[gvar])  # plan-memory's "inplace" schedule may call it
            except Exception as err:
                raise RuntimeError(f"{pass_name}: cannot schedule kernel {gvar.name_hint}: {err}") from err
            if in_place is not None:
                updates[tvm.ir.GlobalVar(gvar.name_hint + inplace.SUFFIX)] = in_place
    for gvar, func in updates.items():
        fused[gvar] = func
    return fused


_COMM_REDUCE, _OUT_EWISE_FUSABLE = 3, 4  # tvm::relax::OpPatternKind


def _reductions_take_epilogues(mod):
    """Mark reductions (the window sum of a global average pool) as out-element-wise fusable.

    FuseOps fuses element-wise consumers into a conv or matmul but not into a plain reduction,
    which would leave the pool's requantization as a second kernel and an int32 tensor in the
    arena.  Our schedule handles any reduction + epilogue, so the reduction may lead a group.
    """
    from tvm import tirx

    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and \
                "op_pattern" in func.attrs and int(func.attrs["op_pattern"]) == _COMM_REDUCE:
            updates[gvar] = func.with_attr("op_pattern", _OUT_EWISE_FUSABLE)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _group_layers(before, grouped, layers: dict) -> tuple[dict, dict]:
    """For each fused group: the layer (op kind, ONNX node) of its first recorded binding; and for
    each call of a group in ``main`` (by the name of the var it binds), the layer that call computes.

    FuseOps gives groups with identical computations (two convs of the same shape) one function,
    whose first binding names only one of their layers.  A call's own layer is found through its
    weights: the group's first layer binding, with the call's arguments in place of the group's
    parameters, reads the same constants as exactly one layer of ``before`` (the module FuseOps
    ran on).  A layer without constants (a pooling) is the next layer of its kind in ``before``'s
    order after the previous call's.
    """
    import tvm
    from tvm import relax

    def constants(args) -> list:
        return [a for a in args if isinstance(a, tvm.ir.Constant)]

    def call_args(value) -> list:  # a layer binding is call_tir(prim, (args...)) after LegalizeOps
        if isinstance(value, relax.Call) and len(value.args) > 1 and isinstance(value.args[1], relax.Tuple):
            return list(value.args[1].fields)
        return list(getattr(value, "args", []))

    layer_constants = []  # (constants, layer) of every layer binding of `before`
    for block in before["main"].body.blocks:
        for binding in block.bindings:
            info = layers.get(binding.var.name)
            if info is not None:
                layer_constants.append((constants(call_args(binding.value)), {**info, "var": binding.var.name}))

    by_group = {}  # GlobalVar -> (layer, its binding's arguments in terms of the group's parameters)
    for gvar, func in grouped.functions.items():
        if not isinstance(func, relax.Function) or gvar.name_hint == "main":
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                info = layers.get(binding.var.name)
                if info is not None and gvar not in by_group:
                    by_group[gvar] = ({**info, "var": binding.var.name}, func.params, call_args(binding.value))

    position = 0  # index in layer_constants just after the previous call's layer

    def own_layer(group, call) -> dict:
        nonlocal position
        info, params, args = group
        bound = dict(zip(params, call.args))
        wanted = constants([bound.get(a, a) for a in args])
        if wanted:
            found = [k for k, (consts, _) in enumerate(layer_constants)
                     if len(consts) == len(wanted) and all(c.same_as(w) for c, w in zip(consts, wanted))]
        else:
            found = [next((k for k in range(position, len(layer_constants))
                           if layer_constants[k][1]["op"] == info["op"]), None)]
        if len(found) != 1 or found[0] is None:
            return info
        position = found[0] + 1
        return layer_constants[found[0]][1]

    table, calls = {}, {}
    for block in grouped["main"].body.blocks:
        for binding in block.bindings:
            op = getattr(binding.value, "op", None)
            if isinstance(op, relax.GlobalVar) and op in by_group:
                calls[binding.var.name] = own_layer(by_group[op], binding.value)
                table.setdefault(op.name_hint, by_group[op][0])
    return table, calls


def schedule_kernel(func):
    """Inline element-wise stages and compact reduction accumulators of one fused PrimFunc.

    A conv2d with a multiple of 4 output channels additionally computes 4 channels per input
    load (register blocking); if that schedule fails for an unusual shape, the plain one is
    used.
    """
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    if microkernels.schedule(sch):  # a 1x1 conv or dense layer on the SIMD micro-kernel
        return sch.mod["main"]
    if depthwise.schedule(sch):  # a depthwise 3x3 conv on its row micro-kernel
        return sch.mod["main"]
    for blocked in (True, False):
        sch = Schedule(func)
        try:
            _schedule(sch, blocked)
        except Exception:  # noqa: BLE001 - TVM schedule errors; retry without blocking
            if not blocked:
                raise
            continue
        return sch.mod["main"]
    raise AssertionError("unreachable")


CHANNEL_BLOCK = 4


def _schedule(sch, blocked: bool) -> None:
    unpack, per_byte = _weight_unpacking(sch)
    keep = (unpack,) if _unpacks_per_channel(sch, unpack, per_byte, blocked) else ()
    _inline_elementwise(sch, keep=keep)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        stmt = sch.get(block)
        iter_types = [iv.iter_type for iv in stmt.iter_vars]
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
        consumers = sch.get_consumers(block)
        channels = int(sch.get(loops[1]).extent) if n_spatial == 4 else 0
        if (blocked and stmt.name_hint == "conv2d_nchw" and channels % CHANNEL_BLOCK == 0
                and channels > CHANNEL_BLOCK):
            # (n, f, y, x, rc, ry, rx) -> (n, fo, y, x, rc, ry, rx, fi): fi innermost, unrolled,
            # so each input value is loaded once for CHANNEL_BLOCK accumulators
            n, f, y, x = loops[:4]
            reduction = loops[4:]
            fo, fi = sch.split(f, factors=[None, CHANNEL_BLOCK])
            sch.reorder(fo, y, x, *reduction, fi)
            if keep:  # packed weights: the block's channels unpacked into a local array
                sch.compute_at(sch.get_sblock(unpack), fo)
            elif per_byte:
                # a 1x1 conv on packed weights: the input-channel loop steps whole bytes (4 values
                # when it can: fewer loop steps), so each value's bit offset in its byte is a
                # constant (one SBFX per weight)
                rc = int(sch.get(reduction[0]).extent)
                rc_o, rc_i = sch.split(reduction[0], factors=[None, 4 if rc % 4 == 0 else per_byte])
                sch.unroll(rc_i)
                reduction = [rc_o, rc_i] + list(reduction[1:])
            for consumer in consumers:
                sch.reverse_compute_at(consumer, x)
            sch.decompose_reduction(block, reduction[0])
            sch.unroll(fi)
            big = [loop for loop in reduction if int(sch.get(loop).extent) > 1]
            if len(big) >= 2 and int(sch.get(big[-1]).extent) * int(sch.get(big[-2]).extent) <= 9:
                sch.unroll(big[-2])
                sch.unroll(big[-1])
            continue
        for consumer in consumers:
            sch.reverse_compute_at(consumer, loops[n_spatial - 1])
        sch.decompose_reduction(block, loops[n_spatial])
        if not _selects(stmt):
            _unroll_reduction(sch, loops[n_spatial:])
        if keep and stmt.name_hint == "conv2d_nchw":  # packed weights: the channel's, unpacked once
            sch.compute_at(sch.get_sblock(unpack), loops[1])
        if DEPTHWISE_WEIGHTS_LOCAL and stmt.name_hint == "group_conv2d_nchw" and n_spatial == 4:
            channel_weights_in_locals(sch, block, stmt, loops[1], unpack if keep else None)


#: Depthwise/grouped convs copy one channel's window weights into locals before its spatial loops
#: (``False`` gives the previous kernels, which reload every weight for every pixel; tests compare).
DEPTHWISE_WEIGHTS_LOCAL = True


def channel_weights_in_locals(sch, block, stmt, channel_loop, unpack) -> None:
    """A depthwise conv's window weights of one channel in locals, set once under ``channel_loop``:
    packed weights (``unpack``, the name of their unpacking block) are unpacked there, unrolled;
    8-bit ones are copied (:func:`_weights_per_channel`)."""
    if unpack:
        cache = sch.get_sblock(unpack)
        sch.compute_at(cache, channel_loop)
        for loop in sch.get_loops(cache)[2:]:
            if int(sch.get(loop).extent) > 1:
                sch.unroll(loop)
    else:
        _weights_per_channel(sch, block, stmt, channel_loop)


def _weights_per_channel(sch, block, stmt, channel_loop) -> None:
    """Read the weights of one output channel (``w[f, :, :, :]``, 9 values for a 3x3 depthwise
    window) into a local array once per channel, outside the spatial loops.

    With the window unrolled every local is read at a constant index, so GCC keeps them in
    registers instead of loading each weight byte again for every output pixel.
    """
    window = [iv.var for iv in stmt.iter_vars[4:]]
    weights = [r.source for r in stmt.reads
               if len(r.region) == 4 and all(r.region[2 + k].min.same_as(window[1 + k]) for k in range(2))]
    if len(weights) != 1:
        return
    reads = sch.get(block).reads
    index = [k for k, r in enumerate(reads) if r.source.same_as(weights[0])]
    if len(index) != 1:
        return
    cache = sch.cache_read(block, index[0], "global")
    sch.compute_at(cache, channel_loop)
    for loop in sch.get_loops(cache)[2:]:
        if int(sch.get(loop).extent) > 1:
            sch.unroll(loop)


def _selects(block) -> bool:
    """Whether a reduction combines by max/min (a pooling), i.e. reads its accumulator twice.

    TVM's C printer names a repeated subexpression once per scope (``uint8_t v_ = out[i];``) and
    reuses that name; in an unrolled window every step is in one scope, so ``max(out[i], x)``
    would keep reading the value ``out[i]`` had before the first step.  Such reductions stay
    loops: each iteration is its own scope.  (A sum reads its accumulator once, inline.)
    """
    from tvm import tirx

    body = block.body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, (tirx.Max, tirx.Min))


def _unroll_reduction(sch, reduction_loops) -> None:
    """Unroll small kernel windows (3x3) fully and long channel loops by 4 (the MCU has no
    vector unit; unrolling removes loop overhead from the multiply-accumulate)."""
    loops = [loop for loop in reduction_loops if int(sch.get(loop).extent) > 1]
    if not loops:
        return
    extents = [int(sch.get(loop).extent) for loop in loops]
    if len(loops) >= 2 and extents[-1] * extents[-2] <= 9:
        sch.unroll(loops[-2])
        sch.unroll(loops[-1])
    elif extents[-1] % 4 == 0 and extents[-1] > 4:
        _, inner4 = sch.split(loops[-1], factors=[None, 4])
        sch.unroll(inner4)
    elif extents[-1] <= 8:
        sch.unroll(loops[-1])


#: Largest local array (bytes, on the stack) a conv kernel unpacks the packed weights of one output
#: channel (or block of CHANNEL_BLOCK channels) into, when it cannot read them at constant bit offsets.
UNPACK_LOCAL_BYTES = 1024


def _unpacks_per_channel(sch, unpack, per_byte: int, blocked: bool) -> bool:
    """Whether a kernel's packed weights are unpacked into a local array once per output channel
    (or block of channels), before the spatial loops, instead of where each weight is read.

    Always for a depthwise (grouped) conv, which reads its window again for every pixel; for a
    conv whose input-channel loop cannot step whole bytes (a window larger than 1x1, or input
    channels not a multiple of the values per byte: each bit offset would be computed at run time)
    when the array holds at most :data:`UNPACK_LOCAL_BYTES`.  Dense layers and 1x1 convs that step
    whole bytes read the packed bytes directly.
    """
    if unpack is None:
        return False
    consumers = [sch.get(c) for c in sch.get_consumers(sch.get_sblock(unpack))]
    if len(consumers) != 1:
        return False
    if consumers[0].name_hint == "group_conv2d_nchw":
        return DEPTHWISE_WEIGHTS_LOCAL
    if consumers[0].name_hint != "conv2d_nchw":
        return False
    _, channels, _, _, rc, ry, rx = (int(iv.dom.extent) for iv in consumers[0].iter_vars)
    block = CHANNEL_BLOCK if blocked and channels % CHANNEL_BLOCK == 0 and channels > CHANNEL_BLOCK else 1
    # a 1x1 conv steps whole bytes when blocked (split in _schedule) or when _unroll_reduction
    # splits its channel loop by 4 or unrolls it
    if ry * rx == 1 and rc % per_byte == 0 and (block > 1 or rc <= 8 or rc % 4 == 0):
        return False
    return block * rc * ry * rx <= UNPACK_LOCAL_BYTES


def _weight_unpacking(sch) -> tuple:
    """``(block name, values per byte)`` of the kernel's packed-weight unpacking stage
    (:mod:`.packing`), or ``(None, 0)``."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if name.startswith(UNPACK_STAGE + "_"):
            return name, 8 // int(name[len(UNPACK_STAGE) + 1:].removesuffix("bit"))
    return None, 0


def _inline_elementwise(sch, keep=()) -> None:
    """compute_inline every spatial, non-output block (but those named in ``keep``) until none
    is left that can be inlined."""
    changed = True
    while changed:
        changed = False
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block in sch.get_child_blocks(root):
            stmt = sch.get(block)
            if stmt.name_hint in outputs or stmt.name_hint in keep or any(iv.iter_type != 0 for iv in stmt.iter_vars):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # not inlinable (e.g. read twice with different indices): keep it
                continue
            changed = True
            break
