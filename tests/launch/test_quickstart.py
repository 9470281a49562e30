"""The README's training command on 2 gloo ranks: progress lines, falling loss, a checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.distributed import torchrun

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_pretrain_tiny_on_two_ranks(tmp_path):
    result = torchrun(
        "launch/pretrain.py", 2, "--config", "tiny", "--train-iters", "60", "--save", tmp_path / "run",
        "--set", f"train.data_cache_dir={ROOT / 'cache' / 'data'}", "--log-interval", "10",
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and all("tokens/s" in line and "ETA" in line and "lr" in line for line in lines)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 8.5 and last < first - 1.5, (first, last)
    assert (tmp_path / "run" / "iter_0000060" / "meta.json").exists()


def test_bad_config_gives_a_clear_error(tmp_path):
    cmd = [sys.executable, "launch/pretrain.py", "--config", "tiny", "--set", "model.layer_pattern=KXA"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "layer_pattern='KXA' has unknown symbol(s) ['X']" in result.stderr
