"""Each teacher is fed its own input: native size, channels and normalisation (issue: real teachers).

A loaded DINO ViT-S/16 sees 224x224 RGB with ImageNet statistics whatever the student sees; a
self-trained teacher sees the data as it is; every [[teachers]] key overrides its default.  The
compiles here use a ViT-S/16-shaped teacher of 1-2 blocks at 224 px on 32 small images.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from conftest import tiny_spec_text
from distillc.errors import SpecError
from distillc.plan import build_plan
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from distillc.spec import load_spec
from distillc.plugins.models.teacher_input import TeacherView, to_teacher_input

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def _spec_text(teachers: str, passes: str, *, images: str = "images.npz", size: int = 16) -> str:
    return textwrap.dedent(f"""
        [distillc]
        spec_version = 1
        name = "teacher-input"

        [data]
        source = "npz"
        path = "{images}"
        image_size = {size}
        val_fraction = 0.25
        channels = 1
        """) + textwrap.dedent(teachers) + textwrap.dedent("""
        [student]
        arch = "mobilenetv2"
        width = 0.35
        last_channels = 32
        """) + textwrap.dedent(passes)


def _write_images(folder, n: int = 32, size: int = 16) -> None:
    gen = np.random.default_rng(0)
    x = gen.random((n, 1, size, size), dtype=np.float32)
    y = np.arange(n) % 4
    np.savez(folder / "images.npz", x=x, y=y)


def _save_teacher(plugins, folder, arch: str, file: str, **options) -> None:
    from safetensors.torch import save_file

    model = plugins.teachers.get(arch)(**options)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / file))


DINO_S16 = """
[[teachers]]
name = "dino"
arch = "dino_vits16"
depth = {depth}
checkpoint = "dino.safetensors"
{extra}
"""


# -- the contract, as the spec resolves it -----------------------------------------------------------


def _contract(plugins, write_spec, teachers: str, tmp_path):
    _write_images(tmp_path)
    spec = load_spec(write_spec(_spec_text(teachers, "")), plugins)
    return spec, build_plan(spec, plugins)


def test_a_loaded_zoo_teacher_gets_its_published_input(plugins, write_spec, tmp_path):
    (tmp_path / "dino.safetensors").write_bytes(b"")  # validate and plan only check that it exists
    spec, plan = _contract(plugins, write_spec, DINO_S16.format(depth=1, extra=""), tmp_path)
    assert spec.teacher_inputs["dino"] == {"input_size": 224, "channels": 3, "mean": IMAGENET_MEAN,
                                           "std": IMAGENET_STD, "interpolation": "bicubic"}
    config = plan.steps[0].pass_.config
    assert (config.image_size, config.channels) == (224, 3) and config.input == spec.teacher_inputs["dino"]


def test_clip_gets_its_own_statistics(plugins, write_spec, tmp_path):
    (tmp_path / "clip.pt").write_bytes(b"")
    spec, _ = _contract(plugins, write_spec, '[[teachers]]\nname = "clip"\narch = "clip_vitb32"\n'
                                             'checkpoint = "clip.pt"\n', tmp_path)
    contract = spec.teacher_inputs["clip"]
    assert contract["input_size"] == 224 and contract["mean"][0] == pytest.approx(0.48145466)
    assert contract["std"][2] == pytest.approx(0.27577711)


def test_every_key_overrides_its_default(plugins, write_spec, tmp_path):
    (tmp_path / "dino.safetensors").write_bytes(b"")
    extra = 'input_size = 96\ninterpolation = "bilinear"\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]'
    spec, _ = _contract(plugins, write_spec, DINO_S16.format(depth=1, extra=extra), tmp_path)
    assert spec.teacher_inputs["dino"] == {"input_size": 96, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                                           "interpolation": "bilinear"}


def test_a_self_trained_teacher_keeps_the_data_and_its_old_key(plugins, write_spec):
    """The plain data needs no contract in the config: the key is the one from before contracts."""
    spec = load_spec(write_spec(tiny_spec_text()), plugins)
    assert spec.teacher_inputs["vit"] == {"input_size": 8, "channels": 1, "mean": [0.0], "std": [1.0],
                                          "interpolation": "bicubic"}
    config = build_plan(spec, plugins).steps[0].pass_.config
    assert "input" not in config.model_dump(mode="json") and config.image_size == 8


def test_a_self_trained_zoo_teacher_does_not_take_the_published_input(plugins, write_spec):
    text = tiny_spec_text().replace('arch = "vit_tiny_patch4"', 'arch = "dino_vits16"\npatch_size = 4\nembed_dim = 32')
    spec = load_spec(write_spec(text), plugins)
    assert spec.teacher_inputs["vit"]["input_size"] == 8


@pytest.mark.parametrize("extra, problem", [
    ("mean = [0.5, 0.5]", "teachers[0].mean: 2 values for a 3-channel teacher input"),
    ("channels = 1", "teachers[0].channels: 1 channel(s), but the default mean/std have 3 values"),
    ("std = [0.0, 1.0, 1.0]", "teachers[0].std.0"),
    ("input_size = 2", "teachers[0].input_size"),
    ('interpolation = "lanczos"', "teachers[0].interpolation"),
])
def test_an_inconsistent_contract_names_its_key(plugins, write_spec, tmp_path, extra, problem):
    (tmp_path / "dino.safetensors").write_bytes(b"")
    _write_images(tmp_path)
    with pytest.raises(SpecError, match=problem.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_spec(write_spec(_spec_text(DINO_S16.format(depth=1, extra=extra), "")), plugins)


def test_the_contract_is_in_the_teacher_key(plugins, write_spec, tmp_path):
    (tmp_path / "dino.safetensors").write_bytes(b"")
    keys = []
    for extra in ("", "mean = [0.5, 0.5, 0.5]", "input_size = 112"):
        _, plan = _contract(plugins, write_spec, DINO_S16.format(depth=1, extra=extra), tmp_path)
        keys.append(plan.steps[0].key)
    assert len(set(keys)) == 3


# -- the view itself ------------------------------------------------------------------------------


def test_a_grey_view_is_repeated_resized_and_normalised():
    x = torch.rand(2, 1, 16, 16)
    contract = {"input_size": 32, "channels": 3, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "interpolation": "bicubic"}
    y = to_teacher_input(x, contract)
    assert y.shape == (2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    for c in range(3):
        torch.testing.assert_close(y[:, c:c + 1], (resized - IMAGENET_MEAN[c]) / IMAGENET_STD[c])


def test_shrinking_is_antialiased_and_rgb_to_grey_is_luma():
    x = torch.zeros(1, 3, 8, 8)
    x[:, :, ::2] = 1.0  # stripes one pixel high: a plain subsample keeps only one colour
    y = to_teacher_input(x, {"input_size": 4, "channels": 1, "mean": [0.0], "std": [1.0], "interpolation": "bilinear"})
    assert y.shape == (1, 1, 4, 4)
    assert 0.3 < float(y.mean()) < 0.7  # antialiased: the stripes average out
    same = to_teacher_input(torch.ones(1, 3, 4, 4) * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1),
                            {"input_size": 4, "channels": 1, "mean": [0.0], "std": [1.0], "interpolation": "bicubic"})
    torch.testing.assert_close(same, torch.full((1, 1, 4, 4), 0.299))


def test_the_view_feeds_every_call_and_passes_attributes_through(plugins):
    teacher = plugins.teachers.get("dino_vits16")(image_size=64, depth=1, embed_dim=64).eval()
    contract = {"input_size": 64, "channels": 3, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "interpolation": "bicubic"}
    view = TeacherView(teacher, contract).eval()
    x = torch.rand(2, 1, 16, 16)
    prepared = to_teacher_input(x, contract)
    with torch.no_grad():
        torch.testing.assert_close(view.embed(x), teacher.embed(prepared))
        torch.testing.assert_close(view.patch_tokens(x), teacher.patch_tokens(prepared))
        torch.testing.assert_close(view.forward_hidden(x, [0])[0], teacher.forward_hidden(prepared, [0])[0])
    assert (view.embed_dim, view.grid, view.num_blocks) == (64, 4, 1)


def compile_(path, **kwargs):
    return compile_spec(path, progress=SilentProgress(), **kwargs)


# -- compiles: every pass that runs a teacher feeds it its own view ----------------------------------------


def _metrics(folder):
    return json.loads((folder / "build" / "teacher-input" / "report.json").read_text())["metrics"]


def test_feature_distillation_and_the_probe_feed_a_224_px_dino(plugins, write_spec, tmp_path):
    _write_images(tmp_path)
    _save_teacher(plugins, tmp_path, "dino_vits16", "dino.safetensors", image_size=224, depth=2)
    passes = """
        [[passes]]
        use = "distill.feature"
        teacher = "dino"
        epochs = 1
        batch_size = 16
        projector_hidden = 0

        [[passes]]
        use = "eval.linear-probe"
        teachers = ["dino"]
        gate = "off"  # random images: the probe is at chance by design
        """
    path = write_spec(_spec_text(DINO_S16.format(depth=2, extra=""), passes))
    compile_(path, until="eval.linear-probe")
    metrics = _metrics(tmp_path)["distill.feature"]
    assert metrics["teacher_input"] == [3, 224, 224] and metrics["teacher_grid"] == [14, 14]
    probe = _metrics(tmp_path)["eval.linear-probe"]
    assert probe["teacher_input"] == [3, 224, 224] and 0.0 <= probe["teachers"]["dino"] <= 1.0
    files = list((tmp_path / ".distillc-cache").rglob("teacher-targets/*.npy"))
    assert len(files) == 1  # the targets, memory-mapped when read, and beside them what they hold
    assert np.load(files[0], mmap_mode="r").shape == (24, 384)
    assert json.loads(files[0].with_suffix(".json").read_text())["input"]["input_size"] == 224


def test_two_teachers_of_different_native_sizes_each_get_their_own_view(plugins, write_spec, tmp_path):
    """CoMAD with a 224-px ViT-S/16 and a narrow MAE fed 112 px: each its own input shape and grid;
    the MAE checkpoint (saved at 224) loads with its position grid resampled to 7x7."""
    _write_images(tmp_path)
    _save_teacher(plugins, tmp_path, "dino_vits16", "dino.safetensors", image_size=224, depth=1)
    _save_teacher(plugins, tmp_path, "mae_vitb16", "mae.safetensors", image_size=224, depth=1, embed_dim=64)
    teachers = DINO_S16.format(depth=1, extra="") + """
        [[teachers]]
        name = "mae"
        arch = "mae_vitb16"
        depth = 1
        embed_dim = 64
        input_size = 112
        checkpoint = "mae.safetensors"
        """
    passes = """
        [[passes]]
        use = "distill.comad"
        teachers = ["dino", "mae"]
        epochs = 1
        batch_size = 16
        """
    compile_(write_spec(_spec_text(teachers, passes)), until="distill.comad")
    metrics = _metrics(tmp_path)
    comad = metrics["distill.comad"]
    assert comad["teacher_input"] == {"dino": [3, 224, 224], "mae": [3, 112, 112]}
    assert comad["teacher_grid"] == {"dino": [14, 14], "mae": [7, 7]}
    assert comad["grid"] == 8  # the finest teacher grid (14) that tiles the 16-px student image
    assert any(change.startswith("pos_embed") for change in metrics["teacher:mae"]["adapted"])


def test_ca_dssl_bootleg_matryoshka_and_qat_each_feed_the_teacher_its_view(plugins, write_spec, tmp_path):
    """The other passes that run a teacher, chained on one spec: each reports the 224-px input and the
    14x14 grid; Bootleg masks the 16-px student on the finest grid that tiles it (8), CA-DSSL samples
    the 14x14 map on its stages' grids, and QAT keeps the Matryoshka objective against the teacher."""
    _write_images(tmp_path)
    _save_teacher(plugins, tmp_path, "dino_vits16", "dino.safetensors", image_size=224, depth=1)
    passes = """
        [[passes]]
        use = "distill.ca-dssl"
        teacher = "dino"
        epochs = 1
        batch_size = 16
        teacher_views = 1
        projector_hidden = 0

        [[passes]]
        use = "distill.bootleg"
        teacher = "dino"
        epochs = 1
        batch_size = 16
        predictor_hidden = 0

        [[passes]]
        use = "matryoshka"
        teacher = "dino"
        dims = [8, 16]
        epochs = 1
        batch_size = 16

        [[passes]]
        use = "quantize.brevitas-qat"
        epochs = 1
        batch_size = 16
        calib_images = 8
        probe = false
        gate = "off"  # random images and one epoch: a collapsed student is expected here
        """
    compile_(write_spec(_spec_text(DINO_S16.format(depth=1, extra=""), passes)), until="quantize.brevitas-qat")
    metrics = _metrics(tmp_path)
    for step in ("distill.ca-dssl", "distill.bootleg", "matryoshka", "quantize.brevitas-qat"):
        assert metrics[step]["teacher_input"] == [3, 224, 224], step
        assert metrics[step]["teacher_grid"] == [14, 14], step
    assert metrics["distill.bootleg"]["mask_grid"] == 8
