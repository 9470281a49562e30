"""CPU smoke run of the training-throughput benchmark (the command CI must keep working)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_smoke_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--preset", "tiny", "--steps", "3", "--device", "cpu",
           "--contexts", "64", "--out", str(out), "--data-cache-dir", str(ROOT / "cache" / "data")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["arm"]) for r in rows] == [
        ("ours", "mla"), ("ours", "gdn-h"), ("ours", "kimi-linear"), ("transformers", "mla"),
        ("transformers", "kimi-linear")]  # transformers' kimi_linear has no GDN layer
    assert all(r["tokens_per_s"] > 0 for r in rows)
    for r in rows[:3]:  # steps 2..3 of 4 (the first is warm-up, the last profiled), each step's own rate
        assert len(r["step_tokens_per_s"]) == 2 and abs(sum(r["step_tokens_per_s"]) / 2 - r["tokens_per_s"]) <= 1
        seconds = r["seconds"]  # where the run's time went
        parts = seconds["first_step"] + seconds["other_steps"] + seconds["setup_and_profile"]
        assert seconds["first_step"] > 0 and seconds["setup_and_profile"] > 0 and abs(parts - seconds["train_call"]) < 0.3
    assert "no transformers baseline for gdn-h" in result.stdout
    ratio = rows[2]["tokens_per_s"] / rows[4]["tokens_per_s"]
    assert "| ours | kimi-linear | 64 |" in result.stdout and f"| {ratio:.2f}x |" in result.stdout
    # the baseline says whether FLA's kernels ran (here: no FLA, transformers' PyTorch path)
    assert "- kimi-linear at 64: FLA's kernels NOT used; transformers ran its PyTorch KDA path" in result.stdout
    # each of our rows carries the profiled step's breakdown; parts follow the layer pattern
    ours = {r["arm"]: r["profile"]["parts_ms"] for r in rows if r["system"] == "ours"}
    assert ours["mla"]["KDA"] == 0 and ours["mla"]["MLA core attention"] > 0
    for arm in ("gdn-h", "kimi-linear"):
        assert ours[arm]["KDA"] > 0 and ours[arm]["MLA core attention"] > 0
    for parts in ours.values():
        assert parts["MoE (router, dispatch, experts)"] > 0 and parts["dense projections"] > 0
        assert parts["optimizer"] > 0
    assert "Share of the profiled step's time by part" in result.stdout


def test_cp_kda_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/cp_kda.py (run on a GPU by hand) at one tiny shape in the Triton interpreter."""
    out = tmp_path / "cp_kda.json"
    cmd = [sys.executable, "benchmarks/cp_kda.py", "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["heads"], r["shard"], r["cp"]) for r in rows] == [(1, 64, 2)]
    assert set(rows[0]["cp_fb_ms"]) == {"0", "1"} and rows[0]["transition_ms"] > 0 and rows[0]["entry_grad_ms"] > 0
    assert "| 1 | 64 | 2 | 128 |" in result.stdout


def test_short_conv_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/short_conv.py (a GPU call's step) at a tiny shape in the Triton interpreter: both
    ways run, and their errors against fp64 are at fp32 rounding."""
    out = tmp_path / "short_conv.json"
    cmd = [sys.executable, "benchmarks/short_conv.py", "--device", "cpu", "--tokens", "150", "--channels", "40",
           "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"] for r in rows] == ["triton (ours)", "eager PyTorch"]
    assert all(max(r["rel_err_out_dx_dw"]) < 1e-5 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert "| triton (ours) |" in result.stdout


def test_memory_model_benchmark_smoke_on_cpu():
    """benchmarks/memory_model.py (the estimate against measured peaks; run on a GPU by hand) trains
    the tiny preset at two lengths and prints one row per length and recompute setting (with the loss in
    chunks of 48 tokens: the second length's micro-batch takes the chunked head)."""
    cmd = [sys.executable, "benchmarks/memory_model.py", "--seq-lengths", "64,128", "--recompute", "none,all",
           "--loss-chunk-tokens", "48", "--",
           "--config", "tiny", "--micro-batch-size", "1", "--global-batch-size", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("[rank 0]") and "GiB" not in line]
    assert [row[0].split()[2:] for row in rows] == [
        ["64", "none", "48"], ["64", "all", "48"], ["128", "none", "48"], ["128", "all", "48"]]
    estimates = [[float(x) for x in row[2].split()] for row in rows]
    assert all(total == pytest.approx(static + act, abs=0.011) and static > 0 for static, act, total in estimates)


def test_multi_gpu_validation_smoke_on_cpu(tmp_path):
    """benchmarks/multi_gpu.py (the multi-GPU validation, run on GPUs by hand) on 2 gloo ranks at tiny
    shapes: every part runs and reports finite numbers, and the layouts' loss curves match the
    single-process curve (on CPUs they are what tests/parallel's layout tests check)."""
    out = tmp_path / "multi_gpu.json"
    cmd = [sys.executable, "benchmarks/multi_gpu.py", "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpus"] == 2 and report["versions"]["torch"] and report["date"]
    parts = report["parts"]
    assert set(parts) == {"loss", "cp_kda", "throughput", "longest"}
    finite = lambda x: isinstance(x, float) and math.isfinite(x)

    assert [r["layout"] for r in parts["loss"]] == ["tp2", "ep2", "pp2", "cp2-chunkwise", "cp2-ulysses"]
    for row in parts["loss"]:
        assert row["steps"] == 2 and finite(row["max_abs_diff"]) and row["tolerance"] == 2e-4
        assert row["passed"], row
    assert "| cp2-ulysses | 2 | 2 |" in result.stdout

    assert [(r["cp"], r["mode"]) for r in parts["cp_kda"]] == [(1, "chunkwise"), (2, "chunkwise"), (2, "ulysses")]
    for row in parts["cp_kda"]:
        assert finite(row["fb_ms"]) and row["fb_ms"] > 0 and finite(row["efficiency"])
    for row in parts["cp_kda"][1:]:  # fp32 CPU path: the slices reproduce the whole sequence
        assert len(row["rel_error"]) == 11 and all(finite(e) and e < 1e-5 for e in row["rel_error"].values()), row

    assert [r["seq_length"] for r in parts["throughput"]] == [128]
    row = parts["throughput"][0]
    assert finite(row["tokens_per_s_per_gpu"]) and row["tokens_per_s_per_gpu"] > 0 and finite(row["tflops_per_gpu"])
    assert row["mfu"] is None  # no peak FLOP/s for a CPU

    [longest] = parts["longest"]
    assert longest["cp"] == 2 and longest["predicted"] > 0 and longest["longest"] == 256
    assert finite(longest["tokens_per_s_per_gpu"])
    for title in ("Loss curves", "Context-parallel KDA", "Throughput", "Longest context"):
        assert title in result.stdout and title in out.with_suffix(".md").read_text()
