"""File locks that let several compiles share one cache and one work directory.

Two uses (docs/architecture.md, "Several compiles at once"):

- **Held locks** (:func:`held`): a compile holds ``<cache>/locks/<key>.lock`` while it runs the
  step ``key``, so a second compile that needs the same step waits, then finds the first one's
  entry; and ``<workdir>/.publish.lock`` while it replaces the work directory's outputs.
- **Owned folders** (:func:`owned_folder`): a temporary folder ``<parent>/<name>`` whose writer
  holds ``<parent>/<name>.lock`` for as long as it uses the folder.  The kernel drops a lock when
  its process dies, however it dies, so a folder whose lock can be taken belongs to no live
  writer: :func:`remove_abandoned` deletes those, and only those.

The locks are ``flock`` locks (the ``filelock`` package), which also hold between machines on
NFS.  Lock files of held locks are left in place: deleting one while another process waits on it
would split the waiters.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

#: A folder without a lock file was not made by :func:`owned_folder` (an older distillc, or
#: something else): it is removed only once it is this old.
UNLOCKED_AGE_S = 6 * 3600.0
#: A lock file without its folder is removed once it is this old: a new writer takes its lock a
#: moment before it makes the folder.
LOCK_ONLY_AGE_S = 60.0
LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def held(lock_path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock ``lock_path``; when another process holds it, call ``on_wait()`` once, then wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str, *, keep_on_error: bool = False) -> Iterator[Path]:
    """A new, empty folder ``<parent>/<prefix>-<random>``, locked while the context runs.

    The folder is removed when the context ends (if it is still there: its writer may have
    renamed it into place).  With ``keep_on_error``, an exception leaves it for inspection, with
    its lock released: the next :func:`remove_abandoned` of ``parent`` deletes it.
    """
    parent.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{secrets.token_hex(6)}"
    folder, lock_path = parent / name, parent / f"{name}{LOCK_SUFFIX}"
    lock = FileLock(lock_path)
    lock.acquire()  # before the folder exists: an existing folder is locked while its writer lives
    keep = False
    try:
        folder.mkdir()
        yield folder
    except BaseException:
        keep = keep_on_error
        raise
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        lock.release()
        if not keep:
            with contextlib.suppress(OSError):
                lock_path.unlink()


def remove_abandoned(parent: Path) -> None:
    """Delete the owned folders under ``parent`` whose writer is gone (see the module docstring)."""
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    now = time.time()
    for name in names:
        path = parent / name
        if name.endswith(LOCK_SUFFIX):
            if not (parent / name[: -len(LOCK_SUFFIX)]).exists() and _age(path, now) > LOCK_ONLY_AGE_S:
                _remove_if_unlocked(path, None)
        elif (parent / f"{name}{LOCK_SUFFIX}").exists():
            _remove_if_unlocked(parent / f"{name}{LOCK_SUFFIX}", path)
        elif path.is_dir() and _age(path, now) > UNLOCKED_AGE_S:
            shutil.rmtree(path, ignore_errors=True)


def _remove_if_unlocked(lock_path: Path, folder: Path | None) -> None:
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return  # a live writer
    except OSError:
        return  # not ours to take (another account's, a read-only folder): leave it
    try:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release()
    with contextlib.suppress(OSError):
        lock_path.unlink()


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0
