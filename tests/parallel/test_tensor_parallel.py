"""TP=2 (two gloo ranks) forward and gradients equal TP=1 for a model with every layer kind.

The TP=2 model loads the TP=1 model's checkpoint (megatron reshards it), so both hold the same
weights; gradients come back through a sharded checkpoint into a TP=1 model for the comparison.
"""

from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import torchrun

WORKER = Path(__file__).with_name("tp_worker.py")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_tp2_matches_tp1(tmp_path, variant):
    """moe: TP=2 with sequence parallelism (megatron's MoE requires it); dense: plain TP=2."""
    torchrun(WORKER, 1, "reference", tmp_path, variant)
    torchrun(WORKER, 2, "tp", tmp_path, variant)
    torchrun(WORKER, 1, "compare", tmp_path, variant)
    reference = torch.load(tmp_path / "reference.pt")
    tp = torch.load(tmp_path / "tp.pt")
    assert rel(tp["logits"], reference["logits"]) < 1e-5
    assert abs(float(tp["loss"]) - float(reference["loss"])) < 1e-5
    # replicated parameters must receive the complete gradient on every TP rank
    bad_replicas = {k: v for k, v in tp["replica_mismatch"].items() if v > 1e-6}
    assert not bad_replicas, bad_replicas
    import json

    errors = json.loads((tmp_path / "compare.json").read_text())
    assert len(errors) == len(reference["grads"])
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad
