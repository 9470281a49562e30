"""Ulysses (head-parallel) context parallelism through DeepSpeed's ``DistributedAttention``.

``DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)`` takes q, k, v as
``[b, L, H, D]`` slices of the sequence, exchanges them with one all-to-all each so that every rank
holds whole samples ``[b, S, H/P, D]`` for its ``H/P`` heads, runs ``local_attention`` and sends the
output back the same way. Around our mixers:

* MLA: the expanded per-head q, k, v go through it; the local attention is the model's own
  ``document_causal_attention`` on the whole micro-batch's document layout.
* KDA/GDN: the class exchanges exactly three tensors and passes any other argument through
  unchanged, but KDA needs five per head (q, k, v, the gate, beta). The raw gate rides along with k and
  beta's pre-sigmoid logit with v (concatenated on the last axis; the all-to-all moves rows of one
  token and head, so packing is exact and costs no extra message). The exchange happens before the
  short convolution, which then runs on whole samples (no halo), with this rank's heads' slice of the
  conv kernels, ``A_log`` and ``dt_bias``.

Heads (after tensor parallelism) must divide by the CP size.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .layout import ContextParallel


@functools.cache
def _deepspeed_attention_class():
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    if not deepspeed.comm.is_initialized():  # wraps the running torch.distributed job
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   verbose=False)
    return DistributedAttention


def _exchange(cp: ContextParallel, local_attention, q, k, v):
    attention = _deepspeed_attention_class()(local_attention, cp.group, scatter_idx=2, gather_idx=1)
    return attention(q, k, v, 0)  # batch_dim_idx 0: [b, L, H, D]


def ulysses_attention(cp: ContextParallel, q, k, v, scale: float, record_max_logits: bool = False):
    """MLA core attention: q, k [b*L, H, Dqk], v [b*L, H, Dv] -> [b*L, H, Dv]; with
    ``record_max_logits`` also QK-Clip's record [H] (this rank's heads, -inf elsewhere)."""
    from model.mla import document_causal_attention, document_max_logits

    b, L, S = cp.batch_size, cp.local_length, cp.seq_length
    heads = q.shape[1]
    cp.check_heads(heads, "attention")
    packed = cp.global_packed(q.device)
    best = torch.full((heads,), float("-inf"), device=q.device)
    local = heads // cp.size

    def whole_samples(qs, ks, vs):  # [b, S, H/P, D]
        qs, ks, vs = qs.flatten(0, 1), ks.flatten(0, 1), vs.flatten(0, 1)
        if record_max_logits:  # whole documents of this rank's heads
            best[cp.rank * local:(cp.rank + 1) * local] = document_max_logits(qs, ks, packed, scale)
        out = document_causal_attention(qs, ks, vs, packed, scale)
        return out.view(b, S, *out.shape[1:])

    out = _exchange(cp, whole_samples, *(x.view(b, L, heads, x.shape[-1]) for x in (q, k, v)))
    out = out.reshape(b * L, heads, -1)
    return (out, best) if record_max_logits else out


def ulysses_kda_core(cp: ContextParallel, projections, kernels, g, beta_logits, gate, head_dim: int,
                     options=None):
    """The KDA layer's core under Ulysses (see ``ContextParallel.kda``). Returns o [1, b*L, H, Dv]."""
    from model.kda import kda_op, short_conv_silu

    b, L, S, P = cp.batch_size, cp.local_length, cp.seq_length, cp.size
    heads = projections[0].shape[1] // head_dim
    cp.check_heads(heads, "KDA")
    if not g.dtype == beta_logits.dtype == projections[1].dtype == projections[2].dtype:
        raise TypeError(f"Ulysses KDA packs the gate with k and beta with v: dtypes must match, got gate "
                        f"{g.dtype}, beta {beta_logits.dtype}, k/v {projections[1].dtype}")
    local = heads // P
    mine = slice(cp.rank * local, (cp.rank + 1) * local)
    A_log, dt_bias, lower_bound = gate
    per_channel = g.dim() == 3
    dv = projections[2].shape[1] // heads

    def split(x, width):
        return x.view(b, L, heads, width)

    q = split(projections[0], head_dim)
    k = torch.cat([split(projections[1], head_dim), g.view(b, L, heads, -1)], -1)
    v = torch.cat([split(projections[2], dv), beta_logits.view(b, L, heads, 1)], -1)
    channel = lambda w: w.view(heads, -1, *w.shape[1:])[mine].flatten(0, 1)  # this rank's heads' rows
    position = cp.global_packed(q.device).position_in_document

    def whole_samples(qs, ks, vs):  # [b, S, H/P, .]
        conv = lambda x, w: short_conv_silu(x.flatten(0, 1).flatten(-2), channel(w), position).view(1, b * S, local, -1)
        qx = conv(qs, kernels[0])
        kx = conv(ks[..., :head_dim], kernels[1])
        vx = conv(vs[..., :dv], kernels[2])
        gx = ks[..., head_dim:].reshape(1, b * S, local, -1)
        if not per_channel:
            gx = gx.squeeze(-1)
        beta = torch.sigmoid(vs[..., dv].float()).reshape(1, b * S, local)
        o, _ = kda_op(qx, kx, vx, gx, beta, cu_seqlens=cp.global_cu_seqlens, use_qk_l2norm=True,
                      gate=(A_log[mine], channel(dt_bias), lower_bound), options=options)
        return o.view(b, S, local, -1)

    out = _exchange(cp, whole_samples, q, k, v)
    return out.reshape(1, b * L, heads, -1)
