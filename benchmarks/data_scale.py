"""Peak memory and throughput of one distillation epoch as the dataset grows.

    .venv/bin/python benchmarks/data_scale.py [--sizes 2000 8000] [--image-size 32] [--teacher-width 64]
                                              [--teacher-depth 1] [--batch-size 128]

For each size it writes a synthetic image folder of that many small JPEGs (10 class folders,
random shapes), then in a fresh process compiles a spec up to one epoch of ``distill.feature``
from a DINO ViT-S/16-shaped teacher loaded from a checkpoint, so fed at its native 224 px with
ImageNet statistics (random weights, narrowed by ``--teacher-width`` / ``--teacher-depth`` so
that a CPU finishes in minutes; the input path is the same as a full ViT-S/16's).  The child
reports its peak resident set (``getrusage``) and images per second over the whole compile
(decoding the folder, the teacher's targets, the epoch).  The last line compares the peaks:
the images and the teacher targets live in memory-mapped files, so the peak should barely
grow with the dataset.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SPEC = """
[distillc]
spec_version = 1
name = "data-scale"
seed = 0

[data]
source = "image-folder"
path = "images"
image_size = {image_size}
val_fraction = 0.1
channels = 3

[[teachers]]
name = "dino"
arch = "dino_vits16"
depth = {depth}
embed_dim = {width}
checkpoint = "dino.safetensors"

[student]
arch = "mobilenetv2"
width = 0.35

[[passes]]
use = "distill.feature"
teacher = "dino"
epochs = 1
batch_size = {batch_size}
"""


def write_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs of ``size`` px in 10 class folders: a coloured disc on a coloured ground."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ground, disc = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        image = Image.new("RGB", (size, size), ground)
        r = int(rng.integers(size // 6, size // 2))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=disc)
        image.save(root / f"class{i % 10}" / f"{i:06d}.jpg", quality=90)


def child(folder: Path) -> None:
    """Compile the spec in ``folder``; print peak RSS (MiB), seconds and images."""
    from distillc.progress import SilentProgress
    from distillc.run import compile_spec

    start = time.perf_counter()
    compile_spec(folder / "spec.toml", progress=SilentProgress(), until="distill.feature")
    seconds = time.perf_counter() - start
    report = json.loads((folder / "build" / "data-scale" / "report.json").read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_rss_mib": peak_mib, "seconds": seconds,
                      "teacher_input": report["metrics"]["distill.feature"].get("teacher_input")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher-width", type=int, default=64)
    parser.add_argument("--teacher-depth", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="distillc-data-scale-") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            write_folder(folder / "images", n, args.image_size)
            save_teacher(folder / "dino.safetensors", args.teacher_width, args.teacher_depth)
            (folder / "spec.toml").write_text(textwrap.dedent(SPEC).format(
                image_size=args.image_size, depth=args.teacher_depth, width=args.teacher_width,
                batch_size=args.batch_size))
            out = subprocess.run([sys.executable, __file__, "--child", str(folder)], check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((n, result))
            print(f"{n:>7} images  peak RSS {result['peak_rss_mib']:7.1f} MiB  "
                  f"{n / result['seconds']:7.1f} images/s (whole compile, {result['seconds']:.1f} s)  "
                  f"teacher fed {result['teacher_input']}", flush=True)
    (small, first), (large, last) = rows[0], rows[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"] - 1
    print(f"peak RSS grows {100 * growth:+.1f}% for {large / small:.0f}x the images")


def save_teacher(path: Path, width: int, depth: int) -> None:
    from safetensors.torch import save_file

    from distillc.plugin_manager import load_plugins

    model = load_plugins().teachers.get("dino_vits16")(image_size=224, depth=depth, embed_dim=width)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


if __name__ == "__main__":
    main()
