"""``eval.detection``: detection mAP by COCO's own evaluation (``pycocotools``), per Matryoshka dim.

:func:`detection_map` scores boxes a model predicted against the ground truth a detection source
gives (:class:`distillc.plugins.detection_data.Boxes`), and reports COCO's mAP@[.5:.95] and
mAP@.5 over all classes, over the *seen* and the *unseen* classes separately (the open-vocabulary
split), and per class.  :func:`detection_map_per_dim` does that for each Matryoshka dim of a
model that predicts per dim.

The pass :class:`DetectionEval` runs a model ``detect.open-vocab`` made (float, or quantized by
``quantize.brevitas-qat``: its output is then on the INT8 grid the bundle computes) over the
validation images, decodes every dim with the class embeddings the bundle holds
(:func:`distillc.passes.detect.decode.decode_float`) and reports mAP per dim, seen and unseen.
The validation images the class prototypes came from (``support_images``) are left out.  Beside
it, the same boxes scored against random class embeddings (seeded Gaussian rows, INT8 like the
real ones): the baseline an open-vocabulary detector must beat on the unseen classes.

Conventions: boxes are (x0, y0, x1, y1) in pixels with x1/y1 the far edges (COCO's [x, y, w, h]
is (x0, y0, x1 - x0, y1 - y0)).  A class's AP is COCO's: 101-point interpolated precision,
greedy matching by score at each IoU threshold 0.50, 0.55, .. 0.95, at most ``max_detections``
boxes per image (the best-scored), crowd boxes neither matched nor counted as misses.  The mAP
of a set of classes is the mean AP of its classes that have ground truth (classes without any
are left out, as COCO does); a set with none is None.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


def detection_map(predictions: Sequence[tuple[Any, Any, Any]], ground_truth: Any, classes: Sequence[str], *,
                  seen: Sequence[int] | None = None, unseen: Sequence[int] | None = None,
                  max_detections: int = 100) -> dict[str, Any]:
    """COCO mAP of ``predictions`` against ``ground_truth``.

    ``predictions``: per image, ``(boxes (k, 4), scores (k,), labels (k,))``, array-likes (numpy or
    torch).  ``ground_truth``: a :class:`~distillc.plugins.detection_data.Boxes` or, per image,
    ``(boxes, labels)`` / ``(boxes, labels, crowd)``.  ``classes`` names the class ids
    (``DetectionSplits.detection_classes``).  ``seen``/``unseen``: class ids for the split scores.

    Returns ``{"map", "map50"}`` (all classes), ``"seen"``/``"unseen"`` (each ``{"map", "map50"}``,
    when the ids were given), ``"per_class"`` (``{name: {"ap", "ap50"}}``, None without ground
    truth), ``"images"``, ``"boxes"`` (ground truth, crowd excluded) and ``"predictions"``.
    Values are fractions in 0..1.
    """
    gt = _ground_truth(ground_truth)
    if len(predictions) != len(gt):
        raise ValueError(f"{len(predictions)} images of predictions for {len(gt)} images of ground truth")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    num_classes = len(classes)
    for name, ids in (("seen", seen), ("unseen", unseen)):
        if ids is not None and any(not 0 <= int(c) < num_classes for c in ids):
            raise ValueError(f"{name} class ids must lie in 0..{num_classes - 1}, got {list(ids)}")

    ap, ap50 = _per_class_ap(_coco_predictions(predictions, num_classes), gt, num_classes, max_detections)
    result: dict[str, Any] = {"map": _mean(ap, range(num_classes)), "map50": _mean(ap50, range(num_classes))}
    for name, ids in (("seen", seen), ("unseen", unseen)):
        if ids is not None:
            result[name] = {"map": _mean(ap, ids), "map50": _mean(ap50, ids)}
    result["per_class"] = {str(name): {"ap": _value(ap[i]), "ap50": _value(ap50[i])} for i, name in enumerate(classes)}
    result["images"] = len(gt)
    result["boxes"] = int(sum(int((~crowd).sum()) for _, _, crowd in gt))
    result["predictions"] = int(sum(len(np.asarray(p[1]).reshape(-1)) for p in predictions))
    return result


def detection_map_per_dim(predictions: Mapping[int, Sequence[tuple[Any, Any, Any]]], ground_truth: Any,
                          classes: Sequence[str], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """:func:`detection_map` for each Matryoshka dim: ``{str(dim): result}``, dims ascending."""
    return {str(dim): detection_map(predictions[dim], ground_truth, classes, **kwargs)
            for dim in sorted(predictions)}


# -- helpers ------------------------------------------------------------------------------------


def _ground_truth(ground_truth: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes float64 (k, 4), labels int64 (k,), crowd bool (k,))."""
    if hasattr(ground_truth, "offsets") and hasattr(ground_truth, "image"):
        items = [ground_truth.image(i) for i in range(len(ground_truth))]
    else:
        items = list(ground_truth)
    out = []
    for i, item in enumerate(items):
        boxes = _array(item[0], np.float64, f"ground truth of image {i}: boxes").reshape(-1, 4)
        labels = _array(item[1], np.int64, f"ground truth of image {i}: labels").reshape(-1)
        crowd = (_array(item[2], bool, f"ground truth of image {i}: crowd").reshape(-1) if len(item) > 2
                 else np.zeros(len(labels), dtype=bool))
        if not len(boxes) == len(labels) == len(crowd):
            raise ValueError(f"ground truth of image {i}: {len(boxes)} boxes, {len(labels)} labels, {len(crowd)} crowd flags")
        out.append((boxes, labels, crowd))
    return out


def _coco_predictions(predictions: Sequence[tuple[Any, Any, Any]], num_classes: int) -> list[tuple[np.ndarray, ...]]:
    out = []
    for i, item in enumerate(predictions):
        if len(item) != 3:
            raise ValueError(f"predictions of image {i}: expected (boxes, scores, labels), got {len(item)} items")
        boxes = _array(item[0], np.float64, f"predictions of image {i}: boxes").reshape(-1, 4)
        scores = _array(item[1], np.float64, f"predictions of image {i}: scores").reshape(-1)
        labels = _array(item[2], np.int64, f"predictions of image {i}: labels").reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"predictions of image {i}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"predictions of image {i}: labels must lie in 0..{num_classes - 1}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"predictions of image {i}: boxes and scores must be finite")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(f"predictions of image {i}: boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
        out.append((boxes, scores, labels))
    return out


def _array(value: Any, dtype: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _per_class_ap(predictions: list, gt: list, num_classes: int, max_detections: int) -> tuple[np.ndarray, np.ndarray]:
    """AP@[.5:.95] and AP@.5 per class (NaN: no ground truth), from one COCOeval run."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1} for i in range(len(gt))]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    truth = [{"id": 0, "image_id": i + 1, "category_id": int(label) + 1, "bbox": _xywh(box),
              "area": float(_xywh(box)[2] * _xywh(box)[3]), "iscrowd": int(crowd)}
             for i, (boxes, labels, crowds) in enumerate(gt) for box, label, crowd in zip(boxes, labels, crowds)]
    found = [{"id": 0, "image_id": i + 1, "category_id": int(label) + 1, "bbox": _xywh(box), "score": float(score),
              "area": float(_xywh(box)[2] * _xywh(box)[3]), "iscrowd": 0}
             for i, (boxes, scores, labels) in enumerate(predictions)
             for box, score, label in zip(boxes, scores, labels)]
    for n, entry in enumerate(truth + found):  # ids start at 1: COCOeval treats id 0 as "no match"
        entry["id"] = n + 1
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": truth}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": found}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.params.maxDets = [max_detections]
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, 0]  # (IoU thresholds, recall points, classes)
    thresholds = evaluation.params.iouThrs
    ap = np.full(num_classes, np.nan)
    ap50 = np.full(num_classes, np.nan)
    for c in range(num_classes):
        table = precision[:, :, c]
        if (table > -1).any():  # -1: a class with no (non-crowd) ground truth
            ap[c] = float(table.mean())
            ap50[c] = float(table[int(np.argmin(np.abs(thresholds - 0.5)))].mean())
    return ap, ap50


def _xywh(box: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _mean(values: np.ndarray, ids: Any) -> float | None:
    picked = values[np.asarray(list(ids), dtype=np.int64)] if len(list(ids)) else np.array([])
    picked = picked[~np.isnan(picked)]
    return float(picked.mean()) if len(picked) else None


def _value(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# -- the pass -------------------------------------------------------------------------------------


class DetectionEval(Pass):
    name = "eval.detection"
    description = "mAP@0.5 and mAP@[.5:.95] per Matryoshka dim, seen and unseen classes, with a random-embedding baseline"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    uses_data = True
    tools = ("torch", "pycocotools")

    class Config(PassConfig):
        dims: list[int] | None = Field(None, description="dims to score (a subset of the model's); default all")
        score_threshold: float = Field(0.01, ge=0.0, le=1.0, description="lowest score kept (low: mAP wants the "
                                                                         "whole ranking)")
        iou: float | None = Field(None, gt=0.0, le=1.0, description="NMS IoU; default the model's")
        max_detections: int | None = Field(None, ge=1, le=10_000, description="per image; default the model's")
        baseline: bool = Field(True, description="also score random class embeddings (the chance baseline)")
        batch_size: int = Field(64, ge=1, le=65_536)

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        info = artifact.meta.get("detection")
        if not info:
            raise PassError(self.name, "the model has no detection head; put detect.open-vocab before eval.detection")
        data = ctx.data
        if getattr(data, "val_boxes", None) is None:
            raise PassError(self.name, f"{data.name} has no boxes; eval.detection needs a detection source")
        cfg = self.config
        dims = list(info["dims"]) if cfg.dims is None else list(cfg.dims)
        unknown = [d for d in dims if d not in info["dims"]]
        if unknown:
            raise PassError(self.name, f"dims {unknown} are not among the model's Matryoshka dims {info['dims']}")
        rows = np.asarray(info["rows_int8"], dtype=np.float32) * np.asarray(info["row_scales"], np.float32)[:, None]
        tables = {"model": rows}
        if cfg.baseline:
            rng = np.random.default_rng(ctx.seed)
            tables["random_classes"] = rng.standard_normal(rows.shape).astype(np.float32)
        support = set(int(i) for i in info.get("support_images", []))
        keep = np.asarray([i for i in range(len(data.val_boxes)) if i not in support], dtype=np.int64)
        if len(keep) == 0:
            raise PassError(self.name, "every validation image went into the class prototypes; none is left to score")
        iou = float(cfg.iou if cfg.iou is not None else info["iou"])
        max_out = int(cfg.max_detections if cfg.max_detections is not None else info["max_detections"])
        found = predict(artifact.build(ctx.plugins), data.val_x, keep, tables, dims, stride=int(info["stride"]),
                        image_size=int(info["image_size"]), score_threshold=cfg.score_threshold, iou=iou,
                        max_out=max_out, batch_size=cfg.batch_size)
        truth = data.val_boxes.select(keep)
        split = {"seen": list(info["seen"]), "unseen": list(info["unseen"])}
        classes = list(info["classes"])
        per_dim = {name: detection_map_per_dim(by_dim, truth, classes, max_detections=max_out, **split)
                   for name, by_dim in found.items()}
        top = str(dims[-1])
        result = per_dim["model"][top]
        metrics: dict[str, Any] = {
            "map50": result["map50"], "map": result["map"],
            "seen_map50": result["seen"]["map50"], "unseen_map50": result["unseen"]["map50"],
            "per_dim": {d: _summary(r) for d, r in per_dim["model"].items()},
            "per_class": result["per_class"], "images": len(keep), "boxes": result["boxes"],
            "support_images": len(support), "quantized": isinstance(artifact, QuantTorchModel),
            "dim": int(dims[-1]),
        }
        # Localisation alone: every box one class (NMS stayed per class, so a cell's duplicates of other
        # classes count as false positives here).
        agnostic = [(b, sc, np.zeros(len(lab), np.int64)) for b, sc, lab in found["model"][dims[-1]]]
        truth_agnostic = [(b, np.zeros(len(lab), np.int64), crowd) for b, lab, crowd in
                          (truth.image(i) for i in range(len(truth)))]
        metrics["class_agnostic"] = {k: v for k, v in detection_map(agnostic, truth_agnostic, ["object"],
                                                                     max_detections=max_out).items()
                                     if k in ("map", "map50")}
        if cfg.baseline:
            metrics["random_classes"] = {d: _summary(r) for d, r in per_dim["random_classes"].items()}
        return PassResult(artifact, metrics)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"map": result["map"], "map50": result["map50"], "seen": result.get("seen"),
            "unseen": result.get("unseen"), "predictions": result["predictions"]}


def predict(model: Any, images: Any, index: Any, tables: dict[str, Any], dims: list[int], *, stride: int,
            image_size: int, score_threshold: float, iou: float, max_out: int,
            batch_size: int = 64) -> dict[str, dict[int, list]]:
    """Detections of ``model`` on ``images[index]``, per class table and dim: ``{table: {dim: [(boxes,
    scores, labels), ...]}}``, decoded a batch at a time (the maps never all sit in memory)."""
    import torch

    from distillc.passes.detect.decode import decode_float
    from distillc.training import autocast

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    out: dict[str, dict[int, list]] = {name: {d: [] for d in dims} for name in tables}
    with torch.no_grad():
        for first in range(0, len(index), batch_size):
            part = torch.as_tensor(index[first:first + batch_size])
            x = torch.as_tensor(np.asarray(images[part])).to(device)
            with autocast(device):
                maps = model(x).float().cpu().numpy()
            for name, rows in tables.items():
                for d in dims:
                    out[name][d] += [det.as_tuple() for det in decode_float(
                        maps, rows, d, stride=stride, image_size=image_size, score_threshold=score_threshold,
                        iou=iou, max_out=max_out)]
    return out


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(DetectionEval)
