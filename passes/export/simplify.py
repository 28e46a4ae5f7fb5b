"""``simplify.onnxsim``: constant folding and redundant-node removal with onnxsim, verified."""

from __future__ import annotations

from typing import Any

from distillc import hookimpl
from distillc.artifacts import OnnxModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class SimplifyOnnx(Pass):
    name = "simplify.onnxsim"
    description = "simplify the ONNX graph with onnxsim (checked against the original)"
    takes = OnnxModel
    makes = OnnxModel
    tools = ("onnx", "onnxsim")

    class Config(PassConfig):
        pass

    def run(self, artifact: OnnxModel, ctx: PassContext) -> PassResult:
        import onnx
        import onnxsim

        model = onnx.load(str(artifact.path))
        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise PassError(self.name, "onnxsim could not verify the simplified model against the original")
        path = ctx.scratch / "model.onnx"
        onnx.save(simplified, str(path))
        return PassResult(OnnxModel(path=path, meta=dict(artifact.meta)),
                          {"nodes_before": len(model.graph.node), "nodes_after": len(simplified.graph.node)})


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(SimplifyOnnx)
