"""Sub-8-bit weights (passes/backend/packing.py): a layer whose weights fit 4 or 2 signed bits keeps
them packed two or four per byte in flash, one byte-aligned row per output channel, low bits first,
and its kernel unpacks them where it reads them.  The bundle computes exactly what the unpacked
bundle computes, kernel by kernel what onnxruntime computes, and its manifest says per layer how
the weights are stored."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import (compile_onnx_to_bundle, export_qcdq, packing, qdq_to_int8,  # noqa: E402
                                     quantize, testing)
from distillc.passes.verify.layercheck import compare_kernels  # noqa: E402
from distillc.targets.runner import trace_on_host  # noqa: E402


def test_rows_are_packed_low_bits_first_and_each_starts_on_a_byte():
    assert packing.pack_rows(np.array([[1, -2, 3]]), 4).tolist() == [[0xE1, 0x03]]
    assert packing.pack_rows(np.array([[1, -2, -1, 0, 1]]), 2).tolist() == [[0b00111001, 0b01]]
    assert packing.pack_rows(np.array([[-8, 7], [7, -8]]), 4).tolist() == [[0x78], [0x87]]
    rng = np.random.default_rng(0)
    for bits in (2, 4):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        for length in (1, 2, 3, 5, 9, 27, 64):  # odd rows end mid-byte: the rest of the byte is 0
            rows = rng.integers(lo, hi + 1, size=(6, length))
            packed = packing.pack_rows(rows, bits)
            assert packed.dtype == np.uint8 and packed.shape == (6, math.ceil(length * bits / 8))
            assert np.array_equal(packing.unpack_rows(packed, bits, length), rows)
            assert np.all(packed[:, -1] >> ((length * bits) % 8 or 8) == 0)


def test_the_storage_width_is_the_narrowest_that_holds_every_weight():
    assert packing.storage_bits(np.array([-2, 1, 0])) == 2
    assert packing.storage_bits(np.array([-1, 1])) == 2  # Brevitas' narrow 2-bit range
    assert packing.storage_bits(np.array([-3, 3])) == 4  # 3-bit weights take 4
    assert packing.storage_bits(np.array([-8, 7])) == 4
    assert packing.storage_bits(np.array([-7, 8])) == 8
    assert packing.storage_bits(np.array([-128, 127])) == 8
    assert packing.storage_bits(np.array([-129, 5])) == 16


def odd_net(path, *, in_channels: int, size: int, weight_bits: int, seed: int = 0):
    """QCDQ model with every packed kernel shape: a 3x3 stride-2 padded stem (``in_channels`` -> 5),
    1x1 convs whose input channels are odd (5, 7: a bit offset per channel at run time) or a
    multiple of 4 (8: a byte per step; 8 -> 8 with 4-channel blocking, 8 -> 7 without), depthwise 3x3 convs with stride 1 and 2, an unpadded 3x3
    conv, global average pooling and two linear layers (7 and 12 inputs); odd maps."""
    from torch import nn

    torch.manual_seed(seed)

    def block(conv, act=nn.ReLU):
        return [conv, nn.BatchNorm2d(conv.out_channels), act()]

    body = (block(nn.Conv2d(in_channels, 5, 3, stride=2, padding=1))
            + block(nn.Conv2d(5, 8, 1)) + block(nn.Conv2d(8, 8, 1)) + block(nn.Conv2d(8, 7, 1), nn.ReLU6)
            + block(nn.Conv2d(7, 7, 3, padding=1, groups=7)) + block(nn.Conv2d(7, 7, 3, stride=2, padding=1, groups=7))
            + block(nn.Conv2d(7, 6, 3)))
    model = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    model = testing.randomize_batchnorm(model)
    calib = torch.randn(32, in_channels, size, size)
    return export_qcdq(quantize(model, calib, weight_bits=weight_bits), calib[:1], path)


def compile_both_ways(onnx_path, tmp_path, monkeypatch) -> tuple:
    """(manifest, bundle) with packed weights and without (every weight in a byte)."""
    out = []
    for pack in (True, False):
        monkeypatch.setattr(qdq_to_int8, "PACK_WEIGHTS", pack)
        bundle = tmp_path / ("packed" if pack else "bytes")
        out.append((compile_onnx_to_bundle(onnx_path, bundle, name="packed"), bundle))
    return out


def host_outputs(bundle, manifest, inputs, work):
    exe = testing.build_host_driver(bundle, work)  # -std=c99 -Wall -Wextra -Werror
    return testing.bundle_outputs(exe, manifest, inputs, work)


def check_weights_entries(manifest, bits: int) -> None:
    """Every conv and dense layer says how its weights are stored, and the bytes add up."""
    weighted = [layer for layer in manifest["layers"] if layer["op"] in ("conv2d", "depthwise_conv2d", "dense")]
    assert weighted and all(layer["weights"] for layer in weighted)
    for layer in weighted:
        entry = layer["weights"]
        assert entry["bits"] == bits
        rows = layer["output_shape"][1] if layer["op"] != "dense" else layer["output_shape"][-1]
        assert entry["values"] % rows == 0
        if entry.get("layout") == "4x2-pairs":  # 8-bit 1x1/dense on the micro-kernel: padded blocks
            assert bits == 8
            assert entry["bytes"] == math.ceil(rows / 4) * 4 * math.ceil(entry["values"] // rows / 2) * 2
        else:
            assert entry["bytes"] == rows * math.ceil(entry["values"] // rows * bits / 8)
        assert layer["weight_bytes"] > entry["bytes"]  # plus biases and multipliers
    assert all(layer["weights"] is None for layer in manifest["layers"] if layer not in weighted)


# (weight bits, input channels, size): 2 and 4 bits packed, odd and even maps, 1- and 3-channel inputs
ODD_CASES = [(4, 3, 9), (2, 1, 10)]


@pytest.mark.parametrize("bits,in_channels,size", ODD_CASES)
def test_packed_kernels_compute_what_the_unpacked_ones_do_and_match_onnxruntime(bits, in_channels, size,
                                                                              tmp_path, monkeypatch):
    onnx_path = odd_net(tmp_path / "odd.onnx", in_channels=in_channels, size=size, weight_bits=bits)
    (packed, packed_dir), (plain, plain_dir) = compile_both_ways(onnx_path, tmp_path, monkeypatch)
    check_weights_entries(packed, bits)
    check_weights_entries(plain, 8)
    assert plain["memory"]["weights_bytes"] - packed["memory"]["weights_bytes"] == sum(
        b["weights"]["bytes"] - a["weights"]["bytes"] for a, b in zip(packed["layers"], plain["layers"]) if a["weights"])

    inputs = testing.quantized_inputs(packed, 12, seed=bits)
    got = host_outputs(packed_dir, packed, inputs, tmp_path / "build-packed")
    assert np.array_equal(got, host_outputs(plain_dir, plain, inputs, tmp_path / "build-bytes"))
    assert np.abs(got - testing.ort_reference(onnx_path, packed, inputs)).max() <= 1

    traces = trace_on_host(packed_dir, inputs[:4], tmp_path / "trace")
    report = compare_kernels(onnx_path, packed, inputs[:4], traces)
    assert report.ok, (report.errors, report.unchecked)
    assert sorted(report.checked) == list(range(len(packed["layers"])))
    testing.compile_for_cortex_m7(packed_dir, tmp_path / "m7")  # arm-none-eabi-gcc -Werror


def test_kernels_read_whole_bytes_or_unpack_a_channels_weights_once(tmp_path, monkeypatch):
    """The TOPI kernels' unpacking (the depthwise row micro-kernel, which takes packed weights its own
    way, is tested in test_int8_depthwise_kernel.py; forced off here)."""
    import re

    monkeypatch.setattr(qdq_to_int8, "DEPTHWISE_KERNELS", False)
    onnx_path = odd_net(tmp_path / "odd.onnx", in_channels=3, size=9, weight_bits=4)
    layers = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name="packed")["layers"]
    source = (tmp_path / "bundle" / "src" / "distillc_kernels.c").read_text()
    kernels = dict(re.findall(r"void (distillc_k\d+_\w+)\((.*?\n)}\n", source, re.S))
    depthwise = [text for name, text in kernels.items() if "depthwise" in name]
    assert len(depthwise) == 2
    for text in depthwise:
        head, spatial = text.split("for (int32_t yy", 1)
        assert "unpack_weights_4bit_ptr[9]" in head and ">> 28" in head  # 9 sign-extended nibbles
        assert "w1[" not in spatial  # never read again per pixel
    # the blocked 1x1 conv 8 -> 8 steps whole bytes (four nibbles) at a time: constant shifts only
    stem, odd, blocked = (kernels[layer["kernel"]] for layer in layers[:3])
    assert [layer["input_shape"][1] for layer in layers[:3]] == [3, 5, 8]
    assert "intermediate_ptr[4]" in blocked and "unpack_weights" not in blocked
    assert "<< (uint32_t)28" in blocked and "<< (uint32_t)24" in blocked and "& 1)" not in blocked
    # the stem (27 values per channel) and the 1x1 conv over 5 input channels (4 channels blocked)
    # cannot: they unpack a channel's (a block's) weights into locals before the spatial loops
    for kernel, count in ((stem, 27), (odd, 20)):
        head, spatial = kernel.split("for (int32_t yy", 1)
        assert f"unpack_weights_4bit_ptr[{count}];" in head and "w1[" in head
        assert "w1[" not in spatial


#: (seed, weight bits): random nets (residual adds, strides 1 and 2, max/avg pools, padding)
RANDOM_CASES = [(0, 4), (4, 2)]


@pytest.mark.parametrize("seed,bits", RANDOM_CASES)
def test_random_nets_store_weights_at_their_width_and_match_onnxruntime(seed, bits, tmp_path):
    onnx_path, manifest = testing.random_bundle(seed, tmp_path, weight_bits=bits, act_bits=8)
    check_weights_entries(manifest, bits)
    inputs = testing.quantized_inputs(manifest, 8, seed=seed)
    got = host_outputs(tmp_path / "bundle", manifest, inputs, tmp_path / "build")
    assert np.abs(got - testing.ort_reference(onnx_path, manifest, inputs)).max() <= 1
    report = compare_kernels(onnx_path, manifest, inputs[:3], trace_on_host(tmp_path / "bundle", inputs[:3],
                                                                            tmp_path / "trace"))
    assert report.ok, (report.errors, report.unchecked)
    # the same model gives the same bytes again
    compile_onnx_to_bundle(onnx_path, tmp_path / "again", name=f"random{seed}")
    for path in sorted((tmp_path / "bundle").rglob("*.[ch]")):
        assert path.read_bytes() == (tmp_path / "again" / path.relative_to(tmp_path / "bundle")).read_bytes()


def low_bit_spec(bits: int) -> str:
    """A tiny spec whose float student (untrained: the figures here do not depend on training) the
    stm32h7 target quantizes itself with quantize.brevitas-qat at ``weight_bits = bits``, then
    verifies on the host and on QEMU."""
    from tests.conftest import TINY_HEADER

    return (TINY_HEADER.format(name=f"w{bits}") + '[student]\narch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32\n'
            '[target]\nuse = "stm32h7"\n'
            f'backend = {{ "quantize.brevitas-qat" = {{ weight_bits = {bits}, calib_images = 32, gate = "off" }}, '
            '"verify.host" = { images = 4, sqnr_images = 0 }, "verify.qemu" = { images = 2, layers = false } }\n')


@pytest.mark.parametrize("bits", [4, 2])
def test_a_low_bit_qat_student_compiles_to_a_packed_bundle_verified_on_host_and_qemu(bits, module_folder):
    """quantize.brevitas-qat's ``weight_bits`` through the whole compile (stm32h7: verify.host and
    verify.qemu, both kernel by kernel where an output differs): every layer's weights are stored
    at that width and the model's flash shrinks with it."""
    import json

    from distillc.progress import SilentProgress
    from distillc.run import compile_spec

    path = module_folder / f"w{bits}.toml"
    path.write_text(low_bit_spec(bits))
    result = compile_spec(path, progress=SilentProgress())
    assert "quantize.brevitas-qat" in result.ran and result.ran[-2:] == ["verify.host", "verify.qemu"]
    manifest = json.loads((result.final_path / "manifest.json").read_text())
    assert manifest["verification"]["host"]["max_lsb"] <= 1
    assert manifest["verification"]["qemu"]["max_lsb"] <= 1
    check_weights_entries(manifest, bits)
    values = sum(layer["weights"]["values"] for layer in manifest["layers"] if layer["weights"])
    stored = sum(layer["weights"]["bytes"] for layer in manifest["layers"] if layer["weights"])
    assert stored < values * bits / 8 * 1.15  # row padding only
    header = (result.final_path / "include" / "distillc_model.h").read_text()
    assert f"#define DISTILLC_WEIGHTS_BYTES {manifest['memory']['weights_bytes']}" in header
