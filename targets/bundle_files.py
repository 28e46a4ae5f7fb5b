"""The files that make a bundle build and run on its own: the example program and its inputs,
a Makefile and a CMakeLists.txt, and the startup code and linker script of the MPS2 boards.

Layout they add to a bundle (beside include/ and src/, which the code generator writes):

    Makefile  CMakeLists.txt
    examples/main.c  examples/input_data.h
    targets/mps2/startup.c  board.h  board_stack.h  mps2.ld  arm-none-eabi.cmake
    targets/<part>/<part>.ld  startup_<part>.c  <part>.cmake    (an STM32 target: the real part's
                                                                 map; see targets/stm32.py)
"""

from __future__ import annotations

import ast
import operator
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DistillcError
from .stm32 import Chip, chip_bundle_files, chip_files_dir, get_chip
from .toolchain import (ARM_FLAGS, ARM_LINK_FLAGS, BOARDS, C_FLAGS, CHIP_LINK_FLAGS, CORTEX_M_DIR, LIBS,
                        MPS2_BOARDS, QEMU_FLAGS, Flag, command_line)

#: Where the board files go inside a bundle, and which files they are.
BUNDLE_BOARD_DIR = Path("targets") / "mps2"
BOARD_FILES = ("startup.c", "board.h", "board_stack.h", "mps2.ld", "arm-none-eabi.cmake")
#: The example program, for the bundle and for distillc's runner alike.
EXAMPLE_MAIN = CORTEX_M_DIR / "example_main.c"
TRACE_MAIN = CORTEX_M_DIR / "trace_main.c"  # host debug build: every kernel's output (runner.trace_on_host)
LAYER_MAIN = CORTEX_M_DIR / "layer_main.c"  # board build: instructions per kernel call (runner.run_on_qemu)

MODEL_HEADER = Path("include") / "distillc_model.h"


@dataclass(frozen=True)
class ModelHeader:
    """What the build needs from a bundle's include/distillc_model.h."""

    input_size: int  # int8 elements of one input
    output_size: int  # int8 elements of one output
    input_zero_point: int


def read_model_header(bundle_dir: Path) -> ModelHeader:
    """Reads the integer #defines of ``bundle_dir/include/distillc_model.h``."""
    integer = _header_integers(bundle_dir)
    path = Path(bundle_dir) / MODEL_HEADER
    header = ModelHeader(input_size=integer("DISTILLC_INPUT_SIZE"),
                         output_size=integer("DISTILLC_OUTPUT_SIZE"),
                         input_zero_point=integer("DISTILLC_INPUT_ZERO_POINT"))
    if header.input_size <= 0 or header.output_size <= 0:
        raise DistillcError(f"{path}: DISTILLC_INPUT_SIZE and DISTILLC_OUTPUT_SIZE must be positive")
    return header


def read_arena_bytes(bundle_dir: Path) -> int:
    """DISTILLC_ARENA_BYTES of ``bundle_dir/include/distillc_model.h``."""
    return _header_integers(bundle_dir)("DISTILLC_ARENA_BYTES")


def _header_integers(bundle_dir: Path):
    """A function that reads one integer #define of the bundle's header (a DistillcError if absent)."""
    path = Path(bundle_dir) / MODEL_HEADER
    if not path.is_file():
        raise DistillcError(f"{bundle_dir} is not a distillc bundle: {MODEL_HEADER} is missing")
    defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(DISTILLC_\w+)[ \t]+(.+)$",
                              _strip_comments(path.read_text()), flags=re.M))

    def integer(name: str) -> int:
        if name not in defines:
            raise DistillcError(f"{path}: #define {name} is missing")
        try:
            return _c_integer(defines[name])
        except ValueError:
            raise DistillcError(f"{path}: {name} is {defines[name].strip()!r}, "
                                "not an integer constant") from None

    return integer


def render_input_data(inputs: np.ndarray) -> str:
    """input_data.h for the example program: ``inputs`` (int8, one row per example)."""
    inputs = np.asarray(inputs)
    if inputs.dtype != np.int8 or inputs.ndim < 1 or inputs.shape[0] == 0:
        raise DistillcError(f"example inputs must be a non-empty int8 array with one example "
                            f"per row, not {inputs.dtype} of shape {inputs.shape}")
    rows = inputs.reshape(inputs.shape[0], -1)
    count, size = rows.shape
    per_line = 32
    body = []
    for row in rows.tolist():
        lines = (", ".join(map(str, row[k:k + per_line])) for k in range(0, size, per_line))
        body.append("    {\n        " + ",\n        ".join(lines) + "\n    },")
    return "\n".join([
        "/* Inputs of the example program (examples/main.c), written by distillc:",
        " * int8, quantized as DISTILLC_INPUT_SCALE and DISTILLC_INPUT_ZERO_POINT say. */",
        "#ifndef DISTILLC_INPUT_DATA_H",
        "#define DISTILLC_INPUT_DATA_H",
        "",
        "#include <stdint.h>",
        "",
        f"#define DISTILLC_EXAMPLE_COUNT {count}",
        f"#define DISTILLC_EXAMPLE_INPUT_SIZE {size} /* main.c checks it against the model's */",
        "",
        f"static const int8_t distillc_example_inputs[{count}][{size}] = {{",
        *body,
        "};",
        "",
        "#endif /* DISTILLC_INPUT_DATA_H */",
        "",
    ])


def write_bundle_build_files(bundle_dir: Path, *, name: str,
                             example_inputs: np.ndarray | None = None, chip: str | None = None,
                             arena_bank: str | None = None) -> list[Path]:
    """Writes the build files into a bundle whose include/ and src/ exist; returns their paths.

    ``name`` names the programs the builds make.  ``example_inputs`` (int8, one example per
    row) become examples/input_data.h; by default one input at the zero point (an all-zero
    float input), so that ``make`` works out of the box.  ``chip`` (an STM32 part of
    targets/stm32.py) adds its linker script, startup code and CMake toolchain file with the
    arena in ``arena_bank``, and Makefile and CMake rules that build for its memory map.
    """
    bundle_dir = Path(bundle_dir)
    header = read_model_header(bundle_dir)
    program = _program_name(name)
    if example_inputs is None:
        example_inputs = np.full((1, header.input_size), header.input_zero_point, dtype=np.int8)
    example_size = int(np.prod(np.shape(example_inputs)[1:], dtype=np.int64))
    if example_size != header.input_size:
        raise DistillcError(f"example inputs have {example_size} values each, the model takes "
                            f"DISTILLC_INPUT_SIZE = {header.input_size}")

    part = get_chip(chip) if chip is not None else None
    if part is not None and arena_bank is None:
        arena_bank = part.place_arena(read_arena_bytes(bundle_dir), "auto").key
    values = _template_values(program, part)
    contents: dict[Path, str] = {
        Path("examples") / "main.c": EXAMPLE_MAIN.read_text(),
        Path("examples") / "input_data.h": render_input_data(example_inputs),
        Path("Makefile"): _fill(CORTEX_M_DIR / "Makefile.in",
                                {**values, "BOARDS": _make_boards(),
                                 "CHIPS": _make_chip(part, program) if part else ""}),
        Path("CMakeLists.txt"): _fill(CORTEX_M_DIR / "CMakeLists.txt.in",
                                      {**values, "BOARDS": _cmake_boards(),
                                       "CHIPS": _cmake_chip(part, program) if part else ""}),
    }
    for file in BOARD_FILES:
        contents[BUNDLE_BOARD_DIR / file] = (CORTEX_M_DIR / file).read_text()
    if part is not None:
        contents.update(chip_bundle_files(part, arena_bank))

    written = []
    for relative, text in contents.items():
        path = bundle_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _template_values(program: str, chip: Chip | None = None) -> dict[str, str]:
    """What the Makefile and CMakeLists.txt templates share: the name, the flags and their
    reasons (``@C_FLAGS@`` and ``@C_FLAGS_DOC@``), the targets."""
    targets = ["host", *(board.make_target for board in MPS2_BOARDS.values()), *([chip.name] if chip else [])]
    values = {"NAME": program, "TARGETS": ", ".join(targets[:-1]) + " or " + targets[-1]}
    groups = {"C_FLAGS": C_FLAGS, "LIBS": LIBS, "ARM_FLAGS": ARM_FLAGS,
              "ARM_LINK_FLAGS": ARM_LINK_FLAGS, "QEMU_FLAGS": QEMU_FLAGS}
    for key, flags in groups.items():
        values[key] = " ".join(flag.value for flag in flags)
        values[f"{key}_DOC"] = _flag_comments(flags)
    return values


def _fill(template: Path, values: dict[str, str]) -> str:
    """A template with each ``@KEY@`` replaced; a placeholder alone on its line may stand for
    several lines, which keep its indentation."""
    text = re.sub(r"^([ \t]*)@([A-Z_]+)@$",
                  lambda match: textwrap.indent(values[match.group(2)], match.group(1)),
                  template.read_text(), flags=re.M)
    return re.sub(r"@([A-Z_]+)@", lambda match: values[match.group(1)], text)


def _flag_comments(flags: Sequence[Flag]) -> str:
    width = max(20, *(len(flag.value) for flag in flags))
    return "\n".join(f"#   {flag.value:<{width}}  {flag.why}" for flag in flags)


def _make_boards() -> str:
    return "\n".join("\n".join([
        f"# {board.make_target}: {board.description}",
        _flag_comments(board.cpu_flags),
        f"ifeq ($(MCU),{board.make_target})",
        f"MACHINE := {board.machine}",
        f"QEMU_CPU := {board.cpu}",
        f"MCU_FLAGS := {' '.join(command_line(board.cpu_flags))}",
        "endif",
    ]) for board in MPS2_BOARDS.values())


def _cmake_boards() -> str:
    return "\n".join("\n".join([
        f"# {board.make_target}: {board.description}",
        _flag_comments(board.cpu_flags),
        f'if(DISTILLC_TARGET STREQUAL "{board.make_target}")',
        f"  set(DISTILLC_MCU_FLAGS {' '.join(command_line(board.cpu_flags))})",
        "endif()",
    ]) for board in MPS2_BOARDS.values())


def _chip_flags(chip: Chip) -> list[str]:
    """Compiler flags of a build for an STM32 part (the MPS2 counter left out)."""
    return [*command_line(chip.cpu_flags), *command_line([f for f in ARM_FLAGS if f.value != "-DDISTILLC_BOARD"])]


def _make_chip(chip: Chip, program: str) -> str:
    """Makefile rules for an STM32 part's real memory map (and its QEMU board, if it has one)."""
    folder = chip_files_dir(chip).as_posix()
    var = chip.name.upper()
    flags = " ".join(_chip_flags(chip))
    link = " ".join(command_line(CHIP_LINK_FLAGS))
    lines = [
        "",
        f"# {chip.part} ({chip.core}): ST's memory map, {folder}/{chip.name}.ld (the arena's bank is named there)",
        f"#   make {chip.name}        the example for the real part -> build/{chip.name}/{program}.elf",
        "#                         (no semihosting, no counter: flash it with your debugger, or read",
        "#                         `make size-" + chip.name + "`; define _write to see its printf)",
    ]
    if chip.qemu_machine:
        lines += [
            f"#   make run-{chip.name}-qemu  the same map on QEMU's {chip.qemu_machine} ({folder}/{chip.name}-qemu.ld),",
            "#                         semihosting on, instructions counted with board.h",
        ]
    lines += [
        f"#   -nostartfiles ... : {'; '.join(flag.why for flag in CHIP_LINK_FLAGS)}",
        f"{var}_DIR := {folder}",
        f"{var}_FLAGS := {flags}",
        f"{var}_ELF := build/{chip.name}/{program}.elf",
        f"{var}_DEPS := $(SOURCES) $(HEADERS) $({var}_DIR)/startup_{chip.name}.c $({var}_DIR)/{chip.name}.ld",
        f".PHONY: {chip.name} size-{chip.name}",
        f"{chip.name}: $({var}_ELF)",
        f"$({var}_ELF): $({var}_DEPS)",
        "	@mkdir -p $(@D)",
        f"	$(ARM_CC) $({var}_FLAGS) $(CFLAGS) $(CPPFLAGS) $(SOURCES) $({var}_DIR)/startup_{chip.name}.c \\",
        f"		{link} -T $({var}_DIR)/{chip.name}.ld -Wl,--defsym=__stack_size=$(STACK_SIZE) \\",
        "		-Wl,-Map=$(@:.elf=.map) -o $@ $(LDLIBS)",
        f"size-{chip.name}: $({var}_ELF)",
        f"	$(ARM_SIZE) -A $({var}_ELF)",
    ]
    if chip.qemu_machine:
        board = next(b for b in BOARDS.values() if b.chip == chip.name)
        arm_link = " ".join(command_line(ARM_LINK_FLAGS))
        lines += [
            f"{var}_QEMU_ELF := build/{chip.name}-qemu/{program}.elf",
            f".PHONY: {chip.name}-qemu run-{chip.name}-qemu",
            f"{chip.name}-qemu: $({var}_QEMU_ELF)",
            f"$({var}_QEMU_ELF): $({var}_DEPS) $({var}_DIR)/{chip.name}-qemu.ld $({var}_DIR)/board.h $({var}_DIR)/board_stack.h",
            "	@mkdir -p $(@D)",
            f"	$(ARM_CC) $({var}_FLAGS) -DDISTILLC_BOARD -DDISTILLC_SEMIHOSTING -I$({var}_DIR) $(CFLAGS) $(CPPFLAGS) \\",
            f"		$(SOURCES) $({var}_DIR)/startup_{chip.name}.c {arm_link} -T $({var}_DIR)/{chip.name}-qemu.ld \\",
            "		-Wl,--defsym=__stack_size=$(STACK_SIZE) -Wl,-Map=$(@:.elf=.map) -o $@ $(LDLIBS)",
            f"run-{chip.name}-qemu: $({var}_QEMU_ELF)",
            f"	$(QEMU) -machine {board.machine} -cpu {board.cpu} $(QEMU_FLAGS) -kernel $({var}_QEMU_ELF) </dev/null",
        ]
    return "\n".join(lines)


def _cmake_chip(chip: Chip, program: str) -> str:
    """The CMakeLists.txt branch that builds for an STM32 part's real memory map."""
    flags = " ".join(_chip_flags(chip))
    link = " ".join(command_line(CHIP_LINK_FLAGS))
    folder = chip_files_dir(chip).as_posix()
    return "\n".join([
        f'elseif(DISTILLC_TARGET STREQUAL "{chip.name}")',
        f"  # {chip.part} ({chip.core}): ST's memory map ({folder}/{chip.name}.ld); no semihosting, no counter",
        f"  set(DISTILLC_CHIP_DIR ${{CMAKE_CURRENT_SOURCE_DIR}}/{folder})",
        f"  target_sources({program} PRIVATE ${{DISTILLC_CHIP_DIR}}/startup_{chip.name}.c)",
        f"  target_compile_options({program} PRIVATE {flags})",
        f"  target_link_options({program} PRIVATE {' '.join(command_line(chip.cpu_flags))} {link}",
        f"    -T ${{DISTILLC_CHIP_DIR}}/{chip.name}.ld -Wl,--defsym=__stack_size=${{DISTILLC_STACK_SIZE}})",
        f"  set_target_properties({program} PROPERTIES SUFFIX .elf LINK_DEPENDS ${{DISTILLC_CHIP_DIR}}/{chip.name}.ld)",
    ])


def _program_name(name: str) -> str:
    """``name`` as a file and CMake target name: letters, digits, '_', '-' and '.'."""
    program = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")
    if not program:
        raise DistillcError(f"bundle name {name!r} has no letters or digits to name a program by")
    return program


def _strip_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", " ", source, flags=re.S)
    return re.sub(r"//[^\n]*", "", source)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def _c_integer(text: str) -> int:
    """The value of a C integer constant expression such as ``(-3)``, ``3072u`` or ``(3*32*32)``;
    ValueError for anything else."""
    expression = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", text.strip())

    def evaluate(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError(text)

    try:
        return evaluate(ast.parse(expression, mode="eval").body)
    except SyntaxError:
        raise ValueError(text) from None
