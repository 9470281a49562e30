"""Run a worker script under torchrun with N gloo ranks (CPU) and return its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from parallel.state import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", str(script), *map(str, args),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
