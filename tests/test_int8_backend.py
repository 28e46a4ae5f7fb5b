"""The INT8 backend end to end: Brevitas -> QCDQ ONNX -> Relax -> int8 kernels -> C bundle."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import distillc  # noqa: E402
from distillc.errors import PassError  # noqa: E402
from distillc.passes.backend import (  # noqa: E402
    build_program,
    compile_onnx_to_bundle,
    emit_c,
    export_qcdq,
    extract_program,
    import_onnx,
    load_program,
    lower_int8,
    plan_memory,
    quantize,
)
from distillc.passes.backend import microkernels, testing  # noqa: E402
from distillc.passes.backend.memory import MemoryPlan, arena_floor, check_plan  # noqa: E402
from distillc.passes.backend.requant import (  # noqa: E402
    choose_shift,
    fixed_point,
    requantize_reference,
    round_half_even,
)



class TinyNet(nn.Module):
    """Every lowered op once: conv, strided depthwise, 1x1 conv, residual add, pooling, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
                                nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12))
        self.res = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.expand(self.dw(self.stem(x)))
        x = x + self.res(x)
        x = self.gap(self.pool(x))
        return self.fc(torch.flatten(x, 1))


class SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Sigmoid()
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """TinyNet quantized, exported, compiled to a bundle and built with the host driver."""
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("tiny")
    calib = torch.randn(32, 3, 16, 16)
    qmodel = quantize(testing.randomize_batchnorm(TinyNet()), calib)
    onnx_path = export_qcdq(qmodel, calib[:1], work / "tiny.onnx")
    manifest = compile_onnx_to_bundle(onnx_path, work / "bundle", name="tiny")
    exe = testing.build_host_driver(work / "bundle", work / "build")
    return {"work": work, "qmodel": qmodel, "onnx": onnx_path, "manifest": manifest,
            "bundle": work / "bundle", "exe": exe}


@pytest.fixture(scope="module")
def sigmoid_onnx(tmp_path_factory):
    torch.manual_seed(1)
    work = tmp_path_factory.mktemp("sigmoid")
    calib = torch.randn(16, 3, 8, 8)
    qmodel = quantize(SigmoidNet().eval(), calib)
    return export_qcdq(qmodel, calib[:1], work / "sigmoid.onnx")


def test_onnxruntime_reproduces_brevitas_exactly(tiny):
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = tiny["qmodel"](x).numpy()
    session = testing.reference_session(tiny["onnx"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(8)])
    assert np.array_equal(got, expected)


def test_bundle_matches_onnxruntime_within_one_lsb(tiny):
    q_inputs = testing.quantized_inputs(tiny["manifest"], 32, seed=3)
    expected = testing.ort_reference(tiny["onnx"], tiny["manifest"], q_inputs)
    got = testing.bundle_outputs(tiny["exe"], tiny["manifest"], q_inputs, tiny["work"])
    assert np.abs(got - expected).max() <= 1


def test_float_api_quantizes_input_and_dequantizes_output(tiny):
    manifest = tiny["manifest"]
    q_inputs = testing.quantized_inputs(manifest, 4, seed=5)
    floats = testing.dequantize(q_inputs, manifest["input"])
    got = testing.run_driver(tiny["exe"], floats, tiny["work"], mode="float")
    raw = testing.run_driver(tiny["exe"], q_inputs, tiny["work"], mode="int8")
    assert np.array_equal(got, testing.dequantize(raw, manifest["output"]))


def test_bundle_sources_compile_for_cortex_m7(tiny):
    objects = testing.compile_for_cortex_m7(tiny["bundle"], tiny["work"] / "arm")
    assert len(objects) == len(testing.bundle_sources(tiny["bundle"]))


def test_bundle_bytes_are_identical_across_compiles(tiny, tmp_path):
    compile_onnx_to_bundle(tiny["onnx"], tmp_path / "again", name="tiny")
    first = sorted(p.relative_to(tiny["bundle"]) for p in tiny["bundle"].rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*")
                    if p.is_file())
    assert first == second
    for rel in first:
        assert (tiny["bundle"] / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_saved_program_gives_the_same_bundle_without_tvm(tiny, tmp_path):
    prog = build_program(lower_int8(import_onnx(tiny["onnx"])))
    prog.save(tmp_path / "program")
    loaded = load_program(tmp_path / "program")
    manifest = emit_c(loaded, tmp_path / "bundle", name="tiny", plan=plan_memory(loaded))
    assert manifest == tiny["manifest"]
    for path in (tiny["bundle"] / "src").iterdir():
        assert (tmp_path / "bundle" / "src" / path.name).read_bytes() == path.read_bytes()


def test_bundle_is_dependency_free_c(tiny):
    sources = {p.name: p.read_text() for p in (tiny["bundle"] / "src").iterdir()}
    everything = "\n".join(sources.values())
    assert not re.search(r"\b(malloc|calloc|free|fopen|printf)\s*\(", everything)
    assert "tvm" not in everything.lower().replace("tvm c target", "")
    assert "static union" in sources["distillc_model.c"]
    kernels = sources["distillc_kernels.c"]
    assert "float" not in kernels and "double" not in kernels
    # weights are never baked into kernels, and kernels keep no big temporaries on the stack
    # (the SIMD micro-kernel is the only static: `static inline` functions, no data) but the im2col
    # of one pixel pair (microkernels.conv_im2col_func: 2 x the conv's window, at most IM2COL_BYTES)
    assert not re.search(r"\bstatic\b(?!\s+inline\b)", kernels) and not re.search(r"\w+\[\d*\]\s*=\s*\{", kernels)
    local_arrays = [(name, int(n)) for name, n in re.findall(r"^\s+\w+ (\w+)\[(\d+)\];", kernels, re.M)]
    assert local_arrays and max(n for name, n in local_arrays if name != "col_ptr") <= 16
    scratch = [n for name, n in local_arrays if name == "col_ptr"]
    assert scratch and max(scratch) <= microkernels.IM2COL_BYTES  # the tiny student's 3x3 convs
    assert re.search(r"^const int8_t distillc_w\d+\[", sources["distillc_weights.c"], re.M)


def test_public_header_has_the_documented_api(tiny):
    header = (tiny["bundle"] / "include" / "distillc_model.h").read_text()
    manifest = tiny["manifest"]
    for macro in ("INPUT_SIZE", "OUTPUT_SIZE", "INPUT_SCALE", "INPUT_ZERO_POINT", "OUTPUT_SCALE",
                  "OUTPUT_ZERO_POINT", "ARENA_BYTES", "INPUT_SHAPE", "OUTPUT_SHAPE"):
        assert f"#define DISTILLC_{macro} " in header
    assert f"#define DISTILLC_INPUT_SIZE {16 * 16 * 3}\n" in header
    assert f"#define DISTILLC_ARENA_BYTES {manifest['memory']['arena_bytes']}\n" in header
    assert "int distillc_model_run(const int8_t *input, int8_t *output);" in header
    assert "int distillc_model_run_float(const float *input, float *output);" in header
    scale = re.search(r"#define DISTILLC_INPUT_SCALE (\S+)f\n", header).group(1)
    assert np.float32(float(scale)) == np.float32(manifest["input"]["scale"])


def test_manifest_describes_layers_memory_and_quantization(tiny):
    manifest = tiny["manifest"]
    assert manifest["input"]["dtype"] == "int8" and manifest["input"]["shape"] == [1, 3, 16, 16]
    assert manifest["output"]["shape"] == [1, 5]
    ops = [layer["op"] for layer in manifest["layers"]]
    assert {"conv2d", "depthwise_conv2d", "avg_pool", "global_avg_pool", "dense"} <= set(ops)
    assert manifest["macs"] == sum(layer["macs"] for layer in manifest["layers"]) > 0
    assert manifest["kernels"] == len({layer["kernel"] for layer in manifest["layers"]})
    memory = manifest["memory"]
    assert memory["arena_bytes"] >= memory["arena_floor_bytes"] > 0
    assert memory["arena_above_floor"] == (memory["arena_bytes"] > 1.05 * memory["arena_floor_bytes"])
    weights = sum(layer["weight_bytes"] for layer in manifest["layers"])
    assert memory["weights_bytes"] == weights
    conv = next(layer for layer in manifest["layers"] if layer["op"] == "conv2d")
    assert conv["node"].endswith("(Conv)")
    assert conv["macs"] == 8 * 16 * 16 * 3 * 9


def test_residual_add_and_requantization_fuse_into_the_conv_kernel(tiny):
    ops = [layer["op"] for layer in tiny["manifest"]["layers"]]
    assert "add" not in ops and "requantize" not in ops
    assert len(ops) == 7  # stem, dw, expand, res conv (+add), avg pool, global pool, fc


def test_memory_plan_keeps_live_tensors_apart(tiny):
    prog = extract_program(lower_int8(import_onnx(tiny["onnx"])))
    plan = plan_memory(prog)
    assert plan.arena_bytes >= plan.floor_bytes == arena_floor(prog)
    spans = prog.lifetimes()
    ids = sorted(spans)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if spans[a][0] > spans[b][1] or spans[b][0] > spans[a][1]:
                continue
            ra = (plan.offsets[a], plan.offsets[a] + prog.tensor(a).nbytes)
            rb = (plan.offsets[b], plan.offsets[b] + prog.tensor(b).nbytes)
            assert ra[1] <= rb[0] or rb[1] <= ra[0], (prog.tensor(a).name, prog.tensor(b).name)
    for step in prog.steps:  # a kernel's inputs never alias its output
        assert step.out not in step.args


def test_check_plan_rejects_overlapping_tensors(tiny):
    prog = extract_program(lower_int8(import_onnx(tiny["onnx"])))
    plan = plan_memory(prog)
    step = next(s for s in prog.steps if prog.tensor(s.args[0]).kind == "activation")
    broken = MemoryPlan(dict(plan.offsets), plan.arena_bytes, plan.floor_bytes, "broken")
    broken.offsets[step.out] = broken.offsets[step.args[0]]
    with pytest.raises(PassError, match="overlap"):
        check_plan(prog, broken)


def test_unsupported_op_is_a_pass_error_naming_op_and_node(sigmoid_onnx, tmp_path):
    with pytest.raises(PassError) as info:
        compile_onnx_to_bundle(sigmoid_onnx, tmp_path / "bundle", name="sig")
    assert info.value.pass_name == "tvm.int8"
    message = str(info.value)
    assert "sigmoid" in message and "/act/" in message and "(Sigmoid)" in message
    assert "allow_float_fallback" in message


def test_float_fallback_runs_the_op_in_float_when_allowed(sigmoid_onnx, tmp_path):
    manifest = compile_onnx_to_bundle(sigmoid_onnx, tmp_path / "bundle", name="sig",
                                      allow_float_fallback=True)
    assert manifest["float_fallback"] and "Sigmoid" in manifest["float_fallback"][0]
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")
    q_inputs = testing.quantized_inputs(manifest, 8, seed=2)
    expected = testing.ort_reference(sigmoid_onnx, manifest, q_inputs)
    got = testing.bundle_outputs(exe, manifest, q_inputs, tmp_path)
    assert np.abs(got - expected).max() <= 1


def test_float_output_is_a_pass_error(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
         helper.make_node("Relu", ["d"], ["y"])],
        "float_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "float_out.onnx"
    onnx.save(model, str(path))
    with pytest.raises(PassError, match="output is not quantized"):
        compile_onnx_to_bundle(path, tmp_path / "bundle", name="f")


def test_missing_onnx_file_is_a_pass_error(tmp_path):
    with pytest.raises(PassError, match="not found"):
        import_onnx(tmp_path / "nope.onnx")


def test_requantization_rounds_half_to_even_like_onnxruntime():
    ratio = np.array(0.25)
    shift = choose_shift([ratio])
    mult = fixed_point(ratio, shift)
    acc = np.array([-6, -2, 2, 6, 10, 3, -3])
    got = requantize_reference([acc], [mult], shift, 0, -128, 127)
    assert got.tolist() == round_half_even(acc * 0.25).astype(int).tolist() == [-2, 0, 0, 2, 2, 1, -1]


def test_fixed_point_multipliers_are_within_one_lsb_of_the_real_ratio():
    rng = np.random.default_rng(0)
    ratios = rng.uniform(1e-4, 4.0, size=64)
    shift = choose_shift([ratios])
    mults = fixed_point(ratios, shift)
    assert np.all(np.abs(mults) < 2**31)
    acc = rng.integers(-2**20, 2**20, size=(1000, 64))
    got = requantize_reference([acc], [mults], shift, 0, -(2**31), 2**31 - 1)
    assert np.abs(got - round_half_even(acc * ratios)).max() <= 1


def test_onnxsim_simplified_model_compiles_to_the_same_bundle_outputs(tiny, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(onnx.load(str(tiny["onnx"])))
    assert ok
    path = tmp_path / "simplified.onnx"
    onnx.save(simplified, str(path))
    manifest = compile_onnx_to_bundle(path, tmp_path / "bundle", name="tiny")
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")
    q_inputs = testing.quantized_inputs(manifest, 8, seed=4)
    got = testing.bundle_outputs(exe, manifest, q_inputs, tmp_path)
    assert np.array_equal(got, testing.bundle_outputs(tiny["exe"], tiny["manifest"], q_inputs,
                                                      tiny["work"]))


class _FloatStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=2)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.clamp(self.c2(y), 0, 6)
        w = self.c3(z) + z
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(w, 1), 1))


@pytest.mark.parametrize("activation", ["QUInt8", "QInt8"])
def test_onnxruntime_quantized_qdq_model_compiles_bit_exact(activation, tmp_path):
    """A QDQ model from another exporter (asymmetric activations with zero points)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    torch.manual_seed(0)
    float_path = tmp_path / "float.onnx"
    torch.onnx.export(_FloatStudent().eval(), torch.randn(1, 3, 12, 12), str(float_path),
                      opset_version=13, dynamo=False, input_names=["x"])
    rng = np.random.default_rng(0)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": rng.standard_normal((1, 3, 12, 12), dtype=np.float32)}
                                 for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    qdq_path = tmp_path / "qdq.onnx"
    quantization.quantize_static(
        str(float_path), str(qdq_path), Reader(), quant_format=quantization.QuantFormat.QDQ,
        activation_type=getattr(quantization.QuantType, activation),
        weight_type=quantization.QuantType.QInt8, per_channel=True)
    manifest = compile_onnx_to_bundle(qdq_path, tmp_path / "bundle", name="qdq")
    exe = testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")
    q_inputs = testing.quantized_inputs(manifest, 16, seed=1)
    expected = testing.ort_reference(qdq_path, manifest, q_inputs)
    assert np.array_equal(testing.bundle_outputs(exe, manifest, q_inputs, tmp_path), expected)


def test_a_kernel_shared_by_several_layers_names_each_call_after_its_own_node(tmp_path):
    """Convs of the same shape run one C kernel; the manifest still names each call's own
    ONNX node, in the graph's order (verify and the kernel-by-kernel check report by node)."""
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                          *[m for _ in range(3) for m in (nn.Conv2d(6, 6, 1), nn.ReLU())],
                          nn.Conv2d(6, 3, 1)).eval()
    calib = torch.randn(8, 2, 6, 6)
    onnx_path = export_qcdq(quantize(model, calib), calib[:1], tmp_path / "shared.onnx")
    manifest = compile_onnx_to_bundle(onnx_path, tmp_path / "bundle", name="shared")
    layers = manifest["layers"]
    kernels = [layer["kernel"] for layer in layers]
    assert len(set(kernels)) < len(kernels)  # a kernel runs more than one layer
    convs = [f"{node.name} (Conv)" for node in onnx.load(str(onnx_path)).graph.node if node.op_type == "Conv"]
    assert [layer["node"] for layer in layers] == convs
    assert len({layer["name"] for layer in layers}) == len(layers)


ARGMAX_DECL = "/* The index of the largest output value. */\nint distillc_output_argmax(const int8_t *output);"
ARGMAX_SOURCE = """#include <stdint.h>

#include "distillc_model.h"

int distillc_output_argmax(const int8_t *output)
{
    int best = 0;
    int i;

    for (i = 1; i < DISTILLC_OUTPUT_SIZE; ++i) {
        if (output[i] > output[best]) {
            best = i;
        }
    }
    return best;
}
"""


def test_a_bundle_extension_adds_declarations_sources_and_flash_through_emit_c(tiny, tmp_path):
    from distillc.passes.backend.codegen import CExtension

    ext = CExtension(name="argmax", declarations=ARGMAX_DECL, sources={"src/distillc_argmax.c": ARGMAX_SOURCE},
                     manifest={"what": "argmax"}, flash_bytes=40)
    prog = load_program_of(tiny, tmp_path)
    manifest = emit_c(prog, tmp_path / "bundle", name="tiny", plan=plan_memory(prog), extensions=[ext])
    header = (tmp_path / "bundle" / "include" / "distillc_model.h").read_text()
    assert header.index("distillc_model_run_float") < header.index("distillc_output_argmax") \
        < header.rindex("#ifdef __cplusplus")
    assert "src/distillc_argmax.c" in manifest["files"] and manifest["argmax"] == {"what": "argmax"}
    assert manifest["memory"]["argmax_bytes"] == 40
    testing.build_host_driver(tmp_path / "bundle", tmp_path / "build")  # -Wall -Wextra -Werror, with the extension
    clash = CExtension(name="bad", declarations="", sources={"src/distillc_model.c": ""})
    with pytest.raises(PassError, match="'bad' writes 'src/distillc_model.c', which is not a new file under src/"):
        emit_c(prog, tmp_path / "bundle2", name="tiny", plan=plan_memory(prog), extensions=[clash])


def test_codegen_asks_every_registered_pass_once_for_its_c_extension():
    from distillc.artifacts import Bundle
    from distillc.pass_api import Pass
    from distillc.passes.backend.codegen import CExtension
    from distillc.passes.backend.codegen_c import bundle_extensions
    from distillc.plugin_manager import load_plugins

    class Argmax(Pass):
        name = "test.argmax"
        takes = makes = Bundle

        @staticmethod
        def c_extension(meta, *, name, output_size, pass_name):
            if "argmax" not in meta:
                return None
            return CExtension(name="argmax", declarations=ARGMAX_DECL, flash_bytes=output_size)

        def run(self, artifact, ctx):
            raise AssertionError

    class Argmax2(Argmax):  # inherits the same c_extension: asked once
        name = "test.argmax2"

    class Plugin:
        __name__ = "argmax-plugin"

        @distillc.hookimpl
        def distillc_register_passes(self, registry):
            registry.add(Argmax)
            registry.add(Argmax2)

    plugins = load_plugins([Plugin()])
    assert bundle_extensions(plugins, {}, name="m", output_size=10, pass_name="codegen.c") == []
    [ext] = bundle_extensions(plugins, {"argmax": True}, name="m", output_size=10, pass_name="codegen.c")
    assert ext.name == "argmax" and ext.flash_bytes == 10


def load_program_of(tiny, folder):
    prog = build_program(lower_int8(import_onnx(tiny["onnx"])))
    prog.save(folder / "program")
    return load_program(folder / "program")
