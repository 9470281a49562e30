"""Where a training step's time goes: one step under the torch profiler, split by part.

``train.profile_step = N`` (``--profile-step N``) profiles step N. The model declares named regions
(model/profiling.py: KDA core, MLA core attention, MoE, the mixers' projections, the dense MLP) in
forward and backward, and the loop wraps gradient clipping and the optimizer step. Each GPU
activity (kernels, copies, memsets) is given to the innermost region around the call that launched
it (on CPU: each operator's own CPU time); what falls in no region is "other" (embedding, LM head
and loss, norms and residuals, gradient sync), activity whose launch the profiler did not record
is a row of its own, and "idle" is the step's wall time in which the GPU ran nothing (the window
less the union of all its activity). Each part also lists its largest kernels (operators on a CPU)
with their time and number of calls.

On a GPU the idle time is also split by the part whose kernel ended each gap (the GPU waited for
that part's launches: host overhead there, or a wait just before it), with the largest gaps listed,
the idle time before the step's first kernel and after its last (data loading, bookkeeping), and the
host's waits for the GPU (synchronisations, blocking copies) summed per part.

The result goes to ``<run_dir>/profile_step<N>.json`` and to the console as a table.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from model.profiling import regions


TOP_PER_PART = 8  # kernels listed per part
# GPU activity whose launching call the profiler did not record (a launch outside any recorded
# operator): counted as busy, listed by name, given to no part
UNLINKED = "not linked to a launch"
GAPS_LISTED = 10  # largest GPU idle gaps listed
# CUDA runtime calls in which the host waits for the GPU (a blocking copy waits for the queue too)
HOST_WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                   "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2")


def breakdown_parts() -> tuple[str, ...]:
    """The parts of the breakdown, in table order (the mixers' core ops first)."""
    return tuple(dict.fromkeys(regions().values()))


def _region_part(name: str, table: dict[str, str]) -> str | None:
    return table.get(name.removesuffix(".backward"))


def breakdown(events, step_seconds: float, on_gpu: bool, activity=None) -> dict:
    """{part: milliseconds} plus shares of the step, from the profiler's function events;
    ``activity`` (``device_activity(profiler)``) adds where the GPU idled."""
    ranges = defaultdict(list)  # thread -> [(start_us, end_us, part)]
    table = regions()
    for e in events:
        part = _region_part(e.name, table)
        if part is not None:
            ranges[e.thread].append((e.time_range.start, e.time_range.end, part))

    def part_at(thread, t) -> str:
        inside = [r for r in ranges.get(thread, ()) if r[0] <= t < r[1]]
        if not inside:
            return "other"
        return max(inside, key=lambda r: (r[0], -r[1]))[2]  # innermost: latest start, then shortest

    cpu = torch.autograd.DeviceType.CPU
    step_ms = 1e3 * step_seconds
    if on_gpu and activity is not None:
        # every GPU activity of the window, each given to the part of the call that launched it
        linked = {correlation for _, _, correlation, _ in activity}
        launched_in = {e.id: part_at(e.thread, e.time_range.start) for e in events
                       if e.device_type == cpu and e.id in linked}
        kernels = [(start, end, launched_in.get(correlation, UNLINKED), name)
                   for start, end, correlation, name in activity]
        spent = [(part, name, end - start) for start, end, part, name in kernels]
    else:
        kernels = None
        spent = []
        for e in events:
            if on_gpu:
                own = [(k.name, k.duration) for k in e.kernels]
            else:
                own = [(e.name, e.self_cpu_time_total)] if e.device_type == cpu and e.self_cpu_time_total else []
            if own:
                part = part_at(e.thread, e.time_range.start)
                spent += [(part, name, us) for name, us in own]
    busy = defaultdict(float)  # part -> microseconds
    by_kernel = defaultdict(lambda: [0.0, 0])  # (part, kernel or operator) -> [microseconds, calls]
    for part, name, us in spent:
        busy[part] += us
        entry = by_kernel[part, name]
        entry[0] += us
        entry[1] += 1
    parts = {p: busy.get(p, 0.0) / 1e3 for p in (*breakdown_parts(), "other")}
    if busy.get(UNLINKED):
        parts[UNLINKED] = busy[UNLINKED] / 1e3
    covered_us = _covered_us(kernels) if kernels is not None else 0.0
    if kernels is not None:  # idle: the window less the time any GPU activity ran (streams merged)
        parts["idle"] = max(step_ms - covered_us / 1e3, 0.0)
    else:
        parts["idle"] = max(step_ms - sum(parts.values()), 0.0) if on_gpu else 0.0
    result = dict(step_ms=step_ms, device="gpu" if on_gpu else "cpu", parts_ms=parts,
                  shares={p: ms / step_ms for p, ms in parts.items()}, top=_top(by_kernel))
    if kernels is not None:
        waits = [(part_at(e.thread, e.time_range.start), e.time_range.elapsed_us()) for e in events
                 if e.device_type == cpu and e.name in HOST_WAIT_CALLS]
        result.update(idle_attribution(kernels), host_waits_ms=_host_waits(waits))
        result["overlap_ms"] = round((sum(us for _, _, us in spent) - covered_us) / 1e3, 3)
        host = [e.time_range for e in events if e.device_type == cpu]
        if kernels and host:  # the GPU idle before its first and after its last kernel of the step
            result["idle_at_edges_ms"] = [round((min(k[0] for k in kernels) - min(r.start for r in host)) / 1e3, 3),
                                          round((max(r.end for r in host) - max(k[1] for k in kernels)) / 1e3, 3)]
    return result


def _covered_us(kernels) -> float:
    """Microseconds in which at least one of ``kernels`` ``(start_us, end_us, ...)`` ran."""
    covered, busy_from, busy_until = 0.0, None, None
    for start, end, *_ in sorted(kernels):
        if busy_until is None or start > busy_until:
            if busy_until is not None:
                covered += busy_until - busy_from
            busy_from, busy_until = start, end
        else:
            busy_until = max(busy_until, end)
    return covered + (busy_until - busy_from if busy_until is not None else 0.0)


def device_activity(profiler) -> list[tuple[float, float, int, str]] | None:
    """(start_us, end_us, correlation id of the launching operator, name) of every GPU activity of a
    finished ``torch.profiler.profile``, from its raw (Kineto) events, on the function events' clock
    (microseconds from the trace's start); None where this torch does not expose them (the breakdown
    then has no idle attribution)."""
    try:
        results = profiler.profiler.kineto_results
        zero = results.trace_start_ns()  # the function events' time origin
        return [((e.start_ns() - zero) / 1e3, (e.start_ns() + e.duration_ns() - zero) / 1e3, e.linked_correlation_id(),
                 e.name()) for e in results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
    except (AttributeError, RuntimeError):
        return None


def idle_attribution(kernels: list[tuple[float, float, str, str]]) -> dict:
    """GPU idle gaps between kernels ``(start_us, end_us, part, name)`` (any order, overlapping
    streams merged), each given to the part of the kernel that ends it: ``idle_before_ms`` per part
    and the ``largest_gaps`` as [ms, part, that kernel's name]."""
    before = defaultdict(float)
    gaps = []
    busy_until = None
    for start, end, part, name in sorted(kernels):
        if busy_until is not None and start > busy_until:
            before[part] += start - busy_until
            gaps.append([round((start - busy_until) / 1e3, 3), part, name[:90]])
        busy_until = end if busy_until is None else max(busy_until, end)
    return dict(idle_before_ms={p: round(us / 1e3, 3) for p, us in sorted(before.items(), key=lambda kv: -kv[1])},
                largest_gaps=sorted(gaps, key=lambda g: -g[0])[:GAPS_LISTED])


def _host_waits(waits: list[tuple[str, float]]) -> dict:
    """{part: [ms, calls]} of the host's waits for the GPU, largest first."""
    total = defaultdict(lambda: [0.0, 0])
    for part, us in waits:
        total[part][0] += us / 1e3
        total[part][1] += 1
    return {p: [round(ms, 3), n] for p, (ms, n) in sorted(total.items(), key=lambda kv: -kv[1][0])}


def _top(by_kernel: dict, per_part: int = TOP_PER_PART) -> dict:
    """{part: [[kernel, ms, calls], ...]}: the ``per_part`` largest kernels (operators on a CPU) of
    each part, by time; names cut to 120 characters (Triton and CUTLASS names run long)."""
    rows = defaultdict(list)
    for (part, name), (us, calls) in by_kernel.items():
        rows[part].append([name[:120], round(us / 1e3, 3), calls])
    return {part: sorted(r, key=lambda row: -row[1])[:per_part] for part, r in rows.items()}


def format_breakdown(result: dict) -> str:
    lines = [f"step time by part ({result['device']} time, profiled step {result['step_ms']:.1f} ms):"]
    for part, ms in result["parts_ms"].items():
        lines.append(f"  {part:34s} {ms:10.2f} ms {100 * result['shares'][part]:6.1f}%")
    for part, rows in result.get("top", {}).items():
        lines.append(f"  largest in {part}:")
        lines += [f"    {ms:9.2f} ms {calls:5d}x  {name[:90]}" for name, ms, calls in rows]
    if "idle_before_ms" in result:
        lines.append("  GPU idle, by the part whose kernel ended the gap:")
        lines += [f"    {part:34s} {ms:10.2f} ms" for part, ms in result["idle_before_ms"].items()]
        lines.append("  largest gaps:")
        lines += [f"    {ms:9.3f} ms before {part}: {name}" for ms, part, name in result["largest_gaps"]]
        if "idle_at_edges_ms" in result:
            lead, tail = result["idle_at_edges_ms"]
            lines.append(f"  idle before the step's first kernel / after its last: {lead:.2f} / {tail:.2f} ms")
        lines.append("  host waits for the GPU (synchronisations, blocking copies):")
        lines += [f"    {part:34s} {ms:10.2f} ms {n:5d}x" for part, (ms, n) in result["host_waits_ms"].items()]
    return "\n".join(lines)


class StepProfiler:
    """Profiles one step of the loop (1-based ``step``; 0 = off) with ``start``/``stop`` around it."""

    def __init__(self, step: int, run_dir: str, write: bool):
        self.step, self.run_dir, self.write = step, run_dir, write
        self.on_gpu = torch.cuda.is_available()
        self.profiler = None
        self.result = None

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def start(self, step_index: int) -> None:
        if step_index + 1 != self.step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()
        self.started = time.perf_counter()

    def stop(self) -> dict | None:
        if self.profiler is None:
            return None
        self._sync()
        seconds = time.perf_counter() - self.started
        self.profiler.stop()
        activity = device_activity(self.profiler) if self.on_gpu else None
        self.result = dict(step=self.step, **breakdown(self.profiler.events(), seconds, self.on_gpu, activity))
        self.profiler = None
        if self.write:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.run_dir) / f"profile_step{self.step}.json").write_text(json.dumps(self.result, indent=1))
            print(format_breakdown(self.result), flush=True)
        return self.result
