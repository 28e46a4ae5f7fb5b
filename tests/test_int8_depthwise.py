"""TOPI's depthwise kernels (the ones a depthwise layer gets when the row micro-kernel of
tests/test_int8_depthwise_kernel.py does not apply: another window, a nonzero input zero point;
forced here with ``qdq_to_int8.DEPTHWISE_KERNELS = False``) load each channel's window weights
once, outside the spatial loops (``lowering.DEPTHWISE_WEIGHTS_LOCAL``), and give the same bundle
outputs as the previous kernels (weights reloaded per pixel) and onnxruntime: strides 1 and 2,
with and without padding, odd and even maps, maps of 2x2 and 3x3 where no tap window lies inside
the map."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import compile_onnx_to_bundle, export_qcdq, lowering, qdq_to_int8, quantize, testing  # noqa: E402,E501


def depthwise_net(path, *, size: int, layers, channels: int = 5, seed: int = 0):
    """QCDQ model: 1x1 conv (3 -> ``channels``), then a depthwise 3x3 conv + BN + ReLU per
    ``(stride, padding)`` in ``layers`` (channel multiplier 1), global average pool, linear."""
    from torch import nn

    torch.manual_seed(seed)
    body = [nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
    for stride, padding in layers:
        body += [nn.Conv2d(channels, channels, 3, stride=stride, padding=padding, groups=channels),
                 nn.BatchNorm2d(channels), nn.ReLU6()]
    model = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))
    model = testing.randomize_batchnorm(model)
    calib = torch.randn(32, 3, size, size)
    return export_qcdq(quantize(model, calib), calib[:1], path)


def outputs_both_ways(onnx_path, tmp_path, monkeypatch, count: int = 8):
    """Bundle outputs with per-channel weight locals and with the previous kernels."""
    results, bundles = {}, {}
    monkeypatch.setattr(qdq_to_int8, "DEPTHWISE_KERNELS", False)
    for local in (True, False):
        monkeypatch.setattr(lowering, "DEPTHWISE_WEIGHTS_LOCAL", local)
        folder = tmp_path / ("local" if local else "old")
        manifest = compile_onnx_to_bundle(onnx_path, folder / "bundle", name="dw")
        exe = testing.build_host_driver(folder / "bundle", folder / "build")  # -Wall -Wextra -Werror
        results[local] = testing.bundle_outputs(exe, manifest, testing.quantized_inputs(manifest, count, seed=5),
                                                folder)
        bundles[local] = folder / "bundle"
    return results[True], results[False], manifest, bundles


def depthwise_kernels(bundle) -> list[str]:
    source = (bundle / "src" / "distillc_kernels.c").read_text()
    return re.findall(r"void distillc_k\d+_depthwise_conv2d\(.*?\n}\n", source, re.S)


# (input size, [(stride, padding) per depthwise layer]): 9 -> 9 -> 5 -> 3 -> 2 -> 2 (odd, even,
# unpadded, 3x3 with one interior pixel, 2x2 with none); 3 -> 2 -> 2 (stride 2 on a 3x3 map)
CASES = [(9, [(1, 1), (2, 1), (1, 0), (2, 1), (1, 1)]), (3, [(2, 1), (1, 1)])]


@pytest.mark.parametrize("size,layers", CASES)
def test_depthwise_kernels_keep_weights_per_channel_and_outputs(size, layers, tmp_path, monkeypatch):
    onnx_path = depthwise_net(tmp_path / "dw.onnx", size=size, layers=layers)
    new, old, manifest, bundles = outputs_both_ways(onnx_path, tmp_path, monkeypatch)
    assert np.array_equal(new, old)
    expected = testing.ort_reference(onnx_path, manifest, testing.quantized_inputs(manifest, 8, seed=5))
    assert np.abs(new - expected).max() <= 1  # float32 .5 ties only (docs/spec.md)

    kernels = depthwise_kernels(bundles[True])
    assert kernels and len(depthwise_kernels(bundles[False])) == len(kernels)
    for kernel in kernels:
        weights = re.search(r"int8_t\* (w\d+)", kernel).group(1)
        head, spatial = kernel.split("for (int32_t yy", 1)
        assert f"{weights}[" in head  # the channel's 9 weights are copied before the spatial loops
        assert f"{weights}[" not in spatial  # and never reloaded per pixel
    for kernel in depthwise_kernels(bundles[False]):  # the previous form reloads them per pixel
        weights = re.search(r"int8_t\* (w\d+)", kernel).group(1)
        assert f"{weights}[" in kernel.split("for (int32_t yy", 1)[1]
    testing.compile_for_cortex_m7(bundles[True], tmp_path / "m7")


def test_random_nets_with_depthwise_layers_are_unchanged(tmp_path, monkeypatch):
    """Seeds 0 and 4 draw depthwise layers (with a residual net around them)."""
    for seed in (0, 4):
        (tmp_path / f"r{seed}").mkdir()
        onnx_path = testing.random_qcdq(seed, tmp_path / f"r{seed}" / "model.onnx")
        new, old, _, bundles = outputs_both_ways(onnx_path, tmp_path / f"r{seed}", monkeypatch)
        assert depthwise_kernels(bundles[True])
        assert np.array_equal(new, old)
