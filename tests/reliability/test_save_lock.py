"""One job per --save folder: a second job is refused with a message naming the holder, a lock left
by a dead job is taken over, and a job that is saving after a stop request is waited for (two jobs
on one folder used to overwrite each other's iter_N and interleave metrics.jsonl)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from tests.reliability.conftest import tiny_run
from train import lock as locks
from train.lock import SaveFolderLock, SaveFolderLockedError


def _fake_holder(folder, age: float = 0.0, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": None, "slurm_job_id": "",
              "slurm_restart_count": "0", "started": "earlier", "token": "someone-else", "stopping": False, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(holder))
    os.utime(folder / ".lock", (time.time() - age, time.time() - age))


def test_second_job_is_refused_while_the_first_runs(tmp_path):
    """train() on a folder another live process holds stops before building anything."""
    from train.loop import train

    save = tmp_path / "run"
    refused = pytest.raises(SaveFolderLockedError, match=rf"in use by another job \(pid {os.getpid()} on ")
    with SaveFolderLock(save), refused:
        train(tiny_run(save, train_iters=1))
    assert not (save / ".lock").exists()  # released on exit
    assert train(tiny_run(save, train_iters=1))  # free again


@pytest.mark.parametrize("holder,age,why", [
    ({"pid": 2**22 + 12345}, 0.0, "is gone"),  # this host, no such process
    ({"host": "other-node", "pid": 1}, 10_000.0, "heartbeat stopped"),
    ({"host": "other-node", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": "0"}, 1.0, "requeued"),
])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, holder, age, why):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _fake_holder(tmp_path, age, **holder)
    messages = []
    with SaveFolderLock(tmp_path, log=messages.append) as held:
        assert held.owned()
    assert why in messages[0] and "taking over the stale lock" in messages[0]


def test_live_holder_on_another_host_is_refused(tmp_path):
    _fake_holder(tmp_path, 5.0, host="other-node", pid=1, slurm_job_id="12")
    with pytest.raises(SaveFolderLockedError, match="pid 1 on other-node, SLURM job 12"):
        SaveFolderLock(tmp_path).acquire()


def test_a_stopping_holder_is_waited_for(tmp_path):
    """A restart right after a preemption waits for the old job's stop-save instead of failing."""
    _fake_holder(tmp_path, 0.0, stopping=True)
    threading.Timer(1.5, (tmp_path / ".lock").unlink).start()
    messages = []
    started = time.time()
    with SaveFolderLock(tmp_path, log=messages.append):
        assert time.time() - started >= 1.0
    assert "waiting for the job" in messages[0]


def test_stop_request_marks_the_lock_stopping(tmp_path, monkeypatch):
    from train import signals

    monkeypatch.setattr(locks, "HEARTBEAT_SECONDS", 0.2)
    with SaveFolderLock(tmp_path):
        signals.request("SIGTERM")
        deadline = time.time() + 10
        while not json.loads((tmp_path / ".lock").read_text())["stopping"]:
            assert time.time() < deadline
            time.sleep(0.1)
