"""Sweeps as SLURM job arrays: task i of the array runs entry i of a sweep manifest.

    launch/sweep.py expand  MANIFEST                     # the entries and their pretrain.py arguments
    launch/sweep.py submit  MANIFEST [--max-concurrent N] [--sbatch-arg=--time=4:00:00 ...] [--dry-run]
    launch/sweep.py summary ROOT [--job ARRAY_JOB_ID]    # state, restarts, last step and loss per task

A manifest is a JSON file::

    {"name": "arms-653m",                        # job name; runs go to runs/sweeps/<name> ("root")
     "base": {"config": "scaling-653m", "args": ["--bf16"], "set": {"train.train_iters": 20000}},
     "grid": {"arm": ["mla", "gdn-h", "kimi-linear"], "seed": [1, 2]},   # every combination
     "entries": [{"name": "kl-lr2x", "arm": "kimi-linear", "set": {"train.lr": 6e-3}}]}  # and/or a list

An entry has ``config`` (preset or JSON recipe), ``args`` (more pretrain.py flags), ``set``
(``--set`` overrides), ``arm`` (``mla`` | ``gdn-h`` | ``kimi-linear``: the recipe's layer pattern
made into that arm, ``model.presets.as_arm``), ``seed`` and ``labels`` (free-form, recorded);
``grid`` keys are entry keys or config fields (``train.lr``). Every entry is checked (its config
resolved and validated) before anything is submitted. Task i runs in ``ROOT/<array job id>_<i>``
(checkpoints, metrics.jsonl, launch.json, slurm.jsonl; a requeued task resumes there), its log is
``ROOT/logs/<array job id>_<i>.log``, its W&B group is the array job id. docs/launch.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch.runs import LAUNCH, LONG_LOSS_KEY, Run, valid_loss
from model.config import ConfigError

REPO = Path(__file__).resolve().parent.parent  # the checkout: the scripts and the default output folders

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "sweep.sbatch"
ENTRY_KEYS = {"name", "config", "args", "set", "arm", "seed", "labels"}


# ----------------------------------------------------------------------------- manifest -> entries
def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep manifest {path}: file not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"sweep manifest {path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"sweep manifest {path}: expected a JSON object with base/grid/entries")
    unknown = sorted(set(manifest) - {"name", "root", "base", "grid", "entries"})
    if unknown:
        raise ConfigError(f"sweep manifest {path}: unknown key(s) {unknown}; use name, root, base, grid, entries")
    manifest.setdefault("name", path.stem)
    return manifest


def _merge(base: dict, entry: dict, where: str) -> dict:
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; an entry has {sorted(ENTRY_KEYS)}")
    merged = copy.deepcopy(base)
    for key, value in entry.items():
        if key == "set":
            merged["set"] = {**merged.get("set", {}), **value}
        elif key == "args":
            merged["args"] = list(merged.get("args", [])) + list(value)
        elif key == "labels":
            merged["labels"] = {**merged.get("labels", {}), **value}
        else:
            merged[key] = value
    return merged


def _grid_entries(grid: dict) -> list[dict]:
    if not grid:
        return []
    keys = list(grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep manifest: grid.{key} must be a non-empty list")
    entries = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        entry, parts = {}, []
        for key, value in zip(keys, combo):
            if key in ENTRY_KEYS - {"name"}:
                entry[key] = value
            else:  # a config field
                entry.setdefault("set", {})[key] = value
            if key == "seed":
                parts.append(f"seed{value}")
            else:
                parts.append(str(value) if key in ("arm", "config") else f"{key}={value}")
        entry["name"] = "-".join(parts)
        entries.append(entry)
    return entries


def _override_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def entry_argv(entry: dict) -> list[str]:
    """launch/pretrain.py arguments of an expanded entry (without --save: the sweep chooses it)."""
    argv = ["--config", str(entry["config"])]
    if "seed" in entry:
        argv += ["--seed", str(int(entry["seed"]))]
    argv += [str(a) for a in entry.get("args", [])]
    for key, value in entry.get("set", {}).items():
        argv += ["--set", f"{key}={_override_text(value)}"]
    if "arm" in entry:
        argv += ["--set", f"model.layer_pattern={entry['layer_pattern']}", "--set", f"model.name={entry['model_name']}"]
    return argv


def resolve(entry: dict, where: str) -> dict:
    """Check an entry by building its run config exactly as pretrain.py will; add the arm's layer
    pattern, the tokens per step and the step count."""
    from launch.pretrain import build_run_config, parse_args
    from model.presets import as_arm

    if "config" not in entry:
        raise ConfigError(f"{where}: no config (give base.config or the entry's config)")
    for flag in ("--save", "--load"):
        if any(str(a) == flag or str(a).startswith(flag + "=") for a in entry.get("args", [])):
            raise ConfigError(f"{where}: {flag} is not allowed in a sweep entry; the sweep gives every task its folder")
    if any("\n" in str(a) for a in entry.get("args", [])):
        raise ConfigError(f"{where}: an argument contains a newline")
    entry = dict(entry)
    try:
        if "arm" in entry:  # the pattern of the recipe as configured (depth overrides included)
            base = build_run_config(parse_args(entry_argv({k: v for k, v in entry.items() if k != "arm"})))
            arm_model = as_arm(base.model, entry["arm"])
            entry["layer_pattern"], entry["model_name"] = arm_model.layer_pattern, arm_model.name
        run = build_run_config(parse_args(entry_argv(entry)))
        run.train.validate()
        run.model.validate()
    except SystemExit:  # argparse already printed the problem
        raise ConfigError(f"{where}: pretrain.py rejects the arguments {entry_argv(entry)}") from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    entry["tokens_per_step"] = run.train.global_batch_size * run.train.seq_length
    entry["train_iters"] = run.train.train_iters
    labels = dict(entry.get("labels", {}))
    for key in ("arm", "seed"):
        if key in entry:
            labels.setdefault(key, entry[key])
    entry["labels"] = labels
    entry["argv"] = entry_argv(entry)
    return entry


def expand(manifest: dict) -> list[dict]:
    """All entries of a manifest, resolved and checked."""
    base = manifest.get("base", {})
    raw = _grid_entries(manifest.get("grid", {})) + list(manifest.get("entries", []))
    if not raw:
        raise ConfigError("sweep manifest: no entries (give grid and/or entries)")
    entries = []
    for i, item in enumerate(raw):
        entry = _merge(base, item, f"sweep entry {i}")
        entry.setdefault("name", f"entry{i}")
        entries.append(resolve(entry, f"sweep entry {i} ({entry['name']})"))
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep manifest: entry names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return entries


def sweep_root(manifest: dict, root: str | None = None) -> Path:
    return Path(root or manifest.get("root") or REPO / "runs" / "sweeps" / manifest["name"]).resolve()


# ----------------------------------------------------------------------------- submission
def submit(manifest: dict, root: str | Path | None = None, max_concurrent: int = 0, sbatch_args=(),
           dry_run: bool = False, env: dict | None = None) -> str | None:
    """Expand and check the manifest, freeze it under ROOT and submit one job array; returns the
    array job id (None for a dry run, which prints the sbatch command)."""
    entries = expand(manifest)
    root = sweep_root(manifest, root)
    array = f"0-{len(entries) - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
    frozen = root / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    command = ["sbatch", "--parsable", f"--array={array}", f"--job-name={manifest['name']}",
               f"--output={root / 'logs' / '%A_%a.log'}", *sbatch_args, str(SBATCH_SCRIPT), str(frozen), str(root)]
    if dry_run:
        print(" ".join(command))
        return None
    (root / "logs").mkdir(parents=True, exist_ok=True)
    frozen.write_text(json.dumps({"name": manifest["name"], "entries": entries}, indent=1))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={"PYTHON": sys.executable, **os.environ, **(env or {}), "KIMI_REPO": str(REPO)})
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused the array: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    (root / f"{job}.json").write_text(json.dumps({"job": job, "name": manifest["name"], "frozen": frozen.name,
                                                  "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                  "entries": entries}, indent=1))
    return job


def prepare_task(frozen: str | Path, index: int, run_dir: str | Path) -> list[str]:
    """Called by sweep.sbatch in task ``index``: writes RUN_DIR/launch.json, returns the arguments."""
    entries = json.loads(Path(frozen).read_text())["entries"]
    if not 0 <= index < len(entries):
        raise ConfigError(f"array task {index}: the sweep {frozen} has {len(entries)} entries")
    entry = entries[index]
    write_launch_record(run_dir, entry, index=index, sweep=str(frozen),
                        array_job_id=os.environ.get("SLURM_ARRAY_JOB_ID"))
    return entry["argv"]


def write_launch_record(run_dir: str | Path, entry: dict, **extra) -> None:
    """RUN_DIR/launch.json: the entry's name, labels (arm, seed), arguments, tokens per step, steps."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {k: entry[k] for k in ("name", "labels", "argv", "tokens_per_step", "train_iters") if k in entry}
    record.update(extra)
    (run_dir / LAUNCH).write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- summary
def queue_states(job: str) -> dict[int, str]:
    """Array task id -> SLURM state for the tasks still in the queue."""
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-j", str(job), "-o", "%K %T"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            states[int(parts[0])] = parts[1]
    return states


def task_rows(root: str | Path, job: str) -> list[dict]:
    """One row per task of array ``job``: index, name, state, restarts, step, loss, validation loss,
    long-document validation loss (``--eval-long-min-length``), port."""
    root = Path(root)
    record_path = root / f"{job}.json"
    entries = json.loads(record_path.read_text())["entries"] if record_path.exists() else []
    folders = {int(p.name.split("_")[1]): p for p in root.glob(f"{job}_*") if p.name.split("_")[1].isdigit()}
    queued = queue_states(job)
    rows = []
    for index in sorted(set(range(len(entries))) | set(folders)):
        run = Run.read(folders[index]) if index in folders else None
        state = queued.get(index) or (run.end_state() if run else "NOT STARTED")
        if state == "RUNNING?" and index not in queued:
            state = "KILLED?"  # started, left the queue without recording an end
        valid = run.valid_records() if run else []
        long = run.valid_records(LONG_LOSS_KEY) if run else []
        rows.append({
            "task": index,
            "name": entries[index]["name"] if index < len(entries) else (run.name if run else ""),
            "state": state,
            "restarts": max(len(run.starts()) - 1, 0) if run else 0,
            "step": run.last_step() if run else None,
            "train_iters": entries[index].get("train_iters") if index < len(entries) else None,
            "loss": run.last_loss() if run else None,
            "valid_loss": valid_loss(valid[-1]) if valid else None,
            "long_loss": valid_loss(long[-1], LONG_LOSS_KEY) if long else None,
            "port": (run.ports() or [None])[-1] if run else None,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    def cell(value, fmt="{}"):
        return "-" if value is None or value == [] else fmt.format(value)

    header = (f"{'task':>4}  {'name':<28} {'state':<12} {'restarts':>8} {'step':>13} {'loss':>8} {'valid':>8} "
              f"{'long':>8} {'port':>6}")
    lines = [header]
    for r in rows:
        step = cell(r["step"]) + (f"/{r['train_iters']}" if r["train_iters"] else "")
        lines.append(f"{r['task']:>4}  {r['name'][:28]:<28} {r['state']:<12} {r['restarts']:>8} {step:>13} "
                     f"{cell(r['loss'], '{:.4f}'):>8} {cell(r['valid_loss'], '{:.4f}'):>8} "
                     f"{cell(r['long_loss'], '{:.4f}'):>8} {cell(r['port']):>6}")
    return "\n".join(lines)


def latest_job(root: str | Path) -> str | None:
    records = sorted(Path(root).glob("*.json"), key=lambda p: p.stat().st_mtime)
    jobs = [p.stem for p in records if p.stem.isdigit()]
    return jobs[-1] if jobs else None


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("expand", help="list the entries of a manifest and their pretrain.py arguments")
    p.add_argument("manifest")
    p = sub.add_parser("submit", help="submit a manifest as one SLURM job array")
    p.add_argument("manifest")
    p.add_argument("--root", help="folder of the runs (default: the manifest's root, else runs/sweeps/<name>)")
    p.add_argument("--max-concurrent", type=int, default=0, help="at most N tasks at once (--array=...%%N)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--time=4:00:00 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check the entries and print the sbatch command")
    p = sub.add_parser("summary", help="state, restarts, last step and loss of every task of an array")
    p.add_argument("root")
    p.add_argument("--job", help="array job id (default: the newest submitted to ROOT)")
    p = sub.add_parser("task", help=argparse.SUPPRESS)  # used by launch/slurm/sweep.sbatch
    p.add_argument("frozen")
    p.add_argument("index", type=int)
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "expand":
            manifest = load_manifest(args.manifest)
            for i, entry in enumerate(expand(manifest)):
                print(f"{i:>4}  {entry['name']:<28} launch/pretrain.py {' '.join(entry['argv'])}")
        elif args.command == "submit":
            manifest = load_manifest(args.manifest)
            job = submit(manifest, args.root, args.max_concurrent, args.sbatch_arg, args.dry_run)
            if job:
                root = sweep_root(manifest, args.root)
                print(f"submitted array job {job}: runs in {root}/{job}_<task>, logs in {root}/logs")
                print(f"progress: {sys.argv[0]} summary {root} --job {job}")
        elif args.command == "summary":
            job = args.job or latest_job(args.root)
            if job is None:
                raise ConfigError(f"{args.root}: no submitted sweep found (no <job id>.json); give --job")
            print(f"array job {job} ({args.root})")
            print(format_rows(task_rows(args.root, job)))
        else:
            print("\n".join(prepare_task(args.frozen, args.index, args.run_dir)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
