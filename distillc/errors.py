"""The one error hierarchy of distillc.

Every error a user can cause is a :class:`DistillcError`; the CLI prints it as one line
and exits with status 2.  Anything else that escapes is a bug (exit status 1).
"""

from __future__ import annotations


class DistillcError(Exception):
    """Base of every error a user can act on."""


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


class TargetError(DistillcError):
    """The model breaks a target's limits; lists every violation, not only the first."""

    def __init__(self, target: str, violations: list[str]):
        self.target = target
        self.violations = list(violations)
        body = "; ".join(self.violations)
        super().__init__(f"target {target!r}: {len(self.violations)} violation(s): {body}")
