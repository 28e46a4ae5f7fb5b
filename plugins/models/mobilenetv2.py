"""MobileNetV2 (Sandler et al., 2018), the default microcontroller student.

Layout (``t`` expansion, ``c`` output channels before the width multiplier, ``n`` blocks,
``s`` stride of the first block of the stage)::

    stem   conv3x3(32), stride = stem_stride
    t=1 c=16  n=1 s=1
    t=6 c=24  n=2 s=2   (s=1 when stem_stride == 1)
    t=6 c=32  n=3 s=2
    t=6 c=64  n=4 s=2
    t=6 c=96  n=3 s=1
    t=6 c=160 n=3 s=2
    t=6 c=320 n=1 s=1
    last   conv1x1(last_channels), then global average pooling

``stem_stride=2`` is the ImageNet network (224 -> 7x7 before pooling). ``stem_stride=1`` is
the small-input (CIFAR) layout: the stem and the first stride-2 stage both keep the
resolution, so a 32x32 input reaches 4x4 after three stride-2 stages (32 -> 16 -> 8 -> 4).
At width 0.35 that layout has 15.6M MACs and 382K conv weights per 32x32 image.

Channel counts are ``c * width`` rounded to a multiple of 8 (never below 8, and never more
than 10% below the exact value), the convention of the paper's reference code and
torchvision. The expansion width of each block is ``in_channels * t`` unless
``hidden_channels`` overrides it, which lets a pruning pass shrink blocks and rebuild the
model from :meth:`MobileNetV2.config`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from distillc.errors import SpecError

# (expansion t, output channels c, repeats n, stride s) of the paper's Table 2.
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


def round_channels(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (the MobileNet convention).

    Rounds to the nearest multiple, never below ``divisor``, and goes one step up when
    rounding down would lose more than 10% of the channels.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, followed by ReLU6 unless ``act`` is False.

    Children are named ``conv``, ``bn`` and ``act`` so that passes (pruning, quantization)
    can address them by readable paths such as ``blocks.3.expand.conv``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True):
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_ch),
        )
        if act:
            layers["act"] = nn.ReLU6(inplace=False)
        super().__init__(layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with a skip when shapes match.

    A block with expansion 1 has no expand convolution; its depthwise convolution runs on
    the input channels directly.
    """

    def __init__(self, in_ch: int, hidden_ch: int, out_ch: int, stride: int, expand: bool):
        super().__init__()
        self.in_channels = in_ch
        self.hidden_channels = hidden_ch
        self.out_channels = out_ch
        self.stride = stride
        self.expand = ConvBNAct(in_ch, hidden_ch, 1) if expand else nn.Identity()
        self.depthwise = ConvBNAct(hidden_ch, hidden_ch, 3, stride, groups=hidden_ch)
        self.project = ConvBNAct(hidden_ch, out_ch, 1, act=False)
        # Fixed at construction, so forward has no data-dependent branch (fx/ONNX friendly).
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = x + out
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 returning a pooled embedding (or logits when ``num_classes > 0``).

    Args:
        width: width multiplier applied to every stage and the stem.
        stem_stride: 2 for the ImageNet layout, 1 for the small-input (CIFAR) layout,
            which also makes the second stage stride 1 (see the module docstring).
        in_chans: input channels.
        hidden_channels: per-block expansion widths (one per inverted-residual block, 17 in
            all), overriding ``in_channels * t``. A block with expansion 1 has no expand
            convolution, so its entry must equal its input channels.
        last_channels: channels of the final 1x1 convolution, i.e. ``embed_dim``. Default:
            1280 for ``width <= 1``, else ``1280 * width`` rounded (torchvision's rule).
            Tiny students usually want a smaller value.
        num_classes: adds a linear classifier on the embedding when > 0.

    Attributes:
        embed_dim: channels of the pooled embedding.
        blocks: the inverted-residual blocks, in order.
        stage_channels: channels of each map :meth:`forward_stages` returns.
    """

    def __init__(self, width: float = 1.0, stem_stride: int = 2, in_chans: int = 3,
                 hidden_channels: list[int] | None = None, last_channels: int | None = None,
                 num_classes: int = 0):
        super().__init__()
        if not width > 0:
            raise SpecError(f"MobileNetV2 width must be > 0, got {width!r}")
        if stem_stride not in (1, 2):
            raise SpecError(f"MobileNetV2 stem_stride must be 1 or 2, got {stem_stride!r}")
        if in_chans < 1:
            raise SpecError(f"MobileNetV2 in_chans must be >= 1, got {in_chans!r}")
        if num_classes < 0:
            raise SpecError(f"MobileNetV2 num_classes must be >= 0, got {num_classes!r}")
        if last_channels is None:
            last_channels = round_channels(_LAST_CHANNELS * max(1.0, width))
        if last_channels < 1:
            raise SpecError(f"MobileNetV2 last_channels must be >= 1, got {last_channels!r}")

        self.width = float(width)
        self.stem_stride = int(stem_stride)
        self.in_chans = int(in_chans)
        self.num_classes = int(num_classes)

        # (expansion, out_channels, stride) for each block, in the chosen layout.
        plan: list[tuple[int, int, int]] = []
        for index, (t, c, n, s) in enumerate(_STAGES):
            if index == 1 and stem_stride == 1:
                s = 1  # small-input layout: keep full resolution through the 24-channel stage
            for repeat in range(n):
                plan.append((t, round_channels(c * width), s if repeat == 0 else 1))

        if hidden_channels is not None:
            hidden_channels = [int(h) for h in hidden_channels]
            if len(hidden_channels) != len(plan):
                raise SpecError(f"MobileNetV2 hidden_channels needs {len(plan)} entries "
                                f"(one per block), got {len(hidden_channels)}")
            bad = [i for i, h in enumerate(hidden_channels) if h < 1]
            if bad:
                raise SpecError(f"MobileNetV2 hidden_channels must be >= 1; blocks {bad} are not")

        stem_ch = round_channels(_STEM_CHANNELS * width)
        self.stem = ConvBNAct(in_chans, stem_ch, 3, stem_stride)

        blocks = []
        in_ch = stem_ch
        for i, (t, out_ch, stride) in enumerate(plan):
            hidden = in_ch * t if hidden_channels is None else hidden_channels[i]
            if t == 1 and hidden != in_ch:
                raise SpecError(f"MobileNetV2 block {i} has no expansion, so hidden_channels[{i}] "
                                f"must equal its input channels {in_ch}, got {hidden}")
            blocks.append(InvertedResidual(in_ch, hidden, out_ch, stride, expand=t != 1))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.last_conv = ConvBNAct(in_ch, last_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = int(last_channels)
        self.classifier = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else None

        # A stage ends where the next block halves the resolution. The last stage ends with
        # last_conv, so its map is the one that gets pooled.
        ends = [i for i in range(len(blocks) - 1) if blocks[i + 1].stride != 1]
        self._stage_ends = tuple(ends)
        self.stage_channels = [blocks[i].out_channels for i in ends] + [self.embed_dim]

        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    @property
    def hidden_channels(self) -> list[int]:
        """The expansion width of every block (what ``config()`` records)."""
        return [block.hidden_channels for block in self.blocks]

    def config(self) -> dict:
        """Constructor kwargs that rebuild this exact architecture (weights aside)."""
        return {
            "width": self.width,
            "stem_stride": self.stem_stride,
            "in_chans": self.in_chans,
            "hidden_channels": self.hidden_channels,
            "last_channels": self.embed_dim,
            "num_classes": self.num_classes,
        }

    def forward_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Feature maps at the end of each resolution stage, highest resolution first.

        The last entry is the output of the final 1x1 convolution (``embed_dim`` channels),
        the map that :meth:`embed` pools.  ``upto`` (an index >= 0) stops after that map: the
        later stages are not computed (a detection head on an early map needs no more).
        """
        x = self.stem(x)
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._stage_ends:
                features.append(x)
                if upto is not None and len(features) > upto:
                    return features
        features.append(self.last_conv(x))
        return features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The global-average-pooled embedding, shape (B, embed_dim)."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.last_conv(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, embed_dim), or logits (B, num_classes) when a classifier exists."""
        features = self.embed(x)
        if self.classifier is not None:
            return self.classifier(features)
        return features
