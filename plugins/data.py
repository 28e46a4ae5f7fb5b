"""Built-in datasets, loaded without torchvision.

Every loader has the same keyword signature and returns a :class:`DataSplits` of float32
images in [0, 1], shaped (N, C, image_size, image_size):

- ``sklearn-digits``: scikit-learn's 8x8 digits (ship with scikit-learn, no download).
- ``npz``: a NumPy archive with ``x`` (and optionally ``y``, ``x_val``, ``y_val``,
  ``class_names``).
- ``image-folder``: ``root/<class>/*.png|jpg|jpeg`` read with Pillow.
- ``cifar``: the CIFAR-10/100 "python version" folders, read with a restricted unpickler.

Labelled data without its own validation set is split by a seeded, stratified permutation.
:func:`fingerprint` gives the cache key of a loader call.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distillc.errors import SpecError

from distillc.plugins.data_fingerprint import LOADER_VERSION, fingerprint  # noqa: F401  (re-exported)
from distillc.plugins.image_store import (ImageArray, convert_rows, decode_into, scratch_array, scratch_file,
                                          value_range)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Images converted to float per step; bounds the temporary memory next to the result.
_CHUNK = 2048


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A dataset split into train and validation tensors.

    ``*_x`` are float32 (N, C, H, W) in [0, 1]: a tensor for data small enough to hold
    (sklearn-digits), else an :class:`~distillc.plugins.image_store.ImageArray` that reads
    the rows asked for from a memory-mapped file; index either with ``x[idx]``.  ``*_y``
    are int64 (N,), -1 for unlabelled data (then ``num_classes`` is 0 and ``class_names``
    is empty).  Sources with boxes return the subclass
    :class:`distillc.plugins.detection_data.DetectionSplits`.
    """

    train_x: "torch.Tensor | ImageArray"
    train_y: torch.Tensor
    val_x: "torch.Tensor | ImageArray"
    val_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    @property
    def labelled(self) -> bool:
        """Whether the data carries class labels."""
        return self.num_classes > 0


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------

def load_sklearn_digits(*, image_size: int, val_fraction: float, seed: int,
                        path: Path | None = None, channels: int = 3) -> DataSplits:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), resized to ``image_size``."""
    _check_common(image_size, val_fraction, channels)
    if path is not None:
        raise SpecError("sklearn-digits ships with scikit-learn and takes no path", "data.path")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train, val = _split(labels, val_fraction, seed)
    size = (image_size, channels)
    return DataSplits(*_convert(images, 1.0 / 16.0, labels, train, *size),
                      *_convert(images, 1.0 / 16.0, labels, val, *size),
                      num_classes=10, class_names=[str(i) for i in range(10)],
                      name="sklearn-digits")


def load_npz(*, image_size: int, val_fraction: float, seed: int, path: Path | None,
             channels: int = 3) -> DataSplits:
    """Images from an ``.npz`` archive (read with ``allow_pickle=False``), or a ``.npy`` array.

    ``x`` and ``x_val`` are copied out of the archive a chunk at a time into a memory-mapped
    temporary file (a ``.npy`` is memory-mapped where it is), so the images never sit in RAM.

    Keys: ``x`` images, (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 (0..255) or float
    in [0, 1]; optional ``y`` int labels (without it the data is unlabelled, y = -1);
    optional ``x_val``/``y_val`` as a ready-made validation set (else ``x`` is split);
    optional ``class_names`` (strings). The layout is channels-last unless axis 1 has at most
    4 entries and the last axis more than 4. Images are stretched to a square.
    """
    _check_common(image_size, val_fraction, channels)
    path = _require_path(path, "npz", want_dir=False)
    if path.suffix.lower() == ".npy":  # images alone (unlabelled), memory-mapped in place
        try:
            arrays = {"x": np.load(path, mmap_mode="r", allow_pickle=False)}
        except (OSError, ValueError) as exc:
            raise SpecError(f"{str(path)!r} is not a readable .npy array: {exc}", "data.path") from exc
    else:
        arrays = _read_npz(path)

    images, scale = _numeric_images(arrays["x"], f"{path}:x")
    labels = _labels(arrays.get("y"), len(images), f"{path}:y")
    class_names = None
    if "class_names" in arrays:
        class_names = [str(name) for name in arrays["class_names"].reshape(-1)]

    size = (image_size, channels)
    if "x_val" in arrays:
        val_images, val_scale = _numeric_images(arrays["x_val"], f"{path}:x_val")
        val_labels = _labels(arrays.get("y_val"), len(val_images), f"{path}:y_val")
        train = _convert(images, scale, labels, None, *size)
        val = _convert(val_images, val_scale, val_labels, None, *size)
        all_labels = labels if labels is None else np.concatenate([labels, val_labels])
    else:
        train_index, val_index = _split(labels, val_fraction, seed, n=len(images))
        train = _convert(images, scale, labels, train_index, *size)
        val = _convert(images, scale, labels, val_index, *size)
        all_labels = labels

    num_classes, class_names = _classes(all_labels, class_names, str(path))
    return DataSplits(*train, *val, num_classes=num_classes, class_names=class_names, name="npz")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``: images streamed into memory-mapped scratch, the rest in memory."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SpecError(f"{str(path)!r} is not a readable .npz archive: {exc}", "data.path") from exc
    with archive:
        members = {Path(name).stem: name for name in archive.namelist() if name.endswith(".npy")}
        if "x" not in members:
            raise SpecError(f"{str(path)!r} has no array 'x' (has: {sorted(members)})", "data.path")
        if "x_val" in members and ("y" in members) != ("y_val" in members):
            raise SpecError(f"{str(path)!r}: give labels for both 'x' and 'x_val' or for neither",
                            "data.path")
        arrays = {}
        for key in ("x", "y", "x_val", "y_val", "class_names"):
            if key in members:
                with archive.open(members[key]) as member:
                    arrays[key] = _read_member(member, path, key, stream=key in ("x", "x_val"))
    return arrays


def _read_member(member: Any, path: Path, key: str, *, stream: bool) -> np.ndarray:
    """One ``.npy`` member of an archive; ``stream``: copied chunk by chunk into scratch."""
    try:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
    except ValueError as exc:
        raise SpecError(f"{str(path)!r}: array {key!r} is not a .npy array: {exc}", "data.path") from exc
    if dtype.hasobject:  # object arrays need pickle, which we refuse
        raise SpecError(f"{str(path)!r} holds object arrays, which need pickle ({key!r})", "data.path")
    count = int(np.prod(shape))
    if not stream or fortran or not shape:
        data = np.frombuffer(member.read(count * dtype.itemsize), dtype=dtype, count=count)
        return data.reshape(shape, order="F" if fortran else "C").copy()
    out = scratch_array(shape, dtype)
    flat = out.reshape(-1)
    step = max(1, (16 << 20) // dtype.itemsize)  # 16 MiB a read
    for start in range(0, count, step):
        n = min(step, count - start)
        chunk = member.read(n * dtype.itemsize)
        if len(chunk) != n * dtype.itemsize:
            raise SpecError(f"{str(path)!r}: array {key!r} is truncated", "data.path")
        flat[start:start + n] = np.frombuffer(chunk, dtype=dtype)
    out.flush()
    return out


def load_image_folder(*, image_size: int, val_fraction: float, seed: int, path: Path | None,
                      channels: int = 3) -> DataSplits:
    """Images in ``root/<class>/*.png|jpg|jpeg``; classes are the sorted folder names.
    A folder of images with no class folders is unlabelled data.

    If ``root`` holds exactly the folders ``train`` and ``val``, each laid out as above,
    those are the splits; otherwise the images are split by ``val_fraction``. Each image is
    read as RGB, centre-cropped to a square and resized bilinearly (Pillow antialiases when
    shrinking), by DataLoader workers, into a memory-mapped temporary file of uint8 pixels:
    the images are decoded once per compile and never held in RAM.
    """
    _check_common(image_size, val_fraction, channels)
    root = _require_path(path, "image-folder", want_dir=True)
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subdirs == {"train", "val"}:
        class_names = _class_folders(root / "train")
        train_files = _image_files(root / "train", class_names)
        val_files = _image_files(root / "val", class_names)
        extra = sorted(set(_class_folders(root / "val")) - set(class_names))
        if extra:
            raise SpecError(f"{str(root / 'val')!r} has classes missing from train: {extra}",
                            "data.path")
    elif not subdirs and _loose_images(root):
        class_names = []
        train_files, val_files = [(p, -1) for p in _loose_images(root)], []
    else:
        class_names = _class_folders(root)
        train_files, val_files = _image_files(root, class_names), []

    files = train_files + val_files
    images = scratch_array((len(files), 3, image_size, image_size))
    decode_into(images, _ImageFiles([file for file, _ in files], image_size))
    labels = np.array([label for _, label in files], dtype=np.int64) if class_names else None

    if val_files:
        train = np.arange(len(train_files))
        val = np.arange(len(train_files), len(files))
    else:
        train, val = _split(labels, val_fraction, seed, n=len(files))
    size = (image_size, channels)
    return DataSplits(*_convert(images, 1.0 / 255.0, labels, train, *size),
                      *_convert(images, 1.0 / 255.0, labels, val, *size),
                      num_classes=len(class_names), class_names=class_names,
                      name="image-folder")


class _ImageFiles(torch.utils.data.Dataset):
    """``(row, (3, size, size) uint8 pixels)`` of each file: what the DataLoader workers decode."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray]:
        return row, _read_image(self.files[row], self.size).transpose(2, 0, 1)


def _loose_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def load_cifar(*, image_size: int, val_fraction: float, seed: int, path: Path | None,
               channels: int = 3) -> DataSplits:
    """CIFAR-10 or CIFAR-100 in the "python version" layout; the test set is the val split.

    ``path`` is the folder holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
    (CIFAR-10) or ``train`` and ``test`` (CIFAR-100, fine labels), or the folder above
    ``cifar-10-batches-py`` / ``cifar-100-python``. Class names come from ``batches.meta`` /
    ``meta`` when present. ``val_fraction`` is not used: the official test set is the
    validation split. The pickles are read by an unpickler that only rebuilds NumPy arrays
    and plain Python values, never arbitrary objects.
    """
    _check_common(image_size, val_fraction, channels)
    root = _require_path(path, "cifar", want_dir=True)
    train_files, val_file, meta_file, names_key = _cifar_layout(root)

    # One pickle in memory at a time; the pixels go to memory-mapped scratch as uint8.
    images, labels = _cifar_pixels(train_files)
    val_images, val_labels = _cifar_pixels([val_file])

    class_names = None
    if meta_file.is_file():
        meta = _str_keys(_restricted_load(meta_file))
        if names_key in meta:
            class_names = [_as_str(name) for name in meta[names_key]]
    num_classes, class_names = _classes(np.concatenate([labels, val_labels]), class_names,
                                        str(root))

    size = (image_size, channels)
    return DataSplits(*_convert(images, 1.0 / 255.0, labels, None, *size),
                      *_convert(val_images, 1.0 / 255.0, val_labels, None, *size),
                      num_classes=num_classes, class_names=class_names,
                      name="cifar100" if names_key == "fine_label_names" else "cifar10")


def load_webdataset(*, image_size: int, val_fraction: float, seed: int, path: Path | None,
                    channels: int = 3) -> DataSplits:
    """WebDataset tar shards (how CC3M/LAION-style image sets are stored): ``path`` is one
    ``.tar`` or a folder of them (sorted by name).  A sample is the files of one key: an image
    (``.jpg``/``.jpeg``/``.png``/``.webp``) and optionally ``.cls`` (an integer label; all
    samples or none).  The shards are listed once to count the samples, then decoded by
    DataLoader workers (the ``webdataset`` library, shards split across workers) into a
    memory-mapped temporary file, and split by ``val_fraction``.
    """
    _check_common(image_size, val_fraction, channels)
    if path is None:
        raise SpecError("source 'webdataset' needs a path (a .tar shard or a folder of them)", "data.path")
    path = Path(path)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not shards or not all(p.is_file() for p in shards):
        raise SpecError(f"{str(path)!r} is not a .tar shard or a folder holding .tar shards", "data.path")
    rows = _webdataset_rows(shards)
    if not rows:
        raise SpecError(f"no images found in the shards under {str(path)!r} (looked for .jpg, .jpeg, .png, .webp)",
                        "data.path")
    images = scratch_array((len(rows), 3, image_size, image_size))
    labels = np.full(len(rows), -1, dtype=np.int64)
    seen = np.zeros(len(rows), dtype=bool)
    for row, pixels, label in _decode_shards(shards, rows, image_size):
        images[row], labels[row], seen[row] = pixels, label, True
    images.flush()
    if not seen.all():
        raise SpecError(f"{int((~seen).sum())} samples of {str(path)!r} could not be decoded", "data.path")
    labelled = labels >= 0
    if labelled.any() and not labelled.all():
        raise SpecError(f"{str(path)!r}: {int((~labelled).sum())} of {len(rows)} samples have no .cls label; "
                        "label all samples or none", "data.path")
    labels_or_none = labels if labelled.all() else None
    train, val = _split(labels_or_none, val_fraction, seed, n=len(rows))
    num_classes, class_names = _classes(labels_or_none, None, str(path))
    size = (image_size, channels)
    return DataSplits(*_convert(images, 1.0 / 255.0, labels_or_none, train, *size),
                      *_convert(images, 1.0 / 255.0, labels_or_none, val, *size),
                      num_classes=num_classes, class_names=class_names, name="webdataset")


_WDS_IMAGES = (".jpg", ".jpeg", ".png", ".webp")


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (key, extension): at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _webdataset_rows(shards: list[Path]) -> dict[tuple[str, str], int]:
    """(shard, sample key) -> row, in shard and member order, for every sample with an image."""
    import tarfile

    rows: dict[tuple[str, str], int] = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:  # headers only: nothing is extracted
                    key, ext = _sample_key(member.name)
                    if member.isfile() and ext in _WDS_IMAGES and (str(shard), key) not in rows:
                        rows[(str(shard), key)] = len(rows)
        except (OSError, tarfile.TarError) as exc:
            reason = str(exc).splitlines()[0].rstrip(":")
            raise SpecError(f"cannot read the shard {str(shard)!r}: not a readable tar archive ({reason})",
                            "data.path") from exc
    return rows


class _ShardSamples(torch.utils.data.IterableDataset):
    """(row, (3, size, size) uint8, label) of every sample, read with the webdataset library;
    each DataLoader worker takes its own shards."""

    def __init__(self, shards: list[Path], rows: dict[tuple[str, str], int], size: int):
        self.shards, self.rows, self.size = [str(p) for p in shards], rows, size

    def __iter__(self):
        import webdataset as wds

        dataset = wds.WebDataset(self.shards, shardshuffle=False, empty_check=False,
                                 workersplitter=wds.split_by_worker, nodesplitter=None).decode("pil")
        for sample in dataset:
            url = sample.get("__url__")
            key = sample.get("__key__")
            image = next((sample[ext[1:]] for ext in _WDS_IMAGES if ext[1:] in sample), None)
            if image is None or (url, key) not in self.rows:
                continue
            label = sample.get("cls", -1)
            if isinstance(label, (bytes, str)):
                label = int(label)
            yield self.rows[(url, key)], _square_pixels(image, self.size).transpose(2, 0, 1), int(label)


def _decode_shards(shards: list[Path], rows: dict[tuple[str, str], int], size: int):
    from torch.utils.data import DataLoader

    from distillc.plugins.image_store import workers

    loader = DataLoader(_ShardSamples(shards, rows, size), batch_size=None,
                        num_workers=min(workers(), len(shards)))
    try:
        yield from loader
    except ValueError as exc:  # a .cls that is not an integer
        raise SpecError(f"a .cls label in the shards is not an integer: {exc}", "data.path") from exc


Loader = Callable[..., DataSplits]

DATASETS: dict[str, Loader] = {
    "sklearn-digits": load_sklearn_digits,
    "npz": load_npz,
    "image-folder": load_image_folder,
    "cifar": load_cifar,
    "webdataset": load_webdataset,
}
"""Built-in data sources by the name a spec's ``data.source`` uses."""


def load_dataset(source: str, *, image_size: int, val_fraction: float, seed: int,
                 path: Path | None = None, channels: int = 3) -> DataSplits:
    """Load a built-in source by name; an unknown name raises SpecError with the choices."""
    if source not in DATASETS:
        raise SpecError(f"unknown data source {source!r}; valid: {', '.join(sorted(DATASETS))}",
                        "data.source")
    return DATASETS[source](image_size=image_size, val_fraction=val_fraction, seed=seed,
                            path=None if path is None else Path(path), channels=channels)


# ---------------------------------------------------------------------------------------
# Helpers: checks, conversion, splitting
# ---------------------------------------------------------------------------------------

def _check_common(image_size: int, val_fraction: float, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise SpecError(f"must be a positive integer, got {image_size!r}", "data.image_size")
    if not 0.0 <= val_fraction < 1.0:
        raise SpecError(f"must be in [0, 1), got {val_fraction!r}", "data.val_fraction")
    if not isinstance(channels, int) or channels < 1:
        raise SpecError(f"must be a positive integer, got {channels!r}", "data.channels")


def _require_path(path: Path | None, source: str, *, want_dir: bool) -> Path:
    if path is None:
        raise SpecError(f"source {source!r} needs a path", "data.path")
    path = Path(path)
    if want_dir and not path.is_dir():
        raise SpecError(f"{str(path)!r} is not a folder (source {source!r} reads a folder)",
                        "data.path")
    if not want_dir and not path.is_file():
        raise SpecError(f"{str(path)!r} is not a file (source {source!r} reads one file)",
                        "data.path")
    return path


def _numeric_images(array: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """Check an image array and return it as (N, C, H, W) with the scale that maps it to [0, 1]."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if not (array.shape[1] <= 4 < array.shape[3]):
            array = array.transpose(0, 3, 1, 2)  # channels-last, the NumPy/Pillow convention
    else:
        raise SpecError(f"{where}: images must have 3 or 4 dimensions, got shape {array.shape}",
                        "data.path")
    if len(array) == 0:
        raise SpecError(f"{where}: holds no images", "data.path")
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        low, high = (int(v) for v in value_range(array))
        if low < 0 or high > 255:
            raise SpecError(f"{where}: integer images must lie in 0..255, got {low}..{high}",
                            "data.path")
        return array, 1.0 / 255.0
    if np.issubdtype(array.dtype, np.floating):
        low, high = value_range(array)
        if not (low >= -1e-3 and high <= 1.0 + 1e-3):
            raise SpecError(f"{where}: float images must lie in [0, 1], got [{low:g}, {high:g}]",
                            "data.path")
        return array, 1.0
    raise SpecError(f"{where}: unsupported image dtype {array.dtype}", "data.path")


def _convert(images: np.ndarray, scale: float, labels: np.ndarray | None,
             index: np.ndarray | None, image_size: int,
             channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images and int64 labels (-1 when unlabelled) of the rows ``index`` (None: all).

    Images in a memory-mapped file stay there (an :class:`ImageArray` converts rows when read);
    images already in memory are converted once into a tensor.
    """
    if isinstance(images, np.memmap) or isinstance(getattr(images, "base", None), np.memmap):
        _check_channels(images.shape[1], channels)
        x = ImageArray(images, scale, image_size, channels, index)
    else:
        x = _to_float_images(images, scale, image_size, channels, index)
    if labels is None:
        y = torch.full((len(x),), -1, dtype=torch.int64)
    else:
        y = torch.from_numpy(np.ascontiguousarray(labels if index is None else labels[index]))
    return x, y.to(torch.int64)


def _to_float_images(images: np.ndarray, scale: float, image_size: int, channels: int,
                     index: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``index`` (None: all) of (N, C, H, W) numbers -> float32
    (n, channels, image_size, image_size) in [0, 1].

    Works in chunks, straight from the source array, so that only one chunk of float copies
    exists next to the result.
    """
    _check_channels(images.shape[1], channels)
    n = len(images) if index is None else len(index)
    out = torch.empty((n, channels, image_size, image_size), dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        rows = slice(start, start + _CHUNK) if index is None else index[start:start + _CHUNK]
        chunk = convert_rows(images, scale, image_size, channels, rows)
        out[start:start + len(chunk)] = chunk
    return out


def _check_channels(c_in: int, channels: int) -> None:
    if c_in != channels and c_in != 1 and not (c_in == 3 and channels == 1):
        raise SpecError(f"cannot turn {c_in}-channel images into {channels} channels "
                        f"(supported: same count, 1 -> any, 3 -> 1)", "data.channels")


def _labels(y: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise SpecError(f"{where}: labels must be integers, got {y.dtype}", "data.path")
    if len(y) != n:
        raise SpecError(f"{where}: {len(y)} labels for {n} images", "data.path")
    if n and y.min() < 0:
        raise SpecError(f"{where}: labels must be >= 0, got {int(y.min())}", "data.path")
    return y.astype(np.int64)


def _classes(labels: np.ndarray | None, names: list[str] | None,
             where: str) -> tuple[int, list[str]]:
    """Number of classes and their names; (0, []) for unlabelled data."""
    if labels is None:
        return 0, []
    count = int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        return count, [str(i) for i in range(count)]
    if count > len(names):
        raise SpecError(f"{where}: label {count - 1} but only {len(names)} class names",
                        "data.path")
    return len(names), names


def _split(labels: np.ndarray | None, val_fraction: float, seed: int,
           n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val indices; stratified per class when labels exist. Both sorted."""
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
        n_val = int(np.floor(n * val_fraction + 0.5))
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation: per-class quotas that add up to the rounded total.
    quotas = counts * val_fraction
    n_val = np.floor(quotas).astype(np.int64)
    short = int(np.floor(len(labels) * val_fraction + 0.5)) - int(n_val.sum())
    n_val[np.argsort(-(quotas - n_val), kind="stable")[:short]] += 1
    train, val = [], []
    for cls, k in zip(classes, n_val):
        members = rng.permutation(np.flatnonzero(labels == cls))
        val.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------------------------------
# Helpers: image folders
# ---------------------------------------------------------------------------------------

def _class_folders(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise SpecError(f"{str(root)!r} has no class folders (expected root/<class>/*.png)",
                        "data.path")
    return names


def _image_files(root: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(class_names):
        folder = root / name
        if folder.is_dir():
            files += [(p, label) for p in sorted(folder.iterdir())
                      if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise SpecError(f"no images found under {str(root)!r}/<class>/ "
                        f"(looked for {', '.join(_IMAGE_SUFFIXES)})", "data.path")
    return files


def _read_image(file: Path, size: int) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise SpecError("source 'image-folder' needs Pillow: pip install pillow",
                        "data.source") from exc
    try:
        with Image.open(file) as image:
            return _square_pixels(image, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise SpecError(f"cannot read image {str(file)!r}: {exc}", "data.path") from exc


def _square_pixels(image: Any, size: int) -> np.ndarray:
    """A Pillow image as (size, size, 3) uint8: RGB, centre-cropped square, resized bilinearly."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Helpers: CIFAR pickles
# ---------------------------------------------------------------------------------------

def _cifar_layout(root: Path) -> tuple[list[Path], Path, Path, str]:
    """Train batches, test batch, meta file and class-name key of a CIFAR folder."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (folder / "test_batch").is_file():  # CIFAR-10
            # data_batch_1 .. data_batch_5, ordered by number (and so data_batch_10 after 9)
            train = sorted(folder.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
            if not train:
                raise SpecError(f"{str(folder)!r} has test_batch but no data_batch_* files",
                                "data.path")
            return train, folder / "test_batch", folder / "batches.meta", "label_names"
        if (folder / "train").is_file() and (folder / "test").is_file():  # CIFAR-100
            return [folder / "train"], folder / "test", folder / "meta", "fine_label_names"
    raise SpecError(f"{str(root)!r} is not a CIFAR folder: expected data_batch_1..5 and "
                    f"test_batch (CIFAR-10) or train and test (CIFAR-100)", "data.path")


def _safe_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: NumPy array/scalar rebuilding and bytes."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }
    # NumPy 2 renamed numpy.core to numpy._core; pickles name whichever wrote them.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):  # Python 2 pickles say __builtin__
        for value in (set, frozenset, bytearray, complex):
            allowed[(module, value.__name__)] = value
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain Python values and NumPy arrays; refuses every other global."""

    _allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only NumPy arrays and plain Python "
                f"values are allowed") from None


def _restricted_load(file: Path) -> object:
    try:
        with open(file, "rb") as handle:
            # latin1 is how NumPy arrays pickled by Python 2 (the original CIFAR files) decode.
            return _RestrictedUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise SpecError(f"cannot read CIFAR pickle {str(file)!r}: {exc}", "data.path") from exc


def _cifar_pixels(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 3, 32, 32) uint8 images of ``files``, memory-mapped, and their labels."""
    labels = []
    with scratch_file("distillc-cifar-") as handle:
        for file in files:
            images, file_labels = _read_cifar_batch(file)
            handle.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
            labels.append(file_labels)
            del images
        handle.flush()
        n = sum(len(part) for part in labels)
        pixels = np.memmap(handle, dtype=np.uint8, mode="r", shape=(n, 3, 32, 32))
    return pixels, np.concatenate(labels)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: uint8 images (n, 3, 32, 32) and int64 labels (n,)."""
    batch = _str_keys(_restricted_load(file))
    data = batch.get("data")
    labels = batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or data.dtype != np.uint8:
        raise SpecError(f"{str(file)!r}: 'data' must be a uint8 array of shape (n, 3072)",
                        "data.path")
    if labels is None or len(labels) != len(data):
        raise SpecError(f"{str(file)!r}: needs 'labels' or 'fine_labels', one per image",
                        "data.path")
    labels = _labels(np.asarray(labels), len(data), str(file))
    return data.reshape(-1, 3, 32, 32), labels


def _str_keys(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise SpecError(f"a CIFAR pickle must hold a dict, found {type(obj).__name__}",
                        "data.path")
    return {_as_str(k): v for k, v in obj.items()}


def _as_str(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)
