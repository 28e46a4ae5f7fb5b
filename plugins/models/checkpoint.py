"""Reading weight files and loading them into models, with one complete error report.

Weight files come as safetensors or as PyTorch pickles. Pickles are only ever read with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects.

:func:`load_state_dict_file` also unwraps the containers the common self-supervised
codebases save (DINO and iBOT full checkpoints, MAE, MoCo v3, DDP prefixes), so a user can
point a spec at the file they downloaded.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

from distillc.errors import DistillcError, SpecError, shorten

# Containers tried in order; DINO/iBOT full checkpoints hold "student" and "teacher" and the
# teacher is the network people distill from.
_CONTAINER_KEYS = ("teacher", "state_dict", "model", "module")
# Prefixes that mark the backbone inside a training wrapper: DINO/iBOT ("backbone.", next to
# "head." of the projection head) and MoCo v3 ("base_encoder.", next to momentum_encoder).
_BACKBONE_PREFIXES = ("backbone.", "base_encoder.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_LISTING_CAP = 20
_TORCHSCRIPT_CONVERSION = ("python -c \"import torch, safetensors.torch as s; s.save_file({k: v.float().contiguous() "
                           "for k, v in torch.jit.load('ViT-B-32.pt', map_location='cpu').state_dict().items()}, "
                           "'ViT-B-32.safetensors')\"")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pt``, ``.pth``, ``.pth.tar`` or ``.bin``, on the CPU.

    Pickled files are loaded with ``weights_only=True``; the only extra type allowed is
    ``argparse.Namespace``, a plain attribute bag that DINO and iBOT store as ``args`` in their
    full checkpoints. Containers are unwrapped: a top-level ``teacher``, ``state_dict``,
    ``model`` or ``module`` entry, a ``module.`` prefix (DDP), and a backbone prefix
    (``backbone.`` or ``base_encoder.``: only keys under it are kept, without it).
    A missing file, an unknown suffix or content that is no state dict raises SpecError.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"checkpoint {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise SpecError(f"checkpoint {str(path)!r} is not a readable safetensors file: "
                            f"{shorten(str(exc), 160)}") from exc
    elif suffix in _PICKLE_SUFFIXES or path.name.lower().endswith(".pth.tar"):  # MoCo's .pth.tar
        if _is_torchscript_archive(path):
            raise SpecError(f"checkpoint {str(path)!r} is a TorchScript archive (as OpenAI's CLIP .pt files "
                            f"are); distillc reads state dicts only. Convert it once: "
                            f"{_TORCHSCRIPT_CONVERSION}, or use open_clip's open_clip_pytorch_model.bin, "
                            f"which has the same keys")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # Also raised for corrupt files.  torch's message advises loading the file unsafely
            # (weights_only=False, or allow-listing its classes): never repeated to a user.
            problem = ("holds more than tensors and plain containers" if "Unsupported global" in str(exc)
                       else "is not a readable weights-only PyTorch file")
            raise SpecError(f"checkpoint {str(path)!r} {problem} ({_unpickler_reason(exc)}); distillc never "
                            f"runs code from a checkpoint: re-save its state dict (torch.save(model.state_dict(), "
                            f"...)) or convert it to .safetensors") from exc
        except (RuntimeError, OSError, EOFError) as exc:
            raise SpecError(f"checkpoint {str(path)!r} is not a readable PyTorch file: "
                            f"{shorten(str(exc), 160)}") from exc
    else:
        raise SpecError(f"checkpoint {str(path)!r} has an unsupported suffix {suffix!r}; "
                        f"use .safetensors, .pt, .pth, .pth.tar or .bin")
    return _unwrap(obj, str(path))


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused ("Unsupported global: GLOBAL m.C ..."), without
    torch's advice on loading the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s+Please|\n\s*\n|$)", text, re.S)
    reason = found.group(1) if found else "not a weights-only file"
    return shorten(reason.replace(" was not an allowed global by default", ""), 120)


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint and strip wrapper prefixes."""
    while isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:_LISTING_CAP])
            raise SpecError(f"checkpoint {source!r} holds no state dict (top-level keys: {keys}); "
                            f"expected tensors or one of {list(_CONTAINER_KEYS)}")
    if not isinstance(obj, dict) or not obj:
        raise SpecError(f"checkpoint {source!r} holds no state dict (found {type(obj).__name__})")

    state = {k.removeprefix("module."): v for k, v in obj.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def _is_torchscript_archive(path: Path) -> bool:
    """A zip whose members include TorchScript code (``<name>/code/``) or ``constants.pkl``."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                             for k, v in obj.items())


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> dict:
    """Load ``state_dict`` into ``model``, or raise one DistillcError that lists every problem.

    Adaptations, each reported in the returned info dict:

    - The rules of :mod:`.keymaps` (MAE decoder and ``fc_norm``, iBOT ``masked_embed``, CLIP's
      text tower, metadata and position grid, RGB kernels for one-channel models).
    - ``pos_embed`` of a :class:`VisionTransformer` trained at another resolution has its
      patch part resampled bicubically to the model's grid (the CLS part is kept). No other key
      is resized, except by those rules.
    - ``head.*`` keys are dropped when the model has no head (a classifier or projection head
      of the pretraining run).
    - A missing BatchNorm ``num_batches_tracked`` keeps the model's value (old checkpoints
      lack the buffer; it does not affect inference).

    Anything else (missing keys, unexpected keys, shape mismatches) is an error naming the
    keys, at most ~20 per kind with a count of the rest. ``source`` names the checkpoint in
    messages. Returns ``{"loaded": int, "ignored": [keys], "renamed": ["old -> new"],
    "resized": [descriptions]}``.
    """
    from distillc.plugins.models.keymaps import apply_key_rules
    from distillc.plugins.models.vit import VisionTransformer, resize_pos_embed

    state = dict(state_dict)
    expected = model.state_dict()
    info: dict = {"loaded": 0, "ignored": [], "renamed": [], "resized": []}
    apply_key_rules(expected, state, info, source=source)

    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        old = state["pos_embed"]
        new = resize_pos_embed(old, model.grid)
        if new is not old:
            state["pos_embed"] = new
            info["resized"].append(f"pos_embed {tuple(old.shape)} -> {tuple(new.shape)}")

    if not any(k.startswith("head.") for k in expected):
        heads = [k for k in state if k.startswith("head.")]
        for key in heads:
            del state[key]
        info["ignored"].extend(heads)
    info["ignored"].sort()

    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{len(items)} {label}: {_listing(items)}")
        raise DistillcError(f"checkpoint {source!r} does not fit {type(model).__name__}: "
                            + "; ".join(parts))

    model.load_state_dict(state, strict=True)
    info["loaded"] = len(expected)
    return info


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTING_CAP])
    rest = len(items) - _LISTING_CAP
    return shown + (f", ... and {rest} more" if rest > 0 else "")
