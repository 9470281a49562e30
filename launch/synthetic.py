"""The paper's synthetic tasks (Palindrome, MQAR, Stack) on a 2-layer model of one mixer kind,
trained by the pretraining loop; held-out accuracy logged to metrics.jsonl / W&B. See docs/synthetic.md.

    python launch/synthetic.py --task palindrome --arm K --length 1024 --lr 5e-4 --steps 20000 --bf16
    python launch/synthetic.py sweep --out runs/synthetic --output jobs.jsonl -- --bf16
    python launch/synthetic.py run jobs.jsonl --parallel 8          # or --index $SLURM_ARRAY_TASK_ID
    python launch/synthetic.py report runs/synthetic                # PNGs + markdown table

Arms: ``K`` (KDA), ``G`` (Gated DeltaNet), ``A`` (NoPE MLA): the layer pattern of both layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ARMS = ("K", "G", "A")
PAPER_LRS = (5e-5, 1e-4, 5e-4, 1e-3)
PAPER_LENGTHS = (256, 512, 1024, 2048)
TASK_NAMES = ("palindrome", "mqar", "stack")
LOGITS_TOKENS = 16384  # tokens per held-out forward: bounds the [tokens, vocab] logits in memory


def synthetic_model(vocab_size: int, arm: str):
    """The paper's synthetic-task model: 2 layers, 2 heads of dim 128 (hidden 256), dense SwiGLU
    MLPs (no MoE); MLA with the same head count and head dims as the pretraining presets."""
    from model.config import ConfigError, ModelConfig

    if arm not in ARMS:
        raise ConfigError(f"--arm {arm!r}: use K (KDA), G (Gated DeltaNet) or A (MLA)")
    return ModelConfig(
        name=f"synthetic-{arm}", vocab_size=vocab_size, hidden_size=256, num_layers=2, layer_pattern=arm,
        kda_num_heads=2, kda_head_dim=128, num_attention_heads=2, kv_lora_rank=256, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, first_k_dense=2, intermediate_size=1024,
    )


def run_name(task: str, arm: str, length: int, lr: float) -> str:
    return f"{task}-{arm}-L{length}-lr{lr:g}"


# ----------------------------------------------------------------------------- one run
def parse_train_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--arm", required=True, choices=ARMS, help="K (KDA), G (Gated DeltaNet) or A (MLA)")
    p.add_argument("--length", type=int, required=True, help="training length (tokens per sequence)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak LR (the paper's grid: 5e-5 1e-4 5e-4 1e-3)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--micro-batch-size", type=int, default=0, help="sequences per forward (0: the batch size)")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=512, help="size of the fixed held-out set")
    p.add_argument("--stop-at", type=float, default=1.0,
                   help="end the run once the held-out token accuracy reaches this (0: never)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--run-dir", default="", help="default: runs/synthetic/<task>-<arm>-L<length>-lr<lr>")
    p.add_argument("--save", action="store_true", help="checkpoints in the run folder (the run resumes from them)")
    p.add_argument("--save-interval", type=int, default=2000)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--wandb-project", default="")
    p.add_argument("--task-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a task setting, e.g. symbols=16 or kv_pairs=32 (docs/synthetic.md)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any model./train. field, as in launch/pretrain.py")
    return p.parse_args(argv)


def _task_from_args(args):
    from data.synthetic import check_length, make_task
    from model.config import ConfigError

    params = {}
    for item in args.task_arg:
        if "=" not in item:
            raise ConfigError(f"--task-arg {item!r}: expected NAME=VALUE, e.g. symbols=16")
        key, value = item.split("=", 1)
        params[key] = value
    task = make_task(args.task, **params)
    check_length(task, args.length)
    return task


def build_run(args, task):
    """The RunConfig of one synthetic run (cosine LR to a tenth of the peak after a 2% warmup,
    AdamW with the pretraining defaults)."""
    from model.config import ConfigError
    from train.config import RunConfig, TrainConfig, apply_override

    for name in ("steps", "batch_size", "eval_interval", "eval_samples"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    run_dir = args.run_dir or str(Path("runs/synthetic") / run_name(args.task, args.arm, args.length, args.lr))
    train = TrainConfig(
        seq_length=args.length, micro_batch_size=args.micro_batch_size or args.batch_size,
        global_batch_size=args.batch_size, train_iters=args.steps, lr=args.lr, min_lr=args.lr / 10,
        lr_schedule="cosine", lr_warmup_iters=max(1, args.steps // 50), seed=args.seed, bf16=args.bf16,
        run_dir=run_dir, save=run_dir if args.save else "", save_interval=args.save_interval,
        eval_interval=args.eval_interval, log_interval=args.log_interval, metrics_interval=args.eval_interval,
        wandb_project=args.wandb_project, wandb_run_name=Path(run_dir).name,
    )
    run = RunConfig(model=synthetic_model(task.vocab_size, args.arm), train=train)
    for assignment in args.set:
        apply_override(run, assignment)
    return run


def data_builder(task, eval_samples: int):
    """The loop's ``data`` hook: synthetic train samples and the held-out set as validation data."""

    def build(run, dims):
        from megatron.core import parallel_state

        from data.synthetic import build_synthetic_loaders

        t = run.train
        dp_size = parallel_state.get_data_parallel_world_size()
        train, heldout = build_synthetic_loaders(
            task, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, heldout_samples=eval_samples,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp_size, seed=t.seed)
        t.eval_iters = eval_samples // (t.micro_batch_size * dp_size)  # the validation loss covers the set once
        return train, heldout

    return build


class HeldOutAccuracy:
    """The loop's ``evaluation`` hook: exact-match accuracy of the greedy prediction on the answer
    tokens of the fixed held-out set, per token and per sequence (all answers of a sequence right).
    Every rank evaluates the whole set (it is small), so all ranks agree on stopping."""

    def __init__(self, task, length: int, samples: int, seed: int, stop_at: float):
        self.task, self.length, self.samples, self.seed, self.stop_at = task, length, samples, seed, stop_at
        self.batches = None

    def __call__(self, model, step: int) -> dict:
        import torch

        from data.synthetic import heldout_batches
        from train.loop import log

        device = next(model.parameters()).device
        if self.batches is None:
            rows = max(1, LOGITS_TOKENS // self.length)
            self.batches = [{k: v.to(device) for k, v in batch.items()} for batch in
                            heldout_batches(self.task, self.length, self.samples, rows, self.seed)]
        was_training = model.training
        model.eval()
        right = total = sequences_right = 0
        with torch.no_grad():
            for batch in self.batches:
                logits = model(batch["tokens"], batch["cu_seqlens"])
                answer = batch["loss_mask"] > 0
                correct = (logits.argmax(-1) == batch["labels"]) & answer
                right += int(correct.sum())
                total += int(answer.sum())
                sequences_right += int((correct | ~answer).all(dim=1).sum())
        model.train(was_training)
        token, sequence = right / max(total, 1), sequences_right / self.samples
        log(f"step {step:6d} | held-out accuracy {100 * token:.2f}% per answer token, "
            f"{100 * sequence:.2f}% per sequence")
        return {"synthetic/token_accuracy": token, "synthetic/sequence_accuracy": sequence,
                "stop_training": self.stop_at > 0 and token >= self.stop_at}


def train_main(argv) -> int:
    from data.synthetic import describe
    from launch.synthetic_report import summarize
    from model.config import ConfigError
    from parallel.state import ParallelConfigError, destroy
    from train import checkpoint as ckpt
    from train.checkpoint import CheckpointError
    from train.loop import train

    args = parse_train_args(argv)
    try:
        task = _task_from_args(args)
        run = build_run(args, task)
        if run.train.pipeline_model_parallel_size > 1:
            raise ConfigError("synthetic runs do not support pipeline parallelism (the accuracy needs the "
                              "logits on every rank); use data or tensor parallelism")
        run_dir = Path(run.train.run_dir)
        resuming = bool(run.train.save) and ckpt.latest_step(run.train.save) is not None
        if not resuming:  # a fresh start: drop what an earlier attempt in this folder left behind
            for stale in ("metrics.jsonl", "result.json"):
                (run_dir / stale).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = {"task": describe(task), "arm": args.arm, "length": args.length, "lr": args.lr,
                    "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                    "eval_samples": args.eval_samples, "eval_interval": args.eval_interval, "bf16": args.bf16,
                    "model": run.model.to_dict()}
        (run_dir / "synthetic.json").write_text(json.dumps(settings, indent=2) + "\n")
        evaluation = HeldOutAccuracy(task, args.length, args.eval_samples, args.seed, args.stop_at)
        train(run, data=data_builder(task, args.eval_samples), evaluation=evaluation)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            summary = {k: v for k, v in summarize(run_dir).items() if k not in ("curve", "model")}
            peak = summary["peak_token_accuracy"] or 0
            # the last step is always evaluated; a run that ended before it and before --stop-at was
            # stopped by a signal: no result.json, so the job runner starts it again (and it resumes)
            if summary["last_step"] < args.steps and not (args.stop_at > 0 and peak >= args.stop_at):
                again = "resumes it" if run.train.save else "starts it again (no --save)"
                print(f"stopped before step {args.steps} (last evaluated at {summary['last_step']}), "
                      f"no result.json written; the same command {again}", flush=True)
                return 0
            (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"peak held-out accuracy {100 * peak:.2f}% per token; "
                  f"result in {run_dir / 'result.json'}", flush=True)
    except (ConfigError, ParallelConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy()
    return 0


# ----------------------------------------------------------------------------- sweep
def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def sweep_jobs(tasks, arms, lengths, lrs, out: str, extra: list[str]) -> list[dict]:
    """One job per task x arm x length x LR; the L=1024 KDA and GDN runs first (the paper's main
    contrast), then the rest of 1024, then the other lengths."""
    import shlex

    def priority(job):
        task, arm, length, lr = job
        return (length != 1024, arm not in ("K", "G"), lengths.index(length), arms.index(arm),
                tasks.index(task), lrs.index(lr))

    grid = sorted(((t, a, n, lr) for t in tasks for a in arms for n in lengths for lr in lrs), key=priority)
    jobs = []
    for task, arm, length, lr in grid:
        name = run_name(task, arm, length, lr)
        run_dir = str(Path(out) / name)
        argv = ["python", "launch/synthetic.py", "--task", task, "--arm", arm, "--length", str(length),
                "--lr", f"{lr:g}", "--run-dir", run_dir, *extra]
        jobs.append({"name": name, "command": shlex.join(argv), "run_dir": run_dir,
                     "done_file": str(Path(run_dir) / "result.json"),
                     "task": task, "arm": arm, "length": length, "lr": lr})
    return jobs


def sweep_main(argv) -> int:
    from launch.jobs import write_jobs

    extra = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(prog="launch/synthetic.py sweep",
                                description="Write the job list (JSON lines) of a grid of synthetic runs; "
                                            "arguments after -- go to every run (e.g. -- --bf16 --steps 20000)")
    p.add_argument("--tasks", default=",".join(TASK_NAMES))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--lengths", default=",".join(map(str, PAPER_LENGTHS)))
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in PAPER_LRS))
    p.add_argument("--out", default="runs/synthetic", help="parent folder of the run folders")
    p.add_argument("--output", default="", help="job list file (default: standard output)")
    args = p.parse_args(argv)
    tasks, arms = _list(args.tasks), _list(args.arms)
    bad = [t for t in tasks if t not in TASK_NAMES] + [a for a in arms if a not in ARMS]
    if bad:
        print(f"error: unknown task/arm {bad}; tasks {TASK_NAMES}, arms {ARMS}", file=sys.stderr)
        return 2
    jobs = sweep_jobs(tasks, arms, _list(args.lengths, int), _list(args.lrs, float), args.out, extra)
    write_jobs(jobs, args.output or None)
    if args.output:
        print(f"{len(jobs)} jobs written to {args.output}", file=sys.stderr)
    return 0


def run_main(argv) -> int:
    from launch.jobs import read_jobs, run_jobs, select

    p = argparse.ArgumentParser(prog="launch/synthetic.py run", description="Run a job list here")
    p.add_argument("jobs", help="job list (JSON lines) from the sweep command")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once (processes sharing this machine/GPU)")
    p.add_argument("--index", type=int, default=None, help="run job I only (a SLURM array task)")
    p.add_argument("--shard", default=None, help="run jobs j with j %% N == I, given as I/N")
    p.add_argument("--devices", default="", help="GPU ids handed to the slots round-robin, e.g. 0,1,2,3")
    args = p.parse_args(argv)
    if args.parallel < 1:
        print("error: --parallel must be >= 1", file=sys.stderr)
        return 2
    try:
        jobs = select(read_jobs(args.jobs), args.index, args.shard)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return 1 if run_jobs(jobs, args.parallel, _list(args.devices) or None) else 0
    except KeyboardInterrupt:  # the pool stopped the runs with SIGTERM: each saved at its step boundary
        print("\ninterrupted: runs started with --save saved where they were; the same command resumes "
              "them (finished runs are skipped)", file=sys.stderr)
        return 130


def report_main(argv) -> int:
    from launch.synthetic_report import report

    p = argparse.ArgumentParser(prog="launch/synthetic.py report",
                                description="Peak accuracy vs length, convergence at 1024 and a table beside "
                                            "the paper's numbers")
    p.add_argument("runs", nargs="+", help="run folders, or folders that contain them")
    p.add_argument("--out", default=None, help="output folder (default: the runs' common parent)")
    args = p.parse_args(argv)
    try:
        out = report(args.runs, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'synthetic_report.md'}, {out / 'peak_accuracy.png'}, {out / 'convergence_L1024.png'}")
    return 0


COMMANDS = {"sweep": sweep_main, "run": run_main, "report": report_main}


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
