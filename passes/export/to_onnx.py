"""``export.onnx``: the student as an ONNX graph: float, or QCDQ for a Brevitas-quantized student.

The export is checked, not trusted: onnxruntime runs the exported graph on validation images and
the largest difference from PyTorch's output is reported (``max_abs_diff``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import OnnxModel, QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportOnnx(Pass):
    name = "export.onnx"
    description = "export the student to ONNX and check it with onnxruntime"
    takes = (TorchModel, QuantTorchModel)
    makes = OnnxModel
    uses_data = True
    tools = ("torch", "onnx", "onnxruntime", "brevitas")
    version = "2"  # 2: meta["detection"] goes on to the bundle (distillc_detect)

    class Config(PassConfig):
        opset: int = Field(13, ge=13, le=21)
        check_images: int = Field(8, ge=1, description="validation images run through both for the check")
        tolerance: float = Field(1e-3, gt=0.0, description="largest allowed |torch - onnxruntime| (float models)")
        tolerance_steps: int = Field(2, ge=0, description="largest allowed difference in output quantization "
                                                          "steps (quantized models)")

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch

        model = artifact.build(ctx.plugins)
        sample = ctx.data.val_x[: self.config.check_images]
        path = ctx.scratch / "model.onnx"
        with torch.no_grad():
            if isinstance(artifact, QuantTorchModel):
                from distillc.passes.quantize.brevitas_model import export_qcdq

                export_qcdq(model, sample[:1], path)
            else:
                torch.onnx.export(model, (sample[:1],), str(path), opset_version=self.config.opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=False)
            # One image at a time, as onnxruntime runs it: a batched float convolution may round
            # differently and flip a quantization tie.
            expected = torch.cat([model(sample[i:i + 1]) for i in range(len(sample))]).numpy()
        steps = None
        if isinstance(artifact, QuantTorchModel):
            # PyTorch (Brevitas) and onnxruntime both compute each layer in float32, in different
            # orders: a value on a .5 rounding tie may round apart by one step, which later layers
            # carry on.  A wrong export is off by many steps, so the check counts steps.
            steps = output_scale(path)
        tolerance = self.config.tolerance_steps * steps if steps else self.config.tolerance
        diff = check_with_onnxruntime(path, sample.numpy(), expected, self.name, tolerance * (1 + 1e-6),
                                      unit=f"output step(s) of {steps:.6g}" if steps else "")
        meta = {"input_shape": [1, *sample.shape[1:]], "output_shape": [1, *expected.shape[1:]],
                "embed_dim": artifact.meta.get("embed_dim"), "quantized": isinstance(artifact, QuantTorchModel)}
        for key in ("matryoshka_dims", "matryoshka", "detection"):  # what codegen.c's extensions need
            if key in artifact.meta:
                meta[key] = artifact.meta[key]
        metrics = {"max_abs_diff": diff, "onnx_bytes": path.stat().st_size}
        if steps:
            metrics["max_steps"] = round(diff / steps)
        return PassResult(OnnxModel(path=path, meta=meta), metrics)


def reference_session(onnx_path: Any) -> Any:
    """An onnxruntime session that computes the graph as written.

    Graph optimizations are off: with them onnxruntime fuses QDQ patterns into its own integer
    kernels and drops back-to-back Q/DQ pairs (skipping an intermediate rounding), so its output
    is no longer the model the ONNX file describes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)  # a path or serialized bytes
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_with_onnxruntime(path: Any, inputs: Any, expected: Any, pass_name: str, tolerance: float,
                           unit: str = "") -> float:
    """Run ``path`` in onnxruntime one image at a time; fail the pass beyond ``tolerance``."""
    import numpy as np

    session = reference_session(path)
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])
    diff = float(np.abs(got - expected).max()) if got.size else 0.0
    if diff > tolerance:
        where = f" ({unit})" if unit else ""
        raise PassError(pass_name, f"onnxruntime differs from PyTorch by {diff:.3g} (> {tolerance:.3g}{where})")
    return diff


def output_scale(path: Any) -> float | None:
    """The scale of the DequantizeLinear that produces the graph's output (QCDQ), or None."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    scale = consts.get(node.input[1])
    return float(scale) if scale is not None and scale.size == 1 else None


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(ExportOnnx)
