"""Kernel-by-kernel comparison of a bundle with onnxruntime.

End to end, a bundle and onnxruntime may differ by more than one output step although every
kernel is right.  onnxruntime computes each QCDQ layer in float32 (dequantize, float conv, float
add, quantize); where the exact result lies within float32 rounding of a .5 tie, it can round to
the other integer than the kernel, which computes the layer exactly in integers.  That one-step
difference then travels through the later layers and may grow.

This module checks each kernel on its own: the bundle's trace (every kernel's output, from a
``-DDISTILLC_TRACE`` host build) gives each kernel's inputs, onnxruntime runs that kernel's
part of the ONNX graph on exactly those inputs, and the two outputs are compared.  A kernel may
differ only where onnxruntime's float32 value sits on a rounding tie (within ``TIE_WINDOW``
steps of ``k + 0.5``); anything else is a lowering error, named by kernel and ONNX node.

A fused kernel may hold more than one rounding: a conv requantized, then added to a residual and
requantized again.  A tie at the inner quantizer changes the outer value by a fraction of a step
(the ratio of the two scales), so the outer value is not on a tie.  Such a difference counts as a
tie only when onnxruntime itself, given the inner value rounded the other way at exactly those
elements, computes what the kernel wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillc.passes.backend import onnx_graph

#: How close (in output steps) onnxruntime's float32 value must be to a .5 tie for a one-step
#: difference to count as float32 rounding.  float32 carries about 7 digits, so a layer value
#: near 100 steps is off by about 1e-5 steps; 1e-3 leaves room for long sums.
TIE_WINDOW = 1e-3

_ELEMENTWISE = {"Relu", "Clip", "Add", "Sub", "Max", "Min", "Mul"}


@dataclass
class Region:
    """The part of the ONNX graph one kernel computes: quantized tensors in, one quantized out."""

    step: int
    node: str
    inputs: list[str]
    output: str  # the quantized tensor the kernel writes
    before_quantize: str | None  # the float tensor that output quantizes (None: no rounding, e.g. a clip)
    #: Roundings inside the kernel before its output's: (quantized tensor, float tensor it quantizes).
    inner: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class KernelReport:
    """What :func:`compare_kernels` found."""

    checked: list[int] = field(default_factory=list)
    unchecked: dict[int, str] = field(default_factory=dict)  # step -> why
    max_lsb: int = 0
    differing: int = 0  # elements that differ by one step on a float32 tie
    compared: int = 0
    errors: list[str] = field(default_factory=list)  # kernels that differ otherwise
    tied_examples: set[int] = field(default_factory=set)  # inputs whose trace meets at least one tie

    @property
    def ok(self) -> bool:
        return not self.errors and not self.unchecked

    def summary(self) -> dict[str, Any]:
        return {"kernels_checked": len(self.checked), "kernel_max_lsb": self.max_lsb,
                "kernel_tie_differences": self.differing, "kernel_values_compared": self.compared}


#: Why a kernel has no region of its own: the next kernel finishes it, and both are checked together.
JOINT = "computed together with the next kernel"

_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
_ANCHORS = {"Conv", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool", "MaxPool", "ReduceMean", "Add", "Sub",
            "Concat", "Transpose", "Clip"} | _SHAPE_OPS
#: The ONNX op a kernel of this kind starts at; kinds not listed (element-wise, clip, copies) start anywhere.
_STARTS = {"conv2d": {"Conv"}, "depthwise_conv2d": {"Conv"}, "dense": {"Gemm", "MatMul"},
           "avg_pool": {"AveragePool"}, "global_avg_pool": {"GlobalAveragePool", "ReduceMean"},
           "max_pool": {"MaxPool"}, "clip": {"Clip"}}


def kernel_regions(model: Any, layers: list[dict]) -> dict[int, Region | str]:
    """Each kernel's region of the (shape-inferred) ONNX graph, or why it has none.

    A region starts at a compute node (a conv, a dense layer, a pooling, an add not fused into a
    conv) and takes in the element-wise ops and quantizers after it, through a dequantize only
    when that dequantized tensor has a single element-wise consumer (a fused residual add); its
    output is the last quantized tensor reached.  A kernel is paired with the region that starts
    at the ONNX node its manifest entry names; failing that (a layer the lowering could not name),
    with the next region, in graph order, whose output has as many elements as the kernel's.
    """
    graph = model.graph
    producer, consumers = onnx_graph.index(graph)
    constant = onnx_graph.constant_tensors(graph, producer)

    found: list[tuple] = []  # (start node, nodes, output, before quantize, inner roundings)
    absorbed: set[str] = set()
    for start in graph.node:
        if start.op_type not in _ANCHORS or start.name in absorbed or start.output[0] in constant:
            continue
        nodes, output, before, inner = [start], None, None, []
        current = start.output[0]
        if start.op_type == "Clip" and producer.get(start.input[0]) is not None \
                and producer[start.input[0]].op_type == "QuantizeLinear":
            output = current  # a narrow-range clip on its own: no rounding, so no tie to allow for
        while True:
            users = consumers.get(current, [])
            if len(users) != 1:
                break
            user = users[0]
            if user.op_type == "QuantizeLinear":
                if before is not None:
                    inner.append((output, before))
                before, output = current, user.output[0]
            elif user.op_type == "Clip" and producer[current].op_type == "QuantizeLinear":
                output = user.output[0]  # narrow-range clip of the quantized value
            elif user.op_type == "DequantizeLinear":
                after = consumers.get(user.output[0], [])
                # Go on into a fused residual add, or a requantization (Q(DQ(x)), fused too).
                if len(after) != 1 or after[0].op_type not in _ELEMENTWISE | {"QuantizeLinear"}:
                    break
            elif user.op_type not in _ELEMENTWISE | _SHAPE_OPS:
                break
            nodes.append(user)
            current = user.output[0]
        absorbed.update(node.name for node in nodes)
        if output is not None:
            found.append((start, nodes, output, before, inner))

    shapes = {info.name: tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
              for info in list(graph.value_info) + list(graph.output)}
    def size(index: int) -> int:
        return int(np.prod(layers[index].get("output_shape") or ()))

    by_node = {f"{entry[0].name} ({entry[0].op_type})": k for k, entry in enumerate(found)}

    def next_match(index: int, position: int) -> int | None:
        named = by_node.get(layers[index].get("node", ""))
        if named is not None and \
                int(np.prod(shapes.get(found[named][2], (-1,)))) == size(index):
            return named
        # By element count: a kernel may write (1, C, 1, 1) where the graph flattens to (1, C) first.
        # An element-wise kernel (no node of its own) may only finish the region next in line.
        starts = _STARTS.get(layers[index].get("op", ""))
        last = position + 1 if layers[index].get("op") == "elementwise" else len(found)
        return next((k for k in range(position, min(last, len(found)))
                     if int(np.prod(shapes.get(found[k][2], (-1,)))) == size(index)
                     and (starts is None or found[k][0].op_type in starts)), None)

    regions: dict[int, Region | str] = {}
    position = 0
    for index, layer in enumerate(layers):
        match = next_match(index, position)
        following = layers[index + 1] if index + 1 < len(layers) else {}
        if following.get("op") == "elementwise" and size(index + 1) == size(index):
            # An element-wise kernel finishes this region (e.g. requantizes a pooling).
            regions[index] = JOINT
            continue
        if match is None and layer.get("op") == "elementwise" and index + 1 < len(layers):
            # No graph tensor of its own: e.g. an asymmetric model's zero-point subtraction ahead of
            # a conv.  The next kernel's check, fed from the quantized tensors before it, covers it.
            regions[index] = JOINT
            continue
        if match is None:
            regions[index] = (f"no quantized ONNX tensor of shape {list(layer.get('output_shape') or ())} "
                              f"follows the previous kernel's")
            continue
        start, nodes, output, before, inner = found[match]
        name = start.name
        position = max(position, match + 1)
        if _requantized_by_concat(model, output, consumers):
            # The kernel writes its output already requantized for the concat after it (a tensor the
            # graph does not have); the concat's check, fed from the tensors before, covers it.
            regions[index] = JOINT
            continue
        made = {out for node in nodes for out in node.output}
        inputs = []
        for node in nodes:
            for tensor in node.input:
                if not tensor or tensor in made or tensor in constant:
                    continue
                source = producer.get(tensor)
                if source is not None and source.op_type == "DequantizeLinear":
                    tensor = source.input[0]
                if tensor not in inputs:
                    inputs.append(tensor)
        regions[index] = Region(step=index, node=name, inputs=inputs, output=output, before_quantize=before,
                                inner=inner)
    return regions


def compare_kernels(onnx_path: str | Path, manifest: dict[str, Any], inputs: np.ndarray,
                    traces: list[dict[int, bytes]], *, tolerance_lsb: int = 1) -> KernelReport:
    """Compare every kernel's traced output with onnxruntime on the kernel's traced inputs."""
    import onnx
    from onnx import shape_inference
    from onnx.utils import Extractor

    from distillc.passes.export.to_onnx import reference_session

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    layers = manifest["layers"]
    regions = kernel_regions(model, layers)
    types = onnx_graph.tensor_types(model)
    graph_input = model.graph.input[0].name
    # Which buffer holds each quantized ONNX tensor: the model's input, or a kernel's output.
    held_by: dict[str, int | str] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == graph_input:
            held_by[node.output[0]] = "input"
    producer, _ = onnx_graph.index(model.graph)
    constant = onnx_graph.constant_tensors(model.graph, producer)
    report = KernelReport()
    extractor = Extractor(model)
    zero_points = onnx_graph.zero_points(model)
    last = len(layers) - 1
    for index, region in regions.items():
        if isinstance(region, str):
            report.unchecked[index] = region
            continue
        count = int(np.prod(onnx_graph.shape(model, region.output)))
        if len(traces[0][index]) not in (count * types[region.output].itemsize, count * 2, count * 4) \
                and index != last:
            # The kernel writes an intermediate the graph does not have (a term of a fused subtraction,
            # kept in 64 bits for the next kernel): that kernel's check covers this one.
            report.unchecked[index] = JOINT
            continue
        held_by[region.output] = index
        needed = _traced_inputs(region.inputs, held_by, producer, constant)
        missing = [name for name in needed if name not in held_by]
        if missing:
            report.unchecked[index] = f"reads {missing[0]!r}, which no traced buffer holds"
            continue
        earlier = index - 1
        while report.unchecked.get(earlier) == JOINT or (earlier in report.unchecked and needed != region.inputs):
            # Kernels before this one that split its work differently from the graph's quantizers:
            # checked together with it, from the last quantized tensors they read.
            report.unchecked.pop(earlier)
            report.checked.append(earlier)
            earlier -= 1
        if needed != region.inputs:
            # Rounded earlier, outside this region: the kernels checked together hold those roundings.
            region = Region(step=index, node=region.node, inputs=needed, output=region.output,
                            before_quantize=region.before_quantize, inner=region.inner)
        outputs = [region.output] + ([region.before_quantize] if region.before_quantize else [])
        # Element by element only: an inner tensor of another size (none in practice) is not flipped.
        inner = [(q, f) for q, f in region.inner if int(np.prod(onnx_graph.shape(model, q))) == count]
        for quantized, value in inner:
            outputs += [quantized, value]
        sub = extractor.extract_model(region.inputs, outputs)
        session = reference_session(sub.SerializeToString())
        tails: dict[int, Any] = {}  # inner rounding -> the rest of the region from it on (built when needed)
        out_zp = zero_points.get(region.output, 0)
        c_dtype, c_zp = types[region.output], out_zp
        if index == last:  # the model's output buffer has the manifest's type
            c_dtype, c_zp = np.dtype(manifest["output"]["dtype"]), int(manifest["output"]["zero_point"])
        scale = onnx_graph.scale_of(model, region.output)
        worst, ties, errors = 0, 0, 0
        for example, trace in enumerate(traces):
            feeds = {}
            for name in region.inputs:
                holder = held_by[name]
                shape = onnx_graph.shape(model, name)
                if holder == "input":  # the bundle's int8 input; the graph may quantize it to uint8
                    values = (inputs[example].astype(np.int64) - int(manifest["input"]["zero_point"])
                              + zero_points.get(name, 0))
                else:
                    values = _trace_values(trace[holder], int(np.prod(shape)), types[name],
                                           zero_points.get(name, 0))
                feeds[name] = values.astype(types[name]).reshape(shape)
            expected, *rest = session.run(None, feeds)
            before = rest[:1] if region.before_quantize else []
            inner_values = rest[len(before):]
            want = expected.reshape(-1).astype(np.int64) - out_zp
            got = _trace_values(trace[index], want.size, c_dtype, c_zp) - c_zp
            diff = np.abs(got - want)
            report.compared += diff.size
            worst = max(worst, int(diff.max(initial=0)))
            off = np.nonzero(diff)[0]
            if off.size:
                if before:
                    steps = before[0].reshape(-1)[off].astype(np.float64) / scale
                    on_tie = np.abs(steps - np.floor(steps) - 0.5) <= TIE_WINDOW
                else:
                    on_tie = np.zeros(off.size, dtype=bool)
                tie_ok = on_tie & (diff[off] == 1)
                for k, (quantized, _) in enumerate(inner):
                    # Round the inner tensor the other way where it sat on a tie; does onnxruntime then agree?
                    q_values, f_values = inner_values[2 * k], inner_values[2 * k + 1]
                    flipped, tied = _round_other_way(q_values, f_values, onnx_graph.scale_of(model, quantized),
                                                     zero_points.get(quantized, 0))
                    if not tied.any():
                        continue
                    if k not in tails:
                        tail = extractor.extract_model([quantized] + region.inputs, [region.output])
                        tails[k] = reference_session(tail.SerializeToString())
                    tail_feeds = dict(feeds, **{quantized: flipped})
                    alternative = tails[k].run(None, tail_feeds)[0].reshape(-1).astype(np.int64) - out_zp
                    tie_ok |= tied.reshape(-1)[off] & (alternative[off] == got[off])
                ties += int(tie_ok.sum())
                errors += int((~tie_ok).sum())
                if tie_ok.any():
                    report.tied_examples.add(example)
        report.checked.append(index)
        report.max_lsb = max(report.max_lsb, worst)
        report.differing += ties
        if errors or worst > tolerance_lsb:
            report.errors.append(f"kernel {index} ({layers[index].get('kernel')}, ONNX node {region.node}) differs "
                                 f"from onnxruntime on its own inputs by up to {worst} LSB at {errors + ties} "
                                 f"value(s), {errors} of them away from a float32 rounding tie")
    return report


# -- helpers ----------------------------------------------------------------------------------------


def _requantized_by_concat(model: Any, output: str, consumers: dict) -> bool:
    """Whether ``output`` is dequantized into a Concat whose output is quantized differently."""
    users = consumers.get(output, [])
    if len(users) != 1 or users[0].op_type != "DequantizeLinear":
        return False
    after = consumers.get(users[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "Concat":
        return False
    quantize = consumers.get(after[0].output[0], [])
    if len(quantize) != 1 or quantize[0].op_type != "QuantizeLinear":
        return False
    mine, theirs = onnx_graph.quantize_node(model, output), quantize[0]
    same = [onnx_graph.const_value(model, a).tolist() == onnx_graph.const_value(model, b).tolist()
            for a, b in zip(mine.input[1:], theirs.input[1:])]
    return not (all(same) and len(mine.input) == len(theirs.input))


def _round_other_way(quantized: np.ndarray, value: np.ndarray, scale: float, zero_point: int):
    """``quantized`` with each element whose float ``value`` lay on a rounding tie rounded to the
    tie's other integer, and the mask of those elements (saturated ones are left alone)."""
    steps = value.astype(np.float64) / scale
    low = np.floor(steps)
    q = quantized.astype(np.int64) - zero_point
    tied = (np.abs(steps - low - 0.5) <= TIE_WINDOW) & ((q == low) | (q == low + 1))
    info = np.iinfo(quantized.dtype)
    other = np.clip(np.where(tied, 2 * low + 1 - q, q) + zero_point, info.min, info.max)
    tied &= other != quantized
    return other.astype(quantized.dtype), tied


def _trace_values(raw: bytes, count: int, dtype: np.dtype, zero_point: int = 0) -> np.ndarray:
    """A traced buffer's ``count`` quantized values (of ``dtype``, zero point ``zero_point``).

    A kernel may keep a tensor wider than its ONNX type: an asymmetric model's next kernel reads
    ``q - zero_point`` (a pooling sums it in int32), and the lowering folds that subtraction and
    widening into the producing kernel, which then writes int16 or int32.  Such a buffer holds
    centered values; the zero point is added back.
    """
    if len(raw) == count * dtype.itemsize:
        return np.frombuffer(raw, dtype=dtype).astype(np.int64)
    wide = {2: np.dtype(np.int16), 4: np.dtype(np.int32)}.get(len(raw) // max(count, 1))
    if wide is None or len(raw) != count * wide.itemsize:
        raise ValueError(f"a traced buffer of {len(raw)} bytes cannot hold {count} values")
    return np.frombuffer(raw, dtype=wide).astype(np.int64) + zero_point


def _traced_inputs(inputs: list[str], held_by: dict, producer: dict, constant: set[str]) -> list[str]:
    """``inputs``, each one that no buffer holds replaced by the held tensors it is computed from."""
    out: list[str] = []
    pending = list(inputs)
    for _ in range(64):  # a few nodes at most in practice
        if not pending:
            break
        name = pending.pop(0)
        node = producer.get(name)
        if name in held_by or node is None:
            if name not in out:
                out.append(name)
        elif node.op_type in ("DequantizeLinear", "QuantizeLinear", "Clip") and node.input[0] not in constant:
            pending.append(node.input[0])  # a quantized tensor no kernel wrote: from what it quantizes
        else:
            pending.extend(n for n in node.input if n and n not in constant)
    return out + [name for name in pending if name not in out]
