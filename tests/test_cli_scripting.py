"""The CLI in scripts and pipes: whole names when stdout is not a terminal, --json on the listing
commands, and `run --qemu` on the board the bundle's manifest names."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from distillc.cli import app
from distillc.plugin_manager import load_plugins
from tests.conftest import tiny_spec_text

runner = CliRunner()


def test_passes_in_a_pipe_print_every_name_and_plugin_whole(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["passes"])  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for entry in load_plugins().passes:
        # one line holds the name, the plugin module and the whole description (grep finds them together)
        assert any(entry.name in line and entry.plugin in line and entry.obj.description in line for line in lines), \
            entry.name
    assert "…" not in result.output


def test_passes_and_targets_as_json_list_every_registered_one():
    plugins = load_plugins()
    passes = json.loads(runner.invoke(app, ["passes", "--json"]).output)
    assert [p["name"] for p in passes] == plugins.passes.names()
    feature = next(p for p in passes if p["name"] == "distill.feature")
    assert feature["takes"] == "TorchModel" and feature["plugin"] == "distillc.passes.distill.feature"
    targets = json.loads(runner.invoke(app, ["targets", "--json"]).output)
    assert [t["name"] for t in targets] == plugins.targets.names()
    stm32 = next(t for t in targets if t["name"] == "stm32h7")
    assert stm32["backend"][-1] == "verify.qemu" and stm32["origin"] == "built-in"


def test_plan_as_json_gives_every_step_with_its_key_and_cache_status(write_spec):
    path = write_spec(tiny_spec_text())
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["name"] == "tiny" and plan["cache"].endswith(".distillc-cache")
    assert [s["id"] for s in plan["steps"]][:4] == ["teacher:vit", "student", "distill.feature", "eval.linear-probe"]
    assert all(len(s["key"]) == 64 and s["cached"] is False for s in plan["steps"])


def _fake_bundle(folder, manifest):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_inspect_as_json_prints_the_manifest(tmp_path):
    """Every manifest key as it is, plus "report": the facts report.html shows (tests/test_report.py)."""
    manifest = {"input": {"shape": [1, 1, 2, 2], "dtype": "int8", "scale": 0.5, "zero_point": 0},
                "memory": {"arena_bytes": 64}, "layers": []}
    bundle = _fake_bundle(tmp_path / "bundle", manifest)
    result = runner.invoke(app, ["inspect", str(bundle), "--json"])
    printed = json.loads(result.output)
    assert result.exit_code == 0 and {k: v for k, v in printed.items() if k != "report"} == manifest
    assert printed["report"]["budget"]["ram"]["used_bytes"] == 64 and printed["report"]["layers"] == []


def test_run_on_qemu_takes_the_board_from_the_manifest(tmp_path, monkeypatch):
    import distillc.targets.runner as board_runner

    boards = []

    class Ran:
        outputs = np.zeros((1, 4), dtype=np.int8)
        instructions_per_inference = 1

    def fake_qemu(bundle, q, work, *, machine):
        boards.append(machine)
        return Ran()

    monkeypatch.setattr(board_runner, "run_on_qemu", fake_qemu)
    tensor = {"shape": [1, 4], "dtype": "int8", "scale": 0.5, "zero_point": 0}
    np.save(tmp_path / "x.npy", np.zeros((1, 4), dtype=np.float32))
    cases = [({"verification": {"qemu": {"machine": "mps2-an386"}}}, "mps2-an386"),  # where it was verified
             ({"target": {"name": "max78000"}}, "mps2-an386"),  # the target's own verify.qemu board
             ({"target": {"name": "stm32h7"}}, "mps2-an500"),
             ({"target": {"name": "host"}}, "mps2-an500")]  # a host bundle: the default board
    for i, (extra, board) in enumerate(cases):
        bundle = _fake_bundle(tmp_path / f"b{i}", {"input": tensor, "output": tensor, **extra})
        result = runner.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy"),
                                     "--output", str(tmp_path / f"y{i}.npy"), "--qemu"])
        assert result.exit_code == 0, result.output
        assert boards[-1] == board
