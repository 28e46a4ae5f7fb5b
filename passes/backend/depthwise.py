"""Depthwise 3x3 micro-kernels (issue 12, point 2): border pixels split off, weights in registers.

A depthwise 3x3 convolution (channel multiplier 1, stride 1 or 2, any zero padding, an int8 or
uint8 input with zero point 0, 8-bit or packed 4- / 2-bit weights) is lowered to a TIR kernel
with two ``call_extern`` blocks into C micro-kernels the bundle ships at the top of
``distillc_kernels.c`` (:func:`depthwise_kernels_c`):

* once per channel, ``distillc_dw3x3_weights_<b>bit`` reads the channel's 9 weights (unpacking
  packed ones) into 6 int32 values, the form the row kernel multiplies with: per window row ``r``
  the halfword pair ``(w[r][0], w[r][2])`` and ``w[r][1]``.  TVM's compaction makes that buffer a
  local ``int32_t[6]`` before the channel's rows, which GCC keeps in registers;
* once per output row, ``distillc_dw3x3_s<stride>_<s8|u8>`` writes the row's int32 sums into a
  row accumulator, two output pixels at a time.  A window row that lies outside the map (top and
  bottom padding) gets zero weights and a pointer to a row of the map, so no tap tests a row bound.
  Pixel pairs whose 4 (stride 2: 5) input columns lie inside the row read them with one word load
  and no test (the interior); the pairs at the left and right edge, and the last pixel of an odd
  row, read them with a bounds test per byte (a zero outside the row, i.e. the padding).

TVM fuses the layer's epilogue (bias, requantization, clamp) after the row call, over the row's
outputs, as for every other kernel.  With ``__ARM_FEATURE_DSP`` a pair of pixels is, per window
row, one word load, ``SXTB16`` (``UXTB16`` for uint8) and ``SXTB16 ROR 8`` into the columns
``(a0, a2)`` and ``(a1, a3)``, and ``SMLAD`` + ``SMLABB`` / ``SMLAD`` + ``SMLATB`` (6 MACs in 7
instructions at stride 1).  Elsewhere the same code runs with plain-C definitions of those
instructions, so the host tests exercise the same border logic and the outputs do not depend on
the path.

Loop partitioning inside TVM was tried first and segfaults in TVM 0.27 once the partitioned loop
holds the conv and its epilogue (NOTES.md); here the split lives in C, and the weight layout in
flash does not change (OIHW bytes or the packed rows of :mod:`.packing`).
"""

from __future__ import annotations

from .packing import PACKED_BITS

#: C functions by (stride, input dtype) / weight bits (see :func:`depthwise_kernels_c`).
ROW_KERNELS = {(s, dtype): f"distillc_dw3x3_s{s}_{'s8' if dtype == 'int8' else 'u8'}"
               for s in (1, 2) for dtype in ("int8", "uint8")}
WEIGHT_KERNELS = {bits: f"distillc_dw3x3_weights_{bits}bit" for bits in (8,) + PACKED_BITS}
#: Names of the TIR blocks that call them (the schedule looks for them).
ROW_BLOCK, WEIGHTS_BLOCK = "depthwise3x3_row", "depthwise3x3_weights"
#: int32 values a channel's weights take in the row kernel's form.
WEIGHT_WORDS = 6
_OUT_EWISE_FUSABLE = 4  # tvm::relax::OpPatternKind: FuseOps fuses the epilogue into the kernel


def eligible(weight_shape, data_shape, bits: int, *, strides, padding, dilation, groups) -> bool:
    """Whether a conv takes the depthwise micro-kernel: 3x3, one input channel per group and one
    output channel per input channel, the same stride 1 or 2 on both axes, no dilation, a top and
    left padding of at most 2 (the bottom and right padding are any: taps outside the map are zero
    wherever they are), 8-bit or packed weights."""
    o, per_group, kh, kw = (int(d) for d in weight_shape)
    channels = int(data_shape[1])
    strides = [int(s) for s in strides]
    return (int(groups) == channels == o and per_group == 1 and (kh, kw) == (3, 3)
            and strides[0] == strides[1] and strides[0] in (1, 2) and all(int(d) == 1 for d in dilation)
            and all(0 <= int(p) <= 2 for p in padding[:2]) and bits in WEIGHT_KERNELS)


def conv_func(data_shape, out_shape, weight_shape, *, bits: int, stride: int, padding, dtype: str):
    """The PrimFunc ``(x: int8/uint8 NCHW, w: OIHW int8 or packed uint8 rows) -> int32 NCHW``:
    one weight call per channel into ``wreg[c, 0:6]``, one row call per (image, channel, output
    row) into the accumulator, then a copy to the output (inlined into the epilogue)."""
    from tvm import tirx
    from tvm.script import tirx as T

    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731 - shapes as LegalizeOps types them
    n, c, h, w = (int(d) for d in data_shape)
    _, _, ho, wo = (int(d) for d in out_shape)
    xs, os_ = [i64(d) for d in (n, c, h, w)], [i64(d) for d in (n, c, ho, wo)]
    ws = [i64(d) for d in weight_shape]
    wdtype = "int8" if bits == 8 else "uint8"
    N, C, H, W, Wo = xs[0], xs[1], xs[2], xs[3], os_[3]
    WORDS = i64(WEIGHT_WORDS)
    row_kernel, weight_kernel = ROW_KERNELS[(int(stride), dtype)], WEIGHT_KERNELS[bits]
    pad_top, pad_left = int(padding[0]), int(padding[1])
    packed = bits != 8

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer(xs, dtype), wt: T.Buffer(ws, wdtype), out: T.Buffer(os_, "int32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": _OUT_EWISE_FUSABLE})
        # one row of WORDS per channel, flat: compute_at matches the region [vc * WORDS, + WORDS)
        wreg = T.sblock_alloc_buffer((C * WORDS,), "int32")
        acc = T.sblock_alloc_buffer(os_, "int32")
        for ch in range(C):
            with T.sblock(WEIGHTS_BLOCK):
                vc = T.axis.remap("S", [ch])
                if packed:
                    T.reads(wt[vc, 0:ws[1]])
                else:
                    T.reads(wt[vc, 0, 0:3, 0:3])
                T.writes(wreg[vc * WORDS:vc * WORDS + WORDS])
                # one pointer per value written: CompactBufferAllocation sizes wreg by the accesses
                if packed:
                    T.evaluate(T.call_extern(
                        "void", weight_kernel, T.address_of(wreg[vc * WORDS]), T.address_of(wreg[vc * WORDS + 1]),
                        T.address_of(wreg[vc * WORDS + 2]), T.address_of(wreg[vc * WORDS + 3]),
                        T.address_of(wreg[vc * WORDS + 4]), T.address_of(wreg[vc * WORDS + 5]),
                        T.address_of(wt[vc, 0])))
                else:
                    T.evaluate(T.call_extern(
                        "void", weight_kernel, T.address_of(wreg[vc * WORDS]), T.address_of(wreg[vc * WORDS + 1]),
                        T.address_of(wreg[vc * WORDS + 2]), T.address_of(wreg[vc * WORDS + 3]),
                        T.address_of(wreg[vc * WORDS + 4]), T.address_of(wreg[vc * WORDS + 5]),
                        T.address_of(wt[vc, 0, 0, 0])))
        for b, ch, y in T.grid(N, C, os_[2]):
            with T.sblock(ROW_BLOCK):
                vb, vc, vy = T.axis.remap("SSS", [b, ch, y])
                T.reads(x[vb, vc, 0:H, 0:W], wreg[vc * WORDS:vc * WORDS + WORDS])
                T.writes(acc[vb, vc, vy, 0:Wo])
                T.evaluate(T.call_extern(
                    "void", row_kernel, T.address_of(acc[vb, vc, vy, 0]), T.address_of(x[vb, vc, 0, 0]),
                    wreg[vc * WORDS], wreg[vc * WORDS + 1], wreg[vc * WORDS + 2], wreg[vc * WORDS + 3],
                    wreg[vc * WORDS + 4], wreg[vc * WORDS + 5], T.int32(h), T.int32(w), T.int32(wo), T.Cast("int32", vy),
                    T.int32(pad_top), T.int32(pad_left)))
        for b, ch, y, xx in T.grid(*os_):
            with T.sblock("group_conv2d_nchw_simd"):
                vb, vc, vy, vx = T.axis.remap("SSSS", [b, ch, y, xx])
                out[vb, vc, vy, vx] = acc[vb, vc, vy, vx]
    return func


def schedule(sch) -> bool:
    """Schedule a kernel that calls the depthwise micro-kernel: the weight call under the channel
    loop (``wreg`` becomes 6 locals), the epilogue (the copy out of the accumulator inlined into
    it) right after each row call, over that row (``acc`` becomes one row of int32).  Returns
    False for a kernel without a depthwise row call."""
    root = sch.get_sblock("root")
    if not any(sch.get(b).name_hint == ROW_BLOCK for b in sch.get_child_blocks(root)):
        return False
    from .lowering import _inline_elementwise

    _inline_elementwise(sch)
    row = sch.get_sblock(ROW_BLOCK)
    loops = sch.get_loops(row)
    sch.compute_at(sch.get_sblock(WEIGHTS_BLOCK), loops[1])
    for consumer in sch.get_consumers(row):
        sch.reverse_compute_at(consumer, loops[-1])
        _channel_constants_once(sch, consumer, loops[1], channels=int(sch.get(loops[1]).extent))
    return True


def _channel_constants_once(sch, block, channel_loop, *, channels: int) -> None:
    """Copy the per-channel constants the epilogue reads (bias, multiplier: one value per channel)
    into locals once per channel: the output is a byte pointer that may alias them, so GCC would
    otherwise load both again for every output pixel."""
    func = sch.mod["main"]
    constants = {p.name for p in func.params[1:-1]}  # buffer params: input, constants..., output
    done = set()
    while True:
        reads = list(sch.get(block).reads)
        todo = [k for k, r in enumerate(reads) if r.source.name in constants and r.source.name not in done
                and _elements(r.source) == channels]
        if not todo:
            return
        done.add(reads[todo[0]].source.name)
        sch.compute_at(sch.cache_read(block, todo[0], "global"), channel_loop)


def _elements(buffer) -> int:
    count = 1
    for d in buffer.shape:
        count *= int(d)
    return count


def depthwise_kernels_c(kernel_c: str) -> str:
    """The depthwise micro-kernels that generated kernel C calls, as C to put before it ("" for
    none).  Needs the 1x1 micro-kernels' prelude (``DISTILLC_MK_DSP``, the load helpers) first."""
    weights = [(bits, name) for bits, name in WEIGHT_KERNELS.items() if f"{name}(" in kernel_c]
    rows = [(key, name) for key, name in ROW_KERNELS.items() if f"{name}(" in kernel_c]
    if not rows and not weights:
        return ""
    out = [_DW_PRELUDE_C]
    for bits, name in weights:
        out.append(_WEIGHTS_C.format(name=name, read=_WEIGHT_READ[bits], wtype="int8_t" if bits == 8 else "uint8_t"))
    for (stride, dtype), name in rows:
        signed = dtype == "int8"
        out.append(_ROW_C.format(
            name=name, xtype=f"{dtype}_t", span=4 if stride == 1 else 5, stride=stride,
            ext="distillc_dw_sxtb16" if signed else "distillc_dw_uxtb16",
            ext_ror8="distillc_dw_sxtb16_ror8" if signed else "distillc_dw_uxtb16_ror8",
            pair=_PAIR_S1 if stride == 1 else _PAIR_S2, **_column_4(stride, signed)))
    return "".join(out)


def _column_4(stride: int, signed: bool) -> dict:
    """Stride 2 reads a 5th column per window row (``e0..e2``): C for its declaration and loads."""
    if stride == 1:
        return {"edecl": "", "eedge": "", "einterior": ""}
    byte = "(int32_t)" if not signed else "(int32_t)(int8_t)"
    edge = "".join(f" \\\n        e{r} = (uint32_t)(c + 4) < (uint32_t)w ? {byte}r{r}[c + 4] : 0;" for r in range(3))
    interior = "".join(f"\n        e{r} = {byte}r{r}[c + 4];" for r in range(3))
    return {"edecl": "\n    int32_t e0, e1, e2;", "eedge": edge, "einterior": interior}


# Weight ``r`` (0..8, row-major in the 3x3 window) of a channel's stored weights ``w``: an int8
# byte, or a field of a packed row (bits b * (r % (8/b)) of byte r / (8/b), low bits first).
_WEIGHT_READ = {
    8: "(int32_t)w[r]",
    4: "(int32_t)((uint32_t)w[r >> 1] << (28 - 4 * (r & 1))) >> 28",
    2: "(int32_t)((uint32_t)w[r >> 2] << (30 - 2 * (r & 3))) >> 30",
}

_DW_PRELUDE_C = r"""/* Depthwise 3x3 micro-kernels: distillc_dw3x3_weights_* turns one channel's 9 weights into
 * wr[0..2] = (w[r][0], w[r][2]) as two int16 halves and wr[3..5] = w[r][1], per window row r;
 * distillc_dw3x3_s<stride>_<s8|u8> writes the int32 sums of output row y (wo pixels) of one
 * channel plane x (h x w) into acc.  A window row outside the plane gets zero weights (padding);
 * a pixel pair whose input columns lie inside the row reads them with one word load, the pairs
 * at the edges and the last pixel of an odd row test each byte.  DSP instructions where
 * __ARM_FEATURE_DSP is defined, the same operations in plain C elsewhere. */
#ifdef DISTILLC_MK_DSP
#define distillc_dw_sxtb16(v) ((uint32_t)__sxtb16(v))
#define distillc_dw_uxtb16(v) ((uint32_t)__uxtb16(v))
#define distillc_dw_sxtb16_ror8(v) distillc_mk_sxtb16_ror8(v)
#define distillc_dw_uxtb16_ror8(v) distillc_mk_uxtb16_ror8(v)
#define distillc_dw_smlad(a, b, s) __smlad((int32_t)(a), (int32_t)(b), (s))
#define distillc_dw_smlabb(a, b, s) __smlabb((int32_t)(a), (int32_t)(b), (s))
#define distillc_dw_smlatb(a, b, s) __smlatb((int32_t)(a), (int32_t)(b), (s))
#define distillc_dw_smlabt(a, b, s) __smlabt((int32_t)(a), (int32_t)(b), (s))
#define distillc_dw_load32(p) distillc_mk_load32((const int8_t *)(p))
#else
/* the halfword of v at bit 0 (16), sign-extended */
DISTILLC_MK_INLINE int32_t distillc_dw_lo16(uint32_t v)
{
    return (int32_t)(v & 0xFFFFu) - (int32_t)((v & 0x8000u) << 1);
}

DISTILLC_MK_INLINE int32_t distillc_dw_hi16(uint32_t v)
{
    return distillc_dw_lo16(v >> 16);
}

DISTILLC_MK_INLINE uint32_t distillc_dw_sxtb16(uint32_t v)
{
    return (((v & 0x80u) ? 0xFF00u : 0u) | (v & 0xFFu)) | (((v & 0x800000u) ? 0xFF000000u : 0u) | (v & 0xFF0000u));
}

#define distillc_dw_uxtb16(v) ((v) & 0x00FF00FFu)
#define distillc_dw_sxtb16_ror8(v) distillc_dw_sxtb16(((v) >> 8) | ((v) << 24))
#define distillc_dw_uxtb16_ror8(v) distillc_dw_uxtb16(((v) >> 8) | ((v) << 24))
#define distillc_dw_smlad(a, b, s) \
    ((s) + distillc_dw_lo16(a) * distillc_dw_lo16(b) + distillc_dw_hi16(a) * distillc_dw_hi16(b))
#define distillc_dw_smlabb(a, b, s) ((s) + distillc_dw_lo16(a) * distillc_dw_lo16(b))
#define distillc_dw_smlatb(a, b, s) ((s) + distillc_dw_hi16(a) * distillc_dw_lo16(b))
#define distillc_dw_smlabt(a, b, s) ((s) + distillc_dw_lo16(a) * distillc_dw_hi16(b))
#define distillc_dw_load32(p) \
    ((uint32_t)(uint8_t)(p)[0] | ((uint32_t)(uint8_t)(p)[1] << 8) | ((uint32_t)(uint8_t)(p)[2] << 16) \
     | ((uint32_t)(uint8_t)(p)[3] << 24))
#endif

"""

_WEIGHTS_C = r"""DISTILLC_MK_INLINE void {name}(int32_t *k0, int32_t *k1, int32_t *k2, int32_t *m0, int32_t *m1,
                                              int32_t *m2, const {wtype} *w)
{{
    int32_t wr[6];
    int32_t v[9];
    int32_t r;
    for (r = 0; r < 9; ++r) {{
        v[r] = {read};
    }}
    for (r = 0; r < 3; ++r) {{
        wr[r] = (int32_t)(((uint32_t)v[3 * r] & 0xFFFFu) | ((uint32_t)v[3 * r + 2] << 16));
        wr[3 + r] = v[3 * r + 1];
    }}
    *k0 = wr[0];
    *k1 = wr[1];
    *k2 = wr[2];
    *m0 = wr[3];
    *m1 = wr[4];
    *m2 = wr[5];
}}

"""

_PAIR_S1 = r"""        /* columns c..c+3 of each row: (a0, a2) and (a1, a3) */
        lo = EXT(v0); hi = EXT_ROR8(v0);
        s0 = distillc_dw_smlad(lo, k0, s0); s0 = distillc_dw_smlabb(hi, m0, s0);
        s1 = distillc_dw_smlad(hi, k0, s1); s1 = distillc_dw_smlatb(lo, m0, s1);
        lo = EXT(v1); hi = EXT_ROR8(v1);
        s0 = distillc_dw_smlad(lo, k1, s0); s0 = distillc_dw_smlabb(hi, m1, s0);
        s1 = distillc_dw_smlad(hi, k1, s1); s1 = distillc_dw_smlatb(lo, m1, s1);
        lo = EXT(v2); hi = EXT_ROR8(v2);
        s0 = distillc_dw_smlad(lo, k2, s0); s0 = distillc_dw_smlabb(hi, m2, s0);
        s1 = distillc_dw_smlad(hi, k2, s1); s1 = distillc_dw_smlatb(lo, m2, s1);
"""

_PAIR_S2 = r"""        /* columns c..c+4 of each row: (a0, a2), (a1, a3) and a4 */
        lo = EXT(v0); hi = EXT_ROR8(v0);
        s0 = distillc_dw_smlad(lo, k0, s0); s0 = distillc_dw_smlabb(hi, m0, s0);
        s1 = distillc_dw_smlatb(lo, k0, s1); s1 = distillc_dw_smlatb(hi, m0, s1); s1 = distillc_dw_smlabt(e0, k0, s1);
        lo = EXT(v1); hi = EXT_ROR8(v1);
        s0 = distillc_dw_smlad(lo, k1, s0); s0 = distillc_dw_smlabb(hi, m1, s0);
        s1 = distillc_dw_smlatb(lo, k1, s1); s1 = distillc_dw_smlatb(hi, m1, s1); s1 = distillc_dw_smlabt(e1, k1, s1);
        lo = EXT(v2); hi = EXT_ROR8(v2);
        s0 = distillc_dw_smlad(lo, k2, s0); s0 = distillc_dw_smlabb(hi, m2, s0);
        s1 = distillc_dw_smlatb(lo, k2, s1); s1 = distillc_dw_smlatb(hi, m2, s1); s1 = distillc_dw_smlabt(e2, k2, s1);
"""

_ROW_C = r"""/* bytes c..c+3 of row p as a little-endian word, zero where a column lies outside 0..w-1 */
DISTILLC_MK_INLINE uint32_t {name}_edge(const {xtype} *p, int32_t c, int32_t w)
{{
    uint32_t v = 0;
    int32_t i;
    /* c is a constant where this is inlined: one word load, shifted, when the row holds 4 bytes */
    if (w >= 4 && c < 0 && c > -4) {{
        return distillc_dw_load32(p) << (8 * -c);
    }}
    if (w >= 4 && c >= 0 && c < w && c + 4 > w) {{
        return distillc_dw_load32(p + w - 4) >> (8 * (c + 4 - w));
    }}
    for (i = 0; i < 4; ++i) {{
        if ((uint32_t)(c + i) < (uint32_t)w) {{
            v |= (uint32_t)(uint8_t)p[c + i] << (8 * i);
        }}
    }}
    return v;
}}

/* The geometry (h, w, wo, pad_top, pad_left) is a constant at every call: inlined, the loop bounds
 * and the edge pairs' column tests fold away. */
DISTILLC_MK_INLINE void {name}(int32_t *acc, const {xtype} *x, int32_t wk0, int32_t wk1, int32_t wk2,
                                int32_t wm0, int32_t wm1, int32_t wm2, int32_t h, int32_t w, int32_t wo,
                                int32_t y, int32_t pad_top, int32_t pad_left)
{{
    const int32_t iy = y * {stride} - pad_top;
    /* a window row outside the plane: zero weights, and any row of the plane to read */
    const int32_t in0 = (uint32_t)iy < (uint32_t)h, in1 = (uint32_t)(iy + 1) < (uint32_t)h,
                  in2 = (uint32_t)(iy + 2) < (uint32_t)h;
    const uint32_t k0 = in0 ? (uint32_t)wk0 : 0u, k1 = in1 ? (uint32_t)wk1 : 0u, k2 = in2 ? (uint32_t)wk2 : 0u;
    const int32_t m0 = in0 ? wm0 : 0, m1 = in1 ? wm1 : 0, m2 = in2 ? wm2 : 0;
    const int32_t any = iy < 0 ? 0 : (iy > h - 1 ? h - 1 : iy);
    const {xtype} *r0 = x + (in0 ? iy : any) * w;
    const {xtype} *r1 = x + (in1 ? iy + 1 : any) * w;
    const {xtype} *r2 = x + (in2 ? iy + 2 : any) * w;
    /* pixel pairs [0, lo_pair) and [hi_pair, pairs) touch a column outside the row, [lo_pair, hi_pair) do not */
    const int32_t pairs = wo >> 1;
    int32_t lo_pair = (pad_left + 2 * {stride} - 1) / (2 * {stride});
    int32_t hi_pair = w - {span} + pad_left >= 0 ? (w - {span} + pad_left) / (2 * {stride}) + 1 : 0;
    int32_t p;
    uint32_t v0, v1, v2, lo, hi;
    int32_t s0, s1, c;{edecl}
    if (lo_pair > pairs) {{
        lo_pair = pairs;
    }}
    if (hi_pair > pairs) {{
        hi_pair = pairs;
    }}
    if (hi_pair < lo_pair) {{
        hi_pair = lo_pair;
    }}
#define EXT(v) {ext}(v)
#define EXT_ROR8(v) {ext_ror8}(v)
#define DISTILLC_DW_EDGE_PAIR() \
        c = 2 * {stride} * p - pad_left; \
        s0 = 0; \
        s1 = 0; \
        v0 = {name}_edge(r0, c, w); \
        v1 = {name}_edge(r1, c, w); \
        v2 = {name}_edge(r2, c, w);{eedge}
    for (p = 0; p < lo_pair; ++p) {{
        DISTILLC_DW_EDGE_PAIR()
{pair}        acc[2 * p] = s0;
        acc[2 * p + 1] = s1;
    }}
    for (; p < hi_pair; ++p) {{ /* the interior: no tests */
        c = 2 * {stride} * p - pad_left;
        s0 = 0;
        s1 = 0;
        v0 = distillc_dw_load32(r0 + c);
        v1 = distillc_dw_load32(r1 + c);
        v2 = distillc_dw_load32(r2 + c);{einterior}
{pair}        acc[2 * p] = s0;
        acc[2 * p + 1] = s1;
    }}
    for (; p < pairs; ++p) {{
        DISTILLC_DW_EDGE_PAIR()
{pair}        acc[2 * p] = s0;
        acc[2 * p + 1] = s1;
    }}
    if (wo & 1) {{ /* the last pixel of an odd row: a pair whose second pixel is not stored */
        DISTILLC_DW_EDGE_PAIR()
{pair}        acc[2 * p] = s0;
    }}
#undef DISTILLC_DW_EDGE_PAIR
#undef EXT
#undef EXT_ROR8
}}

"""
