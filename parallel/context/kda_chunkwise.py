"""Chunkwise KDA context parallelism: each rank runs the ordinary KDA op on its slice, with the state
that the earlier ranks' tokens leave behind as its initial state (docs/parallelism.md).

Forward, per KDA layer and CP rank r (one micro-batch of b samples, one pair per sample):
1. pre-pass (no autograd, fp32): the affine map ``S -> M_r S + E_r`` of the slice's last document
   segment (``kda_prepass.transition_pairs``); ``M_r`` is 0 unless the slice is one segment that
   continues a document, so the chain stops at every document start;
2. one all-gather of the ``[M | E]`` pairs, ``H dk (dk + dv)`` fp32 values per sample and rank;
3. fold: ``S_in(j+1) = M_j S_in(j) + E_j`` for j < r (0 where rank j+1 starts a document) gives the
   state entering this slice, the initial state of its first document segment;
4. the local op (``kernels.kda.chunk_kda`` or ``chunk_kda_cpu``) with that initial state, and with
   its final states as outputs so that autograd hands their gradient to the local backward.

Backward: the local backward needs dL/d(final state of the last segment), which is the next rank's
dL/d(entering state). That gradient is affine too: ``dS_in(j) = M_j^T dS_out(j) + D_j`` with ``D_j``
the gradient through rank j's own outputs (``kda_prepass.entry_state_gradients``: the reverse state
scan with a zero final-state gradient). ``ExitStateGradient`` (between the op and the rest of the
layer) computes ``D_r`` from dL/do, all-gathers it (``H dk dv`` fp32 per sample), folds the later
ranks' ``(M_j, D_j)`` from the last rank down to r+1 (the M_j were gathered in the forward) and hands
dL/do plus that final-state gradient to the local op's backward. The entering state itself is a
constant of this rank's graph: its gradient belongs to the earlier ranks, which receive it as their
final-state gradient. So every rank's gradients are those of one process running the whole sequence.
"""

from __future__ import annotations

import torch

from kernels.host_values import to_device

from .comm import all_gather_pairs
from .conv_halo import conv_silu_with_halo
from .kda_prepass import entry_state_gradients, transition_pairs
from .layout import ContextParallel


class _Chain:
    """Which samples of this rank take part in the chain, as host lists and as (cached) device tensors
    (built once per micro-batch from host values with non-blocking copies: no wait for the GPU)."""

    def __init__(self, cp: ContextParallel, device):
        rank, b = cp.rank, cp.batch_size
        first, last = cp.local_segments
        # samples whose state the next rank takes (their last segment's pair is needed) ...
        self.sends = [i for i in range(b) if rank + 1 < cp.size and bool(cp.continues[rank + 1, i])]
        self.send_docs = [last[i] for i in self.sends]
        self.send_with_m = [bool(cp.single[rank, i]) for i in self.sends]
        # ... and samples whose first segment continues a document from the previous rank
        self.receives = [i for i in range(b) if bool(cp.continues[rank, i])]
        self.receive_docs = [first[i] for i in self.receives]
        dev = lambda values, dtype=torch.int64: to_device(torch.tensor(values, dtype=dtype), device)
        self.first, self.last = dev(first), dev(last)
        self.sends_t, self.receives_t = dev(self.sends), dev(self.receives)
        self.send_docs_t, self.receive_docs_t = dev(self.send_docs, torch.int32), dev(self.receive_docs, torch.int32)
        self.send_with_m_t = dev(self.send_with_m, torch.int32)
        self.continues = cp.continues.tolist()  # [P][b] host values
        self.documents = len(cp.local_cu) - 1

    @staticmethod
    def of(cp: ContextParallel, device) -> "_Chain":
        key = ("kda_chain", str(device))
        if key not in cp._host:
            cp._host[key] = _Chain(cp, device)
        return cp._host[key]


def _affine_fold(steps, keep) -> torch.Tensor | None:
    """From S = 0: ``S <- keep_n * (A_n S + B_n)`` over ``steps`` = [(A_n [b, H, K, K], B_n [b, H, K, X])]
    with ``keep`` = [per-sample 0/1 host values]; None when S ends at 0. One batched GEMM per step (and
    a zeroing only where a document starts): the fold runs once per layer and its GPU work is tiny, so
    its cost is the host's launches."""
    state = None
    for (a, add), kept in zip(steps, keep):
        b, H, K, X = add.shape
        if state is None:
            state = add  # a view into the gathered tensor: copied before any in-place change
        else:
            state = torch.baddbmm(add.reshape(b * H, K, X), a.reshape(b * H, K, K), state.reshape(b * H, K, X))
            state = state.view(b, H, K, X)
        dropped = [i for i, c in enumerate(kept) if not c]
        if len(dropped) == b:
            state = None
        elif dropped:
            state = state.clone() if state is add else state
            state[dropped] = 0
    return state


def _rows(continues) -> list[list[float]]:
    return continues.tolist() if torch.is_tensor(continues) else continues


def fold_entry_states(pairs: torch.Tensor, continues, rank: int) -> torch.Tensor:
    """State entering rank ``rank``'s slice of each sample, [b, H, Dk, Dv].

    pairs: [P, b, H, Dk, Dk + Dv] = [M_j | E_j] of every rank; continues: [P][b] host values, or a
    tensor (1: rank j's slice continues a document from rank j-1, else 0)."""
    dk, rows = pairs.shape[-2], _rows(continues)
    state = _affine_fold([(pairs[j, ..., :dk], pairs[j, ..., dk:]) for j in range(rank)],
                         [rows[j + 1] for j in range(rank)])
    return pairs.new_zeros(*pairs.shape[1:-1], pairs.shape[-1] - dk) if state is None else state


def fold_exit_gradients(grads: torch.Tensor, transitions: torch.Tensor, continues, rank: int) -> torch.Tensor:
    """dL/d(state leaving rank ``rank``'s slice) of each sample, [b, H, Dk, Dv].

    grads: [P, b, H, Dk, Dv], every rank's gradient of its entering state through its own outputs;
    transitions: [P - rank - 1, b, H, Dk, Dk], M_j of the later ranks j = rank+1 .. P-1."""
    later, rows = range(grads.shape[0] - 1, rank, -1), _rows(continues)
    state = _affine_fold([(transitions[j - rank - 1].transpose(-1, -2), grads[j]) for j in later],
                         [rows[j] for j in later])
    return torch.zeros_like(grads[0]) if state is None else state


def _entering_states(cp, chain: _Chain, pairs, dv):
    """All-gather this rank's pairs, fold: (initial states of the local documents, later ranks' M)."""
    gathered = all_gather_pairs(pairs, cp.group, cp.size)
    dk = pairs.shape[-2]
    initial = pairs.new_zeros(chain.documents, pairs.shape[1], dk, dv)
    initial[chain.first] = fold_entry_states(gathered, chain.continues, cp.rank)
    return initial, gathered[cp.rank + 1:, ..., :dk].contiguous()


def _final_state_gradients(cp, chain: _Chain, own, transitions):
    """All-gather the entering-state gradients, fold back: dL/d(final states of the local documents)."""
    gathered = all_gather_pairs(own, cp.group, cp.size)
    d_final = own.new_zeros(chain.documents, *own.shape[1:])
    d_final[chain.last] = fold_exit_gradients(gathered, transitions, chain.continues, cp.rank)
    return d_final


class ExitStateGradient(torch.autograd.Function):
    """Identity on the local op's output ``o``; in backward it computes the gradient of the local op's
    final states (the later ranks' dL/d(entering state)) and returns it with dL/do."""

    @staticmethod
    def forward(ctx, o, final_state, plan, q, k, g, beta, gate_a, gate_b, transitions):
        ctx.plan = plan
        ctx.save_for_backward(q, k, g, beta, gate_a, gate_b, transitions)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q, k, g, beta, gate_a, gate_b, transitions = ctx.saved_tensors
        plan: _Plan = ctx.plan
        cp, chain = plan.cp, plan.chain
        own = do.new_zeros(cp.batch_size, *plan.state_shape, dtype=torch.float32)
        if chain.receives:
            gate = (gate_a, gate_b, plan.lower_bound) if plan.has_gate else None
            own[chain.receives_t] = entry_state_gradients(q, k, g, beta, do, cp.local_cu, chain.receive_docs,
                                                          scale=plan.scale, use_qk_l2norm=plan.use_qk_l2norm,
                                                          gate=gate).float()
        return do, _final_state_gradients(cp, chain, own, transitions), None, None, None, None, None, None, None, None


class _Plan:
    """What the backward pre-pass needs besides tensors."""

    def __init__(self, cp, chain, state_shape, scale, use_qk_l2norm, has_gate, lower_bound):
        self.cp, self.chain, self.state_shape, self.scale = cp, chain, state_shape, scale
        self.use_qk_l2norm, self.has_gate, self.lower_bound = use_qk_l2norm, has_gate, lower_bound


class TritonStateHook:
    """The same scheme inside the Triton op (``kernels.kda.chunk.chunk_kda_triton``'s ``state_hook``):
    the pre-passes run as Triton kernels on the forward's own WY pieces (``kernels/kda/cp_prepass.py``)
    between its WY and state passes, and at the start of its backward on the pieces it saved."""

    def __init__(self, cp: ContextParallel, chain: _Chain):
        self.cp, self.chain = cp, chain
        self.transitions = None

    def initial_state(self, pieces, cu, offsets, options):
        from kernels.kda import cp_prepass

        cp, chain = self.cp, self.chain
        H, K, V = pieces["W"].shape[1], pieces["W"].shape[3], pieces["U"].shape[3]
        pairs = pieces["W"].new_zeros(cp.batch_size, H, K, K + V, dtype=torch.float32)
        if chain.sends:
            pairs[chain.sends_t] = cp_prepass.transition_pairs(pieces, cu, offsets, chain.send_docs_t,
                                                               chain.send_with_m_t, options)
        initial, self.transitions = _entering_states(cp, chain, pairs, V)
        return initial

    def final_state_gradient(self, pieces, do, cu, offsets, options):
        from kernels.kda import cp_prepass

        cp, chain = self.cp, self.chain
        H, K, V = pieces["W"].shape[1], pieces["W"].shape[3], do.shape[-1]
        own = do.new_zeros(cp.batch_size, H, K, V, dtype=torch.float32)
        if chain.receives:
            own[chain.receives_t] = cp_prepass.entry_state_gradients(pieces, do, cu, offsets, chain.receive_docs_t,
                                                                     options)
        return _final_state_gradients(cp, chain, own, self.transitions)


def chunkwise_kda(q, k, v, g, beta, cp: ContextParallel, *, scale=None, use_qk_l2norm=True, gate=None,
                  op=None, fused_prepass=None, options=None) -> torch.Tensor:
    """This rank's KDA output [1, b*L, H, Dv] for its slice ([1, b*L, H, D] inputs in the API of
    ``kernels/kda/__init__.py``, documents from ``cp``).

    fused_prepass (default: on CUDA tensors): the Triton op runs the Triton pre-passes on its own WY
    pieces (``TritonStateHook``); otherwise the PyTorch pre-passes run around ``op``, any local KDA op
    (default: the model's, ``model.kda.kda_op``) with ``ExitStateGradient`` after it. ``options``: the
    ``kernels.kda.KDAOptions`` of the Triton op and pre-passes (default ones when None)."""
    if q.shape[1] != cp.batch_size * cp.local_length:
        raise ValueError(f"chunkwise KDA got {q.shape[1]} tokens; this CP rank holds b*L = "
                         f"{cp.batch_size}x{cp.local_length}")
    kwargs = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, gate=gate, cu_seqlens=cp.cu_seqlens)
    if fused_prepass is None:
        fused_prepass = q.is_cuda
    if op is None:
        from model.kda import kda_op as op
    if options is not None:
        kwargs["options"] = options
    if not cp.any_continues:  # every slice starts a document: nothing crosses a rank boundary
        return op(q, k, v, g, beta, **kwargs)[0]
    chain = _Chain.of(cp, q.device)
    if fused_prepass:
        from kernels.kda.chunk import chunk_kda_triton

        return chunk_kda_triton(q, k, v, g, beta, state_hook=TritonStateHook(cp, chain), **kwargs)[0]
    H, dk, dv = q.shape[2], q.shape[3], v.shape[3]
    gate_a = gate_b = None
    if gate is not None:
        gate_a, gate_b = gate[0].detach(), gate[1].detach()
    detached = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, gate=None if gate is None else (gate_a, gate_b, gate[2]))
    with torch.no_grad():
        pairs = q.new_zeros(cp.batch_size, H, dk, dk + dv, dtype=torch.float32)
        if chain.sends:
            pairs[chain.sends_t] = transition_pairs(k.detach(), v.detach(), g.detach(), beta.detach(), cp.local_cu,
                                                    chain.send_docs, chain.send_with_m, **detached).float()
        initial, transitions = _entering_states(cp, chain, pairs, dv)
    o, final = op(q, k, v, g, beta, initial_state=initial, output_final_state=True, **kwargs)
    plan = _Plan(cp, chain, (H, dk, dv), scale, use_qk_l2norm, gate is not None, None if gate is None else gate[2])
    return ExitStateGradient.apply(o, final, plan, q.detach(), k.detach(), g.detach(), beta.detach(),
                                   gate_a, gate_b, transitions)


def chunkwise_kda_core(cp: ContextParallel, projections, kernels, g, beta_logits, gate, head_dim: int,
                       options=None):
    """The KDA layer's core under chunkwise CP (see ``ContextParallel.kda``): short conv with the
    previous rank's halo, SiLU, then ``chunkwise_kda``."""
    t = projections[0].shape[0]
    q, k, v = (x.view(1, t, -1, head_dim) for x in conv_silu_with_halo(cp, projections, kernels))
    beta = torch.sigmoid(beta_logits.float()).view(1, t, -1)
    return chunkwise_kda(q, k, v, g.unsqueeze(0), beta, cp, use_qk_l2norm=True, gate=gate, options=options)
