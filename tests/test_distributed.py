"""Training under torchrun: two CPU processes (gloo) train what one process trains with the same global batch.

One spec is compiled twice up to its distillation pass, each run in its own cache: once as a
plain process, once under ``python -m torch.distributed.run --nproc-per-node 2 --standalone``,
which is what users run.  The second cache starts as a copy of the first without the steps under
test, so both distillations start from the same teacher and the same student:

- ``teacher:vit`` is cached in both (the distillation's teacher);
- ``teacher:aux`` (trained, unused) is retrained by both ranks together: teacher.train under DDP;
- ``student`` (student.init) runs on rank 0 alone while rank 1 waits, then reads rank 0's entry;
- ``distill.feature`` trains on both ranks, each on half of every global batch of 64;
- ``matryoshka`` (head and backbone) likewise, after it.

The student is the MCU ViT (LayerNorm, no BatchNorm) with a linear projector and no
augmentation: then two processes compute exactly the one-process step, up to float rounding (DDP
sums two half-batch gradients where one process sums one whole batch).  BatchNorm would not match
on the CPU: torch has SyncBatchNorm only for GPUs, so each CPU rank normalises with its own half.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillc.cache import ArtifactStore
from distillc.plugin_manager import load_plugins
from distillc.training import embed_all
from tests.conftest import TINY_DATA

SPEC = """
[distillc]
spec_version = 1
name = "ddp"
seed = 0

""" + TINY_DATA + """
[[teachers]]
name = "vit"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}

[[teachers]]
name = "aux"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = 1, batch_size = 100, lr = 3e-3 }}

[student]
arch = "vit-mcu"
dim = 16
depth = 1
heads = 2

[[passes]]
use = "distill.feature"
teacher = "vit"
epochs = 2
batch_size = {batch_size}
projector_hidden = 0
augment = 0.0

[[passes]]
use = "matryoshka"
teacher = "vit"
dims = [32, 192]
train_backbone = true
epochs = 1
batch_size = {batch_size}

[target]
use = "host"
"""

# Measured: 5e-7 between the one- and two-process students' embeddings (of scale ~2) after 42
# AdamW steps, where a different batch size moves them by ~3.  1e-4 leaves 200x room for other
# CPUs' summation orders and stays 10^4 below a real difference.
EMBEDDING_TOLERANCE = 1e-4


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(batch_size=64))
    one, two = tmp_path / "cache-one", tmp_path / "cache-two"
    _compile([], spec, one, tmp_path / "build-one")

    shutil.copytree(one, two)
    shutil.rmtree(two / "derived")  # the teacher's targets are computed again, split over the ranks
    for step in ("teacher:aux", "student", "distill.feature", "matryoshka"):
        shutil.rmtree(_entry(two, step))
    _compile([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"], spec, two,
             tmp_path / "build-two")

    report = json.loads((tmp_path / "build-two" / "report.json").read_text())
    assert report["world_size"] == 2
    assert {row["id"]: row["status"] for row in report["plan"][:5]} == {
        "teacher:vit": "cached", "teacher:aux": "ran", "student": "ran", "distill.feature": "ran",
        "matryoshka": "ran"}
    assert _record(one, "distill.feature")["world_size"] == 1
    assert _record(two, "distill.feature")["world_size"] == 2
    assert _record(two, "teacher:aux")["world_size"] == 2
    assert _record(two, "student")["world_size"] == 1  # rank 0 alone

    # Each rank wrote its own whole batches of the teacher's targets to a shard, which rank 0 joined:
    # the file is the one-process file, bit for bit, and no shard is left behind.
    (targets_one,), (targets_two,) = (sorted((c / "derived" / "teacher-targets").glob("*.npy"))
                                      for c in (one, two))
    assert targets_one.name == targets_two.name
    assert np.array_equal(np.load(targets_one), np.load(targets_two))
    assert not list((two / "derived" / "teacher-targets").glob("*.tmp"))

    assert abs(_record(one, "distill.feature")["metrics"]["loss"]
               - _record(two, "distill.feature")["metrics"]["loss"]) < 1e-5
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, shared = _embed(one, x), _embed(two, x)
    assert (plain - shared).abs().max() < EMBEDDING_TOLERANCE

    # The Matryoshka head (and the backbone under it) trained on both ranks too.
    assert _record(two, "matryoshka")["world_size"] == 2
    head_plain, head_shared = _embed(one, x, step="matryoshka"), _embed(two, x, step="matryoshka")
    assert head_plain.shape[1] == 192 and (head_plain - head_shared).abs().max() < EMBEDDING_TOLERANCE
    one_losses = _record(one, "matryoshka")["metrics"]["loss_per_dim"]
    two_losses = _record(two, "matryoshka")["metrics"]["loss_per_dim"]
    assert one_losses.keys() == two_losses.keys() == {"32", "192"}
    assert all(abs(one_losses[d] - two_losses[d]) < 1e-5 for d in one_losses)  # over both ranks' shares

    # The comparison can fail: half the batch (what a per-rank batch_size would mean) moves the
    # embeddings far outside the tolerance.
    spec.write_text(SPEC.format(batch_size=32))
    _compile([], spec, one, tmp_path / "build-half")
    half = _embed(one, x, batch_size=32)
    assert (plain - half).abs().max() > 100 * EMBEDDING_TOLERANCE


def _compile(launcher: list[str], spec: Path, cache: Path, workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(DISTILLC_CACHE=str(cache), OMP_NUM_THREADS="1", DISTILLC_DEVICE="cpu")
    command = (launcher or [sys.executable]) + ["-m", "distillc.cli", "compile", str(spec), "--until",
                                                "matryoshka", "--workdir", str(workdir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _records(cache: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in cache.glob("*/*/run.json")]


def _record(cache: Path, step_id: str, **config: Any) -> dict[str, Any]:
    (record,) = [r for r in _records(cache)
                 if r["id"] == step_id and all(r["config"].get(k) == v for k, v in config.items())]
    return record


def _entry(cache: Path, step_id: str) -> Path:
    return ArtifactStore(cache).entry(_record(cache, step_id)["key"])


def _embed(cache: Path, x: torch.Tensor, batch_size: int = 64, step: str = "distill.feature") -> torch.Tensor:
    key = _record(cache, step, batch_size=batch_size)["key"]
    return embed_all(ArtifactStore(cache).load(key).build(load_plugins()), x)
