"""Turn the JSON files of `kda_tune.py --only` runs into a `--launch` override string: per kernel
the fastest candidate that ran without error; for the sequential state passes (fwd_h, bwd_dh)
the fastest at the many-programs shape (8x4096) as the regular launch and at the few-programs
shape (1x32768) as the "few" entry.

  python benchmarks/kda_tune_pick.py /tmp/tune_*.json   ->  prints e.g. bwd_dh.num_warps=2,...
"""
import json
import sys

STATE_PASSES = {"fwd_h", "bwd_dh"}


def pick(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for name, found in json.load(f).items():
                rows.setdefault(name, []).extend(r for r in found if "error" not in r)
    items = []
    for name, found in sorted(rows.items()):
        if not found:
            continue
        plans = [("", "8x4096"), ("few.", "1x32768")] if name in STATE_PASSES else [("", "total")]
        for prefix, key in plans:
            best = min(found, key=lambda r: r[key] if r.get(key) is not None else float("inf"))
            items += [f"{name}.{prefix}{opt}={val}" for opt, val in best["cfg"].items()]
    return ",".join(items)


if __name__ == "__main__":
    print(pick(sys.argv[1:]))
