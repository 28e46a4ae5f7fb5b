"""quantize.brevitas-qat and the QCDQ export: the quantized student survives the cache exactly."""

from __future__ import annotations

import numpy as np

from distillc.artifacts import QuantTorchModel
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from tests.conftest import tiny_spec_text

QAT = """[[passes]]
use = "quantize.brevitas-qat"
teacher = "vit"
epochs = 1
batch_size = 512
calib_images = 32
"""


def test_qat_reports_fp32_and_int8_and_exports_qcdq_that_onnxruntime_reproduces(write_spec):
    import onnx
    import onnxruntime as ort
    import torch

    path = write_spec(tiny_spec_text(extra_passes=QAT))
    plugins = load_plugins()
    result = compile_spec(path, progress=SilentProgress(), plugins=plugins, until="export.onnx")
    qat = result.report["metrics"]["quantize.brevitas-qat"]
    assert 0.0 <= qat["fp32"]["top1"] <= 1.0 and 0.0 <= qat["int8"]["top1"] <= 1.0
    # The probe after QAT measures the quantized student.
    assert result.report["metrics"]["eval.linear-probe"]["top1"] == qat["int8"]["top1"]
    assert result.report["metrics"]["export.onnx"]["max_abs_diff"] == 0.0

    onnx_path = result.artifact.path
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    # The quantized student rebuilt from the cache equals onnxruntime on the exported graph.
    qat_step = next(s for s in result.plan.steps if s.id == "quantize.brevitas-qat")
    stored = result.plan.store.load(qat_step.key)
    assert isinstance(stored, QuantTorchModel) and stored.quant["weight_bits"] == 8
    model = stored.build(plugins)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(4)])
    np.testing.assert_array_equal(got, expected)


def test_a_quantized_student_cannot_be_trained_as_a_float_one(write_spec):
    from distillc.errors import SpecError
    from distillc.plan import build_plan
    from distillc.spec import load_spec

    import pytest

    text = tiny_spec_text(extra_passes=QAT + '[[passes]]\nuse = "distill.feature"\nteacher = "vit"\n')
    plugins = load_plugins()
    with pytest.raises(SpecError, match="'distill.feature#2' takes TorchModel.*makes QuantTorchModel"):
        build_plan(load_spec(write_spec(text), plugins), plugins)


def test_export_check_counts_output_steps_for_a_quantized_model(tmp_path):
    """Quantized exports are compared in output steps: a tie flipped by float32 order is one
    step, a wrong export many; the step is the scale of the graph's last DequantizeLinear."""
    import pytest

    from distillc.errors import PassError
    from distillc.passes.export.to_onnx import check_with_onnxruntime, output_scale, reference_session
    from distillc.passes.backend import testing

    onnx_path, manifest = testing.random_bundle(0, tmp_path)
    step = output_scale(onnx_path)
    assert step == pytest.approx(manifest["output"]["scale"], rel=1e-6)
    inputs = testing.dequantize(testing.quantized_inputs(manifest, 3), manifest["input"]).astype("float32")
    session = reference_session(onnx_path)
    name = session.get_inputs()[0].name
    exact = np.concatenate([session.run(None, {name: inputs[i:i + 1]})[0] for i in range(3)])
    one_off = exact.copy()
    one_off[0, 0] += step
    assert check_with_onnxruntime(onnx_path, inputs, one_off, "export.onnx", 2 * step * (1 + 1e-6)) == pytest.approx(step)
    one_off[1, 0] += 3 * step
    with pytest.raises(PassError, match="output step"):
        check_with_onnxruntime(onnx_path, inputs, one_off, "export.onnx", 2 * step * (1 + 1e-6), unit="output step(s)")
