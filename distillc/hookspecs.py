"""Every hook a distillc plugin can implement.

A plugin is a module (or object) with functions decorated by ``@distillc.hookimpl``.  Built-in
plugins are ordinary modules registered by the same call that registers a third party's (see
``distillc.plugins.BUILTIN_PLUGINS``); third parties arrive through the entry-point group
``distillc``.

Registration hooks receive a :class:`distillc.registry.Registry` and call ``registry.add(...)``
on it: the registry owns duplicate checks, checks of what is added and error messages, so hooks
return nothing.  A hook implementation whose name matches no hook here is refused at startup
(a misspelt hook would otherwise never be called).
"""

from __future__ import annotations

from typing import Any

from distillc import hookspec

# -- registration -----------------------------------------------------------------------------


@hookspec
def distillc_register_passes(registry: Any) -> None:
    """Register pass classes (subclasses of :class:`distillc.pass_api.Pass`).

    Called once per plugin manager, before a spec is resolved.  ``registry.add(cls)`` uses the
    class's ``name``; a duplicate name from any plugin is a :class:`PluginError`, and so is a
    class that is not a concrete ``Pass`` with a ``name`` and a ``makes``.
    """


@hookspec
def distillc_register_targets(registry: Any) -> None:
    """Register targets (subclasses of :class:`distillc.target_api.Target`) by their ``name``.

    A target's ``Config()`` must build with no arguments (a spec may give only ``use``);
    anything else is a :class:`PluginError` naming the plugin.
    """


@hookspec
def distillc_register_teachers(registry: Any) -> None:
    """Register teacher architectures: ``registry.add(name, builder)``.

    ``builder(image_size: int, in_chans: int, **options) -> torch.nn.Module`` returns a module
    with ``embed_dim`` and ``embed(x) -> (B, embed_dim)``; ViT-like teachers also offer
    ``forward_tokens`` and ``forward_hidden``.  ``image_size``/``in_chans`` are the teacher's
    input contract's; ``builder.input_defaults`` (a dict: ``input_size``, ``channels``,
    ``mean``, ``std``, ``interpolation``) publishes the native input a loaded teacher is fed.
    """


@hookspec
def distillc_register_students(registry: Any) -> None:
    """Register student architectures: ``registry.add(name, builder)``.

    ``builder(image_size: int, in_chans: int, **options) -> torch.nn.Module`` returns a module
    with ``embed_dim``, ``forward(x) -> (B, embed_dim)`` and ``config() -> dict`` (the options
    that rebuild it, so a trained student is stored as options + safetensors, never pickled).
    """


@hookspec
def distillc_register_datasets(registry: Any) -> None:
    """Register dataset sources: ``registry.add(name, source)``.

    ``source`` is a :class:`distillc.data_api.DatasetSource` (a loader plus a cheap fingerprint);
    with ``needs_path`` it reads ``[data] path``, without it a spec giving a path is refused;
    ``path_kind`` (``"file"``, ``"folder"`` or ``"any"``) is what that path must be.
    """


# -- running ------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def distillc_run_pass(step: Any, artifact: Any, context: Any) -> Any:
    """Run one planned step on its input ``artifact``; return a :class:`distillc.pass_api.PassResult`.

    The first non-None result wins.  distillc's own implementation calls
    ``step.pass_.run(artifact, context)``;
    plugins wrap it with ``@hookimpl(wrapper=True)`` for timing, profiling or IR dumps, e.g.::

        @hookimpl(wrapper=True)
        def distillc_run_pass(step, artifact, context):
            start = time.perf_counter()
            result = yield
            print(step.name, time.perf_counter() - start)
            return result

    Not called for steps answered from the cache.
    """


@hookspec
def distillc_pass_started(step: Any) -> None:
    """Observe: ``step`` is about to run or to be read from the cache (``step.cached``)."""


@hookspec
def distillc_pass_finished(step: Any, result: Any, seconds: float, cached: bool) -> None:
    """Observe: ``step`` finished; ``result.metrics`` holds what it reported."""


@hookspec
def distillc_bundle_written(path: Any, manifest: dict) -> None:
    """Observe: a bundle was written to ``path`` (a directory) with this manifest."""
