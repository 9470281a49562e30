"""The paper's identical-recipe comparison: all-MLA vs GDN hybrid vs Kimi Linear, arms that differ
in the layer pattern only.

    launch/compare.py --config RECIPE [--arms mla,gdn-h,kimi-linear] [--seeds N] [--eval-long [TOKENS]]
                      [--slurm] [--dry-run]
    launch/compare.py report RUN_DIRS... [--out DIR]

It builds the arms from one recipe (``model.presets.as_arm``: ``A``; ``G``/``A`` 3:1; ``K``/``A``
3:1), or takes one recipe per arm (``--arm-config mla=configs/x.json ...``), prints their parameter
counts side by side and checks that the recipe is identical: the same seed, data order and token
budget, optimizer, schedule and tokens per step (every field of the run config but the layer
pattern), and the same initial weights for every parameter the arms share (built at step 0 and
compared by name). A recipe difference is refused, naming the fields and the value of each arm.
Then it trains the runs here, one after the other or ``--concurrent N`` at a time (one process
each, or torchrun with ``--nproc-per-node``; on a GPU host every run gets GPUs of its own), with a
progress bar, or submits them as one SLURM job array (``launch/sweep.py``), and writes the report:
``comparison.png`` (validation loss vs tokens with the spread over seeds, training loss, tokens/s,
peak memory) and ``comparison.md`` next to the runs. ``--eval-long`` also validates every arm on the
validation documents of at least 8192 tokens (or TOKENS), where the hybrids are expected to gain
most, and the report shows that loss per arm. docs/launch.md, "The comparison".
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from launch import sweep
from launch.process_pool import Command, CommandFailed, Exited, ProcessPool
from launch.runs import Run
from model.config import ConfigError
from model.presets import ARMS

REPO = Path(__file__).resolve().parent.parent  # the checkout: the scripts and the default output folders

LONG_DOCUMENT_TOKENS = 8192  # --eval-long without a value: documents longer than 8k tokens

# run-config fields that may differ between arms: the layer pattern (what is compared), the name
# that records it, and where each run writes
ARM_FIELDS = {"model.layer_pattern", "model.name"}
PLACE_FIELDS = {"train.run_dir", "train.save", "train.load", "train.wandb_run_name"}
INIT_CHECK_MAX_PARAMETERS = 2_000_000_000  # larger models skip the step-0 weight check (CPU memory, time)


# ----------------------------------------------------------------------------- the arms
def build_arms(config: str | None, arms: list[str], overrides=(), arm_configs: dict | None = None) -> dict:
    """Arm name -> RunConfig: ``config`` with its layer pattern made into each arm, or one recipe
    per arm (``arm_configs``); ``overrides`` (``FIELD=VALUE``) apply to every arm."""
    from model.presets import as_arm
    from train.config import apply_override, load_run_config

    arm_configs = dict(arm_configs or {})
    runs = {}
    for arm in arms:
        if arm not in arm_configs and config is None:
            raise ConfigError(f"arm {arm!r} has no recipe: give --config or --arm-config {arm}=FILE")
        run = load_run_config(arm_configs.get(arm, config))
        for assignment in overrides:  # before as_arm, as launch/sweep.py does: the pattern fits the final depth
            apply_override(run, assignment)
        if arm not in arm_configs:
            run.model = as_arm(run.model, arm)
        run.train.validate()
        run.model.validate()
        runs[arm] = run
    return runs


def _flat(run) -> dict:
    out = {}
    for section, values in run.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def recipe_differences(runs: dict) -> tuple[dict, dict]:
    """(expected, problems): field -> {arm: value} for every field whose value is not the same in
    all arms; ``expected`` holds the layer pattern (and where runs are written), ``problems`` all
    else (optimizer, schedule, seed, data, batch, steps, model widths ...)."""
    flat = {arm: _flat(run) for arm, run in runs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values())))
    expected, problems = {}, {}
    for key in keys:
        values = {arm: f.get(key, "<missing>") for arm, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            (expected if key in ARM_FIELDS | PLACE_FIELDS else problems)[key] = values
    return expected, problems


def token_budget(run) -> int:
    return run.train.train_iters * run.train.global_batch_size * run.train.seq_length


# ----------------------------------------------------------------------------- parameter counts
def parameter_counts(config) -> dict:
    """Total parameters (with the router expert biases), activated per token (routed experts count
    top-k of E) and activated without the embedding and the LM head, from the model built on the
    meta device (no memory). Needs parallel.state initialised."""
    import torch

    from model.model import build_model, count_parameters

    with torch.device("meta"):
        model = build_model(config, initialize_weights=False)
    total = count_parameters(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".ffn.experts." in n)
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embedding.", "output_layer.")))
    inactive = routed * (config.num_experts - config.num_experts_per_token) // max(config.num_experts, 1)
    return {"total": total, "activated": total - inactive, "activated_non_embedding": total - inactive - embedding}


# ----------------------------------------------------------------------------- initial weights
def _mixer_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "mixer":
        return int(parts[1])
    return None


def initial_fingerprints(run) -> dict:
    """Parameter name -> (shape, digest of the fp32 values) of the model training builds at step 0
    (the run's seed, one process)."""
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=run.train.seed)
    model = build_model(run.model)
    prints = {}
    for name, param in model.named_parameters():
        data = param.detach().float().cpu().contiguous()
        prints[name] = (tuple(data.shape), hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest())
    del model
    gc.collect()
    return prints


def shared_parameter_names(a, b, prints_a: dict, prints_b: dict) -> list[str]:
    """Names present in both models with the same shape, excluding mixer parameters of layers
    whose mixer kind differs (a KDA and an MLA layer share no weights even where names coincide)."""
    types_a, types_b = a.model.layer_types, b.model.layer_types
    names = []
    for name in sorted(set(prints_a) & set(prints_b)):
        layer = _mixer_layer(name)
        if layer is not None and types_a[layer] != types_b[layer]:
            continue
        if prints_a[name][0] == prints_b[name][0]:
            names.append(name)
    return names


def initial_weight_differences(runs: dict) -> tuple[int, dict]:
    """(number of shared parameters compared, {name: [arms whose value differs from the first arm's]})."""
    arms = list(runs)
    prints = {arm: initial_fingerprints(runs[arm]) for arm in arms}
    first = arms[0]
    compared, differing = set(), {}
    for other in arms[1:]:
        for name in shared_parameter_names(runs[first], runs[other], prints[first], prints[other]):
            compared.add(name)
            if prints[first][name][1] != prints[other][name][1]:
                differing.setdefault(name, []).append(other)
    return len(compared), differing


# ----------------------------------------------------------------------------- printing
def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def print_arms(runs: dict, counts: dict) -> None:
    arms = list(runs)
    width = max(14, *(len(a) for a in arms))
    rows = [("layer pattern", {a: runs[a].model.layer_pattern if len(runs[a].model.layer_pattern) <= width
                               else runs[a].model.layer_pattern[:width - 1] + "~" for a in arms}),
            ("parameters", {a: _millions(counts[a]["total"]) for a in arms}),
            ("activated", {a: _millions(counts[a]["activated"]) for a in arms}),
            ("activated w/o emb.", {a: _millions(counts[a]["activated_non_embedding"]) for a in arms})]
    print(f"{'':<20}" + "".join(f"{a:>{width + 2}}" for a in arms))
    for label, values in rows:
        print(f"{label:<20}" + "".join(f"{values[a]:>{width + 2}}" for a in arms))


def print_recipe(runs: dict, expected: dict) -> None:
    run = next(iter(runs.values()))
    t = run.train
    print(f"recipe (every arm): seed {t.seed}, {t.train_iters} steps x {t.global_batch_size * t.seq_length:,} tokens "
          f"({t.global_batch_size} x {t.seq_length}) = {token_budget(run):,} tokens, {t.optimizer} lr {t.lr:g} -> "
          f"{t.min_lr:g} ({t.lr_schedule}, warmup {t.lr_warmup_iters}), weight decay {t.weight_decay:g}, "
          f"data {'default corpus' if not t.data_prefixes else ', '.join(t.data_prefixes)}")
    for key, values in expected.items():
        print(f"arms differ in {key}: " + ", ".join(f"{a}={v}" for a, v in values.items()))


# ----------------------------------------------------------------------------- running
def plan_entries(config: str | None, arms: list[str], seeds: list[int], overrides, arm_configs: dict) -> list[dict]:
    """Sweep entries (launch/sweep.py), seed-major so that partial results cover every arm."""
    entries = []
    for seed in seeds:
        for arm in arms:
            entry = {"name": f"{arm}-seed{seed}", "seed": seed, "set": dict(o.split("=", 1) for o in overrides)}
            if arm in arm_configs:
                entry.update(config=arm_configs[arm], labels={"arm": arm})
            else:
                entry.update(config=config, arm=arm)
            entries.append(sweep.resolve(entry, f"arm {arm}, seed {seed}"))
    return entries


def _command(entry: dict, run_dir: Path, nproc: int) -> list[str]:
    script = [str(REPO / "launch" / "pretrain.py"), *entry["argv"], "--save", str(run_dir)]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
    return [sys.executable, *script]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_devices(slot: int, nproc: int, gpus: int, runs_per_gpu: int = 1) -> str:
    """CUDA_VISIBLE_DEVICES of the run in ``slot``: its own ``nproc`` GPUs, or with ``runs_per_gpu``
    > 1 (single-process runs of small models) a GPU shared by that many slots."""
    if runs_per_gpu > 1 and nproc > 1:
        raise ConfigError(f"--runs-per-gpu {runs_per_gpu} shares a GPU between single-process runs; "
                          f"use it with --nproc-per-node 1 (got {nproc})")
    needed = -(-(slot + 1) * nproc // runs_per_gpu)
    if needed > gpus:
        raise ConfigError(f"run slot {slot} needs GPU {needed - 1}; this machine has {gpus} (lower --concurrent, "
                          "or share GPUs with --runs-per-gpu N)")
    return ",".join(str((slot * nproc + i) // runs_per_gpu) for i in range(nproc))


def run_here(entries: list[dict], root: Path, nproc: int, concurrent: int = 1, runs_per_gpu: int = 1) -> list[Path]:
    """Train the entries here, ``concurrent`` at a time (each on its own ``nproc`` GPUs where there
    are GPUs, or ``runs_per_gpu`` single-process runs sharing one), one progress bar over all their
    steps; a rerun resumes each run from its newest checkpoint and skips finished ones. Returns the
    run folders; at the first failure the other runs are stopped (they save) and the error shows the
    end of the failed run's log."""
    from tqdm.auto import tqdm

    gpus = _gpu_count()
    if gpus:
        visible_devices(concurrent - 1, nproc, gpus, runs_per_gpu)  # the last slot fits, or a clear error
    folders = [root / e["name"] for e in entries]
    for entry, folder in zip(entries, folders):
        sweep.write_launch_record(folder, entry)
    waiting = [(e, f) for e, f in zip(entries, folders) if (Run.read(f).last_step() or 0) < e["train_iters"]]
    finished = sum(e["train_iters"] for e in entries) - sum(e["train_iters"] for e, _ in waiting)
    bar = tqdm(total=sum(e["train_iters"] for e in entries), initial=finished, unit="step", dynamic_ncols=True,
               desc="comparison")

    def count_finished(exited: Exited) -> None:
        nonlocal finished
        if exited.ok:
            finished += exited.command.record["train_iters"]

    def show_progress(running: list[Command]) -> None:
        progress, status = finished, []
        for command in running:
            run = Run.read(command.log.parent)
            loss = run.last_loss()
            progress += run.last_step() or 0
            status.append(f"{command.record['name']} " + (f"{loss:.3f}" if loss is not None else "starting"))
        bar.set_postfix_str(", ".join(status), refresh=False)
        bar.update(progress - bar.n)

    pool = ProcessPool(concurrent, (lambda slot: visible_devices(slot, nproc, gpus, runs_per_gpu)) if gpus else None,
                       cwd=REPO, poll_seconds=1.0, stop_at_first_failure=True)
    commands = [Command(_command(entry, folder, nproc), folder / "train.log", entry) for entry, folder in waiting]
    try:
        pool.run(commands, on_exit=count_finished, on_tick=show_progress)
    except CommandFailed as failure:  # the other runs have been stopped (they saved)
        log = failure.exited.command.log
        raise RuntimeError(f"run {failure.exited.command.record['name']} failed (exit code "
                           f"{failure.exited.returncode}); the end of {log}:\n{failure.log_tail(30)}") from None
    finally:
        bar.close()
    return folders


def wait_for_array(root: Path, job: str, entries: list[dict], poll: float = 5.0) -> None:
    """Progress bars (one per task) until every task of the array has left the queue."""
    from tqdm.auto import tqdm

    bars = [tqdm(total=e["train_iters"], desc=e["name"][:24], unit="step", position=i, dynamic_ncols=True)
            for i, e in enumerate(entries)]
    try:
        while True:
            queued = sweep.queue_states(job)
            for i, bar in enumerate(bars):
                run = Run.read(root / f"{job}_{i}")
                bar.update((run.last_step() or 0) - bar.n)
                bar.set_postfix_str(queued.get(i, run.end_state()).lower())
            if not queued:
                break
            time.sleep(poll)
    finally:
        for bar in bars:
            bar.close()


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the recipe: a preset name or JSON run file")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default {','.join(ARMS)})")
    parser.add_argument("--arm-config", action="append", default=[], metavar="ARM=FILE",
                        help="a recipe of its own for one arm (checked against the others)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm: the recipe's seed, +1, ... (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override for every arm")
    parser.add_argument("--eval-long", type=int, nargs="?", const=LONG_DOCUMENT_TOKENS, default=None,
                        metavar="TOKENS",
                        help="with the validation, also the loss on validation documents of at least TOKENS "
                             f"tokens (default {LONG_DOCUMENT_TOKENS}); the same as --set "
                             "train.eval_long_min_length=TOKENS, needs train.eval_interval")
    parser.add_argument("--root", help="folder of the runs (default runs/compare/<recipe>)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per run here (torchrun when > 1)")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="runs at once here (on a GPU host each gets its own --nproc-per-node GPUs)")
    parser.add_argument("--runs-per-gpu", type=int, default=1,
                        help="single-process runs sharing one GPU (small models; e.g. 6 runs on 1 GPU: "
                             "--concurrent 6 --runs-per-gpu 6)")
    parser.add_argument("--slurm", action="store_true", help="submit one SLURM job array instead of running here")
    parser.add_argument("--max-concurrent", type=int, default=0, help="--slurm: at most N tasks at once")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="--slurm: extra sbatch option, e.g. --sbatch-arg=--time=4:00:00")
    parser.add_argument("--wait", action="store_true", help="--slurm: follow the array and write the report at the end")
    parser.add_argument("--dry-run", action="store_true", help="print the arms, checks and commands; train nothing")
    parser.add_argument("--skip-init-check", action="store_true", help="do not build the arms at step 0")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")
    if args.seeds < 1 or args.concurrent < 1 or args.nproc_per_node < 1 or args.runs_per_gpu < 1:
        parser.error("--seeds, --concurrent, --nproc-per-node and --runs-per-gpu must be at least 1")
    pairs = {}
    for item in args.arm_config:
        arm, sep, path = item.partition("=")
        if not sep or arm not in ARMS:
            parser.error(f"--arm-config {item!r}: expected ARM=FILE with ARM one of {','.join(ARMS)}")
        pairs[arm] = path
    args.arm_config = pairs
    if args.eval_long is not None:
        if args.eval_long < 2:
            parser.error(f"--eval-long {args.eval_long}: give a document length of at least 2 tokens")
        args.set.append(f"train.eval_long_min_length={args.eval_long}")
    if args.config is None and set(args.arms) - set(pairs):
        parser.error("give --config RECIPE (or --arm-config ARM=FILE for every arm)")
    return args


def compare(args: argparse.Namespace) -> int:
    from parallel import state

    runs = build_arms(args.config, args.arms, args.set, args.arm_config)
    expected, problems = recipe_differences(runs)
    try:
        state.initialize(state.ParallelDims())
        counts = {arm: parameter_counts(run.model) for arm, run in runs.items()}
        print_arms(runs, counts)
        print()
        if problems:
            lines = [f"  {key}: " + ", ".join(f"{a}={v}" for a, v in values.items())
                     for key, values in problems.items()]
            raise ConfigError("the arms' recipes differ beyond the layer pattern; an identical-recipe comparison "
                              "needs them equal (fix the recipes or drop the --set that differs):\n" + "\n".join(lines))
        print_recipe(runs, expected)
        if args.skip_init_check:
            print("initial weights: not checked (--skip-init-check)")
        elif max(c["total"] for c in counts.values()) > INIT_CHECK_MAX_PARAMETERS:
            print(f"initial weights: not checked (models above {INIT_CHECK_MAX_PARAMETERS / 1e9:g} B parameters are "
                  "not built on the CPU here; the check is the same code at any size)")
        elif len(runs) > 1:
            compared, differing = initial_weight_differences(runs)
            if differing:
                names = sorted(differing)
                print(f"WARNING: initial weights differ in {len(names)} of the {compared} parameters the arms share "
                      f"(e.g. {', '.join(names[:4])}): the arms then differ in more than the mixers")
            else:
                print(f"initial weights: the {compared} parameters the arms share are identical at step 0")
    finally:
        state.destroy()

    seeds = [next(iter(runs.values())).train.seed + i for i in range(args.seeds)]
    entries = plan_entries(args.config, args.arms, seeds, args.set, args.arm_config)
    recipe_name = Path(args.config).stem if args.config else "arms"
    root = Path(args.root or REPO / "runs" / "compare" / recipe_name).resolve()
    print(f"{len(args.arms)} arm(s) x {len(seeds)} seed(s) = {len(entries)} run(s) in {root}")
    if args.slurm:
        manifest = {"name": f"compare-{recipe_name}", "entries": [
            {k: e[k] for k in ("name", "config", "seed", "set", "arm", "labels") if k in e} for e in entries]}
        job = sweep.submit(manifest, root, args.max_concurrent, args.sbatch_arg, dry_run=args.dry_run)
        if job is None:
            return 0
        print(f"submitted array job {job}: runs in {root}/{job}_<task>; progress: launch/sweep.py summary {root} "
              f"--job {job}; report: launch/compare.py report {root}/{job}_*")
        if args.wait:
            wait_for_array(root, job, entries)
            from launch.compare_report import write_report

            write_report(sorted(root.glob(f"{job}_*")))
        return 0
    if args.dry_run:
        for entry in entries:
            print(" ".join(_command(entry, root / entry["name"], args.nproc_per_node)))
        return 0
    folders = run_here(entries, root, args.nproc_per_node, args.concurrent, args.runs_per_gpu)
    from launch.compare_report import write_report

    write_report(folders)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if argv[:1] == ["report"]:
            from launch.compare_report import main as report_main

            return report_main(argv[1:])
        return compare(parse_args(argv))
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:  # the runner stopped the runs with SIGTERM: each saved at its step boundary
        print("\ninterrupted: the unfinished runs saved where they were; the same command resumes them",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
