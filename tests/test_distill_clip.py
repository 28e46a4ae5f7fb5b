"""distill.clip-matryoshka (TinyVLM): a tiny CLIP teacher, class embeddings from text, a file or prototypes."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from distillc.errors import PassError, SpecError
from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.spec import load_spec
from tests.conftest import TINY_HEADER

SPEC = TINY_HEADER + """
[[teachers]]
name = "clip"
arch = "clip_vitb32"
depth = 1
width = 64
patch_size = 4
output_dim = 32
text_depth = 1
text_width = 32
vocab_size = 64
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}

[[teachers]]
name = "vit"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}

[student]
arch = "vit-mcu"
patch_size = 4
dim = 32
depth = 1

[[passes]]
use = "distill.clip-matryoshka"
teacher = "{teacher}"
dims = [4, 8, 16]
epochs = 1
batch_size = 256
{options}

[[passes]]
use = "eval.zero-shot"
gate = "off"    # one epoch from a one-epoch CLIP: zero-shot at chance; these tests check where the embeddings come from
"""

DIMS = {"4", "8", "16"}


def spec_text(name: str, options: str, teacher: str = "clip") -> str:
    return textwrap.dedent(SPEC).format(name=name, teacher=teacher, options=options)


@pytest.fixture(scope="module")
def folder(module_folder):
    """The module's folder (one cache: the teachers train once) with the class files: token ids
    as a tokenizer would give them (start, words, end-of-text = the largest id, padding) and
    precomputed embeddings."""
    folder = module_folder
    rng = np.random.default_rng(0)
    tokens = np.zeros((10, 77), dtype=np.int64)
    tokens[:, 0] = 1
    tokens[:, 1:4] = rng.integers(2, 62, size=(10, 3))
    tokens[:, 4] = 63
    np.save(folder / "tokens.npy", tokens)
    from safetensors.numpy import save_file

    save_file({"embeddings": rng.normal(size=(10, 32)).astype(np.float32)}, str(folder / "classes.safetensors"))
    return folder


def compile_(folder, name: str, options: str, teacher: str = "clip"):
    path = folder / f"{name}.toml"
    path.write_text(spec_text(name, options, teacher))
    return compile_spec(path, progress=SilentProgress(), until="eval.zero-shot")


def test_text_class_embeddings_come_from_the_teachers_text_tower(folder):
    result = compile_(folder, "text", 'class_embeddings = "text"\ntext_tokens = "tokens.npy"')
    metrics = result.report["metrics"]
    trained = metrics["distill.clip-matryoshka"]
    assert set(trained["zero_shot_top1"]) == DIMS and set(trained["loss_per_dim"]) == DIMS
    assert 0.0 <= trained["teacher_zero_shot_top1"] <= 1.0 and trained["class_embeddings"] == "text"
    assert metrics["eval.zero-shot"]["top1"] == trained["zero_shot_top1"]
    info = result.artifact.meta["matryoshka"]
    assert info["metric"] == "dot" and info["dims"] == [4, 8, 16] and np.shape(info["prototypes_int8"]) == (10, 16)
    assert result.artifact.head == {"type": "matryoshka", "in_dim": 32, "dims": [4, 8, 16]}


def test_precomputed_embeddings_and_prototypes_reuse_the_teachers(folder):
    from_file = compile_(folder, "file", 'class_embeddings = "file"\nembeddings_file = "classes.safetensors"')
    assert from_file.ran == ["distill.clip-matryoshka", "eval.zero-shot"]  # teachers and student: cached
    assert set(from_file.report["metrics"]["eval.zero-shot"]["top1"]) == DIMS
    prototypes = compile_(folder, "proto", 'class_embeddings = "prototypes"\nshots = 4', teacher="vit")
    metrics = prototypes.report["metrics"]["distill.clip-matryoshka"]
    assert metrics["class_embeddings"] == "prototypes" and "teacher_zero_shot_top1" not in metrics
    assert prototypes.artifact.meta["matryoshka"]["metric"] == "cosine"


def test_text_needs_a_teacher_with_a_text_tower(folder):
    with pytest.raises(PassError, match="teacher 'vit' has no text tower"):
        compile_(folder, "notext", 'class_embeddings = "text"\ntext_tokens = "tokens.npy"', teacher="vit")


def test_embeddings_of_the_wrong_width_are_refused(folder):
    np.save(folder / "wide.npy", np.ones((10, 48), dtype=np.float32))
    with pytest.raises(PassError, match=r"\(10, 48\) do not fit teacher 'clip', whose embedding is 32 wide"):
        compile_(folder, "wide", 'class_embeddings = "file"\nembeddings_file = "wide.npy"')


@pytest.mark.parametrize("options, message", [
    ('class_embeddings = "text"', "class_embeddings = 'text' needs text_tokens"),
    ('text_tokens = "tokens.npy"', "text_tokens is only read with class_embeddings = 'text'"),
    ('class_embeddings = "words"', r"passes\[0\]\.class_embeddings"),
])
def test_class_embedding_keys_are_checked_with_the_spec(write_spec, options, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(spec_text("bad", options)), load_plugins())


def test_rewriting_the_class_embeddings_file_changes_the_passes_cache_key(tmp_path):
    from distillc.plan import build_plan

    plugins = load_plugins()
    (tmp_path / "spec.toml").write_text(spec_text("key", 'class_embeddings = "file"\nembeddings_file = "classes.npy"'))

    def key() -> str:
        plan = build_plan(load_spec(tmp_path / "spec.toml", plugins), plugins)
        return plan.step("distill.clip-matryoshka", option="test").key

    np.save(tmp_path / "classes.npy", np.zeros((10, 32), dtype=np.float32))
    first = key()
    assert key() == first
    np.save(tmp_path / "classes.npy", np.ones((10, 32), dtype=np.float32))  # same path, other bytes
    assert key() != first
