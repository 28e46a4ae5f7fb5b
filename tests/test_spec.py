"""Spec v1 validation: every bad input is one line naming the key path, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import distillc
from distillc.cli import app
from distillc.errors import SpecError
from distillc.plugin_manager import load_plugins
from distillc.spec import load_spec
from tests.conftest import tiny_spec_text

runner = CliRunner()


def validate(write_spec, text: str) -> tuple[int, str]:
    path = write_spec(text)
    result = runner.invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


def test_tiny_spec_is_valid(write_spec):
    spec = load_spec(write_spec(tiny_spec_text()), load_plugins())
    assert [p.name for p in spec.passes] == ["distill.feature", "eval.linear-probe"]
    assert spec.teacher_options == {"vit": {"depth": 1}}
    assert spec.student_options == {"width": 0.35, "last_channels": 32}


# Each case: (what is changed in the tiny spec, text expected in the single error line).
BAD_SPECS = {
    "unknown top-level key": (("[distillc]", "colour = 'red'\n[distillc]"), ["colour", "unknown key", "allowed:"]),
    "unknown key in a section": (("val_fraction = 0.25", "val_fraction = 0.25\nvalfraction = 2"),
                                 ["data.valfraction", "unknown key", "allowed: source, path, image_size"]),
    "unknown pass option": (("projector_hidden = 0", "projector_hidden = 0\nprojector_hiden = 3"),
                            ["passes[0].projector_hiden", "unknown key", "allowed:", "projector_hidden"]),
    "unknown student option": (("last_channels = 32", "last_channels = 32\ndepth = 3"),
                               ["student.depth", "unknown key", "width"]),
    "unknown target option": (('use = "host"', 'use = "host"\nflash = 12'), ["target.flash", "unknown key", "flash_kb"]),
    "wrong type": (("image_size = 8", 'image_size = "big"'), ["data.image_size", "integer", "'big'"]),
    "wrong type in pass": (("teacher = \"vit\"\nepochs = 2", "teacher = \"vit\"\nepochs = [2]"),
                           ["passes[0].epochs", "integer", "[2]"]),
    "out of range": (("val_fraction = 0.25", "val_fraction = 1.5"), ["data.val_fraction", "less than 1", "1.5"]),
    "out of range in pass": (("c = 1.0", "c = -1.0"), ["passes[1].c", "greater than 0", "-1.0"]),
    "unknown pass": (('use = "eval.linear-probe"', 'use = "eval.linear-prob"'),
                     ["passes[1].use", "unknown pass 'eval.linear-prob'", "did you mean 'eval.linear-probe'",
                      "valid:", "distill.feature"]),
    "unknown target": (('use = "host"', 'use = "stm32h8"'), ["target.use", "unknown target 'stm32h8'", "stm32h7"]),
    "unknown teacher arch": (('arch = "vit_tiny_patch4"', 'arch = "vit_huge"'),
                             ["teachers[0].arch", "unknown teacher architecture 'vit_huge'", "vit_small_patch16"]),
    "unknown student arch": (('arch = "mobilenetv2"', 'arch = "resnet"'),
                             ["student.arch", "unknown student architecture 'resnet'", "mobilenetv2"]),
    "unknown teacher reference": (('teacher = "vit"', 'teacher = "dino"'),
                                  ["passes[0].teacher", "unknown teacher 'dino'", "valid: vit"]),
    "unknown data source": (('source = "sklearn-digits"', 'source = "mnist"'),
                            ["data.source", "unknown dataset source 'mnist'", "sklearn-digits"]),
    "missing teacher checkpoint": (("train = { epochs = 1, batch_size = 256, lr = 3e-3 }", 'checkpoint = "w/dino.safetensors"'),
                                   ["teachers[0].checkpoint", "file not found", "w/dino.safetensors"]),
    "teacher with two sources": (("train = {", 'checkpoint = "x.pt"\ntrain = {'),
                                 ["teachers[0]", "exactly one of 'checkpoint'", "'train'"]),
    "missing data path": (('source = "sklearn-digits"', 'source = "npz"\npath = "nope.npz"'),
                          ["data.path", "file not found", "nope.npz"]),
    "missing student onnx": (('arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32', 'onnx = "student.onnx"'),
                             ["student.onnx", "file not found"]),
    "bad spec version": (("spec_version = 1", "spec_version = 2"), ["distillc.spec_version", "1", "got 2"]),
    "missing required key": (('name = "tiny"\n', ""), ["distillc.name", "required key is missing"]),
    "source pass listed": (('use = "eval.linear-probe"', 'use = "teacher.train"'),
                           ["passes[1].use", "source pass"]),
    # Wrong types are refused, not coerced: TOML gives real types, so a quoted number is a mistake.
    "string for an integer": (("image_size = 8", 'image_size = "16"'), ["data.image_size", "integer", "'16'"]),
    "string for the seed": (("seed = 0", 'seed = "7"'), ["distillc.seed", "integer", "'7'"]),
    "boolean for channels": (("channels = 1", "channels = true"), ["data.channels", "integer", "True"]),
    "float for spec version": (("spec_version = 1", "spec_version = 1.0"), ["distillc.spec_version", "1.0"]),
    "string for a student option": (("width = 0.35", 'width = "0.5"'), ["student.width", "number", "'0.5'"]),
    "string for a teacher option": (("depth = 1", 'depth = "1"'), ["teachers[0].depth", "integer", "'1'"]),
    "string in teacher training": (("epochs = 1, batch", 'epochs = "1", batch'),
                                   ["teachers[0].train.epochs", "integer", "'1'"]),
    "string in pass config": (("teacher = \"vit\"\nepochs = 2", "teacher = \"vit\"\nepochs = \"2\""),
                              ["passes[0].epochs", "integer", "'2'"]),
    "float for an integer in pass config": (("teacher = \"vit\"\nepochs = 2", "teacher = \"vit\"\nepochs = 2.0"),
                                            ["passes[0].epochs", "integer", "2.0"]),
    "string for a target option": (('use = "host"', 'use = "host"\nflash_kb = "1024"'),
                                   ["target.flash_kb", "integer", "'1024'"]),
    "unknown teacher in a teachers list": (('teachers = ["vit"]', 'teachers = ["dino"]'),
                                           ["passes[1].teachers:", "unknown teacher 'dino'", "valid: vit"]),
    "unknown teacher option lists the section's own keys": (
        ("depth = 1", "depth = 1\ndeep = 2"),
        ["teachers[0].deep", "unknown key",
         "allowed: name, arch, checkpoint, train, tokenizer, input_size, channels, mean, std, interpolation, depth"]),
    "unknown student option lists the section's own keys": (
        ("last_channels = 32", "last_channels = 32\ndepth = 3"),
        ["student.depth", "unknown key", "allowed: arch, checkpoint, onnx, width"]),
    "data path for a source that takes none": (('source = "sklearn-digits"', 'source = "sklearn-digits"\npath = "d.npz"'),
                                               ["data.path: source 'sklearn-digits' takes no path", "'d.npz'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_with_key_path_and_exit_2(write_spec, case):
    (old, new), expected = BAD_SPECS[case]
    text = tiny_spec_text()
    assert old in text, f"test case {case!r} does not apply to the tiny spec"
    code, output = validate(write_spec, text.replace(old, new, 1))
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ")
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in output


def test_every_problem_is_reported_not_only_the_first(write_spec):
    shape = tiny_spec_text().replace("image_size = 8", 'image_size = "big"').replace("val_fraction = 0.25", "val_fraction = 7")
    code, output = validate(write_spec, shape)
    assert code == 2 and "data.image_size" in output and "data.val_fraction" in output
    names = tiny_spec_text().replace('use = "host"', 'use = "nowhere"').replace('teacher = "vit"', 'teacher = "dino"')
    code, output = validate(write_spec, names)
    assert code == 2 and "target.use" in output and "passes[0].teacher" in output


def test_toml_syntax_error_names_line_and_column(write_spec):
    code, output = validate(write_spec, "[distillc]\nspec_version = 1\nname = \n")
    assert code == 2
    assert "invalid TOML" in output and "line 3" in output and "column" in output


def test_empty_file(write_spec):
    code, output = validate(write_spec, "  \n")
    assert code == 2 and "empty" in output


def test_non_toml_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "not a TOML file" in result.output


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "spec file not found" in result.output


def test_load_spec_raises_spec_error(write_spec):
    with pytest.raises(SpecError, match=r"data\.image_size"):
        load_spec(write_spec(tiny_spec_text().replace("image_size = 8", "image_size = 0")), load_plugins())


def test_paths_are_relative_to_the_spec_folder(tmp_path, write_spec):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"")
    text = tiny_spec_text().replace('source = "sklearn-digits"', 'source = "npz"\npath = "data/x.npz"')
    spec = load_spec(write_spec(text), load_plugins())
    assert spec.resolve(spec.data.path) == (tmp_path / "data" / "x.npz").resolve()


def test_cli_process_exits_2_without_traceback_and_debug_shows_one(write_spec):
    path = write_spec(tiny_spec_text().replace("val_fraction = 0.25", "val_fraction = 7"))
    plain = subprocess.run([sys.executable, "-m", "distillc.cli", "validate", str(path)],
                           capture_output=True, text=True)
    assert plain.returncode == 2
    assert "data.val_fraction" in plain.stderr and "Traceback" not in plain.stderr + plain.stdout
    debug = subprocess.run([sys.executable, "-m", "distillc.cli", "--debug", "validate", str(path)],
                           capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_spec_digest_ignores_formatting(write_spec, tmp_path):
    plugins = load_plugins()
    a = load_spec(write_spec(tiny_spec_text(), "a.toml"), plugins)
    b = load_spec(write_spec("# comment\n" + textwrap.indent(tiny_spec_text(), ""), "b.toml"), plugins)
    assert a.digest() == b.digest()


def test_integers_fit_float_keys_and_strings_fit_path_keys(write_spec, tmp_path):
    (tmp_path / "data.npz").write_bytes(b"")
    text = (tiny_spec_text().replace("width = 0.35", "width = 1").replace("c = 1.0", "c = 2")
            .replace('source = "sklearn-digits"', 'source = "npz"\npath = "data.npz"'))
    spec = load_spec(write_spec(text), load_plugins())
    assert spec.student_options["width"] == 1 and spec.passes[1].config.c == 2.0
    assert spec.resolve(spec.data.path) == (tmp_path / "data.npz").resolve()


class _PathStudent:
    """A plugin whose student builder takes a Path option, as a third party's might."""

    __name__ = "path-student"

    @distillc.hookimpl
    def distillc_register_students(self, registry):
        def with_table(image_size: int, in_chans: int = 3, table: Path | None = None, width: float = 1.0):
            raise AssertionError("not built during validation")

        registry.add("with-table", with_table)


def test_builder_path_options_take_strings_while_other_options_stay_strict(write_spec):
    student = 'arch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32'
    plugins = load_plugins([_PathStudent()])
    spec = load_spec(write_spec(tiny_spec_text().replace(student, 'arch = "with-table"\ntable = "t.bin"')), plugins)
    assert spec.student_options == {"table": Path("t.bin")}
    with pytest.raises(SpecError, match=r"student\.width: Input should be a valid number \(got '2'\)"):
        load_spec(write_spec(tiny_spec_text().replace(student, 'arch = "with-table"\nwidth = "2"')), plugins)


def test_a_pass_with_a_bad_config_still_gets_its_teacher_checked(write_spec):
    text = tiny_spec_text().replace('teacher = "vit"\nepochs = 2', 'teacher = "dino"\nepochs = "2"')
    code, output = validate(write_spec, text)
    assert code == 2
    assert "passes[0].epochs: Input should be a valid integer" in output
    assert "passes[0].teacher: unknown teacher 'dino'; valid: vit" in output


def test_duplicate_teacher_names_are_listed_once_among_the_valid_ones(write_spec):
    second = '[[teachers]]\nname = "vit"\narch = "vit_tiny_patch4"\ntrain = { epochs = 1 }\n\n[student]'
    text = tiny_spec_text().replace("[student]", second).replace('teacher = "vit"', 'teacher = "dino"')
    code, output = validate(write_spec, text)
    assert code == 2
    assert "teachers[1].name: duplicate teacher name 'vit'" in output
    assert "passes[0].teacher: unknown teacher 'dino'; valid: vit\n" in output + "\n"
    assert "vit, vit" not in output


def test_unknown_pass_lists_only_passes_a_spec_may_use(write_spec):
    code, output = validate(write_spec, tiny_spec_text().replace('use = "eval.linear-probe"', 'use = "nope"'))
    assert code == 2 and "passes[1].use: unknown pass 'nope'" in output
    valid = output.split("valid: ", 1)[1]
    assert "distill.feature" in valid and "eval.linear-probe" in valid
    for source_pass in ("teacher.train", "teacher.load", "student.init", "student.onnx"):
        assert source_pass not in valid
