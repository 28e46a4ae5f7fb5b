"""quantize.brevitas-qat keeps the spec's distillation objective while it quantizes.

The plan resolves which objective QAT keeps (and which teachers it needs); the run trains the
quantized student through :class:`QuantStudent`, whose ``forward_stages`` must return exactly the
values the quantized graph's next layers read, with gradients reaching the quantized weights.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from distillc.errors import SpecError
from distillc.plan import build_plan
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

QAT = 'use = "quantize.brevitas-qat"\nepochs = 1\nbatch_size = 256\ncalib_images = 64\nprobe = false\n'


def spec_text(method: str, qat_options: str = "") -> str:
    """The tiny spec (one-batch training split) with ``method`` in place of distill.feature, then QAT."""
    # The QAT pass is listed here, so the target adds no copy for the fixture to turn the gate off in;
    # the tiny student is collapsed after one epoch, and these tests check the objective, not quality.
    text = tiny_spec_text(qat_gate=True).replace("val_fraction = 0.25", "val_fraction = 0.85")
    text = re.sub(r'use = "distill\.feature"\n(?:\w.*\n)*', lambda _: method, text)
    return text.replace("[target]", f'[[passes]]\n{QAT}gate = "off"\n{qat_options}\n[target]')


CADSSL = 'use = "distill.ca-dssl"\nteacher = "vit"\nbatch_size = 256\nepochs = 1\nprojector_hidden = 16\n'
BOOTLEG = 'use = "distill.bootleg"\nteacher = "vit"\nbatch_size = 256\nepochs = 1\npredictor_hidden = 0\n'
SUPERVISED = 'use = "train.supervised"\nbatch_size = 256\nepochs = 1\n'
MATRYOSHKA = 'use = "matryoshka"\nteacher = "vit"\ndims = [8, 16]\nbatch_size = 256\nepochs = 1\n'



def write(module_folder, text: str):
    path = module_folder / "spec.toml"
    path.write_text(text)
    return path


def qat_step(plan):
    return next(s for s in plan.steps if s.id == "quantize.brevitas-qat")


# -- plan: which objective, which teachers, which key --------------------------------------------


def plan_of(module_folder, text):
    plugins = load_plugins()
    return build_plan(load_spec(write(module_folder, text), plugins), plugins)


def test_auto_keeps_the_last_distillation_pass_and_its_teachers(module_folder):
    plan = plan_of(module_folder, spec_text(CADSSL))
    step = qat_step(plan)
    assert step.key_payload["linked"]["objective"]["pass"] == "distill.ca-dssl"
    assert step.teacher_ids == {"vit": "teacher:vit"}
    # The borrowed pass's keys are part of QAT's key.
    other = qat_step(plan_of(module_folder, spec_text(CADSSL.replace("projector_hidden = 16", "projector_hidden = 8"))))
    assert other.key != step.key


def test_teacher_means_feature_and_no_distillation_means_self(module_folder):
    step = qat_step(plan_of(module_folder, spec_text(CADSSL, 'teacher = "vit"\n')))
    assert step.key_payload["linked"] == {"objective": "feature"}
    step = qat_step(plan_of(module_folder, spec_text(SUPERVISED, 'objective = "self"\n')))
    assert step.key_payload["linked"] == {"objective": "self"} and step.teacher_ids == {}


def test_an_objective_that_is_not_an_earlier_distillation_pass_is_a_spec_error(module_folder):
    with pytest.raises(SpecError, match=r"passes\[2\]\.objective: objective 'distill.bootleg' is not a "
                                         r"distillation pass earlier.*earlier distillation passes: distill.ca-dssl"):
        plan_of(module_folder, spec_text(CADSSL, 'objective = "distill.bootleg"\n'))
    with pytest.raises(SpecError, match="brings its own teachers"):
        plan_of(module_folder, spec_text(CADSSL, 'objective = "distill.ca-dssl"\nteacher = "vit"\n'))
    with pytest.raises(SpecError, match="'feature' needs `teacher`"):
        plan_of(module_folder, spec_text(CADSSL, 'objective = "feature"\n'))


# -- run: the objective trains the quantized student ----------------------------------------------


@pytest.mark.parametrize("method, reported", [
    (CADSSL, ("projector_params", "adapter_params", "feature_loss")),  # multi-scale: stage taps of the INT8 graph
    (BOOTLEG, ("predictor_params", "layer_loss")),
    (SUPERVISED, ()),
    (MATRYOSHKA, ()),  # the nested loss through the quantized head
], ids=["ca-dssl", "bootleg", "supervised", "matryoshka"])
def test_qat_trains_with_the_methods_objective(module_folder, method, reported):
    result = compile_spec(write(module_folder, spec_text(method)), progress=SilentProgress(), until="quantize.brevitas-qat")
    name = re.search(r'use = "([\w.-]+)"', method).group(1)
    metrics = result.report["metrics"]["quantize.brevitas-qat"]
    assert metrics["objective"] == name
    for key in reported:
        assert key in metrics, (key, sorted(metrics))
    assert math.isfinite(metrics["loss"])
    if name != "train.supervised":  # fresh heads trained alone first (the classifier is one too)
        assert math.isfinite(metrics["head_warmup_loss"])
    stored = result.plan.store.load(qat_step(result.plan).key)
    assert stored.meta["qat_objective"] == name


def test_qat_moves_the_quantized_weights_and_lowers_the_objectives_loss(module_folder):
    """Three QAT epochs with the CA-DSSL objective change the weights and lower the loss."""
    text = spec_text(CADSSL).replace("epochs = 1\nbatch_size = 256\ncalib_images",
                                     "epochs = 3\nbatch_size = 64\nlr = 1e-3\ncalib_images")
    text = text.replace("probe = false", "probe = false\nhead_warmup_epochs = 2")
    result = compile_spec(write(module_folder, text), progress=SilentProgress(), until="quantize.brevitas-qat")
    metrics = result.report["metrics"]["quantize.brevitas-qat"]
    assert metrics["loss"] < metrics["first_loss"], metrics
    calibrated = compile_spec(write(module_folder, text.replace("epochs = 3\nbatch_size = 64", "epochs = 0\nbatch_size = 64")),
                              progress=SilentProgress(), until="quantize.brevitas-qat")
    trained = result.plan.store.load(qat_step(result.plan).key).state
    calibrated = calibrated.plan.store.load(qat_step(calibrated.plan).key).state
    weights = [k for k in trained if k.endswith("weight") and trained[k].dim() == 4]
    assert weights and any(not torch.equal(trained[k], calibrated[k]) for k in weights)


# -- QuantStudent: the float student's API on the quantized graph ----------------------------------


def test_quant_student_stages_are_what_the_next_quantized_layer_reads():
    from distillc.passes.quantize.brevitas_model import QuantStudent, quantize, stage_modules
    from distillc.passes.backend.testing import randomize_batchnorm
    from distillc.plugins.models.mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    model = randomize_batchnorm(MobileNetV2(width=0.35, in_chans=1, stem_stride=1, last_channels=32))
    x = torch.rand(16, 1, 16, 16)
    names = stage_modules(model, x[:2])
    assert names[-1] == "last_conv" and all(n.startswith("blocks.") for n in names[:-1])
    qmodel = quantize(model, x)
    student = QuantStudent(qmodel, model, x[:2]).eval()
    assert student.embed_dim == 32 and student.stage_channels == model.stage_channels

    # The input of the first convolution after each stage is exactly that stage's tap.
    graph_module = qmodel.inner if hasattr(qmodel, "inner") else qmodel
    seen = {}
    for i, name in enumerate(names[:-1]):
        block = int(name.split(".")[1]) + 1
        conv = graph_module.get_submodule(f"blocks.{block}.expand.conv")
        conv.register_forward_hook(lambda m, inputs, out, i=i: seen.__setitem__(i, getattr(inputs[0], "value", inputs[0])))
    with torch.no_grad():
        out = student(x)
        stages = student.forward_stages(x)
    assert len(seen) == len(names) - 1
    for i in seen:
        assert torch.equal(seen[i], stages[i])
    assert [s.shape[1] for s in stages] == model.stage_channels
    # The embedding is the pooled last stage (requantized), so they agree to a quantization step.
    assert (stages[-1].mean(dim=(2, 3)) - out).abs().max() < 0.1 * out.abs().max()

    # Stage losses train the quantized convolutions (shared with forward).
    student.train()
    sum(s.pow(2).mean() for s in student.forward_stages(x[:4])).backward()
    conv = graph_module.get_submodule("blocks.0.depthwise.conv")
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
