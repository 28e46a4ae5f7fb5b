"""Static memory plan: every activation at a fixed offset of one arena (the ``plan-memory`` stage).

The model input and output live in the caller's buffers and the constants in flash, so the
arena holds only intermediate activations.  A tensor is live from the step that writes it to
the last step that reads it (inclusive), so a kernel's inputs and output never share bytes.

The floor is the largest total size of tensors live at one step: no plan that keeps each
tensor in one place can use less.  Offsets come from a greedy best-fit placement (TFLite's
"greedy by size" idea), tried with several orderings; the smallest arena wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distillc.errors import PassError

from .program import Program

ABOVE_FLOOR_TOLERANCE = 1.05


@dataclass
class MemoryPlan:
    """Arena offsets (tensor id -> byte offset), the arena size and its lower bound."""

    offsets: dict = field(default_factory=dict)
    arena_bytes: int = 0
    floor_bytes: int = 0
    strategy: str = ""

    @property
    def above_floor(self) -> bool:
        return self.arena_bytes > ABOVE_FLOOR_TOLERANCE * self.floor_bytes

    def to_dict(self) -> dict:
        return {
            "offsets": {str(k): v for k, v in sorted(self.offsets.items())},
            "arena_bytes": self.arena_bytes,
            "floor_bytes": self.floor_bytes,
            "strategy": self.strategy,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryPlan":
        return cls({int(k): int(v) for k, v in data["offsets"].items()}, int(data["arena_bytes"]),
                   int(data["floor_bytes"]), str(data.get("strategy", "")))


def alignment(dtype_size: int) -> int:
    """Byte alignment of an arena tensor: 4, or 8 for 64-bit elements."""
    return 8 if dtype_size >= 8 else 4


def arena_floor(prog: Program) -> int:
    """The largest total of activation bytes live at any step of the executed order."""
    spans = prog.lifetimes()
    floor = 0
    for step in prog.steps:
        live = sum(prog.tensor(t).nbytes for t, (a, b) in spans.items() if a <= step.index <= b)
        floor = max(floor, live)
    return floor


def plan_memory(prog: Program, *, pass_name: str = "plan-memory",
                search_budget: int = 50_000) -> MemoryPlan:
    """Place every activation of ``prog`` in one arena; returns the smallest plan found.

    First a greedy best-fit placement with three orderings; if that is above the floor, a
    depth-first search places tensors in execution order, trying each free gap's low and high
    end, under a capacity that starts at the floor and grows by 1% steps (``search_budget``
    placements per capacity).  The search is deterministic, so the bundle bytes are too.
    """
    spans = prog.lifetimes()
    floor = arena_floor(prog)
    tensors = {tid: prog.tensor(tid) for tid in spans}
    orders = {
        "greedy-by-size": sorted(spans, key=lambda t: (-tensors[t].nbytes, spans[t][0], t)),
        "greedy-by-duration": sorted(
            spans, key=lambda t: (-(spans[t][1] - spans[t][0]), -tensors[t].nbytes, t)),
        "greedy-by-start": sorted(spans, key=lambda t: (spans[t][0], -tensors[t].nbytes, t)),
    }
    best = None
    for strategy, order in orders.items():
        offsets = _place(order, spans, tensors)
        plan = MemoryPlan(offsets, _extent(offsets, tensors), floor, strategy)
        if best is None or plan.arena_bytes < best.arena_bytes:
            best = plan
        if best.arena_bytes <= floor:
            break
    if best.arena_bytes > floor:
        in_order = orders["greedy-by-start"]
        capacity = floor
        while capacity < best.arena_bytes:
            offsets = _search(in_order, spans, tensors, capacity, search_budget)
            if offsets is not None:
                best = MemoryPlan(offsets, _extent(offsets, tensors), floor, "search")
                break
            capacity = max(capacity + 8, int(capacity * 1.01))
    check_plan(prog, best, pass_name=pass_name)
    return best


def _extent(offsets: dict, tensors: dict) -> int:
    return max((offsets[t] + tensors[t].nbytes for t in offsets), default=0)


def _busy(tid, offsets, spans, tensors) -> list:
    """Sorted byte ranges of the placed tensors live at the same time as ``tid``."""
    start, end = spans[tid]
    return sorted(
        (offsets[o], offsets[o] + tensors[o].nbytes)
        for o in offsets
        if spans[o][0] <= end and start <= spans[o][1]
    )


def _place(order, spans, tensors) -> dict:
    """Best-fit: each tensor goes to the smallest aligned gap that holds it, else on top."""
    offsets: dict[int, int] = {}
    for tid in order:
        size = tensors[tid].nbytes
        align = alignment(_itemsize(tensors[tid]))
        best_offset, best_waste = None, None
        cursor = 0
        for lo, hi in _busy(tid, offsets, spans, tensors):
            candidate = -(-cursor // align) * align
            if candidate + size <= lo and (best_waste is None or lo - candidate - size < best_waste):
                best_offset, best_waste = candidate, lo - candidate - size
            cursor = max(cursor, hi)
        if best_offset is None:
            best_offset = -(-cursor // align) * align
        offsets[tid] = best_offset
    return offsets


def _candidates(tid, offsets, spans, tensors, capacity) -> list:
    """Aligned offsets at the low and the high end of every free gap below ``capacity``."""
    size = tensors[tid].nbytes
    align = alignment(_itemsize(tensors[tid]))
    gaps, cursor = [], 0
    for lo, hi in _busy(tid, offsets, spans, tensors):
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
    if capacity > cursor:
        gaps.append((cursor, capacity))
    result = []
    for g0, g1 in gaps:
        low = -(-g0 // align) * align
        high = (g1 - size) // align * align
        if low + size <= g1:
            result.append(low)
            if high > low:
                result.append(high)
    return result


def _search(order, spans, tensors, capacity: int, budget: int) -> dict | None:
    """Depth-first placement of ``order`` within ``capacity`` bytes (None if not found)."""
    if not order:
        return {}
    offsets: dict[int, int] = {}
    choices = [_candidates(order[0], offsets, spans, tensors, capacity)]
    next_choice = [0]
    placements = 0
    while choices:
        depth = len(choices) - 1
        tid = order[depth]
        if next_choice[depth] >= len(choices[depth]):
            choices.pop()
            next_choice.pop()
            offsets.pop(tid, None)
            continue
        offsets[tid] = choices[depth][next_choice[depth]]
        next_choice[depth] += 1
        placements += 1
        if placements > budget:
            return None
        if depth + 1 == len(order):
            return dict(offsets)
        choices.append(_candidates(order[depth + 1], offsets, spans, tensors, capacity))
        next_choice.append(0)
    return None


def _itemsize(tensor) -> int:
    import numpy as np

    return np.dtype(tensor.dtype).itemsize


def check_plan(prog: Program, plan: MemoryPlan, *, pass_name: str = "plan-memory") -> None:
    """Raise PassError unless every activation is placed, aligned, inside the arena, and no two
    tensors live at the same step share a byte."""
    spans = prog.lifetimes()
    problems = []
    for tid in spans:
        if tid not in plan.offsets:
            problems.append(f"tensor {prog.tensor(tid).name} has no offset")
    placed = [t for t in spans if t in plan.offsets]
    for tid in placed:
        tensor = prog.tensor(tid)
        off = plan.offsets[tid]
        if off % alignment(_itemsize(tensor)):
            problems.append(f"tensor {tensor.name} at offset {off} is misaligned")
        if off < 0 or off + tensor.nbytes > plan.arena_bytes:
            problems.append(f"tensor {tensor.name} [{off}, {off + tensor.nbytes}) "
                            f"is outside the {plan.arena_bytes}-byte arena")
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            (sa, ea), (sb, eb) = spans[a], spans[b]
            if sa > eb or sb > ea:
                continue
            ta, tb = prog.tensor(a), prog.tensor(b)
            oa, ob = plan.offsets[a], plan.offsets[b]
            if oa < ob + tb.nbytes and ob < oa + ta.nbytes:
                problems.append(f"tensors {ta.name} and {tb.name} are live together "
                                "and overlap in the arena")
    if plan.arena_bytes < plan.floor_bytes:
        problems.append(f"arena {plan.arena_bytes} B is below the floor {plan.floor_bytes} B")
    if problems:
        raise PassError(pass_name, "invalid memory plan: " + "; ".join(problems))
