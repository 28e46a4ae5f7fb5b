"""The max78000 target checks the student against the CNN accelerator's limits (check.max78000)."""

from __future__ import annotations

import json

import pytest

from distillc.errors import TargetError
from distillc.pipeline import build_plan, compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

AI8X = '[student]\narch = "ai8x-cnn"\nwidth = 8\nembed_dim = 32\n'


def spec_text(accelerator: str | None = None, student: str | None = None) -> str:
    text = tiny_spec_text(target="max78000", distill_epochs=1,
                          target_options=f'accelerator = "{accelerator}"' if accelerator else "")
    if student:
        text = text.replace('[student]\narch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32\n', student)
    return text



def compile_(module_folder, text):
    path = module_folder / "spec.toml"
    path.write_text(text)
    return compile_spec(path, progress=SilentProgress(), until="check.max78000")


def test_the_check_opens_the_backend_unless_turned_off(module_folder):
    plugins = load_plugins()
    for accelerator, expected in ((None, True), ("require", True), ("off", False)):
        path = module_folder / "plan.toml"
        path.write_text(spec_text(accelerator))
        ids = [s.id for s in build_plan(load_spec(path, plugins), plugins).steps]
        assert ("check.max78000" in ids) is expected
        if expected:
            assert ids.index("check.max78000") == ids.index("quantize.brevitas-qat") - 1


def test_require_lists_every_violation_of_mobilenetv2(module_folder):
    with pytest.raises(TargetError) as caught:
        compile_(module_folder, spec_text("require"))
    violations = caught.value.violations
    # Every depthwise convolution and every strided one is named, not only the first.
    assert sum("depthwise" in v or "groups" in v for v in violations) >= 10
    assert any("stride" in v for v in violations)
    assert all(v.startswith("CNN accelerator: ") for v in violations)


def test_report_records_the_verdict_and_the_student_passes_through(module_folder):
    result = compile_(module_folder, spec_text())
    metrics = result.report["metrics"]["check.max78000"]
    assert metrics["accelerator_fits"] is False and metrics["violations"]
    result = compile_(module_folder, spec_text("require", student=AI8X))
    metrics = result.report["metrics"]["check.max78000"]
    assert metrics == {"accelerator_fits": True, "violations": [], "weight_bits": 8}
    assert result.artifact.arch == "ai8x-cnn"


@pytest.fixture(scope="module")
def ai8x_compile(module_folder):
    """ai8x-cnn through the whole max78000 backend (accelerator = "require"), once for the module."""
    path = module_folder / "bundle.toml"
    path.write_text(spec_text("require", student=AI8X))
    return compile_spec(path, progress=SilentProgress())


def test_the_accelerator_friendly_student_compiles_to_a_verified_bundle(ai8x_compile):
    """Its max pooling (which no other built-in student has) is lowered exactly, on the host and
    on the emulated Cortex-M4."""
    manifest = json.loads((ai8x_compile.final_path / "manifest.json").read_text())
    assert any(layer["op"] == "max_pool" for layer in manifest["layers"])
    metrics = ai8x_compile.report["metrics"]
    assert metrics["verify.host"]["max_lsb"] <= 1
    assert metrics["verify.qemu"]["max_lsb"] <= 1 and metrics["verify.qemu"]["machine"] == "mps2-an386"


def test_the_bundle_holds_izer_inputs_for_the_accelerator(ai8x_compile):
    """network.yaml, the quantized checkpoint and the sample input, as ai8x-synthesis reads them,
    and izer's arithmetic (simulated) agreeing with onnxruntime on validation images."""
    import numpy as np
    import onnx
    import torch
    import yaml

    assert ai8x_compile.ran[-1] == "export.izer"
    bundle = ai8x_compile.final_path
    manifest = json.loads((bundle / "manifest.json").read_text())
    izer = manifest["izer"]
    assert izer["exported"] is True and izer == ai8x_compile.report["metrics"]["export.izer"]
    assert sorted(p.name for p in (bundle / "izer").iterdir()) == izer["files"]
    graph = onnx.load(str(bundle.parent / "model.onnx")).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert izer["layers"] == len(convs) and izer["embedding_cosine_min"] > 0.99

    network = yaml.safe_load((bundle / "izer" / "network.yaml").read_text())
    assert network["arch"] == "tiny" and network["dataset"] == "sklearn_digits"
    layers = network["layers"]
    checkpoint = torch.load(bundle / "izer" / "tiny-q8.pth.tar", weights_only=True)
    assert checkpoint["arch"] == "tiny" and checkpoint["epoch"] == 0
    state = checkpoint["state_dict"]
    assert list(state)[:4] == ["conv0.op.weight", "conv0.op.bias", "conv0.weight_bits", "conv0.output_shift"]
    assert len(state) == 4 * len(layers) == 4 * len(convs)
    pooled_before = {n.output[0] for n in graph.node if n.op_type == "MaxPool"}
    for index, (layer, conv) in enumerate(zip(layers, convs)):
        weight, bias = state[f"conv{index}.op.weight"], state[f"conv{index}.op.bias"]
        assert weight.shape == tuple(d for d in _conv_weight_shape(graph, conv))
        assert torch.equal(weight, weight.round()) and -128 <= weight.min() and weight.max() <= 127
        assert torch.equal(bias % 128, torch.zeros_like(bias)) and -128 * 128 <= bias.min() and bias.max() <= 127 * 128
        assert -15 <= state[f"conv{index}.output_shift"].item() <= 15 and state[f"conv{index}.weight_bits"].item() == 8
        assert bin(layer["processors"]).count("1") == weight.shape[1] <= 64  # one processor per input channel
        assert layer["out_offset"] == (0x2000 if index % 2 == 0 else 0)
        assert layer["kernel_size"] == f"{weight.shape[2]}x{weight.shape[3]}" and layer["op"] == "conv2d"
        assert ("max_pool" in layer) == (conv.input[0] in pooled_before)
        assert layer["activate"] == ("None" if index == len(convs) - 1 else "ReLU")

    sample = np.load(bundle / "izer" / "sample_sklearn_digits.npy", allow_pickle=False)
    assert sample.dtype == np.int64 and list(sample.shape) == manifest["input"]["shape"][1:]
    assert -128 <= sample.min() and sample.max() <= 127


def _conv_weight_shape(graph, conv):
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    from onnx import numpy_helper

    for init in graph.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape)
    producer = {out: node for node in graph.node for out in node.output}
    name = conv.input[1]
    while name not in shapes:  # DequantizeLinear <- Clip <- Constant
        node = producer[name]
        if node.op_type == "Constant":
            return list(numpy_helper.to_array(node.attribute[0].t).shape)
        name = node.input[0]
    return shapes[name]
