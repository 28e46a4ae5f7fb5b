"""Bad input and a faulty environment are user errors: one ``error:`` line naming the key path or
the file and what to do, exit status 2, values shortened, nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import math
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distillc.cli import app
from distillc.errors import PassError, WorkspaceError
from tests.conftest import TINY_HEADER, tiny_spec_text
from tests.spec_fuzzing import time_limit

runner = CliRunner()
TRAIN = "train = { epochs = 1, batch_size = 256, lr = 3e-3 }"
STUDENT = 'arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32'
#: A spec whose first step is the student (no teacher to train first): fast to compile --until student.
STUDENT_ONLY = TINY_HEADER.format(name="tiny") + f"\n[student]\n{STUDENT}\n"


def invoke(*args: str, **env: str):
    with time_limit(120):  # before these fixes, validating /dev/zero as a checkpoint never ended
        return runner.invoke(app, list(args), env={"COLUMNS": "200", **env})


def one_error(result, *wanted: str) -> str:
    """The single error line of ``result`` (exit status 2), holding every ``wanted`` text."""
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for text in wanted:
        assert text in errors[0], errors[0]
    assert len(errors[0]) <= 400
    return errors[0]


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string (\u0000 included)


# -- paths a spec names ----------------------------------------------------------------------------

BAD_PATHS = {
    "a folder": ("adir", "is a folder"),
    "the filesystem root": ("/", "is a folder"),
    "the parent folder": ("..", "is a folder"),
    "an unreadable file": ("/proc/self/mem", "cannot read"),
    "a device": ("/dev/zero", "not a regular file"),
    "a name too long": ("x" * 300 + ".pt", "path too long"),
    "a path too long": ("a/" * 2500 + "w.pt", "path too long"),
    "a NUL byte": ("a\x00b.pt", "NUL byte"),
}


@pytest.mark.parametrize("case", BAD_PATHS)
@pytest.mark.parametrize("key", ["teachers[0].checkpoint", "student.checkpoint", "student.onnx"])
def test_a_bad_checkpoint_or_onnx_path_is_one_error_naming_the_key(write_spec, tmp_path, case, key):
    (tmp_path / "adir").mkdir()
    value, problem = BAD_PATHS[case]
    text = tiny_spec_text()
    if key == "teachers[0].checkpoint":
        text = text.replace(TRAIN, f"checkpoint = {toml_string(value)}")
    elif key == "student.checkpoint":
        text = text.replace(STUDENT, f"{STUDENT}\ncheckpoint = {toml_string(value)}")
    else:
        text = text.replace(STUDENT, f"onnx = {toml_string(value)}").split("[[passes]]")[0]
    started = time.perf_counter()
    line = one_error(invoke("validate", str(write_spec(text))), f"error: {key}: ", problem)
    assert time.perf_counter() - started < 10
    assert len(line) < 300  # the 5,000-character path is echoed shortened


@pytest.mark.parametrize("value, problem", [("/dev/zero", "not a regular file"), ("adir", "is a folder"),
                                            ("a\x00b.npy", "NUL byte"), ("x" * 5000, "path too long"),
                                            ("missing.npy", "file not found")])
def test_a_bad_class_embeddings_file_of_a_pass_is_one_error_naming_the_pass(write_spec, tmp_path, value, problem):
    (tmp_path / "adir").mkdir()
    example = Path(__file__).resolve().parents[1] / "examples" / "clip-matryoshka" / "spec.toml"
    text = example.read_text().replace('class_embeddings = "prototypes"',
                                       f'class_embeddings = "file"\nembeddings_file = {toml_string(value)}')
    one_error(invoke("validate", str(write_spec(text))), "error: passes[0]: embeddings_file: ", problem)


@pytest.mark.parametrize("source, value, problem", [
    ("npz", "/", "is a folder (source 'npz' reads a file)"),
    ("npz", "..", "is a folder"),
    ("npz", "/proc/self/mem", "cannot read"),
    ("npz", "/dev/zero", "not a regular file"),
    ("npz", "a\x00b.npz", "NUL byte"),
    ("image-folder", "/", "is the filesystem root"),
    ("image-folder", "spec.toml", "is a file (source 'image-folder' reads a folder)"),
    ("cifar", "x" * 5000, "path too long"),
])
def test_a_bad_data_path_is_one_error_naming_the_key(write_spec, source, value, problem):
    text = tiny_spec_text().replace('source = "sklearn-digits"', f"source = {toml_string(source)}\n"
                                                                 f"path = {toml_string(value)}")
    one_error(invoke("validate", str(write_spec(text))), "error: data.path: ", problem)


# -- the TOML file itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("line, problem", [
    ("deep = " + "[" * 1000 + "]" * 1000, "brackets nested more than 32 deep"),
    ("deep = " + "{a = " * 1000 + "1" + "}" * 1000, "brackets nested more than 32 deep"),
    (".".join(["a"] * 10_000) + " = 1", "a key of more than 32 dotted parts"),
    ("[" + ".".join(["a"] * 10_000) + "]", "a key of more than 32 dotted parts"),
])
def test_deep_nesting_is_refused_at_once(write_spec, line, problem):
    path = write_spec(line + "\n" + tiny_spec_text())
    started = time.perf_counter()
    one_error(invoke("validate", str(path)), f"error: {path}: line 1: ", problem)
    assert time.perf_counter() - started < 5  # a 10,000-part dotted key took about a minute to parse


def test_nesting_through_dotted_keys_and_brackets_is_bounded_too(write_spec):
    deep = ".".join(["a"] * 20) + " = " + "[" * 20 + "]" * 20
    one_error(invoke("validate", str(write_spec(tiny_spec_text() + deep + "\n"))),
              "nested more than 32 deep", "error: target.a.a.a")


def test_a_huge_table_or_array_is_refused_without_listing_every_entry(write_spec):
    text = tiny_spec_text().replace(STUDENT, f"{STUDENT}\nhidden_channels = [{', '.join(['8'] * 20_000)}]")
    one_error(invoke("validate", str(write_spec(text))), "student.hidden_channels: 20000 entries")


def test_a_1_mb_value_is_echoed_shortened(write_spec):
    text = tiny_spec_text().replace('name = "tiny"', f'name = "{"x" * 1_000_000}"')
    line = one_error(invoke("validate", str(write_spec(text))), "distillc.name: String should have at most 64",
                     "xxx...xxx")
    assert len(line) < 200


def test_a_value_that_looks_like_markup_is_printed_as_it_is(write_spec):
    text = tiny_spec_text().replace('name = "tiny"', r'name = "a\\[/]b"')
    one_error(invoke("validate", str(write_spec(text))), "distillc.name:", r"a\\[/]b")


def test_a_device_as_the_spec_is_refused(tmp_path):
    one_error(invoke("validate", "/dev/zero"), "/dev/zero is not a regular file")


# -- values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, key", [
    ("lr = 3e-3 }", "lr = 3e-3, weight_decay = inf }", "teachers[0].train.weight_decay"),
    ("val_fraction = 0.25", "val_fraction = nan", "data.val_fraction"),
    ("width = 0.35", "width = inf", "student.width"),
    ("c = 1.0", "c = nan", "passes[1].c"),
    ("projector_hidden = 0", "projector_hidden = 0\nlr = -inf", "passes[0].lr"),
    ('use = "host"', 'use = "host"\nbackend = { "export.onnx" = { tolerance = inf } }',
     "target.backend.export.onnx.tolerance"),
])
def test_infinite_and_nan_floats_are_refused_everywhere(write_spec, old, new, key):
    text = tiny_spec_text(qat_gate=True)  # validate only: no [target] backend table of the fixture's own
    assert old in text
    one_error(invoke("validate", str(write_spec(text.replace(old, new)))), f"error: {key}: ",
              "Input should be a finite number")


@pytest.mark.parametrize("old, new, key", [
    ("depth = 1", "depth = 1000000000000000000", "teachers[0].depth"),
    ("depth = 1", "depth = 1\nembed_dim = 100000", "teachers[0]"),
    ("width = 0.35", "width = 1000.0", "student.width"),
    ("last_channels = 32", "last_channels = 32\nstem_stride = 3", "student.stem_stride"),
    ("last_channels = 32", "last_channels = 32\nhidden_channels = [8, 8]", "student.hidden_channels"),
])
def test_architecture_options_have_bounds_checked_by_validate(write_spec, old, new, key):
    text = tiny_spec_text().replace(old, new)
    if key == "teachers[0]":  # vit_tiny_patch4 takes no embed_dim: the zoo name does
        text = text.replace('arch = "vit_tiny_patch4"', 'arch = "dino_vits16"\npatch_size = 4')
        key = "teachers[0].embed_dim"
    started = time.perf_counter()
    one_error(invoke("validate", str(write_spec(text))), f"error: {key}: ")
    assert time.perf_counter() - started < 10


def test_the_qemu_board_is_checked_by_validate(write_spec):
    text = tiny_spec_text(target="stm32h7", target_options='backend = { "verify.qemu" = { machine = "mps3" } }')
    one_error(invoke("validate", str(write_spec(text))), "error: target.backend.verify.qemu.machine: unknown QEMU board",
              "mps2-an386, mps2-an500", "(got 'mps3')")


# -- checkpoints ---------------------------------------------------------------------------------------

class NotWeights:
    """Pickled by a test into a checkpoint: a class torch.load(weights_only=True) refuses."""


def test_an_unsafe_checkpoint_is_one_line_without_advice_to_load_it_unsafely(write_spec, tmp_path):
    import torch

    torch.save({"weights": NotWeights()}, tmp_path / "unsafe.pt")
    text = tiny_spec_text().replace(TRAIN, 'checkpoint = "unsafe.pt"')
    result = invoke("compile", str(write_spec(text)), "--until", "teacher:vit")
    one_error(result, "unsafe.pt' holds more than tensors and plain containers", "NotWeights",
              "convert it to .safetensors")
    for advice in ("weights_only", "safe_globals", "trust"):
        assert advice not in result.output


def test_a_3_channel_teacher_checkpoint_loads_into_a_1_channel_model_with_a_notice(write_spec, tmp_path):
    from distillc.plugin_manager import load_plugins

    teacher = load_plugins().teachers.get("vit_tiny_patch4")(image_size=8, in_chans=3, depth=1)
    import torch

    torch.save(teacher.state_dict(), tmp_path / "rgb.pt")
    path = write_spec(tiny_spec_text().replace(TRAIN, 'checkpoint = "rgb.pt"'))  # [data] channels = 1
    result = invoke("compile", str(path), "--until", "teacher:vit")
    assert result.exit_code == 0, result.output
    notice = "teacher:vit: checkpoint adapted: patch_embed.proj.weight (192, 3, 4, 4) -> (192, 1, 4, 4)"
    assert notice in result.output and "RGB kernels summed" in result.output
    report = json.loads((path.parent / "build" / "tiny" / "report.json").read_text())
    assert report["metrics"]["teacher:vit"]["adapted"][0].startswith("patch_embed.proj.weight")


def test_a_3_channel_student_checkpoint_is_refused_by_a_1_channel_model(write_spec, tmp_path):
    from distillc.plugin_manager import load_plugins

    student = load_plugins().students.get("mobilenetv2")(image_size=8, in_chans=3, width=0.35, last_channels=32)
    import torch

    torch.save(student.state_dict(), tmp_path / "rgb.pt")
    text = STUDENT_ONLY.replace(STUDENT, f'{STUDENT}\ncheckpoint = "rgb.pt"')
    one_error(invoke("compile", str(write_spec(text)), "--until", "student"),
              "rgb.pt' does not fit MobileNetV2", "stem.conv.weight: checkpoint (16, 3, 3, 3) vs model (16, 1, 3, 3)")


# -- training ------------------------------------------------------------------------------------------

class _Recorder:
    def task(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, *args, **kwargs):
        pass


def test_a_training_loss_that_turns_nan_fails_before_it_is_checkpointed(tmp_path):
    import torch

    from distillc.training import CHECKPOINT_FILE, run_epochs

    model = torch.nn.Linear(2, 2)
    losses = [0.5, math.nan]
    with pytest.raises(PassError, match=r"pass 'distill.feature': training diverged: the loss is nan at epoch 2 of 3"):
        run_epochs(progress=_Recorder(), checkpoint_dir=tmp_path, description="distill", epochs=3,
                   state={"model": model}, epoch_fn=lambda epoch: (losses[epoch], 4), step="distill.feature")
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] == 1 and saved["losses"] == [0.5]  # the last good epoch stays resumable


def test_training_whose_weights_turn_nan_fails_even_with_a_finite_loss(tmp_path):
    import torch

    from distillc.training import run_epochs

    model = torch.nn.Linear(2, 2)

    def epoch(index: int) -> tuple[float, int]:
        with torch.no_grad():
            model.weight[0, 0] = math.inf  # an optimizer step that overflowed after the last loss
        return 0.25, 4

    with pytest.raises(PassError, match=r"model weight holds NaN or infinite values after epoch 1 of 1"):
        run_epochs(progress=_Recorder(), checkpoint_dir=tmp_path, description="train teacher:vit", epochs=1,
                   state={"model": model}, epoch_fn=epoch)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_a_workspace_error(tmp_path, monkeypatch):
    import torch

    from distillc.training import run_epochs

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WorkspaceError, match="cannot write the training checkpoint .* free some space"):
        run_epochs(progress=_Recorder(), checkpoint_dir=tmp_path, description="d", epochs=1,
                   state={"model": torch.nn.Linear(2, 2)}, epoch_fn=lambda epoch: (0.5, 4))
    assert not any(tmp_path.iterdir())  # no half-written temporary file


# -- the cache and the work directory ----------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "plan", "compile"])
def test_a_cache_that_names_a_file_is_one_error(write_spec, tmp_path, command):
    (tmp_path / "a-file").write_text("x")
    for cache, where in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "cache", "is inside")):
        result = invoke(command, str(write_spec(tiny_spec_text())), DISTILLC_CACHE=str(cache))
        one_error(result, f"error: the cache {cache} {where}", "a file, not a folder", "DISTILLC_CACHE")


def test_a_workdir_that_names_a_file_is_one_error(write_spec, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = invoke("compile", str(write_spec(STUDENT_ONLY)), "--workdir", str(tmp_path / "a-file"),
                    "--until", "student")
    one_error(result, f"error: the work directory {tmp_path / 'a-file'} is a file", "--workdir")


def test_a_read_only_cache_is_one_error_before_anything_runs(write_spec, tmp_path, monkeypatch):
    cache = tmp_path / "ro-cache"
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # as root, chmod cannot make a folder read-only
        if dir is not None and Path(dir) == cache:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = invoke("compile", str(write_spec(STUDENT_ONLY)), "--until", "student", DISTILLC_CACHE=str(cache))
    one_error(result, f"error: the cache {cache} cannot be written (Read-only file system)", "DISTILLC_CACHE")
    assert "running" not in result.output


def test_a_full_disk_inside_a_pass_is_one_error_and_stores_nothing(write_spec, monkeypatch):
    from distillc.passes.sources import StudentInit

    def full(self, artifact, ctx):
        (ctx.scratch / "weights.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.scratch / "weights.bin"))

    monkeypatch.setattr(StudentInit, "run", full)
    path = write_spec(STUDENT_ONLY)
    result = invoke("compile", str(path), "--until", "student")
    one_error(result, "weights.bin: no space left on the disk", "free some space")
    assert not stored(path, "student")


def stored(spec_path: Path, step_id: str) -> bool:
    from distillc.plan import build_plan
    from distillc.plugin_manager import load_plugins
    from distillc.spec import load_spec

    plugins = load_plugins()
    plan = build_plan(load_spec(spec_path, plugins), plugins)
    return plan.store.has(plan.step(step_id, option="test").key)


def test_a_full_disk_while_storing_leaves_no_half_entry(write_spec, monkeypatch):
    from distillc.artifacts import TorchModel

    def full(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(TorchModel, "save", full)
    path = write_spec(STUDENT_ONLY)
    one_error(invoke("compile", str(path), "--until", "student"), "no space left on the disk")
    assert not stored(path, "student")
    tmp = path.parent / ".distillc-cache" / "tmp"
    assert not tmp.exists() or not [p for p in tmp.rglob("*") if p.is_file()]


# -- bundles -----------------------------------------------------------------------------------------

MANIFEST = {"input": {"shape": [1, 1, 8, 8], "dtype": "int8", "scale": 0.01, "zero_point": 0},
            "output": {"shape": [1, 32], "dtype": "int8", "scale": 0.1, "zero_point": 3}}


@pytest.mark.parametrize("content, problem", [
    ("", "not a readable manifest"),
    ("{", "not a readable manifest"),
    ("[" * 100_000, "not a readable manifest"),
    ("[]", "not a manifest"),
    ("{}", "not a manifest"),
    ('{"memory": 5}', "unexpected content"),
])
def test_inspect_of_a_broken_or_empty_manifest_is_one_error(tmp_path, content, problem):
    (tmp_path / "manifest.json").write_text(content)
    one_error(invoke("inspect", str(tmp_path)), f"{tmp_path / 'manifest.json'}: {problem}", "compile the bundle again")


@pytest.mark.parametrize("manifest", [{"output": MANIFEST["output"]},
                                      {**MANIFEST, "input": {"shape": [1, 8], "scale": math.nan, "zero_point": 0}},
                                      {**MANIFEST, "input": {"shape": "1x8", "scale": 1.0, "zero_point": 0}}])
def test_run_of_a_manifest_without_its_input_is_one_error(tmp_path, manifest):
    import numpy as np

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    result = invoke("run", str(tmp_path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"))
    one_error(result, "manifest.json: 'input' needs a shape (positive integers), a scale and a zero_point")


def test_run_with_output_in_a_missing_folder_is_one_error_before_building(tmp_path):
    import numpy as np

    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    target = tmp_path / "missing" / "y.npy"
    result = invoke("run", str(tmp_path), "--input", str(tmp_path / "x.npy"), "--output", str(target))
    one_error(result, f"--output {target}: folder {target.parent} does not exist; create it first")
    folder = invoke("run", str(tmp_path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path))
    one_error(folder, "is a folder; give a .npy file name")
