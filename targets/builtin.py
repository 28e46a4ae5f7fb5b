"""Built-in targets: the host (gcc), STM32H743 (Cortex-M7), STM32F405 (Cortex-M4F) and MAX78000 (its
Cortex-M4F core).

Each appends the INT8 backend (quantize if needed, export, simplify, lower, plan, emit C) and
its verification: on the host with gcc, and for the MCUs also on an emulated board under QEMU.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from distillc import hookimpl
from distillc.target_api import Target, TargetConfig, int8_backend


class HostTarget(Target):
    name = "host"
    description = "the build machine (gcc); bundle verified against onnxruntime"

    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        return int8_backend(makes, target=self.name, flash_kb=self.config.flash_kb, ram_kb=self.config.ram_kb,
                            verify=[("verify.host", {})], clock_mhz=self.config.clock_mhz)


class _Stm32PartConfig(TargetConfig):
    """Keys of an STM32 part's target: its flash and one RAM bank bound the model.

    ``ram_kb`` is what the arena may take of the bank it goes to, so it may not exceed that
    bank (``arena_bank``; for ``auto`` the largest bank auto may choose), not the part's total
    RAM: the arena is one array and cannot span banks.  Left out, it is that bank's size.
    """

    chip: ClassVar[str]

    @model_validator(mode="after")
    def _fits_the_part(self) -> "_Stm32PartConfig":
        from distillc.targets.stm32 import get_chip

        chip = get_chip(self.chip)
        problems = []
        if self.flash_kb is not None and self.flash_kb > chip.flash_kb:
            problems.append(("flash_kb", self.flash_kb, f"{self.flash_kb} KiB is more than the {chip.part}'s "
                                                        f"{chip.flash_kb} KiB of flash"))
        bank = chip.ram_limit(self.arena_bank)
        if self.ram_kb is not None and self.ram_kb > bank.kb:
            where = (f"the largest RAM bank arena_bank = 'auto' may choose, {bank.describe()}"
                     if self.arena_bank == "auto" else f"the bank arena_bank = {self.arena_bank!r} names, "
                                                       f"{bank.describe()}")
            problems.append(("ram_kb", self.ram_kb, f"{self.ram_kb} KiB is more than {where}: the arena is one "
                                                    f"array in one bank, so ram_kb is bounded by that bank, not by "
                                                    f"the part's total RAM"))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("stm32_memory", message), loc=(key,), input=value)
                for key, value, message in problems])
        return self

    @property
    def arena_ram_kb(self) -> int:
        """``ram_kb``, or the size of the bank that bounds it."""
        from distillc.targets.stm32 import get_chip

        return self.ram_kb if self.ram_kb is not None else get_chip(self.chip).ram_limit(self.arena_bank).kb


class Stm32Config(_Stm32PartConfig):
    chip: ClassVar[str] = "stm32h743"
    flash_kb: int | None = Field(2048, ge=1, description="flash available to the model (KiB; the STM32H743 has 2048)")
    ram_kb: int | None = Field(None, ge=1, description="RAM the arena may take (KiB), at most the bank it goes to; "
                                                       "default: that bank (auto: AXI SRAM's 512)")
    clock_mhz: float | None = Field(480, gt=0, description="core clock (MHz; the STM32H743's maximum)")
    arena_bank: Literal["auto", "dtcm", "axi_sram", "sram1", "sram2", "sram3", "sram4"] = Field(
        "auto", description="the RAM bank of the arena in the bundle's STM32H743 linker script: 'auto' takes DTCM "
                            "(128 KiB at 0x20000000) when the arena fits, else AXI SRAM (512 KiB at 0x24000000)")


class _Stm32PartTarget(Target):
    """A target for one STM32 part: the INT8 backend with the part's chip files, verified on the
    host and on the QEMU board ``machine``."""

    machine: ClassVar[str]

    def backend_passes(self, makes: type) -> list[tuple[str, dict[str, Any]]]:
        return int8_backend(makes, target=self.name, flash_kb=self.config.flash_kb, ram_kb=self.config.arena_ram_kb,
                            verify=[("verify.host", {}), ("verify.qemu", {"machine": self.machine})],
                            clock_mhz=self.config.clock_mhz, chip=self.config.chip,
                            arena_bank=self.config.arena_bank)


class Stm32Target(_Stm32PartTarget):
    name = "stm32h7"
    description = ("STM32H743 (Cortex-M7): the part's linker script and startup in the bundle; verified on the "
                   "host and on QEMU mps2-an500 (the M7 core on the MPS2 map; the H743 map is only linked)")
    Config = Stm32Config
    machine = "mps2-an500"


class Stm32F4Config(_Stm32PartConfig):
    chip: ClassVar[str] = "stm32f405"
    flash_kb: int | None = Field(1024, ge=1, description="flash available to the model (KiB; the STM32F405 has 1024)")
    ram_kb: int | None = Field(None, ge=1, description="RAM the arena may take (KiB), at most the bank it goes to; "
                                                       "default: that bank (auto: SRAM's 128)")
    clock_mhz: float | None = Field(168, gt=0, description="core clock (MHz; the STM32F405's maximum)")
    arena_bank: Literal["auto", "ccm", "sram"] = Field(
        "auto", description="the RAM bank of the arena in the bundle's STM32F405 linker script: 'auto' takes CCM "
                            "(64 KiB at 0x10000000, no DMA) when the arena fits, else SRAM (128 KiB at 0x20000000)")


class Stm32F4Target(_Stm32PartTarget):
    name = "stm32f4"
    description = ("STM32F405 (Cortex-M4F): the part's linker script and startup in the bundle; verified on the "
                   "host and on QEMU netduinoplus2 (the STM32F405's memory map; CCM moved, QEMU has none)")
    Config = Stm32F4Config
    machine = "netduinoplus2"


class Max78000Config(TargetConfig):
    flash_kb: int | None = Field(512, ge=1, description="flash available to the model (KiB)")
    ram_kb: int | None = Field(128, ge=1, description="RAM available to the model's arena (KiB)")
    clock_mhz: float | None = Field(100, gt=0, description="core clock (MHz; the MAX78000's Cortex-M4F)")
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
                                    verify=[("verify.host", {}), ("verify.qemu", {"machine": "mps2-an386"})],
                                    clock_mhz=self.config.clock_mhz) + izer


@hookimpl
def distillc_register_targets(registry: Any) -> None:
    for cls in (HostTarget, Stm32Target, Stm32F4Target, Max78000Target):
        registry.add(cls)
