"""The static memory planner on hand-made and random kernel sequences (no TVM needed)."""

from __future__ import annotations

import random

import pytest

from distillc.errors import PassError
from distillc.passes.backend.memory import MemoryPlan, arena_floor, check_plan, plan_memory
from distillc.passes.backend.program import ACTIVATION, INPUT, OUTPUT, Program, Step, Tensor


def _program(sizes: list[int], steps: list[tuple[list[int], int]], dtypes=None) -> Program:
    """Tensor 0 is the input, the last tensor the output, the others int8 activations."""
    prog = Program(quant={})
    last = len(sizes) - 1
    for tid, size in enumerate(sizes):
        kind = INPUT if tid == 0 else OUTPUT if tid == last else ACTIVATION
        dtype = (dtypes or {}).get(tid, "int8")
        itemsize = {"int8": 1, "int32": 4, "int64": 8}[dtype]
        prog.tensors.append(Tensor(tid, f"t{tid}", (size // itemsize,), dtype, kind))
    for index, (args, out) in enumerate(steps):
        prog.steps.append(Step(index, f"s{index}", f"k{index}", args, out))
    prog.input_id, prog.output_id = 0, last
    return prog


def _inverted_residuals(blocks: int) -> Program:
    """MobileNetV2-like: x -> expand (6x) -> depthwise (6x) -> project (+ x) -> ..."""
    sizes, steps = [8], []
    x = 0
    for _ in range(blocks):
        expand, dw, project = len(sizes), len(sizes) + 1, len(sizes) + 2
        sizes += [48, 48, 8]
        steps += [([x], expand), ([expand], dw), ([dw, x], project)]
        x = project
    sizes.append(4)
    steps.append(([x], len(sizes) - 1))
    return _program([s * 1024 for s in sizes], steps)


def test_floor_counts_tensors_live_at_each_step():
    prog = _program([16, 100, 50, 30, 8], [([0], 1), ([1], 2), ([2, 1], 3), ([3], 4)])
    # step 2 reads t2 and t1 and writes t3: 100 + 50 + 30 live at once
    assert arena_floor(prog) == 180


def test_residual_chain_is_planned_at_the_floor():
    prog = _inverted_residuals(4)
    plan = plan_memory(prog)
    assert plan.floor_bytes == (8 + 48 + 48) * 1024
    assert plan.arena_bytes == plan.floor_bytes
    assert not plan.above_floor


@pytest.mark.parametrize("seed", range(6))
def test_random_programs_get_valid_deterministic_plans(seed):
    rng = random.Random(seed)
    count = rng.randint(5, 40)
    sizes = [rng.choice([4, 12, 64, 100, 256, 1000, 4096]) for _ in range(count + 2)]
    steps = []
    for out in range(1, count + 2):
        args = sorted(set(rng.sample(range(out), k=min(out, rng.randint(1, 3)))))
        steps.append((args, out))
    prog = _program(sizes, steps)
    plan = plan_memory(prog)
    check_plan(prog, plan)
    assert plan.arena_bytes >= plan.floor_bytes == arena_floor(prog)
    again = plan_memory(prog)
    assert again.offsets == plan.offsets and again.arena_bytes == plan.arena_bytes


def test_64_bit_tensors_are_8_byte_aligned():
    prog = _program([4, 5, 16, 8], [([0], 1), ([1], 2), ([2, 1], 3)], dtypes={2: "int64"})
    plan = plan_memory(prog)
    assert plan.offsets[2] % 8 == 0


def test_check_plan_rejects_a_tensor_outside_the_arena():
    prog = _program([4, 64, 64, 8], [([0], 1), ([1], 2), ([2], 3)])
    plan = plan_memory(prog)
    broken = MemoryPlan(dict(plan.offsets), 64, plan.floor_bytes)
    broken.offsets[2] = 32
    with pytest.raises(PassError, match="outside"):
        check_plan(prog, broken)


def test_plan_round_trips_through_a_dict():
    prog = _inverted_residuals(2)
    plan = plan_memory(prog)
    assert MemoryPlan.from_dict(plan.to_dict()) == plan
