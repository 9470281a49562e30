"""Pure-PyTorch KDA references (docs/architecture.md: "Kimi Delta Attention", "Chunkwise algorithm").

* ``recurrent_kda_reference``: token-by-token delta-rule recurrence in float64 — the oracle.
* ``chunk_kda_reference``: the chunkwise algorithm (chunks of 64, sub-chunks with reference
  points) in plain PyTorch, autograd-capable, vectorised over documents; the CPU path of
  ``chunk_kda``.

Both share the API described in ``kernels/kda/__init__.py``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kernels.kda.gate import kda_log_decay
from kernels.kda.options import CHUNK_SIZE

# Sub-block of the exact (elementwise) diagonal part. The kernels use 16 (tensor-core tile);
# the reference uses 8, which halves the elementwise work; both are exact for any decay.
REF_SUB = 8
L2_EPS = 1e-6


# ----------------------------------------------------------------------------- shared helpers
def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def check_cu_ends(cu: list[int], total: int) -> None:
    assert cu[0] == 0 and cu[-1] == total, f"cu_seqlens must run from 0 to the {total} tokens, got {cu[0]}..{cu[-1]}"


def _check_args(q, k, v, g, beta, initial_state, cu_seqlens, check_cu_values=True):
    """Shapes, and the ends of cu_seqlens unless ``check_cu_values=False`` (reading a GPU tensor's
    values waits for the GPU; the Triton path checks them once per cu_seqlens tensor instead)."""
    B, T, H, Dk = q.shape
    assert k.shape == (B, T, H, Dk), f"k {tuple(k.shape)} vs q {tuple(q.shape)}"
    assert v.shape[:3] == (B, T, H), f"v {tuple(v.shape)}"
    assert g.shape in ((B, T, H, Dk), (B, T, H)), f"g {tuple(g.shape)}"
    assert beta.shape == (B, T, H), f"beta {tuple(beta.shape)}"
    if cu_seqlens is not None:
        assert B == 1, "cu_seqlens requires B == 1"
        if check_cu_values:
            check_cu_ends(cu_seqlens.tolist(), T)
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        assert initial_state.shape == (n, H, Dk, v.shape[-1]), f"h0 {tuple(initial_state.shape)}"
    return n


def _prepare(q, k, g, gate, scale, use_qk_l2norm, dtype):
    """Normalise/scale q,k and produce the per-key-channel log-decay, all in ``dtype``."""
    Dk = k.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    k = l2norm(k.to(dtype)) if use_qk_l2norm else k.to(dtype)
    if q is not None:   # q=None: the pieces that need no queries (state pre-passes)
        q = (l2norm(q.to(dtype)) if use_qk_l2norm else q.to(dtype)) * scale
    glog = kda_log_decay(g, gate, dtype)
    if glog.dim() == 3:  # scalar (GDN) decay shared by all key channels
        glog = glog.unsqueeze(-1).expand(*glog.shape, Dk)
    return q, k, glog


# ----------------------------------------------------------------------------- recurrence (oracle)
def recurrent_kda_reference(q, k, v, g, beta, scale=None, initial_state=None,
                            output_final_state=False, cu_seqlens=None, use_qk_l2norm=True,
                            gate=None):
    """The delta form of the recurrence: S' = diag(exp g) S; e = v - S'^T k; S = S' + beta k e^T; o = S^T q.
    Float64 internally; returns (o in q.dtype, final state fp32 or fp64 for fp64 inputs)."""
    n_seq = _check_args(q, k, v, g, beta, initial_state, cu_seqlens)
    f64 = torch.float64
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qs, ks, glog = _prepare(q, k, g, gate, scale, use_qk_l2norm, f64)
    vs, bs = v.to(f64), beta.to(f64)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        spans = [(0, cu[i], cu[i + 1]) for i in range(n_seq)]
    outs, finals = [], []
    for n, (b, s, e) in enumerate(spans):
        S = q.new_zeros(H, Dk, Dv, dtype=f64) if initial_state is None else initial_state[n].to(f64)
        for t in range(s, e):
            S = torch.exp(glog[b, t])[:, :, None] * S
            err = vs[b, t] - torch.einsum('hk,hkv->hv', ks[b, t], S)
            S = S + bs[b, t][:, None, None] * ks[b, t][:, :, None] * err[:, None, :]
            outs.append(torch.einsum('hk,hkv->hv', qs[b, t], S))
        finals.append(S)
    o = torch.stack(outs, 0).view(B, T, H, Dv).to(q.dtype)
    state_dtype = f64 if q.dtype == f64 else torch.float32
    final = torch.stack(finals, 0).to(state_dtype) if output_final_state else None
    return o, final


# ----------------------------------------------------------------------------- chunkwise
def _diag_decay(G, sub):
    """exp(G_r - G_j) for r >= j inside each sub-block of ``sub`` rows (0 above the diagonal).
    G: [..., C, D] -> [..., C/sub, sub, sub, D]; every exponent is <= 0."""
    Gb = G.unflatten(-2, (G.shape[-2] // sub, sub))
    diff = Gb.unsqueeze(-2) - Gb.unsqueeze(-3)
    causal = torch.ones(sub, sub, dtype=G.dtype, device=G.device).tril()[:, :, None]
    return torch.exp(diff.clamp(max=0)) * causal


def _gated_products(p, k, G, decay, sub):
    """M[r, j] = sum_d p_r[d] k_j[d] exp(G_r[d] - G_j[d]) for j <= r within each chunk.

    p, k, G: [..., C, D] with G non-increasing along C. Off-diagonal blocks use the first row
    n of the row block as reference point (both exponents G_r-G_n and G_n-G_j are <= 0);
    diagonal blocks are exact elementwise products with ``decay`` (see _diag_decay).
    Returns M with the upper triangle zero.
    """
    C = p.shape[-2]
    nb = C // sub
    pb, kb = p.unflatten(-2, (nb, sub)), k.unflatten(-2, (nb, sub))
    diag = ((pb.unsqueeze(-2) * decay) * kb.unsqueeze(-3)).sum(-1)      # [..., nb, sub, sub]
    rows_out = []
    for i in range(nb):
        r0 = i * sub
        part = []
        if i > 0:
            g_ref = G[..., r0:r0 + 1, :]
            pr = p[..., r0:r0 + sub, :] * torch.exp(G[..., r0:r0 + sub, :] - g_ref)
            kr = k[..., :r0, :] * torch.exp(g_ref - G[..., :r0, :])
            part.append(pr @ kr.transpose(-1, -2))
        part.append(diag[..., i, :, :])
        if r0 + sub < C:
            part.append(p.new_zeros(*p.shape[:-2], sub, C - r0 - sub))
        rows_out.append(torch.cat(part, -1))
    return torch.cat(rows_out, -2)


def _pack_documents(x, n_pad, doc_idx, pos_idx, n_docs):
    """[1, T, ...] -> [n_docs, n_pad, ...] with zero padding (autograd through index_put)."""
    out = x.new_zeros(n_docs, n_pad, *x.shape[2:])
    return out.index_put((doc_idx, pos_idx), x[0])


def chunk_kda_reference(q, k, v, g, beta, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, use_qk_l2norm=True,
                        gate=None):
    """Chunkwise KDA (WY form, state passed chunk to chunk), chunk 64, fp32 math (fp64 for fp64 inputs)."""
    def intra_products(qc, kc, G):
        decay = _diag_decay(G, REF_SUB)
        return _gated_products(qc, kc, G, decay, REF_SUB), _gated_products(kc, kc, G, decay, REF_SUB)

    return chunkwise_kda(intra_products, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         use_qk_l2norm=use_qk_l2norm, gate=gate)


def chunk_pieces(intra_products, q, k, v, g, beta, scale=None, cu_seqlens=None, use_qk_l2norm=True,
                 gate=None):
    """The per-chunk quantities of the chunkwise algorithm, documents packed to whole chunks of 64.

    Returns a namespace with, in the chunk layout [Bd, H, N, C, D] (Bd = documents or batch rows,
    N chunks of C = 64): ``W``, ``U`` (WY form), ``q_dec`` = q e^G, ``k_dec`` = k e^(G_last - G),
    ``decay_last`` [Bd, H, N, Dk, 1] = e^(G_last) and ``A_qk`` [.., C, C]; ``to_chunks(x)`` brings a
    token-layout tensor [B, T, H, D] into that layout, ``from_chunks(o)`` takes it back; ``dtype``
    (fp32, fp64 for fp64 inputs). A chunk of the recurrence is
    ``o = q_dec S + A_qk (U - W S)``, ``S' = decay_last * S + k_dec^T (U - W S)``.
    The context-parallel pre-passes (parallel/context/kda_prepass.py) reuse these pieces.
    """
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    B, T, H, Dk = k.shape
    qs, ks, glog = _prepare(q, k, g, gate, scale, use_qk_l2norm, dtype)
    vs, bs = v.to(dtype), beta.to(dtype)

    if cu_seqlens is not None:
        n_seq = cu_seqlens.numel() - 1
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        n_pad = max(1, int(-(-int(lens.max()) // CHUNK_SIZE))) * CHUNK_SIZE
        doc_idx = torch.repeat_interleave(torch.arange(n_seq, device=k.device), lens)
        pos_idx = torch.arange(T, device=k.device) - cu_seqlens.long()[:-1][doc_idx]
        pack = lambda x: _pack_documents(x, n_pad, doc_idx, pos_idx, n_seq)
        Bd, Tp = n_seq, n_pad
        unpack = lambda o: o[doc_idx, pos_idx].unsqueeze(0)
    else:
        Tp = -(-T // CHUNK_SIZE) * CHUNK_SIZE
        # zero padding (k=q=v=beta=g=0) leaves the state unchanged
        pack = (lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, Tp - T))) if Tp != T else (lambda x: x)
        Bd = B
        unpack = lambda o: o[:, :T]
    N = Tp // CHUNK_SIZE
    to_chunks = lambda x: pack(x).unflatten(1, (N, CHUNK_SIZE)).permute(0, 3, 1, 2, 4)   # [Bd, H, N, C, D]
    kc, vc, gc = map(to_chunks, (ks, vs, glog))
    qc = None if qs is None else to_chunks(qs)
    bc = pack(bs).unflatten(1, (N, CHUNK_SIZE)).permute(0, 3, 1, 2)  # [Bd, H, N, C]
    G = gc.cumsum(-2)
    G_last = G[..., -1:, :]

    A_qk, M_kk = intra_products(kc if qc is None else qc, kc, G)  # A_qk incl. the diagonal
    A_kk = torch.tril(M_kk, -1) * bc[..., :, None]
    eye = torch.eye(CHUNK_SIZE, dtype=dtype, device=k.device)
    # W = (I + A_kk)^-1 diag(beta) (exp(G) * K),  U = (I + A_kk)^-1 diag(beta) V
    expG = torch.exp(G)
    rhs = torch.cat([bc[..., None] * kc * expG, bc[..., None] * vc], -1)
    WU = torch.linalg.solve_triangular(eye + A_kk, rhs, upper=False, unitriangular=True)
    return SimpleNamespace(
        W=WU[..., :Dk], U=WU[..., Dk:], A_qk=None if qc is None else A_qk,
        q_dec=None if qc is None else qc * expG, k_dec=kc * torch.exp(G_last - G),
        decay_last=torch.exp(G_last).squeeze(-2)[..., None], dtype=dtype, batch=Bd, chunks=N,
        to_chunks=lambda x: to_chunks(x.to(dtype)),
        from_chunks=lambda o: unpack(o.permute(0, 2, 3, 1, 4).reshape(Bd, Tp, H, o.shape[-1])))


def chunkwise_kda(intra_products, q, k, v, g, beta, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, use_qk_l2norm=True, gate=None):
    """The chunkwise algorithm in PyTorch, with the intra-chunk gated products as a parameter:
    ``intra_products(qc, kc, G) -> (A_qk, M_kk)``, the [.., C, C] lower-triangular matrices
    ``sum_d q_r k_j exp(G_r - G_j)`` and the same for k (chunk_cpu.py passes a faster one)."""
    _check_args(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    p = chunk_pieces(intra_products, q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens,
                     use_qk_l2norm=use_qk_l2norm, gate=gate)
    dtype, N = p.dtype, p.chunks
    if initial_state is None and N == 1 and not output_final_state:  # one chunk, no state: o = A_qk U
        o = p.A_qk @ p.U
        S = None
    else:
        S = q.new_zeros(p.batch, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        outs = []
        for c in range(N):
            v_new = p.U[:, :, c] - p.W[:, :, c] @ S
            outs.append(p.q_dec[:, :, c] @ S + p.A_qk[:, :, c] @ v_new)
            S = p.decay_last[:, :, c] * S + p.k_dec[:, :, c].transpose(-1, -2) @ v_new
        o = torch.stack(outs, 2)
    o = p.from_chunks(o)
    final = S.to(torch.float64 if dtype == torch.float64 else torch.float32) if output_final_state else None
    return o.to(q.dtype), final
