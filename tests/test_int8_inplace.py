"""plan-memory's schedules: ``"inplace"`` runs a depthwise conv whose input dies there with its
output written over its input (``inplace.py``: the output starts ``shift`` bytes below the input),
planned below the layer-by-layer floor; ``"auto"`` picks among the schedules.  Every schedule's
bundle computes the layer schedule's outputs and onnxruntime's (odd maps, padding 0 and 1,
strides 1 and 2, 5 channels), on the host and on QEMU mps2-an500 and mps2-an386."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distillc.errors import PassError
from distillc.passes.backend import inplace
from distillc.passes.backend.memory import MemoryPlan, arena_floor, check_plan, plan_memory
from distillc.passes.backend.program import ACTIVATION, CONST, INPUT, OUTPUT, Program, Step, Tensor


def _depthwise(x, w, stride, pad, dilation):
    """Reference depthwise conv (int64) of ``x`` (C, H, W) with ``w`` (C, kh, kw)."""
    c, h, wd = x.shape
    _, kh, kw = w.shape
    ho = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    padded = np.zeros((c, h + pad[0] + pad[2], wd + pad[1] + pad[3]), np.int64)
    padded[:, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = x
    out = np.zeros((c, ho, wo), np.int64)
    for i, j in itertools.product(range(kh), range(kw)):
        out += w[:, i, j, None, None] * padded[:, i * dilation[0]:i * dilation[0] + stride[0] * (ho - 1) + 1:stride[0],
                                               j * dilation[1]:j * dilation[1] + stride[1] * (wo - 1) + 1:stride[1]]
    return out


def _in_place(x, w, stride, pad, dilation, shift, out_shape):
    """The in-place kernel's semantics: raster order over one buffer, each output's window read
    from the buffer (the input, as far as earlier writes left it), then written at ``e - shift``."""
    c, h, wd = x.shape
    _, ho, wo = out_shape
    _, kh, kw = w.shape
    buf = np.full(shift + max(x.size, c * ho * wo), -999, np.int64)
    buf[shift:shift + x.size] = x.reshape(-1)
    e = 0
    for ch, y, xx in itertools.product(range(c), range(ho), range(wo)):
        acc = 0
        for i, j in itertools.product(range(kh), range(kw)):
            r, q = y * stride[0] - pad[0] + i * dilation[0], xx * stride[1] - pad[1] + j * dilation[1]
            if 0 <= r < h and 0 <= q < wd:
                acc += w[ch, i, j] * buf[shift + ch * h * wd + r * wd + q]
        buf[e] = acc % 251  # at shift + e - shift; `% 251` stands in for the requantization
        e += 1
    return buf[:c * ho * wo].reshape(c, ho, wo)


GEOMETRIES = [  # (C, H, W, kernel, stride, padding (top, left, bottom, right), dilation)
    (5, 9, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, 7, 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (2, 6, 7, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    (3, 5, 6, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),
    (2, 8, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    (3, 4, 9, (3, 1), (1, 2), (1, 0, 1, 0), (1, 1)),
    (2, 3, 3, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_the_shift_keeps_every_write_below_what_later_outputs_read(geometry):
    c, h, wd, kernel, stride, pad, dilation = geometry
    rng = np.random.default_rng(sum(geometry[:3]))
    x = rng.integers(-128, 128, (c, h, wd))
    w = rng.integers(-128, 128, (c, *kernel))
    expected = _depthwise(x, w, stride, pad, dilation) % 251
    conv = {"strides": list(stride), "padding": list(pad), "dilation": list(dilation), "groups": c,
            "kernel": list(kernel)}
    shift = inplace.shift_bytes(conv, (1, c, h, wd), (1, *expected.shape), 1, 1)
    assert np.array_equal(_in_place(x, w, stride, pad, dilation, shift, expected.shape), expected)
    if shift:  # the least shift: one byte less overwrites an input a later output still reads
        assert not np.array_equal(_in_place(x, w, stride, pad, dilation, shift - 1, expected.shape), expected)
    assert inplace.shift_bytes(conv, (1, c, h, wd), (1, *expected.shape), 1, 4) % 4 == 0


def test_a_3x3_stride_1_window_needs_one_row_and_one_pixel_and_stride_2_none():
    conv = {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 48, "kernel": [3, 3]}
    assert inplace.shift_bytes(conv, (1, 48, 32, 32), (1, 48, 32, 32), 1, 4) == 36  # 32 + 1, aligned
    assert inplace.shift_bytes({**conv, "strides": [2, 2]}, (1, 48, 32, 32), (1, 48, 16, 16), 1, 4) == 0
    assert inplace.shift_bytes({**conv, "groups": 1}, (1, 48, 32, 32), (1, 48, 32, 32), 1, 4) is None


def _inverted_residuals(blocks: int, hw: int = 16, wide: int = 12, narrow: int = 4) -> Program:
    """MobileNetV2-like on (C, hw, hw) int8 maps: x -> expand -> depthwise 3x3 (in-place kernel)
    -> project (+ x), ``blocks`` times, then a small output."""
    prog = Program(quant={})

    def tensor(channels, kind=ACTIVATION):
        prog.tensors.append(Tensor(len(prog.tensors), f"t{len(prog.tensors)}", (1, channels, hw, hw), "int8", kind))
        return len(prog.tensors) - 1

    def step(args, out, op="conv2d", conv=None, kernel=""):
        index = len(prog.steps)
        weight = len(prog.tensors)
        prog.tensors.append(Tensor(weight, f"w{index}", (4,), "int8", CONST, np.zeros(4, np.int8)))
        prog.steps.append(Step(index, f"s{index}", f"k{index}", [*args, weight], out, op, conv=conv,
                               inplace_kernel=kernel, arg_shapes=[prog.tensors[a].shape for a in args] + [(4,)]))

    x = tensor(narrow, INPUT)
    window = {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": wide, "kernel": [3, 3]}
    for _ in range(blocks):
        expand = tensor(wide)
        step([x], expand)
        dw = tensor(wide)
        step([expand], dw, "depthwise_conv2d", window, f"k{len(prog.steps)}")
        out = tensor(narrow)
        step([dw, x], out)
        x = out
    final = tensor(1, OUTPUT)
    step([x], final)
    prog.input_id, prog.output_id = 0, final
    return prog


def test_inplace_plans_below_the_layer_floor_and_checks_the_shift():
    prog = _inverted_residuals(3)
    layer = plan_memory(prog)
    assert (layer.schedule, layer.inplace, layer.arena_bytes) == ("layer", {}, layer.floor_bytes)
    plan = plan_memory(prog, schedule="inplace")
    wide, narrow, shift = 12 * 256, 4 * 256, 20  # 16 + 1 rounded up to 4
    assert plan.floor_bytes == layer.floor_bytes == 2 * wide + narrow  # expand, depthwise and x
    assert plan.inplace == {1: shift, 4: shift, 7: shift}
    assert plan.schedule_floor_bytes == arena_floor(prog, plan.inplace) == wide + shift + 2 * narrow
    assert plan.arena_bytes == plan.schedule_floor_bytes < layer.arena_bytes
    for index in plan.inplace:  # each depthwise output starts `shift` bytes below its input
        step = prog.steps[index]
        assert plan.offsets[step.out] == plan.offsets[step.args[0]] - shift
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
    assert plan_memory(prog, schedule="auto") == plan  # no extra instructions: the smaller arena
    assert plan_memory(prog, schedule="auto", ram_bytes=layer.arena_bytes) == plan

    wrong = MemoryPlan.from_dict({**plan.to_dict(), "inplace": {"1": shift - 4, "4": shift, "7": shift}})
    with pytest.raises(PassError, match=r"step 1 \(s1\) runs in place 16 B below its input, it needs 20 B"):
        check_plan(prog, wrong)
    moved = dict(plan.offsets)
    moved[prog.steps[4].out] += 4
    with pytest.raises(PassError, match="overlap|not 20 B below"):
        check_plan(prog, MemoryPlan.from_dict({**plan.to_dict(), "offsets": {str(k): v for k, v in moved.items()}}))
    with pytest.raises(PassError, match="step 2 cannot run in place"):
        check_plan(prog, MemoryPlan.from_dict({**plan.to_dict(), "inplace": {"2": 0}}))


def test_a_depthwise_input_read_later_is_not_overwritten():
    prog = _inverted_residuals(1)
    prog.steps[2].args.append(prog.steps[1].args[0])  # the projection also reads the expand output
    assert plan_memory(prog, schedule="inplace").inplace == {}
    prog = _inverted_residuals(1)
    prog.steps[1].inplace_kernel = ""  # no in-place kernel generated
    assert plan_memory(prog, schedule="inplace").inplace == {}


def test_an_unknown_schedule_is_a_pass_error():
    with pytest.raises(PassError, match="unknown memory schedule 'tiles'; valid: layer, inplace, patch, auto"):
        plan_memory(_inverted_residuals(1), schedule="tiles")


def _schedule_bundles(onnx_path, folder, schedules=("layer", "inplace", "auto")):
    """One program, one bundle per schedule: ``{schedule: (manifest, bundle dir)}``."""
    from distillc.passes.backend import import_onnx, lower_int8
    from distillc.passes.backend.codegen import build_program, emit_c

    program = build_program(lower_int8(import_onnx(onnx_path)))
    bundles = {}
    for schedule in schedules:
        bundle = folder / schedule / "bundle"
        bundles[schedule] = (emit_c(program, bundle, name="dw", plan=plan_memory(program, schedule=schedule)), bundle)
    return program, bundles


def _check_schedules(onnx_path, folder, *, variants: bool):
    from distillc.passes.backend import testing
    from distillc.targets.runner import run_on_qemu

    program, bundles = _schedule_bundles(onnx_path, folder)
    (layer, layer_dir), (manifest, bundle) = bundles["layer"], bundles["inplace"]
    memory = manifest["memory"]
    assert layer["memory"]["schedule"] == "layer" and layer["memory"]["inplace_layers"] == []
    assert memory["schedule"] == "inplace" and memory["inplace_layers"]
    assert memory["arena_floor_bytes"] == layer["memory"]["arena_floor_bytes"] <= layer["memory"]["arena_bytes"]
    assert memory["arena_bytes"] == memory["schedule_floor_bytes"] < memory["arena_floor_bytes"]
    assert bundles["auto"][0]["memory"] == memory  # the smallest arena
    source = (bundle / "src" / "distillc_kernels.c").read_text()
    executor = (bundle / "src" / "distillc_model.c").read_text()
    for index in memory["inplace_layers"]:
        entry = manifest["layers"][index]
        assert entry["op"] == "depthwise_conv2d" and entry["inplace_shift_bytes"] is not None
        assert f"{entry['kernel']}(" in executor and f"void {entry['kernel']}(" in source
        assert entry["kernel"].endswith(inplace.SUFFIX) == variants
    assert "in place (" in executor and "restrict" not in source  # the kernels may alias input and output
    assert memory["schedule_extra_instructions"] == (None if variants else 0)
    assert ("_inplace" in source) == variants and "_inplace" not in (layer_dir / "src" / "distillc_kernels.c").read_text()

    inputs = testing.quantized_inputs(manifest, 6, seed=3)
    outputs = {}
    for schedule, (entries, directory) in bundles.items():
        exe = testing.build_host_driver(directory, folder / schedule / "build")  # -std=c99 -Wall -Wextra -Werror
        outputs[schedule] = testing.bundle_outputs(exe, entries, inputs, folder / schedule / "build")
        assert np.array_equal(outputs[schedule], outputs["layer"]), schedule
    assert np.abs(outputs["layer"] - testing.ort_reference(onnx_path, layer, inputs)).max() <= 1  # float32 ties
    testing.compile_for_cortex_m7(bundle, folder / "m7")  # arm-none-eabi-gcc -Werror
    rows = inputs.reshape(len(inputs), *manifest["input"]["shape"][1:])
    for machine in ("mps2-an500", "mps2-an386"):
        run = run_on_qemu(bundle, rows, folder / "qemu", machine=machine)
        got = run.outputs.reshape(outputs["layer"].shape).astype(np.int64) - int(manifest["output"]["zero_point"])
        assert np.array_equal(got, outputs["layer"]), machine
    again = folder / "again"
    from distillc.passes.backend.codegen import emit_c

    assert emit_c(program, again, name="dw", plan=plan_memory(program, schedule="inplace")) == manifest
    for rel in manifest["files"]:  # byte-reproducible
        assert (again / rel).read_bytes() == (bundle / rel).read_bytes(), rel


def test_depthwise_layers_run_in_place_on_host_and_qemu(tmp_path):
    """9x9 -> 9 -> 5 -> 3 -> 2 -> 2 (stride 1 and 2, padding 1 and 0, 5 channels): the in-place
    steps call the layer kernels themselves (the same raster-order C)."""
    from tests.test_int8_depthwise import depthwise_net

    onnx_path = depthwise_net(tmp_path / "dw.onnx", size=9, layers=[(1, 1), (2, 1), (1, 0), (2, 1), (1, 1)])
    _check_schedules(onnx_path, tmp_path, variants=False)


def test_in_place_kernels_of_their_own_when_the_layer_kernels_differ(tmp_path, monkeypatch):
    """TOPI depthwise kernels that reload weights per pixel: the in-place steps call raster-order
    kernels of their own (``*_inplace``)."""
    from distillc.passes.backend import lowering, qdq_to_int8
    from tests.test_int8_depthwise import depthwise_net

    monkeypatch.setattr(qdq_to_int8, "DEPTHWISE_KERNELS", False, raising=False)  # TOPI's depthwise kernels
    monkeypatch.setattr(lowering, "DEPTHWISE_WEIGHTS_LOCAL", False)
    onnx_path = depthwise_net(tmp_path / "dw.onnx", size=9, layers=[(1, 1), (2, 1), (1, 0), (2, 1), (1, 1)])
    _check_schedules(onnx_path, tmp_path, variants=True)


@pytest.mark.parametrize("seed", [29, 0])
def test_random_nets_compute_the_same_outputs_under_every_schedule(seed, tmp_path):
    """9x9 and 20x20 maps, 15 and 17 channels, depthwise after pooling and after a conv."""
    from distillc.passes.backend import testing

    onnx_path = testing.random_qcdq(seed, tmp_path / "model.onnx")
    _, bundles = _schedule_bundles(onnx_path, tmp_path)
    inputs = testing.quantized_inputs(bundles["layer"][0], 4, seed=seed)
    outputs = []
    for schedule, (manifest, bundle) in bundles.items():
        assert manifest["memory"]["arena_bytes"] <= bundles["layer"][0]["memory"]["arena_bytes"]
        exe = testing.build_host_driver(bundle, tmp_path / schedule / "build")
        outputs.append(testing.bundle_outputs(exe, manifest, inputs, tmp_path / schedule / "build"))
    assert all(np.array_equal(o, outputs[0]) for o in outputs)
    assert np.abs(outputs[0] - testing.ort_reference(onnx_path, bundles["layer"][0], inputs)).max() <= 1


@pytest.mark.parametrize("value,wanted", [
    ('"tiles"', "unknown schedule 'tiles'; valid: layer, inplace, patch, auto"),
    ('"Patch"', "unknown schedule 'Patch'; valid: layer, inplace, patch, auto"),
])
def test_a_bad_schedule_is_one_error_naming_the_key(value, wanted, write_spec):
    from tests.conftest import tiny_spec_text
    from tests.test_user_errors import invoke, one_error

    text = tiny_spec_text(target="stm32h7", target_options=f'backend = {{ "plan-memory" = {{ schedule = {value} }} }}')
    one_error(invoke("validate", str(write_spec(text))), "error: target.backend.plan-memory.schedule: ", wanted)


def test_auto_gets_the_targets_ram_and_other_schedules_do_not():
    from distillc.passes.backend.tvm_int8 import PlanMemory

    assert PlanMemory.Config.model_validate({"ram_kb": 64}).ram_kb is None  # the layer schedule's key is unchanged
    assert PlanMemory.Config.model_validate({"ram_kb": 64, "schedule": "auto"}).ram_kb == 64
