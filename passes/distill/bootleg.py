"""``distill.bootleg``: predict a frozen teacher's hidden representations at several depths at once.

The student sees its input with a random ``mask_ratio`` of its patches blanked out (patches the
size of the teacher's, unless ``mask_patch`` says otherwise); one small predictor per listed
teacher block maps the student's embedding to that block's representation of the clean image:
its CLS token, its mean patch token, or both.  Targets come from the cache (computed once per
teacher, data and block list) and are layer-normalised without affine parameters, so every
depth weighs the same whatever the scale of its residual stream.  The loss is the mean over the
layers of smooth-L1 (or ``1 - cosine``).  No label is read; the predictors do not leave the pass.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from distillc import hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.base import (Batch, DistillConfig, DistillationPass, Objective, largest_divisor_at_most,
                                          teacher_targets)
from distillc.passes.distill.feature import projection_head

#: target name -> which token summaries of a block's output are predicted
TARGET_PARTS = {"cls": ("cls",), "mean": ("mean",), "both": ("cls", "mean")}


class BootlegObjective(Objective):
    """Masked student input; one predictor per teacher block; normalised hidden-state targets."""

    def __init__(self, ctx: PassContext, cfg: "BootlegDistillation.Config", pass_name: str):
        super().__init__(ctx)
        self.cfg = cfg
        self.pass_name = pass_name
        self.sums: dict[int, Any] = {}

    def setup(self, student: Any, device: Any) -> None:
        from torch import nn

        cfg = self.cfg
        skeleton = teacher_skeleton(self.ctx, cfg.teacher)
        depth = skeleton.num_blocks
        bad = [b for b in cfg.blocks if not -depth <= b < depth]
        if bad:
            raise PassError(self.pass_name, f"blocks {bad} out of range: teacher {cfg.teacher!r} has {depth} blocks "
                                            f"(valid: {-depth} .. {depth - 1})")
        self.blocks = [b % depth for b in cfg.blocks]
        if len(set(self.blocks)) != len(self.blocks):
            raise PassError(self.pass_name, f"blocks {cfg.blocks} name the same teacher block twice")
        self.grid = self._mask_grid(skeleton)

        parts = TARGET_PARTS[cfg.target]
        blocks = self.blocks
        what = f"hidden:{','.join(map(str, blocks))}:{cfg.target}"
        raw = teacher_targets(self.ctx, cfg.teacher, what, lambda m, x: hidden_summaries(m, x, blocks, parts))
        self.targets = normalise_targets(raw).to(device)
        self.heads = nn.ModuleList(projection_head(student.embed_dim, cfg.predictor_hidden, self.targets.shape[-1])
                                   for _ in blocks).to(device)

    def loss(self, student: Any, batch: Batch) -> Any:
        x = mask_input(batch.x, self.grid, self.cfg.mask_ratio, self.cfg.mask_fill, batch.generator)
        targets = self.targets[batch.idx.to(self.targets.device)]
        per_layer = layer_losses(student(x), self.heads, targets, self.cfg.loss)
        if batch.epoch not in self.sums:
            self.sums = {batch.epoch: [per_layer.new_zeros(len(per_layer)), 0]}
        sums = self.sums[batch.epoch]
        sums[0] += per_layer.detach() * len(batch.idx)
        sums[1] += len(batch.idx)
        return per_layer.mean()

    def metrics(self) -> dict[str, Any]:
        from distillc.training import count_params

        out: dict[str, Any] = {"predictor_params": count_params(self.heads), "blocks": list(self.blocks),
                               "mask_grid": self.grid}
        # Per-layer losses of the last epoch this run trained.
        for total, images in self.sums.values():
            means = (total / max(images, 1)).tolist()
            out["layer_loss"] = {f"block{b}": float(v) for b, v in zip(self.blocks, means)}
        return out

    def _mask_grid(self, skeleton: Any) -> int:
        """Patches per side of the student's mask: by default the teacher's token grid (one masked
        patch per teacher token), the finest that tiles the student's image when it does not."""
        size = self.ctx.data.image_shape[-1]
        if self.cfg.mask_patch is None:
            return largest_divisor_at_most(size, int(skeleton.grid))
        patch = self.cfg.mask_patch
        if size % patch:
            raise PassError(self.pass_name, f"mask_patch {patch} does not divide the image size {size}")
        return size // patch


class BootlegDistillation(DistillationPass):
    name = "distill.bootleg"
    description = "predict a frozen teacher's hidden representations at several blocks from a masked input"

    class Config(DistillConfig):
        teacher: str = Field(description="name of a [[teachers]] entry")
        blocks: list[int] = Field([-1], min_length=1, description="teacher blocks whose outputs are predicted "
                                                                  "(0-based, negative from the end)")
        target: Literal["cls", "mean", "both"] = Field(
            "both", description="what of each block's output is predicted: its CLS token, its mean patch token or both")
        mask_ratio: float = Field(0.5, ge=0.0, le=0.95, description="fraction of the student's input patches masked")
        mask_patch: int | None = Field(None, ge=1, description="side of a masked patch in pixels; default: one "
                                                               "patch per teacher token (the teacher's grid)")
        mask_fill: float = Field(0.0, ge=0.0, le=1.0, description="pixel value of masked patches")
        predictor_hidden: int = Field(256, ge=0, description="hidden width of each per-block predictor "
                                                             "(Linear-BN-ReLU-Linear); 0 = one linear layer")
        loss: Literal["smooth_l1", "cosine"] = Field("smooth_l1", description="per-layer loss on normalised targets")

        @field_validator("blocks")
        @classmethod
        def _distinct(cls, blocks: list[int]) -> list[int]:
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"blocks must be distinct, got {blocks}")
            return blocks

    def objective(self, ctx: PassContext) -> Objective:
        return BootlegObjective(ctx, self.config, self.name)


def mask_input(x: Any, grid: int, mask_ratio: float, fill: float, generator: Any) -> Any:
    """``x`` with a random ``mask_ratio`` of its ``grid`` x ``grid`` patches set to ``fill`` (per image)."""
    from distillc.plugins.augment import apply_patch_mask, random_patch_mask

    if mask_ratio == 0:
        return x
    keep = random_patch_mask(len(x), grid, 1.0 - mask_ratio, generator, device=x.device)
    return apply_patch_mask(x, keep, fill=fill)


def hidden_summaries(module: Any, x: Any, blocks: list[int], parts: tuple[str, ...]) -> Any:
    """The teacher's block outputs summarised as (B, layers, parts, width): CLS token and/or mean patch token."""
    import torch

    summaries = []
    for h in module.forward_hidden(x, blocks):
        pieces = {"cls": h[:, 0], "mean": h[:, 1:].mean(dim=1)}
        summaries.append(torch.stack([pieces[p] for p in parts], dim=1))
    return torch.stack(summaries, dim=1)


def normalise_targets(raw: Any) -> Any:
    """Layer norm without affine parameters over each summary's width; (N, layers, parts * width)."""
    import torch.nn.functional as F

    return F.layer_norm(raw.float(), (raw.shape[-1],)).flatten(2)


def layer_losses(z: Any, predictors: Any, targets: Any, kind: str) -> Any:
    """One loss per layer, (layers,): smooth-L1 or ``1 - cosine`` between each predictor's output and its target."""
    import torch
    import torch.nn.functional as F

    losses = []
    for i, predictor in enumerate(predictors):
        pred, target = predictor(z).float(), targets[:, i]
        if kind == "cosine":
            losses.append(1.0 - F.cosine_similarity(pred, target, dim=1).mean())
        else:
            losses.append(F.smooth_l1_loss(pred, target))
    return torch.stack(losses)


def teacher_skeleton(ctx: PassContext, teacher: str) -> Any:
    """The teacher built on the meta device: its attributes (``num_blocks``, ``patch_size``, ...) without
    allocating or loading its weights."""
    import torch

    artifact = ctx.teachers[teacher]
    with torch.device("meta"):
        return ctx.plugins.teachers.get(artifact.arch)(**artifact.options)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(BootlegDistillation)
