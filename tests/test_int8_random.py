"""Randomised backend tests: seeded small conv nets through Brevitas -> ONNX -> int8 C."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import testing  # noqa: E402


# (seed, weight_bits, act_bits): mostly 8-bit, plus narrow-range cases (Clip between Q and DQ)
CASES = [(0, 8, 8), (1, 8, 8), (2, 8, 8), (3, 8, 8), (4, 8, 8), (5, 8, 8), (6, 6, 6), (7, 4, 5)]


@pytest.mark.parametrize("seed,weight_bits,act_bits", CASES)
def test_random_convnet_matches_onnxruntime_within_one_lsb(seed, weight_bits, act_bits, tmp_path):
    onnx_path, manifest = testing.random_bundle(seed, tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")
    q_inputs = testing.quantized_inputs(manifest, 16, seed=seed)
    expected = testing.ort_reference(onnx_path, manifest, q_inputs)
    got = testing.bundle_outputs(exe, manifest, q_inputs, tmp_path)

    assert np.abs(got - expected).max() <= 1
    memory = manifest["memory"]
    assert memory["arena_bytes"] >= memory["arena_floor_bytes"]
    assert not memory["arena_above_floor"]


def test_random_convnets_cover_the_lowered_ops():
    kinds = set()
    for seed, _, _ in CASES:
        model, _ = testing.random_convnet(seed)
        for module in model.modules():
            name = type(module).__name__
            if name == "Conv2d":
                kinds.add(("conv", module.kernel_size[0], module.stride[0], module.groups > 1))
            else:
                kinds.add(name)
    convs = {k for k in kinds if isinstance(k, tuple)}
    assert {k[1] for k in convs} == {1, 3}
    assert {k[2] for k in convs} == {1, 2}
    assert any(k[3] for k in convs)
    assert {"AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear", "ReLU6"} <= kinds
    pools = {(m.kernel_size, m.stride) for seed, _, _ in CASES for m in testing.random_convnet(seed)[0].modules()
             if type(m).__name__ == "MaxPool2d"}
    assert pools == {(2, 2), (3, 1)}
    assert any(getattr(block, "residual", False) for seed, _, _ in CASES
               for block in testing.random_convnet(seed)[0].modules())
