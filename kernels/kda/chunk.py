"""chunk_kda: Triton chunkwise KDA on CUDA tensors (forward + backward), PyTorch reference on CPU.

The L2 norm of q/k and the scale go through a fused Triton row kernel (l2norm.py). The
per-channel gate activation (softplus or bounded form) is fused into the cumsum of the
forward intra kernel and its backward into the backward intra kernel; the scalar (GDN)
gate goes through PyTorch ops. The chunk autograd.Function takes the normalised, scaled q,
normalised k, v, g (raw gate or log-decay), beta, the initial state and the gate parameters.
"""
import os
import weakref

import torch
import triton

from kernels.kda.naive import _check_args, check_cu_ends, chunk_kda_reference, kda_log_decay
from kernels.kda.l2norm import l2norm_scale
from kernels.kda.chunk_fwd import (kda_fwd_cumsum_kernel, kda_fwd_h_kernel, kda_fwd_intra_kernel, kda_fwd_o_kernel,
                                   kda_fwd_wy_kernel)
from kernels.kda.chunk_bwd import (kda_bwd_chunk_dk_kernel, kda_bwd_chunk_wy_kernel, kda_bwd_dh_kernel,
                                   kda_bwd_intra_kernel, kda_gate_bwd_kernel)

CHUNK = 64
GATE_LOG, GATE_SOFTPLUS, GATE_BOUNDED = 0, 1, 2   # constexpr GATE of the intra kernels


def _chunk_tables(cu_seqlens: torch.Tensor):
    """chunk_info[NC, 2] = (document, chunk within document); chunk_offsets[N+1]."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = (lens + CHUNK - 1) // CHUNK
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long, device=cu_seqlens.device)
    offsets[1:] = n_chunks.cumsum(0)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), n_chunks)
    within = torch.arange(int(offsets[-1]), device=cu_seqlens.device) - offsets[:-1][doc]
    info = torch.stack([doc, within], 1).to(torch.int32).contiguous()
    return info, offsets.to(torch.int32), int(offsets[-1])


# id(cu_seqlens) -> (weak reference, version, (cu int32, info, offsets, NC) on the device). A model
# calls the op once per KDA layer with the same cu_seqlens object: the tables are built once per
# batch, on the host (reading a device tensor's values waits for the GPU to drain its queue),
# instead of twice per layer call (forward and recompute) with a wait each time. A few entries
# cover micro-batches whose recomputes interleave (pipeline schedules).
_TABLES: dict[int, tuple] = {}
_TABLES_KEPT = 8


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)  # queued behind the GPU's work, no wait
    return x.to(device)


def sequence_tables(cu_seqlens: torch.Tensor | None, batch: int, length: int, device: torch.device):
    """(cu int32, chunk_info, chunk_offsets, NC) on ``device`` for ``cu_seqlens`` (or ``batch``
    sequences of ``length``), cached per cu_seqlens tensor."""
    if cu_seqlens is not None:
        hit = _TABLES.get(id(cu_seqlens))
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
            return hit[2]
    host = (torch.arange(0, (batch + 1) * length, length) if cu_seqlens is None else cu_seqlens.cpu()).to(torch.int32)
    check_cu_ends(host.tolist(), batch * length)
    info, offsets, n_chunks = _chunk_tables(host)
    tables = (_to_device(host, device), _to_device(info, device), _to_device(offsets, device), n_chunks)
    if cu_seqlens is not None:
        if len(_TABLES) >= _TABLES_KEPT:
            _TABLES.pop(next(iter(_TABLES)))  # the oldest entry
        _TABLES[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, tables)
    return tables


# bf16 inputs store what feeds the state passes' dots (W, q e^G, kg, the per-chunk states h and
# dS') in bf16 and take bf16 tensor-core dots there (fp32 accumulation, fp32 state in registers):
# half the bytes of those passes (v8, docs/kda_kernels.md). KDA_STATE_DTYPE=fp32 keeps them fp32.
# fp16 and fp32 inputs always keep fp32 buffers (fp16 states are not tested on a GPU).
# KDA_INV_PREC: precision of the diagonal-block inverse's dots for 16-bit inputs (ieee tested).
INV_PREC_16 = os.environ.get("KDA_INV_PREC", "ieee")
STATE_16 = os.environ.get("KDA_STATE_DTYPE", "input") == "input"


# Diagonal 16x16 tiles of the intra-chunk products take tensor-core dots with one reference row
# when the log-decay over the 16 rows (per Dk slice) is at most this; e^60 = 1.1e26 and e^-60 are
# far from fp32's overflow and underflow. Stronger decay takes the exact per-column loop. A
# module variable read at each call (the tests set it to 0 to run the loop on every tile).
DIAG_SPAN_MAX = 60.0


def _state_dtype(dtype):
    return dtype if STATE_16 and dtype == torch.bfloat16 else torch.float32


def _meta(K, V, dtype):
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    # fp32 inputs: exact fp32 dots (tests); bf16/fp16: tf32 tensor cores on fp32 operands
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return BK, BV, prec


# Launch shapes chosen from the Hopper register/shared-memory report of an AOT compile
# (docs/kda_kernels.md): shared memory must stay under 227 KiB at BK=128, which rules out
# software pipelining (num_stages=2) for the backward state pass.

# Launch options per kernel (K = V = 128, bf16 on the H200): num_warps / num_stages, and the
# V-block (BV) of the state passes / Dk slice (BD) of the backward intra kernel. A plain dict
# so that benchmarks/kda_tune.py can sweep it; other head sizes use the same values.
# The sequential state passes run one program per (sequence, head, V-block); an entry's "few" is
# the launch used when the regular one would leave SMs idle (few sequences x heads, 1x32768).
LAUNCH = {   # swept on the H200 (docs/kda_kernels.md, v5, v7, v8 and v9)
    "fwd_cumsum": dict(num_warps=4, num_stages=1),
    # v9: two stages pipeline the loads of the column-block loops (the kernels wait on memory)
    "fwd_intra": dict(num_warps=2, num_stages=2),
    # v9: a register cap (spills ~100 B) lets a third program share an SM
    "fwd_wy": dict(num_warps=4, num_stages=1, maxnreg=128),
    "fwd_h": dict(num_warps=4, num_stages=2, BV=64, few=dict(num_warps=2, num_stages=2, BV=16)),
    "fwd_o": dict(num_warps=4, num_stages=2),
    # bf16 states: 4 or 8 warps (wgmma) end in an illegal memory access at the dot (q e^G)^T dO
    # on the H200 with Triton 3.6 (located by compute-sanitizer) and 3.7.1; 2 warps (mma.sync) are correct
    "bwd_dh": dict(num_warps=2, num_stages=1, BV=32, few=dict(num_warps=2, num_stages=2, BV=16)),
    # v8 split of kda_bwd_chunk; swept on the H200 with bf16 states (8 and 2 warps slower)
    "bwd_chunk_dk": dict(num_warps=4, num_stages=2),
    "bwd_chunk_wy": dict(num_warps=4, num_stages=1, maxnreg=168),
    "bwd_intra": dict(num_warps=2, num_stages=2, BD=32),
    "gate_bwd": dict(num_warps=8, num_stages=1),   # not swept: an elementwise pass
}


def override_launch(spec: str):
    """Apply `KDA_LAUNCH`-style overrides to LAUNCH, e.g. "bwd_dh.few.BV=32,fwd_wy.num_warps=8"
    (for GPU experiments: the same override reaches the tests, kda_debug.py and kda.py)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        path, _, value = item.partition("=")
        kernel, *middle, option = path.split(".")
        if kernel not in LAUNCH or middle not in ([], ["few"]) or not value.isdigit():
            raise ValueError(f"KDA_LAUNCH item {item!r}: expected kernel[.few].option=int, kernels {list(LAUNCH)}")
        entry = LAUNCH[kernel] = dict(LAUNCH[kernel])
        if middle:   # chained assignment: the kernel's "few" entry, then entry = that copy
            entry["few"] = entry = dict(entry.get("few", {}))
        entry[option] = int(value)


override_launch(os.environ.get("KDA_LAUNCH", ""))

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132   # the interpreter: an H100/H200's count, so small test shapes take "few"
    return _SM_COUNT.setdefault(device.index, torch.cuda.get_device_properties(device).multi_processor_count)


def _state_launch(name, n_seq, H, V, BV, BK, device):
    """LAUNCH[name], or its "few" entry when the regular V-block gives fewer programs than SMs
    (Dk <= 128: larger Dk has its own shared-memory-safe launch, see _cfg)."""
    entry = LAUNCH[name]
    few = entry.get("few")
    if few is not None and BK <= 128 and n_seq * H * triton.cdiv(V, min(entry["BV"], BV)) < _sm_count(device):
        return few
    return entry


def _cfg(name, BK=128, entry=None, fp32_state=False):
    """num_warps / num_stages / maxnreg of kernel `name` (or of a given LAUNCH entry); Dk > 128 keeps the
    shared-memory-safe defaults, and the backward state pass on fp32 states one stage."""
    cfg = {key: val for key, val in (entry or LAUNCH[name]).items() if key.startswith("num_") or key == "maxnreg"}
    if BK > 128 and name in ("fwd_h", "bwd_dh"):
        # 2 stages at Dk=256 need 312 KiB of shared memory; the backward pass on bf16 states
        # keeps 2 warps (mma.sync instead of wgmma, which crashed there, see LAUNCH)
        cfg = dict(num_warps=2 if name == "bwd_dh" and not fp32_state else 8, num_stages=1)
    if fp32_state and name == "bwd_dh":
        cfg["num_stages"] = 1   # its fp32 operand tiles, double-buffered, exceed 227 KiB at Dk=128
    if BK > 128:
        cfg["num_stages"] = 1   # the v9 pipelined launches were measured at Dk <= 128 only
    return cfg


def _blk(name, key, cap, BK=128, entry=None):
    """Block size `key` of kernel `name` (or of a given LAUNCH entry), at most `cap` (32 for
    Dk > 128: shared memory)."""
    val = min((entry or LAUNCH[name])[key], cap)
    return min(val, 32) if BK > 128 else val


def kda_chunk_fwd(q, k, v, g, beta, h0, cu, info, offsets, NC, want_ht, gate, state_hook=None):
    """q, k, v, g, beta in token layout [T, H, D]; gate = (mode, A_log, dt_bias, lower_bound)
    with mode 0 when g already is the log-decay. Returns o, final state and saved buffers.
    ``state_hook``: see ``chunk_kda_triton``; its ``initial_state`` replaces h0."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    BK, BV, prec = _meta(K, V, q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    Gc = torch.empty(NC, H, 64, K, **f32)
    Aqk, Bkk, Ainv = (torch.empty(NC, H, 64, 64, **f32) for _ in range(3))
    # what feeds the state passes' dots (W, q e^G, kg, states) is stored in the input dtype
    # for 16-bit inputs (halves their bytes, bf16 tensor cores), fp32 otherwise
    lo = dict(dtype=_state_dtype(q.dtype), device=q.device)
    W, Qg, Kg = (torch.empty(NC, H, 64, K, **lo) for _ in range(3))
    U, Vn = (torch.empty(NC, H, 64, V, **f32) for _ in range(2))
    h = torch.empty(NC, H, K, V, **lo)
    ht = torch.empty(N, H, K, V, **f32) if want_ht else None
    mode, A_log, dt_bias, lower = gate
    kda_fwd_cumsum_kernel[(NC, H)](g, A_log, dt_bias, lower, Gc, cu, info, H=H, K=K, BK=BK, GATE=mode,
                                   **_cfg("fwd_cumsum"))
    kda_fwd_intra_kernel[(NC * 4, H)](q, k, Gc, Aqk, Bkk, cu, info, H=H, K=K, BK=BK, BD=min(32, BK),
                                     PREC=prec, SPAN=DIAG_SPAN_MAX, **_cfg("fwd_intra", BK))
    kda_fwd_wy_kernel[(NC, H)](q, k, v, beta, Gc, Bkk, Ainv, W, U, Qg, Kg, cu, info, H=H, K=K, V=V,
                               BK=BK, BV=BV, BKS=min(64, BK), PREC=prec,
                               # the inverse's doubling product: ~fp32 accuracy on tensor cores
                               INV_PREC="ieee" if prec == "ieee" else INV_PREC_16, **_cfg("fwd_wy"))
    if state_hook is not None:   # the WY pieces are ready; the state pass needs the initial state
        h0 = state_hook.initial_state(dict(Gc=Gc, W=W, U=U, Kg=Kg), cu, offsets)
    launch = _state_launch("fwd_h", N, H, V, BV, BK, q.device)
    BVs = _blk("fwd_h", "BV", BV, BK, launch)
    kda_fwd_h_kernel[(triton.cdiv(V, BVs), N, H)](Kg, Gc, W, U, Vn, h, h0, ht, cu, offsets, H=H, K=K, V=V,
                                                  BK=BK, BV=BVs, HAS_H0=h0 is not None,
                                                  STORE_HT=want_ht, PREC=prec, **_cfg("fwd_h", BK, launch))
    o = torch.empty(T, H, V, dtype=q.dtype, device=q.device)
    kda_fwd_o_kernel[(NC * triton.cdiv(V, BV), H)](Qg, Aqk, Vn, h, o, cu, info, H=H, K=K, V=V, BK=BK,
                                                  BV=BV, PREC=prec, **_cfg("fwd_o"))
    return o, ht, (Gc, Aqk, Bkk, Ainv, W, Vn, h, Qg, Kg)


def kda_chunk_bwd(q, k, v, g, beta, saved, h0, dht, do, cu, info, offsets, NC, gate):
    Gc, Aqk, Bkk, Ainv, W, Vn, h, Qg, Kg = saved
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    BK, BV, prec = _meta(K, V, q.dtype)
    launch = _state_launch("bwd_dh", N, H, V, BV, BK, q.device)
    BVs = _blk("bwd_dh", "BV", BV, BK, launch)
    f32 = dict(dtype=torch.float32, device=q.device)
    dh = torch.empty(NC, H, K, V, dtype=_state_dtype(q.dtype), device=q.device)
    dVn = torch.empty(NC, H, 64, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if h0 is not None else None
    kda_bwd_dh_kernel[(triton.cdiv(V, BVs), N, H)](Qg, Kg, Gc, Aqk, W, do, dht, dh, dVn, dh0, cu, offsets,
                                                   H=H, K=K, V=V, BK=BK, BV=BVs, HAS_DHT=dht is not None,
                                                   HAS_H0=h0 is not None, PREC=prec,
                                                   **_cfg("bwd_dh", BK, launch, dh.dtype == torch.float32))
    dAqk, dBkk = (torch.empty(NC, H, 64, 64, **f32) for _ in range(2))
    dq_p, dk_p, dG_p = (torch.empty(NC, H, 64, K, **f32) for _ in range(3))
    dv = torch.empty(T, H, V, dtype=v.dtype, device=v.device)
    dbeta = torch.empty(T, H, **f32)
    # per 64-wide Dk block first (partial dq / dk / dG, and fp32 partials of dAinv and dbeta
    # summed over the blocks by the WY kernel), then the WY backward per chunk-head
    NKb = triton.cdiv(K, 64)
    dAinv_p = torch.empty(NC, H, NKb, 64, 64, **f32)
    dbeta_p = torch.empty(NC, H, NKb, 64, **f32)
    kda_bwd_chunk_dk_kernel[(NC * NKb, H)](q, k, beta, Gc, Ainv, Vn, h, dh, dVn, do, dq_p, dk_p, dG_p,
                                          dAinv_p, dbeta_p, cu, info, H=H, K=K, V=V, BV=min(BV, 32),
                                          PREC=prec, **_cfg("bwd_chunk_dk", BK))
    kda_bwd_chunk_wy_kernel[(NC, H)](v, beta, Bkk, Ainv, Vn, dVn, do, dAinv_p, dbeta_p, dAqk, dBkk, dv, dbeta,
                                     cu, info, H=H, K=K, V=V, BV=min(BV, 32), PREC=prec,
                                     **_cfg("bwd_chunk_wy"))
    dq = torch.empty(T, H, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(T, H, K, dtype=k.dtype, device=k.device)
    dglog = torch.empty(T, H, K, **f32)
    BDi = _blk("bwd_intra", "BD", BK, BK)
    kda_bwd_intra_kernel[(NC * triton.cdiv(K, BDi), H)](q, k, Gc, dAqk, dBkk, dq_p, dk_p, dG_p, dq, dk, dglog,
                                                        cu, info, H=H, K=K, BD=BDi, PREC=prec,
                                                        SPAN=DIAG_SPAN_MAX, **_cfg("bwd_intra", BK))
    mode, A_log, dt_bias, lower = gate
    if mode == 0:   # g was the log-decay
        return dq, dk, dv, dglog.to(g.dtype), dbeta, dh0, None, None
    # back through the fused gate: d raw gate in g's dtype, per-chunk partial sums of the parameters
    dg = torch.empty(T, H, K, dtype=g.dtype, device=g.device)
    d_bias_p, dA_p = (torch.empty(NC, H, K, **f32) for _ in range(2))
    kda_gate_bwd_kernel[(NC, H)](dglog, g, A_log, dt_bias, lower, dg, d_bias_p, dA_p, cu, info, H=H, K=K, BK=BK,
                                 GATE=mode, **_cfg("gate_bwd"))
    return dq, dk, dv, dg, dbeta, dh0, dA_p.sum((0, 2)), d_bias_p.sum(0).reshape(-1)


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, A_log, dt_bias, cu, info, offsets, NC, want_ht, gate_mode, lower_bound,
                state_hook=None):
        T = q.shape[0] * q.shape[1]
        B = q.shape[0]
        flat = lambda x: x.reshape(T, *x.shape[2:]).contiguous()
        qf, kf, vf, gf, bf = map(flat, (q, k, v, g, beta))
        h0c = h0.contiguous() if h0 is not None else None
        gate = (gate_mode, A_log, dt_bias, lower_bound)
        o, ht, saved = kda_chunk_fwd(qf, kf, vf, gf, bf, h0c, cu, info, offsets, NC, want_ht, gate, state_hook)
        # a hook's initial state is a constant here (its gradient is the hook's business): no dh0
        ctx.save_for_backward(qf, kf, vf, gf, bf, h0c if state_hook is None else None, A_log, dt_bias, cu, info,
                              offsets, *saved)
        ctx.NC, ctx.B, ctx.gate_mode, ctx.lower_bound, ctx.state_hook = NC, B, gate_mode, lower_bound, state_hook
        return o.view(B, -1, *o.shape[1:]), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, gf, bf, h0, A_log, dt_bias, cu, info, offsets, *saved = ctx.saved_tensors
        B = ctx.B
        dof = do.reshape(-1, *do.shape[2:]).contiguous()
        if ctx.state_hook is not None:   # the final states' gradient comes from the hook
            Gc, Aqk, _, _, W, _, _, Qg, Kg = saved
            dht = ctx.state_hook.final_state_gradient(dict(Gc=Gc, Aqk=Aqk, W=W, Qg=Qg, Kg=Kg), dof, cu, offsets)
        dht = dht.contiguous() if dht is not None else None
        gate = (ctx.gate_mode, A_log, dt_bias, ctx.lower_bound)
        dq, dk, dv, dg, dbeta, dh0, d_A, d_bias = kda_chunk_bwd(qf, kf, vf, gf, bf, saved, h0, dht, dof, cu,
                                                                info, offsets, ctx.NC, gate)
        unflat = lambda x: x.view(B, -1, *x.shape[1:])
        return (unflat(dq), unflat(dk), unflat(dv), unflat(dg), unflat(dbeta).to(bf.dtype),
                dh0, d_A, d_bias, None, None, None, None, None, None, None, None)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, use_qk_l2norm=True, gate=None):
    """Chunkwise KDA; see kernels/kda/__init__.py for the argument contract.
    CUDA tensors: Triton kernels; CPU tensors: the PyTorch chunk reference."""
    fn = chunk_kda_triton if q.is_cuda else chunk_kda_reference
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
              use_qk_l2norm=use_qk_l2norm, gate=gate)


def chunk_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm=True, gate=None, state_hook=None):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1).

    ``state_hook`` (context parallelism, parallel/context/kda_chunkwise.py): an object whose
    ``initial_state(pieces, cu, offsets)`` returns the initial states [N, H, Dk, Dv] fp32 once the
    forward's WY pieces (dict of Gc, W, U, Kg) exist, and whose ``final_state_gradient(pieces, do,
    cu, offsets)`` returns dL/d(final states) at the start of the backward (pieces Gc, Aqk, W, Qg,
    Kg; do in token layout). Replaces initial_state; the final states then get no autograd gradient."""
    if state_hook is not None and initial_state is not None:
        raise ValueError("chunk_kda_triton: pass either initial_state or state_hook")
    _check_args(q, k, v, g, beta, initial_state, cu_seqlens, check_cu_values=False)  # in sequence_tables
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:   # fused Triton row kernels (forward and backward)
        q, k = l2norm_scale(q, scale), l2norm_scale(k, 1.0)
    else:
        q = q * scale
    A_log = dt_bias = None
    mode, lower = GATE_LOG, 0.0
    if gate is not None and g.dim() == 4:   # gate activation fused into the cumsum kernel
        A_log, dt_bias, lb = gate
        A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
        mode, lower = (GATE_SOFTPLUS, 0.0) if lb is None else (GATE_BOUNDED, float(lb))
    else:                                   # log-decay given, or scalar (GDN) gate via PyTorch
        g = kda_log_decay(g, gate, torch.float32)
        if g.dim() == 3:
            g = g.unsqueeze(-1).expand(B, T, H, K)
    cu, info, offsets, NC = sequence_tables(cu_seqlens, B, T, q.device)
    h0 = initial_state.float() if initial_state is not None else None
    o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, h0, A_log, dt_bias, cu, info, offsets, NC,
                                   output_final_state, mode, lower, state_hook)
    return o, ht
