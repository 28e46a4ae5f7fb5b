"""``eval.linear-probe``: how linearly separable the frozen features are (top-1 on the val split).

A logistic regression is fitted on standardised embeddings of the training split and scored on
the validation split.  The student passes through unchanged; the teachers named in the config are
probed the same way, as the reference the student is measured against.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class LinearProbe(Pass):
    name = "eval.linear-probe"
    description = "top-1 of a logistic-regression probe on frozen features (student and teachers)"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    uses_data = True
    tools = ("torch", "scikit-learn")

    class Config(PassConfig):
        teachers: list[str] = Field([], description="teachers to probe as a reference")
        c: float = Field(1.0, gt=0.0, description="inverse L2 regularisation of the probe")
        max_iter: int = Field(2000, ge=10)

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        from distillc.training import count_params

        data = ctx.data
        if not data.labelled:
            raise PassError(self.name, f"the linear probe needs labelled validation data; {data.name} has none")
        student = artifact.build(ctx.plugins)
        cfg = self.config
        metrics: dict[str, Any] = {"top1": linear_probe_top1(student, data, c=cfg.c, max_iter=cfg.max_iter),
                                   "params": count_params(student)}
        if cfg.teachers:
            metrics["teachers"] = {
                name: linear_probe_top1(ctx.teachers[name].build(ctx.plugins), data, embed=True, c=cfg.c,
                                        max_iter=cfg.max_iter)
                for name in cfg.teachers}
        return PassResult(artifact, metrics)


def linear_probe_top1(module: Any, data: Any, *, embed: bool = False, c: float = 1.0, max_iter: int = 2000) -> float:
    """Top-1 (fraction in 0..1) of a logistic regression on ``module``'s frozen features.

    ``embed=True`` reads ``module.embed(x)`` (teachers); otherwise ``module(x)`` (students).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from distillc.training import embed_all

    fn = (lambda m, b: m.embed(b)) if embed else None
    train = embed_all(module, data.train_x, fn=fn).numpy()
    val = embed_all(module, data.val_x, fn=fn).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train, data.train_y.numpy())
    return float((clf.predict(val) == data.val_y.numpy()).mean())


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(LinearProbe)
