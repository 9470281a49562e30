"""The step-time breakdown: named regions in forward and backward, and attribution to parts."""

import torch
from torch.profiler import ProfilerActivity, profile

from model.profiling import profiled
from train.profile import breakdown


def two_matmuls(weight):
    return lambda x: torch.tanh(x @ weight) @ weight


def test_profiled_is_a_plain_call_without_profiler():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    out = profiled("kda_core", two_matmuls(weight), x)
    assert type(out.grad_fn).__name__ == "MmBackward0"  # no marker nodes in the graph
    torch.testing.assert_close(out, two_matmuls(weight)(x))


def test_backward_kernels_fall_in_the_region_backward_range():
    weight = torch.randn(192, 192, requires_grad=True)
    x = torch.randn(256, 192, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = profiled("mixer", lambda h: profiled("kda_core", two_matmuls(weight), h) * 2, x)
        out = profiled("moe", two_matmuls(weight), hidden)
        out.sum().backward()
    events = prof.events()
    ranges = {e.name: e for e in events if e.name.split(".")[0] in ("mixer", "kda_core", "moe")}
    assert set(ranges) == {"mixer", "kda_core", "moe", "mixer.backward", "kda_core.backward", "moe.backward"}
    # backward order: moe's backward ends before the mixer's starts; kda_core's nests inside mixer's
    moe_b, mixer_b, core_b = ranges["moe.backward"], ranges["mixer.backward"], ranges["kda_core.backward"]
    assert moe_b.time_range.end <= mixer_b.time_range.start
    assert mixer_b.time_range.start <= core_b.time_range.start and core_b.time_range.end <= mixer_b.time_range.end
    # 2 forward + 4 backward matmuls per two_matmuls call; each one lands in its innermost region
    mms = [e for e in events if e.name == "aten::mm"]
    assert len(mms) == 12

    def inside(e, r):
        return e.thread == r.thread and r.time_range.start <= e.time_range.start < r.time_range.end

    assert sum(inside(e, ranges["kda_core"]) or inside(e, core_b) for e in mms) == 6
    assert sum(inside(e, ranges["moe"]) or inside(e, moe_b) for e in mms) == 6
    result = breakdown(events, step_seconds=10.0, on_gpu=False)
    parts = result["parts_ms"]
    mm_ms = lambda region, back: sum(  # noqa: E731
        e.self_cpu_time_total for e in mms if inside(e, ranges[region]) or inside(e, back)) / 1e3
    assert parts["KDA"] >= mm_ms("kda_core", core_b) > 0
    assert parts["MoE (router, dispatch, experts)"] >= mm_ms("moe", moe_b) > 0
    assert parts["dense projections"] > 0  # the "* 2" of the mixer outside its core
    assert parts["MLA core attention"] == parts["optimizer"] == 0
    assert abs(sum(result["shares"].values()) - sum(parts.values()) / 1e4) < 1e-9
    # each part lists its largest operators: the six matmuls of a region are one row of 6 calls
    top = result["top"]
    moe_mm = next(row for row in top["MoE (router, dispatch, experts)"] if row[0] == "aten::mm")
    assert moe_mm[2] == 6 and abs(moe_mm[1] - mm_ms("moe", moe_b)) < 1e-2
    for rows in top.values():
        assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)
        assert sum(row[1] for row in rows) <= sum(parts.values()) + 1e-6


def test_idle_gaps_go_to_the_part_whose_kernel_ends_them():
    from train.profile import _host_waits, idle_attribution
    kernels = [  # (start_us, end_us, part, name), out of order, two streams overlapping at 100-150
        (300.0, 400.0, "MoE", "grouped_gemm"),
        (0.0, 150.0, "KDA", "kda_fwd"),
        (100.0, 120.0, "other", "copy"),
        (200.0, 250.0, "KDA", "kda_bwd"),
        (1400.0, 1500.0, "optimizer", "adam"),
    ]
    got = idle_attribution(kernels)
    # gaps: 150-200 before kda_bwd, 250-300 before the GEMM, 400-1400 before adam
    assert got["idle_before_ms"] == {"optimizer": 1.0, "KDA": 0.05, "MoE": 0.05}
    assert got["largest_gaps"][0] == [1.0, "optimizer", "adam"]
    assert len(got["largest_gaps"]) == 3
    assert idle_attribution([]) == {"idle_before_ms": {}, "largest_gaps": []}
    assert _host_waits([("MoE", 500.0), ("other", 30.0), ("MoE", 1500.0)]) == {"MoE": [2.0, 2], "other": [0.03, 1]}


def test_gpu_breakdown_counts_every_activity_and_idle_is_when_none_ran():
    """On a GPU the parts come from the device's own activity list: each kernel goes to the region
    around the call that launched it (matched by correlation id), a kernel whose launch was not
    recorded is counted on its own row, and idle is the window less the union of all activity, so
    kernels the operators' lists miss cannot pass for idle time."""
    from types import SimpleNamespace

    from train.profile import UNLINKED

    cpu = torch.autograd.DeviceType.CPU

    def event(name, start, end, id=0):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, thread=1, time_range=span, device_type=cpu, id=id, kernels=[],
                               self_cpu_time_total=0.0)

    events = [event("kda_core", 0, 100), event("cudaLaunchKernel", 10, 12, id=7),
              event("moe", 200, 300), event("cudaLaunchKernel", 210, 212, id=8),
              event("cudaLaunchKernel", 400, 402, id=9),  # outside every region: "other"
              event("aten::item", 5600, 5601)]
    activity = [(20.0, 1020.0, 7, "kda_fwd"), (1500.0, 3500.0, 8, "grouped_gemm"),
                (3000.0, 4000.0, 9, "copy"),  # overlaps the GEMM on another stream
                (5000.0, 5500.0, 42, "launched_unseen")]  # no recorded call with correlation 42
    result = breakdown(events, step_seconds=0.006, on_gpu=True, activity=activity)
    parts = result["parts_ms"]
    assert parts["KDA"] == 1.0 and parts["MoE (router, dispatch, experts)"] == 2.0 and parts["other"] == 1.0
    assert parts[UNLINKED] == 0.5 and result["top"][UNLINKED] == [["launched_unseen", 0.5, 1]]
    # busy: 20-1020, 1500-4000, 5000-5500 = 4 ms of the 6 ms window; the overlap is counted once
    assert abs(parts["idle"] - 2.0) < 1e-9 and result["overlap_ms"] == 0.5
    assert result["idle_before_ms"] == {"MoE (router, dispatch, experts)": 0.48, UNLINKED: 1.0}
    assert result["idle_at_edges_ms"] == [0.02, 0.101]
