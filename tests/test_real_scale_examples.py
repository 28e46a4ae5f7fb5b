"""The real-scale recipes (examples/tinyssl-cifar100, examples/tinyvlm) on fakes of the user's files.

Users bring the checkpoints, the tokenizer and the data; `validate` names each missing file. On
fake files with the real layouts (DINO's ViT-S/16 state dict at its real shapes, CIFAR-100's
python pickles, CLIP's gzipped BPE merges, an image folder) both specs plan to a verified
STM32H7 bundle, and the DINO checkpoint loads as the 224-px teacher the recipe needs.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distillc.cli import app
from distillc.plan import build_plan
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from distillc.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MISSING = {
    "tinyssl-cifar100": ["teachers[0].checkpoint: file not found: 'weights/dino_deitsmall16_pretrain.pth'",
                         "data.path: file not found: 'data'"],
    "tinyvlm": ["teachers[0].checkpoint: file not found: 'weights/ViT-B-32.pt'",
                "teachers[0].tokenizer: file not found: 'weights/bpe_simple_vocab_16e6.txt.gz'",
                "data.path: file not found: 'data/images'",
                "classes: file not found: 'classes.txt'"],
}


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(EXAMPLES / name / "spec.toml", folder / "spec.toml")
    return folder / "spec.toml"


@pytest.mark.parametrize("name", sorted(MISSING))
def test_validate_names_every_file_the_user_must_bring(name, tmp_path):
    result = CliRunner().invoke(app, ["validate", str(_copy(name, tmp_path))])
    assert result.exit_code == 2, result.output
    for line in MISSING[name]:
        assert line in result.output, (line, result.output)


def _fake_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)]}
        (folder / split).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def test_tinyssl_plans_to_an_stm32h7_bundle_and_loads_dino_at_224(tmp_path):
    import torch

    spec_path = _copy("tinyssl-cifar100", tmp_path)
    folder = spec_path.parent
    _fake_cifar100(folder / "data")
    plugins = load_plugins()
    dino = plugins.teachers.get("dino_vits16")(image_size=224)  # ViT-S/16 as DINO ships it: timm keys, 22M
    (folder / "weights").mkdir()
    torch.save(dino.state_dict(), folder / "weights" / "dino_deitsmall16_pretrain.pth")
    plan = build_plan(load_spec(spec_path, plugins), plugins, workdir=folder / "build")
    ids = [step.id for step in plan.steps]
    assert ids[:5] == ["teacher:dino", "student", "distill.ca-dssl", "eval.linear-probe", "quantize.brevitas-qat"]
    assert ids[-2:] == ["verify.host", "verify.qemu"]
    assert plan.steps[0].pass_.config.input["input_size"] == 224
    compile_spec(spec_path, progress=SilentProgress(), until="teacher:dino")
    metrics = json.loads((folder / "build" / "tinyssl-cifar100" / "report.json").read_text())["metrics"]
    assert metrics["teacher:dino"]["params"] == sum(p.numel() for p in dino.parameters())


def _fake_bpe(path: Path) -> None:
    """CLIP's vocabulary file format: a '#version' line and merges, gzipped (a handful of merges)."""
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "p h", "o t", "o </w>"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_tinyvlm_plans_to_an_stm32h7_bundle(tmp_path):
    spec_path = _copy("tinyvlm", tmp_path)
    folder = spec_path.parent
    (folder / "weights").mkdir()
    (folder / "weights" / "ViT-B-32.pt").write_bytes(b"\0" * 64)  # the plan hashes it, the teacher step loads it
    _fake_bpe(folder / "weights" / "bpe_simple_vocab_16e6.txt.gz")
    from PIL import Image

    for name in ("cat", "dog"):
        (folder / "data" / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (80, 70), (40 * i, 90, 200)).save(folder / "data" / "images" / name / f"{i}.jpg")
    (folder / "classes.txt").write_text("cat\ndog\n")
    plugins = load_plugins()
    spec = load_spec(spec_path, plugins)
    assert spec.teacher_inputs["clip"]["input_size"] == 224 and spec.teacher_inputs["clip"]["mean"][0] == 0.48145466
    plan = build_plan(spec, plugins, workdir=folder / "build")
    ids = [step.id for step in plan.steps]
    assert ids[:3] == ["teacher:clip", "student", "distill.clip-matryoshka"]
    assert ids[-2:] == ["verify.host", "verify.qemu"]
    clip = next(step for step in plan.steps if step.id == "distill.clip-matryoshka").pass_.config
    assert clip.dims == [16, 32, 64, 128, 256] and len(clip.prompts) == 4
