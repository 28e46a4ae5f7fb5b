"""QcdqToInt8: rewrite a QCDQ Relax graph (float ops between quantize/dequantize) into integers.

The ONNX frontend imports QCDQ as ``R.quantize``/``R.dequantize`` around float ops.  This pass
walks ``main`` once, in order, and keeps for each float value a symbolic description of what
it really is, instead of the float op that computes it:

* ``Dequant``   -- an int8/uint8 tensor with a per-tensor scale and zero point;
* ``Const``     -- a constant, with its integer values and scales when it came from
                   ``DequantizeLinear`` (weights, biases);
* ``Accum``     -- ``clamp(sum_i acc_i * s_i, lo, hi)``: int32 accumulators (a conv2d or matmul
                   of int8 operands, a window sum, a rescaled tensor) with real scales and a
                   pending clamp (ReLU, ReLU6, Clip).

Integer Relax ops are emitted as the walk goes (int8 conv2d/matmul with int32 accumulation,
int32 bias add, window sums); a ``QuantizeLinear`` of an ``Accum`` becomes the fixed-point
requantization of :mod:`requant` (a 64-bit product, rounding shift, zero point, clamp, cast;
in 32-bit operands and an int32 clamp where bounds from the stored weights prove that exact), so
after ``FuseOps``/``FuseTIR`` a conv, its bias, requantization and activation are one kernel.
A float op the walk cannot express is an error naming the op and its ONNX node, unless float
fallback is allowed: then its inputs are dequantized in Relax and the op runs in float.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from distillc.errors import PassError

from . import depthwise, microkernels, packing
from .onnx_import import NODE_MAP_ATTR, sanitize_name
from .requant import choose_shift, fixed_point, round_half_even

#: Internal switch (tests, benchmarks): False forces the 64-bit requantization everywhere.
REQUANT_32 = True
#: Internal switch (tests, benchmarks): False stores every weight in a byte (no sub-8-bit packing).
PACK_WEIGHTS = True
#: Internal switch (tests, benchmarks): False lowers 1x1 convs and dense layers to TOPI's kernels
#: instead of the SIMD micro-kernel (microkernels.py).
MICRO_KERNELS = True
#: Internal switch (tests, benchmarks): False lowers depthwise 3x3 convs to TOPI's kernels instead of
#: the row micro-kernel with the borders split off (depthwise.py).
DEPTHWISE_KERNELS = True

QUANT_ATTR = "distillc.quant"
LAYERS_ATTR = "distillc.layers"
PASS_NAME = "tvm.int8"

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767),
               "int32": (-(2**31), 2**31 - 1)}


# ----------------------------------------------------------------------------------------------
# Symbolic values


@dataclass
class IntTensor:
    """An integer Relax tensor of the rewritten function."""

    expr: object
    dtype: str
    shape: tuple


@dataclass
class Dequant:
    """A float tensor equal to ``(q - zero_point) * scale``."""

    q: IntTensor
    scale: float
    zero_point: int


@dataclass
class Const:
    """A constant; ``q``/``scale``/``zp`` (same shape as ``value``) when it was dequantized."""

    value: np.ndarray
    q: np.ndarray | None = None
    scale: np.ndarray | None = None
    zp: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.q is not None


@dataclass
class Term:
    """``(expr + bias) * scale``: an int32 accumulator tensor, an integer bias, and the real
    value of one unit (both broadcastable to the tensor).  ``bound`` (broadcastable too) is a
    proven bound on ``|expr|`` computed from the stored weights and the input's integer range,
    or None when nothing is known; with it the requantization may add the bias and multiply in
    32-bit operands (see :meth:`_Rewriter.requantize`), else the bias is added after widening
    to 64 bits (so a bias near the int32 limits cannot overflow)."""

    expr: object
    scale: np.ndarray
    bias: np.ndarray | None = None
    bound: np.ndarray | None = None


@dataclass
class Accum:
    """``clamp(sum_i term_i.expr * term_i.scale, lo, hi)``, not yet requantized."""

    terms: list
    shape: tuple
    lo: float = -math.inf
    hi: float = math.inf
    kind: str = "requantize"  # what produced the accumulator, for the manifest's layer table
    view: tuple | None = None  # a pending reshape, applied after requantization

    @property
    def clamped(self) -> bool:
        return self.lo != -math.inf or self.hi != math.inf


@dataclass
class FloatInput:
    """The float input of the imported graph; only a QuantizeLinear may consume it."""

    var: object


@dataclass
class FloatValue:
    """A float tensor computed by a float-fallback op."""

    expr: object


@dataclass
class PendingConcat:
    """A concat of dequantized tensors with different quantizations, waiting for the
    QuantizeLinear after it: each part is requantized to that output on its own (as
    onnxruntime's float concat followed by one quantize rounds each element once), then the
    integer parts are concatenated."""

    parts: list
    axis: int


@dataclass
class _Boundary:
    """Quantization of the bundle's int8 input and output (recorded in the module attrs)."""

    input: dict | None = None
    output: dict | None = None
    fallback: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Entry point


def qdq_to_int8(mod, *, allow_float_fallback: bool = False, pass_name: str = PASS_NAME):
    """Rewrite ``mod["main"]`` (imported QCDQ) into integer Relax; returns a new IRModule.

    The new ``main`` takes the int8 input tensor and returns the int8 output tensor.  The
    quantization of both, and the ops that fell back to float, are in the module attribute
    ``distillc.quant`` (a JSON string).
    """
    from tvm import relax

    rewriter = _Rewriter(mod, allow_float_fallback, pass_name)
    new_mod = rewriter.run()
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    return new_mod


def read_quant_attr(mod) -> dict:
    """The ``distillc.quant`` attribute of a rewritten module, as a dict."""
    attrs = mod.attrs
    if attrs is None or QUANT_ATTR not in attrs:
        raise KeyError("module has no distillc.quant attribute: run qdq_to_int8 first")
    return json.loads(str(attrs[QUANT_ATTR]))


class _Rewriter:
    """One walk over ``main``: maps each binding to a symbolic value, emitting integer ops."""

    def __init__(self, mod, allow_float_fallback: bool, pass_name: str):
        self.mod = mod
        self.allow_fallback = allow_float_fallback
        self.pass_name = pass_name
        attrs = mod.attrs
        node_map = attrs[NODE_MAP_ATTR] if attrs is not None and NODE_MAP_ATTR in attrs else {}
        self.node_map = {str(k): str(v) for k, v in dict(node_map).items()}
        self.values: dict = {}
        self.layers: dict[str, dict] = {}
        self.used_names: set[str] = set()
        self.boundary = _Boundary()
        self.bb = None
        self.input_param = None
        self.current = "?"  # label of the binding being rewritten, for errors
        self.last_layer = ""  # name of the layer emit_layer recorded last

    # -- driver ---------------------------------------------------------------------------------

    def run(self):
        import tvm
        from tvm import relax

        func = self.mod["main"]
        params = list(func.params)
        if len(params) != 1:
            raise self.error(f"the model must have exactly one input, it has {len(params)}")
        param = params[0]
        shape = _shape_of(param)
        self.values[param] = FloatInput(param)
        self.input_param = relax.Var(sanitize_name(param.name) + "_int8", relax.TensorType(shape, "int8"))

        others = {gv: f for gv, f in self.mod.functions.items() if gv.name_hint != "main"}
        self._propagate_labels(func)
        self.bb = relax.BlockBuilder(tvm.IRModule(others))
        with self.bb.function("main", [self.input_param], attrs={"num_input": 1}):
            with self.bb.dataflow():
                body = func.body
                for block in body.blocks:
                    for binding in block.bindings:
                        self.current = self.label(binding.var)
                        self.values[binding.var] = self.visit(binding.var, binding.value)
                self.current = "output"
                out = self.output_value(self.lookup(body.body))
                gv_out = self.bb.emit_output(out)
            self.bb.emit_func_output(gv_out)
        new_mod = self.bb.get()
        quant = {"input": self.boundary.input, "output": self.boundary.output,
                 "float_fallback": self.boundary.fallback}
        attrs = {NODE_MAP_ATTR: self.node_map, QUANT_ATTR: json.dumps(quant, sort_keys=True),
                 LAYERS_ATTR: json.dumps(self.layers, sort_keys=True)}
        for key, value in attrs.items():
            new_mod = new_mod.with_attr(key, value)
        return new_mod

    def _propagate_labels(self, func) -> None:
        """Give intermediate variables of a multi-binding ONNX node (Conv = conv2d + bias add)
        the label of the node: the first labelled variable that consumes them."""
        from tvm import relax

        consumers: dict[str, list[str]] = {}
        order = []
        for block in func.body.blocks:
            for binding in block.bindings:
                order.append(binding.var.name)
                value = binding.value
                args = list(value.args) if isinstance(value, relax.Call) else [value]
                for arg in args:
                    if isinstance(arg, relax.Var):
                        consumers.setdefault(arg.name, []).append(binding.var.name)
        for name in reversed(order):
            if name in self.node_map:
                continue
            for user in consumers.get(name, []):
                if user in self.node_map:
                    self.node_map[name] = self.node_map[user]
                    break

    def label(self, var) -> str:
        return self.node_map.get(var.name, var.name)

    def node_name(self, var) -> str:
        """A unique Relax variable name derived from the ONNX node that produced ``var``."""
        label = self.node_map.get(var.name)
        base = sanitize_name(label.rsplit(" (", 1)[0]) if label else sanitize_name(var.name)
        name, i = base, 1
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def emit_layer(self, expr, var, kind: str, macs: int = 0):
        """Emit the anchor op of a layer, named after its ONNX node, and record it."""
        name = self.node_name(var)
        out = self.bb.emit(expr, name_hint=name)
        self.layers[name] = {"op": kind, "node": self.label(var), "macs": int(macs)}
        self.last_layer = name
        return out

    def error(self, message: str) -> PassError:
        return PassError(self.pass_name, message)

    def lookup(self, expr):
        import tvm
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr not in self.values:
                raise self.error(f"unknown variable {expr.name} (not in main's dataflow)")
            return self.values[expr]
        if isinstance(expr, tvm.ir.Constant):
            value = expr.value
            if hasattr(value, "numpy"):
                return Const(value.numpy())
            return Const(np.asarray(value))
        return expr  # ShapeExpr, PrimValue, GlobalVar, Tuple: handled by the op that takes them

    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name_hint=name)

    # -- dispatch -------------------------------------------------------------------------------

    def visit(self, var, value):
        import tvm
        from tvm import relax

        if isinstance(value, relax.Call) and hasattr(value.op, "name"):
            op_name = str(value.op.name)
            args = [self.lookup(a) for a in value.args]
            handler = _HANDLERS.get(op_name)
            if handler is not None:
                result = handler(self, var, value, args)
                if result is not None:
                    return result
            # all-constant subexpressions (shape arithmetic, weight clipping) are evaluated
            if args and all(isinstance(a, Const) or not _is_tensor_value(a) for a in args) and any(
                isinstance(a, Const) for a in args
            ):
                return Const(self.eval_constant(value, args))
            return self.unsupported(var, value, args, op_name)
        if isinstance(value, (relax.Var, tvm.ir.Constant)):
            return self.lookup(value)
        return self.unsupported(var, value, [], type(value).__name__)

    def unsupported(self, var, call, args, op_name: str):
        short = op_name.replace("relax.", "")
        if not self.allow_fallback:
            raise self.error(
                f"cannot lower op '{short}' of ONNX node '{self.current}' to int8 "
                f"(supported between QuantizeLinear/DequantizeLinear: {', '.join(SUPPORTED_OPS)}); "
                "set allow_float_fallback to run it in float"
            )
        from tvm import relax

        if not isinstance(call, relax.Call):
            raise self.error(f"cannot lower {short} at '{self.current}'")
        new_args = [self.materialize(a, orig) for a, orig in zip(args, call.args)]
        new_call = relax.Call(call.op, new_args, call.attrs, call.ty_args)
        self.boundary.fallback.append(f"{short} at {self.current}")
        return FloatValue(self.emit_layer(new_call, var, f"float_{short}"))

    # -- conversions ----------------------------------------------------------------------------

    def materialize(self, value, original):
        """A Relax expression for ``value`` as the original float graph had it (fallback)."""
        from tvm import relax

        if isinstance(value, Dequant):
            return self.emit(relax.op.dequantize(
                value.q.expr, relax.const(np.float32(value.scale)),
                relax.const(value.zero_point, value.q.dtype), axis=-1, out_dtype="float32"))
        if isinstance(value, Accum):
            total = None
            for term in value.terms:
                as_float = relax.op.astype(term.expr, "float32")
                if term.bias is not None:
                    as_float = relax.op.add(as_float, relax.const(term.bias.astype(np.float32)))
                scaled = relax.op.multiply(as_float, relax.const(term.scale.astype(np.float32)))
                total = scaled if total is None else relax.op.add(total, scaled)
            expr = self.emit(total)
            if value.view is not None:
                expr = self.emit(relax.op.reshape(expr, value.view))
            if value.clamped:
                lo = max(value.lo, -3.0e38)
                hi = min(value.hi, 3.0e38)
                expr = self.emit(relax.op.clip(expr, relax.prim_value(_float_imm(lo)),
                                               relax.prim_value(_float_imm(hi))))
            return expr
        if isinstance(value, Const):
            dtype = str(original.ty.dtype) if hasattr(original, "ty") and hasattr(original.ty, "dtype") else None
            arr = value.value.astype(dtype) if dtype and dtype != "void" else value.value
            return relax.const(arr)
        if isinstance(value, FloatValue):
            return value.expr
        if isinstance(value, IntTensor):
            return value.expr
        if isinstance(value, FloatInput):
            raise self.error("the model input feeds a float op directly; it must be quantized first")
        if isinstance(value, relax.Tuple):
            return relax.Tuple([self.materialize(self.lookup(f), f) for f in value.fields])
        return original

    def to_accum(self, value) -> Accum | None:
        from tvm import relax

        if isinstance(value, Accum):
            return value
        if isinstance(value, Dequant):
            expr = self.emit(relax.op.astype(value.q.expr, "int32"))
            if value.zero_point != 0:
                expr = self.emit(relax.op.subtract(expr, relax.const(np.int32(value.zero_point))))
            return Accum([Term(expr, np.asarray(value.scale, dtype=np.float64), bound=_centered_max(value))],
                         value.q.shape)
        return None

    def centered(self, value: Dequant):
        """The integer tensor minus its zero point (int16 when the zero point is not 0)."""
        from tvm import relax

        if value.zero_point == 0:
            return value.q.expr
        wide = self.emit(relax.op.astype(value.q.expr, "int16"))
        return self.emit(relax.op.subtract(wide, relax.const(np.int16(value.zero_point))))

    # -- boundary -------------------------------------------------------------------------------

    def quantize_input(self, var, value: FloatInput, scale: float, zp: int, dtype: str) -> IntTensor:
        from tvm import relax

        if dtype not in ("int8", "uint8"):
            raise self.error(f"the input is quantized to {dtype}; only int8/uint8 are supported")
        public_zp = zp if dtype == "int8" else zp - 128
        record = {"shape": list(_shape_of(self.input_param)), "dtype": "int8",
                  "scale": float(np.float32(scale)), "zero_point": int(public_zp)}
        if self.boundary.input is not None and self.boundary.input != record:
            raise self.error("the model input is quantized twice with different parameters")
        self.boundary.input = record
        shape = tuple(record["shape"])
        if dtype == "int8":
            return IntTensor(self.input_param, "int8", shape)
        wide = self.emit(relax.op.astype(self.input_param, "int16"))
        shifted = self.emit(relax.op.add(wide, relax.const(np.int16(128))))
        return IntTensor(self.emit(relax.op.astype(shifted, "uint8"), "input_uint8"), "uint8", shape)

    def output_value(self, value):
        from tvm import relax

        if not isinstance(value, Dequant):
            raise self.error(
                "the model output is not quantized: the graph must end with "
                "QuantizeLinear -> DequantizeLinear (add an output quantizer)"
            )
        q = value.q
        zp = value.zero_point
        expr = q.expr
        if q.dtype == "uint8":
            wide = self.emit(relax.op.astype(expr, "int16"))
            expr = self.emit(relax.op.astype(self.emit(relax.op.subtract(wide, relax.const(np.int16(128)))), "int8"))
            zp -= 128
        elif q.dtype != "int8":
            raise self.error(f"the model output is {q.dtype}; only int8/uint8 outputs are supported")
        self.boundary.output = {"shape": [int(d) for d in q.shape], "dtype": "int8",
                                "scale": float(np.float32(value.scale)), "zero_point": int(zp)}
        return expr

    # -- requantization -------------------------------------------------------------------------

    def requantize(self, acc: Accum, scale: float, zp: int, dtype: str, var) -> IntTensor:
        """Emit the fixed-point requantization of ``acc`` to ``dtype`` with ``scale``/``zp``."""
        from tvm import relax

        qmin, qmax = _INT_RANGES[dtype]
        lo, hi = qmin, qmax
        s32 = float(np.float32(scale))
        if acc.lo != -math.inf:
            lo = int(max(qmin, min(qmax, round_half_even(acc.lo / s32) + zp)))
        if acc.hi != math.inf:
            hi = int(max(qmin, min(qmax, round_half_even(acc.hi / s32) + zp)))
        ratios = [np.asarray(t.scale, dtype=np.float64) / np.float64(s32) for t in acc.terms]
        operand_bits = max(
            [31] + [int(np.abs(t.bias).max()).bit_length() + 1 for t in acc.terms if t.bias is not None])
        shift = choose_shift(ratios, operand_bits=operand_bits)
        mults = []
        for ratio in ratios:
            mult = fixed_point(ratio, shift)
            if np.all(mult == mult.reshape(-1)[0]):
                mult = mult.reshape(-1)[:1]
            mults.append(mult)
        narrow = REQUANT_32 and _fits_32_bits(acc.terms, mults, shift, zp)
        total = None
        for term, mult in zip(acc.terms, mults):
            if narrow:  # int32 bias add, then one 32x32->64 multiply (SMULL on Cortex-M)
                summed = term.expr
                if term.bias is not None:
                    # int32(int64(acc) + bias): TVM's simplifier turns int64(acc + bias) into
                    # int64(acc) + int64(bias) (a 64-bit add, then a 64x64 multiply) but keeps
                    # this narrowing cast, which GCC compiles to one 32-bit add.  Nothing in it
                    # wraps (the bound proves the sum fits int32), so TVM's bounds, which assume
                    # no overflow, hold: a wrapping (int32)((uint32)acc + (uint32)bias) was bounded
                    # >= 0, and with a scalar multiplier the clamp's lower bound was dropped.
                    summed = self.emit(relax.op.astype(relax.op.add(
                        relax.op.astype(summed, "int64"), _widened_const(term.bias)), "int32"))
                wide = relax.op.astype(summed, "int64")
            else:  # bias added after widening, 64x64 multiply
                wide = relax.op.astype(term.expr, "int64")
                if term.bias is not None:
                    wide = relax.op.add(wide, _widened_const(term.bias))
            prod = self.emit(relax.op.multiply(wide, _widened_const(mult)))
            total = prod if total is None else self.emit(relax.op.add(total, prod))
        half_minus_one = relax.const(np.int64((1 << (shift - 1)) - 1), "int64")
        sh = relax.const(np.int64(shift), "int64")
        odd = self.emit(relax.op.bitwise_and(relax.op.right_shift(total, sh), relax.const(np.int64(1), "int64")))
        rounded = self.emit(relax.op.right_shift(relax.op.add(relax.op.add(total, half_minus_one), odd), sh))
        out_type = "int32" if narrow else "int64"
        if narrow:
            rounded = self.emit(relax.op.astype(rounded, "int32"))
        if zp:
            rounded = self.emit(relax.op.add(rounded, relax.const(np.dtype(out_type).type(zp), out_type)))
        clipped = self.emit(relax.op.clip(rounded, relax.prim_value(_int_imm(lo, out_type)),
                                          relax.prim_value(_int_imm(hi, out_type))))
        out = self.emit_layer(relax.op.astype(clipped, dtype), var, acc.kind)
        self.layers[self.last_layer]["requant_bits"] = 32 if narrow else 64
        if acc.view is not None:
            out = self.emit(relax.op.reshape(out, acc.view))
        return IntTensor(out, dtype, acc.shape)

    # -- constants ------------------------------------------------------------------------------

    def eval_constant(self, call, args) -> np.ndarray:
        """Evaluate an op whose tensor inputs are all constants (NumPy for layout ops, else TVM)."""
        op_name = str(call.op.name)
        fast = _CONST_LAYOUT.get(op_name)
        if fast is not None and isinstance(args[0], Const):
            return fast(args[0].value, call)
        return _eval_with_tvm(self.mod, call, args)

    def layout_const(self, call, value: Const) -> Const:
        """Apply a layout op to a constant, keeping its integer values and scales aligned."""
        fn = _CONST_LAYOUT[str(call.op.name)]
        if not value.quantized:
            return Const(fn(value.value, call))
        return Const(fn(value.value, call), fn(value.q, call), fn(value.scale, call), fn(value.zp, call))


# ----------------------------------------------------------------------------------------------
# Op handlers: (rewriter, var, call, args) -> value, or None for "not this way"


def _h_quantize(rw: _Rewriter, var, call, args):
    from tvm import relax

    data, scale_c, zp_c = args
    dtype = str(call.attrs.out_dtype)
    if not isinstance(scale_c, Const) or not isinstance(zp_c, Const):
        raise rw.error(f"QuantizeLinear '{rw.current}' has non-constant scale or zero point")
    if scale_c.value.size != 1 or zp_c.value.size != 1:
        if isinstance(data, Const):
            return _quantize_const(data, scale_c, zp_c, call)
        raise rw.error(f"QuantizeLinear '{rw.current}' is per-channel; activations must be per-tensor")
    scale = float(scale_c.value.reshape(()))
    zp = int(zp_c.value.reshape(()))
    if isinstance(data, FloatInput):
        return rw.quantize_input(var, data, scale, zp, dtype)
    if isinstance(data, Const):
        return _quantize_const(data, scale_c, zp_c, call)
    if dtype not in ("int8", "uint8"):
        raise rw.error(f"QuantizeLinear '{rw.current}' to {dtype} is not supported")
    if isinstance(data, Dequant) and _quantized_as(data, dtype, zp, scale):
        return data.q
    if isinstance(data, PendingConcat):
        ints = []
        for part in data.parts:
            if _quantized_as(part, dtype, zp, scale):
                ints.append(part.q.expr)
            else:
                ints.append(rw.requantize(rw.to_accum(part), scale, zp, dtype, var).expr)
        out = rw.emit_layer(relax.op.concat(ints, axis=data.axis), var, "concat")
        return IntTensor(out, dtype, _shape_of(var))
    if isinstance(data, FloatValue):
        out = rw.emit_layer(relax.op.quantize(data.expr, relax.const(np.float32(scale)),
                                              relax.const(zp, dtype), axis=-1, out_dtype=dtype),
                            var, "float_quantize")
        return IntTensor(out, dtype, _shape_of(var))
    acc = rw.to_accum(data)
    if acc is None:
        return None
    return rw.requantize(acc, scale, zp, dtype, var)


def _quantize_const(data: Const, scale_c: Const, zp_c: Const, call) -> Const:
    dtype = str(call.attrs.out_dtype)
    axis = int(call.attrs.axis)
    value = np.asarray(data.value, dtype=np.float64)
    scale = _expand_axis(scale_c.value.astype(np.float32), value.ndim, axis)
    zp = _expand_axis(zp_c.value.astype(np.int64), value.ndim, axis)
    qmin, qmax = _INT_RANGES[dtype]
    q = np.clip(round_half_even(value.astype(np.float32) / scale) + zp, qmin, qmax)
    return Const(q.astype(dtype))


def _h_dequantize(rw: _Rewriter, var, call, args):
    data, scale_c, zp_c = args
    if not isinstance(scale_c, Const) or (zp_c is not None and not isinstance(zp_c, Const)):
        raise rw.error(f"DequantizeLinear '{rw.current}' has non-constant scale or zero point")
    axis = int(call.attrs.axis)
    if isinstance(data, Const):
        q = data.value.astype(np.int64)
        scale = np.broadcast_to(_expand_axis(scale_c.value.astype(np.float64), q.ndim, axis), q.shape)
        zp = np.broadcast_to(_expand_axis(zp_c.value.astype(np.int64), q.ndim, axis), q.shape)
        value = (q - zp).astype(np.float64) * scale
        return Const(value, q, np.array(scale), np.array(zp))
    if isinstance(data, IntTensor):
        if scale_c.value.size != 1 or zp_c.value.size != 1:
            raise rw.error(f"DequantizeLinear '{rw.current}' is per-channel on an activation")
        if data.dtype not in ("int8", "uint8"):
            raise rw.error(f"DequantizeLinear '{rw.current}' of {data.dtype} is not supported")
        return Dequant(data, float(scale_c.value.reshape(())), int(zp_c.value.reshape(())))
    return None


def _h_clip(rw: _Rewriter, var, call, args):
    from tvm import relax

    data = args[0]
    lo = _prim_number(call.args[1])
    hi = _prim_number(call.args[2])
    if lo is None or hi is None:
        return None
    if isinstance(data, Const):
        if data.quantized:
            return None
        return Const(np.clip(data.value, lo, hi).astype(data.value.dtype))
    if isinstance(data, IntTensor):
        out = rw.emit_layer(relax.op.clip(data.expr, relax.prim_value(_int_imm(int(lo), data.dtype)),
                                          relax.prim_value(_int_imm(int(hi), data.dtype))),
                            var, "clip")
        return IntTensor(out, data.dtype, data.shape)
    acc = rw.to_accum(data)
    if acc is None:
        return None
    return replace(acc, lo=max(acc.lo, float(lo)), hi=min(acc.hi, float(hi)))


def _h_relu(rw: _Rewriter, var, call, args):
    acc = rw.to_accum(args[0])
    if acc is None:
        return None
    return replace(acc, lo=max(acc.lo, 0.0))


def _h_relu6(rw: _Rewriter, var, call, args):
    acc = rw.to_accum(args[0])
    if acc is None:
        return None
    return replace(acc, lo=max(acc.lo, 0.0), hi=min(acc.hi, 6.0))


def _h_max_min(rw: _Rewriter, var, call, args, *, is_max: bool):
    a, b = args
    if isinstance(b, Const) and not isinstance(a, Const):
        data, bound = a, b
    elif isinstance(a, Const) and not isinstance(b, Const):
        data, bound = b, a
    else:
        return None
    if bound.value.size != 1:
        return None
    bound_value = float(bound.value.reshape(()))
    acc = rw.to_accum(data)
    if acc is None:
        return None
    if is_max:
        return replace(acc, lo=max(acc.lo, bound_value))
    return replace(acc, hi=min(acc.hi, bound_value))


def _h_conv2d(rw: _Rewriter, var, call, args):
    from tvm import relax

    data, weight = args
    attrs = call.attrs
    if not isinstance(data, Dequant) or not isinstance(weight, Const) or not weight.quantized:
        return None
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
        return None
    w_scale = _per_axis(weight.scale, 0)
    if w_scale is None:
        raise rw.error(f"conv '{rw.current}': weight scales must be per output channel or per tensor")
    w_int = weight.q - weight.zp
    bits = _weight_bits(w_int)
    groups = int(attrs.groups)
    kind = "depthwise_conv2d" if groups > 1 and groups == data.q.shape[1] else "conv2d"
    conv_attrs = dict(strides=[int(s) for s in attrs.strides], padding=[int(p) for p in attrs.padding],
                      dilation=[int(d) for d in attrs.dilation], groups=groups)
    storage = _weight_storage(w_int, bits)
    correction = None  # the im2col path's zero-point term, subtracted in the fused epilogue
    if MICRO_KERNELS and _micro_kernel_input(data) and microkernels.eligible_conv(w_int.shape, bits, **conv_attrs):
        # 1x1: the SMLAD micro-kernel on compile-time permuted weights (see microkernels.py)
        permuted = microkernels.permute_weights(w_int.reshape(w_int.shape[0], -1))
        func = microkernels.conv1x1_func(data.q.shape, w_int.shape[0], data.q.dtype)
        expr = relax.call_tir(rw.bb.add_func(func, "conv2d_1x1"), relax.Tuple([data.q.expr, relax.const(permuted)]),
                              relax.TensorType(_shape_of(var), "int32"))
        storage = {**storage, "bytes": int(permuted.size), "layout": microkernels.LAYOUT}
    elif DEPTHWISE_KERNELS and _micro_kernel_input(data) and depthwise.eligible(w_int.shape, data.q.shape, bits,
                                                                                **conv_attrs):
        # 3x3 depthwise: the row micro-kernel, borders apart; the weights stored as the TOPI kernel's
        stored = w_int.astype("int8") if bits == 8 else packing.pack_rows(w_int.reshape(w_int.shape[0], -1), bits)
        func = depthwise.conv_func(data.q.shape, _shape_of(var), stored.shape, bits=bits, stride=conv_attrs["strides"][0],
                                   padding=conv_attrs["padding"], dtype=data.q.dtype)
        expr = relax.call_tir(rw.bb.add_func(func, "depthwise_conv2d"), relax.Tuple([data.q.expr, relax.const(stored)]),
                              relax.TensorType(_shape_of(var), "int32"))
    elif MICRO_KERNELS and data.q.dtype in microkernels.MICRO_KERNELS and microkernels.eligible_im2col(
            w_int.shape, bits, groups=groups):
        # any other window, stride or padding (the stem): the same micro-kernel on an im2col of each
        # pixel pair; on the raw input, padded with its zero point, minus zero_point * sum(w) after
        rows = w_int.reshape(w_int.shape[0], -1)
        permuted = microkernels.permute_weights(rows)
        func = microkernels.conv_im2col_func(data.q.shape, _shape_of(var), w_int.shape, dtype=data.q.dtype,
                                             zero_point=data.zero_point, **{k: v for k, v in conv_attrs.items()
                                                                            if k != "groups"})
        expr = relax.call_tir(rw.bb.add_func(func, "conv2d_im2col"),
                              relax.Tuple([data.q.expr, relax.const(permuted)]),
                              relax.TensorType(_shape_of(var), "int32"))
        storage = {**storage, "bytes": int(permuted.size), "layout": microkernels.LAYOUT}
        if data.zero_point != 0:
            correction = microkernels.zero_point_correction(rows, data.zero_point).reshape(1, -1, 1, 1)
    elif bits in packing.PACKED_BITS:  # packed rows, unpacked inside the kernel (see packing.py)
        packed = packing.pack_rows(w_int.reshape(w_int.shape[0], -1), bits)
        expr = rw.bb.call_te(packing.packed_conv2d, rw.centered(data), relax.const(packed),
                             weight_shape=w_int.shape, bits=bits, primfunc_name_hint="conv2d", **conv_attrs)
    else:
        expr = relax.op.nn.conv2d(rw.centered(data), relax.const(w_int.astype(f"int{bits}")),
                                  data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32", **conv_attrs)
    conv = rw.emit_layer(expr, var, kind, macs=int(np.prod(_shape_of(var))) * int(np.prod(w_int.shape[1:])))
    rw.layers[rw.last_layer]["weights"] = storage
    if correction is not None:
        conv = rw.emit(relax.op.subtract(conv, relax.const(correction, "int32")))
    # the window geometry (plan-memory's in-place schedule needs each tap's input address)
    rw.layers[rw.last_layer]["conv"] = {**conv_attrs, "kernel": [int(k) for k in w_int.shape[2:]]}
    scale = (np.float64(np.float32(data.scale)) * w_scale).reshape(1, -1, 1, 1)
    # |sum of products| <= sum of |w| of the output channel * the largest |q - zp| (padding adds 0)
    bound = np.abs(w_int.astype(np.int64)).reshape(w_int.shape[0], -1).sum(axis=1) * _centered_max(data)
    return Accum([Term(conv, scale, bound=bound.reshape(1, -1, 1, 1))], _shape_of(var), kind=kind)


def _h_matmul(rw: _Rewriter, var, call, args):
    from tvm import relax

    a, b = args
    if not isinstance(a, Dequant) or not isinstance(b, Const) or not b.quantized:
        return None
    if len(a.q.shape) < 2 or b.value.ndim != 2:
        return None
    w_scale = _per_axis(b.scale, 1)
    if w_scale is None:
        raise rw.error(f"matmul '{rw.current}': weight scales must be per output feature")
    w_int = b.q - b.zp
    bits = _weight_bits(w_int)
    # (..., K) @ (K, N): a Linear on the last axis of any rank (e.g. after a permute to NHWC)
    storage = _weight_storage(w_int.T, bits)
    if MICRO_KERNELS and bits == 8 and len(a.q.shape) == 2 and _micro_kernel_input(a):
        # the 1x1 conv's SMLAD micro-kernel, one row a block (see microkernels.py)
        permuted = microkernels.permute_weights(w_int.T)
        func = microkernels.dense_func(a.q.shape, w_int.shape[1], a.q.dtype)
        expr = relax.call_tir(rw.bb.add_func(func, "matmul"), relax.Tuple([a.q.expr, relax.const(permuted)]),
                              relax.TensorType(_shape_of(var), "int32"))
        storage = {**storage, "bytes": int(permuted.size), "layout": microkernels.LAYOUT}
    elif bits in packing.PACKED_BITS:  # one packed row per output feature (see packing.py)
        expr = rw.bb.call_te(packing.packed_dense, rw.centered(a), relax.const(packing.pack_rows(w_int.T, bits)),
                             weight_shape=w_int.shape, bits=bits, primfunc_name_hint="matmul")
    else:
        expr = relax.op.matmul(rw.centered(a), relax.const(w_int.astype(f"int{bits}")), out_dtype="int32")
    mm = rw.emit_layer(expr, var, "dense", macs=int(np.prod(_shape_of(var))) * int(w_int.shape[0]))
    rw.layers[rw.last_layer]["weights"] = storage
    scale = (np.float64(np.float32(a.scale)) * w_scale).reshape((1,) * (len(a.q.shape) - 1) + (-1,))
    bound = np.abs(w_int.astype(np.int64)).sum(axis=0) * _centered_max(a)
    return Accum([Term(mm, scale, bound=bound.reshape(scale.shape))], _shape_of(var), kind="dense")


def _h_add(rw: _Rewriter, var, call, args, *, sign: float = 1.0):
    from tvm import relax

    a, b = args
    if isinstance(a, Const) and not isinstance(b, Const) and sign > 0:
        a, b = b, a
    if isinstance(b, Const):
        acc = rw.to_accum(a)
        if acc is None or acc.clamped or acc.view is not None:
            return None
        term = acc.terms[0]
        bias_scale = np.broadcast_to(term.scale, np.broadcast_shapes(term.scale.shape, b.value.shape))
        if b.quantized and np.all(b.zp == 0) and np.allclose(
            np.broadcast_to(b.scale, bias_scale.shape), bias_scale, rtol=1e-5, atol=0
        ):
            bias = np.broadcast_to(b.q, bias_scale.shape).astype(np.int64)
        else:
            bias = round_half_even(np.broadcast_to(b.value, bias_scale.shape) / bias_scale)
        bias = sign * bias
        if term.bias is not None:
            bias = bias + term.bias
        if np.any(np.abs(bias) >= 2**40):
            raise rw.error(f"bias of '{rw.current}' is too large for the accumulator scale")
        out_rank = len(acc.shape)
        bias = bias.reshape((1,) * (out_rank - bias.ndim) + bias.shape) if bias.ndim < out_rank else bias
        new_term = replace(term, bias=bias.astype(np.int64))
        return Accum([new_term] + acc.terms[1:], _shape_of(var), kind=acc.kind)
    left, right = rw.to_accum(a), rw.to_accum(b)
    if left is None or right is None or left.clamped or right.clamped:
        return None
    if left.view is not None or right.view is not None:
        return None
    right_terms = [replace(t, scale=t.scale * sign) for t in right.terms]
    return Accum(left.terms + right_terms, _shape_of(var), kind="add" if sign > 0 else "subtract")


def _h_multiply(rw: _Rewriter, var, call, args):
    a, b = args
    if isinstance(a, Const) and not isinstance(b, Const):
        a, b = b, a
    if not isinstance(b, Const) or b.value.size != 1:
        return None
    factor = float(b.value.reshape(()))
    if factor <= 0:
        return None
    acc = rw.to_accum(a)
    if acc is None:
        return None
    terms = [replace(t, scale=t.scale * factor) for t in acc.terms]
    return replace(acc, terms=terms, lo=acc.lo * factor, hi=acc.hi * factor)


def _window_sum(rw: _Rewriter, value: Dequant, pool, strides, padding, dilation, var):
    """Sum of each pooling window of ``value - zp`` as an int32 depthwise conv with ones."""
    from tvm import relax

    channels = value.q.shape[1]
    ones = np.ones((channels, 1, pool[0], pool[1]), dtype=np.int8)
    return rw.emit_layer(relax.op.nn.conv2d(
        rw.centered(value), relax.const(ones), strides=strides, padding=padding,
        dilation=dilation, groups=channels, out_dtype="int32"), var, "avg_pool")


def _h_avg_pool2d(rw: _Rewriter, var, call, args):
    data = args[0]
    attrs = call.attrs
    if not isinstance(data, Dequant) or str(attrs.layout) != "NCHW":
        return None
    pool = [int(p) for p in attrs.pool_size]
    strides = [int(s) for s in attrs.strides]
    padding = [int(p) for p in attrs.padding]
    dilation = [int(d) for d in attrs.dilation]
    if any(padding) and not bool(attrs.count_include_pad):
        raise rw.error(f"average pool '{rw.current}' with padding excluded from the count has a "
                       "varying divisor; use count_include_pad or no padding")
    out_shape = _shape_of(var)
    in_h, in_w = data.q.shape[2], data.q.shape[3]
    floor_h = (in_h + padding[0] + padding[2] - dilation[0] * (pool[0] - 1) - 1) // strides[0] + 1
    floor_w = (in_w + padding[1] + padding[3] - dilation[1] * (pool[1] - 1) - 1) // strides[1] + 1
    if (floor_h, floor_w) != tuple(out_shape[2:]):
        raise rw.error(f"average pool '{rw.current}' in ceil mode has partial windows")
    summed = _window_sum(rw, data, pool, strides, padding, dilation, var)
    scale = np.asarray(np.float64(np.float32(data.scale)) / (pool[0] * pool[1]))
    bound = _centered_max(data) * (pool[0] * pool[1])
    return Accum([Term(summed, scale, bound=bound)], out_shape, kind="avg_pool")


def _h_global_mean(rw: _Rewriter, var, call, args):
    from tvm import relax

    data = args[0]
    if not isinstance(data, Dequant):
        return None
    op_name = str(call.op.name)
    rank = len(data.q.shape)
    if op_name == "relax.mean":
        axes = sorted(int(a) % rank for a in call.attrs.axis)
        keepdims = bool(call.attrs.keepdims)
    else:  # adaptive_avg_pool2d
        if str(call.attrs.layout) != "NCHW":
            return None
        out_size = [int(s) for s in call.attrs.output_size] if call.attrs.output_size else None
        if out_size not in ([1, 1], [1]):
            return None
        axes, keepdims = [2, 3], True
    count = int(np.prod([data.q.shape[a] for a in axes]))
    wide = rw.emit(relax.op.astype(rw.centered(data), "int32"))
    summed = rw.emit_layer(relax.op.sum(wide, axis=axes, keepdims=keepdims), var, "global_avg_pool")
    scale = np.asarray(np.float64(np.float32(data.scale)) / count)
    return Accum([Term(summed, scale, bound=_centered_max(data) * count)], _shape_of(var), kind="global_avg_pool")


def _h_max_pool2d(rw: _Rewriter, var, call, args):
    from tvm import relax

    data = args[0]
    if not isinstance(data, Dequant):
        return None
    attrs = call.attrs
    out = rw.emit_layer(relax.op.nn.max_pool2d(
        data.q.expr, pool_size=[int(p) for p in attrs.pool_size],
        strides=[int(s) for s in attrs.strides], padding=[int(p) for p in attrs.padding],
        dilation=[int(d) for d in attrs.dilation], ceil_mode=bool(attrs.ceil_mode),
        layout=str(attrs.layout)), var, "max_pool")
    return Dequant(IntTensor(out, data.q.dtype, _shape_of(var)), data.scale, data.zero_point)


def _h_layout(rw: _Rewriter, var, call, args):
    """reshape / flatten / permute_dims / squeeze / expand_dims commute with dequantization."""
    from tvm import relax

    data = args[0]
    if isinstance(data, Const):
        return rw.layout_const(call, data)
    rest = list(call.args[1:])
    kind = str(call.op.name).replace("relax.", "")
    if isinstance(data, Dequant):
        out = rw.emit_layer(relax.Call(call.op, [data.q.expr] + rest, call.attrs, call.ty_args), var, kind)
        return Dequant(IntTensor(out, data.q.dtype, _shape_of(var)), data.scale, data.zero_point)
    if isinstance(data, Accum) and kind in ("reshape", "flatten", "squeeze", "expand_dims") and all(
        t.scale.size == 1 and (t.bias is None or t.bias.size == 1) for t in data.terms
    ):
        # per-tensor scales commute with a reshape: requantize first, reshape the int8 result
        # (a view), so the reduction and its requantization stay one kernel
        return replace(data, shape=_shape_of(var), view=_shape_of(var))
    return None


def _h_concat(rw: _Rewriter, var, call, args):
    from tvm import relax

    fields = args[0]
    if not isinstance(fields, relax.Tuple):
        return None
    parts = [rw.lookup(f) for f in fields.fields]
    if not parts or not all(isinstance(p, Dequant) for p in parts):
        return None
    first = parts[0]
    if not all(_quantized_as(p, first.q.dtype, first.zero_point, first.scale) for p in parts):
        return PendingConcat(parts, int(call.attrs.axis))  # the next quantize decides
    out = rw.emit_layer(relax.op.concat([p.q.expr for p in parts], axis=int(call.attrs.axis)),
                        var, "concat")
    return Dequant(IntTensor(out, first.q.dtype, _shape_of(var)), first.scale, first.zero_point)


_HANDLERS = {
    "relax.quantize": _h_quantize,
    "relax.dequantize": _h_dequantize,
    "relax.clip": _h_clip,
    "relax.nn.relu": _h_relu,
    "relax.nn.relu6": _h_relu6,
    "relax.maximum": lambda rw, v, c, a: _h_max_min(rw, v, c, a, is_max=True),
    "relax.minimum": lambda rw, v, c, a: _h_max_min(rw, v, c, a, is_max=False),
    "relax.nn.conv2d": _h_conv2d,
    "relax.matmul": _h_matmul,
    "relax.add": _h_add,
    "relax.subtract": lambda rw, v, c, a: _h_add(rw, v, c, a, sign=-1.0),
    "relax.multiply": _h_multiply,
    "relax.nn.avg_pool2d": _h_avg_pool2d,
    "relax.mean": _h_global_mean,
    "relax.nn.adaptive_avg_pool2d": _h_global_mean,
    "relax.nn.max_pool2d": _h_max_pool2d,
    "relax.reshape": _h_layout,
    "relax.flatten": _h_layout,
    "relax.permute_dims": _h_layout,
    "relax.squeeze": _h_layout,
    "relax.expand_dims": _h_layout,
    "relax.concat": _h_concat,
}

SUPPORTED_OPS = ("Conv (incl. depthwise, strided)", "Gemm/MatMul", "Add", "Relu", "Clip",
                 "AveragePool", "GlobalAveragePool", "MaxPool", "Reshape/Flatten",
                 "Concat (requantized by the QuantizeLinear after it)")


# ----------------------------------------------------------------------------------------------
# Helpers


def _shape_of(var) -> tuple:
    shape = var.ty.shape
    values = shape.values if hasattr(shape, "values") else shape
    return tuple(int(d) for d in values)


def _is_tensor_value(value) -> bool:
    return isinstance(value, (IntTensor, Dequant, Const, Accum, FloatInput, FloatValue, PendingConcat))


def _quantized_as(value: Dequant, dtype: str, zero_point: int, scale: float) -> bool:
    """Whether ``value`` already is ``dtype`` with this zero point and scale (no requantization)."""
    return value.q.dtype == dtype and value.zero_point == zero_point and _same_scale(value.scale, scale)


def _same_scale(a: float, b: float) -> bool:
    return abs(float(np.float32(a)) - float(np.float32(b))) <= 1e-7 * abs(float(b))


def _expand_axis(arr: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-axis quantization parameters, reshaped to broadcast along ``axis`` of an ndim tensor."""
    arr = np.asarray(arr)
    if arr.size == 1:
        return arr.reshape(())
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = arr.size
    return arr.reshape(shape)


def _per_axis(scale: np.ndarray, axis: int) -> np.ndarray | None:
    """The 1-D scale along ``axis`` if ``scale`` is constant over all other axes."""
    moved = np.moveaxis(np.asarray(scale, dtype=np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    if not np.all(flat == flat[:, :1]):
        return None
    return flat[:, 0].astype(np.float32).astype(np.float64)


def _prim_number(expr):
    """The number inside a Relax PrimValue (clip bounds), or None."""
    value = getattr(expr, "value", None)
    if value is None:
        return None
    inner = getattr(value, "value", value)
    try:
        return float(inner)
    except (TypeError, ValueError):
        return None


def _weight_bits(w_int: np.ndarray) -> int:
    """Bits per stored weight: 2 or 4 (packed) when the values fit and packing is on, else 8 or 16."""
    bits = packing.storage_bits(w_int)
    return bits if PACK_WEIGHTS or bits > 8 else 8


def _micro_kernel_input(value: Dequant) -> bool:
    """Whether the micro-kernel reads ``value`` as it is (int8 or uint8, zero point 0)."""
    return value.zero_point == 0 and value.q.dtype in microkernels.MICRO_KERNELS


def _weight_storage(rows: np.ndarray, bits: int) -> dict:
    """How a layer's weights are stored (the manifest's ``weights``): bits per value, values,
    bytes in flash; ``rows`` has one row per output channel."""
    count, length = rows.shape[0], int(np.prod(rows.shape[1:]))
    stored = count * packing.row_bytes(length, bits) if bits < 8 else count * length * bits // 8
    return {"bits": int(bits), "values": int(count * length), "bytes": int(stored)}


def _centered_max(value: Dequant) -> np.ndarray:
    """The largest ``|q - zero_point|`` the integer type of ``value`` can hold."""
    qmin, qmax = _INT_RANGES[value.q.dtype]
    return np.asarray(max(abs(qmin - value.zero_point), abs(qmax - value.zero_point)), dtype=np.int64)


def _fits_32_bits(terms: list, mults: list, shift: int, zp: int) -> bool:
    """Whether the 32-bit requantization of ``terms`` is exact: every ``|expr + bias|`` is proven
    below 2**31 (so the int32 bias add cannot overflow), and the rounded, shifted sum of the
    products plus the zero point fits an int32 (so the clamp can run in int32).  The products of
    two int32 operands always fit int64."""
    limit = 2**31 - 1
    total = 0
    for term, mult in zip(terms, mults):
        if term.bound is None:
            return False
        operand = np.asarray(term.bound, dtype=np.int64)
        if term.bias is not None:
            operand = operand + np.abs(np.asarray(term.bias, dtype=np.int64))
        if int(operand.max()) > limit:
            return False
        total += int(np.max(operand * np.abs(np.asarray(mult, dtype=np.int64))))
    if total + (1 << shift) >= 2**63:
        return False
    return (total >> shift) + 1 + abs(int(zp)) <= limit


def _widened_const(values: np.ndarray):
    """An int64 operand for a fused kernel, stored in flash in the narrowest integer type
    that holds it (biases often fit int16) and widened inside the kernel."""
    from tvm import relax

    values = np.asarray(values, dtype=np.int64)
    if values.size == 1:
        return relax.const(np.int64(values.reshape(-1)[0]), "int64")
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.min() >= info.min and values.max() <= info.max:
            return relax.op.astype(relax.const(values.astype(dtype)), "int64")
    return relax.const(values, "int64")


def _int_imm(value: int, dtype: str):
    import tvm

    return tvm.tirx.IntImm(dtype, int(value))


def _float_imm(value: float):
    import tvm

    return tvm.tirx.FloatImm("float32", float(value))


def _const_reshape(arr: np.ndarray, call) -> np.ndarray:
    target = call.args[1]
    values = target.values if hasattr(target, "values") else None
    if values is None:
        shape = tuple(int(d) for d in call.ty.shape.values)
    else:
        shape = tuple(int(d) for d in values)
    return np.reshape(arr, shape)


def _const_permute(arr: np.ndarray, call) -> np.ndarray:
    axes = call.attrs.axes
    return np.transpose(arr, None if axes is None else [int(a) for a in axes])


def _const_to_result_shape(arr: np.ndarray, call) -> np.ndarray:
    return np.reshape(arr, tuple(int(d) for d in call.ty.shape.values))


_CONST_LAYOUT = {
    "relax.reshape": _const_reshape,
    "relax.permute_dims": _const_permute,
    "relax.flatten": _const_to_result_shape,
    "relax.squeeze": _const_to_result_shape,
    "relax.expand_dims": _const_to_result_shape,
}


def _eval_with_tvm(mod, call, args) -> np.ndarray:
    """Evaluate one Relax call on constant arguments by legalizing and constant folding it."""
    import tvm
    from tvm import relax

    new_args = []
    for value, orig in zip(args, call.args):
        if isinstance(value, Const):
            dtype = str(orig.ty.dtype) if hasattr(orig.ty, "dtype") else None
            arr = value.value if value.q is None else value.value
            new_args.append(relax.const(arr.astype(dtype) if dtype else arr))
        else:
            new_args.append(orig)
    new_call = relax.Call(call.op, new_args, call.attrs, call.ty_args)
    bb = relax.BlockBuilder(mod)
    with bb.function("distillc_const_eval", []):
        with bb.dataflow():
            out = bb.emit_output(new_call)
        bb.emit_func_output(out)
    folded = relax.transform.FoldConstant()(relax.transform.LegalizeOps()(bb.get()))
    body = folded["distillc_const_eval"].body
    result = body.body
    for block in body.blocks:
        for binding in block.bindings:
            if binding.var.same_as(result):
                result = binding.value
    if not isinstance(result, tvm.ir.Constant):
        raise PassError(PASS_NAME, f"cannot evaluate constant op {call.op.name}")
    return result.value.numpy()
