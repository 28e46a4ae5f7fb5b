"""Generic helpers for pydantic validation errors: one line per problem, with the key path
(``passes[2].dims``), what is wrong and the offending value (shortened), and the allowed keys
for an unknown one.  Used by the spec, the planner (``target.backend``) and the registries.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from distillc.errors import shorten, shown


def validate_into(model: type[BaseModel], options: dict[str, Any], path: str, problems: list[str],
                  section_keys: tuple[str, ...] = (), context: dict[str, Any] | None = None) -> Any:
    """``model`` validated from ``options``, or None with one line per problem added to ``problems``."""
    try:
        return model.model_validate(options, context=context)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, model, prefix=path, section_keys=section_keys))
        return None


@functools.cache
def strict_variant(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` with strict mode on (fields that opt out with ``Strict(False)`` keep opting out)."""
    if model.model_config.get("strict"):
        return model
    return type(model.__name__, (model,), {"__module__": model.__module__,
                                          "model_config": ConfigDict(strict=True, allow_inf_nan=False)})


def format_loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    """('passes', 2, 'dims') -> 'passes[2].dims'."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "",
                            section_keys: tuple[str, ...] = ()) -> list[str]:
    """One line per problem of validating ``model``: key path, message, offending value.

    ``section_keys`` are keys the section also accepts besides ``model``'s (the keys distillc
    reads itself in a section whose other keys are a plugin's options), for "unknown key" lines.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = err["type"]
        where = shorten(format_loc(loc, prefix))
        if kind == "extra_forbidden":
            lines.append(f"{where}: unknown key (got {shown(err['input'])}); "
                         f"allowed: {_allowed_keys(model, loc, section_keys)}")
        elif kind == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = shorten(err["msg"].removeprefix("Value error, "), 300)
            value = err.get("input")
            got = "" if isinstance(value, dict) else f" (got {shown(value)})"
            lines.append(f"{where}: {msg}{got}")
    return lines


def _allowed_keys(model: Any, loc: tuple[Any, ...], section_keys: tuple[str, ...] = ()) -> str:
    """The keys the (sub)model at ``loc[:-1]`` accepts, for 'unknown key' messages."""
    for part in loc[:-1]:
        if model is None:
            break
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(part)
        model = _inner_model(field_info.annotation) if field_info else None
    if model is None:
        return "see docs/spec.md"
    keys = dict.fromkeys(section_keys if len(loc) == 1 else ())
    keys.update(dict.fromkeys(model.model_fields))
    return ", ".join(keys) or "none"


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
