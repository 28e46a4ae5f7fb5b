"""``verify.host`` and ``verify.qemu``: run the bundle's C and compare it with onnxruntime.

Both take held-back validation images, quantize them as the bundle's input expects (or, for an
ONNX student given with no ``[data]``, seeded random int8 inputs in the model's input shape), run the
bundle (compiled with gcc on this machine, or cross-compiled for a Cortex-M board and run under
QEMU with semihosting), and compare every output with onnxruntime running the ONNX model the
bundle was compiled from (graph optimizations off, so it computes the QCDQ graph as written).
A difference beyond ``tolerance_lsb`` steps of the output's int8 scale fails the compile.
Results land in the manifest's ``verification`` section.
"""

from __future__ import annotations

import abc
import shutil
from typing import Any, Literal

from pydantic import Field, field_validator

from distillc import hookimpl
from distillc.artifacts import Bundle
from distillc.errors import PassError
from distillc.pass_api import InputSource, Pass, PassConfig, PassContext, PassResult
from distillc.passes.backend.codegen_c import model_inputs, write_manifest


class _VerifyConfig(PassConfig):
    images: int = Field(16, ge=1, le=10_000, description="validation images run through the bundle")
    tolerance_lsb: int = Field(1, ge=0, description="largest allowed difference in output quantization steps")
    end_to_end: Literal["explain", "strict"] = Field(
        "explain", description="an output beyond tolerance_lsb: 'explain' checks every kernel on its own inputs "
                               "and accepts float32 rounding ties carried through later layers; 'strict' fails")
    inputs: InputSource = Field(
        "data", description="validation images ('data') or seeded random int8 inputs ('random'; the planner's "
                            "choice for an ONNX student with no [data])")


class _Verify(Pass):
    """Shared steps: inputs, reference, comparison, manifest update."""

    takes = Bundle
    makes = Bundle
    uses_data = True
    tools = ("onnxruntime",)
    planned = ("inputs",)
    section: str = ""

    def verify(self, artifact: Bundle, ctx: PassContext, run: Any) -> PassResult:
        manifest = artifact.manifest
        if artifact.reference is None:
            raise PassError(self.name, "the bundle does not record the ONNX model it was compiled from")
        inputs = model_inputs(ctx, self.config.inputs, manifest["input"], self.config.images, pass_name=self.name)
        outputs, extra = run(artifact, inputs)
        reference = onnxruntime_outputs(artifact.reference, inputs, manifest)
        got = outputs.reshape(len(inputs), -1).astype("int64")
        diff = abs(got - reference)
        max_lsb = int(diff.max()) if diff.size else 0
        scale = float(manifest["output"]["scale"])
        result = {"images": len(inputs), "max_lsb": max_lsb, "max_abs_diff": max_lsb * scale,
                  "exact_fraction": float((diff == 0).mean()) if diff.size else 1.0, **extra}
        if max_lsb > self.config.tolerance_lsb:
            worst = divmod(int(diff.argmax()), got.shape[1])
            problem = (f"the bundle differs from onnxruntime by {max_lsb} LSB (> {self.config.tolerance_lsb}) on "
                       f"validation image {worst[0]}, output element {worst[1]}: bundle {got[worst]}, "
                       f"onnxruntime {reference[worst]}")
            result["kernels"] = self.check_kernels(artifact, ctx, inputs, outputs, problem,
                                                   image_lsb=diff.max(axis=1) if diff.size else diff)
            ctx.log(f"end to end the bundle differs from onnxruntime by up to {max_lsb} LSB; every kernel matches "
                    f"onnxruntime on its own inputs ({result['kernels']['kernel_tie_differences']} value(s) one step "
                    f"apart on float32 rounding ties), so the difference is onnxruntime's float32 rounding carried "
                    f"through later layers")
        if manifest.get("detection"):
            result["detection"] = self.check_detection(artifact, ctx, inputs, outputs, reference)
        result.update(self.quantization_error(artifact, ctx))
        bundle = ctx.scratch / "bundle"
        shutil.copytree(artifact.path, bundle)
        manifest.setdefault("verification", {})[self.section] = result
        write_manifest(bundle, manifest)
        return PassResult(Bundle(path=bundle, reference=artifact.reference), result)

    def quantization_error(self, artifact: Bundle, ctx: PassContext) -> dict[str, Any]:
        """Extra figures for the manifest (``verify.host``: per-layer SQNR); none here."""
        return {}

    def check_detection(self, artifact: Bundle, ctx: PassContext, inputs: Any, outputs: Any,
                        reference: Any) -> dict[str, Any]:
        """A bundle with ``distillc_detect``: run it on the verified inputs (every dim, the spec's
        threshold and 0) and compare with ``decode_int8`` (``passes/detect/c_api.py``): exactly on
        the maps the C computed (else a ``PassError``), and, reported, on onnxruntime's maps."""
        from distillc.passes.detect.c_api import check_detections, verification_cases

        manifest = artifact.manifest
        cases = verification_cases(manifest["detection"])
        run, extra = self.run_detection(artifact, ctx, inputs, cases)
        return {**check_detections(run, manifest, outputs=outputs, reference=reference, pass_name=self.name),
                **extra}

    @abc.abstractmethod
    def run_detection(self, artifact: Bundle, ctx: PassContext, inputs: Any, cases: list) -> tuple[Any, dict]:
        """The detection program's results (``runner.DetectionRun``) and extra figures: each verify
        pass runs it where it runs the bundle (the host, or its QEMU board)."""

    def check_kernels(self, artifact: Bundle, ctx: PassContext, inputs: Any, outputs: Any,
                      problem: str, image_lsb: Any) -> dict[str, Any]:
        """Explain an end-to-end difference kernel by kernel, or fail (see ``passes/verify/layercheck.py``).

        onnxruntime computes each layer in float32 and may round a value that lies on a .5 tie to
        the other integer than the exact integer kernel; later layers carry that step on and can
        grow it.  So the bundle is traced on the host (every kernel's output) and each kernel is
        compared with onnxruntime on that kernel's own inputs: every kernel must match, except for
        one-step differences on float32 ties, and the traced build must compute the outputs the
        verified build computed.  A tie explains only its own input: every input whose outputs
        differ by more than the tolerance (``image_lsb``, per input) must meet a tie in one of its
        kernels.  Anything else fails with ``problem`` and the kernels at fault.
        """
        import numpy as np

        from distillc.passes.verify.layercheck import compare_kernels
        from distillc.targets.runner import trace_on_host

        traces = trace_on_host(artifact.path, inputs, ctx.scratch / "trace")
        report = compare_kernels(artifact.reference, artifact.manifest, inputs, traces,
                                 tolerance_lsb=self.config.tolerance_lsb)
        last = len(artifact.manifest["layers"]) - 1
        traced = np.stack([np.frombuffer(trace[last], dtype=np.int8) for trace in traces])
        if not np.array_equal(traced, outputs.reshape(len(inputs), -1).astype(np.int8)):
            raise PassError(self.name, f"{problem}; and the host trace build computes other outputs than the "
                                       f"verified build: the C compiles differently here")
        if report.errors:
            raise PassError(self.name, f"{problem}. Kernel by kernel: " + "; ".join(report.errors[:5]))
        if report.unchecked:
            step, why = next(iter(report.unchecked.items()))
            raise PassError(self.name, f"{problem}; every kernel that could be checked on its own inputs matches "
                                       f"onnxruntime, but {len(report.unchecked)} could not (kernel {step}: {why})")
        if report.differing == 0:
            raise PassError(self.name, f"{problem}; yet every kernel matches onnxruntime exactly on its own inputs, "
                                       f"so no rounding tie explains the difference")
        unexplained = [int(i) for i in np.nonzero(np.asarray(image_lsb) > self.config.tolerance_lsb)[0]
                       if int(i) not in report.tied_examples]
        if unexplained:
            raise PassError(self.name, f"{problem}; every kernel matches onnxruntime on its own inputs, but "
                                       f"{len(unexplained)} input(s) that differ end to end (first: image "
                                       f"{unexplained[0]}) meet no float32 rounding tie in any kernel, so no tie "
                                       f"explains their difference")
        if self.config.end_to_end == "strict":
            raise PassError(self.name, f"{problem} (end_to_end = 'strict'). Every kernel matches onnxruntime on "
                                       f"its own inputs except {report.differing} value(s) on float32 rounding ties, "
                                       f"which later layers carry on; end_to_end = 'explain' accepts that")
        return report.summary()


class VerifyHost(_Verify):
    name = "verify.host"
    version = "3"  # 2: per-layer SQNR against the float model (layer_sqnr_db); 3: distillc_detect checked
    description = "build the bundle with gcc, run validation images, compare with onnxruntime; per-layer SQNR"
    section = "host"

    class Config(_VerifyConfig):
        sqnr_images: int = Field(8, ge=0, le=1_000,
                                 description="validation images for the per-layer SQNR of the INT8 model against "
                                             "the float model (0: not measured)")

    def run(self, artifact: Bundle, ctx: PassContext) -> PassResult:
        from distillc.targets.runner import run_on_host

        return self.verify(artifact, ctx, lambda b, x: (run_on_host(b.path, x, ctx.scratch / "build"), {}))

    def run_detection(self, artifact: Bundle, ctx: PassContext, inputs: Any, cases: list) -> tuple[Any, dict]:
        from distillc.targets.runner import detect_on_host

        return detect_on_host(artifact.path, inputs, ctx.scratch / "build", cases), {}

    def quantization_error(self, artifact: Bundle, ctx: PassContext) -> dict[str, Any]:
        """Per-layer SQNR (dB) of the INT8 model against the float model (``passes/verify/sqnr.py``),
        on the first ``sqnr_images`` validation images (or on the verified random inputs,
        dequantized, for a model with no data); and the output's."""
        import numpy as np

        from distillc.passes.verify.sqnr import REFERENCE, layer_sqnr

        count = self.config.sqnr_images
        if count == 0:
            return {}
        manifest = artifact.manifest
        if self.config.inputs == "data":
            images = ctx.data.val_x[:count].numpy()
        else:
            quant = manifest["input"]
            q = model_inputs(ctx, "random", quant, count, pass_name=self.name)
            images = (q.astype(np.float32) - np.float32(quant["zero_point"])) * np.float32(quant["scale"])
        per_layer = layer_sqnr(artifact.reference, manifest, images)
        measured = [v for v in per_layer if v is not None]
        return {"sqnr_images": len(images), "sqnr_reference": REFERENCE, "layer_sqnr_db": per_layer,
                "output_sqnr_db": per_layer[-1] if per_layer and per_layer[-1] is not None else None,
                "min_layer_sqnr_db": min(measured) if measured else None}


class VerifyQemu(_Verify):
    name = "verify.qemu"
    version = "3"  # 2: instructions per kernel call (layers); 3: distillc_detect checked, its instructions
    description = "cross-compile for a Cortex-M board, run under QEMU, compare, count instructions (per layer too)"
    section = "qemu"

    class Config(_VerifyConfig):
        images: int = Field(4, ge=1, le=1_000, description="validation images run on the emulated board")
        machine: str = Field("mps2-an500", description="QEMU board: mps2-an500 (Cortex-M7), mps2-an386 (Cortex-M4) "
                                                       "or netduinoplus2 (STM32F405, ST's memory map)")
        layers: bool = Field(True, description="also count the instructions of every kernel call, in a second build "
                                               "whose executor reads the board's counter after each kernel")

        @field_validator("machine")
        @classmethod
        def _known_board(cls, machine: str) -> str:
            """Checked by ``validate`` (the backend's configs are built with the plan), not after training."""
            from distillc.targets.toolchain import BOARDS

            if machine not in BOARDS:
                raise ValueError(f"unknown QEMU board; valid: {', '.join(sorted(BOARDS))}")
            return machine

    def run(self, artifact: Bundle, ctx: PassContext) -> PassResult:
        from distillc.targets.runner import run_on_qemu

        def on_qemu(bundle: Bundle, inputs: Any) -> tuple[Any, dict[str, Any]]:
            run = run_on_qemu(bundle.path, inputs, ctx.scratch / "build", machine=self.config.machine,
                              layers=self.config.layers)
            return run.outputs, {"machine": run.machine, "instructions_per_inference": run.instructions_per_inference,
                                 "model_flash_bytes": run.model_flash_bytes,
                                 "program_flash_bytes": run.flash_bytes, "program_ram_bytes": run.ram_bytes,
                                 "stack_bytes": run.stack_bytes, "counter": run.counter,
                                 "memory_map": run.memory_map,
                                 **({"arena_bank": run.arena_bank} if run.arena_bank else {}),
                                 **(layer_figures(bundle.manifest, run) if run.layers else {})}

        return self.verify(artifact, ctx, on_qemu)

    def run_detection(self, artifact: Bundle, ctx: PassContext, inputs: Any, cases: list) -> tuple[Any, dict]:
        """On the board, with the mean instructions of one ``distillc_detect`` (model and decoder)
        and of one ``distillc_detect_output`` (the decoder alone) per case."""
        import statistics

        from distillc.targets.runner import detect_on_qemu

        run = detect_on_qemu(artifact.path, inputs, ctx.scratch / "build", cases, machine=self.config.machine)
        def mean(c: int, which: int) -> float:
            return round(statistics.fmean(run.instructions[(i, c)][which] for i in range(len(inputs))), 1)

        per_case = [{"dim": dim, "threshold_q15": threshold, "max_out": max_out, "detect_instructions": mean(c, 0),
                     "decode_instructions": mean(c, 1)} for c, (dim, threshold, max_out) in enumerate(run.cases)]
        return run, {"machine": run.machine, "instructions": per_case}


def layer_figures(manifest: dict[str, Any], run: Any) -> dict[str, Any]:
    """``verify.qemu``'s per-layer figures from a run with layer counts (``runner.LayerCounts``):
    one entry per kernel call of ``manifest["layers"]`` with its mean instructions over the inputs,
    and how their sum compares with the plain build's whole inference."""
    import statistics

    counts = run.layers
    layers = manifest["layers"]
    if len(counts.instructions[0]) != len(layers):
        raise PassError("verify.qemu", f"the executor calls {len(counts.instructions[0])} kernels but the manifest "
                                       f"lists {len(layers)} layers: the bundle's sources and manifest disagree")
    entries = []
    for step, layer in enumerate(layers):
        mean = statistics.fmean(per_input[step] for per_input in counts.instructions)
        macs = int(layer.get("macs") or 0)
        entries.append({"step": step, "name": layer["name"], "kernel": layer["kernel"], "op": layer["op"],
                        "macs": macs, "instructions": round(mean, 1),
                        "instructions_per_mac": round(mean / macs, 3) if macs else None})
    total = statistics.fmean(run.instructions)
    layer_sum = sum(entry["instructions"] for entry in entries)
    traced = statistics.fmean(counts.totals)
    return {"layers": entries, "layer_resolution_instructions": counts.resolution,
            "instructions_mean": round(total, 1), "layers_instructions_sum": round(layer_sum, 1),
            "layers_sum_ratio": round(layer_sum / total, 4) if total else None,
            "trace_instructions_per_inference": round(traced, 1),
            "trace_overhead_instructions": round(traced - total, 1)}


def onnxruntime_outputs(onnx_path: Any, inputs: Any, manifest: dict[str, Any]) -> Any:
    """onnxruntime's outputs for int8 ``inputs``, as int8 values in the bundle's output quantization."""
    import numpy as np

    from distillc.passes.export.to_onnx import reference_session

    session = reference_session(onnx_path)
    name = session.get_inputs()[0].name
    quant_in, quant_out = manifest["input"], manifest["output"]
    x = ((inputs.astype(np.float32) - np.float32(quant_in["zero_point"])) * np.float32(quant_in["scale"]))
    rows = [session.run(None, {name: x[i:i + 1]})[0].reshape(-1) for i in range(len(x))]
    y = np.stack(rows)
    q = np.rint(y / np.float32(quant_out["scale"])) + int(quant_out["zero_point"])
    return np.clip(q, -128, 127).astype(np.int64)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(VerifyHost)
    registry.add(VerifyQemu)
