"""An accelerator-friendly CNN student for the MAX78000 (``ai8x-cnn``), and the limit checker.

The MAX78000's CNN accelerator runs only some layers (see ``MAX78000.md`` in the project notes,
gathered from ai8x-synthesis): 1x1 or 3x3 convolutions with stride 1, zero padding 0..2 and no
groups (no depthwise), pooling fused before a convolution to downsample, ReLU, at most 32
layers and 1024 channels, 768 kernel slots per processor (442,368 bytes of 8-bit 3x3 weights in
all), 2 KiB of 8-bit biases, and a layer's input and output in one 32 KiB data memory instance.
:class:`Ai8xCNN` keeps to the layer types by construction (its width, depth and input size decide
whether the memories fit); :func:`max78000_violations` checks any torch model against all of it
and lists every violation.

Layout (``w`` = ``width``)::

    stage 0: conv3x3(w)  + BN + ReLU, conv3x3(w)          (full resolution)
    stage 1: maxpool 2, conv3x3(2w) + BN + ReLU, ...       (pool only while the map is >= 8)
    stage 2: maxpool 2, conv3x3(2w) ...
    stage 3: maxpool 2, conv3x3(4w) ...
    head:    conv1x1(embed_dim) + BN (no ReLU: embeddings may be negative), global average pool

``convs_per_stage`` 3x3 convolutions per stage, each followed by BatchNorm (folded into the
convolution's weights and 8-bit bias at export) and ReLU. The global average pool at the end runs
on the Cortex-M4 (the accelerator's last layer writes the final map out). At the defaults (w=24,
embed_dim=128) the network has 9 layers and about 215K weights, under half the weight memory; izer
packs them into 557 of processor 0's 768 kernel slots, and at 64x64 the first layer's input and
output fill its 32 KiB data memory instance exactly.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillc.errors import SpecError
from distillc.passes.max78000.memory import (LayerShape, data_offsets, kernel_offsets,
                                              stored_weight_bits)
from distillc.plugins.models import run_with_hooks

#: Stage widths as multiples of ``width``.
STAGE_MULTIPLIERS = (1, 2, 2, 4)

# MAX78000 (AI85) limits; see izer/tornadocnn.py (DevAI85) and the ai8x-synthesis README.
MAX_LAYERS = 32
MAX_CHANNELS = 1024
MAX_ROW_COL = 1024
WEIGHT_MEMORY_BYTES = 442_368  # 64 processors x 768 kernels x 9 bytes
MAX_BIASED_OUTPUTS_PER_LAYER = 512  # one group's bias memory, 8-bit entries
BIAS_MEMORY_BYTES = 2_048  # 4 groups x 512
MAX_POOL = 16
MAX_PAD = 2
MAX_FLATTEN_FEATURES = 16_384


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias; BatchNorm brings one) + BatchNorm2d (+ ReLU unless ``act`` is False)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, act: bool = True):
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, bias=False),
            bn=nn.BatchNorm2d(out_ch),
        )
        if act:
            layers["act"] = nn.ReLU()
        super().__init__(layers)


class Ai8xCNN(nn.Module):
    """A plain 3x3/1x1 CNN that the MAX78000 accelerator can run (see the module docstring).

    Args:
        image_size: input side (decides where pooling stops: never below a 4x4 map).
        in_chans: input channels.
        width: channels of the first stage; later stages use 2, 2 and 4 times as many.
        embed_dim: channels of the final 1x1 convolution, i.e. the embedding width.
        convs_per_stage: 3x3 convolutions per stage.
        pool: ``"max"`` or ``"avg"`` 2x2 pooling to downsample.

    Attributes:
        embed_dim, stage_channels (channels of each map :meth:`forward_stages` returns).
    """

    def __init__(self, image_size: int = 32, in_chans: int = 3, width: int = 24, embed_dim: int = 128,
                 convs_per_stage: int = 2, pool: str = "max"):
        super().__init__()
        if image_size < 1 or in_chans < 1:
            raise SpecError(f"ai8x-cnn needs image_size and in_chans >= 1, got {image_size}, {in_chans}")
        if width < 1 or width * max(STAGE_MULTIPLIERS) > MAX_CHANNELS:
            raise SpecError(f"ai8x-cnn width must be 1..{MAX_CHANNELS // max(STAGE_MULTIPLIERS)} "
                            f"(stages use up to {max(STAGE_MULTIPLIERS)}x it, at most {MAX_CHANNELS} "
                            f"channels on MAX78000), got {width}")
        if not 1 <= embed_dim <= MAX_CHANNELS:
            raise SpecError(f"ai8x-cnn embed_dim must be 1..{MAX_CHANNELS}, got {embed_dim}")
        if convs_per_stage < 1:
            raise SpecError(f"ai8x-cnn convs_per_stage must be >= 1, got {convs_per_stage}")
        if pool not in ("max", "avg"):
            raise SpecError(f"ai8x-cnn pool must be 'max' or 'avg', got {pool!r}")
        self.image_size = int(image_size)
        self.in_chans = int(in_chans)
        self.width = int(width)
        self.embed_dim = int(embed_dim)
        self.convs_per_stage = int(convs_per_stage)
        self.pool_kind = pool

        stages = []
        size, in_ch = image_size, in_chans
        for index, multiplier in enumerate(STAGE_MULTIPLIERS):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index > 0 and size >= 8:
                layers["pool"] = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
                size //= 2
            out_ch = width * multiplier
            for conv in range(convs_per_stage):
                layers[f"conv{conv}"] = ConvBNReLU(in_ch, out_ch, 3)
                in_ch = out_ch
            stages.append(nn.Sequential(layers))
        self.stages = nn.ModuleList(stages)
        self.head = ConvBNReLU(in_ch, embed_dim, 1, act=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.stage_channels = [width * m for m in STAGE_MULTIPLIERS[:-1]] + [embed_dim]
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def config(self) -> dict:
        """Constructor kwargs that rebuild this exact architecture (weights aside)."""
        return {"image_size": self.image_size, "in_chans": self.in_chans, "width": self.width,
                "embed_dim": self.embed_dim, "convs_per_stage": self.convs_per_stage, "pool": self.pool_kind}

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The map after each of the first three stages, then the head's (embed_dim) map."""
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                features.append(x)
        features.append(self.head(x))
        return features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The global-average-pooled head map, (B, embed_dim)."""
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(self.pool(self.head(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, embed_dim)."""
        return self.embed(x)


# --------------------------------------------------------------------------- the checker


@dataclass
class _Call:
    """One executed leaf module: its path, the module, and its first input's / output's shape."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_POOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_ADAPTIVE_POOL_TYPES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_FREE_TYPES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.ReLU)
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Functions and methods the accelerator has (element-wise add/sub fused with a convolution,
# flatten before a linear layer, concatenation of channels, ReLU) or that only move data.
_FREE_FUNCTIONS = {operator.add, operator.sub, operator.getitem, getattr, torch.add, torch.sub, torch.flatten,
                   torch.cat, torch.relu, F.relu}
_FREE_METHODS = {"add", "sub", "flatten", "view", "reshape", "size", "relu", "contiguous", "dim"}


def max78000_violations(model: nn.Module, image_size: int, *, in_chans: int | None = None,
                        weight_bits: int = 8) -> list[str]:
    """Every way ``model`` breaks the MAX78000 CNN accelerator's limits, one line each.

    Runs the model once (eval mode, no grad) on a zero ``(1, in_chans, image_size, image_size)``
    input (``in_chans`` defaults to the model's ``in_chans`` or its first convolution's input
    channels) and checks each executed layer, in order:

    - Conv2d: kernel 1x1 or 3x3, stride 1, zero padding 0..2, dilation 1, groups 1 (depthwise
      is MAX78002 only); Conv1d: kernel 1..9, padding 0..2, stride 1; ConvTranspose2d: 3x3,
      stride 2; Linear: at most 1024 outputs and 1024 inputs (16384 after a flatten);
    - at most 1024 input and output channels, input rows/columns <= 1024;
    - pooling: kernel and stride 1..16, no padding, dilation 1; BatchNorm only right after a
      convolution (to be folded); ReLU is the only activation; any other layer type, and any
      functional operation other than add/sub/flatten/concat/ReLU/reshape (found by tracing
      with torch.fx), is not supported;
    - at most 32 layers (convolutions and linear layers; pooling fused into them is free);
    - weights at ``weight_bits`` bits, stored as izer stores them (1, 2, 4 or 8 bits: 3-bit
      weights take 4): <= 442,368 bytes in all;
    - kernel memory as izer packs it (:mod:`.memory`): each processor's 768 slots hold the
      kernels of every layer that reads through it, and every layer starts at processor 0;
    - 8-bit biases (own bias or a folded BatchNorm): <= 512 outputs per layer, <= 2,048 in all;
    - data memory without streaming: each layer's input (the map before a fused pooling) and
      output must fit one 32 KiB data memory instance together (``4 * H * W * ceil(C / 64)``
      bytes each; 64x64 in and 64x64 out at up to 64 channels).

    Whatever runs after the last convolution or linear layer (global pooling, flatten, softmax)
    is CPU post-processing and not checked. The kernel and data memory rules are those
    ``export.izer`` places the exported network by, so the two agree (see :func:`max78000_layers`).
    An empty list means no limit is broken.
    """
    bits = stored_weight_bits(weight_bits)
    calls = _record_calls(model, (1, _in_chans(model, in_chans), image_size, image_size))
    layer_positions = [i for i, call in enumerate(calls) if isinstance(call.module, _LAYER_TYPES)]
    last_layer = layer_positions[-1] if layer_positions else -1

    violations: list[str] = []
    weight_bytes = bias_bytes = 0
    counted: set[int] = set()
    for i, call in enumerate(calls):
        if i > last_layer:
            break  # CPU post-processing
        module = call.module
        following = calls[i + 1].module if i + 1 < len(calls) else None
        if isinstance(module, _LAYER_TYPES):
            violations += _layer_violations(call)
            biased = module.bias is not None or (isinstance(following, _BATCHNORM_TYPES)
                                                 and following.num_features == _out_channels(module))
            if biased and _out_channels(module) > MAX_BIASED_OUTPUTS_PER_LAYER:
                violations.append(f"{call.name}: {_out_channels(module)} biased outputs; a layer may have "
                                  f"at most {MAX_BIASED_OUTPUTS_PER_LAYER} (8-bit bias memory of one group)")
            if id(module) not in counted:
                counted.add(id(module))
                weight_bytes += math.ceil(module.weight.numel() * bits / 8)
                bias_bytes += _out_channels(module) if biased else 0
        elif isinstance(module, _BATCHNORM_TYPES):
            previous = calls[i - 1].module if i > 0 else None
            if not (isinstance(previous, _LAYER_TYPES) and _out_channels(previous) == module.num_features):
                violations.append(f"{call.name}: BatchNorm that does not follow a convolution cannot be "
                                  f"folded (the accelerator has no normalisation layer)")
        elif isinstance(module, _POOL_TYPES):
            violations += _pool_violations(call)
        elif isinstance(module, _ADAPTIVE_POOL_TYPES):
            violations += _adaptive_pool_violations(call)
        elif isinstance(module, _FREE_TYPES):
            pass
        elif isinstance(module, (nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                                 nn.PReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softmax)):
            violations.append(f"{call.name}: activation {type(module).__name__} is not supported "
                              f"(ReLU, Abs or none)")
        else:
            violations.append(f"{call.name}: layer type {type(module).__name__} is not supported by the "
                              f"accelerator")

    shapes = _layer_shapes(calls, layer_positions, bits)
    violations += data_offsets(shapes)[1]
    if len(layer_positions) > MAX_LAYERS:
        violations.append(f"{len(layer_positions)} layers (convolutions and linear layers); at most "
                          f"{MAX_LAYERS}")
    if weight_bytes > WEIGHT_MEMORY_BYTES:
        violations.append(f"weights need {weight_bytes:,} bytes at {bits} bits; the weight memory "
                          f"holds {WEIGHT_MEMORY_BYTES:,}")
    violations += kernel_offsets(shapes)[1]
    if bias_bytes > BIAS_MEMORY_BYTES:
        violations.append(f"biases need {bias_bytes:,} bytes (8-bit, folded BatchNorm included); the bias "
                          f"memory holds {BIAS_MEMORY_BYTES:,}")
    violations += _functional_violations(model, calls, last_layer)
    return violations


def _record_calls(model: nn.Module, input_shape: tuple[int, ...]) -> list[_Call]:
    names = {module: name for name, module in model.named_modules()}
    calls: list[_Call] = []

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append(_Call(names.get(module, type(module).__name__), module,
                           tuple(first.shape) if first is not None else (),
                           tuple(output.shape) if isinstance(output, torch.Tensor) else ()))

    leaves = [m for m in model.modules() if not list(m.children()) and m is not model]
    run_with_hooks(model, input_shape, [(m, hook) for m in leaves])
    return calls


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _pair(value: object) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _layer_violations(call: _Call) -> list[str]:
    module, name, found = call.module, call.name, []
    if isinstance(module, nn.Linear):
        if module.out_features > MAX_CHANNELS:
            found.append(f"{name}: linear layer with {module.out_features} outputs; at most {MAX_CHANNELS}")
        if module.in_features > MAX_FLATTEN_FEATURES:
            found.append(f"{name}: linear layer with {module.in_features} inputs; at most {MAX_CHANNELS} "
                         f"({MAX_FLATTEN_FEATURES} after a flatten)")
        return found

    kernel, stride = module.kernel_size, module.stride
    padding, dilation = module.padding, module.dilation
    kind = type(module).__name__
    if isinstance(padding, str):
        found.append(f"{name}: padding={padding!r}; give explicit zero padding 0..{MAX_PAD}")
        padding = ()
    if module.padding_mode != "zeros":
        found.append(f"{name}: padding_mode {module.padding_mode!r}; only zero padding")
    if isinstance(module, nn.Conv2d):
        if tuple(kernel) not in ((1, 1), (3, 3)):
            found.append(f"{name}: {kind} kernel {kernel[0]}x{kernel[1]}; only 1x1 or 3x3")
        if tuple(stride) != (1, 1):
            found.append(f"{name}: {kind} stride {tuple(stride)}; only stride 1 (downsample with pooling "
                         f"before the convolution)")
    elif isinstance(module, nn.Conv1d):
        if not 1 <= kernel[0] <= 9:
            found.append(f"{name}: Conv1d kernel {kernel[0]}; only 1..9")
        if stride[0] != 1:
            found.append(f"{name}: Conv1d stride {stride[0]}; only stride 1")
    else:  # ConvTranspose2d
        if tuple(kernel) != (3, 3) or tuple(stride) != (2, 2):
            found.append(f"{name}: ConvTranspose2d kernel {tuple(kernel)} stride {tuple(stride)}; only 3x3 "
                         f"with stride 2")
    if any(p < 0 or p > MAX_PAD for p in padding):
        found.append(f"{name}: {kind} padding {tuple(padding)}; only 0..{MAX_PAD}")
    if any(d != 1 for d in dilation):
        found.append(f"{name}: {kind} dilation {tuple(dilation)}; only 1")
    if module.groups != 1:
        what = "depthwise convolution" if module.groups == module.in_channels else "grouped convolution"
        found.append(f"{name}: {what} (groups={module.groups}) is not supported on MAX78000 "
                     f"(depthwise only on MAX78002)")
    for label, channels in (("input", module.in_channels), ("output", module.out_channels)):
        if channels > MAX_CHANNELS:
            found.append(f"{name}: {channels} {label} channels; at most {MAX_CHANNELS}")
    if any(side > MAX_ROW_COL for side in call.in_shape[2:]):
        found.append(f"{name}: input {call.in_shape[2:]} has more than {MAX_ROW_COL} rows or columns")
    return found


def _pool_violations(call: _Call) -> list[str]:
    module, name, found = call.module, call.name, []
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    if any(not 1 <= k <= MAX_POOL for k in kernel):
        found.append(f"{name}: pooling kernel {kernel}; only 1..{MAX_POOL} per side")
    if any(not 1 <= s <= MAX_POOL for s in stride):
        found.append(f"{name}: pooling stride {stride}; only 1..{MAX_POOL}")
    if any(p != 0 for p in _pair(module.padding)):
        found.append(f"{name}: pooling padding {_pair(module.padding)}; pooling has no padding")
    if any(d != 1 for d in _pair(getattr(module, "dilation", 1))):
        found.append(f"{name}: pooling dilation {_pair(module.dilation)}; only 1")
    if getattr(module, "ceil_mode", False):
        found.append(f"{name}: pooling with ceil_mode; only floor")
    return found


def _adaptive_pool_violations(call: _Call) -> list[str]:
    spatial_in, spatial_out = call.in_shape[2:], call.out_shape[2:]
    if spatial_out and all(o >= 1 and i % o == 0 and i // o <= MAX_POOL for i, o in zip(spatial_in, spatial_out)):
        return []
    return [f"{call.name}: adaptive pooling {spatial_in} -> {spatial_out} is not a pooling of kernel "
            f"1..{MAX_POOL} with equal windows"]


def max78000_layers(model: nn.Module, image_size: int, *, in_chans: int | None = None,
                    weight_bits: int = 8) -> list[LayerShape]:
    """The accelerator layers of ``model`` (convolutions and linear layers, in execution order) as
    izer would place them; ``export.izer`` describes the network it writes the same way
    (``izer.layer_shapes``)."""
    calls = _record_calls(model, (1, _in_chans(model, in_chans), image_size, image_size))
    positions = [i for i, call in enumerate(calls) if isinstance(call.module, _LAYER_TYPES)]
    return _layer_shapes(calls, positions, stored_weight_bits(weight_bits))


def _in_chans(model: nn.Module, in_chans: int | None) -> int:
    if in_chans is None:
        in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
        in_chans = first.in_channels if first is not None else 3
    return int(in_chans)


def _layer_shapes(calls: list[_Call], positions: list[int], bits: int) -> list[LayerShape]:
    """One :class:`LayerShape` per layer call.  A layer reads from data memory the map before the
    pooling fused into it; a linear layer runs as a 1x1 convolution on 1x1 data."""
    shapes = []
    for i in positions:
        call, module = calls[i], calls[i].module
        if isinstance(module, nn.Linear):
            shapes.append(LayerShape(call.name, module.in_features, module.out_features, 1, bits, 1, 1))
            continue
        read = call.in_shape
        if i > 0 and isinstance(calls[i - 1].module, _POOL_TYPES) and calls[i - 1].out_shape == call.in_shape:
            read = calls[i - 1].in_shape
        shapes.append(LayerShape(call.name, module.in_channels, module.out_channels,
                                 math.prod(_pair(module.kernel_size)) if isinstance(module, nn.Conv2d)
                                 else math.prod(module.kernel_size) if isinstance(module, nn.Conv1d) else 9,
                                 bits, math.prod(read[2:]), math.prod(call.out_shape[2:])))
    return shapes


def _functional_violations(model: nn.Module, calls: list[_Call], last_layer: int) -> list[str]:
    """Operations outside modules (matmul, softmax, layer_norm, ...) before the last layer."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot check"
        return [f"the model cannot be traced with torch.fx, so its functional operations cannot be "
                f"checked ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    layer_names = {calls[i].name for i in range(last_layer + 1) if isinstance(calls[i].module, _LAYER_TYPES)}
    nodes = list(graph.nodes)
    last = max((i for i, node in enumerate(nodes) if node.op == "call_module" and node.target in layer_names),
               default=-1)
    found = []
    for node in nodes[:last]:
        if node.op == "call_function" and node.target not in _FREE_FUNCTIONS:
            label = getattr(node.target, "__name__", str(node.target))
            found.append(f"{node.name}: operation {label} is not supported by the accelerator")
        elif node.op == "call_method" and node.target not in _FREE_METHODS:
            found.append(f"{node.name}: operation .{node.target}() is not supported by the accelerator")
    return found
