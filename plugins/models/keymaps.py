"""Explicit rules that fit published checkpoints onto distillc's models, key by key.

:func:`distillc.plugins.models.checkpoint.load_into` runs :data:`KEY_RULES` in order on every
state dict before it compares keys and shapes. A rule looks only at the checkpoint's keys and
the model's own state dict (never at file names), changes as little as it can, and writes what
it did into the ``info`` dict that ``load_into`` returns (``ignored``, ``renamed``,
``resized``), so nothing happens silently. Container unwrapping (``{"model": ...}``,
``{"state_dict": ...}``, ``{"teacher": ...}``, the ``module.``, ``backbone.`` and
``base_encoder.`` prefixes) happens before, in
:func:`~distillc.plugins.models.checkpoint.load_state_dict_file`.

What each published checkpoint needs:

=====================  ===================================================================
DINO ViT-S/16, B/16    plain timm keys, or a full checkpoint's ``teacher`` (``backbone.*``
                       kept, the DINO ``head.*`` dropped by ``load_into``)
MAE ViT-B/16           ``{"model": ...}``; a pretraining checkpoint also holds the decoder
                       (:func:`drop_mae_decoder`); a fine-tuned one with global pooling has
                       ``fc_norm`` instead of ``norm`` (:func:`rename_fc_norm`) and a ``head``
MoCo v3 ViT-B/16       ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
                       "module.predictor.*"}}``: only the base encoder is kept; its projection
                       MLP is ``head.*`` and dropped by ``load_into``
iBOT ViT-B/16          ``{"state_dict": ...}`` or ``{"teacher": ...}`` with ``backbone.*``;
                       a student's mask token ``masked_embed`` (:func:`drop_ibot_masked_embed`)
CLIP ViT-B/32          OpenAI / open_clip keys as they are; OpenAI's TorchScript metadata
                       (:func:`drop_openai_clip_metadata`), the text tower when the model is
                       image-only (:func:`drop_clip_text_tower`), the 7x7 position grid
                       (:func:`resize_clip_positional_embedding`)
=====================  ===================================================================

:func:`adapt_input_channels` lets any RGB checkpoint start a one-channel (grayscale) model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from distillc.errors import DistillcError

if TYPE_CHECKING:  # pragma: no cover
    import torch

State = dict[str, "torch.Tensor"]
KeyRule = Callable[[State, State, dict, str], None]
"""``rule(expected, state, info, source)``: ``expected`` is the model's state dict (read only),
``state`` the checkpoint's (changed in place), ``info`` the report, ``source`` the file's name."""

# The top-level keys of CLIP's text tower (OpenAI and open_clip name them the same).
CLIP_TEXT_PREFIXES = ("token_embedding.", "transformer.", "ln_final.")
CLIP_TEXT_KEYS = ("positional_embedding", "text_projection", "logit_scale")
# Scalars OpenAI's TorchScript CLIP files keep in their state dict; its build_model drops them.
OPENAI_CLIP_METADATA = ("input_resolution", "context_length", "vocab_size")
# What MAE's pretraining model holds besides the encoder (models_mae.MaskedAutoencoderViT).
MAE_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
MAE_DECODER_KEYS = ("decoder_pos_embed", "mask_token")
# Patch-embedding convolutions whose input channels adapt_input_channels may fold.
INPUT_CONV_KEYS = ("patch_embed.proj.weight", "visual.conv1.weight")


def _is_timm_vit(expected: State) -> bool:
    return "cls_token" in expected and "pos_embed" in expected


def _is_clip(expected: State) -> bool:
    return "visual.class_embedding" in expected


def _is_clip_text_key(key: str) -> bool:
    return key.startswith(CLIP_TEXT_PREFIXES) or key in CLIP_TEXT_KEYS


def _drop(state: State, keys: list[str], info: dict) -> None:
    for key in keys:
        del state[key]
    info["ignored"].extend(keys)


def drop_openai_clip_metadata(expected: State, state: State, info: dict, source: str) -> None:
    """Drop ``input_resolution``, ``context_length`` and ``vocab_size`` (OpenAI's TorchScript
    CLIP state dicts hold them as scalars; OpenAI's own ``build_model`` deletes them too)."""
    _drop(state, [k for k in OPENAI_CLIP_METADATA if k in state and k not in expected], info)


def drop_mae_decoder(expected: State, state: State, info: dict, source: str) -> None:
    """Drop the MAE pretraining decoder (``decoder_*``) and its ``mask_token`` from a ViT
    checkpoint: the encoder alone is the teacher."""
    if not _is_timm_vit(expected):
        return
    _drop(state, [k for k in state if k not in expected
                  and (k.startswith(MAE_DECODER_PREFIXES) or k in MAE_DECODER_KEYS)], info)


def drop_ibot_masked_embed(expected: State, state: State, info: dict, source: str) -> None:
    """Drop iBOT's ``masked_embed`` (the student's token for masked patches; not used at
    inference)."""
    if _is_timm_vit(expected) and "masked_embed" in state and "masked_embed" not in expected:
        _drop(state, ["masked_embed"], info)


def rename_fc_norm(expected: State, state: State, info: dict, source: str) -> None:
    """Load ``fc_norm.*`` as ``norm.*`` when the checkpoint has no ``norm`` (MAE and timm
    checkpoints fine-tuned with global pooling replace the final norm by ``fc_norm``).

    The weights then normalise every token, and ``embed`` stays the normed CLS token; MAE's
    own fine-tuned classifier pooled the mean of the patch tokens instead. When the checkpoint
    has both, ``fc_norm`` is dropped and ``norm`` kept.
    """
    if not _is_timm_vit(expected) or "fc_norm.weight" in expected or "fc_norm.weight" not in state:
        return
    fc_norm = [k for k in state if k.startswith("fc_norm.")]
    if "norm.weight" in state:
        _drop(state, fc_norm, info)
        return
    for key in fc_norm:
        new = "norm." + key.removeprefix("fc_norm.")
        state[new] = state.pop(key)
        info["renamed"].append(f"{key} -> {new}")


def drop_clip_text_tower(expected: State, state: State, info: dict, source: str) -> None:
    """Drop the text tower of a full CLIP checkpoint loaded into an image-only CLIP model
    (``text = false``); refuse an image-only checkpoint for a model that has a text tower."""
    if not _is_clip(expected):
        return
    model_has_text = "token_embedding.weight" in expected
    file_has_text = "token_embedding.weight" in state
    if not model_has_text:
        _drop(state, [k for k in state if _is_clip_text_key(k)], info)
    elif not file_has_text and "visual.class_embedding" in state:
        raise DistillcError(f"checkpoint {source!r} holds only CLIP's image tower (no "
                            f"token_embedding.weight); build the teacher with text = false")


def resize_clip_positional_embedding(expected: State, state: State, info: dict, source: str) -> None:
    """Resample ``visual.positional_embedding`` (1 + g*g, width) to the model's grid, keeping
    the class position (CLIP ViT-B/32 is 7x7 at 224 px; 4x4 at 128 px, 1x1 at 32 px)."""
    key = "visual.positional_embedding"
    if not _is_clip(expected) or key not in state or key not in expected:
        return
    old, want = state[key], expected[key]
    if old.dim() != 2 or want.dim() != 2 or old.shape == want.shape or old.shape[1] != want.shape[1]:
        return  # the shape check in load_into reports anything else
    grid = int(round((want.shape[0] - 1) ** 0.5))
    if grid * grid != want.shape[0] - 1:
        return
    from distillc.plugins.models.vit import resize_pos_embed

    new = resize_pos_embed(old.unsqueeze(0), grid).squeeze(0)
    if new.shape == want.shape:
        state[key] = new
        info["resized"].append(f"{key} {tuple(old.shape)} -> {tuple(new.shape)}")


def adapt_input_channels(expected: State, state: State, info: dict, source: str) -> None:
    """Sum an RGB patch embedding over its input channels for a one-channel model.

    A grayscale image fed as three equal channels gives the same activations as one channel
    through the summed kernel (timm adapts ``in_chans=1`` the same way). Only 3 -> 1.
    """
    for key in INPUT_CONV_KEYS:
        if key not in state or key not in expected:
            continue
        old, want = state[key], expected[key]
        if old.dim() == 4 and want.dim() == 4 and old.shape[1] == 3 and want.shape[1] == 1 \
                and old.shape[0] == want.shape[0] and old.shape[2:] == want.shape[2:]:
            state[key] = old.float().sum(dim=1, keepdim=True).to(old.dtype)
            info["resized"].append(f"{key} {tuple(old.shape)} -> {tuple(want.shape)} "
                                   f"(RGB kernels summed for one input channel)")


KEY_RULES: tuple[KeyRule, ...] = (
    drop_openai_clip_metadata,
    drop_mae_decoder,
    drop_ibot_masked_embed,
    rename_fc_norm,
    drop_clip_text_tower,
    resize_clip_positional_embedding,
    adapt_input_channels,
)
"""Every rule, in the order :func:`apply_key_rules` runs them."""


def apply_key_rules(expected: State, state: State, info: dict, *, source: str) -> None:
    """Run every rule of :data:`KEY_RULES` on ``state`` (in place).

    ``info`` must hold the lists ``ignored``, ``renamed`` and ``resized``; rules append to them.
    """
    for rule in KEY_RULES:
        rule(expected, state, info, source)
