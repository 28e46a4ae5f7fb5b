"""``quantize.brevitas-qat``: quantization-aware training of the student with Brevitas.

Graph-mode quantization (BatchNorm folded into the convolutions), per-channel weights (8 bits,
or fewer), 8-bit activations, calibration on training images, then QAT epochs that keep the
spec's label-free distillation objective, so the teacher keeps teaching while the student is
quantized.  ``objective`` picks it:

- ``"auto"`` (default): ``"feature"`` when ``teacher`` is set, else the objective of the last
  distillation pass before this one in ``[[passes]]`` (CA-DSSL, Bootleg, CoMAD,
  ``train.supervised``... any :class:`~distillc.passes.distill.base.DistillationPass`, and
  ``matryoshka`` / ``distill.clip-matryoshka`` through their ``qat_objective``), else ``"self"``;
- the ``use`` name of such a pass: its objective, built from that pass's spec keys;
- ``"feature"``: cosine to ``teacher``'s embedding through a linear projector initialised by
  least squares on the FP32 student;
- ``"self"``: the quantized student reproduces its own FP32 embedding.

A borrowed objective's heads (projectors, adapters, predictors) start fresh: the distillation
pass dropped its own.  They first train alone on the frozen quantized student for
``head_warmup_epochs``, so that QAT does not start with large, meaningless gradients.  FP32 and
INT8 linear-probe top-1 are reported side by side when the data has labels.

The INT8 student then passes the quality gate (``distillc.passes.eval.gate``): constant
validation embeddings, or an INT8 probe at chance, fail the compile unless ``gate = "off"``;
``min_top1`` and ``max_drop`` (points below FP32) are checked when set.  The FP32 probe (and,
for a model with Matryoshka class embeddings, the FP32 zero-shot top-1) is recorded in the
artifact's ``meta``, the reference of the eval passes' ``max_drop`` after this pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from pydantic import Field, model_validator

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError, SpecError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult
from distillc.passes.distill.base import Batch, DistillationPass, Objective, teacher_input_metrics
from distillc.passes.distill.feature import FeatureObjective
from distillc.passes.eval.gate import GateConfig, check_embeddings, check_top1

_BUILTIN_OBJECTIVES = ("auto", "self", "feature")


class BrevitasQat(Pass):
    name = "quantize.brevitas-qat"
    version = "4"  # 3: keeps any distillation pass's objective (objective = "auto"); 4: the quality gate
    description = "Brevitas QAT (BN folded, per-channel weights) keeping the distillation objective"
    takes = TorchModel
    makes = QuantTorchModel
    uses_data = True
    tools = ("torch", "brevitas")

    class Config(GateConfig):
        weight_bits: int = Field(8, ge=2, le=8, description="weight bit width; the C bundle stores 2-bit weights four per byte, 3- and "
                                                               "4-bit ones two per byte, 5..8-bit ones one per byte")
        act_bits: int = Field(8, ge=2, le=8, description="activation bit width")
        per_channel: bool = Field(True, description="one weight scale per output channel")
        calib_images: int = Field(256, ge=1, description="training images used to calibrate activation scales")
        epochs: int = Field(1, ge=0, le=100_000, description="QAT epochs; 0 = calibration only (PTQ)")
        lr: float = Field(1e-4, gt=0.0, le=1.0)
        batch_size: int = Field(128, ge=2)
        objective: str = Field("auto", description="objective QAT keeps: 'auto', 'self', 'feature', or the `use` "
                                                   "name of an earlier distillation pass in [[passes]]")
        teacher: str | None = Field(None, description="teacher of the 'feature' objective ('auto' then means 'feature')")
        head_warmup_epochs: int = Field(1, ge=0, le=1000, description="epochs training a borrowed objective's "
                                                                      "fresh heads alone before QAT")
        augment: float = Field(0.0, ge=0.0, le=1.0, description="student view augmentation ('feature' and 'self')")
        probe: bool = Field(True, description="report FP32 and INT8 linear-probe top-1 (labelled data)")

        @model_validator(mode="after")
        def _objective_needs(self) -> "BrevitasQat.Config":
            if self.objective == "feature" and self.teacher is None:
                raise ValueError("objective = 'feature' needs `teacher`")
            if self.teacher is not None and self.objective not in ("auto", "feature"):
                raise ValueError(f"`teacher` is the 'feature' objective's teacher; objective {self.objective!r} "
                                 f"brings its own teachers: remove `teacher`")
            if not self.probe and (self.min_top1 is not None or self.max_drop is not None):
                raise ValueError("min_top1 and max_drop judge the INT8 probe: they need probe = true")
            return self

    def __init__(self, config: PassConfig):
        super().__init__(config)
        self._source: Pass | None = None  # the pass whose objective QAT keeps
        self._kind = self._builtin_kind()

    def _builtin_kind(self) -> str:
        cfg = self.config
        if cfg.objective == "auto":
            return "feature" if cfg.teacher is not None else "self"
        return cfg.objective

    def link(self, upstream: Sequence[Pass], source: str) -> None:
        cfg = self.config
        distillers = [p for p in upstream if _keeps_objective(p)]
        self._source, self._kind = None, self._builtin_kind()
        if cfg.objective == "auto" and cfg.teacher is None and distillers:
            self._source = distillers[-1]
        elif cfg.objective not in _BUILTIN_OBJECTIVES:
            named = [p for p in distillers if p.name == cfg.objective]
            if not named:
                earlier = ", ".join(sorted({p.name for p in distillers})) or "none"
                raise SpecError(f"objective {cfg.objective!r} is not a distillation pass earlier in [[passes]] "
                                f"(earlier distillation passes: {earlier}; or use 'auto', 'self', 'feature')",
                                f"{source}.objective")
            self._source = named[-1]
        if self._source is not None:
            self._kind = self._source.name

    def linked_key(self) -> dict[str, Any]:
        if self._source is None:
            return {"objective": self._kind}
        p = self._source
        return {"objective": {"pass": p.name, "version": p.version, "config": p.config.model_dump(mode="json")}}

    def teachers(self) -> list[str]:
        if self._source is not None:
            return self._source.teachers()
        return [self.config.teacher] if self.config.teacher is not None else []

    @classmethod
    def rebuild_quantized(cls, artifact: QuantTorchModel, float_model: Any) -> Any:
        """The quantized module of ``artifact`` (this pass's output) on a fresh float module: the
        same Brevitas graph quantization, then the stored state (``QuantTorchModel.build``)."""
        import torch

        from distillc.passes.quantize.brevitas_model import quantize

        size = artifact.options["image_size"]
        shape = (0, artifact.options.get("in_chans", 3), size, size)
        quant = {k: v for k, v in artifact.quant.items() if k != "pass"}
        qmodel = quantize(float_model, torch.zeros(shape), **quant)
        qmodel.load_state_dict(artifact.state, strict=True)
        return qmodel

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch

        from distillc.passes.distill.base import train_with_objective
        from distillc.passes.eval.probe import PROBE_DEFAULTS, linear_probe_top1
        from distillc.passes.quantize.brevitas_model import QuantStudent, quantize
        from distillc.training import count_params

        cfg = self.config
        data = ctx.data
        # Brevitas's fake-quant graph runs in FP32 on the CPU: bf16 autocast would change the
        # rounding that the integer backend reproduces.
        device = torch.device("cpu")
        torch.manual_seed(ctx.seed)
        float_model = artifact.build(ctx.plugins).eval()
        metrics: dict[str, Any] = {"objective": self._kind}
        if cfg.probe and data.labelled:
            metrics["fp32"] = {"top1": linear_probe_top1(float_model, data, **PROBE_DEFAULTS)}

        qmodel = quantize(float_model, data.train_x[: cfg.calib_images], weight_bits=cfg.weight_bits,
                          act_bits=cfg.act_bits, per_channel=cfg.per_channel)
        student = QuantStudent(qmodel, float_model, data.train_x[:2])
        objective = self._objective(ctx, float_model)
        objective.setup(student, device)
        if self._source is not None and cfg.head_warmup_epochs and count_params(objective.heads):
            # Fresh heads first learn to read the frozen quantized student.
            student.requires_grad_(False)
            warm = dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / "heads")
            head_losses = train_with_objective(warm, student, objective, epochs=cfg.head_warmup_epochs,
                                               lr=getattr(self._source.config, "lr", 1e-3), batch_size=cfg.batch_size,
                                               weight_decay=0.0, device=device, description=f"{ctx.step_id} heads")
            student.requires_grad_(True)
            metrics["head_warmup_loss"] = head_losses[-1]
            metrics["head_warmup_epoch_losses"] = head_losses
        losses = train_with_objective(ctx, student, objective, epochs=cfg.epochs, lr=cfg.lr,
                                      batch_size=cfg.batch_size, weight_decay=0.0, device=device,
                                      description=ctx.step_id, schedule=False)
        qmodel.eval()
        if losses:
            metrics["loss"] = losses[-1]
            metrics["first_loss"] = losses[0]
            metrics["epoch_losses"] = losses
        metrics.update({k: v for k, v in objective.metrics().items() if k not in metrics})
        metrics.update(teacher_input_metrics(ctx, self.teachers()))
        metrics["gate"], reference = self._gate(qmodel, float_model, artifact.meta, metrics, data)
        quant = {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "per_channel": cfg.per_channel}
        state = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()}
        out = QuantTorchModel(role="student", arch=artifact.arch, options=artifact.options, state=state,
                              meta={**artifact.meta, "quant": quant, "qat_objective": self._kind, **reference},
                              head=artifact.head, quant=quant)
        return PassResult(out, metrics)

    def _gate(self, qmodel: Any, float_model: Any, meta: dict[str, Any], metrics: dict[str, Any],
              data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Measure the INT8 probe, run the quality gate on the INT8 student, and return the gate's
        metrics and the FP32 references for ``meta`` (what the eval passes' ``max_drop`` compares with)."""
        from distillc.passes.eval.probe import PROBE_DEFAULTS, frozen_features, probe_top1
        from distillc.training import embed_all

        cfg = self.config
        what = "the INT8 student"
        reference: dict[str, Any] = {}
        if "fp32" not in metrics:
            if cfg.min_top1 is not None or cfg.max_drop is not None:
                raise PassError(self.name, f"min_top1 and max_drop need labelled validation data; {data.name} has none")
            return check_embeddings(self.name, cfg, embed_all(qmodel, data.val_x).numpy(), what=what), reference
        train, val = frozen_features(qmodel, data)
        gate = check_embeddings(self.name, cfg, val, what=what)
        metrics["int8"] = {"top1": probe_top1(train, data.train_y, val, data.val_y, **PROBE_DEFAULTS)}
        gate.update(check_top1(self.name, cfg, metrics["int8"]["top1"], data.val_y, data.num_classes,
                               metric="int8.top1", what=what, reference=metrics["fp32"]["top1"],
                               reference_metric="fp32.top1"))
        reference["fp32_probe"] = {"top1": metrics["fp32"]["top1"], **PROBE_DEFAULTS}
        if meta.get("matryoshka"):
            from distillc.passes.distill.matryoshka import ClassEmbeddings, zero_shot_top1

            classes = ClassEmbeddings.from_meta(meta["matryoshka"])
            if len(classes.classes) == data.num_classes:
                reference["fp32_zero_shot_top1"] = zero_shot_top1(float_model, data, classes, classes.dims, self.name)
        return gate, reference

    def _objective(self, ctx: PassContext, float_model: Any) -> Objective:
        if self._source is not None:
            if hasattr(self._source, "qat_objective"):
                return self._source.qat_objective(ctx, float_model)
            return self._source.objective(ctx)
        if self._kind == "feature":
            return FittedFeatureObjective(ctx, teacher=self.config.teacher, augment=self.config.augment,
                                           float_model=float_model)
        return SelfObjective(ctx, float_model=float_model, augment=self.config.augment)


def _keeps_objective(p: Pass) -> bool:
    """Whether QAT can keep ``p``'s objective: a distillation pass, or a pass with ``qat_objective``
    (``matryoshka`` and ``distill.clip-matryoshka``)."""
    return isinstance(p, DistillationPass) or callable(getattr(p, "qat_objective", None))


class SelfObjective(Objective):
    """The quantized student reproduces the FP32 student's embedding of the clean image (cosine)."""

    def __init__(self, ctx: PassContext, *, float_model: Any, augment: float):
        super().__init__(ctx)
        self.float_model = float_model
        self.augment_strength = augment

    def setup(self, student: Any, device: Any) -> None:
        import torch.nn.functional as F
        from torch import nn

        from distillc.plugins.augment import Augment
        from distillc.training import embed_all

        self.targets = F.normalize(embed_all(self.float_model, self.ctx.data.train_x), dim=1)
        self.augment = Augment(strength=self.augment_strength, flip=False)
        self.heads = nn.ModuleDict()

    def loss(self, student: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        z = student(self.augment(batch.x, batch.generator))
        return 1.0 - F.cosine_similarity(z.float(), self.targets[batch.idx].to(z.device), dim=1).mean()


class FittedFeatureObjective(FeatureObjective):
    """``distill.feature``'s objective with a linear projector fitted by least squares first.

    A random projector would send large, meaningless gradients into the freshly quantized
    student in the first QAT steps; the ridge fit from the FP32 student's embeddings to the
    teacher's starts from the best linear map instead.
    """

    def __init__(self, ctx: PassContext, *, teacher: str, augment: float, float_model: Any):
        super().__init__(ctx, teacher=teacher, projector_hidden=0, augment=augment)
        self.float_model = float_model

    def setup(self, student: Any, device: Any) -> None:
        from distillc.training import embed_all

        super().setup(student, device)
        fit_linear(self.heads, embed_all(self.float_model, self.ctx.data.train_x), self.targets)


def fit_linear(layer: Any, x: Any, y: Any, ridge: float = 1e-3) -> None:
    """Set ``layer`` (nn.Linear) to the ridge least-squares map from ``x`` to ``y``."""
    import torch

    ones = torch.ones(len(x), 1, dtype=x.dtype)
    a = torch.cat([x, ones], dim=1).double()
    gram = a.T @ a + ridge * len(x) * torch.eye(a.shape[1], dtype=a.dtype)
    solution = torch.linalg.solve(gram, a.T @ y.double())
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(BrevitasQat)
