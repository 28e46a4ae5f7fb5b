"""export.izer (passes/max78000/izer.py): the MAX78000 accelerator's arithmetic, the conversion from
QCDQ ONNX to izer's integers, and what the pass does with a network the accelerator cannot run.

The whole pass on an ai8x-cnn student is in tests/test_max78000_target.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.artifacts import Bundle  # noqa: E402
from distillc.errors import TargetError  # noqa: E402
from distillc.passes.max78000 import izer as export_izer  # noqa: E402
from distillc.passes.backend.codegen_c import write_manifest  # noqa: E402
from distillc.passes.max78000.izer import IzerLayer, IzerNetwork, convert, quantize_layer, simulate  # noqa: E402
from distillc.passes.backend import compile_onnx_to_bundle, testing  # noqa: E402


def one_layer(weight, bias=0, shift=0, relu=False, pool=None, size=0, stride=0):
    w = np.array(weight, dtype=np.int64).reshape(1, 1, 1, 1)
    return IzerNetwork(layers=[IzerLayer("conv0", "n", w, np.array([bias]), shift, 1, 0, relu, pool, size, stride)])


def test_a_layer_rounds_half_up_and_scales_by_its_shift():
    """izer: out = clamp(floor(0.5 + (x*w + 128*b) * 2**shift / 128)); ReLU clamps to 0..127."""
    x = np.array([1, -1, 3, -3, 100], dtype=np.int64).reshape(1, 1, 5)
    assert simulate(one_layer(64), x).ravel().tolist() == [1, 0, 2, -1, 50]  # x / 2, halves up
    assert simulate(one_layer(64, shift=1), x).ravel().tolist() == [1, -1, 3, -3, 100]
    assert simulate(one_layer(64, shift=-1), x).ravel().tolist() == [0, 0, 1, -1, 25]  # 0.25, -0.25, 0.75 ...
    assert simulate(one_layer(64, bias=3), x).ravel().tolist() == [4, 3, 5, 2, 53]
    assert simulate(one_layer(127, shift=2), x).ravel().tolist() == [4, -4, 12, -12, 127]  # saturates
    assert simulate(one_layer(64, relu=True), x).ravel().tolist() == [1, 0, 2, 0, 50]


def test_pooling_comes_before_the_conv_and_averages_truncate_toward_zero():
    x = np.array([[1, 2, -5, -6], [3, 9, -7, 0]], dtype=np.int64).reshape(1, 2, 4)
    assert simulate(one_layer(128, shift=0, pool="max", size=2, stride=2), x).ravel().tolist() == [9, 0]
    # means 3.75 and -4.5: truncated to 3 and -4 (izer without --avg-pool-rounding)
    assert simulate(one_layer(128, shift=0, pool="avg", size=2, stride=2), x).ravel().tolist() == [3, -4]


def test_quantize_layer_takes_the_finest_shift_that_fits_weights_and_bias():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(0, 0.05, (4, 3, 3, 3)), rng.normal(0, 0.01, 4)
    w, b, shift = quantize_layer(weight, bias, t_in=0.02, t_out=0.03)
    assert np.abs(w).max() <= 127 and np.abs(b).max() <= 127 and -15 <= shift <= 15
    w_finer, b_finer = weight * 0.02 / 0.03 * 128 / 2.0 ** (shift - 1), bias / 0.03 / 2.0 ** (shift - 1)
    assert np.abs(np.floor(w_finer + 0.5)).max() > 127 or np.abs(np.floor(b_finer + 0.5)).max() > 127
    # The integers reproduce the real layer to within half a step of the shift's resolution.
    np.testing.assert_allclose(w * 2.0**shift / 128, weight * 0.02 / 0.03, atol=2.0**shift / 256 + 1e-12)
    # A large bias needs a coarser shift than the weights alone would.
    _, b_big, shift_big = quantize_layer(weight, bias * 1000, t_in=0.02, t_out=0.03)
    assert shift_big > shift and np.abs(b_big).max() <= 127


def test_a_convertible_model_matches_onnxruntime_and_a_wrong_shift_does_not(tmp_path):
    """testing.tie_net: 1x1 convs, stride 1, int8 outputs; izer's arithmetic reproduces it up to its
    coarser rounding (a few steps), while one layer's shift off by one doubles its outputs."""
    onnx_path = testing.tie_net(tmp_path / "net.onnx", in_channels=3, size=6)
    net, reasons = convert(onnx_path)
    assert reasons == [] and len(net.layers) == 2 and not any(layer.relu or layer.pool for layer in net.layers)
    manifest = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name="net")
    inputs = testing.quantized_inputs(manifest, 4, seed=0)
    reference = export_izer._reference_maps(onnx_path, net, inputs, manifest)

    def worst_steps(network):
        return max(np.abs(simulate(network, x.astype(np.int64)) * network.output_scale - want).max()
                   for x, want in zip(inputs, reference)) / network.output_scale

    assert worst_steps(net) <= 4  # per-layer shifts are coarser than per-channel multipliers
    net.layers[0].shift += 1
    assert worst_steps(net) > 10


def test_a_network_the_accelerator_cannot_run_is_reported_or_refused(tmp_path):
    """A random net with a depthwise or strided conv: 'report' writes no izer files and records why;
    'require' stops with every reason."""
    for seed in range(20):
        model, _ = testing.random_convnet(seed)
        if any(m.groups > 1 or m.stride[0] > 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            break
    onnx_path, manifest = testing.random_bundle(seed, tmp_path)
    write_manifest(tmp_path / "bundle", manifest)
    _, reasons = convert(onnx_path)
    assert reasons and all("(Conv)" in r or "Pool" in r or "after the last convolution" in r for r in reasons)
    assert any("groups=" in r or "stride" in r for r in reasons)

    logged = []
    ctx = SimpleNamespace(scratch=tmp_path / "scratch", log=logged.append)
    artifact = Bundle(path=tmp_path / "bundle", reference=onnx_path)
    step = export_izer.ExportIzer(export_izer.ExportIzer.Config())
    result = step.run(artifact, ctx)
    assert result.metrics == {"exported": False, "reasons": reasons} and logged
    out = json.loads((result.artifact.path / "manifest.json").read_text())
    assert out["izer"]["exported"] is False and not (result.artifact.path / "izer").exists()

    strict = export_izer.ExportIzer(export_izer.ExportIzer.Config(mode="require"))
    ctx.scratch = tmp_path / "scratch2"
    with pytest.raises(TargetError) as caught:
        strict.run(artifact, ctx)
    assert len(caught.value.violations) == len(reasons)


def test_processors_take_one_channel_each_and_wide_layers_run_in_passes():
    """ai8x-synthesis README: 'the number of processors is an integer division of the channel
    count, rounded up to the next multiple of 4... 52 processors are required for 100 channels'."""
    assert export_izer.processors_for(3) == (0b111, 1)
    assert export_izer.processors_for(64) == ((1 << 64) - 1, 1)
    assert export_izer.processors_for(100) == ((1 << 52) - 1, 2)
    assert export_izer.processors_for(120) == ((1 << 60) - 1, 2)
    assert export_izer.processors_for(256) == ((1 << 64) - 1, 4)


def test_a_residual_add_is_named_as_a_reason(tmp_path):
    """The exporter writes a chain of convolutions only: a conv reading a residual sum is refused."""
    seed = next(s for s in range(40) if any(getattr(b, "residual", False) for b in testing.random_convnet(s)[0].modules()))
    onnx_path, _ = testing.random_bundle(seed, tmp_path)
    _, reasons = convert(onnx_path)
    assert any("not the previous layer's output" in r for r in reasons), reasons
