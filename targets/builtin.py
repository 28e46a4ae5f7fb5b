"""Built-in targets: the host (gcc), STM32H7 (Cortex-M7) and MAX78000 (its Cortex-M4F core).

Each appends the INT8 backend (quantize if needed, export, simplify, lower, plan, emit C) and
its verification: on the host with gcc, and for the MCUs also on an emulated board under QEMU.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from distillc import hookimpl
from distillc.target_api import Target, TargetConfig, int8_backend


class HostTarget(Target):
    name = "host"
    description = "the build machine (gcc); bundle verified against onnxruntime"

    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        return int8_backend(makes, target=self.name, flash_kb=self.config.flash_kb, ram_kb=self.config.ram_kb,
                            verify=[("verify.host", {})])


class Stm32Config(TargetConfig):
    flash_kb: int | None = Field(2048, ge=1, description="flash available to the model (KiB)")
    ram_kb: int | None = Field(1024, ge=1, description="RAM available to the model's arena (KiB)")


class Stm32Target(Target):
    name = "stm32h7"
    description = "STM32H7 (Cortex-M7); verified on the host and on QEMU mps2-an500"
    Config = Stm32Config

    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        return int8_backend(makes, target=self.name, flash_kb=self.config.flash_kb, ram_kb=self.config.ram_kb,
                            verify=[("verify.host", {}), ("verify.qemu", {"machine": "mps2-an500"})])


class Max78000Config(TargetConfig):
    flash_kb: int | None = Field(512, ge=1, description="flash available to the model (KiB)")
    ram_kb: int | None = Field(128, ge=1, description="RAM available to the model's arena (KiB)")
    accelerator: Literal["report", "require", "off"] = Field(
        "report", description="check the student against the CNN accelerator's limits and write izer's "
                              "inputs into the bundle (izer/): 'report' lists the violations in the metrics, "
                              "'require' makes any violation an error")


class Max78000Target(Target):
    name = "max78000"
    description = ("MAX78000's Cortex-M4F core (C bundle; CNN accelerator limits checked, izer inputs "
                   "written); verified on QEMU mps2-an386 (Cortex-M4)")
    Config = Max78000Config

    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        from distillc.artifacts import QuantTorchModel, TorchModel

        check, izer = [], []
        if self.config.accelerator != "off":
            # An ONNX student has no PyTorch architecture to check; izer's inputs come from the ONNX model.
            if makes in (TorchModel, QuantTorchModel):
                check.append(("check.max78000", {"mode": self.config.accelerator}))
            izer.append(("export.izer", {"mode": self.config.accelerator}))
        return check + int8_backend(makes, target=self.name, flash_kb=self.config.flash_kb,
                                    ram_kb=self.config.ram_kb,
                                    verify=[("verify.host", {}), ("verify.qemu", {"machine": "mps2-an386"})]) + izer


@hookimpl
def distillc_register_targets(registry: Any) -> None:
    for cls in (HostTarget, Stm32Target, Max78000Target):
        registry.add(cls)
