"""Spec v1: read ``spec.toml``, validate every key, resolve names against the registries.

Validation happens in two stages, both before anything runs:

1. the file's shape (sections, key types, ranges, paths) with strict pydantic models that
   forbid unknown keys and coerce nothing (``"16"`` is not an integer; an integer is a float);
2. names against the plugin registries: each ``[[passes]]`` entry against its pass's ``Config``,
   ``[target]`` against its target's ``Config``, teacher/student options against the
   architecture builder's signature, teacher references, ``[data] path`` against what the
   source takes, and files that must exist.

``distillc validate`` then builds the plan, which checks the artifact types of every step.

Every problem becomes one line ``<key path>: <what is wrong> (got <value>)``; all lines are
reported together in one :class:`SpecError`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, create_model,
                      model_validator)

from distillc.errors import SpecError, shorten, shown
from distillc.validation import format_loc, format_validation_error, strict_variant, validate_into

SPEC_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _exact_int(value: Any) -> Any:
    # Literal[1, 3] compares by equality, so strict mode alone would take true or 1.0 for 1.
    if type(value) is not int:
        raise ValueError("Input should be a valid integer")
    return value


#: A path key: TOML gives paths as strings, which strict mode alone would refuse for ``Path``.
LaxPath = Annotated[Path, Strict(False)]


class _Section(BaseModel):
    """A section with a closed set of keys.

    Strict: TOML already gives real types, so ``"16"`` for an integer is a mistake, not a
    value to coerce (an integer still fits a float key).  TOML's ``inf`` and ``nan`` fit no
    float key: they would pass range checks (``nan`` compares false) and train a NaN model.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Open(BaseModel):
    """A section whose extra keys are options checked in stage 2 against a plugin's schema."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DistillcSection(_Section):
    spec_version: Annotated[Literal[1], BeforeValidator(_exact_int)]
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class DataSection(_Section):
    source: str = "sklearn-digits"
    path: LaxPath | None = None
    image_size: int = Field(32, ge=4, le=1024)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    channels: Annotated[Literal[1, 3], BeforeValidator(_exact_int)] = 3
    # The source's own settings (e.g. digit-scenes' unseen classes), checked in stage 2 against
    # the source's ``options`` model; a source without one takes none.
    options: dict[str, Any] = Field(default_factory=dict)


class TeacherTraining(_Section):
    epochs: int = Field(ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(128, ge=1, le=65_536)
    weight_decay: float = Field(0.05, ge=0.0)
    # The teacher's own labelled data, a stand-in for a foundation model's pretraining set (e.g.
    # sklearn-digits for a teacher of digit-scenes detection); default: [data].
    data: DataSection | None = None


#: How a teacher's input is resized (``torch.nn.functional.interpolate`` modes).
Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]


class TeacherSection(_Open):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    arch: str
    checkpoint: LaxPath | None = None
    train: TeacherTraining | None = None
    # The text tokenizer that ships with the checkpoint (tokenizer.json, or a BPE .txt.gz).
    tokenizer: LaxPath | None = None
    # The teacher's input contract (see :func:`teacher_input`); None takes the default.
    input_size: int | None = Field(None, ge=4, le=1024)
    channels: Annotated[Literal[1, 3], BeforeValidator(_exact_int)] | None = None
    mean: list[float] | None = Field(None, min_length=1, max_length=3)
    std: list[Annotated[float, Field(gt=0.0)]] | None = Field(None, min_length=1, max_length=3)
    interpolation: Interpolation | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSection":
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of 'checkpoint' (a weights file) or 'train' (e.g. train = { epochs = 10 })")
        return self


class StudentSection(_Open):
    arch: str | None = None
    checkpoint: LaxPath | None = None
    onnx: LaxPath | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSection":
        if (self.arch is None) == (self.onnx is None):
            raise ValueError("give exactly one of 'arch' (a torch student) or 'onnx' (a model file)")
        if self.onnx is not None and (self.checkpoint is not None or self.model_extra):
            raise ValueError("a student given as 'onnx' takes no 'checkpoint' or architecture options")
        return self


class PassSection(_Open):
    use: str


class TargetSection(_Open):
    use: str = "host"


class SpecFile(_Section):
    """The file's shape; see docs/spec.md for every key."""

    distillc: DistillcSection
    data: DataSection = DataSection()
    teachers: list[TeacherSection] = []
    student: StudentSection
    passes: list[PassSection] = []
    target: TargetSection = TargetSection()


@dataclass
class SpecPass:
    """One resolved ``[[passes]]`` entry."""

    index: int
    name: str
    cls: type
    config: Any

    @property
    def path(self) -> str:
        return f"passes[{self.index}]"


@dataclass
class Spec:
    """A validated spec, resolved against a plugin manager's registries."""

    file: SpecFile
    path: Path
    passes: list[SpecPass]
    target_cls: type
    target_config: Any
    teacher_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    student_options: dict[str, Any] = field(default_factory=dict)
    #: Each teacher's input contract (:func:`teacher_input`), by teacher name.
    teacher_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The spec's folder: every relative path in the spec is relative to it."""
        return self.path.parent

    @property
    def name(self) -> str:
        return self.file.distillc.name

    @property
    def distillc(self) -> DistillcSection:
        return self.file.distillc

    @property
    def data(self) -> DataSection:
        return self.file.data

    @property
    def teachers(self) -> list[TeacherSection]:
        return self.file.teachers

    @property
    def student(self) -> StudentSection:
        return self.file.student

    def resolve(self, path: Path | None) -> Path | None:
        return None if path is None else (self.root / path).resolve()

    def teacher(self, name: str) -> TeacherSection:
        return next(t for t in self.teachers if t.name == name)

    def data_kwargs(self, source: Any = None, section: DataSection | None = None) -> dict[str, Any]:
        """The keywords of ``source``'s ``load`` and ``fingerprint`` for ``section`` (default
        ``[data]``; a teacher's ``train.data`` is another); ``options`` (validated, defaults filled
        in) only for a source that declares an options model."""
        return data_kwargs(section or self.data, seed=self.distillc.seed, path=self.resolve((section or self.data).path),
                           source=source)

    def data_fingerprint(self, plugins: Any) -> str:
        source = plugins.datasets.get(self.data.source)
        return f"{self.data.source}:{source.fingerprint(**self.data_kwargs(source))}"

    def load_data(self, plugins: Any) -> Any:
        source = plugins.datasets.get(self.data.source)
        return source.load(**self.data_kwargs(source))

    def digest(self) -> str:
        """sha256 of the validated spec (canonical JSON), recorded in the manifest."""
        text = json.dumps(self.file.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def data_kwargs(section: DataSection, *, seed: int, path: Path | None, source: Any = None) -> dict[str, Any]:
    """A data section as the keywords of its source's ``load`` and ``fingerprint`` (``path`` resolved)."""
    kwargs = {"image_size": section.image_size, "val_fraction": section.val_fraction, "seed": seed,
              "path": path, "channels": section.channels}
    model = getattr(source, "options", None)
    if model is not None:
        kwargs["options"] = model.model_validate(section.options).model_dump(mode="json")
    return kwargs


# -- reading --------------------------------------------------------------------------------


#: Limits on a spec file, far above what a spec needs, that keep reading it fast and bounded.
MAX_SPEC_BYTES = 16 * 2**20
MAX_NESTING = 32
MAX_ENTRIES = 10_000

# What the nesting scan must step over (strings and comments, where brackets and dots mean
# nothing) and what it counts: brackets, and the dots of a dotted key between delimiters.
_TOML_TOKENS = re.compile(
    r'"""[^\\"]*(?:(?:\\.|"(?!""))[^\\"]*)*"""'  # a multi-line basic string
    r"|'''.*?'''"  # a multi-line literal string
    r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"?'  # a basic string (or the start of an unterminated one)
    r"|'[^'\n]*'?"  # a literal string
    r"|#[^\n]*"  # a comment
    r"|[\[\]{}.=,\n]",  # what the scan counts, and what ends a key
    re.S)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the spec file; every way it can be unreadable is a one-line SpecError."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    if path.is_dir():
        raise SpecError(f"{path} is a directory; give the spec file (e.g. {path / 'spec.toml'})")
    if not path.is_file():
        raise SpecError(f"{path} is not a regular file (a device, pipe or socket); give the spec file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES // 2**20} MiB; a spec is a short text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a TOML file (not UTF-8 text)") from None
    if not text.strip():
        raise SpecError(f"{path}: the spec is empty; it needs at least [distillc] and [student]")
    _check_nesting_text(text, path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise SpecError(f"{path}: invalid TOML: {exc}") from None
    _check_nesting(data)
    return data


def _check_nesting_text(text: str, path: Path) -> None:
    """Refuse brackets nested, or keys dotted, more than MAX_NESTING deep, before parsing.

    tomllib parses nested arrays and inline tables recursively (a thousand levels exhaust
    Python's stack) and takes minutes over a key of ten thousand dotted parts; one linear scan
    of the text bounds both.
    """
    depth = dots = 0
    line = 1
    for token in _TOML_TOKENS.finditer(text):
        kind = token.group()
        if kind in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise SpecError(f"{path}: line {line}: brackets nested more than {MAX_NESTING} deep; "
                                "a spec needs only a few levels")
        elif kind in "]}":
            depth = max(depth - 1, 0)
        elif kind == ".":
            dots += 1
            if dots >= MAX_NESTING:
                raise SpecError(f"{path}: line {line}: a key of more than {MAX_NESTING} dotted parts; "
                                "a spec needs only a few levels")
            continue
        line += kind.count("\n")
        if kind in "=,\n" or kind.startswith("#") or kind in "[]{}":
            dots = 0


def _check_nesting(data: dict[str, Any]) -> None:
    """Refuse tables and arrays nested more than MAX_NESTING deep (brackets within dotted keys),
    or holding more than MAX_ENTRIES entries (each would be validated, and reported, one by one)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        node, loc = stack.pop()
        if len(loc) > MAX_NESTING:
            raise SpecError(f"values nested more than {MAX_NESTING} deep; a spec needs only a few levels",
                            shorten(format_loc(loc[:MAX_NESTING // 4]) + "..."))
        if len(node) > MAX_ENTRIES:
            raise SpecError(f"{len(node)} entries; a table or array of a spec holds at most {MAX_ENTRIES}",
                            shorten(format_loc(loc)))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((value, (*loc, key)) for key, value in items if isinstance(value, (dict, list)))


def load_spec(path: Path | str, plugins: Any) -> Spec:
    """Read, validate and resolve a spec; raises one SpecError listing every problem."""
    path = Path(path).resolve() if Path(path).exists() else Path(path)
    data = read_toml(path)
    try:
        file = SpecFile.model_validate(data)
    except ValidationError as exc:
        raise _problems_error(format_validation_error(exc, SpecFile), path) from None
    problems: list[str] = []
    spec_passes = _resolve_passes(file, plugins, problems, root=path.parent)
    target_cls, target_config = _resolve_target(file, plugins, problems)
    teacher_inputs: dict[str, dict[str, Any]] = {}
    teacher_options = _resolve_teachers(file, plugins, problems, teacher_inputs)
    student_options = _resolve_student(file, plugins, problems)
    spec = Spec(file=file, path=path, passes=spec_passes, target_cls=target_cls,
                target_config=target_config, teacher_options=teacher_options,
                student_options=student_options, teacher_inputs=teacher_inputs)
    _check_files_and_names(spec, plugins, problems)
    if problems:
        raise _problems_error(problems, path)
    return spec


#: The most problems one SpecError lists; a list of 100,000 wrong entries is not 100,000 lines.
MAX_PROBLEMS = 40


def _problems_error(problems: list[str], path: Path) -> SpecError:
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS],
                    f"{path}: {len(problems) - MAX_PROBLEMS} more problems not shown; fix these first"]
    return SpecError("\n".join(problems))


# -- stage 2 ------------------------------------------------------------------------------------


def _resolve_passes(file: SpecFile, plugins: Any, problems: list[str], *, root: Path) -> list[SpecPass]:
    """Each ``[[passes]]`` entry's class and validated config.

    A pass config is validated with the context ``{"spec_root": root}`` (pydantic's validation
    context), so a config that names files can resolve them the way the spec does (relative to
    its folder), e.g. to put their content hash into the pass's cache key.
    """
    resolved = []
    teacher_names = list(dict.fromkeys(t.name for t in file.teachers))
    listable = [e.name for e in plugins.passes if not _is_source_pass(e.obj)]
    for i, entry in enumerate(file.passes):
        path = f"passes[{i}]"
        if entry.use not in plugins.passes:
            problems.append(f"{path}.use: {plugins.passes.unknown_message(entry.use, among=listable)}")
            continue
        cls = plugins.passes.get(entry.use)
        if _is_source_pass(cls):
            problems.append(f"{path}.use: {entry.use!r} is a source pass distillc adds itself; "
                            "it cannot be listed in [[passes]]")
            continue
        config = validate_into(cls.Config, entry.options, path, problems, context={"spec_root": root})
        if config is not None:
            resolved.append(SpecPass(index=i, name=entry.use, cls=cls, config=config))
            _check_teacher_requirements(cls, config, path, file.teachers, problems)
        # An invalid config still names teachers worth checking: report both at once.
        _check_teacher_references(cls, config, entry.options, path, teacher_names, problems)
    return resolved


def _is_source_pass(cls: Any) -> bool:
    """Source passes (``takes = None``) are added by distillc, never listed in [[passes]]."""
    return getattr(cls, "takes", None) is None


def _check_teacher_requirements(cls: Any, config: Any, path: str, teachers: list[TeacherSection],
                                problems: list[str]) -> None:
    """Each ``[[teachers]]`` key a pass's config needs (``Pass.teacher_requirements``) is given."""
    try:
        needs = cls(config).teacher_requirements()
    except Exception:  # a config too broken to say: its own errors are reported
        return
    for config_key, (name, teacher_key) in needs.items():
        index = next((i for i, t in enumerate(teachers) if t.name == name), None)
        if index is not None and getattr(teachers[index], teacher_key, None) is None:
            problems.append(f"{path}.{config_key}: teacher {name!r} has no {teacher_key}; give its [[teachers]] "
                            f"entry (teachers[{index}]) {teacher_key} = \"...\"")


def _check_teacher_references(cls: Any, config: Any, options: dict[str, Any], path: str,
                              teacher_names: list[str], problems: list[str]) -> None:
    if config is None:
        try:  # unvalidated values: good enough for Pass.teachers(), which only reads them
            config = cls.Config.model_construct(**options)
        except Exception:
            return
    try:
        wanted = cls(config).teachers()
    except Exception:  # a pass whose teachers() needs a valid config: its config error is reported
        return
    single = getattr(config, "teacher", None)
    many = getattr(config, "teachers", None)
    valid = ", ".join(teacher_names) or "no [[teachers]] declared"
    for name in dict.fromkeys(n for n in wanted if isinstance(n, str)):
        if name in teacher_names:
            continue
        if name == single:
            key = f"{path}.teacher"
        elif isinstance(many, list) and name in many:
            key = f"{path}.teachers"
        else:  # a pass that names its teachers through other keys
            key = path
        problems.append(f"{key}: unknown teacher {name!r}; valid: {valid}")


def _resolve_target(file: SpecFile, plugins: Any, problems: list[str]) -> tuple[Any, Any]:
    use = file.target.use
    if use not in plugins.targets:
        problems.append(f"target.use: {plugins.targets.unknown_message(use)}")
        return None, None
    cls = plugins.targets.get(use)
    # Wrong types are refused even where a target's Config does not ask for strict mode itself.
    if validate_into(strict_variant(cls.Config), file.target.options, "target", problems) is None:
        return cls, None
    return cls, validate_into(cls.Config, file.target.options, "target", problems)


#: Keys of [[teachers]] and [student] that distillc reads itself; the rest are builder options.
_TEACHER_KEYS = ("name", "arch", "checkpoint", "train", "tokenizer", "input_size", "channels", "mean", "std", "interpolation")
_INPUT_KEYS = ("input_size", "channels", "mean", "std", "interpolation")
_STUDENT_KEYS = ("arch", "checkpoint", "onnx")


def teacher_input(teacher: TeacherSection, builder: Any, data: DataSection, path: str,
                  problems: list[str]) -> dict[str, Any] | None:
    """A teacher's input contract: what every pass feeds it, whatever the student sees.

    ``{"input_size", "channels", "mean", "std", "interpolation"}``: each image (the student's
    [0, 1] view) is converted to ``channels`` (grey repeated, or RGB to luma), resized to
    ``input_size`` and normalised with ``mean``/``std``.  A loaded teacher starts from its
    builder's published defaults (``builder.input_defaults``, e.g. 224 px and ImageNet
    statistics for DINO); a teacher the spec trains, or one whose builder publishes none, starts
    from the data as it is (its size and channels, no normalisation).  Every key of the
    ``[[teachers]]`` entry overrides its default.  Appends a problem and returns None when the
    result does not hold together (``mean``/``std`` of another length than ``channels``).
    """
    if teacher.train is not None and teacher.train.data is not None:
        data = teacher.train.data  # a teacher trained on its own data takes that data's size and channels
    contract: dict[str, Any] = {"input_size": data.image_size, "channels": data.channels,
                                "mean": [0.0] * data.channels, "std": [1.0] * data.channels,
                                "interpolation": "bicubic"}
    published = getattr(builder, "input_defaults", None) if teacher.train is None else None
    contract.update(dict(published or {}))
    given = {key: getattr(teacher, key) for key in _INPUT_KEYS if getattr(teacher, key) is not None}
    if "channels" in given and "mean" not in given and given["channels"] != len(contract["mean"]):
        # Statistics of an RGB teacher do not carry over to one grey channel: ask for them.
        if any(v != 0.0 for v in contract["mean"]) or any(v != 1.0 for v in contract["std"]):
            problems.append(f"{path}.channels: {given['channels']} channel(s), but the default mean/std have "
                            f"{len(contract['mean'])} values; give mean and std with {given['channels']} each")
            return None
        contract["mean"], contract["std"] = [0.0] * given["channels"], [1.0] * given["channels"]
    contract.update(given)
    ok = True
    for key in ("mean", "std"):
        if len(contract[key]) != contract["channels"]:
            problems.append(f"{path}.{key}: {len(contract[key])} values for a {contract['channels']}-channel "
                            f"teacher input; give one per channel")
            ok = False
    return contract if ok else None


def is_plain_input(contract: dict[str, Any], data: DataSection) -> bool:
    """Whether a teacher input contract feeds the data as it is (nothing to convert)."""
    return (contract["input_size"] == data.image_size and contract["channels"] == data.channels
            and all(v == 0.0 for v in contract["mean"]) and all(v == 1.0 for v in contract["std"]))


def _resolve_teachers(file: SpecFile, plugins: Any, problems: list[str],
                      inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each teacher's builder options; fills ``inputs`` with each one's input contract."""
    options: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for i, teacher in enumerate(file.teachers):
        path = f"teachers[{i}]"
        if teacher.name in seen:
            problems.append(f"{path}.name: duplicate teacher name {teacher.name!r}")
        seen.add(teacher.name)
        if teacher.arch not in plugins.teachers:
            problems.append(f"{path}.arch: {plugins.teachers.unknown_message(teacher.arch)}")
            continue
        builder = plugins.teachers.get(teacher.arch)
        checked = _validate_builder_options(builder, teacher.options, path, problems, section_keys=_TEACHER_KEYS)
        if checked is not None:
            options[teacher.name] = checked
        contract = teacher_input(teacher, builder, file.data, path, problems)
        if contract is not None:
            inputs[teacher.name] = contract
    return options


def _resolve_student(file: SpecFile, plugins: Any, problems: list[str]) -> dict[str, Any]:
    student = file.student
    if student.arch is None:
        return {}
    if student.arch not in plugins.students:
        problems.append(f"student.arch: {plugins.students.unknown_message(student.arch)}")
        return {}
    return _validate_builder_options(plugins.students.get(student.arch), student.options, "student", problems,
                                     section_keys=_STUDENT_KEYS) or {}


def _check_files_and_names(spec: Spec, plugins: Any, problems: list[str]) -> None:
    files: list[tuple[Any, ...]] = [(f"teachers[{i}].checkpoint", t.checkpoint) for i, t in enumerate(spec.teachers)]
    files += [(f"teachers[{i}].tokenizer", t.tokenizer) for i, t in enumerate(spec.teachers)]
    files += [("student.checkpoint", spec.student.checkpoint), ("student.onnx", spec.student.onnx)]
    sections = [("data", spec.data)] + [(f"teachers[{i}].train.data", t.train.data) for i, t in enumerate(spec.teachers)
                                        if t.train is not None and t.train.data is not None]
    for where, section in sections:
        _check_data_section(section, where, plugins, problems, files)
    for key, rel, *wants in files:
        problem = path_problem(spec.root, rel, *wants) if rel is not None else None
        if problem:
            problems.append(f"{key}: {problem}")
        elif key.endswith(".tokenizer") and rel is not None and not str(rel).lower().endswith(TOKENIZER_SUFFIXES):
            problems.append(f"{key}: {shown(str(rel))} is not a tokenizer file; give a Hugging Face tokenizer.json "
                            f"or OpenAI's BPE merges (bpe_simple_vocab_16e6.txt.gz)")


def _check_data_section(section: DataSection, where: str, plugins: Any, problems: list[str], files: list) -> None:
    """Problems of one data section (``[data]`` or a teacher's ``train.data``); its path joins ``files``."""
    if section.source not in plugins.datasets:
        problems.append(f"{where}.source: {plugins.datasets.unknown_message(section.source)}")
    else:
        source = plugins.datasets.get(section.source)
        if source.needs_path and section.path is None:
            problems.append(f"{where}.path: source {section.source!r} reads local files; give their path")
        elif not source.needs_path and section.path is not None:
            problems.append(f"{where}.path: source {section.source!r} takes no path; remove the key "
                            f"(got {shown(str(section.path))})")
        else:
            wants = getattr(source, "path_kind", "any")
            files.append((f"{where}.path", section.path, wants, f"source {section.source!r} reads a {wants}"))
        model = getattr(source, "options", None)
        if model is None and section.options:
            problems.append(f"{where}.options: source {section.source!r} takes no options; remove the key "
                            f"(got {shorten(str(sorted(section.options)), 120)})")
        elif model is not None:
            validate_into(model, section.options, f"{where}.options", problems)


#: What a teacher's ``tokenizer`` file may be: a Hugging Face tokenizer.json, or BPE merges.
TOKENIZER_SUFFIXES = (".json", ".txt.gz", ".txt")


#: What a path in a spec may be at most (Linux's PATH_MAX and NAME_MAX).
MAX_PATH_CHARS, MAX_NAME_BYTES = 4096, 255


def path_problem(root: Path, given: Path, wants: str = "file", why: str = "") -> str | None:
    """What is wrong with a path a spec gives (relative to ``root``), or None.

    ``wants`` is ``"file"`` (a regular file, readable), ``"folder"`` or ``"any"``.  Beyond
    existence this refuses what would fail or hang later: a NUL byte, an over-long name, the
    filesystem root, a device or pipe (``/dev/zero`` would be hashed forever), a file that
    cannot be read (``/proc/self/mem``).  Values are echoed shortened.
    """
    text = str(given)
    named = shown(text)
    if "\x00" in text:
        return f"holds a NUL byte (got {named}); give a file name"
    if len(text) > MAX_PATH_CHARS or any(len(part.encode()) > MAX_NAME_BYTES for part in Path(text).parts):
        return (f"path too long (got {named}, {len(text)} characters); a name has at most {MAX_NAME_BYTES} bytes "
                f"and a path {MAX_PATH_CHARS} characters")
    full = (root / given).resolve()
    looked = shorten(str(full), 200)
    try:
        info = os.stat(full)
    except (FileNotFoundError, NotADirectoryError):
        return f"file not found: {named} (looked at {looked})"
    except OSError as exc:
        return f"cannot read {looked}: {exc.strerror or exc}"
    because = f" ({why})" if why else ""
    if stat.S_ISDIR(info.st_mode):
        if wants == "file":
            return f"{looked} is a folder{because}; give a file"
        if full == Path(full.anchor):
            return f"{looked} is the filesystem root; give the folder that holds the data"
        if not os.access(full, os.R_OK | os.X_OK):
            return f"cannot read the folder {looked}: permission denied"
        return None
    if not stat.S_ISREG(info.st_mode):
        return f"{looked} is not a regular file (a device, pipe or socket); give a file"
    if wants == "folder":
        return f"{looked} is a file{because}; give a folder"
    try:
        with open(full, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"cannot read {looked}: {exc.strerror or exc}"
    return None


# -- helpers ----------------------------------------------------------------------------------


#: Builder arguments the pipeline fills from [data]; a spec never sets them.
_BUILDER_PROVIDED = ("image_size", "in_chans")


def builder_options_model(builder: Any) -> type[BaseModel]:
    """A strict pydantic model of a builder's keyword options, from its signature.

    Strict like the spec's sections (no ``"0.5"`` for a float); ``Path`` options still take strings.
    """
    hints = typing.get_type_hints(builder, include_extras=True)  # keeps Annotated bounds (Field(le=...))
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(builder).parameters.items():
        if name in _BUILDER_PROVIDED or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (_lax_paths(hints.get(name, Any)), default)
    return create_model(f"{getattr(builder, '__name__', 'builder')}_options",
                        __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False), **fields)


def _lax_paths(annotation: Any) -> Any:
    """``Path`` -> :data:`LaxPath`, also as a member of a union (``Path | None``)."""
    if annotation is Path:
        return LaxPath
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = tuple(_lax_paths(arg) for arg in typing.get_args(annotation))
        return typing.Union[members]
    return annotation


def _validate_builder_options(builder: Any, options: dict[str, Any], path: str, problems: list[str],
                              section_keys: tuple[str, ...] = ()) -> dict[str, Any] | None:
    checked = validate_into(builder_options_model(builder), options, path, problems, section_keys)
    if checked is None:
        return None
    return {k: v for k, v in checked.model_dump().items() if k in options}
