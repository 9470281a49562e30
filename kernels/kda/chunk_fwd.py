"""Triton forward of chunkwise KDA (docs/architecture.md, "Chunkwise algorithm"): chunks of
CHUNK_SIZE = 64 tokens (kernels/kda/options.py), sub-chunks of 16.

Buffers: inputs/outputs use the token layout [T_total, H, D] (B folded into T, documents
delimited by cu_seqlens). Per-chunk intermediates use a padded chunk layout
[NC, H, CHUNK, X] (NC = number of chunks over all documents): rows past a document's end hold
G = G_last, zeros elsewhere, so later kernels need no row masks on them.

Kernels:
  kda_fwd_cumsum  per (chunk, head): optional gate activation, chunk-local cumsum -> G.
  kda_fwd_intra   per (chunk, head, 16-row block): gated products A_qk (j <= r) and B_kk
                  (j < r, beta not folded).
  kda_fwd_wy      per (chunk, head): (I + diag(beta) B_kk)^-1; W = Ainv (beta k e^G),
                  U = Ainv (beta v); q e^G and k e^{G_last - G}.
  kda_fwd_h       per (doc, head, V-block): sequential state pass, fp32 state in registers;
                  stores the state entering every chunk and v_new = U - W S.
  kda_fwd_o       per (chunk, head, V-block): o = (q e^G) S + A_qk v_new.
All exponents are differences G_r - G_j with r >= j, or taken against a reference row n of
the sub-chunk (G_r - G_n <= 0, G_n - G_j <= 0), so nothing can overflow.
"""
import triton
import triton.language as tl

from kernels.kda.gate import gate_log_decay
from kernels.kda.options import CHUNK_SIZE

# the chunk length inside the kernels; their tiling is written for 4 row blocks of 16
assert CHUNK_SIZE == 4 * 16, "the Triton KDA kernels tile a chunk as 4 blocks of 16 rows"
CHUNK: tl.constexpr = tl.constexpr(CHUNK_SIZE)


@triton.jit
def _chunk_coords(cu_seqlens, chunk_info, i_c):
    """(first token, number of valid rows) of global chunk i_c, as int64."""
    i_n = tl.load(chunk_info + i_c * 2).to(tl.int64)
    i_cc = tl.load(chunk_info + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64) + i_cc * CHUNK
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos, tl.minimum(eos - bos, CHUNK)


@triton.jit
def _doc_chunks(cu_seqlens, chunk_offsets, i_n):
    """(first token, end, first global chunk, number of chunks) of document i_n, as int64."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c_first = tl.load(chunk_offsets + i_n).to(tl.int64)
    return bos, eos, c_first, tl.cdiv(eos - bos, CHUNK)


@triton.jit
def _chunk_rows(bos, L, i_c, i_h, H: tl.constexpr):
    """A chunk-head's 64 rows: their index, which are valid tokens, their token-layout row
    (token * H + head) and the padded-layout row of chunk row 0."""
    r64 = tl.arange(0, CHUNK)
    return r64, r64 < L, (bos + r64) * H + i_h, (i_c * H + i_h) * CHUNK


@triton.jit
def _chunk_and_part(N_PARTS: tl.constexpr):
    """(chunk as int64, part) of a program on a (chunks * N_PARTS, heads) grid. The parts of one
    chunk-head (row blocks, Dk or V slices) are adjacent program ids, so they run together and
    share that chunk's tiles in L2; axis 0 also has no 65535 limit for long inputs."""
    pid = tl.program_id(0)
    return (pid // N_PARTS).to(tl.int64), pid % N_PARTS


@triton.jit
def _tile(ptr, cbase, i: tl.constexpr, j: tl.constexpr):
    """16x16 tile (block row i, block column j) of a per-chunk [64, 64] matrix."""
    r16 = tl.arange(0, 16)
    return tl.load(ptr + (cbase + i * 16 + r16)[:, None] * CHUNK + j * 16 + r16[None, :])


@triton.jit
def _store_tile(ptr, cbase, i: tl.constexpr, j: tl.constexpr, x):
    r16 = tl.arange(0, 16)
    tl.store(ptr + (cbase + i * 16 + r16)[:, None] * CHUNK + j * 16 + r16[None, :], x)


@triton.jit
def _beta_rows(beta, bos, L, H: tl.constexpr, i_h, i: tl.constexpr):
    """beta of the 16 rows of block i as a [16, 1] column (0 past the document end)."""
    rows = i * 16 + tl.arange(0, 16)
    return tl.load(beta + (bos + rows) * H + i_h, mask=rows < L, other=0.).to(tl.float32)[:, None]


@triton.jit
def kda_fwd_cumsum_kernel(g, A_log, dt_bias, lower_bound, Gc, cu_seqlens, chunk_info,
                          H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr):
    """Per (chunk, head): optional gate activation, chunk-local inclusive cumsum -> Gc (fp32);
    padded rows keep G_last."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    m_k = (r64 < L)[:, None] & (dk[None, :] < K)
    b_g = tl.load(g + ((bos + r64) * H + i_h)[:, None] * K + dk[None, :], mask=m_k, other=0.).to(tl.float32)
    if GATE != 0:   # g is the raw gate projection: compute the log-decay here (fp32)
        b_g = tl.where(m_k, gate_log_decay(b_g, A_log, dt_bias, lower_bound, i_h, dk, K, GATE), 0.)
    b_G = tl.cumsum(b_g, axis=0)
    tl.store(Gc + ((i_c * H + i_h) * CHUNK + r64)[:, None] * K + dk[None, :], b_G, mask=dk[None, :] < K)


@triton.jit
def _diag_block_decay(Gc, row0, dd, K, SPAN: tl.constexpr):
    """G of a 16-row block's first row (padded layout row ``row0``) on Dk slice ``dd``, and whether
    the slice decays by at most SPAN over the block (its diagonal tile may then take tensor cores)."""
    b_g0 = tl.load(Gc + row0 * K + dd, mask=dd < K, other=0.)
    b_g15 = tl.load(Gc + (row0 + 15) * K + dd, mask=dd < K, other=0.)
    return b_g0, tl.max(b_g0 - b_g15, axis=0) <= SPAN


@triton.jit
def _diag_tile_scales(Gc, b_G, row0, dd, K, CLAMP: tl.constexpr):
    """exp(G~_r - m) and exp(m - G~_r) for the 16 rows of a block (``b_G``: their G on Dk slice
    ``dd``, padded layout from row ``row0``). G~ is G with every per-token step clamped at -CLAMP,
    m the midpoint of its range, so each exponent lies within [-7.5 CLAMP, 7.5 CLAMP] and for
    r >= c the product of the two is exp(G_r - G_c) unless a step between them was clamped (both
    below e^-CLAMP then). Steps are differences of neighbouring rows, summed again in registers:
    as exact as the direct difference."""
    r16 = tl.arange(0, 16)
    prev = tl.load(Gc + (row0 + r16 - 1)[:, None] * K + dd[None, :], mask=(r16 > 0)[:, None] & (dd < K)[None, :],
                   other=0.)
    step = tl.where((r16 > 0)[:, None], tl.maximum(b_G - prev, -CLAMP), 0.)
    b_Gt = tl.cumsum(step, axis=0)
    mid = 0.5 * tl.sum(step, axis=0)
    return tl.exp(b_Gt - mid[None, :]), tl.exp(mid[None, :] - b_Gt)


@triton.jit
def kda_fwd_intra_kernel(q, k, Gc, Aqk, Bkk, cu_seqlens, chunk_info,
                         H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                         PREC: tl.constexpr, SPAN: tl.constexpr, CLAMP: tl.constexpr):
    """Per (chunk, head, 16-row block i): rows 16i..16i+15 of A_qk and B_kk (one program per
    block so that the four blocks of a chunk run in parallel). SPAN: the largest decay
    G_16i - G_16i+15 over a block's Dk slice for which its diagonal tile takes tensor cores."""
    i_c, i = _chunk_and_part(4)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r16 = tl.arange(0, 16)
    cbase = (i_c * H + i_h) * CHUNK                  # padded-layout row of chunk row 0
    rows = i * 16 + r16
    m_rows = (rows < L)[:, None]
    tok_i = ((bos + rows) * H + i_h)[:, None] * K
    pad_i = (cbase + rows)[:, None] * K
    # off-diagonal 16x16 tiles (i, j < i), reference row n = 16 i: exp(G_r - G_n) <= 0 on the
    # rows, exp(G_n - G_c) <= 0 on the columns; tensor-core dots over BD-wide Dk slices
    for j in range(i):
        cols = j * 16 + r16
        tok_j = ((bos + cols) * H + i_h)[:, None] * K
        acc_qk = tl.zeros([16, 16], dtype=tl.float32)
        acc_kk = tl.zeros([16, 16], dtype=tl.float32)
        for d0 in range(0, BK, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < K)[None, :]
            b_gn = tl.load(Gc + (cbase + i * 16) * K + dd, mask=dd < K, other=0.)
            e_row = tl.exp(tl.load(Gc + pad_i + dd[None, :], mask=dm, other=0.) - b_gn[None, :])
            b_qi = tl.load(q + tok_i + dd[None, :], mask=m_rows & dm, other=0.).to(tl.float32)
            b_ki = tl.load(k + tok_i + dd[None, :], mask=m_rows & dm, other=0.).to(tl.float32)
            b_Gj = tl.load(Gc + (cbase + cols)[:, None] * K + dd[None, :], mask=dm, other=0.)
            b_kj = tl.load(k + tok_j + dd[None, :], mask=(cols < L)[:, None] & dm, other=0.).to(tl.float32)
            k_ref = tl.trans(b_kj * tl.exp(b_gn[None, :] - b_Gj))
            acc_qk += tl.dot(b_qi * e_row, k_ref, input_precision=PREC)
            acc_kk += tl.dot(b_ki * e_row, k_ref, input_precision=PREC)
        off = (cbase + rows)[:, None] * CHUNK + cols[None, :]
        tl.store(Aqk + off, acc_qk)
        tl.store(Bkk + off, acc_kk)
    # tiles right of the diagonal are zero (later kernels read whole rows)
    zero = tl.zeros([16, 16], dtype=tl.float32)
    for j in range(i + 1, 4):
        off = (cbase + rows)[:, None] * CHUNK + (j * 16 + r16)[None, :]
        tl.store(Aqk + off, zero)
        tl.store(Bkk + off, zero)
    # diagonal tile. Where the slice's decay over the block is at most SPAN, one reference row
    # n = 16 i serves both sides: exp(G_r - G_n) in [e^-SPAN, 1], exp(G_n - G_c) in [1, e^SPAN],
    # finite and normal in fp32/tf32, and each product is exp(G_r - G_c) to rounding, so the tile
    # is two tensor-core dots. Stronger decay (the unbounded gate) takes the exact column loop:
    # column c uses exp(G_r - G_c) for rows r >= c only. With CLAMP (diag_decay_clamp) every tile
    # takes the dots, on the clamped steps around the tile's midpoint (_diag_tile_scales).
    dg_qk = tl.zeros([16, 16], dtype=tl.float32)
    dg_kk = tl.zeros([16, 16], dtype=tl.float32)
    for d0 in range(0, BK, BD):
        dd = d0 + tl.arange(0, BD)
        dm = (dd < K)[None, :]
        b_Gi = tl.load(Gc + pad_i + dd[None, :], mask=dm, other=0.)
        b_qi = tl.load(q + tok_i + dd[None, :], mask=m_rows & dm, other=0.).to(tl.float32)
        b_ki = tl.load(k + tok_i + dd[None, :], mask=m_rows & dm, other=0.).to(tl.float32)
        if CLAMP > 0:   # KDAOptions.diag_decay_clamp: every tile on tensor cores
            fits = True
        else:
            b_g0, fits = _diag_block_decay(Gc, cbase + i * 16, dd, K, SPAN)
        if fits:
            if CLAMP > 0:   # clamped steps around the tile's midpoint
                e_row, e_col = _diag_tile_scales(Gc, b_Gi, cbase + i * 16, dd, K, CLAMP)
            else:
                e_row = tl.exp(b_Gi - b_g0[None, :])
                e_col = tl.exp(b_g0[None, :] - b_Gi)
            k_col = tl.trans(b_ki * e_col)
            dg_qk += tl.dot(b_qi * e_row, k_col, input_precision=PREC)
            dg_kk += tl.dot(b_ki * e_row, k_col, input_precision=PREC)
        else:
            for c in range(16):
                row_c = i * 16 + c
                b_kc = tl.load(k + ((bos + row_c) * H + i_h) * K + dd, mask=(dd < K) & (dd * 0 + row_c < L),
                               other=0.).to(tl.float32)
                b_gc = tl.load(Gc + (cbase + row_c) * K + dd, mask=dd < K, other=0.)
                e = tl.exp(tl.where((r16 >= c)[:, None], b_Gi - b_gc[None, :], float('-inf'))) * b_kc[None, :]
                sel = r16[None, :] == c
                dg_qk += tl.where(sel, tl.sum(b_qi * e, axis=1)[:, None], 0.)
                dg_kk += tl.where(sel, tl.sum(b_ki * e, axis=1)[:, None], 0.)
    off = (cbase + rows)[:, None] * CHUNK + i * 16 + r16[None, :]
    tl.store(Aqk + off, tl.where(r16[:, None] >= r16[None, :], dg_qk, 0.))
    tl.store(Bkk + off, tl.where(r16[:, None] > r16[None, :], dg_kk, 0.))


@triton.jit
def _unit_lower_inv16(N, PREC: tl.constexpr):
    """(I + N)^-1 for a strictly lower-triangular 16x16 N: since N^16 = 0,
    (I + N)^-1 = (I - N)(I + N^2)(I + N^4)(I + N^8) exactly: six tensor-core dots instead
    of 15 sequential substitution steps. Products of strictly lower matrices keep exact zeros
    above their band, so nothing leaks into the upper triangle."""
    r16 = tl.arange(0, 16)
    eye = tl.where(r16[:, None] == r16[None, :], 1., 0.)
    N2 = tl.dot(N, N, input_precision=PREC)
    N4 = tl.dot(N2, N2, input_precision=PREC)
    X = tl.dot(eye - N, eye + N2, input_precision=PREC)
    N8 = tl.dot(N4, N4, input_precision=PREC)
    X = tl.dot(X, eye + N4, input_precision=PREC)
    return tl.dot(X, eye + N8, input_precision=PREC)


@triton.jit
def kda_fwd_wy_kernel(q, k, v, beta, Gc, Bkk, Ainv, W, U, Qg, Kg, cu_seqlens, chunk_info,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, BKS: tl.constexpr, PREC: tl.constexpr, INV_PREC: tl.constexpr):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64, valid, tok, cbase = _chunk_rows(bos, L, i_c, i_h, H)
    c64 = tl.arange(0, CHUNK)

    # 3) (I + A)^-1 with A = diag(beta) B_kk (strictly lower): the four 16x16 diagonal blocks
    #    by a doubling product of tensor-core dots (no sequential substitution), then merged
    #    with dots: X_ij = -D_i sum_{m=j}^{i-1} A_im X_mj.
    D0 = _unit_lower_inv16(_tile(Bkk, cbase, 0, 0) * _beta_rows(beta, bos, L, H, i_h, 0), INV_PREC)
    D1 = _unit_lower_inv16(_tile(Bkk, cbase, 1, 1) * _beta_rows(beta, bos, L, H, i_h, 1), INV_PREC)
    D2 = _unit_lower_inv16(_tile(Bkk, cbase, 2, 2) * _beta_rows(beta, bos, L, H, i_h, 2), INV_PREC)
    D3 = _unit_lower_inv16(_tile(Bkk, cbase, 3, 3) * _beta_rows(beta, bos, L, H, i_h, 3), INV_PREC)
    _store_tile(Ainv, cbase, 0, 0, D0)
    _store_tile(Ainv, cbase, 1, 1, D1)
    _store_tile(Ainv, cbase, 2, 2, D2)
    _store_tile(Ainv, cbase, 3, 3, D3)
    be1 = _beta_rows(beta, bos, L, H, i_h, 1)
    be2 = _beta_rows(beta, bos, L, H, i_h, 2)
    be3 = _beta_rows(beta, bos, L, H, i_h, 3)
    A10 = _tile(Bkk, cbase, 1, 0) * be1
    A20 = _tile(Bkk, cbase, 2, 0) * be2
    A21 = _tile(Bkk, cbase, 2, 1) * be2
    A30 = _tile(Bkk, cbase, 3, 0) * be3
    A31 = _tile(Bkk, cbase, 3, 1) * be3
    A32 = _tile(Bkk, cbase, 3, 2) * be3
    X10 = -tl.dot(D1, tl.dot(A10, D0, input_precision=PREC), input_precision=PREC)
    X21 = -tl.dot(D2, tl.dot(A21, D1, input_precision=PREC), input_precision=PREC)
    X32 = -tl.dot(D3, tl.dot(A32, D2, input_precision=PREC), input_precision=PREC)
    X20 = -tl.dot(D2, tl.dot(A20, D0, input_precision=PREC) + tl.dot(A21, X10, input_precision=PREC),
                  input_precision=PREC)
    X31 = -tl.dot(D3, tl.dot(A31, D1, input_precision=PREC) + tl.dot(A32, X21, input_precision=PREC),
                  input_precision=PREC)
    X30 = -tl.dot(D3, tl.dot(A30, D0, input_precision=PREC) + tl.dot(A31, X10, input_precision=PREC)
                  + tl.dot(A32, X20, input_precision=PREC), input_precision=PREC)
    _store_tile(Ainv, cbase, 1, 0, X10)
    _store_tile(Ainv, cbase, 2, 0, X20)
    _store_tile(Ainv, cbase, 2, 1, X21)
    _store_tile(Ainv, cbase, 3, 0, X30)
    _store_tile(Ainv, cbase, 3, 1, X31)
    _store_tile(Ainv, cbase, 3, 2, X32)
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_tile(Ainv, cbase, 0, 1, zero)
    _store_tile(Ainv, cbase, 0, 2, zero)
    _store_tile(Ainv, cbase, 0, 3, zero)
    _store_tile(Ainv, cbase, 1, 2, zero)
    _store_tile(Ainv, cbase, 1, 3, zero)
    _store_tile(Ainv, cbase, 2, 3, zero)
    tl.debug_barrier()
    b_inv = tl.load(Ainv + (cbase + r64)[:, None] * CHUNK + c64[None, :])

    # 4) W = Ainv (beta k e^G), U = Ainv (beta v); also q e^G and k e^{G_last - G}, which the
    #    sequential passes and the output kernel consume
    #    (in BKS-wide Dk slices: whole [64, 128] fp32 tiles spilled at 4 warps)
    b_beta = tl.load(beta + tok, mask=valid, other=0.).to(tl.float32)
    for k0 in range(0, BK, BKS):
        dk = k0 + tl.arange(0, BKS)
        m_k = valid[:, None] & (dk[None, :] < K)
        b_k = tl.load(k + tok[:, None] * K + dk[None, :], mask=m_k, other=0.).to(tl.float32)
        b_q = tl.load(q + tok[:, None] * K + dk[None, :], mask=m_k, other=0.).to(tl.float32)
        pad_k = (cbase + r64)[:, None] * K + dk[None, :]
        b_G = tl.load(Gc + pad_k, mask=dk[None, :] < K, other=0.)
        b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=dk < K, other=0.)
        e_G = tl.exp(b_G)
        tl.store(Kg + pad_k, (b_k * tl.exp(b_gl[None, :] - b_G)).to(Kg.dtype.element_ty), mask=dk[None, :] < K)
        tl.store(Qg + pad_k, (b_q * e_G).to(Qg.dtype.element_ty), mask=dk[None, :] < K)
        b_w = tl.dot(b_inv, b_k * e_G * b_beta[:, None], input_precision=PREC)
        tl.store(W + pad_k, b_w.to(W.dtype.element_ty), mask=dk[None, :] < K)
    for v0 in range(0, V, BV):
        dv = v0 + tl.arange(0, BV)
        m_v = valid[:, None] & (dv[None, :] < V)
        b_v = tl.load(v + tok[:, None] * V + dv[None, :], mask=m_v, other=0.).to(tl.float32)
        b_u = tl.dot(b_inv, b_v * b_beta[:, None], input_precision=PREC)
        tl.store(U + (cbase + r64)[:, None] * V + dv[None, :], b_u, mask=dv[None, :] < V)


@triton.jit
def kda_fwd_h_kernel(Kg, Gc, W, U, Vn, h, h0, ht, cu_seqlens, chunk_offsets,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                     PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2)
    bos, eos, c_first, n_chunks = _doc_chunks(cu_seqlens, chunk_offsets, i_n)
    r64 = tl.arange(0, CHUNK)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    m_kv = (dk[:, None] < K) & (dv[None, :] < V)
    state_off = dk[:, None] * V + dv[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * H + i_h) * K * V + state_off, mask=m_kv, other=0.)
    for c in range(0, n_chunks):
        i_c = c_first + c
        cbase = (i_c * H + i_h) * CHUNK
        tl.store(h + (i_c * H + i_h) * K * V + state_off, b_h.to(h.dtype.element_ty), mask=m_kv)
        b_w = tl.load(W + (cbase + r64)[:, None] * K + dk[None, :], mask=dk[None, :] < K, other=0.)
        b_u = tl.load(U + (cbase + r64)[:, None] * V + dv[None, :], mask=dv[None, :] < V, other=0.)
        # bf16 inputs: W, kg, h are bf16 here (bf16 tensor-core dots, fp32 state and sums)
        b_vn = b_u - tl.dot(b_w, b_h.to(b_w.dtype), input_precision=PREC)
        tl.store(Vn + (cbase + r64)[:, None] * V + dv[None, :], b_vn, mask=dv[None, :] < V)
        b_gl = tl.load(Gc + (cbase + CHUNK - 1) * K + dk, mask=dk < K, other=0.)
        # kg^T loaded transposed (no tl.trans of a 16-bit dot operand: a Hopper miscompile class)
        b_kgT = tl.load(Kg + (cbase + r64)[None, :] * K + dk[:, None], mask=dk[:, None] < K, other=0.)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(b_kgT, b_vn.to(b_kgT.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + state_off, b_h, mask=m_kv)


@triton.jit
def kda_fwd_o_kernel(Qg, Aqk, Vn, h, o, cu_seqlens, chunk_info,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr):
    i_c, i_v = _chunk_and_part((V + BV - 1) // BV)
    i_h = tl.program_id(1)
    bos, L = _chunk_coords(cu_seqlens, chunk_info, i_c)
    r64, valid, tok, cbase = _chunk_rows(bos, L, i_c, i_h, H)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    b_qg = tl.load(Qg + (cbase + r64)[:, None] * K + dk[None, :], mask=dk[None, :] < K, other=0.)
    b_h = tl.load(h + (i_c * H + i_h) * K * V + dk[:, None] * V + dv[None, :],
                  mask=(dk[:, None] < K) & (dv[None, :] < V), other=0.)
    b_a = tl.load(Aqk + (cbase + r64)[:, None] * CHUNK + r64[None, :])
    b_vn = tl.load(Vn + (cbase + r64)[:, None] * V + dv[None, :], mask=dv[None, :] < V, other=0.)
    b_o = tl.dot(b_qg, b_h, input_precision=PREC) + tl.dot(b_a, b_vn, input_precision=PREC)
    tl.store(o + tok[:, None] * V + dv[None, :], b_o, mask=valid[:, None] & (dv[None, :] < V))
