"""The comparison report: ``launch/compare.py report RUN_DIRS... [--out DIR]``.

Groups the runs by arm (their ``launch.json`` label, else the layer pattern) and writes next to
them (the folder that holds them all, or ``--out``):

- ``comparison.png``: validation loss vs tokens (mean over seeds, the band from the lowest to the
  highest seed), training loss vs tokens, tokens/s and peak memory per arm;
- ``comparison.md``: per arm the seeds, tokens, final validation loss +- the standard deviation
  over seeds, tokens/s and peak memory, then one line per run.

Runs without validation records (``metrics.jsonl`` lines with a validation loss, written with
``--eval-interval``) are compared on their training loss instead, and both files say so.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from launch.runs import Run, valid_loss
from model.config import ConfigError
from model.presets import ARMS

WARMUP_FRACTION = 0.1  # tokens/s leaves out the first 10% of the steps (start-up, compilation)


def read_runs(run_dirs, progress: bool = True) -> list[Run]:
    from tqdm.auto import tqdm

    runs = []
    for path in tqdm([Path(p) for p in run_dirs], desc="reading runs", unit="run", disable=not progress):
        if not (path / "metrics.jsonl").exists():
            raise ConfigError(f"{path}: no metrics.jsonl (not a run folder, or the run has not logged a step yet)")
        runs.append(Run.read(path))
    return runs


def by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.arm, []).append(run)
    order = [a for a in ARMS if a in groups] + sorted(a for a in groups if a not in ARMS)
    return {arm: sorted(groups[arm], key=lambda r: str(r.seed)) for arm in order}


def loss_series(run: Run, use_validation: bool) -> list[tuple[int, float, float]]:
    """(step, tokens, loss) of the validation records, or of the training steps."""
    records = run.valid_records() if use_validation else run.train_records()
    out = []
    for record in records:
        loss = valid_loss(record) if use_validation else float(record["loss"])
        tokens = run.tokens(record)
        out.append((int(record["step"]), tokens if tokens is not None else float(record["step"]), loss))
    return out


def mean_band(series: list[list[tuple[int, float, float]]]):
    """Over the steps every seed has: tokens, mean, lowest and highest loss."""
    common = set.intersection(*(set(s for s, _, _ in one) for one in series)) if series else set()
    tokens = {s: t for s, t, _ in series[0]} if series else {}
    xs, mean, low, high = [], [], [], []
    for step in sorted(common):
        values = [dict((s, v) for s, _, v in one)[step] for one in series]
        xs.append(tokens[step])
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
    return xs, mean, low, high


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (training loss is noisy step to step)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def tokens_per_second(run: Run) -> float | None:
    rates = [float(r["tokens_per_s"]) for r in run.train_records() if isinstance(r.get("tokens_per_s"), (int, float))]
    if not rates:
        return None
    rates = rates[int(len(rates) * WARMUP_FRACTION):] or rates
    return statistics.median(rates)


def peak_memory(run: Run) -> tuple[float | None, str]:
    """Peak GiB over the run: CUDA's peak allocated on GPUs, else the process's peak RSS."""
    for key, label in (("memory/peak_allocated_gib", "GPU"), ("memory/peak_rss_gib", "RSS")):
        values = [float(r[key]) for r in run.metrics if isinstance(r.get(key), (int, float))]
        if values:
            return max(values), label
    return None, ""


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return sum(values) / len(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(groups: dict[str, list[Run]], use_validation: bool) -> list[dict]:
    rows = []
    for arm, runs in groups.items():
        finals = [s[-1][2] for s in (loss_series(r, use_validation) for r in runs) if s]
        final_tokens = [s[-1][1] for s in (loss_series(r, use_validation) for r in runs) if s]
        rates = [v for v in (tokens_per_second(r) for r in runs) if v is not None]
        memories = [peak_memory(r) for r in runs]
        memory_values = [m for m, _ in memories if m is not None]
        mean, std = _mean_std(finals)
        rows.append({
            "arm": arm, "seeds": len(runs), "tokens": max(final_tokens) if final_tokens else None,
            "final_loss": mean, "final_loss_std": std,
            "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "peak_memory_gib": max(memory_values) if memory_values else None,
            "memory_kind": next((k for m, k in memories if m is not None), ""),
        })
    return rows


def markdown(rows: list[dict], groups: dict[str, list[Run]], use_validation: bool) -> str:
    metric = "validation loss" if use_validation else "training loss"
    lines = ["# Comparison of arms", ""]
    if not use_validation:
        lines += ["Note: not every run has validation records (train with `--eval-interval N`); the arms are "
                  "compared on their final training loss.", ""]
    lines += [f"| arm | seeds | tokens | final {metric} | tokens/s | peak memory (GiB) |",
              "| --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if r["final_loss"] is None:
            loss = "-"
        elif r["final_loss_std"] is None:
            loss = f"{r['final_loss']:.4f} (1 seed)"
        else:
            loss = f"{r['final_loss']:.4f} ± {r['final_loss_std']:.4f}"
        tokens = f"{r['tokens']:,.0f}" if r["tokens"] is not None else "-"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.2f} ({r['memory_kind']})" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['seeds']} | {tokens} | {loss} | {rate} | {memory} |")
    lines += ["", f"± is the standard deviation of the final {metric} over seeds. tokens/s: median over the steps "
              f"after the first {WARMUP_FRACTION:.0%}, mean over seeds. Peak memory: the largest over the runs "
              "(GPU: peak allocated; RSS: the process's peak resident memory on CPU runs).", "", "Runs:", ""]
    for arm, runs in groups.items():
        for run in runs:
            series = loss_series(run, use_validation)
            last = f"{metric} {series[-1][2]:.4f} at step {series[-1][0]}" if series else "no records"
            lines.append(f"- `{run.path}`: {arm}, seed {run.seed}, {last}")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], groups: dict[str, list[Run]], use_validation: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0, 0]
    for i, (arm, runs) in enumerate(groups.items()):
        xs, mean, low, high = mean_band([loss_series(r, use_validation) for r in runs])
        if not xs:
            continue
        if not use_validation:
            mean, low, high = (smooth(v, max(1, len(v) // 50)) for v in (mean, low, high))
        ax.plot(xs, mean, color=colors[i % len(colors)], label=f"{arm} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            ax.fill_between(xs, low, high, color=colors[i % len(colors)], alpha=0.2)
    ax.set_title("validation loss (band: lowest to highest seed)" if use_validation
                 else "training loss, smoothed (no validation records)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    for i, (arm, runs) in enumerate(groups.items()):
        xs, mean, _, _ = mean_band([loss_series(r, False) for r in runs])
        if xs:
            ax.plot(xs, smooth(mean, max(1, len(mean) // 50)), color=colors[i % len(colors)], label=arm)
    ax.set_title("training loss (mean over seeds, smoothed)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)

    arms = [r["arm"] for r in rows]
    bar_colors = [colors[i % len(colors)] for i in range(len(arms))]
    ax = axes[1, 0]
    values = [r["tokens_per_s"] or 0.0 for r in rows]
    ax.bar(arms, values, color=bar_colors)
    for x, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom")
    ax.set_title("throughput (median tokens/s, mean over seeds)")
    ax.set_ylabel("tokens/s")

    ax = axes[1, 1]
    values = [r["peak_memory_gib"] or 0.0 for r in rows]
    ax.bar(arms, values, color=bar_colors)
    for x, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom")
    kind = next((r["memory_kind"] for r in rows if r["memory_kind"]), "")
    ax.set_title(f"peak memory ({'GPU peak allocated' if kind == 'GPU' else 'peak RSS' if kind else 'none recorded'})")
    ax.set_ylabel("GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dirs, out: str | Path | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Write comparison.png and comparison.md; returns their paths."""
    if not run_dirs:
        raise ConfigError("report: give at least one run folder")
    runs = read_runs(run_dirs, progress)
    if not any(r.train_records() for r in runs):
        raise ConfigError("report: none of the runs has a training step in metrics.jsonl yet")
    groups = by_arm(runs)
    use_validation = all(r.valid_records() for r in runs)
    rows = summarize(groups, use_validation)
    folder = Path(out) if out else Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))
    folder.mkdir(parents=True, exist_ok=True)
    png, md = folder / "comparison.png", folder / "comparison.md"
    plot(png, rows, groups, use_validation)
    md.write_text(markdown(rows, groups, use_validation))
    print(md.read_text())
    print(f"wrote {png} and {md}")
    return png, md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/compare.py report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", help="folder for comparison.png/.md (default: the folder holding the runs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    write_report(args.run_dirs, args.out, progress=not args.no_progress)
    return 0
