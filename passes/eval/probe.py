"""``eval.linear-probe``: how linearly separable the frozen features are (top-1 on the val split).

A logistic regression is fitted on standardised embeddings of the training split and scored on
the validation split.  With ``shots``, the same probe is also fitted on ``k`` labelled training
images per class only (the mean of ``draws`` seeded draws): the label-free methods are compared
there, since with every label even random features separate easy data.  The student passes
through unchanged; the teachers named in the config are probed the same way, as the reference
the student is measured against.  The student's result goes through the quality gate
(``gate.py``): constant embeddings or a top-1 at chance fail the compile.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassContext, PassResult
from distillc.passes.distill.base import teacher_input_metrics, teacher_module
from distillc.passes.eval.gate import GateConfig, check_embeddings, check_top1


#: The probe's regularisation and solver budget unless a spec sets them (also the probe QAT measures FP32 and INT8 with).
PROBE_DEFAULTS = {"c": 1.0, "max_iter": 2000}


class LinearProbe(Pass):
    name = "eval.linear-probe"
    version = "2"  # 2: few-shot probes, the quality gate
    description = "top-1 of a logistic-regression probe on frozen features (student and teachers), full and few-shot"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    uses_data = True
    tools = ("torch", "scikit-learn")

    class Config(GateConfig):
        teachers: list[str] = Field([], description="teachers to probe as a reference")
        c: float = Field(PROBE_DEFAULTS["c"], gt=0.0, description="inverse L2 regularisation of the probe")
        max_iter: int = Field(PROBE_DEFAULTS["max_iter"], ge=10)
        shots: list[int] = Field([1, 5], max_length=16, description="labelled training images per class of the "
                                                                    "few-shot probes; [] = none")
        draws: int = Field(5, ge=1, le=100, description="seeded draws each few-shot probe is averaged over")

        @field_validator("shots")
        @classmethod
        def _shots_positive(cls, shots: list[int]) -> list[int]:
            if any(k < 1 for k in shots) or len(set(shots)) != len(shots):
                raise ValueError(f"shots must be distinct counts >= 1 (got {shots})")
            return shots

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        from distillc.training import count_params

        data = ctx.data
        if not data.labelled:
            raise PassError(self.name, f"the linear probe needs labelled validation data; {data.name} has none")
        cfg = self.config
        check_shots(self.name, cfg.shots, data.train_y)
        student = artifact.build(ctx.plugins)
        quantized = isinstance(artifact, QuantTorchModel)
        train, val = frozen_features(student, data)
        top1 = probe_top1(train, data.train_y, val, data.val_y, c=cfg.c, max_iter=cfg.max_iter)
        metrics: dict[str, Any] = {"top1": top1, "params": count_params(student)}
        if cfg.shots:
            metrics["few_shot"] = few_shot_top1(train, data.train_y, val, data.val_y, shots=cfg.shots,
                                                draws=cfg.draws, seed=ctx.seed, c=cfg.c, max_iter=cfg.max_iter)
        if cfg.teachers:
            metrics["teachers"], metrics["teacher_few_shot"] = {}, {}
            for name in cfg.teachers:
                t_train, t_val = frozen_features(teacher_module(ctx, name), data, embed=True)
                metrics["teachers"][name] = probe_top1(t_train, data.train_y, t_val, data.val_y, c=cfg.c,
                                                       max_iter=cfg.max_iter)
                if cfg.shots:
                    metrics["teacher_few_shot"][name] = few_shot_top1(
                        t_train, data.train_y, t_val, data.val_y, shots=cfg.shots, draws=cfg.draws, seed=ctx.seed,
                        c=cfg.c, max_iter=cfg.max_iter)
            if not cfg.shots:
                del metrics["teacher_few_shot"]
            metrics.update(teacher_input_metrics(ctx, list(cfg.teachers)))
        what = "the INT8 student" if quantized else "the student"
        gate = check_embeddings(self.name, cfg, val, what=what)
        reference = fp32_reference(artifact, cfg.c, cfg.max_iter) if quantized else None
        gate.update(check_top1(self.name, cfg, top1, data.val_y, data.num_classes, metric="top1", what=what,
                               reference=reference, reference_metric=_REFERENCE_NOTE if quantized else
                               "the input is a float model; max_drop applies after quantize.brevitas-qat"))
        metrics["gate"] = gate
        return PassResult(artifact, metrics)


#: Where an INT8 model's FP32 reference comes from (quantize.brevitas-qat records it in the artifact).
_REFERENCE_NOTE = "the FP32 probe quantize.brevitas-qat recorded, with probe = true, labelled data and the same c and max_iter"


def fp32_reference(artifact: TorchModel, c: float, max_iter: int) -> float | None:
    """The FP32 student's probe top-1 the quantizing pass recorded in ``meta["fp32_probe"]``, if it
    was measured with the same probe settings (else None: another probe is no reference)."""
    ref = artifact.meta.get("fp32_probe")
    if not ref or ref.get("c") != c or ref.get("max_iter") != max_iter:
        return None
    return float(ref["top1"])


def check_shots(pass_name: str, shots: list[int], train_y: Any) -> None:
    """A few-shot probe of ``k`` images per class needs ``k`` training images of every class."""
    import torch

    if not shots:
        return
    counts = torch.bincount(train_y[train_y >= 0])
    present = counts[counts > 0]
    fewest = int(present.min()) if len(present) else 0
    if max(shots) > fewest:
        klass = int(torch.nonzero(counts == fewest)[0]) if len(present) else -1
        raise PassError(pass_name, f"shots = {shots}: class {klass} has only {fewest} training images; set shots "
                                   f"to counts of at most {fewest}")


def frozen_features(module: Any, data: Any, *, embed: bool = False) -> tuple[Any, Any]:
    """``module``'s frozen embeddings of the training and validation images (numpy, float32).

    ``embed=True`` reads ``module.embed(x)`` (teachers); otherwise ``module(x)`` (students).
    """
    from distillc.training import embed_all

    fn = (lambda m, b: m.embed(b)) if embed else None
    return embed_all(module, data.train_x, fn=fn).numpy(), embed_all(module, data.val_x, fn=fn).numpy()


def probe_top1(train: Any, train_y: Any, val: Any, val_y: Any, *, c: float = 1.0, max_iter: int = 2000) -> float:
    """Top-1 (fraction in 0..1) on ``val`` of a logistic regression fitted on standardised ``train``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train, np.asarray(train_y))
    return float((clf.predict(val) == np.asarray(val_y)).mean())


def few_shot_top1(train: Any, train_y: Any, val: Any, val_y: Any, *, shots: list[int], draws: int = 5,
                  seed: int = 0, c: float = 1.0, max_iter: int = 2000) -> dict[str, float]:
    """``{"1": top1, "5": top1}``: the probe fitted on ``k`` training images per class, the mean over
    ``draws`` seeded draws (draw ``i`` uses seed ``seed + i``: the choice ``matryoshka``'s ``shots`` makes)."""
    from distillc.passes.distill.matryoshka import few_shot_indices

    out = {}
    for k in shots:
        scores = []
        for draw in range(draws):
            idx = few_shot_indices(train_y, k, seed + draw).numpy()
            scores.append(probe_top1(train[idx], train_y[idx], val, val_y, c=c, max_iter=max_iter))
        out[str(k)] = sum(scores) / len(scores)
    return out


def linear_probe_top1(module: Any, data: Any, *, embed: bool = False, c: float = 1.0, max_iter: int = 2000) -> float:
    """Top-1 (fraction in 0..1) of a logistic regression on ``module``'s frozen features.

    ``embed=True`` reads ``module.embed(x)`` (teachers); otherwise ``module(x)`` (students).
    """
    train, val = frozen_features(module, data, embed=embed)
    return probe_top1(train, data.train_y, val, data.val_y, c=c, max_iter=max_iter)


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(LinearProbe)
