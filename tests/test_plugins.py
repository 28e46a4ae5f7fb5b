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
from distillc.run import compile_spec
from distillc.plugin_manager import BUILTIN_PLUGINS, load_plugins
from distillc.progress import SilentProgress
from distillc.artifacts import TorchModel
from distillc.pass_api import Pass
from distillc.passes.eval.probe import LinearProbe
from distillc.pass_api import check_pass
from distillc.registry import Registry
from distillc.target_api import Target, TargetConfig
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
    assert origins["distill.feature"] == "distillc.passes.distill.feature"
    assert origins["teacher.train"] == "distillc.passes.sources"
    assert {e.name for e in plugins.targets} >= {"host", "stm32h7", "max78000"}


def test_each_compile_gets_a_new_plugin_manager():
    a, b = load_plugins(), load_plugins()
    assert a.pm is not b.pm and a.passes is not b.passes


class _Duplicate:
    __name__ = "dup-plugin"

    @distillc.hookimpl
    def distillc_register_passes(self, registry):
        from distillc.passes.eval.probe import LinearProbe

        registry.add(LinearProbe)


def test_a_plugin_reusing_a_builtin_name_is_refused():
    with pytest.raises(PluginError, match="'dup-plugin' registered pass 'eval.linear-probe'.*distillc.passes.eval.probe"):
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


def _fake_distribution(site: Path, module_source: str, *, module: str = "broken_plugin",
                       entry_point: str = "broken") -> None:
    """A minimal installed distribution with one ``distillc`` entry point, on ``site``."""
    (site / f"{module}.py").write_text(module_source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[distillc]\n{entry_point} = {module}\n")


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


def test_a_broken_plugin_error_says_how_to_run_without_plugins(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "raise ImportError('needs libfoo')\n", module="unloadable_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match="failed to load: ImportError: needs libfoo; .*DISTILLC_DISABLE_PLUGIN_AUTOLOAD=1"):
        load_plugins()


def test_a_plugin_failing_inside_a_hook_says_how_to_run_without_plugins(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, textwrap.dedent("""
        import distillc

        @distillc.hookimpl
        def distillc_register_passes(registry):
            registry.add("prune", object())
    """), module="invalid_pass_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match="plugin 'broken' registered pass 'prune', which is invalid: .*"
                                          "DISTILLC_DISABLE_PLUGIN_AUTOLOAD=1"):
        load_plugins()


def test_a_misspelt_hook_in_an_installed_plugin_is_named(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, textwrap.dedent("""
        import distillc

        @distillc.hookimpl
        def distillc_register_pass(registry):
            pass
    """), module="misspelt_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError) as info:
        load_plugins()
    message = str(info.value)
    assert "plugin 'broken' (entry point 'misspelt_plugin') implements unknown hook 'distillc_register_pass'" in message
    assert "did you mean 'distillc_register_passes'" in message and "DISTILLC_DISABLE_PLUGIN_AUTOLOAD=1" in message


class _Misspelt:
    __name__ = "misspelt"

    @distillc.hookimpl
    def distillc_pass_finshed(self, step):
        pass


def test_a_misspelt_hook_is_a_plugin_error_naming_plugin_and_hook():
    with pytest.raises(PluginError, match="plugin 'misspelt' implements unknown hook 'distillc_pass_finshed' "
                                          r"\(did you mean 'distillc_pass_finished'\?\)"):
        load_plugins([_Misspelt()])


def test_two_entry_points_with_one_name_are_refused(tmp_path, monkeypatch):
    source = "import distillc\n"
    _fake_distribution(tmp_path, source, module="prune_a", entry_point="prune")
    _fake_distribution(tmp_path, source, module="prune_b", entry_point="prune")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match="two plugins are named 'prune': entry points 'prune_a' from prune-a 0.1 "
                                          "and 'prune_b' from prune-b 0.1.*DISTILLC_DISABLE_PLUGIN_AUTOLOAD=1"):
        load_plugins()


def test_an_entry_point_named_like_a_builtin_plugin_is_refused(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "import distillc\n", module="impostor", entry_point="distillc.passes.sources")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.raises(PluginError, match="plugin 'distillc.passes.sources' \\(entry point 'impostor' from impostor "
                                          "0.1\\) has the name of a built-in plugin"):
        load_plugins()


def _registering(hook: str, *args):
    """A plugin object whose ``hook`` calls ``registry.add(*args)``."""

    class Plugin:
        __name__ = "bad-plugin"

    def impl(self, registry):
        registry.add(*args)

    impl.__name__ = hook
    setattr(Plugin, hook, distillc.hookimpl(impl))
    return Plugin()


class _NoMakes(Pass):
    name = "no-makes"

    def run(self, artifact, ctx):
        raise AssertionError


class _NoRun(Pass):
    name = "no-run"
    takes = TorchModel
    makes = TorchModel


class _PlansAKeyItLacks(Pass):
    name = "plans-a-key"
    takes = TorchModel
    makes = TorchModel
    planned = ("model_name",)  # but its Config has no model_name key

    def run(self, artifact, ctx):
        raise AssertionError


class _NeedsFlash(Target):
    name = "needs-flash"

    class Config(TargetConfig):
        board: str

    def backend_passes(self):
        return []


BAD_REGISTRATIONS = {
    "pass that is not a Pass": (("distillc_register_passes", "x", object()),
                                "pass 'x', which is invalid: expected a subclass of distillc.pass_api.Pass"),
    "pass without makes": (("distillc_register_passes", _NoMakes), "pass 'no-makes', which is invalid: .* has no 'makes'"),
    "pass without run": (("distillc_register_passes", _NoRun), "pass 'no-run', which is invalid: .* does not implement run"),
    "pass planning a key its config lacks": (
        ("distillc_register_passes", _PlansAKeyItLacks),
        r"pass 'plans-a-key', which is invalid: .* lists 'model_name' in 'planned', which must name a key of its Config"),
    "target that is not a Target": (("distillc_register_targets", "t", _NoMakes),
                                    "target 't', which is invalid: expected a subclass of distillc.target_api.Target"),
    "target whose Config needs arguments": (
        ("distillc_register_targets", _NeedsFlash),
        r"target 'needs-flash', which is invalid: .*Config\(\) cannot be built without arguments \(board: Field required\)"),
    "teacher that is not callable": (("distillc_register_teachers", "vit_x", 3),
                                     "teacher architecture 'vit_x', which is invalid: expected a callable builder"),
    "student that is not callable": (("distillc_register_students", "s", "mobilenetv2"),
                                     "student architecture 's', which is invalid: expected a callable builder"),
    "dataset that is not a DatasetSource": (("distillc_register_datasets", "d", lambda **kw: None),
                                            "dataset source 'd', which is invalid: expected a distillc.data_api.DatasetSource"),
}


@pytest.mark.parametrize("case", sorted(BAD_REGISTRATIONS))
def test_registries_refuse_objects_of_the_wrong_sort_naming_the_plugin(case):
    (hook, *args), expected = BAD_REGISTRATIONS[case]
    with pytest.raises(PluginError, match="plugin 'bad-plugin' registered " + expected):
        load_plugins([_registering(hook, *args)])


def test_a_registry_without_a_validator_takes_anything_and_one_with_it_checks():
    Registry("pass").add("x", object(), plugin="p")
    checked = Registry("pass", check_pass)
    checked.add(LinearProbe, plugin="p")
    assert checked.get("eval.linear-probe") is LinearProbe
    with pytest.raises(PluginError, match="plugin 'p' registered pass 'x', which is invalid"):
        checked.add("x", object(), plugin="p")


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
    # The plugin's target has no quantize.brevitas-qat step, so there is no QAT gate to turn off; the
    # probe's gate is (the tiny float student is collapsed on some CPUs, see tiny_spec_text).
    text = tiny_spec_text(target="tiny-host", extra_passes='[[passes]]\nuse = "prune.l1-channels"\namount = 0.5\n',
                          qat_gate=True).replace('use = "eval.linear-probe"', 'use = "eval.linear-probe"\ngate = "off"')
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
