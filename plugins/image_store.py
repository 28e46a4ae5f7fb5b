"""Images that stay on disk: lazily converted views over memory-mapped arrays.

A dataset of 100k+ images does not fit in RAM as float32, and neither need it: an
:class:`ImageArray` is an ``(N, C, H, W)`` float32 array in [0, 1] that reads, converts
(channels, size) and scales only the rows asked for (``images[idx]``), from a backing
array that is memory-mapped: a ``.npy`` file as it is, or the uint8 pixels a loader decoded
into a temporary file (:func:`scratch_array`; image folders and WebDataset shards are decoded
once per compile by DataLoader workers, :func:`decode_into`).  The training loops index it a
batch at a time, so the resident set holds a few batches, not the dataset.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Rows converted per step when a whole array is read (e.g. by torch.cat in a caller).
_CHUNK = 2048
#: ITU-R BT.601 luma weights, to turn RGB images into single-channel ones.
LUMA = (0.299, 0.587, 0.114)


def convert_rows(images: np.ndarray, scale: float, image_size: int, channels: int,
                 rows: Any) -> torch.Tensor:
    """Rows ``rows`` (a slice or index array) of (N, C, H, W) numbers -> float32
    (n, channels, image_size, image_size) in [0, 1]: scaled, channels converted (1 -> any,
    3 -> 1 by luma), resized bilinearly (antialiased when shrinking)."""
    _, c_in, height, width = images.shape
    chunk = torch.from_numpy(np.ascontiguousarray(images[rows])).to(torch.float32) * scale
    if c_in == 3 and channels == 1:
        chunk = (chunk * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c_in == 1 and channels != 1:
        chunk = chunk.expand(-1, channels, -1, -1)
    if (height, width) != (image_size, image_size):
        shrink = height > image_size or width > image_size
        chunk = F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
    return chunk.clamp(0.0, 1.0).contiguous()


class ImageArray:
    """``(N, channels, image_size, image_size)`` float32 images in [0, 1], read lazily.

    ``source`` is any ``(M, C, H, W)`` array (usually memory-mapped), ``scale`` maps its values
    to [0, 1], ``index`` the rows of ``source`` this array holds (None: all).  Indexing with an
    int, a slice, or an index array/tensor returns a float32 tensor of those rows; ``len``,
    ``shape`` and ``dtype`` are a tensor's.  Nothing is cached: each read converts again, from
    the page cache.
    """

    dtype = torch.float32

    def __init__(self, source: np.ndarray, scale: float, image_size: int, channels: int,
                 index: np.ndarray | None = None):
        self.source = source
        self.scale = float(scale)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, self.image_size, self.image_size))

    def dim(self) -> int:
        return 4

    def _rows(self, key: Any) -> Any:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, slice):
            if self.index is None:
                start, stop, step = key.indices(len(self))
                return slice(start, stop, step)
            return self.index[key]
        key = np.asarray(key)
        if key.dtype == np.bool_:  # a mask over the rows
            if key.shape != (len(self),):
                raise IndexError(f"a mask of {key.shape} for {len(self)} images")
            key = np.flatnonzero(key)
        key = key.astype(np.int64, copy=False)
        if key.ndim != 1:
            raise IndexError("an ImageArray is indexed by an int, a slice or a 1-d index array")
        key = np.where(key < 0, key + len(self), key)
        if key.size and (key.min() < 0 or key.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return key if self.index is None else self.index[key]

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):  # rows first, then the rest on the converted rows
            rows = self[key[0]]
            rest = key[1:]
            return rows[rest] if isinstance(key[0], (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return self[np.array([int(key)])][0]
        rows = self._rows(key)
        n = len(range(*rows.indices(len(self.source)))) if isinstance(rows, slice) else len(rows)
        if n <= _CHUNK:
            return convert_rows(self.source, self.scale, self.image_size, self.channels, rows)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self.source)))
        return torch.cat([convert_rows(self.source, self.scale, self.image_size, self.channels, rows[i:i + _CHUNK])
                          for i in range(0, n, _CHUNK)])

    def __iter__(self):
        for start in range(0, len(self), _CHUNK):
            yield from self[start:start + _CHUNK]

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """All the images as one tensor (reads everything: for small arrays only)."""
        return self[:].to(*args, **kwargs)

    def numpy(self) -> np.ndarray:
        return self[:].numpy()

    def __repr__(self) -> str:
        return f"ImageArray({len(self)} images, {self.channels}x{self.image_size}x{self.image_size}, lazily read)"


def scratch_array(shape: Sequence[int], dtype: Any = np.uint8) -> np.ndarray:
    """A writable memory-mapped array in an anonymous temporary file (gone when unmapped).

    ``DISTILLC_TMPDIR`` (else the system's temporary folder) holds it: decoded datasets live
    there, not in RAM.
    """
    handle = scratch_file("distillc-images-")
    try:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        handle.truncate(max(1, nbytes))
        return np.memmap(handle, dtype=dtype, mode="r+", shape=tuple(shape))
    finally:
        handle.close()  # the mapping keeps the (already unlinked) file alive


def scratch_file(prefix: str) -> Any:
    """An anonymous temporary file (unlinked at once) in ``DISTILLC_TMPDIR``, else the system's
    temporary folder: where decoded data goes instead of RAM."""
    return tempfile.TemporaryFile(dir=os.environ.get("DISTILLC_TMPDIR") or None, prefix=prefix)


def workers() -> int:
    """DataLoader worker processes for decoding: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores) - 1) if cores > 1 else 0


def decode_into(out: np.ndarray, dataset: "torch.utils.data.Dataset", *, batch_size: int = 64,
                progress: Callable[[int], None] | None = None) -> None:
    """Fill ``out`` (N, ...) with ``dataset``'s items in order, decoded by DataLoader workers a
    batch at a time; each item is ``(row, uint8 array)``."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers(), collate_fn=_stack)
    for rows, pixels in loader:
        out[rows] = pixels
        if progress is not None:
            progress(len(rows))
    if isinstance(out, np.memmap):
        out.flush()


def _stack(items: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([row for row, _ in items], dtype=np.int64), np.stack([pixels for _, pixels in items])


def value_range(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``array``, read in chunks of rows (a memory-mapped file is never read whole)."""
    low, high = np.inf, -np.inf
    for start in range(0, len(array), _CHUNK):
        chunk = np.asarray(array[start:start + _CHUNK])
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return low, high
