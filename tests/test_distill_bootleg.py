"""distill.bootleg: several teacher blocks predicted at once from a masked student input."""

from __future__ import annotations

import math
import re

import pytest

from distillc.errors import PassError, SpecError
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

STUDENT_EMBED, HIDDEN, TEACHER_DIM = 32, 16, 192


def spec_text(options: str) -> str:
    """The tiny spec with a 2-block teacher and distill.bootleg in place of distill.feature, on a one-batch
    training split."""
    text = tiny_spec_text().replace("val_fraction = 0.25", "val_fraction = 0.85").replace("depth = 1", "depth = 2")
    method = f'use = "distill.bootleg"\nteacher = "vit"\nbatch_size = 256\n{options}\n'
    return re.sub(r'use = "distill\.feature"\n(?:\w.*\n)*', lambda _: method, text)



def spec_path(module_folder, options: str):
    path = module_folder / "spec.toml"
    path.write_text(spec_text(options))
    return path


def compile_(module_folder, options: str):
    return compile_spec(spec_path(module_folder, options), progress=SilentProgress(), until="distill.bootleg")


@pytest.fixture(scope="module")
def metrics(module_folder):
    options = f"epochs = 2\nblocks = [0, -1]\npredictor_hidden = {HIDDEN}\nmask_ratio = 0.5\nlr = 1e-2"
    return compile_(module_folder, options).report["metrics"]["distill.bootleg"]


def test_every_listed_block_has_a_finite_loss_and_training_lowers_the_total(metrics):
    assert metrics["blocks"] == [0, 1]
    assert set(metrics["layer_loss"]) == {"block0", "block1"}
    assert all(math.isfinite(v) for v in metrics["layer_loss"].values())
    assert metrics["loss"] == pytest.approx(sum(metrics["layer_loss"].values()) / 2, rel=1e-5)
    assert metrics["loss"] < metrics["first_loss"]


def test_one_predictor_per_block_to_cls_and_mean_token(metrics):
    out = 2 * TEACHER_DIM  # target = "both": the CLS token and the mean patch token
    per_block = STUDENT_EMBED * HIDDEN + HIDDEN + 2 * HIDDEN + HIDDEN * out + out
    assert metrics["predictor_params"] == 2 * per_block == metrics["head_params"]
    assert metrics["mask_grid"] == 2  # 8 px images, the teacher's 4 px patches


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
    ("loss = \"mse\"", "loss"),
])
def test_bad_values_are_refused_at_validate(module_folder, options, key):
    with pytest.raises(SpecError, match=key):
        load_spec(spec_path(module_folder, options), load_plugins())
