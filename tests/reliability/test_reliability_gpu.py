"""The stop, checksum and health collectives with NCCL (CPU runs use gloo, which also reduces CPU
tensors): a stop request to launch/torchrun.py on two GPUs saves and exits 0, and the resumed run
falls back past a damaged newest checkpoint."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.reliability.conftest import pretrain_cmd, run_cmd
from train import checkpoint as ckpt

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def test_stop_and_fallback_on_two_gpus(tmp_path, background):
    save = tmp_path / "run"
    job = background(pretrain_cmd("--train-iters", "100000", "--save-interval", "3", "--save", save,
                                  launcher="wrapper", nproc=2), tmp_path / "log")
    job.wait_for(save / "iter_0000006" / "meta.json")
    job.proc.send_signal(signal.SIGUSR1)
    assert job.wait() == 0, job.err[-3000:]
    step = ckpt.latest_step(save)
    assert step >= 6 and "stop requested (SIGUSR1" in job.out and not list(save.glob("*.tmp"))

    shard = next((ckpt.iteration_dir(save, step) / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    result = run_cmd(pretrain_cmd("--train-iters", str(step + 2), "--save", save, launcher="wrapper", nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not match its checksum" in result.stdout and "falling back to" in result.stdout
