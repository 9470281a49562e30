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
The model uses it for CPU tensors (``model.kda.kda_op``; CUDA tensors go to the Triton
``chunk_kda``). API: ``kernels/kda/__init__.py``. The chunking, WY solve and state pass are the
reference's own (``naive.chunkwise_kda``); only the intra-chunk products differ.
"""

from __future__ import annotations

import torch

from kernels.kda.naive import chunkwise_kda

SUB = 8  # rows per block (as the reference's REF_SUB)


def _gated_products(p_list, k, G):
    """``M`` for each ``p`` in ``p_list`` (module docstring), sharing the decayed keys.

    p, k, G: [..., C, D] with G non-increasing along C. Returns lower-triangular [..., C, C]
    matrices (diagonal included)."""
    C = k.shape[-2]
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
    """``chunk_kda_reference`` (chunks of 64) with vectorised intra-chunk products."""
    return chunkwise_kda(lambda qc, kc, G: _gated_products([qc, kc], kc, G), q, k, v, g, beta, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate=gate)
