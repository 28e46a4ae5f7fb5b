"""Data-parallel training under ``torchrun``: who this process is, and the few collectives distillc needs.

``torchrun --nproc-per-node N -m distillc.cli compile spec.toml`` starts N copies of the same
compile.  :func:`init` joins them into one process group (NCCL on GPUs, gloo on CPUs); the
pipeline then runs every training step on all ranks together (inside :func:`every_rank`) and
everything else on rank 0 alone (see ``docs/distributed.md``).

Two levels of "distributed" are kept apart on purpose:

- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier` describe the launch: the
  pipeline uses them to decide which rank stores, publishes and prints.
- :func:`data_parallel` is true only inside :func:`every_rank`, where all ranks are known to run
  the same code.  The training helpers (:func:`shard`, :func:`wrap`, :func:`sum_all`,
  :func:`gather_rows`, :func:`agree`) are collectives there and plain single-process code
  everywhere else, so a training loop that rank 0 runs alone (a pass that is not marked
  ``distributed``) never waits for ranks that are not coming.

Without torchrun (or with one process) every helper is a no-op.  torch is imported inside the
functions: the pipeline imports this module, and ``distillc --help`` must stay fast.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

_state = {"every_rank": False}


def launched() -> bool:
    """Whether this process is one of several that torchrun (or another env:// launcher) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def pick_device() -> "torch.device":
    """CUDA when present (real users train on GPUs), else CPU.  ``DISTILLC_DEVICE`` overrides.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK`` (unless the override names one).
    """
    import torch

    forced = os.environ.get("DISTILLC_DEVICE")
    device = torch.device(forced or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and launched():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init() -> None:
    """Join the process group once (no-op without torchrun, or when the caller already joined one).

    The backend is NCCL when training runs on CUDA, gloo otherwise; on CUDA each process uses
    the GPU ``LOCAL_RANK``.
    """
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    device = pick_device()
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    # Leaving without destroying the group makes NCCL warn at exit; a rank that is done may
    # leave while rank 0 still runs its own steps, so this is no collective.
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the launch (0 without torchrun)."""
    if not _initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """How many processes the launch has (1 without torchrun)."""
    if not _initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    """Rank 0: the one that stores artifacts, writes checkpoints and reports, and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (no-op without torchrun)."""
    if not _initialized():
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextmanager
def every_rank() -> Iterator[None]:
    """Mark the body as run by every rank together: the training helpers become collectives."""
    previous = _state["every_rank"]
    _state["every_rank"] = True
    try:
        yield
    finally:
        _state["every_rank"] = previous


def data_parallel() -> bool:
    """Whether training here is shared by several processes (inside :func:`every_rank`, world > 1)."""
    return _state["every_rank"] and world_size() > 1


def shard(idx: "torch.Tensor") -> "torch.Tensor":
    """This rank's contiguous share of the global batch ``idx``.

    Shares differ in length by at most one (the first ``len(idx) % world`` ranks get one more);
    a batch with fewer elements than ranks leaves some ranks an empty share.
    """
    if not data_parallel():
        return idx
    import torch

    return torch.tensor_split(idx, world_size())[rank()]


def block_range(n: int, block: int) -> tuple[int, int]:
    """This rank's contiguous rows of ``range(n)`` in whole blocks of ``block`` rows (the last may be short).

    Used to split a batched computation over the ranks without changing its batches, so the
    gathered result equals the one-process result bit for bit.
    """
    if not data_parallel():
        return 0, n
    blocks = -(-n // block)
    per, extra = divmod(blocks, world_size())
    r = rank()
    first = r * per + min(r, extra)
    last = first + per + (1 if r < extra else 0)
    return min(first * block, n), min(last * block, n)


def wrap(module: "torch.nn.Module") -> "torch.nn.Module":
    """``module`` in DistributedDataParallel when training is shared, else ``module`` itself.

    The module lives on one device (``device_ids`` stays None, so DDP moves no inputs).  Unused
    parameters are allowed: an objective need not touch every head or every student layer.
    """
    if not data_parallel():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


def sum_all(*values: float) -> tuple[float, ...]:
    """The sums over all ranks of ``values`` (float64), when training is shared; else ``values``."""
    if not data_parallel():
        return tuple(float(v) for v in values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


def gather_rows(local: "torch.Tensor") -> "torch.Tensor":
    """Concatenate every rank's ``local`` rows in rank order (ranks may hold different row counts).

    Returned on the CPU.  An empty share may come without trailing dimensions (e.g. ``torch.empty(0)``).
    """
    if not data_parallel():
        return local
    import torch
    import torch.distributed as dist

    shapes: list[Any] = [None] * world_size()
    dist.all_gather_object(shapes, (tuple(local.shape), str(local.dtype).removeprefix("torch.")))
    nonempty = [(shape, dtype) for shape, dtype in shapes if shape and shape[0] > 0]
    if not nonempty:
        return local
    tail, dtype = nonempty[0][0][1:], getattr(torch, nonempty[0][1])
    rows = max(shape[0] for shape, _ in shapes)
    device = _comm_device()
    padded = torch.zeros((rows, *tail), dtype=dtype, device=device)
    if local.numel():
        padded[: len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: shape[0] if shape else 0].cpu() for part, (shape, _) in zip(parts, shapes)])


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, when training is shared (a decision all ranks must share)."""
    if not data_parallel():
        return value
    return broadcast(value)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank of the launch; ``value`` itself without torchrun."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> "torch.device":
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
