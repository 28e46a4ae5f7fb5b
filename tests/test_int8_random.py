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


#: (seed, channels, size): ONNX students whose input is not the default data's 3x32x32
ONNX_STUDENTS = [(0, 1, 24), (1, 1, 8), (2, 3, 20)]


@pytest.mark.parametrize("seed,channels,size", ONNX_STUDENTS)
def test_an_onnx_student_with_no_data_is_verified_on_random_inputs_of_its_own_shape(seed, channels, size, tmp_path):
    """A QCDQ model given as ``[student] onnx`` with no [data]: the example and verification inputs
    follow the model's input (seeded random int8 values), whatever its channels and size."""
    import json

    from distillc.run import compile_spec
    from distillc.progress import SilentProgress

    testing.random_qcdq(seed, tmp_path / "student.onnx", in_channels=channels, size=size)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[distillc]\nspec_version = 1\nname = "onnx-{channels}x{size}"\nseed = {seed}\n'
                    '[student]\nonnx = "student.onnx"\n[target]\nuse = "host"\n'
                    '[target.backend."verify.host"]\nimages = 4\n')
    result = compile_spec(spec, progress=SilentProgress())
    assert result.ran == ["student", "tvm.int8", "plan-memory", "codegen.c", "verify.host"]
    bundle = result.final_path
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [1, channels, size, size]
    host = manifest["verification"]["host"]
    assert host["images"] == 4 and host["max_lsb"] <= 1
    header = (bundle / "include" / "distillc_model.h").read_text()
    assert f"#define DISTILLC_INPUT_SIZE {channels * size * size}" in header


def test_data_that_does_not_fit_an_onnx_student_is_a_plan_error(tmp_path):
    """Given [data], its images are the model's inputs: images the model cannot take are refused
    before anything runs, naming the keys to change."""
    from distillc.errors import SpecError
    from distillc.plan import build_plan
    from distillc.plugin_manager import load_plugins
    from distillc.spec import load_spec

    testing.random_qcdq(0, tmp_path / "student.onnx", in_channels=1, size=24)
    spec = tmp_path / "spec.toml"
    spec.write_text('[distillc]\nspec_version = 1\nname = "misfit"\n[data]\nsource = "sklearn-digits"\n'
                    '[student]\nonnx = "student.onnx"\n')
    plugins = load_plugins()
    with pytest.raises(SpecError, match=r"student\.onnx: student\.onnx takes 1x24x24 inputs, but \[data\] gives "
                                        r"3x32x32 images \(data\.channels = 3, data\.image_size = 32\): set "
                                        r"data\.channels = 1 and data\.image_size = 24"):
        build_plan(load_spec(spec, plugins), plugins)
    spec.write_text(spec.read_text().replace('source = "sklearn-digits"', 'channels = 1\nimage_size = 24'))
    plan = build_plan(load_spec(spec, plugins), plugins)
    assert plan.step("verify.host", option="plan").pass_.config.inputs == "data"
