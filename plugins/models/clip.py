"""CLIP (Radford et al., 2021) with OpenAI's state-dict keys, written without open_clip.

The module names and parameter shapes equal OpenAI's ``clip/model.py`` (open_clip uses the same
names for the OpenAI-style ViT models), so their checkpoints load as they are. ViT-B/32::

    visual.conv1.weight (768, 3, 32, 32), no bias     visual.class_embedding (768)
    visual.positional_embedding (50, 768)             visual.ln_pre / visual.ln_post
    visual.transformer.resblocks.{i}.attn.in_proj_weight (2304, 768) / in_proj_bias (2304)
                                    .attn.out_proj / ln_1 / mlp.c_fc / mlp.c_proj / ln_2
    visual.proj (768, 512)
    token_embedding.weight (49408, 512)    positional_embedding (77, 512)
    transformer.resblocks.{i}...  (width 512, 8 heads, 12 blocks)
    ln_final    text_projection (512, 512)    logit_scale ()

Pre-norm blocks, LayerNorm eps 1e-5, QuickGELU (``x * sigmoid(1.702 x)``), a causal mask in
the text tower, whose embedding is read at the end-of-text token: the position of the largest
token id (OpenAI's tokenizer gives EOT the largest id, 49407).

:meth:`CLIP.encode_text` takes token ids (``(B, 77)`` int64): from the tokenizer a teacher entry
names (:mod:`.clip_tokenizer`, OpenAI's BPE file or a Hugging Face ``tokenizer.json``), or made
elsewhere and stored in a file; passes that need class embeddings can equally read precomputed
text embeddings.

Smaller inputs work with a smaller position grid: :func:`~.checkpoint.load_into` resamples
``visual.positional_embedding`` (see :mod:`.keymaps`). OpenAI's TorchScript ``.pt`` files must be
converted to a state dict once (the loader says how); open_clip's files load directly.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillc.errors import DistillcError, SpecError
from distillc.plugins.models.archs import CLIP_ARCHS

_LN_EPS = 1e-5


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation, ``x * sigmoid(1.702 x)``; CLIP was trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), batch first, optionally causal."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def extra_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """MACs of the in-projection and the two attention products (not nn.Linear layers)."""
        batch, tokens, dim = inputs[0].shape
        return batch * tokens * dim * 3 * dim + 2 * batch * tokens * tokens * dim


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with ``mlp = c_fc, QuickGELU, c_proj``."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.attn = SelfAttention(dim, heads)
        self.ln_1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(dim, dim * 4),
            gelu=QuickGELU(),
            c_proj=nn.Linear(dim * 4, dim),
        ))
        self.ln_2 = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, keys ``resblocks.{i}.*``."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, causal) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTower(nn.Module):
    """CLIP's image encoder (``visual.*``): patches, class token, ln_pre, blocks, ln_post, proj."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, width: int, layers: int,
                 heads: int, output_dim: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.width = width
        self.conv1 = nn.Conv2d(in_chans, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(1 + self.grid * self.grid, width))
        self.ln_pre = nn.LayerNorm(width, eps=_LN_EPS)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, eps=_LN_EPS)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class token + patch tokens + positions, after ln_pre: (B, 1 + N, width)."""
        tokens = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, tokens], dim=1) + self.positional_embedding)


class CLIP(nn.Module):
    """CLIP's image tower (a teacher) and, optionally, its text tower, with OpenAI's keys.

    Args:
        image_size: input side; a multiple of ``patch_size``. Below the checkpoint's 224 px the
            position grid is resampled when weights load.
        patch_size, width, layers, heads: the image transformer.
        output_dim: width of the joint image-text embedding (what :meth:`embed` returns).
        text: build the text tower; ``False`` for image-only use (its keys are then dropped
            from a full checkpoint).
        context_length, vocab_size, text_width, text_heads, text_layers: the text transformer.

    Attributes:
        embed_dim (= output_dim), token_dim (= width, the width of tokens and hidden states),
        patch_size, grid, num_blocks, has_text_tower, context_length.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 32, in_chans: int = 3, width: int = 768,
                 layers: int = 12, heads: int = 12, output_dim: int = 512, text: bool = True,
                 context_length: int = 77, vocab_size: int = 49408, text_width: int = 512,
                 text_heads: int = 8, text_layers: int = 12):
        super().__init__()
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise SpecError(f"CLIP image_size {image_size} must be a positive multiple of "
                            f"patch_size {patch_size}")
        for name, dim, count in (("width", width, heads), ("text_width", text_width, text_heads)):
            if count < 1 or dim % count:
                raise SpecError(f"CLIP heads ({count}) must divide {name} ({dim})")
        if layers < 1 or (text and text_layers < 1):
            raise SpecError(f"CLIP needs at least one block per tower, got {layers} and {text_layers}")

        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = output_dim
        self.token_dim = width
        self.num_blocks = layers
        self.has_text_tower = bool(text)
        self.context_length = context_length
        self.vocab_size = vocab_size

        self.visual = VisionTower(image_size, patch_size, in_chans, width, layers, heads, output_dim)
        self.grid = self.visual.grid
        if text:
            self.transformer = Transformer(text_width, text_layers, text_heads, causal=True)
            self.token_embedding = nn.Embedding(vocab_size, text_width)
            self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
            self.ln_final = nn.LayerNorm(text_width, eps=_LN_EPS)
            self.text_projection = nn.Parameter(torch.empty(text_width, output_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI's initialisation (for teachers trained from scratch by the spec)."""
        visual = self.visual
        scale = visual.width ** -0.5
        nn.init.normal_(visual.class_embedding, std=scale)
        nn.init.normal_(visual.positional_embedding, std=scale)
        nn.init.normal_(visual.proj, std=scale)
        nn.init.normal_(visual.conv1.weight, std=0.02)
        towers = [visual.transformer]
        if self.has_text_tower:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
            towers.append(self.transformer)
        for tower in towers:
            width, layers = tower.width, len(tower.resblocks)
            proj_std = width ** -0.5 * (2 * layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.zeros_(block.mlp.c_fc.bias)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
                nn.init.zeros_(block.mlp.c_proj.bias)

    # -- image tower: the teacher API ---------------------------------------------------------

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All image tokens after ``ln_post``, (B, 1 + N, width); token 0 is the class token."""
        return self.visual.ln_post(self.visual.transformer(self.visual.embed_tokens(x)))

    def forward_hidden(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Outputs of the listed image blocks (0-based, negative counts from the end), in order.

        Each is (B, 1 + N, width), straight from the block (before ``ln_post``); blocks after the
        deepest one asked for are not run.
        """
        wanted = []
        for index in blocks:
            if not -self.num_blocks <= index < self.num_blocks:
                raise SpecError(f"CLIP block index {index} is out of range for a "
                                f"{self.num_blocks}-block image tower")
            wanted.append(index % self.num_blocks)
        if not wanted:
            return []
        outputs: dict[int, torch.Tensor] = {}
        x = self.visual.embed_tokens(x)
        for i in range(max(wanted) + 1):
            x = self.visual.transformer.resblocks[i](x)
            outputs[i] = x
        return [outputs[i] for i in wanted]

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after ``ln_post`` as a feature map, (B, width, grid, grid)."""
        tokens = self.forward_tokens(x)[:, 1:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.token_dim, self.grid, self.grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The projected image embedding, ``ln_post(class token) @ proj``: (B, output_dim)."""
        return self.forward_tokens(x)[:, 0] @ self.visual.proj

    encode_image = embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projected image embedding (B, output_dim)."""
        return self.embed(x)

    # -- text tower -----------------------------------------------------------------------------

    def encode_text(self, token_ids: torch.Tensor, eot_id: int | None = None) -> torch.Tensor:
        """Projected text embeddings (B, output_dim) of token ids (B, context_length), int64.

        Read at each row's end-of-text token: the first position holding ``eot_id`` when it is
        given (a tokenizer's end-of-text id; Hugging Face's pooling), else the position of the
        row's largest id (OpenAI's, where end-of-text is the largest id). Both agree for OpenAI's
        tokenizer. The causal mask makes that embedding independent of every token after it
        (padding included).
        """
        if not self.has_text_tower:
            raise DistillcError("this CLIP teacher was built without its text tower (text = false); "
                                "use precomputed text embeddings or build it with text = true")
        if token_ids.dim() != 2 or token_ids.shape[1] != self.context_length:
            raise DistillcError(f"CLIP token ids must be (B, {self.context_length}), got "
                                f"{tuple(token_ids.shape)}")
        if token_ids.dtype.is_floating_point:
            raise DistillcError(f"CLIP token ids must be integers, got {token_ids.dtype}")
        x = self.token_embedding(token_ids.long()) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        if eot_id is None:
            eot = token_ids.argmax(dim=-1)
        else:
            found = token_ids == eot_id
            if not bool(found.any(dim=-1).all()):
                raise DistillcError(f"CLIP token ids: a row without the end-of-text token {eot_id}")
            eot = found.int().argmax(dim=-1)  # the first occurrence
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


def build_clip(name: str, image_size: int = 224, in_chans: int = 3, text: bool = True,
               **overrides: int | None) -> CLIP:
    """Build a named CLIP from :data:`~.archs.CLIP_ARCHS`, with overrides (None = keep).

    ``width``/``text_width`` overrides without their heads use OpenAI's rule, heads = width // 64
    (at least 1), so narrow test models keep every key name.
    """
    if name not in CLIP_ARCHS:
        raise SpecError(f"unknown CLIP arch {name!r}; valid: {', '.join(sorted(CLIP_ARCHS))}")
    config = dict(CLIP_ARCHS[name])
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(config))
    if unknown:
        raise SpecError(f"unknown CLIP option(s) {unknown}; valid: {sorted(config)}")
    if "width" in given and "heads" not in given:
        given["heads"] = max(1, given["width"] // 64)
    if "text_width" in given and "text_heads" not in given:
        given["text_heads"] = max(1, given["text_width"] // 64)
    config.update(given)
    return CLIP(image_size=image_size, in_chans=in_chans, text=text, **config)
