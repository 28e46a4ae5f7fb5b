"""The cache fingerprint of a data-loader call, kept free of torch so planning stays fast."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillc.errors import SpecError, shown

# Bump when a loader's output changes for the same inputs, so cached artifacts are rebuilt.
LOADER_VERSION = 1


def fingerprint(source: str, *, image_size: int, val_fraction: float, seed: int,
                path: Path | None = None, channels: int = 3, options: dict | None = None) -> str:
    """A stable sha256 (hex) of a loader call: its config plus a listing of its files.

    For file sources the listing holds each file's path relative to ``path``, size and
    modification time in ns. It costs one ``stat`` per file and reads no contents: cheap, but
    a file rewritten with the same size and mtime goes unnoticed. Moving the whole dataset
    folder elsewhere keeps the fingerprint.  ``options`` (a source's validated ``[data] options``)
    enter the record only when given, so sources without options keep their fingerprints.
    """
    files: list[tuple[str, int, int]] = []
    if path is not None:
        path = Path(path)
        try:
            if path.is_file():
                stat = path.stat()
                files.append((path.name, stat.st_size, stat.st_mtime_ns))
            elif path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    stat = file.stat()
                    files.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
            else:
                raise SpecError(f"data path {shown(str(path))} does not exist", "data.path")
        except OSError as exc:  # a file that vanished or cannot be read while listing
            raise SpecError(f"cannot list {shown(str(exc.filename or path))}: {exc.strerror or exc}",
                            "data.path") from None
    record = {
        "loader_version": LOADER_VERSION,
        "source": source,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "channels": channels,
        "files": files,
    }
    if options is not None:
        record["options"] = options
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
