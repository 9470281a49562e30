"""Run a list of commands as child processes, a fixed number at a time, on this machine.

The one runner behind ``launch/synthetic.py run`` (``launch.jobs.run_jobs``) and the comparison's
local runs (``launch.compare.run_here``). Each command gets a slot (0 .. slots-1) for as long as it
runs; the caller maps a slot to the GPUs it may see (``CUDA_VISIBLE_DEVICES``). Every child writes
stdout and stderr to its own log file (appended, so a resumed run keeps its history). A failure
either counts and the rest go on, or stops the other children and raises. However the pool is left
(a failure, Ctrl-C, an error in a callback), the children still running get SIGTERM and are waited
for: the training loop saves a checkpoint at its next step boundary and exits on that signal.
Children run in sessions of their own: Ctrl-C in a terminal and `timeout` signal the whole process
group, and a training run hit by SIGINT directly would die without saving; this way only the pool
decides how its children stop. While the pool runs, SIGINT and SIGTERM to it both stop it that way:
SIGINT even where it was inherited as ignored (a background job of a script), SIGTERM because that
is what `timeout` and `kill` send by default, and dying on it would leave the children running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent  # children run from the checkout (relative paths in commands)


@dataclass
class Command:
    """One child process to run: its argument list, its log file, and the caller's record of it
    (a job, a run entry), handed back in the callbacks."""

    argv: list[str]
    log: Path
    record: Any = None


@dataclass
class Exited:
    """A command that ended: in which slot, with which exit code, after how many seconds."""

    command: Command
    slot: int
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(RuntimeError):
    """Raised by a pool that stops at the first failure; the other children have been stopped."""

    def __init__(self, exited: Exited):
        self.exited = exited
        super().__init__(f"{exited.command.argv[0]} exited with code {exited.returncode}; log: {exited.command.log}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.exited.command.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Child:
    command: Command
    process: subprocess.Popen
    log: Any  # the open log file
    started: float


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _stopped_by_sigint_and_sigterm():
    """SIGINT and SIGTERM raise KeyboardInterrupt in the pool's loop while it runs (main thread only:
    elsewhere Python cannot set handlers, and the caller's handling stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


class ProcessPool:
    """``slots`` child processes at a time.

    ``devices(slot)`` gives the CUDA_VISIBLE_DEVICES of a child started in ``slot`` (None: the
    variable is inherited as it is). OMP_NUM_THREADS is 1 unless this process sets it: children
    sharing a machine would otherwise each start a thread per core. ``poll_seconds``: how often the
    children are checked (and ``on_tick`` is called). ``stop_at_first_failure``: a child that exits
    with a non-zero code stops the others and raises ``CommandFailed``; otherwise the others go on
    and ``run`` returns the failures.
    """

    def __init__(self, slots: int, devices: Callable[[int], str | None] | None = None, *, cwd: Path = REPO,
                 poll_seconds: float = 0.5, stop_at_first_failure: bool = False):
        if slots < 1:
            raise ValueError(f"slots={slots}: a pool runs at least 1 process at a time")
        self.slots = slots
        self.devices = devices
        self.cwd = cwd
        self.poll_seconds = poll_seconds
        self.stop_at_first_failure = stop_at_first_failure

    def run(self, commands: Sequence[Command], on_start: Callable[[Command, int], None] | None = None,
            on_exit: Callable[[Exited], None] | None = None,
            on_tick: Callable[[list[Command]], None] | None = None) -> list[Exited]:
        """Run ``commands`` in order, filling free slots, until all have ended; returns those that
        failed. ``on_start(command, slot)`` after a child starts; ``on_exit(exited)`` when one ends
        (a failure too, before the pool stops for it); ``on_tick(running)`` after every check, with
        the commands still running (progress display)."""
        waiting = list(commands)
        running: dict[int, _Child] = {}
        failed: list[Exited] = []
        with _stopped_by_sigint_and_sigterm():
            try:
                while waiting or running:
                    for slot in range(self.slots):
                        if slot not in running and waiting:
                            command = waiting.pop(0)
                            running[slot] = self._start(command, slot)
                            if on_start:
                                on_start(command, slot)
                    time.sleep(self.poll_seconds)
                    for slot, child in list(running.items()):
                        if child.process.poll() is None:
                            continue
                        child.log.close()
                        del running[slot]
                        exited = Exited(child.command, slot, child.process.returncode, time.time() - child.started)
                        if on_exit:
                            on_exit(exited)
                        if not exited.ok:
                            if self.stop_at_first_failure:
                                raise CommandFailed(exited)
                            failed.append(exited)
                    if on_tick:
                        on_tick([child.command for child in running.values()])
            finally:
                self._stop(running.values())
        return failed

    def _start(self, command: Command, slot: int) -> _Child:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        visible = self.devices(slot) if self.devices else None
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        command.log.parent.mkdir(parents=True, exist_ok=True)
        log = command.log.open("a")
        try:
            process = subprocess.Popen(command.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except BaseException:
            log.close()
            raise
        return _Child(command, process, log, time.time())

    @staticmethod
    def _stop(children) -> None:
        children = list(children)
        for child in children:
            if child.process.poll() is None:
                child.process.terminate()  # SIGTERM: a training run saves at its next step boundary, then exits
        for child in children:
            child.process.wait()
            child.log.close()
