"""The ``[data] options`` of the detection sources, kept free of torch so ``validate`` stays fast.

:mod:`distillc.plugins.datasets` registers these models with the sources; ``validate`` checks a
spec's ``[data] options`` table against them, and the loaders in
:mod:`distillc.plugins.detection_data` read the validated values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DigitScenesOptions(_Options):
    """``[data] options`` of ``digit-scenes``."""

    scenes: int = Field(1000, ge=2, le=1_000_000, description="scenes in all, split by val_fraction")
    digits_per_scene: list[int] = Field([1, 4], min_length=2, max_length=2,
                                        description="[fewest, most] digits in a scene")
    digit_size: list[float] = Field([0.25, 0.5], min_length=2, max_length=2,
                                    description="[smallest, largest] side of a digit, as a fraction of image_size")
    unseen: list[int] = Field([8, 9], max_length=9, description="digit classes never labelled in training")
    unseen_in_train: Literal["unlabelled", "absent"] = "unlabelled"
    noise: float = Field(0.0, ge=0.0, le=1.0, description="std of Gaussian pixel noise")
    clutter: int = Field(0, ge=0, le=64, description="digit fragments per scene, outside every box")

    @field_validator("digits_per_scene")
    @classmethod
    def _digit_range(cls, value: list[int]) -> list[int]:
        if not 1 <= value[0] <= value[1] <= 8:
            raise ValueError("must be [fewest, most] with 1 <= fewest <= most <= 8")
        return value

    @field_validator("digit_size")
    @classmethod
    def _size_range(cls, value: list[float]) -> list[float]:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError("must be [smallest, largest] with 0 < smallest <= largest <= 1")
        return value

    @field_validator("unseen")
    @classmethod
    def _digits(cls, value: list[int]) -> list[int]:
        if any(not 0 <= d <= 9 for d in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct digits 0..9, leaving at least one seen")
        return sorted(value)


class CocoDetectionOptions(_Options):
    """``[data] options`` of ``coco-detection``; paths are relative to ``data.path``."""

    annotations: str | None = Field(None, description="the instances JSON; default the only .json in path "
                                                       "or path/annotations")
    images: str = Field(".", description="the folder the JSON's file_name entries are relative to")
    val_annotations: str | None = Field(None, description="a JSON of its own for the validation split")
    val_images: str | None = Field(None, description="the validation images' folder; default images")
    resize: Literal["letterbox", "stretch"] = "letterbox"
    unseen: list[str] = Field([], description="category names never labelled in training")

    @model_validator(mode="after")
    def _val_pair(self) -> "CocoDetectionOptions":
        if self.val_images is not None and self.val_annotations is None:
            raise ValueError("val_images is only read with val_annotations")
        return self
