"""Backend figures for MobileNetV2-0.35 (small-input layout, 32x32x3): compile time, memory, QEMU.

    .venv/bin/python benchmarks/backend.py [--width 0.35] [--size 32] [--weight-bits 8,4,2] [--classes 0] [--layers] [--no-qemu]

Builds the student with seeded random weights, quantizes it with Brevitas (calibration on random
images: the figures below do not depend on training), exports QCDQ ONNX, simplifies it, then
times the INT8 backend (TVM import + QDQ rewrite + fusion + kernel C, memory plan, C emission),
and runs the bundle on QEMU mps2-an500 (Cortex-M7) for instructions per inference.  With several
``--weight-bits`` it does so per width (4- and 2-bit weights are stored packed) and compares the
model flash with the first width's.
Targets from the issue (not timed tests): arena <= 1.05x floor, flash <= 1.10x (INT8 weights +
32 KB), compile <= 30 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def quantized_mobilenet(path: Path, *, width: float = 0.35, size: int = 32, weight_bits: int = 8,
                        num_classes: int = 0) -> Path:
    """The benchmark's network (seeded random weights, small-input layout: stem stride 1) quantized
    with Brevitas on 32 random calibration images, exported as QCDQ ONNX and simplified, at
    ``path``; ``num_classes`` > 0 adds the linear classifier.  Returns ``path``."""
    import onnx
    import onnxsim
    import torch

    from distillc.passes.quantize.brevitas_model import export_qcdq, quantize
    from distillc.plugins.models.mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    model = MobileNetV2(width=width, stem_stride=1, in_chans=3, num_classes=num_classes).eval()
    calib = torch.rand(32, 3, size, size)
    qmodel = quantize(model, calib, weight_bits=weight_bits)
    export_qcdq(qmodel, calib[:1], path)
    simplified, _ = onnxsim.simplify(onnx.load(str(path)))
    onnx.save(simplified, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--weight-bits", default="8",
                        help="weight bit widths (2..8), comma-separated (8,4,2): one bundle each, model flash "
                             "compared with the first's")
    parser.add_argument("--classes", type=int, default=0,
                        help="add a 1280 -> CLASSES linear classifier (benchmarks/kernels.py's network: 100)")
    parser.add_argument("--layers", action="store_true", help="also count instructions per layer type on QEMU")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU run")
    args = parser.parse_args()
    widths = [int(b) for b in args.weight_bits.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        flash = {}
        for bits in widths:
            if len(widths) > 1:
                print(f"== {bits}-bit weights ==")
            flash[bits] = measure(Path(tmp) / f"w{bits}", args, bits)
        if len(widths) > 1 and not args.no_qemu:
            base = widths[0]
            for bits in widths[1:]:
                print(f"model flash, {bits}-bit / {base}-bit weights: {flash[bits]:,} / {flash[base]:,} B "
                      f"= {flash[bits] / flash[base]:.3f}")


def layer_kind(layer: dict) -> str:
    """The layer's type in MobileNetV2 (stem, 1x1 expansion/projection, depthwise stride 1/2, ...)."""
    ins, outs = layer["input_shape"], layer["output_shape"]
    if layer["op"] == "conv2d":
        return "stem 3x3" if ins[1] == 3 else ("1x1 expansion" if outs[1] > ins[1] else "1x1 projection")
    if layer["op"] == "depthwise_conv2d":
        return "depthwise 3x3 s2" if outs[2] < ins[2] else "depthwise 3x3 s1"
    return layer["op"]


def measure(tmp: Path, args, bits: int) -> int | None:
    """Compile (and run on QEMU) the network with ``bits``-bit weights; prints the figures and
    returns the model flash (None with --no-qemu)."""
    import numpy as np

    from distillc.passes.backend import import_onnx, lower_int8, plan_memory
    from distillc.passes.backend.codegen import build_program, emit_c
    from distillc.targets.bundle_files import write_bundle_build_files
    from distillc.targets.runner import run_on_qemu

    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    quantized_mobilenet(tmp / "model.onnx", width=args.width, size=args.size, weight_bits=bits,
                        num_classes=args.classes)
    front = time.perf_counter() - t0

    t0 = time.perf_counter()
    program = build_program(lower_int8(import_onnx(tmp / "model.onnx")))
    plan = plan_memory(program)
    entries = emit_c(program, tmp / "bundle", name="bench", plan=plan)
    backend = time.perf_counter() - t0

    memory = entries["memory"]
    stored = [layer["weights"] for layer in entries["layers"] if layer["weights"]]
    weights = sum(w["values"] for w in stored)  # the weights at one byte each ("INT8 weights")
    packed = {w["bits"] for w in stored}
    bundle_src = sum(f.stat().st_size for f in (tmp / "bundle").rglob("*") if f.is_file())
    print(f"model: MobileNetV2 width {args.width}, {args.size}x{args.size}x3, {entries['macs']:,} MACs, "
          f"{entries['kernels']} kernels")
    print(f"brevitas quantize + QCDQ export + onnxsim: {front:.1f} s")
    print(f"backend compile (TVM import, int8 lowering, kernel C, memory plan, C emission): {backend:.1f} s")
    print(f"arena: {memory['arena_bytes']:,} B, floor {memory['arena_floor_bytes']:,} B, "
          f"ratio {memory['arena_bytes'] / memory['arena_floor_bytes']:.3f}")
    print(f"constants (weights, biases, multipliers): {memory['weights_bytes']:,} B; "
          f"INT8 weights alone: {weights:,} B ({weights:,} weights stored in {sum(w['bytes'] for w in stored):,} B "
          f"at {'/'.join(str(b) for b in sorted(packed))} bits); C sources on disk: {bundle_src:,} B")
    if args.no_qemu:
        return None
    example = np.random.default_rng(0).integers(-128, 128, size=(1, 3, args.size, args.size), dtype=np.int8)
    write_bundle_build_files(tmp / "bundle", name="bench", example_inputs=example)
    run = run_on_qemu(tmp / "bundle", example, tmp / "qemu", layers=args.layers)
    print(f"QEMU {run.machine}: {run.instructions_per_inference:,} instructions per inference, "
          f"{run.instructions_per_inference / entries['macs']:.2f} per MAC")
    if run.layers is not None:
        kinds: dict = {}
        for layer, count in zip(entries["layers"], run.layers.instructions[0]):
            kind = kinds.setdefault(layer_kind(layer), [0, 0])
            kind[0], kind[1] = kind[0] + layer["macs"], kind[1] + count
        for name, (macs, count) in kinds.items():
            print(f"  {name}: {count:,} instructions" + (f", {count / macs:.2f} per MAC" if macs else ""))
    print(f"model flash (the bundle's objects, before the linker drops unused code): "
          f"{run.model_flash_bytes:,} B = {run.model_flash_bytes / weights:.3f}x INT8 weights "
          f"= {run.model_flash_bytes / (weights + 32 * 1024):.3f}x (INT8 weights + 32 KB)")
    print(f"whole example program (model + newlib + startup): flash {run.flash_bytes:,} B "
          f"= {run.flash_bytes / (weights + 32 * 1024):.3f}x (INT8 weights + 32 KB), RAM {run.ram_bytes:,} B")
    return run.model_flash_bytes


if __name__ == "__main__":
    main()
