"""Graceful stops under torchrun: SIGTERM or SIGUSR1 to the launcher, to every process, or to one rank
ends with the stop-save committed, no ``.tmp`` left and every rank exiting 0; the ranks also stop
when their launcher dies. Before: the signal to the whole job killed the helper process megatron's
checkpoint writer had started (BrokenPipeError, ``iter_N.tmp`` left, exit 1), SIGUSR1 to torchrun
killed the launcher and left the ranks training, and so did kill -9 of the launcher."""

from __future__ import annotations

import signal

import psutil
import pytest

from tests.reliability.conftest import pretrain_cmd, tiny_run
from train import checkpoint as ckpt

LONG = ["--train-iters", "100000", "--save-interval", "3", "--log-interval", "1"]


def _assert_clean_stop(save, out: str, reason: str) -> int:
    """The stop-save is committed, nothing half-written is left; returns its step."""
    assert f"stop requested ({reason}" in out and "exit interval" not in out, out[-2000:]
    step = ckpt.latest_step(save)
    assert step is not None and step >= 3 and not list(save.glob("*.tmp")), sorted(p.name for p in save.iterdir())
    assert f"saved checkpoint {ckpt.iteration_dir(save, step)}" in out
    assert not (save / ".lock").exists()
    return step


def test_a_save_starts_no_helper_process(tmp_path, monkeypatch):
    """A signal to the rank's process group must not be able to kill part of the save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from train.loop import train

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a fresh process
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    train(tiny_run(tmp_path / "run", train_iters=1))
    assert ckpt.latest_step(tmp_path / "run") == 1
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()


def test_a_stop_during_a_save_needs_no_second_save(tmp_path, monkeypatch, capsys):
    """The signal arrives while checkpoint 2 is written: the run ends there instead of training one
    more step and saving again (a second save may not fit in the scheduler's grace time)."""
    from train import signals
    from train.loop import train

    real = ckpt.save_checkpoint

    def save_then_signal(*args, **kwargs):
        path = real(*args, **kwargs)
        signals.request("SIGTERM")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_signal)
    losses = train(tiny_run(tmp_path / "run", train_iters=10, save_interval=2))
    assert len(losses) == 2 and ckpt.complete_steps(tmp_path / "run") == [2]
    assert "stop requested (SIGTERM) during the save of step 2: exiting" in capsys.readouterr().out


@pytest.mark.distributed
def test_signal_to_the_launcher_wrapper(tmp_path, background):
    """SLURM's --signal=B:USR1@T reaches the batch script's process: launch/torchrun.py."""
    save = tmp_path / "run"
    job = background(pretrain_cmd(*LONG, "--save", save, launcher="wrapper", nproc=1), tmp_path / "log")
    job.wait_for(save / "iter_0000003" / "meta.json")
    job.proc.send_signal(signal.SIGUSR1)
    assert job.wait() == 0, job.err[-3000:]
    _assert_clean_stop(save, job.out, "SIGUSR1")


@pytest.mark.distributed
def test_sigterm_to_every_process_under_plain_torchrun(tmp_path, background):
    """What scancel and a preemption do: every process of the job gets SIGTERM. The ranks save and
    exit 0; torchrun reports the signal it got itself with exit code 1 (docs/reliability.md)."""
    save = tmp_path / "run"
    job = background(pretrain_cmd(*LONG, "--save", save, launcher="torchrun", nproc=1), tmp_path / "log")
    job.wait_for(save / "iter_0000003" / "meta.json")
    for process in job.tree():
        process.send_signal(signal.SIGTERM)
    assert job.wait() == 1
    assert "BrokenPipeError" not in job.err and "exitcode" not in job.err, job.err[-3000:]
    _assert_clean_stop(save, job.out, "SIGTERM")


@pytest.mark.distributed
def test_signal_to_one_rank(tmp_path, background):
    save = tmp_path / "run"
    job = background(pretrain_cmd(*LONG, "--save", save, launcher="torchrun", nproc=2), tmp_path / "log")
    job.wait_for(save / "iter_0000003" / "meta.json")
    ranks = sorted(psutil.Process(job.proc.pid).children(), key=lambda p: p.create_time())
    ranks[-1].send_signal(signal.SIGUSR1)
    assert job.wait() == 0, job.err[-3000:]
    _assert_clean_stop(save, job.out, "SIGUSR1 on rank")


@pytest.mark.distributed
def test_ranks_stop_when_the_launcher_is_killed(tmp_path, background):
    """kill -9 of torchrun: the ranks (in their own sessions) notice within a second, save and exit;
    a restart finds a consistent folder and resumes."""
    save = tmp_path / "run"
    job = background(pretrain_cmd(*LONG, "--save", save, launcher="torchrun", nproc=1), tmp_path / "log")
    job.wait_for(save / "iter_0000003" / "meta.json")
    ranks = psutil.Process(job.proc.pid).children()
    job.proc.kill()
    job.wait()
    _, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks kept running after their launcher died"
    step = _assert_clean_stop(save, job.out, "the launcher (pid")
    from train.loop import train

    losses = train(tiny_run(save, train_iters=step + 1))
    assert len(losses) == 1
