"""Builds a bundle's C code with the example program and runs it: on this computer, or on an
emulated Cortex-M board under QEMU, where it also counts the instructions of each inference.

The bundle itself is only read: the runner compiles its include/ and src/ with distillc's own
copy of the example program (whose output format it parses) and board files, in ``workdir``.
"""

from __future__ import annotations

import re
import shutil
import struct
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DistillcError
from .bundle_files import EXAMPLE_MAIN, TRACE_MAIN, ModelHeader, read_model_header, render_input_data
from .toolchain import (ARM_FLAGS, ARM_LINK_FLAGS, C_FLAGS, CORTEX_M_DIR, LIBS, Board,
                        check_newlib, command_line, excerpt, find_tool,
                        get_board, run_tool)

#: Compiling a bundle whose weights are large C arrays can take a while.
COMPILE_TIMEOUT_S = 600.0
HOST_RUN_TIMEOUT_S = 600.0
DEFAULT_STACK_BYTES = 32 * 1024


@dataclass(frozen=True)
class QemuRun:
    """What running a bundle on an emulated board produced and measured."""

    outputs: np.ndarray  # int8, (n, DISTILLC_OUTPUT_SIZE)
    instructions: tuple[int, ...]  # per input, to 40 instructions (QEMU's MPS2 counter)
    instructions_per_inference: int  # their median (the lower middle one for an even count)
    elf_path: Path
    flash_bytes: int  # text + data of the whole example program (model, newlib, startup)
    model_flash_bytes: int  # text + data of the bundle's own objects (what the model adds to a firmware)
    ram_bytes: int  # data + bss, the reserved stack included
    stack_bytes: int  # stack the program used at most
    machine: str


def run_on_host(bundle_dir: Path, inputs: np.ndarray, workdir: Path) -> np.ndarray:
    """Compiles the bundle for this computer with gcc and runs ``inputs`` (int8, one per row)
    through it; returns the int8 outputs, shape (n, DISTILLC_OUTPUT_SIZE)."""
    bundle_dir = Path(bundle_dir).resolve()
    header, sources = _check_bundle(bundle_dir)
    rows = _as_rows(inputs, header)
    gcc = find_tool("gcc")
    build = _prepare_build_dir(Path(workdir) / "host", rows)
    exe = build / "example"
    run_tool([gcc, *command_line(C_FLAGS), f"-I{bundle_dir / 'include'}", build / "main.c",
              *sources, "-o", exe, *command_line(LIBS)],
             what=f"compiling {bundle_dir} for the host with gcc", timeout=COMPILE_TIMEOUT_S)
    result = run_tool([exe], what=f"the bundle's example program on the host ({exe})",
                      timeout=HOST_RUN_TIMEOUT_S)
    outputs, _, _ = _parse_report(result, len(rows), header, where="the host")
    return outputs


def trace_on_host(bundle_dir: Path, inputs: np.ndarray, workdir: Path) -> list[dict[int, bytes]]:
    """Builds the bundle for this computer with ``-DDISTILLC_TRACE`` and runs ``inputs`` (int8,
    one per row); returns, per input, every kernel's output bytes by step index."""
    bundle_dir = Path(bundle_dir).resolve()
    header, sources = _check_bundle(bundle_dir)
    rows = _as_rows(inputs, header)
    gcc = find_tool("gcc")
    build = _prepare_build_dir(Path(workdir) / "host-trace", rows)
    shutil.copyfile(TRACE_MAIN, build / "main.c")
    exe = build / "trace"
    run_tool([gcc, *command_line(C_FLAGS), "-DDISTILLC_TRACE", f"-I{bundle_dir / 'include'}",
              f"-I{bundle_dir / 'src'}", build / "main.c", *sources, "-o", exe, *command_line(LIBS)],
             what=f"compiling {bundle_dir} with its kernel trace for the host with gcc", timeout=COMPILE_TIMEOUT_S)
    run_tool([exe], what=f"the bundle's trace program on the host ({exe})", timeout=HOST_RUN_TIMEOUT_S, cwd=build)
    blob = (build / "trace.bin").read_bytes()
    traces: list[dict[int, bytes]] = [{} for _ in range(len(rows))]
    offset = 0
    while offset < len(blob):
        example, step, size = struct.unpack_from("<3I", blob, offset)
        offset += 12
        traces[example][step] = blob[offset:offset + size]
        offset += size
    return traces


def run_on_qemu(bundle_dir: Path, inputs: np.ndarray, workdir: Path, *,
                machine: str = "mps2-an500", timeout: float = 600.0,
                stack_bytes: int = DEFAULT_STACK_BYTES) -> QemuRun:
    """Cross-compiles the bundle for a Cortex-M board, runs ``inputs`` (int8, one per row)
    through it under QEMU, and returns the outputs with the instructions each inference took.

    ``timeout`` (seconds) bounds the QEMU run; ``stack_bytes`` is the stack the linker script
    reserves (a program that overflows it is an error).
    """
    bundle_dir = Path(bundle_dir).resolve()
    board = get_board(machine)
    header, sources = _check_bundle(bundle_dir)
    rows = _as_rows(inputs, header)
    arm_gcc, arm_size, qemu = (find_tool(tool) for tool in
                               ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"))
    check_newlib(arm_gcc)
    build = _prepare_build_dir(Path(workdir) / machine, rows)
    elf = build / "example.elf"
    objects = _link_elf(arm_gcc, board, bundle_dir, sources, build, elf, stack_bytes)
    flash_bytes, ram_bytes = _elf_size(arm_size, elf)
    model_flash_bytes = sum(_elf_size(arm_size, obj)[0] for obj in objects)

    result = run_tool(board.qemu_command(qemu, elf),
                      what=f"the bundle's example program on QEMU {machine} ({elf})",
                      timeout=timeout)
    where = f"QEMU {machine}"
    outputs, instructions, stack = _parse_report(result, len(rows), header, where=where)
    if len(instructions) != len(rows) or stack is None:
        raise DistillcError(f"the bundle's example program on {where} printed no instruction "
                            f"counts or stack use\n{excerpt(result.stdout)}")
    used, reserved = stack
    if used >= reserved:
        raise DistillcError(f"the example program overflowed its {reserved}-byte stack on QEMU "
                            f"{machine}: run it with a larger stack_bytes")
    return QemuRun(outputs=outputs, instructions=tuple(instructions),
                   instructions_per_inference=int(statistics.median_low(instructions)),
                   elf_path=elf, flash_bytes=flash_bytes, model_flash_bytes=model_flash_bytes, ram_bytes=ram_bytes,
                   stack_bytes=used, machine=machine)


def _check_bundle(bundle_dir: Path) -> tuple[ModelHeader, list[Path]]:
    header = read_model_header(bundle_dir)
    sources = sorted((bundle_dir / "src").glob("*.c"))
    if not sources:
        raise DistillcError(f"{bundle_dir} is not a distillc bundle: src/ holds no .c files")
    return header, sources


def _as_rows(inputs: np.ndarray, header: ModelHeader) -> np.ndarray:
    inputs = np.asarray(inputs)
    if inputs.dtype != np.int8:
        raise DistillcError(f"inputs must be int8 (quantized), not {inputs.dtype}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise DistillcError(f"inputs must hold at least one example, not shape {inputs.shape}")
    rows = inputs.reshape(inputs.shape[0], -1)
    if rows.shape[1] != header.input_size:
        raise DistillcError(f"inputs of shape {inputs.shape} have {rows.shape[1]} values per "
                            f"example; the model takes DISTILLC_INPUT_SIZE = {header.input_size}")
    return rows


def _prepare_build_dir(build: Path, rows: np.ndarray) -> Path:
    """A build directory with the example program and its inputs beside it (main.c includes
    "input_data.h" from its own directory first).

    The path is made absolute: the programs built there are started by it, some from another
    working directory (the trace program runs in its build folder), where a relative path
    would name nothing.
    """
    build = build.resolve()
    build.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_MAIN, build / "main.c")
    (build / "input_data.h").write_text(render_input_data(rows))
    return build


def _link_elf(arm_gcc: str, board: Board, bundle_dir: Path, sources: list[Path], build: Path,
              elf: Path, stack_bytes: int) -> list[Path]:
    """Compiles the bundle's sources to objects, links them with the example program, and
    returns the bundle's objects (their sizes are the model's own flash)."""
    if stack_bytes <= 0 or stack_bytes % 8:
        raise DistillcError(f"stack_bytes must be a positive multiple of 8, not {stack_bytes}")
    compile_flags = [*command_line(board.cpu_flags), *command_line(ARM_FLAGS), *command_line(C_FLAGS),
                     f"-I{bundle_dir / 'include'}", f"-I{CORTEX_M_DIR}"]
    objects_dir = build / "bundle-objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    objects = [objects_dir / f"{source.stem}.o" for source in sources]
    for source, obj in zip(sources, objects):
        run_tool([arm_gcc, *compile_flags, "-c", source, "-o", obj],
                 what=f"compiling {source} for {board.description} with arm-none-eabi-gcc",
                 timeout=COMPILE_TIMEOUT_S)
    run_tool([arm_gcc, *compile_flags, build / "main.c", *objects, CORTEX_M_DIR / "startup.c",
              *command_line(ARM_LINK_FLAGS), "-T", CORTEX_M_DIR / "mps2.ld",
              f"-Wl,--defsym=__stack_size={stack_bytes}", f"-Wl,-Map={elf.with_suffix('.map')}",
              "-o", elf, *command_line(LIBS)],
             what=f"linking the example program for {board.description} with arm-none-eabi-gcc",
             timeout=COMPILE_TIMEOUT_S)
    return objects


def _elf_size(arm_size: str, elf: Path) -> tuple[int, int]:
    """(flash, RAM) bytes of an ELF: text + data, and data + bss (Berkeley format)."""
    printed = run_tool([arm_size, "--format=berkeley", elf], what="arm-none-eabi-size",
                       timeout=60).stdout
    text, data, bss = (int(value) for value in printed.splitlines()[1].split()[:3])
    return text + data, data + bss


_OUTPUT = re.compile(r"^distillc-output (\d+):((?: -?\d+)*)$", re.M)
_INSTRUCTIONS = re.compile(r"^distillc-instructions (\d+): (\d+)$", re.M)
_STACK = re.compile(r"^distillc-stack-bytes: (\d+) of (\d+)$", re.M)
_DONE = re.compile(r"^distillc-done: (\d+) examples$", re.M)


def _parse_report(result: subprocess.CompletedProcess[str], count: int, header: ModelHeader, *,
                  where: str) -> tuple[np.ndarray, list[int], tuple[int, int] | None]:
    """Outputs, instruction counts and (stack used, reserved) from what main.c printed."""
    printed = result.stdout

    def fail(problem: str) -> DistillcError:
        return DistillcError(f"the bundle's example program on {where} {problem}\n"
                             f"{excerpt(result.stderr + printed)}")

    done = _DONE.search(printed)
    if done is None or int(done.group(1)) != count:
        raise fail(f"did not report all {count} examples")
    outputs = np.empty((count, header.output_size), dtype=np.int8)
    seen = 0
    for match in _OUTPUT.finditer(printed):
        values = match.group(2).split()
        if int(match.group(1)) != seen or len(values) != header.output_size:
            raise fail(f"printed output line {match.group(1)} with {len(values)} values where "
                       f"example {seen} with DISTILLC_OUTPUT_SIZE = {header.output_size} was due")
        outputs[seen] = np.array(values, dtype=np.int64)
        seen += 1
    if seen != count:
        raise fail(f"printed {seen} output lines for {count} examples")
    instructions = [int(m.group(2)) for m in _INSTRUCTIONS.finditer(printed)]
    stack = _STACK.search(printed)
    return outputs, instructions, (int(stack.group(1)), int(stack.group(2))) if stack else None
