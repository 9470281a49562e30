"""Multi-GPU validation on NCCL: parallel layouts against one GPU, context-parallel KDA scaling, and
throughput and the longest trainable context of the small hybrid preset, in one command.

    PYTHONPATH=. python benchmarks/multi_gpu.py [--gpus N] [--parts loss,cp_kda,throughput,longest] [--out FILE]
    PYTHONPATH=. python benchmarks/multi_gpu.py --smoke     # CPU, 2 gloo ranks, tiny shapes: every part runs

(PYTHONPATH=. from the repository root: it reuses the layout tests' workers and tolerances, and
the tests are not part of the installed package.)

Parts, each torchrun job under its own time limit (a failed or timed-out job is a row with its
error, the other jobs still run):

- ``loss``: the tiny mixed model trains from scratch (tests/parallel/cp_train_worker.py, 20 steps)
  at TP2, EP2, PP2, CP2 chunkwise, CP2 Ulysses and, with 4 or more GPUs, TP2xEP2xCP2, TP2xCP2 and
  EP2xCP2; the largest |loss difference| from the one-GPU curve, pass or fail at the tolerance of the
  layout tests: 2e-4 on CPUs, 1e-3 on GPUs (fp32 with TF32-class dots in the KDA kernels;
  tests/parallel/test_context_parallel_training_gpu.py).
- ``cp_kda``: the KDA layer core under context parallelism at 32k tokens (multi_gpu_cp_kda.py):
  relative error of the output and every gradient against the whole sequence on one GPU (fp32), and
  the forward+backward time of the slowest rank at CP = 1, 2, 4, 8 (bf16) with the scaling
  efficiency t(1) / (P t(P)), both modes.
- ``throughput``: configs/small-kimi-linear.json at 4k and 32k contexts, data parallel over all
  GPUs through launch/pretrain.py: tokens/s per GPU and MFU from the run's metrics.jsonl (steps
  after the first).
- ``longest``: the longest context that trains at CP = 2, 4, 8 (every layer recomputed, the loss in
  chunks of 4096 tokens): the dry run's predicted length first, then 25 % shorter after each
  failure, a few steps each.

Writes one JSON (date, GPU count, device, versions, every part's rows; parts that an earlier call
wrote to the same --out are kept) and prints markdown tables (also written next to the JSON as .md).
benchmarks/gpu_multi.sh runs the parts as separate steps of one GPU call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from parallel.state import free_port

ROOT = Path(__file__).resolve().parent.parent

TRAIN_WORKER = ROOT / "tests" / "parallel" / "cp_train_worker.py"
CP_KDA_WORKER = ROOT / "benchmarks" / "multi_gpu_cp_kda.py"
PRESET = ROOT / "configs" / "small-kimi-linear.json"


def torchrun(script, nproc: int, args, log: Path, timeout: int) -> dict:
    """Run ``script`` under torchrun; returns {"rc", "error"} (the log's tail when it failed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *map(str, args)]
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0:
        return {"rc": 0}
    lines = [x for x in log.read_text(errors="replace").splitlines() if "Warning" not in x and "warn" not in x]
    return {"rc": rc, "error": " | ".join(lines[-4:])[-600:] or f"exit {rc}"}


# seconds per torchrun job of each part on GPUs (start-up, Triton compilation and autotuning included)
JOB_TIMEOUTS = {"loss": 150, "cp_kda": 240, "throughput": 300, "longest": 240}


def timeout(args, part: str) -> int:
    return args.job_timeout or JOB_TIMEOUTS[part]


def cp_sizes(args) -> list[int]:
    """The context-parallel sizes above 1 to measure: --cp-sizes, else 2, 4, 8 up to the GPU count."""
    return args.cp_sizes or [p for p in (2, 4, 8) if p <= args.gpus]


# ----------------------------------------------------------------------------- loss curves
def loss_layouts(gpus: int) -> list[tuple[str, int]]:
    """(layout name of cp_train_worker.py, world size)."""
    layouts = [("tp2", 2), ("ep2", 2), ("pp2", 2), ("cp2-chunkwise", 2), ("cp2-ulysses", 2)]
    if gpus >= 4:
        # the combinations the CPU tests cover first: a failure of the triple (in a shared job) leaves them
        layouts += [("tp2-cp2-chunkwise", 4), ("ep2-cp2-chunkwise", 4), ("tp2-ep2-cp2-chunkwise", 4)]
    return layouts


def part_loss(args, work: Path) -> list[dict]:
    # the tolerances of the tests these layouts come from (the tests are not installed: PYTHONPATH=.)
    if args.cuda:
        from tests.parallel.test_context_parallel_training_gpu import TOLERANCE

        tolerance = TOLERANCE["fp32"]
    else:
        from tests.parallel.test_context_parallel_training import TOLERANCE as tolerance
    suffix = f"-steps{args.steps}"
    jobs = [[("cp1", 1)]] + [[layout] for layout in loss_layouts(args.gpus)]
    if args.group_jobs:  # one job per world size: a job's start costs more than a layout on CPUs
        worlds = sorted({w for _, w in loss_layouts(args.gpus)})
        jobs = [[("cp1", 1)]] + [[x for x in loss_layouts(args.gpus) if x[1] == w] for w in worlds]
    status = {}
    for job in jobs:
        names = [name + suffix for name, _ in job]
        world = max(w for _, w in job)
        result = torchrun(TRAIN_WORKER, world, [work, *names], work / f"loss-{names[0]}.log", timeout(args, "loss"))
        status.update({name: result for name, _ in job})
    reference_file = work / f"cp1{suffix}" / "losses.json"
    reference = json.loads(reference_file.read_text()) if reference_file.exists() else None
    rows = []
    for name, world in loss_layouts(args.gpus):
        row = dict(layout=name, gpus=world, tolerance=tolerance, **status[name])
        curve_file = work / f"{name}{suffix}" / "losses.json"
        if reference is not None and curve_file.exists():
            curve = json.loads(curve_file.read_text())
            diff = max(abs(a - b) for a, b in zip(curve, reference)) if len(curve) == len(reference) else math.inf
            row.update(steps=len(curve), max_abs_diff=diff, first_loss=curve[0], last_loss=curve[-1],
                       passed=diff < tolerance)
        else:
            row.update(passed=False, error=row.get("error") or status["cp1"].get("error") or "no loss curve")
        rows.append(row)
    return rows


def table_loss(rows) -> str:
    lines = ["| layout | GPUs | steps | max abs loss diff vs 1 GPU | tolerance | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else r.get("error", "")
        lines.append(f"| {r['layout']} | {r['gpus']} | {r.get('steps', '-')} | {diff} | {r['tolerance']:g} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CP KDA op
def part_cp_kda(args, work: Path) -> list[dict]:
    runs = [(1, "chunkwise")] + [(p, mode) for mode in args.cp_modes for p in cp_sizes(args)]
    rows = []
    for p, mode in runs:
        out = work / f"cp_kda-{mode}-{p}.json"
        shape = [args.cp_tokens, args.cp_heads, args.cp_head_dim, args.cp_reps]
        result = torchrun(CP_KDA_WORKER, p, [out, mode, *shape], work / f"cp_kda-{mode}-{p}.log", timeout(args, "cp_kda"))
        rows.append(json.loads(out.read_text()) if out.exists() else dict(cp=p, mode=mode, **result))
    # rows of the other modes measured by an earlier call into the same --out stay (one mode a call)
    kept = [r for r in args.earlier.get("cp_kda", []) if r["cp"] > 1 and r["mode"] not in args.cp_modes]
    rows = rows[:1] + sorted(kept + rows[1:], key=lambda r: (r["mode"], r["cp"]))
    single = rows[0].get("fb_ms")
    for row in rows:
        if single and row.get("fb_ms") and "efficiency" not in row:  # against the CP=1 time of the same call
            row["efficiency"] = single / (row["cp"] * row["fb_ms"])
    return rows


def table_cp_kda(rows) -> str:
    lines = ["| mode | CP | tokens | heads x dim | f+b ms (slowest rank) | efficiency t1/(P tP) | max rel err output | "
             "max rel err grads |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fb_ms" not in r:
            lines.append(f"| {r['mode']} | {r['cp']} | | | {r.get('error', '')} | | | |")
            continue
        errors = r.get("rel_error", {})
        grads = max((v for k, v in errors.items() if k != "o"), default=None)
        fmt = lambda x: "-" if x is None else f"{x:.1e}"
        lines.append(f"| {r['mode'] if r['cp'] > 1 else '-'} | {r['cp']} | {r['tokens']} | {r['heads']}x{r['head_dim']} "
                     f"| {r['fb_ms']:.2f} | {r.get('efficiency', 0):.2f} | {fmt(errors.get('o'))} | {fmt(grads)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training runs
def pretrain_args(args, run_dir: Path, seq: int, steps: int, flags: list[str]) -> list[str]:
    return ["--config", args.preset, "--seq-length", seq, "--train-iters", steps, "--micro-batch-size", 1,
            "--run-dir", run_dir, "--log-interval", 1, "--set", "train.metrics_interval=1",
            "--set", "train.eval_interval=0", "--set", f"train.data_cache_dir={args.data_cache_dir}", *flags]


def train_run(args, work: Path, name: str, gpus: int, seq: int, flags: list[str]) -> dict:
    """A few steps of the preset through launch/pretrain.py; speed from metrics.jsonl after step 1."""
    run_dir = work / name
    result = torchrun(ROOT / "launch" / "pretrain.py", gpus, pretrain_args(args, run_dir, seq, args.train_steps, flags),
                      work / f"{name}.log", timeout(args, name.split("-")[0]))
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > 1]
    row = dict(gpus=gpus, seq_length=seq, **result)
    if result["rc"] == 0 and timed:
        mean = lambda key: sum(r[key] for r in timed) / len(timed) if all(key in r for r in timed) else None
        row.update(tokens_per_s_per_gpu=mean("tokens_per_s") / gpus, tflops_per_gpu=mean("tflops_per_gpu"),
                   mfu=mean("mfu"), steps_timed=len(timed))
    elif result["rc"] == 0:
        row.update(rc="no metrics", error="finished without timed steps in metrics.jsonl")
    return row


def part_throughput(args, work: Path) -> list[dict]:
    batch = ["--global-batch-size", args.gpus] + (["--bf16"] if args.cuda else [])
    return [train_run(args, work, f"throughput-{seq}", args.gpus, seq, batch) for seq in args.contexts]


def table_throughput(rows) -> str:
    lines = ["| GPUs | context | tokens/s per GPU | TFLOP/s per GPU | MFU |", "|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s_per_gpu" not in r:
            lines.append(f"| {r['gpus']} | {r['seq_length']} | {r.get('error', '')} | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {r['gpus']} | {r['seq_length']} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['tflops_per_gpu']:.1f} | {mfu} |")
    return "\n".join(lines)


LONGEST_FLAGS = ["--set", "train.recompute_layers=all", "--loss-chunk-tokens", "4096"]


def predicted_longest(args, cp: int) -> int:
    """The dry run's longest --seq-length (launch/pretrain.py --dry-run --find-max-seq-length)."""
    from launch.pretrain import build_run_config, parse_args
    from train.dry_run import DEFAULT_DEVICE_MEMORY_GIB, find_max_seq_length

    flags = pretrain_args(args, Path("unused"), 1024 * cp, 1, LONGEST_FLAGS + ["--context-parallel-size", cp])
    run = build_run_config(parse_args([str(x) for x in flags]))
    memory = DEFAULT_DEVICE_MEMORY_GIB
    if args.cuda:
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return find_max_seq_length(run, cp, memory).seq_length


def part_longest(args, work: Path) -> list[dict]:
    rows = []
    for cp in cp_sizes(args):
        step = 1024 * cp if args.cuda else 64 * cp
        predicted = predicted_longest(args, cp)
        seq = min(predicted, args.longest_cap) // step * step
        tries = []
        for _ in range(args.longest_tries):
            if seq < step:
                break
            flags = LONGEST_FLAGS + ["--context-parallel-size", cp, "--global-batch-size", 1]
            attempt = train_run(args, work, f"longest-cp{cp}-{seq}", cp, seq, flags)
            tries.append(attempt)
            if "tokens_per_s_per_gpu" in attempt:
                break
            seq = int(seq * 0.75) // step * step
        good = [t for t in tries if "tokens_per_s_per_gpu" in t]
        rows.append(dict(cp=cp, predicted=predicted, longest=good[0]["seq_length"] if good else None,
                         tokens_per_s_per_gpu=good[0]["tokens_per_s_per_gpu"] if good else None,
                         tries=[dict(seq_length=t["seq_length"], rc=t["rc"], error=t.get("error")) for t in tries]))
    kept = [r for r in args.earlier.get("longest", []) if r["cp"] not in cp_sizes(args)]  # earlier calls' sizes
    return sorted(kept + rows, key=lambda r: r["cp"])


def table_longest(rows) -> str:
    lines = ["| CP | dry-run prediction | longest that trained | tokens/s per GPU there | failed tries |",
             "|---|---|---|---|---|"]
    for r in rows:
        failed = ", ".join(f"{t['seq_length']} ({t['rc']})" for t in r["tries"] if t["rc"] != 0)
        speed = "-" if r["tokens_per_s_per_gpu"] is None else f"{r['tokens_per_s_per_gpu']:,.0f}"
        lines.append(f"| {r['cp']} | {r['predicted']} | {r['longest'] or 'none'} | {speed} | {failed or '-'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver
PARTS = {"loss": (part_loss, table_loss, "Loss curves of the tiny mixed model vs one GPU"),
         "cp_kda": (part_cp_kda, table_cp_kda, "Context-parallel KDA layer core vs one GPU"),
         "throughput": (part_throughput, table_throughput, "Throughput of the small hybrid preset, data parallel"),
         "longest": (part_longest, table_longest, "Longest context that trains under context parallelism")}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"torch": torch.__version__}
    for name in ("triton", "megatron-core"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 gloo ranks, tiny shapes, 2 steps")
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible GPU (2, 4 or 8)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "multi_gpu.json"))
    parser.add_argument("--workdir", default=None, help="run directories and logs (default: next to --out)")
    parser.add_argument("--job-timeout", type=int, default=0,
                        help="seconds per torchrun job (default per part: " +
                             ", ".join(f"{k} {v}" for k, v in JOB_TIMEOUTS.items()) + ")")
    parser.add_argument("--cp-sizes", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="CP sizes (> 1) of cp_kda and longest (default: 2, 4, 8 up to the GPU count)")
    parser.add_argument("--cp-modes", type=lambda text: text.split(","), default=["chunkwise", "ulysses"],
                        help="modes of cp_kda")
    parser.add_argument("--longest-tries", type=int, default=0, help="longest: attempts per CP size (default 4)")
    parser.add_argument("--group-jobs", action="store_true",
                        help="loss: the layouts of one world size in one torchrun job (default with --smoke)")
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    args = parser.parse_args(argv)
    import torch

    args.cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.gpus, args.group_jobs = 2, True
        args.steps, args.cp_tokens, args.cp_heads, args.cp_head_dim, args.cp_reps = 2, 256, 2, 16, 2
        args.preset, args.contexts, args.train_steps = "tiny", [128], 2
        args.longest_cap, args.longest_tries = 256, args.longest_tries or 2
        args.job_timeout = args.job_timeout or 300  # CPU jobs on a busy machine
    else:
        if not args.cuda:
            parser.error("needs CUDA GPUs (or --smoke for the CPU run)")
        args.gpus = args.gpus or torch.cuda.device_count()
        args.steps, args.cp_tokens, args.cp_heads, args.cp_head_dim, args.cp_reps = 20, 32768, 16, 128, 5
        args.preset, args.contexts, args.train_steps = str(PRESET), [4096, 32768], 4
        args.longest_cap, args.longest_tries = 1 << 24, args.longest_tries or 4
    if args.gpus < 2:
        parser.error(f"--gpus {args.gpus}: needs at least 2")
    if any(p < 2 or p > args.gpus for p in args.cp_sizes or []):
        parser.error(f"--cp-sizes {args.cp_sizes}: each between 2 and the GPU count {args.gpus}")
    if set(args.cp_modes) - {"chunkwise", "ulysses"}:
        parser.error(f"--cp-modes {','.join(args.cp_modes)}: choose from chunkwise, ulysses")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpus=args.gpus,
                  device=torch.cuda.get_device_name() if args.cuda else "cpu (gloo)", smoke=args.smoke,
                  versions=versions(), parts={})
    if out.exists():  # parts measured by an earlier call with the same --out stay unless measured again
        earlier = json.loads(out.read_text())
        if earlier.get("gpus") == args.gpus and earlier.get("smoke") == args.smoke:
            result["parts"] = earlier.get("parts", {})
    args.earlier = dict(result["parts"])
    header = (f"# Multi-GPU validation, {result['date']}: {args.gpus} x {result['device']}, "
              + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(header, flush=True)
    section = lambda name: f"\n## {PARTS[name][2]}\n\n{PARTS[name][1](result['parts'][name])}"
    for name in args.parts.split(","):
        result["parts"][name] = PARTS[name][0](args, work)
        print(section(name), flush=True)
        out.write_text(json.dumps(result, indent=1))  # a killed run keeps the parts it finished
    tables = [header] + [section(name) for name in PARTS if name in result["parts"]]
    out.with_suffix(".md").write_text("\n".join(tables) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
