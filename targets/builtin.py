"""Built-in targets: the host (gcc), STM32H7 (Cortex-M7) and MAX78000 (Cortex-M4F + CNN accelerator)."""

from __future__ import annotations

from typing import Any, ClassVar

from distillc import hookimpl
from distillc.target_api import Target


class HostTarget(Target):
    name = "host"
    description = "the build machine (gcc); for development and verification"

    def backend_passes(self) -> list[tuple[str, dict[str, Any]]]:
        return [("export.onnx", {}), ("simplify.onnxsim", {})]


class Stm32Target(Target):
    name = "stm32h7"
    description = "STM32H7 (Cortex-M7, 2 MB flash / 1 MB RAM by default); verified on QEMU mps2-an500"
    defaults: ClassVar[dict[str, int]] = {"flash_kb": 2048, "ram_kb": 1024}

    def backend_passes(self) -> list[tuple[str, dict[str, Any]]]:
        return [("export.onnx", {}), ("simplify.onnxsim", {})]


class Max78000Target(Target):
    name = "max78000"
    description = "MAX78000 (Cortex-M4F; CNN accelerator limits checked)"
    defaults: ClassVar[dict[str, int]] = {"flash_kb": 512, "ram_kb": 128}

    def backend_passes(self) -> list[tuple[str, dict[str, Any]]]:
        return [("export.onnx", {}), ("simplify.onnxsim", {})]


@hookimpl
def distillc_register_targets(registry: Any) -> None:
    for cls in (HostTarget, Stm32Target, Max78000Target):
        registry.add(cls)
