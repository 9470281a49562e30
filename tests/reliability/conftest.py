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


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The built-in corpus's tokenizer (built on first use: a fresh clone has no cache yet)."""
    from data.default_corpus import ensure_default_dataset

    return ensure_default_dataset(DATA).tokenizer_dir


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
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(autouse=True)
def _fresh_signals():
    """A stop request left by one in-process run must not stop the next."""
    from train import signals

    signals.clear()
    yield
    signals.clear()


class Background:
    """A command running in its own session, its output in files, stopped at the end for sure."""

    def __init__(self, cmd: list[str], folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "stdout.txt", folder / "stderr.txt"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=self.out_path.open("w"),
                                     stderr=self.err_path.open("w"), start_new_session=True)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, path: Path, timeout: float = 240) -> None:
        import time

        deadline = time.time() + timeout
        while not path.exists():
            assert self.proc.poll() is None, (
                f"ended early ({self.proc.returncode}):\n{self.out[-2000:]}\n{self.err[-3000:]}")
            assert time.time() < deadline, f"timed out waiting for {path}:\n{self.err[-3000:]}"
            time.sleep(0.2)

    def tree(self) -> list:
        """The launcher and every process below it (ranks, their helpers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        import psutil

        for process in self.tree():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def background():
    """``background(cmd, folder)`` starts a Background; all are killed when the test ends."""
    started: list[Background] = []

    def start(cmd, folder):
        started.append(Background(cmd, folder))
        return started[-1]

    yield start
    for job in started:
        job.kill_all()
