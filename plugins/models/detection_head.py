"""The open-vocabulary detection head ``detect.open-vocab`` puts on a student's feature map.

One map of the student (``forward_stages(x)[stage]``, a grid of ``G x G`` cells at stride
``image_size / G``) goes through a 3x3 convolution (BatchNorm, ReLU6) and a 1x1 convolution to
``5 + E`` channels per cell, in this order (:data:`LAYOUT`)::

    0      objectness logit           (sigmoid: the probability that an object's centre region is here)
    1, 2   box centre x, y            in cells, from the cell's top-left corner (0.5 = the cell's centre)
    3, 4   log box width, height      in cells (exp(value) * stride = pixels)
    5 ..   Matryoshka embedding       E = max(dims) values; every prefix [:d] is an embedding of its own

A student whose ``forward_stages`` takes ``upto`` (MobileNetV2) stops at the head's map, so the
later stages are neither trained nor exported.  The model's output is that one tensor, ``(B, 5 + E, G, G)``: the INT8 backend lowers it as any
other convolution, and the bundle's ``distillc_detect`` decodes it (scores, boxes, NMS) in C.

A recipe (``TorchModel.head``) rebuilds the head: ``{"type": "detection", "pass": "detect.open-vocab",
"stage": -1, "in_channels": 64, "hidden": 64, "embed_dim": 64, "dims": [16, 32, 64], ...}``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from distillc.errors import DistillcError

#: Channel of each output field (the embedding runs from ``EMBED`` to the end).
OBJECTNESS, CENTER_X, CENTER_Y, LOG_W, LOG_H, EMBED = 0, 1, 2, 3, 4, 5
LAYOUT = ("objectness", "center_x", "center_y", "log_w", "log_h", "embedding")


class DetectionHead(nn.Module):
    """3x3 conv + BN + ReLU6, then a 1x1 conv to ``5 + embed_dim`` channels per cell."""

    def __init__(self, in_channels: int, hidden: int, embed_dim: int, prior: float = 0.01):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU6(inplace=False)
        self.out = nn.Conv2d(hidden, EMBED + embed_dim, 1)
        self.embed_dim = int(embed_dim)
        nn.init.normal_(self.out.weight, 0.0, 0.01)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():  # RetinaNet's prior: few cells hold an object at the start
            self.out.bias[OBJECTNESS] = float(torch.log(torch.tensor(prior / (1.0 - prior))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.bn(self.conv(features))))


class WithDetectionHead(nn.Module):
    """A student whose ``forward`` is the detection map: ``head(backbone.forward_stages(x)[stage])``.

    ``embed_dim`` is the head's embedding width and ``head_recipe`` the dict that rebuilds it.
    """

    def __init__(self, backbone: nn.Module, head: DetectionHead, recipe: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stage = int(recipe.get("stage", -1))
        self.embed_dim = head.embed_dim
        self.head_recipe = dict(recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage >= 0 and self._stops_early:  # later stages are neither run nor exported
            return self.head(self.backbone.forward_stages(x, upto=self.stage)[self.stage])
        return self.head(self.backbone.forward_stages(x)[self.stage])

    @property
    def _stops_early(self) -> bool:
        return "upto" in inspect.signature(self.backbone.forward_stages).parameters

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The detection map (what ``forward`` returns), for code that asks every model for ``embed``."""
        return self.forward(x)


def feature_map_shape(backbone: nn.Module, image_size: int, in_chans: int, stage: int) -> tuple[int, int, int]:
    """(channels, rows, cols) of ``backbone.forward_stages``'s map ``stage`` for one image."""
    if not callable(getattr(backbone, "forward_stages", None)):
        raise DistillcError(f"the student ({type(backbone).__name__}) has no forward_stages: a detection head "
                            "needs its feature maps")
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        maps = backbone.forward_stages(torch.zeros(1, in_chans, image_size, image_size))
    backbone.train(was_training)
    if not -len(maps) <= stage < len(maps):
        raise DistillcError(f"stage {stage} is not one of the student's {len(maps)} feature maps "
                            f"(0 .. {len(maps) - 1}, or -1 for the last)")
    feature = maps[stage]
    if feature.dim() != 4:
        raise DistillcError(f"the student's feature map {stage} has shape {tuple(feature.shape)}, not (B, C, H, W)")
    return int(feature.shape[1]), int(feature.shape[2]), int(feature.shape[3])


def attach_detection_head(backbone: nn.Module, recipe: dict[str, Any]) -> WithDetectionHead:
    """Wrap ``backbone`` with the detection head the recipe describes."""
    if recipe.get("type") != "detection":
        raise DistillcError(f"not a detection head recipe: {recipe.get('type')!r}")
    head = DetectionHead(int(recipe["in_channels"]), int(recipe["hidden"]), int(recipe["embed_dim"]))
    return WithDetectionHead(backbone, head, recipe)
