"""bundle/report.html: every compile writes it from the manifest, `distillc report` writes the same
bytes again, `inspect` shows the same facts, and the page renders in a real browser (headless
Chromium): every figure laid out and drawn, no script error, nothing fetched."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distillc.bundle_report import REPORT_FILE, render_html, report_facts
from distillc.cli import app
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from tests.conftest import tiny_spec_text

runner = CliRunner()

TEACHER_EPOCHS, DISTILL_EPOCHS = 2, 2
#: Figures every compiled stm32h7 bundle's report has (a Matryoshka model adds "matryoshka").
FIGURES = ("budget", "layers", "arena", "sqnr", "training")
CHROMIUM = "chromium"  # Debian's package; scripts/install-toolchain.sh installs it


@pytest.fixture(scope="module")
def compiled(module_folder):
    """The quickstart's flow at tiny settings: teacher, distillation, probe, INT8 (calibration, the
    QAT objective's head warmed up), stm32h7 (verified on the host and on QEMU)."""
    path = module_folder / "spec.toml"
    path.write_text(tiny_spec_text(target="stm32h7", teacher_epochs=TEACHER_EPOCHS, distill_epochs=DISTILL_EPOCHS))
    result = compile_spec(path, progress=SilentProgress())
    bundle = result.final_path
    return bundle, json.loads((bundle / "manifest.json").read_text())


def test_every_compile_writes_a_self_contained_report(compiled):
    bundle, _ = compiled
    page = (bundle / REPORT_FILE).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for name in FIGURES:
        assert re.search(rf'<figure class="plot" id="fig-{name}"><svg', page), name
    # Nothing is fetched: no external script, style, image or font; links only to the page's own SVG defs.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page)
    assert not re.search(r"url\((?!#)", page) and "@import" not in page
    assert {ref[0] for ref in re.findall(r'(?:xlink:)?href="([^"]*)"', page)} <= {"#"}
    assert "instruction-count estimate" in page and "Instructions per layer counted on QEMU" in page


def test_the_manifest_holds_every_fact_the_report_draws(compiled):
    _, manifest = compiled
    layers, memory, metrics = manifest["layers"], manifest["memory"], manifest["metrics"]
    # Arena timeline: bytes live at each step, whose largest value is the floor, under the planned arena.
    assert len(memory["live_bytes"]) == len(layers) and max(memory["live_bytes"]) == memory["arena_floor_bytes"]
    for layer in layers[:-1]:
        assert 0 <= layer["arena_offset"] and layer["arena_offset"] + layer["arena_bytes"] <= memory["arena_bytes"]
    assert layers[-1]["arena_offset"] is None  # the last layer writes the caller's output buffer
    # Training curves: one loss per epoch of every training step.
    assert len(metrics["teacher:vit"]["epoch_losses"]) == TEACHER_EPOCHS
    assert len(metrics["distill.feature"]["epoch_losses"]) == DISTILL_EPOCHS
    assert len(metrics["quantize.brevitas-qat"]["head_warmup_epoch_losses"]) == 1
    assert metrics["distill.feature"]["epoch_losses"][-1] == metrics["distill.feature"]["loss"]
    # Per-layer SQNR, measured at compile time on validation images.
    host = manifest["verification"]["host"]
    sqnr = host["layer_sqnr_db"]
    assert host["sqnr_images"] == 8 and len(sqnr) == len(layers)
    measured = [v for v in sqnr if v is not None]
    assert len(measured) >= len(layers) // 2 and all(0 < v < 100 for v in measured)
    assert host["output_sqnr_db"] == sqnr[-1] and host["min_layer_sqnr_db"] == min(measured)
    assert manifest["target"]["clock_mhz"] == 480 and manifest["steps"][0] == "teacher:vit"

    facts = report_facts(manifest)
    speed = facts["speed"]
    instructions = manifest["verification"]["qemu"]["instructions_per_inference"]
    assert speed["inferences_per_second"] == pytest.approx(480e6 / instructions)
    counted = manifest["verification"]["qemu"]["layers"]  # verify.qemu's counts per kernel call
    assert speed["per_layer"] == "measured"
    assert [row["instructions"] for row in facts["layers"]] == [entry["instructions"] for entry in counted]
    assert sum(row["mac_share"] for row in facts["layers"]) == pytest.approx(1.0)
    assert facts["budget"]["flash"] == {"used_bytes": memory["weights_bytes"], "budget_bytes": 2048 * 1024,
                                        "what": "constants: weights",
                                        "measured_model_flash_bytes": manifest["verification"]["qemu"]["model_flash_bytes"]}
    assert [c["label"] for c in facts["training"]] == ["teacher:vit", "distill.feature",
                                                       "quantize.brevitas-qat (head warmup)"]
    assert facts["quantization"]["accuracy"][0]["metric"] == "top1"


def test_distillc_report_writes_the_same_page_again(compiled, tmp_path):
    bundle, _ = compiled
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / REPORT_FILE).unlink()
    result = runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / REPORT_FILE).read_bytes() == (bundle / REPORT_FILE).read_bytes()
    result = runner.invoke(app, ["report", str(copy), "--output", str(tmp_path / "no" / "r.html")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_inspect_shows_the_report_facts_and_json_has_them(compiled):
    bundle, manifest = compiled
    result = runner.invoke(app, ["inspect", str(bundle)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text in ("inferences per second at 480", "instruction-count estimate", "instructions per layer: measured",
                 "SQNR against", "training teacher:vit: 2 epoch(s)", "verify.qemu: 4 image(s)", "arena_offset"):
        assert text in result.output, text
    result = runner.invoke(app, ["inspect", str(bundle), "--json"])
    printed = json.loads(result.output)
    assert {k: v for k, v in printed.items() if k != "report"} == manifest
    assert printed["report"] == json.loads(json.dumps(report_facts(manifest)))


def test_the_report_is_cheap_and_reproducible(compiled):
    _, manifest = compiled
    render_html(manifest)  # matplotlib imported once per process
    # CPU time of this process: what a compile pays, whatever else the shared machine runs.
    start = time.process_time()
    page = render_html(manifest)
    seconds = time.process_time() - start
    assert page == render_html(manifest)
    assert seconds < 0.6, f"report.html took {seconds:.2f} s of CPU"


def test_a_matryoshka_model_gets_its_accuracy_per_dim(compiled, tmp_path):
    """A bundle with Matryoshka dims and a top-1 per dim in its metrics (as `matryoshka` and
    `eval.zero-shot` record them) gets the table and the figure."""
    _, manifest = compiled
    manifest = {**manifest, "matryoshka_dims": [8, 16, 32],
                "metrics": {**manifest["metrics"], "eval.zero-shot": {"top1": {"8": 0.5, "16": 0.7, "32": 0.75}}}}
    [curve] = report_facts(manifest)["matryoshka"]
    assert curve["dims"] == [8, 16, 32] and curve["top1"] == [0.5, 0.7, 0.75]
    assert '<figure class="plot" id="fig-matryoshka"><svg' in render_html(manifest)


def test_the_arena_section_names_a_schedule_other_than_layer_by_layer(compiled):
    _, manifest = compiled
    assert manifest["memory"]["schedule"] == "layer" and "Memory schedule" not in render_html(manifest)
    memory = {**manifest["memory"], "schedule": "patch", "inplace_layers": [4, 7], "schedule_floor_bytes": 5120,
              "patch": {"steps": [0, 1, 2], "tiles": [2, 2], "tile": [4, 4], "extra_macs": 12345, "kernels": []}}
    page = render_html({**manifest, "memory": memory})
    assert ("Memory schedule patch: 2 layer(s) write their output over their input; steps 0-2 run in 2 x 2 "
            "patches of 4 x 4 outputs, recomputing 12,345 MACs of halo; its floor is 5,120 B.") in page


def test_a_detection_bundle_gets_its_map_per_dim_and_decoder_check(compiled, tmp_path):
    """A bundle with distillc_detect (``manifest["detection"]``) and eval.detection metrics gets the
    table, the figure and the decoder's verification line, in the page and in inspect."""
    _, manifest = compiled
    per_dim = {d: {"map": 0.3, "seen": {"map50": s}, "unseen": {"map50": u}} for d, s, u in
               (("16", 0.8, 0.2), ("32", 0.9, 0.25))}
    rnd = {d: {"seen": {"map50": 0.05}, "unseen": {"map50": 0.01}} for d in per_dim}
    manifest = {**manifest,
                "detection": {"classes": [str(i) for i in range(10)], "dims": [16, 32], "grid": 8, "stride": 8,
                              "flash_bytes": 3072, "scratch_bytes": 384},
                "verification": {**manifest["verification"],
                                 "host": {**manifest["verification"]["host"],
                                          "detection": {"decoded": 24, "decoder_matches": True,
                                                        "onnxruntime_identical": 24, "onnxruntime_within_one_step": 24,
                                                        "onnxruntime_differing": 0}}},
                "metrics": {**manifest["metrics"], "eval.detection#2": {"quantized": True, "per_dim": per_dim,
                                                                        "random_classes": rnd}}}
    facts = report_facts(manifest)["detection"]
    [run] = facts["evals"]
    assert run["label"] == "eval.detection#2 (INT8)"
    assert [r["unseen_map50"] for r in run["rows"]] == [0.2, 0.25] and run["rows"][0]["random_unseen_map50"] == 0.01
    page = render_html(manifest)
    assert '<figure class="plot" id="fig-detection"><svg' in page
    assert "distillc_detect equals the Python decoder on 24 case(s): True" in page
    assert report_facts({**manifest, "detection": None})["detection"] is None
    copy = tmp_path / "bundle"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["inspect", str(copy)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "distillc_detect: 10 classes, dims [16, 32], 8x8 cells, 3072 B flash" in result.output
    assert "eval.detection#2 (INT8) dim 32: mAP@0.5 seen 0.900, unseen 0.250 (random classes 0.010)" in result.output


def test_the_report_renders_in_headless_chromium(compiled, tmp_path):
    """Every figure is laid out (the page's own script measures each SVG after load) and drawn
    (its region of a screenshot is not blank), and no script error or console message appears."""
    bundle, _ = compiled
    page = bundle / REPORT_FILE
    dom, log = _chromium(tmp_path, "--dump-dom", page)
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-errors" not in html_tag, html_tag
    figures = re.search(r'data-figures="(\d+)/(\d+)"', html_tag)
    assert figures and figures.group(1) == figures.group(2) == str(len(FIGURES)), html_tag
    assert len(re.findall(r'<figure class="plot" id="fig-\w+" data-rendered="yes"', dom)) == len(FIGURES)
    assert "CONSOLE" not in log and "Uncaught" not in log, log

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", page)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    boxes = dict(re.findall(r'id="fig-(\w+)" data-rendered="yes" data-box="([\d.,]+)"', dom))
    assert sorted(boxes) == sorted(FIGURES)
    for name, box in boxes.items():
        x, y, w, h = (int(float(v)) for v in box.split(","))
        assert y + h <= image.shape[0], f"figure {name} is below the screenshot"
        region = image[y:y + h, x:x + w]
        dark = float((region < 200).mean())
        assert region.std() > 10 and 0.005 < dark < 0.8, f"figure {name} looks blank (dark fraction {dark:.3f})"


def test_the_browser_check_sees_a_script_error_and_a_figure_that_is_not_drawn(compiled, tmp_path):
    """The checks above are not vacuous: a page with a failing script and an empty figure fails them."""
    bundle, _ = compiled
    broken = tmp_path / "broken.html"
    page = (bundle / REPORT_FILE).read_text()
    page = re.sub(r'(<figure class="plot" id="fig-arena">)<svg.*?</svg>', r"\1", page, count=1, flags=re.S)
    broken.write_text(page.replace("</body>", "<script>no_such_function();</script></body>"))
    dom, log = _chromium(tmp_path, "--dump-dom", broken)
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "no_such_function is not defined" in html_tag and "Uncaught ReferenceError" in log
    assert f'data-figures="{len(FIGURES)}/{len(FIGURES) - 1}"' in html_tag


def _chromium(tmp_path: Path, action: str, page: Path) -> tuple[str, str]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is not installed: run scripts/install-toolchain.sh as root (Debian package chromium)")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--window-size=1280,7000", "--force-device-scale-factor=1",
               "--hide-scrollbars", action, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr
