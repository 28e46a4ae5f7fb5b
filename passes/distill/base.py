"""What every distillation pass shares: objectives, the training loop and the teacher-target cache.

A distillation method is an :class:`Objective`: the trainable heads it adds next to the student
(projectors, adapters, predictors) and a loss on one batch.  :class:`DistillationPass` trains a
student with an objective; the QAT pass trains a quantized student with the same objective, so
the teacher keeps teaching while the student is quantized.

Frozen teachers never change, so their outputs on the training images are computed once per
(teacher weights, data, view, view seed) by :func:`teacher_targets` and kept as safetensors in
the cache's ``derived/`` folder, reused across epochs and across runs.

This module imports torch only inside functions: pass modules are imported when plugins load,
and ``distillc --help`` must stay fast.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import Field

from distillc import distributed
from distillc.artifacts import TorchModel
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult

if TYPE_CHECKING:  # pragma: no cover
    import torch


class DistillConfig(PassConfig):
    """Training keys shared by every distillation pass."""

    epochs: int = Field(10, ge=1, le=100_000)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    batch_size: int = Field(128, ge=2, le=65_536)
    weight_decay: float = Field(1e-4, ge=0.0)


@dataclass
class Batch:
    """One training batch: dataset indices, the images on the training device, the epoch's generator."""

    idx: "torch.Tensor"
    x: "torch.Tensor"
    generator: "torch.Generator"
    epoch: int
    epochs: int


class Objective(abc.ABC):
    """A training objective: trainable ``heads`` plus a loss on a batch (label-free, except ``train.supervised``'s).

    Subclasses implement :meth:`setup` (build heads, fetch teacher targets) and :meth:`loss`.
    ``heads`` must be a ``torch.nn.Module`` once set up (an empty ModuleDict is fine); it is
    trained with the student and checkpointed every epoch, then dropped.
    """

    heads: Any = None

    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def setup(self, student: "torch.nn.Module", device: "torch.device") -> None:
        """Prepare for training ``student`` on ``device``."""

    @abc.abstractmethod
    def loss(self, student: "torch.nn.Module", batch: Batch) -> "torch.Tensor":
        """The scalar loss of ``student`` on ``batch``."""

    def progress_fields(self, epoch: int, epochs: int) -> dict[str, Any]:
        """Extra fields shown on the progress line (e.g. the curriculum's strength)."""
        return {}

    def metrics(self) -> dict[str, Any]:
        """Metrics reported after training (e.g. head parameter counts)."""
        return {}


def train_with_objective(ctx: PassContext, model: "torch.nn.Module", objective: Objective, *, epochs: int,
                         lr: float, batch_size: int, weight_decay: float, device: "torch.device",
                         description: str, schedule: bool = True) -> list[float]:
    """Train ``model`` and ``objective.heads`` for ``epochs`` (resumable); returns each epoch's loss.

    ``batch_size`` is the global batch: under torchrun every process trains on its share of each
    batch and the gradients are averaged (:class:`~distillc.training.DataParallel`), and the
    losses returned are means over all processes.
    """
    import torch

    from distillc.training import DataParallel, autocast, batches, epoch_generator, run_epochs

    data = ctx.data
    parallel = DataParallel({"model": model, "heads": objective.heads}, device)
    params = list(model.parameters()) + list(objective.heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    state: dict[str, Any] = {"model": model, "heads": objective.heads, "optimizer": optimizer}
    n = len(data.train_x)
    drop_last = n >= batch_size
    steps = max(1, epochs * (n // batch_size if drop_last else math.ceil(n / batch_size)))
    scheduler = None
    if schedule:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        state["schedule"] = scheduler
    current = {"epoch": 0}

    def epoch_fn(epoch: int) -> tuple[float, int]:
        current["epoch"] = epoch
        gen = epoch_generator(ctx.seed, epoch)
        draws = parallel.generator(ctx.seed, epoch, gen)
        model.train()
        objective.heads.train()
        total, seen = 0.0, 0
        for idx in batches(n, batch_size, gen, drop_last=drop_last):
            part = parallel.share(idx)
            if part is None:
                continue
            batch = Batch(idx=part, x=data.train_x[part].to(device, non_blocking=True), generator=draws, epoch=epoch,
                          epochs=epochs)
            with autocast(device):
                loss = parallel.loss(objective.loss, model, batch)
            optimizer.zero_grad(set_to_none=True)
            parallel.backward(loss, part, idx)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(part)
            seen += len(part)
        return parallel.epoch_mean(total, seen)

    return run_epochs(progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir, description=description,
                      epochs=epochs, state=state, epoch_fn=epoch_fn, step=ctx.step_id,
                      extra=lambda: objective.progress_fields(current["epoch"], epochs))


class DistillationPass(Pass):
    """Base of the distillation passes: train the student with :meth:`objective`, drop the heads.

    A subclass sets ``name``, ``description``, a ``Config`` (a :class:`DistillConfig` subclass)
    and implements :meth:`objective`.  Under torchrun it trains on every rank together.
    """

    takes = TorchModel
    makes = TorchModel
    uses_data = True
    tools = ("torch",)
    distributed = True
    Config: ClassVar[type[PassConfig]] = DistillConfig

    @abc.abstractmethod
    def objective(self, ctx: PassContext) -> Objective:
        """The objective this pass trains with (built fresh for each run)."""

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch

        from distillc.training import count_params, pick_device, prepare

        cfg = self.config
        device = pick_device()
        torch.manual_seed(ctx.seed)
        student = prepare(artifact.build(ctx.plugins), device).train()
        objective = self.objective(ctx)
        objective.setup(student, device)
        losses = train_with_objective(ctx, student, objective, epochs=cfg.epochs, lr=cfg.lr,
                                      batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, device=device,
                                      description=ctx.step_id)
        out = TorchModel.from_module(student, role="student", arch=artifact.arch, options=artifact.options,
                                     meta={**artifact.meta, "distilled_by": self.name})
        metrics = {"loss": losses[-1], "first_loss": losses[0], "epoch_losses": losses, "params": count_params(student),
                   "head_params": count_params(objective.heads), **teacher_input_metrics(ctx, self.teachers()),
                   **objective.metrics()}
        return PassResult(out, metrics)


# -- teacher targets ------------------------------------------------------------------------------

# The view is drawn batch by batch from one generator, so the batch size is part of its definition.
_VIEW_BATCH = 256



def teacher_targets(ctx: PassContext, teacher: str, what: str, fn: Callable[[Any, Any], Any], *,
                    view: Any = None, view_seed: int = 0, batch_size: int = _VIEW_BATCH) -> "torch.Tensor":
    """``fn(teacher_module, images)`` over the training images, computed once and cached.

    ``what`` names the computation (e.g. ``"embed"``, ``"hidden:3,7,11"``); it is part of the key
    with the teacher's cache key, the data fingerprint, the view's settings and ``view_seed``.
    ``view`` (an augmentation, called as ``view(x, generator)``) makes the teacher see a fixed
    augmented view; each ``view_seed`` is one such view of every image (see :func:`teacher_view`).

    The targets stream: images are read, viewed and run through the teacher a batch at a time,
    and each batch's rows are written to a ``.npy`` file as they come (under torchrun every
    process writes its own shard of whole batches, and rank 0 joins the shards a chunk at a
    time).  The result is that file memory-mapped (copy-on-write): indexing it reads the rows
    asked for, so neither the images nor all the targets need fit in RAM.  ``batch_size`` caps the
    images one teacher forward takes (the views are drawn in blocks of 256 whatever it is).
    """
    contract = ctx.teachers[teacher].meta.get("input")
    key_fields = {"teacher": ctx.teacher_keys.get(teacher, teacher), "data": ctx.data_fingerprint, "what": what,
                  "view": repr(view) if view is not None else None, "view_seed": view_seed if view is not None else None,
                  "format": 2}
    if contract is not None:  # also in the teacher's key; named here so the file says what it holds
        key_fields["input"] = contract
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    folder = (ctx.derived_dir or ctx.scratch) / "teacher-targets"
    path = folder / f"{key}.npy"
    if distributed.agree(path.exists()):
        return open_targets(path)
    import torch

    from distillc.training import pick_device, prepare

    device = pick_device()
    # Building the teacher draws a throw-away random init; fork the RNG so that a run computing
    # the targets leaves the same random state as a run finding them cached.
    with torch.random.fork_rng(devices=[]):
        module = prepare(teacher_module(ctx, teacher), device)
    folder.mkdir(parents=True, exist_ok=True)
    token = distributed.broadcast(f"{os.getpid()}-{secrets.token_hex(4)}")  # two compiles may write it at once
    n = len(ctx.data.train_x)
    # Under torchrun each process runs its own run of whole batches; with the batches unchanged
    # the joined targets are the one-process targets, so the cache file does not depend on N.
    start, stop = distributed.block_range(n, _VIEW_BATCH)
    shard = folder / f"{key}.{token}.rank{distributed.rank()}.tmp"
    rows = _write_targets(module, ctx.data.train_x, fn, view, view_seed, start, stop, shard, device, batch_size)
    distributed.barrier()
    if distributed.is_main():
        shards = [folder / f"{key}.{token}.rank{r}.tmp" for r in range(distributed.world_size())]
        tmp = folder / f"{key}.{token}.npy.tmp"
        _join_shards(shards, tmp, n, rows)
        (folder / f"{key}.json").write_text(json.dumps(key_fields, sort_keys=True, indent=1))
        os.replace(tmp, path)
        for part in shards:
            part.unlink(missing_ok=True)
    distributed.barrier()
    return open_targets(path)


def open_targets(path: Path) -> "torch.Tensor":
    """A cached target file as a tensor over its memory map (copy-on-write: writes stay private)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))


def _write_targets(module: Any, images: Any, fn: Callable[[Any, Any], Any], view: Any, view_seed: int,
                   start: int, stop: int, shard: Path, device: Any,
                   batch_size: int) -> tuple[tuple[int, ...], str] | None:
    """Rows ``start:stop`` of the targets into ``shard`` (a ``.npy``); returns (row shape, dtype) or None."""
    import numpy as np
    import torch

    from distillc.training import autocast, batches

    gen = torch.Generator().manual_seed(view_seed) if view is not None else None
    out = None
    module.eval()
    with torch.no_grad():
        for idx in batches(stop, _VIEW_BATCH, None):
            x = images[idx]
            if view is not None:  # every batch before this rank's is drawn too: the view is one sequence
                x = view(x, gen)
            if int(idx[0]) < start:
                continue
            with autocast(device):
                y = np.concatenate([fn(module, x[i:i + batch_size].to(device)).float().cpu().numpy()
                                    for i in range(0, len(x), batch_size)])
            if out is None:
                out = np.lib.format.open_memmap(shard, mode="w+", dtype=np.float32, shape=(stop - start, *y.shape[1:]))
            first = int(idx[0]) - start
            out[first:first + len(y)] = y
    if out is None:
        return None
    out.flush()
    return tuple(out.shape[1:]), "float32"


def _join_shards(shards: list[Path], target: Path, n: int, rows: Any) -> None:
    """Concatenate the ranks' shard files into ``target`` (a ``.npy`` of ``n`` rows), a chunk at a time."""
    import numpy as np

    parts = [np.load(p, mmap_mode="r") for p in shards if p.exists()]
    tail = parts[0].shape[1:] if parts else tuple(rows[0] if rows else ())
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(n, *tail))
    row = 0
    for part in parts:
        for first in range(0, len(part), _VIEW_BATCH * 16):
            chunk = part[first:first + _VIEW_BATCH * 16]
            out[row:row + len(chunk)] = chunk
            row += len(chunk)
    if row != n:
        raise RuntimeError(f"teacher targets: the shards hold {row} rows, expected {n}")
    out.flush()
    del out


def teacher_module(ctx: PassContext, teacher: str) -> "torch.nn.Module":
    """The teacher named ``teacher``, with its weights (CPU, eval mode), behind its input contract:
    it takes the student's images and sees them at its own size, channels and normalisation
    (:mod:`distillc.plugins.models.teacher_input`)."""
    from distillc.plugins.models.teacher_input import with_input

    artifact = ctx.teachers[teacher]
    return with_input(artifact.build(ctx.plugins), artifact.meta.get("input")).eval()


def teacher_input_metrics(ctx: PassContext, teachers: list[str]) -> dict[str, Any]:
    """``teacher_input`` (``[C, H, W]`` a teacher was fed) and ``teacher_grid`` (its patch-token grid,
    ``[rows, cols]``): one value for a pass with one teacher, a dict by name for several."""
    from distillc.plugins.models.teacher_input import input_shape

    shapes: dict[str, list[int]] = {}
    grids: dict[str, list[int]] = {}
    for name in teachers:
        artifact = ctx.teachers[name]
        options = artifact.options
        contract = artifact.meta.get("input") or {"channels": options.get("in_chans", 3),
                                                  "input_size": options["image_size"]}
        shapes[name] = input_shape(contract)
        grid = artifact.meta.get("grid")
        if grid is not None:
            grids[name] = [int(grid), int(grid)]
    if not shapes:
        return {}
    if len(teachers) == 1:
        out: dict[str, Any] = {"teacher_input": shapes[teachers[0]]}
        if grids:
            out["teacher_grid"] = grids[teachers[0]]
        return out
    return {"teacher_input": shapes, **({"teacher_grid": grids} if grids else {})}


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1): the finest grid of equal
    cells that tiles an ``n``-pixel image with at most ``limit`` cells a side."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def teacher_view(images: "torch.Tensor", view: Any, view_seed: int) -> "torch.Tensor":
    """The fixed augmented view ``view_seed`` of ``images``: exactly what :func:`teacher_targets` shows the teacher,
    in a memory-mapped temporary file (a tensor over it).

    A method whose student must see the teacher's own view (e.g. aligned feature maps) calls this
    to rebuild it instead of caching the images.
    """
    import numpy as np
    import torch

    from distillc.plugins.image_store import scratch_array
    from distillc.training import batches

    gen = torch.Generator().manual_seed(view_seed)
    out = None
    for idx in batches(len(images), _VIEW_BATCH, None):
        viewed = view(images[idx], gen)
        if out is None:  # memory-mapped scratch: a dataset's worth of float images need not fit in RAM
            out = torch.from_numpy(scratch_array((len(images), *viewed.shape[1:]), np.float32))
        out[idx] = viewed
    return out if out is not None else torch.empty((0, *images.shape[1:]))
