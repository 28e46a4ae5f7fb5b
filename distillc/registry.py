"""Registries: the one place where names of passes, targets, teachers, students and datasets live.

A registry is handed to the ``distillc_register_*`` hooks (tox-style), so duplicate checks,
checks of what is registered and "unknown name" messages are written once, here.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from pydantic import ValidationError

from distillc.artifacts import Artifact
from distillc.data_api import DatasetSource
from distillc.errors import PluginError, SpecError
from distillc.pass_api import Pass
from distillc.target_api import Target

#: A check of one registered object: None when it is fine, else what is wrong with it.
Validator = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Entry:
    """One registered object and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str


class Registry:
    """Name -> object map for one kind of thing (``"pass"``, ``"target"``, ...).

    ``validator`` (one of the ``check_*`` functions below, or None) refuses objects of the wrong
    sort when they are added, so a plugin's mistake is reported by the plugin's name at startup
    rather than as a crash in the middle of a compile.
    """

    def __init__(self, kind: str, validator: Validator | None = None):
        self.kind = kind
        self._validator = validator
        self._entries: dict[str, Entry] = {}

    def add(self, name_or_obj: Any, obj: Any = None, *, plugin: str = "<unknown>") -> None:
        """Register ``obj`` under ``name``; ``add(cls)`` uses ``cls.name`` (passes, targets)."""
        if obj is None:
            obj = name_or_obj
            name = getattr(obj, "name", None)
        else:
            name = name_or_obj
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} without a name: {obj!r}")
        problem = self._validator(obj) if self._validator is not None else None
        if problem is not None:
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r}, which is invalid: {problem}")
        if name in self._entries:
            first = self._entries[name].plugin
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind} {name!r}, which plugin {first!r} "
                "already registered"
            )
        self._entries[name] = Entry(name, obj, plugin)

    def scoped(self, plugin: str) -> "ScopedRegistry":
        """A view whose ``add`` records ``plugin`` as the origin; handed to one hook impl."""
        return ScopedRegistry(self, plugin)

    def get(self, name: str, *, path: str | None = None) -> Any:
        """The object registered as ``name``; an unknown name is a SpecError listing the choices."""
        return self.entry(name, path=path).obj

    def entry(self, name: str, *, path: str | None = None) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise SpecError(self.unknown_message(name), path) from None

    def unknown_message(self, name: Any, among: Iterable[str] | None = None) -> str:
        """"unknown <kind> 'x' (did you mean ...); valid: ..."; ``among`` narrows the choices shown."""
        valid = sorted(self._entries if among is None else among)
        hint = difflib.get_close_matches(str(name), valid, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown {self.kind} {name!r}{did_you_mean}; valid: {', '.join(valid) or 'none registered'}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


class ScopedRegistry:
    """What a registration hook receives: ``add`` only, with the plugin's name filled in."""

    def __init__(self, registry: Registry, plugin: str):
        self._registry = registry
        self.plugin = plugin
        self.kind = registry.kind

    def add(self, name_or_obj: Any, obj: Any = None) -> None:
        self._registry.add(name_or_obj, obj, plugin=self.plugin)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


# -- what each kind of registry accepts (wired up in distillc.plugin_manager) -------------------


def check_pass(obj: Any) -> str | None:
    """A pass is a concrete subclass of :class:`distillc.pass_api.Pass` with a name and a ``makes``."""
    if not (isinstance(obj, type) and issubclass(obj, Pass)):
        return f"expected a subclass of distillc.pass_api.Pass, got {obj!r}"
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        return f"pass class {obj.__qualname__} has no 'name'"
    makes = getattr(obj, "makes", None)
    if not (isinstance(makes, type) and issubclass(makes, Artifact)):
        return f"pass class {obj.__qualname__} has no 'makes' (the Artifact type it produces)"
    if inspect.isabstract(obj):
        return f"pass class {obj.__qualname__} does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    return None


def check_target(obj: Any) -> str | None:
    """A target is a concrete subclass of :class:`distillc.target_api.Target` whose ``Config()``
    needs no arguments (a spec's ``[target]`` may give nothing but ``use``)."""
    if not (isinstance(obj, type) and issubclass(obj, Target)):
        return f"expected a subclass of distillc.target_api.Target, got {obj!r}"
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        return f"target class {obj.__qualname__} has no 'name'"
    if inspect.isabstract(obj):
        return f"target class {obj.__qualname__} does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    try:
        obj.Config()
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'Config'}: {e['msg']}" for e in exc.errors())
        return f"{obj.__qualname__}.Config() cannot be built without arguments ({fields}); give every key a default"
    except Exception as exc:
        return f"{obj.__qualname__}.Config() cannot be built without arguments ({type(exc).__name__}: {exc})"
    return None


def check_builder(obj: Any) -> str | None:
    """A teacher or student architecture is a callable builder."""
    return None if callable(obj) else f"expected a callable builder, got {obj!r}"


def check_dataset(obj: Any) -> str | None:
    """A dataset source is a :class:`distillc.data_api.DatasetSource`."""
    return None if isinstance(obj, DatasetSource) else f"expected a distillc.data_api.DatasetSource, got {obj!r}"
