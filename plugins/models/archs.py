"""Names and sizes of the built-in architectures, importable without torch (for fast validation)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: Option types with the bounds ``validate`` checks (builders annotate their options with them):
#: far above any MCU model or published checkpoint, low enough that a typo such as
#: ``depth = 1000000000000000000`` is refused at once instead of hanging the build.
Blocks = Annotated[int, Field(ge=1, le=64)]  # transformer blocks (ViT-g has 40)
Width = Annotated[int, Field(ge=1, le=8192)]  # embedding and channel widths
Heads = Annotated[int, Field(ge=1, le=128)]
PatchSize = Annotated[int, Field(ge=1, le=1024)]  # at most image_size's own bound
MlpRatio = Annotated[float, Field(gt=0.0, le=16.0)]
VocabSize = Annotated[int, Field(ge=1, le=1_000_000)]
WidthMultiplier = Annotated[float, Field(gt=0.0, le=8.0)]

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
