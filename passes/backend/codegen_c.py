"""``codegen.c``: the MCU bundle: dependency-free C, weights in flash, one static arena.

Writes ``include/distillc_model.h`` and ``src/`` (kernels, the ahead-of-time executor, weights
as ``const`` arrays, the float convenience API) through :func:`distillc.passes.backend.emit_c`,
then the build files (Makefile, CMakeLists.txt, examples/main.c, board files) and
``manifest.json``.  The target's flash and RAM budgets are checked here: every violation is
listed in one :class:`~distillc.errors.TargetError`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import Field, model_validator

from distillc import __version__, hookimpl
from distillc.artifacts import Bundle, Int8Program
from distillc.errors import PassError, TargetError
from distillc.pass_api import InputSource, ModelName, Pass, PassConfig, PassContext, PassResult
from distillc.cache import dist_version
from distillc.passes.backend.tvm_int8 import require_plan


class CodegenC(Pass):
    name = "codegen.c"
    description = "emit the C bundle (AOT executor, const weights, static arena) and its manifest"
    version = "9"  # 2: per-layer arena offsets, live bytes per step and the clock in the manifest;
    # 3: the arena in its own linker section (DISTILLC_ARENA_SECTION), STM32 parts' linker scripts;
    # 4: layers[].weights (bits, values, bytes of each layer's stored weights);
    # 5: c_extension gets the output's quantization (output=), extensions may share the arena (distillc_detect)
    # 6: distillc_kernels.c ships the SIMD micro-kernel its kernels call; layers[].weights.layout
    # 7: plan-memory's schedule: in-place kernels, memory.schedule*, layers[].inplace_shift_bytes
    # 8: distillc_kernels.c ships the depthwise row micro-kernels its kernels call
    # 9: plan-memory's patch schedule (the stage's tile loop, memory.patch, layers[].patch_tile_shape)
    takes = Int8Program
    makes = Bundle
    uses_data = True  # the bundle's example input is a validation image
    tools = ("apache-tvm",)
    planned = ("model_name", "inputs")

    class Config(PassConfig):
        target: str = Field("host", description="target name, recorded in the manifest")
        flash_kb: int | None = Field(None, ge=1, description="flash budget for weights (KiB)")
        ram_kb: int | None = Field(None, ge=1, description="RAM budget for the arena (KiB)")
        clock_mhz: float | None = Field(None, gt=0, description="the target's core clock (MHz), recorded in the "
                                                               "manifest: report.html turns instructions per "
                                                               "inference into inferences per second with it")
        chip: str | None = Field(None, description="an STM32 part (stm32h743, stm32f405): the bundle gets its "
                                                   "linker script, startup code and CMake toolchain file")
        arena_bank: str = Field("auto", description="the chip's RAM bank for the arena; 'auto': the first of its "
                                                    "arena banks that holds it (DTCM or CCM, then the large SRAM)")
        model_name: ModelName = Field("model",
                                description="the bundle's name (DISTILLC_MODEL_NAME, the manifest's name, the "
                                            "programs its builds make); the planner fills in the spec's name")
        inputs: InputSource = Field(
            "data", description="the example input: the first validation image ('data') or seeded random int8 "
                                "values ('random'; the planner's choice for an ONNX student with no [data])")

        @model_validator(mode="after")
        def _known_chip_and_bank(self) -> "CodegenC.Config":
            """An unknown part or bank is a config error (checked by ``validate``, before training)."""
            from distillc.targets.stm32 import CHIPS

            if self.chip is None:
                if self.arena_bank != "auto":
                    raise ValueError(f"arena_bank = {self.arena_bank!r} needs a chip")
                return self
            if self.chip not in CHIPS:
                raise ValueError(f"unknown chip {self.chip!r}; valid: {', '.join(sorted(CHIPS))}")
            banks = CHIPS[self.chip].bank_keys()
            if self.arena_bank != "auto" and self.arena_bank not in banks:
                raise ValueError(f"the {CHIPS[self.chip].part} has no RAM bank {self.arena_bank!r}; "
                                 f"valid: auto, {', '.join(banks)}")
            return self

    def run(self, artifact: Int8Program, ctx: PassContext) -> PassResult:
        from distillc.passes.backend.codegen import emit_c
        from distillc.passes.backend.program import Program
        from distillc.targets.bundle_files import write_bundle_build_files

        cfg = self.config
        plan = require_plan(artifact, self.name)
        bundle = ctx.scratch / "bundle"
        program = Program.load(artifact.path)
        extensions = bundle_extensions(ctx.plugins, artifact.meta, name=cfg.model_name,
                                       output_size=int(math.prod(program.quant["output"]["shape"])),
                                       pass_name=self.name, output=dict(program.quant["output"]))
        entries = emit_c(program, bundle, name=cfg.model_name, plan=plan, pass_name=self.name,
                         extensions=extensions)
        self.check_budget(entries["memory"], [ext.name for ext in extensions])
        arena_bank = self.place_arena(entries["memory"])
        example = model_inputs(ctx, cfg.inputs, entries["input"], 1, pass_name=self.name)
        write_bundle_build_files(bundle, name=cfg.model_name, example_inputs=example, chip=cfg.chip,
                                 arena_bank=arena_bank)
        manifest = {
            "name": cfg.model_name,
            "versions": {"distillc": __version__, **{t: dist_version(t) for t in ("apache-tvm", "torch", "brevitas", "onnx")}},
            "target": {"name": cfg.target, "flash_kb": cfg.flash_kb, "ram_kb": cfg.ram_kb,
                       "clock_mhz": cfg.clock_mhz, "chip": cfg.chip},
            **entries,
            "matryoshka_dims": (entries["class_embeddings"]["dims"] if "class_embeddings" in entries
                                else artifact.meta.get("matryoshka_dims", [])),
            "verification": {},
        }
        write_manifest(bundle, manifest)
        memory = entries["memory"]
        return PassResult(Bundle(path=bundle, reference=artifact.reference_onnx),
                          {"arena_bytes": memory["arena_bytes"], "arena_floor_bytes": memory["arena_floor_bytes"],
                           "weights_bytes": memory["weights_bytes"], "kernels": entries["kernels"],
                           "macs": entries["macs"]})

    def place_arena(self, memory: dict[str, Any]) -> str | None:
        """The chip's RAM bank for the arena (None without a chip), recorded in ``memory``:
        ``arena_section``, and for a chip ``arena_bank``, ``arena_bank_origin``, ``arena_bank_bytes``."""
        from distillc.passes.backend.codegen import ARENA_SECTION
        from distillc.targets.stm32 import get_chip

        memory["arena_section"] = ARENA_SECTION
        if self.config.chip is None:
            return None
        chip = get_chip(self.config.chip)
        bank = chip.place_arena(memory["arena_bytes"], self.config.arena_bank)
        if memory["arena_bytes"] > bank.bytes:  # only a named bank can be too small: ram_kb bounds 'auto'
            raise TargetError(self.config.target, [
                f"the arena needs {memory['arena_bytes']} B of RAM, the {chip.part}'s {bank.describe()} holds "
                f"{bank.bytes} B (arena_bank = {bank.key!r})"])
        memory.update(arena_bank=bank.key, arena_bank_origin=bank.origin, arena_bank_bytes=bank.bytes)
        return bank.key

    def check_budget(self, memory: dict[str, Any], extension_names: list[str] = ()) -> None:
        """Flash (weights + every extension's flash) and arena RAM against the budgets; every violation."""
        violations = []
        extras = [k.replace("_", " ") for k in extension_names]
        flash = memory["weights_bytes"] + sum(memory[f"{k}_bytes"] for k in extension_names)
        if self.config.flash_kb is not None and flash > self.config.flash_kb * 1024:
            what = " and ".join(["weights", *extras])
            violations.append(f"{what} need {flash} B of flash, the target has "
                              f"{self.config.flash_kb * 1024} B (flash_kb = {self.config.flash_kb})")
        if self.config.ram_kb is not None and memory["arena_bytes"] > self.config.ram_kb * 1024:
            violations.append(f"the arena needs {memory['arena_bytes']} B of RAM, the target has "
                              f"{self.config.ram_kb * 1024} B (ram_kb = {self.config.ram_kb})")
        if violations:
            raise TargetError(self.config.target, violations)


def model_inputs(ctx: PassContext, inputs: str, quant: dict[str, Any], count: int, *, pass_name: str) -> Any:
    """``count`` int8 inputs in the model's input shape (``quant["shape"]``, batch first).

    ``inputs = "data"``: the first validation images, quantized as the model's input expects;
    ``"random"``: int8 values drawn uniformly from the input's whole quantized range (-128..127),
    seeded by the spec's seed (the planner's choice for an ONNX student with no ``[data]``).
    """
    import numpy as np

    shape = tuple(int(d) for d in quant["shape"][1:])
    if inputs == "random":
        return np.random.default_rng(ctx.seed).integers(-128, 128, size=(count, *shape), dtype=np.int8)
    images = ctx.data.val_x[:count].numpy()
    if tuple(images.shape[1:]) != shape:
        raise PassError(pass_name, f"the validation images are {'x'.join(map(str, images.shape[1:]))}, the model "
                                   f"takes {'x'.join(map(str, shape))}: set [data] channels and image_size to the "
                                   f"model's input, or leave [data] out to use random inputs")
    return quantize_inputs(images, quant)


def quantize_inputs(x: Any, quant: dict[str, Any]) -> Any:
    """Float inputs -> int8 as the model's first QuantizeLinear does (round half to even, saturate)."""
    import numpy as np

    q = np.rint(x.astype(np.float32) / np.float32(quant["scale"])) + int(quant["zero_point"])
    return np.clip(q, -128, 127).astype(np.int8)


def write_manifest(bundle: Any, manifest: dict[str, Any]) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def bundle_extensions(plugins: Any, meta: dict[str, Any], *, name: str, output_size: int,
                      pass_name: str, output: dict[str, Any] | None = None) -> list[Any]:
    """The C every registered pass adds for this model (``CExtension``s, by pass name order).

    A pass offers C through a ``c_extension(meta, *, name, output_size, pass_name)`` static or
    class method returning a :class:`~distillc.passes.backend.codegen.CExtension` or None; it
    reads what an earlier pass of its own left in the model's ``meta`` (the Matryoshka pass:
    ``meta["matryoshka"]``).  So the backend imports no distillation pass, and a plugin's pass
    may add C the same way.  A method inherited unchanged by a subclass is asked once.
    A method that also takes an ``output`` keyword (or ``**kwargs``) gets the model output's
    quantization, ``{"shape", "dtype", "scale", "zero_point"}`` (the manifest's ``output``), as
    the detection decoder does to build its tables; one with the older signature is called
    without it.
    """
    seen: set[Any] = set()
    extensions: dict[str, Any] = {}
    for entry in plugins.passes:
        method = getattr(entry.obj, "c_extension", None)
        func = getattr(method, "__func__", method)
        if method is None or func in seen:
            continue
        seen.add(func)
        extra = {"output": output} if output is not None and _takes_keyword(method, "output") else {}
        ext = method(meta, name=name, output_size=output_size, pass_name=pass_name, **extra)
        if ext is None:
            continue
        if ext.name in extensions:
            raise PassError(pass_name, f"two passes add a bundle extension named {ext.name!r} "
                                       f"(the second: {entry.name!r})")
        extensions[ext.name] = ext
    return list(extensions.values())


def _takes_keyword(method: Any, keyword: str) -> bool:
    """Whether ``method`` accepts ``keyword`` (by name or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(CodegenC)
