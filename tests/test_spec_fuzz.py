"""A seeded spec fuzzer: mutated example specs get exit status 0 or 2 and one clear line per problem.

Each case is one mutation of an example spec (tests/spec_fuzzing.py: wrong types, unknown keys
and names, huge/negative/NaN/infinite numbers, bad paths, deep nesting, huge values, random
bytes) run through ``distillc validate`` in this process.  ``benchmarks/fuzz_specs.py`` runs more.
"""

from __future__ import annotations

from pathlib import Path

from tests.spec_fuzzing import KINDS, cases, outcome_problems, prepare_folder, run_validate

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/spec.toml"))
CASES = 300
#: Far above the slowest case (a 1 MB value, about 0.5 s on a loaded 2-core machine): catches a hang.
SECONDS_PER_CASE = 20.0


def test_mutated_example_specs_are_valid_or_one_clear_error_per_problem(tmp_path):
    prepare_folder(tmp_path)
    spec = tmp_path / "spec.toml"
    failures, kinds = [], set()
    for case in cases(EXAMPLES, seed=9, count=CASES):
        spec.write_bytes(case.content)
        outcome = run_validate(spec)
        kinds.add(case.kind)
        problems = outcome_problems(outcome, spec)
        if outcome.seconds > SECONDS_PER_CASE:
            problems.append(f"took {outcome.seconds:.1f} s")
        if problems:
            failures.append(f"#{case.index} {case.example} {case.kind} ({case.change[:80]}): {problems[0]}")
    assert failures == []
    assert kinds == set(KINDS)


def test_the_fuzzer_is_seeded():
    first = [c.content for c in cases(EXAMPLES, seed=3, count=40)]
    assert first == [c.content for c in cases(EXAMPLES, seed=3, count=40)]
    assert first != [c.content for c in cases(EXAMPLES, seed=4, count=40)]
