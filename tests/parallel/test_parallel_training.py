"""DP, TP(+SP), EP and a 4-rank TPxEPxDP layout reproduce the single-process loss curve.

All layouts start from one step-0 checkpoint and see the same global batches (the loader's order
does not depend on the DP size). fp32 on CPU: differences are summation-order rounding only.
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
    torchrun(WORKER, 1, "init", path, 1, 1)
    torchrun(WORKER, 1, "train", path, 1, 1)
    return path


def curve(path, tp, ep, n):
    return json.loads((path / f"losses_tp{tp}_ep{ep}_n{n}.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,tp,ep", [(2, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)],
                         ids=["dp2", "tp2-sp", "ep2-dp2", "tp2-ep2-dp2"])
def test_layout_matches_single_process(workdir, nproc, tp, ep):
    torchrun(WORKER, nproc, "train", workdir, tp, ep, timeout=600)
    reference, losses = curve(workdir, 1, 1, 1), curve(workdir, tp, ep, nproc)
    assert len(losses) == len(reference) == 10
    assert reference[-1] < reference[0] - 0.3  # it trains
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < TOLERANCE, diffs
