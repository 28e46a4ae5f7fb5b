"""Running: a plan's steps answered from the cache or run, stored, published, reported.

:func:`run_plan` walks a :class:`~distillc.plan.Plan` (see :mod:`distillc.plan`), holding a
per-step lock so concurrent compiles share work, and writes ``report.json``, ``model.onnx`` and
``bundle/`` into the work directory atomically; :func:`compile_spec` is spec file -> plugins ->
plan -> run, what ``distillc compile`` calls.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillc import __version__, distributed
from distillc.artifacts import Artifact, Bundle, OnnxModel
from distillc.bundle_report import write_report
from distillc.cache import ForcedRun, write_atomic
from distillc.errors import DistillcError
from distillc.locks import held, owned_folder, remove_abandoned
from distillc.pass_api import PassContext, PassResult
from distillc.plan import CACHE_ENV, Plan, Step, build_plan
from distillc.registry import Plugins
from distillc.progress import ProgressReporter, SilentProgress
from distillc.workspace import check_folder


class InternalPassError(Exception):
    """A pass raised something other than a DistillcError: a bug, reported with the pass's id."""

    def __init__(self, step_id: str, exc: BaseException):
        self.step_id = step_id
        super().__init__(f"pass {step_id!r} crashed: {type(exc).__name__}: {exc}")


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

    The published bundle's manifest also gets the spec's hash, every pass's metrics and the step
    ids in plan order (the cached bundle cannot hold them: a spec change that re-runs no backend
    pass may change them), and the bundle gets ``report.html``, drawn from that manifest
    (:mod:`distillc.bundle_report`).
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
            manifest.update(spec_sha256=plan.spec.digest(), metrics=metrics,
                            steps=[step.id for step in plan.steps[: stop_at + 1]])
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            # Read back from the file, so report.html shows exactly what the manifest holds.
            write_report(staging / "bundle", json.loads(manifest_path.read_text()))
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
