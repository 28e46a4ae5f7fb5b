"""Building a plugin manager: built-ins first, then the ``distillc`` entry points.

A new :class:`Plugins` is made per compile (no global state built at import).  Built-in plugins
are listed in :data:`BUILTIN_PLUGINS` and registered by the very call that registers a third
party's, so nothing built in has a private back door.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from distillc import PROJECT_NAME, hookimpl, hookspecs
from distillc.errors import DistillcError, PluginError
from distillc.registry import Registry

ENTRY_POINT_GROUP = "distillc"
DISABLE_AUTOLOAD_ENV = "DISTILLC_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugin modules, registered in this order before any entry point.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "distillc.plugins.datasets",
    "distillc.plugins.teachers",
    "distillc.plugins.students",
    "distillc.passes.sources",
    "distillc.passes.distill_feature",
    "distillc.passes.eval_probe",
    "distillc.passes.quantize_brevitas",
    "distillc.passes.export_onnx",
    "distillc.passes.simplify_onnx",
    "distillc.targets.builtin",
)

#: registry attribute -> (the kind named in messages, the hook that fills it)
REGISTRY_HOOKS = {
    "passes": ("pass", "distillc_register_passes"),
    "targets": ("target", "distillc_register_targets"),
    "teachers": ("teacher architecture", "distillc_register_teachers"),
    "students": ("student architecture", "distillc_register_students"),
    "datasets": ("dataset source", "distillc_register_datasets"),
}


@dataclass
class Plugins:
    """A plugin manager plus the registries its plugins filled."""

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


class _CorePlugin:
    """distillc's own implementation of ``distillc_run_pass``: run the pass."""

    @hookimpl
    def distillc_run_pass(self, step: Any, artifact: Any, context: Any) -> Any:
        return step.pass_.run(artifact, context)


def load_plugins(extra: Iterable[Any] = (), *, autoload: bool | None = None) -> Plugins:
    """Make a plugin manager: built-ins, then entry points (unless disabled), then ``extra``.

    ``extra`` is for tests and embedding: plugin objects registered after the entry points.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    origins: dict[str, str] = {}
    pm.register(_CorePlugin(), name="distillc.core")
    origins["distillc.core"] = "built-in"
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        origins[module_name] = "built-in"

    if autoload is None:
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("1", "true", "yes")
    if autoload:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not look like our bug
                raise PluginError(
                    f"plugin {ep.name!r} (entry point {ep.value!r}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r}) is invalid: {exc}") from exc
            dist = ep.dist
            origins[ep.name] = f"{dist.name} {dist.version}" if dist is not None else ep.value
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        pm.register(plugin, name=name)
        origins[name] = "registered by caller"

    registries = {}
    for attr, (kind, hook_name) in REGISTRY_HOOKS.items():
        registries[attr] = Registry(kind)
        _call_registration_hook(pm, hook_name, registries[attr])
    return Plugins(pm=pm, origins=origins, **registries)


def _call_registration_hook(pm: pluggy.PluginManager, hook_name: str, registry: Registry) -> None:
    """Call each implementation on its own, so the registry knows which plugin added what."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            impl.function(registry=registry.scoped(impl.plugin_name))
        except DistillcError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc
