"""The max78000 target checks the student against the CNN accelerator's limits (check.max78000)."""

from __future__ import annotations

import json

import pytest

from distillc.errors import TargetError
from distillc.plan import build_plan
from distillc.run import compile_spec
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


def test_require_refuses_a_student_whose_kernels_overflow_processor_0():
    """ai8x-cnn with 7 convs per stage: 29 layers and 386 KB of 8-bit weights (under the 442 KB in
    all), but izer packs every layer's kernels from processor 0 on, and processor 0 would need about
    1,024 of its 768 slots (izer: 'Kernel memory exhausted at processor 0')."""
    from types import SimpleNamespace

    from distillc.passes.max78000.ai8x import Ai8xCNN
    from distillc.passes.max78000.check import CheckMax78000

    model = Ai8xCNN(image_size=16, width=16, convs_per_stage=7, embed_dim=128)
    artifact = SimpleNamespace(arch="ai8x-cnn", options={"image_size": 16, "in_chans": 3}, meta={},
                               fresh_module=lambda plugins: model)
    ctx = SimpleNamespace(plugins=None, log=lambda message: None)
    with pytest.raises(TargetError) as caught:
        CheckMax78000(CheckMax78000.Config(mode="require")).run(artifact, ctx)
    assert caught.value.violations == [
        "CNN accelerator: stages.2.conv1.conv: kernel memory exhausted at processor 0: the layer needs 32 kernel "
        "slots on each of processors 0..31, and the layers on processor 0 need about 1,024 of its 768 in all "
        "(izer places every layer's kernels from processor 0 on; fewer, narrower or 4-bit layers fit)"]
    metrics = CheckMax78000(CheckMax78000.Config()).run(artifact, ctx).metrics
    assert metrics["accelerator_fits"] is False and metrics["violations"] == [caught.value.violations[0][17:]]


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
    """network.yaml, the quantized checkpoint, the sample input and its expected output, as
    ai8x-synthesis reads them, and izer's arithmetic (simulated) agreeing with onnxruntime on
    validation images."""
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
        # The input lies at 0: even layers write at the top of the 32 KiB instance, odd ones at 0.
        assert layer["out_offset"] == izer["out_offsets"][index] and (layer["out_offset"] > 0) == (index % 2 == 0)
        assert layer["quantization"] == 8
        assert layer["kernel_size"] == f"{weight.shape[2]}x{weight.shape[3]}" and layer["op"] == "conv2d"
        assert ("max_pool" in layer) == (conv.input[0] in pooled_before)
        assert layer["activate"] == ("None" if index == len(convs) - 1 else "ReLU")

    sample = np.load(bundle / "izer" / "sample_sklearn_digits.npy", allow_pickle=False)
    assert sample.dtype == np.int64 and list(sample.shape) == manifest["input"]["shape"][1:]
    assert -128 <= sample.min() and sample.max() <= 127
    # The expected output, to compare with izer's known answer: what izer computes from these files.
    from tests.test_export_izer import izer_forward

    expected = np.load(bundle / "izer" / "expected_sklearn_digits.npy", allow_pickle=False)
    assert expected.dtype == np.int64 and expected.shape[0] == state[f"conv{len(convs) - 1}.op.weight"].shape[0]
    np.testing.assert_array_equal(expected, izer_forward(state, layers, sample))
    readme = (bundle / "izer" / "README.md").read_text()
    assert "run from the ai8x-synthesis folder" in readme and "--sample-numpy-filename" in readme
    assert "expected_sklearn_digits.npy" in readme


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
