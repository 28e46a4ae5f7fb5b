"""An MCU-sized Vision Transformer student (``vit-mcu``).

The defaults (32x32 input, patch 4, width 64, 6 blocks, 2 heads, MLP ratio 2) give about 208K
parameters and 65 tokens: small enough for a microcontroller's flash in int8, and it speaks the
teachers' token API (``forward_tokens``, ``forward_hidden``, ``patch_tokens``), so token-based
distillation (e.g. CoMAD) can align student and teacher tokens.

It exports to ONNX with ``torch.onnx.export(..., dynamo=False, opset_version=13)``, and its
graph keeps to few, simple operators. What an int8 MCU backend needs to run it:

- ``Conv`` (the patch embedding: kernel = stride = patch) and ``MatMul``/``Gemm`` with weights
  (the q, k, v, projection and MLP layers), ``Add`` (positions, biases, residuals);
- ``MatMul`` of two activations (``q @ k^T`` and ``attn @ v``), ``Mul`` by a constant (the
  ``1/sqrt(head_dim)`` scale, applied to ``q``), ``Softmax`` (an exp table in int8 kernels);
- ``LayerNorm``: at opset 13 it is ``ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul, Add`` (an int8
  backend typically runs it in float, or with an integer reciprocal square root);
- ``Relu`` (the default ``act``), or ``Erf``-based GELU with ``act = "gelu"`` (a lookup table);
- data movement: ``Reshape``, ``Transpose``, ``Slice`` and ``Concat`` (the CLS token joins the
  patches), ``Gather`` (the CLS token out).

No ``Shape``/``Expand`` ops, no ``scaled_dot_product_attention``, no 5-D tensors, no dynamic
control flow; the test suite pins that operator set.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distillc.errors import SpecError
from distillc.plugins.models.vit import TokenAPI

_LN_EPS = 1e-6
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Attention(nn.Module):
    """Multi-head self-attention from separate q, k, v projections and explicit matmuls."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.tokens = tokens
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (B, heads, N, head_dim); -1 keeps the batch free without Shape ops.
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split(self.q(x) * self.scale)
        k = self._split(self.k(x))
        v = self._split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        return self.proj(out)

    def extra_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """MACs of ``q @ k^T`` and ``attn @ v`` (the projections count as Linear layers)."""
        batch, tokens, dim = inputs[0].shape
        return 2 * batch * tokens * tokens * dim


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: float, act: str):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), _ACTIVATIONS[act](), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MCUViT(TokenAPI, nn.Module):
    """A small ViT student: patch embedding, CLS token, learned positions, pre-norm blocks.

    Args:
        image_size: input side, a multiple of ``patch_size``.
        patch_size: side of a square patch.
        in_chans: input channels.
        dim: token width, which is also ``embed_dim``.
        depth: transformer blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        act: ``"relu"`` (cheapest on an MCU) or ``"gelu"``.

    Attributes:
        embed_dim, grid, num_blocks, stage_channels (one map per block, see
        :meth:`forward_stages`).
    """

    _model_name = "vit-mcu"

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 64,
                 depth: int = 6, heads: int = 2, mlp_ratio: float = 2.0, act: str = "relu"):
        super().__init__()
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise SpecError(f"vit-mcu image_size {image_size} must be a positive multiple of "
                            f"patch_size {patch_size}")
        if heads < 1 or dim % heads:
            raise SpecError(f"vit-mcu heads {heads} must divide dim {dim}")
        if depth < 1:
            raise SpecError(f"vit-mcu depth must be >= 1, got {depth}")
        if not mlp_ratio > 0:
            raise SpecError(f"vit-mcu mlp_ratio must be > 0, got {mlp_ratio}")
        if act not in _ACTIVATIONS:
            raise SpecError(f"vit-mcu act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.mlp_ratio = float(mlp_ratio)
        self.act = act

        self.embed_dim = self.dim
        self.grid = image_size // patch_size
        self.num_blocks = depth
        tokens = 1 + self.grid * self.grid
        self.stage_channels = [dim] * depth

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.blocks = nn.ModuleList(Block(dim, heads, tokens, mlp_ratio, act) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self._init_weights()

    def config(self) -> dict:
        """Constructor kwargs that rebuild this exact architecture (weights aside)."""
        return {"image_size": self.image_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
                "dim": self.dim, "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "act": self.act}

    def _embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).reshape(-1, self.dim, self.grid * self.grid).transpose(1, 2)
        # The CLS token broadcast to the batch by arithmetic, not expand(x.shape[0]): the ONNX
        # graph then has no Shape/Expand/Where ops, only Slice, Mul and Add.
        cls = tokens[:, :1] * 0.0 + self.cls_token
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens as maps (B, dim, grid, grid) after every block; the last one is normed
        (it equals :meth:`patch_tokens`). A ViT has one resolution, so its stages are depths."""
        x = self._embed_tokens(x)
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            maps.append(self._as_map(self.norm(x) if i == self.num_blocks - 1 else x))
        return maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The final-normed CLS token, (B, dim)."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, embed_dim)."""
        return self.embed(x)
