"""Brevitas helpers: post-training quantization of a float student and QCDQ ONNX export.

The QAT pass and the tests share these two functions so that every quantized model that
reaches the INT8 backend has the same shape: a quantized input, per-channel (or per-tensor)
narrow-range weights, int32 biases whose scale is ``s_in * s_w``, quantized activations, and a
quantized output, so the exported graph ends with ``QuantizeLinear -> DequantizeLinear``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def quantize(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    per_channel: bool = True,
    calib_batch: int = 32,
) -> nn.Module:
    """Return a Brevitas-quantized copy of ``model``, calibrated on ``calib``.

    BatchNorm layers are folded into the preceding convolutions, the input is quantized
    (signed), ReLU/ReLU6 outputs are unsigned, every conv/linear output is requantized, and the
    model output is always quantized (a QuantIdentity is appended when Brevitas left it float).
    Activation scales come from ``calib`` (run once in calibration mode, in batches).
    """
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        QUANT_IDENTITY_MAP,
        preprocess_for_quantize,
    )
    from brevitas.graph.quantize import quantize as brevitas_quantize
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Uint8ActPerTensorFloat,
        Uint8ActPerTensorFloatMaxInit,
    )

    if not 2 <= weight_bits <= 8 or not 2 <= act_bits <= 8:
        raise ValueError(f"weight_bits and act_bits must be in 2..8, got {weight_bits}, {act_bits}")
    weight_quant = (Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat).let(
        bit_width=weight_bits
    )
    signed_act = Int8ActPerTensorFloat.let(bit_width=act_bits)
    unsigned_act = Uint8ActPerTensorFloat.let(bit_width=act_bits)

    compute_map = dict(COMPUTE_LAYER_MAP)
    for float_cls in (nn.Conv2d, nn.Linear):
        quant_cls, kwargs = COMPUTE_LAYER_MAP[float_cls]
        compute_map[float_cls] = (quant_cls, {**kwargs, "weight_quant": weight_quant})
    act_map = dict(QUANT_ACT_MAP)
    act_map[nn.ReLU] = (qnn.QuantReLU, {**QUANT_ACT_MAP[nn.ReLU][1], "act_quant": unsigned_act})
    act_map[nn.ReLU6] = (
        qnn.QuantReLU,
        {
            **QUANT_ACT_MAP[nn.ReLU6][1],
            "act_quant": Uint8ActPerTensorFloatMaxInit.let(bit_width=act_bits),
        },
    )
    identity_map = {
        "signed": (qnn.QuantIdentity, {**QUANT_IDENTITY_MAP["signed"][1], "act_quant": signed_act}),
        "unsigned": (
            qnn.QuantIdentity,
            {**QUANT_IDENTITY_MAP["unsigned"][1], "act_quant": unsigned_act},
        ),
    }

    model = model.eval()
    graph_model = preprocess_for_quantize(model, relu6_to_relu=False)
    qmodel = brevitas_quantize(
        graph_model,
        quant_identity_map=identity_map,
        compute_layer_map=compute_map,
        quant_act_map=act_map,
    )
    if not _output_is_quantized(qmodel):
        qmodel = _OutputQuantized(qmodel, qnn.QuantIdentity(act_quant=signed_act))
    qmodel.eval()
    with torch.no_grad(), calibration_mode(qmodel):
        for start in range(0, calib.shape[0], calib_batch):
            qmodel(calib[start : start + calib_batch])
    return qmodel.eval()


def export_qcdq(qmodel: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export a Brevitas model as QCDQ ONNX (opset 13, TorchScript exporter) and return the path.

    ``example`` is one input batch (its first dimension is kept as the model's batch size).
    The TorchScript exporter is used because the dynamo exporter refuses quantized biases.
    """
    from brevitas.export import export_onnx_qcdq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qmodel = qmodel.eval()
    with torch.no_grad():
        export_onnx_qcdq(qmodel, args=example, export_path=str(path), opset_version=13, dynamo=False)
    return path


class _OutputQuantized(nn.Module):
    """Wraps a quantized model whose output Brevitas left in float, adding a final quantizer."""

    def __init__(self, inner: nn.Module, out_quant: nn.Module):
        super().__init__()
        self.inner = inner
        self.out_quant = out_quant

    def forward(self, x):
        return self.out_quant(self.inner(x))


def _output_is_quantized(qmodel: nn.Module) -> bool:
    """True when the traced graph's output comes straight from an output-quantizing module."""
    graph = getattr(qmodel, "graph", None)
    if graph is None:
        return False
    output_node = next(node for node in graph.nodes if node.op == "output")
    producer = output_node.args[0]
    if not hasattr(producer, "op") or producer.op != "call_module":
        return False
    module = qmodel.get_submodule(producer.target)
    for attr in ("act_quant", "output_quant"):
        proxy = getattr(module, attr, None)
        if proxy is not None and getattr(proxy, "is_quant_enabled", False):
            return True
    return False


# -- the float student's API on a quantized student ---------------------------------------------


class QuantStudent(nn.Module):
    """A quantized student that keeps the float student's training API.

    Distillation objectives call ``student(x)``, read ``embed_dim`` and ``stage_channels``, and
    may call ``forward_stages(x)``.  Brevitas's graph-mode quantization returns a traced graph
    that has only ``forward``; this wrapper adds the rest.  ``forward_stages`` runs a second graph
    over the *same* quantized modules that returns the (requantized) outputs of the modules the
    float model's ``forward_stages`` returns, so stage losses train the quantized weights.
    """

    def __init__(self, qmodel: nn.Module, float_model: nn.Module, example: torch.Tensor):
        super().__init__()
        self.qmodel = qmodel
        self.embed_dim = getattr(float_model, "embed_dim", None)
        self.stage_channels = list(getattr(float_model, "stage_channels", []) or [])
        self._stages: nn.Module | None = None
        self._stages_error = f"{type(float_model).__name__} has no forward_stages"
        if hasattr(float_model, "forward_stages"):
            try:
                self._stages = tap_graph(qmodel, stage_modules(float_model, example))
            except ValueError as exc:
                self._stages_error = str(exc)
                self.stage_channels = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qmodel(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._stages is None:
            raise ValueError(f"the quantized student cannot return its stages: {self._stages_error}")
        return [_value(t) for t in self._stages(x)]


def stage_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The qualified names of the modules whose outputs ``model.forward_stages`` returns.

    Found by running it once with forward hooks: each returned tensor must be the very output of
    a module (the outermost one when nested modules return the same tensor).
    """
    produced: dict[int, str] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name  # outer modules finish last and overwrite inner ones
        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            stages = model.forward_stages(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    names = []
    for i, stage in enumerate(stages):
        if id(stage) not in produced:
            raise ValueError(f"stage {i} of {type(model).__name__}.forward_stages is not the output of a module")
        names.append(produced[id(stage)])
    return names


def tap_graph(qmodel: nn.Module, module_names: list[str]) -> nn.Module:
    """A graph module sharing ``qmodel``'s modules that returns the outputs of ``module_names``.

    ``qmodel`` is Brevitas's traced graph (possibly wrapped by :class:`_OutputQuantized`).  The
    output of module ``m`` is the last node traced inside ``m``, followed through the quantizer
    Brevitas inserted after it when there is one, so the tap is the value the next layer reads.
    """
    graph_module = qmodel.inner if isinstance(qmodel, _OutputQuantized) else qmodel
    graph = getattr(graph_module, "graph", None)
    if graph is None:
        raise ValueError("the quantized student is not a traced graph")
    nodes = list(graph.nodes)
    taps = []
    for name in module_names:
        inside = [n for n in nodes if _traced_inside(n, name)]
        if not inside:
            raise ValueError(f"no traced node belongs to module {name!r}")
        node = inside[-1]
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and not users[0].meta.get("nn_module_stack"):
            node = users[0]  # the requantizer Brevitas inserted after the module
        taps.append(node)
    new_graph = type(graph)()
    mapping: dict = {}
    new_graph.graph_copy(graph, mapping)
    new_graph.output(tuple(mapping[node] for node in taps))
    taps_module = type(graph_module).__mro__[1](graph_module, new_graph)
    taps_module.graph.eliminate_dead_code()
    taps_module.recompile()
    return taps_module


def _traced_inside(node: object, module_name: str) -> bool:
    stack = getattr(node, "meta", {}).get("nn_module_stack") or {}
    prefix = module_name + "."
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else key
        if path == module_name or str(path).startswith(prefix):
            return True
    return False


def _value(t: object) -> torch.Tensor:
    """The float tensor of a Brevitas QuantTensor (or ``t`` itself)."""
    return getattr(t, "value", t)
