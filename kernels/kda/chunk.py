"""chunk_kda: Triton chunkwise KDA on CUDA tensors (forward + backward), PyTorch reference on CPU.

The L2 norm of q/k and the scale go through a fused Triton row kernel (l2norm.py). The
per-channel gate activation (kernels/kda/gate.py) is fused into the forward's cumsum kernel and
its backward is an elementwise pass of its own; the scalar (GDN) gate goes through PyTorch ops.
The chunk autograd.Function takes the normalised, scaled q, normalised k, v, g (raw gate or
log-decay), beta, the initial state and the gate parameters. How the kernels run (state dtype,
dot precisions, launch options) is the caller's ``KDAOptions`` (options.py).
"""
import weakref

import torch
import triton

from kernels.host_values import host_values, to_device
from kernels.kda.gate import GATE_LOG, gate_mode, kda_log_decay
from kernels.kda.l2norm import l2norm_scale
from kernels.kda.naive import _check_args, check_cu_ends, chunk_kda_reference
from kernels.kda.options import CHUNK_SIZE, KDAOptions
from kernels.kda.chunk_fwd import (kda_fwd_cumsum_kernel, kda_fwd_h_kernel, kda_fwd_intra_kernel, kda_fwd_o_kernel,
                                   kda_fwd_wy_kernel)
from kernels.kda.chunk_bwd import (kda_bwd_chunk_dk_kernel, kda_bwd_chunk_wy_kernel, kda_bwd_dh_kernel,
                                   kda_bwd_dh_split_kernel, kda_bwd_intra_kernel, kda_gate_bwd_kernel)


def _chunk_tables(cu_seqlens: torch.Tensor):
    """chunk_info[NC, 2] = (document, chunk within document); chunk_offsets[N+1]."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = (lens + CHUNK_SIZE - 1) // CHUNK_SIZE
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


def sequence_tables(cu_seqlens: torch.Tensor | None, batch: int, length: int, device: torch.device):
    """(cu int32, chunk_info, chunk_offsets, NC) on ``device`` for ``cu_seqlens`` (or ``batch``
    sequences of ``length``), cached per cu_seqlens tensor."""
    if cu_seqlens is not None:
        hit = _TABLES.get(id(cu_seqlens))
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
            return hit[2]
    host = (torch.arange(0, (batch + 1) * length, length) if cu_seqlens is None else host_values(cu_seqlens)).to(torch.int32)
    check_cu_ends(host.tolist(), batch * length)
    info, offsets, n_chunks = _chunk_tables(host)
    tables = (to_device(host, device), to_device(info, device), to_device(offsets, device), n_chunks)
    if cu_seqlens is not None:
        if len(_TABLES) >= _TABLES_KEPT:
            _TABLES.pop(next(iter(_TABLES)))  # the oldest entry
        _TABLES[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, tables)
    return tables


def _state_dtype(dtype, options: KDAOptions):
    """Storage of what feeds the state passes' dots (W, q e^G, kg, the per-chunk states and their
    gradients): bf16 for bf16 inputs unless options.state_dtype is "float32" (half the bytes of
    those passes, bf16 tensor-core dots); fp16 and fp32 inputs keep fp32 (fp16 states are untested)."""
    return dtype if options.state_dtype == "input" and dtype == torch.bfloat16 else torch.float32


def op_precision(dtype) -> str:
    """The op's dot precision for inputs of ``dtype``: exact fp32 dots for fp32 inputs (tests);
    bf16/fp16: tf32 tensor cores on fp32 operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _meta(K, V, dtype):
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    return BK, BV, op_precision(dtype)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132   # the interpreter: an H100/H200's count, so small test shapes take "few"
    return _SM_COUNT.setdefault(device.index, torch.cuda.get_device_properties(device).multi_processor_count)


def _state_launch(name, options: KDAOptions, n_seq, H, V, BV, BK, device):
    """The launch entry of state pass ``name``, or its "few" entry when the regular V-block gives
    fewer programs than SMs (Dk <= 128: larger Dk has its own shared-memory-safe launch, see _cfg)."""
    entry = options.launch_entry(name)
    few = entry.get("few")
    if few is not None and BK <= 128 and n_seq * H * triton.cdiv(V, min(entry["BV"], BV)) < _sm_count(device):
        return few
    return entry


def _cfg(name, entry, BK=128, fp32_state=False):
    """num_warps / num_stages / maxnreg of kernel ``name`` from its launch entry; Dk > 128 keeps the
    shared-memory-safe defaults, and the backward state pass on fp32 states one stage."""
    cfg = {key: val for key, val in entry.items() if key.startswith("num_") or key == "maxnreg"}
    if BK > 128 and name in ("fwd_h", "bwd_dh"):
        # 2 stages at Dk=256 need 312 KiB of shared memory; the backward pass on bf16 states
        # keeps 2 warps (mma.sync instead of wgmma, which crashed there, see DEFAULT_LAUNCH)
        cfg = dict(num_warps=2 if name == "bwd_dh" and not fp32_state else 8, num_stages=1)
    if fp32_state and name == "bwd_dh":
        cfg["num_stages"] = 1   # its fp32 operand tiles, double-buffered, exceed 227 KiB at Dk=128
    if BK > 128:
        cfg["num_stages"] = 1   # the pipelined launches were measured at Dk <= 128 only
    return cfg


def _blk(entry, key, cap, BK=128):
    """Block size ``key`` of a launch entry, at most ``cap`` (32 for Dk > 128: shared memory)."""
    val = min(entry[key], cap)
    return min(val, 32) if BK > 128 else val


def kda_chunk_fwd(q, k, v, g, beta, h0, cu, info, offsets, NC, want_ht, gate, options: KDAOptions,
                  state_hook=None):
    """q, k, v, g, beta in token layout [T, H, D]; gate = (mode, A_log, dt_bias, lower_bound)
    with mode GATE_LOG when g already is the log-decay. Returns o, final state and saved buffers.
    ``state_hook``: see ``chunk_kda_triton``; its ``initial_state`` replaces h0."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    C = CHUNK_SIZE
    BK, BV, prec = _meta(K, V, q.dtype)
    launch = options.launch_entry
    f32 = dict(dtype=torch.float32, device=q.device)
    Gc = torch.empty(NC, H, C, K, **f32)
    Aqk, Bkk, Ainv = (torch.empty(NC, H, C, C, **f32) for _ in range(3))
    lo = dict(dtype=_state_dtype(q.dtype, options), device=q.device)
    W, Qg, Kg = (torch.empty(NC, H, C, K, **lo) for _ in range(3))
    U, Vn = (torch.empty(NC, H, C, V, **f32) for _ in range(2))
    h = torch.empty(NC, H, K, V, **lo)
    ht = torch.empty(N, H, K, V, **f32) if want_ht else None
    mode, A_log, dt_bias, lower = gate
    kda_fwd_cumsum_kernel[(NC, H)](g, A_log, dt_bias, lower, Gc, cu, info, H=H, K=K, BK=BK, GATE=mode,
                                   **_cfg("fwd_cumsum", launch("fwd_cumsum")))
    kda_fwd_intra_kernel[(NC * 4, H)](q, k, Gc, Aqk, Bkk, cu, info, H=H, K=K, BK=BK, BD=min(32, BK),
                                     PREC=prec, SPAN=float(options.diag_span_max),
                                     CLAMP=float(options.diag_decay_clamp),
                                     **_cfg("fwd_intra", launch("fwd_intra"), BK))
    kda_fwd_wy_kernel[(NC, H)](q, k, v, beta, Gc, Bkk, Ainv, W, U, Qg, Kg, cu, info, H=H, K=K, V=V,
                               BK=BK, BV=BV, BKS=min(64, BK), PREC=prec,
                               # the inverse's doubling product: ~fp32 accuracy on tensor cores
                               INV_PREC="ieee" if prec == "ieee" else options.inverse_precision,
                               **_cfg("fwd_wy", launch("fwd_wy")))
    if state_hook is not None:   # the WY pieces are ready; the state pass needs the initial state
        h0 = state_hook.initial_state(dict(Gc=Gc, W=W, U=U, Kg=Kg, prec=prec), cu, offsets, options)
    entry = _state_launch("fwd_h", options, N, H, V, BV, BK, q.device)
    BVs = _blk(entry, "BV", BV, BK)
    kda_fwd_h_kernel[(triton.cdiv(V, BVs), N, H)](Kg, Gc, W, U, Vn, h, h0, ht, cu, offsets, H=H, K=K, V=V,
                                                  BK=BK, BV=BVs, HAS_H0=h0 is not None,
                                                  STORE_HT=want_ht, PREC=prec, **_cfg("fwd_h", entry, BK))
    o = torch.empty(T, H, V, dtype=q.dtype, device=q.device)
    kda_fwd_o_kernel[(NC * triton.cdiv(V, BV), H)](Qg, Aqk, Vn, h, o, cu, info, H=H, K=K, V=V, BK=BK,
                                                  BV=BV, PREC=prec, **_cfg("fwd_o", launch("fwd_o")))
    return o, ht, (Gc, Aqk, Bkk, Ainv, W, Vn, h, Qg, Kg)


def kda_chunk_bwd(q, k, v, g, beta, saved, h0, dht, do, cu, info, offsets, NC, gate, options: KDAOptions):
    Gc, Aqk, Bkk, Ainv, W, Vn, h, Qg, Kg = saved
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    C = CHUNK_SIZE
    BK, BV, prec = _meta(K, V, q.dtype)
    launch = options.launch_entry
    entry = _state_launch("bwd_dh", options, N, H, V, BV, BK, q.device)
    BVs = _blk(entry, "BV", BV, BK)
    f32 = dict(dtype=torch.float32, device=q.device)
    dh = torch.empty(NC, H, K, V, dtype=_state_dtype(q.dtype, options), device=q.device)
    dVn = torch.empty(NC, H, C, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if h0 is not None else None
    grid, cfg = (triton.cdiv(V, BVs), N, H), _cfg("bwd_dh", entry, BK, dh.dtype == torch.float32)
    if entry.get("split_k", 1) == 2 and K == 128:  # the Dk-halves experiment (kda_bwd_dh_split_kernel)
        kda_bwd_dh_split_kernel[grid](Qg, Kg, Gc, Aqk, W, do, dht, dh, dVn, dh0, cu, offsets, H=H, K=K, V=V,
                                      BV=BVs, HAS_DHT=dht is not None, HAS_H0=h0 is not None, PREC=prec, **cfg)
    else:
        kda_bwd_dh_kernel[grid](Qg, Kg, Gc, Aqk, W, do, dht, dh, dVn, dh0, cu, offsets, H=H, K=K, V=V, BK=BK,
                                BV=BVs, HAS_DHT=dht is not None, HAS_H0=h0 is not None, PREC=prec, **cfg)
    dAqk, dBkk = (torch.empty(NC, H, C, C, **f32) for _ in range(2))
    dq_p, dk_p, dG_p = (torch.empty(NC, H, C, K, **f32) for _ in range(3))
    dv = torch.empty(T, H, V, dtype=v.dtype, device=v.device)
    dbeta = torch.empty(T, H, **f32)
    # per 64-wide Dk block first (partial dq / dk / dG, and fp32 partials of dAinv and dbeta
    # summed over the blocks by the WY kernel), then the WY backward per chunk-head
    NKb = triton.cdiv(K, 64)
    dAinv_p = torch.empty(NC, H, NKb, C, C, **f32)
    dbeta_p = torch.empty(NC, H, NKb, C, **f32)
    kda_bwd_chunk_dk_kernel[(NC * NKb, H)](q, k, beta, Gc, Ainv, Vn, h, dh, dVn, do, dq_p, dk_p, dG_p,
                                          dAinv_p, dbeta_p, cu, info, H=H, K=K, V=V, BV=min(BV, 32),
                                          PREC=prec, **_cfg("bwd_chunk_dk", launch("bwd_chunk_dk"), BK))
    kda_bwd_chunk_wy_kernel[(NC, H)](v, beta, Bkk, Ainv, Vn, dVn, do, dAinv_p, dbeta_p, dAqk, dBkk, dv, dbeta,
                                     cu, info, H=H, K=K, V=V, BV=min(BV, 32), PREC=prec,
                                     **_cfg("bwd_chunk_wy", launch("bwd_chunk_wy")))
    dq = torch.empty(T, H, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(T, H, K, dtype=k.dtype, device=k.device)
    dglog = torch.empty(T, H, K, **f32)
    BDi = _blk(launch("bwd_intra"), "BD", BK, BK)
    kda_bwd_intra_kernel[(NC * triton.cdiv(K, BDi), H)](q, k, Gc, dAqk, dBkk, dq_p, dk_p, dG_p, dq, dk, dglog,
                                                        cu, info, H=H, K=K, BD=BDi, PREC=prec,
                                                        SPAN=float(options.diag_span_max),
                                                        CLAMP=float(options.diag_decay_clamp),
                                                        **_cfg("bwd_intra", launch("bwd_intra"), BK))
    mode, A_log, dt_bias, lower = gate
    if mode == GATE_LOG:   # g was the log-decay
        return dq, dk, dv, dglog.to(g.dtype), dbeta, dh0, None, None
    # back through the fused gate: d raw gate in g's dtype, per-chunk partial sums of the parameters
    dg = torch.empty(T, H, K, dtype=g.dtype, device=g.device)
    d_bias_p, dA_p = (torch.empty(NC, H, K, **f32) for _ in range(2))
    kda_gate_bwd_kernel[(NC, H)](dglog, g, A_log, dt_bias, lower, dg, d_bias_p, dA_p, cu, info, H=H, K=K, BK=BK,
                                 GATE=mode, **_cfg("gate_bwd", launch("gate_bwd")))
    return dq, dk, dv, dg, dbeta, dh0, dA_p.sum((0, 2)), d_bias_p.sum(0).reshape(-1)


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, A_log, dt_bias, cu, info, offsets, NC, want_ht, mode, lower_bound,
                options, state_hook=None):
        T = q.shape[0] * q.shape[1]
        B = q.shape[0]
        flat = lambda x: x.reshape(T, *x.shape[2:]).contiguous()
        qf, kf, vf, gf, bf = map(flat, (q, k, v, g, beta))
        h0c = h0.contiguous() if h0 is not None else None
        gate = (mode, A_log, dt_bias, lower_bound)
        o, ht, saved = kda_chunk_fwd(qf, kf, vf, gf, bf, h0c, cu, info, offsets, NC, want_ht, gate, options,
                                     state_hook)
        # a hook's initial state is a constant here (its gradient is the hook's business): no dh0
        ctx.save_for_backward(qf, kf, vf, gf, bf, h0c if state_hook is None else None, A_log, dt_bias, cu, info,
                              offsets, *saved)
        ctx.NC, ctx.B, ctx.mode, ctx.lower_bound = NC, B, mode, lower_bound
        ctx.options, ctx.state_hook = options, state_hook
        return o.view(B, -1, *o.shape[1:]), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, gf, bf, h0, A_log, dt_bias, cu, info, offsets, *saved = ctx.saved_tensors
        B = ctx.B
        dof = do.reshape(-1, *do.shape[2:]).contiguous()
        if ctx.state_hook is not None:   # the final states' gradient comes from the hook
            Gc, Aqk, _, _, W, _, _, Qg, Kg = saved
            pieces = dict(Gc=Gc, Aqk=Aqk, W=W, Qg=Qg, Kg=Kg, prec=op_precision(qf.dtype))
            dht = ctx.state_hook.final_state_gradient(pieces, dof, cu, offsets, ctx.options)
        dht = dht.contiguous() if dht is not None else None
        gate = (ctx.mode, A_log, dt_bias, ctx.lower_bound)
        dq, dk, dv, dg, dbeta, dh0, d_A, d_bias = kda_chunk_bwd(qf, kf, vf, gf, bf, saved, h0, dht, dof, cu,
                                                                info, offsets, ctx.NC, gate, ctx.options)
        unflat = lambda x: x.view(B, -1, *x.shape[1:])
        return (unflat(dq), unflat(dk), unflat(dv), unflat(dg), unflat(dbeta).to(bf.dtype),
                dh0, d_A, d_bias, None, None, None, None, None, None, None, None, None)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, use_qk_l2norm=True, gate=None, options: KDAOptions | None = None):
    """Chunkwise KDA; see kernels/kda/__init__.py for the argument contract.
    CUDA tensors: Triton kernels run with ``options`` (default ``KDAOptions()``); CPU tensors: the
    PyTorch chunk reference (no options)."""
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate=gate)
    if q.is_cuda:
        return chunk_kda_triton(q, k, v, g, beta, options=options, **kwargs)
    return chunk_kda_reference(q, k, v, g, beta, **kwargs)


def chunk_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm=True, gate=None, state_hook=None,
                     options: KDAOptions | None = None):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1), run with ``options``
    (``KDAOptions()`` when None).

    ``state_hook`` (context parallelism, parallel/context/kda_chunkwise.py): an object whose
    ``initial_state(pieces, cu, offsets, options)`` returns the initial states [N, H, Dk, Dv] fp32 once
    the forward's WY pieces (dict of Gc, W, U, Kg) exist, and whose ``final_state_gradient(pieces, do,
    cu, offsets, options)`` returns dL/d(final states) at the start of the backward (pieces Gc, Aqk, W,
    Qg, Kg; do in token layout). Both dicts also carry ``prec``, the op's own dot precision ("ieee"
    for fp32 inputs). Replaces initial_state; the final states then get no autograd gradient."""
    if state_hook is not None and initial_state is not None:
        raise ValueError("chunk_kda_triton: pass either initial_state or state_hook")
    if options is None:
        options = KDAOptions()
    elif not isinstance(options, KDAOptions):
        raise TypeError(f"chunk_kda: options must be a kernels.kda.KDAOptions, got {type(options).__name__}")
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
        mode, lower = gate_mode(lb), 0.0 if lb is None else float(lb)
    else:                                   # log-decay given, or scalar (GDN) gate via PyTorch
        g = kda_log_decay(g, gate, torch.float32)
        if g.dim() == 3:
            g = g.unsqueeze(-1).expand(B, T, H, K)
    cu, info, offsets, NC = sequence_tables(cu_seqlens, B, T, q.device)
    h0 = initial_state.float() if initial_state is not None else None
    o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, h0, A_log, dt_bias, cu, info, offsets, NC,
                                   output_final_state, mode, lower, options, state_hook)
    return o, ht
