"""MLA under chunkwise context parallelism: all-gather of the compressed keys, attention of the local
queries against the gathered keys with per-document causal masks.

What crosses ranks is MLA's compressed key/value stream, ``kv_a_proj_with_mqa``'s output
``[latent | k_rot]`` (``kv_lora_rank + qk_rope_head_dim`` values per token, 576 for Kimi Linear),
not the expanded per-head K and V (``H (nope + rope + v)`` values, 10,240 at H = 32). Each rank
applies ``kv_a_layernorm`` and ``kv_b_proj`` to the gathered latents itself (the layer's own code
after ``ContextParallel.mla_keys``), so the weight gradients of both are this rank's queries' share,
and the data x context gradient reduction sums the shares. Backward reduce-scatters the gathered
stream's gradient: every token's owner receives the sum over all ranks' queries.

A rank keeps only the keys its queries can see: for each sample, from the start of the document its
slice begins in up to the slice's end. That key range is tiled by the key ranges of the local
document segments (each segment's document from its start up to the segment's end), so attention is
one varlen call with query segments ``cu_q`` and key segments ``cu_k``, causal with the diagonal at
each segment's end: flash attention on GPUs in 16-bit, a masked SDPA elsewhere. When no slice
boundary falls inside a document nothing is gathered. The causal work grows with the rank
(docs/parallelism.md: the imbalance of a contiguous partition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.host_values import to_device

from .comm import GatherTokens
from .layout import ContextParallel


class _KeyPlan:
    """Host and device tables of this rank's key ranges and query/key segments (once per batch)."""

    def __init__(self, cp: ContextParallel, device):
        b, L, r = cp.batch_size, cp.local_length, cp.rank
        self.cp_rank, self.local_length, self.batch_size = r, L, b
        local = cp.local_cu
        # per sample: global start of the document the slice begins in (rL when nothing is gathered)
        self.key_start = [max(x for x in starts if x <= r * L) if cp.any_continues else r * L
                          for starts in cp.sample_starts]
        self.key_count = [(r + 1) * L - start for start in self.key_start]
        q_lengths, k_lengths = [], []
        first, _ = cp.local_segments
        for d in range(len(local) - 1):
            length = local[d + 1] - local[d]
            sample = local[d] // L
            before = r * L - self.key_start[sample] if d == first[sample] else 0  # earlier ranks' keys
            q_lengths.append(length)
            k_lengths.append(length + before)
        cumsum = lambda xs: torch.tensor([0] + xs, dtype=torch.int64).cumsum(0).to(torch.int32)
        self.max_q, self.max_k = max(q_lengths), max(k_lengths)
        self.cu_q, self.cu_k = to_device(cumsum(q_lengths), device), to_device(cumsum(k_lengths), device)
        self.q_lengths, self.k_lengths, self.device, self._mask = q_lengths, k_lengths, device, None

    def mask(self) -> torch.Tensor:
        """bool [b*L, K] for the masked path: same segment, key position <= query position."""
        if self._mask is None:
            r, L, b = self.cp_rank, self.local_length, self.batch_size
            segment_q = torch.repeat_interleave(torch.arange(len(self.q_lengths)), torch.tensor(self.q_lengths))
            segment_k = torch.repeat_interleave(torch.arange(len(self.k_lengths)), torch.tensor(self.k_lengths))
            position_q = torch.cat([torch.arange(r * L, (r + 1) * L)] * b)
            position_k = torch.cat([torch.arange(start, (r + 1) * L) for start in self.key_start])
            mask = (segment_q[:, None] == segment_k[None, :]) & (position_k[None, :] <= position_q[:, None])
            self._mask = to_device(mask, self.device)
        return self._mask

    @staticmethod
    def of(cp: ContextParallel, device) -> "_KeyPlan":
        key = ("mla_keys", str(device))
        if key not in cp._host:
            cp._host[key] = _KeyPlan(cp, torch.device(device))
        return cp._host[key]


def gather_latent(cp: ContextParallel, compressed: torch.Tensor) -> torch.Tensor:
    """[b*L, c] local compressed keys -> the keys this rank's queries see, [sum of key counts, c]."""
    if not cp.any_continues:
        return compressed
    plan = _KeyPlan.of(cp, compressed.device)
    b, L, r = cp.batch_size, cp.local_length, cp.rank
    gathered = GatherTokens.apply(compressed, cp.group, cp.size)  # [P * b * L, c], rank-major
    per_sample = gathered.view(cp.size, b, L, -1).transpose(0, 1).reshape(b, cp.size * L, -1)
    return torch.cat([per_sample[i, start:(r + 1) * L] for i, start in enumerate(plan.key_start)])


def latent_attention(cp: ContextParallel, q, k, v, scale: float, flash: bool | None = None) -> torch.Tensor:
    """Softmax attention of the local queries q [b*L, H, Dqk] against the keys of ``gather_latent``
    (k [K, H, Dqk], v [K, H, Dv]), causal inside each global document. Returns [b*L, H, Dv].
    flash (default: on GPUs in 16-bit where torch has varlen attention): the flash path."""
    from model.mla import _use_varlen_flash, varlen_flash_attention

    plan = _KeyPlan.of(cp, q.device)
    if flash is None:
        flash = _use_varlen_flash(q)
    if flash:
        return varlen_flash_attention(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=plan.mask(), scale=scale)  # heads as the batch dim
    return out.transpose(0, 1)


@torch.no_grad()
def latent_max_logits(cp: ContextParallel, q, k, scale: float) -> torch.Tensor:
    """QK-Clip's record for this rank's queries: per head the largest ``q.k * scale`` over the keys each
    query sees (the ``gather_latent`` keys, segment by segment, causal at the segment ends). fp32 [H]."""
    plan = _KeyPlan.of(cp, q.device)
    best = torch.full((q.shape[1],), float("-inf"), device=q.device)
    q_start = k_start = 0
    for q_len, k_len in zip(plan.q_lengths, plan.k_lengths):
        qs, ks = q[q_start:q_start + q_len].float(), k[k_start:k_start + k_len].float()
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        for h in range(q.shape[1]):  # one head at a time: q_len x k_len memory
            logits = (qs[:, h] @ ks[:, h].T) * scale
            best[h] = torch.maximum(best[h], logits.masked_fill(~visible, float("-inf")).max())
        q_start, k_start = q_start + q_len, k_start + k_len
    return best
