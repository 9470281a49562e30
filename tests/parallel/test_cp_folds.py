"""The folds of chunkwise KDA context parallelism (parallel/context/kda_chunkwise.py) against the
recurrences they stand for, written out here in fp64: the state entering rank r is
S_r = c_r (M_{r-1} S_{r-1} + E_{r-1}), and the gradient leaving rank r is
G_r = sum over later ranks j of (M_{r+1}^T ... M_{j-1}^T) D_j, cut where a document starts."""
import pytest
import torch

from parallel.context.kda_chunkwise import fold_entry_states, fold_exit_gradients

P, B, H, DK, DV = 4, 3, 2, 8, 12
# sample 0 is one document over all ranks; sample 1 starts a document on rank 2; sample 2 on every rank
CONTINUES = [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]]


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randn(P, B, H, DK, DK + DV, generator=gen, dtype=torch.float64) * 0.4
    grads = torch.randn(P, B, H, DK, DV, generator=gen, dtype=torch.float64)
    return pairs, grads


def _entering(pairs, rank, sample):
    state = torch.zeros(H, DK, DV, dtype=torch.float64)
    for j in range(rank):
        m, e = pairs[j, sample, :, :, :DK], pairs[j, sample, :, :, DK:]
        state = CONTINUES[j + 1][sample] * (m @ state + e)
    return state


def _leaving_gradient(pairs, grads, rank, sample):
    total = torch.zeros(H, DK, DV, dtype=torch.float64)
    for j in range(rank + 1, P):
        if not all(CONTINUES[i][sample] for i in range(rank + 1, j + 1)):
            break  # a document starts between rank and j: j's gradient does not reach rank
        term = grads[j, sample]
        for i in range(j - 1, rank, -1):
            term = pairs[i, sample, :, :, :DK].transpose(-1, -2) @ term
        total = total + term
    return total


@pytest.mark.parametrize("rank", range(P))
def test_folds_match_the_recurrences(rank):
    pairs, grads = _case(rank)
    transitions = pairs[rank + 1:, ..., :DK].contiguous()
    for as_tensor in (False, True):
        continues = torch.tensor(CONTINUES, dtype=torch.float64) if as_tensor else CONTINUES
        entering = fold_entry_states(pairs, continues, rank)
        leaving = fold_exit_gradients(grads, transitions, continues, rank)
        for sample in range(B):
            torch.testing.assert_close(entering[sample], _entering(pairs, rank, sample), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(leaving[sample], _leaving_gradient(pairs, grads, rank, sample),
                                       rtol=1e-12, atol=1e-12)


def test_folds_leave_the_gathered_tensors_unchanged():
    pairs, grads = _case(9)
    before = pairs.clone(), grads.clone()
    fold_entry_states(pairs, CONTINUES, P - 1)
    fold_exit_gradients(grads, pairs[1:, ..., :DK].contiguous(), CONTINUES, 0)
    assert torch.equal(pairs, before[0]) and torch.equal(grads, before[1])
