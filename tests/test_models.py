"""Specifications of the built-in models and checkpoint loading (plugins/models)."""

from __future__ import annotations

import argparse

import pytest
import torch

from distillc.errors import DistillcError, SpecError
from distillc.plugins.models import count_conv_weights, count_macs
from distillc.plugins.models.checkpoint import load_into, load_state_dict_file
from distillc.plugins.models.mobilenetv2 import MobileNetV2
from distillc.plugins.models.vit import VIT_ARCHS, VisionTransformer, build_vit

# timm's vit_small_patch16_224 with num_classes=0 (as DINO ViT-S/16 ships), written out by
# hand: the stem, one block's parameters (repeated 12 times), the final norm.
TIMM_VIT_S16_STEM = [
    ("cls_token", (1, 1, 384)),
    ("pos_embed", (1, 197, 384)),
    ("patch_embed.proj.weight", (384, 3, 16, 16)),
    ("patch_embed.proj.bias", (384,)),
]
TIMM_VIT_S16_BLOCK = [
    ("norm1.weight", (384,)),
    ("norm1.bias", (384,)),
    ("attn.qkv.weight", (1152, 384)),
    ("attn.qkv.bias", (1152,)),
    ("attn.proj.weight", (384, 384)),
    ("attn.proj.bias", (384,)),
    ("norm2.weight", (384,)),
    ("norm2.bias", (384,)),
    ("mlp.fc1.weight", (1536, 384)),
    ("mlp.fc1.bias", (1536,)),
    ("mlp.fc2.weight", (384, 1536)),
    ("mlp.fc2.bias", (384,)),
]
TIMM_VIT_S16_END = [
    ("norm.weight", (384,)),
    ("norm.bias", (384,)),
]
TIMM_VIT_S16 = (TIMM_VIT_S16_STEM
                + [(f"blocks.{i}.{name}", shape) for i in range(12)
                   for name, shape in TIMM_VIT_S16_BLOCK]
                + TIMM_VIT_S16_END)


def timm_vit_s16_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in TIMM_VIT_S16}


def tiny_vit(**kwargs) -> VisionTransformer:
    options = {"img_size": 32, "depth": 2}
    options.update(kwargs)
    return build_vit("vit_tiny_patch8", **options)


# --------------------------------------------------------------------------- ViT


def test_vit_small_patch16_state_dict_equals_timm_keys_and_shapes():
    model = build_vit("vit_small_patch16", img_size=224)
    got = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert got == TIMM_VIT_S16
    assert sum(p.numel() for p in model.parameters()) == 21_665_664


def test_vit_attributes():
    model = build_vit("vit_small_patch16", img_size=32, depth=3)
    assert (model.embed_dim, model.patch_size, model.grid, model.num_blocks) == (384, 16, 2, 3)


def test_vit_arch_table_has_all_sizes_and_patches():
    assert len(VIT_ARCHS) == 12
    assert VIT_ARCHS["vit_base_patch8"] == {"embed_dim": 768, "num_heads": 12, "depth": 12,
                                            "patch_size": 8}
    assert VIT_ARCHS["vit_tiny_patch2"]["embed_dim"] == 192


def test_unknown_vit_arch_lists_valid_names():
    with pytest.raises(SpecError, match="vit_small_patch16"):
        build_vit("vit_huge_patch14")


def test_unknown_vit_option_is_a_spec_error():
    with pytest.raises(SpecError, match="bogus"):
        build_vit("vit_tiny_patch16", bogus=1)


def test_vit_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(SpecError, match="multiple"):
        build_vit("vit_tiny_patch16", img_size=40)


def test_vit_forward_embed_and_patch_tokens_shapes():
    model = tiny_vit().eval()
    x = torch.rand(2, 3, 32, 32)
    assert model.forward_tokens(x).shape == (2, 17, 192)
    assert model(x).shape == (2, 192)
    assert model.patch_tokens(x).shape == (2, 192, 4, 4)
    # Patch (row 1, column 2) is token 1 + 1 * grid + 2.
    torch.testing.assert_close(model.patch_tokens(x)[:, :, 1, 2],
                               model.forward_tokens(x)[:, 1 + 4 + 2])


def test_vit_with_head_returns_logits_and_embed_stays_cls():
    model = tiny_vit(num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.embed(x).shape == (2, 192)
    assert "head.weight" in model.state_dict()


def test_forward_hidden_returns_requested_blocks_in_order():
    model = tiny_vit(depth=4).eval()
    x = torch.rand(2, 3, 32, 32)
    hidden = model.forward_hidden(x, [0, -1, 2])
    assert [h.shape for h in hidden] == [(2, 17, 192)] * 3
    # The last block's output, normed, is what forward_tokens returns.
    torch.testing.assert_close(model.norm(hidden[1]), model.forward_tokens(x))
    torch.testing.assert_close(model.forward_hidden(x, [2])[0], hidden[2])
    assert model.forward_hidden(x, []) == []


def test_forward_hidden_rejects_out_of_range_blocks():
    model = tiny_vit(depth=2)
    with pytest.raises(SpecError, match="out of range"):
        model.forward_hidden(torch.rand(1, 3, 32, 32), [2])
    with pytest.raises(SpecError, match="out of range"):
        model.forward_hidden(torch.rand(1, 3, 32, 32), [-3])


def test_vit_macs_include_attention_products():
    model = build_vit("vit_tiny_patch8", img_size=32, depth=1)
    tokens, dim, patch_macs = 17, 192, 16 * 192 * 3 * 8 * 8
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim \
        + 2 * tokens * dim * 4 * dim
    assert count_macs(model, (1, 3, 32, 32)) == patch_macs + block


# --------------------------------------------------------------------------- checkpoints


def test_timm_checkpoint_loads_into_32px_model_with_pos_embed_resized(tmp_path):
    from safetensors.torch import save_file

    state = timm_vit_s16_state_dict()
    save_file(state, str(tmp_path / "dino_vits16.safetensors"))
    loaded = load_state_dict_file(tmp_path / "dino_vits16.safetensors")
    model = build_vit("vit_small_patch16", img_size=32)

    info = load_into(model, loaded, source="dino_vits16.safetensors")

    assert info["resized"] == ["pos_embed (1, 197, 384) -> (1, 5, 384)"]
    assert info["ignored"] == []
    assert model.pos_embed.shape == (1, 5, 384)
    torch.testing.assert_close(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # CLS kept
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 384)


def test_resized_pos_embed_of_a_constant_grid_stays_constant():
    model = tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = torch.ones(1, 1 + 14 * 14, 192) * 0.5
    load_into(model, state, source="constant")
    torch.testing.assert_close(model.pos_embed, torch.full((1, 17, 192), 0.5))


def test_wrong_keys_and_shapes_are_listed_in_one_error():
    model = tiny_vit()
    state = dict(model.state_dict())
    del state["blocks.1.attn.qkv.bias"]
    state["blocks.7.norm1.weight"] = torch.zeros(192)
    state["norm.weight"] = torch.zeros(10)
    with pytest.raises(DistillcError) as caught:
        load_into(model, state, source="broken.pth")
    message = str(caught.value)
    assert "broken.pth" in message
    assert "1 missing: blocks.1.attn.qkv.bias" in message
    assert "1 unexpected: blocks.7.norm1.weight" in message
    assert "norm.weight: checkpoint (10,) vs model (192,)" in message


def test_error_listing_is_capped_with_a_count_of_the_rest():
    model = tiny_vit()
    state = dict(model.state_dict())
    state.update({f"extra.{i}": torch.zeros(1) for i in range(50)})
    with pytest.raises(DistillcError, match=r"50 unexpected: .* and 30 more"):
        load_into(model, state, source="many")


def test_checkpoint_head_is_ignored_when_the_model_has_none():
    model = tiny_vit()
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(1000, 192)
    state["head.bias"] = torch.zeros(1000)
    info = load_into(model, state, source="with-head")
    assert info["ignored"] == ["head.bias", "head.weight"]


def test_dino_full_checkpoint_loads_teacher_backbone_with_weights_only(tmp_path):
    model = tiny_vit()
    backbone = {f"backbone.{k}": v.clone() + 1 for k, v in model.state_dict().items()}
    teacher = dict(backbone, **{"head.mlp.0.weight": torch.zeros(4, 192),
                                "head.last_layer.weight_g": torch.ones(1, 4)})
    checkpoint = {"student": {"module.backbone.cls_token": torch.zeros(1, 1, 192)},
                  "teacher": teacher, "epoch": 100,
                  "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")

    state = load_state_dict_file(tmp_path / "checkpoint.pth")

    assert set(state) == set(model.state_dict())
    load_into(model, state, source="checkpoint.pth")
    torch.testing.assert_close(model.cls_token, backbone["backbone.cls_token"])


def test_ddp_prefix_and_model_container_are_unwrapped(tmp_path):
    model = tiny_vit()
    wrapped = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}
    torch.save(wrapped, tmp_path / "mae.pt")
    assert set(load_state_dict_file(tmp_path / "mae.pt")) == set(model.state_dict())


def test_moco_v3_base_encoder_is_selected(tmp_path):
    model = tiny_vit()
    state = {}
    for key, value in model.state_dict().items():
        state[f"module.base_encoder.{key}"] = value
        state[f"module.momentum_encoder.{key}"] = value
    state["module.predictor.0.weight"] = torch.zeros(4, 4)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "moco.pth.tar")
    (tmp_path / "moco.pth").write_bytes((tmp_path / "moco.pth.tar").read_bytes())
    assert set(load_state_dict_file(tmp_path / "moco.pth")) == set(model.state_dict())


class NotATensor:
    """A class that weights_only unpickling must refuse."""


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "bad.pth")
    with pytest.raises(SpecError, match="holds more than tensors and plain containers .*NotATensor"):
        load_state_dict_file(tmp_path / "bad.pth")


def test_unsupported_suffix_and_missing_file_are_spec_errors(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(SpecError, match="unsupported suffix"):
        load_state_dict_file(tmp_path / "weights.npz")
    with pytest.raises(SpecError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.safetensors")


def test_container_without_state_dict_names_its_keys(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(SpecError, match="'optimizer'"):
        load_state_dict_file(tmp_path / "opt.pth")


# --------------------------------------------------------------------------- MobileNetV2


def cifar_student(**kwargs) -> MobileNetV2:
    return MobileNetV2(width=0.35, stem_stride=1, **kwargs)


def test_mobilenetv2_035_cifar_layout_matches_reference_figures():
    model = cifar_student()
    assert count_macs(model, (1, 3, 32, 32)) == pytest.approx(15.6e6, rel=0.02)
    assert count_conv_weights(model) == pytest.approx(382e3, rel=0.01)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(396e3, rel=0.01)


def test_mobilenetv2_imagenet_layout_has_about_300m_macs():
    model = MobileNetV2(width=1.0)
    assert count_macs(model, (1, 3, 224, 224)) == pytest.approx(300e6, rel=0.01)


def test_mobilenetv2_embedding_and_stages():
    model = cifar_student().eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, model.embed_dim) == (2, 1280)
    stages = model.forward_stages(x)
    assert model.stage_channels == [8, 16, 32, 1280]
    assert [tuple(s.shape[1:]) for s in stages] == [(8, 32, 32), (16, 16, 16), (32, 8, 8),
                                                     (1280, 4, 4)]
    torch.testing.assert_close(stages[-1].mean((2, 3)), model(x))


def test_mobilenetv2_imagenet_layout_has_five_stages():
    model = MobileNetV2(width=0.5, last_channels=256).eval()
    stages = model.forward_stages(torch.rand(1, 3, 64, 64))
    assert [s.shape[-1] for s in stages] == [32, 16, 8, 4, 2]
    assert model.embed_dim == 256


def test_mobilenetv2_classifier_and_single_channel_input():
    model = cifar_student(in_chans=1, num_classes=10, last_channels=128).eval()
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.embed(x).shape == (2, 128)


def test_config_rebuilds_the_same_architecture_including_pruned_blocks():
    hidden = cifar_student().hidden_channels
    hidden[3] = 20
    hidden[10] = 48
    model = cifar_student(hidden_channels=hidden, last_channels=256)

    rebuilt = MobileNetV2(**model.config())

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    assert shapes["blocks.3.expand.conv.weight"] == (20, 8, 1, 1)
    assert shapes["blocks.3.depthwise.conv.weight"] == (20, 1, 3, 3)
    assert rebuilt.config() == model.config()


def test_hidden_channels_are_checked():
    with pytest.raises(SpecError, match="17 entries"):
        cifar_student(hidden_channels=[8] * 3)
    hidden = cifar_student().hidden_channels
    hidden[0] = 24  # block 0 has no expansion: its width is the stem's
    with pytest.raises(SpecError, match="block 0"):
        cifar_student(hidden_channels=hidden)


def test_mobilenetv2_traces_with_torch_fx():
    model = cifar_student(last_channels=64).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is deprecated, and wanted
def test_mobilenetv2_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = cifar_student(last_channels=64).eval()
    x = torch.rand(1, 3, 32, 32)
    path = tmp_path / "student.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["embedding"])
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


def test_student_checkpoint_round_trips_through_load_into(tmp_path):
    from safetensors.torch import save_file

    trained = cifar_student(last_channels=64)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()
             if not k.endswith("num_batches_tracked")}  # old checkpoints lack this buffer
    save_file(state, str(tmp_path / "student.safetensors"))
    fresh = MobileNetV2(**trained.config())
    info = load_into(fresh, load_state_dict_file(tmp_path / "student.safetensors"),
                     source="student.safetensors")
    assert info["resized"] == []
    torch.testing.assert_close(fresh.blocks[5].project.conv.weight,
                               trained.blocks[5].project.conv.weight)
