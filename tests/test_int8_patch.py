"""plan-memory's ``"patch"`` schedule (passes/backend/patch.py): the first stage runs tile by tile
(MCUNetV2's patch-based inference), its intermediate tensors shrink to tiles.  A patch bundle
computes the layer schedule's outputs exactly and every kernel still matches onnxruntime on its
own traced inputs: on a Brevitas MobileNetV2-like stage (its zero points are 0; a tile padded
with another value computes other outputs), on odd map sizes whose tiles overlap, on the host and on QEMU mps2-an500 and mps2-an386."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from distillc.errors import PassError  # noqa: E402
from distillc.passes.backend import patch, testing  # noqa: E402
from distillc.passes.backend.memory import MemoryPlan, arena_floor, check_plan, plan_memory  # noqa: E402


def _block(i, o, k, s, groups=1, act=True):
    layers = [nn.Conv2d(i, o, k, stride=s, padding=k // 2, groups=groups), nn.BatchNorm2d(o)]
    return layers + ([nn.ReLU6()] if act else [])


class Stage(nn.Module):
    """MobileNetV2's first stage in small: stem 3x3, depthwise 3x3, 1x1 projection, 1x1 expansion,
    depthwise 3x3 stride 2, 1x1 projection; then a residual block, global pool and a classifier."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.stage = nn.Sequential(*_block(channels, 8, 3, 1), *_block(8, 8, 3, 1, 8), *_block(8, 4, 1, 1, act=False),
                                   *_block(4, 12, 1, 1), *_block(12, 12, 3, 2, 12), *_block(12, 6, 1, 1, act=False))
        self.block = nn.Sequential(*_block(6, 12, 1, 1), *_block(12, 12, 3, 1, 12), *_block(12, 6, 1, 1, act=False))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.stage(x)
        x = x + self.block(x)
        return self.fc(x.mean((2, 3)))


def brevitas_stage(path, *, size=(12, 12), channels=3):
    from distillc.passes.backend import export_qcdq, quantize

    torch.manual_seed(0)
    model = testing.randomize_batchnorm(Stage(channels))
    calib = torch.randn(32, channels, *size)
    return export_qcdq(quantize(model, calib), calib[:1], path)


def _program(onnx_path):
    from distillc.passes.backend import import_onnx, lower_int8
    from distillc.passes.backend.codegen import build_program

    return build_program(lower_int8(import_onnx(onnx_path)))


@pytest.fixture(scope="module")
def stage_program(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage")
    onnx_path = brevitas_stage(folder / "stage.onnx")
    return onnx_path, _program(onnx_path)


def test_tiles_grow_backwards_by_each_window(stage_program):
    """2x2 tiles of the 6x6 output of steps 0-4 (stem, dw, 1x1, 1x1, dw stride 2): each layer's
    input tile is (size - 1) * stride + window, starting padding pixels earlier."""
    _, prog = stage_program
    assert patch.chain_end(prog) == 5  # the residual block reads step 5's output twice
    described = patch.geometry(prog, 4, 2)
    assert described["tile"] == [3, 3]
    assert [t["size"] for t in described["tensors"]] == [[11, 11], [9, 9], [7, 7], [7, 7], [7, 7], [3, 3]]
    assert [t["offset"] for t in described["tensors"]] == [[-3, -3], [-2, -2], [-1, -1], [-1, -1], [-1, -1], [0, 0]]
    assert [t["scale"] for t in described["tensors"]] == [[2, 2]] * 5 + [[1, 1]]
    # the halo: 4 tiles of 9x9 stem outputs (324 pixels) for a 12x12 map (144), and so on
    macs = [s.macs for s in prog.steps[:5]]
    pixels = [(81, 144), (49, 144), (49, 144), (49, 144), (9, 36)]
    assert described["extra_macs"] == sum(m * 4 * a // b - m for m, (a, b) in zip(macs, pixels))


def test_the_patch_plan_is_below_the_layer_floor_and_checked(stage_program):
    _, prog = stage_program
    layer = plan_memory(prog)
    plan = plan_memory(prog, schedule="patch")
    assert plan.schedule == "patch" and plan.patch["last"] >= 1
    assert plan.arena_bytes == plan.schedule_floor_bytes < layer.floor_bytes == plan.floor_bytes
    planned = patch.view(prog, plan.patch)
    assert plan.schedule_floor_bytes == arena_floor(planned, plan.inplace)
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
    # auto never patches without a RAM budget; with one the others miss, it does
    assert plan_memory(prog, schedule="auto").schedule in ("layer", "inplace")
    assert plan_memory(prog, schedule="auto", ram_bytes=plan.arena_bytes).schedule == "patch"
    assert plan_memory(prog, schedule="auto", ram_bytes=layer.arena_bytes).schedule != "patch"
    first = planned.steps[0]
    moved = dict(plan.offsets)
    moved[first.out] = moved[first.args[0]]  # step 0's output tile over its input tile
    with pytest.raises(PassError, match="overlap"):
        check_plan(prog, MemoryPlan.from_dict({**plan.to_dict(), "offsets": {str(k): v for k, v in moved.items()}}))


def test_a_model_with_no_chain_has_no_patch_plan():
    from tests.test_int8_inplace import _inverted_residuals

    prog = _inverted_residuals(1)  # its first step's output is read twice (a residual)
    prog.steps[0].op = "elementwise"
    with pytest.raises(PassError, match="'patch' schedule needs a first stage of convs"):
        plan_memory(prog, schedule="patch")
    assert plan_memory(prog, schedule="auto", ram_bytes=1).schedule != "patch"


def _bundles(onnx_path, folder, prog=None):
    from distillc.passes.backend.codegen import emit_c

    prog = prog or _program(onnx_path)
    layer = plan_memory(prog)
    plan = plan_memory(prog, schedule="patch")
    patch.attach_kernels(prog, onnx_path, plan.patch)
    return prog, plan, {name: (emit_c(prog, folder / name, name="patch", plan=p), folder / name)
                        for name, p in (("layer", layer), ("patch", plan))}


@pytest.mark.parametrize("size,channels", [((13, 11), 3), ((9, 9), 1)], ids=["3x13x11", "1x9x9"])
def test_patch_bundles_compute_the_layer_schedules_outputs_and_every_kernel_checks(size, channels, tmp_path):
    """Odd maps: the last tile of a row or column overlaps its neighbour."""
    from distillc.passes.verify.layercheck import compare_kernels
    from distillc.targets.runner import trace_on_host

    onnx_path = brevitas_stage(tmp_path / "stage.onnx", size=size, channels=channels)
    prog, plan, bundles = _bundles(onnx_path, tmp_path)
    (layer, _), (manifest, bundle) = bundles["layer"], bundles["patch"]
    memory = manifest["memory"]
    assert memory["schedule"] == "patch" and memory["patch"]["extra_macs"] > 0
    assert memory["arena_bytes"] < layer["memory"]["arena_bytes"]
    assert memory["arena_floor_bytes"] == layer["memory"]["arena_floor_bytes"]
    assert memory["schedule_extra_instructions"] is None
    staged = manifest["layers"][:plan.patch["last"] + 1]
    assert all(entry["kernel"].startswith(patch.KERNEL_PREFIX) and entry["patch_tile_shape"] for entry in staged)
    source = (bundle / "src" / "distillc_kernels.c").read_text()
    for step in prog.steps[:plan.patch["last"] + 1]:  # the layer kernels only the stage called are gone
        assert f"void {step.kernel}(" not in source or any(s.kernel == step.kernel for s in prog.steps[len(staged):])
    assert plan.patch["pads"] == [0] * (plan.patch["last"] + 2)  # Brevitas: zero points 0

    inputs = testing.quantized_inputs(manifest, 6, seed=2)
    outputs = {}
    for name, (entries, directory) in bundles.items():
        exe = testing.build_host_driver(directory, tmp_path / name / "build")  # -std=c99 -Wall -Wextra -Werror
        outputs[name] = testing.bundle_outputs(exe, entries, inputs, tmp_path / name / "build")
    assert np.array_equal(outputs["patch"], outputs["layer"])
    assert np.abs(outputs["layer"] - testing.ort_reference(onnx_path, layer, inputs)).max() <= 1

    traces = trace_on_host(bundle, inputs[:3], tmp_path / "trace")  # the stage's maps, stored from its tiles
    report = compare_kernels(onnx_path, manifest, inputs[:3], traces)
    assert report.ok, (report.errors, report.unchecked)
    assert sorted(report.checked) == list(range(len(manifest["layers"])))

    if channels == 3:  # tiles padded with another value than the zero points compute other outputs
        from distillc.passes.backend.codegen import emit_c

        wrong = dict(plan.patch, pads=[7] * len(plan.patch["pads"]))
        bad = emit_c(prog, tmp_path / "wrong", name="patch", plan=MemoryPlan.from_dict({**plan.to_dict(), "patch": wrong}))
        exe = testing.build_host_driver(tmp_path / "wrong", tmp_path / "wrong-build")
        assert not np.array_equal(testing.bundle_outputs(exe, bad, inputs, tmp_path / "wrong-build"), outputs["layer"])


def test_a_patch_bundle_runs_on_qemu_and_is_byte_reproducible(stage_program, tmp_path):
    from distillc.passes.backend.codegen import emit_c
    from distillc.targets.runner import run_on_qemu

    onnx_path, prog = stage_program
    prog, plan, bundles = _bundles(onnx_path, tmp_path, prog)
    manifest, bundle = bundles["patch"]
    inputs = testing.quantized_inputs(manifest, 3, seed=4)
    exe = testing.build_host_driver(bundles["layer"][1], tmp_path / "layer-build")
    want = testing.bundle_outputs(exe, bundles["layer"][0], inputs, tmp_path / "layer-build")
    testing.compile_for_cortex_m7(bundle, tmp_path / "m7")  # arm-none-eabi-gcc -Werror
    rows = inputs.reshape(len(inputs), *manifest["input"]["shape"][1:])
    for machine in ("mps2-an500", "mps2-an386"):
        run = run_on_qemu(bundle, rows, tmp_path / "qemu", machine=machine, layers=machine == "mps2-an500")
        got = run.outputs.reshape(want.shape).astype(np.int64) - int(manifest["output"]["zero_point"])
        assert np.array_equal(got, want), machine
        if run.layers is not None:  # the stage is charged to its first step
            counts = run.layers.instructions[0]
            assert len(counts) == len(manifest["layers"]) and counts[0] > sum(counts[1:plan.patch["last"] + 1])
    again = emit_c(prog, tmp_path / "again", name="patch", plan=plan)
    assert again == manifest
    for rel in manifest["files"]:
        assert (tmp_path / "again" / rel).read_bytes() == (bundle / rel).read_bytes(), rel


def test_emitting_a_patch_plan_without_its_tile_kernels_is_a_pass_error(stage_program, tmp_path):
    from distillc.passes.backend.codegen import emit_c
    from distillc.passes.backend.program import Program

    _, prog = stage_program
    bare = Program(prog.tensors, prog.steps, prog.input_id, prog.output_id, prog.quant, prog.kernels_c,
                   prog.signatures, {})
    with pytest.raises(PassError, match="no tile kernels"):
        emit_c(bare, tmp_path / "b", name="x", plan=plan_memory(bare, schedule="patch"))


def test_a_spec_runs_the_patch_schedule_through_plan_memory_and_verify(tmp_path):
    """An ONNX student with ``schedule = "patch"``: plan-memory makes the tile kernels, codegen.c
    emits the loop, verify.host checks the bundle against onnxruntime."""
    from distillc.progress import SilentProgress
    from distillc.run import compile_spec

    brevitas_stage(tmp_path / "student.onnx", size=(10, 10), channels=1)
    spec = tmp_path / "spec.toml"
    spec.write_text('[distillc]\nspec_version = 1\nname = "patched"\n[student]\nonnx = "student.onnx"\n'
                    '[target]\nuse = "host"\n[target.backend."plan-memory"]\nschedule = "patch"\n'
                    '[target.backend."verify.host"]\nimages = 3\n')
    result = compile_spec(spec, progress=SilentProgress())
    assert result.ran == ["student", "tvm.int8", "plan-memory", "codegen.c", "verify.host"]
    manifest = json.loads((result.final_path / "manifest.json").read_text())
    assert manifest["memory"]["schedule"] == "patch" and manifest["memory"]["patch"]["kernels"]
    assert manifest["memory"]["arena_bytes"] < manifest["memory"]["arena_floor_bytes"]
    host = manifest["verification"]["host"]
    assert host["max_lsb"] <= 1 and host["images"] == 3
    assert result.report["metrics"]["plan-memory"]["patch_extra_macs"] == manifest["memory"]["patch"]["extra_macs"]


#: (seed, weight bits): random nets whose first convs form a chain (testing.random_convnet):
#: 1: 1x17x17, 3x3 convs at strides 1, 2, 2; 23: 3x9x9, depthwise stride 2 then 3x3 convs;
#: 12: 3x12x12, two depthwise stride 2; 27: 4x15x15, 1x1 stride 2, depthwise stride 2, 1x1
RANDOM_NETS = [(1, 8), (23, 4), (12, 2), (27, 8)]


@pytest.mark.parametrize("seed,bits", RANDOM_NETS)
def test_random_nets_in_patches_compute_the_layer_schedules_outputs(seed, bits, tmp_path):
    """Packed 4- and 2-bit weights too: the tile kernels unpack them as the layer kernels do."""
    from distillc.targets.runner import run_on_qemu

    onnx_path = testing.random_qcdq(seed, tmp_path / "model.onnx", weight_bits=bits)
    prog, plan, bundles = _bundles(onnx_path, tmp_path)
    assert plan.patch["last"] >= 1
    if bits < 8:
        assert all(step.weights and step.weights["bits"] == bits for step in prog.steps[:plan.patch["last"] + 1])
    inputs = testing.quantized_inputs(bundles["layer"][0], 4, seed=seed)
    outputs = {}
    for name, (entries, directory) in bundles.items():
        exe = testing.build_host_driver(directory, tmp_path / name / "build")
        outputs[name] = testing.bundle_outputs(exe, entries, inputs, tmp_path / name / "build")
    assert np.array_equal(outputs["patch"], outputs["layer"])
    assert np.abs(outputs["layer"] - testing.ort_reference(onnx_path, bundles["layer"][0], inputs)).max() <= 1
    if bits == 4:
        manifest, bundle = bundles["patch"]
        rows = inputs.reshape(len(inputs), *manifest["input"]["shape"][1:])
        for machine in ("mps2-an500", "mps2-an386"):
            run = run_on_qemu(bundle, rows, tmp_path / "qemu", machine=machine)
            got = run.outputs.reshape(outputs["layer"].shape).astype(np.int64) - int(manifest["output"]["zero_point"])
            assert np.array_equal(got, outputs["layer"]), machine
