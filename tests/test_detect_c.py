"""distillc_detect: the bundle's C detection decoder equals decode_int8, verify.host/qemu check it,
``distillc run --detections`` writes it.

No training: one small QCDQ model whose output is a detection map ``(1, 5 + E, G, G)`` (three
1x1 convs, so the arena has a dead tensor the decoder can reuse), a hand-made
``meta["detection"]``, and the real passes ``codegen.c``, ``verify.host`` and ``verify.qemu``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distillc.artifacts import REFERENCE_ONNX, Bundle, Int8Program
from distillc.cli import app
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.backend import build_program, import_onnx, lower_int8, plan_memory
from distillc.passes.backend.codegen_c import CodegenC
from distillc.passes.detect.c_api import ISQRT_C, as_rows, reference_detections
from distillc.passes.verify.host_qemu import VerifyHost, VerifyQemu
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress

GRID, EMBED, CLASSES, DIMS, IN_CHANNELS = 6, 8, 3, [4, 8], 4
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]


def detection_onnx(path: Path, *, seed: int = 0) -> Path:
    """QCDQ ONNX: input (1, 4, G, G) -> 1x1 conv to 32 -> 1x1 conv to 8 -> 1x1 conv to 5 + E;
    generic scales (calibrated on random inputs), output zero point 3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f32 = np.float32
    widths = [IN_CHANNELS, 32, 8, 5 + EMBED]
    inits = {"s0": np.array(f32(0.05)), "zp": np.array(0, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "zp"], ["a0q"], name="in_Q"),
             helper.make_node("DequantizeLinear", ["a0q", "s0", "zp"], ["a0"], name="in_DQ")]
    x = rng.integers(-128, 128, (256, IN_CHANNELS)).astype(f32) * f32(0.05)
    for i, (cin, cout) in enumerate(zip(widths, widths[1:]), start=1):
        w = rng.integers(-127, 128, (cout, cin, 1, 1)).astype(np.int8)
        s_w = rng.uniform(0.002, 0.01, cout).astype(f32)
        x = x @ (w[:, :, 0, 0].astype(f32) * s_w[:, None]).T
        zp = 3 if i == len(widths) - 1 else 0
        inits.update({f"w{i}": w, f"sw{i}": s_w, f"zw{i}": np.zeros(cout, np.int8), f"s{i}": np.array(f32(np.abs(x).max() / 110)),
                      f"z{i}": np.array(zp, np.int8)})
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"sw{i}", f"zw{i}"], [f"w{i}dq"], axis=0, name=f"w{i}_DQ"),
                  helper.make_node("Conv", [f"a{i - 1}", f"w{i}dq"], [f"y{i}"], name=f"conv{i}"),
                  helper.make_node("QuantizeLinear", [f"y{i}", f"s{i}", f"z{i}"], [f"a{i}q"], name=f"conv{i}_Q"),
                  helper.make_node("DequantizeLinear", [f"a{i}q", f"s{i}", f"z{i}"], [f"a{i}"], name=f"conv{i}_DQ")]
    last = f"a{len(widths) - 1}"
    graph = helper.make_graph(nodes, "detection", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, IN_CHANNELS, GRID, GRID])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, 5 + EMBED, GRID, GRID])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def detection_meta(seed: int = 1) -> dict:
    """What detect.open-vocab leaves in ``meta["detection"]`` (random int8 class rows)."""
    rng = np.random.default_rng(seed)
    return {"dims": DIMS, "classes": ["zero", "one", "two"], "seen": [0, 1], "unseen": [2], "grid": GRID,
            "stride": 8, "image_size": 8 * GRID, "embed_dim": EMBED, "class_source": "prototypes",
            "rows_int8": rng.integers(-127, 128, (CLASSES, EMBED)).tolist(), "row_scales": [0.01] * CLASSES,
            "support_images": [], "score_threshold": 0.05, "iou": 0.5, "max_detections": 20}


def context(folder: Path, step: str) -> PassContext:
    def no_data():
        raise AssertionError("the detection bundle's passes run on random inputs")

    scratch = folder / step
    scratch.mkdir(parents=True)
    return PassContext(plugins=load_plugins(), progress=SilentProgress(), scratch=scratch,
                       checkpoint_dir=folder / "checkpoints", step_id=step, load_data=no_data, seed=0)


@pytest.fixture(scope="module")
def program(module_folder):
    """The lowered, planned program of the detection model, as plan-memory hands it to codegen.c."""
    onnx_path = detection_onnx(module_folder / "model.onnx")
    prog = build_program(lower_int8(import_onnx(onnx_path)))
    folder = module_folder / "program"
    prog.save(folder)
    shutil.copyfile(onnx_path, folder / REFERENCE_ONNX)
    return Int8Program(path=folder, plan=plan_memory(prog).to_dict(), meta={"detection": detection_meta()})


@pytest.fixture(scope="module")
def bundle(program, module_folder):
    """codegen.c's bundle (the registered passes asked for their C, as in a compile)."""
    config = CodegenC.Config(model_name="detector", inputs="random")
    return CodegenC(config).run(program, context(module_folder, "codegen")).artifact


@pytest.fixture(scope="module")
def verified(bundle, module_folder):
    config = VerifyHost.Config(inputs="random", images=6, sqnr_images=0)
    return VerifyHost(config).run(bundle, context(module_folder, "verify-host"))


# -- the decoder on maps ----------------------------------------------------------------------------

HARNESS = r"""#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"

/* stdin: records of (dim, threshold, max_out) as int32 then DISTILLC_OUTPUT_SIZE int8 values. */
int main(void)
{
    static int8_t map[DISTILLC_OUTPUT_SIZE];
    static distillc_detection_t out[64];
    int32_t head[3];

    while (fread(head, sizeof head[0], 3, stdin) == 3 && fread(map, 1, sizeof map, stdin) == sizeof map) {
        const int n = distillc_detect_output(map, (int)head[0], head[1], out, (int)head[2]);
        printf("%d", n);
        for (int k = 0; k < n; ++k) {
            printf(" %ld %ld %ld %ld %ld %ld", (long)out[k].x0, (long)out[k].y0, (long)out[k].x1, (long)out[k].y1,
                   (long)out[k].score_q15, (long)out[k].class_id);
        }
        printf("\n");
    }
    return 0;
}
"""


def build_harness(bundle_dir: Path, folder: Path, main: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.c").write_text(main)
    exe = folder / "harness"
    sources = sorted(str(p) for p in (bundle_dir / "src").glob("*.c"))
    subprocess.run(["gcc", *FLAGS, f"-I{bundle_dir / 'include'}", str(folder / "main.c"), *sources, "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def decode_in_c(exe: Path, records: list) -> list:
    """(count, rows) per (map, dim, threshold, max_out) record, from distillc_detect_output."""
    blob = b"".join(np.asarray([d, t, m], dtype=np.int32).tobytes() + np.asarray(q, dtype=np.int8).tobytes()
                    for q, d, t, m in records)
    printed = subprocess.run([str(exe)], input=blob, check=True, capture_output=True).stdout.decode().splitlines()
    assert len(printed) == len(records)
    results = []
    for line in printed:
        values = [int(v) for v in line.split()]
        results.append((values[0], np.asarray(values[1:], dtype=np.int64).reshape(-1, 6)))
    return results


def edge_maps(zero_point: int) -> dict:
    """Maps that meet the decoder's edge cases (channels: objectness, cx, cy, log w, log h, embedding)."""
    cells = GRID * GRID
    rng = np.random.default_rng(7)
    maps = {}
    tie = np.zeros((5 + EMBED, cells), np.int64)
    tie[0] = 100  # every cell the same objectness, box and embedding: equal scores, ranked by cell
    tie[1:5] = zero_point
    tie[5:] = rng.integers(-128, 128, EMBED)[:, None]
    maps["ties"] = tie
    whole = tie.copy()
    whole[3:5] = 127  # huge boxes: every box is the whole image (clamped), so NMS keeps one per class
    maps["all_suppressed_but_one"] = whole
    border = rng.integers(-128, 128, (5 + EMBED, cells))
    border[1:3] = rng.choice([-128, 127], (2, cells))  # centres far outside the cell: clamped at the borders
    border[3:5] = rng.integers(60, 128, (2, cells))
    maps["clamped"] = border
    flat = rng.integers(-128, 128, (5 + EMBED, cells))
    flat[5:] = zero_point  # a zero embedding: cosine 0, class 0, score 0
    maps["zero_embedding"] = flat
    for k in range(4):
        maps[f"random{k}"] = np.random.default_rng(100 + k).integers(-128, 128, (5 + EMBED, cells))
    return {name: np.clip(m, -128, 127).astype(np.int8).reshape(-1) for name, m in maps.items()}


def test_distillc_detect_output_equals_decode_int8_on_random_and_edge_maps(bundle, tmp_path):
    manifest = bundle.manifest
    exe = build_harness(bundle.path, tmp_path / "harness", HARNESS)
    maps = edge_maps(int(manifest["output"]["zero_point"]))
    default = manifest["detection"]["score_threshold_q15"]
    records, expected = [], []
    for name, q in maps.items():
        for dim in DIMS:
            for threshold in (default, 0, -5, 6000, 40000):
                for max_out in (0, 1, 3, 20, 64):
                    records.append((q, dim, threshold, max_out))
                    [ref] = reference_detections(q[None], manifest, dim, threshold, max_out)
                    expected.append((name, as_rows(ref)))
    got = decode_in_c(exe, records)
    for (name, ref), (count, rows), (_, dim, threshold, max_out) in zip(expected, got, records):
        assert count == len(ref) and np.array_equal(rows, ref), (name, dim, threshold, max_out)
    # The edge cases were met: ties ranked by cell, NMS down to one box, fewer kept than candidates
    [ties] = reference_detections(maps["ties"][None], manifest, DIMS[-1], 0, 64)
    assert len(ties.scores) > 1 and len(set(ties.scores.tolist())) == 1
    [whole] = reference_detections(maps["all_suppressed_but_one"][None], manifest, DIMS[-1], 0, 64)
    limit = 8 * GRID * 16
    assert len(whole.scores) == 1 and whole.boxes.tolist() == [[0, 0, limit, limit]]
    [clamped] = reference_detections(maps["clamped"][None], manifest, DIMS[-1], 0, 64)
    assert (clamped.boxes == 0).any() and (clamped.boxes == limit).any()
    many = [r for r, (q, d, t, m) in zip(expected, records) if m == 3 and t == 0 and len(r[1]) == 3]
    assert many, "max_out 3 cut some candidate lists short"
    assert all(c[0] == 0 for c, (q, d, t, m) in zip(got, records) if t == 40000)  # above every score: nothing


def test_a_dim_outside_the_dims_or_a_negative_max_out_is_refused(bundle, tmp_path):
    exe = build_harness(bundle.path, tmp_path / "harness", HARNESS)
    q = edge_maps(0)["random0"]
    got = decode_in_c(exe, [(q, 5, 0, 10), (q, 0, 0, 10), (q, -4, 0, 10), (q, 16, 0, 10), (q, 4, 0, -1)])
    assert [count for count, _ in got] == [-1] * 5


def test_isqrt_is_the_floor_square_root_of_every_uint64(tmp_path):
    values = [0, 1, 2, 3, 4, 8, 9, 15, 16, 17, 2**32 - 1, 2**32, 2**62 - 1, 2**62, 2**63, 2**64 - 1]
    values += [k * k + e for k in (2**31 - 1, 2**31, 2**32 - 1, 3037000499, 123456789) for e in (-1, 0, 1)]
    values += [int(v) for v in np.random.default_rng(0).integers(0, 2**63, 200, dtype=np.uint64)]
    values = [v for v in values if 0 <= v < 2**64]
    main = ("#include <stdint.h>\n#include <stdio.h>\n\n" + ISQRT_C +
            "\nint main(void)\n{\n    unsigned long long n;\n\n    while (scanf(\"%llu\", &n) == 1) {\n"
            "        printf(\"%llu\\n\", (unsigned long long)distillc_detect_isqrt((uint64_t)n));\n    }\n"
            "    return 0;\n}\n")
    (tmp_path / "isqrt.c").write_text(main)
    subprocess.run(["gcc", *FLAGS, str(tmp_path / "isqrt.c"), "-o", str(tmp_path / "isqrt")], check=True)
    printed = subprocess.run([str(tmp_path / "isqrt")], input="\n".join(map(str, values)), check=True,
                             capture_output=True, text=True).stdout.split()
    assert [int(v) for v in printed] == [math.isqrt(v) for v in values]


# -- the bundle -------------------------------------------------------------------------------------


def test_the_decoder_shares_the_arena_and_the_manifest_counts_its_memory(bundle, program):
    manifest = bundle.manifest
    memory, entry = manifest["memory"], manifest["detection"]
    share = memory["arena_share"]
    # conv1's 32-channel map is dead when the last conv runs: map and candidates fit in its place
    assert memory["arena_bytes"] == share["planned_bytes"] == program.plan["arena_bytes"]
    out_bytes = (5 + EMBED) * GRID * GRID
    last_input = (share["output_offset"], share["output_offset"] + out_bytes)
    assert share["scratch_bytes"] == entry["scratch_bytes"] == 6 * GRID * GRID
    assert share["scratch_offset"] >= last_input[1] or share["scratch_offset"] + share["scratch_bytes"] <= last_input[0]
    live_at_last = [(layer["arena_offset"], layer["arena_offset"] + layer["arena_bytes"])
                    for layer in manifest["layers"][-2:-1]]
    assert all(b <= last_input[0] or a >= last_input[1] for a, b in live_at_last)
    assert entry["flash_bytes"] == memory["detection_bytes"] == (
        256 * 10 + CLASSES * EMBED + 4 * CLASSES * len(DIMS) + 4 * len(DIMS)
        + sum(len(c) + 1 + 4 for c in entry["classes"]))
    assert entry["flash_bytes_per_class"] == EMBED + 4 * len(DIMS) + 4
    assert entry["flash_bytes_per_dim"] == 4 * CLASSES + 4
    header = (bundle.path / "include" / "distillc_model.h").read_text()
    assert "int distillc_detect(const int8_t *input, int dim, int32_t score_threshold_q" in header
    assert f"#define DISTILLC_ARENA_BYTES {memory['arena_bytes']}" in header


def test_the_detection_source_is_byte_reproducible(bundle, program, module_folder):
    config = CodegenC.Config(model_name="detector", inputs="random")
    again = CodegenC(config).run(program, context(module_folder, "codegen-again")).artifact
    for rel in ("src/distillc_detect.c", "src/distillc_model.c", "src/distillc_internal.h",
                "include/distillc_model.h"):
        assert (again.path / rel).read_bytes() == (bundle.path / rel).read_bytes(), rel


def test_verify_host_runs_distillc_detect_and_records_the_comparison(verified):
    host = verified.artifact.manifest["verification"]["host"]["detection"]
    assert host["decoder_matches"] is True and host["images"] == 6
    assert host["decoded"] == 6 * len(DIMS) * 2 and host["detections"] > 0
    assert host["onnxruntime_within_one_step"] + host["onnxruntime_differing"] == host["decoded"]
    assert host["onnxruntime_identical"] <= host["onnxruntime_within_one_step"]
    assert verified.metrics["detection"] == host


def test_a_corrupted_decoder_table_fails_verification(bundle, module_folder):
    broken = module_folder / "broken"
    shutil.copytree(bundle.path, broken)
    source = broken / "src" / "distillc_detect.c"
    text = source.read_text()
    block = re.search(r"distillc_detect_center_q4\[256\] = \{(.*?)\};", text, flags=re.S)
    shifted = re.sub(r"-?\d+", lambda m: str(int(m.group()) + 16), block.group(1))
    source.write_text(text[:block.start(1)] + shifted + text[block.end(1):])
    config = VerifyHost.Config(inputs="random", images=2, sqnr_images=0)
    with pytest.raises(PassError, match="distillc_detect differs from decode_int8 on the map the C computed"):
        VerifyHost(config).run(Bundle(path=broken, reference=bundle.reference), context(module_folder, "verify-broken"))


def test_verify_qemu_runs_distillc_detect_on_the_board(bundle, module_folder):
    config = VerifyQemu.Config(inputs="random", images=1, layers=False)
    result = VerifyQemu(config).run(bundle, context(module_folder, "verify-qemu"))
    qemu = result.artifact.manifest["verification"]["qemu"]["detection"]
    assert qemu["decoder_matches"] is True and qemu["machine"] == "mps2-an500"
    assert [(c["dim"], c["threshold_q15"]) for c in qemu["instructions"]] == [(d, t) for d in DIMS
                                                                            for t in (1638, 0)]
    assert all(0 < c["decode_instructions"] < c["detect_instructions"] for c in qemu["instructions"])


def test_distillc_run_writes_the_detections_as_json(verified, tmp_path):
    folder = verified.artifact.path
    x = np.random.default_rng(3).normal(size=(2, IN_CHANNELS, GRID, GRID)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(folder), "--input", str(tmp_path / "x.npy"), "--detections",
                                 str(tmp_path / "det.json"), "--dim", "4", "--threshold", "0.01", "--output",
                                 str(tmp_path / "map.npy"), "--raw"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "det.json").read_text())
    manifest = verified.artifact.manifest
    maps = np.load(tmp_path / "map.npy").reshape(2, -1)
    assert written["dim"] == 4 and written["threshold_q15"] == round(0.01 * 32768)
    for image, ref in zip(written["images"], reference_detections(maps, manifest, 4, written["threshold_q15"], 20)):
        assert [d["box"] for d in image["detections"]] == (ref.boxes / 16).tolist()
        assert [d["score"] for d in image["detections"]] == (ref.scores / 32768).tolist()
        assert [d["class"] for d in image["detections"]] == [manifest["detection"]["classes"][k] for k in ref.labels]
    bad = runner.invoke(app, ["run", str(folder), "--input", str(tmp_path / "x.npy"), "--detections",
                              str(tmp_path / "det.json"), "--dim", "5"])
    assert bad.exit_code == 2 and "--dim 5: the bundle decodes the Matryoshka dims 4, 8" in bad.output


def test_c_extension_methods_with_the_old_signature_are_still_asked():
    import distillc
    from distillc.artifacts import Bundle as AnyArtifact
    from distillc.pass_api import Pass
    from distillc.passes.backend.codegen import CExtension
    from distillc.passes.backend.codegen_c import bundle_extensions

    class Old(Pass):
        name = "test.old"
        takes = makes = AnyArtifact

        @staticmethod
        def c_extension(meta, *, name, output_size, pass_name):
            return CExtension(name="old", declarations="", flash_bytes=output_size)

        def run(self, artifact, ctx):
            raise AssertionError

    class Kwargs(Old):
        name = "test.kwargs"

        @staticmethod
        def c_extension(meta, **kwargs):
            return CExtension(name="any", declarations="", manifest={"output": kwargs.get("output")})

    class Plugin:
        __name__ = "old-plugin"

        @distillc.hookimpl
        def distillc_register_passes(self, registry):
            registry.add(Old)
            registry.add(Kwargs)

    quant = {"shape": [1, 10], "dtype": "int8", "scale": 0.1, "zero_point": 0}
    exts = {e.name: e for e in bundle_extensions(load_plugins([Plugin()]), {}, name="m", output_size=10,
                                                 pass_name="codegen.c", output=quant)}
    assert exts["old"].flash_bytes == 10 and exts["any"].manifest == {"output": quant}


def test_run_detections_needs_a_detection_bundle_and_one_output(tmp_path):
    manifest = {"input": {"shape": [1, 1, 8, 8], "dtype": "int8", "scale": 0.1, "zero_point": 0},
                "output": {"shape": [1, 10], "dtype": "int8", "scale": 0.1, "zero_point": 0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    runner = CliRunner()
    plain = runner.invoke(app, ["run", str(tmp_path), "--input", str(tmp_path / "x.npy"), "--detections",
                                str(tmp_path / "d.json")])
    assert plain.exit_code == 2 and "has no detection decoder" in plain.output
    neither = runner.invoke(app, ["run", str(tmp_path), "--input", str(tmp_path / "x.npy")])
    assert neither.exit_code == 2 and "give --output FILE.npy, --detections FILE.json or both" in neither.output
