"""The external tools that build and run a bundle's C code, and the flags distillc passes them.

The flags live here once, each with the reason it is there: the runner passes them to the
compilers, and the bundle's Makefile and CMakeLists.txt are written from the same lists, with
the reasons as comments (see :mod:`.bundle_files`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DistillcError

#: Where the startup code, linker script and example program for the MPS2 boards live.
CORTEX_M_DIR = Path(__file__).parent / "cortex_m"


@dataclass(frozen=True)
class Flag:
    """A compiler, linker or QEMU flag, and why it is passed (written beside it in Makefiles)."""

    value: str
    why: str

    @property
    def args(self) -> list[str]:
        """The flag as command-line arguments (``-icount shift=0`` is two)."""
        return self.value.split()


def command_line(flags: Sequence[Flag]) -> list[str]:
    """The arguments of several flags, in order."""
    return [arg for flag in flags for arg in flag.args]


#: Every build, host and board: the bundle's C must compile cleanly under these.
C_FLAGS = (
    Flag("-std=c99", "the C standard the bundle is written to"),
    Flag("-Wall", "the usual warnings"),
    Flag("-Wextra", "and the extra ones"),
    Flag("-Werror", "any warning fails the build"),
    Flag("-O2", "optimise for speed; distillc measures and verifies at -O2"),
)

#: Libraries linked into every build (after the objects).
LIBS = (Flag("-lm", "the C maths library, for the few float functions a kernel may call"),)

#: Every Cortex-M build, whatever the core.
ARM_FLAGS = (
    Flag("-mthumb", "Thumb-2, the only instruction set of Cortex-M cores"),
    Flag("-ffunction-sections", "one section per function and per object,"),
    Flag("-fdata-sections", "so that --gc-sections can drop the unused ones"),
    Flag("-DDISTILLC_BOARD", "main.c counts instructions with the board's counter (board.h)"),
)

#: Linking a Cortex-M ELF (besides the linker script, which the build names itself).
ARM_LINK_FLAGS = (
    Flag("--specs=rdimon.specs", "newlib with semihosting: printf and exit reach the host through QEMU"),
    Flag("-nostartfiles", "startup.c replaces newlib's crt0: vector table, reset handler, exit"),
    Flag("-Wl,--gc-sections", "drop code and data nothing refers to"),
)

#: Linking the example program for a real STM32 part (no debugger assumed): newlib-nano, and
#: system calls that do nothing (define _write to send printf somewhere).
CHIP_LINK_FLAGS = (
    Flag("--specs=nano.specs", "newlib-nano: the small printf and malloc"),
    Flag("--specs=nosys.specs", "system calls that do nothing: no semihosting, no debugger needed"),
    Flag("-nostartfiles", "startup_<part>.c replaces newlib's crt0: vector table, reset handler"),
    Flag("-Wl,--gc-sections", "drop code and data nothing refers to"),
)

#: How QEMU runs a board's ELF (besides -machine, -cpu and -kernel).
QEMU_FLAGS = (
    Flag("-nographic", "no window: QEMU's monitor and UART use the terminal"),
    Flag("-semihosting-config enable=on,target=native", "printf and exit status reach this computer"),
    Flag("-icount shift=0,sleep=off", "1 ns per instruction, no real time: exact, repeatable counts"),
)


@dataclass(frozen=True)
class Board:
    """A Cortex-M board that QEMU emulates, and how to build for its core."""

    machine: str  # QEMU's -machine
    cpu: str  # QEMU's -cpu
    make_target: str  # TARGET= in the bundle's Makefile
    description: str
    cpu_flags: tuple[Flag, ...]
    #: the STM32 part whose memory map the board runs (targets/stm32.py), or None: the MPS2 map
    #: (cortex_m/mps2.ld, startup.c, board.h)
    chip: str | None = None
    #: what the example program's instruction counts come from, for the manifest
    counter: str = "the MPS2 FPGA counter (25 MHz: 40 instructions per tick under -icount shift=0)"
    #: instructions per tick of that counter under -icount shift=0 (board.h's DISTILLC_INSTRUCTIONS_PER_TICK):
    #: the resolution of one reading.  Every MPS2 timer QEMU 7.2 models (FPGA counter, SysTick, the CMSDK
    #: timers) counts at the 25 MHz system clock, and it models no DWT cycle counter (CYCCNT reads 0).
    instructions_per_tick: int = 40
    #: the memory map the verification build links to, for the manifest
    memory_map: str = ("MPS2 (code at 0x00000000, data at 0x20000000: cortex_m/mps2.ld), not an STM32 part's map; "
                       "a bundle's targets/<part>/ linker script is only linked, not run")

    def qemu_command(self, qemu: str, elf: Path) -> list[str]:
        """The command line that runs ``elf`` on this board."""
        return [qemu, "-machine", self.machine, "-cpu", self.cpu, *command_line(QEMU_FLAGS),
                "-kernel", str(elf)]


#: Code generation for each core (the boards below and the STM32 parts of targets/stm32.py).
CORTEX_M7_FLAGS = (
    Flag("-mcpu=cortex-m7", "instructions and scheduling of the Cortex-M7"),
    Flag("-mfloat-abi=hard", "floats in FPU registers and FPU instructions"),
    Flag("-mfpu=fpv5-d16", "the M7's FPv5 unit (single and double precision)"),
)
CORTEX_M4_FLAGS = (
    Flag("-mcpu=cortex-m4", "instructions and scheduling of the Cortex-M4"),
    Flag("-mfloat-abi=hard", "floats in FPU registers and FPU instructions"),
    Flag("-mfpu=fpv4-sp-d16", "the M4's FPv4 unit (single precision)"),
)

#: The boards distillc runs bundles on, by QEMU machine name.  The MPS2 ones have 4 MiB of code
#: memory at 0x00000000 and 4 MiB of data memory at 0x20000000 (cortex_m/mps2.ld); netduinoplus2
#: runs the STM32F405's map (targets/stm32.py).
BOARDS = {
    board.machine: board
    for board in (
        Board(
            machine="mps2-an500",
            cpu="cortex-m7",
            make_target="cortex-m7",
            description="Cortex-M7 (the STM32H7's core) on QEMU's mps2-an500 board",
            cpu_flags=CORTEX_M7_FLAGS,
        ),
        Board(
            machine="mps2-an386",
            cpu="cortex-m4",
            make_target="cortex-m4",
            description="Cortex-M4 (the MAX78000's core) on QEMU's mps2-an386 board",
            cpu_flags=CORTEX_M4_FLAGS,
        ),
        Board(
            machine="netduinoplus2",
            cpu="cortex-m4",
            make_target="stm32f405-qemu",
            description="STM32F405 (Cortex-M4F) on QEMU's netduinoplus2 board, ST's memory map",
            cpu_flags=CORTEX_M4_FLAGS,
            chip="stm32f405",
            counter="TIM2 (QEMU clocks it at 1 GHz of virtual time: 1 instruction per tick under -icount shift=0)",
            instructions_per_tick=1,
            memory_map=("STM32F405 as the bundle's targets/stm32f405/stm32f405-qemu.ld: ST's flash (0x08000000) "
                        "and SRAM (0x20000000); CCM's 64 KiB at 0x20020000, since QEMU 7.2 has none at 0x10000000"),
        ),
    )
}

#: The boards of the MPS2 memory map, which the bundle's Makefile and CMakeLists.txt build for
#: by TARGET=cortex-m7 / cortex-m4 (an STM32 part's board has its own rules there).
MPS2_BOARDS = {machine: board for machine, board in BOARDS.items() if board.chip is None}


def get_board(machine: str) -> Board:
    """The board QEMU calls ``machine``; an unknown name is answered with the valid ones."""
    try:
        return BOARDS[machine]
    except KeyError:
        raise DistillcError(
            f"unknown QEMU machine {machine!r}: distillc runs bundles on {', '.join(sorted(BOARDS))}"
        ) from None


#: The Debian package that installs each tool (`make setup` installs them all).
TOOL_PACKAGES = {
    "gcc": "gcc",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi",
    "arm-none-eabi-size": "binutils-arm-none-eabi",
    "arm-none-eabi-nm": "binutils-arm-none-eabi",
    "arm-none-eabi-readelf": "binutils-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}
NEWLIB_PACKAGE = "libnewlib-arm-none-eabi"


def _install_hint(package: str) -> str:
    return (f"install the Debian package {package} (`sudo apt-get install {package}`, "
            "or `make setup` in the distillc repository)")


def find_tool(name: str) -> str:
    """The path of an external tool, or a DistillcError that says which package installs it."""
    path = shutil.which(name)
    if path is None:
        raise DistillcError(f"{name} was not found on PATH: {_install_hint(TOOL_PACKAGES[name])}")
    return path


def check_newlib(arm_gcc: str) -> None:
    """Raises a DistillcError naming the package when newlib's rdimon.specs is missing.

    Without newlib, arm-none-eabi-gcc is there but every Cortex-M link fails.
    """
    found = run_tool([arm_gcc, "-print-file-name=rdimon.specs"], what="arm-none-eabi-gcc",
                     timeout=30).stdout.strip()
    if not Path(found).is_absolute():  # gcc echoes the bare name when it cannot find the file
        raise DistillcError(f"newlib for arm-none-eabi-gcc (rdimon.specs) is missing: "
                            f"{_install_hint(NEWLIB_PACKAGE)}")


#: The tools this process started that are still running (see :func:`run_tool`).
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()


def run_tool(args: Sequence[str | Path], *, what: str, timeout: float,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a tool and returns what it printed (stdout and stderr kept apart).

    A non-zero exit status or a timeout is a DistillcError that says ``what`` failed and shows
    its output (stderr and stdout in full, or their beginning and end when they are long).

    The tool runs in a process group of its own, and that group (the tool and whatever it
    started: gcc's cc1, as and ld) is killed when the tool times out, when the wait for it is
    interrupted (Ctrl-C; the CLI turns SIGTERM and SIGHUP into the same), and at interpreter
    exit (:func:`end_tools`), so a stopped compile leaves no compiler or QEMU running.
    """
    argv = [str(arg) for arg in args]
    process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace", process_group=0)
    with _running_lock:
        _running.add(process)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end(process)
        stdout, stderr = _leftover_output(process)
        printed = _as_text(stderr) + _as_text(stdout)
        raise DistillcError(f"{what} did not finish within {timeout:g} s\n"
                            f"$ {' '.join(argv)}\n{excerpt(printed)}") from None
    except BaseException:
        _end(process)
        raise
    finally:
        with _running_lock:
            _running.discard(process)
    if process.returncode != 0:
        raise DistillcError(f"{what} failed ({_describe_exit(process.returncode)})\n"
                            f"$ {' '.join(argv)}\n{excerpt(stderr + stdout)}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def end_tools() -> None:
    """Kill every tool this process started that is still running, with its process group."""
    with _running_lock:
        running = list(_running)
    for process in running:
        _end(process)


atexit.register(end_tools)


def _end(process: subprocess.Popen[str]) -> None:
    # SIGKILL while the tool is not yet reaped, so the group id cannot name anything else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _leftover_output(process: subprocess.Popen[str]) -> tuple[str, str]:
    """What a killed tool printed before it ended (nothing if a child of it keeps the pipes open)."""
    try:
        return process.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return "", ""


def _describe_exit(returncode: int) -> str:
    """'exit status 3', or 'killed by SIGSEGV' for a negative return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def excerpt(text: str, *, head_lines: int = 150, tail_lines: int = 50,
            max_chars: int = 20_000) -> str:
    """``text`` in full when short; else its first and last lines, saying how many were left out.

    Compiler errors come first in gcc's output, a crash's last words at the end: both ends stay.
    """
    lines = text.rstrip().splitlines()
    if len(lines) > head_lines + tail_lines:
        left_out = len(lines) - head_lines - tail_lines
        lines = [*lines[:head_lines], f"[... {left_out} lines left out ...]", *lines[-tail_lines:]]
    shown = "\n".join(lines)
    if len(shown) > max_chars:
        half = max_chars // 2
        shown = f"{shown[:half]}\n[... {len(shown) - max_chars} characters left out ...]\n{shown[-half:]}"
    return shown


def _as_text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output
