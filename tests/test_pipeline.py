"""The typed pass pipeline and its build cache, proven by counting which passes ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import distillc
from distillc.cache import ArtifactStore
from distillc.errors import SpecError
from distillc.plan import build_plan
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

#: The host target's INT8 backend, appended after the spec's own passes.
HOST_BACKEND = ["quantize.brevitas-qat", "export.onnx", "simplify.onnxsim", "tvm.int8", "plan-memory", "codegen.c",
                "verify.host"]
ALL_STEPS = ["teacher:vit", "student", "distill.feature", "eval.linear-probe", *HOST_BACKEND]
#: What re-runs when the last spec pass (the probe) changes: it and everything after it.
FROM_PROBE = ALL_STEPS[ALL_STEPS.index("eval.linear-probe"):]


def compile_(path: Path, **kwargs):
    return compile_spec(path, progress=SilentProgress(), **kwargs)


@pytest.fixture(scope="module")
def compiled(module_folder):
    """The tiny spec compiled once from an empty cache: ``(folder, result)``.  Tests that start from
    a full cache copy the folder (spec, cache and build) with :func:`warm_spec`."""
    path = module_folder / "compiled" / "spec.toml"
    path.parent.mkdir()
    path.write_text(tiny_spec_text())
    return path.parent, compile_(path)


@pytest.fixture
def warm_spec(compiled, tmp_path):
    """A copy of :func:`compiled`'s folder: its spec, with every step already in its cache."""
    folder = shutil.copytree(compiled[0], tmp_path / "warm")
    return folder / "spec.toml"


def test_first_compile_runs_every_pass_and_writes_report(compiled):
    folder, result = compiled
    path = folder / "spec.toml"
    assert result.ran == ALL_STEPS
    report = json.loads((path.parent / "build" / "tiny" / "report.json").read_text())
    assert [row["id"] for row in report["plan"]] == ALL_STEPS
    assert all(row["status"] == "ran" for row in report["plan"])
    probe = report["metrics"]["eval.linear-probe"]
    assert 0.0 <= probe["top1"] <= 1.0 and 0.0 <= probe["teachers"]["vit"] <= 1.0
    assert Path(report["outputs"]["onnx"]).is_file()
    assert result.final_path == path.parent / "build" / "tiny" / "bundle"


def test_unchanged_spec_runs_nothing_and_is_ten_times_faster(compiled, warm_spec):
    first = compiled[1]
    second = compile_(warm_spec)
    assert second.ran == []
    assert [row["status"] for row in second.report["plan"]] == ["cached"] * len(ALL_STEPS)
    assert second.report["total_seconds"] < first.report["total_seconds"] / 10
    assert second.report["metrics"] == first.report["metrics"]


def test_changing_a_later_pass_reruns_only_it_and_what_follows(warm_spec):
    path = warm_spec
    path.write_text(tiny_spec_text(probe_c=0.5))
    assert compile_(path).ran == FROM_PROBE


def test_changing_the_target_never_retrains(warm_spec):
    path = warm_spec
    path.write_text(tiny_spec_text(target="stm32h7", target_options="flash_kb = 1024"))
    ran = compile_(path).ran
    assert not {"teacher:vit", "student", "distill.feature"} & set(ran)


def test_until_stops_after_the_named_pass(write_spec):
    path = write_spec(tiny_spec_text())
    result = compile_(path, until="distill.feature")
    assert result.ran == ["teacher:vit", "student", "distill.feature"]
    statuses = {row["id"]: row["status"] for row in result.report["plan"]}
    assert statuses["export.onnx"] == "not run (--until)"
    assert result.final_path == path.parent / "build" / "tiny"
    assert compile_(path).ran == FROM_PROBE


def test_force_reruns_one_pass_and_everything_after_it(warm_spec):
    path = warm_spec
    assert compile_(path).ran == []
    assert compile_(path, force="eval.linear-probe").ran == FROM_PROBE
    assert compile_(path).ran == []


def test_unknown_until_or_force_names_the_valid_steps(write_spec):
    path = write_spec(tiny_spec_text())
    with pytest.raises(SpecError, match="--until: unknown pass 'distil'.*distill.feature"):
        compile_(path, until="distil")


def test_type_mismatch_is_a_plan_error_naming_both_passes(write_spec, tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"not really onnx")
    text = tiny_spec_text().replace('arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32', 'onnx = "student.onnx"')
    plugins = load_plugins()
    spec = load_spec(write_spec(text), plugins)
    with pytest.raises(SpecError) as info:
        build_plan(spec, plugins)
    message = str(info.value)
    assert "passes[0]" in message and "'distill.feature' takes TorchModel" in message
    assert "'student'" in message and "makes OnnxModel" in message


def test_plan_lists_target_backend_passes_and_cache_status(write_spec):
    path = write_spec(tiny_spec_text())
    plugins = load_plugins()
    plan = build_plan(load_spec(path, plugins), plugins)
    assert [s.id for s in plan.steps] == ALL_STEPS
    assert [s.source for s in plan.steps][-2:] == ["target host", "target host"]
    assert not any(s.cached for s in plan.steps)
    compile_(path, until="student")
    plan = build_plan(load_spec(path, plugins), plugins)
    assert [s.cached for s in plan.steps] == [True, True] + [False] * (len(ALL_STEPS) - 2)


def test_cache_entries_carry_provenance(warm_spec):
    result = compile_(warm_spec)  # all cached: the records are the first compile's
    store = result.plan.store
    step = next(s for s in result.plan.steps if s.id == "distill.feature")
    record = store.record(step.key)
    assert record["key"] == step.key and len(step.key) == 64
    assert record["pass"] == "distill.feature" and record["version"] == "1"
    assert record["config"]["teacher"] == "vit"
    assert record["teachers"]["vit"] == result.plan.steps[0].key
    assert record["input"] == result.plan.steps[1].key
    assert record["versions"]["distillc"] == distillc.__version__ and "torch" in record["versions"]
    assert record["artifact"]["kind"] == "TorchModel"


def test_cache_key_changes_with_pass_version(write_spec, monkeypatch):
    path = write_spec(tiny_spec_text())
    plugins = load_plugins()
    before = build_plan(load_spec(path, plugins), plugins).steps[2].key
    monkeypatch.setattr(plugins.passes.get("distill.feature"), "version", "2")
    after = build_plan(load_spec(path, plugins), plugins).steps
    assert after[2].key != before
    assert after[0].key == build_plan(load_spec(path, load_plugins()), load_plugins()).steps[0].key


def test_a_crashing_pass_leaves_no_cache_entry(write_spec, monkeypatch):
    path = write_spec(tiny_spec_text())
    plugins = load_plugins()
    probe = plugins.passes.get("eval.linear-probe")

    def boom(self, artifact, ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(probe, "run", boom)
    with pytest.raises(Exception, match="simulated crash"):
        compile_(path, plugins=plugins)
    plan = build_plan(load_spec(path, plugins), plugins)
    cached = {s.id: s.cached for s in plan.steps}
    assert cached["distill.feature"] and not cached["eval.linear-probe"]
    assert not any(plan.store.root.joinpath("tmp").iterdir())


def test_interrupted_training_resumes_from_the_last_finished_epoch(write_spec, monkeypatch):
    path = write_spec(tiny_spec_text(distill_epochs=3))
    import distillc.training as training

    real = training.run_epochs
    calls: list[list[int]] = []

    def run_epochs(**kwargs):
        fn = kwargs["epoch_fn"]
        epochs_seen: list[int] = []
        calls.append(epochs_seen)
        crash = kwargs["description"] == "distill.feature" and len(calls) == 2

        def epoch_fn(epoch):
            epochs_seen.append(epoch)
            if crash and epoch == 2:
                raise KeyboardInterrupt
            return fn(epoch)

        return real(**{**kwargs, "epoch_fn": epoch_fn})

    monkeypatch.setattr(training, "run_epochs", run_epochs)
    with pytest.raises(KeyboardInterrupt):
        compile_(path)
    assert calls[1] == [0, 1, 2]
    result = compile_(path)
    assert calls[2] == [2]  # only the unfinished epoch runs again
    assert result.ran[0] == "distill.feature"


def test_an_interrupted_forced_run_resumes_with_the_same_command(write_spec, monkeypatch):
    """``compile --force teacher:vit`` stopped inside distill.feature: the same command again
    does not re-run the steps it already ran again and continues distill.feature from its last
    finished epoch.  Once a forced run has got to its end, the next one starts over."""
    path = write_spec(tiny_spec_text(distill_epochs=2))
    import distillc.training as training

    real = training.run_epochs
    calls: list[tuple[str, list[int]]] = []
    stop_at: list[tuple[str, int]] = [("distill.feature", 1)]

    def run_epochs(**kwargs):
        fn, description, seen = kwargs["epoch_fn"], kwargs["description"], []
        calls.append((description, seen))

        def epoch_fn(epoch):
            seen.append(epoch)
            if (description, epoch) in stop_at:
                stop_at.clear()
                raise KeyboardInterrupt
            return fn(epoch)

        return real(**{**kwargs, "epoch_fn": epoch_fn})

    monkeypatch.setattr(training, "run_epochs", run_epochs)
    with pytest.raises(KeyboardInterrupt):
        compile_(path, force="teacher:vit", until="distill.feature")
    assert calls == [("train teacher:vit", [0]), ("distill.feature", [0, 1])]
    calls.clear()
    resumed = compile_(path, force="teacher:vit", until="distill.feature")
    assert resumed.ran == ["distill.feature"]
    assert calls == [("distill.feature", [1])]  # only the unfinished epoch
    calls.clear()
    again = compile_(path, force="teacher:vit", until="distill.feature")
    assert again.ran == ["teacher:vit", "student", "distill.feature"]
    assert calls == [("train teacher:vit", [0]), ("distill.feature", [0, 1])]


def test_store_save_is_atomic_and_replace_swaps_entries(tmp_path):
    from distillc.artifacts import OnnxModel

    store = ArtifactStore(tmp_path / "cache")
    file = tmp_path / "m.onnx"
    file.write_bytes(b"one")
    store.save("ab" * 32, OnnxModel(path=file), {"metrics": {}})
    file.write_bytes(b"two")
    store.save("ab" * 32, OnnxModel(path=file), {"metrics": {}})  # same key: the first entry wins
    assert store.load("ab" * 32).path.read_bytes() == b"one"
    store.save("ab" * 32, OnnxModel(path=file), {"metrics": {}}, replace=True)
    assert store.load("ab" * 32).path.read_bytes() == b"two"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_moved_checkpoint_keeps_its_cache_key(write_spec, tmp_path):
    """Keys hold a checkpoint's content hash, not its location: moving a project retrains nothing."""
    from safetensors.torch import save_file

    from distillc.plugins.models.vit import build_vit

    state = build_vit("vit_tiny_patch4", img_size=8, in_chans=1, depth=1).state_dict()
    keys = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / folder / "vit.safetensors"))
        text = tiny_spec_text().replace("train = { epochs = 1, batch_size = 256, lr = 3e-3 }",
                                        'checkpoint = "vit.safetensors"')
        spec_path = tmp_path / folder / "spec.toml"
        spec_path.write_text(text)
        plugins = load_plugins()
        keys.append(build_plan(load_spec(spec_path, plugins), plugins).steps[0].key)
    assert keys[0] == keys[1]
    result = compile_(tmp_path / "a" / "spec.toml", until="teacher:vit")
    assert result.ran == ["teacher:vit"] and result.report["metrics"]["teacher:vit"]["params"] > 0


def test_resumed_training_shows_resumed_from_only_once(tmp_path):
    import io

    from rich.console import Console

    from distillc.progress import RichProgress
    from distillc.training import run_epochs

    def train(epoch_fn, progress):
        return run_epochs(progress=progress, checkpoint_dir=tmp_path, description="distill", epochs=4,
                          state={}, epoch_fn=epoch_fn)

    def crash_at_2(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return 1.0, 10

    with pytest.raises(KeyboardInterrupt):
        train(crash_at_2, SilentProgress())
    stream = io.StringIO()
    train(lambda epoch: (0.5, 10), RichProgress(Console(file=stream, force_terminal=False, width=200)))
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["distill: epoch 2/4", "distill: epoch 3/4", "distill: epoch 4/4"]
    assert sum("resumed from 2" in line for line in lines) == 1 and "resumed from" in lines[0]
    assert "loss" in lines[-1] and "resumed" not in lines[-1]


@pytest.mark.parametrize("damage", ["torn", "other-state"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_error_naming_it(tmp_path, damage):
    import torch

    from distillc.errors import PassError
    from distillc.training import CHECKPOINT_FILE, run_epochs

    def train(module, epoch_fn):
        return run_epochs(progress=SilentProgress(), checkpoint_dir=tmp_path, description="distill", epochs=3,
                          state={"model": module}, epoch_fn=epoch_fn, step="distill.feature")

    def crash_at_1(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return 1.0, 10

    with pytest.raises(KeyboardInterrupt):
        train(torch.nn.Linear(2, 2), crash_at_1)
    checkpoint = tmp_path / CHECKPOINT_FILE
    if damage == "torn":
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
        module = torch.nn.Linear(2, 2)
    else:  # the pass's model changed shape since the checkpoint was written
        module = torch.nn.Linear(3, 2)
    with pytest.raises(PassError, match=r"pass 'distill.feature': cannot resume from the training checkpoint "
                                        rf".*{CHECKPOINT_FILE} .*delete it to train this step from its first epoch"):
        train(module, lambda epoch: (0.5, 10))


def test_specs_differing_only_in_name_each_get_their_own_bundle_name(warm_spec):
    """The spec's name enters codegen.c's config (so its key): a second spec in the same folder (one
    cache) that differs only in name re-runs codegen.c and what follows, never training, and each
    bundle carries its own name."""
    first = warm_spec
    second = first.parent / "second.toml"
    second.write_text(tiny_spec_text().replace('name = "tiny"', 'name = "tiny-two"'))
    assert compile_(first).ran == []
    assert compile_(second).ran == ["codegen.c", "verify.host"]
    for name in ("tiny", "tiny-two"):
        bundle = first.parent / "build" / name / "bundle"
        assert json.loads((bundle / "manifest.json").read_text())["name"] == name
        assert f'#define DISTILLC_MODEL_NAME "{name}"' in (bundle / "include" / "distillc_model.h").read_text()


def test_a_pass_context_holds_no_spec():
    """A pass sees only what its cache key covers: the context has no door to the whole spec."""
    import dataclasses

    from distillc.pass_api import PassContext

    fields = {f.name for f in dataclasses.fields(PassContext)}
    assert "spec" not in fields and not hasattr(PassContext, "spec")
    assert "seed" in fields
