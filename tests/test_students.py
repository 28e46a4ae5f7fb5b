"""Specifications of the built-in students and of the MAX78000 limit checker."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distillc.errors import SpecError
from distillc.plugin_manager import load_plugins
from distillc.plugins.models import count_conv_weights
from distillc.passes.max78000.ai8x import Ai8xCNN, max78000_violations
from distillc.plugins.models.mobilenetv2 import MobileNetV2
from distillc.plugins.models.vit_student import MCUViT
from distillc.spec import builder_options_model

STUDENTS = ("mobilenetv2", "vit-mcu", "ai8x-cnn")
SMALL_OPTIONS = {"mobilenetv2": {"width": 0.35, "last_channels": 64}}  # keeps the suite fast
# What an int8 MCU backend must provide for vit-mcu (see its module docstring).
VIT_MCU_ONNX_OPS = {"Add", "Concat", "Constant", "Conv", "Div", "Gather", "Identity", "MatMul", "Mul", "Pow",
                    "ReduceMean", "Relu", "Reshape", "Slice", "Softmax", "Sqrt", "Sub", "Transpose"}
AI8X_ONNX_OPS = {"Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Identity",
                 "BatchNormalization"}


@pytest.fixture(scope="module")
def students():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
        return load_plugins().students


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_and_run(model: nn.Module, x: torch.Tensor, path) -> tuple[torch.Tensor, set[str]]:
    """Export with the TorchScript exporter at opset 13 and run the file in onnxruntime."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13, input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    return torch.from_numpy(out), {node.op_type for node in graph.graph.node}


# --------------------------------------------------------------------------- every student


def test_students_are_registered_with_typed_options(students):
    assert set(STUDENTS) <= set(students.names())
    options = builder_options_model(students.get("vit-mcu"))
    assert options.model_validate({"act": "gelu"}).act == "gelu"
    with pytest.raises(Exception, match="act"):
        options.model_validate({"act": "swish"})
    with pytest.raises(Exception, match="bogus"):
        builder_options_model(students.get("ai8x-cnn")).model_validate({"bogus": 1})


@pytest.mark.parametrize("name", STUDENTS)
@pytest.mark.parametrize("image_size, in_chans", [(32, 3), (8, 1)])
def test_every_student_embeds_gives_stages_and_rebuilds_from_config(students, name, image_size, in_chans):
    model = students.get(name)(image_size=image_size, in_chans=in_chans, **SMALL_OPTIONS.get(name, {})).eval()
    x = torch.rand(2, in_chans, image_size, image_size)
    embedding = model(x)
    assert embedding.shape == (2, model.embed_dim)
    stages = model.forward_stages(x)
    assert [s.shape[1] for s in stages] == model.stage_channels
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in stages)
    rebuilt = type(model)(**model.config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("width", [0.35, 1.0])
def test_mobilenetv2_builds_across_its_width_range(students, width):
    model = students.get("mobilenetv2")(image_size=32, width=width, last_channels=64).eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 64)


# --------------------------------------------------------------------------- vit-mcu


def test_vit_mcu_is_mcu_sized_and_speaks_the_token_api(students):
    model = students.get("vit-mcu")(image_size=32).eval()
    assert 100_000 <= params(model) <= 300_000
    assert (model.embed_dim, model.grid, model.num_blocks) == (64, 8, 6)
    x = torch.rand(2, 3, 32, 32)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 65, 64)
    torch.testing.assert_close(model(x), tokens[:, 0])
    patches = model.patch_tokens(x)
    assert patches.shape == (2, 64, 8, 8)
    torch.testing.assert_close(patches[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])
    hidden = model.forward_hidden(x, [0, -1])
    assert [h.shape for h in hidden] == [(2, 65, 64)] * 2
    torch.testing.assert_close(model.norm(hidden[1]), tokens)
    stages = model.forward_stages(x)
    assert len(stages) == 6
    torch.testing.assert_close(stages[-1], patches)


def test_vit_mcu_options_are_checked():
    with pytest.raises(SpecError, match="divide"):
        MCUViT(dim=64, heads=3)
    with pytest.raises(SpecError, match="multiple"):
        MCUViT(image_size=30, patch_size=4)
    with pytest.raises(SpecError, match="out of range"):
        MCUViT(depth=2).forward_hidden(torch.rand(1, 3, 32, 32), [2])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is deprecated, and wanted
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_vit_mcu_exports_to_onnx_with_simple_ops_and_matches_onnxruntime(students, tmp_path, act):
    model = students.get("vit-mcu")(image_size=32, act=act).eval()
    x = torch.rand(3, 3, 32, 32)
    got, ops = export_and_run(model, x, tmp_path / "vit_mcu.onnx")
    torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
    assert ops - {"Erf"} <= VIT_MCU_ONNX_OPS, f"unexpected ops {ops - VIT_MCU_ONNX_OPS}"
    assert ("Erf" in ops) == (act == "gelu")


# --------------------------------------------------------------------------- ai8x-cnn


def test_ai8x_cnn_keeps_to_the_accelerators_layer_set_by_construction():
    model = Ai8xCNN(image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) <= 32
    for conv in convs:
        assert conv.kernel_size in ((1, 1), (3, 3)) and conv.stride == (1, 1) and conv.groups == 1
        assert conv.padding[0] <= 2 and conv.in_channels <= 1024 and conv.out_channels <= 1024
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Sequential,
               nn.ModuleList, Ai8xCNN)
    assert all(isinstance(m, allowed) for m in model.modules())
    assert count_conv_weights(model) < 442_368 // 2  # 8-bit weights, well under the weight memory
    assert model.stage_channels == [24, 48, 48, 128]


def test_ai8x_cnn_pools_to_downsample_but_never_below_4x4():
    shapes32 = [tuple(s.shape[-2:]) for s in Ai8xCNN(image_size=32).eval().forward_stages(torch.rand(1, 3, 32, 32))]
    assert shapes32 == [(32, 32), (16, 16), (8, 8), (4, 4)]
    shapes8 = [tuple(s.shape[-2:]) for s in Ai8xCNN(image_size=8).eval().forward_stages(torch.rand(1, 3, 8, 8))]
    assert shapes8 == [(8, 8), (4, 4), (4, 4), (4, 4)]


def test_ai8x_cnn_embedding_is_the_pooled_head_map():
    model = Ai8xCNN(image_size=32, width=16, embed_dim=64, pool="avg").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_stages(x)[-1].mean((2, 3)), model(x))


def test_ai8x_cnn_options_are_checked():
    with pytest.raises(SpecError, match="width"):
        Ai8xCNN(width=300)
    with pytest.raises(SpecError, match="embed_dim"):
        Ai8xCNN(embed_dim=2048)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ai8x_cnn_exports_to_onnx_and_matches_onnxruntime(students, tmp_path):
    model = students.get("ai8x-cnn")(image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    got, ops = export_and_run(model, x, tmp_path / "ai8x.onnx")
    torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
    assert ops <= AI8X_ONNX_OPS, f"unexpected ops {ops - AI8X_ONNX_OPS}"


# --------------------------------------------------------------------------- MAX78000 checker


@pytest.mark.parametrize("image_size", [32, 64])
def test_ai8x_cnn_breaks_no_max78000_limit(image_size):
    assert max78000_violations(Ai8xCNN(image_size=image_size), image_size) == []


def test_mobilenetv2_violations_list_every_depthwise_and_strided_layer():
    model = MobileNetV2(width=0.35, stem_stride=1)
    violations = max78000_violations(model, 32)
    depthwise = [v for v in violations if "depthwise convolution" in v]
    assert len(depthwise) == 17  # one per inverted-residual block
    assert any(v.startswith("blocks.0.depthwise.conv: depthwise") for v in depthwise)
    strided = sorted(v.split(":")[0] for v in violations if "stride (2, 2)" in v)
    assert strided == ["blocks.13.depthwise.conv", "blocks.3.depthwise.conv", "blocks.6.depthwise.conv"]
    assert "52 layers (convolutions and linear layers); at most 32" in violations
    assert any(v.startswith("last_conv.conv: 1280 output channels") for v in violations)
    assert any("ReLU6" in v for v in violations)
    assert any(v.startswith("biases need 7,040 bytes") for v in violations)  # one per BatchNorm channel


def test_imagenet_mobilenetv2_also_has_a_strided_stem():
    violations = max78000_violations(MobileNetV2(width=0.35, last_channels=64), 64)
    assert any(v.startswith("stem.conv: Conv2d stride (2, 2)") for v in violations)


def test_a_wide_ai8x_cnn_exceeds_the_weight_memory():
    """In all, and per processor as izer packs kernels (762 of 768 slots at 4 bits: it fits)."""
    wide = Ai8xCNN(image_size=32, width=40)
    violations = max78000_violations(wide, 32)
    assert violations[0] == "weights need 583,160 bytes at 8 bits; the weight memory holds 442,368"
    assert len(violations) == 2 and violations[1].startswith("stages.3.conv0.conv: kernel memory exhausted "
                                                              "at processor 0")
    assert max78000_violations(wide, 32, weight_bits=4) == []


class EveryMistake(nn.Module):
    """One layer of each kind the accelerator cannot run, each breaking several limits."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 8, 5, stride=2, padding=3, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.padded_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.norm = nn.LayerNorm(7)
        self.act = nn.GELU()
        self.wide = nn.Conv2d(8, 1100, 1)
        self.bn = nn.BatchNorm2d(1100)
        self.last = nn.Conv2d(1100, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.grouped(self.big(x))
        x = self.act(self.norm(self.padded_pool(x)))
        x = x @ x.transpose(-2, -1)
        x = self.last(self.bn(self.wide(x)))
        return torch.flatten(self.pool(x), 1)


def test_checker_lists_every_violation_not_only_the_first():
    violations = max78000_violations(EveryMistake(), 16)
    expected = [
        "big: Conv2d kernel 5x5; only 1x1 or 3x3",
        "big: Conv2d stride (2, 2); only stride 1",
        "big: Conv2d padding (3, 3); only 0..2",
        "big: Conv2d dilation (2, 2); only 1",
        "grouped: grouped convolution (groups=2)",
        "padded_pool: pooling padding (1, 1)",
        "norm: layer type LayerNorm is not supported",
        "act: activation GELU is not supported",
        "wide: 1100 output channels; at most 1024",
        "wide: 1100 biased outputs",  # the folded BatchNorm brings a bias
        "last: 1100 input channels; at most 1024",
        "matmul: operation matmul is not supported",
        "transpose: operation .transpose() is not supported",
    ]
    for start in expected:
        assert any(v.startswith(start) for v in violations), f"missing {start!r} in {violations}"
    # After the last layer (global pooling, flatten) is CPU work, not a violation.
    assert not any(v.startswith(("pool", "flatten")) for v in violations)


def test_checker_counts_weights_at_the_width_izer_stores_them():
    """izer stores 1, 2, 4 or 8 bits per weight: a 3-bit student takes 4 (it used to be refused with
    a ValueError, an internal error after QAT with weight_bits = 3); 0 or 9 bits do not exist."""
    wide = Ai8xCNN(image_size=32, width=48)
    at3, at4 = max78000_violations(wide, 32, weight_bits=3), max78000_violations(wide, 32, weight_bits=4)
    assert at3 == at4 and at4 != max78000_violations(wide, 32, weight_bits=8)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            max78000_violations(Ai8xCNN(), 32, weight_bits=bits)


def test_vit_mcu_is_not_for_the_max78000():
    violations = max78000_violations(MCUViT(depth=1), 32)
    assert any("LayerNorm" in v for v in violations)
    assert any("operation softmax" in v for v in violations)
