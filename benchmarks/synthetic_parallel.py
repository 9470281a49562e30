"""How many synthetic-task runs share one GPU well: N copies of one run (launch/synthetic.py) at
once, as separate processes through the job runner, for each N given.

    python benchmarks/synthetic_parallel.py --task mqar --arm K --length 1024 --steps 300 \\
        --parallel 1,2,4,8,12,16 --out $OUT/synthetic_parallel.json -- --bf16

Per N: each run's speed is the median of its logged step speeds over the last two thirds of its
steps (after start-up and compilation, while the others run too); the table gives steps/s per run,
the sum over runs (the sweep's throughput), the speed-up of that sum over one run alone, the peak
GPU memory of one run and the wall time. Prints a markdown table and writes JSON after every N.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


def measure(run_dir: Path, tokens_per_step: int) -> tuple[float, float | None]:
    """(median steps/s over the last two thirds of the steps, peak GPU memory in GiB)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    tail = steps[len(steps) // 3:] or steps
    speed = statistics.median(r["tokens_per_s"] for r in tail) / tokens_per_step
    peaks = [r["memory/peak_allocated_gib"] for r in steps if "memory/peak_allocated_gib" in r]
    return speed, max(peaks) if peaks else None


def main(argv=None) -> int:
    extra = []
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mqar")
    p.add_argument("--arm", default="K")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--parallel", default="1,2,4,8")
    p.add_argument("--out", default="", help="JSON file for the results")
    args = p.parse_args(argv)

    from launch.jobs import run_jobs

    rows, one = [], None
    print("| runs at once | steps/s per run | steps/s, all runs | speed-up vs 1 | peak GiB per run | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.parallel.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            jobs = []
            for i in range(n):
                run_dir = Path(tmp) / f"run{i}"
                argv_i = ["python", "launch/synthetic.py", "--task", args.task, "--arm", args.arm, "--length",
                          str(args.length), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                          "--eval-interval", str(args.steps), "--stop-at", "0", "--log-interval",
                          str(args.steps), "--run-dir", str(run_dir), *extra]
                jobs.append({"name": f"copy{i}", "command": shlex.join(argv_i), "run_dir": str(run_dir)})
            start = time.time()
            failed = run_jobs(jobs, parallel=n)
            wall = time.time() - start
            if failed:
                broken = next(job for job in jobs if not (Path(job["run_dir"]) / "result.json").exists())
                log = (Path(broken["run_dir"]) / "log.txt").read_text().splitlines()
                print(f"{failed} of {n} runs failed; the end of one's log:\n" + "\n".join(log[-20:]))
                return 1
            measured = [measure(Path(job["run_dir"]), args.batch_size * args.length) for job in jobs]
        per_run = statistics.mean(speed for speed, _ in measured)
        total = sum(speed for speed, _ in measured)
        one = one or total
        peak = max((gib for _, gib in measured if gib is not None), default=None)
        rows.append({"runs": n, "steps_per_s_per_run": per_run, "steps_per_s_total": total,
                     "speedup": total / one, "peak_gib_per_run": peak, "wall_s": wall})
        print(f"| {n} | {per_run:.2f} | {total:.2f} | {total / one:.2f} | "
              f"{'-' if peak is None else f'{peak:.2f}'} | {wall:.0f} |", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"settings": vars(args) | {"extra": extra}, "rows": rows},
                                                 indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
