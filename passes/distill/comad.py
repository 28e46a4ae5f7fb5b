"""``distill.comad``: consensus-oriented masked distillation from two or more frozen teachers.

After CoMAD (multi-teacher, masked, token-level distillation into a small student):

1. **Tokens.**  Each teacher's patch tokens of its masked views of the training images are
   computed once (:func:`~distillc.passes.distill.base.teacher_targets`, cached; see 3).  The
   student's tokens are its patch tokens (a token-producing student such as ``vit-mcu``) or, for
   a CNN, its last stage map read as one token per position, through a trainable 1x1 convolution
   (``student_adapter``): a CNN's last map ends in a ReLU, and its zeros cannot take the
   values of a layer-normalised target token.  Every token map is resized to one common grid
   (``grid``; default the student's token grid, or the finest teacher grid for a CNN).
2. **Adapters.** Each teacher's tokens enter the student's width through ``Linear(D_t -> D_s)``
   and ``LayerNorm``.  The linear part starts as the projection on the teacher tokens' leading
   principal directions; by default it stays there (``train_adapters = false``), since an
   adapter trained against the student on the target side can drift to targets that are
   merely easy (in the limit, constant).
3. **Asymmetric masks.** The student sees a random ``student_keep`` fraction of the patches
   (the rest of the image is zeroed), drawn afresh every batch; each teacher sees its own,
   lighter masked view (``teacher_keep`` of the patches of its own grid, masked in its own
   input), a different mask per teacher.  So that the teacher runs once per view rather than
   every batch, each teacher has ``teacher_views`` fixed masked views per image (a seed per
   teacher and view; epoch ``e`` uses view ``e % teacher_views``), whose tokens are cached.  A
   teacher contributes only where its view kept the patch (where no teacher did, all of them do).
4. **Consensus gate.** Per token, a softmax over the teachers of
   ``(alpha * cos(student, adapted teacher) + (1 - alpha) * mean cos(teacher, other teachers))
   / gate_temperature``; the gate is a weighting, not a path for gradients (it is detached).
   The target token is the gate-weighted mix of the adapted teacher tokens.
5. **Loss.** KL between the channel softmaxes (temperature ``temperature``) of the student's
   (layer-normed) tokens and the target on the tokens the student saw; plus ``global_weight``
   times the same KL one level up, on one token per image: the student's pooled token (the mean
   of its adapted map) against the gate-weighted mix of the teachers' embeddings (their class
   tokens) of their masked views, each through its own principal-direction adapter; plus
   ``feature_weight`` times a KL on the reconstructed map: a small decoder (3x3 conv, GELU, 1x1 conv) gets the
   student's map with every masked position replaced by a learned mask token and must rebuild
   the whole target map; its KL compares, per channel, the softmax over positions
   (channel-wise distillation), so the map loss is about where each feature fires.  Adapters
   (the teachers' and the student's), decoder and mask token are training aids and leave with
   the pass.

Metrics report the gate (each teacher's mean weight, how often it dominates a token, the mean
gate entropy: 0 = one teacher decides, 1 = uniform) and the masks (each teacher's keep ratio and
grid, the fractions of the common grid the student and each teacher kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from distillc import distributed, hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.base import (Batch, DistillConfig, DistillationPass, Objective, largest_divisor_at_most,
                                          teacher_targets)

#: Teacher tokens used to find an adapter's principal directions.
_PCA_TOKENS = 8192


class ComadObjective(Objective):
    """The CoMAD loss (see the module docstring) for one student and its teachers."""

    def __init__(self, ctx: PassContext, cfg: Any):
        super().__init__(ctx)
        self.cfg = cfg
        self.teachers = list(cfg.teachers)
        keep = cfg.teacher_keep
        self.teacher_keeps = list(keep) if isinstance(keep, list) else [keep] * len(self.teachers)
        self.views: dict[int, tuple[list[Any], Any, list[Any]]] = {}
        self._reset_stats(-1)

    def setup(self, student: Any, device: Any) -> None:
        import torch
        from torch import nn

        cfg = self.cfg
        image_size = int(self.ctx.data.train_x.shape[-1])
        probe = self.ctx.data.train_x[:2].to(device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            sample = student_map(student, probe)
        student.train(was_training)
        self.student_dim = int(sample.shape[1])
        self.teacher_grids = [int(teacher_skeleton(self.ctx, name).grid) for name in self.teachers]
        if hasattr(student, "patch_tokens"):
            default_grid = int(sample.shape[-1])
        else:  # the finest teacher grid (a 224-px ViT-S/16's is 14) that also tiles the student's image
            default_grid = largest_divisor_at_most(image_size, max(self.teacher_grids))
        self.grid = cfg.grid or default_grid
        if image_size % self.grid:
            raise PassError("distill.comad", f"grid {self.grid} does not divide the image size {image_size}; "
                                             f"set grid to a divisor of {image_size}")
        tokens, _, globals_ = self._view(0)
        adapters = nn.ModuleList(pca_adapter(t, self.student_dim) for t in tokens)
        adapters.requires_grad_(cfg.train_adapters)
        self.heads = nn.ModuleDict({"adapters": adapters, "decoder": masked_decoder(self.student_dim)})
        if cfg.global_weight > 0:
            global_adapters = nn.ModuleList(pca_adapter(g[:, None], self.student_dim) for g in globals_)
            global_adapters.requires_grad_(cfg.train_adapters)
            self.heads["global_adapters"] = global_adapters
        adapt_student = cfg.student_adapter if cfg.student_adapter is not None else not hasattr(student, "patch_tokens")
        if adapt_student:
            self.heads["student_adapter"] = nn.Conv2d(self.student_dim, self.student_dim, 1)
        self.heads.to(device)

    def _view(self, view: int) -> tuple[list[Any], Any, list[Any]]:
        """Masked view ``view`` of every teacher on the common grid: its tokens, one ``(images, grid*grid,
        D_t)`` per teacher, where its view kept the patches, ``(teachers, images, grid*grid)`` bool, and
        (with ``global_weight > 0``) its embedding of that view (its class token), one ``(images, D_t)``
        per teacher.

        Each teacher sees its own fixed masks (:class:`TeacherMask`, a seed per teacher and view), so
        its tokens come from the cache like clean ones; a teacher that keeps everything sees the clean
        image.  The tokens are stored on the common grid and stay memory-mapped (a batch's rows are read
        as it needs them); the masks are small and kept in memory.
        """
        import torch

        if view not in self.views:
            ctx, data, grid = self.ctx, self.ctx.data, self.grid
            count, channels, size = len(data.train_x), data.train_x.shape[1], tuple(data.train_x.shape[-2:])
            tokens, keeps, globals_ = [], [], []
            wants_global = self.cfg.global_weight > 0
            for name, keep, teacher_grid in zip(self.teachers, self.teacher_keeps, self.teacher_grids):
                if keep >= 1.0:
                    tokens.append(teacher_targets(ctx, name, f"patch_tokens:grid{grid}",
                                                  lambda m, b: resize_map(m.patch_tokens(b), grid).flatten(2)
                                                  .transpose(1, 2)))
                    keeps.append(torch.ones(count, grid * grid, dtype=torch.bool))
                    if wants_global:
                        globals_.append(teacher_targets(ctx, name, "embed", lambda m, b: m.embed(b)))
                else:
                    mask, seed = TeacherMask(grid=teacher_grid, keep=keep), teacher_mask_seed(name, view)
                    tokens.append(teacher_targets(ctx, name, f"masked_patch_tokens:grid{grid}",
                                                  lambda m, b, c=channels: masked_tokens_on_grid(m, b, c, grid),
                                                  view=mask, view_seed=seed))
                    keeps.append(kept_on_grid(teacher_view_masks(count, size, mask, seed), grid))
                    if wants_global:
                        globals_.append(teacher_targets(ctx, name, "masked_embed",
                                                        lambda m, b, c=channels: masked_embed(m, b, c),
                                                        view=mask, view_seed=seed))
            self.views[view] = (tokens, torch.stack(keeps), globals_)
        return self.views[view]

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch
        import torch.nn.functional as F

        from distillc.plugins.augment import apply_patch_mask, random_patch_mask

        cfg, grid = self.cfg, self.grid
        size = len(batch.idx)
        teacher_tokens, teacher_masks, teacher_globals = self._view(batch.epoch % cfg.teacher_views)
        # The student's mask is drawn afresh every batch; the teachers' are their views' fixed ones.
        student_keep = random_patch_mask(size, grid, cfg.student_keep, batch.generator).to(batch.x.device)
        teacher_keep = teacher_masks[:, batch.idx.cpu()].to(batch.x.device)
        feats = student_map(student, apply_patch_mask(batch.x, student_keep))
        if "student_adapter" in self.heads:
            feats = self.heads["student_adapter"](feats)
        feats = resize_map(feats, grid)
        tokens = F.layer_norm(feats.flatten(2).transpose(1, 2).float(), (self.student_dim,))  # (B, N, D_s)

        with torch.set_grad_enabled(self.cfg.train_adapters and torch.is_grad_enabled()):
            adapted = torch.stack([adapter(t[batch.idx.cpu()].to(batch.x.device))
                                   for adapter, t in zip(self.heads["adapters"], teacher_tokens)]).float()
        gate = consensus_gate(tokens.detach(), adapted.detach(), teacher_keep, alpha=cfg.gate_alpha,
                              temperature=cfg.gate_temperature)  # (B, N, T)
        target = torch.einsum("bnt,tbnd->bnd", gate, adapted)
        token_loss = token_kl(tokens, target, cfg.temperature, student_keep)

        decoded = self.heads["decoder"](feats.float(), student_keep)
        map_loss = map_kl(decoded.flatten(2).float(), target.transpose(1, 2), cfg.temperature)
        self._track(batch, gate, student_keep, teacher_keep)
        loss = token_loss + cfg.feature_weight * map_loss
        if cfg.global_weight > 0:
            global_loss = self._global_loss(feats, teacher_globals, batch)
            self._global_kl += float(global_loss.detach()) * size
            loss = loss + cfg.global_weight * global_loss
        return loss

    def _global_loss(self, feats: Any, teacher_globals: list[Any], batch: Batch) -> Any:
        """The global level of the dual KL: the student's pooled token (the mean of its adapted map,
        which for a CNN is what its embedding pools) against the gate-weighted mix of the teachers'
        adapted embeddings (their class tokens) of their masked views, one token per image."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        pooled = F.layer_norm(feats.float().mean((2, 3)), (self.student_dim,))[:, None]  # (B, 1, D_s)
        with torch.set_grad_enabled(cfg.train_adapters and torch.is_grad_enabled()):
            adapted = torch.stack([adapter(g[batch.idx.cpu()].to(feats.device).float())
                                   for adapter, g in zip(self.heads["global_adapters"], teacher_globals)])[:, :, None]
        everyone = torch.ones(adapted.shape[:3], dtype=torch.bool, device=feats.device)
        gate = consensus_gate(pooled.detach(), adapted.detach(), everyone, alpha=cfg.gate_alpha,
                              temperature=cfg.gate_temperature)
        target = torch.einsum("bnt,tbnd->bnd", gate, adapted)
        return token_kl(pooled, target, cfg.temperature, torch.ones(pooled.shape[:2], device=feats.device))

    # -- gate statistics --------------------------------------------------------------------------

    def _reset_stats(self, epoch: int) -> None:
        count = len(self.teachers)
        self._epoch, self._tokens, self._images = epoch, 0, 0
        self._weight, self._wins = [0.0] * count, [0.0] * count
        self._entropy, self._student_kept, self._teacher_kept = 0.0, 0.0, [0.0] * count
        self._global_kl = 0.0

    def _track(self, batch: Batch, gate: Any, student_keep: Any, teacher_keep: Any) -> None:
        import math

        import torch

        if batch.epoch != self._epoch:  # report the last epoch only
            self._reset_stats(batch.epoch)
        with torch.no_grad():
            g = gate.detach().float().reshape(-1, gate.shape[-1])
            self._tokens += g.shape[0]
            self._images += student_keep.shape[0]
            self._weight = [a + b for a, b in zip(self._weight, g.sum(0).tolist())]
            wins = torch.bincount(g.argmax(1), minlength=g.shape[1]).tolist()
            self._wins = [a + b for a, b in zip(self._wins, wins)]
            entropy = -(g * g.clamp_min(1e-12).log()).sum(1) / max(math.log(g.shape[1]), 1e-12)
            self._entropy += float(entropy.sum())
            self._student_kept += float(student_keep.float().sum())
            self._teacher_kept = [a + b for a, b in zip(self._teacher_kept, teacher_keep.float().sum((1, 2)).tolist())]

    def metrics(self) -> dict[str, Any]:
        n = len(self.teachers)
        # The last epoch's statistics over every rank's share of it.
        totals = distributed.sum_all(self._tokens, *self._weight, *self._wins, self._entropy, self._student_kept,
                                     *self._teacher_kept, self._images, self._global_kl)
        tokens = max(totals[0], 1.0)
        weight, wins = totals[1:1 + n], totals[1 + n:1 + 2 * n]
        entropy, student_kept, teacher_kept = totals[1 + 2 * n], totals[2 + 2 * n], totals[3 + 2 * n:3 + 3 * n]
        images, global_kl = totals[3 + 3 * n], totals[4 + 3 * n]
        out = {
            "grid": self.grid,
            "student_adapter": "student_adapter" in self.heads,
            "gate": {
                "mean_weight": {t: w / tokens for t, w in zip(self.teachers, weight)},
                "dominant_fraction": {t: w / tokens for t, w in zip(self.teachers, wins)},
                "entropy": entropy / tokens if n > 1 else 0.0,
            },
            "student_keep_fraction": student_kept / tokens,
            "teacher_keep_fraction": {t: k / tokens for t, k in zip(self.teachers, teacher_kept)},
            "teacher_mask": {t: {"keep": keep, "grid": [g, g]}
                             for t, keep, g in zip(self.teachers, self.teacher_keeps, self.teacher_grids)},
            "teacher_views": self.cfg.teacher_views,
        }
        if self.cfg.global_weight > 0:  # the global level's KL, mean over the last epoch's images
            out["global_kl"] = global_kl / max(images, 1.0)
        return out


class ComadDistillation(DistillationPass):
    name = "distill.comad"
    description = "CoMAD: consensus-gated, asymmetrically masked token distillation from 2+ frozen teachers"
    version = "4"  # 2: trainable 1x1-conv student adapter for CNN students; 3: teachers see masked views;
    # 4: the global level of the KL (global_weight, default 1)

    class Config(DistillConfig):
        teachers: list[str] = Field(min_length=2, description="names of two or more [[teachers]] entries")
        student_keep: float = Field(0.25, gt=0.0, le=1.0, description="fraction of patches the student sees")
        teacher_keep: float | list[float] = Field(0.5, description="fraction of its own patches each teacher sees "
                                                                   "(a lighter mask than the student's): one value, "
                                                                   "or one per teacher")
        teacher_views: int = Field(2, ge=1, le=64, description="fixed masked views per teacher and image whose tokens "
                                                               "are cached; epoch e uses view e % teacher_views")
        temperature: float = Field(1.0, gt=0.0, description="softmax temperature of both KL terms")
        feature_weight: float = Field(1.0, ge=0.0, description="weight of the reconstructed-map KL")
        global_weight: float = Field(1.0, ge=0.0, description="weight of the global-level KL: the student's pooled "
                                                              "token against the gated teachers' embeddings")
        gate_alpha: float = Field(0.5, ge=0.0, le=1.0, description="gate mix: 1 = student affinity only, "
                                                                   "0 = teacher agreement only")
        gate_temperature: float = Field(0.1, gt=0.0, description="softmax temperature of the consensus gate")
        grid: int | None = Field(None, ge=1, description="side of the common token grid; default the student's "
                                                         "(a ViT) or the finest teacher's (a CNN)")
        train_adapters: bool = Field(False, description="train the teacher adapters with the student")
        student_adapter: bool | None = Field(None, description="pass the student's map through a trainable 1x1 "
                                                               "convolution before matching; default: on for a CNN "
                                                               "student (its map ends in a ReLU), off for a ViT")

        @field_validator("teachers")
        @classmethod
        def _distinct(cls, names: list[str]) -> list[str]:
            if len(set(names)) != len(names):
                raise ValueError("each teacher may be listed once")
            return names

        @model_validator(mode="after")
        def _keeps(self) -> Any:
            keeps = self.teacher_keep if isinstance(self.teacher_keep, list) else [self.teacher_keep]
            if isinstance(self.teacher_keep, list) and len(keeps) != len(self.teachers):
                raise ValueError(f"teacher_keep lists {len(keeps)} values for {len(self.teachers)} teachers")
            if any(not 0.0 < k <= 1.0 for k in keeps):
                raise ValueError(f"teacher_keep values must be in (0, 1], got {keeps}")
            if any(k < self.student_keep for k in keeps):
                raise ValueError(f"teacher_keep {keeps} must not be below student_keep = {self.student_keep}: "
                                 "each teacher's mask is lighter than the student's")
            return self

    def objective(self, ctx: PassContext) -> Objective:
        return ComadObjective(ctx, self.config)


# -- pieces (public: the tests pin them) ------------------------------------------------------------


def student_map(student: Any, x: Any, pass_name: str = "distill.comad") -> Any:
    """The student's tokens as a map ``(B, D, h, w)``: its patch tokens, or a CNN's last stage map."""
    if hasattr(student, "patch_tokens"):
        return student.patch_tokens(x)
    if hasattr(student, "forward_stages"):
        return student.forward_stages(x)[-1]
    raise PassError(pass_name, f"the student ({type(student).__name__}) has neither patch_tokens nor "
                                     "forward_stages: it produces no tokens to distil into")


def resize_map(feature_map: Any, grid: int) -> Any:
    """A ``(B, D, h, w)`` map on a ``grid x grid`` grid: area-averaged down, bilinear up."""
    import torch.nn.functional as F

    height, width = feature_map.shape[-2:]
    if (height, width) == (grid, grid):
        return feature_map
    if height >= grid and width >= grid:
        return F.adaptive_avg_pool2d(feature_map, grid)
    return F.interpolate(feature_map, size=(grid, grid), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class TeacherMask:
    """A teacher's masked view (a ``view`` for :func:`~distillc.passes.distill.base.teacher_targets`):
    ``keep`` of the patches of the teacher's own ``grid x grid`` patch grid, drawn per image.

    The view cannot mask the teacher's input itself: it runs on the student-sized images, before
    the teacher's input contract resizes them, and a 14x14 teacher grid does not tile a 16-px
    image.  So it draws the mask and hands it on as extra image channels (the mask's cells, one
    per pixel, row-major); :func:`masked_patch_tokens` reads them back and masks the teacher's
    input at its own size.  Its ``repr`` is part of the cache key.
    """

    grid: int
    keep: float

    def __call__(self, x: Any, generator: Any) -> Any:
        import torch

        from distillc.plugins.augment import random_patch_mask

        keep = random_patch_mask(len(x), self.grid, self.keep, generator)
        height, width = x.shape[-2:]
        planes = -(-keep.shape[1] // (height * width))
        flat = torch.zeros(len(x), planes * height * width, dtype=x.dtype)
        flat[:, :keep.shape[1]] = keep.to(x.dtype)
        return torch.cat([x, flat.view(len(x), planes, height, width).to(x.device)], dim=1)

    def read(self, planes: Any) -> Any:
        """The ``(B, grid*grid)`` bool mask carried by the extra channels ``planes``."""
        return read_mask(planes, self.grid * self.grid)


def read_mask(planes: Any, cells: int) -> Any:
    """The ``(B, cells)`` bool mask a :class:`TeacherMask` wrote into the extra channels ``planes``."""
    return planes.flatten(1)[:, :cells] > 0.5


def teacher_mask_seed(teacher: str, view: int) -> int:
    """The seed of masked view ``view`` of ``teacher``: one per teacher name, so two teachers of the
    same grid and keep ratio still see different masks."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"comad-teacher-mask:{teacher}:{view}".encode()).digest()[:4], "big")


def masked_patch_tokens(module: Any, x: Any, channels: int) -> Any:
    """The teacher's patch tokens ``(B, D, grid, grid)`` of its masked view: ``x`` is the student-sized
    image (``channels`` channels) with a :class:`TeacherMask`'s extra channels; the image is turned
    into the teacher's input (its size, channels, normalisation), and every masked patch of the
    teacher's own grid is set to 0 there, the mean of its input statistics."""
    teacher, seen = masked_teacher_input(module, x, channels)
    return teacher.patch_tokens(seen)


def masked_embed(module: Any, x: Any, channels: int) -> Any:
    """The teacher's embedding ``(B, D)`` (its class token) of the masked view that
    :func:`masked_patch_tokens` reads."""
    teacher, seen = masked_teacher_input(module, x, channels)
    return teacher.embed(seen)


def masked_teacher_input(module: Any, x: Any, channels: int) -> tuple[Any, Any]:
    """The bare teacher of ``module`` and its masked input: ``x``'s image as the teacher's input, with
    every patch its :class:`TeacherMask` channels drop set to 0."""
    from distillc.plugins.augment import apply_patch_mask
    from distillc.plugins.models.teacher_input import TeacherView

    teacher = module.teacher if isinstance(module, TeacherView) else module
    images, planes = x[:, :channels], x[:, channels:]
    seen = module.prepare(images) if isinstance(module, TeacherView) else images
    keep = read_mask(planes, int(teacher.grid) ** 2)
    return teacher, apply_patch_mask(seen, keep.to(seen.device), fill=0.0)


def teacher_view_masks(count: int, size: tuple[int, int], mask: TeacherMask, seed: int) -> Any:
    """The masks :class:`TeacherMask` ``mask`` drew for the ``count`` training images in view ``seed``,
    ``(count, grid*grid)`` bool: the view rebuilt from its seed on images without channels (the
    draws do not depend on the pixels)."""
    import torch

    from distillc.passes.distill.base import teacher_view

    return mask.read(teacher_view(torch.zeros(count, 0, *size), mask, seed))


def on_common_grid(token_map: Any, keep: Any, grid: int) -> Any:
    """A teacher's masked-view tokens on the common grid, ``(B, grid*grid, D)``.

    ``token_map`` is ``(B, D, g, g)`` on the teacher's grid and ``keep`` ``(B, g*g)``.  A common
    cell's token is the average of the visible teacher tokens over it (area average down,
    bilinear up, weighted by visibility); a cell with nothing visible gets the teacher's tokens
    there as they are (they count only where no teacher kept the cell, see :func:`kept_on_grid`).
    """
    import torch

    side = token_map.shape[-1]
    token_map = token_map.float()
    visible = keep.view(-1, 1, side, side).to(token_map.dtype)
    seen = resize_map(visible, grid)
    mixed = resize_map(token_map * visible, grid) / seen.clamp_min(1e-6)
    return torch.where(seen > 0, mixed, resize_map(token_map, grid)).flatten(2).transpose(1, 2)


def kept_on_grid(keep: Any, grid: int) -> Any:
    """A teacher's keep mask ``(B, g*g)`` on the common grid ``(B, grid*grid)``: a cell counts as
    kept when at least half of its area was visible to the teacher."""
    import math

    side = math.isqrt(keep.shape[1])
    return resize_map(keep.view(-1, 1, side, side).float(), grid).flatten(1) >= 0.5


def masked_tokens_on_grid(module: Any, x: Any, channels: int, grid: int) -> Any:
    """:func:`masked_patch_tokens` on the common grid (:func:`on_common_grid`): what the cache stores,
    ``(B, grid*grid, D)``, as small as the student's grid however fine the teacher's."""
    cells = int(module.grid) ** 2
    return on_common_grid(masked_patch_tokens(module, x, channels), read_mask(x[:, channels:], cells).to(x.device),
                          grid)


def teacher_skeleton(ctx: PassContext, teacher: str) -> Any:
    """The teacher built on the meta device: its attributes (``num_blocks``, ``patch_size``, ``grid``, ...)
    without allocating or loading its weights."""
    import torch

    artifact = ctx.teachers[teacher]
    with torch.device("meta"):
        return ctx.plugins.teachers.get(artifact.arch)(**artifact.options)


def consensus_gate(student: Any, teachers: Any, keep: Any, *, alpha: float, temperature: float) -> Any:
    """Per-token teacher weights ``(B, N, T)`` that sum to 1 over the teachers.

    ``student`` is ``(B, N, D)``, ``teachers`` the adapted teacher tokens ``(T, B, N, D)`` and
    ``keep`` ``(T, B, N)`` bool (a teacher's masked tokens get weight 0, unless no teacher keeps
    the token).  The logit of teacher ``t`` is ``alpha * cos(student, t) + (1 - alpha) *
    mean_{u != t} cos(t, u)``, divided by ``temperature``.
    """
    import torch
    import torch.nn.functional as F

    count = teachers.shape[0]
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teachers.float(), dim=-1)
    affinity = torch.einsum("bnd,tbnd->tbn", s, t)
    if count > 1:
        total = t.sum(0, keepdim=True)
        agreement = ((t * total).sum(-1) - (t * t).sum(-1)) / (count - 1)
    else:
        agreement = torch.ones_like(affinity)
    logits = (alpha * affinity + (1.0 - alpha) * agreement) / temperature
    keep = keep.bool() | ~keep.bool().any(0, keepdim=True)
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=0).permute(1, 2, 0)


def token_kl(student: Any, target: Any, temperature: float, visible: Any) -> Any:
    """KL(target || student) of channel softmaxes per token, averaged over the ``visible`` tokens."""
    import torch.nn.functional as F

    log_q = F.log_softmax(student / temperature, dim=-1)
    p = F.softmax(target / temperature, dim=-1)
    per_token = F.kl_div(log_q, p, reduction="none").sum(-1)
    weights = visible.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0) * temperature ** 2


def map_kl(decoded: Any, target: Any, temperature: float) -> Any:
    """KL(target || decoded) of the per-channel softmaxes over positions; both ``(B, D, N)``."""
    import torch.nn.functional as F

    log_q = F.log_softmax(decoded / temperature, dim=-1)
    p = F.softmax(target / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1).mean() * temperature ** 2


def masked_decoder(dim: int) -> Any:
    """The reconstruction decoder: masked positions become a learned mask token, then a 3x3 conv,
    GELU and a 1x1 conv rebuild the whole ``(B, dim, grid, grid)`` map from the visible ones."""
    import torch
    from torch import nn

    class MaskedDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mask_token = nn.Parameter(torch.zeros(dim))
            self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 1))

        def forward(self, feature_map: Any, keep: Any) -> Any:
            size, _, height, width = feature_map.shape
            visible = keep.view(size, 1, height, width)
            return self.body(torch.where(visible, feature_map, self.mask_token.view(1, dim, 1, 1)))

    return MaskedDecoder()


def pca_adapter(tokens: Any, out_dim: int) -> Any:
    """``Linear(D_t -> out_dim)`` + ``LayerNorm(out_dim)``, the linear part set to project on the
    leading principal directions of ``tokens`` ``(images, N, D_t)`` (random directions beyond them)."""
    import torch
    from torch import nn

    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    if len(flat) > _PCA_TOKENS:
        flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:_PCA_TOKENS]]
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    linear = nn.Linear(tokens.shape[-1], out_dim)
    with torch.no_grad():
        rows = min(out_dim, vh.shape[0])
        linear.weight[:rows] = vh[:rows]
        linear.bias.copy_(-linear.weight @ mean)
    return nn.Sequential(linear, nn.LayerNorm(out_dim))


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(ComadDistillation)
