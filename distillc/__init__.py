"""distillc: distil frozen vision teachers into tiny students and compile them to MCU C bundles.

The package root stays import-light (no torch, no TVM) so the CLI starts fast.  Plugin authors
need only :data:`hookimpl`; see ``distillc.hookspecs`` for the hooks.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "distillc"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["__version__", "hookimpl", "hookspec", "PROJECT_NAME"]
