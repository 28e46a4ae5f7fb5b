"""Times the quickstart compile from an empty cache and again fully cached; prints its metrics.

    .venv/bin/python benchmarks/quickstart.py [--spec examples/quickstart/spec.toml]

Any example runs the same way, e.g. ``--spec examples/max78000/spec.toml`` (which adds the
accelerator export's figures).

Uses a fresh temporary work directory and cache, so it never touches your own build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from distillc.run import compile_spec
from distillc.progress import SilentProgress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path(__file__).parent.parent / "examples/quickstart/spec.toml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DISTILLC_CACHE"] = str(Path(tmp) / "cache")
        workdir = Path(tmp) / "work"
        t0 = time.perf_counter()
        first = compile_spec(args.spec, workdir=workdir, progress=SilentProgress())
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = compile_spec(args.spec, workdir=workdir, progress=SilentProgress())
        warm = time.perf_counter() - t0
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"spec: {args.spec}")
    print(f"threads: {__import__('torch').get_num_threads()}")
    print(f"cold compile: {cold:.1f} s ({len(first.ran)} passes ran)")
    print(f"cached re-run: {warm:.2f} s ({len(second.ran)} passes ran)")
    for row in first.report["plan"]:
        print(f"  {row['id']:<20} {row['seconds']:7.1f} s")
    probe = first.report["metrics"].get("eval.linear-probe", {})
    if probe:
        print(f"student linear-probe top-1: {probe['top1']:.3f}")
        for name, top1 in probe.get("teachers", {}).items():
            print(f"teacher {name} linear-probe top-1: {top1:.3f}")
        print(f"student parameters: {probe.get('params')}")
    metrics = first.report["metrics"]
    for step, keys in (("teacher:vit", ("supervised_val_top1",)),
                       ("quantize.brevitas-qat", ("fp32", "int8", "objective")),
                       ("codegen.c", ("arena_bytes", "arena_floor_bytes", "weights_bytes")),
                       ("verify.host", ("max_lsb", "exact_fraction", "kernels")),
                       ("verify.qemu", ("max_lsb", "instructions_per_inference", "model_flash_bytes",
                                        "program_flash_bytes")),
                       ("export.izer", ("exported", "layers", "embedding_cosine_min", "embedding_cosine_mean"))):
        shown = {k: metrics[step][k] for k in keys if k in metrics.get(step, {})}
        if shown:
            print(f"{step}: {shown}")


if __name__ == "__main__":
    main()
