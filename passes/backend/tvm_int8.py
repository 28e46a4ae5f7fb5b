"""``tvm.int8`` and ``plan-memory``: QCDQ ONNX -> integer program -> static arena plan.

``tvm.int8`` imports the ONNX graph with TVM's Relax frontend, rewrites every
quantize/dequantize pattern into integer arithmetic (int8 convolutions and dense layers with
int32 accumulation, fixed-point requantization, clamps), lets TVM fuse each layer into one TIR
kernel and generates the kernels' C.  ``plan-memory`` places every activation in one arena.
The library behind both is :mod:`distillc.passes.backend`.
"""

from __future__ import annotations

import shutil
from typing import Any

from pydantic import Field, field_validator, model_validator

from distillc import hookimpl
from distillc.artifacts import REFERENCE_ONNX, Int8Program, OnnxModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class TvmInt8(Pass):
    name = "tvm.int8"
    description = "TVM Relax import, QDQ -> integer rewrite, kernel fusion, kernel C generation"
    takes = OnnxModel
    makes = Int8Program
    version = "8"  # 2: 32-bit requantization where proven exact; 3: depthwise weights per channel;
    # 4: 2- and 4-bit weights stored packed (packing.py), per-layer weight storage in the program;
    # 5: 8-bit 1x1 convs and dense layers on the SMLAD micro-kernel (microkernels.py), permuted weights
    # 6: conv windows and in-place depthwise kernels in the program (inplace.py, plan-memory's schedules)
    # 7: depthwise 3x3 convs on the row micro-kernel, borders split off (depthwise.py)
    # 8: other 8-bit convs with one group (the stem) on the SMLAD micro-kernel through an im2col
    tools = ("apache-tvm", "onnx")

    class Config(PassConfig):
        allow_float_fallback: bool = Field(False, description="run ops that cannot be lowered to integers in float")

    def run(self, artifact: OnnxModel, ctx: PassContext) -> PassResult:
        from distillc.passes.backend import import_onnx, lower_int8
        from distillc.passes.backend.codegen import build_program

        mod = import_onnx(artifact.path, pass_name=self.name)
        lowered = lower_int8(mod, self.config.allow_float_fallback, pass_name=self.name)
        program = build_program(lowered)
        out = ctx.scratch / "program"
        program.save(out)
        shutil.copyfile(artifact.path, out / REFERENCE_ONNX)
        layers = len(program.steps)
        macs = int(sum(step.macs for step in program.steps))
        weights = int(sum(t.nbytes for t in program.tensors if t.kind == "const"))
        fallback = list(program.quant.get("float_fallback", []))
        meta = {**artifact.meta, "macs": macs, "weights_bytes": weights, "float_fallback": fallback}
        return PassResult(Int8Program(path=out, meta=meta),
                          {"kernels": layers, "macs": macs, "weights_bytes": weights, "float_fallback": len(fallback)})


#: plan-memory's schedules.
MEMORY_SCHEDULES = ("layer", "inplace", "patch", "auto")


class PlanMemory(Pass):
    name = "plan-memory"
    description = ("place every activation in one static arena (layer by layer, depthwise convs in place, or "
                   "the first stage in patches)")
    takes = Int8Program
    makes = Int8Program
    version = "3"  # 2: schedule = "layer" | "inplace" | "auto" (in-place depthwise convs)
    # 3: schedule = "patch" (the first stage in spatial tiles, its tile kernels in the program)
    tools = ("apache-tvm", "onnx")

    class Config(PassConfig):
        schedule: str = Field("layer", description="'layer': every tensor on bytes of its own; 'inplace': "
                                                   "depthwise convs whose input dies there write over it; "
                                                   "'patch': the first stage runs tile by tile (MCUNetV2), "
                                                   "the depthwise convs after it in place; 'auto': the "
                                                   "schedule with the smallest arena that costs no extra "
                                                   "instructions, or the cheapest that fits ram_kb")
        ram_kb: int | None = Field(None, ge=1, description="the target's RAM for the arena (KiB), for 'auto'; "
                                                           "the target fills it in")

        @model_validator(mode="before")
        @classmethod
        def _ram_only_for_auto(cls, data: Any) -> Any:
            """ram_kb only steers 'auto': other schedules drop it, so their cache key is the target's alone."""
            if isinstance(data, dict) and data.get("schedule", "layer") != "auto" and "ram_kb" in data:
                data = {k: v for k, v in data.items() if k != "ram_kb"}
            return data

        @field_validator("schedule")
        @classmethod
        def _known_schedule(cls, value: str) -> str:
            if value not in MEMORY_SCHEDULES:
                raise ValueError(f"unknown schedule {value!r}; valid: {', '.join(MEMORY_SCHEDULES)}")
            return value

    def run(self, artifact: Int8Program, ctx: PassContext) -> PassResult:
        from distillc.passes.backend.memory import check_plan, extra_instructions, plan_memory
        from distillc.passes.backend.program import Program

        cfg = self.config
        program = Program.load(artifact.path)
        ram = cfg.ram_kb * 1024 if cfg.ram_kb is not None else None
        plan = plan_memory(program, schedule=cfg.schedule, ram_bytes=ram, pass_name=self.name)
        check_plan(program, plan, pass_name=self.name)
        if plan.above_floor:
            ctx.log(f"arena {plan.arena_bytes} B is more than 5% above the floor {plan.bound_bytes} B "
                    f"of the {plan.schedule} schedule")
        path = artifact.path
        if plan.patch:  # the tile kernels join a copy of the program
            from distillc.passes.backend.patch import attach_kernels

            tiles = "x".join(str(n) for n in plan.patch["tiles"])
            ctx.log(f"steps 0-{plan.patch['last']} run in {tiles} patches: generating their tile kernels")
            attach_kernels(program, artifact.path / REFERENCE_ONNX, plan.patch, pass_name=self.name)
            path = ctx.scratch / "program"
            shutil.copytree(artifact.path, path)
            program.save(path)
        out = Int8Program(path=path, plan=plan.to_dict(), meta=dict(artifact.meta))
        ratio = plan.arena_bytes / plan.floor_bytes if plan.floor_bytes else 1.0
        return PassResult(out, {"arena_bytes": plan.arena_bytes, "arena_floor_bytes": plan.floor_bytes,
                                "arena_over_floor": round(ratio, 4), "schedule": plan.schedule,
                                "schedule_floor_bytes": plan.bound_bytes, "inplace_layers": len(plan.inplace),
                                "schedule_extra_instructions": extra_instructions(program, plan),
                                "patch_extra_macs": int(plan.patch.get("extra_macs", 0))})


def require_plan(artifact: Int8Program, pass_name: str) -> Any:
    from distillc.passes.backend.memory import MemoryPlan

    if artifact.plan is None:
        raise PassError(pass_name, "the program has no memory plan; run plan-memory before it")
    return MemoryPlan.from_dict(artifact.plan)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(TvmInt8)
    registry.add(PlanMemory)
