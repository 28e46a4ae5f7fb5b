"""Built-in teacher architectures: the ViT family with timm-compatible weights.

A teacher builder takes ``image_size`` and ``in_chans`` (from ``[data]``) plus the options a
spec may set in its ``[[teachers]]`` entry (``depth`` for shallow demo teachers).
"""

from __future__ import annotations

from typing import Any

from distillc import hookimpl
from distillc.plugins.models.archs import vit_arch_table


def _vit_builder(arch: str) -> Any:
    def build(image_size: int, in_chans: int = 3, depth: int | None = None,
              mlp_ratio: float = 4.0) -> Any:
        from distillc.plugins.models.vit import build_vit

        return build_vit(arch, img_size=image_size, in_chans=in_chans, depth=depth, mlp_ratio=mlp_ratio)

    build.__name__ = arch
    build.__doc__ = f"{arch}: timm-compatible ViT (load DINO/MAE/MoCo v3/iBOT weights without timm)."
    return build


@hookimpl
def distillc_register_teachers(registry: Any) -> None:
    for arch in vit_arch_table():
        registry.add(arch, _vit_builder(arch))
