"""distill.ca-dssl: asymmetric views, a spec-sized projector, multi-scale features, the curriculum."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from distillc.errors import PassError, SpecError
from distillc.passes.distill.cadssl import aligned_teacher_map, augment_with_coordinates, pools_last_stage
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.plugins.augment import Augment
from distillc.progress import ProgressReporter
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

STUDENT_EMBED, PROJECTOR_HIDDEN, TEACHER_DIM = 32, 16, 192  # vit_tiny is 192 wide


def spec_text(options: str) -> str:
    """The tiny spec with distill.ca-dssl in place of distill.feature, on a one-batch training split."""
    text = tiny_spec_text().replace("val_fraction = 0.25", "val_fraction = 0.85")
    method = f'use = "distill.ca-dssl"\nteacher = "vit"\nbatch_size = 256\n{options}\n'
    return re.sub(r'use = "distill\.feature"\n(?:\w.*\n)*', lambda _: method, text)


class FieldRecorder(ProgressReporter):
    """Keeps the fields of every progress line, per task."""

    def __init__(self) -> None:
        self.fields: dict[str, list[dict]] = {}

    @contextmanager
    def task(self, description, total, unit="step"):
        self.fields[description] = []
        with super().task(description, total, unit) as handle:
            yield handle

    def _show(self, handle, steps):
        self.fields[handle.description].append(dict(handle.fields))



def compile_(module_folder, options: str, progress: ProgressReporter | None = None):
    path = module_folder / "spec.toml"
    path.write_text(spec_text(options))
    return compile_spec(path, progress=progress or FieldRecorder(), until="distill.ca-dssl")


@pytest.fixture(scope="module")
def trained(module_folder):
    progress = FieldRecorder()
    options = (f"epochs = 3\nprojector_hidden = {PROJECTOR_HIDDEN}\nteacher_views = 2\n"
               f"augment_start = 0.1\naugment_end = 0.7\nlr = 1e-2")
    result = compile_(module_folder, options, progress)
    return result.report["metrics"]["distill.ca-dssl"], progress.fields["distill.ca-dssl"]


def test_reports_finite_loss_terms_that_decrease(trained):
    metrics, _ = trained
    for key in ("loss", "first_loss", "embed_loss", "feature_loss", "params", "head_params"):
        assert math.isfinite(metrics[key]), key
    assert metrics["loss"] < metrics["first_loss"]
    assert metrics["stages"] == [1, 2]  # [-3, -2] of the student's four stages


def test_loss_terms_cover_every_ranks_share(module_folder, monkeypatch):
    """Under torchrun each rank sums its own share; the reported terms are over all of them.
    Simulated here: a second rank whose share saw as many images at zero loss halves the means."""
    from distillc import distributed

    calls = []

    def two_ranks(*values):
        calls.append(values)
        return values if len(values) != 3 else (values[0] * 2, *values[1:])

    monkeypatch.setattr(distributed, "sum_all", two_ranks)
    metrics = compile_(module_folder, "epochs = 1\nlr = 2e-3").report["metrics"]["distill.ca-dssl"]
    images, embed, feature = next(values for values in reversed(calls) if len(values) == 3)
    assert metrics["embed_loss"] == pytest.approx(embed / (2 * images))
    assert metrics["feature_loss"] == pytest.approx(feature / (2 * images))


def test_projector_size_is_the_one_the_spec_sets(trained):
    metrics, _ = trained
    linear_bn_relu_linear = (STUDENT_EMBED * PROJECTOR_HIDDEN + PROJECTOR_HIDDEN + 2 * PROJECTOR_HIDDEN
                             + PROJECTOR_HIDDEN * TEACHER_DIM + TEACHER_DIM)
    assert metrics["projector_params"] == linear_bn_relu_linear
    assert metrics["head_params"] == metrics["projector_params"] + metrics["adapter_params"]
    assert metrics["adapter_params"] > 0


def test_curriculum_strength_ramps_from_start_to_end_in_the_progress_line(trained):
    _, fields = trained
    assert [f["augment"] for f in fields] == [0.1, 0.4, 0.7]
    assert all(math.isfinite(f["loss"]) for f in fields)


def test_embedding_only_when_no_stage_is_listed(module_folder):
    metrics = compile_(module_folder, "epochs = 1\nstages = []").report["metrics"]["distill.ca-dssl"]
    assert metrics["adapter_params"] == 0 and "feature_loss" not in metrics
    assert math.isfinite(metrics["embed_loss"])


def test_a_stage_the_student_lacks_is_a_pass_error_naming_it(module_folder):
    with pytest.raises(PassError, match=r"stages \[7\] out of range.*4 stages"):
        compile_(module_folder, "epochs = 1\nstages = [-2, 7]")


def test_projector_out_must_be_the_teachers_width(module_folder):
    with pytest.raises(PassError, match="projector_out = 64 must equal the teacher's embedding width 192"):
        compile_(module_folder, "epochs = 1\nprojector_out = 64")


@pytest.mark.parametrize("options, key", [
    ("augment_end = 1.5", "augment_end"),
    ("teacher_views = 0", "teacher_views"),
    ("stages = [1, 1]", "stages"),
    ("projector_hidden = -1", "projector_hidden"),
    ("feature_weight = -0.5", "feature_weight"),
    ("projector = 128", "projector"),
])
def test_bad_values_are_refused_at_validate(module_folder, options, key):
    path = module_folder / "bad.toml"
    path.write_text(spec_text(options))
    with pytest.raises(SpecError, match=key):
        load_spec(path, load_plugins())


def test_the_student_view_is_the_strong_augmentation_of_the_weak_view():
    weak = torch.rand(6, 3, 16, 16)
    augment = Augment(strength=0.8, flip=True)
    view, _ = augment_with_coordinates(augment, weak, torch.Generator().manual_seed(1))
    assert torch.allclose(view, augment(weak, torch.Generator().manual_seed(1)), atol=1e-6)


def test_the_teacher_map_is_sampled_where_the_students_crop_looks():
    # A teacher map that is the image itself must come back as the student's cropped image.
    smooth = F.interpolate(torch.rand(6, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    augment = Augment(strength=1.0, flip=True)
    _, coords = augment_with_coordinates(augment, smooth, torch.Generator().manual_seed(2))
    cropped = augment.geometric(smooth, torch.Generator().manual_seed(2))
    assert (aligned_teacher_map(smooth, coords, (16, 16)) - cropped).abs().max() < 1e-4


def test_a_finer_teacher_map_is_area_averaged_onto_a_coarse_stage():
    teacher_map = torch.rand(2, 5, 8, 8)
    _, coords = augment_with_coordinates(Augment(strength=0.0), torch.rand(2, 1, 32, 32), None)
    assert torch.allclose(aligned_teacher_map(teacher_map, coords, (2, 2)), F.avg_pool2d(teacher_map, 4), atol=1e-5)


def test_one_forward_serves_students_whose_embedding_pools_the_last_stage():
    plugins = load_plugins()
    cnn = plugins.students.get("mobilenetv2")(image_size=8, in_chans=1, width=0.35, last_channels=32)
    vit = plugins.students.get("vit-mcu")(image_size=8, in_chans=1, patch_size=4, dim=16, depth=1, heads=2)
    assert pools_last_stage(cnn, (1, 8, 8), torch.device("cpu")) and cnn.training
    assert not pools_last_stage(vit, (1, 8, 8), torch.device("cpu"))
