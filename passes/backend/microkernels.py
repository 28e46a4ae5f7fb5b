"""SIMD micro-kernels for convolutions and dense layers (issue 12, point 3).

A 1x1 convolution (stride 1, no padding, one group) or a dense layer with 8-bit weights is lowered
to a TIR kernel whose reduction is one ``call_extern`` per block of 4 output channels x 2 pixels
into a micro-kernel, a C function the bundle ships at the top of ``distillc_kernels.c``
(:func:`micro_kernels_c`; one for int8 and one for uint8 inputs).  It writes the block's 8 int32 accumulators; TVM fuses the layer's
epilogue (bias, requantization, clamp, a residual add) after the call as for every other kernel,
so everything but the multiply-accumulate loop is TVM's code.

Every other convolution with one group and 8-bit weights (the 3x3 stem; any window, stride,
padding and dilation, an int8 or uint8 input with any zero point) takes the same micro-kernel
through an im2col (:func:`conv_im2col_func`): per output row and pixel pair, a TIR block copies
the two pixels' windows into ``col``, ``2 * C * KH * KW`` bytes ordered (input channel, window row,
window column, pixel), the order of the weights' ``C * KH * KW`` columns; a tap in the padding gets
the input's zero point.  Then one micro-kernel call per block of 4 output channels reads ``col``
as a 1x1 conv over ``C * KH * KW`` input channels 2 bytes apart (its pair of halfword loads becomes
one word).  The sums are over the raw input, so a nonzero zero point ``z`` leaves
``z * sum(w[o])`` (:func:`zero_point_correction`) too much in each; that constant is subtracted
in the fused epilogue.  ``col`` is a local array of the kernel (at most :data:`IM2COL_BYTES`:
larger windows keep TOPI's kernel), compacted by TVM to one pixel pair; the copy loops are
unrolled, so each tap's bounds test compares constants with the row's and pair's positions.  The
last pair of an odd row computes its second pixel too (from the padding or the map: defined
bytes), and the epilogue's predicate does not store it.

The micro-kernel multiplies pairs of int8 values widened to int16 with the Cortex-M DSP extension:
``SXTB16`` splits a word into two sign-extended halfwords, ``SMLAD`` adds both halfword products to
an accumulator (2 MACs per instruction).  Activations stay NCHW: a pixel pair (``x``, ``x + 1``) of
input channels ``k`` and ``k + 1`` is two halfword loads, ``(x[k][p], x[k][p+1], x[k+1][p],
x[k+1][p+1])``, whose ``SXTB16`` and ``SXTB16 ROR 8`` are the channel pairs of pixel ``p`` and
``p + 1``.  The weights are permuted at compile time (:func:`permute_weights`) so that one word
holds ``(w[o][k], w[o+1][k], w[o][k+1], w[o+1][k+1])``: its ``SXTB16`` / ``SXTB16 ROR 8`` are the
channel pairs of outputs ``o`` and ``o + 1``.  Per pair of input channels: 2 halfword + 2 word
loads, 6 ``SXTB16``, 8 ``SMLAD`` for 16 MACs.  Without ``__ARM_FEATURE_DSP`` (the host, a
Cortex-M0/M3) the same function is plain C over the same weight layout; both give the same int32
sums, so the outputs do not depend on the path.

Blocks are padded, not split: the weights of a layer whose output channels are not a multiple of 4
(input channels not a multiple of 2) get zero rows (a zero last column), and a row of odd width
ends with a 1-pixel block (the micro-kernel's ``n_px`` argument; the 1x1 path), whose second pixel
is neither read nor stored; the epilogue's predicates skip the padded channels.
"""

from __future__ import annotations

import numpy as np

#: The C functions a micro-kernel block calls, by the input's dtype (see :func:`micro_kernels_c`).
MICRO_KERNELS = {"int8": "distillc_mk_4x2_s8", "uint8": "distillc_mk_4x2_u8"}
#: The manifest's ``layers[].weights.layout`` of weights in the micro-kernel's order.
LAYOUT = "4x2-pairs"
#: Name of the TIR block that calls it (the schedule looks for it).
BLOCK = "conv2d_1x1_simd"
#: Output channels x pixels per block.
CHANNELS, PIXELS = 4, 2
#: Name of the TIR block that copies a pixel pair's windows for the micro-kernel (the im2col path).
IM2COL_BLOCK = "conv2d_im2col"
#: Largest im2col scratch of one pixel pair, in bytes (a local array of the kernel: the stack), as
#: lowering.UNPACK_LOCAL_BYTES; it also keeps the raw sums and the zero-point term far inside int32
#: (512 values x 128 x 255 < 2**24).
IM2COL_BYTES = 1024
#: Largest window (values per pixel) whose input-channel loop is unrolled too in the im2col copy.
IM2COL_UNROLL = 32
#: ``tvm::relax::OpPatternKind::kOutEWiseFusable``: FuseOps fuses the epilogue into the kernel.
_OUT_EWISE_FUSABLE = 4


def permute_weights(rows: np.ndarray) -> np.ndarray:
    """The micro-kernel's layout of an ``(O, K)`` int8 weight matrix (one row per output channel):
    ``(ceil(O/4), ceil(K/2), 8)``, byte ``4*g + 2*b + a`` of block ``ob``, pair ``j`` holding
    ``w[4*ob + 2*g + a][2*j + b]`` (zero where that is padding)."""
    count, length = rows.shape
    blocks, pairs = -(-count // CHANNELS), -(-length // 2)
    padded = np.zeros((blocks * CHANNELS, pairs * 2), dtype=np.int8)
    padded[:count, :length] = rows
    return np.ascontiguousarray(padded.reshape(blocks, 2, 2, pairs, 2).transpose(0, 3, 1, 4, 2).reshape(blocks, pairs, 8))


def unpermute_weights(permuted: np.ndarray, count: int, length: int) -> np.ndarray:
    """The ``(count, length)`` weight matrix back from :func:`permute_weights`'s layout."""
    blocks, pairs, _ = permuted.shape
    rows = permuted.reshape(blocks, pairs, 2, 2, 2).transpose(0, 2, 4, 1, 3).reshape(blocks * CHANNELS, pairs * 2)
    return rows[:count, :length]


def eligible_conv(weight_shape, bits: int, *, strides, padding, dilation, groups) -> bool:
    """Whether a conv goes through the micro-kernel: 1x1, stride 1, no padding, one group, weights
    stored one per byte (packed 4- and 2-bit weights keep their TOPI kernels)."""
    return (bits == 8 and int(groups) == 1 and tuple(int(d) for d in weight_shape[2:]) == (1, 1)
            and all(int(s) == 1 for s in strides) and all(int(p) == 0 for p in padding)
            and all(int(d) == 1 for d in dilation))


def conv1x1_func(data_shape, out_channels: int, dtype: str = "int8"):
    """The PrimFunc ``(x: int8 NCHW, w: permuted int8) -> int32 NCHW`` of a 1x1 conv: one
    micro-kernel call per (image, 4-channel block, row, pixel pair) into a padded accumulator, then
    a copy to the output (inlined into the epilogue by the schedule)."""
    n, k, h, w = (int(d) for d in data_shape)
    return _func((n, k, h, w), (n, int(out_channels), h, w), k, h * w, width=w, dtype=dtype)


def dense_func(data_shape, out_features: int, dtype: str = "int8"):
    """The PrimFunc ``(x: int8 (M, K), w: permuted int8) -> int32 (M, N)`` of a dense layer: the
    micro-kernel on one 1-pixel block per row and 4 outputs (channel stride 1)."""
    m, k = (int(d) for d in data_shape)
    return _func((m, k), (m, int(out_features)), k, 1, width=1, dtype=dtype)


def _func(x_shape, out_shape, k: int, stride: int, *, width: int, dtype: str):
    from tvm import tirx
    from tvm.script import tirx as T

    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731 - shapes as LegalizeOps types them
    dense = len(x_shape) == 2
    o = int(out_shape[1] if not dense else out_shape[-1])
    blocks, pairs, xblocks = -(-o // CHANNELS), -(-k // 2), -(-width // PIXELS)
    one, two, four = i64(1), i64(2), i64(4)
    xs, os_, ws = [i64(d) for d in x_shape], [i64(d) for d in out_shape], (i64(blocks), i64(pairs), i64(8))
    K, STRIDE, W, OB, XB = i64(k), int(stride), i64(width), i64(blocks), i64(xblocks)

    if dense:
        M = xs[0]

        @T.prim_func(private=True, s_tir=True)
        def func(x: T.Buffer(xs, dtype), wt: T.Buffer(ws, "int8"), out: T.Buffer(os_, "int32")):
            T.func_attr({"tirx.noalias": True, "op_pattern": _OUT_EWISE_FUSABLE})
            acc = T.sblock_alloc_buffer((M, OB * four, two), "int32")
            for m, ob in T.grid(M, OB):
                with T.sblock(BLOCK):
                    vm, vob = T.axis.remap("SS", [m, ob])
                    T.reads(x[vm, 0:K], wt[vob, 0:ws[1], 0:8])
                    T.writes(acc[vm, vob * four:vob * four + four, 0:2])
                    T.evaluate(T.call_extern(
                        "void", MICRO_KERNELS[dtype],
                        T.address_of(acc[vm, vob * four, 0]), T.address_of(acc[vm, vob * four, 1]),
                        T.address_of(acc[vm, vob * four + one, 0]), T.address_of(acc[vm, vob * four + one, 1]),
                        T.address_of(acc[vm, vob * four + two, 0]), T.address_of(acc[vm, vob * four + two, 1]),
                        T.address_of(acc[vm, vob * four + 3, 0]), T.address_of(acc[vm, vob * four + 3, 1]),
                        T.address_of(wt[vob, 0, 0]), T.address_of(x[vm, 0]), T.int32(k), T.int32(STRIDE), T.int32(1)))
            for m, j in T.grid(M, os_[1]):
                with T.sblock("matmul"):
                    vm, vj = T.axis.remap("SS", [m, j])
                    out[vm, vj] = acc[vm, vj, 0]
        return func

    N, H = xs[0], xs[2]

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer(xs, dtype), wt: T.Buffer(ws, "int8"), out: T.Buffer(os_, "int32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": _OUT_EWISE_FUSABLE})
        acc = T.sblock_alloc_buffer((N, OB * four, H, XB * two), "int32")
        for n, ob, y, xb in T.grid(N, OB, H, XB):
            with T.sblock(BLOCK):
                vn, vob, vy, vxb = T.axis.remap("SSSS", [n, ob, y, xb])
                T.reads(x[vn, 0:K, vy, 0:W], wt[vob, 0:ws[1], 0:8])
                T.writes(acc[vn, vob * four:vob * four + four, vy, vxb * two:vxb * two + two])
                T.evaluate(T.call_extern(
                    "void", MICRO_KERNELS[dtype],
                    T.address_of(acc[vn, vob * four, vy, vxb * two]),
                    T.address_of(acc[vn, vob * four, vy, vxb * two + one]),
                    T.address_of(acc[vn, vob * four + one, vy, vxb * two]),
                    T.address_of(acc[vn, vob * four + one, vy, vxb * two + one]),
                    T.address_of(acc[vn, vob * four + two, vy, vxb * two]),
                    T.address_of(acc[vn, vob * four + two, vy, vxb * two + one]),
                    T.address_of(acc[vn, vob * four + 3, vy, vxb * two]),
                    T.address_of(acc[vn, vob * four + 3, vy, vxb * two + one]),
                    T.address_of(wt[vob, 0, 0]), T.address_of(x[vn, 0, vy, vxb * two]),
                    T.int32(k), T.int32(STRIDE), T.Cast("int32", T.min(two, W - vxb * two))))
        for n, c, y, xx in T.grid(*os_):
            with T.sblock("conv2d_nchw_simd"):
                vn, vc, vy, vx = T.axis.remap("SSSS", [n, c, y, xx])
                out[vn, vc, vy, vx] = acc[vn, vc, vy, vx]
    return func


def eligible_im2col(weight_shape, bits: int, *, groups) -> bool:
    """Whether a conv the 1x1 path does not take goes through the micro-kernel on an im2col of
    each pixel pair (:func:`conv_im2col_func`): one group, 8-bit weights, a window of at most
    :data:`IM2COL_BYTES` / 2 values (any size, stride, padding, dilation and input zero point)."""
    window = int(np.prod([int(d) for d in weight_shape[1:]]))
    return bits == 8 and int(groups) == 1 and PIXELS * window <= IM2COL_BYTES


def zero_point_correction(rows: np.ndarray, zero_point: int) -> np.ndarray:
    """``zero_point * sum(w[o])`` per output channel (int32): what the im2col path subtracts from
    sums over the raw input, whose padding holds the zero point, to get the sums over
    ``q - zero_point`` (padding 0) that the layer's requantization expects."""
    return (int(zero_point) * rows.astype(np.int64).sum(axis=1)).astype(np.int32)


def conv_im2col_func(data_shape, out_shape, weight_shape, *, strides, padding, dilation, dtype: str,
                     zero_point: int = 0):
    """The PrimFunc ``(x: int8/uint8 NCHW, w: permuted int8) -> int32 NCHW`` of a conv with one
    group and any window: per (image, output row, pixel pair) the two pixels' windows are copied
    into ``col`` (input channel, window row, window column, pixel; ``zero_point`` where a tap lies
    in the padding), then one micro-kernel call per block of 4 output channels reads ``col`` as a
    1x1 conv over ``C * KH * KW`` channels 2 bytes apart.  ``col`` is compacted to that pixel
    pair's ``2 * C * KH * KW`` bytes, a local array of the kernel (the stack).  Every call takes 2
    pixels: the second one of an odd row's last pair is copied from the map or the padding and
    summed, and the epilogue's predicate does not store it.  The sums are over the raw input: the
    caller subtracts :func:`zero_point_correction` for a nonzero ``zero_point``."""
    from tvm import tirx
    from tvm.script import tirx as T

    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731 - shapes as LegalizeOps types them
    n, c, h, w = (int(d) for d in data_shape)
    _, o, ho, wo = (int(d) for d in out_shape)
    kh, kw = (int(d) for d in weight_shape[2:])
    k = c * kh * kw
    blocks, pairs, xblocks = -(-o // CHANNELS), -(-k // 2), -(-wo // PIXELS)
    xs, os_ = [i64(d) for d in (n, c, h, w)], [i64(d) for d in (n, o, ho, wo)]
    ws = (i64(blocks), i64(pairs), i64(8))
    N, C, H, W, HO, WO, KH, KW = (*xs, os_[2], os_[3], i64(kh), i64(kw))
    OB, XB, two, four, one = i64(blocks), i64(xblocks), i64(2), i64(4), i64(1)
    SY, SX = (i64(s) for s in strides)
    PT, PL = (i64(p) for p in padding[:2])
    DY, DX = (i64(d) for d in dilation)
    pad = tirx.IntImm(dtype, int(zero_point))
    kernel = MICRO_KERNELS[dtype]

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer(xs, dtype), wt: T.Buffer(ws, "int8"), out: T.Buffer(os_, "int32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": _OUT_EWISE_FUSABLE})
        col = T.sblock_alloc_buffer((N, HO, XB, C, KH, KW, two), dtype)
        acc = T.sblock_alloc_buffer((N, OB * four, HO, XB * two), "int32")
        for b, y, xb in T.grid(N, HO, XB):
            for ch, r, s, p in T.grid(C, KH, KW, two):
                with T.sblock(IM2COL_BLOCK):
                    vb, vy, vxb, vc, vr, vs, vp = T.axis.remap("SSSSSSS", [b, y, xb, ch, r, s, p])
                    T.reads(x[vb, vc, 0:H, 0:W])
                    T.writes(col[vb, vy, vxb, vc, vr, vs, vp])
                    col[vb, vy, vxb, vc, vr, vs, vp] = T.if_then_else(
                        vy * SY + vr * DY >= PT and vy * SY + vr * DY < H + PT
                        and (vxb * two + vp) * SX + vs * DX >= PL and (vxb * two + vp) * SX + vs * DX < W + PL,
                        x[vb, vc, vy * SY + vr * DY - PT, (vxb * two + vp) * SX + vs * DX - PL], pad)
            for ob in range(OB):
                with T.sblock(BLOCK):
                    vb, vy, vxb, vob = T.axis.remap("SSSS", [b, y, xb, ob])
                    T.reads(col[vb, vy, vxb, 0:C, 0:KH, 0:KW, 0:2], wt[vob, 0:ws[1], 0:8])
                    T.writes(acc[vb, vob * four:vob * four + four, vy, vxb * two:vxb * two + two])
                    T.evaluate(T.call_extern(
                        "void", kernel,
                        T.address_of(acc[vb, vob * four, vy, vxb * two]),
                        T.address_of(acc[vb, vob * four, vy, vxb * two + one]),
                        T.address_of(acc[vb, vob * four + one, vy, vxb * two]),
                        T.address_of(acc[vb, vob * four + one, vy, vxb * two + one]),
                        T.address_of(acc[vb, vob * four + two, vy, vxb * two]),
                        T.address_of(acc[vb, vob * four + two, vy, vxb * two + one]),
                        T.address_of(acc[vb, vob * four + 3, vy, vxb * two]),
                        T.address_of(acc[vb, vob * four + 3, vy, vxb * two + one]),
                        T.address_of(wt[vob, 0, 0]), T.address_of(col[vb, vy, vxb, 0, 0, 0, 0]),
                        T.int32(k), T.int32(PIXELS), T.int32(PIXELS)))
        for b, ch, y, xx in T.grid(*os_):
            with T.sblock("conv2d_nchw_simd"):
                vb, vc, vy, vx = T.axis.remap("SSSS", [b, ch, y, xx])
                out[vb, vc, vy, vx] = acc[vb, vc, vy, vx]
    return func


def schedule(sch) -> bool:
    """Schedule a kernel that calls the micro-kernel: the epilogue (with the copy out of the
    accumulator inlined into it) runs right after each call, over the block's 4 x 2 outputs
    (unrolled, predicated where the block is padding), so the accumulator is 8 int32 locals.
    Returns False for a kernel without a micro-kernel call."""
    root = sch.get_sblock("root")
    calls = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint == BLOCK]
    if not calls:
        return False
    from .lowering import _inline_elementwise

    _inline_elementwise(sch, keep=(IM2COL_BLOCK,))
    block = sch.get_sblock(BLOCK)
    loops = sch.get_loops(block)
    for consumer in sch.get_consumers(block):
        sch.reverse_compute_at(consumer, loops[-1])
        for loop in sch.get_loops(consumer)[len(loops):]:
            sch.unroll(loop)
    if any(sch.get(b).name_hint == IM2COL_BLOCK for b in sch.get_child_blocks(root)):
        # the window loops unrolled (the channel loop too for a small window): each tap's bounds
        # test then compares the row's and pixel's positions with constants
        window = sch.get_loops(sch.get_sblock(IM2COL_BLOCK))[-4:]
        extents = [int(sch.get(loop).extent) for loop in window]
        for loop in window[1 if extents[0] * extents[1] * extents[2] > IM2COL_UNROLL else 0:]:
            sch.unroll(loop)
    return True


def micro_kernels_c(kernel_c: str) -> str:
    """The micro-kernels that generated kernel C calls, as C to put before it ("" for none)."""
    from .depthwise import depthwise_kernels_c

    used = [(dtype, name) for dtype, name in MICRO_KERNELS.items() if f"{name}(" in kernel_c]
    depthwise = depthwise_kernels_c(kernel_c)  # the depthwise 3x3 ones (depthwise.py) share the prelude
    if not used and not depthwise:
        return ""
    return _PRELUDE_C + "".join(
        _MICRO_KERNEL_C.format(name=name, xtype=f"{dtype}_t", ext="__sxtb16" if dtype == "int8" else "__uxtb16",
                               ext_ror8="distillc_mk_sxtb16_ror8" if dtype == "int8" else "distillc_mk_uxtb16_ror8")
        for dtype, name in used) + depthwise


_PRELUDE_C = r"""/* SIMD micro-kernel of the 1x1 convolutions and dense layers: the int32 sums of 4 output
 * channels x 2 pixels (a_op: channel o, pixel p) over k input channels; w: the block's weights,
 * (w[o][j], w[o+1][j], w[o][j+1], w[o+1][j+1]) per 4 bytes for o = 0, 2 and each pair j (a zero
 * weight pads an odd k); x: input channel 0 at the block's first pixel, hw bytes between
 * channels; n_px: 2, or 1 for a block whose second pixel lies outside the row (it is neither read
 * nor stored).  With the DSP extension (__ARM_FEATURE_DSP: Cortex-M4/M7/M33...) int8 pairs are
 * widened with SXTB16 and accumulated with SMLAD; elsewhere plain C computes the same sums. */
#if defined(__ARM_FEATURE_DSP) && !defined(DISTILLC_PORTABLE_KERNELS)
#include <arm_acle.h>
#define DISTILLC_MK_DSP 1
#endif
#if defined(__GNUC__)
#define DISTILLC_MK_INLINE static inline __attribute__((always_inline))
#else
#define DISTILLC_MK_INLINE static inline
#endif

#ifdef DISTILLC_MK_DSP
/* little-endian loads of any alignment (Cortex-M4/M7 load halfwords and words unaligned) */
DISTILLC_MK_INLINE uint32_t distillc_mk_load16(const int8_t *p)
{
    return (uint32_t)(uint8_t)p[0] | ((uint32_t)(uint8_t)p[1] << 8);
}

DISTILLC_MK_INLINE uint32_t distillc_mk_load32(const int8_t *p)
{
    return (uint32_t)(uint8_t)p[0] | ((uint32_t)(uint8_t)p[1] << 8) | ((uint32_t)(uint8_t)p[2] << 16)
           | ((uint32_t)(uint8_t)p[3] << 24);
}

/* bytes 1 and 3 of v, extended: one SXTB16/UXTB16 with ROR #8 (GCC does not fold a rotate into
 * the intrinsic) */
#if defined(__GNUC__)
DISTILLC_MK_INLINE uint32_t distillc_mk_sxtb16_ror8(uint32_t v)
{
    uint32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

DISTILLC_MK_INLINE uint32_t distillc_mk_uxtb16_ror8(uint32_t v)
{
    uint32_t r;
    __asm__("uxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}
#else
#define distillc_mk_sxtb16_ror8(v) __sxtb16(((v) >> 8) | ((v) << 24))
#define distillc_mk_uxtb16_ror8(v) __uxtb16(((v) >> 8) | ((v) << 24))
#endif

/* One pair of input channels (k, k + 1) of a block, inside a micro-kernel (w: the pair's 8 weight
 * bytes; s00..s31: its sums).  2 pixels: xv = (x[k][p], x[k][p+1], x[k+1][p], x[k+1][p+1]), ext and
 * ext_ror8 widen its bytes 0, 2 and 1, 3 (SXTB16 / UXTB16 by the input's sign), 16 MACs in 8 SMLADs.
 * 1 pixel: x0 = (x[k][p], x[k+1][p]) already widened, 8 MACs in 4 SMLADs. */
#define DISTILLC_MK_PAIR_2PX(ext, ext_ror8, xv)                                       \
    do {                                                                             \
        const uint32_t xv_ = (xv);                                                   \
        const int32_t x0 = (int32_t)ext(xv_), x1 = (int32_t)ext_ror8(xv_);           \
        uint32_t wv = distillc_mk_load32(w);                                         \
        int32_t wa = (int32_t)__sxtb16(wv), wb = (int32_t)distillc_mk_sxtb16_ror8(wv); \
        s00 = __smlad(wa, x0, s00);                                                  \
        s01 = __smlad(wa, x1, s01);                                                  \
        s10 = __smlad(wb, x0, s10);                                                  \
        s11 = __smlad(wb, x1, s11);                                                  \
        wv = distillc_mk_load32(w + 4);                                              \
        wa = (int32_t)__sxtb16(wv);                                                  \
        wb = (int32_t)distillc_mk_sxtb16_ror8(wv);                                   \
        s20 = __smlad(wa, x0, s20);                                                  \
        s21 = __smlad(wa, x1, s21);                                                  \
        s30 = __smlad(wb, x0, s30);                                                  \
        s31 = __smlad(wb, x1, s31);                                                  \
    } while (0)

#define DISTILLC_MK_PAIR_1PX(x0v)                                                     \
    do {                                                                             \
        const int32_t x0 = (x0v);                                                    \
        uint32_t wv = distillc_mk_load32(w);                                         \
        s00 = __smlad((int32_t)__sxtb16(wv), x0, s00);                               \
        s10 = __smlad((int32_t)distillc_mk_sxtb16_ror8(wv), x0, s10);                \
        wv = distillc_mk_load32(w + 4);                                              \
        s20 = __smlad((int32_t)__sxtb16(wv), x0, s20);                               \
        s30 = __smlad((int32_t)distillc_mk_sxtb16_ror8(wv), x0, s30);                \
    } while (0)

#endif

"""

_MICRO_KERNEL_C = r"""DISTILLC_MK_INLINE void {name}(int32_t *a00, int32_t *a01, int32_t *a10, int32_t *a11,
                                                int32_t *a20, int32_t *a21, int32_t *a30, int32_t *a31,
                                                const int8_t *w, const {xtype} *x, int32_t k, int32_t hw,
                                                int32_t n_px)
{{
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#ifdef DISTILLC_MK_DSP
    int32_t j;
    const int32_t pairs = k >> 1;
    if (n_px == 2) {{
        for (j = 0; j < pairs; ++j) {{
            DISTILLC_MK_PAIR_2PX({ext}, {ext_ror8},
                                 distillc_mk_load16((const int8_t *)x) | (distillc_mk_load16((const int8_t *)x + hw) << 16));
            x += 2 * hw;
            w += 8;
        }}
        if (k & 1) {{ /* the last channel alone: its pair's second weight is the zero padding */
            DISTILLC_MK_PAIR_2PX({ext}, {ext_ror8}, distillc_mk_load16((const int8_t *)x));
        }}
    }} else {{
        for (j = 0; j < pairs; ++j) {{
            DISTILLC_MK_PAIR_1PX((int32_t){ext}((uint32_t)(uint8_t)x[0] | ((uint32_t)(uint8_t)x[hw] << 16)));
            x += 2 * hw;
            w += 8;
        }}
        if (k & 1) {{
            DISTILLC_MK_PAIR_1PX((int32_t){ext}((uint32_t)(uint8_t)x[0]));
        }}
    }}
#else
    int32_t c;
    for (c = 0; c < k; ++c) {{
        const int8_t *wc = w + (c >> 1) * 8 + (c & 1) * 2;
        const int32_t x0 = x[c * hw];
        const int32_t x1 = n_px == 2 ? x[c * hw + 1] : 0;
        s00 += wc[0] * x0;
        s01 += wc[0] * x1;
        s10 += wc[1] * x0;
        s11 += wc[1] * x1;
        s20 += wc[4] * x0;
        s21 += wc[4] * x1;
        s30 += wc[5] * x0;
        s31 += wc[5] * x1;
    }}
#endif
    *a00 = s00;
    *a01 = s01;
    *a10 = s10;
    *a11 = s11;
    *a20 = s20;
    *a21 = s21;
    *a30 = s30;
    *a31 = s31;
}}

"""
