"""Context parallelism at CP=2 and CP=4 (gloo ranks) against CP=1, both modes.

cp_worker.py runs every check in one torchrun per CP size; the batch's documents straddle slice
boundaries, start exactly at one, span three ranks (and all four), have length 1, and at CP=4 the
Triton case's slices are shorter than one 64-token chunk. Each rank compares its slice of the output
and of every input gradient with the CP=1 run, and the parameter gradients summed over CP ranks.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from parallel.context import ContextParallel, ContextParallelError
from tests.helpers.distributed import torchrun

WORKER = Path(__file__).with_name("cp_worker.py")
MODES = ("chunkwise", "ulysses")
KINDS = ("kda", "gdn", "mla")
OPS = ("reference", "triton", "fused")
CHECKS = ([f"op:{op}" for op in OPS] + ["conv"] + [f"layer:{k}/{m}" for k in KINDS for m in MODES]
          + [f"causal:{k}/{m}" for k in ("kda", "mla") for m in MODES] + [f"qkclip:{m}" for m in MODES])
TOL = 1e-5  # fp32: outputs and input gradients (relative norm of the difference)
TOL_PARAM = 3e-5  # parameter gradients: sums over all tokens (dA_log the largest, ~7e-6)


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cp{request.param}")
    torchrun(WORKER, request.param, out, *CHECKS, timeout=900)
    return json.loads((out / f"cp{request.param}.json").read_text())


def _check_errors(ranks, check):
    for rank, results in enumerate(ranks):
        errors = results[check]["errors"]
        bad = {name: err for name, err in errors.items()
               if not err < (TOL_PARAM if name.startswith(("dA_log", "ddt_bias", "dkernel", "d.")) else TOL)}
        assert not bad, f"{check} rank {rank}: {bad}"


def _check_bytes(ranks, check):
    for rank, results in enumerate(ranks):
        assert results[check]["bytes"] == results[check]["expected"], f"{check} rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("op", OPS)
def test_chunkwise_kda_op_matches_cp1(ranks, op):
    """Output and gradients of q, k, v, g, beta on every rank, A_log/dt_bias summed over ranks.
    reference: PyTorch pre-passes around chunk_kda_cpu; triton: the same around the Triton op; fused:
    the Triton pre-pass kernels inside the Triton op (the interpreter on CPU)."""
    _check_errors(ranks, f"op:{op}")
    assert set(ranks[0][f"op:{op}"]["errors"]) == {"o", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias"}


@pytest.mark.distributed
def test_conv_halo_matches_cp1(ranks):
    _check_errors(ranks, "conv")


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_cp1(ranks, kind, mode):
    """The model's KDA / GDN / MLA layer: output, input gradient, every parameter's gradient."""
    _check_errors(ranks, f"layer:{kind}/{mode}")
    names = ranks[0][f"layer:{kind}/{mode}"]["errors"]
    assert "dx" in names and sum(n.startswith("d.") for n in names) >= 5


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_mla_max_logit_record_matches_cp1(ranks, mode):
    """QK-Clip's per-head max logit: each rank records what its queries (chunkwise) or heads (ulysses)
    see; the MAX over CP ranks (what train/muon.py::qk_clip reduces) equals the CP=1 record."""
    _check_errors(ranks, f"qkclip:{mode}")
    assert all(math.isfinite(x) for x in ranks[0][f"qkclip:{mode}"]["reference"])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("kda", "mla"))
def test_tokens_after_p_change_nothing_before_p(ranks, kind, mode):
    """Tokens after position P (on rank 1) are perturbed: outputs up to P stay bit-identical on every
    rank, outputs after P change."""
    check = f"causal:{kind}/{mode}"
    assert all(results[check]["before"] == 0.0 for results in ranks)
    assert all(results[check]["after"] > 1e-2 for results in ranks[1:])


@pytest.mark.distributed
@pytest.mark.parametrize("check", [f"op:{op}" for op in OPS] + ["conv"]
                         + [f"layer:{k}/{m}" for k in KINDS for m in MODES])
def test_collective_bytes_match_docs_formulas(ranks, check):
    """Bytes received per rank in forward and backward (counted around torch.distributed) equal
    parallel/context/volume.py, the formulas of docs/parallelism.md."""
    _check_bytes(ranks, check)
    assert any(results[check]["bytes"]["forward"] > 0 for results in ranks)


# ----------------------------------------------------------------------------- single process
def _context(mode="chunkwise", rank=1, size=4, cu=(0, 50, 96, 97, 300, 384, 768)):
    from data import cp_slice

    batch = {"tokens": torch.zeros(2, cu[-1] // 2, dtype=torch.long), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    return ContextParallel.from_slice(cp_slice(batch, rank, size), None, rank, size, mode)


def test_context_tables_follow_the_documents():
    cp = _context()
    # sample 0: starts at 0, 50, 96, 97, 300 (slices of 96); sample 1: one document
    assert cp.continues.tolist() == [[False, False], [False, True], [True, True], [True, True]]
    assert cp.single.tolist() == [[False, False], [False, True], [True, True], [False, True]]
    assert cp.local_segments == ([0, 2], [1, 2])  # local cu [0, 1, 96, 192]
    position = cp.positions_before(3)  # tokens 93..191 of each sample
    assert position[0, :6].tolist() == [43, 44, 45, 0, 0, 1]
    assert position[1, :4].tolist() == [93, 94, 95, 96]


def test_bad_layouts_get_clear_errors():
    with pytest.raises(ContextParallelError, match="--cp-mode='ring'"):
        _context(mode="ring")
    with pytest.raises(ContextParallelError, match="heads must divide by CP x TP"):
        _context(mode="ulysses").check_heads(6, "KDA")
    from parallel.context.conv_halo import conv_silu_with_halo

    cp = _context(cu=(0, 8, 16), size=4)  # slices of 2 tokens; a width-4 conv reads 3 back
    x = torch.zeros(2 * 2, 4)
    with pytest.raises(ContextParallelError, match="reads 3 tokens back but a CP slice has only L = 2"):
        conv_silu_with_halo(cp, [x], [torch.zeros(4, 1, 4)])
