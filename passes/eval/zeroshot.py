"""``eval.zero-shot``: top-1 per Matryoshka dimension with the model's own class embeddings.

The class embeddings are the INT8 rows stored by ``matryoshka`` or ``distill.clip-matryoshka``
in ``meta["matryoshka"]``, exactly what the bundle will hold in flash.  Each validation image is
embedded, its first ``d`` values are scored against every class's first ``d`` values, and the
best class is its prediction.  The model passes through unchanged (float or quantized), so the
pass can sit after QAT and show what quantization cost per dimension.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class ZeroShotEval(Pass):
    name = "eval.zero-shot"
    description = "zero-shot top-1 per Matryoshka dim with the model's INT8 class embeddings"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    uses_data = True
    tools = ("torch",)

    class Config(PassConfig):
        dims: list[int] | None = Field(None, description="dims to score (a subset of the model's); default all")

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        from distillc.passes.distill.matryoshka import ClassEmbeddings, zero_shot_top1

        info = artifact.meta.get("matryoshka")
        if not info:
            raise PassError(self.name, "the model has no Matryoshka class embeddings; run 'matryoshka' or "
                                       "'distill.clip-matryoshka' (with labelled data or class embeddings) before it")
        classes = ClassEmbeddings.from_meta(info)
        dims = list(self.config.dims) if self.config.dims is not None else classes.dims
        unknown = [d for d in dims if d not in classes.dims]
        if unknown:
            raise PassError(self.name, f"dims {unknown} are not among the model's Matryoshka dims {classes.dims}")
        data = ctx.data
        if not data.labelled:
            raise PassError(self.name, f"zero-shot accuracy needs labelled validation data; {data.name} has none")
        top1 = zero_shot_top1(artifact.build(ctx.plugins), data, classes, dims, self.name)
        return PassResult(artifact, {"top1": top1, "classes": len(classes.classes), "class_embeddings": classes.source,
                                     "quantized": isinstance(artifact, QuantTorchModel)})


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(ZeroShotEval)
