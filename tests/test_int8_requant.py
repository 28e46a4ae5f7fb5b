"""The 32-bit requantization (int32 bias add, one 32x32->64 multiply, int32 clamp) is used only
where the planner proves it exact, and then gives the same bundle outputs as the 64-bit one."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distillc.passes.backend import compile_onnx_to_bundle, import_onnx, qdq_to_int8, testing  # noqa: E402
from distillc.passes.backend.qdq_to_int8 import LAYERS_ATTR, Term, _fits_32_bits  # noqa: E402


def requant_bits(onnx_path) -> dict:
    """``{layer: 32 | 64}`` for every requantizing layer of the rewritten model."""
    layers = json.loads(str(qdq_to_int8.qdq_to_int8(import_onnx(onnx_path)).attrs[LAYERS_ATTR]))
    return {name: info["requant_bits"] for name, info in layers.items() if "requant_bits" in info}


def outputs_both_ways(onnx_path, tmp_path, monkeypatch, count: int = 16):
    """The bundle's outputs on ``count`` seeded inputs, compiled with the 32-bit requantization
    where it is proven exact and with the 64-bit one forced everywhere; returns both, the
    manifest and the 32-bit bundle's folder."""
    results = {}
    for narrow in (True, False):
        monkeypatch.setattr(qdq_to_int8, "REQUANT_32", narrow)
        folder = tmp_path / ("r32" if narrow else "r64")
        manifest = compile_onnx_to_bundle(onnx_path, folder / "bundle", name="requant")
        exe = testing.build_host_driver(folder / "bundle", folder / "build")
        inputs = testing.quantized_inputs(manifest, count, seed=3)
        results[narrow] = testing.bundle_outputs(exe, manifest, inputs, folder)
    return results[True], results[False], manifest, tmp_path / "r32" / "bundle"


# (seed, weight_bits, act_bits): depthwise + residual, residual + depthwise, max/avg pools, 4-bit weights
RANDOM_CASES = [(0, 8, 8), (4, 8, 8), (5, 8, 8), (7, 4, 5)]


@pytest.mark.parametrize("seed,weight_bits,act_bits", RANDOM_CASES)
def test_random_nets_give_identical_outputs_with_32_bit_requantization(seed, weight_bits, act_bits,
                                                                       tmp_path, monkeypatch):
    onnx_path = testing.random_qcdq(seed, tmp_path / "model.onnx", weight_bits=weight_bits, act_bits=act_bits)
    bits = requant_bits(onnx_path)
    assert bits and set(bits.values()) == {32}, bits  # every layer of these nets is provably in range
    narrow, wide, _, bundle = outputs_both_ways(onnx_path, tmp_path, monkeypatch)
    assert np.array_equal(narrow, wide)
    kernels = (bundle / "src" / "distillc_kernels.c").read_text()
    assert "(int64_t)((int32_t)(" in kernels  # the int32 bias add, widened (see qdq_to_int8.requantize)
    testing.compile_for_cortex_m7(bundle, tmp_path / "m7")


def test_tie_net_gives_identical_outputs_with_32_bit_requantization(tmp_path, monkeypatch):
    """Exact .5 ties everywhere (ratio 1/2), a residual add and a gain: the rounding is the same."""
    onnx_path = testing.tie_net(tmp_path / "ties.onnx", residual=True, gain=3)
    assert set(requant_bits(onnx_path).values()) == {32}
    narrow, wide, _, bundle = outputs_both_ways(onnx_path, tmp_path, monkeypatch, count=8)
    assert np.array_equal(narrow, wide)
    testing.compile_for_cortex_m7(bundle, tmp_path / "m7")


def big_bias_net(path):
    """QCDQ model: ``conv1`` (1x1, 4 -> 4 channels) has biases of about +-(2**31 - 2000)
    accumulator steps, so ``acc + bias`` can leave int32 on ordinary inputs; ``conv2`` after it
    is ordinary.  Outputs are about 100 steps (the bias) plus a fraction of a step."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = np.float32
    s_x, s_w1 = f32(0.05), np.full(4, 0.01, f32)
    s_acc = (s_x * s_w1).astype(f32)
    big = 2**31 - 2000
    b1 = np.array([big, -big, big, 1000], np.int32)
    s_a = f32(float(big) * float(s_acc[0]) / 100.0)
    w1 = rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8)
    w2 = rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8)
    s_w2 = np.full(4, 0.02, f32)
    b2 = rng.integers(-500, 500, 4).astype(np.int32)
    s_y = f32(s_a * 0.02 * 127 * 4 * 127 / 100)
    inits = {"s_x": np.array(s_x), "zp": np.array(0, np.int8), "zp_w": np.zeros(4, np.int8),
             "zp_b": np.zeros(4, np.int32), "w1": w1, "s_w1": s_w1, "b1": b1, "s_b1": s_acc,
             "s_a": np.array(s_a), "w2": w2, "s_w2": s_w2, "b2": b2, "s_b2": (s_a * s_w2).astype(f32),
             "s_y": np.array(s_y)}
    nodes = []

    def quant(value, scale, name):
        nodes.append(helper.make_node("QuantizeLinear", [value, scale, "zp"], [name + "_q"], name=name + "_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", scale, "zp"], [name + "_dq"],
                                      name=name + "_DQ"))
        return name + "_dq"

    def conv(x, name):
        nodes.append(helper.make_node("DequantizeLinear", [f"w{name[-1]}", f"s_w{name[-1]}", "zp_w"],
                                      [name + "_w"], axis=0, name=name + "_WDQ"))
        nodes.append(helper.make_node("DequantizeLinear", [f"b{name[-1]}", f"s_b{name[-1]}", "zp_b"],
                                      [name + "_b"], axis=0, name=name + "_BDQ"))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name + "_out"], name=name))
        return name + "_out"

    x = quant("x", "s_x", "input")
    a = quant(conv(x, "conv1"), "s_a", "conv1")
    out = quant(conv(a, "conv2"), "s_y", "conv2")
    graph = helper.make_graph(
        nodes, "big_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 5, 5])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_layer_whose_accumulator_may_leave_int32_keeps_the_64_bit_path(tmp_path, monkeypatch):
    onnx_path = big_bias_net(tmp_path / "big_bias.onnx")
    bits = requant_bits(onnx_path)
    assert sorted(bits.values()) == [32, 64]
    assert [b for name, b in bits.items() if name.startswith("conv1")] == [64]
    narrow, wide, manifest, bundle = outputs_both_ways(onnx_path, tmp_path, monkeypatch)
    assert np.array_equal(narrow, wide)
    q_inputs = testing.quantized_inputs(manifest, 16, seed=3)
    expected = testing.ort_reference(onnx_path, manifest, q_inputs)
    assert np.abs(narrow - expected).max() <= 1
    testing.compile_for_cortex_m7(bundle, tmp_path / "m7")


def test_the_32_bit_bound_is_checked_at_the_int32_limits():
    mult, shift = np.array([1 << 20]), 30

    def term(bound, bias=None):
        return Term(None, np.ones(1), None if bias is None else np.array([bias]), np.array([bound]))

    assert _fits_32_bits([term(2**31 - 1001, 1000)], [mult], shift, 0)
    assert not _fits_32_bits([term(2**31 - 1000, 1000)], [mult], shift, 0)  # acc + bias may be 2**31
    assert not _fits_32_bits([Term(None, np.ones(1))], [mult], shift, 0)  # nothing known about acc
    # the shifted result itself must fit an int32 for the clamp: 2**30 * 2**20 >> 18 = 2**32
    assert not _fits_32_bits([term(2**30)], [mult], 18, 0)
    assert _fits_32_bits([term(2**30)], [mult], 21, 0)
