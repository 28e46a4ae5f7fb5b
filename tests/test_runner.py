"""The runner builds a bundle's C code and runs it on the host and on QEMU's Cortex-M boards;
the build files make a bundle build on its own.  A fake bundle stands in for a compiled model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from distillc.errors import DistillcError
from distillc.targets import toolchain
from distillc.targets.bundle_files import read_model_header, write_bundle_build_files
from distillc.targets.runner import run_on_host, run_on_qemu

INPUT_SHAPE = (3, 4, 4)
INPUT_SIZE = 48
OUTPUT_SIZE = 10

FAKE_HEADER = f"""\
#ifndef DISTILLC_MODEL_H
#define DISTILLC_MODEL_H
#include <stdint.h>
#define DISTILLC_INPUT_SIZE (3 * 4 * 4)
#define DISTILLC_OUTPUT_SIZE {OUTPUT_SIZE}
#define DISTILLC_INPUT_SCALE 0.5f
#define DISTILLC_OUTPUT_SCALE 0.25f
#define DISTILLC_INPUT_ZERO_POINT (-3)
#define DISTILLC_OUTPUT_ZERO_POINT 2
#define DISTILLC_ARENA_BYTES 64
int distillc_model_run(const int8_t *input, int8_t *output);
int distillc_model_run_float(const float *input, float *output);
#endif
"""

# output[i] = saturate(input[i % IN] * 2 + i), computed FAKE_REPEAT times in float (so the FPU
# must be on).  A first input value of 127 makes it fail, -128 divides by zero, and -127 uses
# 8 KiB of stack.
FAKE_MODEL = """\
#include <math.h>
#include "distillc_model.h"

#define FAKE_REPEAT {repeat}

static int8_t saturate(int32_t v)
{{
    return (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
}}

__attribute__((noinline)) static int8_t deep_stack(const int8_t *input)
{{
    volatile int8_t scratch[8192];
    for (int i = 0; i < 8192; ++i) {{
        scratch[i] = input[i % DISTILLC_INPUT_SIZE];
    }}
    return scratch[8191];
}}

int distillc_model_run(const int8_t *input, int8_t *output)
{{
    if (input[0] == 127) {{
        return 7;
    }}
    if (input[0] == -128) {{
        volatile int zero = 0;
        return input[1] / zero;
    }}
    if (input[0] == -127) {{
        deep_stack(input);
    }}
    for (int i = 0; i < DISTILLC_OUTPUT_SIZE; ++i) {{
        volatile float y = 0.0f;
        for (int r = 0; r < FAKE_REPEAT; ++r) {{
            y = (float)input[i % DISTILLC_INPUT_SIZE] * 2.0f + (float)i;
        }}
        output[i] = saturate((int32_t)y);
    }}
    return 0;
}}

int distillc_model_run_float(const float *input, float *output)
{{
    int8_t q[DISTILLC_INPUT_SIZE];
    int8_t o[DISTILLC_OUTPUT_SIZE];
    for (int i = 0; i < DISTILLC_INPUT_SIZE; ++i) {{
        q[i] = saturate((int32_t)lrintf(input[i] / DISTILLC_INPUT_SCALE) + DISTILLC_INPUT_ZERO_POINT);
    }}
    const int status = distillc_model_run(q, o);
    for (int i = 0; i < DISTILLC_OUTPUT_SIZE; ++i) {{
        output[i] = (float)(o[i] - DISTILLC_OUTPUT_ZERO_POINT) * DISTILLC_OUTPUT_SCALE;
    }}
    return status;
}}
"""


def make_fake_bundle(root: Path, *, repeat: int = 1) -> Path:
    bundle = root / f"bundle-repeat{repeat}"
    (bundle / "include").mkdir(parents=True)
    (bundle / "src").mkdir()
    (bundle / "include" / "distillc_model.h").write_text(FAKE_HEADER)
    (bundle / "src" / "model.c").write_text(FAKE_MODEL.format(repeat=repeat))
    return bundle


def reference(inputs: np.ndarray) -> np.ndarray:
    rows = inputs.reshape(len(inputs), -1).astype(np.int32)
    i = np.arange(OUTPUT_SIZE)
    return np.clip(rows[:, i % INPUT_SIZE] * 2 + i, -128, 127).astype(np.int8)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_fake_bundle(tmp_path)


@pytest.fixture
def inputs() -> np.ndarray:
    # Values away from the fake model's special first values (127, -128, -127).
    return np.random.default_rng(0).integers(-100, 100, size=(5, *INPUT_SHAPE), dtype=np.int8)


def test_host_run_matches_reference(bundle, inputs, tmp_path):
    outputs = run_on_host(bundle, inputs, tmp_path / "work")
    assert outputs.dtype == np.int8
    np.testing.assert_array_equal(outputs, reference(inputs))


def test_qemu_run_matches_reference_and_measures_the_program(bundle, inputs, tmp_path):
    run = run_on_qemu(bundle, inputs, tmp_path / "work")
    np.testing.assert_array_equal(run.outputs, reference(inputs))
    assert len(run.instructions) == len(inputs)
    assert all(count > 0 for count in run.instructions)
    assert run.instructions_per_inference in run.instructions
    assert run.elf_path.is_file()
    assert run.flash_bytes > 0 and run.ram_bytes > 32 * 1024  # the reserved stack counts
    assert 0 < run.model_flash_bytes < run.flash_bytes  # the model alone: no newlib, no start-up
    assert 0 < run.stack_bytes < 32 * 1024


def test_instruction_counts_are_identical_across_runs(bundle, inputs, tmp_path):
    first = run_on_qemu(bundle, inputs, tmp_path / "first")
    second = run_on_qemu(bundle, inputs, tmp_path / "second")
    assert first.instructions == second.instructions


def test_instruction_count_grows_with_the_work_the_model_does(tmp_path, inputs):
    light = run_on_qemu(make_fake_bundle(tmp_path, repeat=1), inputs, tmp_path / "light")
    heavy = run_on_qemu(make_fake_bundle(tmp_path, repeat=1000), inputs, tmp_path / "heavy")
    np.testing.assert_array_equal(heavy.outputs, light.outputs)
    # Each repetition is at least a store and a branch, for 10 outputs.
    assert heavy.instructions_per_inference > light.instructions_per_inference + 2 * 999 * 10


def test_cortex_m4_board_runs_the_bundle_too(bundle, inputs, tmp_path):
    run = run_on_qemu(bundle, inputs, tmp_path / "work", machine="mps2-an386")
    np.testing.assert_array_equal(run.outputs, reference(inputs))
    assert run.instructions_per_inference > 0


def test_unknown_machine_is_answered_with_the_valid_ones(bundle, inputs, tmp_path):
    with pytest.raises(DistillcError, match="mps2-an500"):
        run_on_qemu(bundle, inputs, tmp_path / "work", machine="stm32-nucleo")


def test_failing_model_is_a_clear_error_on_host_and_qemu(bundle, inputs, tmp_path):
    inputs[1].flat[0] = 127
    with pytest.raises(DistillcError) as host_error:
        run_on_host(bundle, inputs, tmp_path / "work")
    with pytest.raises(DistillcError) as qemu_error:
        run_on_qemu(bundle, inputs, tmp_path / "work")
    for error in (host_error, qemu_error):
        assert "exit status 1" in str(error.value)
        assert "distillc_model_run returned 7 on example 1" in str(error.value)


def test_fault_on_the_board_is_reported_not_hung(bundle, inputs, tmp_path):
    inputs[0].flat[0] = -128  # the fake model divides by zero, which traps on the board
    with pytest.raises(DistillcError) as error:
        run_on_qemu(bundle, inputs, tmp_path / "work", timeout=30)
    assert "exit status 3" in str(error.value)
    assert "HardFault" in str(error.value)


def test_stack_overflow_is_detected(bundle, inputs, tmp_path):
    inputs[0].flat[0] = -127  # 8 KiB of stack in the model
    with pytest.raises(DistillcError, match="overflowed its 4096-byte stack"):
        run_on_qemu(bundle, inputs, tmp_path / "work", stack_bytes=4096)


def test_qemu_timeout_is_reported(tmp_path, inputs):
    slow = make_fake_bundle(tmp_path, repeat=100_000_000)
    with pytest.raises(DistillcError, match="did not finish within 1 s"):
        run_on_qemu(slow, inputs, tmp_path / "work", timeout=1)


def test_compile_error_shows_the_compiler_output(bundle, inputs, tmp_path):
    (bundle / "src" / "broken.c").write_text("int broken(void) { return undeclared_name; }\n")
    with pytest.raises(DistillcError) as error:
        run_on_host(bundle, inputs, tmp_path / "work")
    assert "compiling" in str(error.value) and "undeclared_name" in str(error.value)


def test_warnings_fail_the_build(bundle, inputs, tmp_path):
    (bundle / "src" / "unused.c").write_text("int unused(int x) { int y; return x; }\n")
    with pytest.raises(DistillcError, match="unused variable"):
        run_on_host(bundle, inputs, tmp_path / "work")


def test_inputs_of_the_wrong_size_or_type_are_rejected(bundle, inputs, tmp_path):
    with pytest.raises(DistillcError, match="DISTILLC_INPUT_SIZE = 48"):
        run_on_host(bundle, inputs[:, :2], tmp_path / "work")
    with pytest.raises(DistillcError, match="int8"):
        run_on_host(bundle, inputs.astype(np.float32), tmp_path / "work")


def test_missing_tool_names_the_debian_package(bundle, inputs, tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(toolchain.shutil, "which",
                        lambda name: None if name == "qemu-system-arm" else real_which(name))
    with pytest.raises(DistillcError, match="install the Debian package qemu-system-arm"):
        run_on_qemu(bundle, inputs, tmp_path / "work")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DistillcError, match="install the Debian package gcc-arm-none-eabi"):
        toolchain.find_tool("arm-none-eabi-gcc")


def test_header_constants_may_be_expressions(bundle):
    header = read_model_header(bundle)
    assert (header.input_size, header.output_size, header.input_zero_point) == (48, 10, -3)


def _make(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["make", "-C", str(bundle), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_bundle_makefile_builds_and_runs_host_and_cortex_m7(bundle, inputs):
    written = write_bundle_build_files(bundle, name="fake model", example_inputs=inputs)
    assert {path.relative_to(bundle).as_posix() for path in written} >= {
        "Makefile", "CMakeLists.txt", "examples/main.c", "examples/input_data.h",
        "targets/mps2/startup.c", "targets/mps2/mps2.ld", "targets/mps2/board.h", "targets/mps2/board_stack.h"}

    host = _make(bundle)
    assert "-Werror" in host.stdout
    run = _make(bundle, "run")
    assert f"distillc-output 4: {' '.join(map(str, reference(inputs)[4]))}" in run.stdout

    m7 = _make(bundle, "m7")
    assert "-mcpu=cortex-m7" in m7.stdout and "-Werror" in m7.stdout
    assert (bundle / "build" / "cortex-m7" / "fake_model.elf").is_file()
    size = _make(bundle, "size")
    assert "flash:" in size.stdout and "RAM:" in size.stdout
    on_qemu = _make(bundle, "run-qemu")
    assert "distillc-instructions 4:" in on_qemu.stdout
    assert f"distillc-output 4: {' '.join(map(str, reference(inputs)[4]))}" in on_qemu.stdout


def test_bundle_default_example_is_one_input_at_the_zero_point(bundle):
    write_bundle_build_files(bundle, name="fake")
    run = _make(bundle, "run")
    zero_point_input = np.full((1, INPUT_SIZE), -3, dtype=np.int8)
    expected = " ".join(map(str, reference(zero_point_input)[0]))
    assert f"distillc-output 0: {expected}" in run.stdout


def test_makefile_exit_status_is_the_programs_on_qemu(bundle):
    failing = np.full((1, INPUT_SIZE), 127, dtype=np.int8)
    write_bundle_build_files(bundle, name="fake", example_inputs=failing)
    result = subprocess.run(["make", "-C", str(bundle), "run-qemu"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "distillc_model_run returned 7 on example 0" in result.stderr


def test_bundle_cmake_builds_host_and_cortex_m7(bundle, inputs):
    write_bundle_build_files(bundle, name="fake", example_inputs=inputs)
    for build, options in (("cmake-host", []), ("cmake-m7", [
            f"-DCMAKE_TOOLCHAIN_FILE={bundle / 'targets' / 'mps2' / 'arm-none-eabi.cmake'}"])):
        for command in (["cmake", "-S", str(bundle), "-B", str(bundle / "build" / build), *options],
                        ["cmake", "--build", str(bundle / "build" / build)]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
    host = subprocess.run([str(bundle / "build" / "cmake-host" / "fake")], capture_output=True,
                          text=True, timeout=30)
    assert f"distillc-output 4: {' '.join(map(str, reference(inputs)[4]))}" in host.stdout
    assert (bundle / "build" / "cmake-m7" / "fake.elf").is_file()
