"""A diverging run never saves or names weights whose health was not checked: with --lr 1e6 the
checkpoint after step N held the update step N's finite loss never saw (weights ~5e4, NaN logits),
and the divergence error called it "the last good checkpoint"; a resume from it was NaN at once."""

from __future__ import annotations

import math

import pytest

from tests.reliability.conftest import tiny_run
from train import checkpoint as ckpt


def test_divergence_names_a_checkpoint_that_resumes(tmp_path, capsys):
    from train.loop import train

    save = tmp_path / "run"
    train(tiny_run(save, train_iters=2, save_interval=1))
    with pytest.raises(FloatingPointError, match=r"last good checkpoint is .*iter_0000002") as stop:
        train(tiny_run(save, train_iters=10, save_interval=1, lr=1e6, min_lr=0.0, max_nonfinite_steps=2))
    assert "not saved, the updated weights give a non-finite loss" in capsys.readouterr().out
    assert ckpt.complete_steps(save) == [1, 2] and ckpt.latest_step(save) == 2
    assert "Lower the learning rate" in str(stop.value)

    # what is named resumes with a finite loss (the wrecked step-3 weights gave NaN at once)
    resumed = train(tiny_run(save, train_iters=4, save_interval=1))
    assert len(resumed) == 2 and all(math.isfinite(x) for x in resumed)


def test_the_check_does_not_change_training(tmp_path):
    """The health forward pass (eval mode, no gradients) leaves the run bitwise unchanged: saving
    every step gives the losses of saving only at the end."""
    from train.loop import train

    every = train(tiny_run(tmp_path / "a", train_iters=4, save_interval=1))
    once = train(tiny_run(tmp_path / "b", train_iters=4, save_interval=100))
    assert every == once


def test_divergence_is_one_line_with_exit_code_3(tmp_path, capfd):
    from launch.pretrain import main
    from tests.reliability.conftest import TINY

    code = main([*TINY, "--train-iters", "6", "--lr", "1e6", "--min-lr", "0", "--save", str(tmp_path / "run"),
                 "--set", "train.max_nonfinite_steps=2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("error: 2 consecutive steps with non-finite loss")
    assert "There is no checkpoint to resume from" in err[-1] and "Traceback" not in "\n".join(err)
