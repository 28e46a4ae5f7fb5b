"""Quality of each label-free method on scikit-learn's digits, against a random student and the supervised bound.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py [--methods ca-dssl,bootleg,...] [--quick]

Runs each method's example spec (``examples/<method>/spec.toml``; ``feature`` is the quickstart)
up to its ``eval.linear-probe`` pass, each in its own temporary work directory and cache, so a
method's minutes include training its teacher(s) from scratch, as on a fresh machine.  The
teachers are trained by the specs on the digits' labels (no weights can be downloaded): that is
the only step of a distillation run that sees labels, besides the probe that measures it.

Two references, with the same student (MobileNetV2-0.35, 16 px):

- ``random-init``: the student as initialised, never trained, probed the same way;
- ``supervised``: ``examples/supervised`` (``train.supervised`` on the labels), the upper bound.

Columns: the linear-probe top-1 on the validation split (logistic regression on the frozen
embeddings of all labelled training images), that top-1 as a percentage of the supervised
student's, the same probe fitted on one labelled image per class (mean over five seeded draws;
digits are easy enough that with every label even random features separate them), the student's
parameters as it ships, the parameters of the method's training aids (projection heads, adapters,
predictors, decoders; for the Matryoshka passes the head, which ships), and minutes of wall time.

``--quick`` turns every ``epochs = N`` of the specs into 1: a smoke run, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROBE = "eval.linear-probe"

#: method -> (example folder, the pass that trains the student, or None for the random baseline)
METHODS: dict[str, tuple[str, str | None]] = {
    "random-init": ("supervised", None),
    "feature": ("quickstart", "distill.feature"),
    "ca-dssl": ("ca-dssl", "distill.ca-dssl"),
    "bootleg": ("bootleg", "distill.bootleg"),
    "comad": ("comad", "distill.comad"),
    "clip-matryoshka": ("clip-matryoshka", "distill.clip-matryoshka"),
    "matryoshka": ("matryoshka", "matryoshka"),
    "supervised": ("supervised", "train.supervised"),
}
FEW_SHOT = 1          # labelled images per class of the few-shot probe
FEW_SHOT_DRAWS = 5    # seeded draws it is averaged over
MARGIN = 0.15         # target: every method >= random-init + 15 points
SUPERVISED_SHARE = 0.90  # target: ca-dssl >= 90 % of the supervised student


@dataclass
class Row:
    method: str
    top1: float
    few_shot: float
    params: int
    head_params: int | None
    minutes: float
    notes: dict[str, Any] = field(default_factory=dict)
    images: tuple[int, int] = (0, 0)  # training, validation
    image_size: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (random-init and supervised always run)")
    parser.add_argument("--quick", action="store_true", help="one epoch everywhere: a smoke run")
    args = parser.parse_args()
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in wanted or m in ("random-init", "supervised")]
    os.environ.setdefault("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")

    import torch

    from distillc.plugin_manager import load_plugins

    plugins = load_plugins()
    rows = []
    for method in methods:
        print(f"running {method} ...", flush=True)
        rows.append(run_method(method, plugins, quick=args.quick))
    print_table(rows, quick=args.quick, threads=torch.get_num_threads())


def run_method(method: str, plugins: Any, *, quick: bool) -> Row:
    """Compile the method's spec up to the probe in a fresh temporary work directory and cache."""
    from distillc.run import compile_spec
    from distillc.progress import SilentProgress

    folder, pass_name = METHODS[method]
    source = EXAMPLES / folder / "spec.toml"
    text = source.read_text() if pass_name else random_init_spec(source)
    if quick:
        text = re.sub(r"\bepochs = [1-9]\d*", "epochs = 1", text)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.toml"
        spec_path.write_text(text)
        os.environ["DISTILLC_CACHE"] = str(Path(tmp) / "cache")
        t0 = time.perf_counter()
        result = compile_spec(spec_path, workdir=Path(tmp) / "work", until=PROBE, progress=SilentProgress(),
                              plugins=plugins)
        minutes = (time.perf_counter() - t0) / 60
    metrics = result.report["metrics"]
    probe = metrics[PROBE]
    trained = metrics.get(pass_name, {}) if pass_name else {}
    notes = {k: trained[k] for k in ("zero_shot_top1", "val_top1") if k in trained}
    teachers = {step["id"].removeprefix("teacher:"): metrics[step["id"]]["supervised_val_top1"]
                for step in result.report["plan"] if step["id"].startswith("teacher:")}
    if teachers:
        notes["teacher_supervised_top1"] = teachers
    if probe.get("teachers"):
        notes["teacher_probe_top1"] = probe["teachers"]
    data = result.plan.spec.load_data(plugins)
    return Row(method=method, top1=probe["top1"], few_shot=few_shot_probe(result.artifact.build(plugins), data),
               params=probe["params"], head_params=trained.get("head_params"), minutes=minutes, notes=notes,
               images=(len(data.train_x), len(data.val_x)), image_size=int(data.train_x.shape[-1]))


def random_init_spec(source: Path) -> str:
    """A spec with ``source``'s data and student and nothing but the probe: the untrained student."""
    spec = tomllib.loads(source.read_text())
    spec["distillc"]["name"] = "random-init"
    sections = {"distillc": spec["distillc"], "data": spec["data"], "student": spec["student"]}
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]  # scalars and lists only
    lines += ["[[passes]]", f'use = "{PROBE}"', "[target]", 'use = "host"']
    return "\n".join(lines) + "\n"


def few_shot_probe(model: Any, data: Any) -> float:
    """The linear probe of ``eval.linear-probe``, fitted on ``FEW_SHOT`` labelled images per class, averaged
    over ``FEW_SHOT_DRAWS`` seeded draws (the same seeded choice ``matryoshka`` uses for its ``shots``)."""
    from distillc.passes.eval.probe import linear_probe_top1
    from distillc.passes.distill.matryoshka import few_shot_indices

    scores = []
    for seed in range(FEW_SHOT_DRAWS):
        idx = few_shot_indices(data.train_y, FEW_SHOT, seed)
        subset = SimpleNamespace(train_x=data.train_x[idx], train_y=data.train_y[idx], val_x=data.val_x,
                                 val_y=data.val_y)
        scores.append(linear_probe_top1(model, subset))
    return sum(scores) / len(scores)


def print_table(rows: list[Row], *, quick: bool, threads: int) -> None:
    by_method = {r.method: r for r in rows}
    supervised, random = by_method["supervised"], by_method["random-init"]
    print()
    train, val = supervised.images
    print(f"sklearn-digits, {supervised.image_size} px, {train:,} training / {val:,} validation images; "
          f"torch threads {threads}"
          + ("; --quick (1 epoch everywhere): numbers mean nothing" if quick else ""))
    header = (f"{'method':<17}{'probe top-1':>12}{'% of supervised':>17}{f'{FEW_SHOT}-shot probe':>14}"
              f"{'params':>10}{'proj. params':>14}{'minutes':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        head = "-" if r.head_params is None else f"{r.head_params:,}" + ("*" if "matryoshka" in r.method else "")
        print(f"{r.method:<17}{r.top1:>12.3f}{100 * r.top1 / supervised.top1:>16.1f}%{r.few_shot:>14.3f}"
              f"{r.params:>10,}{head:>14}{r.minutes:>9.1f}")
    print("* the Matryoshka head, which ships in the model (included in params); the other projection "
          "parameters are training aids dropped after the pass")
    print()
    for r in rows:
        if r.notes:
            print(f"{r.method}: {json.dumps(r.notes, sort_keys=True)}")
    print()
    print(f"targets: each method >= random-init + {100 * MARGIN:.0f} points (probe top-1 {random.top1:.3f}, "
          f"{FEW_SHOT}-shot {random.few_shot:.3f}); ca-dssl >= {100 * SUPERVISED_SHARE:.0f}% of supervised")
    for r in rows:
        if r.method in ("random-init", "supervised"):
            continue
        print(f"  {r.method:<17} probe {100 * (r.top1 - random.top1):+6.1f} points, "
              f"{FEW_SHOT}-shot {100 * (r.few_shot - random.few_shot):+6.1f} points"
              + (f", {100 * r.top1 / supervised.top1:.1f}% of supervised" if r.method == "ca-dssl" else ""))


if __name__ == "__main__":
    main()
