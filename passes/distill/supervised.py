"""``train.supervised``: the same student trained on the labels, the baseline and upper bound.

A linear classifier on the student's embedding is trained with it by cross-entropy on the
augmented training images (the augmentation of ``distill.feature``).  It reuses the distillation
training loop (one-cycle AdamW, resumable epochs) with a labelled objective instead of a teacher.
The validation top-1 of that classifier is reported; the student leaves the pass without it, so
later passes (a linear probe, QAT, export) treat it exactly like a distilled student.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.base import Batch, DistillConfig, DistillationPass, Objective


class SupervisedObjective(Objective):
    """Cross-entropy of a linear classifier on the embedding of the augmented image."""

    def __init__(self, ctx: PassContext, *, augment: float, label_smoothing: float):
        super().__init__(ctx)
        self.augment_strength = augment
        self.label_smoothing = label_smoothing

    def setup(self, student: Any, device: Any) -> None:
        from torch import nn

        from distillc.plugins.augment import Augment

        data = self.ctx.data
        self.student = student
        self.device = device
        self.labels = data.train_y.to(device)
        self.heads = nn.Linear(student.embed_dim, data.num_classes).to(device)
        self.augment = Augment(strength=self.augment_strength, flip=False)

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        logits = self.heads(student(self.augment(batch.x, batch.generator)))
        return F.cross_entropy(logits.float(), self.labels[batch.idx.to(self.labels.device)],
                               label_smoothing=self.label_smoothing)

    def metrics(self) -> dict[str, Any]:
        import torch

        from distillc.training import embed_all

        data = self.ctx.data
        features = embed_all(self.student, data.val_x)
        with torch.no_grad():
            predicted = self.heads(features.to(self.device)).argmax(dim=1).cpu()
        return {"val_top1": float((predicted == data.val_y).float().mean()), "classes": data.num_classes}


class SupervisedTraining(DistillationPass):
    name = "train.supervised"
    description = "train the student on the labels (linear head, cross-entropy): the supervised baseline"

    class Config(DistillConfig):
        augment: float = Field(0.5, ge=0.0, le=1.0, description="strength of the training images' augmentation")
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the cross-entropy")

    def objective(self, ctx: PassContext) -> Objective:
        data = ctx.data
        if not data.labelled:
            raise PassError(self.name, f"supervised training needs labelled data; {data.name} has no labels")
        return SupervisedObjective(ctx, augment=self.config.augment, label_smoothing=self.config.label_smoothing)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(SupervisedTraining)
