"""Instructions per MAC by layer type of MobileNetV2-0.35 (32x32x3) on QEMU Cortex-M7 and Cortex-M4.

    .venv/bin/python benchmarks/kernels.py [--cmsis-nn DIR] [--inputs 2] [--width 0.35] [--size 32]

The network of benchmarks/backend.py (seeded random weights, Brevitas on random calibration
images; the counts do not depend on training) with a linear classifier 1280 -> 100 added, so the
FC layer type is measured in the same network.  The bundle runs on QEMU mps2-an500 (Cortex-M7) and
mps2-an386 (Cortex-M4) with verify.qemu's per-layer counts (``run_on_qemu(layers=True)``: a build
whose executor reads the MPS2 FPGA counter after every kernel, 40 instructions per reading), and
the layers are grouped by type: stem 3x3, 1x1 expansion, depthwise 3x3 stride 1 / 2, 1x1
projection (with and without the residual add, which distillc fuses into it), last 1x1, FC.

Also printed: the arena against its layer-by-layer floor for every memory schedule of plan-memory
(``layer``, ``inplace``, ``auto``; each a bundle of its own, whose outputs on mps2-an500 must equal
the layer schedule's, with its measured instructions per inference), and the constants' flash for
each weight bit width (8 and 4), as the bundle's manifest records it.

``--cmsis-nn DIR``: a CMSIS-NN checkout (its Include/ and Source/; not part of distillc).  Its
kernels (arm_convolve_wrapper_s8, arm_depthwise_conv_wrapper_s8, arm_elementwise_add_s8,
arm_avgpool_s8, arm_fully_connected_s8) are compiled with arm-none-eabi-gcc -O2 for each core and
called by a generated C harness on the same shapes (NHWC, random data, per-channel requantization
except the FC, which CMSIS-NN's arm_fully_connected_s8 does per tensor), timed with the same
counter on the same boards in the same run.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend import quantized_mobilenet  # noqa: E402  (the same network as benchmarks/backend.py)

BOARDS = ("mps2-an500", "mps2-an386")
TYPES = ("stem 3x3", "1x1 expansion", "depthwise 3x3 s1", "depthwise 3x3 s2", "1x1 projection",
         "1x1 projection + add", "last 1x1", "FC", "global average pool", "other")
WEIGHT_BITS = (8, 4)
CLASSES = 100
#: CMSIS-NN's folders the harness needs (the rest is LSTM, softmax, SVDF, ...).
CMSIS_NN_FOLDERS = ("BasicMathFunctions", "ConvolutionFunctions", "FullyConnectedFunctions", "NNSupportFunctions",
                    "PoolingFunctions")


@dataclass(frozen=True)
class Layer:
    """One kernel call of the bundle, with the shape facts a CMSIS-NN call needs."""

    step: int
    name: str
    op: str
    kind: str  # one of TYPES
    macs: int
    cin: int
    h: int
    w: int
    cout: int
    ho: int
    wo: int
    k: int
    stride: int


def classify(layers: list[dict]) -> list[Layer]:
    """The manifest's layers by type.  The kernel size is MACs / (output elements x input
    channels per group); a 1x1 projection carries the residual add when its block's input has its
    output's shape (distillc fuses that add into the projection's kernel)."""
    convs = [i for i, layer in enumerate(layers) if layer["op"] == "conv2d"]
    out = []
    for i, layer in enumerate(layers):
        op, macs = layer["op"], int(layer["macs"] or 0)
        ins, outs = layer["input_shape"], layer["output_shape"]
        cin, h, w = (ins + [1, 1])[1:4] if len(ins) >= 2 else (ins[-1], 1, 1)
        cout, ho, wo = (outs + [1, 1])[1:4] if len(outs) >= 2 else (outs[-1], 1, 1)
        k, stride, kind = 0, 1, "other"
        if op in ("conv2d", "depthwise_conv2d") and macs:
            k = round(math.sqrt(macs / (cout * ho * wo * (cin if op == "conv2d" else 1))))
            stride = h // ho
        if op == "conv2d" and i == convs[0] and k == 3:
            kind = "stem 3x3"
        elif op == "conv2d" and k == 1 and i == convs[-1]:
            kind = "last 1x1"
        elif op == "conv2d" and k == 1 and cout > cin:
            kind = "1x1 expansion"
        elif op == "conv2d" and k == 1:
            dw = layers[i - 1]
            expand = layers[i - 2] if i >= 2 else None
            block_in = (expand["input_shape"] if expand is not None and expand["op"] == "conv2d"
                        and expand["output_shape"] == dw["input_shape"] else dw["input_shape"])
            kind = "1x1 projection + add" if block_in == outs else "1x1 projection"
        elif op == "depthwise_conv2d" and k == 3:
            kind = f"depthwise 3x3 s{stride}"
        elif op == "dense":
            kind, cin, cout = "FC", ins[-1], outs[-1]
        elif op == "global_avg_pool":
            kind = "global average pool"
        out.append(Layer(i, layer["name"], op, kind, macs, cin, h, w, cout, ho, wo, k, stride))
    return out


def compile_bundle(onnx_path: Path, bundle: Path, schedules: dict[str, Path] | None = None) -> dict:
    """The layer schedule's bundle in ``bundle`` (its manifest returned), and one bundle per
    schedule named in ``schedules`` (schedule -> folder; their manifests in ``SCHEDULED``)."""
    from distillc.passes.backend import import_onnx, lower_int8, plan_memory
    from distillc.passes.backend.codegen import build_program, emit_c

    from distillc.passes.backend.patch import attach_kernels

    program = build_program(lower_int8(import_onnx(onnx_path)))
    for schedule, folder in (schedules or {}).items():
        plan = plan_memory(program, schedule=schedule)
        if plan.patch:  # what the plan-memory pass does: the stage's tile kernels
            attach_kernels(program, onnx_path, plan.patch)
        SCHEDULED[schedule] = emit_c(program, folder, name="kernels", plan=plan)
    return emit_c(program, bundle, name="kernels", plan=plan_memory(program))


#: schedule -> manifest of the bundles compile_bundle made for ``schedules``.
SCHEDULED: dict[str, dict] = {}
SCHEDULES = ("layer", "inplace", "patch", "auto")


def by_type(layers: list[Layer], counts: list[float]) -> dict[str, tuple[int, int, float]]:
    """type -> (layers, MACs, instructions)."""
    table: dict[str, tuple[int, int, float]] = {}
    for layer, count in zip(layers, counts):
        if count is None:
            continue
        n, macs, instr = table.get(layer.kind, (0, 0, 0.0))
        table[layer.kind] = (n + 1, macs + layer.macs, instr + count)
    return table


# ----------------------------------------------------------------------------------------------
# CMSIS-NN on the same shapes


def cmsis_harness(layers: list[Layer]) -> str:
    """C that calls CMSIS-NN's kernel for every layer (a projection + add: the conv, then the add),
    timing each call alone with the board's counter, and prints one line per call."""
    act = max(max(l.cin * l.h * l.w, l.cout * l.ho * l.wo) for l in layers)
    weights = max(l.cout * l.cin * max(l.k, 1) ** 2 if l.op != "depthwise_conv2d" else l.cin * 9 for l in layers)
    channels = max(max(l.cin, l.cout) for l in layers)
    calls = []
    for l in layers:
        if l.op == "conv2d":
            calls.append(f"    run_conv({l.step}, {l.cin}, {l.h}, {l.w}, {l.cout}, {l.ho}, {l.wo}, {l.k}, {l.stride});")
            if l.kind == "1x1 projection + add":
                calls.append(f"    run_add({l.step}, {l.cout * l.ho * l.wo});")
        elif l.op == "depthwise_conv2d":
            calls.append(f"    run_depthwise({l.step}, {l.cin}, {l.h}, {l.w}, {l.ho}, {l.wo}, {l.k}, {l.stride});")
        elif l.op == "global_avg_pool":
            calls.append(f"    run_avgpool({l.step}, {l.cin}, {l.h}, {l.w});")
        elif l.op == "dense":
            calls.append(f"    run_fully_connected({l.step}, {l.cin}, {l.cout});")
    return CMSIS_HARNESS.format(act=act, weights=weights, channels=channels, calls="\n".join(calls))


CMSIS_HARNESS = """\
/* CMSIS-NN's kernels on distillc's layer shapes (generated by benchmarks/kernels.py). */
#include <stdint.h>
#include <stdio.h>

#include "arm_nnfunctions.h"
#include "board.h"

#define ACT_BYTES {act}
#define WEIGHT_BYTES {weights}
#define CHANNELS {channels}
#define SCRATCH_BYTES (256 * 1024)

static int8_t act_in[ACT_BYTES];
static int8_t act_res[ACT_BYTES];
static int8_t act_out[ACT_BYTES];
static int8_t weights[WEIGHT_BYTES];
static int32_t bias[CHANNELS];
static int32_t mult[CHANNELS];
static int32_t shift[CHANNELS];

/* Not static: a network without some kind of layer leaves its function unused. */
void run_conv(int step, int cin, int h, int w, int cout, int ho, int wo, int k, int stride);
void run_depthwise(int step, int c, int h, int w, int ho, int wo, int k, int stride);
void run_add(int step, int size);
void run_avgpool(int step, int c, int h, int w);
void run_fully_connected(int step, int in_features, int out_features);
static int64_t scratch[SCRATCH_BYTES / 8];
static int failures;
static uint32_t state = 0x12345678u;

static uint32_t next_random(void)
{{
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return state;
}}

static void fill(void)
{{
    for (int i = 0; i < ACT_BYTES; ++i) {{
        act_in[i] = (int8_t)next_random();
        act_res[i] = (int8_t)next_random();
    }}
    for (int i = 0; i < WEIGHT_BYTES; ++i) {{
        weights[i] = (int8_t)next_random();
    }}
    for (int i = 0; i < CHANNELS; ++i) {{
        bias[i] = (int32_t)(next_random() % 2001u) - 1000;
        mult[i] = (int32_t)(0x40000000u + next_random() % 0x3FFFFFFFu);
        shift[i] = -(int32_t)(6u + next_random() % 5u);
    }}
}}

static cmsis_nn_context context(int32_t bytes, int step)
{{
    cmsis_nn_context ctx;
    ctx.buf = scratch;
    ctx.size = bytes;
    if (bytes > SCRATCH_BYTES) {{
        printf("cmsis-error %d: needs %ld scratch bytes\\n", step, (long)bytes);
        failures = 1;
        ctx.size = 0;
    }}
    return ctx;
}}

static void report(int step, const char *call, arm_cmsis_nn_status status, uint32_t start, uint32_t end)
{{
    if (status != ARM_CMSIS_NN_SUCCESS) {{
        printf("cmsis-error %d: %s returned %d\\n", step, call, (int)status);
        failures = 1;
    }}
    printf("cmsis-layer %d %s: %llu\\n", step, call, distillc_board_instructions(start, end));
}}

void run_conv(int step, int cin, int h, int w, int cout, int ho, int wo, int k, int stride)
{{
    const cmsis_nn_conv_params params = {{128, -128, {{stride, stride}}, {{k / 2, k / 2}}, {{1, 1}}, {{-128, 127}}}};
    const cmsis_nn_per_channel_quant_params quant = {{mult, shift}};
    const cmsis_nn_dims in = {{1, h, w, cin}}, filter = {{cout, k, k, cin}}, bias_dims = {{1, 1, 1, cout}};
    const cmsis_nn_dims out = {{1, ho, wo, cout}};
    const cmsis_nn_context ctx = context(arm_convolve_wrapper_s8_get_buffer_size(&params, &in, &filter, &out), step);
    const uint32_t start = distillc_board_ticks();
    const arm_cmsis_nn_status status = arm_convolve_wrapper_s8(&ctx, &params, &quant, &in, act_in, &filter, weights,
                                                               &bias_dims, bias, &out, act_out);
    const uint32_t end = distillc_board_ticks();
    report(step, "arm_convolve_wrapper_s8", status, start, end);
}}

void run_depthwise(int step, int c, int h, int w, int ho, int wo, int k, int stride)
{{
    const cmsis_nn_dw_conv_params params = {{128, -128, 1, {{stride, stride}}, {{k / 2, k / 2}}, {{1, 1}}, {{-128, 127}}}};
    const cmsis_nn_per_channel_quant_params quant = {{mult, shift}};
    const cmsis_nn_dims in = {{1, h, w, c}}, filter = {{1, k, k, c}}, bias_dims = {{1, 1, 1, c}};
    const cmsis_nn_dims out = {{1, ho, wo, c}};
    const cmsis_nn_context ctx = context(arm_depthwise_conv_wrapper_s8_get_buffer_size(&params, &in, &filter, &out),
                                         step);
    const uint32_t start = distillc_board_ticks();
    const arm_cmsis_nn_status status = arm_depthwise_conv_wrapper_s8(&ctx, &params, &quant, &in, act_in, &filter,
                                                                     weights, &bias_dims, bias, &out, act_out);
    const uint32_t end = distillc_board_ticks();
    report(step, "arm_depthwise_conv_wrapper_s8", status, start, end);
}}

void run_add(int step, int size)
{{
    const uint32_t start = distillc_board_ticks();
    const arm_cmsis_nn_status status = arm_elementwise_add_s8(act_out, act_res, 128, 1073741824, -1, 128, 1200000000,
                                                              -1, 20, act_in, -128, 1500000000, -19, -128, 127, size);
    const uint32_t end = distillc_board_ticks();
    report(step, "arm_elementwise_add_s8", status, start, end);
}}

void run_avgpool(int step, int c, int h, int w)
{{
    const cmsis_nn_pool_params params = {{{{1, 1}}, {{0, 0}}, {{-128, 127}}}};
    const cmsis_nn_dims in = {{1, h, w, c}}, filter = {{1, h, w, 1}}, out = {{1, 1, 1, c}};
    const cmsis_nn_context ctx = context(arm_avgpool_s8_get_buffer_size(1, c), step);
    const uint32_t start = distillc_board_ticks();
    const arm_cmsis_nn_status status = arm_avgpool_s8(&ctx, &params, &in, act_in, &filter, &out, act_out);
    const uint32_t end = distillc_board_ticks();
    report(step, "arm_avgpool_s8", status, start, end);
}}

void run_fully_connected(int step, int in_features, int out_features)
{{
    const cmsis_nn_fc_params params = {{128, 0, -128, {{-128, 127}}}};
    const cmsis_nn_per_tensor_quant_params quant = {{1200000000, -9}};
    const cmsis_nn_dims in = {{1, 1, 1, in_features}}, filter = {{in_features, 1, 1, out_features}};
    const cmsis_nn_dims bias_dims = {{1, 1, 1, out_features}}, out = {{1, 1, 1, out_features}};
    const cmsis_nn_context ctx = context(arm_fully_connected_s8_get_buffer_size(&filter), step);
    const uint32_t start = distillc_board_ticks();
    const arm_cmsis_nn_status status = arm_fully_connected_s8(&ctx, &params, &quant, &in, act_in, &filter, weights,
                                                              &bias_dims, bias, &out, act_out);
    const uint32_t end = distillc_board_ticks();
    report(step, "arm_fully_connected_s8", status, start, end);
}}

int main(void)
{{
    fill();
{calls}
    printf("cmsis-done: %d\\n", failures);
    return failures;
}}
"""

_CMSIS_LINE = re.compile(r"^cmsis-layer (\d+) (\w+): (\d+)$", re.M)


def run_cmsis_nn(checkout: Path, layers: list[Layer], machine: str, workdir: Path) -> dict[int, float]:
    """CMSIS-NN's instructions per layer step on ``machine`` (a projection + add: conv and add)."""
    from distillc.targets.runner import MPS2_FILES
    from distillc.targets.toolchain import (ARM_FLAGS, ARM_LINK_FLAGS, C_FLAGS, LIBS, command_line, find_tool,
                                            get_board, run_tool)

    board = get_board(machine)
    arm_gcc, qemu = find_tool("arm-none-eabi-gcc"), find_tool("qemu-system-arm")
    arm_ar = shutil.which("arm-none-eabi-ar") or sys.exit("arm-none-eabi-ar not found (binutils-arm-none-eabi)")
    include = checkout / "Include"
    sources = sorted(s for folder in CMSIS_NN_FOLDERS for s in (checkout / "Source" / folder).glob("*.c")
                     if not re.search(r"_f(16|32)\.c$", s.name))  # the float kernels need float16_t
    if not include.is_dir() or not sources:
        raise SystemExit(f"--cmsis-nn {checkout}: not a CMSIS-NN checkout (no Include/ or Source/*/*.c)")
    build = workdir / f"cmsis-nn-{machine}"
    (build / "obj").mkdir(parents=True, exist_ok=True)
    cpu = command_line(board.cpu_flags) + ["-mthumb", "-O2", "-ffunction-sections", "-fdata-sections"]

    def compile_one(source: Path) -> Path:
        obj = build / "obj" / f"{source.stem}.o"
        run_tool([arm_gcc, *cpu, f"-I{include}", "-c", source, "-o", obj], what=f"compiling {source}", timeout=300)
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    library = build / "libcmsis-nn.a"
    library.unlink(missing_ok=True)
    run_tool([arm_ar, "rcs", library, *objects], what="arm-none-eabi-ar", timeout=300)
    harness = build / "harness.c"
    harness.write_text(cmsis_harness(layers))
    elf = build / "harness.elf"
    run_tool([arm_gcc, *command_line(board.cpu_flags), *command_line(ARM_FLAGS), *command_line(C_FLAGS),
              f"-I{include}", f"-I{MPS2_FILES.include_dir}", harness, MPS2_FILES.startup, library,
              *command_line(ARM_LINK_FLAGS), "-T", MPS2_FILES.linker_script, "-Wl,--defsym=__stack_size=32768",
              "-o", elf, *command_line(LIBS)], what="linking the CMSIS-NN harness", timeout=300)
    printed = run_tool(board.qemu_command(qemu, elf), what=f"the CMSIS-NN harness on QEMU {machine}",
                       timeout=600).stdout
    if "cmsis-done: 0" not in printed:
        raise SystemExit(f"the CMSIS-NN harness failed on {machine}:\n{printed}")
    counts: dict[int, float] = {}
    for match in _CMSIS_LINE.finditer(printed):
        counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + int(match.group(3))
    return counts


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cmsis-nn", type=Path, metavar="DIR", help="a CMSIS-NN checkout: also run its kernels")
    parser.add_argument("--inputs", type=int, default=2, help="random inputs per board (counts are their mean)")
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    import numpy as np

    from distillc.targets.runner import run_on_qemu

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = {}
        for bits in WEIGHT_BITS:
            onnx_path = quantized_mobilenet(tmp / f"model-w{bits}.onnx", width=args.width, size=args.size,
                                            weight_bits=bits, num_classes=CLASSES)
            manifests[bits] = compile_bundle(onnx_path, tmp / f"bundle-w{bits}", schedules={
                s: tmp / f"bundle-{s}" for s in SCHEDULES} if bits == 8 else None)
        manifest = manifests[8]
        layers = classify(manifest["layers"])
        macs = sum(layer.macs for layer in layers)
        fc_steps = [layer.step for layer in layers if layer.kind == "FC"]
        print(f"model: MobileNetV2 width {args.width}, {args.size}x{args.size}x3, classifier 1280 -> {CLASSES}: "
              f"{len(layers)} kernel calls, {macs:,} MACs ({macs - sum(layers[s].macs for s in fc_steps):,} "
              f"without the classifier, the network of benchmarks/backend.py)")
        rng = np.random.default_rng(0)
        shape = manifest["input"]["shape"]
        inputs = rng.integers(-128, 128, size=(args.inputs, *shape[1:]), dtype=np.int8)

        per_board: dict[str, dict] = {}
        for machine in BOARDS:
            run = run_on_qemu(tmp / "bundle-w8", inputs, tmp / "qemu", machine=machine, layers=True)
            counts = [statistics.fmean(c[i] for c in run.layers.instructions) for i in range(len(layers))]
            cmsis = None
            if args.cmsis_nn:
                found = run_cmsis_nn(args.cmsis_nn.resolve(), layers, machine, tmp)
                cmsis = [found.get(layer.step) for layer in layers]
            per_board[machine] = {"run": run, "counts": counts, "cmsis": cmsis}

        for machine, figures in per_board.items():
            run, counts, cmsis = figures["run"], figures["counts"], figures["cmsis"]
            total = statistics.fmean(run.instructions)
            traced = statistics.fmean(run.layers.totals)
            without_fc = sum(c for layer, c in zip(layers, counts) if layer.kind != "FC")
            print(f"\n{machine} ({run.machine}; counter resolution {run.layers.resolution} instructions per reading, "
                  f"mean of {len(inputs)} random inputs)")
            print(f"  whole network, plain build: {total:,.0f} instructions = {total / macs:.2f} per MAC")
            print(f"  sum of the per-layer counts: {sum(counts):,.0f} ({sum(counts) / total:.4f} of the plain total); "
                  f"counting build's whole inference {traced:,.0f} (+{traced - total:,.0f}: the hooks)")
            print(f"  without the classifier (per-layer sum): {without_fc:,.0f} = "
                  f"{without_fc / (macs - sum(layers[s].macs for s in fc_steps)):.2f} per MAC")
            ours = by_type(layers, counts)
            theirs = by_type(layers, cmsis) if cmsis else {}
            head = "  | layer type | layers | MACs | distillc instructions | distillc instr/MAC |"
            if cmsis:
                head += " CMSIS-NN instructions | CMSIS-NN instr/MAC |"
            print(head)
            print("  |" + "---|" * (head.count("|") - 1))
            rows = [(kind, ours[kind]) for kind in TYPES if kind in ours]
            for kind, (n, kind_macs, instr) in rows:
                line = f"  | {kind} | {n} | {kind_macs:,} | {instr:,.0f} | {instr / kind_macs:.2f} |" if kind_macs else \
                    f"  | {kind} | {n} | 0 | {instr:,.0f} | - |"
                if cmsis:
                    if kind in theirs:
                        _, _, c_instr = theirs[kind]
                        line += f" {c_instr:,.0f} | {c_instr / kind_macs:.2f} |" if kind_macs else f" {c_instr:,.0f} | - |"
                    else:
                        line += " (no call) | - |"
                print(line)
            line = f"  | whole network | {len(layers)} | {macs:,} | {sum(counts):,.0f} | {sum(counts) / macs:.2f} |"
            if cmsis:
                c_total = sum(c for c in cmsis if c is not None)
                line += f" {c_total:,.0f} | {c_total / macs:.2f} |"
            print(line)

        print("\narena per memory schedule (8-bit weights; instructions per inference measured on mps2-an500, "
              "outputs equal to the layer schedule's)")
        base = per_board["mps2-an500"]["run"]
        for name in SCHEDULES:
            memory = SCHEDULED[name]["memory"]
            run = run_on_qemu(tmp / f"bundle-{name}", inputs, tmp / f"qemu-{name}", machine="mps2-an500")
            if not np.array_equal(run.outputs, base.outputs):
                raise SystemExit(f"the {name} schedule's bundle computes other outputs than the layer schedule's")
            extra = statistics.fmean(run.instructions) - statistics.fmean(base.instructions)
            print(f"  {name} (ran {memory['schedule']}, {len(memory['inplace_layers'])} layers in place): arena_bytes "
                  f"{memory['arena_bytes']:,}, arena_floor_bytes {memory['arena_floor_bytes']:,} "
                  f"(ratio {memory['arena_bytes'] / memory['arena_floor_bytes']:.3f}), schedule floor "
                  f"{memory['schedule_floor_bytes']:,}, plan {memory['plan_strategy']}; extra instructions "
                  f"{extra:+,.0f} measured, {memory['schedule_extra_instructions']} in the manifest")
            if memory["patch"]:
                stage = memory["patch"]
                steps = len(stage["steps"])
                print(f"    steps {stage['steps'][0]}-{stage['steps'][-1]} in {stage['tiles'][0]}x{stage['tiles'][1]} "
                      f"patches of {stage['tile'][0]}x{stage['tile'][1]} outputs, {stage['extra_macs']:,} MACs of halo; "
                      f"live bytes over those steps at most {max(memory['live_bytes'][:steps]):,} "
                      f"(layer schedule: {max(SCHEDULED['layer']['memory']['live_bytes'][:steps]):,})")

        print("\nflash per weight bit width (what each bundle's manifest records; model flash measured on "
              "mps2-an500, the bundle's objects at -O2)")
        for bits in WEIGHT_BITS:
            memory = manifests[bits]["memory"]
            weight_bytes = sum(int(layer.get("weight_bytes") or 0) for layer in manifests[bits]["layers"])
            run = per_board["mps2-an500"]["run"] if bits == 8 else run_on_qemu(
                tmp / f"bundle-w{bits}", inputs[:1], tmp / f"qemu-w{bits}", machine="mps2-an500")
            extra = {k: v for k, v in memory.items() if ("weight" in k or "pack" in k) and k != "weights_bytes"}
            print(f"  {bits}-bit weights: weights_bytes {memory['weights_bytes']:,} (layers' weight_bytes "
                  f"{weight_bytes:,}), model flash {run.model_flash_bytes:,} B, "
                  f"{run.instructions_per_inference:,} instructions per inference on mps2-an500"
                  + (f", {extra}" if extra else ""))


if __name__ == "__main__":
    main()
