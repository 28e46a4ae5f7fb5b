"""``distill.ca-dssl``: capacity-aware distilled self-supervised learning (TinySSL) for tiny students.

Label-free.  Four parts:

- **Asymmetric views.**  The frozen teacher sees a weakly augmented view of each image; the
  student sees that view augmented again, strongly (its own crop, shift, colour changes, noise and
  erasing).  The teacher's outputs on ``teacher_views`` fixed weak views per image are computed
  once and cached (epoch ``e`` uses view ``e % teacher_views``), so the teacher runs once per view
  however many epochs and runs follow; the weak views themselves are rebuilt from their seeds.
- **A small projection head.**  The student's global embedding goes through a projection head
  whose width the spec sets (``projector_hidden``, 128 by default: a head far smaller than the
  usual 2048-wide one, so the head does not dominate a sub-500K-parameter student) and matches
  the teacher's global embedding of the weak view by cosine.
- **Multi-scale feature distillation.**  Several student stages, each through a 1x1-conv
  adapter to the teacher's token width, match the teacher's patch-token map of the weak view,
  per position by cosine.  The student's crop is applied to a map of pixel coordinates along
  with the image, and the teacher's map is sampled at those coordinates on each stage's grid, so
  both maps describe the same pixels whatever the student's crop.
- **A progressive augmentation curriculum.**  The student's strength ramps linearly from
  ``augment_start`` (first epoch) to ``augment_end`` (last epoch); the progress line shows it.

The projection head and adapters are training aids: the student leaves the pass without them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from distillc import distributed, hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.base import (Batch, DistillConfig, DistillationPass, Objective, teacher_targets,
                                          teacher_view)
from distillc.passes.distill.feature import projection_head


class CaDsslObjective(Objective):
    """Cosine on projected embeddings plus per-position cosine on aligned stage maps, under a curriculum."""

    def __init__(self, ctx: PassContext, cfg: "CaDsslDistillation.Config", pass_name: str):
        super().__init__(ctx)
        self.cfg = cfg
        self.pass_name = pass_name
        self.views: dict[int, tuple[Any, Any, Any]] = {}
        self.sums: dict[int, dict[str, Any]] = {}

    def setup(self, student: Any, device: Any) -> None:
        from torch import nn

        from distillc.plugins.augment import Augment

        cfg = self.cfg
        self.device = device
        self.weak = Augment(strength=cfg.teacher_augment, flip=cfg.flip)
        self.strong = Augment(strength=cfg.augment_start, flip=cfg.flip)
        self.stage_ids = self._stage_indices(student)
        self.pooled = self.uses_features and pools_last_stage(student, self.ctx.data.image_shape, device)
        # Teacher widths come from the cached targets themselves (a CLIP teacher's embedding and
        # its tokens have different widths), so view 0 is fetched now.
        embedding, patches, _ = self._view(0)
        width = embedding.shape[1]
        out = cfg.projector_out or width
        if out != width:
            raise PassError(self.pass_name, f"projector_out = {out} must equal the teacher's embedding width {width} "
                                            f"(the projected student embedding is compared with it); leave it unset")
        projector = projection_head(student.embed_dim, cfg.projector_hidden, out)
        adapters = nn.ModuleList()
        if self.uses_features:
            adapters.extend(nn.Conv2d(student.stage_channels[i], patches.shape[1], 1) for i in self.stage_ids)
        self.heads = nn.ModuleDict({"projector": projector, "adapters": adapters}).to(device)

    @property
    def uses_features(self) -> bool:
        return bool(self.cfg.stages) and self.cfg.feature_weight > 0

    def strength(self, epoch: int, epochs: int) -> float:
        """The student's augmentation strength at ``epoch`` (see :func:`curriculum`)."""
        return curriculum(self.cfg.augment_start, self.cfg.augment_end, epoch, epochs)

    def loss(self, student: Any, batch: Batch) -> Any:
        embedding, patches, weak_images = self._view(batch.epoch % self.cfg.teacher_views)
        if batch.epoch not in self.sums:
            self.sums = {batch.epoch: {"embed_loss": 0.0, "feature_loss": 0.0, "images": 0}}
        strong = self.strong.with_strength(self.strength(batch.epoch, batch.epochs))
        idx = batch.idx.to(embedding.device)
        weak = weak_images[batch.idx].to(batch.x.device, non_blocking=True)

        if not self.uses_features:
            z = student(strong(weak, batch.generator))
            loss = embed_loss = embedding_loss(self.heads["projector"](z), embedding[idx])
            feature_loss = embed_loss.new_zeros(())
        else:
            x, coords = augment_with_coordinates(strong, weak, batch.generator)
            maps = student.forward_stages(x)
            z = maps[-1].mean(dim=(2, 3)) if self.pooled else student(x)
            embed_loss = embedding_loss(self.heads["projector"](z), embedding[idx])
            teacher_map = patches[batch.idx].to(x.device, non_blocking=True)
            feature_loss = feature_map_loss([maps[s] for s in self.stage_ids], self.heads["adapters"], teacher_map,
                                            coords)
            loss = embed_loss + self.cfg.feature_weight * feature_loss
        sums = self.sums[batch.epoch]
        sums["embed_loss"] += embed_loss.detach() * len(batch.idx)
        sums["feature_loss"] += feature_loss.detach() * len(batch.idx)
        sums["images"] += len(batch.idx)
        return loss

    def progress_fields(self, epoch: int, epochs: int) -> dict[str, Any]:
        return {"augment": round(self.strength(epoch, epochs), 3)}

    def metrics(self) -> dict[str, Any]:
        from distillc.training import count_params

        out: dict[str, Any] = {"projector_params": count_params(self.heads["projector"]),
                               "adapter_params": count_params(self.heads["adapters"]),
                               "stages": list(self.stage_ids), "teacher_views": self.cfg.teacher_views}
        # Loss terms of the last epoch this run trained, over every rank's share (none when a resumed
        # run had nothing left).
        last = next(iter(self.sums.values()), {"images": 0, "embed_loss": 0.0, "feature_loss": 0.0})
        images, embed, feature = distributed.sum_all(last["images"], float(last["embed_loss"]),
                                                     float(last["feature_loss"]))
        if images:
            out["embed_loss"] = embed / images
            if self.uses_features:
                out["feature_loss"] = feature / images
        return out

    # -- helpers ----------------------------------------------------------------------------------

    def _stage_indices(self, student: Any) -> list[int]:
        """The configured stages as non-negative indices into ``student.forward_stages``."""
        if not self.uses_features:
            return []
        count = len(getattr(student, "stage_channels", []))
        if not hasattr(student, "forward_stages") or count == 0:
            raise PassError(self.pass_name, f"the student {type(student).__name__} has no forward_stages or "
                                            f"stage_channels; set stages = [] (or feature_weight = 0) to distil "
                                            f"its embedding only")
        bad = [s for s in self.cfg.stages if not -count <= s < count]
        if bad:
            raise PassError(self.pass_name, f"stages {bad} out of range: the student has {count} stages "
                                            f"(valid: {-count} .. {count - 1})")
        ids = [s % count for s in self.cfg.stages]
        if len(set(ids)) != len(ids):
            raise PassError(self.pass_name, f"stages {self.cfg.stages} name the same stage twice")
        return ids

    def _view(self, view: int) -> tuple[Any, Any, Any]:
        """The teacher's unit embeddings, its patch maps (or None) and the weak images of view ``view``.

        Computed once (then read from the cache): the embeddings are held (one row per image), the
        patch maps stay memory-mapped and the weak images are kept in a memory-mapped scratch file,
        both read a batch of rows at a time; the teacher runs for none of it after the first time.
        """
        import torch.nn.functional as F

        if view not in self.views:
            ctx, teacher = self.ctx, self.cfg.teacher
            embedding = teacher_targets(ctx, teacher, "embed", lambda m, b: m.embed(b), view=self.weak, view_seed=view)
            patches = None
            if self.uses_features:  # memory-mapped: read a batch of rows at a time (they can be many GB)
                patches = teacher_targets(ctx, teacher, "patch_tokens", lambda m, b: m.patch_tokens(b),
                                          view=self.weak, view_seed=view)
            self.views[view] = (F.normalize(embedding, dim=1).to(self.device), patches,
                                teacher_view(ctx.data.train_x, self.weak, view))
        return self.views[view]


class CaDsslDistillation(DistillationPass):
    name = "distill.ca-dssl"
    description = ("TinySSL capacity-aware distilled SSL: weak-view teacher, strong-view student, small projector, "
                   "multi-scale features, augmentation curriculum")

    class Config(DistillConfig):
        teacher: str = Field(description="name of a [[teachers]] entry")
        projector_hidden: int = Field(128, ge=0, description="hidden width of the projection head "
                                                             "(Linear-BN-ReLU-Linear); 0 = one linear layer")
        projector_out: int | None = Field(None, ge=1, description="output width of the projection head; "
                                                                  "must equal the teacher's embedding width (default)")
        stages: list[int] = Field([-3, -2], description="student stages (indices into forward_stages, negative "
                                                        "from the end) distilled against the teacher's patch map; "
                                                        "[] = embedding only")
        feature_weight: float = Field(1.0, ge=0.0, description="weight of the multi-scale feature loss")
        augment_start: float = Field(0.2, ge=0.0, le=1.0, description="student's augmentation strength "
                                                                      "in the first epoch")
        augment_end: float = Field(0.8, ge=0.0, le=1.0, description="student's augmentation strength in the last epoch")
        teacher_augment: float = Field(0.2, ge=0.0, le=1.0, description="strength of the teacher's weak views")
        teacher_views: int = Field(2, ge=1, le=64, description="fixed weak views per image whose teacher targets "
                                                               "are cached; epoch e uses view e % teacher_views")
        flip: bool = Field(False, description="allow horizontal flips in both views (off for digits and text)")

        @field_validator("stages")
        @classmethod
        def _distinct(cls, stages: list[int]) -> list[int]:
            if len(set(stages)) != len(stages):
                raise ValueError(f"stages must be distinct, got {stages}")
            return stages

    def objective(self, ctx: PassContext) -> Objective:
        return CaDsslObjective(ctx, self.config, self.name)


def curriculum(start: float, end: float, epoch: int, epochs: int) -> float:
    """Augmentation strength at ``epoch``: linear from ``start`` (first epoch) to ``end`` (last)."""
    return start + (end - start) * min(1.0, epoch / max(1, epochs - 1))


def augment_with_coordinates(augment: Any, x: Any, generator: Any) -> tuple[Any, Any]:
    """``augment(x, generator)`` and, per output pixel, the normalised (x, y) position in ``x`` it came from.

    The coordinates ride through the same crop, shift and flip as two extra channels (one
    resampling, so one set of random draws); colour changes, noise and erasing touch the image
    channels only.  Returns the augmented images and coordinates shaped (B, 2, H, W) in [-1, 1]
    (``grid_sample`` convention, ``align_corners=False``).
    """
    import torch
    import torch.nn.functional as F

    batch, channels = x.shape[:2]
    identity = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(batch, 2, 3)
    coords = F.affine_grid(identity, [batch, 1, *x.shape[2:]], align_corners=False).permute(0, 3, 1, 2)
    moved = augment.geometric(torch.cat([x, coords], dim=1), generator)
    image, coords = moved[:, :channels], moved[:, channels:]
    return augment.appearance(image, generator), coords


def aligned_teacher_map(teacher_map: Any, coords: Any, size: tuple[int, int]) -> Any:
    """The teacher's patch map sampled where a student map of ``size`` looks (``coords`` from
    :func:`augment_with_coordinates`): bilinear, and area-averaged when the teacher's grid is finer."""
    import torch.nn.functional as F

    fine = (max(size[0], teacher_map.shape[-2]), max(size[1], teacher_map.shape[-1]))
    grid = F.adaptive_avg_pool2d(coords, fine).permute(0, 2, 3, 1)
    sampled = F.grid_sample(teacher_map, grid.to(teacher_map.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
    return F.adaptive_avg_pool2d(sampled, size) if fine != tuple(size) else sampled


def pools_last_stage(student: Any, image_shape: tuple[int, ...], device: Any) -> bool:
    """Whether the student's embedding is the global average of its last stage map (MobileNetV2 and the ai8x
    CNN, not a ViT's CLS token): then one forward gives the embedding and the stage maps."""
    import torch

    x = torch.rand((2, *image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = student.training
    student.eval()  # batch statistics would differ between the two calls
    with torch.no_grad():
        pooled = student.forward_stages(x)[-1].float().mean(dim=(2, 3))
        same = pooled.shape == (2, student.embed_dim) and torch.allclose(student(x).float(), pooled, rtol=1e-4,
                                                                          atol=1e-5)
    student.train(was_training)
    return bool(same)


def embedding_loss(z: Any, target: Any) -> Any:
    """``1 - cosine`` between projected student embeddings and (unit) teacher embeddings, batch mean."""
    import torch.nn.functional as F

    return 1.0 - F.cosine_similarity(z.float(), target, dim=1).mean()


def feature_map_loss(maps: list[Any], adapters: Any, teacher_map: Any, coords: Any) -> Any:
    """Mean over stages of ``1 - cosine`` per position between each adapted stage map and the teacher's
    map aligned to it (:func:`aligned_teacher_map`)."""
    import torch.nn.functional as F

    terms = []
    for adapter, stage_map in zip(adapters, maps):
        m = adapter(stage_map).float()
        t = aligned_teacher_map(teacher_map, coords.float(), m.shape[-2:])
        terms.append(1.0 - F.cosine_similarity(m, t, dim=1).mean())
    return sum(terms) / len(terms)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(CaDsslDistillation)
