"""Triton backward of chunkwise KDA. Layouts as in chunk_fwd.py.

Per chunk, with S the state entering it and S' the state leaving it (q already scaled):
  v_new = U - W S,  O = (q e^G) S + A_qk v_new,  S' = e^{G_last} S + (k e^{G_last-G})^T v_new,
  W = Ainv X, U = Ainv Y, X = beta k e^G, Y = beta v, Ainv = (I + diag(beta) B_kk)^-1.

Kernels:
  kda_bwd_dh     per (doc, head, V-block), reverse over chunks: dS' of every chunk,
                 dv_new = A_qk^T dO + kg dS', dS = e^{G_last} dS' + (q e^G)^T dO - W^T dv_new.
  kda_bwd_chunk_dk  per (chunk, head, 64-wide Dk block): the contractions over V with the
                 states (d(q e^G), dW, dkg, dG_last), dX = Ainv^T dW, partial dq / dk / dG, and
                 the block's fp32 partials of dAinv (dW X^T) and dbeta.
  kda_bwd_chunk_wy per (chunk, head), after kda_bwd_chunk_dk: dA_qk, dY -> dv, dbeta, the sum
                 of the Dk blocks' partials, dAinv -> dA_kk -> dB_kk.
  kda_bwd_intra  per (chunk, head, Dk-slice): backward of the gated products A_qk and B_kk
                 (sub-chunks of 16 with reference rows, exact diagonal blocks), then the reverse
                 chunk-local cumsum dG -> d log-decay.
  kda_gate_bwd   per (chunk, head), only for the fused gate: d log-decay -> d raw gate, and
                 per-chunk partial sums of d A_log and d dt_bias.
"""
import triton
import triton.language as tl

from kernels.kda.chunk_fwd import (CHUNK, _chunk_and_part, _chunk_coords, _chunk_rows, _diag_block_decay,
                                   _diag_tile_scales, _doc_chunks)
from kernels.kda.gate import gate_backward


@triton.jit
def kda_bwd_dh_kernel(Qg, Kg, Gc, Aqk, W, do, dht, dh, dVn, dh0, cu_seqlens, chunk_offsets,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr,
                      PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2)
    bos, eos, c_first, n_chunks = _doc_chunks(cu_seqlens, chunk_offsets, i_n)
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    m_kv = (dk[:, None] < K) & (dv[None, :] < V)
    m_k = dk[None, :] < K
    state_off = dk[:, None] * V + dv[None, :]
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += tl.load(dht + (i_n * H + i_h) * K * V + state_off, mask=m_kv, other=0.)
    for c in range(0, n_chunks):
        c_rev = n_chunks - 1 - c
        i_c = c_first + c_rev
        cbase = (i_c * H + i_h) * CHUNK
        t0 = bos + c_rev * CHUNK
        valid = r64 < eos - t0
        tok = (t0 + r64) * H + i_h
        tl.store(dh + (i_c * H + i_h) * K * V + state_off, b_ds.to(dh.dtype.element_ty), mask=m_kv)
        b_do = tl.load(do + tok[:, None] * V + dv[None, :], mask=valid[:, None] & (dv[None, :] < V),
                       other=0.).to(tl.float32)
        b_a = tl.load(Aqk + (cbase + r64)[:, None] * CHUNK + r64[None, :])
        b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=dk < K, other=0.)
        b_kg = tl.load(Kg + (cbase + r64)[:, None] * K + dk[None, :], mask=m_k, other=0.)
        # bf16 inputs: q e^G, kg, W, dh are bf16 (bf16 tensor-core dots); the rest fp32
        b_dvn = (tl.dot(tl.trans(b_a), b_do, input_precision=PREC)
                 + tl.dot(b_kg, b_ds.to(b_kg.dtype), input_precision=PREC))
        tl.store(dVn + (cbase + r64)[:, None] * V + dv[None, :], b_dvn, mask=dv[None, :] < V)
        # W^T and (q e^G)^T loaded transposed: no tl.trans of a 16-bit dot operand
        kT = (cbase + r64)[None, :] * K + dk[:, None]
        b_wT = tl.load(W + kT, mask=dk[:, None] < K, other=0.)
        b_qgT = tl.load(Qg + kT, mask=dk[:, None] < K, other=0.)
        b_ds = (b_ds * tl.exp(b_gl)[:, None]
                + tl.dot(b_qgT, b_do.to(b_qgT.dtype), input_precision=PREC)
                - tl.dot(b_wT, b_dvn.to(b_wT.dtype), input_precision=PREC))
    if HAS_H0:
        tl.store(dh0 + (i_n * H + i_h) * K * V + state_off, b_ds, mask=m_kv)


@triton.jit
def _bwd_dh_half_step(b_ds, b_do, b_dvn, Qg, W, Gc, cbase, r64, dk, K: tl.constexpr, PREC: tl.constexpr):
    """dS = e^{G_last} dS' + (q e^G)^T dO - W^T dv_new on the Dk rows ``dk`` (64 of them)."""
    b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk)
    kT = (cbase + r64)[None, :] * K + dk[:, None]
    b_wT = tl.load(W + kT)
    b_qgT = tl.load(Qg + kT)
    return (b_ds * tl.exp(b_gl)[:, None] + tl.dot(b_qgT, b_do.to(b_qgT.dtype), input_precision=PREC)
            - tl.dot(b_wT, b_dvn.to(b_wT.dtype), input_precision=PREC))


@triton.jit
def kda_bwd_dh_split_kernel(Qg, Kg, Gc, Aqk, W, do, dht, dh, dVn, dh0, cu_seqlens, chunk_offsets,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                            HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """``kda_bwd_dh_kernel`` at Dk = 128 with the state gradient as two [64, BV] halves, so every
    dot has 64 rows (an experiment: the [128, 64] x [64, BV] dot of the whole-Dk kernel crashes with
    4 warps on Hopper; launch option ``split_k=2``)."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2)
    bos, eos, c_first, n_chunks = _doc_chunks(cu_seqlens, chunk_offsets, i_n)
    r64 = tl.arange(0, CHUNK)
    d1 = tl.arange(0, 64)
    d2 = 64 + d1
    dv = i_v * BV + tl.arange(0, BV)
    m_v = dv[None, :] < V
    off1 = d1[:, None] * V + dv[None, :]
    off2 = d2[:, None] * V + dv[None, :]
    state = (i_n * H + i_h) * K * V
    b_ds1 = tl.zeros([64, BV], dtype=tl.float32)
    b_ds2 = tl.zeros([64, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds1 += tl.load(dht + state + off1, mask=m_v, other=0.)
        b_ds2 += tl.load(dht + state + off2, mask=m_v, other=0.)
    for c in range(0, n_chunks):
        c_rev = n_chunks - 1 - c
        i_c = c_first + c_rev
        cbase = (i_c * H + i_h) * CHUNK
        t0 = bos + c_rev * CHUNK
        valid = r64 < eos - t0
        tok = (t0 + r64) * H + i_h
        chunk_state = (i_c * H + i_h) * K * V
        tl.store(dh + chunk_state + off1, b_ds1.to(dh.dtype.element_ty), mask=m_v)
        tl.store(dh + chunk_state + off2, b_ds2.to(dh.dtype.element_ty), mask=m_v)
        b_do = tl.load(do + tok[:, None] * V + dv[None, :], mask=valid[:, None] & m_v, other=0.).to(tl.float32)
        b_a = tl.load(Aqk + (cbase + r64)[:, None] * CHUNK + r64[None, :])
        b_kg1 = tl.load(Kg + (cbase + r64)[:, None] * K + d1[None, :])
        b_kg2 = tl.load(Kg + (cbase + r64)[:, None] * K + d2[None, :])
        b_dvn = (tl.dot(tl.trans(b_a), b_do, input_precision=PREC)
                 + tl.dot(b_kg1, b_ds1.to(b_kg1.dtype), input_precision=PREC)
                 + tl.dot(b_kg2, b_ds2.to(b_kg2.dtype), input_precision=PREC))
        tl.store(dVn + (cbase + r64)[:, None] * V + dv[None, :], b_dvn, mask=m_v)
        b_ds1 = _bwd_dh_half_step(b_ds1, b_do, b_dvn, Qg, W, Gc, cbase, r64, d1, K, PREC)
        b_ds2 = _bwd_dh_half_step(b_ds2, b_do, b_dvn, Qg, W, Gc, cbase, r64, d2, K, PREC)
    if HAS_H0:
        tl.store(dh0 + state + off1, b_ds1, mask=m_v)
        tl.store(dh0 + state + off2, b_ds2, mask=m_v)


@triton.jit
def _bwd_x_cols(k, Gc, b_beta, tok, cbase, valid, r64, dk, K: tl.constexpr):
    """X = beta k e^G on the columns dk of a chunk."""
    m_k = dk[None, :] < K
    b_G = tl.load(Gc + (cbase + r64)[:, None] * K + dk[None, :], mask=m_k, other=0.)
    b_k = tl.load(k + tok[:, None] * K + dk[None, :], mask=valid[:, None] & m_k, other=0.).to(tl.float32)
    return b_k * tl.exp(b_G) * b_beta[:, None]


@triton.jit
def _bwd_dk_cols_out(b_dqg, b_dw, b_dkg, b_dgl, q, k, Gc, Ainv, dq_p, dk_p, dG_p, b_beta, tok, cbase, valid,
                     r64, dk, K: tl.constexpr, PREC: tl.constexpr):
    """From the V contractions of the columns dk (d(q e^G), dW, dkg, dG_last): dX = Ainv^T dW,
    the partial dq / dk / dG of these columns (stored), and their share of dbeta (returned)."""
    m_k = dk[None, :] < K
    out = (cbase + r64)[:, None] * K + dk[None, :]
    b_G = tl.load(Gc + out, mask=m_k, other=0.)
    e_G = tl.exp(b_G)
    b_k = tl.load(k + tok[:, None] * K + dk[None, :], mask=valid[:, None] & m_k, other=0.).to(tl.float32)
    b_inv = tl.load(Ainv + (cbase + r64)[:, None] * CHUNK + r64[None, :])
    b_dx = tl.dot(tl.trans(b_inv), b_dw, input_precision=PREC)
    b_dbeta = tl.sum(b_dx * b_k * e_G, axis=1)
    b_dxe = b_dx * e_G * b_beta[:, None]               # dk through X = beta k e^G
    b_dG = b_dxe * b_k
    tl.store(dq_p + out, b_dqg * e_G, mask=m_k)
    b_q = tl.load(q + tok[:, None] * K + dk[None, :], mask=valid[:, None] & m_k, other=0.).to(tl.float32)
    b_dG += b_dqg * b_q * e_G
    b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=dk < K, other=0.)
    b_dkd = b_dkg * tl.exp(b_gl[None, :] - b_G)        # dk through kg = k e^{G_last - G}
    tl.store(dk_p + out, b_dxe + b_dkd, mask=m_k)
    b_dkk = b_dkd * b_k
    extra = tl.sum(b_dkk, axis=0) + b_dgl * tl.exp(b_gl)
    b_dG -= b_dkk
    b_dG = tl.where(r64[:, None] == CHUNK - 1, b_dG + extra[None, :], b_dG)
    tl.store(dG_p + out, b_dG, mask=m_k)
    return b_dbeta


@triton.jit
def _bwd_state_contractions(h, dh, sbase, dk, dvv, b_do, b_dvn, b_vn, b_dqg, b_dw, b_dkg, b_dgl,
                            K: tl.constexpr, V: tl.constexpr, PREC: tl.constexpr):
    """One V-block's share of d(q e^G) = dO S^T, dW = -dv_new S^T, dkg = v_new dS'^T and dG_last on
    the columns dk, added to the accumulators. States are bf16 for bf16 inputs (bf16 tensor-core
    dots, fp32 accumulation), loaded as [BV, |dk|] (S^T) directly: no tl.trans of a 16-bit dot operand."""
    sT = sbase + dk[None, :] * V + dvv[:, None]
    m_vk = (dk[None, :] < K) & (dvv[:, None] < V)
    b_hT = tl.load(h + sT, mask=m_vk, other=0.)
    b_dhT = tl.load(dh + sT, mask=m_vk, other=0.)
    b_dqg += tl.dot(b_do.to(b_hT.dtype), b_hT, input_precision=PREC)
    b_dw -= tl.dot(b_dvn.to(b_hT.dtype), b_hT, input_precision=PREC)
    b_dkg += tl.dot(b_vn.to(b_dhT.dtype), b_dhT, input_precision=PREC)
    b_dgl += tl.sum(b_dhT.to(tl.float32) * b_hT.to(tl.float32), axis=0)
    return b_dqg, b_dw, b_dkg, b_dgl


@triton.jit
def _v_block_loads(do, Vn, dVn, tok, cbase, valid, r64, dvv, V: tl.constexpr):
    """dO (token layout, fp32) and v_new, dv_new (padded layout) of a chunk on the V columns dvv."""
    m_v = dvv[None, :] < V
    b_do = tl.load(do + tok[:, None] * V + dvv[None, :], mask=valid[:, None] & m_v, other=0.).to(tl.float32)
    b_vn = tl.load(Vn + (cbase + r64)[:, None] * V + dvv[None, :], mask=m_v, other=0.)
    b_dvn = tl.load(dVn + (cbase + r64)[:, None] * V + dvv[None, :], mask=m_v, other=0.)
    return b_do, b_vn, b_dvn


@triton.jit
def kda_bwd_chunk_dk_kernel(q, k, beta, Gc, Ainv, Vn, h, dh, dVn, do, dq_p, dk_p, dG_p, dAinv_p, dbeta_p,
                            cu_seqlens, chunk_info, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BV: tl.constexpr, PREC: tl.constexpr):
    """One 64-wide Dk block of a chunk-head: the terms that contract over V with the states
    (d(q e^G) = dO S^T, dW = -dv_new S^T, dkg = v_new dS'^T, dG_last), then dX = Ainv^T dW,
    the partial dq / dk / dG of the block, and its shares of dAinv (dW X^T) and dbeta, summed
    over the blocks by kda_bwd_chunk_wy. The accumulators are kept as two 32-column halves and
    the epilogue runs per half, so that fewer [CHUNK, 64] tiles are live at once (no spills at 4
    warps in the sm_90 AOT report with fp32 states)."""
    i_c, i_k = _chunk_and_part((K + 63) // 64)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64, valid, tok, cbase = _chunk_rows(bos, L, i_c, i_h, H)
    sbase = (i_c * H + i_h) * K * V
    dk0 = i_k * 64 + tl.arange(0, 32)
    dk1 = dk0 + 32
    b_dqg0 = tl.zeros([CHUNK, 32], dtype=tl.float32)    # d (q e^G)
    b_dw0 = tl.zeros([CHUNK, 32], dtype=tl.float32)     # d W
    b_dkg0 = tl.zeros([CHUNK, 32], dtype=tl.float32)    # d (k e^{G_last - G})
    b_dgl0 = tl.zeros([32], dtype=tl.float32)        # d G_last through e^{G_last} S
    b_dqg1 = tl.zeros([CHUNK, 32], dtype=tl.float32)
    b_dw1 = tl.zeros([CHUNK, 32], dtype=tl.float32)
    b_dkg1 = tl.zeros([CHUNK, 32], dtype=tl.float32)
    b_dgl1 = tl.zeros([32], dtype=tl.float32)
    for v0 in range(0, V, BV):
        dvv = v0 + tl.arange(0, BV)
        b_do, b_vn, b_dvn = _v_block_loads(do, Vn, dVn, tok, cbase, valid, r64, dvv, V)
        b_dqg0, b_dw0, b_dkg0, b_dgl0 = _bwd_state_contractions(h, dh, sbase, dk0, dvv, b_do, b_dvn, b_vn, b_dqg0,
                                                                b_dw0, b_dkg0, b_dgl0, K, V, PREC)
        b_dqg1, b_dw1, b_dkg1, b_dgl1 = _bwd_state_contractions(h, dh, sbase, dk1, dvv, b_do, b_dvn, b_vn, b_dqg1,
                                                                b_dw1, b_dkg1, b_dgl1, K, V, PREC)
    b_beta = tl.load(beta + tok, mask=valid, other=0.).to(tl.float32)
    # this block's shares of the sums over Dk: row block i_k of [NC, H, cdiv(K, 64), CHUNK, X]
    pbase = ((i_c * H + i_h) * ((K + 63) // 64) + i_k) * CHUNK
    b_pinv = tl.dot(b_dw0, tl.trans(_bwd_x_cols(k, Gc, b_beta, tok, cbase, valid, r64, dk0, K)),
                    input_precision=PREC)
    b_pinv = tl.dot(b_dw1, tl.trans(_bwd_x_cols(k, Gc, b_beta, tok, cbase, valid, r64, dk1, K)), b_pinv,
                    input_precision=PREC)
    tl.store(dAinv_p + (pbase + r64)[:, None] * CHUNK + r64[None, :], b_pinv)
    b_pbeta = _bwd_dk_cols_out(b_dqg0, b_dw0, b_dkg0, b_dgl0, q, k, Gc, Ainv, dq_p, dk_p, dG_p, b_beta, tok,
                               cbase, valid, r64, dk0, K, PREC)
    b_pbeta += _bwd_dk_cols_out(b_dqg1, b_dw1, b_dkg1, b_dgl1, q, k, Gc, Ainv, dq_p, dk_p, dG_p, b_beta, tok,
                                cbase, valid, r64, dk1, K, PREC)
    tl.store(dbeta_p + pbase + r64, b_pbeta)


@triton.jit
def kda_bwd_chunk_wy_kernel(v, beta, Bkk, Ainv, Vn, dVn, do, dAinv_p, dbeta_p, dAqk, dBkk, dv, dbeta,
                            cu_seqlens, chunk_info, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BV: tl.constexpr, PREC: tl.constexpr):
    """The WY backward of a chunk-head: a pass over V (dA_qk, dY -> dv and its dbeta part, its
    dAinv part), plus the Dk blocks' dAinv / dbeta partials of kda_bwd_chunk_dk (launched
    before), then dL = -Ainv^T dAinv Ainv^T -> dB_kk and the rest of dbeta."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64, valid, tok, cbase = _chunk_rows(bos, L, i_c, i_h, H)
    sq = (cbase + r64)[:, None] * CHUNK + r64[None, :]
    b_beta = tl.load(beta + tok, mask=valid, other=0.).to(tl.float32)
    b_inv = tl.load(Ainv + sq)

    # over V: dA_qk = dO v_new^T, dY = Ainv^T dv_new (-> dv, dbeta), dAinv += dv_new Y^T
    b_dA = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    b_dinv = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    b_dbeta = tl.zeros([CHUNK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        dvv = v0 + tl.arange(0, BV)
        m_v = dvv[None, :] < V
        b_v = tl.load(v + tok[:, None] * V + dvv[None, :], mask=valid[:, None] & m_v, other=0.).to(tl.float32)
        b_do, b_vn, b_dvn = _v_block_loads(do, Vn, dVn, tok, cbase, valid, r64, dvv, V)
        b_dA += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        b_dy = tl.dot(tl.trans(b_inv), b_dvn, input_precision=PREC)
        tl.store(dv + tok[:, None] * V + dvv[None, :], b_dy * b_beta[:, None], mask=valid[:, None] & m_v)
        b_dbeta += tl.sum(b_dy * b_v, axis=1)
        b_dinv += tl.dot(b_dvn, tl.trans(b_v * b_beta[:, None]), input_precision=PREC)
    tl.store(dAqk + sq, tl.where(r64[:, None] >= r64[None, :], b_dA, 0.))

    # the Dk blocks' parts: dAinv += dW X^T, dbeta += sum_d dX k e^G (kda_bwd_chunk_dk)
    pbase = (i_c * H + i_h) * ((K + 63) // 64) * CHUNK
    for i_k in tl.static_range(0, (K + 63) // 64):   # the 64-wide Dk blocks
        b_dinv += tl.load(dAinv_p + (pbase + i_k * CHUNK + r64)[:, None] * CHUNK + r64[None, :])
        b_dbeta += tl.load(dbeta_p + pbase + i_k * CHUNK + r64)

    # Ainv = L^-1  =>  dL = -Ainv^T dAinv Ainv^T ; A_kk = diag(beta) B_kk is the strict lower part
    b_dL = -tl.dot(tl.dot(tl.trans(b_inv), b_dinv, input_precision=PREC), tl.trans(b_inv), input_precision=PREC)
    b_dAkk = tl.where(r64[:, None] > r64[None, :], b_dL, 0.)
    b_bkk = tl.load(Bkk + sq)
    b_dbeta += tl.sum(b_dAkk * b_bkk, axis=1)
    tl.store(dbeta + tok, b_dbeta, mask=valid)
    tl.store(dBkk + sq, b_dAkk * b_beta[:, None])


@triton.jit
def kda_bwd_intra_kernel(q, k, Gc, dAqk, dBkk, dq_p, dk_p, dG_p, dq, dk, dg, cu_seqlens, chunk_info,
                         H: tl.constexpr, K: tl.constexpr, BD: tl.constexpr,
                         PREC: tl.constexpr, SPAN: tl.constexpr, CLAMP: tl.constexpr):
    i_c, i_k = _chunk_and_part((K + BD - 1) // BD)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r16 = tl.arange(0, 16)
    cbase = (i_c * H + i_h) * CHUNK
    dd = i_k * BD + tl.arange(0, BD)
    dm = dd[None, :] < K
    carry = tl.zeros([BD], dtype=tl.float32)
    for bb in range(4):
        b = 3 - bb
        rows = b * 16 + r16
        m_rows = (rows < L)[:, None] & dm
        pad_off = (cbase + rows)[:, None] * K + dd[None, :]
        tok_off = ((bos + rows) * H + i_h)[:, None] * K + dd[None, :]
        b_G = tl.load(Gc + pad_off, mask=dm, other=0.)
        b_q = tl.load(q + tok_off, mask=m_rows, other=0.).to(tl.float32)
        b_k = tl.load(k + tok_off, mask=m_rows, other=0.).to(tl.float32)
        b_dq = tl.load(dq_p + pad_off, mask=dm, other=0.)
        b_dk = tl.load(dk_p + pad_off, mask=dm, other=0.)
        b_dG = tl.load(dG_p + pad_off, mask=dm, other=0.)
        if b > 0:
            # this block as rows of A_qk / B_kk against the column blocks j < b; reference row
            # n = 16 b: exp(G_r - G_n) <= 0 on the rows, exp(G_n - G_c) <= 0 on the columns
            b_gn = tl.load(Gc + (cbase + b * 16) * K + dd, mask=dd < K, other=0.)
            acc_q = tl.zeros([16, BD], dtype=tl.float32)
            acc_k = tl.zeros([16, BD], dtype=tl.float32)
            for j in range(b):
                cols = j * 16 + r16
                b_Gj = tl.load(Gc + (cbase + cols)[:, None] * K + dd[None, :], mask=dm, other=0.)
                b_kj = tl.load(k + ((bos + cols) * H + i_h)[:, None] * K + dd[None, :],
                               mask=(cols < L)[:, None] & dm, other=0.).to(tl.float32)
                k_ref = b_kj * tl.exp(b_gn[None, :] - b_Gj)
                t_off = (cbase + rows)[:, None] * CHUNK + cols[None, :]
                acc_q += tl.dot(tl.load(dAqk + t_off), k_ref, input_precision=PREC)
                acc_k += tl.dot(tl.load(dBkk + t_off), k_ref, input_precision=PREC)
            e_row = tl.exp(b_G - b_gn[None, :])
            dq_r = acc_q * e_row
            dk_r = acc_k * e_row
            b_dq += dq_r
            b_dk += dk_r
            b_dG += b_q * dq_r + b_k * dk_r
        if b < 3:
            # this block as columns against the row blocks j > b; reference row m = 16 b + 15
            b_gm = tl.load(Gc + (cbase + b * 16 + 15) * K + dd, mask=dd < K, other=0.)
            acc_c = tl.zeros([16, BD], dtype=tl.float32)
            for j in range(b + 1, 4):
                rws = j * 16 + r16
                b_Gj = tl.load(Gc + (cbase + rws)[:, None] * K + dd[None, :], mask=dm, other=0.)
                m_j = (rws < L)[:, None] & dm
                tok_j = ((bos + rws) * H + i_h)[:, None] * K + dd[None, :]
                b_qj = tl.load(q + tok_j, mask=m_j, other=0.).to(tl.float32)
                b_kj = tl.load(k + tok_j, mask=m_j, other=0.).to(tl.float32)
                e_low = tl.exp(b_Gj - b_gm[None, :])
                t_off = (cbase + rws)[:, None] * CHUNK + rows[None, :]
                acc_c += (tl.dot(tl.trans(tl.load(dAqk + t_off)), b_qj * e_low, input_precision=PREC)
                          + tl.dot(tl.trans(tl.load(dBkk + t_off)), b_kj * e_low, input_precision=PREC))
            dk_c = acc_c * tl.exp(b_gm[None, :] - b_G)
            b_dk += dk_c
            b_dG -= b_k * dk_c
        # diagonal block. Decay over the block at most SPAN: reference row n = 16 b on both sides
        # (exponents within [-SPAN, SPAN], see kda_fwd_intra_kernel), four tensor-core dots.
        # Otherwise exact, without cross-row reductions: step j is column j for the rows r >= j
        # (dq, dk row side: exp(G_r - G_j)) and row j for the columns c <= j (dk column side:
        # exp(G_j - G_c)); one exp per element serves both, all exponents <= 0.
        dq_d = tl.zeros([16, BD], dtype=tl.float32)
        dkr_d = tl.zeros([16, BD], dtype=tl.float32)
        dkc_d = tl.zeros([16, BD], dtype=tl.float32)
        if CLAMP > 0:   # KDAOptions.diag_decay_clamp: every tile on tensor cores
            fits = True
        else:
            b_g0, fits = _diag_block_decay(Gc, cbase + b * 16, dd, K, SPAN)
        if fits:
            t_off = (cbase + rows)[:, None] * CHUNK + rows[None, :]
            dA_d = tl.where(r16[:, None] >= r16[None, :], tl.load(dAqk + t_off), 0.)
            dB_d = tl.where(r16[:, None] > r16[None, :], tl.load(dBkk + t_off), 0.)
            if CLAMP > 0:   # the forward's scales: clamped steps around the tile's midpoint
                e_row, e_col = _diag_tile_scales(Gc, b_G, cbase + b * 16, dd, K, CLAMP)
            else:
                e_row = tl.exp(b_G - b_g0[None, :])
                e_col = tl.exp(b_g0[None, :] - b_G)
            k_col = b_k * e_col
            dq_d += tl.dot(dA_d, k_col, input_precision=PREC) * e_row
            dkr_d += tl.dot(dB_d, k_col, input_precision=PREC) * e_row
            dkc_d += (tl.dot(tl.trans(dA_d), b_q * e_row, input_precision=PREC)
                      + tl.dot(tl.trans(dB_d), b_k * e_row, input_precision=PREC)) * e_col
        else:
            for j in range(16):
                row_j = b * 16 + j
                m_j = (dd < K) & (dd * 0 + row_j < L)
                tok_j = ((bos + row_j) * H + i_h) * K + dd
                b_kj = tl.load(k + tok_j, mask=m_j, other=0.).to(tl.float32)
                b_qj = tl.load(q + tok_j, mask=m_j, other=0.).to(tl.float32)
                b_gj = tl.load(Gc + (cbase + row_j) * K + dd, mask=dd < K, other=0.)
                dA_col = tl.load(dAqk + (cbase + rows) * CHUNK + row_j)
                dB_col = tl.load(dBkk + (cbase + rows) * CHUNK + row_j)
                dA_row = tl.load(dAqk + (cbase + row_j) * CHUNK + rows)
                dB_row = tl.load(dBkk + (cbase + row_j) * CHUNK + rows)
                x = b_G - b_gj[None, :]
                below = (r16 >= j)[:, None]
                e = tl.exp(tl.where(below, x, -x))
                e_lo = tl.where(below, e, 0.)
                e_hi = tl.where((r16 <= j)[:, None], e, 0.)
                ek = e_lo * b_kj[None, :]
                dq_d += dA_col[:, None] * ek
                dkr_d += dB_col[:, None] * ek
                dkc_d += (dA_row[:, None] * b_qj[None, :] + dB_row[:, None] * b_kj[None, :]) * e_hi
        b_dq += dq_d
        b_dk += dkr_d + dkc_d
        b_dG += b_q * dq_d + b_k * (dkr_d - dkc_d)
        # G_r = sum_{i<=r} g_i  =>  dg_i = sum_{r>=i} dG_r (within the chunk)
        b_dg = tl.cumsum(b_dG, axis=0, reverse=True) + carry[None, :]
        carry += tl.sum(b_dG, axis=0)
        tl.store(dq + tok_off, b_dq, mask=m_rows)
        tl.store(dk + tok_off, b_dk, mask=m_rows)
        tl.store(dg + tok_off, b_dg, mask=m_rows)


@triton.jit
def kda_gate_bwd_kernel(dglog, g, A_log, dt_bias, lower_bound, dg, d_bias_p, dA_p, cu_seqlens, chunk_info,
                        H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr):
    """Per (chunk, head): back through the fused gate activation, d log-decay -> d raw gate (in
    the raw gate's dtype), and the chunk's partial sums of d dt_bias and d A_log. A pass of its
    own: inside kda_bwd_intra, whose registers are full, it cost three times as much (0.76 ms
    against ~0.15 at 8x4096, H 16, D 128 on the H200)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    m = (r64 < L)[:, None] & (dk[None, :] < K)
    off = ((bos + r64) * H + i_h)[:, None] * K + dk[None, :]
    b_dglog = tl.load(dglog + off, mask=m, other=0.)
    b_x = tl.load(g + off, mask=m, other=0.).to(tl.float32)
    b_dg, dA_el = gate_backward(b_dglog, b_x, A_log, dt_bias, lower_bound, i_h, dk, K, GATE)
    b_dg = tl.where(m, b_dg, 0.)
    tl.store(dg + off, b_dg.to(dg.dtype.element_ty), mask=m)
    tl.store(d_bias_p + (i_c * H + i_h) * K + dk, tl.sum(b_dg, axis=0), mask=dk < K)
    tl.store(dA_p + (i_c * H + i_h) * K + dk, tl.sum(tl.where(m, dA_el, 0.), axis=0), mask=dk < K)
