"""eval.linear-probe's few-shot probes and the quality gate of quantize.brevitas-qat and the eval passes:
a compile does not hand over a collapsed model."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from distillc.cli import app
from distillc.errors import PassError, QualityGateError
from distillc.passes.eval.gate import GateConfig, chance_limit, check_embeddings, check_top1
from distillc.passes.eval.probe import check_shots, few_shot_top1
from tests.conftest import TINY_HEADER

runner = CliRunner()
STUDENT = '[student]\narch = "mobilenetv2"\nwidth = 0.35\nlast_channels = 32\n'
PROBE = '[[passes]]\nuse = "eval.linear-probe"\nshots = [1, 3]\n'


def separable(train_per_class: int, val_per_class: int, classes: int = 4, noise: float = 0.3):
    """Training and validation features of ``classes`` Gaussian blobs: (x, y, val_x, val_y)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, 8)) * 3
    out = []
    for n in (train_per_class, val_per_class):
        y = np.repeat(np.arange(classes), n)
        out += [(centres[y] + noise * rng.normal(size=(len(y), 8))).astype(np.float32), y]
    return out


# -- few-shot probes ---------------------------------------------------------------------------------

def test_few_shot_probe_reports_each_k_as_the_mean_of_seeded_draws():
    import torch

    train, train_y, val, val_y = separable(20, 10)
    labels = torch.as_tensor(train_y)
    first = few_shot_top1(train, labels, val, val_y, shots=[1, 5], draws=5, seed=0)
    assert set(first) == {"1", "5"} and all(0.0 <= v <= 1.0 for v in first.values())
    assert few_shot_top1(train, labels, val, val_y, shots=[1, 5], draws=5, seed=0) == first  # deterministic
    assert first["5"] >= 0.9  # well-separated blobs: five labels per class are plenty
    # One draw of seed 3 is the fourth of the five draws of seed 0, so the mean is built from them.
    singles = [few_shot_top1(train, labels, val, val_y, shots=[1], draws=1, seed=s)["1"] for s in range(5)]
    assert first["1"] == pytest.approx(sum(singles) / 5)


def test_more_shots_than_images_of_a_class_is_an_error_naming_shots():
    import torch

    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    check_shots("eval.linear-probe", [1, 3], labels)
    with pytest.raises(PassError, match=r"shots = \[1, 5\]: class 1 has only 3 training images; set shots to counts "
                                        r"of at most 3"):
        check_shots("eval.linear-probe", [1, 5], labels)


def test_shots_must_be_distinct_positive_counts():
    from pydantic import ValidationError

    from distillc.passes.eval.probe import LinearProbe

    assert LinearProbe.Config().shots == [1, 5]
    for bad in ([0], [1, 1], [-2]):
        with pytest.raises(ValidationError, match="shots must be distinct counts >= 1"):
            LinearProbe.Config(shots=bad)


# -- the gate's checks -----------------------------------------------------------------------------

def test_chance_limit_is_a_binomial_test_at_the_validation_size():
    from scipy.stats import binom

    for n, p in ((449, 0.1), (20, 0.1), (359, 0.102), (1000, 0.5)):
        limit = chance_limit(n, p)
        k = round(limit * n)
        assert binom.sf(k - 1, n, p) <= 1e-3 < binom.sf(k - 2, n, p)  # k correct is the least that rejects chance
    assert 0.14 < chance_limit(449, 0.1) < 0.16 and chance_limit(20, 0.1) == 0.4


def test_constant_embeddings_fail_the_gate_and_small_but_varying_ones_pass():
    on, off = GateConfig(), GateConfig(gate="off")
    constant = np.tile(np.array([0.9, 0.0, 2.0], dtype=np.float32), (50, 1))
    with pytest.raises(QualityGateError, match="embeddings are constant: varying_dims 0 of 3") as err:
        check_embeddings("quantize.brevitas-qat", on, constant, what="the INT8 student")
    assert err.value.metric == "varying_dims" and err.value.pass_name == "quantize.brevitas-qat"
    assert 'set gate = "off"' in str(err.value)
    assert check_embeddings("quantize.brevitas-qat", off, constant, what="x")["varying_dims"] == 0
    # A random MobileNetV2's embeddings: dims near 1 that do not move, others that vary at 1e-7.
    rng = np.random.default_rng(0)
    tiny = constant.astype(np.float64)
    tiny[:, 1] = 1e-7 * rng.random(50)
    assert check_embeddings("eval.linear-probe", on, tiny, what="x")["varying_dims"] == 1
    with pytest.raises(QualityGateError, match="not finite"):
        check_embeddings("eval.linear-probe", on, np.full((4, 3), np.nan), what="x")


def test_top1_at_chance_below_min_top1_or_past_max_drop_fails():
    labels = np.arange(400) % 10
    ok = check_top1("q", GateConfig(), 0.5, labels, 10, metric="int8.top1", what="the INT8 student")
    assert ok["chance"] == pytest.approx(0.1) and 0.1 < ok["chance_limit"] < 0.2
    with pytest.raises(QualityGateError, match=r"int8.top1 0.110 is at chance \(10 classes") as err:
        check_top1("q", GateConfig(), 0.11, labels, 10, metric="int8.top1", what="the INT8 student")
    assert err.value.metric == "int8.top1"
    check_top1("q", GateConfig(gate="off"), 0.11, labels, 10, metric="int8.top1", what="x")  # off: handed over
    with pytest.raises(QualityGateError, match="int8.top1 0.500 is below min_top1 0.6"):
        check_top1("q", GateConfig(min_top1=0.6), 0.5, labels, 10, metric="int8.top1", what="x")
    with pytest.raises(QualityGateError, match=r"is 8.0 points below FP32 0.580 \(fp32.top1\): more than max_drop 5"):
        check_top1("q", GateConfig(max_drop=5), 0.5, labels, 10, metric="int8.top1", what="x", reference=0.58,
                   reference_metric="fp32.top1")
    assert check_top1("q", GateConfig(max_drop=10), 0.5, labels, 10, metric="int8.top1", what="x",
                      reference=0.58)["drop_points"] == pytest.approx(8.0)
    # The commonest class sets chance when the classes are unbalanced.
    skewed = np.array([0] * 300 + [1] * 100)
    with pytest.raises(QualityGateError, match="chance 0.750"):
        check_top1("q", GateConfig(), 0.76, skewed, 2, metric="top1", what="x")


# -- whole compiles ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero_student(module_folder):
    """A student checkpoint whose every weight is zero: its embeddings are the same for every image."""
    import torch
    from safetensors.torch import save_file

    from distillc.plugin_manager import load_plugins

    model = load_plugins().students.get("mobilenetv2")(image_size=8, in_chans=1, width=0.35, last_channels=32)
    path = module_folder / "zero.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, str(path))
    return path


def compile_cli(folder, text: str, until: str):
    spec = folder / "spec.toml"
    spec.write_text(text)
    return runner.invoke(app, ["compile", str(spec), "--until", until], env={"COLUMNS": "200"})


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def collapsed_spec(zero_student, probe: str = PROBE, target: str = "") -> str:
    return (TINY_HEADER.format(name="collapsed") + STUDENT + f'checkpoint = "{zero_student}"\n' + probe
            + '[target]\nuse = "host"\n' + target)


def test_a_collapsed_student_fails_the_compile_naming_the_metric(tmp_path, zero_student):
    line = error_line(compile_cli(tmp_path, collapsed_spec(zero_student), "eval.linear-probe"))
    assert "eval.linear-probe" in line and "varying_dims 0 of 32" in line and 'gate = "off"' in line
    # Without the probe, the target's calibration-only QAT refuses the INT8 student.
    line = error_line(compile_cli(tmp_path, collapsed_spec(zero_student, probe=""), "quantize.brevitas-qat"))
    assert "quantize.brevitas-qat" in line and "INT8 student" in line and "varying_dims 0" in line


def test_gate_off_hands_the_collapsed_student_over(tmp_path, zero_student):
    import json

    text = collapsed_spec(zero_student, probe=PROBE + 'gate = "off"\n',
                          target='backend = { "quantize.brevitas-qat" = { gate = "off" } }\n')
    result = compile_cli(tmp_path, text, "quantize.brevitas-qat")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "build" / "collapsed" / "report.json").read_text())["metrics"]
    probe, qat = metrics["eval.linear-probe"], metrics["quantize.brevitas-qat"]
    assert probe["gate"]["varying_dims"] == 0 and set(probe["few_shot"]) == {"1", "3"}
    assert qat["gate"]["varying_dims"] == 0 and qat["int8"]["top1"] < qat["gate"]["chance_limit"]


def test_min_top1_and_max_drop_trip_when_violated(tmp_path):
    """The untrained student: its float probe passes the gate, its INT8 form is at chance (8 px, activations
    of 1e-7 that 8 bits round away).  With the sanity gate off, min_top1 and max_drop still hold."""
    import json

    live = TINY_HEADER.format(name="live") + STUDENT + '[[passes]]\nuse = "eval.linear-probe"\nshots = []\n'
    qat_off = '[target]\nuse = "host"\nbackend = {{ "quantize.brevitas-qat" = {{ gate = "off"{} }} }}\n'
    ok = compile_cli(tmp_path, live + qat_off.format(", max_drop = 100.0"), "quantize.brevitas-qat")
    assert ok.exit_code == 0, ok.output
    metrics = json.loads((tmp_path / "build" / "live" / "report.json").read_text())["metrics"]
    probe, qat = metrics["eval.linear-probe"], metrics["quantize.brevitas-qat"]
    assert probe["top1"] > probe["gate"]["chance_limit"] and "few_shot" not in probe
    drop = 100 * (qat["fp32"]["top1"] - qat["int8"]["top1"])
    assert drop > 10 and qat["gate"]["drop_points"] == pytest.approx(drop)

    line = error_line(compile_cli(tmp_path, live + "min_top1 = 1.0\n" + qat_off.format(""), "eval.linear-probe"))
    assert "eval.linear-probe" in line and "top1" in line and "is below min_top1 1" in line
    line = error_line(compile_cli(tmp_path, live + qat_off.format(", max_drop = 10.0"), "quantize.brevitas-qat"))
    assert "quantize.brevitas-qat" in line and "int8.top1" in line and "more than max_drop 10" in line
    line = error_line(compile_cli(tmp_path, live + qat_off.format(", min_top1 = 0.5"), "quantize.brevitas-qat"))
    assert "int8.top1" in line and "below min_top1 0.5" in line


def test_max_drop_needs_the_probe():
    from pydantic import ValidationError

    from distillc.passes.quantize.brevitas_qat import BrevitasQat

    with pytest.raises(ValidationError, match="need probe = true"):
        BrevitasQat.Config(probe=False, max_drop=1.0)
