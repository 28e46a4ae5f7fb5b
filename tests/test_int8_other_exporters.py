"""QDQ models from another exporter: onnxruntime's ``quantize_static``.

Unlike Brevitas it quantizes activations asymmetrically (uint8 with zero points), gives each
input of a Concat its own scale, quantizes Sub and Mul, and keeps a Linear after a permute as
a MatMul on a 4-D tensor.  The bundle must match onnxruntime
on them, and the kernel-by-kernel check (passes/verify/layercheck.py) must be able to check every
kernel, since verify relies on it when an end-to-end difference needs explaining.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from distillc.passes.backend import compile_onnx_to_bundle, import_onnx, qdq_to_int8, testing  # noqa: E402
from distillc.passes.backend.qdq_to_int8 import LAYERS_ATTR  # noqa: E402
from distillc.passes.verify.layercheck import compare_kernels  # noqa: E402
from distillc.targets.runner import trace_on_host  # noqa: E402


class Concat(nn.Module):
    """Two branches with their own quantization, concatenated, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


class SubMul(nn.Module):
    """The difference of two convs, halved: quantized Sub and Mul by a constant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.a(x) - self.b(x)) * 0.5


class Pools(nn.Module):
    """Padded 3x3 max pooling with stride 2, then 3x3 average pooling counting the padding."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.max, self.avg = nn.MaxPool2d(3, 2, padding=1), nn.AvgPool2d(3, 1, padding=1)

    def forward(self, x):
        return self.avg(self.max(torch.relu(self.a(x))))


class Channels(nn.Module):
    """A Linear over the channels of every pixel (permute to NHWC, MatMul on a 4-D tensor)."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.a(x).permute(0, 2, 3, 1)).flatten(1)


class OneOutputChannel(nn.Module):
    """A 7x7 conv 1 -> 4 (padding 3), then a 2x2 conv 4 -> 1 (stride 2, padding 1) with a
    positive bias: one output channel, so the second conv's requantization multiplier and bias
    are single numbers (the first case found of a missing lower clamp)."""

    bias_sign = 1

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 7, padding=3), nn.Conv2d(4, 1, 2, stride=2, padding=1)
        with torch.no_grad():
            self.b.bias.copy_(self.b.bias.abs() * self.bias_sign)

    def forward(self, x):
        return self.b(self.a(x))


class OneOutputChannelRelu(OneOutputChannel):
    """The same with a ReLU at the end: quantize_static folds it into the output range [0, max],
    so the lower clamp of the second conv's requantization is the ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class NegativeBias(OneOutputChannel):
    """The same with a negative bias: as one int32 number cast to uint32, it did not compile."""

    bias_sign = -1


class PerTensor(nn.Module):
    """A 3x3 conv 3 -> 4 (padding 1), ReLU, a 2x2 conv 4 -> 3 (stride 2); quantized with
    per-tensor weight scales, every requantization multiplier is one number."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 2, stride=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def quantize_static(model, folder, *, shape=(3, 8, 8), activations: str = "QUInt8", per_channel: bool = True):
    """Float ONNX export, then onnxruntime's static QDQ quantization (``activations`` QUInt8:
    uint8 with zero points, or QInt8; int8 weights per channel, or per tensor) calibrated on 16
    seeded images of ``shape``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize

    torch.manual_seed(0)
    net, x = model().eval(), torch.randn(16, *shape)
    torch.onnx.export(net, x[:1], str(folder / "float.onnx"), input_names=["x"], dynamo=False, opset_version=13)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x[i:i + 1].numpy()} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    ort_quantize(str(folder / "float.onnx"), str(folder / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                 activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8,
                 per_channel=per_channel)
    return folder / "qdq.onnx"


@pytest.mark.parametrize("model", [Concat, SubMul, Pools, Channels], ids=lambda m: m.__name__)
def test_an_onnxruntime_quantized_model_compiles_exactly_and_every_kernel_is_checked(model, tmp_path):
    onnx_path = quantize_static(model, tmp_path)
    manifest = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name=model.__name__.lower())
    inputs = testing.quantized_inputs(manifest, 8, seed=0)
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")
    got = testing.bundle_outputs(exe, manifest, inputs, tmp_path / "build")
    assert np.abs(got - testing.ort_reference(onnx_path, manifest, inputs)).max() <= 1

    traces = trace_on_host(tmp_path / "bundle", inputs[:4], tmp_path / "trace")
    report = compare_kernels(onnx_path, manifest, inputs[:4], traces)
    assert report.ok, (report.errors, report.unchecked)
    assert sorted(report.checked) == list(range(len(manifest["layers"]))) and report.compared > 0


def test_a_wrong_weight_in_a_concat_branch_is_found(tmp_path):
    """The concat's branches are checked together with it (their outputs are requantized to the
    concat's scale inside their kernels); an error in one still fails the check."""
    onnx_path = quantize_static(Concat, tmp_path)
    manifest = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name="concat")
    weights_c = tmp_path / "bundle" / "src" / "distillc_weights.c"
    text = weights_c.read_text()
    body = text.index("{", text.index("distillc_w0[")) + 1  # the first conv's weights
    first = re.match(r"\s*(-?\d+)", text[body:])
    value = int(first.group(1))
    weights_c.write_text(text[:body] + text[body:].replace(first.group(1), str(value - 60 if value > 0 else value + 60), 1))
    inputs = testing.quantized_inputs(manifest, 4, seed=0)
    report = compare_kernels(onnx_path, manifest, inputs, trace_on_host(tmp_path / "bundle", inputs, tmp_path / "trace"))
    assert not report.ok and report.errors


# (model, input shape, activations, per-channel weights): one requantization multiplier per
# layer, with the int32 bias add of the 32-bit requantization (qdq_to_int8.requantize)
SCALAR_MULTIPLIER_CASES = [(OneOutputChannel, (1, 5, 5), "QInt8", True),
                           (OneOutputChannelRelu, (1, 5, 5), "QInt8", True),
                           (NegativeBias, (1, 5, 5), "QInt8", True),
                           (PerTensor, (3, 8, 8), "QUInt8", False)]


@pytest.mark.parametrize("model,shape,activations,per_channel", SCALAR_MULTIPLIER_CASES,
                         ids=lambda v: getattr(v, "__name__", None))
def test_a_layer_with_one_requantization_multiplier_keeps_its_lower_clamp(model, shape, activations, per_channel,
                                                                           tmp_path, monkeypatch):
    """TVM bounds a wrapping ``(int32)((uint32)acc + (uint32)bias)`` by [0, 2**31 - 1]: with one
    positive multiplier it took the requantized value for >= the lower clamp and dropped the
    clamp, so results below it wrapped (and a negative scalar bias did not compile).  Both kernel
    paths (the micro-kernel's im2col, TOPI's conv) must clamp and match onnxruntime, kernel by
    kernel, on inputs whose outputs reach the lower end."""
    onnx_path = quantize_static(model, tmp_path, shape=shape, activations=activations, per_channel=per_channel)
    layers = json.loads(str(qdq_to_int8.qdq_to_int8(import_onnx(onnx_path)).attrs[LAYERS_ATTR]))
    assert [info["requant_bits"] for info in layers.values() if "requant_bits" in info] == [32, 32]
    for micro in (True, False):
        monkeypatch.setattr(qdq_to_int8, "MICRO_KERNELS", micro)
        folder = tmp_path / ("micro" if micro else "topi")
        manifest = compile_onnx_to_bundle(onnx_path, folder / "bundle", name="scalar")
        source = (folder / "bundle" / "src" / "distillc_kernels.c").read_text()
        for layer in (layer for layer in manifest["layers"] if layer["op"] == "conv2d"):
            body = re.search(rf"void {layer['kernel']}\(.*?\n}}\n", source, re.S).group(0)
            assert re.search(r"\) > \((-128|0)\) \? ", body), (micro, layer["name"])  # int8 / uint8 lower clamp

        inputs = testing.quantized_inputs(manifest, 8, seed=0)
        exe = testing.build_host_driver(folder / "bundle", folder / "build")
        got = testing.bundle_outputs(exe, manifest, inputs, folder / "build")
        expected = testing.ort_reference(onnx_path, manifest, inputs)
        assert (expected == -128 - manifest["output"]["zero_point"]).any()  # the clamp is needed
        assert np.abs(got - expected).max() <= 1, micro  # float32 .5 ties only
        traces = trace_on_host(folder / "bundle", inputs[:4], folder / "trace")
        report = compare_kernels(onnx_path, manifest, inputs[:4], traces)
        assert report.ok and sorted(report.checked) == list(range(len(manifest["layers"]))), (micro, report.errors)
        testing.compile_for_cortex_m7(folder / "bundle", folder / "m7")
