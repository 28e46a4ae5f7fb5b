"""Built-in teacher architectures: the ViT family, the named self-supervised zoo and CLIP.

A teacher builder takes ``image_size`` and ``in_chans`` (from ``[data]``) plus the options a
spec may set in its ``[[teachers]]`` entry; distillc validates those from the builder's type
hints. Every teacher has ``embed_dim``, ``embed(x) -> (B, embed_dim)``, ``forward_tokens``
(``(B, 1 + N, D)``, token 0 is CLS), ``forward_hidden(x, blocks)`` (block outputs by index),
``patch_tokens`` (``(B, D, grid, grid)``), ``num_blocks`` and ``grid``.

Names:

- ``vit_{tiny,small,base}_patch{2,4,8,16}``: timm-compatible ViTs, mostly for teachers trained
  by the spec (``train = { epochs = N }``) on small images.
- :data:`VIT_ZOO`: a name per published self-supervised checkpoint, saying which file it loads.
- ``clip_vitb32``: CLIP ViT-B/32 (image tower, and the text tower unless ``text = false``).

A builder may publish its native input as ``builder.input_defaults`` (``input_size``,
``channels``, ``mean``, ``std``, ``interpolation``): a loaded teacher is fed that (see
:func:`distillc.spec.teacher_input`).  The zoo and CLIP publish theirs; the plain ``vit_*``
builders do not, so they take the data as it is.

Shallow or narrow overrides (``depth``, ``embed_dim``/``width``, ...) keep every key name, so
tests and demos build tiny instances of the same architecture; weights of the published
checkpoints only fit the default sizes. This module imports no torch (the CLI stays fast).
"""

from __future__ import annotations

from typing import Any, Literal

from distillc import hookimpl
from distillc.plugins.models.archs import Blocks, Heads, MlpRatio, PatchSize, VocabSize, Width, vit_arch_table

#: name -> (ViT configuration, the checkpoint it loads and how that file is laid out).
VIT_ZOO: dict[str, tuple[str, str]] = {
    "dino_vits16": (
        "vit_small_patch16",
        "DINO ViT-S/16 (facebookresearch/dino): dino_deitsmall16_pretrain.pth, a plain timm-key "
        "state dict, or the full checkpoint, whose 'teacher' holds backbone.* (the DINO head is dropped)"),
    "dino_vitb16": (
        "vit_base_patch16",
        "DINO ViT-B/16 (facebookresearch/dino): dino_vitbase16_pretrain.pth, a plain timm-key "
        "state dict, or the full checkpoint, whose 'teacher' holds backbone.* (the DINO head is dropped)"),
    "mae_vitb16": (
        "vit_base_patch16",
        "MAE ViT-B/16 (facebookresearch/mae): mae_pretrain_vit_base.pth, {'model': encoder}; a full "
        "pretraining checkpoint's decoder and mask_token are dropped, a fine-tuned one's fc_norm "
        "loads as norm and its head is dropped"),
    "mocov3_vitb16": (
        "vit_base_patch16",
        "MoCo v3 ViT-B/16 (facebookresearch/moco-v3): vit-b-300ep.pth.tar, {'state_dict': "
        "module.base_encoder.*}; the momentum encoder, the predictor and the projection head "
        "(base_encoder.head.*) are dropped"),
    "ibot_vitb16": (
        "vit_base_patch16",
        "iBOT ViT-B/16 (bytedance/ibot): checkpoint_teacher.pth, {'state_dict' or 'teacher': "
        "backbone.*}; the iBOT head and a student's masked_embed are dropped"),
}


#: The published input of the self-supervised ViTs (DINO, MAE, MoCo v3, iBOT): 224 px RGB, ImageNet
#: statistics, bicubic resize.  A loaded teacher is fed this unless its [[teachers]] entry says otherwise.
IMAGENET_INPUT: dict[str, Any] = {"input_size": 224, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
#: CLIP's published input: 224 px RGB with its own statistics, bicubic resize.
CLIP_INPUT: dict[str, Any] = {"input_size": 224, "channels": 3, "mean": [0.48145466, 0.4578275, 0.40821073],
                              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}


def _vit_builder(arch: str) -> Any:
    def build(image_size: int, in_chans: int = 3, depth: Blocks | None = None,
              mlp_ratio: MlpRatio = 4.0, pool: Literal["cls", "avg"] = "cls") -> Any:
        from distillc.plugins.models.vit import build_vit

        return build_vit(arch, img_size=image_size, in_chans=in_chans, depth=depth, mlp_ratio=mlp_ratio, pool=pool)

    build.__name__ = arch
    build.__doc__ = f"{arch}: timm-compatible ViT (load DINO/MAE/MoCo v3/iBOT weights without timm)."
    return build


def _zoo_builder(name: str, arch: str, checkpoint: str) -> Any:
    def build(image_size: int, in_chans: int = 3, depth: Blocks | None = None, embed_dim: Width | None = None,
              num_heads: Heads | None = None, mlp_ratio: MlpRatio = 4.0, patch_size: PatchSize | None = None,
              pool: Literal["cls", "avg"] = "cls") -> Any:
        from distillc.plugins.models.vit import build_vit

        overrides: dict[str, Any] = {"mlp_ratio": mlp_ratio, "pool": pool}
        if embed_dim is not None:
            overrides["embed_dim"] = embed_dim
            if num_heads is None:  # keep 64-wide heads, as every published ViT size has
                num_heads = max(1, embed_dim // 64)
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        if patch_size is not None:
            overrides["patch_size"] = patch_size
        return build_vit(arch, img_size=image_size, in_chans=in_chans, depth=depth, **overrides)

    build.__name__ = name
    build.input_defaults = IMAGENET_INPUT
    build.__doc__ = (f"{name}: {arch} for {checkpoint}. Overrides (depth, embed_dim, num_heads, "
                     f"mlp_ratio, patch_size) keep the key names, for shallow test and demo teachers; "
                     f"pool = 'avg' embeds by the normed mean patch token (a fine-tuned MAE's global pool).")
    return build


def clip_vitb32(image_size: int, in_chans: int = 3, text: bool = True, depth: Blocks | None = None,
                width: Width | None = None, heads: Heads | None = None, patch_size: PatchSize | None = None,
                output_dim: Width | None = None, text_depth: Blocks | None = None, text_width: Width | None = None,
                text_heads: Heads | None = None, vocab_size: VocabSize | None = None) -> Any:
    """clip_vitb32: CLIP ViT-B/32 with OpenAI/open_clip keys (ViT-B-32.pt converted to a state
    dict, or open_clip's open_clip_pytorch_model.bin / .safetensors for ViT-B-32).

    ``embed`` is the projected 512-d image embedding; tokens and hidden states are 768 wide.
    ``text = false`` builds the image tower alone (a full checkpoint's text keys are dropped).
    ``encode_text`` takes token ids (the entry's ``tokenizer`` file makes them from class names).
    ``depth``/``width``/``heads``/``patch_size`` shrink the image tower and ``text_*``/``vocab_size``
    the text tower, keeping every key name.
    """
    from distillc.plugins.models.clip import build_clip

    return build_clip("clip_vitb32", image_size=image_size, in_chans=in_chans, text=text, layers=depth,
                      width=width, heads=heads, patch_size=patch_size, output_dim=output_dim,
                      text_layers=text_depth, text_width=text_width, text_heads=text_heads,
                      vocab_size=vocab_size)


clip_vitb32.input_defaults = CLIP_INPUT


@hookimpl
def distillc_register_teachers(registry: Any) -> None:
    for arch in vit_arch_table():
        registry.add(arch, _vit_builder(arch))
    for name, (arch, checkpoint) in VIT_ZOO.items():
        registry.add(name, _zoo_builder(name, arch, checkpoint))
    registry.add("clip_vitb32", clip_vitb32)
