"""Time by component from a `torch.profiler` run: attention, memory, MLP, optimizer, communication.

How an event gets its component (innermost rule first, walking up the event's parents):
* communication: collective ops (`c10d::`, `nccl:`, `gloo:`, `record_param_comms`, FSDP2's
  all-gather / reduce-scatter ranges);
* optimizer: the `Optimizer.step#...` / `Optimizer.zero_grad#...` ranges torch opens itself;
* attention / memory / mlp, forward: the `titans::<component>` ranges of `scopes.py`;
* the same components, backward: autograd's `evaluate_function: XBackward` node carries the
  sequence number of the forward op that created it, and that op lies in a forward scope.
Everything else (embedding, norms, LM head and loss, clipping, Python overhead) is `other`.

On CPU the breakdown is host wall time (the union of each component's intervals, nested
components subtracted, so the parts add up to the measured step time). On CUDA it is the device
time of the kernels each component launched, because host ranges only time the launches.
"""
from __future__ import annotations

from typing import Iterable

from titans_pretrain.profile.scopes import COMPONENT_METHODS, SCOPE_PREFIX

COMPONENTS = ("attention", "memory", "mlp", "optimizer", "communication")
STEP_SCOPE = SCOPE_PREFIX + "train_step"
_BACKWARD = "autograd::engine::evaluate_function: "
_COMM_MARKERS = ("c10d::", "nccl:", "gloo:", "record_param_comms", "FSDP::all_gather",
                 "FSDP::post_backward_reduce", "FSDP::pre_backward", "all_reduce", "reduce_scatter")
# nested components are subtracted from their enclosing ones in this order
_PRIORITY = ("communication", "optimizer", "memory", "attention", "mlp")

Interval = tuple[float, float]


def _own_component(ev, seq_map: dict) -> str | None:
    name = ev.name
    if any(m in name for m in _COMM_MARKERS):
        return "communication"
    if name.startswith("Optimizer.step#") or name.startswith("Optimizer.zero_grad#"):
        return "optimizer"
    if name.startswith(SCOPE_PREFIX) and name[len(SCOPE_PREFIX):] in COMPONENT_METHODS:
        return name[len(SCOPE_PREFIX):]
    if name.startswith(_BACKWARD):
        return seq_map.get((ev.fwd_thread, ev.sequence_nr))
    return None


def component_of(ev, seq_map: dict, cache: dict) -> str | None:
    """The innermost component enclosing `ev` (itself included), or None."""
    key = id(ev)
    if key not in cache:
        own = _own_component(ev, seq_map)
        parent = ev.cpu_parent
        cache[key] = own if own is not None or parent is None else component_of(parent, seq_map, cache)
    return cache[key]


def _forward_sequence_map(events) -> dict:
    """(thread, sequence_nr) of every forward op inside a component scope -> that component."""
    seq_map: dict = {}
    for ev in events:
        if ev.sequence_nr < 0 or ev.name.startswith(_BACKWARD):
            continue
        parent = ev
        while parent is not None:
            name = parent.name
            if name.startswith(SCOPE_PREFIX) and name[len(SCOPE_PREFIX):] in COMPONENT_METHODS:
                seq_map.setdefault((ev.thread, ev.sequence_nr), name[len(SCOPE_PREFIX):])
                break
            parent = parent.cpu_parent
    return seq_map


def union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def subtract(intervals: list[Interval], cut: list[Interval]) -> list[Interval]:
    """`intervals` minus `cut` (both disjoint and sorted)."""
    out, j = [], 0
    for start, end in intervals:
        while j < len(cut) and cut[j][1] <= start:
            j += 1
        k, cur = j, start
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > cur:
                out.append((cur, cut[k][0]))
            cur = max(cur, cut[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Overlap of two disjoint sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def breakdown(events, device_type: str = "cpu") -> dict:
    """Seconds per component over the profiled steps, plus `total` and `other`.

    `events` is `prof.events()` of a run whose steps were wrapped in `STEP_SCOPE` ranges."""
    events = [ev for ev in events if getattr(ev.device_type, "name", "CPU") == "CPU"]
    seq_map = _forward_sequence_map(events)
    cache: dict = {}
    steps = union((ev.time_range.start, ev.time_range.end) for ev in events if ev.name == STEP_SCOPE)
    if not steps:
        raise ValueError(f"no {STEP_SCOPE!r} range among the profiled events: wrap each profiled "
                         "step in record_function(STEP_SCOPE)")
    total_us = length(steps)
    seconds = {c: 0.0 for c in COMPONENTS}
    if device_type == "cuda":
        device_us = {c: 0.0 for c in COMPONENTS}
        all_us = 0.0
        for ev in events:
            kernel_us = sum(k.duration for k in getattr(ev, "kernels", []))
            if not kernel_us:
                continue
            all_us += kernel_us
            comp = component_of(ev, seq_map, cache)
            if comp is not None:
                device_us[comp] += kernel_us
        seconds = {c: v / 1e6 for c, v in device_us.items()}
        return {"basis": "device kernel time", "total": all_us / 1e6, **seconds,
                "other": max(0.0, all_us - sum(device_us.values())) / 1e6}
    spans: dict[str, list[Interval]] = {c: [] for c in COMPONENTS}
    for ev in events:
        comp = component_of(ev, seq_map, cache)
        parent_comp = component_of(ev.cpu_parent, seq_map, cache) if ev.cpu_parent is not None else None
        if comp is not None and comp != parent_comp:  # the outermost event of a stretch of `comp`
            spans[comp].append((ev.time_range.start, ev.time_range.end))
    taken: list[Interval] = []
    for comp in _PRIORITY:
        own = subtract(union(spans[comp]), taken)
        own = intersect(own, steps)  # only time inside the profiled steps
        seconds[comp] = length(own) / 1e6
        taken = union(taken + own)
    return {"basis": "host wall time", "total": total_us / 1e6, **seconds,
            "other": max(0.0, total_us - length(taken)) / 1e6}
