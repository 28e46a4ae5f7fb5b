"""Planning: spec -> typed list of steps, with cache keys and cache status, before anything runs.

A :class:`Plan` is the resolved list of steps: one per teacher (trained or loaded), the student
source, the spec's ``[[passes]]``, then the target's backend passes.  Teacher steps are side
inputs; the rest form the main flow, each step taking the artifact the previous one made.
Types are checked, planned config keys filled (``Pass.planned``) and cache keys computed here;
:mod:`distillc.run` runs a plan.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distillc import __version__
from distillc.cache import ArtifactStore, cache_key, dist_version, file_sha256
from distillc.errors import PluginError, SpecError
from distillc.pass_api import Pass
from distillc.registry import Plugins
from distillc.spec import Spec, is_plain_input
from distillc.validation import format_validation_error
from distillc.workspace import check_folder

CACHE_ENV = "DISTILLC_CACHE"


@dataclass
class Step:
    """One planned pass run."""

    id: str
    pass_: Pass
    source: str
    flow: bool
    input_id: str | None = None
    teacher_ids: dict[str, str] = field(default_factory=dict)
    key: str = ""
    cached: bool = False
    #: everything the cache key is the hash of (also written to run.json as provenance)
    key_payload: dict[str, Any] = field(default_factory=dict)
    #: the artifact type this step makes (known once the plan is linked)
    makes: Any = None

    @property
    def name(self) -> str:
        return self.pass_.name

    def describe(self) -> dict[str, Any]:
        cls = type(self.pass_)
        return {"id": self.id, "pass": cls.name, "version": cls.version, "source": self.source,
                "takes": cls.takes_names(), "makes": (self.makes or cls.makes).kind, "key": self.key}


@dataclass
class Plan:
    """The resolved steps of one spec, in execution order."""

    spec: Spec
    steps: list[Step]
    workdir: Path
    store: ArtifactStore

    def step(self, step_id: str, *, option: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise SpecError(f"{option}: unknown pass {step_id!r} in this plan; valid: "
                        + ", ".join(s.id for s in self.steps))

    def index(self, step_id: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.id == step_id)


def default_workdir(spec: Spec) -> Path:
    return spec.root / "build" / spec.name


def default_store(spec: Spec) -> ArtifactStore:
    root = os.environ.get(CACHE_ENV)
    return ArtifactStore(Path(root) if root else spec.root / ".distillc-cache")


def build_plan(spec: Spec, plugins: Plugins, *, workdir: Path | None = None,
               store: ArtifactStore | None = None) -> Plan:
    """Resolve the steps, check types, compute cache keys and cache status."""
    store = store or default_store(spec)
    workdir = Path(workdir) if workdir else default_workdir(spec)
    check_folder(store.root, "the cache", CACHE_ENV, create=False)
    check_folder(workdir, "the work directory", "--workdir", create=False)
    steps: list[Step] = []
    for teacher in spec.teachers:
        steps.append(_teacher_step(spec, plugins, teacher.name))
    steps.append(_student_step(spec, plugins))
    used_ids = {s.id for s in steps}
    for sp in spec.passes:
        steps.append(Step(id=_unique(sp.name, used_ids), pass_=sp.cls(sp.config), source=sp.path, flow=True))
    steps += _backend_steps(spec, plugins, _flow_type(steps), used_ids)
    for step in steps:
        step.pass_ = _with_planned_keys(step.pass_, spec)

    _link_and_check(steps, spec)
    data_fp = _data_fingerprint_once(spec, plugins)
    keys: dict[str, str] = {}
    for step in steps:
        step.key_payload = _key_payload(step, keys, data_fp, spec)
        step.key = cache_key(step.key_payload)
        keys[step.id] = step.key
        step.cached = store.has(step.key)
    return Plan(spec=spec, steps=steps, workdir=workdir, store=store)


def _backend_steps(spec: Spec, plugins: Plugins, makes: Any, used_ids: set[str]) -> list[Step]:
    """The target's backend passes, with the spec's ``[target] backend`` options merged in."""
    target = spec.target_cls(spec.target_config)
    listed = {sp.name for sp in spec.passes}
    backend = [(name, options) for name, options in target.backend_passes(makes) if name not in listed]
    overrides = dict(getattr(spec.target_config, "backend", {}) or {})
    unknown = sorted(set(overrides) - {name for name, _ in backend})
    if unknown:
        raise SpecError(f"{', '.join(map(repr, unknown))} not among this plan's backend passes; valid: "
                        + ", ".join(name for name, _ in backend), "target.backend")
    steps = []
    for name, options in backend:
        cls = plugins.passes.get(name, path=f"target {target.name!r} backend pass")
        try:
            config = cls.Config.model_validate({**options, **overrides.get(name, {})})
        except ValidationError as exc:
            if name in overrides:
                raise SpecError("\n".join(format_validation_error(exc, cls.Config, prefix=f"target.backend.{name}"))) from None
            raise PluginError(f"target {target.name!r} gives pass {name!r} an invalid config: {exc}") from exc
        steps.append(Step(id=_unique(name, used_ids), pass_=cls(config), source=f"target {target.name}", flow=True))
    return steps


def planned_values(spec: Spec) -> dict[str, Any]:
    """What the planner fills into the config keys a pass lists in ``Pass.planned``
    (``distillc.pass_api.PLANNED_KEYS``): all a pass learns about the spec beyond its own keys."""
    inputs = "random" if spec.student.onnx is not None and "data" not in spec.file.model_fields_set else "data"
    return {"model_name": spec.name, "inputs": inputs, "dataset": spec.data.source if inputs == "data" else "random"}


def _with_planned_keys(pass_: Pass, spec: Spec) -> Pass:
    """``pass_`` with the ``planned`` keys the spec does not set filled in; a key it sets is kept."""
    cls = type(pass_)
    unset = {key: value for key, value in planned_values(spec).items()
             if key in cls.planned and key not in pass_.config.model_fields_set}
    return cls(pass_.config.model_copy(update=unset)) if unset else pass_


def _flow_type(steps: list[Step]) -> Any:
    """The artifact type the flow steps so far end with (before linking: static types)."""
    made = None
    for step in steps:
        if step.flow:
            made = type(step.pass_).output_type(made)
    return made


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}#{n}"
    used.add(candidate)
    return candidate


def _teacher_step(spec: Spec, plugins: Plugins, name: str) -> Step:
    teacher = spec.teacher(name)
    contract = spec.teacher_inputs[name]
    plain = is_plain_input(contract, spec.data)
    common = {"arch": teacher.arch, "options": spec.teacher_options.get(name, {}),
              "image_size": contract["input_size"], "channels": contract["channels"],
              "input": None if plain else contract, **_tokenizer_fields(spec, teacher)}
    if teacher.train is not None:
        cls = plugins.passes.get("teacher.train")
        training = teacher.train.model_dump(mode="json", exclude={"data"})
        own = teacher.train.data
        if own is not None:  # the teacher's own data: its fingerprint joins the key, its path does not
            source = plugins.datasets.get(own.source)
            kwargs = spec.data_kwargs(source, own)
            training.update(data=own.model_dump(mode="json", exclude={"path"}),
                            data_path=str(kwargs["path"]) if kwargs["path"] is not None else None,
                            data_fingerprint=f"{own.source}:{source.fingerprint(**kwargs)}")
        config = cls.Config(**common, **training)
    else:
        cls = plugins.passes.get("teacher.load")
        path = spec.resolve(teacher.checkpoint)
        config = cls.Config(**common, checkpoint=str(path), sha256=file_sha256(path))
    return Step(id=f"teacher:{name}", pass_=cls(config), source=f"teachers.{name}", flow=False)


def _tokenizer_fields(spec: Spec, teacher: Any) -> dict[str, Any]:
    """A teacher's tokenizer file for its source pass: the path (not in the key) and its sha256."""
    if teacher.tokenizer is None:
        return {}
    path = spec.resolve(teacher.tokenizer)
    return {"tokenizer": str(path), "tokenizer_sha256": file_sha256(path)}


def _student_step(spec: Spec, plugins: Plugins) -> Step:
    student = spec.student
    if student.onnx is not None:
        cls = plugins.passes.get("student.onnx")
        path = spec.resolve(student.onnx)
        # Given [data], its images are the model's example and verification inputs: they must fit it.
        images = [spec.data.channels, spec.data.image_size, spec.data.image_size]
        config = cls.Config(path=str(path), sha256=file_sha256(path),
                            data_shape=images if "data" in spec.file.model_fields_set else None)
    else:
        cls = plugins.passes.get("student.init")
        checkpoint = spec.resolve(student.checkpoint)
        config = cls.Config(arch=student.arch, options=spec.student_options, image_size=spec.data.image_size,
                            channels=spec.data.channels,
                            checkpoint=str(checkpoint) if checkpoint else None,
                            checkpoint_sha256=file_sha256(checkpoint) if checkpoint else None)
    return Step(id="student", pass_=cls(config), source="student", flow=True)


def _link_and_check(steps: list[Step], spec: Spec) -> None:
    """Connect each flow step to the previous one and check the artifact types agree."""
    teacher_ids = {t.name: f"teacher:{t.name}" for t in spec.teachers}
    previous: Step | None = None
    flow_passes: list[Pass] = []
    for step in steps:
        if step.flow:
            step.pass_.link(list(flow_passes), step.source)
            flow_passes.append(step.pass_)
        step.teacher_ids = {name: teacher_ids[name] for name in step.pass_.teachers()}
        cls = type(step.pass_)
        if not step.flow:
            step.makes = cls.makes
            continue
        made = previous.makes if previous else None
        if previous is not None and not cls.accepts(made):
            raise SpecError(
                f"{step.source}: pass {step.id!r} takes {cls.takes_names()}, but the pass before it, "
                f"{previous.id!r} ({previous.source}), makes {made.kind}")
        step.input_id = previous.id if previous else None
        step.makes = cls.output_type(made)
        previous = step


def _data_fingerprint_once(spec: Spec, plugins: Plugins) -> Any:
    return functools.cache(lambda: spec.data_fingerprint(plugins))


def _key_payload(step: Step, keys: dict[str, str], data_fp: Any, spec: Spec) -> dict[str, Any]:
    cls = type(step.pass_)
    versions = {"distillc": __version__}
    for tool in cls.tools:
        versions[tool] = dist_version(tool)
    return {
        "pass": cls.name,
        "version": cls.version,
        "config": step.pass_.config.model_dump(mode="json"),
        **({"linked": linked} if (linked := step.pass_.linked_key()) else {}),
        "input": keys.get(step.input_id) if step.input_id else None,
        "teachers": {n: keys[tid] for n, tid in sorted(step.teacher_ids.items())},
        "data": data_fp() if cls.uses_data else None,
        "seed": spec.distillc.seed,
        "versions": versions,
    }
