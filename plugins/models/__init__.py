"""Built-in model families: teachers and students, written without timm or torchvision.

- :mod:`.vit`: Vision Transformers whose state-dict keys match timm's, so DINO, MAE, MoCo v3
  and iBOT checkpoints load without timm.
- :mod:`.mobilenetv2`: the MobileNetV2 student, with width multiplier, a small-input layout
  and per-block expansion widths (for channel pruning).
- :mod:`.checkpoint`: reading weight files and loading them with one complete error report.

This package imports no torch at import time (the CLI must stay fast); the counting helpers
below import it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn


def count_macs(model: "nn.Module", input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a zero input of ``input_shape``.

    Counts every ``nn.Conv2d`` (``output elements x in_channels/groups x kernel area``) and
    ``nn.Linear`` (``output elements x in_features``), plus any module that defines
    ``extra_macs(inputs, output) -> int`` for work done outside such layers (the ViT attention
    uses it for its two matrix products). Element-wise work (BatchNorm, activations, adds,
    pooling) is not counted, as is usual for MAC figures. The count covers the whole batch in
    ``input_shape``: pass a batch of 1 for per-image MACs.
    """
    import torch
    import torch.nn as nn

    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kernel_area = module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * (module.in_channels // module.groups) * kernel_area

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def extra_hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        total += int(module.extra_macs(inputs, output))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append((module, conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append((module, linear_hook))
        if callable(getattr(module, "extra_macs", None)):
            hooks.append((module, extra_hook))
    run_with_hooks(model, input_shape, hooks)
    return total


def run_with_hooks(model: "nn.Module", input_shape: tuple[int, ...], hooks: list) -> None:
    """One no-grad forward of a zero input with ``(module, forward_hook)`` pairs attached.

    The model runs in eval mode (BatchNorm must not update its statistics) on its own device;
    the hooks are removed and the training mode restored afterwards.
    """
    import torch

    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def count_conv_weights(model: "nn.Module") -> int:
    """Number of convolution weights (no biases, no BatchNorm) in ``model``."""
    import torch.nn as nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
