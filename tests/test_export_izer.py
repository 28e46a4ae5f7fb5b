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


# -- where izer puts the network: data offsets, kernel memory, weight widths (issue 9, point 6) ----------


def ai8x_onnx(folder, image_size, *, weight_bits=8, in_chans=3, **options):
    """A seeded ai8x-cnn student through Brevitas (8 calibration images) and QCDQ export."""
    from distillc.passes.backend import export_qcdq, quantize
    from distillc.passes.max78000.ai8x import Ai8xCNN

    torch.manual_seed(0)
    model = Ai8xCNN(image_size=image_size, in_chans=in_chans, **options).eval()
    calib = torch.rand(8, in_chans, image_size, image_size) * 2 - 1
    qmodel = quantize(model, calib, weight_bits=weight_bits)
    return model, export_qcdq(qmodel, calib[:1], folder / f"ai8x{image_size}-{weight_bits}.onnx")


def izer_forward(state, layers, x):
    """What izer computes from the files distillc writes, read as ai8x-synthesis reads them
    (``izer/checkpoint.py``: bias = floor(stored / 2**(bits-1)), shift = output_shift + 8 - bits;
    ``izer/simulate.py``: floor(0.5 + (conv + 128*bias) * 2**shift / 128)), written independently
    of ``export.izer``'s :func:`simulate`."""
    f = torch.nn.functional
    data = torch.tensor(np.asarray(x), dtype=torch.float64)[None]
    for index, layer in enumerate(layers):
        bits = int(state[f"conv{index}.weight_bits"].item())
        assert layer["quantization"] == bits
        weight = state[f"conv{index}.op.weight"].to(torch.float64)
        assert -(2 ** (bits - 1)) <= weight.min() and weight.max() <= 2 ** (bits - 1) - 1
        bias = torch.floor(state[f"conv{index}.op.bias"].to(torch.float64) / 2 ** (bits - 1))
        shift = int(state[f"conv{index}.output_shift"].item()) + 8 - bits
        assert -15 <= shift <= 15
        if "max_pool" in layer:
            data = f.max_pool2d(data, layer["max_pool"], layer["pool_stride"])
        elif "avg_pool" in layer:
            data = torch.trunc(f.avg_pool2d(data, layer["avg_pool"], layer["pool_stride"]))
        acc = f.conv2d(data, weight, padding=layer["pad"]) + 128 * bias[None, :, None, None]
        data = torch.floor(0.5 + acc * 2.0**shift / 128).clamp(0 if layer["activate"] == "ReLU" else -128, 127)
    return data[0].numpy().astype(np.int64)


def stored_maps(model, image_size, in_chans=3):
    """(channels, pixels) of each conv's input as it lies in data memory (the previous conv's
    output: a fused pooling reads it whole) and of its output, from the PyTorch student."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape, o.shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, in_chans, image_size, image_size))
    for hook in hooks:
        hook.remove()
    maps, previous = [], (in_chans, image_size * image_size)
    for _, out in shapes:
        maps.append((previous, (out[1], out[2] * out[3])))
        previous = maps[-1][1]
    return maps


def test_out_offsets_keep_each_layers_input_and_output_apart_in_one_data_instance(tmp_path):
    """At 64x64, izer refused the fixed 0x2000/0 offsets ('Layer 0 output ... is overwriting input'):
    the offsets follow the map sizes, and in one 32 KiB instance (4 bytes per pixel per pass of 64
    channels) no layer's output overlaps its input (izer's in_offset: 0, then the previous out_offset)."""
    import yaml

    model, onnx_path = ai8x_onnx(tmp_path, 64, width=4, embed_dim=8, convs_per_stage=1)
    net, reasons = convert(onnx_path)
    assert reasons == []
    layers = yaml.safe_load(export_izer.network_yaml(net, arch="t", dataset="d"))["layers"]
    maps = stored_maps(model, 64)
    assert len(layers) == len(maps) == 5
    in_offset = 0
    for layer, ((c_in, p_in), (c_out, p_out)) in zip(layers, maps):
        in_end = in_offset + 4 * p_in * -(-c_in // 64)
        out_offset = layer["out_offset"]
        out_end = out_offset + 4 * p_out * -(-c_out // 64)
        assert out_offset % 4 == 0 and 0 <= out_offset and out_end <= 32768 and in_end <= 32768
        assert out_end <= in_offset or in_end <= out_offset, (layer, in_offset, in_end, out_offset, out_end)
        in_offset = out_offset
    assert maps[0] == ((3, 4096), (4, 4096))  # 16 KiB in, 16 KiB out: the first layer fills the instance


def test_a_layer_too_big_for_one_data_instance_is_refused_by_the_check_and_the_export(tmp_path):
    """80x80: input and output each fit 8 KiB per processor (what the check tested), together they don't."""
    from distillc.passes.max78000.ai8x import max78000_violations

    model, onnx_path = ai8x_onnx(tmp_path, 80, width=4, embed_dim=8, convs_per_stage=1)
    checked = max78000_violations(model, 80)
    _, reasons = convert(onnx_path)
    assert checked and all("data memory instance" in v for v in checked)
    assert [v.split(": ", 1)[1] for v in checked] == [r.split(": ", 1)[1] for r in reasons]
    assert checked[0].startswith("stages.0.conv0.conv: its input (6,400 pixels) and output (6,400 pixels) need "
                                 "25,600 + 25,600 bytes")


def test_kernel_memory_is_counted_per_processor_as_izer_packs_it(tmp_path):
    """Three pairs of 3x3 convs 4 -> 256 -> 4 channels: 55 KB of weights (an eighth of the 442 KB
    total), but each pair takes 256 + 16 of processor 0's 768 kernel slots (every layer's kernels
    start at processor 0), so izer stops with 'Kernel memory exhausted at processor 0'."""
    from dataclasses import replace

    from distillc.passes.backend import export_qcdq, quantize
    from distillc.passes.max78000.ai8x import max78000_violations
    from distillc.passes.max78000.memory import kernel_offsets

    torch.manual_seed(0)
    nn = torch.nn
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    for pair in range(3):
        layers += [nn.Conv2d(4, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 4, 3, padding=1)]
        layers += [nn.ReLU()] if pair < 2 else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers).eval()
    calib = torch.rand(4, 3, 8, 8) * 2 - 1
    net, reasons = convert(export_qcdq(quantize(model, calib), calib[:1], tmp_path / "narrow.onnx"))
    checked = max78000_violations(model, 8)
    assert len(checked) == len(reasons) == 1
    assert checked[0].startswith("10: kernel memory exhausted at processor 0: the layer needs 256 kernel slots")
    assert checked[0].split(": ", 1)[1] == reasons[0].split(": ", 1)[1]
    assert [export_izer.kernel_slots(s) for s in export_izer.layer_shapes(net)] == [4] + [256, 16] * 3
    # At 4 bits the same layers take half the slots and fit.
    assert kernel_offsets([replace(s, weight_bits=4) for s in export_izer.layer_shapes(net)])[1] == []
    assert max78000_violations(model, 8, weight_bits=4) == []


def test_a_4_bit_student_is_exported_with_4_bit_weights_as_the_check_counts_them(tmp_path):
    """weight_bits = 4: the checkpoint holds 4-bit weights (weight_bits 4, bias stored times 8,
    output_shift without izer's implicit +4), the YAML says quantization 4, izer's reading of the
    files reproduces the simulation, and the check describes the same layers the export writes."""
    import yaml

    model, onnx_path = ai8x_onnx(tmp_path, 16, weight_bits=4, in_chans=1, width=4, embed_dim=8, convs_per_stage=1)
    net, reasons = convert(onnx_path)
    assert reasons == [] and [layer.weight_bits for layer in net.layers] == [4] * 5
    state = export_izer.state_dict(net)
    layers = yaml.safe_load(export_izer.network_yaml(net, arch="t", dataset="d"))["layers"]
    for index, layer in enumerate(net.layers):
        assert state[f"conv{index}.weight_bits"].item() == 4 and layers[index]["quantization"] == 4
        assert state[f"conv{index}.output_shift"].item() == layer.shift - 4
        assert torch.equal(state[f"conv{index}.op.bias"], torch.tensor(layer.bias * 8, dtype=torch.float32))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.integers(-128, 128, (1, 16, 16))
        np.testing.assert_array_equal(izer_forward(state, layers, x), simulate(net, x))
    from distillc.passes.max78000.ai8x import max78000_layers

    checked = max78000_layers(model, 16, weight_bits=4)
    exported = export_izer.layer_shapes(net)
    assert [(s.in_channels, s.out_channels, s.kernel, s.weight_bits, s.in_pixels, s.out_pixels) for s in checked] \
        == [(s.in_channels, s.out_channels, s.kernel, s.weight_bits, s.in_pixels, s.out_pixels) for s in exported]
