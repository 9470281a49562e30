"""PyTorch pre-passes of chunkwise KDA context parallelism (the reference; any device).

A run of tokens maps the state entering it affinely: chunk by chunk
``S' = A_c S + k_dec^T U``, ``A_c = Diag(decay_last) - k_dec^T W`` (dk x dk per head, the WY pieces
of ``kernels.kda.naive.chunk_pieces``). So a segment maps ``S -> M S + E`` with ``M`` the product of
its ``A_c`` and ``E`` its final state from zero; both come from one pass of the recurrence on an
augmented state ``X = [M | E]`` (dk x (dk + dv)) started at ``[I | 0]``.

The outputs are linear in the entering state too: ``o_c = (q_dec - A_qk W) S_c + A_qk U``. The
gradient that reaches the entering state through the segment's own outputs (its final state's
gradient taken as zero) is the reverse scan
``dS_c = (q_dec - A_qk W)^T do_c + A_c^T dS_{c+1}``, ``dS_N = 0``.

Both run on selected local document segments, packed to whole chunks of 64 like the chunk reference;
everything is fp32 (fp64 for fp64 inputs), without autograd.
"""

from __future__ import annotations

import torch

from kernels.kda.chunk_cpu import _gated_products
from kernels.kda.naive import chunk_pieces


def _segments(tensors, local_cu: list[int], docs: list[int]):
    """The tokens of local documents ``docs`` as one varlen stream: (tensors, its cu_seqlens)."""
    device = tensors[0].device
    index = torch.cat([torch.arange(local_cu[d], local_cu[d + 1], device=device) for d in docs])
    lengths = torch.tensor([local_cu[d + 1] - local_cu[d] for d in docs])
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return [x[:, index] for x in tensors], cu.to(device)


def _keys_only(qc, kc, G):
    return None, _gated_products([kc], kc, G)[0]


def _queries_and_keys(qc, kc, G):
    return tuple(_gated_products([qc, kc], kc, G))


@torch.no_grad()
def transition_pairs(k, v, g, beta, local_cu, docs, with_transition, *, scale=None, use_qk_l2norm=True,
                     gate=None) -> torch.Tensor:
    """[len(docs), H, Dk, Dk + Dv] fp32: ``[M | E]`` of each local document segment in ``docs``.

    k, v, g, beta: the local stream [1, T, H, .] (g raw or log-decay as in the KDA op API);
    with_transition: per segment, whether to compute ``M`` (else its columns stay 0: a segment that
    does not carry the entering state through)."""
    (k, v, g, beta), cu = _segments((k, v, g, beta), local_cu, docs)
    p = chunk_pieces(_keys_only, None, k, v, g, beta, scale=scale, cu_seqlens=cu, use_qk_l2norm=use_qk_l2norm,
                     gate=gate)
    n, H, _, _, Dk = p.W.shape
    Dv = p.U.shape[-1]
    X = p.W.new_zeros(n, H, Dk, Dk + Dv)
    eye = torch.eye(Dk, dtype=X.dtype, device=X.device)
    X[torch.as_tensor(with_transition, device=X.device), :, :, :Dk] = eye
    zeros = p.W.new_zeros(n, H, p.W.shape[-2], Dk)
    for c in range(p.chunks):
        v_new = torch.cat([zeros, p.U[:, :, c]], -1) - p.W[:, :, c] @ X
        X = p.decay_last[:, :, c] * X + p.k_dec[:, :, c].transpose(-1, -2) @ v_new
    return X.float() if X.dtype != torch.float64 else X


@torch.no_grad()
def entry_state_gradients(q, k, g, beta, do, local_cu, docs, *, scale=None, use_qk_l2norm=True,
                          gate=None) -> torch.Tensor:
    """[len(docs), H, Dk, Dv] fp32: the gradient reaching each segment's entering state through the
    segment's outputs (``do`` = dL/do of the local stream [1, T, H, Dv]; final-state gradient 0)."""
    v = k.new_zeros(*k.shape[:-1], 0)  # the reverse scan needs no values
    (q, k, v, g, beta, do), cu = _segments((q, k, v, g, beta, do), local_cu, docs)
    p = chunk_pieces(_queries_and_keys, q, k, v, g, beta, scale=scale, cu_seqlens=cu,
                     use_qk_l2norm=use_qk_l2norm, gate=gate)
    doc = p.to_chunks(do)
    n, H, _, _, Dk = p.W.shape
    dS = doc.new_zeros(n, H, Dk, do.shape[-1])
    for c in reversed(range(p.chunks)):
        to_w = p.A_qk[:, :, c].transpose(-1, -2) @ doc[:, :, c] + p.k_dec[:, :, c] @ dS
        dS = (p.q_dec[:, :, c].transpose(-1, -2) @ doc[:, :, c] + p.decay_last[:, :, c] * dS
              - p.W[:, :, c].transpose(-1, -2) @ to_w)
    return dS.float() if dS.dtype != torch.float64 else dS
