"""Fuzz `distillc validate` with seeded mutations of the example specs and print a summary.

    .venv/bin/python benchmarks/fuzz_specs.py [--count 1200] [--seed 0] [--show 20]

Each case mutates one example spec (wrong types, unknown keys and names, huge/negative/NaN/
infinite numbers, bad paths, deep nesting, huge values, random bytes; see tests/spec_fuzzing.py)
and runs `distillc validate` in this process.  Every outcome must be exit status 0 or 2, with no
internal error, every error line naming a key path or the spec file, and no line longer than
600 characters.  Prints the outcomes per mutation kind, the slowest cases and any that break
the contract; exits 1 if one does.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the mutations live with the tests that run a few hundred of them

from tests.spec_fuzzing import cases, outcome_problems, prepare_folder, run_validate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=20, help="contract breaks printed in full")
    args = parser.parse_args()

    examples = sorted((ROOT / "examples").glob("*/spec.toml"))
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    broken: list[str] = []
    slowest: list[tuple[float, str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distillc-fuzz-") as folder:
        prepare_folder(Path(folder))
        spec = Path(folder) / "spec.toml"
        for case in cases(examples, seed=args.seed, count=args.count):
            spec.write_bytes(case.content)
            outcome = run_validate(spec)
            problems = outcome_problems(outcome, spec)
            outcomes[case.kind]["broken" if problems else f"exit {outcome.exit_code}"] += 1
            slowest.append((outcome.seconds, f"{case.kind}: {case.change[:70]}"))
            if problems:
                broken.append(f"#{case.index} {case.example} {case.kind} ({case.change[:80]}): {'; '.join(problems)}")
    total = time.perf_counter() - started

    print(f"{args.count} mutated specs (seed {args.seed}) in {total:.1f} s, {1000 * total / args.count:.0f} ms each")
    print(f"{'kind':<14} {'exit 0':>7} {'exit 2':>7} {'broken':>7}")
    for kind, counts in sorted(outcomes.items()):
        print(f"{kind:<14} {counts['exit 0']:>7} {counts['exit 2']:>7} {counts['broken']:>7}")
    print("slowest:")
    for seconds, what in sorted(slowest, reverse=True)[:5]:
        print(f"  {seconds:6.2f} s  {what}")
    print(f"contract broken by {len(broken)} case(s)")
    for line in broken[: args.show]:
        print(f"  {line[:400]}")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
