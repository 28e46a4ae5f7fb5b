"""Builds a bundle's C code with the example program and runs it: on this computer, or on an
emulated Cortex-M board under QEMU, where it also counts the instructions of each inference.

The bundle itself is only read: the runner compiles its include/ and src/ with distillc's own
copy of the example program (whose output format it parses) and board files, in ``workdir``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DistillcError
from .bundle_files import (EXAMPLE_MAIN, LAYER_MAIN, TRACE_MAIN, ModelHeader, read_arena_bytes,
                           read_model_header, render_input_data)
from .stm32 import STM32_DIR, Chip, chip_files_dir, get_chip, render_linker_script, render_startup
from .toolchain import (ARM_FLAGS, ARM_LINK_FLAGS, C_FLAGS, CHIP_LINK_FLAGS, CORTEX_M_DIR, LIBS, Board, Flag,
                        check_newlib, command_line, excerpt, find_tool,
                        get_board, run_tool)

#: Compiling a bundle whose weights are large C arrays can take a while.
COMPILE_TIMEOUT_S = 600.0
HOST_RUN_TIMEOUT_S = 600.0
DEFAULT_STACK_BYTES = 32 * 1024


@dataclass(frozen=True)
class LayerCounts:
    """Instructions per kernel call, from a second build of the bundle whose executor reads the
    board's counter after every kernel (``-DDISTILLC_TRACE`` with cortex_m/layer_main.c).

    Only the executor is rebuilt: the kernels and weights are the objects the plain build ran, so a
    kernel's count is its own code plus its call; the hooks' bookkeeping is charged to no kernel.
    """

    instructions: tuple[tuple[int, ...], ...]  # per input, one count per kernel call (step), in order
    totals: tuple[int, ...]  # per input: the whole inference of this build, the hooks included
    resolution: int  # instructions per counter tick: one count is within this of the exact figure
    elf_path: Path


@dataclass(frozen=True)
class QemuRun:
    """What running a bundle on an emulated board produced and measured."""

    outputs: np.ndarray  # int8, (n, DISTILLC_OUTPUT_SIZE)
    instructions: tuple[int, ...]  # per input (to 40 instructions on MPS2, exact on netduinoplus2)
    instructions_per_inference: int  # their median (the lower middle one for an even count)
    elf_path: Path
    flash_bytes: int  # text + data of the whole example program (model, newlib, startup)
    model_flash_bytes: int  # text + data of the bundle's own objects (what the model adds to a firmware)
    ram_bytes: int  # data + bss, the reserved stack included
    stack_bytes: int  # stack the program used at most
    machine: str
    counter: str = ""  # what the instruction counts come from (the board's counter)
    memory_map: str = ""  # the memory map the program was linked to (the board's)
    arena_bank: str | None = None  # an STM32 board: the RAM bank the arena was linked into
    layers: LayerCounts | None = None  # run_on_qemu(layers=True): instructions per kernel call


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
                stack_bytes: int = DEFAULT_STACK_BYTES, layers: bool = False) -> QemuRun:
    """Cross-compiles the bundle for a Cortex-M board, runs ``inputs`` (int8, one per row)
    through it under QEMU, and returns the outputs with the instructions each inference took.

    ``timeout`` (seconds) bounds each QEMU run; ``stack_bytes`` is the stack the linker script
    reserves (a program that overflows it is an error).  ``layers``: also build the executor with
    its kernel trace hooks and run the inputs again, counting the instructions of every kernel
    call (:class:`LayerCounts`; its outputs must equal the plain build's).
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
    arena_bank, files, defines = None, MPS2_FILES, ()
    if board.chip is not None:
        chip = get_chip(board.chip)
        arena_bank = bundle_arena_bank(bundle_dir, chip)
        files = _write_chip_files(chip, arena_bank, build / "board", qemu=True)
        defines = ("-DDISTILLC_SEMIHOSTING",)
    objects = _link_elf(arm_gcc, board, bundle_dir, sources, build, elf, stack_bytes, files=files, defines=defines)
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
    counts = None
    if layers:
        counts = _count_layers(arm_gcc, qemu, board, bundle_dir, sources, dict(zip(sources, objects)), rows, header,
                               outputs, Path(workdir) / f"{machine}-layers", stack_bytes, files, defines, timeout)
    return QemuRun(outputs=outputs, instructions=tuple(instructions),
                   instructions_per_inference=int(statistics.median_low(instructions)),
                   elf_path=elf, flash_bytes=flash_bytes, model_flash_bytes=model_flash_bytes, ram_bytes=ram_bytes,
                   stack_bytes=used, machine=machine, counter=board.counter, arena_bank=arena_bank,
                   memory_map=board.memory_map, layers=counts)


#: The detection program (a bundle with distillc_detect): every input's map and detections.
DETECT_MAIN = CORTEX_M_DIR / "detect_main.c"


@dataclass(frozen=True)
class DetectionRun:
    """What the detection program (cortex_m/detect_main.c) printed for each input and case.

    ``cases`` are ``(dim, threshold_q15, max_out)``; ``detect[(i, c)]`` and ``detect_output[(i, c)]``
    are what ``distillc_detect`` (on input ``i``) and ``distillc_detect_output`` (on its printed
    map) returned for case ``c``: the count (negative: refused) and the detections, int64
    ``(count, 6)`` rows of x0, y0, x1, y1, score_q15, class_id.
    """

    outputs: np.ndarray  # int8 maps (n, DISTILLC_OUTPUT_SIZE), from distillc_model_run
    cases: tuple[tuple[int, int, int], ...]
    detect: dict[tuple[int, int], tuple[int, np.ndarray]]
    detect_output: dict[tuple[int, int], tuple[int, np.ndarray]]
    machine: str = "host"
    instructions: dict[tuple[int, int], tuple[int, int]] | None = None  # board: (detect, detect_output)


def detect_on_host(bundle_dir: Path, inputs: np.ndarray, workdir: Path,
                   cases: list[tuple[int, int, int]]) -> DetectionRun:
    """Builds the detection program with the bundle for this computer and runs ``inputs``
    (int8, one per row) through ``distillc_detect`` for every ``(dim, threshold_q15, max_out)``."""
    bundle_dir = Path(bundle_dir).resolve()
    header, sources = _check_bundle(bundle_dir)
    rows = _as_rows(inputs, header)
    gcc = find_tool("gcc")
    build = _prepare_detect_dir(Path(workdir) / "host-detect", rows, cases)
    exe = build / "detect"
    run_tool([gcc, *command_line(C_FLAGS), f"-I{bundle_dir / 'include'}", build / "main.c",
              *sources, "-o", exe, *command_line(LIBS)],
             what=f"compiling {bundle_dir} with its detection program for the host with gcc",
             timeout=COMPILE_TIMEOUT_S)
    result = run_tool([exe], what=f"the bundle's detection program on the host ({exe})", timeout=HOST_RUN_TIMEOUT_S)
    return _parse_detections(result, rows, header, cases, where="the host")


def detect_on_qemu(bundle_dir: Path, inputs: np.ndarray, workdir: Path, cases: list[tuple[int, int, int]], *,
                   machine: str = "mps2-an500", timeout: float = 600.0,
                   stack_bytes: int = DEFAULT_STACK_BYTES) -> DetectionRun:
    """The detection program cross-compiled for a Cortex-M board and run under QEMU, with the
    instructions of every ``distillc_detect`` and ``distillc_detect_output`` call."""
    bundle_dir = Path(bundle_dir).resolve()
    board = get_board(machine)
    header, sources = _check_bundle(bundle_dir)
    rows = _as_rows(inputs, header)
    arm_gcc, qemu = (find_tool(tool) for tool in ("arm-none-eabi-gcc", "qemu-system-arm"))
    check_newlib(arm_gcc)
    build = _prepare_detect_dir(Path(workdir) / f"{machine}-detect", rows, cases)
    elf = build / "detect.elf"
    files, defines = MPS2_FILES, ()
    if board.chip is not None:
        chip = get_chip(board.chip)
        files = _write_chip_files(chip, bundle_arena_bank(bundle_dir, chip), build / "board", qemu=True)
        defines = ("-DDISTILLC_SEMIHOSTING",)
    _link_elf(arm_gcc, board, bundle_dir, sources, build, elf, stack_bytes, files=files, defines=defines)
    result = run_tool(board.qemu_command(qemu, elf), what=f"the bundle's detection program on QEMU {machine} ({elf})",
                      timeout=timeout)
    where = f"QEMU {machine}"
    run = _parse_detections(result, rows, header, cases, where=where, machine=machine)
    counts = {(int(m.group(1)), int(m.group(2))): (int(m.group(3)), int(m.group(4)))
              for m in _DETECT_INSTRUCTIONS.finditer(result.stdout)}
    _, _, stack = _parse_report(result, len(rows), header, where=where)
    if len(counts) != len(rows) * len(cases) or stack is None:
        raise DistillcError(f"the bundle's detection program on {where} printed no instruction counts or stack use\n"
                            f"{excerpt(result.stdout)}")
    if stack[0] >= stack[1]:
        raise DistillcError(f"the detection program overflowed its {stack[1]}-byte stack on {where}: run it with a "
                            f"larger stack_bytes")
    return DetectionRun(outputs=run.outputs, cases=run.cases, detect=run.detect, detect_output=run.detect_output,
                        machine=machine, instructions=counts)


def _prepare_detect_dir(build: Path, rows: np.ndarray, cases: list[tuple[int, int, int]]) -> Path:
    """A build directory with the detection program, its inputs and detect_config.h (the cases)."""
    if not cases:
        raise DistillcError("the detection program needs at least one (dim, threshold, max_out) case")
    build = _prepare_build_dir(build, rows)
    shutil.copyfile(DETECT_MAIN, build / "main.c")
    shutil.copyfile(EXAMPLE_MAIN, build / "example_main.c")  # detect_main.c includes it
    lines = ", ".join(f"{{{int(d)}, {int(t)}, {int(m)}}}" for d, t, m in cases)
    array = max(1, *(int(m) for _, _, m in cases))
    (build / "detect_config.h").write_text(
        "/* Cases of the detection program (dim, score threshold Q15, max_out), written by distillc. */\n"
        "#ifndef DISTILLC_DETECT_CONFIG_H\n#define DISTILLC_DETECT_CONFIG_H\n\n#include <stdint.h>\n\n"
        f"#define DISTILLC_DETECT_RUN_CASES {len(cases)}\n#define DISTILLC_DETECT_RUN_ARRAY {array}\n"
        f"static const int32_t distillc_detect_run_cases[{len(cases)}][3] = {{{lines}}};\n\n"
        "#endif /* DISTILLC_DETECT_CONFIG_H */\n")
    return build


_DETECT = re.compile(r"^distillc-detect(-output)? (\d+) (\d+): (-?\d+)((?: -?\d+)*)$", re.M)
_DETECT_INSTRUCTIONS = re.compile(r"^distillc-detect-instructions (\d+) (\d+): (\d+) (\d+)$", re.M)


def _parse_detections(result: subprocess.CompletedProcess[str], rows: np.ndarray, header: ModelHeader,
                      cases: list[tuple[int, int, int]], *, where: str, machine: str = "host") -> DetectionRun:
    outputs, _, _ = _parse_report(result, len(rows), header, where=where)
    found: dict[bool, dict[tuple[int, int], tuple[int, np.ndarray]]] = {False: {}, True: {}}
    for match in _DETECT.finditer(result.stdout):
        count = int(match.group(4))
        values = np.array(match.group(5).split(), dtype=np.int64)
        if values.size != 6 * max(count, 0):
            raise DistillcError(f"the bundle's detection program on {where} printed {values.size} values for "
                                f"{count} detections\n{excerpt(result.stdout)}")
        found[bool(match.group(1))][(int(match.group(2)), int(match.group(3)))] = (count, values.reshape(-1, 6))
    if any(len(found[k]) != len(rows) * len(cases) for k in found):
        raise DistillcError(f"the bundle's detection program on {where} did not print detections for each of "
                            f"{len(rows)} inputs and {len(cases)} cases\n{excerpt(result.stdout)}")
    return DetectionRun(outputs=outputs, cases=tuple(tuple(int(v) for v in c) for c in cases), detect=found[False],
                        detect_output=found[True], machine=machine)


_TRACE_CALL = re.compile(r"\bdistillc_trace\((\d+),")


def _count_layers(arm_gcc: str, qemu: str, board: Board, bundle_dir: Path, sources: list[Path],
                  objects: dict[Path, Path], rows: np.ndarray, header: ModelHeader, outputs: np.ndarray,
                  workdir: Path, stack_bytes: int, files: BoardFiles, defines: tuple[str, ...],
                  timeout: float) -> LayerCounts:
    """Rebuilds the sources that call the trace hook (the executor) with ``-DDISTILLC_TRACE``,
    links them with the plain build's other objects and layer_main.c, and runs ``rows`` again."""
    traced = {source: [int(n) for n in _TRACE_CALL.findall(source.read_text(errors="replace"))]
              for source in sources}
    steps = sorted(n for calls in traced.values() for n in calls)
    if not steps or steps != list(range(len(steps))):
        raise DistillcError(f"{bundle_dir} cannot be counted per layer: its sources do not call "
                            f"distillc_trace(0 .. n-1, ...) once per kernel (not a distillc executor)")
    build = _prepare_build_dir(workdir, rows)
    shutil.copyfile(LAYER_MAIN, build / "main.c")
    elf = build / "layers.elf"
    _link_elf(arm_gcc, board, bundle_dir, sources, build, elf, stack_bytes, files=files,
              defines=(*defines, "-DDISTILLC_TRACE", f"-DDISTILLC_TRACE_STEPS={len(steps)}"),
              reuse={source: obj for source, obj in objects.items() if not traced[source]})
    result = run_tool(board.qemu_command(qemu, elf),
                      what=f"the bundle's per-layer counting program on QEMU {board.machine} ({elf})",
                      timeout=timeout)
    where = f"QEMU {board.machine} (per-layer counting build)"
    traced_outputs, totals, _ = _parse_report(result, len(rows), header, where=where)
    per_input = [tuple(int(v) for v in m.group(2).split()) for m in _LAYER_INSTRUCTIONS.finditer(result.stdout)]
    if len(per_input) != len(rows) or len(totals) != len(rows) or any(len(c) != len(steps) for c in per_input):
        raise DistillcError(f"the bundle's per-layer counting program on {where} did not print {len(steps)} "
                            f"counts for each of {len(rows)} inputs\n{excerpt(result.stdout)}")
    if not np.array_equal(traced_outputs, outputs):
        raise DistillcError(f"the bundle's per-layer counting build computed other outputs than the plain build "
                            f"on {where}: the executor compiles differently with -DDISTILLC_TRACE")
    return LayerCounts(instructions=tuple(per_input), totals=tuple(totals), resolution=board.instructions_per_tick,
                       elf_path=elf)


@dataclass(frozen=True)
class ChipLink:
    """The example program linked for a real STM32 part's memory map, and where things landed."""

    elf_path: Path
    chip: str
    arena_bank: str  # the bank the linker script puts the arena in
    arena_address: int | None  # distillc_arena's address (None: the model needs no arena)
    arena_bytes: int
    arena_region: str | None  # the region of the part that holds that address
    weights: dict[str, int]  # distillc_w* symbol -> address
    weights_in_flash: bool  # every weight array lies in the part's flash
    flash_bytes: int  # text + data of the whole program
    sections: dict[str, tuple[int, int]]  # allocated section -> (address, size)


def link_for_chip(bundle_dir: Path, workdir: Path, chip_name: str, *, arena_bank: str | None = None,
                  stack_bytes: int = DEFAULT_STACK_BYTES) -> ChipLink:
    """Links the bundle with its example program (one input at the zero point, no counter, no
    semihosting) for ``chip_name``'s real memory map, with the linker script and startup code
    the bundle ships (targets/<part>/; distillc's own when the bundle has none or ``arena_bank``
    is given), and reads back (arm-none-eabi-nm, -readelf) where the arena and the
    weights landed.  ``arena_bank``: the bank to link the arena into (default: the bundle's)."""
    bundle_dir = Path(bundle_dir).resolve()
    chip = get_chip(chip_name)
    header, sources = _check_bundle(bundle_dir)
    arm_gcc, arm_size, arm_nm, arm_readelf = (find_tool(tool) for tool in (
        "arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "arm-none-eabi-readelf"))
    check_newlib(arm_gcc)
    bank = arena_bank or bundle_arena_bank(bundle_dir, chip)
    build = _prepare_build_dir(Path(workdir) / chip.name,
                               np.full((1, header.input_size), header.input_zero_point, dtype=np.int8))
    shipped = bundle_dir / chip_files_dir(chip)
    if arena_bank is None and (shipped / f"{chip.name}.ld").is_file():  # the files the bundle ships
        files = BoardFiles(startup=shipped / f"startup_{chip.name}.c", linker_script=shipped / f"{chip.name}.ld",
                           include_dir=shipped)
    else:
        files = _write_chip_files(chip, bank, build / "board", qemu=False)
    board = Board(machine="", cpu="", make_target=chip.name, description=f"the {chip.part}",
                  cpu_flags=chip.cpu_flags, chip=chip.name)
    elf = build / "example.elf"
    _link_elf(arm_gcc, board, bundle_dir, sources, build, elf, stack_bytes, files=files, counter=False,
              link_flags=CHIP_LINK_FLAGS)
    flash_bytes, _ = _elf_size(arm_size, elf)
    symbols = {}
    for line in run_tool([arm_nm, elf], what="arm-none-eabi-nm", timeout=60).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    sections = {}
    for match in re.finditer(r"^\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]{8})\s+[0-9a-f]+\s+([0-9a-f]+)\s+\S+\s+(\S*A\S*)",
                             run_tool([arm_readelf, "-SW", elf], what="arm-none-eabi-readelf",
                                      timeout=60).stdout, flags=re.M):
        sections[match.group(1)] = (int(match.group(2), 16), int(match.group(3), 16))
    arena = symbols.get("distillc_arena")
    regions = [(b.region, b.origin, b.bytes) for b in chip.banks] + [
        (region, origin, kb * 1024) for region, origin, kb, _ in chip.other_regions]
    arena_region = next((name for name, origin, size in regions if arena is not None
                         and origin <= arena < origin + size), None)
    weights = {name: address for name, address in symbols.items() if re.fullmatch(r"distillc_w\d+", name)}
    flash_end = chip.flash_origin + chip.flash_kb * 1024
    return ChipLink(elf_path=elf, chip=chip.name, arena_bank=bank, arena_address=arena,
                    arena_bytes=read_arena_bytes(bundle_dir), arena_region=arena_region, weights=weights,
                    weights_in_flash=all(chip.flash_origin <= a < flash_end for a in weights.values()),
                    flash_bytes=flash_bytes, sections=sections)


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


@dataclass(frozen=True)
class BoardFiles:
    """The startup code, linker script and folder of board.h that a Cortex-M link uses."""

    startup: Path
    linker_script: Path
    include_dir: Path


MPS2_FILES = BoardFiles(startup=CORTEX_M_DIR / "startup.c", linker_script=CORTEX_M_DIR / "mps2.ld",
                        include_dir=CORTEX_M_DIR)


def _write_chip_files(chip: Chip, arena_bank: str, folder: Path, *, qemu: bool) -> BoardFiles:
    """An STM32 part's startup code and linker script (the QEMU variant: ``qemu``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    startup = folder / f"startup_{chip.name}.c"
    startup.write_text(render_startup(chip))
    script = folder / f"{chip.name}{'-qemu' if qemu else ''}.ld"
    script.write_text(render_linker_script(chip, arena_bank, qemu=qemu))
    if qemu:
        shutil.copyfile(STM32_DIR / "board.h", folder / "board.h")
        shutil.copyfile(CORTEX_M_DIR / "board_stack.h", folder / "board_stack.h")
    return BoardFiles(startup=startup, linker_script=script, include_dir=folder)


def bundle_arena_bank(bundle_dir: Path, chip: Chip) -> str:
    """The RAM bank of ``chip`` a bundle's arena goes to: the one its manifest records
    (``memory.arena_bank``, chosen by codegen.c), else where ``auto`` puts DISTILLC_ARENA_BYTES."""
    manifest = Path(bundle_dir) / "manifest.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("memory", {}).get("arena_bank")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise DistillcError(f"{manifest} is not a distillc manifest: {exc}") from None
        if recorded is not None:
            if recorded not in chip.bank_keys():
                raise DistillcError(f"{manifest}: memory.arena_bank is {recorded!r}, which the {chip.part} "
                                    f"does not have (its banks: {', '.join(chip.bank_keys())}); the bundle "
                                    f"was compiled for another part")
            return recorded
    return chip.place_arena(read_arena_bytes(bundle_dir), "auto").key


def _link_elf(arm_gcc: str, board: Board, bundle_dir: Path, sources: list[Path], build: Path,
              elf: Path, stack_bytes: int, *, files: BoardFiles = MPS2_FILES,
              defines: tuple[str, ...] = (), counter: bool = True,
              link_flags: tuple[Flag, ...] = ARM_LINK_FLAGS, reuse: dict[Path, Path] | None = None) -> list[Path]:
    """Compiles the bundle's sources to objects, links them with the example program, and
    returns the bundle's objects (their sizes are the model's own flash).

    ``counter``: the example measures with board.h (-DDISTILLC_BOARD); ``defines`` are added;
    ``reuse``: sources already compiled (by a build with the same flags), with their objects."""
    if stack_bytes <= 0 or stack_bytes % 8:
        raise DistillcError(f"stack_bytes must be a positive multiple of 8, not {stack_bytes}")
    arm_flags = [flag for flag in ARM_FLAGS if counter or flag.value != "-DDISTILLC_BOARD"]
    compile_flags = [*command_line(board.cpu_flags), *command_line(arm_flags), *defines, *command_line(C_FLAGS),
                     f"-I{bundle_dir / 'include'}", f"-I{files.include_dir}"]
    objects_dir = build / "bundle-objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    reuse = reuse or {}
    objects = [reuse.get(source, objects_dir / f"{source.stem}.o") for source in sources]
    for source, obj in zip(sources, objects):
        if source in reuse:
            continue
        run_tool([arm_gcc, *compile_flags, "-c", source, "-o", obj],
                 what=f"compiling {source} for {board.description} with arm-none-eabi-gcc",
                 timeout=COMPILE_TIMEOUT_S)
    run_tool([arm_gcc, *compile_flags, build / "main.c", *objects, files.startup,
              *command_line(link_flags), "-T", files.linker_script,
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
_LAYER_INSTRUCTIONS = re.compile(r"^distillc-layer-instructions (\d+):((?: \d+)*)$", re.M)
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
