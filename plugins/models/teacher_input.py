"""A teacher fed through its input contract: its own size, channels and normalisation.

Students see the data as it is (``[data] image_size``, values in [0, 1]); a foundation-model
teacher expects its native input (DINO ViT-S/16: 224x224 RGB with ImageNet statistics).
:class:`TeacherView` wraps a teacher module so that every call a distillation method makes
(``embed``, ``patch_tokens``, ``forward_tokens``, ``forward_hidden``, ``forward``) first turns
the student's batch into the teacher's: channels converted, resized with the contract's
interpolation (antialiased when shrinking) and normalised — on whatever device the batch is,
so on the GPU when training runs there.  The contract is the dict of
:func:`distillc.spec.teacher_input` and travels in the teacher artifact's ``meta["input"]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillc.plugins.image_store import LUMA


def to_teacher_input(x: torch.Tensor, contract: dict[str, Any]) -> torch.Tensor:
    """The batch ``x`` (B, C, H, W), values in [0, 1], as the teacher with ``contract`` takes it."""
    channels = int(contract["channels"])
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            luma = x.new_tensor(LUMA).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
    size = int(contract["input_size"])
    if tuple(x.shape[-2:]) != (size, size):
        mode = contract.get("interpolation", "bicubic")
        if mode == "area":
            x = F.interpolate(x, size=(size, size), mode="area")
        elif mode == "nearest":
            x = F.interpolate(x, size=(size, size), mode="nearest")
        else:
            shrink = size < min(x.shape[-2:])
            x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=shrink)
            if mode == "bicubic":  # bicubic overshoots; images stay in their range, as PIL's resize keeps them
                x = x.clamp(0.0, 1.0)
    mean = x.new_tensor(contract["mean"]).view(1, -1, 1, 1)
    std = x.new_tensor(contract["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


class TeacherView(nn.Module):
    """``teacher`` behind its input contract; attributes other than the calls pass through.

    Holds the teacher as ``teacher`` (its state dict keys gain a ``teacher.`` prefix: save
    ``view.teacher``'s, not the view's).
    """

    def __init__(self, teacher: nn.Module, contract: dict[str, Any]):
        super().__init__()
        self.teacher = teacher
        self.contract = dict(contract)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return to_teacher_input(x, self.contract)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.prepare(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.embed(self.prepare(x))

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.patch_tokens(self.prepare(x))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_tokens(self.prepare(x))

    def forward_hidden(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        return self.teacher.forward_hidden(self.prepare(x), blocks)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("teacher"), name)


def with_input(teacher: nn.Module, contract: dict[str, Any] | None) -> nn.Module:
    """``teacher`` behind ``contract``; the teacher itself when there is none (the data fed as it is)."""
    return teacher if contract is None else TeacherView(teacher, contract)


def input_shape(contract: dict[str, Any]) -> list[int]:
    """``[C, H, W]`` of the teacher's input."""
    return [int(contract["channels"]), int(contract["input_size"]), int(contract["input_size"])]
