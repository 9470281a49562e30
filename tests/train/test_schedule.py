"""Learning-rate schedules: warmup, WSD (stable then linear decay) and cosine."""

import math

import pytest

from train.schedule import learning_rate


def lrs(schedule, total=100, warmup=10, decay_fraction=0.2):
    return [learning_rate(s, peak=1.0, minimum=0.1, warmup=warmup, total=total, schedule=schedule,
                          decay_fraction=decay_fraction) for s in range(total)]


def test_warmup_is_linear_to_the_peak():
    values = lrs("wsd")
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_wsd_is_flat_then_decays_to_the_minimum():
    values = lrs("wsd")
    assert all(v == 1.0 for v in values[10:80])
    decay = values[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)


def test_cosine_reaches_the_minimum_at_the_end():
    values = lrs("cosine")
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert values[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learning_rate(0, peak=1, minimum=0, warmup=0, total=1, schedule="linear")
