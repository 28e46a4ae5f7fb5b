"""Seeded mutations of spec files, and what ``distillc validate`` must do with each.

``tests/test_spec_fuzz.py`` runs a few hundred of them and ``benchmarks/fuzz_specs.py`` a
thousand or more.  A mutation takes one example spec and changes one thing: a wrong type, an unknown key
or name, an extreme number (huge, negative, NaN, infinite), a bad path, deep nesting, a huge
value, a deleted key, or random bytes.  :func:`outcome_problems` states the contract every
outcome must keep: exit status 0 or 2, never an internal error or a traceback, every ``error:``
line naming a key path or the spec file, no line longer than :data:`MAX_LINE` characters.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import random
import re
import signal
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

#: The longest line an error may print (the longest legitimate ones list every valid name).
MAX_LINE = 600

#: The sections a key path starts with.
SECTIONS = ("distillc", "data", "teachers", "student", "passes", "target")

KINDS = ("wrong-type", "unknown-key", "unknown-name", "number", "bad-path", "deep-nesting", "huge-value",
         "delete", "random-bytes")

_NUMBERS: tuple[Any, ...] = (0, -1, 1, -(10**18), 10**18, 2**63 - 1, -(2**63), 1e308, -1e308, 1e-308, 0.5, -0.0,
                             math.nan, math.inf, -math.inf)
_OTHER_TYPES: tuple[Any, ...] = ("text", 7, 2.5, True, [1, 2], {"k": 1}, [], {}, ["a", 3],
                                 datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc),
                                 datetime.date(2024, 1, 1))
#: Names of files and folders :func:`prepare_folder` makes, and paths that exist but are no file.
_PATHS = ("adir", "/", "..", ".", "", "/proc/self/mem", "/dev/zero", "/dev/null", "a" * 5000, "x" * 300 + ".pt",
          "a\x00b.pt", "missing.pt", "adir/../weights.pt", "weights.pt", "empty.safetensors", "/etc/hostname",
          "adir/nested/deeper.pt", "~/weights.pt", "weights.pt/inner.pt")
_PATH_KEYS = ("teachers.checkpoint", "student.checkpoint", "student.onnx", "data.path")


@dataclass
class Case:
    """One mutated spec: which example it came from, what was changed, and the file's bytes."""

    index: int
    example: str
    kind: str
    change: str
    content: bytes


@dataclass
class Outcome:
    """What ``distillc validate`` did with one case."""

    exit_code: int
    output: str
    seconds: float


def prepare_folder(folder: Path) -> None:
    """The files the bad-path mutations point at (relative to the spec's folder)."""
    (folder / "adir" / "nested").mkdir(parents=True, exist_ok=True)
    (folder / "weights.pt").write_bytes(b"not really a checkpoint")
    (folder / "empty.safetensors").write_bytes(b"")


def cases(examples: list[Path], *, seed: int, count: int) -> Iterator[Case]:
    """``count`` mutations, the same ones for the same seed and examples."""
    rng = random.Random(seed)
    parsed = [(p.parent.name, tomllib.loads(p.read_text())) for p in sorted(examples)]
    for index in range(count):
        name, doc = parsed[index % len(parsed)]
        kind = KINDS[rng.randrange(len(KINDS))]
        change, content = _mutate(kind, copy.deepcopy(doc), rng)
        yield Case(index=index, example=name, kind=kind, change=change, content=content)


def run_validate(spec: Path, *, timeout: float = 20.0) -> Outcome:
    """``distillc validate SPEC`` in this process (no subprocess per case: fast).

    A case that runs past ``timeout`` seconds is stopped (SIGALRM, main thread only) and, being
    an exception distillc did not expect, reported as an internal error.
    """
    from typer.testing import CliRunner

    from distillc.cli import app

    t0 = time.perf_counter()
    with time_limit(timeout):
        result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "200"})
    return Outcome(result.exit_code, result.output, time.perf_counter() - t0)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the code run inside after ``seconds`` (SIGALRM; main thread only,
    elsewhere no limit): a hang becomes a failure instead of a test run that never ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome_problems(outcome: Outcome, spec: Path) -> list[str]:
    """What breaks the contract in ``outcome`` (empty: nothing)."""
    problems = []
    if outcome.exit_code not in (0, 2):
        problems.append(f"exit status {outcome.exit_code}")
    if "internal error" in outcome.output or "Traceback" in outcome.output:
        problems.append("internal error or traceback")
    lines = outcome.output.splitlines()
    for line in lines:
        if len(line) > MAX_LINE:
            problems.append(f"a line of {len(line)} characters: {line[:120]}...")
    if outcome.exit_code == 2:
        errors = [line for line in lines if line.strip()]
        if not errors:
            problems.append("exit status 2 without a message")
        for line in errors:
            if not line.startswith("error: "):
                problems.append(f"not an error line: {line[:160]}")
            elif not _names_key_or_file(line.removeprefix("error: "), spec):
                problems.append(f"names no key path or file: {line[:160]}")
    return problems


def _names_key_or_file(message: str, spec: Path) -> bool:
    subject, _, rest = message.partition(": ")
    if re.match(rf"({'|'.join(SECTIONS)})([.\[]|$)", subject) or subject == "(top level)":
        return True
    if rest.startswith("unknown key"):  # an unknown top-level key is its own key path
        return True
    return str(spec) in message or str(spec.parent) in subject


# -- mutations ----------------------------------------------------------------------------------


def _mutate(kind: str, doc: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    if kind == "random-bytes":
        return _random_bytes(to_toml(doc).encode(), rng)
    if kind == "deep-nesting":
        return _deep_nesting(doc, rng)
    if kind == "bad-path":
        return _bad_path(doc, rng)
    if kind == "unknown-key":
        table, where = _random_table(doc, rng)
        key = rng.choice(["colour", "widht", "epoch", "Name", "x" * rng.randrange(1, 40), "", "a.b", "ü", " "])
        table[key] = rng.choice(_OTHER_TYPES)
        return f"unknown key {key!r} in {where}", to_toml(doc).encode()
    path, parent, key = _random_leaf(doc, rng)
    if kind == "delete":
        del parent[key]
        change = f"deleted {path}"
    elif kind == "wrong-type":
        parent[key] = rng.choice([v for v in _OTHER_TYPES if type(v) is not type(parent[key])])
        change = f"{path} = {parent[key]!r}"
    elif kind == "unknown-name":
        parent[key] = _misspelt(parent[key], rng)
        change = f"{path} = {parent[key]!r}"
    elif kind == "number":
        parent[key] = rng.choice(_NUMBERS)
        change = f"{path} = {parent[key]!r}"
    else:  # huge-value
        parent[key] = rng.choice(["x" * 1_000_000, list(range(20_000)), {f"k{i}": i for i in range(12_000)}])
        change = f"{path} = <{type(parent[key]).__name__} of {len(parent[key])}>"
    return change, to_toml(doc).encode()


def _random_leaf(doc: dict[str, Any], rng: random.Random) -> tuple[str, Any, Any]:
    """A random (path, container, key) of a value in ``doc``, tables and lists included."""
    leaves: list[tuple[str, Any, Any]] = []

    def walk(node: Any, path: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
            leaves.append((sub, node, key))
            if isinstance(value, (dict, list)):
                walk(value, sub)

    walk(doc, "")
    return rng.choice(leaves)


def _random_table(doc: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    tables: list[tuple[dict[str, Any], str]] = [(doc, "(top level)")]

    def walk(node: Any, path: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
            if isinstance(value, dict):
                tables.append((value, sub))
            if isinstance(value, (dict, list)):
                walk(value, sub)

    walk(doc, "")
    return rng.choice(tables)


def _misspelt(value: Any, rng: random.Random) -> Any:
    if not isinstance(value, str) or not value:
        return rng.choice(["nope", "distill.featur", "vit_tiny_patch5", "stm32", "", "mobilenetv3"])
    i = rng.randrange(len(value))
    return rng.choice([value[:i] + value[i + 1:], value + "x", value.upper(), value[:i] + "-" + value[i:], " " + value])


def _bad_path(doc: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    where = rng.choice(_PATH_KEYS)
    value = rng.choice(_PATHS)
    if where == "teachers.checkpoint" and doc.get("teachers"):
        i = rng.randrange(len(doc["teachers"]))
        teacher = doc["teachers"][i]
        teacher.pop("train", None)
        teacher["checkpoint"] = value
        where = f"teachers[{i}].checkpoint"
    elif where == "student.onnx":
        doc["student"] = {"onnx": value}
        doc["passes"] = [p for p in doc.get("passes", []) if p.get("use") in ("tvm.int8",)]
    elif where == "data.path":
        doc.setdefault("data", {})["source"] = rng.choice(["npz", "image-folder", "cifar"])
        doc["data"]["path"] = value
    else:
        doc.setdefault("student", {})["checkpoint"] = value
        where = "student.checkpoint"
    return f"{where} = {value[:40]!r}", to_toml(doc).encode()


def _deep_nesting(doc: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    depth = rng.choice([33, 40, 200, 1000, 5000, 10_000, 100_000])
    form = rng.choice(["array", "inline-table", "dotted-key", "table-header", "mixed"])
    text = to_toml(doc)
    if form == "array":
        line = "deep = " + "[" * depth + "]" * depth
    elif form == "inline-table":
        line = "deep = " + "{a = " * depth + "1" + "}" * depth
    elif form == "dotted-key":
        line = ".".join(["a"] * depth) + " = 1"
    elif form == "table-header":
        line = "[" + ".".join(["a"] * depth) + "]\nb = 1"
    else:
        line = "deep = " + "[{a = " * (depth // 2) + "1" + "}]" * (depth // 2)
    section = rng.choice(["[student]", "[target]", "[[passes]]", "[data]"])
    if form != "table-header" and section in text:
        at = text.index(section) + len(section)
        text = text[:at] + "\n" + line + text[at:]
    else:
        text = text + "\n" + line + "\n"
    return f"{form} nested {depth} deep after {section}", text.encode()


def _random_bytes(content: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(content)
    edits = rng.choice([1, 2, 5, 20])
    for _ in range(edits):
        at = rng.randrange(len(data) + 1)
        byte = rng.choice([rng.randrange(256), *b"[]{}=\"'.,#\n\\ \x00\xff"])
        action = rng.randrange(3)
        if action == 0 or at == len(data):
            data.insert(at, byte)
        elif action == 1:
            data[at] = byte
        else:
            del data[at]
    return f"{edits} random byte edit(s)", bytes(data)


# -- writing TOML -------------------------------------------------------------------------------


def to_toml(doc: dict[str, Any]) -> str:
    """``doc`` as TOML text: scalars and inline values first, then one [table] or [[table]] per entry."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not _is_table(v) and not _is_table_array(v)]
    for k, v in doc.items():
        if _is_table(v):
            lines += ["", f"[{_key(k)}]", *(f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items())]
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{_key(k)}]]", *(f"{_key(kk)} = {_value(vv)}" for kk, vv in item.items())]
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def _key(key: str) -> str:
    return _string(key)


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")
