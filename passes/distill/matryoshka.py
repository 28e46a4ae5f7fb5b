"""``matryoshka``: a Matryoshka projection head on any student, and class embeddings per dimension.

The pass puts a linear head ``Linear(embed_dim -> max(dims))`` on the student and trains it so
that every nested prefix ``h[:d]`` (``d`` in ``dims``) is a usable embedding on its own
(Kusupati et al., 2022).  The head stays in the model: the exported student outputs the
``max(dims)``-wide embedding, and a device that can afford less reads only its first ``d``
entries.

Training objective (label-free): the head output's prefixes must each point where a target
embedding points, through one shared, nested linear map ``W`` (``W[:, :d] @ h[:d]``, the
weight-tied "MRL-E" form).  The target is the teacher's embedding when ``teacher`` is given,
else the student's own embedding of the clean image as it entered the pass; either is centered
(its mean over the training images removed), so the head spends its few dimensions on what
tells images apart rather than on the direction they all share.  ``W`` is a training aid and
leaves with the pass; by default only the head trains (``train_backbone = false``).

Class embeddings: the head's bias first absorbs the mean training embedding (embeddings come
out centered, at no run-time cost), then from labelled training images (``shots`` per class,
0 = all), the mean of the normalized head outputs per class: one ``(classes, max(dims))`` matrix
whose prefixes serve every dimension, scored by cosine.  It is stored INT8 (one scale per class
row, 4x smaller than FP32) in ``meta["matryoshka"]``, travels through QAT and export, and
``codegen.c`` writes it into the bundle (``src/distillc_classes.c``) with an integer
``distillc_classify``.  Zero-shot top-1 per dimension on the validation split is reported.

This module also holds what the other Matryoshka passes share: the config checks, the
objective, :class:`ClassEmbeddings` (quantization, scores, the integer reference of the C
classifier) and the C rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from distillc import distributed, hookimpl
from distillc.artifacts import TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassContext, PassResult
from distillc.passes.distill.base import Batch, DistillConfig, Objective, train_with_objective
from distillc.passes.distill.prompts import ClassPromptsConfig, encode_classes, teacher_tokenizer_requirement

#: Largest Matryoshka dimension: keeps the C classifier's int32 dot products from overflowing.
MAX_DIM = 8192
#: Fixed-point bits of the per-class multipliers of the C classifier (Q15).
MULTIPLIER_BITS = 15
CLASSES_SOURCE = "src/distillc_classes.c"


def check_nested_dims(dims: list[int], limit: int) -> list[int]:
    """``dims`` if they are Matryoshka widths: each in 1..``limit``, strictly increasing."""
    if any(d < 1 or d > limit for d in dims):
        raise ValueError(f"every dim must be in 1..{limit}")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError("dims must be strictly increasing (each prefix nests in the next)")
    return dims


class MatryoshkaConfig(DistillConfig, ClassPromptsConfig):
    """Keys shared by the passes that train a Matryoshka head (``classes``/``prompts``: see
    :mod:`~distillc.passes.distill.prompts`)."""

    dims: list[int] = Field(min_length=1, description="nested embedding widths, increasing (e.g. [16, 32, 64])")
    teacher: str | None = Field(None, description="a [[teachers]] entry whose embedding the head's prefixes match; "
                                                  "default: the student's own embedding")
    train_backbone: bool = Field(False, description="train the student with the head (else only the head trains)")
    shots: int = Field(0, ge=0, description="labelled training images per class for the class embeddings; 0 = all")
    augment: float = Field(0.0, ge=0.0, le=1.0, description="strength of the student's view augmentation")

    @field_validator("dims")
    @classmethod
    def _nested(cls, dims: list[int]) -> list[int]:
        return check_nested_dims(dims, MAX_DIM)

    @model_validator(mode="after")
    def _classes_need_a_teacher(self) -> "MatryoshkaConfig":
        if self.classes is not None and self.teacher is None:
            raise ValueError("classes are encoded by a teacher's text tower: give teacher (a CLIP teacher "
                             "with a tokenizer)")
        return self


class MatryoshkaPass(Pass):
    """Insert a Matryoshka head, train it, store class embeddings and report zero-shot top-1.

    Subclasses change where class embeddings come from (:meth:`class_embeddings`).
    """

    name = "matryoshka"
    description = "insert a Matryoshka head with nested dims, train it, store INT8 class prototypes per dim"
    takes = TorchModel
    makes = TorchModel
    uses_data = True
    tools = ("torch",)
    distributed = True  # under torchrun every rank trains its share of each batch (DDP)
    Config = MatryoshkaConfig
    #: Remove the targets' mean before training (off where the target space itself matters).
    center_targets: bool = True

    @staticmethod
    def c_extension(meta: dict[str, Any], *, name: str, output_size: int, pass_name: str) -> Any:
        """``codegen.c`` asks every pass for C to add to the bundle: the class embeddings and
        ``distillc_classify`` when the model carries them (``meta["matryoshka"]``)."""
        info = meta.get("matryoshka")
        if not info:
            return None
        return class_embeddings_extension(info, name=name, output_size=output_size, pass_name=pass_name)

    @staticmethod
    def attach_head(backbone: Any, recipe: dict[str, Any]) -> Any:
        """Rebuild the head this pass adds on a fresh backbone (``TorchModel.fresh_module``)."""
        from distillc.plugins.models.heads import attach_head

        return attach_head(backbone, recipe)

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch

        from distillc.plugins.models.heads import attach_head, matryoshka_head_spec
        from distillc.training import count_params, embed_all, pick_device, prepare

        cfg = self.config
        if artifact.head is not None:
            raise PassError(self.name, f"the student already has a {artifact.head.get('type')!r} head; "
                                       "a model takes one Matryoshka head")
        device = pick_device()
        torch.manual_seed(ctx.seed)
        backbone = artifact.build(ctx.plugins)
        in_dim = int(getattr(backbone, "embed_dim", 0) or artifact.meta.get("embed_dim") or 0)
        if in_dim < 1:
            raise PassError(self.name, f"the student ({artifact.arch}) does not say its embedding width (embed_dim)")
        spec = matryoshka_head_spec(in_dim, cfg.dims)
        model = attach_head(backbone, spec)
        if cfg.teacher is not None:
            from distillc.passes.distill.base import teacher_targets

            targets = teacher_targets(ctx, cfg.teacher, "embed", lambda m, b: m.embed(b))
        else:
            targets = embed_all(backbone, ctx.data.train_x)
        if self.centers_targets():
            targets = targets - targets.mean(0, keepdim=True)

        if cfg.train_backbone:
            trained, frozen = prepare(model, device).train(), None
        else:
            backbone.requires_grad_(False)
            frozen = prepare(backbone, device).eval()
            trained = model.head.to(device)
        objective = MatryoshkaObjective(ctx, dims=cfg.dims, targets=targets, augment=cfg.augment, frozen=frozen)
        objective.setup(trained, device)
        losses = train_with_objective(ctx, trained, objective, epochs=cfg.epochs, lr=cfg.lr,
                                      batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, device=device,
                                      description=ctx.step_id)
        model = model.cpu().eval().requires_grad_(True)

        metrics: dict[str, Any] = {"loss": losses[-1], "first_loss": losses[0], "epoch_losses": losses,
                                   "loss_per_dim": objective.dim_losses(),
                                   "params": count_params(model), "head_params": count_params(model.head)}
        if cfg.teacher is not None:
            from distillc.passes.distill.base import teacher_input_metrics

            metrics.update(teacher_input_metrics(ctx, [cfg.teacher]))
        meta = {**artifact.meta, "embed_dim": cfg.dims[-1], "backbone_embed_dim": in_dim,
                "matryoshka_dims": list(cfg.dims)}
        classes, class_metrics = self.class_embeddings(ctx, model, objective)
        if classes is not None:
            meta["matryoshka"] = classes.to_meta()
            metrics.update(classes.size_metrics())
            if ctx.data.labelled:
                metrics["zero_shot_top1"] = zero_shot_top1(model, ctx.data, classes, cfg.dims, self.name)
        metrics.update(class_metrics)
        out = TorchModel.from_module(model, role="student", arch=artifact.arch, options=artifact.options,
                                     meta=meta, head=spec)
        return PassResult(out, metrics)

    def qat_objective(self, ctx: PassContext, float_model: Any) -> "MatryoshkaObjective":
        """The objective ``quantize.brevitas-qat`` keeps when it borrows this pass's: the same
        nested loss on the quantized student (head included), against the same targets.

        ``float_model`` is the FP32 student with its head; without a teacher the targets are its
        backbone's embeddings, as they were for this pass.
        """
        from distillc.training import embed_all

        cfg = self.config
        if cfg.teacher is not None:
            from distillc.passes.distill.base import teacher_targets

            targets = teacher_targets(ctx, cfg.teacher, "embed", lambda m, b: m.embed(b))
        else:
            targets = embed_all(getattr(float_model, "backbone", float_model), ctx.data.train_x)
        if self.centers_targets():
            targets = targets - targets.mean(0, keepdim=True)
        return MatryoshkaObjective(ctx, dims=cfg.dims, targets=targets, augment=cfg.augment)

    def teacher_requirements(self) -> dict[str, tuple[str, str]]:
        """``classes`` need the teacher's tokenizer."""
        return teacher_tokenizer_requirement(self.config)

    def linked_key(self) -> dict[str, Any]:
        """A class-names file joins the key by its sha256."""
        return {**super().linked_key(), **self.config.classes_key()}

    def centers_targets(self) -> bool:
        """Whether the targets lose their mean: not when class embeddings come from the teacher's
        own space (``classes``), which the nested map must then reach as it is."""
        return self.center_targets and self.config.classes is None

    def class_embeddings(self, ctx: PassContext, model: Any,
                         objective: "MatryoshkaObjective") -> "tuple[ClassEmbeddings | None, dict[str, Any]]":
        """The class embeddings to store and any metrics about them.

        Here: with ``classes``, the teacher's text tower encodes them (prompt ensembles); else
        visual prototypes from labelled training images; none (logged) for unlabelled data.
        """
        cfg = self.config
        if cfg.classes is not None:
            teacher_space = encode_classes(ctx, cfg.teacher, cfg.class_names(), cfg.prompt_templates(),
                                           pass_name=self.name)
            return self.teacher_space_classes(ctx, objective, teacher_space, source="text")
        if not ctx.data.labelled:
            ctx.log("the data has no labels: no class embeddings stored, no zero-shot accuracy")
            return None, {}
        center_head(model, ctx.data.train_x)
        return visual_prototypes(model, ctx.data, shots=self.config.shots, seed=ctx.seed, dims=self.config.dims), {}


    def teacher_space_classes(self, ctx: PassContext, objective: "MatryoshkaObjective", teacher_space: Any, *,
                              source: str, names: list[str] | None = None) -> "tuple[ClassEmbeddings, dict[str, Any]]":
        """Class embeddings ``t_c`` in the teacher's space, ``(classes, D)``, brought into the head's
        through the nested map (``e_c = W^T t_c / |t_c|``, INT8, dot metric), with the teacher's own
        zero-shot top-1 on them (the student's ceiling) when the data has labels.

        The map goes with them (``teacher_map``), so ``eval.zero-shot`` can bring other class
        names into the same space later.
        """
        import numpy as np

        cfg = self.config
        if teacher_space.ndim != 2 or teacher_space.shape[1] != objective.target_dim:
            raise PassError(self.name, f"class embeddings of shape {tuple(teacher_space.shape)} do not fit teacher "
                                       f"{cfg.teacher!r}, whose embedding is {objective.target_dim} wide "
                                       f"(expected (classes, {objective.target_dim}))")
        data = ctx.data
        if data.labelled and teacher_space.shape[0] != data.num_classes:
            raise PassError(self.name, f"{teacher_space.shape[0]} class embeddings for {data.num_classes} classes "
                                       f"in the data")
        if names is None:
            names = cfg.class_names()
        if names is None:
            names = list(data.class_names) if data.labelled else [str(i) for i in range(teacher_space.shape[0])]
        unit = teacher_space / np.maximum(np.linalg.norm(teacher_space, axis=1, keepdims=True), 1e-12)
        nested_map = objective.nested_map.numpy()
        classes = ClassEmbeddings.quantize(unit @ nested_map, dims=cfg.dims, classes=names, metric="dot",
                                           source=source)
        classes.teacher_map = encode_teacher_map(nested_map, cfg.teacher, ctx.teacher_keys.get(cfg.teacher))
        metrics = {}
        if data.labelled:
            metrics["teacher_zero_shot_top1"] = teacher_top1(ctx, cfg.teacher, unit)
        return classes, metrics


def teacher_top1(ctx: PassContext, teacher: str, unit: Any) -> float:
    """The teacher's own zero-shot top-1 with unit class embeddings ``unit`` (its space)."""
    from distillc.passes.distill.base import teacher_module
    from distillc.training import embed_all

    images = embed_all(teacher_module(ctx, teacher), ctx.data.val_x, fn=lambda m, b: m.embed(b)).numpy()
    return float(((images @ unit.T).argmax(axis=1) == ctx.data.val_y.numpy()).mean())


def encode_teacher_map(nested_map: Any, teacher: str, teacher_key: str | None) -> dict[str, Any]:
    """The nested map ``W`` (``D x max(dims)``) as JSON: float32 bytes in base64."""
    import base64

    import numpy as np

    values = np.ascontiguousarray(nested_map, dtype="<f4")
    return {"teacher": teacher, "teacher_key": teacher_key, "shape": list(values.shape),
            "float32_base64": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_teacher_map(info: dict[str, Any]) -> Any:
    """The ``D x max(dims)`` float32 array :func:`encode_teacher_map` wrote."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(info["float32_base64"]), dtype="<f4").reshape(info["shape"]).copy()


# -- objective --------------------------------------------------------------------------------------


class MatryoshkaObjective(Objective):
    """Mean over ``dims`` of ``1 - cos(W[:, :d] @ h[:d], target)``, with one shared map ``W``.

    ``h`` is the head's output on the (optionally augmented) image; ``targets`` are the target
    embeddings of the clean training images, one row per image.  With ``frozen`` set, the model
    being trained is the head alone and ``frozen`` (the student, in eval mode, no gradients)
    computes its input.
    """

    def __init__(self, ctx: PassContext, *, dims: list[int], targets: Any, augment: float, frozen: Any = None):
        super().__init__(ctx)
        self.dims = list(dims)
        self.raw_targets = targets
        self.augment_strength = augment
        self.frozen = frozen
        self._epoch = -1
        self._sums: list[float] = [0.0] * len(dims)
        self._seen = 0

    def setup(self, student: Any, device: Any) -> None:
        import torch.nn.functional as F
        from torch import nn

        from distillc.plugins.augment import Augment

        self.targets = F.normalize(self.raw_targets.float(), dim=1)
        self.target_dim = int(self.targets.shape[1])
        self.heads = nn.ModuleDict({"map": nn.Linear(self.dims[-1], self.target_dim, bias=False)}).to(device)
        self.augment = Augment(strength=self.augment_strength, flip=False)

    @property
    def nested_map(self) -> Any:
        """The trained map ``W`` (``target_dim x max(dims)``), from the head's space to the target's."""
        return self.heads["map"].weight.detach().float().cpu()

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch

        x = self.augment(batch.x, batch.generator)
        if self.frozen is not None:
            with torch.no_grad():
                x = self.frozen(x)
        h = student(x)
        per_dim = matryoshka_losses(h.float(), self.heads["map"].weight.float(),
                                    self.targets[batch.idx].to(h.device), self.dims)
        self._track(batch, per_dim)
        return per_dim.mean()

    def _track(self, batch: Batch, per_dim: Any) -> None:
        if batch.epoch != self._epoch:  # report the last epoch's losses only
            self._epoch, self._sums, self._seen = batch.epoch, [0.0] * len(self.dims), 0
        values = per_dim.detach().float().cpu().tolist()
        self._sums = [s + v * len(batch.idx) for s, v in zip(self._sums, values)]
        self._seen += len(batch.idx)

    def dim_losses(self) -> dict[str, float]:
        """The last epoch's mean loss per dimension (``{"16": ..., "32": ...}``), over every rank's share."""
        seen, *sums = distributed.sum_all(self._seen, *self._sums)
        return {str(d): s / max(seen, 1) for d, s in zip(self.dims, sums)}


def matryoshka_losses(h: Any, weight: Any, target: Any, dims: list[int]) -> Any:
    """``1 - cos(W[:, :d] @ h[:d], target)`` averaged over the batch, one entry per ``d``."""
    import torch
    import torch.nn.functional as F

    return torch.stack([1.0 - F.cosine_similarity(F.linear(h[:, :d], weight[:, :d]), target, dim=1).mean()
                        for d in dims])


# -- class embeddings -------------------------------------------------------------------------------


@dataclass
class ClassEmbeddings:
    """One embedding per class in the head's space, INT8 with one scale per class row.

    ``values`` is ``(classes, max(dims))`` int8, real value ``values[c] * scales[c]``; the first
    ``d`` columns serve dimension ``d``.  ``metric`` says how a class scores an embedding ``e``
    at dimension ``d``: ``"cosine"`` (visual prototypes) divides ``e[:d] . p_c[:d]`` by
    ``|p_c[:d]|``; ``"dot"`` (teacher-space class embeddings mapped through the nested map, where
    the dot product ranks exactly as the teacher's cosine) does not.
    """

    dims: list[int]
    classes: list[str]
    values: Any
    scales: Any
    metric: str
    source: str
    #: The nested map from the head's space into the teacher's, for teacher-space class embeddings
    #: (:func:`encode_teacher_map`), else None.
    teacher_map: dict[str, Any] | None = None

    @classmethod
    def quantize(cls, matrix: Any, *, dims: list[int], classes: list[str], metric: str,
                 source: str) -> "ClassEmbeddings":
        """Quantize a float ``(classes, max(dims))`` matrix, symmetric per row to -127..127."""
        import numpy as np

        matrix = np.asarray(matrix, dtype=np.float32)
        peak = np.abs(matrix).max(axis=1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        values = np.clip(np.rint(matrix / scales[:, None]), -127, 127).astype(np.int8)
        return cls(dims=list(dims), classes=list(classes), values=values, scales=scales, metric=metric,
                   source=source)

    @classmethod
    def from_meta(cls, info: dict[str, Any]) -> "ClassEmbeddings":
        import numpy as np

        return cls(dims=list(info["dims"]), classes=list(info["classes"]),
                   values=np.asarray(info["prototypes_int8"], dtype=np.int8).reshape(len(info["classes"]), -1),
                   scales=np.asarray(info["prototype_scales"], dtype=np.float32), metric=info["metric"],
                   source=info.get("source", ""), teacher_map=info.get("teacher_map"))

    def to_meta(self) -> dict[str, Any]:
        """The JSON form kept in ``TorchModel.meta["matryoshka"]``."""
        return {"dims": list(self.dims), "classes": list(self.classes), "embed_dim": int(self.values.shape[1]),
                "metric": self.metric, "source": self.source, "prototypes_int8": self.values.tolist(),
                "prototype_scales": [float(s) for s in self.scales],
                **({"teacher_map": self.teacher_map} if self.teacher_map is not None else {})}

    @property
    def embed_dim(self) -> int:
        return int(self.values.shape[1])

    def size_metrics(self) -> dict[str, Any]:
        n = int(self.values.size)
        return {"classes": len(self.classes), "prototype_bytes": n, "prototype_fp32_bytes": 4 * n,
                "class_embeddings": self.source}

    def dequantized(self) -> Any:
        return self.values.astype("float32") * self.scales[:, None]

    def scores(self, embeddings: Any, dim: int) -> Any:
        """Float scores ``(N, classes)`` of embeddings ``(N, >= dim)`` at dimension ``dim``."""
        import numpy as np

        protos = self.dequantized()[:, :dim]
        scores = np.asarray(embeddings, dtype=np.float32)[:, :dim] @ protos.T
        if self.metric == "cosine":
            norms = np.linalg.norm(protos, axis=1)
            scores = scores * np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0)[None, :]
        return scores

    def multipliers(self) -> Any:
        """Q15 multipliers ``(len(dims), classes)`` that turn integer dot products into comparable
        scores: ``1 / |q_c[:d]|`` (cosine) or the row scale (dot), divided by the largest per dim."""
        import numpy as np

        rows = []
        for d in self.dims:
            if self.metric == "cosine":
                norms = np.linalg.norm(self.values[:, :d].astype(np.float64), axis=1)
                m = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)
            else:
                m = self.scales.astype(np.float64)
            top = m.max()
            rows.append(np.rint(m / top * (1 << MULTIPLIER_BITS)) if top > 0 else np.zeros_like(m))
        return np.asarray(rows, dtype=np.int64).astype(np.int32)

    def classify_int8(self, embeddings: Any, zero_point: int, dim: int) -> Any:
        """What the bundle's ``distillc_classify`` returns for int8 embeddings ``(N, embed_dim)``:
        the integer reference of the C code (-1 for a dim that is not one of ``dims``)."""
        import numpy as np

        embeddings = np.asarray(embeddings).reshape(len(embeddings), -1)
        if dim not in self.dims:
            return np.full(len(embeddings), -1, dtype=np.int64)
        level = self.dims.index(dim)
        acc = (embeddings[:, :dim].astype(np.int64) - int(zero_point)) @ self.values[:, :dim].astype(np.int64).T
        scores = acc * self.multipliers()[level].astype(np.int64)[None, :]
        return scores.argmax(axis=1)  # the first best class, as the C loop's strict '>' keeps it


def few_shot_indices(labels: Any, shots: int, seed: int) -> Any:
    """Indices of ``shots`` images per class (all with ``shots = 0``), a seeded choice."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        chosen.append(members if shots == 0 else members[:shots])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long)


def center_head(model: Any, images: Any) -> None:
    """Fold the mean embedding of ``images`` into the Matryoshka head's bias, so the model's
    embeddings come out centered (cosine prototypes then separate classes instead of all
    pointing the way every image points)."""
    import torch

    from distillc.training import embed_all

    with torch.no_grad():
        model.head.proj.bias -= embed_all(model, images).mean(0).to(model.head.proj.bias.device)


def visual_prototypes(model: Any, data: Any, *, shots: int, seed: int, dims: list[int]) -> ClassEmbeddings:
    """Mean normalized embedding of ``shots`` labelled training images per class (cosine metric)."""
    import torch
    import torch.nn.functional as F

    from distillc.training import embed_all

    idx = few_shot_indices(data.train_y, shots, seed)
    h = F.normalize(embed_all(model, data.train_x[idx]), dim=1)
    labels = data.train_y[idx]
    sums = torch.zeros(data.num_classes, h.shape[1]).index_add_(0, labels, h)
    counts = torch.bincount(labels, minlength=data.num_classes).clamp(min=1).unsqueeze(1)
    return ClassEmbeddings.quantize((sums / counts).numpy(), dims=dims, classes=list(data.class_names),
                                    metric="cosine", source="prototypes")


def zero_shot_top1(model: Any, data: Any, classes: ClassEmbeddings, dims: list[int],
                   pass_name: str) -> dict[str, float]:
    """Top-1 on the validation split per dimension (``{"16": 0.8, ...}``), fractions in 0..1."""
    from distillc.training import embed_all

    embeddings = embed_all(model, data.val_x).numpy()
    if embeddings.shape[1] != classes.embed_dim:
        raise PassError(pass_name, f"the model's embedding has {embeddings.shape[1]} values, its class embeddings "
                                   f"{classes.embed_dim}")
    if len(classes.classes) != data.num_classes:
        raise PassError(pass_name, f"the model has {len(classes.classes)} class embeddings, the data "
                                   f"{data.num_classes} classes")
    labels = data.val_y.numpy()
    return {str(d): float((classes.scores(embeddings, d).argmax(axis=1) == labels).mean()) for d in dims}


# -- C ----------------------------------------------------------------------------------------------


def class_embeddings_extension(info: dict[str, Any], *, name: str, output_size: int,
                               pass_name: str = "codegen.c") -> Any:
    """The bundle extension (a ``CExtension``) holding the class embeddings and
    ``distillc_classify``: ``src/distillc_classes.c`` and its declarations in the public header.

    ``info`` is ``meta["matryoshka"]``; the manifest gets it as ``class_embeddings``.
    """
    from distillc.passes.backend.codegen import CExtension

    classes = ClassEmbeddings.from_meta(info)
    if classes.embed_dim != output_size:
        raise PassError(pass_name, f"the model outputs {output_size} values but its Matryoshka class embeddings "
                                   f"are {classes.embed_dim} wide")
    flash = classes.values.size + 4 * (len(classes.classes) + len(classes.dims) * (len(classes.classes) + 1))
    flash += sum(len(n.encode()) + 1 + 4 for n in classes.classes)
    entry = {"classes": len(classes.classes), "embed_dim": classes.embed_dim, "dims": classes.dims,
             "metric": classes.metric, "source": classes.source, "flash_bytes": int(flash),
             "prototype_bytes": int(classes.values.size), "file": CLASSES_SOURCE}
    return CExtension(name="class_embeddings", declarations=_class_declarations(classes),
                      sources={CLASSES_SOURCE: _class_source(classes, name)}, manifest=entry,
                      flash_bytes=int(flash))


def _class_declarations(classes: ClassEmbeddings) -> str:
    n, dims = len(classes.classes), classes.dims
    return f"""/* Zero-shot classification with Matryoshka class embeddings (flash, src/distillc_classes.c).
 * The output is an embedding whose first d values (d in DISTILLC_MATRYOSHKA_DIMS) are an
 * embedding on their own; each class has one int8 row of DISTILLC_EMBED_DIM values
 * (real value = row[i] * distillc_class_prototype_scales[class]). */
#define DISTILLC_NUM_CLASSES {n}
#define DISTILLC_EMBED_DIM {classes.embed_dim}
#define DISTILLC_MATRYOSHKA_NUM_DIMS {len(dims)}
#define DISTILLC_MATRYOSHKA_DIMS {{{', '.join(str(d) for d in dims)}}}
#define DISTILLC_CLASS_METRIC_COSINE {1 if classes.metric == "cosine" else 0}

extern const int8_t distillc_class_prototypes[DISTILLC_NUM_CLASSES * DISTILLC_EMBED_DIM];
extern const float distillc_class_prototype_scales[DISTILLC_NUM_CLASSES];
extern const int32_t distillc_matryoshka_dims[DISTILLC_MATRYOSHKA_NUM_DIMS];
extern const char *const distillc_class_names[DISTILLC_NUM_CLASSES];

/* The class (0 .. DISTILLC_NUM_CLASSES - 1) whose embedding scores highest against the first
 * `dim` values of `embedding` (the model's int8 output), in integer arithmetic; ties go to the
 * lower class. `dim` must be one of DISTILLC_MATRYOSHKA_DIMS. Returns -1 for another dim or a
 * NULL embedding. */
int distillc_classify(const int8_t *embedding, int dim);
"""


def _class_source(classes: ClassEmbeddings, name: str) -> str:
    from distillc.passes.backend.codegen import _c_float

    n, width = len(classes.classes), classes.embed_dim
    rows = []
    for row in classes.values.tolist():
        for k in range(0, width, 24):
            rows.append("    " + ", ".join(str(v) for v in row[k:k + 24]) + ",")
    scales = ",\n".join(f"    {_c_float(s)}" for s in classes.scales.tolist())
    multipliers = classes.multipliers()
    mult_rows = ",\n".join("    " + ", ".join(str(int(v)) for v in row) for row in multipliers.tolist())
    names = ",\n".join(f'    "{_c_string(c)}"' for c in classes.classes)
    body = "\n".join(rows)
    ranking = ("1 / |row[:dim]| (cosine ranking)" if classes.metric == "cosine"
               else "the row's scale (dot-product ranking)")
    return f"""/* Matryoshka class embeddings ({classes.source}, {classes.metric}) of distillc model "{_c_string(name)}".
 * Generated by distillc; do not edit. */
#include <stdint.h>

#include "distillc_model.h"

/* int8 class rows, DISTILLC_NUM_CLASSES x DISTILLC_EMBED_DIM ({n} x {width}). */
const int8_t distillc_class_prototypes[DISTILLC_NUM_CLASSES * DISTILLC_EMBED_DIM] = {{
{body}
}};

const float distillc_class_prototype_scales[DISTILLC_NUM_CLASSES] = {{
{scales}
}};

const int32_t distillc_matryoshka_dims[DISTILLC_MATRYOSHKA_NUM_DIMS] = DISTILLC_MATRYOSHKA_DIMS;

const char *const distillc_class_names[DISTILLC_NUM_CLASSES] = {{
{names}
}};

/* Per dim and class, a Q{MULTIPLIER_BITS} factor that makes integer dot products comparable across
 * classes: {ranking}, divided by the largest. */
static const int32_t distillc_class_multipliers[DISTILLC_MATRYOSHKA_NUM_DIMS * DISTILLC_NUM_CLASSES] = {{
{mult_rows}
}};

int distillc_classify(const int8_t *embedding, int dim)
{{
    int32_t level = -1;
    int32_t i;
    int32_t c;
    int best = -1;
    int64_t best_score = 0;

    if (embedding == 0) {{
        return -1;
    }}
    for (i = 0; i < DISTILLC_MATRYOSHKA_NUM_DIMS; ++i) {{
        if (distillc_matryoshka_dims[i] == (int32_t)dim) {{
            level = i;
        }}
    }}
    if (level < 0) {{
        return -1;
    }}
    for (c = 0; c < DISTILLC_NUM_CLASSES; ++c) {{
        const int8_t *row = &distillc_class_prototypes[c * DISTILLC_EMBED_DIM];
        int32_t acc = 0;
        int64_t score;

        for (i = 0; i < (int32_t)dim; ++i) {{
            acc += ((int32_t)embedding[i] - (int32_t)DISTILLC_OUTPUT_ZERO_POINT) * (int32_t)row[i];
        }}
        score = (int64_t)acc * (int64_t)distillc_class_multipliers[level * DISTILLC_NUM_CLASSES + c];
        if (best < 0 || score > best_score) {{
            best = (int)c;
            best_score = score;
        }}
    }}
    return best;
}}
"""


def _c_string(text: str) -> str:
    """A C string body: printable ASCII kept, everything else as three-digit octal escapes."""
    out = []
    for byte in str(text).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?' or not 32 <= byte < 127:
            out.append(f"\\{byte:03o}")
        else:
            out.append(ch)
    return "".join(out)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(MatryoshkaPass)
