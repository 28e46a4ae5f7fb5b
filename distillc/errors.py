"""The one error hierarchy of distillc.

Every error a user can cause is a :class:`DistillcError`; the CLI prints it as one line
and exits with status 2.  Anything else that escapes is a bug (exit status 1).
"""

from __future__ import annotations

import errno
import reprlib

#: The longest a value is echoed in an error line; longer ones are shortened with an ellipsis.
VALUE_CHARS = 80

class DistillcError(Exception):
    """Base of every error a user can act on."""


def shorten(text: str, limit: int = VALUE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters: the middle of a longer one becomes "...".

    For echoing values and third-party messages in error lines: a 1 MB string, or a library's
    multi-line advice, must not become the whole error.
    """
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    return f"{text[:head]}...{text[len(text) - (limit - 3 - head):]}"


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, VALUE_CHARS, VALUE_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def shown(value: object, limit: int = VALUE_CHARS) -> str:
    """``repr(value)`` for an error line: nesting, length and collections cut short (never recursing deep)."""
    return shorten(_repr.repr(value), limit)


class SpecError(DistillcError):
    """The spec is malformed, names something unknown, or points at a missing file.

    ``path`` is the key path in the spec (``passes[2].dims``) when one applies.
    """

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class PluginError(DistillcError):
    """A plugin failed to load or registered something invalid (duplicate name, bad object)."""


class PassError(DistillcError):
    """A pass failed on its input; names the pass."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass {pass_name!r}: {message}")


class QualityGateError(PassError):
    """A pass's quality gate refused the model (constant embeddings, a top-1 at chance, below
    ``min_top1``, or more than ``max_drop`` below FP32); names the pass and the ``metric``."""

    def __init__(self, pass_name: str, metric: str, message: str):
        self.metric = metric
        super().__init__(pass_name, message)


class WorkspaceError(DistillcError):
    """The cache, the work directory or an output file cannot be used: read-only, full, or a file
    where a folder belongs.  Names the path and what to do."""


#: errno values that say the disk or a path is unusable, not that distillc has a bug.
_WORKSPACE_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
                     errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                     errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file stands where a folder belongs",
                     errno.EEXIST: "a file is in the way", errno.ENAMETOOLONG: "the path is too long",
                     errno.EIO: "input/output error"}


def workspace_error(exc: BaseException) -> WorkspaceError | None:
    """The user error an OS error about a path stands for (``None``: a bug, not the environment).

    A full disk, a read-only or forbidden folder, a file where a folder belongs: the user fixes
    these by freeing space or pointing ``DISTILLC_CACHE`` / ``--workdir`` elsewhere.
    """
    if not isinstance(exc, OSError) or exc.errno not in _WORKSPACE_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space, or point DISTILLC_CACHE / --workdir at a disk with room"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "move that file away, or point DISTILLC_CACHE / --workdir somewhere else"
    else:
        fix = "check the path and its permissions, or point DISTILLC_CACHE / --workdir somewhere else"
    return WorkspaceError(f"{shorten(str(where), 200)}: {_WORKSPACE_ERRNOS[exc.errno]} ({exc.strerror}); {fix}")


class TargetError(DistillcError):
    """The model breaks a target's limits; lists every violation, not only the first."""

    def __init__(self, target: str, violations: list[str]):
        self.target = target
        self.violations = list(violations)
        body = "; ".join(self.violations)
        super().__init__(f"target {target!r}: {len(self.violations)} violation(s): {body}")
