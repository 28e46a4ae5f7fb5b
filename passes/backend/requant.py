"""Fixed-point requantization arithmetic shared by the int8 rewrite and its tests.

A requantization maps int32 accumulators ``acc_i`` with real scales ``s_i`` (per channel or
per tensor) to an output with scale ``s_out``:

    q = clamp(round_half_even(sum_i acc_i * s_i / s_out) + zp_out, lo, hi)

The real ratios ``M_i = s_i / s_out`` become int32 multipliers ``m_i = round(M_i * 2**S)``
with one shift ``S`` shared by all terms of one layer, so the C kernel computes

    p = sum_i (int64)acc_i * m_i
    q = (p + 2**(S-1) - 1 + ((p >> S) & 1)) >> S     # round half to even, like onnxruntime

with a 64-bit ``p``.  Where the rewrite proves every ``|acc_i|`` (bias included) below 2**31
and the shifted result plus ``zp_out`` inside int32, ``acc_i`` is an int32 and each product
one 32x32->64 multiply, and the clamp runs in int32 (``qdq_to_int8._fits_32_bits``); the result
is the same.  A shared shift keeps the shift out of the weight arrays; the
multipliers keep at least 24 significant bits for every channel whose ratio is within 2**7 of
the largest, far below one output LSB.
"""

from __future__ import annotations

import math

import numpy as np

MULTIPLIER_BITS = 31  # |m| < 2**31: multipliers are stored as int32 in flash
MAX_SHIFT = 62


def round_half_even(x) -> np.ndarray:
    """Round to nearest, ties to even (``np.rint``), as onnxruntime's QuantizeLinear does."""
    return np.rint(np.asarray(x, dtype=np.float64))


def choose_shift(ratios: list[np.ndarray], *, operand_bits: int = 31) -> int:
    """The largest shift S such that every ``|M| * 2**S`` fits an int32 and sums fit int64.

    ``ratios`` holds each term's ``M_i`` (any shape); ``operand_bits`` bounds the multiplied
    operands (``|acc_i + bias_i| < 2**operand_bits``; 31 for a plain int32 accumulator).  With n
    terms one bit per doubling of n is kept free so ``sum_i operand_i * m_i`` cannot overflow
    64 bits.
    """
    largest = max(float(np.max(np.abs(r))) for r in ratios)
    if not math.isfinite(largest) or largest <= 0.0:
        return 31
    exponent = math.frexp(largest)[1]  # largest < 2**exponent
    headroom = max(0, math.ceil(math.log2(len(ratios))) - 1) + max(0, operand_bits - 31)
    shift = MULTIPLIER_BITS - 1 - exponent - headroom
    return int(min(MAX_SHIFT, max(1, shift)))


def fixed_point(ratio: np.ndarray, shift: int) -> np.ndarray:
    """``round(ratio * 2**shift)`` as int64, checked to fit in int32."""
    scaled = round_half_even(np.asarray(ratio, dtype=np.float64) * float(2**shift))
    if np.any(np.abs(scaled) >= 2**MULTIPLIER_BITS):
        raise OverflowError("requantization multiplier does not fit in int32")
    return scaled.astype(np.int64)


def requantize_reference(accs: list[np.ndarray], multipliers: list[np.ndarray], shift: int,
                         zero_point: int, lo: int, hi: int) -> np.ndarray:
    """NumPy model of the C requantization (used by tests to check the emitted kernels)."""
    total = np.zeros(np.broadcast_shapes(*[a.shape for a in accs]), dtype=np.int64)
    for acc, mult in zip(accs, multipliers):
        total = total + acc.astype(np.int64) * np.asarray(mult, dtype=np.int64)
    half = np.int64(1) << np.int64(shift - 1)
    rounded = (total + half - 1 + ((total >> shift) & 1)) >> shift
    return np.clip(rounded + zero_point, lo, hi)
