"""The command line: thin commands, fast start, exit statuses, summary."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import distillc
from distillc.cli import app
from tests.conftest import tiny_spec_text

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"distillc {distillc.__version__}"


def test_help_imports_no_heavy_library():
    """--help stays fast because torch, TVM, onnx and brevitas are imported only inside passes."""
    code = ("import sys, distillc.cli, distillc.plugin_manager as pm, distillc.spec, distillc.plan, distillc.run; "
            "pm.load_plugins(); "
            "print(sorted(m for m in ('torch', 'tvm', 'onnx', 'onnxruntime', 'brevitas', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_run = subprocess.run([sys.executable, "-m", "distillc.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "compile" in help_run.stdout


def test_passes_and_targets_list_builtins_with_their_plugin():
    passes = runner.invoke(app, ["passes"], env={"COLUMNS": "200"})
    assert passes.exit_code == 0
    for name in ("distill.feature", "eval.linear-probe", "export.onnx", "simplify.onnxsim", "teacher.train"):
        assert name in passes.output
    assert "built-in" in passes.output
    targets = runner.invoke(app, ["targets"], env={"COLUMNS": "200"})
    assert "stm32h7" in targets.output and "max78000" in targets.output


def test_compile_prints_summary_and_ends_with_the_output_path(write_spec):
    path = write_spec(tiny_spec_text())
    result = runner.invoke(app, ["compile", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == f"bundle: {path.parent / 'build' / 'tiny' / 'bundle'}"
    assert "top1=" in result.output and "teachers.vit=" in result.output
    assert "distill.feature: epoch 2/2" in result.output and "images per s" in result.output
    plan = runner.invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert plan.exit_code == 0 and plan.output.count("cached") >= 6


def test_compile_with_until_ends_with_workdir(write_spec):
    path = write_spec(tiny_spec_text())
    result = runner.invoke(app, ["compile", str(path), "--until", "student"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].endswith(str(path.parent / "build" / "tiny"))


def test_workdir_option(write_spec, tmp_path):
    path = write_spec(tiny_spec_text())
    result = runner.invoke(app, ["compile", str(path), "--until", "student", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0 and (tmp_path / "w" / "report.json").is_file()


def test_internal_error_exits_1_with_a_short_report(write_spec, monkeypatch):
    from distillc.passes.sources import StudentInit

    def crash(self, artifact, ctx):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(StudentInit, "run", crash)
    path = write_spec(tiny_spec_text())
    result = runner.invoke(app, ["compile", str(path), "--until", "student"])
    assert result.exit_code == 1
    assert "internal error: pass 'student' crashed: ZeroDivisionError: oops" in result.output
    assert "Traceback" not in result.output


def test_inspect_shows_manifest_tables(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {"input": {"shape": [1, 1, 8, 8], "dtype": "int8", "scale": 0.01, "zero_point": 0},
                "output": {"shape": [1, 32], "dtype": "int8", "scale": 0.1, "zero_point": 3},
                "memory": {"arena_bytes": 4096, "arena_floor_bytes": 4000, "weights_bytes": 12345},
                "layers": [{"name": "conv0", "op": "conv2d", "macs": 1000, "weight_bytes": 72}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["inspect", str(bundle)], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("arena_floor_bytes", "12345", "conv0", "[1, 1, 8, 8]"):
        assert text in result.output
    assert "MAX78000" not in result.output
    manifest["izer"] = {"exported": True, "layers": 9, "weights_bytes": 94096, "output_shifts": [0, -1],
                        "embedding_cosine_min": 0.995, "files": ["network.yaml"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["inspect", str(bundle)], env={"COLUMNS": "200"})
    assert "MAX78000 accelerator (izer/): 9 layers, 94096 weight bytes" in result.output
    manifest["izer"] = {"exported": False, "reasons": ["/c/Conv (Conv): groups=8"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["inspect", str(bundle)], env={"COLUMNS": "200"})
    assert "not exported (/c/Conv (Conv): groups=8)" in result.output
    missing = runner.invoke(app, ["inspect", str(tmp_path)])
    assert missing.exit_code == 2 and "not a bundle" in missing.output


def test_validate_checks_the_plans_types_and_writes_nothing(write_spec, tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"not really onnx")
    onnx_student = tiny_spec_text().replace('arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32',
                                            'onnx = "student.onnx"')
    result = runner.invoke(app, ["validate", str(write_spec(onnx_student))])
    assert result.exit_code == 2
    assert "passes[0]: pass 'distill.feature' takes TorchModel" in result.output and "makes OnnxModel" in result.output
    ok = runner.invoke(app, ["validate", str(write_spec(tiny_spec_text()))])
    assert ok.exit_code == 0 and "steps planned" in ok.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml", "student.onnx"]  # no cache, no build/


def test_ctrl_c_exits_130_and_the_handler_documents_it(write_spec, monkeypatch):
    import distillc.run
    from distillc.cli import handled

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distillc.run, "compile_spec", interrupted)
    result = runner.invoke(app, ["compile", str(write_spec(tiny_spec_text()))])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert "130" in handled.__doc__ and "Ctrl-C" in handled.__doc__


def test_validate_plans_without_importing_torch(write_spec):
    """validate builds the plan (data fingerprint included) yet stays light: no torch import."""
    code = ("import sys; from distillc.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, ['validate', {str(write_spec(tiny_spec_text()))!r}]); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]
