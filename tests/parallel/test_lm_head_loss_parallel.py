"""The chunked LM head loss (model/lm_head_loss.py) under tensor parallelism and in training runs.

TP=2 with and without sequence parallelism: per-token losses and every parameter's gradient shard
equal megatron's output layer + vocab-parallel cross entropy on the same ranks, for a chunk that
divides the 80 tokens and one that does not. Training: the loss curve with ``train.loss_chunk_tokens``
follows the single-process curve without it, on one process, at TP=2 (sequence parallelism, from
MoE) with megatron's distributed optimizer, at DP=2 with it (the weight's gradient must reach
megatron's DDP buffers and their data-parallel reduction), and at PP=2.
"""

import json
from pathlib import Path

import pytest

from tests.helpers.distributed import torchrun

HERE = Path(__file__).parent
TRAIN_TOLERANCE = 2e-4  # as test_parallel_training.py: summation order over 10 Adam steps


@pytest.mark.distributed
def test_tp2_chunked_head_matches_megatrons_output_layer(tmp_path):
    torchrun(HERE / "lm_head_worker.py", 2, tmp_path)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"lm_head_rank{rank}.json").read_text())
        for layout, chunks in result.items():
            for chunk, errors in chunks.items():
                assert errors["loss"] < 1e-5, (rank, layout, chunk, errors["loss"])
                bad = {n: e for n, e in errors["grads"].items() if not e < 1e-5}
                assert not bad, (rank, layout, chunk, bad)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunked_loss_training")
    torchrun(HERE / "train_worker.py", 1, "train", path, 1, 1, 1)
    return path


def curve(path: Path, name: str) -> list[float]:
    return json.loads((path / name).read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,tp,pp,zero,name", [
    (1, 1, 1, 0, "losses_tp1_ep1_pp1_chunk24_n1.json"),
    (2, 2, 1, 1, "losses_tp2_ep1_pp1_zero_chunk24_n2.json"),
    (2, 1, 1, 1, "losses_tp1_ep1_pp1_zero_chunk24_n2.json"),
    (2, 1, 2, 0, "losses_tp1_ep1_pp2_chunk24_n2.json"),
], ids=["single", "tp2-sp-zero", "dp2-zero", "pp2"])
def test_training_with_chunked_loss_follows_the_plain_curve(workdir, nproc, tp, pp, zero, name):
    """24-token chunks: not a divisor of the 128 tokens of a micro-batch. PP 2: the last stage's loss
    under megatron's 1F1B schedule."""
    torchrun(HERE / "train_worker.py", nproc, "train", workdir, tp, 1, pp, 1, zero, 24, timeout=600)
    reference, losses = curve(workdir, "losses_tp1_ep1_pp1_n1.json"), curve(workdir, name)
    assert len(losses) == len(reference) == 10
    assert reference[-1] < reference[0] - 0.3  # it trains
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < (1e-5 if nproc == 1 else TRAIN_TOLERANCE), diffs
