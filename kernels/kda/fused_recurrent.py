"""fused_recurrent_kda: token-by-token KDA for decoding (forward only; docs/architecture.md,
"Decoding").

One Triton program per (sequence, head, V-block) keeps its [Dk, BV] slice of the state in
fp32 registers and walks the tokens: L2-norm q/k in-kernel, optional in-kernel gate,
S *= exp(g); e = beta (v - S^T k); S += k e^T; o = S^T (scale q).
CPU tensors use the fp64 recurrence (recurrent_kda_reference).
"""
import torch
import triton
import triton.language as tl

from kernels.kda.gate import GATE_LOG, gate_activation, gate_mode
from kernels.kda.naive import _check_args, recurrent_kda_reference


@triton.jit
def kda_fused_recurrent_kernel(q, k, v, g, beta, o, h0, ht, A_log, dt_bias, cu_seqlens, scale,
                               lower_bound, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, SCALAR_G: tl.constexpr,
                               GATE: tl.constexpr, L2NORM: tl.constexpr, HAS_H0: tl.constexpr,
                               STORE_HT: tl.constexpr):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    m_k = dk < K
    m_v = dv < V
    state_off = (i_n * H + i_h) * K * V + dk[:, None] * V + dv[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + state_off, mask=m_kv, other=0.)
    if GATE != 0:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if SCALAR_G:
            b_bias = tl.load(dt_bias + i_h).to(tl.float32)
        else:
            b_bias = tl.load(dt_bias + i_h * K + dk, mask=m_k, other=0.).to(tl.float32)
    for t in range(bos, eos):
        row = t * H + i_h
        b_q = tl.load(q + row * K + dk, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(k + row * K + dk, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + row * V + dv, mask=m_v, other=0.).to(tl.float32)
        b_beta = tl.load(beta + row).to(tl.float32)
        if SCALAR_G:
            b_g = tl.load(g + row).to(tl.float32) + tl.zeros([BK], dtype=tl.float32)
        else:
            b_g = tl.load(g + row * K + dk, mask=m_k, other=0.).to(tl.float32)
        if GATE != 0:   # g is the raw gate projection (kernels/kda/gate.py)
            b_g = gate_activation(b_g + b_bias, b_a, lower_bound, GATE)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale
        b_h = b_h * tl.exp(b_g)[:, None]
        b_e = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_e[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + row * V + dv, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + state_off, b_h, mask=m_kv)


def fused_recurrent_kda_triton(q, k, v, g, beta, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None, use_qk_l2norm=True,
                               gate=None, inplace_state=False):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1)."""
    n_seq = _check_args(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    else:
        cu = cu_seqlens.to(torch.int32)
    if inplace_state:
        assert initial_state is not None and initial_state.dtype == torch.float32 \
            and initial_state.is_contiguous(), "inplace_state needs a contiguous fp32 initial_state"
    h0 = None if initial_state is None else initial_state.float().contiguous()
    if inplace_state:
        ht = initial_state
    elif output_final_state:
        ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device)
    else:
        ht = None
    mode, A_log, dt_bias, lower = GATE_LOG, None, None, 0.0
    if gate is not None:
        A_log, dt_bias, lb = gate
        mode = gate_mode(lb)
        lower = 0.0 if lb is None else float(lb)
        A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(32, max(16, triton.next_power_of_2(V)))
    grid = (triton.cdiv(V, BV), n_seq * H)
    kda_fused_recurrent_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                     beta.contiguous(), o, h0, ht, A_log, dt_bias, cu, float(scale),
                                     lower, H=H, K=K, V=V, BK=BK, BV=BV, SCALAR_G=g.dim() == 3,
                                     GATE=mode, L2NORM=use_qk_l2norm, HAS_H0=h0 is not None,
                                     STORE_HT=ht is not None, num_warps=4)
    return o, (ht if output_final_state else None)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, use_qk_l2norm=True, gate=None, inplace_state=False):
    """Decode-time KDA (forward only). inplace_state=True writes the final state into
    ``initial_state`` (fp32, contiguous). CUDA: Triton kernel; CPU: the fp64 recurrence."""
    if q.is_cuda:
        return fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state,
                                          cu_seqlens, use_qk_l2norm, gate, inplace_state)
    o, final = recurrent_kda_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                       output_final_state=True, cu_seqlens=cu_seqlens,
                                       use_qk_l2norm=use_qk_l2norm, gate=gate)
    if inplace_state:
        initial_state.copy_(final)
    return o, (final if output_final_state else None)
