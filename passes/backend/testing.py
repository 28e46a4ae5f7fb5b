"""Test utilities for the INT8 backend: a host driver for bundles, onnxruntime references and a
seeded generator of small conv nets.  Used by ``tests/test_int8_*.py``; not needed at run time.

The driver here is a test harness only (stdin/stdout-free, file based); the bundle's real
example program is ``examples/main.c``, written by the targets.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np

from distillc.passes.export.to_onnx import reference_session  # noqa: F401  (re-exported for tests)

HOST_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]
CORTEX_M7_FLAGS = ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16",
                   "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]

DRIVER_C = r"""/* Test driver: runs every input record of a file through the bundle. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "distillc_model.h"

int main(int argc, char **argv)
{
    static int8_t qin[DISTILLC_INPUT_SIZE];
    static int8_t qout[DISTILLC_OUTPUT_SIZE];
    static float fin[DISTILLC_INPUT_SIZE];
    static float fout[DISTILLC_OUTPUT_SIZE];
    int use_float;
    FILE *in;
    FILE *out;

    if (argc != 4) {
        fprintf(stderr, "usage: %s int8|float INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    use_float = strcmp(argv[1], "float") == 0;
    in = fopen(argv[2], "rb");
    out = fopen(argv[3], "wb");
    if (in == NULL || out == NULL) {
        return 2;
    }
    for (;;) {
        int status;
        if (use_float) {
            if (fread(fin, sizeof fin[0], DISTILLC_INPUT_SIZE, in) != DISTILLC_INPUT_SIZE) {
                break;
            }
            status = distillc_model_run_float(fin, fout);
            fwrite(fout, sizeof fout[0], DISTILLC_OUTPUT_SIZE, out);
        } else {
            if (fread(qin, 1, DISTILLC_INPUT_SIZE, in) != DISTILLC_INPUT_SIZE) {
                break;
            }
            status = distillc_model_run(qin, qout);
            fwrite(qout, 1, DISTILLC_OUTPUT_SIZE, out);
        }
        if (status != 0) {
            return 3;
        }
    }
    fclose(in);
    fclose(out);
    return 0;
}
"""


def bundle_sources(bundle_dir) -> list:
    return sorted(str(p) for p in (Path(bundle_dir) / "src").glob("*.c"))


def build_host_driver(bundle_dir, work_dir, *, cc: str = "gcc") -> Path:
    """Compile the bundle and the test driver for the host with ``-Wall -Wextra -Werror``."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    driver = work_dir / "driver.c"
    driver.write_text(DRIVER_C)
    exe = work_dir / "driver"
    cmd = [cc, *HOST_FLAGS, "-I", str(Path(bundle_dir) / "include"), str(driver),
           *bundle_sources(bundle_dir), "-o", str(exe), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def compile_for_cortex_m7(bundle_dir, work_dir, *, cc: str = "arm-none-eabi-gcc") -> list:
    """``-c`` every bundle source with the Cortex-M7 flags; returns the object files."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for src in bundle_sources(bundle_dir):
        obj = work_dir / (Path(src).stem + ".o")
        cmd = [cc, *CORTEX_M7_FLAGS, "-I", str(Path(bundle_dir) / "include"), "-c", src,
               "-o", str(obj)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        objects.append(obj)
    return objects


def run_driver(exe, inputs: np.ndarray, work_dir, *, mode: str = "int8") -> np.ndarray:
    """Run ``inputs`` (N records) through the compiled driver; returns the N output records."""
    work_dir = Path(work_dir)
    src, dst = work_dir / f"in_{mode}.bin", work_dir / f"out_{mode}.bin"
    dtype = np.int8 if mode == "int8" else np.float32
    np.ascontiguousarray(inputs, dtype=dtype).tofile(src)
    subprocess.run([str(exe), mode, str(src), str(dst)], check=True, capture_output=True)
    return np.fromfile(dst, dtype=dtype)


def quantized_inputs(manifest: dict, count: int, seed: int = 0) -> np.ndarray:
    """Random int8 inputs in the manifest's input shape (batch dimension = count)."""
    shape = manifest["input"]["shape"]
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, size=(count, *shape[1:]), dtype=np.int8)


def dequantize(q: np.ndarray, quant: dict) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(quant["zero_point"]))
            * np.float32(quant["scale"])).astype(np.float32)


def ort_reference(onnx_path, manifest: dict, q_inputs: np.ndarray) -> np.ndarray:
    """onnxruntime's output for the dequantized int8 inputs, as integers in the bundle's
    output quantization (``q - zero_point``), one record per input."""
    session = reference_session(onnx_path)
    name = session.get_inputs()[0].name
    x = dequantize(q_inputs, manifest["input"])
    outs = [session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]
    ref = np.concatenate(outs).reshape(len(x), -1)
    return np.rint(ref / np.float32(manifest["output"]["scale"])).astype(np.int64)


def bundle_outputs(exe, manifest: dict, q_inputs: np.ndarray, work_dir) -> np.ndarray:
    """The bundle's outputs for ``q_inputs`` as integers ``q - zero_point`` (one row each)."""
    raw = run_driver(exe, q_inputs, work_dir).reshape(len(q_inputs), -1)
    return raw.astype(np.int64) - int(manifest["output"]["zero_point"])


# ----------------------------------------------------------------------------------------------
# Seeded random conv nets


def random_bundle(seed: int, folder, *, weight_bits: int = 8, act_bits: int = 8) -> tuple:
    """:func:`random_convnet` ``seed`` through Brevitas (calibrated on 32 seeded images), QCDQ
    export and the backend into ``folder/bundle``; returns ``(onnx_path, manifest)``."""
    from . import compile_onnx_to_bundle

    onnx_path = random_qcdq(seed, Path(folder) / "model.onnx", weight_bits=weight_bits, act_bits=act_bits)
    return onnx_path, compile_onnx_to_bundle(onnx_path, Path(folder) / "bundle", name=f"random{seed}")


def random_qcdq(seed: int, path, *, weight_bits: int = 8, act_bits: int = 8, in_channels: int | None = None,
                size: int | None = None) -> Path:
    """:func:`random_convnet` ``seed`` through Brevitas (calibrated on 32 seeded images) into a QCDQ
    ONNX file at ``path``; returns ``path``."""
    import torch

    from . import export_qcdq, quantize

    model, shape = random_convnet(seed, in_channels=in_channels, size=size)
    torch.manual_seed(seed)
    calib = torch.randn(32, *shape[1:])
    qmodel = quantize(model, calib, weight_bits=weight_bits, act_bits=act_bits)
    return export_qcdq(qmodel, calib[:1], Path(path))


def random_convnet(seed: int, *, in_channels: int | None = None, size: int | None = None):
    """A small random conv net and its input shape ``(1, C, H, W)``.

    Built from the ops the backend lowers: conv k1/k3 with stride 1/2, depthwise conv,
    BatchNorm (folded by Brevitas), ReLU/ReLU6, residual adds, average pooling, max pooling
    (2x2 stride 2, or 3x3 stride 1 padded), global average pooling and a final linear layer;
    channels 4..24, input 8..20 px (``in_channels`` and ``size`` fix the input instead: the
    rest of the net is drawn as for ``seed``).
    """
    import torch
    from torch import nn

    rng = random.Random(seed)
    torch.manual_seed(seed)
    in_ch = rng.choice([1, 3, 4])
    drawn_size = rng.randint(8, 20)
    in_ch, size = in_channels or in_ch, size or drawn_size
    specs = []
    channels, spatial = rng.randint(4, 24), size
    specs.append(("conv", in_ch, channels, 3, 1, "relu"))
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(["conv", "conv", "dw", "res", "pool", "maxpool"])
        if kind == "pool" and spatial >= 4:
            specs.append(("pool", channels, channels, 2, 2, ""))
            spatial //= 2
        elif kind == "maxpool":
            if spatial >= 4 and rng.random() < 0.5:
                specs.append(("maxpool", channels, channels, 2, 2, ""))
                spatial //= 2
            else:  # 3x3, stride 1, padded: the map keeps its size
                specs.append(("maxpool", channels, channels, 3, 1, ""))
        elif kind == "res":
            specs.append(("res", channels, channels, 3, 1, rng.choice(["relu", "relu6"])))
        elif kind == "dw":
            stride = 2 if spatial >= 6 and rng.random() < 0.5 else 1
            specs.append(("dw", channels, channels, 3, stride, rng.choice(["relu", "relu6"])))
            spatial = (spatial - 1) // stride + 1
        else:
            out = rng.randint(4, 24)
            k = rng.choice([1, 3])
            stride = 2 if spatial >= 6 and rng.random() < 0.5 else 1
            specs.append(("conv", channels, out, k, stride, rng.choice(["relu", "relu6", ""])))
            channels = out
            spatial = (spatial + 2 * (k // 2) - k) // stride + 1
    head_pool = rng.choice(["global", "avg"]) if spatial >= 4 and spatial % 2 == 0 else "global"
    classes = rng.randint(2, 12)
    model = _SpecNet(specs, head_pool, channels, spatial, classes, nn, torch)
    return randomize_batchnorm(model), (1, in_ch, size, size)


def randomize_batchnorm(model):
    """Give every BatchNorm non-trivial statistics and affine terms (so folding is exercised);
    returns the model in eval mode."""
    import torch
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _SpecNet(specs, head_pool, channels, spatial, classes, nn, torch):
    """Build the nn.Module for ``random_convnet`` (a factory keeps torch imports lazy)."""

    def act(name):
        return {"relu": nn.ReLU(), "relu6": nn.ReLU6()}.get(name, nn.Identity())

    class Block(nn.Module):
        def __init__(self, kind, cin, cout, k, stride, activation):
            super().__init__()
            self.residual = kind == "res"
            if kind == "pool":
                self.body = nn.AvgPool2d(k, stride)
                return
            if kind == "maxpool":
                self.body = nn.MaxPool2d(k, stride, padding=k // 2 if stride == 1 else 0)
                return
            groups = cin if kind == "dw" else 1
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups),
                nn.BatchNorm2d(cout), act(activation))

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class SpecNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[Block(*s) for s in specs])
            if head_pool == "avg":
                self.pool = nn.AvgPool2d(2)
                features = channels * (spatial // 2) ** 2
            else:
                self.pool = nn.AdaptiveAvgPool2d(1)
                features = channels
            self.fc = nn.Linear(features, classes)

        def forward(self, x):
            x = self.pool(self.blocks(x))
            return self.fc(torch.flatten(x, 1))

    return SpecNet()


# ----------------------------------------------------------------------------------------------
# Hand-built QCDQ models whose layers land on exact rounding ties


def tie_net(path, *, in_channels: int = 8, size: int = 6, channels: int = 8, residual: bool = False,
            gain: int = 0, seed: int = 0) -> Path:
    """Write a QCDQ ONNX model (opset 13) that meets float32 rounding ties on ordinary inputs.

    ``conv1`` (``in_channels`` -> ``channels``, 1x1, generic scales) feeds ``conv2`` (1x1, weights
    -1/0/1) whose requantization ratio is exactly 1/2 for every channel, so every odd accumulator
    is a tie: the exact result rounds it half to even, onnxruntime's float32 conv lands a hair
    above or below it.  ``residual`` adds ``conv1``'s output to ``conv2``'s (requantized again,
    at a scale 2.3 times ``conv1``'s, so a one-step change of ``conv2`` moves the sum by a
    fraction of a step); ``gain`` appends a 1x1 conv multiplying each channel by ``gain``
    exactly, so a one-step difference becomes ``gain`` steps at the output.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f32 = np.float32
    s_x = f32(0.0123)
    s_w1 = rng.uniform(0.002, 0.01, channels).astype(f32)
    w1 = rng.integers(-127, 128, (channels, in_channels, 1, 1)).astype(np.int8)
    s_a = f32(s_x * s_w1.max() * 127 * np.sqrt(in_channels) / 4)
    w2 = rng.integers(-1, 2, (channels, channels, 1, 1)).astype(np.int8)
    s_w2 = np.full(channels, 0.5, f32)
    s_y = f32(s_a)  # s_a * 0.5 / s_y == 1/2 exactly
    inits = {"s_x": np.array(s_x), "zp": np.array(0, np.int8), "zp_w": np.zeros(channels, np.int8),
             "w1": w1, "s_w1": s_w1, "s_a": np.array(s_a), "w2": w2, "s_w2": s_w2, "s_y": np.array(s_y)}
    nodes = []

    def quant(value, scale, name):  # Q then DQ; returns the dequantized name
        nodes.append(helper.make_node("QuantizeLinear", [value, scale, "zp"], [name + "_q"], name=name + "_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", scale, "zp"], [name + "_dq"],
                                      name=name + "_DQ"))
        return name + "_dq"

    def conv(x, weight, scale, name):
        nodes.append(helper.make_node("DequantizeLinear", [weight, scale, "zp_w"], [name + "_w"], axis=0,
                                      name=name + "_WDQ"))
        nodes.append(helper.make_node("Conv", [x, name + "_w"], [name + "_out"], name=name))
        return name + "_out"

    x = quant("x", "s_x", "input")
    a = quant(conv(x, "w1", "s_w1", "conv1"), "s_a", "conv1")
    out = quant(conv(a, "w2", "s_w2", "conv2"), "s_y", "conv2")
    if residual:
        inits["s_z"] = np.array(f32(s_a * f32(2.3)))
        nodes.append(helper.make_node("Add", [out, a], ["sum"], name="add"))
        out = quant("sum", "s_z", "add")
    if gain:
        inits["w3"] = np.eye(channels, dtype=np.int8).reshape(channels, channels, 1, 1)
        inits["s_w3"] = np.full(channels, gain, f32)
        inits["s_o"] = inits["s_z" if residual else "s_y"]  # ratio s_in * gain / s_o == gain
        out = quant(conv(out, "w3", "s_w3", "conv3"), "s_o", "conv3")
    graph = helper.make_graph(
        nodes, "ties", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, channels, size, size])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path
