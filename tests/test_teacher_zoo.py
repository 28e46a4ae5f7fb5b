"""Specifications of the teacher zoo: published checkpoints load without timm or open_clip.

The expected key names and shapes below are written out by hand from the published checkpoints
(timm's ``VisionTransformer`` as DINO, MAE, MoCo v3 and iBOT ship ViT-B/16; OpenAI's
``clip/model.py`` for CLIP ViT-B/32), never derived from distillc's modules: that is what makes
them a test of the key mapping. Each checkpoint is then wrapped the way its project saves it
and loaded through the registered builder, ``load_state_dict_file`` and ``load_into``.
Full-size models are only built on the meta device (shapes, no memory); real loads use
shallow or narrow instances with the same key names.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from distillc.errors import DistillcError, SpecError
from distillc.plugin_manager import load_plugins
from distillc.plugins.models.checkpoint import load_into, load_state_dict_file
from distillc.plugins.models.clip import CLIP
from distillc.spec import builder_options_model
from tests.test_models import TIMM_VIT_S16

ZOO_VIT_B16 = ("dino_vitb16", "mae_vitb16", "mocov3_vitb16", "ibot_vitb16")

# --------------------------------------------------------------------------- published keys

# timm VisionTransformer ViT-B/16 with num_classes=0 (DINO, MAE, MoCo v3 and iBOT backbones).
VIT_B16_STEM = [
    ("cls_token", (1, 1, 768)),
    ("pos_embed", (1, 197, 768)),
    ("patch_embed.proj.weight", (768, 3, 16, 16)),
    ("patch_embed.proj.bias", (768,)),
]
VIT_B16_BLOCK = [
    ("norm1.weight", (768,)),
    ("norm1.bias", (768,)),
    ("attn.qkv.weight", (2304, 768)),
    ("attn.qkv.bias", (2304,)),
    ("attn.proj.weight", (768, 768)),
    ("attn.proj.bias", (768,)),
    ("norm2.weight", (768,)),
    ("norm2.bias", (768,)),
    ("mlp.fc1.weight", (3072, 768)),
    ("mlp.fc1.bias", (3072,)),
    ("mlp.fc2.weight", (768, 3072)),
    ("mlp.fc2.bias", (768,)),
]
VIT_B16_END = [
    ("norm.weight", (768,)),
    ("norm.bias", (768,)),
]
VIT_B16 = (VIT_B16_STEM
           + [(f"blocks.{i}.{name}", shape) for i in range(12) for name, shape in VIT_B16_BLOCK]
           + VIT_B16_END)

# OpenAI CLIP ViT-B/32 (ViT-B-32.pt; open_clip's ViT-B-32 uses the same names).
CLIP_B32_TOP = [
    ("positional_embedding", (77, 512)),
    ("text_projection", (512, 512)),
    ("logit_scale", ()),
    ("token_embedding.weight", (49408, 512)),
    ("ln_final.weight", (512,)),
    ("ln_final.bias", (512,)),
]
CLIP_B32_VISUAL = [
    ("visual.class_embedding", (768,)),
    ("visual.positional_embedding", (50, 768)),
    ("visual.proj", (768, 512)),
    ("visual.conv1.weight", (768, 3, 32, 32)),
    ("visual.ln_pre.weight", (768,)),
    ("visual.ln_pre.bias", (768,)),
    ("visual.ln_post.weight", (768,)),
    ("visual.ln_post.bias", (768,)),
]
CLIP_B32_VISUAL_BLOCK = [
    ("attn.in_proj_weight", (2304, 768)),
    ("attn.in_proj_bias", (2304,)),
    ("attn.out_proj.weight", (768, 768)),
    ("attn.out_proj.bias", (768,)),
    ("ln_1.weight", (768,)),
    ("ln_1.bias", (768,)),
    ("mlp.c_fc.weight", (3072, 768)),
    ("mlp.c_fc.bias", (3072,)),
    ("mlp.c_proj.weight", (768, 3072)),
    ("mlp.c_proj.bias", (768,)),
    ("ln_2.weight", (768,)),
    ("ln_2.bias", (768,)),
]
CLIP_B32_TEXT_BLOCK = [
    ("attn.in_proj_weight", (1536, 512)),
    ("attn.in_proj_bias", (1536,)),
    ("attn.out_proj.weight", (512, 512)),
    ("attn.out_proj.bias", (512,)),
    ("ln_1.weight", (512,)),
    ("ln_1.bias", (512,)),
    ("mlp.c_fc.weight", (2048, 512)),
    ("mlp.c_fc.bias", (2048,)),
    ("mlp.c_proj.weight", (512, 2048)),
    ("mlp.c_proj.bias", (512,)),
    ("ln_2.weight", (512,)),
    ("ln_2.bias", (512,)),
]
CLIP_B32_IMAGE = dict(CLIP_B32_VISUAL + [(f"visual.transformer.resblocks.{i}.{name}", shape)
                                         for i in range(12) for name, shape in CLIP_B32_VISUAL_BLOCK])
CLIP_B32 = dict(CLIP_B32_TOP + list(CLIP_B32_IMAGE.items())
                + [(f"transformer.resblocks.{i}.{name}", shape)
                   for i in range(12) for name, shape in CLIP_B32_TEXT_BLOCK])
CLIP_B32_PARAMS = 151_277_313  # OpenAI's ViT-B/32, both towers


def vit_entries(dim: int, depth: int, grid: int, patch: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    """The ViT-B/16 list above for any width/depth/grid (for narrow test checkpoints)."""
    stem = [("cls_token", (1, 1, dim)), ("pos_embed", (1, 1 + grid * grid, dim)),
            ("patch_embed.proj.weight", (dim, 3, patch, patch)), ("patch_embed.proj.bias", (dim,))]
    block = [("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
             ("attn.qkv.bias", (3 * dim,)), ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
             ("norm2.weight", (dim,)), ("norm2.bias", (dim,)), ("mlp.fc1.weight", (4 * dim, dim)),
             ("mlp.fc1.bias", (4 * dim,)), ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,))]
    return (stem + [(f"blocks.{i}.{n}", s) for i in range(depth) for n, s in block]
            + [("norm.weight", (dim,)), ("norm.bias", (dim,))])


def clip_entries(width: int, layers: int, grid: int, output_dim: int, text_width: int, text_layers: int,
                 vocab: int, patch: int = 32, context: int = 77) -> dict[str, tuple[int, ...]]:
    """The CLIP ViT-B/32 lists above for any size (for narrow test checkpoints)."""
    def block(prefix: str, w: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}attn.in_proj_weight", (3 * w, w)), (f"{prefix}attn.in_proj_bias", (3 * w,)),
                (f"{prefix}attn.out_proj.weight", (w, w)), (f"{prefix}attn.out_proj.bias", (w,)),
                (f"{prefix}ln_1.weight", (w,)), (f"{prefix}ln_1.bias", (w,)),
                (f"{prefix}mlp.c_fc.weight", (4 * w, w)), (f"{prefix}mlp.c_fc.bias", (4 * w,)),
                (f"{prefix}mlp.c_proj.weight", (w, 4 * w)), (f"{prefix}mlp.c_proj.bias", (w,)),
                (f"{prefix}ln_2.weight", (w,)), (f"{prefix}ln_2.bias", (w,))]
    entries = [("positional_embedding", (context, text_width)), ("text_projection", (text_width, output_dim)),
               ("logit_scale", ()), ("token_embedding.weight", (vocab, text_width)),
               ("ln_final.weight", (text_width,)), ("ln_final.bias", (text_width,)),
               ("visual.class_embedding", (width,)), ("visual.positional_embedding", (1 + grid * grid, width)),
               ("visual.proj", (width, output_dim)), ("visual.conv1.weight", (width, 3, patch, patch)),
               ("visual.ln_pre.weight", (width,)), ("visual.ln_pre.bias", (width,)),
               ("visual.ln_post.weight", (width,)), ("visual.ln_post.bias", (width,))]
    for i in range(layers):
        entries += block(f"visual.transformer.resblocks.{i}.", width)
    for i in range(text_layers):
        entries += block(f"transformer.resblocks.{i}.", text_width)
    return dict(entries)


def random_state(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in entries}


def cheap(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of a published head's real shape that costs one element in a .pth file."""
    return torch.zeros(1).expand(*shape) if shape else torch.zeros(())


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def teachers():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
        return load_plugins().teachers


NARROW = {"embed_dim": 64, "depth": 2}  # one 64-wide head, 2 blocks: ViT-B/16 key names


def narrow_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(vit_entries(64, 2, 14), seed)


# --------------------------------------------------------------------------- registry


def test_zoo_teachers_are_registered_and_name_their_checkpoint_files(teachers):
    files = {"dino_vits16": "dino_deitsmall16_pretrain.pth", "dino_vitb16": "dino_vitbase16_pretrain.pth",
             "mae_vitb16": "mae_pretrain_vit_base.pth", "mocov3_vitb16": "vit-b-300ep.pth.tar",
             "ibot_vitb16": "checkpoint_teacher.pth", "clip_vitb32": "ViT-B-32.pt"}
    for name, file in files.items():
        assert file in teachers.get(name).__doc__
    assert {"vit_tiny_patch2", "vit_small_patch16", "vit_base_patch8"} <= set(teachers.names())


def test_zoo_options_are_typed_for_spec_validation(teachers):
    options = builder_options_model(teachers.get("dino_vits16"))
    assert options.model_validate({"depth": 2, "embed_dim": 64}).depth == 2
    with pytest.raises(Exception, match="depth"):
        options.model_validate({"depth": "deep"})
    with pytest.raises(Exception, match="bogus"):
        options.model_validate({"bogus": 1})
    clip = builder_options_model(teachers.get("clip_vitb32"))
    assert clip.model_validate({"text": False, "width": 64}).text is False


# --------------------------------------------------------------------------- ViT key maps


def test_hand_written_lists_agree_with_their_narrow_form():
    assert vit_entries(768, 12, 14) == VIT_B16
    assert clip_entries(768, 12, 7, 512, 512, 12, 49408) == CLIP_B32


@pytest.mark.parametrize("name", ZOO_VIT_B16)
def test_vit_b16_zoo_teacher_has_the_published_keys_and_shapes(teachers, name):
    with torch.device("meta"):
        model = teachers.get(name)(image_size=224)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == VIT_B16
    assert sum(p.numel() for p in model.parameters()) == 85_798_656


def test_dino_vits16_has_the_published_keys_and_shapes(teachers):
    with torch.device("meta"):
        model = teachers.get("dino_vits16")(image_size=224)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == TIMM_VIT_S16


def test_narrow_overrides_keep_every_key_name(teachers):
    model = teachers.get("dino_vitb16")(image_size=32, **NARROW)
    assert shapes(model) == dict(vit_entries(64, 2, 2))
    assert (model.embed_dim, model.num_blocks, model.grid) == (64, 2, 2)


def test_full_width_vit_b16_loads_two_blocks_from_safetensors(teachers, tmp_path):
    from safetensors.torch import save_file

    state = random_state([(k, s) for k, s in VIT_B16
                          if not k.startswith("blocks.") or int(k.split(".")[1]) < 2])
    save_file(state, str(tmp_path / "dino_vitbase16_pretrain.safetensors"))
    model = teachers.get("dino_vitb16")(image_size=64, depth=2)

    info = load_into(model, load_state_dict_file(tmp_path / "dino_vitbase16_pretrain.safetensors"),
                     source="dino_vitbase16_pretrain.safetensors")

    assert info["resized"] == ["pos_embed (1, 197, 768) -> (1, 17, 768)"]
    assert info["ignored"] == [] and info["renamed"] == []
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(model.pos_embed[:, 0], state["pos_embed"][:, 0])
    x = torch.rand(1, 3, 64, 64)
    assert model.eval().embed(x).shape == (1, 768)
    assert model.patch_tokens(x).shape == (1, 768, 4, 4)


def _dino_full(backbone: dict[str, torch.Tensor]) -> dict:
    head = {"head.mlp.0.weight": (2048, 64), "head.mlp.0.bias": (2048,), "head.mlp.2.weight": (2048, 2048),
            "head.mlp.2.bias": (2048,), "head.mlp.4.weight": (256, 2048), "head.mlp.4.bias": (256,),
            "head.last_layer.weight_g": (65536, 1), "head.last_layer.weight_v": (65536, 256)}
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {k: cheap(s) for k, s in head.items()}
    student = {f"module.{k}": cheap(tuple(v.shape)) for k, v in teacher.items()}
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100, "args": argparse.Namespace(arch="vit_base", patch_size=16),
            "dino_loss": {"center": torch.zeros(1, 65536)}}


def _mae_pretrain(backbone: dict[str, torch.Tensor]) -> dict:
    decoder = {"mask_token": (1, 1, 512), "decoder_embed.weight": (512, 64), "decoder_embed.bias": (512,),
               "decoder_pos_embed": (1, 197, 512), "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
               "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)}
    decoder |= {f"decoder_blocks.{i}.{name}": shape for i in range(8) for name, shape in
                [("norm1.weight", (512,)), ("attn.qkv.weight", (1536, 512)), ("mlp.fc2.bias", (512,))]}
    return {"model": dict(backbone) | {k: cheap(s) for k, s in decoder.items()}, "epoch": 799,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16")}


def _mae_finetuned(backbone: dict[str, torch.Tensor]) -> dict:
    state = {k: v for k, v in backbone.items() if not k.startswith("norm.")}
    state |= {"fc_norm.weight": backbone["norm.weight"], "fc_norm.bias": backbone["norm.bias"],
              "head.weight": cheap((1000, 64)), "head.bias": cheap((1000,))}
    return {"model": state}


def _mocov3(backbone: dict[str, torch.Tensor]) -> dict:
    projector = {"head.0.weight": (4096, 64), "head.3.weight": (4096, 4096), "head.6.weight": (256, 4096)}
    for bn, width in (("head.1", 4096), ("head.4", 4096)):
        projector |= {f"{bn}.{p}": (width,) for p in ("weight", "bias", "running_mean", "running_var")}
        projector[f"{bn}.num_batches_tracked"] = ()
    projector |= {"head.7.running_mean": (256,), "head.7.running_var": (256,), "head.7.num_batches_tracked": ()}
    predictor = {"0.weight": (4096, 256), "3.weight": (256, 4096), "1.weight": (4096,), "1.bias": (4096,),
                 "4.running_mean": (256,), "4.running_var": (256,)}
    state = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    state |= {f"module.base_encoder.{k}": cheap(s) for k, s in projector.items()}
    state |= {f"module.momentum_encoder.{k}": cheap(tuple(v.shape)) for k, v in backbone.items()}
    state |= {f"module.predictor.{k}": cheap(s) for k, s in predictor.items()}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def _ibot(container: str):
    def wrap(backbone: dict[str, torch.Tensor]) -> dict:
        head = {"head.mlp.0.weight": (2048, 64), "head.last_layer.weight_g": (8192, 1),
                "head.last_layer2.weight_g": (8192, 1)}
        return {container: {f"backbone.{k}": v for k, v in backbone.items()} | {k: cheap(s) for k, s in head.items()}}
    return wrap


def _flat(prefix: str):
    def wrap(backbone: dict[str, torch.Tensor]) -> dict:
        return {f"{prefix}{k}": v for k, v in backbone.items()}
    return wrap


# (teacher, file name, how the project saves it, keys load_into ignores, keys it renames)
CHECKPOINT_LAYOUTS = {
    "dino-plain": ("dino_vitb16", "dino_vitbase16_pretrain.pth", dict, 0, []),
    "dino-plain-safetensors": ("dino_vitb16", "dino_vitbase16_pretrain.safetensors", dict, 0, []),
    "dino-full": ("dino_vitb16", "checkpoint.pth", _dino_full, 0, []),  # head left behind by the unwrap
    "dino-teacher-safetensors": ("dino_vitb16", "teacher.safetensors", _flat("backbone."), 0, []),
    "mae-pretrain": ("mae_vitb16", "mae_pretrain_vit_base_full.pth", _mae_pretrain, 32, []),
    "mae-finetuned": ("mae_vitb16", "mae_finetuned_vit_base.pth", _mae_finetuned, 2,
                      ["fc_norm.bias -> norm.bias", "fc_norm.weight -> norm.weight"]),
    "mocov3": ("mocov3_vitb16", "vit-b-300ep.pth.tar", _mocov3, 16, []),  # the projection MLP
    "mocov3-safetensors": ("mocov3_vitb16", "moco.safetensors", _flat("module.base_encoder."), 0, []),
    "ibot-state-dict": ("ibot_vitb16", "checkpoint_teacher.pth", _ibot("state_dict"), 0, []),
    "ibot-teacher": ("ibot_vitb16", "checkpoint.pth", _ibot("teacher"), 0, []),
}


@pytest.mark.parametrize("layout", CHECKPOINT_LAYOUTS)
def test_published_checkpoint_layouts_load_through_the_registered_builder(teachers, tmp_path, layout):
    name, filename, wrap, ignored, renamed = CHECKPOINT_LAYOUTS[layout]
    backbone = narrow_vit_state()
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(wrap(backbone), str(path))
    else:
        torch.save(wrap(backbone), path)
    model = teachers.get(name)(image_size=32, **NARROW)

    info = load_into(model, load_state_dict_file(path), source=filename)

    assert len(info["ignored"]) == ignored
    assert sorted(info["renamed"]) == renamed
    assert info["resized"] == ["pos_embed (1, 197, 64) -> (1, 5, 64)"]
    for key in ("cls_token", "blocks.1.mlp.fc2.weight", "norm.weight", "patch_embed.proj.bias"):
        torch.testing.assert_close(model.state_dict()[key], backbone[key])


def test_mae_pretraining_decoder_and_mask_token_are_reported_as_ignored(teachers, tmp_path):
    torch.save(_mae_pretrain(narrow_vit_state()), tmp_path / "mae.pth")
    model = teachers.get("mae_vitb16")(image_size=32, **NARROW)
    info = load_into(model, load_state_dict_file(tmp_path / "mae.pth"), source="mae.pth")
    assert "mask_token" in info["ignored"] and "decoder_pos_embed" in info["ignored"]
    assert all(k == "mask_token" or k.startswith("decoder_") for k in info["ignored"])


def test_fc_norm_is_dropped_when_the_checkpoint_also_has_norm(teachers):
    state = narrow_vit_state()
    state["fc_norm.weight"] = torch.zeros(64)
    state["fc_norm.bias"] = torch.zeros(64)
    model = teachers.get("mae_vitb16")(image_size=32, **NARROW)
    info = load_into(model, state, source="both-norms")
    assert info["ignored"] == ["fc_norm.bias", "fc_norm.weight"] and info["renamed"] == []
    torch.testing.assert_close(model.norm.weight, state["norm.weight"])


def test_ibot_students_masked_embed_is_dropped(teachers):
    state = narrow_vit_state() | {"masked_embed": torch.zeros(1, 64)}
    model = teachers.get("ibot_vitb16")(image_size=32, **NARROW)
    assert load_into(model, state, source="ibot-student")["ignored"] == ["masked_embed"]


def test_rules_drop_nothing_else_unexpected_keys_still_fail(teachers):
    state = narrow_vit_state() | {"decoder_extra_thing": torch.zeros(1), "blocks.9.norm1.weight": torch.zeros(64)}
    model = teachers.get("mae_vitb16")(image_size=32, **NARROW)
    with pytest.raises(DistillcError, match=r"2 unexpected: decoder_extra_thing, blocks\.9\.norm1\.weight"):
        load_into(model, state, source="odd")


def test_rgb_checkpoint_starts_a_grayscale_teacher(teachers):
    state = narrow_vit_state()
    rgb = teachers.get("dino_vitb16")(image_size=32, **NARROW).eval()
    gray = teachers.get("dino_vitb16")(image_size=32, in_chans=1, **NARROW).eval()
    load_into(rgb, state, source="rgb")
    info = load_into(gray, state, source="rgb")
    assert "patch_embed.proj.weight (64, 3, 16, 16) -> (64, 1, 16, 16)" in info["resized"][0]
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(gray.embed(x), rgb.embed(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def test_zoo_teacher_taps_hidden_blocks_and_gives_cls_and_patch_tokens(teachers):
    model = teachers.get("dino_vits16")(image_size=32, depth=3, embed_dim=64).eval()
    x = torch.rand(2, 3, 32, 32)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 5, 64)
    first, last = model.forward_hidden(x, [0, -1])
    assert first.shape == last.shape == (2, 5, 64)
    torch.testing.assert_close(model.norm(last), tokens)
    torch.testing.assert_close(model.embed(x), tokens[:, 0])
    torch.testing.assert_close(model.patch_tokens(x).flatten(2).transpose(1, 2), tokens[:, 1:])


def test_avg_pool_embeds_a_fine_tuned_mae_by_its_fc_norm_of_the_mean_patch_token(teachers):
    """pool = "avg": the last block's patch tokens are averaged, then normed by fc_norm (loaded as norm)."""
    cls_model = teachers.get("mae_vitb16")(image_size=32, depth=2, embed_dim=64).eval()
    state = {k: v for k, v in cls_model.state_dict().items() if not k.startswith("norm.")}
    gen = torch.Generator().manual_seed(0)
    state["fc_norm.weight"] = 1 + torch.rand(64, generator=gen)
    state["fc_norm.bias"] = torch.rand(64, generator=gen)
    avg_model = teachers.get("mae_vitb16")(image_size=32, depth=2, embed_dim=64, pool="avg").eval()
    load_into(avg_model, state, source="fine-tuned MAE")
    x = torch.rand(3, 3, 32, 32)
    last = avg_model.forward_hidden(x, [-1])[0]
    expected = nn.functional.layer_norm(last[:, 1:].mean(dim=1), (64,), state["fc_norm.weight"], state["fc_norm.bias"],
                                        eps=avg_model.norm.eps)
    torch.testing.assert_close(avg_model.embed(x), expected)
    assert not torch.allclose(avg_model.embed(x), avg_model.forward_tokens(x)[:, 0])
    # The option is typed: the spec refuses anything else.
    options = builder_options_model(teachers.get("mae_vitb16"))
    assert options.model_validate({"pool": "avg"}).pool == "avg"
    with pytest.raises(Exception, match="pool"):
        options.model_validate({"pool": "max"})


def test_torchscript_archive_is_refused_with_a_conversion_hint(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "ViT-B-32.pt", "w") as archive:  # the layout of OpenAI's files
        archive.writestr("ViT-B-32/code/__torch__/model.py", "")
        archive.writestr("ViT-B-32/constants.pkl", b"")
    with pytest.raises(SpecError, match="TorchScript archive.*safetensors"):
        load_state_dict_file(tmp_path / "ViT-B-32.pt")


# --------------------------------------------------------------------------- CLIP

# A narrow CLIP with every OpenAI key: 2 x 64-wide image blocks (2 heads), one 32-wide text
# block (2 heads), a 1000-token vocabulary; the checkpoint's grid is ViT-B/32's 7x7.
CLIP_NARROW = {"depth": 2, "width": 64, "heads": 2, "output_dim": 32, "text_depth": 1, "text_width": 32,
               "text_heads": 2, "vocab_size": 1000}


def narrow_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_state(clip_entries(64, 2, 7, 32, 32, 1, 1000).items(), seed)
    state["logit_scale"] = torch.tensor(math.log(100.0))
    return state


def narrow_clip(teachers, image_size: int = 224, **kwargs) -> CLIP:
    return teachers.get("clip_vitb32")(image_size=image_size, **(CLIP_NARROW | kwargs))


def test_clip_vitb32_has_openais_keys_and_shapes(teachers):
    with torch.device("meta"):
        model = teachers.get("clip_vitb32")(image_size=224)
    assert shapes(model) == CLIP_B32
    assert sum(p.numel() for p in model.parameters()) == CLIP_B32_PARAMS
    assert (model.embed_dim, model.token_dim, model.grid, model.num_blocks) == (512, 768, 7, 12)
    assert model.has_text_tower and model.context_length == 77


def test_image_only_clip_has_only_the_visual_keys(teachers):
    with torch.device("meta"):
        model = teachers.get("clip_vitb32")(image_size=224, text=False)
    assert shapes(model) == CLIP_B32_IMAGE
    assert not model.has_text_tower


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_clip_checkpoint_loads_at_128px_with_its_grid_resampled(teachers, tmp_path, suffix):
    state = narrow_clip_state()
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".pth":  # OpenAI's TorchScript state dicts also carry three scalars
        metadata = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                    "vocab_size": torch.tensor(1000)}
        torch.save({"epoch": 32, "name": "ViT-B-32", "state_dict": {f"module.{k}": v for k, v in
                                                                    (state | metadata).items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = narrow_clip(teachers, image_size=128)

    info = load_into(model, load_state_dict_file(path), source=path.name)

    assert info["resized"] == ["visual.positional_embedding (50, 64) -> (17, 64)"]
    assert info["ignored"] == (["context_length", "input_resolution", "vocab_size"] if suffix == ".pth" else [])
    torch.testing.assert_close(model.visual.positional_embedding[0], state["visual.positional_embedding"][0])
    torch.testing.assert_close(model.token_embedding.weight, state["token_embedding.weight"])
    torch.testing.assert_close(model.logit_scale, state["logit_scale"])
    assert model.eval().embed(torch.rand(2, 3, 128, 128)).shape == (2, 32)


def test_clip_constant_position_grid_stays_constant_at_32px(teachers):
    state = narrow_clip_state()
    state["visual.positional_embedding"] = torch.full((50, 64), 0.25)
    model = narrow_clip(teachers, image_size=32)
    info = load_into(model, state, source="constant")
    assert info["resized"] == ["visual.positional_embedding (50, 64) -> (2, 64)"]
    torch.testing.assert_close(model.visual.positional_embedding, torch.full((2, 64), 0.25))


def test_full_clip_checkpoint_loads_into_an_image_only_teacher(teachers):
    state = narrow_clip_state()
    model = narrow_clip(teachers, text=False)
    info = load_into(model, state, source="full")
    assert "token_embedding.weight" in info["ignored"] and "logit_scale" in info["ignored"]
    assert all(not k.startswith("visual.") for k in info["ignored"])
    assert len(info["ignored"]) == 6 + 12  # top-level text keys + one text block
    torch.testing.assert_close(model.visual.proj, state["visual.proj"])


def test_image_only_checkpoint_needs_text_false(teachers):
    state = {k: v for k, v in narrow_clip_state().items() if k.startswith("visual.")}
    with pytest.raises(DistillcError, match="text = false"):
        load_into(narrow_clip(teachers), state, source="visual-only.safetensors")
    load_into(narrow_clip(teachers, text=False), state, source="visual-only.safetensors")


def test_clip_tokens_hidden_taps_and_embedding_agree(teachers):
    model = narrow_clip(teachers, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 5, 64)
    hidden = model.forward_hidden(x, [0, 1])
    assert [h.shape for h in hidden] == [(2, 5, 64)] * 2
    torch.testing.assert_close(model.visual.ln_post(hidden[1]), tokens)
    torch.testing.assert_close(model.embed(x), tokens[:, 0] @ model.visual.proj)
    assert model.patch_tokens(x).shape == (2, 64, 2, 2)
    torch.testing.assert_close(model.patch_tokens(x)[:, :, 1, 0], tokens[:, 1 + 2 + 0])
    with pytest.raises(SpecError, match="out of range"):
        model.forward_hidden(x, [2])


def _token_ids(rows: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(len(rows), 77, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


def test_clip_text_embedding_is_read_at_eot_under_a_causal_mask(teachers):
    model = narrow_clip(teachers).eval()
    sot, eot = 998, 999  # the two largest ids, as 49406/49407 are in OpenAI's vocabulary
    ids = _token_ids([[sot, 5, 7, eot], [sot, 9, eot]])
    base = model.encode_text(ids)
    assert base.shape == (2, 32)

    after = ids.clone()
    after[:, 10] = 3  # a token after EOT: the causal mask hides it from the EOT position
    torch.testing.assert_close(model.encode_text(after), base)

    before = ids.clone()
    before[0, 1] = 6  # a token before EOT changes that row, and only it
    changed = model.encode_text(before)
    assert not torch.allclose(changed[0], base[0])
    torch.testing.assert_close(changed[1], base[1])


def test_encode_text_refuses_an_image_only_teacher_and_bad_ids(teachers):
    with pytest.raises(DistillcError, match="text tower"):
        narrow_clip(teachers, text=False).encode_text(_token_ids([[1, 2]]))
    with pytest.raises(DistillcError, match=r"\(B, 77\)"):
        narrow_clip(teachers).encode_text(torch.zeros(1, 10, dtype=torch.int64))


# OpenAI's clip/model.py, written out with torch.nn.MultiheadAttention and its (L, N, D) layout,
# as the reference that distillc's CLIP must reproduce number for number.
class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, resolution, patch, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).reshape(x.shape[0], self.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, resolution, patch, width, layers, heads, output_dim, text_width, text_layers,
                 text_heads, vocab, context=77):
        super().__init__()
        self.visual = RefVisual(resolution, patch, width, layers, heads, output_dim)
        mask = torch.empty(context, context).fill_(float("-inf")).triu_(1)
        self.transformer = RefTransformer(text_width, text_layers, text_heads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.zeros(text_width, output_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def test_clip_matches_openais_reference_forward_with_the_same_state_dict(teachers):
    model = narrow_clip(teachers, image_size=64).eval()
    load_into(model, narrow_clip_state(seed=3), source="random")
    reference = RefCLIP(64, 32, 64, 2, 2, 32, 32, 1, 2, 1000).eval()
    reference.load_state_dict(model.state_dict(), strict=True)  # the same names and shapes

    x = torch.rand(2, 3, 64, 64)
    ids = _token_ids([[998, 4, 17, 999], [998, 999]])
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), reference.visual(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), reference.encode_text(ids), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- trained by the spec


def test_clip_teacher_can_be_trained_by_the_spec(write_spec):
    from distillc.run import compile_spec
    from distillc.progress import SilentProgress

    path = write_spec("""
        [distillc]
        spec_version = 1
        name = "clip-demo"

        [data]
        source = "sklearn-digits"
        image_size = 8
        channels = 1

        [[teachers]]
        name = "clip"
        arch = "clip_vitb32"
        text = false
        patch_size = 4
        depth = 1
        width = 32
        output_dim = 16
        train = { epochs = 1, batch_size = 256 }

        [student]
        arch = "ai8x-cnn"
        width = 8
        embed_dim = 16
    """)
    result = compile_spec(path, until="student", progress=SilentProgress())
    assert result.ran == ["teacher:clip", "student"]
    metrics = result.report["metrics"]
    assert 0.0 <= metrics["teacher:clip"]["supervised_val_top1"] <= 1.0
