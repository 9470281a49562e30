"""Training throughput of the comparison arms (all-MLA, GDN-H, Kimi Linear) through the same code
path as launch/pretrain.py, side by side with transformers' KimiLinearForCausalLM (``--baseline``).

    python benchmarks/train_throughput.py --preset tiny --steps 3 --device cpu          # smoke (CI)
    python benchmarks/train_throughput.py --preset scaling-653m --contexts 4096,16384,32768 \\
        --tokens-per-step 32768 --steps 4 --bf16 --out $OUT/throughput.json               # one H200

Each (arm, context) runs ``--steps`` real training steps (forward, backward, optimizer) on packed
documents with the loader's ``cu_seqlens``; the first step is warm-up and not counted. Reported:
tokens/s, TFLOP/s per GPU and MFU from the engine's FLOPs counter (peak = the GPU's dense bf16
spec; on a GPU also the bf16 matmul ceiling measured in this run), peak memory, and the share of
the step's time per part (KDA, MLA core attention, MoE, dense projections, optimizer, other, idle)
from one more step run under the torch profiler (train/profile.py). ``--baseline hf`` (the default)
also trains transformers' KimiLinearForCausalLM in the configuration of each arm it can express
(our HF export's config; bf16 autocast, fused AdamW; benchmarks/hf_baseline.py), reports its
tokens/s in the same table with our speed-up over it, and says whether FLA's kernels actually ran
in it. Prints markdown tables and writes JSON (rewritten after every run, so a killed run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from model.presets import ARMS  # noqa: E402  (the registered mixers' arms: mla, gdn-h, kimi-linear)


def matmul_ceiling_tflops(device) -> float | None:
    """bf16 8192^3 matmul rate on this GPU (random data, median of 10)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def run_arm(preset: str, arm: str, context: int, args, recompute: bool | str = False, tokens_per_step: int = 0) -> dict:
    """Train ``args.steps`` steps of one arm through train.loop.train, then one more under the
    profiler (train/profile.py); speed averages the steps after the first (warm-up)."""
    from model.presets import as_arm, get_preset
    from train.config import RunConfig, TrainConfig
    from train.loop import train

    model = as_arm(get_preset(preset), arm)
    if args.vocab_size:
        model = model.replace(vocab_size=args.vocab_size)
    micro = max((tokens_per_step or args.tokens_per_step) // context, 1)
    steps = args.steps + 1  # the last step is the profiled one
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            seq_length=context, micro_batch_size=micro, global_batch_size=micro, train_iters=steps,
            lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, bf16=args.bf16, log_interval=10**9, metrics_interval=0,
            run_dir=run_dir, data_cache_dir=args.data_cache_dir, data_prefixes=args.data_path or [],
            # no evaluation here; a whole-shard validation corpus keeps the long contexts from
            # failing on a validation split too small for one sample
            valid_prefixes=args.data_path or [],
            recompute_layers=_recompute_spec(recompute), optimizer=args.optimizer, profile_step=steps,
            compile=args.compile, reset_at_document_boundaries=not args.full_context,
        )
        started = time.perf_counter()
        train(RunConfig(model=model, train=cfg))
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        profile = json.loads((Path(run_dir) / f"profile_step{steps}.json").read_text())
    counted = records[1:-1] or records[:1]
    mean = lambda key: sum(r.get(key, 0.0) or 0.0 for r in counted) / len(counted)  # noqa: E731
    memory = max(r.get("memory/peak_allocated_gib", r.get("memory/peak_rss_gib", 0.0)) for r in records)
    row = dict(system="ours", arm=arm, context=context, tokens_per_step=micro * context, recompute=recompute,
               compile=cfg.compile, full_context=not cfg.reset_at_document_boundaries,
               tokens_per_s=mean("tokens_per_s"), tflops_per_gpu=mean("tflops_per_gpu"),
               peak_memory_gib=memory, loss=counted[-1]["loss"], profile=profile,
               # each counted step's own rate: the spread within a run, beside the spread between runs
               step_tokens_per_s=[round(r.get("tokens_per_s", 0.0) or 0.0) for r in counted],
               seconds=_seconds(wall, records, micro * context))
    if "mfu" in counted[-1]:
        row["mfu"] = mean("mfu")
    return row


def _seconds(wall: float, records: list[dict], tokens_per_step: int) -> dict:
    """Where a run's wall time went (to plan GPU calls): the first step (compilation), the other steps
    (the profiled one included), and the rest of ``train()`` (model build and initialisation, data,
    reading the profile)."""
    steps = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    first = steps[0] if steps else 0.0
    return dict(train_call=round(wall, 1), first_step=round(first, 1), other_steps=round(sum(steps) - first, 1),
                setup_and_profile=round(wall - sum(steps), 1))


def run_transformers(preset: str, arm: str, context: int, args, device) -> dict:
    """The baseline (``--baseline hf|hf-torch``): transformers' KimiLinearForCausalLM in this arm's
    configuration, same tokens per step (benchmarks/hf_baseline.py)."""
    try:
        from hf_baseline import run_baseline  # run as a script: benchmarks/ is first on sys.path
    except ImportError:
        from benchmarks.hf_baseline import run_baseline
    from model.presets import as_arm, get_preset
    from train.config import TrainConfig

    model_cfg = as_arm(get_preset(preset), arm)
    if args.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=args.vocab_size)
    kernels = "torch" if args.baseline == "hf-torch" else "fla"
    row = run_baseline(model_cfg, context, args.tokens_per_step, args.steps, device, bf16=args.bf16,
                       kernels=kernels, recompute=args.recompute, train=TrainConfig(optimizer=args.optimizer))
    return dict(row, arm=arm)


def baseline_arms(preset: str, arms: list[str]) -> tuple[list[str], dict]:
    """The arms transformers' kimi_linear model can express, and why the others are left out."""
    from model.hf_names import check_exportable
    from model.presets import as_arm, get_preset

    able, left_out = [], {}
    for arm in arms:
        try:
            check_exportable(as_arm(get_preset(preset), arm))
            able.append(arm)
        except Exception as err:  # noqa: BLE001 - HFConversionError says which layer is missing
            left_out[arm] = str(err).split(", so this checkpoint")[0]
    return able, left_out


def _recompute_spec(recompute: bool | str) -> str:
    """``True``: every layer; a string: the layers of ``train.recompute_layers`` ("0,1,2"); else none."""
    return "all" if recompute is True else (recompute or "")


def _label(row: dict) -> str:
    options = [name.replace("_", " ") for name in ("recompute", "compile", "full_context") if row.get(name)]
    if isinstance(row.get("recompute"), str) and row["recompute"] != "all":
        options[0] = f"recompute layers {row['recompute']}"
    return row["arm"] + (f" ({', '.join(options)})" if options else "")


def _versus_baseline(row: dict, rows: list[dict]) -> str:
    """Our row's tokens/s over the transformers row of the same arm and context."""
    if row["system"] != "ours":
        return ""
    for other in rows:
        if (other["system"] == "transformers" and other["arm"] == row["arm"] and other["context"] == row["context"]
                and "error" not in other):
            return f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x"
    return ""


def markdown(rows: list[dict], ceiling: float | None) -> str:
    lines = ["| system | arm | context | tokens/step | tokens/s | TFLOP/s/GPU | MFU | of matmul ceiling "
             "| peak mem GiB | vs transformers |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        label = _label(r)
        if r.get("kda_impl"):
            label += f" (KDA: {r['kda_impl']})"
        if "error" in r:
            lines.append(f"| {r['system']} | {label} | {r['context']} | {r.get('tokens_per_step', '')} | "
                         f"{r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        tflops = f"{r['tflops_per_gpu']:.3g}" if "tflops_per_gpu" in r else ""
        of_ceiling = f"{100 * r['tflops_per_gpu'] / ceiling:.1f}%" if ceiling and "tflops_per_gpu" in r else ""
        memory = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else ""
        lines.append(f"| {r['system']} | {label} | {r['context']} | {r['tokens_per_step']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {tflops} | {mfu} | {of_ceiling} | {memory} | "
                     f"{_versus_baseline(r, rows)} |")
    baseline = [r for r in rows if r["system"] == "transformers" and "error" not in r]
    if baseline:
        lines += ["", f"transformers baseline ({baseline[0]['transformers']}, bf16 autocast "
                  f"{'on' if baseline[0]['bf16_autocast'] else 'off'}, fused AdamW, random token ids, "
                  f"attention: {baseline[0]['attention']}):"]
        lines += [f"- {r['arm']} at {r['context']}: FLA's kernels {'USED' if r['fla_used'] else 'NOT used'}; "
                  f"{r['kernels_note']}" for r in baseline]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        parts = list(dict.fromkeys(k for r in profiled for k in r["profile"]["parts_ms"]))  # rows may differ
        lines += ["", "Share of the profiled step's time by part (torch profiler; " + profiled[0]["profile"]["device"]
                  + " time; idle = the GPU ran nothing):", "",
                  "| arm | context | step ms | " + " | ".join(parts) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in parts) + " |"]
        for r in profiled:
            p = r["profile"]
            label = _label(r)
            lines.append(f"| {label} | {r['context']} | {p['step_ms']:,.0f} | "
                         + " | ".join(f"{100 * p['shares'].get(k, 0.0):.1f}%" for k in parts) + " |")
    return "\n".join(lines)


ROW_PREFIX = "THROUGHPUT_ROW "


def _run_one(spec: dict, args) -> dict:
    """One measurement in this process (the child side of ``_in_subprocess``)."""
    import torch

    run_args = argparse.Namespace(**{**vars(args), "steps": spec["steps"]})
    error_row = {k: spec[k] for k in ("system", "arm", "context")}
    try:
        if spec["system"] == "transformers":
            return run_transformers(args.preset, spec["arm"], spec["context"], run_args, torch.device(args.device))
        return run_arm(args.preset, spec["arm"], spec["context"], run_args, recompute=spec["recompute"],
                       tokens_per_step=spec["tokens_per_step"])
    except torch.OutOfMemoryError as exc:  # the allocator's message says how much was in use
        return dict(error_row, recompute=spec.get("recompute", False), error="out of memory",
                    detail=str(exc).split("\n")[0][:400])


def _in_subprocess(spec: dict, argv: list[str]) -> dict:
    """Each measurement in a fresh process: nothing (memory, compiled graphs, process groups) leaks
    from one run into the next, and out-of-memory in one run cannot spoil the following ones."""
    import subprocess

    cmd = [sys.executable, __file__, *argv, "--one", json.dumps(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line[len(ROW_PREFIX):] for line in result.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if result.returncode != 0 or not rows:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {**{k: spec[k] for k in ("system", "arm", "context")}, "error": f"failed (exit {result.returncode})",
                "detail": " | ".join(tail)[:600]}
    return json.loads(rows[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaling-653m")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--contexts", default=None, help="default: 4096,16384,32768 (tiny: 64,128); \"\" for none")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 32768 (tiny: 256)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (the first is warm-up), "
                        "then one profiled step")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--recompute", action="store_true", help="activation recompute on every layer")
    parser.add_argument("--recompute-layers", default="", metavar="I,J,...",
                        help="activation recompute on these layers only (instead of --recompute)")
    parser.add_argument("--compile", action="store_true", help="fused norms and KDA convolutions (model/fusion.py)")
    parser.add_argument("--full-context", action="store_true",
                        help="attention and KDA state span the whole context window, across document boundaries "
                             "(default: real cu_seqlens, so nothing spans more than the longest document)")
    parser.add_argument("--longest", default="", metavar="C1,C2,...",
                        help="also try these contexts (one sequence per step, recompute on) for each arm, in "
                             "order, until one runs out of memory: the longest context that fits")
    parser.add_argument("--longest-steps", type=int, default=2, help="timed steps of each --longest run")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--vocab-size", type=int, default=8192, help="0 keeps the preset's vocab")
    parser.add_argument("--data-path", nargs="*", default=None, help="indexed prefixes (default: embedded corpus)")
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    parser.add_argument("--baseline", default="hf", choices=["hf", "hf-torch", "none"],
                        help="hf (default): also train transformers' KimiLinearForCausalLM in each arm's configuration "
                             "(the arms it has: mla, kimi-linear), with FLA's kernels where they import and work "
                             "here, and say whether they ran; hf-torch: its PyTorch path; none: no baseline")
    parser.add_argument("--baseline-contexts", default="", help="contexts of the baseline runs (default: all)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.json"))
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args(argv)
    tiny = args.preset == "tiny"
    spec = args.contexts if args.contexts is not None else ("64,128" if tiny else "4096,16384,32768")
    contexts = [int(c) for c in spec.split(",") if c]  # --contexts "": only the --longest runs
    args.tokens_per_step = args.tokens_per_step or (256 if tiny else 32768)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu for the smoke run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.one:
        print(ROW_PREFIX + json.dumps(_run_one(json.loads(args.one), args)), flush=True)
        return 0
    ceiling = matmul_ceiling_tflops(device)
    env = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, matmul_ceiling_tflops=ceiling, preset=args.preset, bf16=args.bf16,
               data=args.data_path or "embedded default corpus", vocab_size=args.vocab_size)
    rows = []

    def record(row):
        rows.append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))  # partial results survive a kill

    arms = args.arms.split(",")
    parent_argv = list(argv if argv is not None else sys.argv[1:])

    def measure(system, arm, context, recompute, tokens, steps):
        return _in_subprocess(dict(system=system, arm=arm, context=context, recompute=recompute,
                                   tokens_per_step=tokens, steps=steps), parent_argv)

    recompute = args.recompute_layers or args.recompute
    hf_arms, left_out = baseline_arms(args.preset, arms) if args.baseline != "none" else ([], {})
    for arm, why in left_out.items():
        print(f"no transformers baseline for {arm}: {why}")
    hf_contexts = [int(c) for c in args.baseline_contexts.split(",")] if args.baseline_contexts else contexts
    for context in contexts:
        for arm in arms:
            record(measure("ours", arm, context, recompute, args.tokens_per_step, args.steps))
        for arm in hf_arms if context in hf_contexts else ():
            record(measure("transformers", arm, context, args.recompute, args.tokens_per_step, args.steps))
    for arm in arms if args.longest else ():
        for context in (int(c) for c in args.longest.split(",")):
            row = measure("ours", arm, context, True, context, args.longest_steps)
            record(row)
            if "error" in row:
                break
    print(env)
    print(markdown(rows, ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
