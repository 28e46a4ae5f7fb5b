"""Heads a pass puts on a student's embedding, recorded in the artifact (``TorchModel.head``).

A head is described by a small JSON dict, so an artifact rebuilds the same module from its
recipe: ``{"type": "matryoshka", "in_dim": 32, "dims": [16, 32, 64]}``.  :func:`attach_head`
turns the dict into a module and wraps the student with it; the wrapped model's ``forward`` is
``head(student(x))``, and the student's token and stage API stays reachable through the wrapper,
so later passes (distillation, QAT, export) treat it as any other student.

State-dict keys of a wrapped student: ``backbone.*`` (the student's own) and ``head.*``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from distillc.errors import DistillcError

#: The student methods and attributes a wrapped student passes through to its backbone.
_DELEGATED = ("forward_stages", "forward_tokens", "forward_hidden", "patch_tokens", "grid", "num_blocks",
              "stage_channels")


class MatryoshkaHead(nn.Module):
    """A linear projection to ``max(dims)`` whose every prefix ``[:d]`` (``d`` in ``dims``) is an
    embedding on its own (Kusupati et al., 2022, "Matryoshka Representation Learning").

    The nesting is a property of how the head is trained (every prefix carries a loss), not of
    its shape: at run time it is one ``nn.Linear``, which the INT8 backend lowers like any other.
    """

    def __init__(self, in_dim: int, dims: list[int]):
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or any(d < 1 for d in dims) or dims != sorted(set(dims)):
            raise DistillcError(f"Matryoshka dims must be increasing positive integers, got {dims}")
        self.dims = dims
        self.out_dim = dims[-1]
        self.proj = nn.Linear(in_dim, self.out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


class WithHead(nn.Module):
    """A student with a head on its embedding: ``forward(x) = head(backbone(x))``.

    ``embed_dim`` is the head's output width and ``head_recipe`` the dict that rebuilds the head
    (``TorchModel.from_module`` records it, so a pass that trains a wrapped student keeps the
    head).  Token and stage methods (``forward_stages``, ``patch_tokens``, ...) are the
    backbone's, for passes that read the student's features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, out_dim: int, recipe: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embed_dim = int(out_dim)
        self.head_recipe = dict(recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The head's embedding (what ``forward`` returns)."""
        return self.forward(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _DELEGATED:
                return getattr(super().__getattr__("backbone"), name)
            raise


def matryoshka_head_spec(in_dim: int, dims: list[int]) -> dict[str, Any]:
    """The JSON recipe of a Matryoshka head (what ``TorchModel.head`` stores)."""
    return {"type": "matryoshka", "in_dim": int(in_dim), "dims": [int(d) for d in dims]}


def attach_head(backbone: nn.Module, head: dict[str, Any]) -> WithHead:
    """Wrap ``backbone`` with the head that the recipe ``head`` describes."""
    kind = head.get("type")
    if kind == "matryoshka":
        module = MatryoshkaHead(int(head["in_dim"]), list(head["dims"]))
        return WithHead(backbone, module, module.out_dim, head)
    raise DistillcError(f"unknown head type {kind!r} in a model recipe; known: 'matryoshka'")
