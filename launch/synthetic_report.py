"""Summaries and plots of synthetic-task runs (launch/synthetic.py), beside the paper's numbers.

A run folder holds ``synthetic.json`` (task, arm, length, LR, ...) and ``metrics.jsonl`` with the
held-out accuracy records the run logged (``synthetic/token_accuracy``, ``synthetic/sequence_accuracy``).
Per task, arm and length the best LR is the one with the highest peak held-out token accuracy (the
paper reports its best LR too).
"""

from __future__ import annotations

import json
from pathlib import Path

TOKEN = "synthetic/token_accuracy"
SEQUENCE = "synthetic/sequence_accuracy"
SOLVED = 0.99  # "reached ~100%": held-out token accuracy at or above this
LENGTHS = (256, 512, 1024, 2048)
ARM_NAMES = {"K": "KDA", "G": "GDN", "A": "MLA"}

# Kimi Linear tech report, Fig. 4, read off the vector figure (approximate, accuracy in %): peak
# accuracy per training length, and points of the convergence curves at length 1024 (step, %).
PAPER_PEAK = {
    "palindrome": {"KDA": (100, 100, 100, 43), "GDN": (100, 100, 97, 38), "Mamba2": (100, 0, 0, 0)},
    "mqar": {"KDA": (100, 100, 100, 48), "GDN": (100, 100, 79, 30), "Mamba2": (98, 0, 0, 0)},
    "stack": {"KDA": (100, 100, 100, 100), "GDN": (100, 100, 100, 100), "Mamba2": (100, 100, 0, 0)},
}
PAPER_CONVERGENCE = {
    "palindrome": {"KDA": [(4000, 95), (6000, 100)], "GDN": [(8000, 30), (16000, 100)]},
    "mqar": {"KDA": [(2000, 94), (5000, 100)], "GDN": [(20000, 79)]},
    "stack": {"KDA": [(2000, 59), (4000, 100)], "GDN": [(4000, 63), (8000, 100)]},
}
PAPER_STEPS_TO_SOLVE = {  # at length 1024
    "palindrome": {"KDA": "~6k", "GDN": "~16k", "Mamba2": "never"},
    "mqar": {"KDA": "~4-6k", "GDN": "not in 20k", "Mamba2": "never"},
    "stack": {"KDA": "~4k", "GDN": "~8k", "Mamba2": "never"},
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The accuracy records of a run, one per step (the last one written wins: a resumed run
    repeats the steps after its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if TOKEN in record:
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def summarize(run_dir: str | Path) -> dict:
    """Settings of a run and its accuracy: peak (token and sequence), last, first step at >= 99%."""
    run_dir = Path(run_dir)
    settings = json.loads((run_dir / "synthetic.json").read_text())
    records = read_metrics(run_dir)
    curve = [(r["step"], r[TOKEN], r.get(SEQUENCE)) for r in records]
    solved = next((step for step, acc, _ in curve if acc >= SOLVED), None)
    return {
        **settings,
        "run_dir": str(run_dir),
        "curve": curve,
        "peak_token_accuracy": max((acc for _, acc, _ in curve), default=None),
        "peak_sequence_accuracy": max((seq for _, _, seq in curve if seq is not None), default=None),
        "last_step": curve[-1][0] if curve else 0,
        "steps_to_solve": solved,
    }


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths`` and below them (any folder with a synthetic.json)."""
    found = []
    for path in map(Path, paths):
        if (path / "synthetic.json").exists():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("synthetic.json")))
    return sorted(set(found))


def best_runs(summaries: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Per (task, arm, length): the run with the highest peak token accuracy, ties to the one that
    got there first."""
    best: dict[tuple[str, str, int], dict] = {}
    for s in summaries:
        if s["peak_token_accuracy"] is None:
            continue
        key = (s["task"]["name"], s["arm"], int(s["length"]))
        first_at_peak = next(step for step, acc, _ in s["curve"] if acc == s["peak_token_accuracy"])
        rank = (s["peak_token_accuracy"], -first_at_peak)
        if key not in best or rank > best[key]["_rank"]:
            best[key] = {**s, "_rank": rank}
    return best


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(best: dict, tasks: list[str]) -> str:
    """Peak held-out token accuracy per length, ours beside the paper's, and steps to >= 99% at 1024."""
    lines = []
    for task in tasks:
        lines += [f"### {task}", "",
                  "| model | " + " | ".join(f"L={n} ours / paper" for n in LENGTHS)
                  + " | steps to 99% at 1024: ours / paper | best LR per length |",
                  "| --- | " + " | ".join("---" for _ in LENGTHS) + " | --- | --- |"]
        arms = sorted({arm for (t, arm, _) in best if t == task}, key="KGA".index)
        paper_only = [name for name in PAPER_PEAK.get(task, {}) if name not in {ARM_NAMES[a] for a in arms}]
        for arm in arms:
            name = ARM_NAMES[arm]
            paper = PAPER_PEAK.get(task, {}).get(name)
            cells, lrs = [], []
            for i, length in enumerate(LENGTHS):
                run = best.get((task, arm, length))
                ours = _percent(run["peak_token_accuracy"]) if run else "-"
                cells.append(f"{ours} / {paper[i] if paper else '-'}")
                lrs.append(f"{run['lr']:g}" if run else "-")
            at_1024 = best.get((task, arm, 1024))
            steps = "-" if not at_1024 else (str(at_1024["steps_to_solve"]) if at_1024["steps_to_solve"]
                                              else f"not in {at_1024['last_step']}")
            paper_steps = PAPER_STEPS_TO_SOLVE.get(task, {}).get(name, "-")
            lines.append(f"| {name} (ours) | " + " | ".join(cells) + f" | {steps} / {paper_steps} | {', '.join(lrs)} |")
        for name in paper_only:
            cells = [f"- / {v}" for v in PAPER_PEAK[task][name]]
            lines.append(f"| {name} (paper only) | " + " | ".join(cells)
                         + f" | - / {PAPER_STEPS_TO_SOLVE[task][name]} | - |")
        lines.append("")
    lines.append(f"Ours: peak held-out token accuracy (%) over the run at the best LR; paper: Fig. 4 of the tech "
                 f"report, read off the figure (approximate). Steps to 99%: first evaluation at or above "
                 f"{100 * SOLVED:.0f}% held-out token accuracy.")
    return "\n".join(lines) + "\n"


def plot(best: dict, tasks: list[str], out_dir: Path) -> list[Path]:
    """peak_accuracy.png (peak vs length per task) and convergence_L1024.png (accuracy vs step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"KDA": "tab:red", "GDN": "tab:blue", "MLA": "tab:green", "Mamba2": "tab:gray"}
    written = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, values in PAPER_PEAK.get(task, {}).items():
            ax.plot(LENGTHS, values, "--", marker="x", color=colors[name], alpha=0.5, label=f"{name} (paper)")
        for arm in "KGA":
            points = [(n, 100 * best[(task, arm, n)]["peak_token_accuracy"]) for n in LENGTHS if (task, arm, n) in best]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "-", marker="o", color=colors[ARM_NAMES[arm]], label=f"{ARM_NAMES[arm]} (ours)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        ax.set(title=task, xlabel="training length", ylabel="peak accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    written.append(out_dir / "peak_accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, points in PAPER_CONVERGENCE.get(task, {}).items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, "x", markersize=9, color=colors[name], alpha=0.6, label=f"{name} (paper)")
        for arm in "KGA":
            run = best.get((task, arm, 1024))
            if run:
                xs = [step for step, _, _ in run["curve"]]
                ys = [100 * acc for _, acc, _ in run["curve"]]
                ax.plot(xs, ys, "-", color=colors[ARM_NAMES[arm]], label=f"{ARM_NAMES[arm]} (ours, lr {run['lr']:g})")
        ax.set(title=f"{task}, length 1024", xlabel="step", ylabel="held-out accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out_dir / "convergence_L1024.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def report(paths: list[str], out: str | None = None) -> Path:
    """Write synthetic_report.md and the two PNGs for the runs under ``paths``; returns the folder."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no synthetic runs (folders with synthetic.json) under {paths}")
    summaries = [summarize(run) for run in runs]
    best = best_runs(summaries)
    order = ["palindrome", "mqar", "stack"]
    tasks = sorted({task for task, _, _ in best}, key=lambda t: order.index(t) if t in order else len(order))
    if not tasks:
        raise FileNotFoundError(f"none of the {len(runs)} runs under {paths} has logged an accuracy yet")
    out_dir = Path(out) if out else Path(_common_parent(runs))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(best, tasks, out_dir)
    text = f"# Synthetic tasks: {len(runs)} runs\n\n" + markdown(best, tasks)
    (out_dir / "synthetic_report.md").write_text(text)
    return out_dir


def _common_parent(runs: list[Path]) -> Path:
    parents = [run.resolve().parent for run in runs]
    common = parents[0]
    while not all(common in p.parents or common == p for p in parents):
        common = common.parent
    return common
