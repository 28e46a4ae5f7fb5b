"""Static memory plan: every activation at a fixed offset of one arena (the ``plan-memory`` stage).

The model input and output live in the caller's buffers and the constants in flash, so the
arena holds only intermediate activations.  A tensor is live from the step that writes it to
the last step that reads it (inclusive), so a kernel's inputs and output never share bytes.

The floor is the largest total size of tensors live at one step: no plan that keeps each
tensor in one place can use less.  Offsets come from a greedy best-fit placement (TFLite's
"greedy by size" idea), tried with several orderings; the smallest arena wins.

Schedules (:data:`SCHEDULES`) go below that layer-by-layer floor by letting a kernel's output
share its input's bytes: ``"inplace"`` runs depthwise convs whose input dies there in place
(:mod:`.inplace`: output at ``shift`` bytes below the input), so the pair is planned as one
block of ``shift + max(input, output)`` bytes; ``"patch"`` runs the first stage tile by tile
(:mod:`.patch`: its intermediate tensors shrink to tiles; the depthwise convs after it run in place
as under ``"inplace"``); ``"auto"`` picks among the schedules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distillc.errors import PassError

from .program import Program

ABOVE_FLOOR_TOLERANCE = 1.05
#: Memory schedules, in order of the extra instructions they may cost (``"auto"`` chooses).
SCHEDULES = ("layer", "inplace", "patch")


@dataclass
class MemoryPlan:
    """Arena offsets (tensor id -> byte offset), the arena size and its lower bounds.

    ``floor_bytes`` is the layer-by-layer floor (the manifest's ``arena_floor_bytes``);
    ``schedule_floor_bytes`` the floor of ``schedule``, which is lower when kernels write over
    their inputs; ``inplace`` maps each step run in place to its shift (bytes the output starts
    below the input; the step calls ``Step.inplace_kernel``); ``patch`` describes the patched
    stage of the ``"patch"`` schedule (:mod:`.patch`; empty otherwise), whose tile tensors have ids
    after the program's (``patch.view``).
    """

    offsets: dict = field(default_factory=dict)
    arena_bytes: int = 0
    floor_bytes: int = 0
    strategy: str = ""
    schedule: str = "layer"
    inplace: dict = field(default_factory=dict)
    schedule_floor_bytes: int = 0
    patch: dict = field(default_factory=dict)

    @property
    def bound_bytes(self) -> int:
        """The floor of the plan's own schedule."""
        return self.schedule_floor_bytes or self.floor_bytes

    @property
    def above_floor(self) -> bool:
        return self.arena_bytes > ABOVE_FLOOR_TOLERANCE * self.bound_bytes

    def to_dict(self) -> dict:
        return {
            "offsets": {str(k): v for k, v in sorted(self.offsets.items())},
            "arena_bytes": self.arena_bytes,
            "floor_bytes": self.floor_bytes,
            "strategy": self.strategy,
            "schedule": self.schedule,
            "inplace": {str(k): v for k, v in sorted(self.inplace.items())},
            "schedule_floor_bytes": self.bound_bytes,
            "patch": self.patch,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryPlan":
        return cls({int(k): int(v) for k, v in data["offsets"].items()}, int(data["arena_bytes"]),
                   int(data["floor_bytes"]), str(data.get("strategy", "")), str(data.get("schedule", "layer")),
                   {int(k): int(v) for k, v in data.get("inplace", {}).items()},
                   int(data.get("schedule_floor_bytes", 0)), dict(data.get("patch", {})))


def alignment(dtype_size: int) -> int:
    """Byte alignment of an arena tensor: 4, or 8 for 64-bit elements."""
    return 8 if dtype_size >= 8 else 4


def arena_floor(prog: Program, inplace: dict | None = None) -> int:
    """The largest total of activation bytes live at any step of the executed order (with
    ``inplace``, index -> shift: of a schedule running those steps in place)."""
    if inplace:
        return arena_floor_of(prog, inplace)
    spans = prog.lifetimes()
    floor = 0
    for step in prog.steps:
        live = sum(prog.tensor(t).nbytes for t, (a, b) in spans.items() if a <= step.index <= b)
        floor = max(floor, live)
    return floor


def plan_memory(prog: Program, *, schedule: str = "layer", ram_bytes: int | None = None,
                pass_name: str = "plan-memory", search_budget: int = 50_000) -> MemoryPlan:
    """Place every activation of ``prog`` in one arena under ``schedule``; returns the smallest
    plan found.

    ``"layer"``: every tensor on bytes of its own.  ``"inplace"``: the depthwise convs that can
    (:func:`inplace_candidates`) write over their inputs, each kept only if it does not raise the
    floor.  ``"patch"``: the first stage in tiles (:mod:`.patch`), the depthwise convs after it in
    place.  ``"auto"``: of the schedules' plans, the first in order of extra instructions (those
    that cost none count as equal, the smaller arena first) whose arena fits ``ram_bytes``; with
    no ``ram_bytes``, or if none fits, the smallest arena.  ``"patch"`` takes part only with a
    ``ram_bytes`` (it costs the halos' instructions).

    Each plan: a greedy best-fit placement with three orderings; if that is above the floor, a
    depth-first search places tensors in execution order, trying each free gap's low and high
    end, under a capacity that starts at the floor and grows by 1% steps (``search_budget``
    placements per capacity).  The search is deterministic, so the bundle bytes are too.
    """
    if schedule == "auto":
        from . import patch

        # patches recompute halos: only for a RAM budget that the other schedules miss
        names = [name for name in SCHEDULES if name != "patch" or (ram_bytes is not None and patch.candidates(prog))]
        plans = [plan_memory(prog, schedule=name, pass_name=pass_name, search_budget=search_budget)
                 for name in names]
        ranked = sorted(range(len(plans)), key=lambda i: (0 if extra_instructions(prog, plans[i]) == 0 else i,
                                                          plans[i].arena_bytes, i))
        fitting = [i for i in ranked if ram_bytes is not None and plans[i].arena_bytes <= ram_bytes]
        return plans[fitting[0] if fitting else min(ranked, key=lambda i: (plans[i].arena_bytes, i))]
    if schedule not in SCHEDULES:
        raise PassError(pass_name, f"unknown memory schedule {schedule!r}; valid: {', '.join(SCHEDULES)}, auto")
    if schedule == "patch":
        return _plan_patch(prog, pass_name, search_budget)
    chosen = _inplace_steps(prog) if schedule == "inplace" else {}
    best = _place_schedule(prog, prog, chosen, schedule, {}, search_budget)
    check_plan(prog, best, pass_name=pass_name)
    return best


def _inplace_steps(prog: Program) -> dict:
    """``{step: shift}`` of the in-place candidates kept, each only if it does not raise the floor."""
    chosen: dict[int, int] = {}
    floor = arena_floor(prog)
    for index, shift in inplace_candidates(prog).items():
        trial = {**chosen, index: shift}
        trial_floor = arena_floor(prog, trial)
        if trial_floor <= floor:
            chosen, floor = trial, trial_floor
    return chosen


def _place_schedule(prog: Program, planned: Program, chosen: dict, schedule: str, patch: dict,
                    search_budget: int) -> MemoryPlan:
    """The plan of ``planned`` (``prog`` as the schedule runs it) with ``chosen`` steps in place."""
    spans, units, members = _units(planned, chosen)
    unit_floor = _floor(planned, spans, units)
    offsets, strategy = _place_units(spans, units, unit_floor, search_budget)
    placed = {tid: offsets[root] + rel for root, parts in members.items() for tid, rel in parts}
    return MemoryPlan(placed, _extent(offsets, units), arena_floor(prog), strategy, schedule, chosen, unit_floor,
                      patch)


def _plan_patch(prog: Program, pass_name: str, search_budget: int) -> MemoryPlan:
    """The ``"patch"`` plan: of :func:`patch.candidates`, the one with the smallest floor (then the
    fewest extra MACs), the depthwise convs after the stage in place."""
    from . import patch

    options = patch.candidates(prog)
    if not options:
        raise PassError(pass_name, "the 'patch' schedule needs a first stage of convs on one-byte maps, read "
                                   "from the model input as a chain (each layer read only by the next); this "
                                   "model's first step is not one (use 'layer', 'inplace' or 'auto')")
    best = None
    for option in options:
        planned = patch.view(prog, option)
        chosen = _inplace_steps(planned)
        key = (arena_floor(planned, chosen), option["extra_macs"], option["last"])
        if best is None or key < best[0]:
            best = (key, option, planned, chosen)
    _, option, planned, chosen = best
    plan = _place_schedule(prog, planned, chosen, "patch", option, search_budget)
    check_plan(prog, plan, pass_name=pass_name)
    return plan


def _place_units(spans, tensors, floor: int, search_budget: int) -> tuple[dict, str]:
    """Offsets of the planning units (tensors, or in-place blocks) and the strategy that found them."""
    orders = {
        "greedy-by-size": sorted(spans, key=lambda t: (-tensors[t].nbytes, spans[t][0], t)),
        "greedy-by-duration": sorted(
            spans, key=lambda t: (-(spans[t][1] - spans[t][0]), -tensors[t].nbytes, t)),
        "greedy-by-start": sorted(spans, key=lambda t: (spans[t][0], -tensors[t].nbytes, t)),
    }
    best, best_bytes, best_strategy = None, None, ""
    for strategy, order in orders.items():
        offsets = _place(order, spans, tensors)
        size = _extent(offsets, tensors)
        if best is None or size < best_bytes:
            best, best_bytes, best_strategy = offsets, size, strategy
        if best_bytes <= floor:
            break
    if best_bytes > floor:
        in_order = orders["greedy-by-start"]
        capacity = floor
        while capacity < best_bytes:
            offsets = _search(in_order, spans, tensors, capacity, search_budget)
            if offsets is not None:
                return offsets, "search"
            capacity = max(capacity + 8, int(capacity * 1.01))
    return best, best_strategy


@dataclass(frozen=True)
class _Unit:
    """What the placement sees of a tensor or an in-place block: its bytes and alignment."""

    nbytes: int
    dtype: str  # "int64" for 8-byte alignment, else "int32"


def inplace_input(prog: Program, step) -> int | None:
    """The one activation a step reads (its only non-constant argument), or None."""
    from .program import CONST

    reads = [t for t in step.args if prog.tensor(t).kind != CONST]
    return reads[0] if len(reads) == 1 else None


def inplace_candidates(prog: Program) -> dict:
    """``{step index: shift}`` for every step that can run in place: an in-place kernel
    (``Step.inplace_kernel``), one activation read that dies at this step, an arena output with
    elements of the same size, and a depthwise window (:func:`inplace.shift_bytes`)."""
    from . import inplace
    from .program import ACTIVATION

    spans = prog.lifetimes()
    found = {}
    for step in prog.steps:
        src = inplace_input(prog, step) if step.inplace_kernel else None
        if src is None or step.args.count(src) != 1:
            continue
        a, b = prog.tensor(src), prog.tensor(step.out)
        if a.kind != ACTIVATION or b.kind != ACTIVATION or spans[src][1] != step.index:
            continue
        if _itemsize(a) != _itemsize(b):
            continue
        shape = step.arg_shapes[step.args.index(src)] if step.arg_shapes else a.shape
        shift = inplace.shift_bytes(step.conv, shape, b.shape, _itemsize(a),
                                    max(alignment(_itemsize(a)), alignment(_itemsize(b))))
        if shift is not None:
            found[step.index] = shift
    return found


def _units(prog: Program, chosen: dict) -> tuple[dict, dict, dict]:
    """The planning units of a schedule: ``(spans, units, members)`` keyed by a unit's first
    tensor; ``members[root]`` lists ``(tensor id, byte offset in the unit)``.  An in-place step's
    output joins its input's unit at ``shift`` bytes below the input."""
    spans = prog.lifetimes()
    where = {tid: (tid, 0) for tid in spans}
    for index in sorted(chosen):
        step = prog.steps[index]
        root, offset = where[inplace_input(prog, step)]
        where[step.out] = (root, offset - chosen[index])
    members: dict[int, list] = {}
    for tid, (root, offset) in sorted(where.items()):
        members.setdefault(root, []).append((tid, offset))
    unit_spans, units = {}, {}
    for root, parts in members.items():
        low = min(offset for _, offset in parts)
        parts[:] = [(tid, offset - low) for tid, offset in parts]
        size = max(rel + prog.tensor(tid).nbytes for tid, rel in parts)
        wide = any(alignment(_itemsize(prog.tensor(tid))) == 8 for tid, _ in parts)
        units[root] = _Unit(size, "int64" if wide else "int32")
        unit_spans[root] = (min(spans[t][0] for t, _ in parts), max(spans[t][1] for t, _ in parts))
    return unit_spans, units, members


def _floor(prog: Program, spans: dict, units: dict) -> int:
    return max((sum(units[u].nbytes for u, (a, b) in spans.items() if a <= step.index <= b)
                for step in prog.steps), default=0)


def arena_floor_of(prog: Program, chosen: dict) -> int:
    """The floor of a schedule that runs the steps in ``chosen`` (index -> shift) in place."""
    spans, units, _ = _units(prog, chosen)
    return _floor(prog, spans, units)


def extra_instructions(prog: Program, plan: MemoryPlan) -> int | None:
    """Instructions a plan's schedule adds to an inference over the layer schedule: 0 when every
    step it runs in place calls the layer's own kernel (same C: the in-place schedule copies
    nothing), None when an in-place kernel differs or a stage runs in patches (only a measurement
    tells; the patch's halo MACs are ``plan.patch["extra_macs"]``)."""
    if plan.patch:
        return None
    if all(prog.steps[i].inplace_kernel == prog.steps[i].kernel for i in plan.inplace):
        return 0
    return None


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
    tensors live at the same step share a byte, but an in-place step's input and output, which
    must lie exactly ``shift`` bytes apart, with ``shift`` at least what the step needs.  A patch
    plan is checked on the program as it runs it (``patch.view``)."""
    if plan.patch:
        from . import patch

        prog = patch.view(prog, plan.patch)
    spans = prog.lifetimes()
    problems = []
    shared = set()  # (input, output) of the steps run in place
    needed = inplace_candidates(prog) if plan.inplace else {}
    for index, shift in sorted(plan.inplace.items()):
        step = prog.steps[index] if 0 <= index < len(prog.steps) else None
        if step is None or index not in needed:
            problems.append(f"step {index} cannot run in place")
            continue
        src = inplace_input(prog, step)
        if shift < needed[index] or shift % max(alignment(_itemsize(prog.tensor(src))), 4):
            problems.append(f"step {index} ({step.name}) runs in place {shift} B below its input, "
                            f"it needs {needed[index]} B")
        if src in plan.offsets and step.out in plan.offsets and plan.offsets[step.out] != plan.offsets[src] - shift:
            problems.append(f"step {index} ({step.name}) runs in place but its output is not {shift} B "
                            "below its input")
        shared.add((src, step.out))
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
            if (a, b) in shared or (b, a) in shared:
                continue
            if oa < ob + tb.nbytes and ob < oa + ta.nbytes:
                problems.append(f"tensors {ta.name} and {tb.name} are live together "
                                "and overlap in the arena")
    if plan.arena_bytes < plan.bound_bytes:
        problems.append(f"arena {plan.arena_bytes} B is below the floor {plan.bound_bytes} B")
    if problems:
        raise PassError(pass_name, "invalid memory plan: " + "; ".join(problems))
