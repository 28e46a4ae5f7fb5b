"""The layout the docs describe: the core is the ground floor, passes never drive the engine,
every stage folder says what it takes and makes, and no module of the core is in an import circle."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "distillc"
#: The engine: what a pass must never import (it would reach past its cache key).
ENGINE = ("distillc.plan", "distillc.run", "distillc.cli", "distillc.plugin_manager")
STAGES = ("distill", "eval", "quantize", "export", "backend", "verify", "max78000")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved)."""
    package = ".".join(("distillc", *path.relative_to(CORE).parts[:-1])) if path.is_relative_to(CORE) else ""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_core_imports_no_pass_plugin_or_target_but_in_the_cli():
    offenders = {}
    for path in sorted(CORE.glob("*.py")):
        if path.name == "cli.py":  # the CLI is the front door: it may show what plugins made
            continue
        bad = sorted(m for m in imported_modules(path)
                     if m.startswith(("distillc.passes", "distillc.plugins", "distillc.targets")))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


@pytest.mark.parametrize("folder", ["passes", "plugins", "targets"])
def test_no_pass_plugin_or_target_imports_the_engine(folder):
    offenders = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.startswith(ENGINE))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_backend_imports_no_distillation_pass():
    offenders = {}
    for path in sorted((ROOT / "passes" / "backend").rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.startswith("distillc.passes.distill"))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_the_core_modules_import_each_other_without_circles():
    graph = {}
    for path in CORE.glob("*.py"):
        name = "distillc" if path.name == "__init__.py" else f"distillc.{path.stem}"
        graph[name] = {m for m in imported_modules(path) if m.startswith("distillc.")
                       and m.split(".")[1] not in ("passes", "plugins", "targets")}
    graph = {name: {m if m in graph else m.rsplit(".", 1)[0] for m in deps} & set(graph) - {name}
             for name, deps in graph.items()}
    circles = []

    def visit(node, trail):
        if node in trail:
            circles.append(trail[trail.index(node):] + [node])
            return
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])

    for start in sorted(graph):
        visit(start, [])
    assert circles == []


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_folder_says_what_it_takes_and_makes(stage):
    module = importlib.import_module(f"distillc.passes.{stage}")
    doc = module.__doc__ or ""
    assert len(doc.split()) > 20
    assert "takes" in doc.lower() or "take" in doc.lower()
    assert (ROOT / "passes" / stage / "__init__.py").is_file()


def test_validate_and_plan_import_no_torch_tvm_or_onnx():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from distillc.cli import app\n"
        "for command in ('validate', 'plan'):\n"
        "    result = CliRunner().invoke(app, [command, sys.argv[1]])\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'tvm', 'onnx', 'onnxruntime', 'brevitas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "quickstart" / "spec.toml")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
