"""Batched image augmentations that run on the training device, without torchvision.

:class:`Augment` takes a float batch (B, C, H, W) in [0, 1] and a ``torch.Generator`` and
applies, per image, with every probability and magnitude proportional to ``strength``:

=====================  ==================================================================
random resized crop    area fraction in [1 - 0.65 s, 1], aspect ratio in [(3/4)^s, (4/3)^s]
random translation     up to 12.5% s of the image side, each axis
horizontal flip        probability 0.5 s (only with ``flip=True``; off for digits and text)
brightness / contrast  factors in [1 - 0.4 s, 1 + 0.4 s]
gaussian noise         standard deviation uniform in [0, 0.05 s]
random erasing         probability 0.5 s, area fraction in [0.02, 0.02 + 0.23 s],
                       filled with a random colour
=====================  ==================================================================

Strength 0 returns the input unchanged, so a curriculum can ramp from clean images. The
geometric steps (crop, translation, flip) are one affine resampling.

An augmentation is two public halves, :meth:`Augment.geometric` (where each output pixel comes
from) and :meth:`Augment.appearance` (colour, noise, erasing); calling the augmentation runs one
after the other on the same generator.  A caller that must know where the pixels went (e.g. to
align a teacher's feature map with the student's crop) runs ``geometric`` on the image with
extra channels stacked onto it, such as a map of pixel coordinates, then ``appearance`` on the
image channels alone: the result is the call's, draw for draw.

Also here: :func:`random_patch_mask` and :func:`apply_patch_mask` for masked-image training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from distillc.errors import SpecError

_MIN_CROP_AREA = 0.35           # smallest crop area at strength 1
_MAX_LOG_ASPECT = math.log(4 / 3)
_MAX_TRANSLATE = 0.125          # fraction of the image side
_FLIP_PROBABILITY = 0.5
_MAX_BRIGHTNESS = 0.4
_MAX_CONTRAST = 0.4
_MAX_NOISE_STD = 0.05
_ERASE_PROBABILITY = 0.5
_ERASE_AREA = (0.02, 0.25)
_ERASE_LOG_ASPECT = math.log(3.0)
_PADDING_MODES = ("zeros", "border", "reflection")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None,
          like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``like``'s device.

    Drawing where the generator lives makes the stream depend only on the generator, so a
    CPU generator gives the same augmentations whatever device the batch is on.
    """
    device = generator.device if generator is not None else like.device
    values = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)


def _uniform(low: float | torch.Tensor, high: float | torch.Tensor, batch: int,
             generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * _rand((batch,), generator, like)


@dataclass(frozen=True)
class Augment:
    """Augmentation of a batch whose intensity scales with ``strength`` in [0, 1].

    Call it as ``augment(x, generator)``; the result has x's shape, dtype and device and
    depends only on x and the generator's state. Random numbers are drawn on the generator's
    device (see the module docstring for the exact ranges).

    Args:
        strength: 0 is the identity (the input tensor itself is returned), 1 the strongest.
        flip: allow horizontal flips (off for digits, text and anything not mirror-symmetric).
        padding_mode: how pixels outside the image are filled when the crop or translation
            reaches past the border: "reflection", "border" or "zeros".
    """

    strength: float = 1.0
    flip: bool = True
    padding_mode: str = "reflection"

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise SpecError(f"augmentation strength must be in [0, 1], got {self.strength!r}")
        if self.padding_mode not in _PADDING_MODES:
            raise SpecError(f"padding_mode must be one of {_PADDING_MODES}, "
                            f"got {self.padding_mode!r}")

    @classmethod
    def weak(cls, flip: bool = True) -> "Augment":
        """A light preset (strength 0.3): small crops and shifts, mild colour changes."""
        return cls(strength=0.3, flip=flip)

    @classmethod
    def strong(cls, flip: bool = True) -> "Augment":
        """The full-strength preset (strength 1.0)."""
        return cls(strength=1.0, flip=flip)

    def with_strength(self, strength: float) -> "Augment":
        """The same augmentation at another strength (for curricula)."""
        return replace(self, strength=strength)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"Augment expects a float (B, C, H, W) batch, got {x.dtype} "
                             f"{tuple(x.shape)}")
        return self.appearance(self.geometric(x, generator), generator)

    def geometric(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The first half: crop, translation and flip as one affine resampling of every channel.

        Every channel of an image moves the same way, so channels stacked onto the image (a
        coordinate map, a mask) come out moved exactly as the image is.  Strength 0 returns ``x``.
        """
        if self.strength == 0.0:
            return x
        return self._geometric(x, generator)

    def appearance(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The second half: brightness and contrast, noise, then random erasing (no pixel moves).

        Called after :meth:`geometric` on the same generator, it completes the augmentation
        ``self(x, generator)`` would have made.  Strength 0 returns ``x``.
        """
        if self.strength == 0.0:
            return x
        return self._erase(self._photometric(x, generator), generator)

    def _geometric(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Crop, translation and flip as one affine map sampled with grid_sample."""
        s, batch = self.strength, x.shape[0]
        area = _uniform(1.0 - (1.0 - _MIN_CROP_AREA) * s, 1.0, batch, generator, x)
        log_aspect = _uniform(-_MAX_LOG_ASPECT * s, _MAX_LOG_ASPECT * s, batch, generator, x)
        # Half-extents of the crop in normalized coordinates (the image spans [-1, 1]).
        half_w = torch.sqrt(area * torch.exp(log_aspect)).clamp(max=1.0)
        half_h = torch.sqrt(area * torch.exp(-log_aspect)).clamp(max=1.0)
        center_x = _uniform(-(1.0 - half_w), 1.0 - half_w, batch, generator, x)
        center_y = _uniform(-(1.0 - half_h), 1.0 - half_h, batch, generator, x)
        shift = 2.0 * _MAX_TRANSLATE * s
        center_x = center_x + _uniform(-shift, shift, batch, generator, x)
        center_y = center_y + _uniform(-shift, shift, batch, generator, x)
        # Drawn even without flips, so the flag does not shift the rest of the random stream.
        flip_draw = _rand((batch,), generator, x)
        mirrored = flip_draw < (_FLIP_PROBABILITY * s if self.flip else 0.0)
        sign = torch.where(mirrored, -1.0, 1.0).to(x.dtype)

        theta = torch.zeros(batch, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = half_w * sign
        theta[:, 0, 2] = center_x
        theta[:, 1, 1] = half_h
        theta[:, 1, 2] = center_y
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=False)

    def _photometric(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Brightness and contrast factors, then gaussian noise; clamped back to [0, 1]."""
        s, batch = self.strength, x.shape[0]
        brightness = _uniform(1 - _MAX_BRIGHTNESS * s, 1 + _MAX_BRIGHTNESS * s, batch,
                              generator, x)
        contrast = _uniform(1 - _MAX_CONTRAST * s, 1 + _MAX_CONTRAST * s, batch, generator, x)
        noise_std = _uniform(0.0, _MAX_NOISE_STD * s, batch, generator, x)
        x = x * brightness.view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast.view(-1, 1, 1, 1) + mean
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device)
        x = x + noise.to(device=x.device, dtype=x.dtype) * noise_std.view(-1, 1, 1, 1)
        return x.clamp(0.0, 1.0)

    def _erase(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random erasing: one rectangle per chosen image, filled with a random colour."""
        s, (batch, channels, height, width) = self.strength, x.shape
        chosen = _rand((batch,), generator, x) < _ERASE_PROBABILITY * s
        low, high = _ERASE_AREA
        area = _uniform(low, low + (high - low) * s, batch, generator, x)
        log_aspect = _uniform(-_ERASE_LOG_ASPECT, _ERASE_LOG_ASPECT, batch, generator, x)
        box_h = (torch.sqrt(area * torch.exp(-log_aspect)) * height).clamp(max=height)
        box_w = (torch.sqrt(area * torch.exp(log_aspect)) * width).clamp(max=width)
        top = _rand((batch,), generator, x) * (height - box_h)
        left = _rand((batch,), generator, x) * (width - box_w)
        fill = _rand((batch, channels), generator, x).view(batch, channels, 1, 1)

        rows = torch.arange(height, device=x.device, dtype=x.dtype).view(1, -1)
        cols = torch.arange(width, device=x.device, dtype=x.dtype).view(1, -1)
        in_rows = (rows >= top.view(-1, 1)) & (rows < (top + box_h).view(-1, 1))
        in_cols = (cols >= left.view(-1, 1)) & (cols < (left + box_w).view(-1, 1))
        mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen.view(-1, 1, 1)
        return torch.where(mask[:, None], fill, x)


def random_patch_mask(batch: int, grid: int, keep_fraction: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """A bool (batch, grid*grid) mask, True for kept patches, in row-major patch order.

    Every row keeps exactly ``max(1, round(keep_fraction * grid * grid))`` patches, chosen
    uniformly at random (MAE-style: argsort of uniform noise). Drawn on the generator's
    device (or ``device`` when no generator is given).
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise SpecError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    patches = grid * grid
    keep = max(1, int(round(keep_fraction * patches)))
    where = generator.device if generator is not None else (device or "cpu")
    noise = torch.rand((batch, patches), generator=generator, device=where)
    kept_ids = noise.argsort(dim=1)[:, :keep]
    mask = torch.zeros((batch, patches), dtype=torch.bool, device=where)
    mask.scatter_(1, kept_ids, True)
    return mask if device is None else mask.to(device)


def apply_patch_mask(x: torch.Tensor, keep: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Replace the patches of ``x`` (B, C, H, W) where ``keep`` (B, grid*grid) is False by ``fill``.

    The grid is square; H and W must be multiples of it.
    """
    batch, _, height, width = x.shape
    grid = math.isqrt(keep.shape[1])
    if grid * grid != keep.shape[1] or height % grid or width % grid:
        raise ValueError(f"mask of {keep.shape[1]} patches does not tile a {height}x{width} image")
    pixel_keep = keep.view(batch, 1, grid, grid).to(x.device)
    pixel_keep = pixel_keep.repeat_interleave(height // grid, dim=2)
    pixel_keep = pixel_keep.repeat_interleave(width // grid, dim=3)
    return torch.where(pixel_keep, x, torch.full_like(x, fill))
