"""Instructions per kernel call: verify.qemu rebuilds the executor with its trace hooks, reads the
board's counter after every kernel, and records one entry per kernel step in the manifest
(``verification.qemu.layers``); the report shows those counts.  A small random net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillc.bundle_report import render_html, report_facts
from distillc.errors import DistillcError
from distillc.passes.backend import compile_onnx_to_bundle, testing
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from distillc.targets.runner import run_on_qemu
from tests.test_runner import make_fake_bundle


def spec_text(options: str = "") -> str:
    return ('[distillc]\nspec_version = 1\nname = "tiny"\nseed = 0\n'
            '[student]\nonnx = "student.onnx"\n[target]\nuse = "stm32h7"\n'
            '[target.backend."verify.host"]\nimages = 2\nsqnr_images = 0\n'
            f'[target.backend."verify.qemu"]\nimages = 3\n{options}\n')


@pytest.fixture(scope="module")
def student(module_folder):
    testing.random_qcdq(0, module_folder / "student.onnx", in_channels=3, size=8)
    return module_folder


def _compile(folder: Path, name: str, options: str = "") -> dict:
    path = folder / f"{name}.toml"
    path.write_text(spec_text(options))
    bundle = compile_spec(path, progress=SilentProgress()).final_path
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def manifest(student):
    return _compile(student, "counted")


def test_verified_bundle_records_instructions_per_kernel_step(manifest):
    qemu, layers = manifest["verification"]["qemu"], manifest["layers"]
    assert qemu["machine"] == "mps2-an500" and qemu["layer_resolution_instructions"] == 40
    assert [entry["step"] for entry in qemu["layers"]] == list(range(len(layers)))
    for entry, layer in zip(qemu["layers"], layers):
        assert (entry["name"], entry["kernel"], entry["op"], entry["macs"]) == (
            layer["name"], layer["kernel"], layer["op"], layer["macs"])
        assert entry["instructions"] > 0
        if layer["macs"]:
            assert entry["instructions_per_mac"] == pytest.approx(entry["instructions"] / layer["macs"], abs=1e-3)
            assert entry["instructions"] > layer["macs"]  # at least one instruction per MAC on a Cortex-M7
    # The kernels' counts add up to the plain build's whole inference, up to the executor's calls.
    total = qemu["instructions_mean"]
    assert qemu["layers_instructions_sum"] == pytest.approx(sum(e["instructions"] for e in qemu["layers"]), abs=1)
    assert 0.97 < qemu["layers_sum_ratio"] < 1.03
    assert qemu["layers_sum_ratio"] == pytest.approx(qemu["layers_instructions_sum"] / total, abs=1e-3)
    # The traced build costs a little more: the hooks (tens of instructions per kernel call).
    assert 0 < qemu["trace_overhead_instructions"] < 200 * len(layers)
    assert qemu["trace_instructions_per_inference"] == pytest.approx(total + qemu["trace_overhead_instructions"])


def test_the_plain_builds_count_is_the_same_with_or_without_layer_counts(student, manifest):
    plain = _compile(student, "plain", "layers = false")["verification"]["qemu"]
    assert "layers" not in plain and "trace_overhead_instructions" not in plain
    assert plain["instructions_per_inference"] == manifest["verification"]["qemu"]["instructions_per_inference"]


def test_the_report_shows_the_measured_counts(manifest):
    facts = report_facts(manifest)
    assert facts["speed"]["per_layer"] == "measured"
    counted = manifest["verification"]["qemu"]["layers"]
    assert [row["instructions"] for row in facts["layers"]] == [entry["instructions"] for entry in counted]
    page = render_html(manifest)
    assert "Instructions per layer counted on QEMU" in page
    assert "instructions per layer: not measured" not in page


def test_netduinoplus2_counts_every_kernel_exactly(student, tmp_path):
    """TIM2 ticks once per instruction: a kernel's count is exact, and the counts, the hooks'
    bookkeeping and the call around them add up to the traced build's total."""
    bundle = tmp_path / "bundle"
    manifest = compile_onnx_to_bundle(student / "student.onnx", bundle, name="tiny")
    inputs = testing.quantized_inputs(manifest, 2)
    run = run_on_qemu(bundle, inputs, tmp_path / "work", machine="netduinoplus2", layers=True)
    counts = run.layers
    assert counts.resolution == 1 and len(counts.instructions) == 2
    for per_step, total, plain in zip(counts.instructions, counts.totals, run.instructions):
        assert len(per_step) == len(manifest["layers"]) and min(per_step) > 0
        assert sum(per_step) < total and plain < total
        assert abs(sum(per_step) - plain) < 50 * len(per_step)
    assert any(n % 40 for n in counts.instructions[0])  # not MPS2's 40-instruction steps


def test_a_bundle_without_trace_hooks_cannot_be_counted_per_layer(tmp_path):
    bundle = make_fake_bundle(tmp_path)
    inputs = np.zeros((1, 3, 4, 4), dtype=np.int8)
    assert run_on_qemu(bundle, inputs, tmp_path / "plain").layers is None
    with pytest.raises(DistillcError, match="cannot be counted per layer"):
        run_on_qemu(bundle, inputs, tmp_path / "work", layers=True)
