"""docs/report.png: a screenshot of a bundle's report.html in headless Chromium.

    .venv/bin/distillc compile examples/quickstart/spec.toml
    .venv/bin/python scripts/report_screenshot.py [BUNDLE] [--output docs/report.png]

The page is drawn again from the bundle's manifest.json with this checkout's distillc (so the
picture shows the current report), opened from a temporary folder with Chromium (Debian's
``chromium``; scripts/install-toolchain.sh installs it) and the top of it saved as a PNG.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillc.bundle_report import render_html  # noqa: E402


def screenshot(bundle: Path, output: Path, *, width: int, height: int) -> None:
    if shutil.which("chromium") is None:
        raise SystemExit("chromium is not installed: run scripts/install-toolchain.sh as root")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="distillc-shot-") as work:
        page = Path(work) / "report.html"
        page.write_text(render_html(manifest), encoding="utf-8")
        shot = Path(work) / "shot.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work}/profile",
                        f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=180)
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(colors=128).save(output, optimize=True)
    print(f"wrote {output} ({output.stat().st_size} bytes) from {bundle}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path,
                        default=ROOT / "examples" / "quickstart" / "build" / "quickstart" / "bundle")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1900)
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"{args.bundle}: no manifest.json; compile the spec first (distillc compile SPEC)")
    screenshot(args.bundle, args.output, width=args.width, height=args.height)


if __name__ == "__main__":
    main()
