"""The content-addressed artifact store.

An entry's key is the full sha256 of canonical JSON of everything that determines the output:
pass name and version, its validated config, its input artifacts' keys, and the versions of
distillc and the tools it uses (see :func:`cache_key`).  An entry is a directory
``<root>/<key[:2]>/<key>/`` holding the artifact's files and ``run.json`` (provenance, metrics,
timing).  Entries are written into a temporary directory and renamed into place, so a killed
run never leaves half an entry; resumable training keeps its checkpoints under
``<root>/partial/<key>/`` until the entry is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from distillc.artifacts import Artifact, artifact_class_path, import_artifact_class

RUN_FILE = "run.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_key(payload: dict[str, Any]) -> str:
    """Full sha256 hex digest of the payload's canonical JSON."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


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
        tmp_root.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key[:16]}-", dir=tmp_root))
        try:
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
                old = final.with_name(f"{key}.old-{os.getpid()}")
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(key):  # not a concurrent writer of the same entry: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.partial(key), ignore_errors=True)

    def partial(self, key: str) -> Path:
        """Where an unfinished run of ``key`` keeps resumable checkpoints."""
        return self.root / "partial" / key
