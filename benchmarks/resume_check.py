"""How exactly does a resumed run reproduce a straight one on this device?

Trains the ``tiny`` preset N steps straight, then N/2 + resume + N/2 in a second run folder, and
prints both loss curves and the largest difference. On CPU the two are bitwise equal (a CI test
asserts it); on a GPU, atomics in the MoE token scatter and in cuBLAS split-K reductions make even
two straight runs differ, so this script also repeats the straight run to show the noise floor
that the resume difference should be compared with.

    python benchmarks/resume_check.py --steps 20 --bf16 [--optimizer muon] [--out $OUT/resume.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(save: str, steps: int, args, exit_interval: int = 0) -> list[float]:
    from train.config import load_run_config
    from train.loop import train

    cfg = load_run_config("tiny")
    t = cfg.train
    t.train_iters, t.save, t.exit_interval = steps, save, exit_interval
    t.bf16, t.optimizer, t.log_interval = args.bf16, args.optimizer, 10**9
    t.data_cache_dir = args.data_cache_dir
    return train(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--data-cache-dir", default=str(ROOT / "cache" / "data"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    half = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        straight = run(f"{tmp}/a", args.steps, args)
        repeat = run(f"{tmp}/b", args.steps, args)
        first = run(f"{tmp}/c", args.steps, args, exit_interval=half)
        resumed = first + run(f"{tmp}/c", args.steps, args)
    diff = lambda x, y: max(abs(a - b) for a, b in zip(x, y, strict=True))  # noqa: E731
    result = dict(steps=args.steps, bf16=args.bf16, optimizer=args.optimizer, straight=straight, repeat=repeat,
                  resumed=resumed, max_abs_diff_repeat=diff(straight, repeat),
                  max_abs_diff_resume=diff(straight, resumed),
                  bitwise_resume=straight == resumed)
    print(f"{'step':>4} {'straight':>10} {'repeat':>10} {'resumed':>10}")
    for i, (a, b, c) in enumerate(zip(straight, repeat, resumed, strict=True), 1):
        print(f"{i:4d} {a:10.6f} {b:10.6f} {c:10.6f}" + ("   <- resumed here" if i == half + 1 else ""))
    print({k: v for k, v in result.items() if not isinstance(v, list)})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
