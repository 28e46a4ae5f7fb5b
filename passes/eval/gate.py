"""The quality gate of ``quantize.brevitas-qat`` and the eval passes: no collapsed model leaves a compile.

Every pass that measures the student (its INT8 form after QAT, or whatever model an eval pass
sees) checks, unless its config says ``gate = "off"``:

- **constant embeddings**: the validation images' embeddings all equal (no dimension's standard
  deviation across them above ``CONSTANT_RTOL`` times its mean's magnitude: float rounding), or
  not finite.  Needs no labels.
- **chance**: the measured top-1 is not above chance.  Chance is the larger of ``1 / classes``
  and the share of the commonest validation class (what a constant guess scores); the top-1
  must be high enough that a one-sided binomial test at the validation size rejects chance at
  ``CHANCE_ALPHA``.  With 449 validation images of 10 classes that is 0.145; with 20 images,
  0.40: a small validation split cannot tell a weak model from a coin.

Besides the sanity gate, which ``gate = "off"`` turns off, a user may set ``min_top1`` (the
top-1 a model must reach) and ``max_drop`` (the most top-1 points the INT8 model may lose against
the FP32 student); those hold whatever ``gate`` says.  A failed check is a
:class:`~distillc.errors.QualityGateError` naming the pass and the metric.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from distillc.errors import QualityGateError
from distillc.pass_api import PassConfig

#: One-sided significance of the chance test: a top-1 this likely under chance or less fails.
CHANCE_ALPHA = 1e-3
#: A dimension whose std across images is at most this share of its mean's magnitude is constant.
CONSTANT_RTOL = 1e-6


class GateConfig(PassConfig):
    """The gate keys every gated pass's ``Config`` inherits."""

    gate: Literal["on", "off"] = Field("on", description="'on': fail the compile on constant embeddings or a top-1 "
                                                         "at chance; 'off': hand any model over")
    min_top1: float | None = Field(None, ge=0.0, le=1.0, description="fail the compile below this top-1 (0..1)")
    max_drop: float | None = Field(None, ge=0.0, le=100.0, description="fail the compile when INT8 loses more "
                                                                       "than this many top-1 points against FP32")


def check_embeddings(pass_name: str, config: GateConfig, embeddings: Any, *, what: str) -> dict[str, Any]:
    """Fail when ``embeddings`` (N, D) of the validation images are constant or not finite.

    A dimension varies when its std across the images exceeds ``CONSTANT_RTOL`` times its mean's
    magnitude (float rounding of a constant stays below that); the embeddings are constant when
    no dimension varies.  Magnitude alone says nothing: a random MobileNetV2's embeddings vary
    at 1e-7 beside constant dimensions near 1, and a linear probe reads them well.  Returns the
    gate's metrics (``varying_dims``, ``embedding_std_max``).  ``what`` names the model ("the
    INT8 student").
    """
    import numpy as np

    values = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    if len(values) < 2 or values.shape[1] == 0:
        return {}
    if not np.isfinite(values).all():
        if config.gate == "on":
            raise QualityGateError(pass_name, "embeddings", f"{what}'s validation embeddings are not finite (NaN or "
                                   f"inf){_OFF_HINT}")
        return {"varying_dims": None}
    std = values.std(axis=0)
    varying = int((std > CONSTANT_RTOL * np.abs(values.mean(axis=0))).sum() if std.max() > 0 else 0)
    out = {"varying_dims": varying, "embedding_std_max": float(std.max())}
    if config.gate == "on" and varying == 0:
        raise QualityGateError(pass_name, "varying_dims",
                               f"{what}'s embeddings are constant: varying_dims 0 of {values.shape[1]} across "
                               f"{len(values)} validation images (embedding_std_max {std.max():.3g}), a collapsed "
                               f"model{_OFF_HINT}")
    return out


def check_top1(pass_name: str, config: GateConfig, top1: float, labels: Any, num_classes: int, *, metric: str,
               what: str, reference: float | None = None, reference_metric: str = "",
               chance_test: bool = True) -> dict[str, Any]:
    """Fail when ``top1`` (on the validation ``labels``) is at chance (with ``chance_test``), below
    ``min_top1``, or more than ``max_drop`` points below ``reference`` (the FP32 top-1).  ``metric``
    names it in the message (``int8.top1``).  Returns the gate's metrics (``chance``,
    ``chance_limit``, ``drop_points``)."""
    import numpy as np

    labels = np.asarray(labels)
    out: dict[str, Any] = {}
    if chance_test and len(labels) and num_classes > 1:
        chance = max(1.0 / num_classes, float(np.bincount(labels).max()) / len(labels))
        limit = chance_limit(len(labels), chance)
        out = {"chance": chance, "chance_limit": limit}
        if config.gate == "on" and top1 < limit:
            raise QualityGateError(pass_name, metric,
                                   f"{what}'s {metric} {top1:.3f} is at chance ({num_classes} classes, chance "
                                   f"{chance:.3f}; {len(labels)} validation images need {limit:.3f} to tell a model "
                                   f"from chance){_OFF_HINT}")
    if config.min_top1 is not None and top1 < config.min_top1:
        raise QualityGateError(pass_name, metric, f"{what}'s {metric} {top1:.3f} is below min_top1 "
                                                  f"{config.min_top1:g}")
    if config.max_drop is not None:
        if reference is None:
            raise QualityGateError(pass_name, metric, f"max_drop needs the FP32 student's top-1 to compare "
                                                      f"{metric} with, and there is none here ({reference_metric})")
        drop = 100.0 * (reference - top1)
        out["drop_points"] = drop
        if drop > config.max_drop:
            raise QualityGateError(pass_name, metric,
                                   f"{what}'s {metric} {top1:.3f} is {drop:.1f} points below FP32 {reference:.3f} "
                                   f"({reference_metric}): more than max_drop {config.max_drop:g}")
    return out


def chance_limit(n: int, chance: float, alpha: float = CHANCE_ALPHA) -> float:
    """The least top-1 (a fraction of ``n``) that a one-sided binomial test tells from ``chance`` at ``alpha``:
    ``k / n`` for the smallest ``k`` with ``P(X >= k) <= alpha``, ``X ~ Binomial(n, chance)``."""
    if chance >= 1.0:
        return 1.0
    log_p, log_q = math.log(chance), math.log1p(-chance)
    tail = 0.0
    for k in range(n, -1, -1):  # add P(X = k) from the top until the tail passes alpha
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        tail += math.exp(log_pmf)
        if tail > alpha:
            return min(1.0, (k + 1) / n)
    return 0.0


_OFF_HINT = '; set gate = "off" to hand it over anyway'
