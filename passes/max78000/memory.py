"""Where izer puts a network in the MAX78000's memories: processors, kernel slots and data offsets.

``check.max78000`` (on the PyTorch student) and ``export.izer`` (on the ONNX model it becomes)
both describe the network as a list of :class:`LayerShape` and ask this module whether izer
can place it, so that the check refuses exactly what the export could not write.  The rules
follow ai8x-synthesis (commit ab4f4c0) for the MAX78000 (``DevAI85`` in ``izer/tornadocnn.py``):

* processors: a layer reading ``C`` channels uses processors ``0 .. n-1`` with ``n = C`` up to 64;
  beyond, it reads them in ``ceil(C / 64)`` passes with ``ceil(C / passes)`` processors rounded up
  to a multiple of 4 (README; ``in_expand``/``in_expand_thresh`` in ``izer/backend/max7800x.py``).
  The last layer's outputs take the same packed map (izer's default ``output_processors``).
* kernel memory (``izer/kernels.py``): each processor has 768 slots of 72 bits.  A layer needs
  ``kc = output processors x output passes x input passes`` kernels on each of its processors,
  packed into ``ceil((kc * k * bits + pad) / 72)`` slots (``k`` = kernel elements: 9 for 3x3,
  so one 8-bit 3x3 kernel per slot, nine 8-bit 1x1 kernels per slot).  Layers that use all 64
  processors are placed first, then the others, each at the first offset (a multiple of 4) free on
  all of its processors; a layer that does not fit stops izer with "Kernel memory exhausted".
  Every processor map starts at processor 0, so processor 0 holds a block of every layer.
* data memory (izer's "overwriting input" check, ``izer/unload.py``): 4 processors share a
  32 KiB instance; a map of ``H x W`` pixels read in ``p`` passes takes ``4 * H * W * p`` bytes of
  each instance it uses (HWC: one 32-bit word holds one byte of each of 4 processors).  A layer's
  input (the map before a fused pooling) and its output must not overlap in one instance, so
  they must fit 32 KiB together (about 64x64 in and 64x64 out).  :func:`data_offsets` puts the
  network's input at 0 (izer's default ``in_offset``) and each layer's output at the other end
  of the instance from its input, so that they meet only when they do not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROCESSORS = 64
#: Processors that share a data memory instance and a kernel offset alignment (``P_SHARED``).
PROCESSORS_PER_INSTANCE = 4
#: Kernel memory slots (72 bits each) per processor (``MASK_WIDTH_SMALL = MASK_WIDTH_LARGE``).
KERNEL_SLOTS = 768
#: Bytes of one data memory instance (``INSTANCE_WIDTH * 16``).
DATA_INSTANCE_BYTES = 32_768
#: The weight widths izer stores (1, 2, 4 or 8 bits per weight, per layer).
STORED_WEIGHT_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class LayerShape:
    """What izer's placement needs to know about one accelerator layer."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int  # kernel elements: 9 for 3x3, 1 for 1x1 (and for a linear layer), k for 1-D
    weight_bits: int  # as stored: 1, 2, 4 or 8
    in_pixels: int  # pixels of the map the layer reads from data memory (before a fused pooling)
    out_pixels: int  # pixels of the map it writes


def stored_weight_bits(bits: int) -> int:
    """The width izer stores ``bits``-bit weights at: the smallest of 1, 2, 4, 8 that holds them."""
    if not 1 <= bits <= 8:
        raise ValueError(f"MAX78000 weights have 1 to 8 bits, got {bits}")
    return next(width for width in STORED_WEIGHT_BITS if width >= bits)


def processors_for(channels: int) -> tuple[int, int]:
    """(processor mask, passes) for a layer reading ``channels`` channels."""
    passes = max(1, math.ceil(channels / PROCESSORS))
    count = channels if passes == 1 else min(PROCESSORS, 4 * math.ceil(math.ceil(channels / passes) / 4))
    return (1 << count) - 1, passes


def kernel_slots(layer: LayerShape) -> int:
    """Kernel memory slots ``layer`` takes on each processor it uses (izer's ``kern_len``)."""
    out_mask, out_passes = processors_for(layer.out_channels)
    _, in_passes = processors_for(layer.in_channels)
    kernels = bin(out_mask).count("1") * out_passes * in_passes
    per_slot = 8 // layer.weight_bits
    padding = (kernels % per_slot) * layer.kernel * (per_slot - 1)
    return (kernels * layer.kernel * layer.weight_bits + padding + 71) // 72


def kernel_offsets(layers: list[LayerShape]) -> tuple[list[int], list[str]]:
    """Each layer's first kernel slot as izer allocates them, or why they do not fit (one line).

    izer stops at the first layer that finds no room; so does this (the offsets from that layer
    on are -1).
    """
    taken = [bytearray(KERNEL_SLOTS) for _ in range(PROCESSORS)]
    offsets = [-1] * len(layers)
    full = (1 << PROCESSORS) - 1
    masks = [processors_for(layer.in_channels)[0] for layer in layers]
    order = [i for i in range(len(layers)) if masks[i] == full] + [i for i in range(len(layers)) if masks[i] != full]
    for index in order:
        layer = layers[index]
        used = [p for p in range(PROCESSORS) if masks[index] >> p & 1]
        length = kernel_slots(layer)
        offset = next((o for o in range(0, KERNEL_SLOTS - length + 1, PROCESSORS_PER_INSTANCE)
                       if not any(any(taken[p][o:o + length]) for p in used)), -1)
        if offset < 0:
            busiest = max(used, key=lambda p: sum(taken[p]))
            needed = sum(-(-kernel_slots(other) // PROCESSORS_PER_INSTANCE) * PROCESSORS_PER_INSTANCE
                         for other, mask in zip(layers, masks) if mask >> busiest & 1)
            return offsets, [
                f"{layer.name}: kernel memory exhausted at processor {busiest}: the layer needs {length} "
                f"kernel slots on each of processors {used[0]}..{used[-1]}, and the layers on processor "
                f"{busiest} need about {needed:,} of its {KERNEL_SLOTS} in all (izer places every layer's "
                f"kernels from processor 0 on; fewer, narrower or 4-bit layers fit)"]
        offsets[index] = offset
        for p in used:
            taken[p][offset:offset + length] = b"\x01" * length
    return offsets, []


def data_bytes(pixels: int, channels: int) -> int:
    """Bytes of one data memory instance that a ``pixels``-pixel map of ``channels`` channels takes."""
    return 4 * pixels * processors_for(channels)[1]


def data_offsets(layers: list[LayerShape]) -> tuple[list[int], list[str]]:
    """Each layer's ``out_offset`` (bytes), and every layer whose input and output cannot both fit.

    The network's input lies at 0; a layer whose input lies at 0 writes its output at the top of
    the instance (``32768 - size``), and one whose input lies at the top writes at 0.
    """
    offsets: list[int] = []
    problems: list[str] = []
    in_offset = 0
    for layer in layers:
        in_bytes = data_bytes(layer.in_pixels, layer.in_channels)
        out_bytes = data_bytes(layer.out_pixels, layer.out_channels)
        if in_bytes + out_bytes > DATA_INSTANCE_BYTES:
            problems.append(
                f"{layer.name}: its input ({layer.in_pixels:,} pixels) and output ({layer.out_pixels:,} "
                f"pixels) need {in_bytes:,} + {out_bytes:,} bytes of one data memory instance; izer "
                f"needs both in one {DATA_INSTANCE_BYTES:,}-byte instance without streaming (e.g. 64x64 in "
                f"and 64x64 out at up to {PROCESSORS} channels)")
        out_offset = max(0, DATA_INSTANCE_BYTES - out_bytes) if in_offset == 0 else 0
        offsets.append(out_offset)
        in_offset = out_offset
    return offsets, problems
