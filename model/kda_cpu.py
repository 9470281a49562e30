"""KDA on CPU tensors with few operator calls: the chunked reference, its sub-block loop vectorised.

On CPUs ``chunk_kda`` runs the PyTorch chunk reference (``kernels/kda/naive.py``). Its intra-chunk
products ``M[r, j] = sum_d p_r[d] k_j[d] exp(G_r[d] - G_j[d])`` walk the 8 row blocks of a chunk in
a Python loop, about 130 small operators per call, forward and again in backward; on the short
micro-batches of CPU runs (the ``tiny`` preset) that per-operator cost, not the arithmetic, is most
of a training step. ``chunk_kda_cpu`` is the same algorithm (documents packed to whole chunks of 64,
WY form, state passed from chunk to chunk, fp32 math or fp64 for fp64 inputs) with the products of
all row blocks in one batched call:

* off-diagonal blocks: row block i uses its first row n as reference point,
  ``(p_r exp(G_r - G_n)) . (k_j exp(G_n - G_j))`` for j < n (both exponents <= 0), one batched
  matmul over the blocks;
* diagonal blocks: exact elementwise products with ``exp(G_r - G_j)``, j <= r.

Every exponent is <= 0, so it is exact for any decay (tested against the fp64 token recurrence).
CUDA tensors go to ``kernels.kda.chunk_kda`` (Triton). API: ``kernels/kda/__init__.py``.
(It lives here because kernels/kda is being reworked; it can move next to the reference.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kda import chunk_kda as kernels_chunk_kda
from kernels.kda.naive import CHUNK, _check_args, _pack_documents, _prepare

SUB = 8  # rows per block (as the reference's REF_SUB)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              use_qk_l2norm=True, gate=None):
    """The model's KDA op: ``kernels.kda.chunk_kda`` (Triton) on CUDA tensors, ``chunk_kda_cpu`` on CPU."""
    fn = kernels_chunk_kda if q.is_cuda else chunk_kda_cpu
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate=gate)


def _gated_products(p_list, k, G):
    """``M`` for each ``p`` in ``p_list`` (module docstring), sharing the decayed keys.

    p, k, G: [..., C, D] with G non-increasing along C. Returns lower-triangular [..., C, C]
    matrices (diagonal included)."""
    C, D = k.shape[-2], k.shape[-1]
    nb = C // SUB
    lead = k.shape[:-2]
    Gb = G.unflatten(-2, (nb, SUB))  # [..., nb, SUB, D]
    Gref = Gb[..., :1, :]  # first row of each block
    to_ref = torch.exp(Gb - Gref)  # <= 1 (G non-increasing)
    # keys decayed to every block's reference row: [..., nb, C, D]; only columns j < n are used,
    # the clamp keeps the others finite before they are masked
    kcols = k.unsqueeze(-3) * torch.exp(torch.clamp(Gref - G.unsqueeze(-3), max=0))
    rows = torch.arange(C, device=k.device)
    before_block = (rows[None, :] < (rows[:, None] // SUB) * SUB).to(k.dtype)  # [C, C]
    # diagonal blocks: exp(G_r - G_j) for j <= r, 0 above the diagonal
    causal = torch.ones(SUB, SUB, dtype=k.dtype, device=k.device).tril()[:, :, None]
    decay = torch.exp(torch.clamp(Gb.unsqueeze(-2) - Gb.unsqueeze(-3), max=0)) * causal  # [..., nb, r, j, D]
    kb = k.unflatten(-2, (nb, SUB)).unsqueeze(-3)  # [..., nb, 1, SUB, D]
    block_eye = torch.eye(nb, dtype=k.dtype, device=k.device).view(nb, 1, nb, 1)
    kcols_t = kcols.transpose(-1, -2)
    out = []
    for p in p_list:
        pb = p.unflatten(-2, (nb, SUB))
        off = ((pb * to_ref) @ kcols_t).reshape(*lead, C, C) * before_block
        diag = ((pb.unsqueeze(-2) * decay) * kb).sum(-1)  # [..., nb, SUB, SUB]
        out.append(off + (diag.unsqueeze(-2) * block_eye).reshape(*lead, C, C))
    return out


def chunk_kda_cpu(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, use_qk_l2norm=True, gate=None):
    """``chunk_kda_reference`` (SPEC 2.2-2.3, chunk 64) with vectorised intra-chunk products."""
    n_seq = _check_args(q, k, v, g, beta, initial_state, cu_seqlens)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qs, ks, glog = _prepare(q, k, g, gate, scale, use_qk_l2norm, dtype)
    vs, bs = v.to(dtype), beta.to(dtype)

    if cu_seqlens is not None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        n_pad = max(1, int(-(-int(lens.max()) // CHUNK))) * CHUNK
        doc_idx = torch.repeat_interleave(torch.arange(n_seq, device=q.device), lens)
        pos_idx = torch.arange(T, device=q.device) - cu_seqlens.long()[:-1][doc_idx]
        pack = lambda x: _pack_documents(x, n_pad, doc_idx, pos_idx, n_seq)
        qs, ks, vs, bs, glog = map(pack, (qs, ks, vs, bs, glog))
        Bd, Tp = n_seq, n_pad
    else:
        Tp = -(-T // CHUNK) * CHUNK
        if Tp != T:  # zero padding (k=q=v=beta=g=0) leaves the state unchanged
            padT = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, Tp - T))
            qs, ks, vs, bs, glog = map(padT, (qs, ks, vs, bs, glog))
        Bd = B

    N = Tp // CHUNK
    to_chunks = lambda x: x.unflatten(1, (N, CHUNK)).permute(0, 3, 1, 2, 4)  # [Bd, H, N, C, D]
    qc, kc, vc, gc = map(to_chunks, (qs, ks, vs, glog))
    bc = bs.unflatten(1, (N, CHUNK)).permute(0, 3, 1, 2)  # [Bd, H, N, C]
    G = gc.cumsum(-2)
    G_last = G[..., -1:, :]

    A_qk, M_kk = _gated_products([qc, kc], kc, G)
    A_kk = torch.tril(M_kk, -1) * bc[..., :, None]
    eye = torch.eye(CHUNK, dtype=dtype, device=q.device)
    # W = (I + A_kk)^-1 diag(beta) (exp(G) * K),  U = (I + A_kk)^-1 diag(beta) V
    expG = torch.exp(G)
    rhs = torch.cat([bc[..., None] * kc * expG, bc[..., None] * vc], -1)
    WU = torch.linalg.solve_triangular(eye + A_kk, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :Dk], WU[..., Dk:]
    q_dec = qc * expG
    k_dec = kc * torch.exp(G_last - G)
    decay_last = torch.exp(G_last).squeeze(-2)[..., None]  # [Bd, H, N, Dk, 1]

    if initial_state is None and N == 1 and not output_final_state:  # no state: o = A_qk U
        o = (A_qk @ U).squeeze(2).permute(0, 2, 1, 3)
        S = None
    else:
        S = q.new_zeros(Bd, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        outs = []
        for c in range(N):
            v_new = U[:, :, c] - W[:, :, c] @ S
            outs.append(q_dec[:, :, c] @ S + A_qk[:, :, c] @ v_new)
            S = decay_last[:, :, c] * S + k_dec[:, :, c].transpose(-1, -2) @ v_new
        o = torch.stack(outs, 2).permute(0, 2, 3, 1, 4).reshape(Bd, Tp, H, Dv)
    if cu_seqlens is not None:
        o = o[doc_idx, pos_idx].unsqueeze(0)
    else:
        o = o[:, :T]
    final = S.to(torch.float64 if dtype == torch.float64 else torch.float32) if output_final_state else None
    return o.to(q.dtype), final
