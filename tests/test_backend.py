"""The INT8 backend inside the pipeline: spec -> verified bundle on the host and on QEMU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from distillc.cli import app
from distillc.errors import SpecError, TargetError
import distillc
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from tests.conftest import tiny_spec_text

runner = CliRunner()
BACKEND = ["quantize.brevitas-qat", "export.onnx", "simplify.onnxsim", "tvm.int8", "plan-memory", "codegen.c",
           "verify.host"]


class _BundleObserver:
    """A plugin observing ``distillc_bundle_written``."""

    __name__ = "bundle-observer"

    def __init__(self):
        self.calls = []

    @distillc.hookimpl
    def distillc_bundle_written(self, path, manifest):
        self.calls.append((path, manifest))


_OBSERVER = _BundleObserver()


@pytest.fixture(scope="module")
def stm32_build(module_folder):
    """One tiny spec compiled for stm32h7 (verified on the host and on QEMU), shared by the tests."""
    path = module_folder / "spec.toml"
    path.write_text(tiny_spec_text(target="stm32h7"))
    result = compile_spec(path, progress=SilentProgress(), plugins=load_plugins([_OBSERVER]))
    return path, result


def test_the_bundle_written_hook_sees_the_published_bundle_and_its_manifest(stm32_build):
    path, result = stm32_build
    [(where, manifest)] = _OBSERVER.calls
    assert where == path.parent / "build" / "tiny" / "bundle"
    assert manifest == json.loads((where / "manifest.json").read_text())
    assert manifest["spec_sha256"] == result.report["spec_sha256"] and "verify.qemu" in manifest["metrics"]


def test_compile_ends_with_a_bundle_verified_on_host_and_qemu(stm32_build):
    path, result = stm32_build
    assert [row["id"] for row in result.report["plan"]][-8:] == BACKEND + ["verify.qemu"]
    bundle = path.parent / "build" / "tiny" / "bundle"
    assert result.final_path == bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    host, qemu = manifest["verification"]["host"], manifest["verification"]["qemu"]
    assert host["max_lsb"] <= 1 and qemu["max_lsb"] <= 1 and host["images"] == 16
    assert qemu["machine"] == "mps2-an500" and qemu["instructions_per_inference"] > manifest["macs"]
    memory = manifest["memory"]
    assert memory["arena_floor_bytes"] <= memory["arena_bytes"] <= 1.05 * memory["arena_floor_bytes"]
    # The model's own flash holds its constants plus code, and is less than the whole program.
    assert memory["weights_bytes"] < qemu["model_flash_bytes"] < qemu["program_flash_bytes"]
    assert manifest["spec_sha256"] and "eval.linear-probe" in manifest["metrics"]
    assert manifest["target"]["name"] == "stm32h7" and manifest["target"]["flash_kb"] == 2048
    for rel in ("include/distillc_model.h", "src/distillc_model.c", "Makefile", "CMakeLists.txt", "examples/main.c"):
        assert (bundle / rel).is_file(), rel


def test_distillc_run_on_host_and_qemu_agree(stm32_build, tmp_path):
    path, _ = stm32_build
    bundle = path.parent / "build" / "tiny" / "bundle"
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = {}
    for name, extra in (("host", []), ("qemu", ["--qemu"]), ("raw", ["--raw"])):
        result = runner.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy"),
                                     "--output", str(tmp_path / f"{name}.npy"), *extra])
        assert result.exit_code == 0, result.output
        outs[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_array_equal(outs["host"], outs["qemu"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert outs["raw"].dtype == np.int8 and outs["raw"].shape == (3, *manifest["output"]["shape"][1:])
    scale, zero = manifest["output"]["scale"], manifest["output"]["zero_point"]
    np.testing.assert_allclose(outs["host"], (outs["raw"].astype(np.float32) - zero) * np.float32(scale))
    bad = runner.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy")[:-4] + "nope.npy",
                              "--output", str(tmp_path / "o.npy")])
    assert bad.exit_code == 2


def test_changing_the_target_reuses_training_and_the_lowered_program(stm32_build):
    path, _ = stm32_build
    path.write_text(tiny_spec_text(target="host"))
    try:
        ran = compile_spec(path, progress=SilentProgress()).ran
    finally:
        path.write_text(tiny_spec_text(target="stm32h7"))
    assert ran == ["codegen.c", "verify.host"]


def test_same_spec_and_seed_give_identical_bundle_bytes(stm32_build, tmp_path, monkeypatch):
    path, first = stm32_build
    monkeypatch.setenv("DISTILLC_CACHE", str(tmp_path / "other-cache"))
    second = compile_spec(path, workdir=tmp_path / "w", progress=SilentProgress(), until="codegen.c")
    assert second.ran[0] == "teacher:vit" and second.ran[-1] == "codegen.c"  # a new cache: everything re-ran
    codegen = next(s for s in first.plan.steps if s.id == "codegen.c")
    a = first.plan.store.load(codegen.key).path
    b = second.artifact.path
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_an_onnx_student_compiles_straight_to_a_bundle(stm32_build, write_spec, tmp_path):
    path, _ = stm32_build
    shutil.copyfile(path.parent / "build" / "tiny" / "model.onnx", tmp_path / "student.onnx")
    text = ('[distillc]\nspec_version = 1\nname = "from-onnx"\n[data]\nsource = "sklearn-digits"\n'
            'image_size = 8\nchannels = 1\n[student]\nonnx = "student.onnx"\n[target]\nuse = "host"\n')
    result = compile_spec(write_spec(text), progress=SilentProgress())
    assert result.ran == ["student", "tvm.int8", "plan-memory", "codegen.c", "verify.host"]
    assert result.report["metrics"]["verify.host"]["max_lsb"] <= 1


def test_budgets_that_do_not_fit_list_every_violation(stm32_build, tmp_path):
    path, _ = stm32_build
    small = tmp_path / "small.toml"
    small.write_text(tiny_spec_text(target="stm32h7", target_options="flash_kb = 1\nram_kb = 1"))
    shutil.copytree(path.parent / ".distillc-cache", tmp_path / ".distillc-cache")
    with pytest.raises(TargetError) as info:
        compile_spec(small, progress=SilentProgress())
    assert len(info.value.violations) == 2
    assert "flash_kb = 1" in str(info.value) and "ram_kb = 1" in str(info.value)


def test_backend_options_come_from_the_target_table(write_spec):
    from distillc.plan import build_plan
    from distillc.spec import load_spec

    plugins = load_plugins()
    text = tiny_spec_text(target_options='backend = { "tvm.int8" = { allow_float_fallback = true } }')
    plan = build_plan(load_spec(write_spec(text), plugins), plugins)
    step = next(s for s in plan.steps if s.id == "tvm.int8")
    assert step.pass_.config.allow_float_fallback is True
    wrong = tiny_spec_text(target_options='backend = { "tvm.int9" = {} }')
    with pytest.raises(SpecError, match=r"target\.backend: 'tvm.int9' not among this plan's backend passes"):
        build_plan(load_spec(write_spec(wrong), plugins), plugins)
    bad_value = tiny_spec_text(target_options='backend = { "tvm.int8" = { allow_float_fallback = 3 } }')
    with pytest.raises(SpecError, match=r"target\.backend\.tvm\.int8\.allow_float_fallback"):
        build_plan(load_spec(write_spec(bad_value), plugins), plugins)


def test_a_bundle_that_disagrees_with_onnxruntime_fails_the_compile(stm32_build, monkeypatch):
    import distillc.passes.verify.host_qemu as verify
    from distillc.errors import PassError

    path, _ = stm32_build
    real = verify.onnxruntime_outputs
    monkeypatch.setattr(verify, "onnxruntime_outputs", lambda *a: real(*a) + 2)  # a 2-LSB disagreement
    with pytest.raises(PassError, match=r"verify.host.*differs from onnxruntime by 2 LSB \(> 1\) on validation image 0"):
        compile_spec(path, progress=SilentProgress(), force="verify.host")
