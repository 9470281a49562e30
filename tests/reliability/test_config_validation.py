"""Every numeric training setting is range-checked before anything runs, with a message naming the
flag (negative learning rates trained silently; --save-interval 0 ended in ZeroDivisionError)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from model.config import ConfigError
from train.config import TrainConfig, load_run_config


@pytest.mark.parametrize("field,value,flag", [
    ("lr", -1e-3, "--lr"),
    ("lr", 0.0, "--lr"),
    ("lr", math.nan, "--lr"),
    ("min_lr", -3e-3, "--min-lr"),
    ("save_interval", 0, "--save-interval"),
    ("log_interval", 0, "--log-interval"),
    ("eval_iters", 0, "--set train.eval_iters"),
    ("adam_beta2", 1.0, "--set train.adam_beta2"),
    ("adam_eps", 0.0, "--set train.adam_eps"),
    ("weight_decay", -0.1, "--set train.weight_decay"),
    ("clip_grad", -1.0, "--set train.clip_grad"),
    ("lr_decay_fraction", 1.5, "--set train.lr_decay_fraction"),
    ("seed", -1, "--seed"),
    ("keep_last", -1, "--set train.keep_last"),
    ("max_nonfinite_steps", 0, "--set train.max_nonfinite_steps"),
    ("gc_interval", -1, "--set train.gc_interval"),
    ("tensor_model_parallel_size", 0, "--tensor-model-parallel-size"),
    ("train_iters", 1.5, "--train-iters"),
    ("loss_chunk_tokens", -4096, "--loss-chunk-tokens"),
])
def test_bad_number_names_its_flag(field, value, flag):
    config = TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"^{flag}="):
        config.validate()


def test_every_numeric_field_has_a_range():
    """A new numeric field without a rule would go unchecked again."""
    from train.config import NUMBER_RULES

    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float")}
    assert numeric == set(NUMBER_RULES)
    TrainConfig().validate()  # the defaults pass


def test_min_lr_above_lr_and_bad_blend_weights():
    with pytest.raises(ConfigError, match="--min-lr=0.1 exceeds --lr"):
        TrainConfig(lr=1e-3, min_lr=0.1).validate()
    with pytest.raises(ConfigError, match="weight -1.0"):
        TrainConfig(data_prefixes=["a", "b"], data_weights=[1.0, -1.0]).validate()


def test_sequence_parallel_split_is_checked_up_front():
    """The tokens of a micro-batch must split over the TP ranks (MoE with TP > 1 turns on sequence
    parallelism); this was a bare ValueError in the first forward pass."""
    run = load_run_config("tiny")
    run.train.tensor_model_parallel_size = 2
    run.train.seq_length, run.train.micro_batch_size, run.train.global_batch_size = 33, 1, 2
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size=2.*--seq-length or --micro-batch-size"):
        run.validate(world_size=2)
    run.train.seq_length = 32
    run.validate(world_size=2)


@pytest.mark.parametrize("argv,message", [
    (["--min-lr=-3e-3"], "error: --min-lr=-0.003: must be >= 0"),
    (["--lr=-1e-3", "--set", "train.optimizer=muon"], "error: --lr=-0.001: must be positive"),
    (["--save-interval", "0"], "error: --save-interval=0: must be positive"),
    (["--loss-chunk-tokens", "-1"], "error: --loss-chunk-tokens=-1: must be >= 0 tokens (0 = off; e.g. 4096)"),
])
def test_pretrain_prints_one_line_and_exits_2(argv, message, capfd):
    from launch.pretrain import main
    from tests.reliability.conftest import TINY

    assert main([*TINY, *argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == message and "Traceback" not in "\n".join(err)
