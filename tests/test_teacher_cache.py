"""The teacher-target cache: a frozen teacher runs once per (weights, data, view, view seed), never per epoch."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distillc.artifacts import TorchModel
from distillc.passes.distill.base import teacher_targets, teacher_view
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.plugins.augment import Augment
from distillc.plugins.models.vit import VisionTransformer, build_vit
from distillc.progress import SilentProgress
from tests.conftest import tiny_spec_text


@pytest.fixture
def teacher_calls(monkeypatch):
    """Counts teacher forward passes (every ViT entry point goes through forward_tokens or forward_hidden)."""
    calls = []
    for method in ("forward_tokens", "forward_hidden"):
        real = getattr(VisionTransformer, method)

        def counted(self, *args, _real=real, **kwargs):
            calls.append(len(args[0]))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(VisionTransformer, method, counted)
    return calls


def compile_(module_folder, *, epochs: int, views: int, until: str = "distill.ca-dssl", force: str | None = None):
    path = module_folder / "spec.toml"
    text = tiny_spec_text().replace("val_fraction = 0.25", "val_fraction = 0.85")
    method = (f'use = "distill.ca-dssl"\nteacher = "vit"\nbatch_size = 256\nprojector_hidden = 16\n'
              f'epochs = {epochs}\nteacher_views = {views}\n')
    path.write_text(re.sub(r'use = "distill\.feature"\n(?:\w.*\n)*', lambda _: method, text))
    return compile_spec(path, progress=SilentProgress(), until=until, force=force)


def target_files(module_folder) -> dict[str, int]:
    targets = module_folder / ".distillc-cache" / "derived" / "teacher-targets"
    return {p.name: p.stat().st_mtime_ns for p in targets.glob("*.npy")}


def test_teacher_runs_once_per_view_however_many_epochs_and_runs(module_folder, teacher_calls):
    compile_(module_folder, epochs=3, views=1, until="student")  # the teacher trains outside the count
    teacher_calls.clear()
    first = compile_(module_folder, epochs=3, views=1)
    n = len(first.plan.spec.load_data(load_plugins()).train_x)
    # One pass over the data per target kind (embedding, patch tokens) of the single view, not per epoch.
    assert sum(teacher_calls) == 2 * n
    files = target_files(module_folder)
    assert len(files) == 2  # .npy arrays, each with its key's fields in a .json beside it
    targets = module_folder / ".distillc-cache" / "derived" / "teacher-targets"
    assert all((targets / name).with_suffix(".json").is_file() for name in files)

    teacher_calls.clear()
    compile_(module_folder, epochs=3, views=1, force="distill.ca-dssl")  # the pass trains again ...
    assert teacher_calls == []  # ... on the cached targets
    assert target_files(module_folder) == files  # same files, untouched

    compile_(module_folder, epochs=2, views=2)  # a second view adds its own targets only
    assert sum(teacher_calls) == 2 * n
    grown = target_files(module_folder)
    assert len(grown) == 4 and {k: grown[k] for k in files} == files


# -- the cache key, without a compile ----------------------------------------------------------------


@pytest.fixture
def fake_ctx(tmp_path):
    """Just what teacher_targets reads from a PassContext, with a tiny teacher."""
    torch.manual_seed(0)
    teacher = build_vit("vit_tiny_patch4", img_size=8, in_chans=1, depth=1)
    artifact = TorchModel.from_module(teacher, role="teacher", arch="vit_tiny_patch4",
                                      options={"image_size": 8, "in_chans": 1, "depth": 1})
    data = SimpleNamespace(train_x=torch.rand(300, 1, 8, 8))
    return SimpleNamespace(teachers={"t": artifact}, teacher_keys={"t": "a" * 64}, plugins=load_plugins(),
                           data=data, data_fingerprint="digits", derived_dir=tmp_path / "derived", scratch=tmp_path)


def embed(module, x):
    return module.embed(x)


def files(ctx) -> list[str]:
    return sorted(p.name for p in (ctx.derived_dir / "teacher-targets").glob("*.npy"))


def test_same_teacher_data_and_view_hit_the_cache(fake_ctx, teacher_calls):
    view = Augment(strength=0.3, flip=False)
    first = teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=0)
    calls = len(teacher_calls)
    again = teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=0)
    assert len(teacher_calls) == calls and torch.equal(first, again)
    (path,) = (fake_ctx.derived_dir / "teacher-targets").glob("*.npy")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    key = json.loads(path.with_suffix(".json").read_text())  # the key's fields beside the array
    assert key["view_seed"] == 0 and key["teacher"] == "a" * 64
    assert isinstance(np.load(path, mmap_mode="r"), np.memmap)  # read back memory-mapped


def test_computing_targets_leaves_the_random_state_as_a_cache_hit_does(fake_ctx):
    """A cold run must not draw from the global RNG (building the teacher), or its heads would be
    initialised differently from a warm run's."""
    torch.manual_seed(123)
    teacher_targets(fake_ctx, "t", "embed", embed)  # computes
    after_cold = torch.rand(3)
    torch.manual_seed(123)
    teacher_targets(fake_ctx, "t", "embed", embed)  # cached
    assert torch.equal(torch.rand(3), after_cold)


def test_new_view_seed_teacher_weights_data_or_view_make_new_files(fake_ctx):
    view = Augment(strength=0.3, flip=False)
    teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=0)
    teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=1)
    assert len(files(fake_ctx)) == 2
    fake_ctx.teacher_keys["t"] = "b" * 64  # other teacher weights have another artifact key
    teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=0)
    assert len(files(fake_ctx)) == 3
    fake_ctx.data_fingerprint = "other data"
    teacher_targets(fake_ctx, "t", "embed", embed, view=view, view_seed=0)
    assert len(files(fake_ctx)) == 4
    teacher_targets(fake_ctx, "t", "embed", embed, view=view.with_strength(0.5), view_seed=0)
    teacher_targets(fake_ctx, "t", "patch_tokens", lambda m, x: m.patch_tokens(x), view=view, view_seed=0)
    assert len(files(fake_ctx)) == 6


def test_teacher_view_rebuilds_exactly_the_images_the_teacher_saw(fake_ctx):
    view = Augment(strength=0.6, flip=False)
    seen = teacher_targets(fake_ctx, "t", "images", lambda m, x: x.flatten(1), view=view, view_seed=3,
                           batch_size=128)
    rebuilt = teacher_view(fake_ctx.data.train_x, view, 3)
    assert torch.equal(seen, rebuilt.flatten(1))
    assert not torch.equal(rebuilt, teacher_view(fake_ctx.data.train_x, view, 4))
