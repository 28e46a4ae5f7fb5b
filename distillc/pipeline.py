"""Plans and runs: spec -> typed list of steps -> artifacts in the cache -> report.json.

A :class:`Plan` is the resolved list of steps: one per teacher (trained or loaded), the student
source, the spec's ``[[passes]]``, then the target's backend passes.  Teacher steps are side
inputs; the rest form the main flow, each step taking the artifact the previous one made.
Types are checked and cache keys computed when the plan is built, before anything runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distillc import __version__, distributed
from distillc.artifacts import Artifact, Bundle, OnnxModel
from distillc.cache import ArtifactStore, ForcedRun, cache_key, dist_version, file_sha256, write_atomic
from distillc.errors import DistillcError, PluginError, SpecError
from distillc.locks import held, owned_folder, remove_abandoned
from distillc.pass_api import Pass, PassContext, PassResult
from distillc.registry import Plugins
from distillc.progress import ProgressReporter, SilentProgress
from distillc.spec import Spec
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


class InternalPassError(Exception):
    """A pass raised something other than a DistillcError: a bug, reported with the pass's id."""

    def __init__(self, step_id: str, exc: BaseException):
        self.step_id = step_id
        super().__init__(f"pass {step_id!r} crashed: {type(exc).__name__}: {exc}")


# -- planning ---------------------------------------------------------------------------------


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
    common = {"arch": teacher.arch, "options": spec.teacher_options.get(name, {}),
              "image_size": spec.data.image_size, "channels": spec.data.channels}
    if teacher.train is not None:
        cls = plugins.passes.get("teacher.train")
        config = cls.Config(**common, **teacher.train.model_dump())
    else:
        cls = plugins.passes.get("teacher.load")
        path = spec.resolve(teacher.checkpoint)
        config = cls.Config(**common, checkpoint=str(path), sha256=file_sha256(path))
    return Step(id=f"teacher:{name}", pass_=cls(config), source=f"teachers.{name}", flow=False)


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


# -- running ----------------------------------------------------------------------------------


@dataclass
class CompileResult:
    """What a compile produced: the report (also written to report.json) and the final artifact."""

    plan: Plan
    report: dict[str, Any]
    ran: list[str]
    artifact: Artifact | None
    outputs: dict[str, str]

    @property
    def final_path(self) -> Path:
        if "bundle" in self.outputs:
            return Path(self.outputs["bundle"])
        return self.plan.workdir


def run_plan(plan: Plan, plugins: Plugins, *, progress: ProgressReporter | None = None,
             force: str | None = None, until: str | None = None) -> CompileResult:
    """Run every step that is not cached (or forced); stop after ``until`` if given.

    Under torchrun every rank calls this with the same plan (docs/distributed.md): the steps of
    a ``distributed`` pass run on every rank together, every other step on rank 0 alone.  Rank 0
    alone stores artifacts, publishes outputs, writes report.json and shows progress; the other
    ranks read what it stored and return after the last step they share.
    """
    distributed.init()
    main, processes = distributed.is_main(), distributed.world_size()
    progress = (progress or SilentProgress()) if main else SilentProgress()
    spec, store = plan.spec, plan.store
    forced_from = plan.index(plan.step(force, option="--force").id) if force else None
    stop_at = plan.index(plan.step(until, option="--until").id) if until else len(plan.steps) - 1
    check_folder(store.root, "the cache", CACHE_ENV, create=True)
    check_folder(plan.workdir, "the work directory", "--workdir", create=True)
    # A --force run that was interrupted resumes: the steps it already ran again are not forced.
    forcing = ForcedRun(store, plan.steps[forced_from].key) if forced_from is not None else None
    forced_ids = {s.id for s in plan.steps[forced_from:] if s.key not in forcing.done} if forcing else set()
    if processes > 1:
        _agree_on_plan(plan)
    shared_until = _last_shared_step(plan, stop_at, forced_ids) if processes > 1 else -1
    load_data = functools.cache(lambda: spec.load_data(plugins))
    artifacts: dict[str, Artifact] = {}

    def artifact_of(step_id: str) -> Artifact:
        if step_id not in artifacts:
            key = plan.step(step_id, option="plan").key
            if not main and not store.has(key):
                raise DistillcError(f"rank {distributed.rank()} cannot find rank 0's artifact of {step_id!r} in "
                                    f"{store.root}: under torchrun the cache must be on storage every rank sees")
            artifacts[step_id] = store.load(key)
        return artifacts[step_id]

    started = time.perf_counter()
    ran: list[str] = []
    rows: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    for index, step in enumerate(plan.steps[: stop_at + 1]):
        if index > shared_until and not main:
            rows.append({**step.describe(), "status": "rank 0", "seconds": 0.0})
            continue
        forced = step.id in forced_ids
        cached = step.cached and not forced
        if main:
            plugins.hook.distillc_pass_started(step=step)
        t0 = time.perf_counter()
        result = None
        if not cached and (main or type(step.pass_).distributed):
            result = _run_step(step, plan, plugins, progress, artifact_of, load_data,
                               forcing if forced else None, reuse=index > shared_until)
            cached = result is None  # another compile stored the step while this one waited for it
        if cached:
            result_metrics = store.record(step.key).get("metrics", {}) if main else {}
        elif result is not None:
            artifacts[step.id] = result.artifact
            result_metrics = result.metrics
            ran.append(step.id)
        else:
            result_metrics = {}
        if not cached and index <= shared_until:
            # Rank 0 has stored the step; the others read that copy, exactly as a cached run would.
            distributed.barrier()
            if not main:
                artifacts.pop(step.id, None)
        seconds = time.perf_counter() - t0
        if main:
            plugins.hook.distillc_pass_finished(step=step, result=result, seconds=seconds,
                                                cached=cached)
        metrics[step.id] = result_metrics
        status = "cached" if cached else "ran" if result is not None else "rank 0"
        rows.append({**step.describe(), "status": status, "seconds": round(seconds, 3)})
    for step in plan.steps[stop_at + 1:]:
        rows.append({**step.describe(), "status": "not run (--until)", "seconds": 0.0})
    if forcing and main:
        forcing.close()

    final_step = plan.steps[stop_at]
    final = artifact_of(final_step.id) if final_step.flow and main else None
    # One compile at a time replaces a work directory's outputs and report.
    with held(plan.workdir / ".publish.lock") if main else contextlib.nullcontext():
        outputs = _publish_outputs(plan, plugins, artifact_of, stop_at, metrics) if main else {}
        report = {
            "distillc_version": __version__,
            "name": spec.name,
            "spec": str(spec.path),
            "spec_sha256": spec.digest(),
            "workdir": str(plan.workdir),
            "cache": str(store.root),
            "target": spec.file.target.use,
            "plan": rows,
            "metrics": metrics,
            "outputs": outputs,
            "world_size": processes,
            "total_seconds": round(time.perf_counter() - started, 3),
        }
        if main:
            write_atomic(plan.workdir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return CompileResult(plan=plan, report=report, ran=ran, artifact=final, outputs=outputs)


def _agree_on_plan(plan: Plan) -> None:
    """Make every rank follow rank 0's plan: the same steps and keys, and rank 0's view of the cache.

    A rank that starts late could otherwise find an entry rank 0 has just stored and skip a
    step the others wait in.
    """
    mine = [(s.id, s.key) for s in plan.steps]
    theirs, cached = distributed.broadcast((mine, [s.cached for s in plan.steps]))
    if theirs != mine:
        raise DistillcError(f"rank {distributed.rank()} planned other steps or cache keys than rank 0: every rank "
                            "needs the same spec, data and distillc/tool versions")
    for step, was_cached in zip(plan.steps, cached):
        step.cached = was_cached


def _last_shared_step(plan: Plan, stop_at: int, forced_ids: set[str]) -> int:
    """The index of the last step that every rank runs together (-1: none, rank 0 works alone)."""
    last = -1
    for index, step in enumerate(plan.steps[: stop_at + 1]):
        if type(step.pass_).distributed and (step.id in forced_ids or not step.cached):
            last = index
    return last


def _run_step(step: Step, plan: Plan, plugins: Plugins, progress: ProgressReporter, artifact_of: Any,
              load_data: Any, forcing: ForcedRun | None, *, reuse: bool) -> PassResult | None:
    """Run one step (``forcing``: as part of that --force run) and store its result.

    Rank 0 holds the step's lock (``ArtifactStore.lock``) from before its checkpoint is looked
    at until its entry is stored; with ``reuse``, a step that another compile stored meanwhile
    is not run again (None).  The scratch folder is this run's own, ``<workdir>/.scratch/
    <step>-<random>/``, since several compiles may share a work directory; a failed step's stays
    for inspection until the next step run there.
    """
    store, main = plan.store, distributed.is_main()

    def waiting() -> None:
        progress.log(f"waiting for another compile that is running {step.id} with this cache ({store.root})")

    with store.lock(step.key, on_wait=waiting) if main else contextlib.nullcontext():
        if main and reuse and forcing is None and store.has(step.key):
            return None
        if main and forcing is not None:
            forcing.begin(step.key)
        scratch_root = plan.workdir / ".scratch"
        remove_abandoned(scratch_root)
        name = step.id.replace(":", "-").replace("#", "-")
        with owned_folder(scratch_root, name, keep_on_error=True) as scratch:
            result = _run_pass(step, plan, plugins, progress, artifact_of, load_data, scratch,
                               replace=forcing is not None)
        if main and forcing is not None:
            forcing.finish(step.key)
        return result


def _run_pass(step: Step, plan: Plan, plugins: Plugins, progress: ProgressReporter, artifact_of: Any,
              load_data: Any, scratch: Path, *, replace: bool) -> PassResult:
    store = plan.store
    main = distributed.is_main()
    input_artifact = artifact_of(step.input_id) if step.input_id else None
    checkpoint_dir = store.partial(step.key)
    ctx = PassContext(seed=plan.spec.distillc.seed, plugins=plugins, progress=progress, scratch=scratch,
                      checkpoint_dir=checkpoint_dir, step_id=step.id,
                      load_data=load_data, teachers={n: artifact_of(t) for n, t in step.teacher_ids.items()},
                      teacher_keys={n: artifact_key(plan, t) for n, t in step.teacher_ids.items()},
                      derived_dir=store.root / "derived",
                      data_fingerprint=step.key_payload.get("data") or "")
    progress.log(f"running {step.id}")
    together = type(step.pass_).distributed
    t0 = time.perf_counter()
    try:
        with distributed.every_rank() if together else contextlib.nullcontext():
            result = plugins.hook.distillc_run_pass(step=step, artifact=input_artifact, context=ctx)
    except DistillcError:
        raise
    except Exception as exc:
        raise InternalPassError(step.id, exc) from exc
    seconds = time.perf_counter() - t0
    made = step.makes
    if not isinstance(result, PassResult) or type(result.artifact) is not made:
        raise InternalPassError(step.id, TypeError(f"expected a PassResult holding a {made.kind}, got {result!r}"))
    if not main:  # rank 0 stores the result; run_plan has this rank read that copy
        return result
    record = {**step.key_payload, "id": step.id, "metrics": result.metrics, "seconds": round(seconds, 3),
              "world_size": distributed.world_size() if together else 1}
    same_as = artifact_key(plan, step.input_id) if result.artifact is input_artifact else None
    store.save(step.key, result.artifact, record, same_as=same_as, replace=replace)
    # Later steps read the stored copy: what they see is exactly what a cached run would see.
    return PassResult(input_artifact if same_as else store.load(step.key), result.metrics)


def artifact_key(plan: Plan, step_id: str | None) -> str | None:
    return plan.step(step_id, option="plan").key if step_id else None


def _publish_outputs(plan: Plan, plugins: Plugins, artifact_of: Any, stop_at: int,
                     metrics: dict[str, Any]) -> dict[str, str]:
    """Put the last ONNX model and the bundle of the flow into the work directory.

    Both are copied into a folder of this run's own under ``.scratch/`` and renamed into place,
    after report.json is removed (run_plan writes the new one last, holding the work directory's
    lock throughout): a killed compile leaves each output whole, old or new, and a report.json
    only beside the outputs it names.  Outputs of an earlier, longer run would contradict this
    run's report, so they go too.

    The published bundle's manifest also gets the spec's hash and every pass's metrics (the
    cached bundle cannot hold them: a spec change that re-runs no backend pass may change them).
    """
    outputs: dict[str, str] = {}
    last: dict[str, Step] = {}
    for step in plan.steps[: stop_at + 1]:
        if step.flow and step.makes in (OnnxModel, Bundle):
            last[step.makes.kind] = step
    onnx_target, bundle_target = plan.workdir / "model.onnx", plan.workdir / "bundle"
    scratch_root = plan.workdir / ".scratch"
    remove_abandoned(scratch_root)
    manifest: dict[str, Any] = {}
    with owned_folder(scratch_root, "publish") as staging:
        if "OnnxModel" in last:
            shutil.copyfile(artifact_of(last["OnnxModel"].id).path, staging / "model.onnx")
        if "Bundle" in last:
            shutil.copytree(artifact_of(last["Bundle"].id).path, staging / "bundle")
            manifest_path = staging / "bundle" / "manifest.json"
            manifest = json.loads(manifest_path.read_text())
            manifest.update(spec_sha256=plan.spec.digest(), metrics=metrics)
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        (plan.workdir / "report.json").unlink(missing_ok=True)
        if "OnnxModel" in last:
            os.replace(staging / "model.onnx", onnx_target)
            outputs["onnx"] = str(onnx_target)
        else:
            onnx_target.unlink(missing_ok=True)
        if bundle_target.exists() or bundle_target.is_symlink():
            os.rename(bundle_target, staging / "replaced-bundle")  # deleted with the staging folder
        if "Bundle" in last:
            os.rename(staging / "bundle", bundle_target)
            outputs["bundle"] = str(bundle_target)
    if "Bundle" in last:
        plugins.hook.distillc_bundle_written(path=bundle_target, manifest=manifest)
    return outputs


def compile_spec(spec_path: Path | str, *, workdir: Path | None = None, force: str | None = None,
                 until: str | None = None, progress: ProgressReporter | None = None,
                 plugins: Plugins | None = None) -> CompileResult:
    """The library form of ``distillc compile``: load plugins and spec, plan, run."""
    from distillc.plugin_manager import load_plugins
    from distillc.spec import load_spec

    plugins = plugins or load_plugins()
    spec = load_spec(spec_path, plugins)
    plan = build_plan(spec, plugins, workdir=workdir)
    return run_plan(plan, plugins, progress=progress, force=force, until=until)
