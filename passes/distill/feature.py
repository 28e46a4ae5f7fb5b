"""``distill.feature``: label-free feature distillation from one frozen teacher.

The teacher embeds each clean training image once (cached: its targets never change); the
student sees an augmented view, and a small projection head maps its embedding into the
teacher's space, where a cosine loss pulls the two together.  No label is read.  The projection
head is a training aid: the student leaves the pass without it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.pass_api import PassContext
from distillc.passes.distill.base import Batch, DistillConfig, DistillationPass, Objective, teacher_targets


class FeatureObjective(Objective):
    """Cosine between the projected student embedding and the teacher's embedding of the clean image."""

    def __init__(self, ctx: PassContext, *, teacher: str, projector_hidden: int, augment: float):
        super().__init__(ctx)
        self.teacher = teacher
        self.projector_hidden = projector_hidden
        self.augment_strength = augment

    def setup(self, student: Any, device: Any) -> None:
        import torch.nn.functional as F

        from distillc.plugins.augment import Augment

        targets = teacher_targets(self.ctx, self.teacher, "embed", lambda m, b: m.embed(b))
        self.targets = F.normalize(targets, dim=1)
        self.heads = projection_head(student.embed_dim, self.projector_hidden, targets.shape[1]).to(device)
        self.augment = Augment(strength=self.augment_strength, flip=False)

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        z = self.heads(student(self.augment(batch.x, batch.generator)))
        target = self.targets[batch.idx].to(z.device)
        return 1.0 - F.cosine_similarity(z.float(), target, dim=1).mean()


class FeatureDistillation(DistillationPass):
    name = "distill.feature"
    description = "match the student's projected embedding to a frozen teacher's (cosine, no labels)"

    class Config(DistillConfig):
        teacher: str = Field(description="name of a [[teachers]] entry")
        projector_hidden: int = Field(256, ge=0, description="hidden width of the projection head; 0 = linear")
        augment: float = Field(0.5, ge=0.0, le=1.0, description="strength of the student's view augmentation")

    def objective(self, ctx: PassContext) -> Objective:
        cfg = self.config
        return FeatureObjective(ctx, teacher=cfg.teacher, projector_hidden=cfg.projector_hidden, augment=cfg.augment)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> Any:
    """Linear, or Linear-BN-ReLU-Linear when ``hidden > 0``."""
    from torch import nn

    if hidden == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(FeatureDistillation)
