"""Worker for test_context_parallel.py: P gloo ranks (torchrun), each compares its slice with CP=1.

Every rank builds the same full micro-batch (b = 3 samples of S = 384 tokens, documents that straddle
slice boundaries, start exactly at one, span three ranks, have length 1, and one that spans all),
runs the CP=1 computation on it in-process (the reference), then its own slice under context
parallelism, and records relative errors of the output and of every gradient (inputs on every rank,
parameters after summing over the CP ranks), the bytes each collective received (counted by wrapping
torch.distributed's functions, independent of the code under test) and the formula's bytes
(parallel/context/volume.py). Rank 0 writes all ranks' records to OUT/cp{P}.json.

usage: cp_worker.py OUT [check ...]
"""

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the interpreter path

import torch.distributed as dist  # noqa: E402

S = 384
CU_SAMPLES = [[0, 50, 96, 97, 300, 384], [0, 97, 192, 193, 383, 384], [0, 384]]
B = len(CU_SAMPLES)
GLOBAL_CU = sorted({i * S + x for i, doc in enumerate(CU_SAMPLES) for x in doc})
# the Triton interpreter is slow: a shorter batch for it (still 2 chunks per slice at CP=2)
S_SMALL = 160
CU_SMALL = [[0, 30, 40, 41, 120, 160], [0, 160]]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- byte counting
class ByteLog:
    """Bytes this rank receives from other ranks, per collective call (wrapping torch.distributed)."""

    current = None  # the log being written, while a ``counting()`` block runs

    def __init__(self):
        self.calls = []

    @classmethod
    def record(cls, op, nbytes):
        if cls.current is not None:
            cls.current.calls.append((op, int(nbytes)))

    def total(self):
        return sum(n for _, n in self.calls)


LOG = ByteLog


def install_counters():
    size = lambda group: dist.get_world_size(group)
    nbytes = lambda t: t.numel() * t.element_size()
    originals = {name: getattr(dist, name) for name in
                 ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "irecv", "isend", "all_reduce")}

    def all_gather_into_tensor(out, inp, group=None, **kw):
        LOG.record("all_gather", nbytes(out) - nbytes(inp))
        return originals["all_gather_into_tensor"](out, inp, group=group, **kw)

    def reduce_scatter_tensor(out, inp, *args, group=None, **kw):
        LOG.record("reduce_scatter", nbytes(inp) - nbytes(out))
        return originals["reduce_scatter_tensor"](out, inp, *args, group=group, **kw)

    def all_to_all_single(output, input, *args, group=None, **kw):
        LOG.record("all_to_all", nbytes(output) * (size(group) - 1) // size(group))
        return originals["all_to_all_single"](output, input, *args, group=group, **kw)

    def irecv(tensor, *args, **kw):
        LOG.record("recv", nbytes(tensor))
        return originals["irecv"](tensor, *args, **kw)

    def all_reduce(tensor, *args, **kw):
        LOG.record("all_reduce", nbytes(tensor))
        return originals["all_reduce"](tensor, *args, **kw)

    dist.all_gather_into_tensor = all_gather_into_tensor
    dist.reduce_scatter_tensor = reduce_scatter_tensor
    dist.all_to_all_single = all_to_all_single
    dist.irecv = irecv
    dist.all_reduce = all_reduce


@contextmanager
def counting():
    ByteLog.current = log = ByteLog()
    try:
        yield log
    finally:
        ByteLog.current = None


# ----------------------------------------------------------------------------- layout helpers
def context(mode, seq=S, cu_samples=CU_SAMPLES):
    from data import cp_slice
    from megatron.core import parallel_state
    from parallel.context import ContextParallel

    b = len(cu_samples)
    cu = torch.tensor(sorted({i * seq + x for i, doc in enumerate(cu_samples) for x in doc}), dtype=torch.int32)
    batch = {"tokens": torch.zeros(b, seq, dtype=torch.long), "cu_seqlens": cu}
    group = parallel_state.get_context_parallel_group()
    rank, size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    part = cp_slice(batch, rank, size)
    return ContextParallel.from_slice(part, group, rank, size, mode)


def local_slice(x, cp, seq):
    """[1, b*S, ...] or [b*S, ...] full stream -> this rank's [.., b*L, ...] slice."""
    lead = x.dim() > 1 and x.shape[0] == 1 and x.shape[1] == cp.batch_size * seq
    y = x[0] if lead else x
    y = y.reshape(cp.batch_size, seq, *y.shape[1:])[:, cp.rank * cp.local_length:(cp.rank + 1) * cp.local_length]
    y = y.reshape(cp.batch_size * cp.local_length, *y.shape[2:])
    return y.unsqueeze(0) if lead else y


def op_inputs(seq, cu_samples, heads=2, dk=16, dv=16, seed=3):
    gen = torch.Generator().manual_seed(seed)
    T = len(cu_samples) * seq
    inputs = dict(q=torch.randn(1, T, heads, dk, generator=gen), k=torch.randn(1, T, heads, dk, generator=gen),
                  v=torch.randn(1, T, heads, dv, generator=gen), g=torch.randn(1, T, heads, dk, generator=gen),
                  beta=torch.rand(1, T, heads, generator=gen) * 0.9 + 0.05)
    gate = (torch.rand(heads, generator=gen).add(1.0).log(), torch.randn(heads * dk, generator=gen) * 0.5 - 1.0)
    w = torch.randn(1, T, heads, dv, generator=gen)
    return inputs, gate, w


# ----------------------------------------------------------------------------- checks
def check_op(op_name):
    """chunkwise_kda (the op) against the same local op at CP=1 on the whole batch."""
    from kernels.kda import chunk_kda_cpu
    from kernels.kda.chunk import chunk_kda_triton
    from parallel.context import volume
    from parallel.context.kda_chunkwise import chunkwise_kda

    # reference: PyTorch pre-passes around chunk_kda_cpu; triton: the same around the Triton op;
    # fused: the Triton pre-pass kernels inside the Triton op (both in the interpreter on CPU)
    op = {"reference": chunk_kda_cpu, "triton": chunk_kda_triton, "fused": chunk_kda_triton}[op_name]
    seq, cu_samples = (S, CU_SAMPLES) if op_name == "reference" else (S_SMALL, CU_SMALL)
    cp = context("chunkwise", seq, cu_samples)
    inputs, (a_log, dt_bias), w = op_inputs(seq, cu_samples)
    full = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    gate_full = (a_log.clone().requires_grad_(), dt_bias.clone().requires_grad_(), None)
    o_ref, _ = op(**full, cu_seqlens=cp.global_cu_seqlens, use_qk_l2norm=True, gate=gate_full)
    (o_ref * w).sum().backward()

    local = {k: local_slice(v, cp, seq).clone().requires_grad_() for k, v in inputs.items()}
    gate = (a_log.clone().requires_grad_(), dt_bias.clone().requires_grad_(), None)
    with counting() as fwd_log:
        o = chunkwise_kda(**local, cp=cp, use_qk_l2norm=True, gate=gate, op=op, fused_prepass=op_name == "fused")
    with counting() as bwd_log:
        (o * local_slice(w, cp, seq)).sum().backward()
    errors = {"o": rel(o, local_slice(o_ref, cp, seq))}
    errors.update({f"d{k}": rel(local[k].grad, local_slice(full[k].grad, cp, seq)) for k in local})
    for name, mine, ref in (("dA_log", gate[0], gate_full[0]), ("ddt_bias", gate[1], gate_full[1])):
        grad = mine.grad.clone()
        dist.all_reduce(grad, group=cp.group)
        errors[name] = rel(grad, ref.grad)
    H, dk, dv = inputs["q"].shape[2], inputs["q"].shape[3], inputs["v"].shape[3]
    expected = volume.chunkwise_kda_state(cp.batch_size, H, dk, dv, cp.size, cp.any_continues)
    return dict(errors=errors, bytes=dict(forward=fwd_log.total(), backward=bwd_log.total()), expected=expected)


def check_conv_halo():
    from model.kda import short_conv_silu
    from model.packed import pack
    from parallel.context import volume
    from parallel.context.conv_halo import conv_silu_with_halo

    cp = context("chunkwise")
    gen = torch.Generator().manual_seed(5)
    channels, width = (24, 8, 16), 4
    xs = [torch.randn(B * S, c, generator=gen) for c in channels]
    kernels = [torch.randn(c, 1, width, generator=gen) for c in channels]
    ws = [torch.randn(B * S, c, generator=gen) for c in channels]
    packed = pack(B, S, cp.global_cu_seqlens, "cpu")
    full = [x.clone().requires_grad_() for x in xs]
    ks_full = [k.clone().requires_grad_() for k in kernels]
    refs = [short_conv_silu(x, k, packed.position_in_document) for x, k in zip(full, ks_full)]
    sum((y * w).sum() for y, w in zip(refs, ws)).backward()
    local = [local_slice(x, cp, S).clone().requires_grad_() for x in xs]
    ks = [k.clone().requires_grad_() for k in kernels]
    with counting() as fwd_log:
        outs = conv_silu_with_halo(cp, local, ks)
    with counting() as bwd_log:
        sum((y * local_slice(w, cp, S)).sum() for y, w in zip(outs, ws)).backward()
    errors = {}
    for i in range(len(xs)):
        errors[f"y{i}"] = rel(outs[i], local_slice(refs[i], cp, S))
        errors[f"dx{i}"] = rel(local[i].grad, local_slice(full[i].grad, cp, S))
        grad = ks[i].grad.clone()
        dist.all_reduce(grad, group=cp.group)
        errors[f"dkernel{i}"] = rel(grad, ks_full[i].grad)
    expected = volume.conv_halo(cp.batch_size, sum(channels), width, 4, cp.rank, cp.size, cp.continues)
    return dict(errors=errors, bytes=dict(forward=fwd_log.total(), backward=bwd_log.total()), expected=expected)


def build_layers():
    from model.ffn import megatron_config
    from model.kda import KimiDeltaAttention
    from model.mla import MultiLatentAttention
    from tests.helpers.small_models import mixed_config

    config = mixed_config()
    tconfig = megatron_config(config)
    layers = {"kda": KimiDeltaAttention(config, tconfig, 0), "gdn": KimiDeltaAttention(config, tconfig, 2, False),
              "mla": MultiLatentAttention(config, tconfig, 1)}
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # the same non-trivial values on every rank
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if name == "A_log":
                    p.copy_(torch.rand(p.shape, generator=gen).mul(15).add(1).log())
                elif name == "dt_bias":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5 - 2.0)
                elif "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return config, layers


def check_layer(kind, mode, layers, config):
    from model.packed import pack
    from parallel.context import volume

    layer = layers[kind]
    cp = context(mode)
    gen = torch.Generator().manual_seed(21)
    hidden = config.hidden_size
    x = torch.randn(B * S, 1, hidden, generator=gen)
    w = torch.randn(B * S, 1, hidden, generator=gen)
    layer.zero_grad()
    full_x = x.clone().requires_grad_()
    y_ref = layer(full_x, pack(B, S, cp.global_cu_seqlens, "cpu"))
    (y_ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    x_local = local_slice(x, cp, S).clone().requires_grad_()
    packed = pack(B, cp.local_length, cp.cu_seqlens, "cpu")
    with counting() as fwd_log:
        y = layer(x_local, packed, context_parallel=cp)
    with counting() as bwd_log:
        (y * local_slice(w, cp, S)).sum().backward()
    errors = {"y": rel(y, local_slice(y_ref, cp, S)), "dx": rel(x_local.grad, local_slice(full_x.grad, cp, S))}
    for name, p in layer.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp.group)
        errors[f"d.{name}"] = rel(grad, ref_grads[name])
    expected = volume.layer_bytes(kind, mode, config, cp, element_size=4)
    return dict(errors=errors, bytes=dict(forward=fwd_log.total(), backward=bwd_log.total()), expected=expected,
                calls=dict(forward=fwd_log.calls, backward=bwd_log.calls))


def check_causality(kind, mode, layers, config):
    """Perturb every token after global position P of sample 0 (P inside rank 1's slice): nothing at
    or before P may change, on any rank; something after P must."""
    from model.packed import pack

    layer = layers[kind]
    cp = context(mode)
    P = S // cp.size + 7  # rank 1's 8th token
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(B * S, 1, config.hidden_size, generator=gen)
    x2 = x.clone()
    x2.view(B, S, -1)[0, P + 1:] += torch.randn(S - P - 1, config.hidden_size, generator=gen)
    packed = pack(B, cp.local_length, cp.cu_seqlens, "cpu")
    with torch.no_grad():
        y = layer(local_slice(x, cp, S), packed, context_parallel=cp)
        y2 = layer(local_slice(x2, cp, S), packed, context_parallel=cp)
    pos = torch.arange(cp.rank * cp.local_length, (cp.rank + 1) * cp.local_length)
    diff = (y2 - y).view(B, cp.local_length, -1).abs().amax(-1)
    before = float(diff[0][pos <= P].max()) if bool((pos <= P).any()) else 0.0
    after = float(diff[0][pos > P].max()) if bool((pos > P).any()) else None
    return dict(before=before, after=after, scale=float(y.abs().max()))


def check_max_logits(mode, layers, config):
    """QK-Clip's record of the MLA layer (training mode): per head the largest logit, from this rank's
    part, max-reduced over the CP ranks, against the whole sequences at CP=1."""
    from model.packed import pack

    layer = layers["mla"]
    cp = context(mode)
    x = torch.randn(B * S, 1, config.hidden_size, generator=torch.Generator().manual_seed(41))
    layer.train()
    layer.record_max_logits, layer.max_logits = True, None
    with torch.no_grad():
        layer(x, pack(B, S, cp.global_cu_seqlens, "cpu"))
        reference, layer.max_logits = layer.max_logits, None
        layer(local_slice(x, cp, S), pack(B, cp.local_length, cp.cu_seqlens, "cpu"), context_parallel=cp)
    mine, layer.record_max_logits, layer.max_logits = layer.max_logits, False, None
    reduced = mine.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=cp.group)
    return dict(errors={"max_logits": rel(reduced, reference)}, reference=reference.tolist())


def main(out_dir: str, checks: list[str]) -> None:
    from parallel import state

    install_counters()
    size = int(os.environ["WORLD_SIZE"])
    state.initialize(state.ParallelDims(context=size), seed=7)
    torch.set_num_threads(1)
    results = {}
    layers = config = None
    for check in checks:
        start = time.perf_counter()
        name, _, arg = check.partition(":")
        if name == "op":
            results[check] = check_op(arg)
        elif name == "conv":
            results[check] = check_conv_halo()
        elif name == "qkclip":
            if layers is None:
                config, layers = build_layers()
            results[check] = check_max_logits(arg, layers, config)
        elif name in ("layer", "causal"):
            kind, mode = arg.split("/")
            if layers is None:
                config, layers = build_layers()
            fn = check_layer if name == "layer" else check_causality
            results[check] = fn(kind, mode, layers, config)
        else:
            raise SystemExit(f"unknown check {check}")
        results[check]["seconds"] = time.perf_counter() - start
    everyone = [None] * size
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        Path(out_dir, f"cp{size}.json").write_text(json.dumps(everyone))
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
