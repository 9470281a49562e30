"""What a run folder holds, read without torch: the training and validation records of
``metrics.jsonl``, the launch record (``launch.json``: which sweep entry, arm and seed), the SLURM
events (``slurm.jsonl``: starts, stop signals, ends, rendezvous ports) and the run config saved
with the newest checkpoint. Used by ``launch/sweep.py summary`` and ``launch/compare.py report``.

Validation records are the lines of ``metrics.jsonl`` with a validation loss; they carry the step
and, where the trainer writes it, the tokens consumed so far (docs/launch.md, "Run folders").
Long-document validation records (``--eval-long-min-length``) are those with ``valid_long/loss``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# the keys the training loop writes (train/loop.py, train/metrics.py)
VALID_LOSS_KEY = "valid/loss"
LONG_LOSS_KEY = "valid_long/loss"  # the loss on validation documents of at least
LONG_MIN_LENGTH_KEY = "valid_long/min_length"  # this many tokens
TOKENS_KEY = "consumed_tokens"
LAUNCH = "launch.json"
EVENTS = "slurm.jsonl"
METRICS = "metrics.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def valid_loss(record: dict, key: str = VALID_LOSS_KEY) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def newest_meta(run_dir: str | Path) -> dict:
    """``meta.json`` of the newest checkpoint folder (the run config), or {} when there is none."""
    candidates = sorted(p for p in Path(run_dir).glob("iter_*/meta.json") if p.parent.name[5:].isdigit())
    for path in reversed(candidates):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return {}


@dataclass
class Run:
    """One run folder, read once."""

    path: Path
    launch: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir: str | Path) -> "Run":
        path = Path(run_dir)
        launch = {}
        if (path / LAUNCH).exists():
            try:
                launch = json.loads((path / LAUNCH).read_text())
            except json.JSONDecodeError:
                launch = {}
        return cls(path=path, launch=launch, events=read_jsonl(path / EVENTS),
                   metrics=read_jsonl(path / METRICS), meta=newest_meta(path))

    # --- identity
    @property
    def labels(self) -> dict:
        return dict(self.launch.get("labels", {}))

    @property
    def name(self) -> str:
        return self.launch.get("name") or self.path.name

    @property
    def arm(self) -> str:
        """The comparison arm: the launch label, else the layer pattern, else the folder name."""
        if "arm" in self.labels:
            return str(self.labels["arm"])
        pattern = self.meta.get("model", {}).get("layer_pattern")
        return f"pattern {pattern}" if pattern else self.path.name

    @property
    def seed(self):
        if "seed" in self.labels:
            return self.labels["seed"]
        return self.meta.get("train", {}).get("seed")

    @property
    def tokens_per_step(self) -> int | None:
        if self.launch.get("tokens_per_step"):
            return int(self.launch["tokens_per_step"])
        train = self.meta.get("train", {})
        if train.get("global_batch_size") and train.get("seq_length"):
            return int(train["global_batch_size"]) * int(train["seq_length"])
        return None

    @property
    def train_iters(self) -> int | None:
        value = self.launch.get("train_iters") or self.meta.get("train", {}).get("train_iters")
        return int(value) if value else None

    # --- records
    def train_records(self) -> list[dict]:
        """Training-step records (with a loss), the last one kept per step: a resumed run may have
        written the steps after its checkpoint twice."""
        by_step = {}
        for record in self.metrics:
            if isinstance(record.get("loss"), (int, float)) and "step" in record:
                by_step[int(record["step"])] = record
        return [by_step[s] for s in sorted(by_step)]

    def valid_records(self, key: str = VALID_LOSS_KEY) -> list[dict]:
        """Records with a loss under ``key`` (the validation loss, or ``LONG_LOSS_KEY``), the last one
        kept per step."""
        by_step = {}
        for record in self.metrics:
            if valid_loss(record, key) is not None and "step" in record:
                by_step[int(record["step"])] = record
        return [by_step[s] for s in sorted(by_step)]

    def tokens(self, record: dict) -> float | None:
        """Tokens consumed at a record: its own count where written, else step x tokens per step."""
        if isinstance(record.get(TOKENS_KEY), (int, float)):
            return float(record[TOKENS_KEY])
        per_step = self.tokens_per_step
        return float(record["step"]) * per_step if per_step and "step" in record else None

    def last_step(self) -> int | None:
        records = self.train_records()
        return int(records[-1]["step"]) if records else None

    def last_loss(self) -> float | None:
        records = self.train_records()
        return float(records[-1]["loss"]) if records else None

    # --- SLURM events
    def starts(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "start"]

    def ports(self) -> list[int]:
        return [int(e["port"]) for e in self.starts() if "port" in e]

    def end_state(self) -> str:
        """The state the job scripts recorded last: COMPLETED (every step done), STOPPED (exit 0
        before the last step: a stop signal), REQUEUED, FAILED(exit code), RUNNING? (started and
        no end recorded: running, or killed without a chance to record it) or NOT STARTED."""
        if not self.events:
            return "NOT STARTED"
        last = self.events[-1]
        kind = last.get("event")
        if kind == "requeue_failed":
            return "STOPPED"
        if kind != "end":
            return "RUNNING?"
        if last.get("requeue"):
            return "REQUEUED"
        if last.get("exit_code") != 0:
            return f"FAILED({last.get('exit_code')})"
        finished = self.train_iters is None or (self.last_step() or 0) >= self.train_iters
        return "COMPLETED" if finished and not last.get("stop_signal") else "STOPPED"
