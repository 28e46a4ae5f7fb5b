"""Kernel-by-kernel comparison with onnxruntime (passes/verify/layercheck.py) and how verify uses it.

Every kernel of a bundle, fed the inputs the bundle's own trace shows it, must match onnxruntime
on the same part of the ONNX graph; a corrupted kernel must be named.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import testing  # noqa: E402
from distillc.passes.verify.layercheck import compare_kernels  # noqa: E402
from distillc.targets.runner import run_on_host, trace_on_host  # noqa: E402


def random_bundle(seed, tmp_path, weight_bits=8, act_bits=8):
    onnx_path, manifest = testing.random_bundle(seed, tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    return onnx_path, manifest, testing.quantized_inputs(manifest, 4, seed=seed)


@pytest.mark.parametrize("seed,weight_bits,act_bits", [(0, 8, 8), (3, 8, 8), (5, 8, 8), (6, 6, 6), (7, 4, 5)])
def test_every_kernel_matches_onnxruntime_on_its_own_inputs(seed, weight_bits, act_bits, tmp_path):
    """Random nets (residual adds, pooling, dense; narrow bit widths put a Clip after each quantizer)."""
    onnx_path, manifest, inputs = random_bundle(seed, tmp_path, weight_bits, act_bits)
    traces = trace_on_host(tmp_path / "bundle", inputs, tmp_path / "work")
    assert len(traces) == len(inputs) and all(len(t) == len(manifest["layers"]) for t in traces)
    # The traced build computes what the plain build computes.
    plain = run_on_host(tmp_path / "bundle", inputs, tmp_path / "plain")
    last = len(manifest["layers"]) - 1
    np.testing.assert_array_equal(np.stack([np.frombuffer(t[last], np.int8) for t in traces]), plain)

    report = compare_kernels(onnx_path, manifest, inputs, traces)
    assert report.ok, (report.errors, report.unchecked)
    assert sorted(report.checked) == list(range(len(manifest["layers"])))
    assert report.max_lsb <= 1 and report.compared > 0


def nudge_first_weight(bundle, call: int, change) -> str:
    """Change the first value of the first weight array the executor hands to its ``call``-th
    kernel call (``change(value) -> new value``); returns that call's step number."""
    executor = (bundle / "src" / "distillc_model.c").read_text()
    calls = re.findall(r"/\* (\d+): .*\*/\n    (distillc_k\w+)\(([^;]*)\);", executor)
    step, _, args = calls[call]
    weight = re.search(r"distillc_w\d+", args).group(0)
    weights_c = bundle / "src" / "distillc_weights.c"
    text = weights_c.read_text()
    body = text.index("{", text.index(f"{weight}[")) + 1
    first = re.match(r"\s*(-?\d+)", text[body:])
    text = text[:body] + text[body:].replace(first.group(1), str(change(int(first.group(1)))), 1)
    weights_c.write_text(text)
    return step


def test_a_corrupted_kernel_is_named(tmp_path):
    onnx_path, manifest, inputs = random_bundle(1, tmp_path)
    # A kernel in the middle of the model.
    step = nudge_first_weight(tmp_path / "bundle", len(manifest["layers"]) // 2,
                              lambda value: value + 40 if value < 80 else value - 40)

    traces = trace_on_host(tmp_path / "bundle", inputs, tmp_path / "work")
    report = compare_kernels(onnx_path, manifest, inputs, traces)
    assert not report.ok
    assert any(error.startswith(f"kernel {step} ") for error in report.errors), (step, report.errors)
    # Kernels before it still match.
    assert all(not error.startswith(f"kernel {k} ") for error in report.errors for k in range(int(step)))


@pytest.mark.parametrize("residual", [False, True])
def test_real_float32_ties_are_explained_and_a_wrong_weight_is_not(residual, tmp_path):
    """A hand-built model whose second conv requantizes by exactly 1/2 (testing.tie_net):
    onnxruntime's float32 conv rounds some of its ties the other way, so the bundle differs from
    it end to end although each kernel is exact.  With ``residual`` the conv's rounding is inside
    a fused conv + add kernel, and the differing outputs are not on ties of the kernel's own
    output quantizer: only rounding the inner value the other way explains them."""
    import onnx
    from onnx import TensorProto, helper

    from distillc.passes.export.to_onnx import reference_session
    from distillc.passes.backend import compile_onnx_to_bundle

    onnx_path = testing.tie_net(tmp_path / "ties.onnx", residual=residual)
    manifest = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name="ties")
    assert len(manifest["layers"]) == 2  # conv1, conv2 (+ the add, fused)
    inputs = testing.quantized_inputs(manifest, 4, seed=1)
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "plain")
    ours = testing.bundle_outputs(exe, manifest, inputs, tmp_path / "plain")
    differ = ours != testing.ort_reference(onnx_path, manifest, inputs)
    assert np.abs(ours - testing.ort_reference(onnx_path, manifest, inputs)).max() == 1
    assert differ.sum() > 10

    if residual:
        # The differing outputs: where onnxruntime's sum sits relative to the output's ties.
        model = onnx.load(str(onnx_path))
        model.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, None))
        session = reference_session(model.SerializeToString())
        x = testing.dequantize(inputs, manifest["input"])
        sums = np.concatenate([session.run(["sum"], {"x": x[i:i + 1]})[0] for i in range(len(x))])
        steps = sums.reshape(len(x), -1)[differ].astype(np.float64) / manifest["output"]["scale"]
        assert np.abs(steps - np.floor(steps) - 0.5).min() > 0.01

    traces = trace_on_host(tmp_path / "bundle", inputs, tmp_path / "work")
    report = compare_kernels(onnx_path, manifest, inputs, traces)
    assert report.ok, (report.errors, report.unchecked)
    assert report.differing >= differ.sum() and report.max_lsb == 1

    # One weight of the tie conv off by one: differences away from any tie, named by kernel.
    step = nudge_first_weight(tmp_path / "bundle", 1, lambda value: value + 1)
    traces = trace_on_host(tmp_path / "bundle", inputs, tmp_path / "work")
    report = compare_kernels(onnx_path, manifest, inputs, traces)
    assert [error.split(" (")[0] for error in report.errors] == [f"kernel {step}"], report.errors


def test_verify_fails_an_end_to_end_difference_that_no_tie_explains(write_spec, monkeypatch):
    """An end-to-end difference (here: a reference moved by 3 steps) sends verify.host kernel by
    kernel; with every kernel exact, nothing explains it and the compile fails."""
    from distillc.errors import PassError
    from distillc.passes.verify import host_qemu as verify
    from distillc.run import compile_spec
    from distillc.plugin_manager import load_plugins
    from distillc.progress import SilentProgress
    from tests.conftest import tiny_spec_text

    real = verify.onnxruntime_outputs

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0, 0] = out[0, 0] + 3 if out[0, 0] < 100 else out[0, 0] - 3
        return out

    monkeypatch.setattr(verify, "onnxruntime_outputs", shifted)
    path = write_spec(tiny_spec_text(distill_epochs=1))
    with pytest.raises(PassError, match=r"by 3 LSB .*every kernel matches onnxruntime exactly .*no rounding tie"):
        compile_spec(path, progress=SilentProgress(), plugins=load_plugins(), until="verify.host")


def test_verify_accepts_real_ties_carried_to_the_output_unless_strict(write_spec):
    """An ONNX student (testing.tie_net) on which onnxruntime rounds float32 ties the other way and a
    later conv triples the step: verify.host sees 3 LSB end to end, explains it kernel by kernel
    and goes on; ``end_to_end = "strict"`` refuses the same bundle."""
    from distillc.errors import PassError
    from distillc.run import compile_spec
    from distillc.plugin_manager import load_plugins
    from distillc.progress import SilentProgress
    from tests.conftest import TINY_HEADER

    path = write_spec(TINY_HEADER.format(name="ties") + '[student]\nonnx = "ties.onnx"\n[target]\nuse = "host"\n')
    testing.tie_net(path.parent / "ties.onnx", in_channels=1, size=8, gain=3)
    result = compile_spec(path, progress=SilentProgress(), plugins=load_plugins())
    host = result.report["metrics"]["verify.host"]
    assert host["max_lsb"] == 3
    kernels = host["kernels"]
    assert kernels["kernels_checked"] == 3 and kernels["kernel_max_lsb"] == 1 and kernels["kernel_tie_differences"] > 0
    manifest = json.loads((result.final_path / "manifest.json").read_text())
    assert manifest["verification"]["host"]["kernels"] == kernels

    # end_to_end = "strict" refuses the same difference, saying what the kernels showed.
    path.write_text(path.read_text().replace('use = "host"', 'use = "host"\nbackend = { "verify.host" = { end_to_end = "strict" } }'))
    with pytest.raises(PassError, match=r"by 3 LSB .*end_to_end = 'strict'.*Every kernel matches"):
        compile_spec(path, progress=SilentProgress(), plugins=load_plugins())


def test_verify_checks_kernels_with_a_relative_workdir(write_spec, monkeypatch):
    """The kernel-by-kernel check runs its trace program from its own build folder: a relative
    ``--workdir`` (resolved against the current folder, not that one) must still find it."""
    from distillc.run import compile_spec
    from distillc.plugin_manager import load_plugins
    from distillc.progress import SilentProgress
    from tests.conftest import TINY_HEADER

    path = write_spec(TINY_HEADER.format(name="ties") + '[student]\nonnx = "ties.onnx"\n[target]\nuse = "host"\n')
    testing.tie_net(path.parent / "ties.onnx", in_channels=1, size=8, gain=3)
    monkeypatch.chdir(path.parent)
    result = compile_spec(path, workdir="relative-build", progress=SilentProgress(), plugins=load_plugins())
    assert result.report["metrics"]["verify.host"]["kernels"]["kernels_checked"] == 3  # the trace ran
    assert (path.parent / "relative-build" / "bundle" / "manifest.json").is_file()
