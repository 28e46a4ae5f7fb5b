"""Plugins: registries, built-ins through the same door, entry points, hooks, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import distillc
from distillc.errors import PluginError, SpecError
from distillc.pipeline import compile_spec
from distillc.plugin_manager import BUILTIN_PLUGINS, load_plugins
from distillc.progress import SilentProgress
from distillc.registry import Registry
from tests.conftest import tiny_spec_text

FIXTURE = Path(__file__).parent / "fixtures" / "distillc-prune-plugin"


def test_registry_refuses_duplicates_naming_both_plugins():
    registry = Registry("pass")
    registry.scoped("first").add("x", object())
    with pytest.raises(PluginError, match="plugin 'second' registered pass 'x', which plugin 'first' already registered"):
        registry.scoped("second").add("x", object())


def test_registry_answers_unknown_names_with_the_choices():
    registry = Registry("target")
    for name in ("host", "stm32h7"):
        registry.add(name, object(), plugin="p")
    with pytest.raises(SpecError, match=r"target\.use: unknown target 'stm32'.*valid: host, stm32h7"):
        registry.get("stm32", path="target.use")


def test_builtins_register_through_the_same_hooks_as_third_parties():
    plugins = load_plugins()
    registered = dict(plugins.pm.list_name_plugin())
    for module in BUILTIN_PLUGINS:
        assert module in registered
    origins = {entry.name: entry.plugin for entry in plugins.passes}
    assert origins["distill.feature"] == "distillc.passes.distill_feature"
    assert origins["teacher.train"] == "distillc.passes.sources"
    assert {e.name for e in plugins.targets} >= {"host", "stm32h7", "max78000"}


def test_each_compile_gets_a_new_plugin_manager():
    a, b = load_plugins(), load_plugins()
    assert a.pm is not b.pm and a.passes is not b.passes


class _Duplicate:
    __name__ = "dup-plugin"

    @distillc.hookimpl
    def distillc_register_passes(self, registry):
        from distillc.passes.eval_probe import LinearProbe

        registry.add(LinearProbe)


def test_a_plugin_reusing_a_builtin_name_is_refused():
    with pytest.raises(PluginError, match="'dup-plugin' registered pass 'eval.linear-probe'.*distillc.passes.eval_probe"):
        load_plugins([_Duplicate()])


class _Recorder:
    """Observer and wrapper hooks, as a plugin would write them."""

    __name__ = "recorder"

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    @distillc.hookimpl
    def distillc_pass_started(self, step):
        self.events.append(("started", step.id))

    @distillc.hookimpl
    def distillc_pass_finished(self, step, cached):
        self.events.append(("finished" if not cached else "cached", step.id))

    @distillc.hookimpl(wrapper=True)
    def distillc_run_pass(self, step, artifact, context):
        self.events.append(("wrap-in", step.id))
        result = yield
        self.events.append(("wrap-out", step.id))
        return result


def test_observer_and_wrapper_hooks_see_every_pass(write_spec):
    path = write_spec(tiny_spec_text())
    recorder = _Recorder()
    compile_spec(path, until="student", progress=SilentProgress(), plugins=load_plugins([recorder]))
    assert recorder.events == [
        ("started", "teacher:vit"), ("wrap-in", "teacher:vit"), ("wrap-out", "teacher:vit"), ("finished", "teacher:vit"),
        ("started", "student"), ("wrap-in", "student"), ("wrap-out", "student"), ("finished", "student"),
    ]
    recorder.events.clear()
    compile_spec(path, until="student", progress=SilentProgress(), plugins=load_plugins([recorder]))
    assert recorder.events == [("started", "teacher:vit"), ("cached", "teacher:vit"), ("started", "student"),
                               ("cached", "student")]


def _fake_distribution(site: Path, module_source: str) -> None:
    """A minimal installed distribution with one ``distillc`` entry point, on ``site``."""
    (site / "broken_plugin.py").write_text(module_source)
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distillc]\nbroken = broken_plugin\n")


def test_a_failing_plugin_is_reported_by_name_and_entry_point(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match=r"plugin 'broken' \(entry point 'broken_plugin'\) failed to load: ImportError: needs libfoo"):
        load_plugins()
    monkeypatch.setenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "broken" not in dict(load_plugins().pm.list_name_plugin())


def test_a_plugin_failing_inside_a_hook_is_named(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, textwrap.dedent("""
        import distillc

        @distillc.hookimpl
        def distillc_register_targets(registry):
            raise ValueError("bad target table")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match="plugin 'broken' failed in distillc_register_targets: ValueError: bad target table"):
        load_plugins()


@pytest.fixture(scope="module")
def installed_fixture_plugin(tmp_path_factory) -> Path:
    """The fixture plugin package, pip-installed into its own folder (the venv stays clean)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(FIXTURE)], check=True)
    return site


def _cli(args: list[str], site: Path, *, autoload: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DISTILLC_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    if not autoload:
        env["DISTILLC_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "distillc.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_installed_plugin_is_listed_with_its_origin(installed_fixture_plugin):
    passes = _cli(["passes"], installed_fixture_plugin)
    assert passes.returncode == 0, passes.stderr
    line = next(line for line in passes.stdout.splitlines() if "prune.l1-channels" in line)
    assert "distillc-prune-plugin 0.1.0" in line
    targets = _cli(["targets"], installed_fixture_plugin)
    assert "tiny-host" in targets.stdout and "distillc-prune-plugin" in targets.stdout
    hidden = _cli(["passes"], installed_fixture_plugin, autoload=False)
    assert "prune.l1-channels" not in hidden.stdout


def test_a_spec_using_the_plugins_pass_and_target_compiles(installed_fixture_plugin, write_spec):
    text = tiny_spec_text(target="tiny-host", extra_passes='[[passes]]\nuse = "prune.l1-channels"\namount = 0.5\n')
    path = write_spec(text)
    result = _cli(["compile", str(path)], installed_fixture_plugin)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith(str(path.parent / "build" / "tiny"))
    import json

    report = json.loads((path.parent / "build" / "tiny" / "report.json").read_text())
    assert [row["id"] for row in report["plan"]][-3:] == ["prune.l1-channels", "eval.linear-probe", "export.onnx"]
    pruned = report["metrics"]["prune.l1-channels"]
    assert pruned["params_after"] < pruned["params_before"]
    assert report["metrics"]["eval.linear-probe"]["params"] == pruned["params_after"]
    refused = _cli(["validate", str(path)], installed_fixture_plugin, autoload=False)
    assert refused.returncode == 2 and "unknown pass 'prune.l1-channels'" in refused.stderr
