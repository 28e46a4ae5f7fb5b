"""The STM32 targets: stm32h7 ships the STM32H743's linker script and startup (verified on QEMU's
mps2-an500, linked here for the H743 map), stm32f4 the STM32F405's, verified on QEMU's
netduinoplus2 at ST's addresses; the arena sits in its own section, in DTCM/CCM when it fits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from distillc.errors import SpecError, TargetError
from distillc.passes.backend import testing
from distillc.plan import build_plan
from distillc.plugin_manager import load_plugins
from distillc.progress import SilentProgress
from distillc.run import compile_spec
from distillc.spec import load_spec
from distillc.targets.bundle_files import write_bundle_build_files
from distillc.targets.runner import link_for_chip, run_on_qemu
from distillc.targets.stm32 import CHIPS
from tests.test_runner import make_fake_bundle, reference

H743, F405 = CHIPS["stm32h743"], CHIPS["stm32f405"]


def spec_text(target: str, options: str = "", name: str = "tiny") -> str:
    return (f'[distillc]\nspec_version = 1\nname = "{name}"\nseed = 0\n'
            f'[student]\nonnx = "student.onnx"\n[target]\nuse = "{target}"\n{options}\n'
            '[target.backend."verify.host"]\nimages = 2\nsqnr_images = 0\n'
            '[target.backend."verify.qemu"]\nimages = 2\n')


@pytest.fixture(scope="module")
def student(module_folder):
    testing.random_qcdq(0, module_folder / "student.onnx", in_channels=3, size=8)
    return module_folder


def compile_(folder: Path, target: str, options: str = "", name: str = "tiny"):
    path = folder / f"{name}.toml"
    path.write_text(spec_text(target, options, name))
    return compile_spec(path, progress=SilentProgress())


@pytest.fixture(scope="module")
def f4_bundle(student):
    return compile_(student, "stm32f4", name="f4").final_path


@pytest.fixture(scope="module")
def h7_bundle(student):
    return compile_(student, "stm32h7", name="h7").final_path


def _in(bank, address: int) -> bool:
    return bank.origin <= address < bank.origin + bank.bytes


def test_stm32f4_bundle_is_verified_on_netduinoplus2_with_st_addresses(f4_bundle):
    manifest = json.loads((f4_bundle / "manifest.json").read_text())
    qemu = manifest["verification"]["qemu"]
    assert qemu["machine"] == "netduinoplus2" and qemu["max_lsb"] <= 1 and qemu["images"] == 2
    assert qemu["instructions_per_inference"] > 1000  # TIM2: one tick per instruction
    assert "TIM2" in qemu["counter"] and "0x20020000" in qemu["memory_map"]
    assert manifest["memory"]["arena_bank"] == qemu["arena_bank"] == "ccm"
    assert manifest["target"]["chip"] == "stm32f405" and manifest["target"]["ram_kb"] == 128
    for name in ("stm32f405.ld", "stm32f405-qemu.ld", "startup_stm32f405.c", "stm32f405.cmake", "board.h", "board_stack.h"):
        assert (f4_bundle / "targets" / "stm32f405" / name).is_file()
    script = (f4_bundle / "targets" / "stm32f405" / "stm32f405.ld").read_text()
    assert "ORIGIN = 0x08000000, LENGTH = 1024K" in script and "CCM (rw) : ORIGIN = 0x10000000" in script
    assert 'REGION_ALIAS("ARENA_RAM", CCM)' in script


def test_the_f4_program_really_ran_at_the_parts_addresses(f4_bundle, tmp_path):
    """The ELF QEMU ran was linked at 0x08000000 (flash) and 0x20000000 (SRAM), not at 0."""
    shape = json.loads((f4_bundle / "manifest.json").read_text())["input"]["shape"]
    inputs = np.zeros((1, int(np.prod(shape[1:]))), dtype=np.int8)
    run = run_on_qemu(f4_bundle, inputs, tmp_path, machine="netduinoplus2")
    entry = subprocess.run(["arm-none-eabi-readelf", "-h", str(run.elf_path)], capture_output=True,
                           text=True, check=True).stdout
    assert "Entry point address:               0x80" in entry
    link = link_for_chip(f4_bundle, tmp_path, "stm32f405")
    assert link.arena_region == "CCM" and _in(F405.bank("ccm"), link.arena_address)
    assert link.weights and link.weights_in_flash


def test_arena_section_macro_is_in_the_generated_executor(h7_bundle):
    source = (h7_bundle / "src" / "distillc_model.c").read_text()
    assert '#define DISTILLC_ARENA_SECTION ".bss.distillc_arena"' in source
    assert "#if !defined(DISTILLC_ARENA_SECTION)" in source  # the user's -D wins
    assert "} distillc_arena DISTILLC_ARENA_PLACEMENT;" in source


def test_the_shipped_h743_linker_script_puts_the_arena_in_dtcm_and_the_weights_in_flash(h7_bundle, tmp_path):
    manifest = json.loads((h7_bundle / "manifest.json").read_text())
    assert manifest["verification"]["qemu"]["machine"] == "mps2-an500"
    assert "not an STM32 part's map" in manifest["verification"]["qemu"]["memory_map"]
    assert manifest["memory"]["arena_bank"] == "dtcm" and manifest["target"]["ram_kb"] == 512
    link = link_for_chip(h7_bundle, tmp_path, "stm32h743")
    assert link.arena_bank == "dtcm" and link.arena_region == "DTCM"
    assert link.weights and link.weights_in_flash
    assert link.sections[".isr_vector"][0] == 0x08000000
    # .data/.bss/stack go to AXI SRAM, the arena's section alone to DTCM
    assert _in(H743.bank("axi_sram"), link.sections[".bss"][0])
    assert link.sections[".distillc_arena"][1] >= manifest["memory"]["arena_bytes"]


def test_the_arena_can_be_linked_into_another_bank(h7_bundle, tmp_path):
    link = link_for_chip(h7_bundle, tmp_path, "stm32h743", arena_bank="sram1")
    assert link.arena_region == "SRAM1" and _in(H743.bank("sram1"), link.arena_address)


ARENA_MODEL = """\
#include "distillc_model.h"
#define DISTILLC_ARENA_SECTION ".bss.distillc_arena"
static union {{ uint8_t bytes[{arena}]; int64_t align; }} distillc_arena
    __attribute__((section(DISTILLC_ARENA_SECTION)));
const int8_t distillc_w0[4] = {{1, 2, 3, 4}};

int distillc_model_run(const int8_t *input, int8_t *output)
{{
    volatile uint8_t *const arena = distillc_arena.bytes; /* kept: the compiler may not drop it */
    for (int i = 0; i < DISTILLC_OUTPUT_SIZE; ++i) {{
        arena[i * 997 % {arena}] = (uint8_t)input[i];
        output[i] = (int8_t)(arena[i * 997 % {arena}] + distillc_w0[i % 4]);
    }}
    return 0;
}}
"""


def _arena_bundle(root: Path, arena: int) -> Path:
    bundle = make_fake_bundle(root)
    header = bundle / "include" / "distillc_model.h"
    header.write_text(header.read_text().replace("#define DISTILLC_ARENA_BYTES 64",
                                                 f"#define DISTILLC_ARENA_BYTES {arena}"))
    (bundle / "src" / "model.c").write_text(ARENA_MODEL.format(arena=arena))
    return bundle


def test_an_arena_too_large_for_dtcm_goes_to_axi_sram(tmp_path):
    bundle = _arena_bundle(tmp_path, 200 * 1024)
    write_bundle_build_files(bundle, name="big", chip="stm32h743")
    assert 'REGION_ALIAS("ARENA_RAM", AXI_SRAM)' in (bundle / "targets/stm32h743/stm32h743.ld").read_text()
    link = link_for_chip(bundle, tmp_path / "link", "stm32h743")
    assert link.arena_bank == "axi_sram" and link.arena_region == "AXI_SRAM"
    assert link.weights_in_flash and _in(H743.bank("axi_sram"), link.arena_address)


def test_an_arena_too_large_for_its_bank_fails_the_link_naming_the_region(tmp_path):
    bundle = _arena_bundle(tmp_path, 200 * 1024)
    with pytest.raises(Exception, match=r"region `DTCM' overflowed"):
        link_for_chip(bundle, tmp_path / "link", "stm32h743", arena_bank="dtcm")


def _make(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["make", "-C", str(bundle), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_bundle_makefile_builds_for_the_f405_map_and_runs_it_on_netduinoplus2(tmp_path):
    bundle = _arena_bundle(tmp_path, 1000)
    inputs = np.arange(-5, 5 * 48 - 5, dtype=np.int8).reshape(5, 48)
    write_bundle_build_files(bundle, name="fake", example_inputs=inputs, chip="stm32f405")
    _make(bundle, "stm32f405")
    size = _make(bundle, "size-stm32f405")
    assert ".distillc_arena" in size.stdout and "268435456" in size.stdout  # 0x10000000: CCM
    run = _make(bundle, "run-stm32f405-qemu")
    assert "netduinoplus2" in run.stdout and "distillc-instructions 4:" in run.stdout
    expected = [int(np.int8(inputs[4][i] + (1, 2, 3, 4)[i % 4])) for i in range(10)]
    assert f"distillc-output 4: {' '.join(map(str, expected))}" in run.stdout


def test_bundle_cmake_builds_for_the_h743_map_with_its_toolchain_file(tmp_path):
    bundle = _arena_bundle(tmp_path, 1000)
    write_bundle_build_files(bundle, name="fake", chip="stm32h743")
    build = bundle / "build" / "cmake-h743"
    for command in (["cmake", "-S", str(bundle), "-B", str(build),
                     f"-DCMAKE_TOOLCHAIN_FILE={bundle / 'targets' / 'stm32h743' / 'stm32h743.cmake'}"],
                    ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
    symbols = subprocess.run(["arm-none-eabi-nm", str(build / "fake.elf")], capture_output=True, text=True,
                             check=True).stdout
    arena = next(int(line.split()[0], 16) for line in symbols.splitlines() if line.endswith(" distillc_arena"))
    assert _in(H743.bank("dtcm"), arena)


def test_the_fake_f405_bundle_runs_through_the_runner_with_exact_counts(tmp_path):
    bundle = make_fake_bundle(tmp_path)
    inputs = np.random.default_rng(0).integers(-100, 100, size=(3, 48), dtype=np.int8)
    run = run_on_qemu(bundle, inputs, tmp_path / "w", machine="netduinoplus2")
    assert (run.outputs == reference(inputs)).all()
    assert run.arena_bank == "ccm" and all(count > 0 for count in run.instructions)
    assert any(count % 40 for count in run.instructions)  # to the instruction, not to MPS2's 40


@pytest.mark.parametrize("options,key,message", [
    ('ram_kb = 1024', "target.ram_kb", r"1024 KiB is more than the largest RAM bank .*AXI_SRAM \(512 KiB"),
    ('arena_bank = "dtcm"\nram_kb = 256', "target.ram_kb", r"256 KiB is more than the bank arena_bank = 'dtcm' names, DTCM"),
    ('flash_kb = 4096', "target.flash_kb", r"4096 KiB is more than the STM32H743's 2048 KiB of flash"),
    ('arena_bank = "ccm"', "target.arena_bank", r"Input should be 'auto', 'dtcm'"),
])
def test_ram_kb_beyond_the_bank_is_a_spec_error_naming_the_key(student, options, key, message):
    path = student / "bad.toml"
    path.write_text(spec_text("stm32h7", options, "bad"))
    with pytest.raises(SpecError, match=rf"{key}: {message}"):
        build_plan(load_spec(path, load_plugins()), load_plugins())


def test_f4_ram_kb_beyond_ccm_is_refused_when_ccm_is_named(student):
    path = student / "bad.toml"
    path.write_text(spec_text("stm32f4", 'arena_bank = "ccm"\nram_kb = 100', "bad"))
    with pytest.raises(SpecError, match=r"target\.ram_kb: 100 KiB is more than .*CCM \(64 KiB at 0x10000000\)"):
        build_plan(load_spec(path, load_plugins()), load_plugins())


def test_a_model_that_does_not_fit_ram_kb_is_a_target_error(student):
    with pytest.raises(TargetError, match=r"target 'stm32f4'.*the arena needs \d+ B of RAM.*\(ram_kb = 1\)"):
        compile_(student, "stm32f4", "ram_kb = 1", name="f4-small")
