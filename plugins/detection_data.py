"""Detection data: images with boxes, for open-vocabulary detection (issue 13).

Two built-in sources return a :class:`DetectionSplits`, a :class:`~distillc.plugins.data.DataSplits`
with per-image boxes:

- ``digit-scenes``: scenes composed from scikit-learn's 8x8 digits (no download): 1-4 digits per
  scene at random sizes and positions, optional clutter and noise, deterministic by seed.  Some
  digit classes are *unseen*: their boxes never enter the training targets.
- ``coco-detection``: a folder of images with a COCO "instances" JSON (boxes, categories,
  ``iscrowd``), resized to ``image_size`` by letterbox or stretch, boxes transformed with them.

A scene holds several objects, so there is no label per image: ``train_y``/``val_y`` are -1 and
``num_classes`` is 0 (the image-level "unlabelled" of every other source; supervised passes refuse
it with their usual message).  The box classes are ``detection_classes``, split into ``seen`` and
``unseen`` class ids.  Boxes are (x0, y0, x1, y1) in pixels of the ``image_size`` image, x1/y1 the
far edges (a box over columns 3..5 is x0 = 3, x1 = 6), stored ragged (:class:`Boxes`).

Unseen classes, ViLD-style: training images may show unseen objects, unlabelled (``digit-scenes``
option ``unseen_in_train = "absent"`` keeps them out of the training scenes altogether); the
validation targets label every class, seen and unseen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from distillc.errors import SpecError, shown
from distillc.plugins.data import DataSplits, _check_common, _require_path, _split
from distillc.plugins.detection_options import CocoDetectionOptions, DigitScenesOptions
from distillc.plugins.image_store import ImageArray, scratch_array, workers
from distillc.validation import format_validation_error

#: A digit pixel darker than this (in [0, 1], after resizing) is background: it makes the boxes
#: tight (every box edge touches ink) and the canvas exactly 0 outside the boxes.
INK = 0.1


@dataclass(frozen=True, eq=False)
class Boxes:
    """Boxes of N images, ragged: image ``i``'s are rows ``offsets[i]:offsets[i + 1]``.

    ``boxes`` float32 (M, 4) as (x0, y0, x1, y1) pixels; ``labels`` int64 (M,) class ids;
    ``crowd`` bool (M,), COCO's ``iscrowd`` (a region of many objects: neither a target to hit
    nor a false positive to count); ``offsets`` int64 (N + 1,).
    """

    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        m = len(self.labels)
        if self.boxes.shape != (m, 4) or self.crowd.shape != (m,) or self.offsets.ndim != 1 \
                or self.offsets[0] != 0 or self.offsets[-1] != m or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"inconsistent Boxes: boxes {self.boxes.shape}, labels ({m},), "
                             f"crowd {self.crowd.shape}, offsets {self.offsets.shape}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (k, 4), labels (k,), crowd (k,)) of image ``i``."""
        rows = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.boxes[rows], self.labels[rows], self.crowd[rows]

    @classmethod
    def from_images(cls, images: Sequence[tuple[Any, ...]]) -> "Boxes":
        """From per-image ``(boxes, labels)`` or ``(boxes, labels, crowd)``."""
        boxes, labels, crowd, counts = [], [], [], [0]
        for item in images:
            b = np.asarray(item[0], dtype=np.float32).reshape(-1, 4)
            lab = np.asarray(item[1], dtype=np.int64).reshape(-1)
            c = np.asarray(item[2], dtype=bool).reshape(-1) if len(item) > 2 else np.zeros(len(lab), bool)
            boxes.append(b), labels.append(lab), crowd.append(c), counts.append(len(lab))
        return cls(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                   np.concatenate(labels) if labels else np.zeros(0, np.int64),
                   np.concatenate(crowd) if crowd else np.zeros(0, bool),
                   np.cumsum(counts).astype(np.int64))

    def select(self, index: Sequence[int]) -> "Boxes":
        """The boxes of images ``index``, in that order."""
        return Boxes.from_images([self.image(int(i)) for i in index])

    def without(self, classes: Sequence[int]) -> "Boxes":
        """These boxes less those of ``classes`` (how unseen classes leave the training targets)."""
        keep = ~np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))
        kept_before = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)  # kept rows before row r
        return Boxes(self.boxes[keep], self.labels[keep], self.crowd[keep], kept_before[self.offsets])


@dataclass(frozen=True, eq=False)
class DetectionSplits(DataSplits):
    """:class:`DataSplits` with boxes: ``train_boxes``/``val_boxes`` per image of each split.

    ``detection_classes`` names the box class ids; ``seen`` and ``unseen`` partition them.
    ``train_boxes`` holds seen classes only; ``val_boxes`` holds every class.
    """

    train_boxes: Boxes
    val_boxes: Boxes
    detection_classes: list[str]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]


def _options(model: type[BaseModel], options: dict[str, Any] | None) -> Any:
    try:
        return model.model_validate(options or {})
    except ValidationError as exc:
        raise SpecError("\n".join(format_validation_error(exc, model, prefix="data.options"))) from None


# ---------------------------------------------------------------------------------------
# digit-scenes
# ---------------------------------------------------------------------------------------

def load_digit_scenes(*, image_size: int, val_fraction: float, seed: int, path: Path | None = None,
                      channels: int = 3, options: dict[str, Any] | None = None) -> DetectionSplits:
    """Scenes of scikit-learn digits with their boxes; see the module docstring and docs/spec.md.

    The 1,797 source digits are split by ``val_fraction`` (stratified, seeded) first, so the
    validation scenes are drawn from digits the training scenes never show.
    """
    _check_common(image_size, val_fraction, channels)
    if path is not None:
        raise SpecError("digit-scenes is made from scikit-learn's digits and takes no path", "data.path")
    cfg = _options(DigitScenesOptions, options)
    smallest = cfg.digit_size[0] * image_size
    if smallest < 4:
        raise SpecError(f"digits at {cfg.digit_size[0]:g} of {image_size} px are {smallest:.1f} px, under 4 px; "
                        f"raise digit_size or data.image_size", "data.options.digit_size")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    train_pool, val_pool = _split(labels, val_fraction, seed)
    seen = tuple(d for d in range(10) if d not in cfg.unseen)
    unseen = tuple(cfg.unseen)
    if cfg.unseen_in_train == "absent":
        train_pool = train_pool[np.isin(labels[train_pool], seen)]

    n_val = int(np.floor(cfg.scenes * val_fraction + 0.5))
    n_train = cfg.scenes - n_val
    if n_train < 1 or n_val < 1:
        raise SpecError(f"{cfg.scenes} scenes at val_fraction {val_fraction:g} leave {n_train} for training "
                        f"and {n_val} for validation; give more scenes", "data.options.scenes")
    renderer = _SceneRenderer(pixels, labels, image_size, cfg)
    train_x, train_boxes = renderer.render(n_train, train_pool, np.random.default_rng([seed, 0]))
    val_x, val_boxes = renderer.render(n_val, val_pool, np.random.default_rng([seed, 1]))
    return DetectionSplits(
        ImageArray(train_x, 1.0 / 255.0, image_size, channels), torch.full((n_train,), -1, dtype=torch.int64),
        ImageArray(val_x, 1.0 / 255.0, image_size, channels), torch.full((n_val,), -1, dtype=torch.int64),
        num_classes=0, class_names=[], name="digit-scenes",
        train_boxes=train_boxes.without(unseen), val_boxes=val_boxes,
        detection_classes=[str(d) for d in range(10)], seen=seen, unseen=unseen)


class _SceneRenderer:
    """Draws scenes onto uint8 canvases; all randomness comes from the generator it is given."""

    ATTEMPTS = 30  # placements tried per digit before it is left out (the first always fits)

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, size: int, cfg: DigitScenesOptions):
        self.pixels, self.labels, self.size, self.cfg = pixels, labels, size, cfg

    def render(self, n: int, pool: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Boxes]:
        images = scratch_array((n, 1, self.size, self.size))
        per_image = []
        for row in range(n):
            canvas, boxes, labels = self._scene(pool, rng)
            images[row, 0] = np.rint(canvas * 255.0).astype(np.uint8)
            per_image.append((boxes, labels))
        images.flush()
        return images, Boxes.from_images(per_image)

    def _scene(self, pool: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list, list]:
        cfg, size = self.cfg, self.size
        canvas = np.zeros((size, size), dtype=np.float32)
        boxes: list[tuple[int, int, int, int]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(cfg.digits_per_scene[0], cfg.digits_per_scene[1] + 1))):
            source = int(rng.choice(pool))
            side = max(4, int(round(rng.uniform(*cfg.digit_size) * size)))
            box = self._place(canvas, self.pixels[source], side, boxes, rng)
            if box is not None:
                boxes.append(box)
                labels.append(int(self.labels[source]))
        digit_boxes = list(boxes)
        for _ in range(cfg.clutter):  # fragments: a quarter of some digit, small, away from the digits
            source = self.pixels[int(rng.choice(pool))]
            top, left = (int(v) for v in rng.integers(0, 5, size=2))
            side = max(2, int(round(rng.uniform(0.06, 0.14) * size)))
            self._place(canvas, source[top:top + 4, left:left + 4], side, digit_boxes, rng)
        if cfg.noise > 0:
            canvas = np.clip(canvas + rng.normal(0.0, cfg.noise, canvas.shape).astype(np.float32), 0.0, 1.0)
        return canvas, boxes, labels

    def _place(self, canvas: np.ndarray, digit: np.ndarray, side: int, avoid: list,
               rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """Draw ``digit`` at ``side`` px where its tight box misses every box in ``avoid``."""
        patch = _resize(digit, side)
        patch[patch < INK] = 0.0
        ys, xs = np.nonzero(patch)
        if len(ys) == 0:
            return None
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        for _ in range(self.ATTEMPTS):
            ox, oy = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
            box = (ox + x0, oy + y0, ox + x1, oy + y1)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in avoid):
                region = canvas[oy:oy + side, ox:ox + side]
                np.maximum(region, patch, out=region)
                return box
        return None


def _resize(digit: np.ndarray, side: int) -> np.ndarray:
    """A small grey image resized to ``side`` x ``side`` bilinearly (antialiased when shrinking)."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(digit, dtype=np.float32))[None, None]
    shrink = side < max(digit.shape)
    out = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].clamp(0.0, 1.0).numpy().copy()


# ---------------------------------------------------------------------------------------
# coco-detection
# ---------------------------------------------------------------------------------------

@dataclass
class _CocoSet:
    """One parsed instances JSON: its images (files, sizes) and their boxes in original pixels."""

    files: list[Path]
    sizes: list[tuple[int, int] | None]  # (width, height) the JSON states, if it does
    boxes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per image: xywh, category ids, crowd
    categories: list[tuple[int, str]]  # (COCO id, name), sorted by id


def load_coco_detection(*, image_size: int, val_fraction: float, seed: int, path: Path | None,
                        channels: int = 3, options: dict[str, Any] | None = None) -> DetectionSplits:
    """A COCO-format detection set: ``path`` holds the images and an instances JSON.

    Category ids (any integers) map to contiguous class ids in ascending id order, named by the
    categories' ``name``.  Images are resized to ``image_size`` by letterbox (aspect kept, centred
    on black) or stretch, by DataLoader workers into memory-mapped scratch, and their boxes go
    through the same transform (clipped to the image; boxes left with no area are dropped).
    """
    _check_common(image_size, val_fraction, channels)
    root = _require_path(path, "coco-detection", want_dir=True)
    cfg = _options(CocoDetectionOptions, options)
    train_json = _find_annotations(root, cfg.annotations)
    train_set = _read_coco(train_json, root / cfg.images, "data.options.annotations")
    val_set = None
    if cfg.val_annotations is not None:
        val_json = root / cfg.val_annotations
        if not val_json.is_file():
            raise SpecError(f"{shown(str(val_json))} is not a file", "data.options.val_annotations")
        val_set = _read_coco(val_json, root / (cfg.val_images or cfg.images), "data.options.val_annotations")
        if val_set.categories != train_set.categories:
            raise SpecError(f"{shown(str(val_json))}: its categories differ from {shown(str(train_json))}'s; "
                            f"both splits need the same (id, name) list", "data.options.val_annotations")
    class_ids = {coco_id: i for i, (coco_id, _) in enumerate(train_set.categories)}
    names = [name for _, name in train_set.categories]
    missing = sorted(set(cfg.unseen) - set(names))
    if missing:
        raise SpecError(f"no categories named {missing} in {shown(str(train_json))} (has: {shown(names)})",
                        "data.options.unseen")
    unseen = tuple(sorted(names.index(name) for name in cfg.unseen))
    seen = tuple(i for i in range(len(names)) if i not in unseen)

    sets = [train_set] + ([val_set] if val_set is not None else [])
    files = [f for s in sets for f in s.files]
    stated = [size for s in sets for size in s.sizes]
    raw_boxes = [b for s in sets for b in s.boxes]
    images = scratch_array((len(files), 3, image_size, image_size))
    actual = _decode_coco(images, files, image_size, cfg.resize)
    per_image = []
    for file, want, got, (xywh, cats, crowd) in zip(files, stated, actual, raw_boxes):
        if want is not None and tuple(want) != tuple(got):
            raise SpecError(f"{shown(str(file))} is {got[0]}x{got[1]} px but its JSON entry says "
                            f"{want[0]}x{want[1]}", "data.path")
        boxes = _transform_boxes(xywh, got, image_size, cfg.resize)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        per_image.append((boxes[keep], np.array([class_ids[c] for c in cats[keep]], dtype=np.int64), crowd[keep]))
    all_boxes = Boxes.from_images(per_image)

    if val_set is not None:
        train = np.arange(len(train_set.files))
        val = np.arange(len(train_set.files), len(files))
    else:
        train, val = _split(None, val_fraction, seed, n=len(files))
    return DetectionSplits(
        ImageArray(images, 1.0 / 255.0, image_size, channels, train), torch.full((len(train),), -1, dtype=torch.int64),
        ImageArray(images, 1.0 / 255.0, image_size, channels, val), torch.full((len(val),), -1, dtype=torch.int64),
        num_classes=0, class_names=[], name="coco-detection",
        train_boxes=all_boxes.select(train).without(unseen), val_boxes=all_boxes.select(val),
        detection_classes=names, seen=seen, unseen=unseen)


def _find_annotations(root: Path, given: str | None) -> Path:
    if given is not None:
        file = root / given
        if not file.is_file():
            raise SpecError(f"{shown(str(file))} is not a file", "data.options.annotations")
        return file
    found = sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
    if len(found) != 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found) or "none"
        raise SpecError(f"give the instances JSON: {shown(str(root))} and its annotations/ folder hold "
                        f"{len(found)} .json files ({listed}), not one", "data.options.annotations")
    return found[0]


def _read_coco(file: Path, images_dir: Path, key: str) -> _CocoSet:
    """Parse and check an instances JSON; every malformed entry is a SpecError naming file and key."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{shown(str(file))} is not a readable JSON file: {exc}", key) from None

    def bad(where: str, what: str) -> SpecError:
        return SpecError(f"{shown(str(file))}: {where}: {what}", key)

    if not isinstance(doc, dict):
        raise bad("(top level)", f"must be an object with images, annotations and categories, got {type(doc).__name__}")
    for name in ("images", "annotations", "categories"):
        if not isinstance(doc.get(name), list):
            raise bad(name, "missing" if name not in doc else f"must be a list, got {type(doc[name]).__name__}")

    categories: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        cat_id, name = _field(cat, "id", int, f"categories[{i}]", bad), _field(cat, "name", str, f"categories[{i}]", bad)
        if cat_id in categories:
            raise bad(f"categories[{i}].id", f"duplicate category id {cat_id}")
        if name in categories.values():
            raise bad(f"categories[{i}].name", f"duplicate category name {name!r}")
        categories[cat_id] = name
    if not categories:
        raise bad("categories", "is empty; a detection set needs at least one category")

    rows: dict[int, int] = {}
    files, sizes = [], []
    for i, image in enumerate(doc["images"]):
        where = f"images[{i}]"
        image_id = _field(image, "id", int, where, bad)
        if image_id in rows:
            raise bad(f"{where}.id", f"duplicate image id {image_id}")
        name = _field(image, "file_name", str, where, bad)
        width, height = image.get("width"), image.get("height")
        if (width is None) != (height is None):
            raise bad(where, "give both width and height or neither")
        if width is not None:
            for dim, value in (("width", width), ("height", height)):
                if type(value) is not int or value < 1:
                    raise bad(f"{where}.{dim}", f"must be a positive integer, got {shown(value)}")
        file_path = images_dir / name
        if not file_path.is_file():
            raise bad(f"{where}.file_name", f"no image at {shown(str(file_path))}")
        rows[image_id] = len(files)
        files.append(file_path)
        sizes.append(None if width is None else (width, height))
    if not files:
        raise bad("images", "is empty")

    per_row: list[list[tuple[list[float], int, bool]]] = [[] for _ in files]
    for i, ann in enumerate(doc["annotations"]):
        where = f"annotations[{i}]"
        image_id = _field(ann, "image_id", int, where, bad)
        cat_id = _field(ann, "category_id", int, where, bad)
        if image_id not in rows:
            raise bad(f"{where}.image_id", f"no image with id {image_id}")
        if cat_id not in categories:
            raise bad(f"{where}.category_id", f"no category with id {cat_id}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox)
                and all(math.isfinite(v) for v in bbox)):
            raise bad(f"{where}.bbox", f"must be 4 numbers [x, y, width, height], got {shown(bbox)}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise bad(f"{where}.bbox", f"width and height must be >= 0, got {shown(bbox)}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or type(crowd) not in (int, bool):
            raise bad(f"{where}.iscrowd", f"must be 0 or 1, got {shown(crowd)}")
        per_row[rows[image_id]].append((bbox, cat_id, bool(crowd)))
    boxes = [(np.array([b for b, _, _ in anns], dtype=np.float64).reshape(-1, 4),
              np.array([c for _, c, _ in anns], dtype=np.int64),
              np.array([k for _, _, k in anns], dtype=bool)) for anns in per_row]
    return _CocoSet(files, sizes, boxes, sorted(categories.items()))


def _field(entry: Any, name: str, kind: type, where: str, bad: Any) -> Any:
    if not isinstance(entry, dict):
        raise bad(where, f"must be an object, got {type(entry).__name__}")
    if name not in entry:
        raise bad(f"{where}.{name}", "missing")
    value = entry[name]
    if type(value) is not kind:  # bool is not an int id
        raise bad(f"{where}.{name}", f"must be {'an integer' if kind is int else 'a string'}, got {shown(value)}")
    return value


def _transform_boxes(xywh: np.ndarray, size: tuple[int, int], image_size: int, resize: str) -> np.ndarray:
    """COCO [x, y, w, h] in the original image -> (x0, y0, x1, y1) in the resized one.

    Clipped to the original image first, so a box never reaches into the letterbox bars."""
    width, height = size
    sx, sy, ox, oy = _geometry(width, height, image_size, resize)
    x0 = np.clip(xywh[:, 0], 0, width)
    y0 = np.clip(xywh[:, 1], 0, height)
    x1 = np.clip(xywh[:, 0] + xywh[:, 2], 0, width)
    y1 = np.clip(xywh[:, 1] + xywh[:, 3], 0, height)
    return np.stack([x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy], axis=1).reshape(-1, 4).astype(np.float32)


def _geometry(width: int, height: int, image_size: int, resize: str) -> tuple[float, float, int, int]:
    """(x scale, y scale, x offset, y offset) of the resize: the one the pixels and boxes share."""
    if resize == "stretch":
        return image_size / width, image_size / height, 0, 0
    scale = image_size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return new_w / width, new_h / height, (image_size - new_w) // 2, (image_size - new_h) // 2


class _CocoImages(torch.utils.data.Dataset):
    """``(row, (3, size, size) uint8, (width, height))`` of each file, for the DataLoader workers."""

    def __init__(self, files: list[Path], size: int, resize: str):
        self.files, self.size, self.resize = files, size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray, tuple[int, int]]:
        from PIL import Image, UnidentifiedImageError

        file = self.files[row]
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            return row, np.zeros((3, self.size, self.size), np.uint8), (0, str(exc))
        width, height = image.size
        sx, sy, ox, oy = _geometry(width, height, self.size, self.resize)
        new_w, new_h = round(width * sx), round(height * sy)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        canvas = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        canvas[oy:oy + new_h, ox:ox + new_w] = np.asarray(image, dtype=np.uint8)
        return row, canvas.transpose(2, 0, 1), (width, height)


def _decode_coco(out: np.ndarray, files: list[Path], size: int, resize: str) -> list[tuple[int, int]]:
    """Decode every file into ``out`` (workers); return each image's original (width, height)."""
    from torch.utils.data import DataLoader

    sizes: list[Any] = [None] * len(files)
    loader = DataLoader(_CocoImages(files, size, resize), batch_size=64, num_workers=workers(),
                        collate_fn=_as_list)
    for batch in loader:
        for row, pixels, wh in batch:
            if wh[0] == 0:  # a worker could not read it: say which file, in the main process
                raise SpecError(f"cannot read image {shown(str(files[row]))}: {wh[1]}", "data.path")
            out[row], sizes[row] = pixels, wh
    out.flush()
    return sizes


def _as_list(items: list) -> list:
    return items
