"""torchrun for batch schedulers: a stop signal to the launcher becomes a checkpoint, not a kill.

    python launch/torchrun.py --nproc-per-node 8 launch/pretrain.py --config NAME --save runs/x ...

Takes torchrun's options with their meaning (torchrun runs inside this process) and changes two
things:

* SIGTERM or SIGUSR1 sent to this process (SLURM's ``--signal=B:USR1@T`` when the batch script
  ``exec``s it, ``scancel --batch``, ``kill``) is passed to every rank directly, and torchrun itself
  ignores it. Plain torchrun either dies of SIGUSR1 (the ranks then stop unsupervised, and a job
  script goes on before their save is done), or answers SIGTERM by signalling the ranks' process
  groups, killing them 30 s later and exiting 1. Here the ranks save at the next step boundary and
  exit 0, and so does this launcher.
* When a rank stops with a clean error (exit code 2: the command or its inputs need fixing; 3: the
  run diverged) it has printed one line; this launcher exits with that code and without torchrun's
  failure report. Any other failure gets torchrun's report and exit code 1.

See docs/reliability.md for what a job script sees in each case.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
CLEAN_EXIT_CODES = (2, 3)
# a rank younger than this may still be starting Python, before its stop handlers exist (a signal
# would kill it); it gets the signal once it is older
MIN_RANK_AGE_SECONDS = 2.0


class SignalForwarder:
    """Remembers the last stop signal and sends it to every child process (the ranks), also to
    ranks that start later (torchrun restarts) once they are old enough to handle it."""

    def __init__(self):
        self.signum: int | None = None
        self.sent: set[int] = set()
        self.lock = threading.Lock()

    def handle(self, signum, frame) -> None:
        self.signum = signum
        self.sent.clear()  # a repeated signal is passed on again
        threading.Thread(target=self.forward, daemon=True).start()  # no locks taken in the handler

    def forward(self) -> None:
        import psutil

        with self.lock:
            if self.signum is None:
                return
            now = time.time()
            for child in psutil.Process().children():
                try:
                    if child.pid in self.sent or now - child.create_time() < MIN_RANK_AGE_SECONDS:
                        continue
                    os.kill(child.pid, self.signum)
                    self.sent.add(child.pid)
                except (psutil.NoSuchProcess, ProcessLookupError):
                    continue

    def keep_forwarding(self) -> None:
        while True:
            time.sleep(0.5)
            self.forward()


class QuietCleanFailures(logging.Filter):
    """torchrun logs every failed rank and the SIGTERM it then sends to the others; after a clean
    error (exit 2 or 3: the rank printed why) those lines only bury the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (re.search(r"exitcode: [23]\b", text) or "closing signal SIGTERM" in text)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(QuietCleanFailures())
    forwarder = SignalForwarder()
    for sig in FORWARDED:
        signal.signal(sig, forwarder.handle)
    threading.Thread(target=forwarder.keep_forwarding, name="stop-forwarder", daemon=True).start()

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun (>= 2.9) installs handlers only for the signals listed here: SIGTERM and SIGUSR1 are ours
    names = [s.strip() for s in args.signals_to_handle.split(",") if s.strip()]
    args.signals_to_handle = ",".join(n for n in names if n not in {s.name for s in FORWARDED}) or "SIGINT"
    try:
        run(args)
    except ChildFailedError as failed:
        clean = sorted({f.exitcode for f in failed.failures.values()} & set(CLEAN_EXIT_CODES))
        if clean:
            return clean[0]  # the rank printed its one-line error
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
