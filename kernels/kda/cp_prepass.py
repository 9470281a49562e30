"""Triton pre-passes of chunkwise KDA context parallelism, on the forward's WY pieces.

Layouts as in chunk_fwd.py (padded chunk layout [NC, H, CHUNK, X]; ``do`` in token layout [T, H, V]).
Both kernels run one program per (column block, selected document, head), walk the chunks of that
document like the state passes ``kda_fwd_h`` / ``kda_bwd_dh`` do, keep their state in fp32 registers,
take fp32-operand dots (16-bit stored pieces are widened; ``PREC`` "ieee", "tf32x3" or "tf32": the
transition is a product of up to thousands of chunk maps, so its running product stays fp32, never
bf16; a tf32 dot rounds its operands to 10 mantissa bits, and the decay forgets those errors), and
store only the final state:

  kda_cp_transition  [M | E] of a document: X = [I or 0 | 0] (dk x (dk + dv)), per chunk
                     X <- e^{G_last} X + kg^T ([0 | U] - W X).
  kda_cp_entry_grad  the gradient of a document's entering state through its own outputs (zero
                     final-state gradient), reverse over chunks:
                     dv_new = A_qk^T dO + kg dS,  dS <- e^{G_last} dS + (q e^G)^T dO - W^T dv_new.

The PyTorch reference of both is parallel/context/kda_prepass.py; the tests compare the two paths
through whole CP runs (tests/parallel/test_context_parallel.py).
"""
import torch
import triton
import triton.language as tl

from kernels.kda.chunk_fwd import CHUNK, _doc_chunks
from kernels.kda.options import KDAOptions


@triton.jit
def kda_cp_transition_kernel(Kg, Gc, W, U, with_m, docs, out, cu_seqlens, chunk_offsets,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2)
    bos, eos, c_first, n_chunks = _doc_chunks(cu_seqlens, chunk_offsets, tl.load(docs + i_s).to(tl.int64))
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    col = i_v * BV + tl.arange(0, BV)          # column of [M | E]
    m_k = dk < K
    in_e = (col >= K) & (col < K + V)
    identity = (dk[:, None] == col[None, :]) & (tl.load(with_m + i_s) != 0)
    b_x = tl.where(identity, 1., 0.).to(tl.float32)
    for c in range(0, n_chunks):
        cbase = ((c_first + c) * H + i_h) * CHUNK
        b_w = tl.load(W + (cbase + r64)[:, None] * K + dk[None, :], mask=m_k[None, :], other=0.).to(tl.float32)
        b_u = tl.load(U + (cbase + r64)[:, None] * V + (col - K)[None, :], mask=in_e[None, :], other=0.)
        b_vn = b_u - tl.dot(b_w, b_x, input_precision=PREC)
        b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=m_k, other=0.)
        b_kgT = tl.load(Kg + (cbase + r64)[None, :] * K + dk[:, None], mask=m_k[:, None], other=0.).to(tl.float32)
        b_x = b_x * tl.exp(b_gl)[:, None] + tl.dot(b_kgT, b_vn, input_precision=PREC)
    width = K + V
    tl.store(out + (i_s * H + i_h) * K * width + dk[:, None] * width + col[None, :], b_x,
             mask=m_k[:, None] & (col[None, :] < width))


@triton.jit
def kda_cp_entry_grad_kernel(Qg, Kg, Gc, Aqk, W, do, docs, out, cu_seqlens, chunk_offsets,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2)
    bos, eos, c_first, n_chunks = _doc_chunks(cu_seqlens, chunk_offsets, tl.load(docs + i_s).to(tl.int64))
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    m_k = dk < K
    m_v = dv < V
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, n_chunks):
        c_rev = n_chunks - 1 - c
        cbase = ((c_first + c_rev) * H + i_h) * CHUNK
        t0 = bos + c_rev * CHUNK
        valid = r64 < eos - t0
        tok = (t0 + r64) * H + i_h
        b_do = tl.load(do + tok[:, None] * V + dv[None, :], mask=valid[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_a = tl.load(Aqk + (cbase + r64)[:, None] * CHUNK + r64[None, :])
        b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=m_k, other=0.)
        b_kg = tl.load(Kg + (cbase + r64)[:, None] * K + dk[None, :], mask=m_k[None, :], other=0.).to(tl.float32)
        b_dvn = tl.dot(tl.trans(b_a), b_do, input_precision=PREC) + tl.dot(b_kg, b_ds, input_precision=PREC)
        kT = (cbase + r64)[None, :] * K + dk[:, None]
        b_wT = tl.load(W + kT, mask=m_k[:, None], other=0.).to(tl.float32)
        b_qgT = tl.load(Qg + kT, mask=m_k[:, None], other=0.).to(tl.float32)
        b_ds = (b_ds * tl.exp(b_gl)[:, None] + tl.dot(b_qgT, b_do, input_precision=PREC)
                - tl.dot(b_wT, b_dvn, input_precision=PREC))
    tl.store(out + (i_s * H + i_h) * K * V + dk[:, None] * V + dv[None, :], b_ds, mask=m_k[:, None] & m_v[None, :])


def _prec(device, options: KDAOptions | None, op_prec: str | None) -> str:
    """Dot precision: exact fp32 in the interpreter and where the op itself takes exact dots (fp32
    inputs: ``op_prec`` "ieee"); otherwise ``options.cp_precision`` (default tf32)."""
    if device.type != "cuda" or op_prec == "ieee":
        return "ieee"
    return (options or KDAOptions()).cp_precision


def _launch(name: str, options: KDAOptions | None) -> tuple[int, dict]:
    """(column block BV, num_warps / num_stages) of pre-pass kernel ``name`` (KDAOptions.launch: a
    small column block gives more programs for the few documents x heads of a shard)."""
    entry = (options or KDAOptions()).launch_entry(name)
    return entry["BV"], {key: entry[key] for key in ("num_warps", "num_stages")}


def _device_ints(values, device) -> torch.Tensor:
    return values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.int32, device=device)


def transition_pairs(pieces: dict, cu, offsets, docs, with_transition,
                     options: KDAOptions | None = None) -> torch.Tensor:
    """[len(docs), H, K, K + V] fp32: [M | E] of the local documents ``docs`` (see module doc);
    ``docs`` / ``with_transition``: int32 device tensors (or lists) of document indices and 0/1 flags."""
    Gc, W, U, Kg = pieces["Gc"], pieces["W"], pieces["U"], pieces["Kg"]
    H, K, V = W.shape[1], W.shape[3], U.shape[3]
    docs, flags = _device_ints(docs, W.device), _device_ints(with_transition, W.device)
    out = torch.empty(docs.numel(), H, K, K + V, dtype=torch.float32, device=W.device)
    BK = max(16, triton.next_power_of_2(K))
    BV, cfg = _launch("cp_transition", options)
    kda_cp_transition_kernel[(triton.cdiv(K + V, BV), docs.numel(), H)](
        Kg, Gc, W, U, flags, docs, out, cu, offsets, H=H, K=K, V=V, BK=BK, BV=BV,
        PREC=_prec(W.device, options, pieces.get("prec")), **cfg)
    return out


def entry_state_gradients(pieces: dict, do: torch.Tensor, cu, offsets, docs,
                          options: KDAOptions | None = None) -> torch.Tensor:
    """[len(docs), H, K, V] fp32: gradient of each document's entering state through its outputs."""
    Gc, Aqk, W, Qg, Kg = pieces["Gc"], pieces["Aqk"], pieces["W"], pieces["Qg"], pieces["Kg"]
    H, K, V = W.shape[1], W.shape[3], do.shape[-1]
    docs = _device_ints(docs, W.device)
    out = torch.empty(docs.numel(), H, K, V, dtype=torch.float32, device=W.device)
    BK = max(16, triton.next_power_of_2(K))
    BV, cfg = _launch("cp_entry_grad", options)
    kda_cp_entry_grad_kernel[(triton.cdiv(V, BV), docs.numel(), H)](
        Qg, Kg, Gc, Aqk, W, do, docs, out, cu, offsets, H=H, K=K, V=V, BK=BK, BV=BV,
        PREC=_prec(W.device, options, pieces.get("prec")), **cfg)
    return out
