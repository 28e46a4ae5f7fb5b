"""``detect.open-vocab``: a detection head on the student, boxes from seen classes, semantics from the teacher.

The pass puts :class:`~distillc.plugins.models.detection_head.DetectionHead` on one feature map of
the student (a ``G x G`` grid) and trains student and head on a detection source
(``digit-scenes``, ``coco-detection``): per cell an objectness, a box and a Matryoshka embedding.

- **Boxes** are learned from the training boxes, which hold the *seen* classes only.  A cell is a
  positive of a box when its centre lies in the box's central region (``center_radius`` of its
  width and height each side of the centre, at least half a cell, so the centre cell always is);
  a cell claimed by two boxes takes the smaller.  Objectness: focal loss over every cell (cells
  inside a crowd box are left out); box: L1 on (centre x, centre y, log w, log h) in cells.
- **Semantics come from the teacher, not from labels** (region distillation, as in ViLD): the
  frozen teacher embeds every training box's crop (square, ``margin`` of context, resized to
  its native input, antialiased), once, cached.  Those embeddings (unit length) define the embedding space:
  its basis is their top ``max(dims)`` principal directions (uncentred SVD), so the first ``d``
  coordinates are the best ``d``-dimensional summary of the teacher's region space, and every
  prefix is a Matryoshka embedding by construction.  Each positive cell's embedding prefix
  ``[:d]`` must point where the teacher's crop embedding points in those coordinates (cosine,
  mean over ``dims``).  No label enters this loss.
- **Class embeddings** are teacher embeddings of the class, in the same coordinates: ``text``
  (a CLIP teacher's text tower on the data's class names and ``prompts``), ``file`` (a ``.npy``
  of ``(classes, teacher width)``), or ``prototypes`` (default: the mean teacher embedding of
  ``shots`` labelled box crops per class, drawn from the validation split, seeded; those images
  are recorded in ``support_images`` and left out of ``eval.detection``).  They are stored INT8
  (``meta["detection"]``) and ``codegen.c`` writes them into the bundle with ``distillc_detect``.

A cell's class is the one with the highest cosine at dim ``d``; its score is
``sigmoid(objectness) * max(cosine, 0)``; decoding and NMS: :mod:`distillc.passes.detect.decode`.
``quantize.brevitas-qat`` keeps this objective (``qat_objective``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from distillc import distributed, hookimpl
from distillc.artifacts import TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassContext, PassResult
from distillc.passes.distill.base import Batch, DistillConfig, Objective, train_with_objective
from distillc.passes.distill.matryoshka import check_nested_dims
from distillc.passes.distill.prompts import check_prompts
from distillc.spec import LaxPath

#: Largest embedding width (keeps the C decoder's int32 dot products from overflowing).
MAX_DIM = 1024
#: Rows of the region embeddings the SVD basis is fitted on at most (a seeded sample beyond).
BASIS_ROWS = 65_536
#: Images whose box crops are embedded in one go.
_CROP_IMAGES = 64
#: Samples per crop pixel and side (averaged): antialiasing for boxes larger than the teacher's input.
_SUPERSAMPLE = 4


class OpenVocabConfig(DistillConfig):
    """Keys of ``detect.open-vocab``."""

    teacher: str = Field(description="a [[teachers]] entry: it embeds box crops (region distillation) and the classes")
    dims: list[int] = Field(min_length=1, description="nested embedding widths per cell, increasing (e.g. [16, 32, 64])")
    stage: int = Field(-1, ge=-16, le=16, description="the student feature map the head reads (forward_stages index)")
    hidden: int = Field(64, ge=1, le=4096, description="channels of the head's 3x3 convolution")
    margin: float = Field(0.0, ge=0.0, le=1.0, description="context around each box crop, a fraction of its side "
                                                           "(each side; 0 = the box's square)")
    center_radius: float = Field(0.25, gt=0.0, le=0.5,
                                 description="a cell is a box's positive within this fraction of its size of the centre")
    dense_weight: float = Field(0.0, ge=0.0, description="weight of dense distillation: every other cell's embedding "
                                                         "matches the teacher's crop around it (0 = off)")
    dense_size: float | None = Field(None, gt=0.0, le=4096.0, description="side in pixels of the dense crops; "
                                                                          "default the median training box side")
    box_weight: float = Field(1.0, ge=0.0, description="weight of the box loss")
    embed_weight: float = Field(1.0, ge=0.0, description="weight of the region-distillation loss")
    class_source: Literal["prototypes", "text", "file"] = Field(
        "prototypes", description="where class embeddings come from: labelled box crops, the teacher's text tower, a file")
    shots: int = Field(5, ge=1, le=10_000, description="labelled validation boxes per class for prototypes")
    prompts: list[str] | None = Field(None, min_length=1, max_length=256,
                                      description="templates with one '{}' for class_source = 'text'")
    class_file: LaxPath | None = Field(None, description="a .npy (classes, teacher width) for class_source = 'file'",
                                    exclude=True)
    score_threshold: float = Field(0.05, ge=0.0, le=1.0, description="default score threshold of the decoder")
    iou: float = Field(0.5, gt=0.0, le=1.0, description="NMS: a box overlapping a better one of its class by more goes")
    max_detections: int = Field(100, ge=1, le=10_000, description="detections per image at most")
    # class_file resolved against the spec's folder, and its content hash (which joins the key).
    _class_path: Path | None = PrivateAttr(None)
    _class_file_sha256: str | None = PrivateAttr(None)

    @field_validator("dims")
    @classmethod
    def _nested(cls, dims: list[int]) -> list[int]:
        return check_nested_dims(dims, MAX_DIM)

    @field_validator("prompts")
    @classmethod
    def _templates(cls, prompts: list[str] | None) -> list[str] | None:
        return check_prompts(prompts)

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> "OpenVocabConfig":
        if (self.class_file is not None) != (self.class_source == "file"):
            raise ValueError("class_file goes with class_source = 'file' (and it needs one)")
        if self.prompts is not None and self.class_source != "text":
            raise ValueError("prompts are read with class_source = 'text' only")
        root = (info.context or {}).get("spec_root")
        if self.class_file is not None and root is not None:
            path = (Path(root) / self.class_file).resolve()
            if not path.is_file():
                raise ValueError(f"class_file: no such file {str(path)[:200]!r}")
            self._class_path = path
            self._class_file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return self


class OpenVocabPass(Pass):
    """Put a detection head on the student and train it: boxes from seen classes, region embeddings from the teacher."""

    name = "detect.open-vocab"
    description = "detection head (objectness, box, Matryoshka embedding per cell), region-distilled from the teacher"
    takes = TorchModel
    makes = TorchModel
    uses_data = True
    tools = ("torch",)
    distributed = True
    Config = OpenVocabConfig

    @staticmethod
    def attach_head(backbone: Any, recipe: dict[str, Any]) -> Any:
        """Rebuild the head on a fresh backbone (``TorchModel.fresh_module``)."""
        from distillc.plugins.models.detection_head import attach_detection_head

        return attach_detection_head(backbone, recipe)

    @staticmethod
    def c_extension(meta: dict[str, Any], *, name: str, output_size: int, pass_name: str,
                    output: dict[str, Any] | None = None) -> Any:
        """``codegen.c`` asks every pass for C: ``distillc_detect`` with the class rows and decoder
        tables when the model carries ``meta["detection"]`` (:mod:`distillc.passes.detect.c_api`)."""
        info = meta.get("detection")
        if not info:
            return None
        from distillc.passes.detect.c_api import detection_extension

        return detection_extension(info, name=name, output_size=output_size, output=output, pass_name=pass_name)

    def teacher_requirements(self) -> dict[str, tuple[str, str]]:
        return {"class_source": (self.config.teacher, "tokenizer")} if self.config.class_source == "text" else {}

    def linked_key(self) -> dict[str, Any]:
        sha = self.config._class_file_sha256
        return {**super().linked_key(), **({"class_file_sha256": sha} if sha else {})}

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch

        from distillc.plugins.models.detection_head import attach_detection_head, feature_map_shape
        from distillc.training import count_params, pick_device, prepare

        cfg = self.config
        data = _detection_data(ctx, self.name)
        if artifact.head is not None:
            raise PassError(self.name, f"the student already has a {artifact.head.get('type')!r} head; "
                                       "the detection head goes on a bare student")
        device = pick_device()
        torch.manual_seed(ctx.seed)
        backbone = artifact.build(ctx.plugins)
        image_size = int(data.train_x.shape[-1])
        try:
            channels, rows, cols = feature_map_shape(backbone, image_size, int(data.train_x.shape[1]), cfg.stage)
        except Exception as exc:  # a student without maps, or a stage it does not have
            raise PassError(self.name, str(exc)) from None
        if rows != cols or image_size % rows:
            raise PassError(self.name, f"the feature map is {rows}x{cols} for a {image_size}-px image; the head needs "
                                       "a square grid that divides the image (choose another stage)")
        stride = image_size // rows
        regions = region_embeddings(ctx, cfg.teacher, data.train_x, data.train_boxes, margin=cfg.margin)
        if cfg.dims[-1] > regions.shape[1]:
            raise PassError(self.name, f"dims go up to {cfg.dims[-1]}, but the teacher's embedding has "
                                       f"{regions.shape[1]} values; the largest dim must not exceed it")
        basis = region_basis(regions, cfg.dims[-1], seed=ctx.seed)
        recipe = {"type": "detection", "pass": self.name, "stage": cfg.stage, "in_channels": channels,
                  "hidden": cfg.hidden, "embed_dim": cfg.dims[-1], "dims": list(cfg.dims), "grid": rows,
                  "stride": stride, "image_size": image_size}
        model = prepare(attach_detection_head(backbone, recipe), device).train()
        objective = self._objective(ctx, data, regions, basis, rows, stride)
        objective.setup(model, device)
        losses = train_with_objective(ctx, model, objective, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                      weight_decay=cfg.weight_decay, device=device, description=ctx.step_id)
        model = model.cpu().eval()
        classes, support = self.class_embeddings(ctx, data, basis)
        info = {"dims": list(cfg.dims), "classes": list(data.detection_classes), "seen": list(data.seen),
                "unseen": list(data.unseen), "grid": rows, "stride": stride, "image_size": image_size,
                "embed_dim": cfg.dims[-1], "class_source": cfg.class_source, "rows_int8": classes["values"].tolist(),
                "row_scales": [float(s) for s in classes["scales"]], "support_images": support,
                "score_threshold": cfg.score_threshold, "iou": cfg.iou, "max_detections": cfg.max_detections}
        meta = {**artifact.meta, "embed_dim": cfg.dims[-1], "detection": info, "distilled_by": self.name}
        out = TorchModel.from_module(model, role="student", arch=artifact.arch, options=artifact.options,
                                     meta=meta, head=recipe)
        from distillc.passes.distill.base import teacher_input_metrics

        metrics = {"loss": losses[-1], "first_loss": losses[0], "epoch_losses": losses, "params": count_params(model),
                   "head_params": count_params(model.head), "grid": [rows, cols], "stride": stride,
                   "train_boxes": int(len(data.train_boxes.labels)), "classes": len(data.detection_classes),
                   "class_bytes": int(classes["values"].size), **objective.metrics(),
                   **teacher_input_metrics(ctx, [cfg.teacher])}
        return PassResult(out, metrics)

    def qat_objective(self, ctx: PassContext, float_model: Any) -> "DetectionObjective":
        """The objective ``quantize.brevitas-qat`` keeps: the same losses on the quantized model."""
        cfg = self.config
        data = _detection_data(ctx, "quantize.brevitas-qat")
        recipe = getattr(float_model, "head_recipe", None) or {}
        regions = region_embeddings(ctx, cfg.teacher, data.train_x, data.train_boxes, margin=cfg.margin)
        basis = region_basis(regions, cfg.dims[-1], seed=ctx.seed)
        return self._objective(ctx, data, regions, basis, int(recipe["grid"]), int(recipe["stride"]))

    def _objective(self, ctx: PassContext, data: Any, regions: Any, basis: Any, grid: int,
                   stride: int) -> "DetectionObjective":
        cfg = self.config
        dense = None
        if cfg.dense_weight > 0:
            dense = region_embeddings(ctx, cfg.teacher, data.train_x, dense_boxes(len(data.train_x), grid, stride,
                                                                                  self.dense_side(data)),
                                      margin=0.0, what=f"dense:{grid}:{self.dense_side(data):g}")
        return DetectionObjective(ctx, assignment=assign_cells(data.train_boxes, grid, stride, cfg.center_radius),
                                  boxes=data.train_boxes.boxes, regions=regions, basis=basis, dims=cfg.dims,
                                  stride=stride, box_weight=cfg.box_weight, embed_weight=cfg.embed_weight,
                                  dense=dense, dense_weight=cfg.dense_weight)

    def dense_side(self, data: Any) -> float:
        """The side of the dense crops: ``dense_size``, else the median training box side (pixels)."""
        import numpy as np

        if self.config.dense_size is not None:
            return float(self.config.dense_size)
        b = data.train_boxes.boxes[~data.train_boxes.crowd]
        if len(b) == 0:
            return float(data.train_x.shape[-1]) / 4
        return float(np.round(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]))))

    def class_embeddings(self, ctx: PassContext, data: Any, basis: Any) -> tuple[dict[str, Any], list[int]]:
        """INT8 class rows in the region coordinates, and the validation images the prototypes came from."""
        import numpy as np
        import torch

        cfg = self.config
        names = list(data.detection_classes)
        support: list[int] = []
        if cfg.class_source == "text":
            from distillc.passes.distill.prompts import DEFAULT_PROMPTS, encode_classes

            teacher_space = encode_classes(ctx, cfg.teacher, names, cfg.prompts or list(DEFAULT_PROMPTS),
                                           pass_name=self.name)
        elif cfg.class_source == "file":
            teacher_space = _read_class_file(cfg._class_path or cfg.class_file, len(names), basis.shape[0], self.name)
        else:
            teacher_space, support = prototype_embeddings(ctx, cfg.teacher, data, shots=cfg.shots, margin=cfg.margin,
                                                          seed=ctx.seed, pass_name=self.name)
        t = torch.nn.functional.normalize(torch.as_tensor(np.asarray(teacher_space), dtype=torch.float64), dim=1)
        rows = (t @ basis.double()).numpy()
        return quantize_rows(rows), support


# -- data -----------------------------------------------------------------------------------------


def _detection_data(ctx: PassContext, pass_name: str) -> Any:
    data = ctx.data
    if getattr(data, "train_boxes", None) is None:
        raise PassError(pass_name, f"{data.name} has no boxes; detection needs a detection source "
                                   "([data] source = \"digit-scenes\" or \"coco-detection\")")
    return data


def assign_cells(boxes: Any, grid: int, stride: int, radius: float) -> Any:
    """Per image and cell, the box row it is a positive of, -1 (background) or -2 (inside a crowd
    box: no objectness loss); int32 ``(N, grid, grid)``, memory-mapped."""
    import numpy as np

    from distillc.plugins.image_store import scratch_array

    out = scratch_array((len(boxes), grid, grid), np.int32)
    centers = (np.arange(grid) + 0.5) * stride
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    for i in range(len(boxes)):
        start, stop = int(boxes.offsets[i]), int(boxes.offsets[i + 1])
        cell = np.full((grid, grid), -1, dtype=np.int32)
        if stop > start:
            b = boxes.boxes[start:stop].astype(np.float64)
            crowd = boxes.crowd[start:stop]
            inside = ((cx[None] >= b[:, 0, None, None]) & (cx[None] < b[:, 2, None, None])
                      & (cy[None] >= b[:, 1, None, None]) & (cy[None] < b[:, 3, None, None]))
            if crowd.any():
                cell[inside[crowd].any(axis=0)] = -2
            w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            bx, by = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            rx = np.maximum(radius * w, stride / 2)[:, None, None]
            ry = np.maximum(radius * h, stride / 2)[:, None, None]
            positive = (np.abs(cx[None] - bx[:, None, None]) <= rx) & (np.abs(cy[None] - by[:, None, None]) <= ry)
            positive &= ~crowd[:, None, None]
            area = np.where(positive, (w * h)[:, None, None], np.inf)
            best = area.argmin(axis=0)
            hit = np.isfinite(area.min(axis=0))
            cell[hit] = (start + best[hit]).astype(np.int32)
        out[i] = cell
    return out


def crops(images: Any, boxes: Any, size: int, margin: float) -> Any:
    """Square crops ``(k, C, size, size)`` around ``boxes`` (k, 4) of ``images`` (k, C, H, W) (each
    box with its own image), ``margin`` of context each side, bilinear from 4x4 samples per pixel (antialiased), zeros outside the image."""
    import torch
    import torch.nn.functional as F

    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    h, w = images.shape[-2:]
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) * (1.0 + 2.0 * margin)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = side / w
    theta[:, 1, 1] = side / h
    theta[:, 0, 2] = cx / w * 2 - 1
    theta[:, 1, 2] = cy / h * 2 - 1
    grid = F.affine_grid(theta, [len(boxes), images.shape[1], size * _SUPERSAMPLE, size * _SUPERSAMPLE],
                         align_corners=False)
    sampled = F.grid_sample(images.float(), grid.to(images.device), mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return F.avg_pool2d(sampled, _SUPERSAMPLE)  # antialiased: a box larger than the crop is averaged, not aliased


def _crop_size(ctx: PassContext, teacher: str, image_size: int) -> int:
    contract = ctx.teachers[teacher].meta.get("input")
    return int(contract["input_size"]) if contract else int(image_size)


def _embed_crops(module: Any, images: Any, boxes: Any, *, size: int, margin: float, device: Any,
                 batch: int = 256) -> Any:
    import numpy as np
    import torch

    from distillc.training import autocast

    out = []
    with torch.no_grad():
        for first in range(0, len(boxes), batch):
            x = crops(images[first:first + batch], boxes[first:first + batch], size, margin).to(device)
            with autocast(device):
                out.append(module.embed(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(module.embed_dim)), np.float32)


def region_embeddings(ctx: PassContext, teacher: str, images: Any, boxes: Any, *, margin: float,
                      what: str = "regions") -> Any:
    """The teacher's embedding of every box crop (rows of ``boxes``), computed once and cached
    (a memory-mapped ``.npy`` beside the teacher targets, keyed like them; ``what`` names which
    boxes: the training boxes, or ``dense:<side>`` for the cell-centred squares)."""
    import numpy as np
    import torch

    from distillc.passes.distill.base import open_targets, teacher_module
    from distillc.training import pick_device, prepare

    size = _crop_size(ctx, teacher, int(images.shape[-1]))
    key_fields = {"teacher": ctx.teacher_keys.get(teacher, teacher), "data": ctx.data_fingerprint,
                  "what": what, "margin": margin, "crop": size, "format": 2}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    folder = (ctx.derived_dir or ctx.scratch) / "teacher-targets"
    path = folder / f"{key}.npy"
    if distributed.agree(path.exists()):
        return open_targets(path)
    if distributed.is_main():
        device = pick_device()
        with torch.random.fork_rng(devices=[]):
            module = prepare(teacher_module(ctx, teacher), device)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}-{secrets.token_hex(4)}.npy.tmp"
        width = int(getattr(module, "embed_dim"))
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(boxes.labels), width))
        with ctx.progress.task(f"{ctx.step_id}: teacher embeds {'box' if what == 'regions' else 'cell'} crops", total=len(boxes), unit="image") as task:
            for first in range(0, len(boxes), _CROP_IMAGES):
                last = min(len(boxes), first + _CROP_IMAGES)
                start, stop = int(boxes.offsets[first]), int(boxes.offsets[last])
                if stop > start:
                    counts = np.diff(boxes.offsets[first:last + 1])
                    owner = torch.as_tensor(np.repeat(np.arange(last - first), counts))
                    x = torch.as_tensor(np.asarray(images[first:last]))[owner]
                    out[start:stop] = _embed_crops(module, x, boxes.boxes[start:stop], size=size, margin=margin,
                                                   device=device)
                task.advance(last - first)
        out.flush()
        del out
        (folder / f"{key}.json").write_text(json.dumps(key_fields, sort_keys=True, indent=1))
        os.replace(tmp, path)
    distributed.barrier()
    return open_targets(path)


def dense_boxes(images: int, grid: int, stride: int, side: float) -> Any:
    """For every image, one ``side``-pixel square centred on each cell (row-major): the regions of
    dense distillation, as :class:`~distillc.plugins.detection_data.Boxes` (labels -1)."""
    import numpy as np

    from distillc.plugins.detection_data import Boxes

    centers = (np.arange(grid) + 0.5) * stride
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    one = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=-1).reshape(-1, 4)
    cells = grid * grid
    return Boxes(np.tile(one, (images, 1)).astype(np.float32), np.full(images * cells, -1, np.int64),
                 np.zeros(images * cells, bool), np.arange(images + 1, dtype=np.int64) * cells)


def region_basis(regions: Any, width: int, *, seed: int) -> Any:
    """``(teacher width, width)`` float32: the top right-singular vectors of the unit region
    embeddings (uncentred), signs fixed so each column's largest entry is positive."""
    import torch

    n = len(regions)
    if n == 0:
        raise PassError("detect.open-vocab", "the training split has no boxes to distil from")
    rows = torch.as_tensor(regions)
    if n > BASIS_ROWS:
        rows = rows[torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:BASIS_ROWS]).values]
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    _, _, vh = torch.linalg.svd(unit, full_matrices=False)
    if vh.shape[0] < width:
        raise PassError("detect.open-vocab", f"{len(unit)} training boxes span at most {vh.shape[0]} directions of the "
                                             f"teacher's space; dims go up to {width}: use smaller dims or more data")
    basis = vh[:width].T.contiguous()
    peak = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[peak, torch.arange(basis.shape[1])])
    return (basis * torch.where(signs == 0, torch.ones_like(signs), signs)).float()


def prototype_embeddings(ctx: PassContext, teacher: str, data: Any, *, shots: int, margin: float, seed: int,
                         pass_name: str) -> tuple[Any, list[int]]:
    """Teacher-space prototypes ``(classes, width)``: the mean unit teacher embedding of ``shots``
    labelled validation box crops per class (seeded), and the validation images they came from."""
    import numpy as np
    import torch

    from distillc.passes.distill.base import teacher_module
    from distillc.training import pick_device, prepare

    boxes = data.val_boxes
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(boxes.labels))
    chosen: list[int] = []
    missing = []
    for c in range(len(data.detection_classes)):
        rows = [r for r in order if boxes.labels[r] == c and not boxes.crowd[r]][:shots]
        if not rows:
            missing.append(data.detection_classes[c])
        chosen += rows
    if missing:
        raise PassError(pass_name, f"no labelled validation box of class(es) {', '.join(map(str, missing[:10]))} to make "
                                   "a prototype from; use class_source = 'text' or 'file'")
    chosen_arr = np.asarray(sorted(chosen), dtype=np.int64)
    owner = np.searchsorted(boxes.offsets, chosen_arr, side="right") - 1
    device = pick_device()
    with torch.random.fork_rng(devices=[]):
        module = prepare(teacher_module(ctx, teacher), device).eval()
    images = torch.as_tensor(np.stack([np.asarray(data.val_x[int(i)]) for i in owner]))
    size = _crop_size(ctx, teacher, int(images.shape[-1]))
    emb = torch.nn.functional.normalize(torch.as_tensor(_embed_crops(module, images, boxes.boxes[chosen_arr], size=size,
                                                                     margin=margin, device=device)), dim=1)
    labels = torch.as_tensor(boxes.labels[chosen_arr])
    sums = torch.zeros(len(data.detection_classes), emb.shape[1]).index_add_(0, labels, emb)
    return (sums / torch.bincount(labels, minlength=len(sums)).clamp(min=1)[:, None]).numpy(), \
        sorted({int(i) for i in owner})


def _read_class_file(path: Path | None, classes: int, width: int, pass_name: str) -> Any:
    import numpy as np

    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PassError(pass_name, f"class_file {path}: not a .npy array ({exc})") from None
    if matrix.shape != (classes, width) or not np.isfinite(matrix).all():
        raise PassError(pass_name, f"class_file {path}: shape {matrix.shape}, expected ({classes}, {width}) finite values "
                                   "(one teacher-space embedding per class of the data)")
    return matrix.astype(np.float32)


def quantize_rows(rows: Any) -> dict[str, Any]:
    """Class rows, symmetric int8 per row (-127..127): ``{"values", "scales"}``."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    peak = np.abs(rows).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0)
    return {"values": np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8),
            "scales": scales.astype(np.float32)}


# -- objective ------------------------------------------------------------------------------------


class DetectionObjective(Objective):
    """Focal objectness over all cells, L1 boxes and per-prefix cosine to the teacher's region
    embedding at positive cells.  No training aids: ``heads`` is empty."""

    def __init__(self, ctx: PassContext, *, assignment: Any, boxes: Any, regions: Any, basis: Any, dims: list[int],
                 stride: int, box_weight: float, embed_weight: float, dense: Any = None, dense_weight: float = 0.0):
        super().__init__(ctx)
        import torch

        self.assignment = torch.as_tensor(assignment)
        self.boxes = torch.as_tensor(boxes, dtype=torch.float32)
        self.regions = regions
        self.basis = basis
        self.dims = list(dims)
        self.stride = stride
        self.box_weight = box_weight
        self.embed_weight = embed_weight
        self.dense = dense
        self.dense_weight = dense_weight
        self.heads = torch.nn.ModuleDict()
        self._parts = {"objectness": [0.0, 0], "box": [0.0, 0], "embedding": [0.0, 0], "dense": [0.0, 0]}

    def setup(self, student: Any, device: Any) -> None:
        self.device = device
        self.basis_on = self.basis.to(device)

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch
        import torch.nn.functional as F

        from distillc.plugins.models.detection_head import CENTER_X, EMBED, LOG_W, OBJECTNESS

        out = student(batch.x).float()  # (B, 5 + E, G, G)
        assign = self.assignment[batch.idx.cpu()].to(out.device)  # (B, G, G)
        valid = assign != -2
        positive = assign >= 0
        logits = out[:, OBJECTNESS]
        n_pos = max(int(positive.sum()), 1)
        objectness = sigmoid_focal_loss(logits[valid], positive[valid].float()) / n_pos
        self._track("objectness", objectness, len(batch.idx))
        total = objectness
        if self.dense is not None:
            total = total + self.dense_weight * self._dense_loss(out, batch.idx, ~positive)
        if not positive.any():
            return total
        b, gy, gx = positive.nonzero(as_tuple=True)
        rows = assign[b, gy, gx].cpu()
        box = self.boxes[rows].to(out.device)
        s = float(self.stride)
        target = torch.stack([(box[:, 0] + box[:, 2]) / (2 * s) - gx, (box[:, 1] + box[:, 3]) / (2 * s) - gy,
                              torch.log(((box[:, 2] - box[:, 0]) / s).clamp(min=1e-3)),
                              torch.log(((box[:, 3] - box[:, 1]) / s).clamp(min=1e-3))], dim=1)
        cell = out[b, :, gy, gx]  # (P, 5 + E)
        box_loss = F.l1_loss(cell[:, CENTER_X:LOG_W + 2], target)
        teacher = F.normalize(torch.as_tensor(self.regions[rows.numpy()]).to(out.device).float(), dim=1)
        coords = teacher @ self.basis_on
        embedding = cell[:, EMBED:]
        embed_loss = torch.stack([1 - F.cosine_similarity(embedding[:, :d], coords[:, :d], dim=1).mean()
                                  for d in self.dims]).mean()
        self._track("box", box_loss, len(rows))
        self._track("embedding", embed_loss, len(rows))
        return total + self.box_weight * box_loss + self.embed_weight * embed_loss

    def _dense_loss(self, out: Any, idx: Any, cells: Any) -> Any:
        """Cosine per prefix between each chosen cell's embedding and the teacher's crop around it."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        from distillc.plugins.models.detection_head import EMBED

        b, gy, gx = cells.nonzero(as_tuple=True)
        if len(b) == 0:
            return out.sum() * 0.0
        g = out.shape[-1]
        rows = (idx.cpu()[b.cpu()] * g * g + gy.cpu() * g + gx.cpu()).numpy()
        order = np.argsort(rows)  # memory-mapped rows read in file order
        teacher = torch.empty(len(rows), self.dense.shape[1])
        teacher[torch.as_tensor(order)] = torch.as_tensor(self.dense[rows[order]]).float()
        coords = F.normalize(teacher.to(out.device), dim=1) @ self.basis_on
        embedding = out[b, EMBED:, gy, gx]
        loss = torch.stack([1 - F.cosine_similarity(embedding[:, :d], coords[:, :d], dim=1).mean()
                            for d in self.dims]).mean()
        self._track("dense", loss, len(rows))
        return loss

    def _track(self, name: str, value: Any, n: int) -> None:
        part = self._parts[name]
        part[0] += float(value.detach()) * n
        part[1] += n

    def metrics(self) -> dict[str, Any]:
        return {f"{name}_loss": (total / count if count else None) for name, (total, count) in self._parts.items()}


def sigmoid_focal_loss(logits: Any, targets: Any, alpha: float = 0.25, gamma: float = 2.0) -> Any:
    """RetinaNet's focal loss, summed (Lin et al., 2017)."""
    import torch.nn.functional as F

    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * ce).sum()


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(OpenVocabPass)
