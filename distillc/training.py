"""Shared training machinery: device choice, mixed precision, batching, resumable epochs, data parallelism.

Training passes call :func:`run_epochs` with an ``epoch_fn`` that trains one epoch; this module
owns the checkpoint written after every epoch (so an interrupted compile resumes from the last
finished epoch) and the progress bar (epoch, loss, images/s).  Every epoch draws its randomness
from a generator seeded by (seed, epoch), which is what makes a resumed run equal an unbroken one.
Under torchrun, :class:`DataParallel` splits each global batch over the processes (see
``distillc.distributed``).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distillc import distributed
from distillc.distributed import pick_device  # the device of this process; training passes import it from here

CHECKPOINT_FILE = "checkpoint.pt"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU (CPU bf16 is slower than fp32 on most hosts)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels_last on CUDA, where convolutions run faster in it."""
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch; independent of how many epochs ran before (resumable).

    Stream 0 draws the epoch's order; under torchrun, rank ``r > 0`` draws its own random
    augmentations from stream ``r`` (see :meth:`DataParallel.generator`).
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1))


def batches(n: int, batch_size: int, generator: torch.Generator | None, *, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of shuffled (generator given) or ordered mini-batches."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


class DataParallel:
    """The modules a training loop updates, trained data-parallel when several processes share the step.

    ``batch_size`` stays the global batch.  Every process draws the same order (the epoch's
    generator), takes its contiguous share of each global batch (:meth:`share`) and computes the
    loss through DistributedDataParallel (:meth:`loss`), which averages the gradients; each
    share's loss is weighted by its size, so one optimizer step equals the one-process step on
    the whole global batch for a loss that is a mean over images.  On CUDA, BatchNorm becomes
    SyncBatchNorm (statistics over the global batch); torch has no SyncBatchNorm on the CPU, so
    there each process normalises with its own share's statistics.

    Alone (no torchrun, or a step that rank 0 runs by itself) every method is the plain
    single-process behaviour, so a one-process run is unchanged.  A loop reads::

        parallel = DataParallel({"model": model, "head": head}, device)
        for idx in batches(n, batch_size, gen):
            part = parallel.share(idx)
            if part is None:
                continue
            loss = parallel.loss(mean_loss, part)
            optimizer.zero_grad()
            parallel.backward(loss, part, idx)
            optimizer.step()
            total, seen = total + loss.item() * len(part), seen + len(part)
        return parallel.epoch_mean(total, seen)
    """

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.shared = distributed.data_parallel()
        self.world = distributed.world_size() if self.shared else 1
        self._ddp: torch.nn.Module | None = None
        if self.shared:
            if device.type == "cuda":  # in place: the layers keep their parameters and buffers
                for module in modules.values():
                    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self._ddp = distributed.wrap(_Trained(modules))

    def share(self, idx: torch.Tensor) -> torch.Tensor | None:
        """This process's part of the global batch ``idx``; None (on every rank) to skip a batch
        with fewer images than processes (only a short last batch can be one)."""
        if not self.shared:
            return idx
        if len(idx) < self.world:
            return None
        return distributed.shard(idx)

    def generator(self, seed: int, epoch: int, order: torch.Generator) -> torch.Generator:
        """The generator this process draws its random augmentations from in ``epoch``.

        Alone: ``order`` itself (the stream a one-process run has always used).  Shared: rank 0
        keeps ``order`` and rank ``r`` draws from stream ``r``, so the processes augment their
        shares independently (the same stream on every rank would give image ``i`` of every share
        the same crop).  The draws therefore differ from a one-process run's: only training
        without random augmentation matches it to rounding.
        """
        if not self.shared or distributed.rank() == 0:
            return order
        return epoch_generator(seed, epoch, stream=distributed.rank())

    def loss(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``fn(*args)``, the mean loss over this process's part, run where DDP sees it.

        DDP must see the forward that builds the graph whose gradients it averages; an objective
        calls the student and its heads directly, so the whole loss runs as DDP's forward.
        """
        return fn(*args) if self._ddp is None else self._ddp(fn, *args)

    def backward(self, loss: torch.Tensor, part: torch.Tensor, idx: torch.Tensor) -> None:
        """Backpropagate ``loss`` (the mean over ``part``) as this process's share of the mean over ``idx``.

        DDP averages the processes' gradients; weighting each mean by ``world * len(part) /
        len(idx)`` makes that average the gradient of the mean over the whole global batch, also
        when the parts differ by one image (equal parts: weight 1, nothing changes).
        """
        weight = self.world * len(part) / len(idx)
        (loss if weight == 1.0 else loss * weight).backward()

    def epoch_mean(self, total: float, seen: int) -> tuple[float, int]:
        """The epoch's mean loss and image count over every process (``total`` = sum of loss x images)."""
        total, seen = distributed.sum_all(total, seen) if self.shared else (total, seen)
        return total / max(seen, 1), int(seen)


class _Trained(torch.nn.Module):
    """The trained modules under one parent, so that one DDP wraps them all.

    Its forward runs the loss function it is given: DDP must see the forward that builds the
    graph it reduces gradients for, and an objective calls the student and its heads directly.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.trained = torch.nn.ModuleDict(modules)

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)


def run_epochs(*, progress: Any, checkpoint_dir: Path, description: str, epochs: int,
               state: dict[str, Any], epoch_fn: Callable[[int], tuple[float, int]],
               extra: Callable[[], dict[str, Any]] | None = None, step: str | None = None) -> list[float]:
    """Run ``epoch_fn(epoch) -> (mean loss, images seen)`` for each epoch not yet done.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (modules,
    optimizers, schedulers); they are checkpointed after every epoch and restored on resume.
    ``extra()`` may add fields to the progress line (e.g. the curriculum's strength).
    Returns the loss of every epoch.

    An epoch whose loss, or a trained module's parameters, are not finite (NaN or infinite: a
    learning rate too high for the model) raises :class:`~distillc.errors.PassError` naming
    ``step`` (default: ``description``), before that epoch is checkpointed: nothing of the
    diverged run is stored, and the last good epoch stays resumable.

    When training is shared by several processes, rank 0 alone writes the checkpoint and decides
    whether to resume; the others then read the same file (the cache must be on storage that
    every rank sees).
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / CHECKPOINT_FILE
    start, losses = 0, []
    if distributed.agree(path.exists()):
        if not path.exists():
            from distillc.errors import DistillcError

            raise DistillcError(f"rank {distributed.rank()} cannot read rank 0's checkpoint {path}: "
                                "under torchrun the cache must be on storage that every rank sees")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for name, obj in state.items():
                obj.load_state_dict(saved["state"][name])
            start, losses = int(saved["epoch"]), list(saved["losses"])
        except Exception as exc:  # torn by a disk fault, edited, or from a pass whose code changed
            from distillc.errors import PassError, shorten

            raise PassError(step or description, f"cannot resume from the training checkpoint {path} "
                                                 f"({type(exc).__name__}: {shorten(str(exc), 160)}); delete it "
                                                 "to train this step from its first epoch") from None
    with progress.task(description, total=epochs, unit="epoch") as task:
        if start:
            task.advance(start, resumed_from=start)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            loss, images = epoch_fn(epoch)
            seconds = max(time.perf_counter() - t0, 1e-9)
            _check_finite(step or description, epoch, epochs, float(loss), state)
            losses.append(float(loss))
            if distributed.is_main():
                _save_atomic(path, {"epoch": epoch + 1, "losses": losses,
                                    "state": {name: obj.state_dict() for name, obj in state.items()}})
            fields = {"loss": float(loss), "images_per_s": round(images / seconds)}
            if extra is not None:
                fields.update(extra())
            task.advance(**fields)
    return losses


def _check_finite(step: str, epoch: int, epochs: int, loss: float, state: dict[str, Any]) -> None:
    """Raise PassError when training diverged: a non-finite loss or module parameter."""
    from distillc.errors import PassError

    where = f"epoch {epoch + 1} of {epochs}"
    fix = "lower lr (or weight_decay), or check the data; nothing of this run was stored"
    if not math.isfinite(loss):
        raise PassError(step, f"training diverged: the loss is {loss} at {where}; {fix}")
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            for tensor_name, tensor in [*obj.named_parameters(), *obj.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise PassError(step, f"training diverged: {name} {tensor_name} holds NaN or infinite values "
                                          f"after {where}; {fix}")


def _save_atomic(path: Path, payload: dict[str, Any]) -> None:
    # A name of its own: a compile never shares its temporary file with another writer.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):  # torch's writer on a full disk
            from distillc.errors import WorkspaceError

            raise WorkspaceError(f"cannot write the training checkpoint {path} (the disk may be full); free some "
                                 "space, or give DISTILLC_CACHE another folder") from None
        raise


@torch.no_grad()
def embed_all(module: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 256,
              fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``fn(module, batch)`` (default ``module(batch)``) over ``x`` in eval mode; float32 CPU result."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    outs = []
    for idx in batches(len(x), batch_size, None):
        batch = x[idx].to(device)
        with autocast(device):
            y = fn(module, batch) if fn is not None else module(batch)
        outs.append(y.float().cpu())
    module.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
