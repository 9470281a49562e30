"""A job list (JSON lines) and a local runner that runs several of its jobs at once.

Each line is one job: ``{"name": ..., "command": "python launch/... --flags", "run_dir": ...,
"done_file": ...}``. ``command`` is run from the repository root; a leading ``python`` means this
interpreter. A job whose ``done_file`` exists is skipped, so re-running a list resumes it. A SLURM
array runs entry ``$SLURM_ARRAY_TASK_ID`` with ``--index``; one GPU runs N small jobs at once with
``--parallel N`` (each its own process, its output in ``run_dir/log.txt``; ``launch/process_pool.py``).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from launch.process_pool import Command, Exited, ProcessPool

ROOT = Path(__file__).resolve().parent.parent


def write_jobs(jobs: list[dict], path: str | None) -> None:
    text = "".join(json.dumps(job) + "\n" for job in jobs)
    if path:
        Path(path).write_text(text)
    else:
        sys.stdout.write(text)


def read_jobs(path: str | Path) -> list[dict]:
    jobs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from None
        if not isinstance(job, dict) or not isinstance(job.get("command"), str):
            raise ValueError(f"{path}, line {number}: a job needs a \"command\" string")
        jobs.append(job)
    return jobs


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _done(job: dict) -> bool:
    return bool(job.get("done_file")) and (ROOT / job["done_file"]).exists()


def run_jobs(jobs: list[dict], parallel: int = 1, devices: list[str] | None = None) -> int:
    """Run ``jobs`` (skipping finished ones) ``parallel`` at a time; returns how many failed.
    ``devices``: GPU ids handed out round-robin by slot through CUDA_VISIBLE_DEVICES."""
    pending = [job for job in jobs if not _done(job)]
    print(f"{len(jobs)} jobs, {len(jobs) - len(pending)} already done, {len(pending)} to run, "
          f"{parallel} at a time", flush=True)
    finished = 0

    def started(command: Command, slot: int) -> None:
        print(f"[start] {_name(command.record)} (slot {slot})", flush=True)

    def ended(exited: Exited) -> None:
        nonlocal finished
        finished += 1
        state = "done" if exited.ok else f"FAILED rc={exited.returncode}"
        where = "" if exited.ok else f" (log: {exited.command.log})"
        print(f"[{state}] {_name(exited.command.record)} in {exited.seconds:,.0f}s; {finished}/{len(pending)}{where}",
              flush=True)

    pool = ProcessPool(parallel, (lambda slot: devices[slot % len(devices)]) if devices else None, cwd=ROOT)
    commands = [Command(_argv(job["command"]), _log_path(job), job) for job in pending]
    failed = pool.run(commands, on_start=started, on_exit=ended)
    if failed:
        print(f"{len(failed)} failed: " + ", ".join(_name(e.command.record) for e in failed), flush=True)
    return len(failed)


def _name(job: dict) -> str:
    return job.get("name", job["command"])


def _log_path(job: dict) -> Path:
    return ROOT / job.get("run_dir", "runs/jobs") / "log.txt"


def select(jobs: list[dict], index: int | None = None, shard: str | None = None) -> list[dict]:
    """Job ``index`` only, or shard ``"i/n"`` (jobs j with j % n == i), or all."""
    if index is not None:
        if not 0 <= index < len(jobs):
            raise ValueError(f"--index {index}: the list has jobs 0..{len(jobs) - 1}")
        return [jobs[index]]
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {shard}: need 0 <= I < N")
        return jobs[i::n]
    return jobs
