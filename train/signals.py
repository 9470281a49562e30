"""Stop requests: SIGTERM or SIGUSR1 (SLURM preemption, ``scancel``, ``launch/torchrun.py``) and, under
torchrun, the death of the launcher set a flag; the training loop saves at the next step boundary
and the process exits 0. Installed as the first thing an entry point does, so a signal that arrives
while the model is still being built is not lost (see docs/reliability.md).

Only the standard library is imported here: ``launch/pretrain.py`` installs the handlers before it
imports torch.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_POLL_SECONDS = 1.0

_reason: str | None = None
_installed = False


def install() -> None:
    """Catch SIGTERM and SIGUSR1 in this process (main thread only; idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    _installed = True


def _on_signal(signum, frame) -> None:
    request(signal.Signals(signum).name)


def request(reason: str) -> None:
    """Ask the loop to save and stop; the first reason is kept for the log."""
    global _reason
    if _reason is None:
        _reason = reason


def requested() -> str | None:
    """Why a stop was requested (``"SIGTERM"``, ``"the launcher (pid N) exited"``), or None."""
    return _reason


def clear() -> None:
    """Forget a request (a finished ``train()`` call; tests run several in one process)."""
    global _reason
    _reason = None


def watch_launcher() -> None:
    """Under torchrun, request a stop when the launcher dies (kill -9, a crash): the ranks run in
    their own sessions, so nothing else would stop them, and a restarted job would race with
    them. Polls the parent pid from a daemon thread."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_SECONDS)
        request(f"the launcher (pid {parent}) exited")

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()


def requested_on_any_rank() -> str | None:
    """The stop reason if any rank has one, e.g. ``"SIGUSR1 on rank 3"`` (a collective)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return _reason
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces only GPU tensors
    flag = torch.tensor([0.0 if _reason is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0.0:
        return None
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, _reason)  # once per run: only when a stop is on its way
    rank, reason = next((r, text) for r, text in enumerate(reasons) if text is not None)
    return reason if rank == dist.get_rank() else f"{reason} on rank {rank}"
