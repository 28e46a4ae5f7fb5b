"""Targets: where a bundle runs.  A target contributes the backend passes that end a plan."""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class TargetConfig(BaseModel):
    """Keys of ``[target]`` shared by every target; a target may extend them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    flash_kb: int | None = Field(None, ge=1, description="flash available to the model (KiB)")
    ram_kb: int | None = Field(None, ge=1, description="RAM available to the model's arena (KiB)")
    clock_mhz: float | None = Field(None, gt=0, description="core clock (MHz): the bundle's report.html estimates "
                                                           "inferences per second from it")
    backend: dict[str, dict[str, Any]] = Field(
        {}, description='options for the backend passes, e.g. { "tvm.int8" = { allow_float_fallback = true } }')


class Target(abc.ABC):
    """Base class of every target (built-in or a plugin's).

    ``backend_passes(makes)`` returns ``(pass name, config dict)`` pairs appended after the
    spec's own passes; ``makes`` is the artifact type those passes end with (a float
    ``TorchModel``, a ``QuantTorchModel`` after QAT, an ``OnnxModel`` for a student given as a
    file), so a target can start its backend where the spec left off.  A pass the spec already
    lists is not appended again, so a spec can configure a backend pass by listing it.  Only
    these passes' cache keys see the target's config, which is why changing the target never
    re-runs training.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[TargetConfig]] = TargetConfig

    def __init__(self, config: TargetConfig):
        self.config = config

    @abc.abstractmethod
    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        """The passes this target appends to a plan whose spec passes end with ``makes``."""


def int8_backend(makes: type, *, target: str, flash_kb: int | None, ram_kb: int | None,
                 verify: list[tuple[str, dict[str, Any]]],
                 clock_mhz: float | None = None, chip: str | None = None,
                 arena_bank: str = "auto") -> list[tuple[str, dict[str, Any]]]:
    """The standard INT8 backend from wherever the spec's passes stop.

    A float student is quantized first (post-training calibration: ``quantize.brevitas-qat``
    with ``epochs = 0``; list the pass in the spec to run QAT epochs instead), exported to QCDQ
    ONNX and simplified; an ONNX student goes straight to TVM.  ``chip`` (an STM32 part) gives
    the bundle that part's linker script and startup code, with the arena in ``arena_bank``.
    """
    from distillc.artifacts import OnnxModel, QuantTorchModel, TorchModel

    front: list[tuple[str, dict[str, Any]]] = []
    if makes is TorchModel:
        front.append(("quantize.brevitas-qat", {"epochs": 0}))
    if makes in (TorchModel, QuantTorchModel):
        front += [("export.onnx", {}), ("simplify.onnxsim", {})]
    if makes not in (TorchModel, QuantTorchModel, OnnxModel):
        return front
    return front + [
        ("tvm.int8", {}),
        ("plan-memory", {"ram_kb": ram_kb}),  # for schedule = "auto" (other schedules drop it)
        ("codegen.c", {"target": target, "flash_kb": flash_kb, "ram_kb": ram_kb, "clock_mhz": clock_mhz,
                       **({"chip": chip, "arena_bank": arena_bank} if chip else {})}),
        *verify,
    ]


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
