"""Where in a training step the GPU memory peaks: a timeline of allocated memory per decoder layer.

Runs training steps of one arm (the same path as benchmarks/train_throughput.py) with hooks on every
decoder layer: the allocated memory when its forward starts and ends and when its output's gradient
arrives (its backward, with the recompute, starts; the next mark is the previous layer's), and the
peak reached since the previous mark. The last step's timeline is
printed; the gap between the last backward mark and the step's end is the optimizer. (The
allocator's history recorder is not used: with activation recompute it broke inside the
checkpoint's recompute on torch 2.11.)

    python benchmarks/memory_probe.py --arm kimi-linear --context 4096 --tokens 16384 --recompute \\
        --data-path .gbdata/tokens_00000 --vocab-size 32768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Timeline:
    """Marks (label, allocated GiB, peak GiB since the previous mark); a new step starts a new list."""

    def __init__(self, torch):
        self.torch = torch
        self.steps: list[list[tuple[str, float, float]]] = []

    def mark(self, label: str) -> None:
        cuda = self.torch.cuda
        if label == "L0 forward start" or not self.steps:
            self.steps.append([])
        if not cuda.is_available():  # CPU (the smoke run of this script): the marks without numbers
            self.steps[-1].append((label, 0.0, 0.0))
            return
        self.steps[-1].append((label, cuda.memory_allocated() / 2**30, cuda.max_memory_allocated() / 2**30))
        cuda.reset_peak_memory_stats()

    def install(self) -> None:
        from model.model import DecoderLayer

        original = DecoderLayer.forward
        timeline = self

        def forward(layer, hidden, packed):
            name = f"L{layer.layer_idx} ({layer.layer_type})"
            timeline.mark(f"L{layer.layer_idx} forward start" if layer.layer_idx == 0 else f"{name} forward start")
            if hidden.requires_grad and layer.layer_idx == 0:  # elsewhere: the previous layer's output
                hidden.register_hook(lambda grad: timeline.mark(f"{name} backward done"))
            out = original(layer, hidden, packed)
            timeline.mark(f"{name} forward end")
            if out.requires_grad:
                out.register_hook(lambda grad: timeline.mark(f"{name} backward start"))
            return out

        DecoderLayer.forward = forward


def main() -> int:
    import torch
    from train_throughput import run_arm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaling-653m")
    parser.add_argument("--arm", default="kimi-linear")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--data-path", nargs="*", default=None)
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    args = parser.parse_args()
    run_args = argparse.Namespace(steps=args.steps, bf16=True, optimizer="adamw", vocab_size=args.vocab_size,
                                  data_path=args.data_path, data_cache_dir=args.data_cache_dir,
                                  tokens_per_step=args.tokens, compile=False, full_context=False)
    timeline = Timeline(torch)
    timeline.install()
    try:
        row = run_arm(args.preset, args.arm, args.context, run_args, recompute=args.recompute,
                      tokens_per_step=args.tokens)
        print(f"{args.arm}: peak {row['peak_memory_gib']:.1f} GiB, {row['tokens_per_s']:,.0f} tokens/s")
    except torch.OutOfMemoryError as exc:
        print("out of memory:", str(exc).split("\n")[0][:300])
    step = timeline.steps[-2] if len(timeline.steps) > 1 else timeline.steps[-1]  # the last is the profiled one
    print(f"{args.arm}, {args.tokens} tokens, one step (GiB): mark | allocated | peak since the previous mark")
    for label, allocated, peak in step:
        print(f"  {label:34s} {allocated:7.2f} {peak:7.2f}")
    if torch.cuda.is_available():
        print(f"  {'step end (optimizer)':34s} {'':7s} {torch.cuda.max_memory_allocated() / 2**30:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
