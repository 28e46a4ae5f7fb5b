"""Built-in student architectures: MobileNetV2, an MCU-sized ViT and a MAX78000-friendly CNN.

A student builder takes ``image_size`` and ``in_chans`` (from ``[data]``) plus the options a spec
may set in ``[student]`` (validated from the type hints). Every student returns its embedding
from ``forward(x) -> (B, embed_dim)``, offers ``forward_stages(x)`` (feature maps for multi-scale
distillation) and ``config()`` (the constructor arguments that rebuild it). This module imports
no torch (the CLI stays fast).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from distillc import hookimpl
from distillc.plugins.models.archs import Blocks, Heads, MlpRatio, PatchSize, Width, WidthMultiplier

#: MobileNetV2's inverted-residual blocks: ``hidden_channels`` has one entry per block.
MOBILENETV2_BLOCKS = 17


def mobilenetv2(image_size: int, in_chans: int = 3, width: WidthMultiplier = 1.0,
                stem_stride: Annotated[int, Field(ge=1, le=2)] | None = None,
                hidden_channels: Annotated[list[Width], Field(min_length=MOBILENETV2_BLOCKS,
                                                              max_length=MOBILENETV2_BLOCKS)] | None = None,
                last_channels: Width | None = None) -> Any:
    """MobileNetV2 (width multiplier, usually 0.35..1.0; ``stem_stride`` 1 = small-input layout,
    the default up to 64 px)."""
    from distillc.plugins.models.mobilenetv2 import MobileNetV2

    if stem_stride is None:
        stem_stride = 1 if image_size <= 64 else 2
    return MobileNetV2(width=width, stem_stride=stem_stride, in_chans=in_chans,
                       hidden_channels=hidden_channels, last_channels=last_channels)


def vit_mcu(image_size: int, in_chans: int = 3, patch_size: PatchSize = 4, dim: Width = 64, depth: Blocks = 6,
            heads: Heads = 2, mlp_ratio: MlpRatio = 2.0, act: Literal["relu", "gelu"] = "relu") -> Any:
    """An MCU-sized ViT (about 208K parameters at the defaults and 32 px); token API for CoMAD; ONNX opset 13."""
    from distillc.plugins.models.vit_student import MCUViT

    return MCUViT(image_size=image_size, patch_size=patch_size, in_chans=in_chans, dim=dim, depth=depth,
                  heads=heads, mlp_ratio=mlp_ratio, act=act)


def ai8x_cnn(image_size: int, in_chans: int = 3, width: Annotated[int, Field(ge=1, le=256)] = 24,
             embed_dim: Annotated[int, Field(ge=1, le=1024)] = 128,
             convs_per_stage: Annotated[int, Field(ge=1, le=16)] = 2, pool: Literal["max", "avg"] = "max") -> Any:
    """A MAX78000-friendly CNN: 3x3/1x1 convs, stride 1, pooling to downsample, no depthwise (about 215K weights)."""
    from distillc.passes.max78000.ai8x import Ai8xCNN

    return Ai8xCNN(image_size=image_size, in_chans=in_chans, width=width, embed_dim=embed_dim,
                   convs_per_stage=convs_per_stage, pool=pool)


@hookimpl
def distillc_register_students(registry: Any) -> None:
    registry.add("mobilenetv2", mobilenetv2)
    registry.add("vit-mcu", vit_mcu)
    registry.add("ai8x-cnn", ai8x_cnn)
