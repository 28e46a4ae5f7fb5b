"""Per-layer SQNR: how far each INT8 layer output is from the same layer computed in float.

The float model is the bundle's QCDQ graph without its activation rounding: every
``QuantizeLinear -> DequantizeLinear`` of an activation becomes a clamp to that quantizer's range
(:func:`float_graph`), so each layer computes in float from float inputs.  The weights stay as
the graph stores them (int8 and dequantized; the float weights before quantization are not in
the ONNX file), so the figure measures the activation rounding error, accumulated from the input
to that layer.  The INT8 side is the QCDQ graph itself, run by onnxruntime as written, whose
every kernel ``verify.host`` shows equal to the bundle's C (up to float32 rounding ties).

For kernel ``k`` (``manifest["layers"][k]``) the compared tensors are those of its region of the
graph (``layercheck.kernel_regions``): the dequantized quantized output, against the float tensor
that quantizer rounds.  ``SQNR = 10 log10(sum f^2 / sum (f - dq)^2)`` in dB over all compared
images; None for a kernel with no region of its own (computed together with the next one), with
no rounding, or whose float output is all zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from distillc.passes.backend import onnx_graph

#: The reference this module's figures are measured against, as the report names it.
REFERENCE = ("the QCDQ model without activation rounding (float activations clamped to each quantizer's "
             "range, weights as stored in int8)")


def float_graph(model: Any) -> tuple[Any, dict[str, str]]:
    """A copy of ``model`` whose activations are not rounded, and for each quantized activation
    tensor the float tensor that stands for it there.

    Each ``QuantizeLinear -> [Clip] -> DequantizeLinear`` of an activation becomes one ``Clip`` to
    the quantizer's range, ``[(qmin - zp) s, (qmax - zp) s]``: the rounding goes, the range stays.
    The range is kept because it is part of the model: a quantized ReLU6 has no other upper bound
    (Brevitas' ``QuantReLU`` clamps in its quantizer).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer, _ = onnx_graph.index(graph)
    constant = onnx_graph.constant_tensors(graph, producer)
    rename: dict[str, str] = {}  # a dequantized activation -> its float stand-in
    float_of: dict[str, str] = {}  # a quantized activation (a quantizer's or its clip's output) -> the same
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "DequantizeLinear" or node.input[0] in constant:
            continue
        clip = None
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "Clip":  # a narrow-range clip of the quantized value
            clip, source = source, producer.get(source.input[0])
        if source is None or source.op_type != "QuantizeLinear" or source.input[0] in constant:
            continue
        scale = float(onnx_graph.const_value(model, source.input[1]))
        zp_value = onnx_graph.const_value(model, source.input[2]) if len(source.input) > 2 else np.int8(0)
        info = np.iinfo(zp_value.dtype)
        low, high = float(info.min), float(info.max)
        if clip is not None:
            low = max(low, float(onnx_graph.const_value(model, clip.input[1])))
            high = min(high, float(onnx_graph.const_value(model, clip.input[2])))
        zp = float(zp_value)
        out = f"{node.output[0]}/distillc_float"
        bounds = [f"{out}/min", f"{out}/max"]
        for name, value in zip(bounds, ((low - zp) * scale, (high - zp) * scale)):
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        nodes.append(helper.make_node("Clip", [source.input[0], *bounds], [out], name=out))
        rename[node.output[0]] = out
        float_of[source.output[0]] = out
        if clip is not None:
            float_of[clip.output[0]] = out
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(nodes)
    return model, float_of


def layer_sqnr(onnx_path: str | Path, manifest: dict[str, Any], images: np.ndarray) -> list[float | None]:
    """Per kernel of ``manifest["layers"]``: the SQNR (dB) of its INT8 output against the float
    model, over ``images`` (float32, batch first, in the model's input shape)."""
    import onnx
    from onnx import helper, shape_inference

    from distillc.passes.export.to_onnx import reference_session
    from distillc.passes.verify.layercheck import Region, kernel_regions

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    layers = manifest["layers"]
    regions = kernel_regions(model, layers)
    types = onnx_graph.tensor_types(model)
    zero_points = onnx_graph.zero_points(model)
    floats, float_of = float_graph(model)
    pairs: dict[int, tuple[str, str, float, int]] = {}  # kernel -> (quantized, float tensor, scale, zero point)
    for index, region in regions.items():
        if isinstance(region, Region) and region.before_quantize is not None:
            pairs[index] = (region.output, float_of.get(region.output, region.before_quantize),
                            onnx_graph.scale_of(model, region.output), zero_points.get(region.output, 0))
    if not pairs:
        return [None] * len(layers)

    def session(graph_model: Any, names: list[str]) -> Any:
        graph_model = onnx.ModelProto.FromString(graph_model.SerializeToString())
        del graph_model.graph.output[:]
        for name in dict.fromkeys(names):
            elem = helper.np_dtype_to_tensor_dtype(types.get(name, np.dtype(np.float32)))
            graph_model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        return reference_session(graph_model.SerializeToString())

    steps = sorted(pairs)
    quantized = session(model, [pairs[k][0] for k in steps])
    reference = session(floats, [pairs[k][1] for k in steps])
    q_names = list(dict.fromkeys(pairs[k][0] for k in steps))
    f_names = list(dict.fromkeys(pairs[k][1] for k in steps))
    input_name = model.graph.input[0].name
    signal = np.zeros(len(steps))
    noise = np.zeros(len(steps))
    for x in np.asarray(images, dtype=np.float32):
        feed = {input_name: x[None]}
        q_out = dict(zip(q_names, quantized.run(q_names, feed)))
        f_out = dict(zip(f_names, reference.run(f_names, feed)))
        for j, k in enumerate(steps):
            q_name, f_name, scale, zp = pairs[k]
            f = f_out[f_name].astype(np.float64).reshape(-1)
            dq = (q_out[q_name].astype(np.float64).reshape(-1) - zp) * scale
            if f.size != dq.size:
                continue
            signal[j] += float(np.sum(f * f))
            noise[j] += float(np.sum((f - dq) ** 2))
    result: list[float | None] = [None] * len(layers)
    for j, k in enumerate(steps):
        if signal[j] > 0:
            # No error at all (a layer that only copies quantized values) has no finite SQNR: None.
            result[k] = round(10.0 * math.log10(signal[j] / noise[j]), 2) if noise[j] > 0 else None
    return result
