"""Building a plugin manager: built-ins first, then the ``distillc`` entry points.

A new :class:`Plugins` is made per compile (no global state built at import).  Built-in plugins
are listed in :data:`BUILTIN_PLUGINS` and registered by the very call that registers a third
party's, so nothing built in has a private back door.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from typing import Any, Iterable

import pluggy

from distillc import PROJECT_NAME, hookimpl, hookspecs
from distillc.errors import DistillcError, PluginError
from distillc.data_api import check_dataset
from distillc.pass_api import check_pass
from distillc.registry import Plugins, Registry, Validator, check_builder
from distillc.target_api import check_target

ENTRY_POINT_GROUP = "distillc"
DISABLE_AUTOLOAD_ENV = "DISTILLC_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugin modules, registered in this order before any entry point.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "distillc.plugins.datasets",
    "distillc.plugins.teachers",
    "distillc.plugins.students",
    "distillc.passes.sources",
    "distillc.passes.distill.feature",
    "distillc.passes.distill.cadssl",
    "distillc.passes.distill.bootleg",
    "distillc.passes.distill.supervised",
    "distillc.passes.eval.probe",
    "distillc.passes.distill.comad",
    "distillc.passes.distill.clip",
    "distillc.passes.distill.matryoshka",
    "distillc.passes.eval.zeroshot",
    "distillc.passes.detect.openvocab",
    "distillc.passes.eval.detection",
    "distillc.passes.quantize.brevitas_qat",
    "distillc.passes.max78000.check",
    "distillc.passes.max78000.izer",
    "distillc.passes.export.to_onnx",
    "distillc.passes.export.simplify",
    "distillc.passes.backend.tvm_int8",
    "distillc.passes.backend.codegen_c",
    "distillc.passes.verify.host_qemu",
    "distillc.targets.builtin",
)

#: registry attribute -> (the kind named in messages, the hook that fills it, what it accepts)
REGISTRY_HOOKS: dict[str, tuple[str, str, Validator]] = {
    "passes": ("pass", "distillc_register_passes", check_pass),
    "targets": ("target", "distillc_register_targets", check_target),
    "teachers": ("teacher architecture", "distillc_register_teachers", check_builder),
    "students": ("student architecture", "distillc_register_students", check_builder),
    "datasets": ("dataset source", "distillc_register_datasets", check_dataset),
}

#: Appended to every error caused by an installed (entry-point) plugin.
DISABLE_HINT = f"to run without installed plugins, set {DISABLE_AUTOLOAD_ENV}=1"


class _CorePlugin:
    """distillc's own implementation of ``distillc_run_pass``: run the pass."""

    @hookimpl
    def distillc_run_pass(self, step: Any, artifact: Any, context: Any) -> Any:
        return step.pass_.run(artifact, context)


def load_plugins(extra: Iterable[Any] = (), *, autoload: bool | None = None) -> Plugins:
    """Make a plugin manager: built-ins, then entry points (unless disabled), then ``extra``.

    ``extra`` is for tests and embedding: plugin objects registered after the entry points.
    Every plugin error is a :class:`PluginError` naming the plugin (and its entry point).
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    origins: dict[str, str] = {}
    #: plugin name -> " (entry point 'module:attr')" for messages about installed plugins
    entry_points: dict[str, str] = {}
    pm.register(_CorePlugin(), name="distillc.core")
    origins["distillc.core"] = "built-in"
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        origins[module_name] = "built-in"

    if autoload is None:
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("1", "true", "yes")
    if autoload:
        for ep in _distillc_entry_points(set(origins)):
            where = f" (entry point {ep.value!r})"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not look like our bug
                raise PluginError(f"plugin {ep.name!r}{where} failed to load: {type(exc).__name__}: {exc}; "
                                  f"{DISABLE_HINT}") from exc
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r}{where} is invalid: {exc}; {DISABLE_HINT}") from exc
            dist = ep.dist
            origins[ep.name] = f"{dist.name} {dist.version}" if dist is not None else ep.value
            entry_points[ep.name] = where
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        pm.register(plugin, name=name)
        origins[name] = "registered by caller"
    _check_hook_names(pm, entry_points)

    registries = {}
    for attr, (kind, hook_name, validator) in REGISTRY_HOOKS.items():
        registries[attr] = Registry(kind, validator)
        _call_registration_hook(pm, hook_name, registries[attr], entry_points)
    return Plugins(pm=pm, origins=origins, **registries)


def _distillc_entry_points(builtin_names: set[str]) -> list[importlib.metadata.EntryPoint]:
    """The group's entry points by name; a name given twice, or a built-in's name, is an error."""
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    by_name: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in found:
        if ep.name in builtin_names:
            raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r}{_from_dist(ep)}) has the name of a "
                              f"built-in plugin; its distribution must register it under another name; "
                              f"{DISABLE_HINT}")
        if ep.name in by_name:
            first = by_name[ep.name]
            raise PluginError(f"two plugins are named {ep.name!r}: entry points {first.value!r}{_from_dist(first)} "
                              f"and {ep.value!r}{_from_dist(ep)}; uninstall one of them; {DISABLE_HINT}")
        by_name[ep.name] = ep
    return list(by_name.values())


def _from_dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    return f" from {dist.name} {dist.version}" if dist is not None else ""


def _check_hook_names(pm: pluggy.PluginManager, entry_points: dict[str, str]) -> None:
    """A misspelt hook would otherwise be silently never called: refuse it, naming it."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        unknown = sorted(caller.name for caller in pm.get_hookcallers(exc.plugin) or [] if not caller.has_spec())
        known = [n for n in dir(hookspecs) if n.startswith("distillc_")]
        details = []
        for hook in unknown:
            hint = difflib.get_close_matches(hook, known, n=1)
            details.append(f"{hook!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        hint = f"; {DISABLE_HINT}" if name in entry_points else ""
        raise PluginError(f"plugin {name!r}{entry_points.get(name, '')} implements unknown hook "
                          f"{', '.join(details) or str(exc)}{hint}") from None


def _call_registration_hook(pm: pluggy.PluginManager, hook_name: str, registry: Registry,
                            entry_points: dict[str, str]) -> None:
    """Call each implementation on its own, so the registry knows which plugin added what."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        hint = f"; {DISABLE_HINT}" if impl.plugin_name in entry_points else ""
        try:
            impl.function(registry=registry.scoped(impl.plugin_name))
        except DistillcError as exc:
            if hint and isinstance(exc, PluginError):
                raise PluginError(f"{exc}{hint}") from exc
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}{hint}"
            ) from exc
