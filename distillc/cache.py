"""The content-addressed artifact store.

An entry's key is the full sha256 of canonical JSON of everything that determines the output:
pass name and version, its validated config, its input artifacts' keys, and the versions of
distillc and the tools it uses (see :func:`cache_key`).  An entry is a directory
``<root>/<key[:2]>/<key>/`` holding the artifact's files and ``run.json`` (provenance, metrics,
timing).  Entries are written into a temporary directory and renamed into place, so a killed
run never leaves half an entry; resumable training keeps its checkpoints under
``<root>/partial/<key>/`` until the entry is complete.  A compile holds ``<root>/locks/<key>.lock``
while it runs a step, so compiles sharing the store wait for each other instead of writing the
same entry and checkpoint at once; what a killed writer left in ``<root>/tmp/`` is deleted by
the next save (see :mod:`distillc.locks`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

from distillc.artifacts import Artifact, artifact_class_path, import_artifact_class
from distillc.errors import SpecError, shown
from distillc.locks import held, owned_folder, remove_abandoned

RUN_FILE = "run.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_key(payload: dict[str, Any]) -> str:
    """Full sha256 hex digest of the payload's canonical JSON."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@functools.cache
def dist_version(name: str) -> str:
    """The installed version of a distribution (``"not-installed"`` if absent), as keys record it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (files a spec names enter keys by content, not by path); a file
    that cannot be read is a SpecError naming it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise SpecError(f"cannot read {shown(str(path))}: {getattr(exc, 'strerror', None) or exc}") from None
    return digest.hexdigest()


class ArtifactStore:
    """Artifacts by key, with their ``run.json`` records."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.entry(key) / RUN_FILE).is_file()

    def record(self, key: str) -> dict[str, Any]:
        return json.loads((self.entry(key) / RUN_FILE).read_text())

    def load(self, key: str) -> Artifact:
        """The artifact stored under ``key`` (following pass-through entries)."""
        record = self.record(key)
        same_as = record["artifact"].get("same_as")
        if same_as:
            return self.load(same_as)
        cls = import_artifact_class(record["artifact"]["class"])
        return cls.load(self.entry(key))

    def save(self, key: str, artifact: Artifact, record: dict[str, Any], *, same_as: str | None = None,
             replace: bool = False) -> None:
        """Store ``artifact`` atomically; ``same_as`` stores only a pointer to an existing entry.

        ``replace`` (a forced re-run) swaps out an existing entry; otherwise an existing entry
        wins, since equal keys mean equal content.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp_root = self.root / "tmp"
        remove_abandoned(tmp_root)  # what writers killed in the middle of a save left behind
        with owned_folder(tmp_root, key[:16]) as work:
            tmp = work / "entry"
            tmp.mkdir()
            if same_as:
                info = {"kind": artifact.kind, "same_as": same_as}
            else:
                artifact.save(tmp)
                info = {"kind": artifact.kind, "class": artifact_class_path(type(artifact))}
            full = {**record, "key": key, "artifact": info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / RUN_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
            final = self.entry(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if replace and final.exists():
                # Moved into the owned folder, which is deleted with it (or, after a kill, by
                # the next save's remove_abandoned).
                os.rename(final, work / "replaced")
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(key):  # not a concurrent writer of the same entry: a real failure
                    raise
        shutil.rmtree(self.partial(key), ignore_errors=True)

    def lock(self, key: str, *, on_wait: Callable[[], None] | None = None) -> ContextManager[None]:
        """Held while a compile runs the step ``key`` (``<root>/locks/<key>.lock``).

        A second compile that needs the same step calls ``on_wait()`` once and waits; the first
        one's entry (or, if it failed, its partial checkpoint) is there when the lock is its.
        """
        return held(self.root / "locks" / f"{key}.lock", on_wait=on_wait)

    def partial(self, key: str) -> Path:
        """Where an unfinished run of ``key`` keeps resumable checkpoints."""
        return self.root / "partial" / key


class ForcedRun:
    """What an unfinished ``--force`` run has done, so that the same command resumes it.

    Kept in ``<root>/partial/forced-<key>.json`` (``key``: the step ``--force`` named):
    ``started``, the steps whose training this run began afresh (their partial checkpoints are
    its own, so a resumed run continues them), and ``done``, the steps it ran and stored again
    (a resumed run does not run them again).  The run removes the record when it gets to its
    end; the next ``--force`` of that step starts over.
    """

    def __init__(self, store: ArtifactStore, key: str):
        self.store = store
        self.path = store.root / "partial" / f"forced-{key}.json"
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        self.started = {k for k in saved.get("started", []) if isinstance(k, str)}
        self.done = {k for k in saved.get("done", []) if isinstance(k, str)}

    def begin(self, key: str) -> None:
        """Before the step ``key`` runs: delete its partial checkpoint unless this run began it."""
        if key not in self.started:
            shutil.rmtree(self.store.partial(key), ignore_errors=True)
            self.started.add(key)
            self._write()

    def finish(self, key: str) -> None:
        """The step ``key`` is stored: a resumed run does not run it again."""
        self.done.add(key)
        self._write()

    def close(self) -> None:
        """The forced run got to its end."""
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        write_atomic(self.path, json.dumps({"started": sorted(self.started), "done": sorted(self.done)}) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of a unique name and a rename:
    readers see the old file or the new one, never a part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
