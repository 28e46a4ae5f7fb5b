"""The folders a compile writes to (the cache and the work directory), checked before any step runs.

A read-only location, a file where a folder belongs or a full disk is the user's environment,
not a bug: it becomes one :class:`~distillc.errors.WorkspaceError` line naming the folder and the
option that moves it, instead of an internal error halfway through a compile.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from distillc.errors import WorkspaceError, shorten


def check_folder(path: Path, what: str, option: str, *, create: bool) -> None:
    """Make sure ``path`` can be the folder of ``what`` (``"cache"``), which ``option`` moves.

    Without ``create`` (planning, which writes nothing) only refuse a file where the folder or
    one of its parents belongs; with it, also make the folder and write a probe file in it.
    """
    path = Path(path)
    shown = shorten(str(path), 200)
    elsewhere = f"or give {option} another folder"
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"is inside {shorten(str(folder), 120)}, which is a file"
                raise WorkspaceError(f"{what} {shown} {where}, not a folder; remove it, {elsewhere}")
            break
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".distillc-write-check-", dir=path)
        try:
            os.write(handle, b"distillc")
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as exc:
        fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise WorkspaceError(f"{what} {shown} cannot be written ({exc.strerror or exc}); {fix}, {elsewhere}") from None
