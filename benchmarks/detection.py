"""Zero-shot detection on digit scenes: mAP (seen and unseen classes, per dim, FP32 and INT8) beside
a random-embedding baseline, with the bundle's flash, RAM and instructions per inference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detection.py [--spec examples/detection/spec.toml] [--quick]
        [--dense-weight 0]

Compiles the spec from an empty cache and work directory (so the minutes include training the
teacher), then prints, from the compile's report:

- per Matryoshka dim, mAP@0.5 over the seen and the unseen classes and mAP@[.5:.95] over all, for
  the float student (the first ``eval.detection``) and the INT8 one (the one after
  ``quantize.brevitas-qat``), each beside the same boxes scored against random class embeddings
  (``random_classes``: the chance level of the class assignment) and class-agnostic mAP@0.5
  (localisation alone);
- the bundle: model flash (weights), the detection tables and class rows, the arena (RAM), and
  instructions per inference on QEMU's Cortex-M7 (``verify.qemu``) when the target runs it;
- wall time per pass.

``--quick`` turns every ``epochs = N`` of the spec into 1 and ``scenes`` into 200: a smoke run, its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "detection" / "spec.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=EXAMPLE)
    parser.add_argument("--quick", action="store_true", help="one epoch everywhere, 200 scenes: a smoke run")
    parser.add_argument("--dense-weight", type=float, default=None,
                        help="override detect.open-vocab's dense_weight (0: no dense distillation, the ablation)")
    args = parser.parse_args()

    from distillc.progress import SilentProgress
    from distillc.run import compile_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.spec.resolve()
        changed = args.quick or args.dense_weight is not None
        if changed:
            text = spec.read_text()
            if args.quick:
                text = re.sub(r"\bepochs = \d+", "epochs = 1", text)
                text = re.sub(r"\bscenes = \d+", "scenes = 200", text)
            if args.dense_weight is not None:
                text, n = re.subn(r"(?m)^dense_weight = [0-9.]+", f"dense_weight = {args.dense_weight}", text)
                if n != 1:
                    raise SystemExit("--dense-weight: the spec must set dense_weight once (in detect.open-vocab)")
            spec = spec.parent / f".bench-{os.getpid()}.toml"
            spec.write_text(text)
        os.environ["DISTILLC_CACHE"] = str(Path(tmp) / "cache")
        try:
            t0 = time.perf_counter()
            result = compile_spec(spec, workdir=Path(tmp) / "work", progress=SilentProgress())
            minutes = (time.perf_counter() - t0) / 60
        finally:
            if changed:
                spec.unlink(missing_ok=True)
    report(result.report, minutes, args)


def _evals(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    steps = [k for k in metrics if k.split("#")[0] == "eval.detection"]
    return [("INT8" if metrics[k].get("quantized") else "FP32", metrics[k]) for k in steps]


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(rep: dict[str, Any], minutes: float, args: Any) -> None:
    metrics = rep["metrics"]
    print(f"spec: {args.spec}{'  (--quick: numbers mean nothing)' if args.quick else ''}"
          f"{f'  dense_weight = {args.dense_weight}' if args.dense_weight is not None else ''}")
    print(f"threads: {__import__('torch').get_num_threads()}   wall time: {minutes:.1f} min")
    train = metrics.get("detect.open-vocab", {})
    print(f"grid {train.get('grid')} stride {train.get('stride')}  training boxes {train.get('train_boxes')}  "
          f"classes {train.get('classes')}  student params {train.get('params')} (head {train.get('head_params')})")
    teacher = metrics.get("teacher:vit", {})
    if teacher:
        print(f"teacher supervised top-1 on its own data: {_f(teacher.get('supervised_val_top1'))}")
    print()
    print("| model | dim | mAP@0.5 seen | mAP@0.5 unseen | mAP@[.5:.95] all | random classes: seen / unseen | "
          "class-agnostic mAP@0.5 |")
    print("|---|---|---|---|---|---|---|")
    for label, m in _evals(metrics):
        for dim, row in m["per_dim"].items():
            rnd = m.get("random_classes", {}).get(dim, {})
            agnostic = m["class_agnostic"]["map50"] if int(dim) == m["dim"] else None
            print(f"| {label} | {dim} | {_f((row['seen'] or {}).get('map50'))} | {_f((row['unseen'] or {}).get('map50'))} "
                  f"| {_f(row['map'])} | {_f((rnd.get('seen') or {}).get('map50'))} / "
                  f"{_f((rnd.get('unseen') or {}).get('map50'))} | {_f(agnostic)} |")
    evals = _evals(metrics)
    if evals:
        m = evals[-1][1]
        print(f"validation images scored: {m['images']} ({m['boxes']} boxes; {m['support_images']} images "
              f"gave the class prototypes and are left out)")
    print()
    codegen = metrics.get("codegen.c", {})
    qemu = metrics.get("verify.qemu", {})
    for key, value in (("arena (RAM) bytes", codegen.get("arena_bytes")),
                       ("arena floor bytes", codegen.get("arena_floor_bytes")),
                       ("model weights (flash) bytes", codegen.get("weights_bytes")),
                       ("MACs per inference", codegen.get("macs")),
                       ("model flash bytes (QEMU build)", qemu.get("model_flash_bytes")),
                       ("program flash bytes (QEMU build)", qemu.get("program_flash_bytes")),
                       ("Cortex-M7 instructions per inference", qemu.get("instructions_per_inference"))):
        if value is not None:
            print(f"{key}: {value:,}")
    for name in ("verify.host", "verify.qemu"):
        detection = metrics.get(name, {}).get("detection")
        if detection:
            print(f"{name} detection: {detection}")
    print()
    for row in rep["plan"]:
        print(f"  {row['id']:<24} {row['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
