"""Depthwise 3x3 convolutions run on the row micro-kernel (``depthwise.py``): each channel's weights
read once into 6 values, a window row outside the map zero-weighted, pixel pairs inside the row
read with word loads and no bounds test, the edge pairs and an odd row's last pixel tested per
byte.  SXTB16/UXTB16 + SMLAD where ``__ARM_FEATURE_DSP`` is defined (QEMU's Cortex-M7 and M4),
the same operations in plain C elsewhere (the host).  Every path gives the bundle outputs of the
TOPI kernels (``qdq_to_int8.DEPTHWISE_KERNELS = False``) and onnxruntime's: channel counts that
are not multiples of 4, odd maps, maps of 1x1 and 2x2 (smaller than the window), padding 0 and 1,
strides 1 and 2, int8 (the image) and uint8 inputs, 8-, 4- and 2-bit weights."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import (compile_onnx_to_bundle, depthwise, export_qcdq, qdq_to_int8,  # noqa: E402
                                     quantize, testing)
from distillc.targets.runner import run_on_qemu  # noqa: E402


def depthwise_net(path, *, size: int, layers, channels: int, weight_bits: int = 8, seed: int = 0):
    """QCDQ model: a depthwise 3x3 conv on the int8 image (``channels`` channels), then a 1x1 conv,
    ReLU and a depthwise 3x3 conv + BN + ReLU6 per ``(stride, padding)`` in ``layers`` (uint8
    inputs), global average pool, linear."""
    from torch import nn

    torch.manual_seed(seed)
    body = [nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
    for stride, padding in layers:
        body += [nn.Conv2d(channels, channels, 3, stride=stride, padding=padding, groups=channels),
                 nn.BatchNorm2d(channels), nn.ReLU6()]
    model = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))
    model = testing.randomize_batchnorm(model)
    calib = torch.randn(32, channels, size, size)
    return export_qcdq(quantize(model, calib, weight_bits=weight_bits), calib[:1], path)


def depthwise_kernels(bundle) -> list[str]:
    source = (bundle / "src" / "distillc_kernels.c").read_text()
    return re.findall(r"void distillc_k\d+_depthwise_conv2d\(.*?\n}\n", source, re.S)


# (size, channels, weight bits, [(stride, padding) per depthwise layer after the first]):
# 9 -> 9 -> 5 -> 3 -> 2 -> 1 -> 1 (odd rows, no padding, 2x2 and 1x1 maps); 2 -> 1 -> 1 (stride 2
# on a 2x2 map); 7 -> 4 -> 4 with packed 4- and 2-bit weights
CASES = [(9, 5, 8, [(1, 1), (2, 1), (1, 0), (2, 1), (2, 1), (1, 1)]),
         (2, 7, 8, [(2, 1), (1, 1)]),
         (7, 6, 4, [(2, 1), (1, 1)]),
         (7, 3, 2, [(1, 1), (2, 0)])]


@pytest.mark.parametrize("size,channels,bits,layers", CASES)
def test_depthwise_layers_use_the_row_micro_kernel_and_keep_their_outputs(size, channels, bits, layers, tmp_path,
                                                                          monkeypatch):
    onnx_path = depthwise_net(tmp_path / "dw.onnx", size=size, layers=layers, channels=channels, weight_bits=bits)
    bundles, outputs = {}, {}
    for micro in (True, False):
        monkeypatch.setattr(qdq_to_int8, "DEPTHWISE_KERNELS", micro)
        folder = tmp_path / ("micro" if micro else "topi")
        manifest = compile_onnx_to_bundle(onnx_path, folder / "bundle", name="dw")
        inputs = testing.quantized_inputs(manifest, 8, seed=size)
        exe = testing.build_host_driver(folder / "bundle", folder / "build")  # -Wall -Wextra -Werror
        outputs[micro] = testing.bundle_outputs(exe, manifest, inputs, folder)
        bundles[micro] = (manifest, folder / "bundle")
    manifest, bundle = bundles[True]

    # every depthwise layer calls the micro-kernel: the weights once per channel, the rows with no
    # per-tap bounds test in the generated kernel; the weights are stored as before
    layers_dw = [layer for layer in manifest["layers"] if layer["op"] == "depthwise_conv2d"]
    assert len(layers_dw) == len(layers) + 1
    assert [layer["weights"] for layer in layers_dw] == [
        layer["weights"] for layer in bundles[False][0]["layers"] if layer["op"] == "depthwise_conv2d"]
    assert {layer["weights"]["bits"] for layer in layers_dw[1:]} == {bits}
    kernels = depthwise_kernels(bundle)
    assert len(kernels) == len({layer["kernel"] for layer in layers_dw})
    for kernel in kernels:
        assert re.search(r"distillc_dw3x3_weights_\dbit\(", kernel) and re.search(r"distillc_dw3x3_s[12]_[su]8\(", kernel)
        assert "condval" not in kernel and " if (" not in kernel
    source = (bundle / "src" / "distillc_kernels.c").read_text()
    assert "distillc_dw3x3_s1_s8(" in source and "distillc_dw3x3_s1_u8(" in source  # int8 image, uint8 after ReLU
    assert "distillc_dw3x3" not in (bundles[False][1] / "src" / "distillc_kernels.c").read_text()

    got = outputs[True]
    assert np.array_equal(got, outputs[False])
    inputs = testing.quantized_inputs(manifest, 8, seed=size)
    expected = testing.ort_reference(onnx_path, manifest, inputs)
    assert np.abs(got - expected).max() <= 1  # float32 .5 ties only (docs/spec.md)

    # the DSP path (Cortex-M7 and M4 define __ARM_FEATURE_DSP) computes what the portable one does
    rows = inputs.reshape(len(inputs), *manifest["input"]["shape"][1:])
    for machine in ("mps2-an500", "mps2-an386"):
        run = run_on_qemu(bundle, rows, tmp_path / machine, machine=machine)
        assert np.array_equal(run.outputs.reshape(got.shape), got), machine
    subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m3", "-mthumb", "-std=c99", "-Wall", "-Wextra", "-Werror",
                    "-O2", "-I", str(bundle / "include"), "-c", str(bundle / "src" / "distillc_kernels.c"),
                    "-o", str(tmp_path / "m3.o")], check=True)


def test_the_row_kernels_equal_a_direct_convolution_on_every_geometry(tmp_path):
    """The C micro-kernels alone (host, portable path), against NumPy: maps of 1x1 to 13x11,
    strides 1 and 2, symmetric and one-sided paddings of 0 to 2, int8 and uint8 inputs, 8-, 4- and
    2-bit weights."""
    from distillc.passes.backend import microkernels, packing

    rng = np.random.default_rng(0)
    names = " ".join(f"{n}(" for n in [*depthwise.ROW_KERNELS.values(), *depthwise.WEIGHT_KERNELS.values()])
    src = ["#include <stdint.h>\n#include <stdio.h>\n", microkernels._PRELUDE_C, depthwise.depthwise_kernels_c(names)]
    body, count = ["int main(void)\n{\n    int bad = 0;"], 0
    for h, w in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 7), (7, 5), (8, 8), (2, 5), (1, 6), (6, 1), (13, 11)]:
        for stride in (1, 2):
            for pt, pl, pb, pr in [(1, 1, 1, 1), (0, 0, 0, 0), (0, 0, 1, 1), (1, 1, 0, 0), (2, 2, 2, 2), (0, 1, 2, 0)]:
                ho, wo = (h + pt + pb - 3) // stride + 1, (w + pl + pr - 3) // stride + 1
                if ho <= 0 or wo <= 0:
                    continue
                dtype, bits = ("int8", "uint8")[count % 2], (8, 4, 2)[count % 3]
                lim = {8: 127, 4: 7, 2: 1}[bits]
                wt = rng.integers(-lim - (bits < 8), lim + 1, size=9)
                x = rng.integers(-128, 128, size=(h, w)) if dtype == "int8" else rng.integers(0, 256, size=(h, w))
                xp = np.zeros((h + pt + pb + 4, w + pl + pr + 4), np.int64)
                xp[pt:pt + h, pl:pl + w] = x
                ref = [int((xp[yy * stride:yy * stride + 3, xx * stride:xx * stride + 3] * wt.reshape(3, 3)).sum())
                       for yy in range(ho) for xx in range(wo)]
                stored = wt.astype(np.int8) if bits == 8 else packing.pack_rows(wt.reshape(1, 9), bits)[0]
                k = count
                src.append(f"static const {dtype}_t x{k}[{h * w}] = {{{', '.join(map(str, x.ravel()))}}};\n"
                           f"static const {'int8_t' if bits == 8 else 'uint8_t'} w{k}[{stored.size}] = "
                           f"{{{', '.join(map(str, stored.ravel()))}}};\n"
                           f"static const int32_t r{k}[{ho * wo}] = {{{', '.join(map(str, ref))}}};\n")
                body.append(
                    f"    {{\n        int32_t v[6], acc[{wo}], y, i;\n"
                    f"        {depthwise.WEIGHT_KERNELS[bits]}(v, v + 1, v + 2, v + 3, v + 4, v + 5, w{k});\n"
                    f"        for (y = 0; y < {ho}; ++y) {{\n"
                    f"            {depthwise.ROW_KERNELS[(stride, dtype)]}(acc, x{k}, v[0], v[1], v[2], v[3], v[4], v[5], "
                    f"{h}, {w}, {wo}, y, {pt}, {pl});\n"
                    f"            for (i = 0; i < {wo}; ++i) {{\n"
                    f"                if (acc[i] != r{k}[y * {wo} + i]) {{\n"
                    f"                    printf(\"case {k} y %d x %d\\n\", (int)y, (int)i);\n"
                    f"                    ++bad;\n                }}\n            }}\n        }}\n    }}")
                count += 1
    body.append('    printf("%d bad\\n", bad);\n    return bad != 0;\n}\n')
    (tmp_path / "t.c").write_text("".join(src) + "\n".join(body))
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", str(tmp_path / "t.c"), "-o",
                    str(tmp_path / "t")], check=True)
    run = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True)
    assert count > 100 and run.returncode == 0, run.stdout[-2000:]


def test_random_nets_give_the_outputs_of_the_topi_depthwise_kernels(tmp_path, monkeypatch):
    """Seeds 0 and 4 of the random nets draw depthwise layers (with a residual net around them)."""
    for seed in (0, 4):
        onnx_path = testing.random_qcdq(seed, tmp_path / f"r{seed}.onnx")
        outputs = {}
        for micro in (True, False):
            monkeypatch.setattr(qdq_to_int8, "DEPTHWISE_KERNELS", micro)
            folder = tmp_path / f"r{seed}-{micro}"
            manifest = compile_onnx_to_bundle(onnx_path, folder / "bundle", name="dw")
            kernels = depthwise_kernels(folder / "bundle")
            assert kernels and all(("distillc_dw3x3_s" in k) == micro for k in kernels)
            exe = testing.build_host_driver(folder / "bundle", folder / "build")
            outputs[micro] = testing.bundle_outputs(exe, manifest, testing.quantized_inputs(manifest, 8, seed=seed),
                                                    folder)
        assert np.array_equal(outputs[True], outputs[False]), seed


def test_the_depthwise_bundle_is_byte_reproducible(tmp_path):
    onnx_path = depthwise_net(tmp_path / "dw.onnx", size=5, layers=[(2, 1)], channels=3)
    first = compile_onnx_to_bundle(onnx_path, tmp_path / "a", name="dw")
    second = compile_onnx_to_bundle(onnx_path, tmp_path / "b", name="dw")
    assert first == second
    assert "distillc_dw3x3_s2_u8(" in (tmp_path / "a" / "src" / "distillc_kernels.c").read_text()
    for rel in first["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
