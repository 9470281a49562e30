"""MLA under chunkwise context parallelism: all-gather of the compressed keys, attention of the local
queries against the gathered keys with per-document causal masks.

What crosses ranks is MLA's compressed key/value stream, ``kv_a_proj_with_mqa``'s output
``[latent | k_rot]`` (``kv_lora_rank + qk_rope_head_dim`` values per token, 576 for Kimi Linear),
not the expanded per-head K and V (``H (nope + rope + v)`` values, 12,288 at H = 32). Each rank
applies ``kv_a_layernorm`` and ``kv_b_proj`` to the gathered latents itself (the layer's own code
after ``ContextParallel.mla_keys``), so the weight gradients of both are this rank's queries' share,
and the data x context gradient reduction sums the shares. Backward reduce-scatters the gathered
stream's gradient: every token's owner receives the sum over all ranks' queries.

Rank r keeps only the keys its queries can see, positions ``[0, (r+1) L)`` of each sample, so the
causal work grows with the rank (docs/parallelism.md: the imbalance of a contiguous partition).
When no slice continues a document nothing is gathered and attention stays local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import GatherTokens
from .layout import ContextParallel


def gather_latent(cp: ContextParallel, compressed: torch.Tensor) -> torch.Tensor:
    """[b*L, c] local compressed keys -> [b*(r+1)*L, c]: each sample's keys up to this slice's end."""
    if not cp.any_continues:
        return compressed
    b, L, r = cp.batch_size, cp.local_length, cp.rank
    gathered = GatherTokens.apply(compressed, cp.group, cp.size)  # [P * b * L, c], rank-major
    per_sample = gathered.view(cp.size, b, L, -1).transpose(0, 1).reshape(b, cp.size * L, -1)
    return per_sample[:, :(r + 1) * L].reshape(b * (r + 1) * L, -1)


def latent_attention(cp: ContextParallel, q, k, v, scale: float) -> torch.Tensor:
    """Softmax attention of the local queries q [b*L, H, Dqk] against k [b*K, H, Dqk], v [b*K, H, Dv]
    (K = (r+1) L gathered keys per sample, or L when nothing was gathered), causal inside each global
    document. Returns [b*L, H, Dv]."""
    b, L, r = cp.batch_size, cp.local_length, cp.rank
    keys = k.shape[0] // b
    first_key = (r + 1) * L - keys  # 0 when gathered, r*L when local
    ids = cp.global_packed(q.device).document_ids  # [b, S]
    query_pos = torch.arange(r * L, (r + 1) * L, device=q.device)
    key_pos = torch.arange(first_key, first_key + keys, device=q.device)
    same_doc = ids[:, query_pos, None] == ids[:, None, key_pos]
    mask = same_doc & (key_pos[None, None, :] <= query_pos[None, :, None])  # [b, L, K]

    def heads_first(x, n):
        return x.view(b, n, x.shape[1], x.shape[2]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q, L), heads_first(k, keys), heads_first(v, keys),
                                         attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b * L, out.shape[1], out.shape[3])
