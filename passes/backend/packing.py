"""Sub-8-bit weights: stored packed in flash, unpacked inside the kernel that reads them.

A layer whose integer weights all fit ``b`` signed bits (``b`` = 2 or 4: Brevitas' 2-bit and 4-bit
students, 3-bit ones in 4) keeps them packed, ``8 / b`` per byte.  The storage is one row per
output channel (conv: ``w[o, :, :, :]`` in ``I, KH, KW`` order; dense: ``w[:, n]`` over ``K``), the
order in which the kernel's reduction walks a channel's weights; value ``r`` of a row lives in byte
``r // (8 / b)`` of the row, bits ``b * (r % (8 / b))`` upwards (low bits first), in two's
complement; each row starts on a byte (a row whose length is not a multiple of ``8 / b`` ends with
unused zero bits), so the position of a value inside its byte depends only on ``r`` and unrolled
reduction loops read fields at constant bit offsets.

The kernel is a TE computation: an ``unpack_weights`` stage (the logical int8 weight tensor from
the packed bytes) feeding the same TOPI conv2d (or dense reduction) that ``LegalizeOps`` would
emit.  The schedule inlines the stage into the reduction (each weight is sign-extended where it is
read: ``(int32_t)((uint32_t)byte << (32 - b - offset)) >> (32 - b)``, one ``SBFX`` on Cortex-M
when the offset is a constant), or, for a depthwise conv, computes it once per channel into a
local array before the channel's spatial loops.  Nothing is unpacked into RAM.
"""

from __future__ import annotations

import numpy as np

#: The packed widths, narrowest first; a layer whose weights fit none of them keeps one byte each.
PACKED_BITS = (2, 4)
#: Name of the TE stage that unpacks a weight tensor (``unpack_weights_4bit``; the schedule looks
#: for it).
UNPACK_STAGE = "unpack_weights"


def storage_bits(w_int: np.ndarray) -> int:
    """The bits per stored weight: 2 or 4 when every value fits that many signed bits, else 8
    (16 when a weight does not fit a byte, e.g. an asymmetric weight zero point)."""
    lo, hi = int(w_int.min()), int(w_int.max())
    for bits in PACKED_BITS + (8,):
        if -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
            return bits
    return 16


def row_bytes(length: int, bits: int) -> int:
    """Bytes of one packed row of ``length`` values."""
    per = 8 // bits
    return (length + per - 1) // per


def pack_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    """``rows`` (R, L) of signed integers that fit ``bits`` -> (R, row_bytes(L, bits)) uint8."""
    rows = np.asarray(rows, dtype=np.int64)
    per = 8 // bits
    count, length = rows.shape
    padded = np.zeros((count, row_bytes(length, bits) * per), dtype=np.int64)
    padded[:, :length] = rows & ((1 << bits) - 1)
    fields = padded.reshape(count, -1, per)
    shifts = (np.arange(per, dtype=np.int64) * bits).reshape(1, 1, per)
    return (fields << shifts).sum(axis=2).astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack_rows` (int64 values), as the kernels read them."""
    per = 8 // bits
    packed = np.asarray(packed, dtype=np.int64)
    shifts = (np.arange(per, dtype=np.int64) * bits).reshape(1, 1, per)
    fields = ((packed[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :length]
    return np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)


# ----------------------------------------------------------------------------------------------
# TE computations (called through BlockBuilder.call_te by qdq_to_int8)


def _field(packed, row, r, bits: int):
    """Signed field ``r`` of packed row ``row``, as int32."""
    from tvm import tirx

    per = 8 // bits
    byte = packed[row, tirx.floordiv(r, per)].astype("uint32")
    up = tirx.const(32 - bits, "uint32") - tirx.floormod(r, per).astype("uint32") * tirx.const(bits, "uint32")
    # left-align the field in a 32-bit word, then an arithmetic shift right sign-extends it
    return tirx.shift_right((byte << up).astype("int32"), tirx.const(32 - bits, "int32"))


def unpack_conv_weights(packed, shape: tuple, bits: int):
    """The OIHW int8 weight tensor of ``shape`` from its packed rows (one per output channel)."""
    from tvm import te

    _, cin, kh, kw = (int(d) for d in shape)

    def value(o, i, y, x):
        return _field(packed, o, (i * kh + y) * kw + x, bits).astype("int8")

    return te.compute(tuple(int(d) for d in shape), value, name=f"{UNPACK_STAGE}_{bits}bit")


def packed_conv2d(data, packed, *, weight_shape, bits, strides, padding, dilation, groups):
    """``conv2d(data, unpack(packed))`` in NCHW/OIHW with int32 accumulation (as LegalizeOps'
    TOPI conv of the int8 weights)."""
    from tvm import topi

    weight = unpack_conv_weights(packed, weight_shape, bits)
    return topi.nn.conv(data, weight, strides, padding, dilation, groups, "NCHW", "OIHW", out_dtype="int32")


def packed_dense(data, packed, *, weight_shape, bits):
    """``matmul(data, W)`` for a (..., K) activation and a (K, N) weight stored as N packed rows
    over K; int32 accumulation (as LegalizeOps' matmul with ``out_dtype="int32"``)."""
    from tvm import te

    k_len, n_len = (int(d) for d in weight_shape)
    weight = te.compute((k_len, n_len), lambda k, n: _field(packed, n, k, bits).astype("int8"),
                        name=f"{UNPACK_STAGE}_{bits}bit")
    out_shape = tuple(data.shape[:-1]) + (n_len,)
    k = te.reduce_axis((0, k_len), name="k")

    def compute(*idx):
        return te.sum(data[idx[:-1] + (k,)].astype("int32") * weight[k, idx[-1]].astype("int32"), axis=k)

    return te.compute(out_shape, compute, name="matmul")
