"""Backend figures for MobileNetV2-0.35 (small-input layout, 32x32x3): compile time, memory, QEMU.

    .venv/bin/python benchmarks/backend.py [--width 0.35] [--size 32] [--no-qemu]

Builds the student with seeded random weights, quantizes it with Brevitas (calibration on random
images: the figures below do not depend on training), exports QCDQ ONNX, simplifies it, then
times the INT8 backend (TVM import + QDQ rewrite + fusion + kernel C, memory plan, C emission),
and runs the bundle on QEMU mps2-an500 (Cortex-M7) for instructions per inference.
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
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU run")
    args = parser.parse_args()

    import numpy as np

    from distillc.passes.backend import import_onnx, lower_int8, plan_memory
    from distillc.passes.backend.codegen import build_program, emit_c
    from distillc.targets.bundle_files import write_bundle_build_files
    from distillc.targets.runner import run_on_qemu

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        quantized_mobilenet(tmp / "model.onnx", width=args.width, size=args.size)
        front = time.perf_counter() - t0

        t0 = time.perf_counter()
        program = build_program(lower_int8(import_onnx(tmp / "model.onnx")))
        plan = plan_memory(program)
        entries = emit_c(program, tmp / "bundle", name="bench", plan=plan)
        backend = time.perf_counter() - t0

        memory = entries["memory"]
        weights = sum(int(np.prod(t.shape)) for t in program.tensors if t.kind == "const" and t.dtype == "int8")
        bundle_src = sum(f.stat().st_size for f in (tmp / "bundle").rglob("*") if f.is_file())
        print(f"model: MobileNetV2 width {args.width}, {args.size}x{args.size}x3, {entries['macs']:,} MACs, "
              f"{entries['kernels']} kernels")
        print(f"brevitas quantize + QCDQ export + onnxsim: {front:.1f} s")
        print(f"backend compile (TVM import, int8 lowering, kernel C, memory plan, C emission): {backend:.1f} s")
        print(f"arena: {memory['arena_bytes']:,} B, floor {memory['arena_floor_bytes']:,} B, "
              f"ratio {memory['arena_bytes'] / memory['arena_floor_bytes']:.3f}")
        print(f"constants (weights, biases, multipliers): {memory['weights_bytes']:,} B; "
              f"INT8 weights alone: {weights:,} B; C sources on disk: {bundle_src:,} B")
        if args.no_qemu:
            return
        example = np.random.default_rng(0).integers(-128, 128, size=(1, 3, args.size, args.size), dtype=np.int8)
        write_bundle_build_files(tmp / "bundle", name="bench", example_inputs=example)
        run = run_on_qemu(tmp / "bundle", example, tmp / "qemu")
        print(f"QEMU {run.machine}: {run.instructions_per_inference:,} instructions per inference, "
              f"{run.instructions_per_inference / entries['macs']:.2f} per MAC")
        print(f"model flash (the bundle's objects, before the linker drops unused code): "
              f"{run.model_flash_bytes:,} B = {run.model_flash_bytes / weights:.3f}x INT8 weights "
              f"= {run.model_flash_bytes / (weights + 32 * 1024):.3f}x (INT8 weights + 32 KB)")
        print(f"whole example program (model + newlib + startup): flash {run.flash_bytes:,} B "
              f"= {run.flash_bytes / (weights + 32 * 1024):.3f}x (INT8 weights + 32 KB), RAM {run.ram_bytes:,} B")


if __name__ == "__main__":
    main()
