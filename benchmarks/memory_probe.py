"""Which lines of the stack hold GPU memory when a training step runs out of it.

Runs training steps of one arm (the same path as benchmarks/train_throughput.py) with the CUDA
allocator's history recording on; on out-of-memory, or at the end, takes an allocator snapshot and
prints the live memory grouped by the innermost stack frame inside this repository.

    python benchmarks/memory_probe.py --arm kimi-linear --context 4096 --tokens 32768 --recompute \\
        --data-path .gbdata/tokens_00000 --vocab-size 32768
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def live_memory_by_frame(snapshot: dict, top: int = 20) -> list[tuple[float, str]]:
    """GiB of allocated blocks per innermost frame in this repository (else the innermost frame)."""
    sizes: dict[str, int] = defaultdict(int)
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            sizes[_frame_key(block.get("frames") or [])] += block["size"]
    return sorted(((size / 2**30, key) for key, size in sizes.items()), reverse=True)[:top]


def live_at_peak(snapshot: dict, top: int = 20) -> tuple[float, list[tuple[float, str]]]:
    """Replays the allocator's recorded events: the peak of allocated bytes and, at that moment,
    the GiB held per innermost repository frame. Recording starts before the model is built, so
    parameters and optimizer state are in the trace (unless over max_entries events push them out)."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace
              if e["action"] in ("alloc", "free_completed")]

    def replay(stop: int):
        live: dict[int, int] = {}
        total = best = best_at = 0
        for index, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = index
                total += event["size"]
                if total > best:
                    best, best_at = total, index + 1
            elif event["addr"] in live:
                total -= events[live.pop(event["addr"])]["size"]
        return best, best_at, live

    best, best_at, _ = replay(len(events))  # two passes: find the peak, then who held it
    _, _, live = replay(best_at)
    best_live = {addr: (events[i]["size"], _frame_key(events[i].get("frames") or [])) for addr, i in live.items()}
    sizes: dict[str, int] = defaultdict(int)
    for size, key in best_live.values():
        sizes[key] += size
    return best / 2**30, sorted(((size / 2**30, key) for key, size in sizes.items()), reverse=True)[:top]


def _frame_key(frames: list[dict]) -> str:
    ours = [f for f in frames if str(ROOT) in f["filename"] and "site-packages" not in f["filename"]]
    frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"


def main() -> int:
    import torch

    from train_throughput import run_arm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaling-653m")
    parser.add_argument("--arm", default="kimi-linear")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--data-path", nargs="*", default=None)
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    args = parser.parse_args()
    run_args = argparse.Namespace(steps=1, bf16=True, optimizer="adamw", vocab_size=args.vocab_size,
                                  data_path=args.data_path, data_cache_dir=args.data_cache_dir, tokens_per_step=args.tokens)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    at_oom = {}
    try:
        row = run_arm(args.preset, args.arm, args.context, run_args, recompute=args.recompute, tokens_per_step=args.tokens)
        print(f"ran: peak {row['peak_memory_gib']:.1f} GiB, {row['tokens_per_s']:,.0f} tokens/s")
    except torch.OutOfMemoryError as exc:
        print("out of memory:", str(exc).split("\n")[0][:300])
        # the traceback still holds the failing frames, so their tensors are alive here
        at_oom = dict(snapshot=torch.cuda.memory._snapshot(), allocated=torch.cuda.memory_allocated())
    snapshot = at_oom.get("snapshot") or torch.cuda.memory._snapshot()
    allocated = at_oom.get("allocated", torch.cuda.memory_allocated())
    print(f"live {'at the out-of-memory' if at_oom else 'at the end'}: {allocated / 2**30:.1f} GiB; "
          f"by innermost frame in the repo:")
    for gib, key in live_memory_by_frame(snapshot):
        print(f"  {gib:8.2f} GiB  {key}")
    peak, held = live_at_peak(snapshot)
    print(f"peak of the recorded allocations (after the model was built): {peak:.1f} GiB; held then by:")
    for gib, key in held:
        print(f"  {gib:8.2f} GiB  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
