"""cp_slice: each CP rank's contiguous slice with cu_seqlens clipped and offset to it."""

import pytest
import torch

from data import build_pretraining_loaders, cp_slice


def _boundaries_from(cu, micro_batch, length):
    """Per sample: the set of in-sample positions where a segment starts."""
    cu = cu.tolist()
    return [{x - i * length for x in cu if i * length <= x < (i + 1) * length}
            for i in range(micro_batch)]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_slices_reassemble_the_batch(synthetic_shard, cp_size):
    prefix, _ = synthetic_shard
    train, _ = build_pretraining_loaders([prefix], split=(1, 0), seq_length=32,
                                         micro_batch_size=2, global_batch_size=2)
    for _ in range(5):
        batch = next(train)
        b, S = batch["tokens"].shape
        L = S // cp_size
        parts = [cp_slice(batch, r, cp_size) for r in range(cp_size)]
        for key in ("tokens", "labels", "loss_mask"):
            torch.testing.assert_close(torch.cat([p[key] for p in parts], dim=1), batch[key])
        global_starts = _boundaries_from(batch["cu_seqlens"], b, S)
        for r, part in enumerate(parts):
            assert part["cu_seqlens"].dtype == torch.int32
            assert part["cu_seqlens"][-1] == b * L and part["cp_offset"] == r * L
            local_starts = _boundaries_from(part["cu_seqlens"], b, L)
            for i in range(b):
                inside = {x - r * L for x in global_starts[i] if r * L <= x < (r + 1) * L}
                assert local_starts[i] == inside | {0}
                assert bool(part["cp_continues"][i]) == (r * L not in global_starts[i])


def test_cp_slice_example():
    batch = {"tokens": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8),
             "loss_mask": torch.ones(2, 8),
             "cu_seqlens": torch.tensor([0, 3, 8, 13, 16], dtype=torch.int32)}
    part = cp_slice(batch, 1, 2)  # positions 4..7 of each sample
    torch.testing.assert_close(part["tokens"], torch.tensor([[4, 5, 6, 7], [12, 13, 14, 15]]))
    torch.testing.assert_close(part["cu_seqlens"], torch.tensor([0, 4, 5, 8], dtype=torch.int32))
    assert part["cp_continues"].tolist() == [True, True]
    with pytest.raises(ValueError, match="not divisible by context_parallel_size=3"):
        cp_slice(batch, 0, 3)
