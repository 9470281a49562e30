"""The comparison report: ``launch/compare.py report RUN_DIRS... [--out DIR]``.

Groups the runs by arm (their ``launch.json`` label, else the layer pattern) and writes next to
them (the folder that holds them all, or ``--out``):

- ``comparison.png``: validation loss vs tokens (mean over seeds, the band from the lowest to the
  highest seed), training loss vs tokens, tokens/s and peak memory per arm;
- ``comparison.md``: per arm the seeds, tokens, final validation loss +- the standard deviation
  over seeds, tokens/s and peak memory, then one line per run.

Runs without validation records (``metrics.jsonl`` lines with a validation loss, written with
``--eval-interval``) are compared on their training loss instead, and both files say so. Where runs
have long-document validation records (``valid_long/loss``, written with ``--eval-long-min-length``
or ``launch/compare.py --eval-long``), both files also show the loss on long documents per arm.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from launch.runs import LONG_LOSS_KEY, LONG_MIN_LENGTH_KEY, VALID_LOSS_KEY, Run, valid_loss
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


def loss_series(run: Run, use_validation: bool, key: str = VALID_LOSS_KEY) -> list[tuple[int, float, float]]:
    """(step, tokens, loss) of the validation records (the loss under ``key``), or of the training steps."""
    records = run.valid_records(key) if use_validation else run.train_records()
    out = []
    for record in records:
        loss = valid_loss(record, key) if use_validation else float(record["loss"])
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


def long_min_lengths(runs: list[Run]) -> list[int]:
    """The document-length thresholds of the runs' long-document validation records (one when the
    runs agree; 0 where a record does not say); [] when no run has such records."""
    lengths = set()
    for run in runs:
        for record in run.valid_records(LONG_LOSS_KEY):
            value = record.get(LONG_MIN_LENGTH_KEY)
            lengths.add(int(value) if isinstance(value, (int, float)) else 0)
    return sorted(lengths)


def summarize(groups: dict[str, list[Run]], use_validation: bool) -> list[dict]:
    rows = []
    for arm, runs in groups.items():
        long_finals = [s[-1][2] for s in (loss_series(r, True, LONG_LOSS_KEY) for r in runs) if s]
        long_mean, long_std = _mean_std(long_finals)
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
            "final_long_loss": long_mean, "final_long_loss_std": long_std,
        })
    return rows


def _mean_and_spread(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} (1 seed)" if std is None else f"{mean:.4f} ± {std:.4f}"


def long_label(lengths: list[int]) -> str:
    """What the long-document column is called: its threshold, or the thresholds when runs differ."""
    if lengths == [0]:
        return "long-document loss"
    return f"long-document loss (≥ {' / '.join(f'{n:,}' for n in lengths)} tokens)"


def markdown(rows: list[dict], groups: dict[str, list[Run]], use_validation: bool,
             long_lengths: list[int] = ()) -> str:
    metric = "validation loss" if use_validation else "training loss"
    lines = ["# Comparison of arms", ""]
    if not use_validation:
        lines += ["Note: not every run has validation records (train with `--eval-interval N`); the arms are "
                  "compared on their final training loss.", ""]
    if len(long_lengths) > 1:
        lines += [f"Note: the runs' long-document thresholds differ ({', '.join(map(str, long_lengths))} tokens); "
                  "their long-document losses are not comparable.", ""]
    long_header = f" final {long_label(list(long_lengths))} |" if long_lengths else ""
    lines += [f"| arm | seeds | tokens | final {metric} |{long_header} tokens/s | peak memory (GiB) |",
              "| --- | ---: | ---: | --- |" + (" --- |" if long_lengths else "") + " ---: | ---: |"]
    for r in rows:
        loss = _mean_and_spread(r["final_loss"], r["final_loss_std"])
        long_loss = (f" {_mean_and_spread(r['final_long_loss'], r['final_long_loss_std'])} |"
                     if long_lengths else "")
        tokens = f"{r['tokens']:,.0f}" if r["tokens"] is not None else "-"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.2f} ({r['memory_kind']})" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['seeds']} | {tokens} | {loss} |{long_loss} {rate} | {memory} |")
    lines += ["", f"± is the standard deviation of the final {metric} over seeds"
              + (" (and of the final long-document loss: the loss on whole validation documents of at least "
                 "that many tokens, docs/training.md)" if long_lengths else "")
              + f". tokens/s: median over the steps after the first {WARMUP_FRACTION:.0%}, mean over seeds. Peak "
              "memory: the largest over the runs (GPU: peak allocated; RSS: the process's peak resident memory on "
              "CPU runs).", "", "Runs:", ""]
    for arm, runs in groups.items():
        for run in runs:
            series = loss_series(run, use_validation)
            last = f"{metric} {series[-1][2]:.4f} at step {series[-1][0]}" if series else "no records"
            long_series = loss_series(run, True, LONG_LOSS_KEY) if long_lengths else []
            if long_series:
                last += f", long-document loss {long_series[-1][2]:.4f} at step {long_series[-1][0]}"
            lines.append(f"- `{run.path}`: {arm}, seed {run.seed}, {last}")
    return "\n".join(lines) + "\n"


def _loss_panel(ax, groups: dict[str, list[Run]], colors, use_validation: bool, key: str = VALID_LOSS_KEY) -> None:
    """Loss vs tokens per arm: the mean over seeds and the band from the lowest to the highest."""
    for i, (arm, runs) in enumerate(groups.items()):
        series = [s for s in (loss_series(r, use_validation, key) for r in runs) if s]
        xs, mean, low, high = mean_band(series)
        if not xs:
            continue
        if not use_validation:
            mean, low, high = (smooth(v, max(1, len(v) // 50)) for v in (mean, low, high))
        ax.plot(xs, mean, color=colors[i % len(colors)],
                label=f"{arm} ({len(series)} seed{'s' * (len(series) > 1)})")
        if len(series) > 1:
            ax.fill_between(xs, low, high, color=colors[i % len(colors)], alpha=0.2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)


def plot(path: Path, rows: list[dict], groups: dict[str, list[Run]], use_validation: bool,
         long_lengths: list[int] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # with long-document records a third column: their loss above, nothing below
    fig, axes = plt.subplots(2, 3 if long_lengths else 2, figsize=(19 if long_lengths else 13, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0, 0]
    _loss_panel(ax, groups, colors, use_validation)
    ax.set_title("validation loss (band: lowest to highest seed)" if use_validation
                 else "training loss, smoothed (no validation records)")
    if long_lengths:
        _loss_panel(axes[0, 2], groups, colors, True, LONG_LOSS_KEY)
        axes[0, 2].set_title(f"validation: {long_label(list(long_lengths))}")
        axes[1, 2].axis("off")

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
    long_lengths = long_min_lengths(runs)
    rows = summarize(groups, use_validation)
    folder = Path(out) if out else Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))
    folder.mkdir(parents=True, exist_ok=True)
    png, md = folder / "comparison.png", folder / "comparison.md"
    plot(png, rows, groups, use_validation, long_lengths)
    md.write_text(markdown(rows, groups, use_validation, long_lengths))
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
