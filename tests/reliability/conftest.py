"""Shared setup of the fault-injection suite: a tiny run on the built-in corpus, and subprocess
launchers for pretrain.py with and without torchrun (docs/reliability.md lists what each test
proves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "cache" / "data"
# the quick run every test here uses: the tiny preset, 32-token sequences
TINY = ["--config", "tiny", "--seq-length", "32", "--set", f"train.data_cache_dir={DATA}"]


def tiny_run(save=None, **train):
    """The tiny preset's run config (32-token sequences, 2 warm-up steps) with ``train`` fields set."""
    from train.config import load_run_config

    run = load_run_config("tiny")
    run.train.data_cache_dir = str(DATA)
    run.train.seq_length = 32
    run.train.lr_warmup_iters = 2
    run.train.log_interval = 1000
    if save is not None:
        run.train.save = run.train.run_dir = str(save)
    for key, value in train.items():
        setattr(run.train, key, value)
    return run


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def pretrain_cmd(*args, launcher: str | None = None, nproc: int = 1) -> list[str]:
    """launch/pretrain.py ARGS, alone or under ``torchrun`` / ``wrapper`` (launch/torchrun.py)."""
    from tests.helpers.distributed import free_port

    script = [str(ROOT / "launch" / "pretrain.py"), *TINY, *map(str, args)]
    if launcher is None:
        return [sys.executable, *script]
    runner = ["-m", "torch.distributed.run"] if launcher == "torchrun" else [str(ROOT / "launch" / "torchrun.py")]
    return [sys.executable, *runner, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", *script]


def run_cmd(cmd: list[str], timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(autouse=True)
def _fresh_signals():
    """A stop request left by one in-process run must not stop the next."""
    from train import signals

    signals.clear()
    yield
    signals.clear()
