"""Learning-rate schedules: linear warmup, then WSD (warmup-stable-decay, the paper's), cosine or
constant. A pure function of the step, so resuming needs nothing but the step."""

from __future__ import annotations

import math


def learning_rate(step: int, *, peak: float, minimum: float, warmup: int, total: int,
                  schedule: str = "wsd", decay_fraction: float = 0.2) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(total * decay_fraction)), 1)
        decay_start = total - decay_steps
        if step < decay_start:
            return peak
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return peak + (minimum - peak) * progress  # linear decay to the minimum
    raise ValueError(f"unknown lr schedule {schedule!r}: use wsd, cosine or constant")
