"""Built-in student architectures."""

from __future__ import annotations

from typing import Any

from distillc import hookimpl


def mobilenetv2(image_size: int, in_chans: int = 3, width: float = 1.0, stem_stride: int | None = None,
                hidden_channels: list[int] | None = None, last_channels: int | None = None) -> Any:
    """MobileNetV2 (width multiplier; ``stem_stride`` 1 = small-input layout, the default up to 64 px)."""
    from distillc.plugins.models.mobilenetv2 import MobileNetV2

    if stem_stride is None:
        stem_stride = 1 if image_size <= 64 else 2
    return MobileNetV2(width=width, stem_stride=stem_stride, in_chans=in_chans,
                       hidden_channels=hidden_channels, last_channels=last_channels)


@hookimpl
def distillc_register_students(registry: Any) -> None:
    registry.add("mobilenetv2", mobilenetv2)
