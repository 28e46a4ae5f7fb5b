"""The memory maps of the STM32 parts distillc writes bundles for, where the arena goes on each,
and the files that link a bundle for the real part: linker script, startup code, CMake
toolchain file (and, for the STM32F405, the variant of the linker script QEMU can run).

The arena (``DISTILLC_ARENA_SECTION``, by default ``.bss.distillc_arena``) goes into one RAM
bank: by default the first of the part's ``arena_banks`` that holds it (the fast bank no DMA
reaches, DTCM or CCM, then the large general bank); a target key can name the bank.  Code,
weights and the initial values of ``.data`` stay in flash; ``.data``, ``.bss``, newlib's heap
and the stack go into the part's ``system_bank``.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..errors import DistillcError
from .toolchain import CORTEX_M4_FLAGS, CORTEX_M7_FLAGS, CORTEX_M_DIR, Flag, command_line

#: Templates of the linker script, startup code, CMake toolchain file and QEMU board header.
STM32_DIR = CORTEX_M_DIR.parent / "stm32"


@dataclass(frozen=True)
class Bank:
    """One RAM bank of a part."""

    key: str  # the value of the target's arena_bank key and the manifest's memory.arena_bank
    region: str  # the MEMORY region of the linker script
    origin: int
    kb: int
    note: str

    @property
    def bytes(self) -> int:
        return self.kb * 1024

    def describe(self) -> str:
        return f"{self.region} ({self.kb} KiB at {self.origin:#010x})"


@dataclass(frozen=True)
class Chip:
    """An STM32 part: its flash, its RAM banks and how a bundle is linked and started on it."""

    name: str  # file names in the bundle: targets/<name>/<name>.ld, ...
    part: str  # ST's name
    core: str
    cpu_flags: tuple[Flag, ...]
    flash_origin: int
    flash_kb: int
    banks: tuple[Bank, ...]
    arena_banks: tuple[str, ...]  # where arena_bank = "auto" looks, in order
    system_bank: str  # .data, .bss, heap and stack
    irq_count: int  # external interrupts in the vector table
    init: str  # C run by the reset handler before memory is touched (startup.c)
    other_regions: tuple[tuple[str, int, int, str], ...] = ()  # (region, origin, KiB, note): listed, unused
    qemu_machine: str | None = None  # the QEMU board that runs this map
    qemu_moved: tuple[tuple[str, int, str], ...] = ()  # (region, origin, why) for that board

    def bank(self, key: str) -> Bank:
        for bank in self.banks:
            if bank.key == key:
                return bank
        raise DistillcError(f"{self.part} has no RAM bank {key!r}; valid: {', '.join(self.bank_keys())}")

    def bank_keys(self) -> list[str]:
        return [bank.key for bank in self.banks]

    def largest_arena_bank(self) -> Bank:
        return max((self.bank(key) for key in self.arena_banks), key=lambda bank: bank.kb)

    def ram_limit(self, arena_bank: str) -> Bank:
        """The bank that bounds ``ram_kb``: the named one, or for ``auto`` the largest it may choose."""
        return self.largest_arena_bank() if arena_bank == "auto" else self.bank(arena_bank)

    def place_arena(self, arena_bytes: int, arena_bank: str) -> Bank:
        """The bank the arena goes to (``arena_bank`` names one, or ``auto``: the first that holds it)."""
        if arena_bank != "auto":
            return self.bank(arena_bank)
        for key in self.arena_banks:
            if arena_bytes <= self.bank(key).bytes:
                return self.bank(key)
        return self.largest_arena_bank()


#: The parts, by name.  Addresses and sizes from ST's reference manuals (RM0433 for the
#: STM32H743, RM0090 for the STM32F405).
CHIPS = {
    chip.name: chip
    for chip in (
        Chip(
            name="stm32h743", part="STM32H743", core="Cortex-M7", cpu_flags=CORTEX_M7_FLAGS,
            flash_origin=0x08000000, flash_kb=2048,
            banks=(
                Bank("dtcm", "DTCM", 0x20000000, 128, "tightly coupled to the core: no wait state, no cache; "
                                                      "DMA1/DMA2 cannot reach it (MDMA can)"),
                Bank("axi_sram", "AXI_SRAM", 0x24000000, 512, "D1 domain, behind the L1 cache; every DMA reaches it"),
                Bank("sram1", "SRAM1", 0x30000000, 128, "D2 domain (clock enabled by the startup code)"),
                Bank("sram2", "SRAM2", 0x30020000, 128, "D2 domain (clock enabled by the startup code)"),
                Bank("sram3", "SRAM3", 0x30040000, 32, "D2 domain (clock enabled by the startup code)"),
                Bank("sram4", "SRAM4", 0x38000000, 64, "D3 domain"),
            ),
            arena_banks=("dtcm", "axi_sram"), system_bank="axi_sram", irq_count=150,
            init=("/* RCC_AHB2ENR (RCC at 0x58024400, offset 0xDC), bits 29..31: the clocks of the D2\n"
                  " * domain's SRAM1..3, off after reset (RM0433, RCC chapter). */\n"
                  "(*(volatile uint32_t *)0x580244DCu) |= 0x7u << 29;\n"
                  "(void)(*(volatile uint32_t *)0x580244DCu); /* read back: the clock is on before the first access */"),
            other_regions=(("ITCM", 0x00000000, 64, "instruction TCM; nothing is placed there by default"),),
        ),
        Chip(
            name="stm32f405", part="STM32F405", core="Cortex-M4F", cpu_flags=CORTEX_M4_FLAGS,
            flash_origin=0x08000000, flash_kb=1024,
            banks=(
                Bank("ccm", "CCM", 0x10000000, 64, "core-coupled memory: data only, no DMA, no bit-banding"),
                Bank("sram", "SRAM", 0x20000000, 128, "SRAM1 (112 KiB) and SRAM2 (16 KiB), contiguous; "
                                                      "every DMA reaches it"),
            ),
            arena_banks=("ccm", "sram"), system_bank="sram", irq_count=82,
            init="/* CCM and SRAM are clocked after reset (RCC_AHB1ENR.CCMDATARAMEN resets to 1). */",
            qemu_machine="netduinoplus2",
            qemu_moved=(("CCM", 0x20020000,
                         "QEMU 7.2's netduinoplus2 has no CCM at 0x10000000 but 192 KiB of SRAM at 0x20000000: "
                         "the verification build links CCM's 64 KiB at 0x20020000, the 64 KiB of QEMU's SRAM "
                         "above the part's 128 KiB (memory the real part does not have there)"),),
        ),
    )
}


def get_chip(name: str) -> Chip:
    """The part called ``name``; an unknown one is answered with the valid names."""
    try:
        return CHIPS[name]
    except KeyError:
        raise DistillcError(f"unknown STM32 part {name!r}; distillc knows {', '.join(sorted(CHIPS))}") from None


def chip_files_dir(chip: Chip) -> Path:
    """Where a bundle holds a part's files (relative to the bundle)."""
    return Path("targets") / chip.name


def render_linker_script(chip: Chip, arena_bank: str, *, qemu: bool = False) -> str:
    """The linker script of ``chip`` with the arena in ``arena_bank``; ``qemu``: the variant for
    the chip's QEMU board (the regions it lacks moved where that board has RAM)."""
    bank = chip.bank(arena_bank)
    moved = {region: (origin, why) for region, origin, why in chip.qemu_moved} if qemu else {}
    if qemu and chip.qemu_machine is None:
        raise DistillcError(f"no QEMU board runs the {chip.part}'s memory map")
    lines = [f"  FLASH (rx) : ORIGIN = {chip.flash_origin:#010x}, LENGTH = {chip.flash_kb}K"]
    notes = [f" *   FLASH     {chip.flash_origin:#010x}  {chip.flash_kb:>4} KiB  code, constants (the weights), "
             f"initial values of .data"]
    for b in chip.banks:
        origin = moved.get(b.region, (b.origin, ""))[0]
        lines.append(f"  {b.region} (rw) : ORIGIN = {origin:#010x}, LENGTH = {b.kb}K")
        notes.append(f" *   {b.region:<9} {origin:#010x}  {b.kb:>4} KiB  {b.note}")
    for region, origin, kb, note in chip.other_regions:
        lines.append(f"  {region} (rwx) : ORIGIN = {origin:#010x}, LENGTH = {kb}K")
        notes.append(f" *   {region:<9} {origin:#010x}  {kb:>4} KiB  {note}")
    qemu_note = "".join(" *\n" + textwrap.indent(textwrap.fill(f"QEMU variant ({chip.qemu_machine}): {why}.", 92), " * ")
                        + "\n" for _, _, why in chip.qemu_moved) if qemu else ""
    template = (STM32_DIR / "stm32.ld.in").read_text()
    values = {
        "PART": chip.part, "CORE": chip.core, "MAP": "\n".join(notes), "QEMU_NOTE": qemu_note,
        "MEMORY": "\n".join(lines), "ARENA_REGION": bank.region, "ARENA_BANK": bank.key,
        "SYSTEM_REGION": chip.bank(chip.system_bank).region,
    }
    return re.sub(r"@([A-Z_]+)@", lambda match: values[match.group(1)], template)


def render_startup(chip: Chip) -> str:
    """startup_<chip>.c: vector table, reset handler (chip init, FPU, .data, .bss, arena, stack
    pattern), optional semihosting (``-DDISTILLC_SEMIHOSTING``)."""
    values = {"PART": chip.part, "NAME": chip.name, "IRQ_COUNT": str(chip.irq_count),
              "INIT": "\n".join(f"    {line}" if line else "" for line in chip.init.splitlines())}
    return re.sub(r"@([A-Z_]+)@", lambda match: values[match.group(1)], (STM32_DIR / "startup.c.in").read_text())


def render_cmake_toolchain(chip: Chip) -> str:
    """<chip>.cmake: the compiler, the core's flags and the part's linker script for CMake."""
    values = {"PART": chip.part, "NAME": chip.name, "CPU_FLAGS": " ".join(command_line(chip.cpu_flags))}
    return re.sub(r"@([A-Z_]+)@", lambda match: values[match.group(1)], (STM32_DIR / "toolchain.cmake.in").read_text())


def chip_bundle_files(chip: Chip, arena_bank: str) -> dict[Path, str]:
    """The files a bundle for ``chip`` holds under targets/<chip>/, by path in the bundle."""
    folder = chip_files_dir(chip)
    files = {
        folder / f"{chip.name}.ld": render_linker_script(chip, arena_bank),
        folder / f"startup_{chip.name}.c": render_startup(chip),
        folder / f"{chip.name}.cmake": render_cmake_toolchain(chip),
    }
    if chip.qemu_machine is not None:
        files[folder / f"{chip.name}-qemu.ld"] = render_linker_script(chip, arena_bank, qemu=True)
        files[folder / "board.h"] = (STM32_DIR / "board.h").read_text()
        files[folder / "board_stack.h"] = (CORTEX_M_DIR / "board_stack.h").read_text()
    return files
