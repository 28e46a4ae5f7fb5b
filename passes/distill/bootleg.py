"""``distill.bootleg``: predict a frozen teacher's hidden representations at several depths at once.

The student sees its input with a random ``mask_ratio`` of its patches blanked out (one patch
per teacher token, unless ``mask_patch`` says otherwise).  For every listed teacher block it
predicts that block's output on the clean image, in two ways:

- **masked patches** (the method's own target): a light per-block predictor on the student's
  spatial map (a ViT's patch tokens, a CNN's last stage map) predicts the block's patch tokens
  at every masked cell of the mask grid; the loss is averaged over the masked cells only;
- **pooled summaries** (``target``): a per-block head on the student's embedding predicts the
  block's CLS token, its mean patch token, or both.

Targets come from the cache (computed once per teacher, data, block list and mask grid: the
teacher's token map is resized to the mask grid before it is stored) and are layer-normalised
without affine parameters, so every depth weighs the same whatever the scale of its residual
stream.  Loss = mean over blocks of the pooled loss + ``patch_weight`` x mean over blocks of the
masked-patch loss, each smooth-L1 (or ``1 - cosine``).  No label is read; the predictors do not
leave the pass.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distillc import distributed, hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.base import (Batch, DistillConfig, DistillationPass, Objective, largest_divisor_at_most,
                                          teacher_targets)
from distillc.passes.distill.cadssl import pools_last_stage
from distillc.passes.distill.comad import resize_map, student_map, teacher_skeleton
from distillc.passes.distill.feature import projection_head

#: target name -> which token summaries of a block's output are predicted from the embedding
TARGET_PARTS = {"cls": ("cls",), "mean": ("mean",), "both": ("cls", "mean"), "none": ()}


class BootlegObjective(Objective):
    """Masked student input; per teacher block, a patch predictor on the student's map (masked cells)
    and a pooled-summary predictor on its embedding; normalised hidden-state targets."""

    def __init__(self, ctx: PassContext, cfg: "BootlegDistillation.Config", pass_name: str):
        super().__init__(ctx)
        self.cfg = cfg
        self.pass_name = pass_name
        self.sums: dict[int, Any] = {}

    def setup(self, student: Any, device: Any) -> None:
        import torch
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
        self.parts = TARGET_PARTS[cfg.target]
        blocks, grid = self.blocks, self.grid
        self.heads = nn.ModuleDict()

        if self.parts:
            what = f"hidden:{','.join(map(str, blocks))}:{cfg.target}"
            parts = self.parts
            raw = teacher_targets(self.ctx, cfg.teacher, what, lambda m, x: hidden_summaries(m, x, blocks, parts))
            self.targets = normalise_targets(raw).to(device)
            self.heads["pooled"] = nn.ModuleList(
                projection_head(student.embed_dim, cfg.predictor_hidden, self.targets.shape[-1]) for _ in blocks)
        if self.uses_patches:
            # (images, blocks, grid*grid, D_t), already on the mask grid and normalised; kept on the CPU
            # (the largest targets of any method) and moved a batch at a time.
            what = f"hidden-patches:{','.join(map(str, blocks))}:grid{grid}"
            self.patch_targets = teacher_targets(self.ctx, cfg.teacher, what,
                                                 lambda m, x: patch_latents(m, x, blocks, grid))
            probe = self.ctx.data.train_x[:2].to(device)
            was_training = student.training
            student.eval()
            with torch.no_grad():
                width = int(student_map(student, probe, self.pass_name).shape[1])
            student.train(was_training)
            self.heads["patches"] = nn.ModuleList(
                patch_predictor(width, cfg.patch_hidden, int(self.patch_targets.shape[-1]), grid) for _ in blocks)
            # A CNN whose embedding pools its last stage map gives both from one forward.
            self.pooled_map = (bool(self.parts) and not hasattr(student, "patch_tokens")
                               and pools_last_stage(student, self.ctx.data.image_shape, device))
        self.heads.to(device)

    @property
    def uses_patches(self) -> bool:
        return self.cfg.patch_weight > 0

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch

        from distillc.plugins.augment import apply_patch_mask, random_patch_mask

        cfg = self.cfg
        keep = None
        x = batch.x
        if cfg.mask_ratio > 0:
            keep = random_patch_mask(len(x), self.grid, 1.0 - cfg.mask_ratio, batch.generator, device=x.device)
            x = apply_patch_mask(x, keep, fill=cfg.mask_fill)
        terms = {}
        z = None
        if self.uses_patches:
            feature_map = student_map(student, x, self.pass_name)
            if self.pooled_map:
                z = feature_map.mean(dim=(2, 3))
            if keep is None:  # nothing masked: every cell is predicted
                keep = torch.ones(len(x), self.grid * self.grid, dtype=torch.bool, device=x.device)
            targets = self.patch_targets[batch.idx.to(self.patch_targets.device)].to(x.device, non_blocking=True)
            terms["patch"] = patch_losses(feature_map, keep, self.heads["patches"], targets, cfg.loss)
        if self.parts:
            if z is None:
                z = student(x)
            targets = self.targets[batch.idx.to(self.targets.device)]
            terms["pooled"] = layer_losses(z, self.heads["pooled"], targets, cfg.loss)
        loss = 0.0
        if "pooled" in terms:
            loss = terms["pooled"].mean()
        if "patch" in terms:
            loss = loss + cfg.patch_weight * terms["patch"].mean()
        if batch.epoch not in self.sums:
            self.sums = {batch.epoch: {name: term.new_zeros(len(term)) for name, term in terms.items()} | {"images": 0}}
        sums = self.sums[batch.epoch]
        for name, term in terms.items():
            sums[name] += term.detach() * len(batch.idx)
        sums["images"] += len(batch.idx)
        return loss

    def metrics(self) -> dict[str, Any]:
        from distillc.training import count_params

        out: dict[str, Any] = {"blocks": list(self.blocks), "mask_grid": self.grid,
                               "predicted": [*self.parts, *(["patches"] if self.uses_patches else [])],
                               "predictor_params": count_params(self.heads["pooled"]) if self.parts else 0,
                               "patch_predictor_params": count_params(self.heads["patches"]) if self.uses_patches else 0}
        # Per-block losses of the last epoch this run trained, over every rank's share.
        for sums in self.sums.values():
            names = [name for name in ("pooled", "patch") if name in sums]
            values = distributed.sum_all(sums["images"], *(float(v) for name in names for v in sums[name].tolist()))
            images, per_block = max(values[0], 1), values[1:]
            for i, name in enumerate(names):
                means = per_block[i * len(self.blocks):(i + 1) * len(self.blocks)]
                key = "layer_loss" if name == "pooled" else "patch_loss"
                out[key] = {f"block{b}": v / images for b, v in zip(self.blocks, means)}
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
    description = ("predict a frozen teacher's hidden representations at several blocks from a masked input: "
                   "the masked patches' latents and pooled summaries")
    version = "2"  # 2: per-patch latents of the masked cells (patch_weight), targets "none"

    class Config(DistillConfig):
        teacher: str = Field(description="name of a [[teachers]] entry")
        blocks: list[int] = Field([-1], min_length=1, description="teacher blocks whose outputs are predicted "
                                                                  "(0-based, negative from the end)")
        target: Literal["cls", "mean", "both", "none"] = Field(
            "both", description="pooled summaries of each block predicted from the student's embedding: its CLS "
                                "token, its mean patch token, both, or none (masked patches only)")
        patch_weight: float = Field(1.0, ge=0.0, description="weight of the masked-patch latent loss (each block's "
                                                             "patch tokens at the masked cells); 0 = pooled only")
        patch_hidden: int = Field(128, ge=1, description="hidden width of each per-block patch predictor "
                                                         "(1x1 conv, position embedding, 3x3 conv, 1x1 conv)")
        mask_ratio: float = Field(0.5, ge=0.0, le=0.95, description="fraction of the student's input patches masked")
        mask_patch: int | None = Field(None, ge=1, description="side of a masked patch in pixels; default: one "
                                                               "patch per teacher token (the teacher's grid)")
        mask_fill: float = Field(0.0, ge=0.0, le=1.0, description="pixel value of masked patches")
        predictor_hidden: int = Field(256, ge=0, description="hidden width of each per-block pooled predictor "
                                                             "(Linear-BN-ReLU-Linear); 0 = one linear layer")
        loss: Literal["smooth_l1", "cosine"] = Field("smooth_l1", description="per-layer loss on normalised targets")

        @field_validator("blocks")
        @classmethod
        def _distinct(cls, blocks: list[int]) -> list[int]:
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"blocks must be distinct, got {blocks}")
            return blocks

        @model_validator(mode="after")
        def _predicts_something(self) -> Any:
            if self.target == "none" and self.patch_weight == 0:
                raise ValueError('target = "none" with patch_weight = 0 predicts nothing; '
                                 "set patch_weight > 0 or a pooled target")
            return self

    def objective(self, ctx: PassContext) -> Objective:
        return BootlegObjective(ctx, self.config, self.name)


def mask_input(x: Any, grid: int, mask_ratio: float, fill: float, generator: Any) -> Any:
    """``x`` with a random ``mask_ratio`` of its ``grid`` x ``grid`` patches set to ``fill`` (per image);
    the draws of :meth:`BootlegObjective.loss`."""
    from distillc.plugins.augment import apply_patch_mask, random_patch_mask

    if mask_ratio == 0:
        return x
    keep = random_patch_mask(len(x), grid, 1.0 - mask_ratio, generator, device=x.device)
    return apply_patch_mask(x, keep, fill=fill)


def patch_latents(module: Any, x: Any, blocks: list[int], grid: int) -> Any:
    """The teacher's block outputs as patch latents on the mask grid, (B, layers, grid*grid, width).

    Each block's patch tokens, as a map on the teacher's own grid, are resized to ``grid`` (area
    average down, bilinear up, as :func:`~distillc.passes.distill.comad.resize_map`) and each cell
    is layer-normalised without affine parameters.  Stored at the mask grid, the targets of many
    blocks stay small whatever the teacher's native grid.
    """
    import math

    import torch
    import torch.nn.functional as F

    latents = []
    for h in module.forward_hidden(x, blocks):
        tokens = h[:, 1:].float()
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
        token_map = tokens.transpose(1, 2).reshape(len(h), tokens.shape[2], side, side)
        cells = resize_map(token_map, grid).flatten(2).transpose(1, 2)
        latents.append(F.layer_norm(cells, (cells.shape[-1],)))
    return torch.stack(latents, dim=1)


def patch_losses(feature_map: Any, keep: Any, predictors: Any, targets: Any, kind: str) -> Any:
    """One loss per block, (layers,): each predictor's latents against ``targets`` (B, layers, grid*grid, D)
    at the cells ``keep`` (B, grid*grid) masks, averaged over those cells (every cell when none is masked)."""
    import math

    import torch
    import torch.nn.functional as F

    size, cells = keep.shape
    grid = math.isqrt(cells)
    weights = (~keep if not keep.all() else keep).float()
    inputs = torch.cat([resize_map(feature_map, grid).float(), keep.view(size, 1, grid, grid).float()], dim=1)
    losses = []
    for i, predictor in enumerate(predictors):
        pred = predictor(inputs).flatten(2).transpose(1, 2).float()  # (B, cells, D)
        target = targets[:, i].float()
        if kind == "cosine":
            per_cell = 1.0 - F.cosine_similarity(pred, target, dim=-1)
        else:
            per_cell = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
        losses.append((per_cell * weights).sum() / weights.sum().clamp_min(1.0))
    return torch.stack(losses)


def patch_predictor(in_dim: int, hidden: int, out_dim: int, grid: int) -> Any:
    """A light per-block predictor of patch latents on the ``grid x grid`` mask grid.

    It takes the student's map resized to the grid with the keep mask as one more channel (so it
    knows which cells it must fill in): a 1x1 conv to ``hidden`` plus a learned position embedding
    per cell, GELU, a 3x3 conv (each cell sees its neighbours, the visible context of a masked
    cell), GELU and a 1x1 conv to the teacher's width.
    """
    import torch
    from torch import nn

    class PatchPredictor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Conv2d(in_dim + 1, hidden, 1)
            self.position = nn.Parameter(torch.zeros(1, hidden, grid, grid))
            nn.init.trunc_normal_(self.position, std=0.02)
            self.body = nn.Sequential(nn.GELU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(hidden, out_dim, 1))

        def forward(self, inputs: Any) -> Any:
            return self.body(self.inp(inputs) + self.position)

    return PatchPredictor()


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


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(BootlegDistillation)
