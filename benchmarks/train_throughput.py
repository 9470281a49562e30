"""Training throughput of the comparison arms (all-MLA, GDN-H, Kimi Linear) through the same code
path as launch/pretrain.py, side by side with transformers' KimiLinearForCausalLM.

    python benchmarks/train_throughput.py --preset tiny --steps 3 --device cpu          # smoke (CI)
    python benchmarks/train_throughput.py --preset scaling-653m --contexts 4096,16384,32768 \\
        --tokens-per-step 65536 --steps 8 --bf16 --out $OUT/throughput.json               # one H200

Each (arm, context) runs ``--steps`` real training steps (forward, backward, optimizer) on packed
documents with the loader's ``cu_seqlens``; the first step is warm-up and not counted. Reported:
tokens/s, TFLOP/s per GPU and MFU from the engine's FLOPs counter (peak = the GPU's dense bf16
spec; on a GPU also the bf16 matmul ceiling measured in this run), and peak memory. Prints a
markdown table and writes JSON. Not yet: the torch-profiler breakdown of step time by part.
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
sys.path.insert(0, str(ROOT))

ARMS = ("mla", "gdn-h", "kimi-linear")


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


def run_arm(preset: str, arm: str, context: int, args) -> dict:
    """Train ``args.steps`` steps of one arm through train.loop.train; averages after step 1."""
    from model.presets import as_arm, get_preset
    from train.config import RunConfig, TrainConfig
    from train.loop import train

    model = as_arm(get_preset(preset), arm)
    if args.vocab_size:
        model = model.replace(vocab_size=args.vocab_size)
    micro = max(args.tokens_per_step // context, 1)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            seq_length=context, micro_batch_size=micro, global_batch_size=micro, train_iters=args.steps,
            lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, bf16=args.bf16, log_interval=10**9, metrics_interval=0,
            run_dir=run_dir, data_cache_dir=args.data_cache_dir, data_prefixes=args.data_path or [],
            recompute_layers="all" if args.recompute else "", optimizer=args.optimizer,
        )
        train(RunConfig(model=model, train=cfg))
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    counted = records[1:] or records
    mean = lambda key: sum(r.get(key, 0.0) or 0.0 for r in counted) / len(counted)  # noqa: E731
    memory = max(r.get("memory/peak_allocated_gib", r.get("memory/peak_rss_gib", 0.0)) for r in counted)
    row = dict(system="ours", arm=arm, context=context, tokens_per_step=micro * context,
               tokens_per_s=mean("tokens_per_s"), tflops_per_gpu=mean("tflops_per_gpu"),
               peak_memory_gib=memory, loss=counted[-1]["loss"])
    if "mfu" in counted[-1]:
        row["mfu"] = mean("mfu")
    return row


def run_transformers(preset: str, context: int, args, device) -> dict:
    """The setup a user would otherwise pick: transformers' KimiLinearForCausalLM (FLA kernels when
    importable), same Kimi Linear config, AdamW, same tokens per step (random token ids)."""
    import torch
    import transformers

    from model.hf_names import hf_config_from_model_config
    from model.presets import as_arm, get_preset

    model_cfg = as_arm(get_preset(preset), "kimi-linear")
    if args.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=args.vocab_size)
    config = transformers.KimiLinearConfig(**hf_config_from_model_config(model_cfg))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = transformers.KimiLinearForCausalLM(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    micro = max(args.tokens_per_step // context, 1)
    ids = torch.randint(0, model_cfg.vocab_size, (micro, context), device=device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    counted = times[1:] or times
    seconds = sum(counted) / len(counted)
    return dict(system="transformers", arm="kimi-linear", context=context, tokens_per_step=micro * context,
                tokens_per_s=micro * context / seconds, loss=float(loss))


def markdown(rows: list[dict]) -> str:
    lines = ["| system | arm | context | tokens/step | tokens/s | TFLOP/s/GPU | MFU | peak mem GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['arm']} | {r['context']} | | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        tflops = f"{r['tflops_per_gpu']:.3g}" if "tflops_per_gpu" in r else ""
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else ""
        lines.append(f"| {r['system']} | {r['arm']} | {r['context']} | {r['tokens_per_step']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {tflops} | {mfu} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaling-653m")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--contexts", default=None, help="default: 4096,16384,32768 (tiny: 64,128)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 65536 (tiny: 256)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--recompute", action="store_true", help="activation recompute on every layer")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--vocab-size", type=int, default=8192, help="0 keeps the preset's vocab")
    parser.add_argument("--data-path", nargs="*", default=None, help="indexed prefixes (default: embedded corpus)")
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.json"))
    args = parser.parse_args(argv)
    tiny = args.preset == "tiny"
    contexts = [int(c) for c in (args.contexts or ("64,128" if tiny else "4096,16384,32768")).split(",")]
    args.tokens_per_step = args.tokens_per_step or (256 if tiny else 65536)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu for the smoke run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    ceiling = matmul_ceiling_tflops(device)
    rows = []
    for context in contexts:
        for arm in args.arms.split(","):
            try:
                rows.append(run_arm(args.preset, arm, context, args))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(system="ours", arm=arm, context=context, error="out of memory"))
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
        if not args.no_transformers:
            try:
                rows.append(run_transformers(args.preset, context, args, device))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(system="transformers", arm="kimi-linear", context=context, error="out of memory"))
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    env = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, matmul_ceiling_tflops=ceiling, preset=args.preset, bf16=args.bf16)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(env)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
