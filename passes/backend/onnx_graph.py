"""Reading a QCDQ ONNX graph: who produces and consumes each tensor, constants, quantizers.

Shared by the kernel-by-kernel check (``layercheck``) and the MAX78000 exporter
(``passes/max78000/izer.py``).  Plain ``onnx`` protobuf access, no onnxruntime.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def index(graph: Any) -> tuple[dict[str, Any], dict[str, list]]:
    """``(producer, consumers)``: the node writing each tensor, and the nodes reading it."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def constant_tensors(graph: Any, producer: dict) -> set[str]:
    """Names of tensors computed from initializers and Constant nodes alone (weights, scales)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted
        if node.op_type == "Constant" or (node.input and all(not n or n in constant for n in node.input)):
            constant.update(node.output)
    return constant


def tensor_types(model: Any) -> dict[str, np.dtype]:
    from onnx import helper

    types = {}
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        elem = info.type.tensor_type.elem_type
        if elem:
            types[info.name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    return types


def shape(model: Any, name: str) -> tuple[int, ...]:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == name:
            return tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
    raise KeyError(name)


def quantize_node(model: Any, name: str) -> Any:
    producer = {out: node for node in model.graph.node for out in node.output}
    node = producer[name]
    if node.op_type == "Clip":
        node = producer[node.input[0]]
    return node


def const_value(model: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def scale_of(model: Any, name: str) -> float:
    return float(const_value(model, quantize_node(model, name).input[1]))


def zero_points(model: Any) -> dict[str, int]:
    out = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp = int(const_value(model, node.input[2]))
            out[node.output[0]] = zp
    for node in model.graph.node:
        if node.op_type == "Clip" and node.input[0] in out and producer.get(node.input[0]) is not None:
            out[node.output[0]] = out[node.input[0]]
    return out
