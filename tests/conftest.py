"""Shared fixtures: tiny specs that compile in seconds on 2 CPU cores."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

#: The [data] section of every tiny spec: digits at 8 px (the source ships with scikit-learn).
TINY_DATA = """
[data]
source = "sklearn-digits"
image_size = 8
val_fraction = 0.25
channels = 1
"""

#: [distillc] (named ``{name}``, for ``.format``) and [data]: the head of the tests' own tiny specs.
TINY_HEADER = """
[distillc]
spec_version = 1
name = "{name}"
""" + TINY_DATA

TINY_SPEC = """
[distillc]
spec_version = 1
name = "tiny"
seed = {seed}
""" + TINY_DATA + """
[[teachers]]
name = "vit"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = {teacher_epochs}, batch_size = 256, lr = 3e-3 }}

[student]
arch = "mobilenetv2"
width = 0.35
last_channels = 32

[[passes]]
use = "distill.feature"
teacher = "vit"
epochs = {distill_epochs}
batch_size = 256
projector_hidden = 0
{extra_passes}
[[passes]]
use = "eval.linear-probe"
teachers = ["vit"]
c = {probe_c}
{probe_options}

[target]
use = "{target}"
{target_options}
"""


#: The QAT gate key of the tiny spec (see ``tiny_spec_text``).
QAT_GATE_OFF = 'gate = "off"'


def tiny_spec_text(*, seed: int = 0, teacher_epochs: int = 1, distill_epochs: int = 2, probe_c: float = 1.0,
                   target: str = "host", target_options: str = "", extra_passes: str = "",
                   qat_gate: bool = False) -> str:
    """The tiny spec.  Its INT8 student is collapsed: ten optimizer steps from a one-epoch teacher at
    8 px leave embeddings whose input-dependent part is 1e-7 of their size, which 8-bit activations
    round away (INT8 probe at chance).  The tests that use it check the flow, caching and the
    backend, not quality, so the quality gate of ``quantize.brevitas-qat`` is off in it (the
    target's calibration-only copy through ``[target] backend``, or a QAT pass in
    ``extra_passes``) unless ``qat_gate``, and so is the probe's gate.  The float student's
    embeddings vary by about 1e-7 of their size, right at the gate's ``CONSTANT_RTOL``: on some CPUs
    they pass it, on others not, so the probe cannot keep its gate either."""
    probe_options = ""
    if not qat_gate:
        probe_options = QAT_GATE_OFF
        qat = 'use = "quantize.brevitas-qat"'
        if qat in extra_passes:
            extra_passes = extra_passes.replace(qat, f"{qat}\n{QAT_GATE_OFF}")
        elif "backend = {" in target_options:
            target_options = target_options.replace("backend = {", f'backend = {{ "quantize.brevitas-qat" = '
                                                                   f'{{ {QAT_GATE_OFF} }},', 1)
        else:
            target_options += f'\nbackend = {{ "quantize.brevitas-qat" = {{ {QAT_GATE_OFF} }} }}'
    return textwrap.dedent(TINY_SPEC).format(seed=seed, teacher_epochs=teacher_epochs, distill_epochs=distill_epochs,
                                             probe_c=probe_c, target=target, target_options=target_options,
                                             extra_passes=extra_passes, probe_options=probe_options)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No installed third-party plugin and no shared cache leak into a test."""
    monkeypatch.setenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DISTILLC_CACHE", raising=False)


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec(text, name="spec.toml") -> path of a spec file in a fresh folder."""

    def write(text: str, name: str = "spec.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """One folder (so one cache: teachers train once) for a whole test module, with one torch
    thread: on 2 shared cores one thread per process is faster than two fighting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the autouse fixture has not run yet
        patch.setenv("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
        patch.delenv("DISTILLC_CACHE", raising=False)
        yield tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    torch.set_num_threads(threads)
