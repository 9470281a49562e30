"""Errors that end a run with one clear line instead of a traceback, and how every rank agrees on them.

A *clean* error is one whose message says what is wrong and how to fix it (a bad flag, a damaged
checkpoint, a locked save folder, missing data, a diverged run). The entry points print it as one
line on one rank and exit with a code a job script can act on:

    0  finished, or stopped by a signal after saving
    2  the command or its inputs need fixing (config, data, checkpoint, save folder)
    3  training diverged (non-finite losses); resuming unchanged would repeat it

A rank that detects a problem alone (its own RNG file is damaged, only rank 0 takes the save-folder
lock) must not leave the others waiting in a collective: ``agree`` runs a step on every rank and,
when any rank raised a clean error, raises it on all of them, remembering which rank saw it first
so that exactly one rank prints it (see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

from model.config import ConfigError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class DataError(ValueError):
    """The training data cannot be read or does not fit the run (missing, corrupt, too small)."""


class DivergenceError(FloatingPointError):
    """Too many consecutive non-finite steps; the message names the newest verified checkpoint."""


class PeerFailed(RuntimeError):
    """Another rank crashed inside an ``agree`` step (it prints its own traceback); this rank stops
    quietly instead of waiting for it in the next collective."""


def clean_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is enough on its own (no traceback)."""
    from parallel.state import ParallelConfigError
    from train.checkpoint import CheckpointError
    from train.folders import FolderError

    return (ConfigError, ParallelConfigError, CheckpointError, FolderError, DataError, DivergenceError)


def exit_code(error: BaseException) -> int:
    return EXIT_DIVERGED if isinstance(error, DivergenceError) else EXIT_USER_ERROR


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def agree(step, *args, **kwargs):
    """Run ``step(*args, **kwargs)`` on every rank; if it raised a clean error on any rank, raise
    that error (the lowest failing rank's) on every rank. A collective: call it on all ranks."""
    import torch.distributed as dist

    error = None
    result = None
    try:
        result = step(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - shared below, then raised again
        error = err
    rank, world = _rank_and_world()
    if not (dist.is_initialized() and world > 1):
        if error is not None:
            raise error
        return result
    clean = clean_error_types()
    mine = None if error is None else (type(error).__name__, str(error), isinstance(error, clean))
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, mine)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    crashed = [(r, o) for r, o in failed if not o[2]]
    if crashed:  # a bug, not a user error: its rank raises it with a traceback, the others stop quietly
        if error is not None and not isinstance(error, clean):
            raise error
        raise PeerFailed(f"rank {crashed[0][0]} failed ({crashed[0][1][0]}: {crashed[0][1][1]})")
    origin, (kind, message, _) = failed[0]
    if origin != rank or error is None:
        error = _clean_class(kind)(message)
    error.origin_rank = origin
    raise error


def _clean_class(name: str) -> type[BaseException]:
    """The clean error class called ``name`` (subclasses included), for a rank that did not raise it."""
    stack = list(clean_error_types())
    while stack:
        cls = stack.pop()
        if cls.__name__ == name:
            return cls
        stack.extend(cls.__subclasses__())
    return ConfigError


def report(error: BaseException) -> int:
    """Print ``error`` as one line on the rank that should (the rank that saw it first, else rank 0),
    leave it in torchrun's error file, and return the exit code."""
    rank, _ = _rank_and_world()
    origin = getattr(error, "origin_rank", 0)
    where = f" (rank {origin})" if origin else ""
    line = f"error{where}: {error}"
    if rank == origin:
        print(line, file=sys.stderr, flush=True)
    _write_torchrun_error_file(line)
    return exit_code(error)


def _write_torchrun_error_file(line: str) -> None:
    """Plain torchrun prints a failure report after the run; with this file its "Root Cause" shows
    our one line instead of a pointer to the elastic docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass
