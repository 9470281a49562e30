"""DP, TP(+SP), EP, PP and 4-rank combinations reproduce the single-process loss curve.

Every layout builds its model from the seed, with no shared checkpoint (initialisation is
layout-invariant: model/init.py), and sees the same global batches (the loader's order does not
depend on the DP size). fp32 on CPU: differences are summation-order rounding only.
"""

import json
from pathlib import Path

import pytest

from tests.helpers.distributed import torchrun

WORKER = Path(__file__).with_name("train_worker.py")
TOLERANCE = 2e-4  # absolute, on losses around 6-9, after 10 Adam steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel_training")
    torchrun(WORKER, 1, "train", path, 1, 1, 1)
    return path


def curve(path, tp, ep, pp, n):
    return json.loads((path / f"losses_tp{tp}_ep{ep}_pp{pp}_n{n}.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc,tp,ep,pp",
    [(2, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (2, 1, 1, 2), (4, 2, 2, 1), (4, 2, 1, 2)],
    ids=["dp2", "tp2-sp", "ep2-dp2", "pp2", "tp2-ep2-dp2", "tp2-pp2"],
)
def test_layout_matches_single_process(workdir, nproc, tp, ep, pp):
    torchrun(WORKER, nproc, "train", workdir, tp, ep, pp, timeout=600)
    reference, losses = curve(workdir, 1, 1, 1, 1), curve(workdir, tp, ep, pp, nproc)
    assert len(losses) == len(reference) == 10
    assert reference[-1] < reference[0] - 0.3  # it trains
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.distributed
def test_checkpoint_saved_at_tp2_pp2_resumes_at_tp1_pp1(workdir):
    """Model, optimizer state and data position written by 4 ranks (TP2xPP2) reshard onto one
    process, whose remaining 5 steps follow the uninterrupted single-process curve."""
    torchrun(WORKER, 4, "save-half", workdir, 2, 1, 2, timeout=600)
    torchrun(WORKER, 1, "resume", workdir, 1, 1, 1)
    reference = curve(workdir, 1, 1, 1, 1)
    resumed = json.loads((workdir / "resumed_tp1_pp1.json").read_text())
    assert len(resumed) == 5
    diffs = [abs(a - b) for a, b in zip(resumed, reference[5:])]
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.distributed
def test_interleaved_virtual_pipeline_matches_single_process(workdir):
    """PP2 with 2 virtual stages per rank (4 chunks of one layer, interleaved 1F1B)."""
    torchrun(WORKER, 2, "train", workdir, 1, 1, 2, 2, timeout=600)
    reference = curve(workdir, 1, 1, 1, 1)
    losses = json.loads((workdir / "losses_tp1_ep1_pp2_vpp2_n2.json").read_text())
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert len(losses) == 10 and max(diffs) < TOLERANCE, diffs


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,tp,ep", [(2, 1, 1), (4, 2, 2)], ids=["dp2", "tp2-ep2-dp2"])
def test_megatron_distributed_optimizer_matches_single_process(workdir, nproc, tp, ep):
    """megatron-core DDP + distributed (ZeRO-1) Adam against our single-process AdamW run."""
    torchrun(WORKER, nproc, "train", workdir, tp, ep, 1, 1, 1, timeout=600)
    reference = curve(workdir, 1, 1, 1, 1)
    losses = json.loads((workdir / f"losses_tp{tp}_ep{ep}_pp1_zero_n{nproc}.json").read_text())
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert len(losses) == 10 and max(diffs) < TOLERANCE, diffs



@pytest.mark.distributed
def test_distributed_optimizer_checkpoint_reshards_tp2_dp2_to_dp2(workdir):
    """The distributed optimizer's state (fully reshardable), saved by TP2xDP2 at step 5, resumes at
    DP2 (TP1) and follows the uninterrupted curve."""
    torchrun(WORKER, 4, "save-half", workdir, 2, 1, 1, 1, 1, timeout=600)
    torchrun(WORKER, 2, "resume", workdir, 1, 1, 1, 1, 1, timeout=600)
    reference = curve(workdir, 1, 1, 1, 1)
    resumed = json.loads((workdir / "resumed_tp1_pp1_zero.json").read_text())
    diffs = [abs(a - b) for a, b in zip(resumed, reference[5:])]
    assert len(resumed) == 5 and max(diffs) < TOLERANCE, diffs
