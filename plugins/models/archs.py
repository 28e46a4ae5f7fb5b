"""Names and sizes of the built-in architectures, importable without torch (for fast validation)."""

from __future__ import annotations

#: ViT sizes: name -> (embed_dim, num_heads); every size is 12 blocks deep, as in timm.
VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
VIT_PATCHES = (2, 4, 8, 16)


def vit_arch_table() -> dict[str, dict[str, int]]:
    """``vit_{tiny,small,base}_patch{2,4,8,16}`` -> constructor arguments."""
    return {
        f"vit_{size}_patch{patch}": {"embed_dim": dim, "num_heads": heads, "depth": 12, "patch_size": patch}
        for size, (dim, heads) in VIT_SIZES.items()
        for patch in VIT_PATCHES
    }


#: CLIP image+text configurations (OpenAI's ``build_model`` figures): name -> constructor
#: arguments of :class:`distillc.plugins.models.clip.CLIP`. Heads are width // 64, as in OpenAI's code.
CLIP_ARCHS = {
    "clip_vitb32": {
        "patch_size": 32, "width": 768, "layers": 12, "heads": 12, "output_dim": 512,
        "context_length": 77, "vocab_size": 49408, "text_width": 512, "text_heads": 8, "text_layers": 12,
    },
}
