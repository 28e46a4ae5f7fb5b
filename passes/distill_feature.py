"""``distill.feature``: label-free feature distillation from one frozen teacher.

The teacher embeds each clean training image once (its targets do not change between epochs);
the student sees an augmented view, and a small projection head maps its embedding into the
teacher's space, where a cosine loss pulls the two together.  No label is read.  The projection
head is a training aid: the student leaves the pass without it.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import TorchModel
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class FeatureDistillation(Pass):
    name = "distill.feature"
    description = "match the student's projected embedding to a frozen teacher's (cosine, no labels)"
    takes = TorchModel
    makes = TorchModel
    uses_data = True
    tools = ("torch",)

    class Config(PassConfig):
        teacher: str = Field(description="name of a [[teachers]] entry")
        epochs: int = Field(10, ge=1, le=100_000)
        lr: float = Field(3e-3, gt=0.0, le=10.0)
        batch_size: int = Field(128, ge=2, le=65_536)
        weight_decay: float = Field(1e-4, ge=0.0)
        projector_hidden: int = Field(256, ge=0, description="hidden width of the projection head; 0 = linear")
        augment: float = Field(0.5, ge=0.0, le=1.0, description="strength of the student's view augmentation")

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch
        import torch.nn.functional as F

        from distillc.plugins.augment import Augment
        from distillc.training import (autocast, batches, count_params, embed_all, epoch_generator, pick_device,
                                       prepare, run_epochs)

        cfg = self.config
        data = ctx.data
        device = pick_device()
        torch.manual_seed(ctx.seed)
        teacher = prepare(ctx.teachers[cfg.teacher].build(ctx.plugins), device)
        targets = F.normalize(embed_all(teacher, data.train_x, fn=lambda m, b: m.embed(b)), dim=1)
        del teacher

        student = prepare(artifact.build(ctx.plugins), device).train()
        projector = prepare(projection_head(student.embed_dim, cfg.projector_hidden, targets.shape[1]), device)
        optimizer = torch.optim.AdamW(list(student.parameters()) + list(projector.parameters()),
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(len(data.train_x) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        augment = Augment(strength=cfg.augment, flip=False)

        def epoch_fn(epoch: int) -> tuple[float, int]:
            gen = epoch_generator(ctx.seed, epoch)
            student.train()
            projector.train()
            total, seen = 0.0, 0
            for idx in batches(len(data.train_x), cfg.batch_size, gen, drop_last=True):
                view = augment(data.train_x[idx], gen).to(device)
                with autocast(device):
                    z = projector(student(view))
                loss = 1.0 - F.cosine_similarity(z.float(), targets[idx].to(device), dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            return total / seen, seen

        losses = run_epochs(progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir, description=ctx.step_id,
                            epochs=cfg.epochs, epoch_fn=epoch_fn,
                            state={"student": student, "projector": projector, "optimizer": optimizer,
                                   "schedule": schedule})
        out = TorchModel.from_module(student, role="student", arch=artifact.arch, options=artifact.options,
                                     meta={**artifact.meta, "distilled_from": cfg.teacher})
        return PassResult(out, {"loss": losses[-1], "first_loss": losses[0], "params": count_params(student),
                                "projector_params": count_params(projector)})


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
