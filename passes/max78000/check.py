"""``check.max78000``: can the MAX78000's CNN accelerator run this student?

The max78000 target compiles the student to a C bundle for the chip's Cortex-M4F core, which
runs any network distillc lowers.  The CNN accelerator is much faster but narrow (3x3/1x1
convolutions with stride 1, no depthwise, pooling to downsample, at most 32 layers, 768 kernel
slots per processor, a layer's input and output in one 32 KiB data memory instance; see
``distillc.passes.max78000.ai8x.max78000_violations``).  This pass checks the student's
architecture, at the weight width QAT gave it, against those limits and lists every violation:
as a report in the metrics (and so in the bundle's manifest), or, with ``mode = "require"``, as a
:class:`~distillc.errors.TargetError` that stops the compile.  The student passes through.
Kernel and data memory are counted with the placement ``export.izer`` writes
(:mod:`distillc.passes.max78000.memory`), so a student this pass accepts is one izer can place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import TargetError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class CheckMax78000(Pass):
    name = "check.max78000"
    version = "2"  # 2: kernel memory per processor, a layer's input and output in one data instance
    description = "check the student against the MAX78000 CNN accelerator's limits (every violation)"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    tools = ("torch",)

    class Config(PassConfig):
        mode: Literal["report", "require"] = Field("report", description="'require': a violation stops the compile")

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        from distillc.passes.max78000.ai8x import max78000_violations

        options = artifact.options
        image_size = options.get("image_size") or artifact.meta.get("image_size")
        if not image_size:
            raise TargetError("max78000", [f"the student {artifact.arch!r} records no image_size to check"])
        weight_bits = int(getattr(artifact, "quant", {}).get("weight_bits", 8)) if isinstance(
            artifact, QuantTorchModel) else 8
        # The limits concern the architecture (and weight widths), so a fresh float module is enough.
        module = artifact.fresh_module(ctx.plugins).eval()
        violations = max78000_violations(module, int(image_size), in_chans=options.get("in_chans"),
                                         weight_bits=weight_bits)
        if violations and self.config.mode == "require":
            raise TargetError("max78000", [f"CNN accelerator: {v}" for v in violations])
        if violations:
            ctx.log(f"the MAX78000 CNN accelerator cannot run {artifact.arch!r} ({len(violations)} violation(s)); "
                    f"the bundle runs on the Cortex-M4F core")
        return PassResult(artifact, {"accelerator_fits": not violations, "violations": violations,
                                     "weight_bits": weight_bits})


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(CheckMax78000)
