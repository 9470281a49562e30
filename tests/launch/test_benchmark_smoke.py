"""CPU smoke run of the training-throughput benchmark (the command CI must keep working)."""

import json
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
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["arm"]) for r in rows] == [
        ("ours", "mla"), ("ours", "gdn-h"), ("ours", "kimi-linear"), ("transformers", "mla"),
        ("transformers", "kimi-linear")]  # transformers' kimi_linear has no GDN layer
    assert all(r["tokens_per_s"] > 0 for r in rows)
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
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["heads"], r["shard"], r["cp"]) for r in rows] == [(1, 64, 2)]
    assert set(rows[0]["cp_fb_ms"]) == {"0", "1"} and rows[0]["transition_ms"] > 0 and rows[0]["entry_grad_ms"] > 0
    assert "| 1 | 64 | 2 | 128 |" in result.stdout


def test_memory_model_benchmark_smoke_on_cpu():
    """benchmarks/memory_model.py (the estimate against measured peaks; run on a GPU by hand) trains
    the tiny preset at two lengths and prints one row per length and recompute setting (with the loss in
    chunks of 48 tokens: the second length's micro-batch takes the chunked head)."""
    cmd = [sys.executable, "benchmarks/memory_model.py", "--seq-lengths", "64,128", "--recompute", "none,all",
           "--loss-chunk-tokens", "48", "--",
           "--config", "tiny", "--micro-batch-size", "1", "--global-batch-size", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("[rank 0]") and "GiB" not in line]
    assert [row[0].split()[2:] for row in rows] == [
        ["64", "none", "48"], ["64", "all", "48"], ["128", "none", "48"], ["128", "all", "48"]]
    estimates = [[float(x) for x in row[2].split()] for row in rows]
    assert all(total == pytest.approx(static + act, abs=0.011) and static > 0 for static, act, total in estimates)
