"""One job per save folder: ``SAVE/.lock`` names the job that writes there.

Two jobs writing one ``--save`` folder would overwrite each other's ``iter_N`` and interleave
``metrics.jsonl``; a second job is refused with a message naming the holder. The lock is a file
created with O_EXCL (atomic on local disks and on NFS, Lustre, GPFS, unlike ``fcntl`` locks, which
some cluster filesystems do not implement) holding the holder's host, pid, process start time and
SLURM job. The holder refreshes the file's modification time every ``HEARTBEAT_SECONDS`` from a
daemon thread and deletes it on exit. A lock left behind by a crash is *stale* and taken over when

* its holder ran on this host and that process is gone (or the pid now belongs to another process),
* its holder is an earlier run of this SLURM job (a requeue: same job id, other restart count), or
* its heartbeat is older than ``STALE_SECONDS`` (a holder on another host that died with its node).

A holder that is saving after a stop request marks the file ``stopping``; a new job waits up to
``WAIT_FOR_STOPPING_SECONDS`` for it instead of failing (a restart right after a preemption).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from train.folders import FolderError, writable_folder

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = float(os.environ.get("KIMI_LINEAR_LOCK_HEARTBEAT", "30"))
STALE_SECONDS = float(os.environ.get("KIMI_LINEAR_LOCK_STALE", "300"))
WAIT_FOR_STOPPING_SECONDS = float(os.environ.get("KIMI_LINEAR_LOCK_WAIT", "900"))


class SaveFolderLockedError(FolderError):
    """Another live job holds the save folder."""


def _process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if unknown or gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_ticks": _process_start_ticks(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": uuid.uuid4().hex,
        "stopping": False,
    }


def _describe(holder: dict, age: float) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}, "
            f"alive {age:.0f} s ago")


def stale_reason(holder: dict, age: float) -> str | None:
    """Why the lock described by ``holder`` (heartbeat ``age`` seconds old) is stale, or None."""
    me = _identity()
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} is gone"
        ticks = _process_start_ticks(holder["pid"])
        if holder.get("start_ticks") is not None and ticks is not None and ticks != holder["start_ticks"]:
            return f"pid {holder['pid']} now belongs to another process"
        return None
    if (holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]
            and holder.get("slurm_restart_count") != me["slurm_restart_count"]):
        return "it was taken by an earlier run of this SLURM job (requeued)"
    if age > STALE_SECONDS:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


class SaveFolderLock:
    """``acquire()`` on one rank (rank 0) before anything is written to ``folder``; ``release()``
    when the run ends. Also usable as a context manager."""

    def __init__(self, folder: str | os.PathLike, log=print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log
        self.identity: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> SaveFolderLock:
        identity = _identity()
        writable_folder(self.folder, "--save")
        deadline = time.time() + WAIT_FOR_STOPPING_SECONDS
        waiting_logged = False
        while True:
            if self._create(identity):
                break
            holder, age = self._read()
            if holder is None:  # vanished or half-written between our attempts: try again
                time.sleep(0.2)
                continue
            reason = stale_reason(holder, age)
            if reason is not None:
                self.log(f"taking over the stale lock {self.path} ({_describe(holder, age)}): {reason}")
                self._remove_if(holder)
                continue
            if holder.get("stopping") and time.time() < deadline:
                if not waiting_logged:
                    self.log(f"waiting for the job holding {self.path} to finish its stop ({_describe(holder, age)})")
                    waiting_logged = True
                time.sleep(min(2.0, HEARTBEAT_SECONDS))
                continue
            raise SaveFolderLockedError(
                f"--save {self.folder} is in use by another job ({_describe(holder, age)}); two jobs must not "
                f"write one save folder: wait for it to end, use another --save, or, if that job is gone, "
                f"delete {self.path}"
            )
        self.identity = identity
        self._thread = threading.Thread(target=self._heartbeat, name="save-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self, identity: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise FolderError(
                f"cannot write to --save {self.folder} ({err.strerror or err}); choose a writable folder"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(identity, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        except OSError as err:
            raise FolderError(f"cannot read the lock {self.path} ({err.strerror or err})") from None
        try:
            holder = json.loads(text)
        except ValueError:
            # half-written by a holder that is creating it right now, or garbage: judge by age
            return ({"host": "?", "pid": "?", "started": "?"} if age > 5 else None), age
        return (holder if isinstance(holder, dict) else {"host": "?", "pid": "?", "started": "?"}), age

    def _remove_if(self, holder: dict) -> None:
        """Delete the lock file if it still is ``holder``'s (another job may have replaced it)."""
        current, _ = self._read()
        if current is not None and current.get("token") == holder.get("token"):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def owned(self) -> bool:
        current, _ = self._read()
        return bool(self.identity) and current is not None and current.get("token") == self.identity["token"]

    def mark_stopping(self) -> None:
        """Tell a job waiting for this folder that we are saving and about to release it."""
        if self.identity is None or self.identity.get("stopping") or not self.owned():
            return
        self.identity["stopping"] = True
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.identity))
        os.replace(tmp, self.path)

    def _heartbeat(self) -> None:
        from train import signals

        beat = time.monotonic()
        while not self._stop.wait(min(1.0, HEARTBEAT_SECONDS)):
            try:
                if signals.requested() is not None:
                    self.mark_stopping()
                if time.monotonic() - beat >= HEARTBEAT_SECONDS and self.owned():
                    os.utime(self.path)
                    beat = time.monotonic()
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # it must not rewrite the file after we delete it
            self._thread = None
        if self.identity is not None and self.owned():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.identity = None

    def __enter__(self) -> SaveFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: SaveFolderLock | None = None


def hold_save_folder(save: str, run_dir: str, log) -> None:
    """Rank 0 takes the lock on ``save`` for this process (released by ``release_save_folder``);
    every rank raises the same error when it cannot. Also checks that ``run_dir`` is writable."""
    import torch.distributed as dist

    from train.errors import agree

    def take() -> None:
        global _held
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        _held = SaveFolderLock(save, log=log).acquire()
        if run_dir and Path(run_dir).resolve() != Path(save).resolve():
            writable_folder(run_dir, "--run-dir")

    agree(take)


def release_save_folder() -> None:
    global _held
    if _held is not None:
        _held.release()
        _held = None
