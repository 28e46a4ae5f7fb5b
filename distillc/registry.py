"""Registries: the one place where names of passes, targets, teachers, students and datasets live.

A registry is handed to the ``distillc_register_*`` hooks (tox-style), so duplicate checks and
"unknown name" messages are written once, here.  What each kind of registry accepts is checked by
a validator that lives beside the API it checks (``distillc.pass_api.check_pass``,
``distillc.target_api.check_target``, ``distillc.data_api.check_dataset``, and
:func:`check_builder` below for architectures), so this module imports none of those APIs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pluggy

from distillc.errors import PluginError, SpecError, shown

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
        hint = difflib.get_close_matches(str(name), valid, n=1) if len(str(name)) <= 200 else []
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown {self.kind} {shown(name)}{did_you_mean}; valid: {', '.join(valid) or 'none registered'}"

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


def check_builder(obj: Any) -> str | None:
    """A teacher or student architecture is a callable builder."""
    return None if callable(obj) else f"expected a callable builder, got {obj!r}"


@dataclass
class Plugins:
    """A plugin manager plus the registries its plugins filled (made by
    :func:`distillc.plugin_manager.load_plugins`, one per compile)."""

    pm: pluggy.PluginManager
    passes: Registry
    targets: Registry
    teachers: Registry
    students: Registry
    datasets: Registry
    #: plugin name -> "distribution version" (or "built-in") for listings.
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def origin(self, plugin: str) -> str:
        return self.origins.get(plugin, plugin)
