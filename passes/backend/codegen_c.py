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

from pydantic import Field

from distillc import __version__, hookimpl
from distillc.artifacts import Bundle, Int8Program
from distillc.errors import TargetError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult
from distillc.pipeline import dist_version
from distillc.passes.backend.tvm_int8 import require_plan


class CodegenC(Pass):
    name = "codegen.c"
    description = "emit the C bundle (AOT executor, const weights, static arena) and its manifest"
    takes = Int8Program
    makes = Bundle
    uses_data = True  # the bundle's example input is a validation image
    tools = ("apache-tvm",)

    class Config(PassConfig):
        target: str = Field("host", description="target name, recorded in the manifest")
        flash_kb: int | None = Field(None, ge=1, description="flash budget for weights (KiB)")
        ram_kb: int | None = Field(None, ge=1, description="RAM budget for the arena (KiB)")

    def run(self, artifact: Int8Program, ctx: PassContext) -> PassResult:
        from distillc.passes.backend.codegen import emit_c
        from distillc.targets.bundle_files import write_bundle_build_files

        cfg = self.config
        plan = require_plan(artifact, self.name)
        bundle = ctx.scratch / "bundle"
        entries = emit_c(artifact.program(), bundle, name=ctx.spec.name, plan=plan, pass_name=self.name)
        classes = artifact.meta.get("matryoshka")
        if classes:  # Matryoshka class embeddings and distillc_classify (see passes/distill/matryoshka.py)
            from distillc.passes.distill.matryoshka import write_class_embeddings_c

            output_size = int(math.prod(entries["output"]["shape"]))
            entries["class_embeddings"] = write_class_embeddings_c(bundle, classes, name=ctx.spec.name,
                                                                   output_size=output_size, pass_name=self.name)
            entries["memory"]["class_embeddings_bytes"] = entries["class_embeddings"]["flash_bytes"]
            entries["files"] = sorted([*entries["files"], entries["class_embeddings"]["file"]])
        self.check_budget(entries["memory"])
        example = quantize_inputs(ctx.data.val_x[:1].numpy(), entries["input"])
        write_bundle_build_files(bundle, name=ctx.spec.name, example_inputs=example)
        manifest = {
            "name": ctx.spec.name,
            "versions": {"distillc": __version__, **{t: dist_version(t) for t in ("apache-tvm", "torch", "brevitas", "onnx")}},
            "target": {"name": cfg.target, "flash_kb": cfg.flash_kb, "ram_kb": cfg.ram_kb},
            **entries,
            "matryoshka_dims": classes["dims"] if classes else artifact.meta.get("matryoshka_dims", []),
            "verification": {},
        }
        write_manifest(bundle, manifest)
        memory = entries["memory"]
        return PassResult(Bundle(path=bundle, reference=artifact.reference_onnx),
                          {"arena_bytes": memory["arena_bytes"], "arena_floor_bytes": memory["arena_floor_bytes"],
                           "weights_bytes": memory["weights_bytes"], "kernels": entries["kernels"],
                           "macs": entries["macs"]})

    def check_budget(self, memory: dict[str, Any]) -> None:
        violations = []
        flash = memory["weights_bytes"] + memory.get("class_embeddings_bytes", 0)
        if self.config.flash_kb is not None and flash > self.config.flash_kb * 1024:
            what = "weights and class embeddings" if memory.get("class_embeddings_bytes") else "weights"
            violations.append(f"{what} need {flash} B of flash, the target has "
                              f"{self.config.flash_kb * 1024} B (flash_kb = {self.config.flash_kb})")
        if self.config.ram_kb is not None and memory["arena_bytes"] > self.config.ram_kb * 1024:
            violations.append(f"the arena needs {memory['arena_bytes']} B of RAM, the target has "
                              f"{self.config.ram_kb * 1024} B (ram_kb = {self.config.ram_kb})")
        if violations:
            raise TargetError(self.config.target, violations)


def quantize_inputs(x: Any, quant: dict[str, Any]) -> Any:
    """Float inputs -> int8 as the model's first QuantizeLinear does (round half to even, saturate)."""
    import numpy as np

    q = np.rint(x.astype(np.float32) / np.float32(quant["scale"])) + int(quant["zero_point"])
    return np.clip(q, -128, 127).astype(np.int8)


def write_manifest(bundle: Any, manifest: dict[str, Any]) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(CodegenC)
