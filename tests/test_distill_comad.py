"""distill.comad: asymmetric masks (the teachers see lighter masked views of their own), the consensus
gate, and compiles with ViT and CNN students."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from distillc.errors import SpecError
from distillc.passes.distill.comad import (TeacherMask, consensus_gate, kept_on_grid, masked_embed, masked_patch_tokens,
                                           on_common_grid, resize_map, teacher_mask_seed, teacher_view_masks)
from distillc.plugins.augment import apply_patch_mask, random_patch_mask
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import TINY_HEADER

SPEC = TINY_HEADER + """
[[teachers]]
name = "coarse"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}

[[teachers]]
name = "fine"
arch = "vit_tiny_patch2"
depth = 1
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}

[student]
{student}

[[passes]]
use = "distill.comad"
teachers = ["coarse", "fine"]
epochs = 1
batch_size = 256
{options}
"""

@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


VIT_STUDENT = 'arch = "vit-mcu"\npatch_size = 4\ndim = 32\ndepth = 1'
CNN_STUDENT = 'arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32'


def spec_text(name: str, student: str = VIT_STUDENT, options: str = "") -> str:
    return textwrap.dedent(SPEC).format(name=name, student=student, options=options)



def compile_(module_folder, name: str, **kwargs):
    path = module_folder / f"{name}.toml"
    path.write_text(spec_text(name, **kwargs))
    return compile_spec(path, progress=SilentProgress(), until="distill.comad")


def test_each_teacher_sees_its_own_lighter_mask_unlike_the_students():
    """Two teachers of the same grid and keep ratio get different masks (a seed per teacher name), each
    keeps more than the student's mask, and none is the student's."""
    size = (8, 8)
    mask = TeacherMask(grid=4, keep=0.5)
    coarse = teacher_view_masks(64, size, mask, teacher_mask_seed("coarse", 0))
    fine = teacher_view_masks(64, size, mask, teacher_mask_seed("fine", 0))
    again = teacher_view_masks(64, size, mask, teacher_mask_seed("coarse", 1))
    student = random_patch_mask(64, 4, 0.25, torch.Generator().manual_seed(0))
    assert coarse.shape == fine.shape == (64, 16)
    assert (coarse.sum(1) == 8).all() and (fine.sum(1) == 8).all() and (student.sum(1) == 4).all()
    assert (coarse != fine).any(1).float().mean() > 0.9  # nearly every image: different masks per teacher
    assert (coarse != again).any(1).float().mean() > 0.9  # and per view
    assert (coarse != student).any(1).all() and (fine != student).any(1).all()


def test_the_teacher_runs_on_its_masked_input_at_its_own_grid(plugins):
    """The view's mask travels as extra channels; the teacher gets its input (here 16 px, a 4x4 grid of
    4-px patches, from an 8-px image) with the masked patches zeroed."""
    from distillc.plugins.models.teacher_input import TeacherView, to_teacher_input

    teacher = plugins.teachers.get("vit_tiny_patch4")(image_size=16, in_chans=1, depth=1).eval()
    contract = {"input_size": 16, "channels": 1, "mean": [0.5], "std": [0.25], "interpolation": "bilinear"}
    view = TeacherView(teacher, contract).eval()
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = TeacherMask(grid=4, keep=0.5)
    viewed = mask(images, torch.Generator().manual_seed(7))
    keep = random_patch_mask(3, 4, 0.5, torch.Generator().manual_seed(7))
    assert viewed.shape == (3, 2, 8, 8) and torch.equal(mask.read(viewed[:, 1:]), keep)
    with torch.no_grad():
        tokens = masked_patch_tokens(view, viewed, channels=1)
        masked_input = apply_patch_mask(to_teacher_input(images, contract), keep)
        expected = teacher.patch_tokens(masked_input)
        clean = view.patch_tokens(images)
        embedded, expected_embedding = masked_embed(view, viewed, channels=1), teacher.embed(masked_input)
    torch.testing.assert_close(tokens, expected)
    assert not torch.allclose(tokens, clean)  # the teacher saw the masked view, not the clean image
    torch.testing.assert_close(embedded, expected_embedding)  # the global level's target: the same view
    assert embedded.shape == (3, teacher.embed_dim)


def test_masked_teacher_tokens_reach_the_common_grid_from_their_visible_patches():
    token_map = torch.arange(16.0).view(1, 1, 4, 4)
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, [0, 1, 4]] = True  # three of cell 0's four teacher patches; one of cell 1's
    keep[0, 2] = True
    tokens, kept = on_common_grid(token_map, keep, 2), kept_on_grid(keep, 2)
    assert tokens.shape == (1, 4, 1) and kept.tolist() == [[True, False, False, False]]
    assert tokens[0, 0, 0] == pytest.approx((0 + 1 + 4) / 3)  # the visible patches only
    assert tokens[0, 1, 0] == pytest.approx(2.0)
    assert tokens[0, 3, 0] == pytest.approx((10 + 11 + 14 + 15) / 4)  # nothing visible: the tokens as they are


def test_gate_sums_to_one_per_token_and_skips_masked_teachers():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 5, 8, generator=gen)
    teachers = torch.randn(3, 3, 5, 8, generator=gen)
    keep = torch.rand(3, 3, 5, generator=gen) > 0.5
    keep[0] |= ~keep.any(0)
    keep[:, 0, 0] = False  # the one token no teacher keeps: every teacher counts there
    gate = consensus_gate(student, teachers, keep, alpha=0.5, temperature=0.1)
    assert gate.shape == (3, 5, 3)
    torch.testing.assert_close(gate.sum(-1), torch.ones(3, 5))
    masked = ~keep.permute(1, 2, 0)
    masked[0, 0] = False
    assert (gate[masked] == 0).all()
    assert (gate[0, 0] > 0).all()


def test_gate_follows_the_student_at_alpha_one_and_the_majority_at_alpha_zero():
    base = torch.randn(1, 1, 16)
    other = torch.randn(1, 1, 16)
    teachers = torch.stack([base, base + 0.01 * other, other])  # two agree, one is an outlier
    keep = torch.ones(3, 1, 1, dtype=torch.bool)
    follows = consensus_gate(other, teachers, keep, alpha=1.0, temperature=0.01)
    assert follows[0, 0].argmax() == 2
    majority = consensus_gate(other, teachers, keep, alpha=0.0, temperature=0.01)
    assert majority[0, 0, 2] < 1e-3


def test_resize_map_averages_down_and_interpolates_up():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize_map(x, 2).shape == (1, 1, 2, 2)
    assert resize_map(x, 2)[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    assert resize_map(torch.ones(1, 3, 1, 1), 2).shape == (1, 3, 2, 2)
    assert resize_map(x, 4) is x


def test_vit_student_distils_from_two_teachers_and_reports_the_gate(module_folder):
    result = compile_(module_folder, "vit")
    metrics = result.report["metrics"]["distill.comad"]
    assert math.isfinite(metrics["loss"]) and metrics["grid"] == 2
    assert metrics["student_adapter"] is False  # a ViT's tokens are matched as they are
    gate = metrics["gate"]
    assert set(gate["mean_weight"]) == {"coarse", "fine"}
    assert sum(gate["mean_weight"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(gate["dominant_fraction"].values()) == pytest.approx(1.0)
    assert 0.0 <= gate["entropy"] <= 1.0
    assert metrics["student_keep_fraction"] == pytest.approx(0.25)
    # Each teacher saw half of its own patches; on the common 2x2 grid, a cell counts as kept by the
    # 4x4 teacher when at least half of it was visible to it.
    assert metrics["teacher_mask"] == {"coarse": {"keep": 0.5, "grid": [2, 2]}, "fine": {"keep": 0.5, "grid": [4, 4]}}
    assert metrics["teacher_views"] == 2
    kept = metrics["teacher_keep_fraction"]
    assert kept["coarse"] == pytest.approx(0.5) and 0.5 < kept["fine"] < 1.0
    # The teachers ran on their masked views (one epoch: view 0 only), not on the clean images.
    cached = [json.loads(path.read_text()) for path in (module_folder / ".distillc-cache").rglob("teacher-targets/*.json")]
    views = {(c["what"], c["view"]) for c in cached}
    assert {("masked_patch_tokens:grid2", "TeacherMask(grid=2, keep=0.5)"),
            ("masked_patch_tokens:grid2", "TeacherMask(grid=4, keep=0.5)")} <= views
    assert not any(what.startswith("patch_tokens") for what, _ in views)
    # The global level of the KL (global_weight, default 1): each teacher's embedding of the same views.
    assert {("masked_embed", "TeacherMask(grid=2, keep=0.5)"), ("masked_embed", "TeacherMask(grid=4, keep=0.5)")} <= views
    assert math.isfinite(metrics["global_kl"]) and metrics["global_kl"] >= 0.0
    before = result.plan.store.load(result.plan.steps[2].key)
    after = result.artifact
    assert after.arch == "vit-mcu" and after.meta["distilled_by"] == "distill.comad"
    assert any(not torch.equal(before.state[k], after.state[k]) for k in before.state)


def test_gate_statistics_cover_every_ranks_share(module_folder, monkeypatch):
    """Under torchrun the gate statistics are summed over the ranks before they are averaged.
    Simulated: a second rank that saw as many tokens but added nothing halves every fraction."""
    from distillc import distributed

    def two_ranks(*values):
        return values if len(values) < 4 else (values[0] * 2, *values[1:])

    monkeypatch.setattr(distributed, "sum_all", two_ranks)
    options = "lr = 2e-3\nteacher_keep = [1.0, 0.5]"  # a teacher keeping everything sees the clean image
    metrics = compile_(module_folder, "vit-ranks", options=options).report["metrics"]["distill.comad"]
    assert sum(metrics["gate"]["mean_weight"].values()) == pytest.approx(0.5, abs=1e-4)
    assert metrics["student_keep_fraction"] == pytest.approx(0.125)
    assert metrics["teacher_keep_fraction"]["coarse"] == pytest.approx(0.5)


def test_cnn_student_distils_through_its_last_stage_map(module_folder):
    result = compile_(module_folder, "cnn", student=CNN_STUDENT, options="teacher_keep = [0.5, 0.75]\ngrid = 4")
    metrics = result.report["metrics"]["distill.comad"]
    assert metrics["grid"] == 4 and math.isfinite(metrics["loss"])
    assert metrics["student_adapter"] is True  # the ReLU map goes through a trainable 1x1 conv
    assert metrics["student_keep_fraction"] == pytest.approx(0.25)
    assert metrics["teacher_keep_fraction"] == {"coarse": pytest.approx(0.5), "fine": pytest.approx(0.75)}
    assert result.ran == ["student", "distill.comad"]  # the teachers came from the cache
    assert metrics["global_kl"] >= 0.0


def test_the_global_level_moves_the_student_and_can_be_turned_off(module_folder):
    """global_weight = 0 leaves the token and map levels alone: another student, no global_kl."""
    options = "teacher_keep = [0.5, 0.75]\ngrid = 4"
    with_global = compile_(module_folder, "cnn", student=CNN_STUDENT, options=options)
    without = compile_(module_folder, "cnn-no-global", student=CNN_STUDENT, options=options + "\nglobal_weight = 0.0")
    assert "global_kl" not in without.report["metrics"]["distill.comad"]
    assert any(not torch.equal(with_global.artifact.state[k], without.artifact.state[k]) for k in without.artifact.state)


@pytest.mark.parametrize("options, message", [
    ('teachers = ["coarse"]', r"passes\[0\]\.teachers: .*at least 2"),
    ('teacher_keep = [0.5]', "teacher_keep lists 1 values for 2 teachers"),
    ('teacher_keep = 1.5', r"teacher_keep values must be in \(0, 1\]"),
    ("student_keep = 0.0", r"passes\[0\]\.student_keep"),
    ("student_keep = 0.6", r"teacher_keep \[0\.5\] must not be below student_keep = 0\.6"),
    ("teacher_views = 0", r"passes\[0\]\.teacher_views"),
])
def test_bad_configs_are_spec_errors_naming_the_key(write_spec, options, message):
    text = spec_text("bad", options=options)
    if options.startswith("teachers"):
        text = text.replace('teachers = ["coarse", "fine"]\n', "")
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(text), load_plugins())
