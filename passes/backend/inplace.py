"""In-place depthwise convolution: the output written over the input (``plan-memory``'s ``inplace``).

A depthwise conv (channel multiplier 1) whose input dies at that layer needs the input only until
the last output that reads it is computed.  Its in-place kernel computes the outputs in raster
order (channel, row, column; each output's window read before the output is written) and writes
output element ``e`` at ``shift`` bytes *below* where the unshifted output would go, with the
output and the input at the same base otherwise: output byte ``e`` lies at ``input + e - shift``.
``shift`` is the smallest (aligned) distance that keeps every write below every input byte a
later output still reads (:func:`shift_bytes`); for a 3x3 window, stride 1, padding 1 on a
``W``-wide map it is ``W + 1`` rounded up to 4 (the rows above the current one, which the kernel
still reads, live in those bytes: the line buffer), for stride 2 it is 0.  So the pair takes
``shift + max(input, output)`` bytes instead of ``input + output`` and nothing is copied.

The in-place kernel must visit the outputs in raster order and write each one only after reading
its window; a write may also come after the reads of later outputs of its row (the row
micro-kernel of :mod:`.depthwise` reads a whole row's windows first), never before an earlier
output's reads.  A TOPI depthwise kernel gets an in-place kernel of its own, scheduled here pixel by
pixel (:func:`codegen.build_program` drops it where its C equals the layer kernel's); the row
micro-kernel's layer kernel is its own in-place kernel (:func:`variant`).  ``tvm.int8``
generates it for every depthwise kernel (:func:`variant`); ``plan-memory`` decides per layer
(:mod:`.memory`).
"""

from __future__ import annotations

import numpy as np

#: Suffix of an in-place variant's name (TVM function and C kernel).
SUFFIX = "_inplace"
_DEPTHWISE_BLOCK = "group_conv2d_nchw"


def variant(func, scheduled):
    """The in-place kernel of a fused depthwise PrimFunc (``scheduled``: the layer schedule's
    kernel), or None if ``func`` is not a depthwise conv with channel multiplier 1 whose output
    elements match its input's.

    A kernel on the depthwise row micro-kernel (:mod:`.depthwise`) computes one output row of one
    channel after another and writes a row only after its row call has read the row's windows:
    that order is raster enough (each write lies below what later rows read, see
    :func:`shift_bytes`), so its in-place kernel is ``scheduled`` itself.  A TOPI depthwise kernel
    gets a schedule of its own, in raster order pixel by pixel.
    """
    from tvm.s_tir import Schedule

    from .depthwise import ROW_BLOCK

    if not _is_depthwise(func, ROW_BLOCK):
        return None
    sch = Schedule(func)
    if any(sch.get(b).name_hint == ROW_BLOCK for b in sch.get_child_blocks(sch.get_sblock("root"))):
        return scheduled
    sch = Schedule(func)
    _schedule(sch)
    return sch.mod["main"]


def _is_depthwise(func, row_block: str) -> bool:
    from tvm import tirx

    buffers = [p for p in func.params if isinstance(p, tirx.Buffer)]
    if len(buffers) < 2:
        return False
    data, out = buffers[0], buffers[-1]
    shapes = [[int(d) for d in b.shape] for b in (data, out)]
    if len(shapes[0]) != 4 or len(shapes[1]) != 4 or shapes[0][:2] != shapes[1][:2] or shapes[0][0] != 1:
        return False
    if np.dtype(str(data.dtype)).itemsize != np.dtype(str(out.dtype)).itemsize:
        return False
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return names.count(_DEPTHWISE_BLOCK) == 1 or names.count(row_block) == 1


def _schedule(sch) -> None:
    """Epilogue under the output column loop (one accumulator, written once after its window),
    window unrolled, the channel's weights read once per channel; loops stay (n, c, y, x)."""
    from . import lowering

    unpack, _ = lowering._weight_unpacking(sch)
    lowering._inline_elementwise(sch, keep=(unpack,) if unpack else ())
    block = sch.get_sblock(_DEPTHWISE_BLOCK)
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    for consumer in sch.get_consumers(block):
        sch.reverse_compute_at(consumer, loops[3])
    sch.decompose_reduction(block, loops[4])
    window = [loop for loop in loops[4:] if int(sch.get(loop).extent) > 1]
    if window and int(np.prod([int(sch.get(loop).extent) for loop in window])) <= 25:
        for loop in window:
            sch.unroll(loop)
    lowering.channel_weights_in_locals(sch, block, stmt, loops[1], unpack)


def shift_bytes(conv: dict, in_shape, out_shape, itemsize: int, align: int) -> int | None:
    """How far below the input the in-place kernel's output starts (bytes, a multiple of
    ``align``), or None when the layer is not a depthwise conv with channel multiplier 1.

    In raster order, output element ``e`` (flat index) is written at ``e - shift`` (in elements,
    relative to the input); every later element reads only input elements at or above the
    lowest valid tap of its window.  ``shift`` is the least value that keeps each write below
    the lowest element any later output reads.
    """
    if not conv or len(in_shape) != 4 or len(out_shape) != 4:
        return None
    n, c, h, w = (int(d) for d in in_shape)
    n_o, c_o, h_o, w_o = (int(d) for d in out_shape)
    if n != 1 or n_o != 1 or c != c_o or int(conv.get("groups", 1)) != c or len(conv.get("kernel", ())) != 2:
        return None
    (sy, sx), (dy, dx), (kh, kw) = conv["strides"], conv["dilation"], conv["kernel"]
    pt, pl = conv["padding"][0], conv["padding"][1]
    big = np.iinfo(np.int64).max // 4

    def lowest_valid(out_size, stride, pad, dil, k, size):
        taps = np.arange(out_size)[:, None] * stride - pad + np.arange(k)[None, :] * dil
        valid = (taps >= 0) & (taps < size)
        return np.where(valid.any(axis=1), np.where(valid, taps, big).min(axis=1), -1)

    rows = lowest_valid(h_o, sy, pt, dy, kh, h)
    cols = lowest_valid(w_o, sx, pl, dx, kw, w)
    reads = (np.arange(c)[:, None, None] * (h * w) + rows[None, :, None] * w + cols[None, None, :]).reshape(-1)
    reads[(np.broadcast_to(rows[None, :, None] < 0, (c, h_o, w_o)) |
           np.broadcast_to(cols[None, None, :] < 0, (c, h_o, w_o))).reshape(-1)] = big  # no tap in the map
    later = np.minimum.accumulate(reads[::-1])[::-1]  # lowest read of elements e..end
    later = np.append(later[1:], big)  # ... of the elements after e
    needed = int(max(0, (np.arange(reads.size) - later + 1).max()))
    return -(-needed * int(itemsize) // align) * align
