"""Context-parallel view of a batch: CP rank r's contiguous slice of every sample.

Each sample of length S is cut into cp_size contiguous chunks of L = S / cp_size tokens; rank r
keeps positions [r*L, (r+1)*L). Document boundaries come from the batch's cu_seqlens (the single
source of truth) and are clipped to the slice and re-offset, so the local stream of b*L tokens has
its own cu_seqlens (every slice start is a boundary there). Whether the first local segment of a
sample continues a document from an earlier rank is reported separately (`cp_continues`): that is
where KDA takes the incoming state from rank r-1 and MLA attends to earlier ranks' keys.
"""

from __future__ import annotations

import torch

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def cp_slice(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """Return CP rank `cp_rank`'s part of `batch` (see the module docstring).

    Returned keys: tokens/labels/loss_mask [b, L] (and position_ids if present); cu_seqlens int32
    over the flattened local b*L stream; cp_continues bool [b]; cp_offset (int, = r*L);
    global_cu_seqlens (the batch's own cu_seqlens, for layers that need the whole layout).
    """
    tokens = batch["tokens"]
    micro_batch, seq_length = tokens.shape
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")
    if seq_length % cp_size:
        raise ValueError(f"seq_length={seq_length} is not divisible by context_parallel_size="
                         f"{cp_size}: choose a seq_length that is a multiple of cp_size")
    local = seq_length // cp_size
    lo, hi = cp_rank * local, (cp_rank + 1) * local
    out = {key: value[:, lo:hi].contiguous() for key, value in batch.items()
           if key in SEQUENCE_KEYS and isinstance(value, torch.Tensor)}

    global_cu = batch["cu_seqlens"].tolist()
    local_cu = [0]
    continues = []
    for i in range(micro_batch):
        starts = [x - i * seq_length for x in global_cu if i * seq_length <= x < (i + 1) * seq_length]
        inside = [x for x in starts if lo < x < hi]
        continues.append(lo not in starts)
        local_cu.extend(i * local + x - lo for x in inside)
        local_cu.append((i + 1) * local)
    out["cu_seqlens"] = torch.tensor(local_cu, dtype=torch.int32)
    out["cp_continues"] = torch.tensor(continues, dtype=torch.bool)
    out["cp_offset"] = lo
    out["global_cu_seqlens"] = batch["cu_seqlens"]
    return out
