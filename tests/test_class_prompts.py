"""Class names + prompt templates -> class embeddings from a CLIP teacher's text tower and tokenizer,
in distill.clip-matryoshka, matryoshka and eval.zero-shot, down to the bundle's INT8 rows."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest

from distillc.errors import DistillcError, SpecError
from distillc.plan import build_plan
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from distillc.spec import load_spec
from tests.conftest import TINY_HEADER
from tests.test_clip_tokenizer import MERGES, VOCAB_SIZE, Reference, write_bpe, write_hf

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = ["a photo of a {}.", "a picture of the number {}!"]

TEACHER = """
[[teachers]]
name = "clip"
arch = "clip_vitb32"
depth = 1
width = 64
patch_size = 4
output_dim = 32
text_depth = 2
text_width = 32
vocab_size = {vocab}
{tokenizer}
train = {{ epochs = 1, batch_size = 256, lr = 3e-3 }}
"""

SPEC = TINY_HEADER + TEACHER + """
[student]
arch = "mobilenetv2"
width = 0.35
last_channels = 16

{passes}
"""

CLIP_PASSES = """
[[passes]]
use = "distill.clip-matryoshka"
teacher = "clip"
dims = [4, 8, 16]
epochs = 1
batch_size = 256
class_embeddings = "text"
classes = "classes.txt"
prompts = ["a photo of a {}.", "a picture of the number {}!"]

[[passes]]
use = "eval.zero-shot"
gate = "off"  # the text tower is untrained: chance accuracy is expected

[[passes]]
use = "eval.zero-shot"
gate = "off"
teacher = "clip"
classes = ["nought", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
prompts = ["the digit {}"]

[[passes]]
use = "quantize.brevitas-qat"
epochs = 0
calib_images = 64
probe = false
gate = "off"  # one epoch of a tiny student: its INT8 embedding may not vary yet

[target]
use = "host"
"""


def spec_text(name: str, passes: str, *, tokenizer: str = 'tokenizer = "bpe_simple_vocab_16e6.txt.gz"',
              vocab: int = VOCAB_SIZE) -> str:
    text = textwrap.dedent(SPEC).replace("{passes}", "@PASSES@").format(name=name, vocab=vocab, tokenizer=tokenizer)
    return text.replace("@PASSES@", passes)


@pytest.fixture(scope="module")
def folder(module_folder):
    write_bpe(module_folder / "bpe_simple_vocab_16e6.txt.gz", MERGES)
    write_hf(module_folder / "tokenizer.json", MERGES)
    # One name a line, UTF-8 with a byte-order mark, blank lines and stray spaces ignored.
    (module_folder / "classes.txt").write_text("\ufeff" + "\n".join(NAMES[:5]) + "\n\n  " + "\n".join(NAMES[5:])
                                               + "  \n\n", encoding="utf-8")
    return module_folder


@pytest.fixture(scope="module")
def host_build(folder):
    path = folder / "prompts.toml"
    path.write_text(spec_text("prompts", CLIP_PASSES))
    return compile_spec(path, progress=SilentProgress())


def step_artifact(result, step_id: str):
    return result.plan.store.load(result.plan.step(step_id, option="test").key)


def reference_class_embeddings(teacher, names: list[str], prompts: list[str]):
    """The prompt ensemble computed here: reference token ids, the text tower, normalise, mean, normalise."""
    import torch

    reference = Reference(MERGES)
    ids = torch.tensor([reference(p.replace("{}", n)) for n in names for p in prompts])
    with torch.no_grad():
        text = teacher.encode_text(ids, eot_id=VOCAB_SIZE - 1).reshape(len(names), len(prompts), -1)
    text = text / text.norm(dim=-1, keepdim=True)
    mean = text.mean(dim=1)
    return (mean / mean.norm(dim=-1, keepdim=True)).numpy()


def test_class_embeddings_come_from_the_prompts_through_the_text_tower(host_build):
    from distillc.passes.distill.matryoshka import ClassEmbeddings, decode_teacher_map

    result = host_build
    plugins = load_plugins()
    teacher = step_artifact(result, "teacher:clip")
    assert teacher.meta["tokenizer"]["kind"] == "bpe" and teacher.meta["tokenizer"]["vocab_size"] == VOCAB_SIZE
    info = step_artifact(result, "distill.clip-matryoshka").meta["matryoshka"]
    assert info["classes"] == NAMES and info["metric"] == "dot" and info["source"] == "text"

    unit = reference_class_embeddings(teacher.build(plugins), NAMES, PROMPTS)
    expected = ClassEmbeddings.quantize(unit @ decode_teacher_map(info["teacher_map"]), dims=[4, 8, 16],
                                        classes=NAMES, metric="dot", source="text")
    stored = ClassEmbeddings.from_meta(info)
    assert np.abs(stored.values.astype(int) - expected.values.astype(int)).max() <= 1  # float rounding at .5 only
    assert (stored.values == expected.values).mean() > 0.95
    np.testing.assert_allclose(stored.scales, expected.scales, rtol=1e-5)

    # One prompt alone gives other embeddings: the ensemble is really averaged.
    single = reference_class_embeddings(teacher.build(plugins), NAMES, PROMPTS[:1])
    assert np.abs(single - unit).max() > 1e-3


def test_the_bundle_holds_the_text_class_embeddings(host_build, folder):
    result = host_build
    bundle = folder / "build" / "prompts" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["class_embeddings"]["source"] == "text" and manifest["class_embeddings"]["metric"] == "dot"
    source = (bundle / "src" / "distillc_classes.c").read_text()
    body = re.search(r"distillc_class_prototypes\[[^]]*\] = \{(.*?)\};", source, re.S).group(1)
    rows = np.array([int(v) for v in re.findall(r"-?\d+", body)]).reshape(10, 16)
    info = step_artifact(result, "distill.clip-matryoshka").meta["matryoshka"]
    np.testing.assert_array_equal(rows, np.asarray(info["prototypes_int8"]))
    names = re.findall(r'^    "([a-z]+)"', source, re.M)
    assert names == NAMES


def test_zero_shot_reports_accuracy_for_the_stored_and_for_other_prompts(host_build):
    metrics = host_build.report["metrics"]
    trained = metrics["distill.clip-matryoshka"]
    assert set(trained["zero_shot_top1"]) == {"4", "8", "16"} and 0.0 <= trained["teacher_zero_shot_top1"] <= 1.0
    assert metrics["eval.zero-shot"]["top1"] == trained["zero_shot_top1"]
    other = metrics["eval.zero-shot#2"]
    assert other["class_embeddings"] == "text" and other["classes"] == 10
    assert set(other["top1"]) == {"4", "8", "16"} and all(0.0 <= v <= 1.0 for v in other["top1"].values())


def test_matryoshka_takes_classes_from_a_tokenizer_json(folder):
    passes = """
[[passes]]
use = "matryoshka"
teacher = "clip"
dims = [4, 8]
epochs = 1
batch_size = 256
classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
"""
    path = folder / "hf.toml"
    path.write_text(spec_text("hf", passes, tokenizer='tokenizer = "tokenizer.json"'))
    result = compile_spec(path, progress=SilentProgress(), until="matryoshka")
    teacher = step_artifact(result, "teacher:clip")
    assert teacher.meta["tokenizer"]["kind"] == "hf"
    info = result.artifact.meta["matryoshka"]
    assert info["source"] == "text" and info["metric"] == "dot" and info["classes"] == NAMES
    assert "teacher_map" in info and set(result.report["metrics"]["matryoshka"]["zero_shot_top1"]) == {"4", "8"}


def test_a_tokenizer_that_does_not_fit_the_text_tower_names_both_sizes(folder):
    path = folder / "misfit.toml"
    path.write_text(spec_text("misfit", "", vocab=VOCAB_SIZE + 6))
    with pytest.raises(DistillcError, match=f"has {VOCAB_SIZE} tokens but the text tower's token_embedding has "
                                            f"{VOCAB_SIZE + 6} rows"):
        compile_spec(path, progress=SilentProgress(), until="teacher:clip")


CLASSES = 'class_embeddings = "text"\nclasses = ["a", "b"]\n'


@pytest.mark.parametrize("tokenizer, options, message", [
    ("", CLASSES, r"passes\[0\]\.classes: teacher 'clip' has no tokenizer; give its \[\[teachers\]\] entry "
                  r"\(teachers\[0\]\) tokenizer"),
    ('tokenizer = "missing.txt.gz"', CLASSES, r"teachers\[0\]\.tokenizer: file not found: 'missing.txt.gz'"),
    ('tokenizer = "classes.txt.bin"', CLASSES, r"teachers\[0\]\.tokenizer: .* is not a tokenizer file"),
    (None, 'class_embeddings = "text"\nclasses = "nowhere.txt"', r"passes\[0\]: .*classes: file not found"),
    (None, 'class_embeddings = "text"\nclasses = []', r"passes\[0\]\.classes: .*at least one class name"),
    (None, CLASSES + 'prompts = ["no placeholder"]', r"passes\[0\]\.prompts: .*exactly one '\{\}'"),
    (None, 'prompts = ["a {}"]', "prompts are only read with classes"),
    (None, 'classes = ["a"]', "classes is only read with class_embeddings = 'text'"),
    (None, CLASSES + 'text_tokens = "tokens.npy"', "give text_tokens or classes, not both"),
])
def test_class_and_tokenizer_keys_are_checked_by_validate(folder, tokenizer, options, message):
    passes = f"""
[[passes]]
use = "distill.clip-matryoshka"
teacher = "clip"
dims = [4]
{options}
"""
    (folder / "classes.txt.bin").write_bytes(b"")
    (folder / "tokens.npy").write_bytes(b"")
    path = folder / "bad.toml"
    kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
    path.write_text(spec_text("bad", passes, **kwargs))
    with pytest.raises(SpecError, match=message):
        load_spec(path, load_plugins())


@pytest.mark.parametrize("options, message", [
    ('classes = ["a"]', r"passes\[0\]: .*classes are encoded by a teacher's text tower: give teacher"),
    ('use = "eval.zero-shot"\nclasses = ["a"]', "classes and teacher go together"),
])
def test_classes_need_a_teacher(folder, options, message):
    passes = f'[[passes]]\n{options if "use" in options else "use = " + chr(34) + "matryoshka" + chr(34) + chr(10) + "dims = [4]" + chr(10) + options}\n'
    path = folder / "noteacher.toml"
    path.write_text(spec_text("noteacher", passes))
    with pytest.raises(SpecError, match=message):
        load_spec(path, load_plugins())


def test_names_prompts_and_tokenizer_are_in_the_cache_key(tmp_path):
    plugins = load_plugins()
    write_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz", MERGES)
    (tmp_path / "classes.txt").write_text("\n".join(NAMES))

    def key(passes: str = CLIP_PASSES) -> str:
        (tmp_path / "spec.toml").write_text(spec_text("key", passes))
        plan = build_plan(load_spec(tmp_path / "spec.toml", plugins), plugins)
        return plan.step("distill.clip-matryoshka", option="test").key

    first = key()
    assert key() == first
    assert key(CLIP_PASSES.replace('"a picture of the number {}!"', '"a drawing of {}"')) != first
    (tmp_path / "classes.txt").write_text("\n".join(reversed(NAMES)))  # same path, other names
    renamed = key()
    assert renamed != first
    write_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz", MERGES[:-1])  # same path, another vocabulary
    assert key() != renamed
