"""1x1 convolutions and dense layers run on the SIMD micro-kernel (``microkernels.py``): the
weights permuted at compile time, SXTB16/UXTB16 + SMLAD where ``__ARM_FEATURE_DSP`` is defined
(QEMU's Cortex-M7 and M4), plain C elsewhere (the host).  Every path gives the bundle outputs of
the TOPI kernels (``qdq_to_int8.MICRO_KERNELS = False``) and onnxruntime's: int8 and uint8
inputs, channel counts that are not multiples of 4 or 2, odd maps, 1- and 3-channel images, a
residual add fused after the call.  Other convolutions (the 3x3 stem: any window, stride and
padding, inputs with a zero point) run the same micro-kernel on an im2col of each pixel pair."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import (compile_onnx_to_bundle, export_qcdq, microkernels, qdq_to_int8,  # noqa: E402
                                     quantize, testing)
from distillc.targets.runner import run_on_qemu  # noqa: E402


def pointwise_net(path, *, in_channels: int, size: int, seed: int = 0):
    """QCDQ model: 1x1 conv on the image (int8 input, ``in_channels`` -> 5), ReLU, 1x1 5 -> 7
    (uint8 input), a 3x3 stride-2 conv, a residual block around a 1x1 7 -> 7, global pool,
    linear 7 -> 6 (dense) and 6 -> 9."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

        def forward(self, x):
            return x + self.conv(x)

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 7, 1), nn.BatchNorm2d(7), nn.ReLU6(),
        nn.Conv2d(7, 7, 3, stride=2, padding=1), nn.BatchNorm2d(7),
        Residual(7), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 9))
    model = testing.randomize_batchnorm(model)
    calib = torch.randn(32, in_channels, size, size)
    return export_qcdq(quantize(model, calib), calib[:1], path)


def compile_both_ways(onnx_path, tmp_path, monkeypatch):
    bundles = {}
    for micro in (True, False):
        monkeypatch.setattr(qdq_to_int8, "MICRO_KERNELS", micro)
        folder = tmp_path / ("micro" if micro else "topi")
        bundles[micro] = (compile_onnx_to_bundle(onnx_path, folder / "bundle", name="pw"), folder / "bundle")
    return bundles[True], bundles[False]


def host_outputs(bundle, manifest, inputs, work):
    exe = testing.build_host_driver(bundle, work)  # gcc -std=c99 -Wall -Wextra -Werror: the portable path
    return testing.bundle_outputs(exe, manifest, inputs, work)


def test_weights_are_permuted_in_blocks_of_4_channels_and_pairs_of_inputs():
    rows = np.arange(-30, 5, dtype=np.int8).reshape(5, 7)  # 5 channels (one padded block), 7 inputs
    permuted = microkernels.permute_weights(rows)
    assert permuted.shape == (2, 4, 8)
    # one word: (w[o][k], w[o+1][k], w[o][k+1], w[o+1][k+1]); then the same for o + 2
    assert list(permuted[0, 1]) == [rows[0, 2], rows[1, 2], rows[0, 3], rows[1, 3],
                                    rows[2, 2], rows[3, 2], rows[2, 3], rows[3, 3]]
    assert list(permuted[1, 3]) == [rows[4, 6], 0, 0, 0, 0, 0, 0, 0]  # padding is zero
    assert np.array_equal(microkernels.unpermute_weights(permuted, 5, 7), rows)


# (input channels, size): 1- and 3-channel images, odd maps (rows ending in a 1-pixel block)
CASES = [(3, 9), (1, 7)]


@pytest.mark.parametrize("in_channels,size", CASES)
def test_pointwise_and_dense_layers_use_the_micro_kernel_and_keep_their_outputs(in_channels, size, tmp_path,
                                                                               monkeypatch):
    onnx_path = pointwise_net(tmp_path / "pw.onnx", in_channels=in_channels, size=size)
    (micro, micro_dir), (topi, topi_dir) = compile_both_ways(onnx_path, tmp_path, monkeypatch)

    # every conv and dense layer takes the micro-kernel, with permuted (padded) weights: the 3x3
    # stride-2 conv through an im2col of each pixel pair
    eligible = [layer for layer in micro["layers"] if layer["op"] in ("conv2d", "dense")]
    assert len(eligible) == 6  # three 1x1 convs, a 3x3 one, two dense layers
    for layer in eligible:
        assert layer["weights"]["layout"] == microkernels.LAYOUT
        count = layer["output_shape"][1] if layer["op"] == "conv2d" else layer["output_shape"][-1]
        length = layer["weights"]["values"] // count
        assert layer["weights"]["bytes"] == -(-count // 4) * 4 * -(-length // 2) * 2
    assert all("layout" not in (layer["weights"] or {}) for layer in topi["layers"])
    source = (micro_dir / "src" / "distillc_kernels.c").read_text()
    calls = re.findall(r"(distillc_mk_4x2_[su]8)\(\(", source)
    assert len(calls) == len({layer["kernel"] for layer in eligible}) and set(calls) == {
        "distillc_mk_4x2_s8", "distillc_mk_4x2_u8"}  # int8 and uint8 inputs
    assert "__smlad(" in source and "#if defined(__ARM_FEATURE_DSP)" in source
    assert "distillc_mk_" not in (topi_dir / "src" / "distillc_kernels.c").read_text()

    inputs = testing.quantized_inputs(micro, 8, seed=in_channels)
    got = host_outputs(micro_dir, micro, inputs, tmp_path / "build-micro")
    assert np.array_equal(got, host_outputs(topi_dir, topi, inputs, tmp_path / "build-topi"))
    expected = testing.ort_reference(onnx_path, micro, inputs)
    assert np.abs(got - expected).max() <= 1  # float32 .5 ties only (docs/spec.md)

    # the SMLAD path (Cortex-M7 and M4 define __ARM_FEATURE_DSP) computes what the portable one does
    rows = inputs.reshape(len(inputs), *micro["input"]["shape"][1:])
    for machine in ("mps2-an500", "mps2-an386"):
        run = run_on_qemu(micro_dir, rows, tmp_path / machine, machine=machine)
        assert np.array_equal(run.outputs.reshape(got.shape), got), machine
    # and a core without the DSP extension builds the portable path warning-free
    subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m3", "-mthumb", "-std=c99", "-Wall", "-Wextra", "-Werror",
                    "-O2", "-I", str(micro_dir / "include"), "-c", str(micro_dir / "src" / "distillc_kernels.c"),
                    "-o", str(tmp_path / "m3.o")], check=True)


def dense_conv_net(folder, *, in_channels: int, size: int, strides, activation: str):
    """A QDQ model from onnxruntime's ``quantize_static`` (asymmetric activations: every conv's
    input has a zero point, ``activation`` is QUInt8 or QInt8): a 3x3 stem (``in_channels`` -> 5,
    padding 1, stride ``strides[0]``), a 3x3 conv 5 -> 6 (padding 1, stride ``strides[1]``), a 2x2
    conv 6 -> 3 (no padding), ReLU, global pool, linear 3 -> 4.  QInt8 is calibrated on images in
    [0, 1) (input zero point -128), QUInt8 on a normal distribution (zero point near 128)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from torch import nn

    torch.manual_seed(size)
    net = nn.Sequential(nn.Conv2d(in_channels, 5, 3, stride=strides[0], padding=1),
                        nn.Conv2d(5, 6, 3, stride=strides[1], padding=1), nn.Conv2d(6, 3, 2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval()
    x = torch.rand(16, in_channels, size, size) if activation == "QInt8" else torch.randn(16, in_channels, size, size)
    torch.onnx.export(net, x[:1], str(folder / "float.onnx"), input_names=["x"], dynamo=False, opset_version=13)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x[i:i + 1].numpy()} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(folder / "float.onnx"), str(folder / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8, per_channel=True)
    return folder / "qdq.onnx"


# (input channels, size, (stem stride, second conv's stride), activations): odd output maps
# (9 -> 5 -> 5 -> 4, 7 -> 7 -> 4 -> 3), 1- and 3-channel images, uint8 and int8 inputs
DENSE_CASES = [(3, 9, (2, 1), "QUInt8"), (1, 7, (1, 2), "QInt8")]


@pytest.mark.parametrize("in_channels,size,strides,activation", DENSE_CASES)
def test_dense_convolutions_use_the_micro_kernel_through_an_im2col_and_keep_their_outputs(
        in_channels, size, strides, activation, tmp_path, monkeypatch):
    onnx_path = dense_conv_net(tmp_path, in_channels=in_channels, size=size, strides=strides, activation=activation)
    (micro, micro_dir), (topi, topi_dir) = compile_both_ways(onnx_path, tmp_path, monkeypatch)

    # every conv copies each pixel pair's windows (the zero point where a tap is padding) into a
    # local array and calls the micro-kernel on it: 2 bytes between the window's values
    convs = [layer for layer in micro["layers"] if layer["op"] == "conv2d"]
    assert len(convs) == 3 and all(layer["weights"]["layout"] == microkernels.LAYOUT for layer in convs)
    source = (micro_dir / "src" / "distillc_kernels.c").read_text()
    stem = re.search(rf"void {convs[0]['kernel']}\(.*?\n}}\n", source, re.S).group(0)
    dtype = "u8" if activation == "QUInt8" else "s8"
    window = in_channels * 9
    assert re.search(rf"int8_t col_ptr\[{2 * window}\];", stem)
    assert re.search(rf"distillc_mk_4x2_{dtype}\(.*\(&\(col_ptr\[0\]\)\), {window}, 2, ", stem)
    zero_point = micro["input"]["zero_point"] + (128 if dtype == "u8" else 0)  # what the stem reads
    assert zero_point != 0 and set(re.findall(r"condval\w* = \(u?int8_t\)(-?\d+);", stem)) == {str(zero_point)}
    assert "col_ptr" not in (topi_dir / "src" / "distillc_kernels.c").read_text()

    inputs = testing.quantized_inputs(micro, 8, seed=size)
    got = host_outputs(micro_dir, micro, inputs, tmp_path / "build-micro")
    assert np.array_equal(got, host_outputs(topi_dir, topi, inputs, tmp_path / "build-topi"))
    assert np.abs(got - testing.ort_reference(onnx_path, micro, inputs)).max() <= 1  # float32 .5 ties only

    rows = inputs.reshape(len(inputs), *micro["input"]["shape"][1:])
    for machine in ("mps2-an500", "mps2-an386"):  # the SMLAD path (__ARM_FEATURE_DSP)
        run = run_on_qemu(micro_dir, rows, tmp_path / machine, machine=machine)
        raw = run.outputs.reshape(got.shape).astype(np.int64)
        assert np.array_equal(raw - micro["output"]["zero_point"], got), machine


def test_the_micro_kernel_bundle_is_byte_reproducible(tmp_path):
    onnx_path = pointwise_net(tmp_path / "pw.onnx", in_channels=3, size=5)
    first = compile_onnx_to_bundle(onnx_path, tmp_path / "a", name="pw")
    second = compile_onnx_to_bundle(onnx_path, tmp_path / "b", name="pw")
    assert first == second
    for rel in first["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
