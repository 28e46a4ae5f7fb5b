"""matryoshka and eval.zero-shot: the head in the model, INT8 class embeddings, the C classifier."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from distillc.errors import PassError, SpecError
from distillc.passes.backend import testing
from distillc.passes.distill.matryoshka import ClassEmbeddings, class_embeddings_extension
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import TINY_HEADER

SPEC = TINY_HEADER + """
[student]
arch = "mobilenetv2"
width = 0.35
last_channels = 16

[[passes]]
use = "matryoshka"
dims = [4, 8, 16]
epochs = 1
batch_size = 256
shots = 5
{passes}
[target]
use = "host"
"""

BACKEND_PASSES = """
[[passes]]
use = "eval.zero-shot"

[[passes]]
use = "quantize.brevitas-qat"
epochs = 0
calib_images = 64
probe = false
gate = "off"    # one epoch at 8 px: the INT8 embeddings are constant; these tests check the plumbing
"""

CLASSIFY_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"

/* Prints, per int8 embedding of the input file, the class at every Matryoshka dim, then at dim 3. */
int main(int argc, char **argv)
{
    static int8_t embedding[DISTILLC_EMBED_DIM];
    static const int32_t dims[DISTILLC_MATRYOSHKA_NUM_DIMS] = DISTILLC_MATRYOSHKA_DIMS;
    FILE *in;
    int k;

    if (argc != 2 || (in = fopen(argv[1], "rb")) == NULL) {
        return 2;
    }
    while (fread(embedding, 1, DISTILLC_EMBED_DIM, in) == DISTILLC_EMBED_DIM) {
        for (k = 0; k < DISTILLC_MATRYOSHKA_NUM_DIMS; ++k) {
            printf("%d ", distillc_classify(embedding, (int)dims[k]));
        }
        printf("%d\n", distillc_classify(embedding, 3));
    }
    fclose(in);
    return 0;
}
"""

MINIMAL_HEADER = """#ifndef DISTILLC_MODEL_H
#define DISTILLC_MODEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DISTILLC_OUTPUT_ZERO_POINT (-3)

#ifdef __cplusplus
}
#endif

#endif /* DISTILLC_MODEL_H */
"""


def run_classify(bundle, embeddings: np.ndarray, work) -> np.ndarray:
    """Compile distillc_classes.c with the driver (gcc, -Wall -Wextra -Werror) and run it."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "driver.c").write_text(CLASSIFY_DRIVER)
    exe = work / "classify"
    subprocess.run(["gcc", *testing.HOST_FLAGS, "-I", str(bundle / "include"), str(work / "driver.c"),
                    str(bundle / "src" / "distillc_classes.c"), "-o", str(exe)], check=True)
    np.ascontiguousarray(embeddings, dtype=np.int8).tofile(work / "in.bin")
    out = subprocess.run([str(exe), str(work / "in.bin")], check=True, capture_output=True, text=True).stdout
    return np.array([[int(v) for v in line.split()] for line in out.splitlines()])


def random_classes(metric: str, seed: int = 0) -> ClassEmbeddings:
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(7, 24)) * rng.uniform(0.2, 3.0, size=(7, 1))
    return ClassEmbeddings.quantize(matrix, dims=[4, 8, 24], classes=[f"c{i}" for i in range(6)] + ['odd "name"'],
                                    metric=metric, source="test")


def test_int8_class_embeddings_are_four_times_smaller_and_round_trip_through_meta():
    classes = random_classes("cosine")
    assert classes.values.dtype == np.int8 and np.abs(classes.values).max() == 127
    assert classes.size_metrics()["prototype_fp32_bytes"] == 4 * classes.size_metrics()["prototype_bytes"]
    back = ClassEmbeddings.from_meta(json.loads(json.dumps(classes.to_meta())))
    np.testing.assert_array_equal(back.values, classes.values)
    np.testing.assert_array_equal(back.multipliers(), classes.multipliers())


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_c_classify_equals_the_integer_reference(tmp_path, metric):
    classes = random_classes(metric)
    bundle = tmp_path / "bundle"
    (bundle / "include").mkdir(parents=True)
    (bundle / "src").mkdir()
    ext = class_embeddings_extension(classes.to_meta(), name="t", output_size=24)
    anchor = MINIMAL_HEADER.rindex("#ifdef __cplusplus")
    (bundle / "include" / "distillc_model.h").write_text(MINIMAL_HEADER[:anchor] + ext.declarations
                                                         + MINIMAL_HEADER[anchor:])
    for rel, text in ext.sources.items():
        (bundle / rel).write_text(text)
    entry = ext.manifest
    assert entry["file"] == "src/distillc_classes.c" and entry["prototype_bytes"] == 7 * 24
    assert list(ext.sources) == [entry["file"]] and ext.flash_bytes == entry["flash_bytes"]
    embeddings = np.random.default_rng(1).integers(-128, 128, size=(300, 24), dtype=np.int8)
    got = run_classify(bundle, embeddings, tmp_path / "work")
    for k, dim in enumerate(classes.dims):
        reference = classes.classify_int8(embeddings, -3, dim)
        np.testing.assert_array_equal(got[:, k], reference)
        float_choice = classes.scores(embeddings.astype(np.float32) + 3, dim).argmax(1)
        assert (reference == float_choice).mean() > 0.98
    assert (got[:, -1] == -1).all()  # 3 is not one of the dims
    testing.compile_for_cortex_m7(bundle, tmp_path / "arm")


def test_output_width_must_match_the_class_embeddings():
    with pytest.raises(PassError, match="outputs 10 values .* 24 wide"):
        class_embeddings_extension(random_classes("dot").to_meta(), name="t", output_size=10)


def test_a_module_with_a_head_saves_and_rebuilds_with_it(tmp_path):
    import torch

    from distillc.artifacts import TorchModel
    from distillc.plugins.models.heads import attach_head, matryoshka_head_spec

    plugins = load_plugins()
    backbone = plugins.students.get("vit-mcu")(image_size=8, in_chans=1, dim=16, depth=1)
    model = attach_head(backbone, matryoshka_head_spec(16, [2, 6])).eval()
    assert model.patch_tokens(torch.rand(1, 1, 8, 8)).shape == (1, 16, 2, 2)  # the backbone's token API
    artifact = TorchModel.from_module(model, role="student", arch="vit-mcu",
                                      options={"image_size": 8, "in_chans": 1, "dim": 16, "depth": 1})
    assert artifact.head == {"type": "matryoshka", "in_dim": 16, "dims": [2, 6]}
    artifact.save(tmp_path)
    rebuilt = TorchModel.load(tmp_path).build(plugins)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt(x).shape == (3, 6) and rebuilt.embed_dim == 6


@pytest.mark.parametrize("dims, message", [("[8, 4]", "strictly increasing"), ("[0, 4]", "1..8192"),
                                           ("[]", "at least 1")])
def test_dims_must_nest(write_spec, dims, message):
    text = textwrap.dedent(SPEC).format(name="bad", passes="").replace("dims = [4, 8, 16]", f"dims = {dims}")
    with pytest.raises(SpecError, match=rf"passes\[0\]\.dims: .*{message}"):
        load_spec(write_spec(text), load_plugins())


@pytest.fixture(scope="module")
def host_build(module_folder):
    """matryoshka -> eval.zero-shot -> PTQ -> the host backend, compiled once for the tests below."""
    path = module_folder / "spec.toml"
    path.write_text(textwrap.dedent(SPEC).format(name="mat", passes=BACKEND_PASSES))
    return path, compile_spec(path, progress=SilentProgress())


def test_zero_shot_top1_per_dim_lands_in_the_report(host_build):
    path, result = host_build
    report = json.loads((path.parent / "build" / "mat" / "report.json").read_text())
    trained = report["metrics"]["matryoshka"]
    assert set(trained["zero_shot_top1"]) == {"4", "8", "16"} and set(trained["loss_per_dim"]) == {"4", "8", "16"}
    assert trained["prototype_bytes"] == 10 * 16 and trained["prototype_fp32_bytes"] == 4 * 10 * 16
    evaluated = report["metrics"]["eval.zero-shot"]
    assert evaluated["top1"] == trained["zero_shot_top1"]
    assert all(0.0 <= v <= 1.0 for v in evaluated["top1"].values())


def test_the_head_stays_in_the_model_and_in_its_recipe(host_build):
    _, result = host_build
    step = next(s for s in result.plan.steps if s.id == "matryoshka")
    model = result.plan.store.load(step.key)
    assert model.head == {"type": "matryoshka", "in_dim": 16, "dims": [4, 8, 16]}
    assert model.meta["embed_dim"] == 16 and model.meta["matryoshka"]["classes"] == [str(i) for i in range(10)]
    assert "head.proj.weight" in model.state and model.build(load_plugins())(np_images(2)).shape == (2, 16)


def test_bundle_holds_the_class_embeddings_and_classifies_its_own_outputs(host_build, tmp_path):
    path, result = host_build
    bundle = path.parent / "build" / "mat" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["matryoshka_dims"] == [4, 8, 16] and "src/distillc_classes.c" in manifest["files"]
    assert manifest["class_embeddings"]["classes"] == 10 and manifest["memory"]["class_embeddings_bytes"] > 160
    header = (bundle / "include" / "distillc_model.h").read_text()
    assert "int distillc_classify(const int8_t *embedding, int dim);" in header
    exe = testing.build_host_driver(bundle, tmp_path / "model")
    inputs = testing.quantized_inputs(manifest, 8)
    outputs = testing.run_driver(exe, inputs, tmp_path / "model").reshape(8, -1)
    classes = ClassEmbeddings.from_meta(result.plan.store.load(
        next(s for s in result.plan.steps if s.id == "matryoshka").key).meta["matryoshka"])
    got = run_classify(bundle, outputs, tmp_path / "classify")
    for k, dim in enumerate(manifest["matryoshka_dims"]):
        np.testing.assert_array_equal(got[:, k], classes.classify_int8(outputs, manifest["output"]["zero_point"], dim))


def test_zero_shot_needs_class_embeddings(write_spec):
    text = textwrap.dedent(SPEC).format(name="none", passes="")
    text = text.replace('use = "matryoshka"\ndims = [4, 8, 16]\nepochs = 1\nbatch_size = 256\nshots = 5\n',
                        'use = "eval.zero-shot"\n')
    with pytest.raises(PassError, match="no Matryoshka class embeddings"):
        compile_spec(write_spec(text), progress=SilentProgress(), until="eval.zero-shot")


def np_images(count: int):
    import torch

    return torch.rand(count, 1, 8, 8)
