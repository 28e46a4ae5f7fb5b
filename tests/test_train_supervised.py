"""train.supervised: the same student trained on the labels, handed on without its classifier."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from distillc.errors import PassError
from distillc.run import compile_spec
from distillc.progress import SilentProgress

SPEC = """
[distillc]
spec_version = 1
name = "supervised"

[data]
{data}
image_size = 8
val_fraction = 0.85
channels = 1

[student]
arch = "mobilenetv2"
width = 0.35
last_channels = 32

[[passes]]
use = "train.supervised"
batch_size = 256
epochs = 2
lr = 1e-2
"""

DIGITS = 'source = "sklearn-digits"'



def compile_(module_folder, data: str = DIGITS):
    path = module_folder / "spec.toml"
    path.write_text(textwrap.dedent(SPEC).format(data=data))
    return compile_spec(path, progress=SilentProgress(), until="train.supervised")


@pytest.fixture(scope="module")
def result(module_folder):
    return compile_(module_folder)


def test_reports_validation_top1_of_its_head_and_a_falling_loss(result):
    metrics = result.report["metrics"]["train.supervised"]
    assert 0.0 <= metrics["val_top1"] <= 1.0 and metrics["classes"] == 10
    assert math.isfinite(metrics["loss"]) and metrics["loss"] < metrics["first_loss"]
    assert metrics["head_params"] == 32 * 10 + 10  # one linear layer on the 32-wide embedding


def test_the_student_leaves_without_the_classifier(result):
    metrics = result.report["metrics"]
    assert metrics["train.supervised"]["params"] == metrics["student"]["params"]
    step = next(s for s in result.plan.steps if s.id == "train.supervised")
    artifact = result.plan.store.load(step.key)
    assert artifact.meta["distilled_by"] == "train.supervised"
    assert not any(k.startswith("classifier") for k in artifact.state)


def test_unlabelled_data_is_a_pass_error(module_folder):
    images = np.random.default_rng(0).random((64, 8, 8), dtype=np.float32)
    np.savez(module_folder / "unlabelled.npz", x=images)
    with pytest.raises(PassError, match="train.supervised.*needs labelled data"):
        compile_(module_folder, data='source = "npz"\npath = "unlabelled.npz"')
