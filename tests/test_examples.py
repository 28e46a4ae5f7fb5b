"""Every spec under examples/ validates and plans (the quickstart also runs in `make demo`).

The examples take minutes each to compile, so the suite checks what can break silently when
a pass or key changes: the spec still parses, every pass and teacher resolves, the types chain
and the plan ends with a bundle.  benchmarks/quality.py runs them for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distillc.plan import build_plan
from distillc.plugin_manager import load_plugins
from distillc.spec import load_spec

#: Examples at real scale: they read files the user brings (tests/test_real_scale_examples.py
#: plans them on fakes of those files).
USER_FILES = {"tinyssl-cifar100", "tinyvlm"}
ALL_EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/spec.toml"))
EXAMPLES = [p for p in ALL_EXAMPLES if p.parent.name not in USER_FILES]


def test_there_are_examples():
    assert any(p.parent.name == "quickstart" for p in EXAMPLES)
    assert {p.parent.name for p in ALL_EXAMPLES} >= USER_FILES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_example_spec_plans_to_a_bundle(path, tmp_path):
    plugins = load_plugins()
    spec = load_spec(path, plugins)
    plan = build_plan(spec, plugins, workdir=tmp_path / "build")
    ids = [step.id for step in plan.steps]
    assert "codegen.c" in ids and any(i.startswith("verify.") for i in ids), ids
    assert ids[-1].startswith("verify.") or ids[-1] == "export.izer", ids
    assert path.read_text().lstrip().startswith("#"), "an example starts with a comment saying what it shows"
