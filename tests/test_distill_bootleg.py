"""distill.bootleg: several teacher blocks predicted at once from a masked student input: the masked
patches' latents (on the student's map) and pooled summaries (on its embedding)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from distillc.errors import PassError, SpecError
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

STUDENT_EMBED, HIDDEN, PATCH_HIDDEN, TEACHER_DIM = 32, 16, 8, 192
VIT_STUDENT = '[student]\narch = "vit-mcu"\npatch_size = 4\ndim = 32\ndepth = 1\n'


def spec_text(options: str, student: str | None = None) -> str:
    """The tiny spec with a 2-block teacher and distill.bootleg in place of distill.feature, on a one-batch
    training split."""
    text = tiny_spec_text().replace("val_fraction = 0.25", "val_fraction = 0.85").replace("depth = 1", "depth = 2")
    if student is not None:
        text = re.sub(r"\[student\]\n(?:\w.*\n)*", lambda _: student, text)
    method = f'use = "distill.bootleg"\nteacher = "vit"\nbatch_size = 256\n{options}\n'
    return re.sub(r'use = "distill\.feature"\n(?:\w.*\n)*', lambda _: method, text)



def spec_path(module_folder, options: str, student: str | None = None):
    path = module_folder / "spec.toml"
    path.write_text(spec_text(options, student))
    return path


def compile_(module_folder, options: str, student: str | None = None):
    return compile_spec(spec_path(module_folder, options, student), progress=SilentProgress(),
                        until="distill.bootleg")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def metrics(module_folder):
    options = (f"epochs = 2\nblocks = [0, -1]\npredictor_hidden = {HIDDEN}\npatch_hidden = {PATCH_HIDDEN}\n"
               "mask_ratio = 0.5\nlr = 1e-2")
    return compile_(module_folder, options).report["metrics"]["distill.bootleg"]


def test_every_listed_block_has_a_finite_loss_and_training_lowers_the_total(metrics):
    assert metrics["blocks"] == [0, 1]
    assert metrics["predicted"] == ["cls", "mean", "patches"]  # the default: masked patches and pooled summaries
    assert set(metrics["layer_loss"]) == set(metrics["patch_loss"]) == {"block0", "block1"}
    assert all(math.isfinite(v) for v in [*metrics["layer_loss"].values(), *metrics["patch_loss"].values()])
    # patch_weight = 1: the mean pooled loss plus the mean masked-patch loss
    assert metrics["loss"] == pytest.approx(mean(metrics["layer_loss"].values()) + mean(metrics["patch_loss"].values()),
                                            rel=1e-5)
    assert metrics["loss"] < metrics["first_loss"]


def test_one_pooled_and_one_patch_predictor_per_block(metrics):
    out = 2 * TEACHER_DIM  # target = "both": the CLS token and the mean patch token
    per_block = STUDENT_EMBED * HIDDEN + HIDDEN + 2 * HIDDEN + HIDDEN * out + out
    assert metrics["predictor_params"] == 2 * per_block
    grid, h = 2, PATCH_HIDDEN  # 8 px images, the teacher's 4 px patches
    # 1x1 conv of the student's map and the keep channel, position embedding, 3x3 conv, 1x1 conv to the teacher width
    per_patch_block = (STUDENT_EMBED + 1) * h + h + h * grid * grid + 9 * h * h + h + h * TEACHER_DIM + TEACHER_DIM
    assert metrics["patch_predictor_params"] == 2 * per_patch_block
    assert metrics["head_params"] == metrics["predictor_params"] + metrics["patch_predictor_params"]
    assert metrics["mask_grid"] == grid


def test_patch_targets_are_cached_at_the_mask_grid(metrics, module_folder):
    import json

    import numpy as np

    shapes = []
    for path in (module_folder / ".distillc-cache").rglob("teacher-targets/*.json"):
        what = json.loads(path.read_text())["what"]
        if what.startswith("hidden-patches:"):
            shapes.append((what, np.load(path.with_suffix(".npy"), mmap_mode="r").shape))
    # 2 blocks, a 2x2 mask grid (the teacher's own grid here), the teacher's width
    assert shapes and all(what == "hidden-patches:0,1:grid2" and shape[1:] == (2, 4, TEACHER_DIM)
                          for what, shape in shapes)


def test_patch_latents_are_the_teachers_block_tokens_resized_to_the_mask_grid_and_normalised():
    from distillc.passes.distill.bootleg import patch_latents
    from distillc.plugin_manager import load_plugins as plugins

    teacher = plugins().teachers.get("vit_tiny_patch2")(image_size=8, in_chans=1, depth=2).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = patch_latents(teacher, x, [0, 1], 2)
        hidden = teacher.forward_hidden(x, [1])[0]
    assert latents.shape == (3, 2, 4, TEACHER_DIM)
    tokens = hidden[:, 1:].reshape(3, 4, 4, TEACHER_DIM)  # the teacher's own 4x4 grid
    top_left = tokens[:, :2, :2].mean(dim=(1, 2))  # area average of the 2x2 teacher tokens in mask cell 0
    torch.testing.assert_close(latents[:, 1, 0], torch.nn.functional.layer_norm(top_left, (TEACHER_DIM,)))


def test_the_patch_loss_counts_the_masked_cells_only():
    from distillc.passes.distill.bootleg import patch_losses, patch_predictor

    gen = torch.Generator().manual_seed(0)
    predictors = torch.nn.ModuleList([patch_predictor(4, 8, 6, 2)])
    feature_map = torch.rand(2, 4, 1, 1, generator=gen)
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    targets = torch.randn(2, 1, 4, 6, generator=gen)
    base = patch_losses(feature_map, keep, predictors, targets, "smooth_l1")
    visible = targets.clone()
    visible[keep.view(2, 1, 4, 1).expand_as(targets)] += 5.0
    torch.testing.assert_close(patch_losses(feature_map, keep, predictors, visible, "smooth_l1"), base)
    hidden = targets.clone()
    hidden[0, 0, 1] += 5.0
    assert patch_losses(feature_map, keep, predictors, hidden, "smooth_l1") > base


def test_a_vit_student_can_predict_the_masked_patches_alone(module_folder):
    """target = "none": no pooled head; the patch predictors read the ViT student's patch tokens."""
    options = f"epochs = 1\nblocks = [-1]\ntarget = \"none\"\npatch_hidden = {PATCH_HIDDEN}\nloss = \"cosine\""
    metrics = compile_(module_folder, options, VIT_STUDENT).report["metrics"]["distill.bootleg"]
    assert metrics["predicted"] == ["patches"] and "layer_loss" not in metrics
    assert metrics["predictor_params"] == 0 and metrics["head_params"] == metrics["patch_predictor_params"] > 0
    assert metrics["loss"] == pytest.approx(metrics["patch_loss"]["block1"], rel=1e-5)


def test_patch_weight_zero_predicts_the_pooled_summaries_only(module_folder):
    metrics = compile_(module_folder, "epochs = 1\npatch_weight = 0.0\npredictor_hidden = 0").report["metrics"][
        "distill.bootleg"]
    assert metrics["predicted"] == ["cls", "mean"] and "patch_loss" not in metrics
    assert metrics["patch_predictor_params"] == 0
    assert metrics["loss"] == pytest.approx(metrics["layer_loss"]["block1"], rel=1e-5)


def test_a_block_beyond_the_teachers_depth_is_a_pass_error_naming_it(module_folder):
    with pytest.raises(PassError, match=r"blocks \[5\] out of range: teacher 'vit' has 2 blocks"):
        compile_(module_folder, "epochs = 1\nblocks = [0, 5]")


def test_the_same_block_twice_is_a_pass_error(module_folder):
    with pytest.raises(PassError, match="same teacher block twice"):
        compile_(module_folder, "epochs = 1\nblocks = [1, -1]")


def test_a_mask_patch_that_does_not_tile_the_image_is_a_pass_error(module_folder):
    with pytest.raises(PassError, match="mask_patch 3 does not divide the image size 8"):
        compile_(module_folder, "epochs = 1\nmask_patch = 3")


@pytest.mark.parametrize("options, key", [
    ("blocks = []", "blocks"),
    ("blocks = [1, 1]", "blocks"),
    ("mask_ratio = 1.0", "mask_ratio"),
    ("target = \"patches\"", "target"),
    ("target = \"none\"\npatch_weight = 0.0", "predicts nothing"),
    ("patch_weight = -1.0", "patch_weight"),
    ("loss = \"mse\"", "loss"),
])
def test_bad_values_are_refused_at_validate(module_folder, options, key):
    with pytest.raises(SpecError, match=key):
        load_spec(spec_path(module_folder, options), load_plugins())
