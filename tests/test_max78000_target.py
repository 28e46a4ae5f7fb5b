"""The max78000 target checks the student against the CNN accelerator's limits (check.max78000)."""

from __future__ import annotations

import json

import pytest

from distillc.errors import TargetError
from distillc.pipeline import build_plan, compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

AI8X = '[student]\narch = "ai8x-cnn"\nwidth = 8\nembed_dim = 32\n'


def spec_text(accelerator: str | None = None, student: str | None = None) -> str:
    text = tiny_spec_text(target="max78000", distill_epochs=1,
                          target_options=f'accelerator = "{accelerator}"' if accelerator else "")
    if student:
        text = text.replace('[student]\narch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32\n', student)
    return text


@pytest.fixture(scope="module")
def folder(module_folder):
    return module_folder


def compile_(folder, text):
    path = folder / "spec.toml"
    path.write_text(text)
    return compile_spec(path, progress=SilentProgress(), until="check.max78000")


def test_the_check_opens_the_backend_unless_turned_off(folder):
    plugins = load_plugins()
    for accelerator, expected in ((None, True), ("require", True), ("off", False)):
        path = folder / "plan.toml"
        path.write_text(spec_text(accelerator))
        ids = [s.id for s in build_plan(load_spec(path, plugins), plugins).steps]
        assert ("check.max78000" in ids) is expected
        if expected:
            assert ids.index("check.max78000") == ids.index("quantize.brevitas-qat") - 1


def test_require_lists_every_violation_of_mobilenetv2(folder):
    with pytest.raises(TargetError) as caught:
        compile_(folder, spec_text("require"))
    violations = caught.value.violations
    # Every depthwise convolution and every strided one is named, not only the first.
    assert sum("depthwise" in v or "groups" in v for v in violations) >= 10
    assert any("stride" in v for v in violations)
    assert all(v.startswith("CNN accelerator: ") for v in violations)


def test_report_records_the_verdict_and_the_student_passes_through(folder):
    result = compile_(folder, spec_text())
    metrics = result.report["metrics"]["check.max78000"]
    assert metrics["accelerator_fits"] is False and metrics["violations"]
    result = compile_(folder, spec_text("require", student=AI8X))
    metrics = result.report["metrics"]["check.max78000"]
    assert metrics == {"accelerator_fits": True, "violations": [], "weight_bits": 8}
    assert result.artifact.arch == "ai8x-cnn"


def test_the_accelerator_friendly_student_compiles_to_a_verified_bundle(folder):
    """ai8x-cnn through the whole max78000 backend: its max pooling (which no other built-in
    student has) is lowered exactly, on the host and on the emulated Cortex-M4."""
    path = folder / "bundle.toml"
    path.write_text(spec_text("require", student=AI8X))
    result = compile_spec(path, progress=SilentProgress())
    manifest = json.loads((result.final_path / "manifest.json").read_text())
    assert any(layer["op"] == "max_pool" for layer in manifest["layers"])
    metrics = result.report["metrics"]
    assert metrics["verify.host"]["max_lsb"] <= 1
    assert metrics["verify.qemu"]["max_lsb"] <= 1 and metrics["verify.qemu"]["machine"] == "mps2-an386"
