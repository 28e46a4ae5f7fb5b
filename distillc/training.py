"""Shared training machinery: device choice, mixed precision, batching, resumable epochs.

Training passes call :func:`run_epochs` with an ``epoch_fn`` that trains one epoch; this module
owns the checkpoint written after every epoch (so an interrupted compile resumes from the last
finished epoch) and the progress bar (epoch, loss, images/s).  Every epoch draws its randomness
from a generator seeded by (seed, epoch), which is what makes a resumed run equal an unbroken one.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def pick_device() -> torch.device:
    """CUDA when present (real users train on GPUs), else CPU.  ``DISTILLC_DEVICE`` overrides."""
    forced = os.environ.get("DISTILLC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """A CPU generator for one epoch; independent of how many epochs ran before (resumable)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1))


def batches(n: int, batch_size: int, generator: torch.Generator | None, *, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of shuffled (generator given) or ordered mini-batches."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def run_epochs(*, progress: Any, checkpoint_dir: Path, description: str, epochs: int,
               state: dict[str, Any], epoch_fn: Callable[[int], tuple[float, int]],
               extra: Callable[[], dict[str, Any]] | None = None) -> list[float]:
    """Run ``epoch_fn(epoch) -> (mean loss, images seen)`` for each epoch not yet done.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (modules,
    optimizers, schedulers); they are checkpointed after every epoch and restored on resume.
    ``extra()`` may add fields to the progress line (e.g. the curriculum's strength).
    Returns the loss of every epoch.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / CHECKPOINT_FILE
    start, losses = 0, []
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for name, obj in state.items():
            obj.load_state_dict(saved["state"][name])
        start, losses = int(saved["epoch"]), list(saved["losses"])
    with progress.task(description, total=epochs, unit="epoch") as task:
        if start:
            task.advance(start, resumed_from=start)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            loss, images = epoch_fn(epoch)
            seconds = max(time.perf_counter() - t0, 1e-9)
            losses.append(float(loss))
            _save_atomic(path, {"epoch": epoch + 1, "losses": losses,
                                "state": {name: obj.state_dict() for name, obj in state.items()}})
            fields = {"loss": float(loss), "images_per_s": round(images / seconds)}
            if extra is not None:
                fields.update(extra())
            task.advance(**fields)
    return losses


def _save_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
