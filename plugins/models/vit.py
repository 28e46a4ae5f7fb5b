"""Vision Transformers with timm-compatible state-dict keys, written without timm.

The module names and parameter shapes match timm's ``VisionTransformer`` (and the DINO, MAE,
MoCo v3 and iBOT reference code, which share them), so their checkpoints load as they are::

    cls_token (1, 1, D)    pos_embed (1, 1 + N, D)    patch_embed.proj.{weight, bias}
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 .{weight, bias}
    norm.{weight, bias}    head.{weight, bias} (only when num_classes > 0)

Pre-norm blocks, LayerNorm eps 1e-6, GELU, a biased qkv projection, no layer scale.
Checkpoints trained at another resolution are adapted by
:func:`distillc.plugins.models.checkpoint.load_into`, which resamples ``pos_embed``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillc.errors import SpecError
from distillc.plugins.models.archs import vit_arch_table

_LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided convolution, flattened to (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused, biased qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def extra_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """MACs of the two attention products (q @ k^T and attn @ v), which are not layers.

        Used by :func:`distillc.plugins.models.count_macs`; qkv and proj count as Linear.
        """
        batch, tokens, dim = inputs[0].shape
        return 2 * batch * tokens * tokens * dim


class Mlp(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAPI:
    """The token API shared by every ViT here (the teachers and the ``vit-mcu`` student).

    A class using it has ``cls_token``, ``pos_embed``, ``blocks``, ``norm``, ``embed_dim``,
    ``grid``, ``num_blocks`` and ``_embed_tokens(x) -> (B, 1 + N, D)``; ``_model_name`` names it
    in errors.
    """

    _model_name = "ViT"

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _as_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens of ``tokens`` (B, 1 + N, D) as a map (B, D, grid, grid)."""
        # reshape(-1, ...) rather than the batch size: the ONNX graph then has no Shape op.
        return tokens[:, 1:].transpose(1, 2).reshape(-1, self.embed_dim, self.grid, self.grid)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + N, D); token 0 is CLS."""
        x = self._embed_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_hidden(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Outputs of the listed blocks (0-based, negative counts from the end), in that order.

        Each is (B, 1 + N, D), taken straight from the block (before the final norm).
        Blocks after the deepest one asked for are not run.
        """
        wanted = []
        for index in blocks:
            if not -self.num_blocks <= index < self.num_blocks:
                raise SpecError(f"{self._model_name} block index {index} is out of range for a "
                                f"{self.num_blocks}-block model")
            wanted.append(index % self.num_blocks)
        if not wanted:
            return []
        outputs: dict[int, torch.Tensor] = {}
        x = self._embed_tokens(x)
        for i in range(max(wanted) + 1):
            x = self.blocks[i](x)
            outputs[i] = x
        return [outputs[i] for i in wanted]

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens as a feature map, (B, D, grid, grid)."""
        return self._as_map(self.forward_tokens(x))


class VisionTransformer(TokenAPI, nn.Module):
    """A ViT whose ``state_dict`` keys and shapes equal timm's ``VisionTransformer``.

    Args:
        img_size: input height and width (square), a multiple of ``patch_size``.
        patch_size: side of a square patch.
        in_chans: input channels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width as a multiple of D.
        num_classes: adds a linear ``head`` on the CLS embedding when > 0.
        pool: the embedding: ``"cls"`` (the final-normed CLS token, as DINO, MoCo v3, iBOT and
            MAE's linear probe use) or ``"avg"`` (the mean of the last block's patch tokens,
            then the final norm: timm's global pool with ``fc_norm``, which is how a fine-tuned
            MAE checkpoint embeds; its ``fc_norm`` loads as ``norm``).

    Attributes:
        embed_dim, patch_size, grid (patches per side), num_blocks.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, num_classes: int = 0, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "avg"):
            raise SpecError(f"ViT pool must be 'cls' or 'avg', got {pool!r}")
        if patch_size < 1 or img_size < patch_size or img_size % patch_size:
            raise SpecError(f"ViT img_size {img_size} must be a positive multiple of "
                            f"patch_size {patch_size}")
        if num_heads < 1 or embed_dim % num_heads:
            raise SpecError(f"ViT num_heads {num_heads} must divide embed_dim {embed_dim}")
        if depth < 1:
            raise SpecError(f"ViT depth must be >= 1, got {depth}")
        if num_classes < 0:
            raise SpecError(f"ViT num_classes must be >= 0, got {num_classes}")
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_blocks = depth
        self.num_classes = num_classes
        self.pool = pool

        # Registration order gives timm's state_dict order: own parameters, then children.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self._init_weights()

    def _embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D): the final-normed CLS token, or with ``pool = "avg"`` the
        final norm of the mean patch token."""
        if self.pool == "avg":
            x = self._embed_tokens(x)
            for block in self.blocks:
                x = block(x)
            return self.norm(x[:, 1:].mean(dim=1))
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS embedding (B, D), or head logits (B, num_classes) when a head exists."""
        features = self.embed(x)
        if self.head is not None:
            return self.head(features)
        return features


VIT_ARCHS: dict[str, dict[str, int]] = vit_arch_table()
"""Named ViT configurations: ``vit_{tiny,small,base}_patch{2,4,8,16}``, all 12 blocks deep.

The table itself lives in the torch-free :mod:`.archs` so that spec validation can list it.
"""

_CONSTRUCTOR_ARGS = frozenset(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}


def build_vit(name: str, img_size: int = 224, in_chans: int = 3, num_classes: int = 0,
              depth: int | None = None, **overrides) -> VisionTransformer:
    """Build a named ViT from :data:`VIT_ARCHS`.

    ``depth`` overrides the block count (shallow teachers for tests and demos); other
    constructor arguments (``mlp_ratio``, ``num_heads``, ...) may be overridden by keyword.
    An unknown name or keyword raises :class:`SpecError` listing the valid ones.
    """
    if name not in VIT_ARCHS:
        raise SpecError(f"unknown ViT arch {name!r}; valid: {', '.join(sorted(VIT_ARCHS))}")
    unknown = sorted(set(overrides) - _CONSTRUCTOR_ARGS)
    if unknown:
        raise SpecError(f"unknown ViT option(s) {unknown}; valid: {sorted(_CONSTRUCTOR_ARGS)}")
    kwargs = dict(VIT_ARCHS[name])
    if depth is not None:
        kwargs["depth"] = depth
    kwargs.update(overrides)
    return VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                             **kwargs)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a (1, 1 + g*g, D) position embedding to (1, 1 + grid*grid, D).

    The CLS position is kept; the g x g patch positions are interpolated bicubically
    (antialiased when shrinking, as timm does). Returns the input unchanged when it already
    fits, or when it is not a square-grid embedding with a CLS token (the shape check in
    :func:`load_into` then reports it).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        return pos_embed
    patches = pos_embed.shape[1] - 1
    old_grid = int(round(patches ** 0.5))
    if old_grid < 1 or old_grid * old_grid != patches or old_grid == grid:
        return pos_embed
    dim = pos_embed.shape[2]
    cls_part, patch_part = pos_embed[:, :1], pos_embed[:, 1:]
    patch_part = patch_part.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    patch_part = F.interpolate(patch_part, size=(grid, grid), mode="bicubic",
                               align_corners=False, antialias=grid < old_grid)
    patch_part = patch_part.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_part, patch_part], dim=1)
