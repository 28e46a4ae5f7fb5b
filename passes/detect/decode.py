"""From a detection map to boxes: the float decode (FP32 evaluation) and the integer decode that
the bundle's ``distillc_detect`` runs, bit for bit.

The map is the detection head's output ``(5 + E, G, G)`` (channel layout:
:mod:`distillc.plugins.models.detection_head`).  Each cell gives at most one detection: the
class whose embedding is most similar (cosine, at Matryoshka dim ``d``) to the cell's embedding
prefix, scored ``sigmoid(objectness) * max(cosine, 0)``.  Cells scoring at least the threshold are
decoded to boxes, sorted by score (ties: lower cell index first) and kept greedily unless a kept box
of the same class overlaps them by IoU above ``iou``; at most ``max_out`` are kept.

Integer decode (:func:`decode_int8`), on the int8 map ``q`` with the output's ``scale`` and
``zero_point``:

- three 256-entry tables indexed by ``q + 128`` (:func:`tables`, built once from the scale, zero
  point and stride, stored in flash): ``objectness_q15 = round(sigmoid(x) * 32767)``,
  ``center_q4 = round(x * stride * 16)`` and ``half_q4 = round(exp(x) * stride * 8)`` with
  ``x = (q - zero_point) * scale``; boxes are in 1/16 pixel (Q4);
- the cell's embedding ``v = q[5:5 + d] - zero_point`` (int32); class rows ``p_c`` are int8;
  ``dot = v . p_c[:d]``, ``cosine_q15 = min(32767, (dot * 32768) // isqrt(|v|^2 |p_c[:d]|^2))``
  (0 when ``dot <= 0``; ``isqrt`` the floor square root of the uint64 product);
- ``score_q15 = (objectness_q15 * cosine_q15) >> 15``; a cell is a candidate when
  ``score_q15 >= threshold_q``;
- box: ``cx = col * stride * 16 + center_q4[q_x]``, ``x0 = cx - half_q4[q_w]``, ``x1 = cx +
  half_q4[q_w]`` (likewise y), clamped to ``[0, image_size * 16]``;
- NMS: ``b`` is suppressed by a kept box ``a`` of its class when ``inter * 256 > iou_q8 * union``
  (``iou_q8 = round(iou * 256)``; areas in Q4 squared, int64).

Scores in Q15 are fractions of 32768; boxes divide by 16 to give pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from distillc.plugins.models.detection_head import CENTER_X, CENTER_Y, EMBED, LOG_H, LOG_W, OBJECTNESS

Q15 = 32767
BOX_FRACTION_BITS = 4  # boxes in 1/16 pixel
IOU_BITS = 8


@dataclass(frozen=True)
class Detections:
    """The detections of one image: ``boxes`` (k, 4) as (x0, y0, x1, y1) pixels, ``scores`` (k,),
    ``labels`` (k,) class ids, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.boxes, self.scores, self.labels


@dataclass(frozen=True)
class IntDetections:
    """``distillc_detect``'s output for one image: ``boxes`` int32 (k, 4) in 1/16 pixel, ``scores``
    int32 Q15, ``labels`` int32."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def to_float(self) -> Detections:
        return Detections(self.boxes.astype(np.float64) / (1 << BOX_FRACTION_BITS),
                          self.scores.astype(np.float64) / 32768.0, self.labels.astype(np.int64))


# -- float --------------------------------------------------------------------------------------


def decode_float(maps: Any, rows: Any, dim: int, *, stride: int, image_size: int, score_threshold: float,
                 iou: float, max_out: int) -> list[Detections]:
    """Detections of float maps ``(N, 5 + E, G, G)`` against class rows ``(K, >= dim)`` (cosine)."""
    maps = np.asarray(maps, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)[:, :dim]
    n, _, g, _ = maps.shape
    cells = maps.reshape(n, maps.shape[1], g * g)
    row, col = np.divmod(np.arange(g * g), g)
    norms = np.linalg.norm(rows, axis=1)
    out = []
    for i in range(n):
        c = cells[i]
        emb = c[EMBED:EMBED + dim].T  # (cells, dim)
        e_norm = np.linalg.norm(emb, axis=1)
        den = np.outer(e_norm, norms)
        cos = np.where(den > 0, emb @ rows.T / np.where(den > 0, den, 1.0), 0.0)
        label = cos.argmax(axis=1)
        best = np.maximum(cos[np.arange(len(cos)), label], 0.0)
        score = 1.0 / (1.0 + np.exp(-c[OBJECTNESS])) * best
        cx = (col + c[CENTER_X]) * stride
        cy = (row + c[CENTER_Y]) * stride
        hw = np.exp(np.clip(c[LOG_W], -20, 20)) * stride / 2
        hh = np.exp(np.clip(c[LOG_H], -20, 20)) * stride / 2
        boxes = np.clip(np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1), 0, image_size)
        keep = np.flatnonzero(score >= score_threshold)
        order = keep[np.lexsort((keep, -score[keep]))]
        chosen = _nms(boxes[order], label[order], lambda inter, union: inter > iou * union, max_out)
        picked = order[chosen]
        out.append(Detections(boxes[picked], score[picked], label[picked].astype(np.int64)))
    return out


# -- integer (the C decoder's reference) -------------------------------------------------------------


def tables(scale: float, zero_point: int, stride: int) -> dict[str, np.ndarray]:
    """The decoder's flash tables, indexed by ``q + 128``: ``objectness_q15`` (int16),
    ``center_q4`` and ``half_q4`` (int32)."""
    q = np.arange(-128, 128, dtype=np.float64)
    x = (q - int(zero_point)) * float(np.float32(scale))
    objectness = np.rint(Q15 / (1.0 + np.exp(-x))).astype(np.int16)
    center = np.rint(x * stride * (1 << BOX_FRACTION_BITS))
    half = np.rint(np.exp(np.clip(x, -30.0, 30.0)) * stride * (1 << (BOX_FRACTION_BITS - 1)))
    limit = 1 << 24  # far beyond any image; keeps Q4 arithmetic in int32
    return {"objectness_q15": objectness,
            "center_q4": np.clip(center, -limit, limit).astype(np.int32),
            "half_q4": np.clip(half, 0, limit).astype(np.int32)}


def row_norms_sq(rows: Any, dims: Sequence[int]) -> np.ndarray:
    """``|p_c[:d]|^2`` per dim and class, int64 ``(len(dims), K)`` (the C keeps them as int32)."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.stack([(rows[:, :d] ** 2).sum(axis=1) for d in dims])


def iou_q8(iou: float) -> int:
    return int(round(float(iou) * (1 << IOU_BITS)))


def cosine_q15(dot: int, embed_sq: int, row_sq: int) -> int:
    """``min(32767, dot * 32768 // isqrt(embed_sq * row_sq))``, 0 unless every term is positive."""
    if dot <= 0 or embed_sq <= 0 or row_sq <= 0:
        return 0
    return min(Q15, (dot << 15) // math.isqrt(embed_sq * row_sq))


def decode_int8(maps: Any, rows: Any, dims: Sequence[int], dim: int, *, zero_point: int, scale: float, stride: int,
                image_size: int, threshold_q: int, iou: float, max_out: int) -> list[IntDetections]:
    """What ``distillc_detect`` returns for each int8 map ``(N, 5 + E, G, G)`` (or flat), exactly."""
    if dim not in dims:
        raise ValueError(f"dim {dim} is not one of the Matryoshka dims {list(dims)}")
    rows = np.asarray(rows, dtype=np.int64)
    level = list(dims).index(dim)
    norms = row_norms_sq(rows, dims)[level]
    lut = tables(scale, zero_point, stride)
    embed = rows.shape[1]
    maps = np.asarray(maps).astype(np.int64)
    n = maps.shape[0]
    cells_per = maps.reshape(n, EMBED + embed, -1)
    g = int(round(math.sqrt(cells_per.shape[2])))
    limit = image_size << BOX_FRACTION_BITS
    out = []
    for i in range(n):
        c = cells_per[i]
        cand: list[tuple[int, int, int]] = []  # (score, cell, class)
        for cell in range(g * g):
            v = c[EMBED:EMBED + dim, cell] - int(zero_point)
            embed_sq = int((v * v).sum())
            dots = rows[:, :dim] @ v
            best_cos, best_class = -1, 0
            for k in range(len(rows)):
                cos = cosine_q15(int(dots[k]), embed_sq, int(norms[k]))
                if cos > best_cos:
                    best_cos, best_class = cos, k
            score = (int(lut["objectness_q15"][c[OBJECTNESS, cell] + 128]) * best_cos) >> 15
            if score >= threshold_q:
                cand.append((score, cell, best_class))
        cand.sort(key=lambda t: (-t[0], t[1]))
        boxes = np.zeros((len(cand), 4), dtype=np.int64)
        for j, (_, cell, _) in enumerate(cand):
            r, col = divmod(cell, g)
            cx = col * stride * 16 + int(lut["center_q4"][c[CENTER_X, cell] + 128])
            cy = r * stride * 16 + int(lut["center_q4"][c[CENTER_Y, cell] + 128])
            hw = int(lut["half_q4"][c[LOG_W, cell] + 128])
            hh = int(lut["half_q4"][c[LOG_H, cell] + 128])
            boxes[j] = [min(max(cx - hw, 0), limit), min(max(cy - hh, 0), limit),
                        min(max(cx + hw, 0), limit), min(max(cy + hh, 0), limit)]
        labels = np.asarray([t[2] for t in cand], dtype=np.int64)
        q8 = iou_q8(iou)
        chosen = _nms(boxes, labels, lambda inter, union: inter * 256 > q8 * union, max_out)
        out.append(IntDetections(boxes[chosen].astype(np.int32),
                                 np.asarray([cand[j][0] for j in chosen], dtype=np.int32),
                                 labels[chosen].astype(np.int32)))
    return out


def _nms(boxes: np.ndarray, labels: np.ndarray, overlaps: Any, max_out: int) -> list[int]:
    """Greedy per-class NMS over boxes already in rank order: the indices kept, at most ``max_out``."""
    kept: list[int] = []
    for j in range(len(boxes)):
        if len(kept) >= max_out:
            break
        b = boxes[j]
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        suppressed = False
        for k in kept:
            if labels[k] != labels[j]:
                continue
            a = boxes[k]
            w = min(a[2], b[2]) - max(a[0], b[0])
            h = min(a[3], b[3]) - max(a[1], b[1])
            inter = max(w, 0) * max(h, 0)
            union = (a[2] - a[0]) * (a[3] - a[1]) + area_b - inter
            if overlaps(inter, union):
                suppressed = True
                break
        if not suppressed:
            kept.append(j)
    return kept
