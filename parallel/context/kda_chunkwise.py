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

from .comm import all_gather_pairs
from .conv_halo import conv_silu_with_halo
from .kda_prepass import entry_state_gradients, transition_pairs
from .layout import ContextParallel


def fold_entry_states(pairs: torch.Tensor, continues: torch.Tensor, rank: int) -> torch.Tensor:
    """State entering rank ``rank``'s slice of each sample, [b, H, Dk, Dv].

    pairs: [P, b, H, Dk, Dk + Dv] = [M_j | E_j] of every rank; continues: bool [P, b]."""
    dk = pairs.shape[-2]
    state = pairs.new_zeros(*pairs.shape[1:-1], pairs.shape[-1] - dk)
    for j in range(rank):
        state = pairs[j, ..., :dk] @ state + pairs[j, ..., dk:]
        state = state * continues[j + 1].to(state).view(-1, 1, 1, 1)
    return state


def fold_exit_gradients(grads: torch.Tensor, transitions: torch.Tensor, continues: torch.Tensor,
                        rank: int) -> torch.Tensor:
    """dL/d(state leaving rank ``rank``'s slice) of each sample, [b, H, Dk, Dv].

    grads: [P, b, H, Dk, Dv], every rank's gradient of its entering state through its own outputs;
    transitions: [P - rank - 1, b, H, Dk, Dk], M_j of the later ranks j = rank+1 .. P-1."""
    size = grads.shape[0]
    out = torch.zeros_like(grads[0])
    for j in range(size - 1, rank, -1):
        out = grads[j] + transitions[j - rank - 1].transpose(-1, -2) @ out
        out = out * continues[j].to(out).view(-1, 1, 1, 1)
    return out


class ExitStateGradient(torch.autograd.Function):
    """Identity on the local op's output ``o``; in backward it computes the gradient of the local op's
    final states (the later ranks' dL/d(entering state)) and returns it with dL/do."""

    @staticmethod
    def forward(ctx, o, final_state, plan, q, k, g, beta, gate_a, gate_b, transitions):
        ctx.plan = plan
        ctx.save_for_backward(q, k, g, beta, gate_a, gate_b, transitions)
        ctx.final_shape, ctx.final_dtype = final_state.shape, final_state.dtype
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q, k, g, beta, gate_a, gate_b, transitions = ctx.saved_tensors
        plan: _Plan = ctx.plan
        cp = plan.cp
        first, last = cp.local_segments
        rank_continues = cp.continues[cp.rank]
        mine = [i for i in range(cp.batch_size) if rank_continues[i]]
        own = do.new_zeros(cp.batch_size, *plan.state_shape, dtype=torch.float32)
        if mine:
            gate = (gate_a, gate_b, plan.lower_bound) if plan.has_gate else None
            own[mine] = entry_state_gradients(q, k, g, beta, do, cp.local_cu, [first[i] for i in mine],
                                              scale=plan.scale, use_qk_l2norm=plan.use_qk_l2norm,
                                              gate=gate).float()
        gathered = all_gather_pairs(own, cp.group, cp.size)
        leaving = fold_exit_gradients(gathered, transitions, cp.continues, cp.rank)
        d_final = do.new_zeros(ctx.final_shape, dtype=ctx.final_dtype)
        d_final[last] = leaving.to(ctx.final_dtype)
        return do, d_final, None, None, None, None, None, None, None, None


class _Plan:
    """What the backward pre-pass needs besides tensors."""

    def __init__(self, cp, state_shape, scale, use_qk_l2norm, has_gate, lower_bound):
        self.cp, self.state_shape, self.scale = cp, state_shape, scale
        self.use_qk_l2norm, self.has_gate, self.lower_bound = use_qk_l2norm, has_gate, lower_bound


class TritonStateHook:
    """The same scheme inside the Triton op (``kernels.kda.chunk.chunk_kda_triton``'s ``state_hook``):
    the pre-passes run as Triton kernels on the forward's own WY pieces (``kernels/kda/cp_prepass.py``)
    between its WY and state passes, and at the start of its backward on the pieces it saved."""

    def __init__(self, cp: ContextParallel):
        self.cp = cp
        self.transitions = None

    def initial_state(self, pieces, cu, offsets):
        from kernels.kda import cp_prepass

        cp, rank = self.cp, self.cp.rank
        first, last = cp.local_segments
        H, K, V = pieces["W"].shape[1], pieces["W"].shape[3], pieces["U"].shape[3]
        pairs = pieces["W"].new_zeros(cp.batch_size, H, K, K + V, dtype=torch.float32)
        wanted = [i for i in range(cp.batch_size) if rank + 1 < cp.size and cp.continues[rank + 1, i]]
        if wanted:
            pairs[wanted] = cp_prepass.transition_pairs(pieces, cu, offsets, [last[i] for i in wanted],
                                                        [bool(cp.single[rank, i]) for i in wanted])
        gathered = all_gather_pairs(pairs, cp.group, cp.size)
        self.transitions = gathered[rank + 1:, ..., :K].contiguous()
        initial = pairs.new_zeros(len(cp.local_cu) - 1, H, K, V)
        initial[first] = fold_entry_states(gathered, cp.continues, rank)
        return initial

    def final_state_gradient(self, pieces, do, cu, offsets):
        from kernels.kda import cp_prepass

        cp, rank = self.cp, self.cp.rank
        first, last = cp.local_segments
        H, K, V = pieces["W"].shape[1], pieces["W"].shape[3], do.shape[-1]
        own = do.new_zeros(cp.batch_size, H, K, V, dtype=torch.float32)
        mine = [i for i in range(cp.batch_size) if cp.continues[rank, i]]
        if mine:
            own[mine] = cp_prepass.entry_state_gradients(pieces, do, cu, offsets, [first[i] for i in mine])
        gathered = all_gather_pairs(own, cp.group, cp.size)
        d_final = own.new_zeros(len(cp.local_cu) - 1, H, K, V)
        d_final[last] = fold_exit_gradients(gathered, self.transitions, cp.continues, rank)
        return d_final


def chunkwise_kda(q, k, v, g, beta, cp: ContextParallel, *, scale=None, use_qk_l2norm=True, gate=None,
                  op=None, fused_prepass=None) -> torch.Tensor:
    """This rank's KDA output [1, b*L, H, Dv] for its slice ([1, b*L, H, D] inputs in the API of
    ``kernels/kda/__init__.py``, documents from ``cp``).

    fused_prepass (default: on CUDA tensors): the Triton op runs the Triton pre-passes on its own WY
    pieces (``TritonStateHook``); otherwise the PyTorch pre-passes run around ``op``, any local KDA op
    (default: the model's, ``model.kda.kda_op``) with ``ExitStateGradient`` after it."""
    if q.shape[1] != cp.batch_size * cp.local_length:
        raise ValueError(f"chunkwise KDA got {q.shape[1]} tokens; this CP rank holds b*L = "
                         f"{cp.batch_size}x{cp.local_length}")
    kwargs = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, gate=gate, cu_seqlens=cp.cu_seqlens)
    if fused_prepass is None:
        fused_prepass = q.is_cuda
    if op is None:
        from model.kda import kda_op as op
    if not cp.any_continues:  # every slice starts a document: nothing crosses a rank boundary
        return op(q, k, v, g, beta, **kwargs)[0]
    if fused_prepass:
        from kernels.kda.chunk import chunk_kda_triton

        return chunk_kda_triton(q, k, v, g, beta, state_hook=TritonStateHook(cp), **kwargs)[0]
    H, dk, dv = q.shape[2], q.shape[3], v.shape[3]
    first, last = cp.local_segments
    rank = cp.rank
    gate_a = gate_b = None
    pre_gate = gate
    if gate is not None:
        gate_a, gate_b = gate[0].detach(), gate[1].detach()
        pre_gate = (gate_a, gate_b, gate[2])
    with torch.no_grad():
        pairs = q.new_zeros(cp.batch_size, H, dk, dk + dv, dtype=torch.float32)
        if rank + 1 < cp.size:  # the last rank's pair reaches no one
            wanted = [i for i in range(cp.batch_size) if cp.continues[rank + 1, i]]
            if wanted:
                pairs[wanted] = transition_pairs(
                    k.detach(), v.detach(), g.detach(), beta.detach(), cp.local_cu, [last[i] for i in wanted],
                    [bool(cp.single[rank, i]) for i in wanted], scale=scale, use_qk_l2norm=use_qk_l2norm,
                    gate=pre_gate).float()
        gathered = all_gather_pairs(pairs, cp.group, cp.size)
        entering = fold_entry_states(gathered, cp.continues, rank)
    initial = q.new_zeros(len(cp.local_cu) - 1, H, dk, dv, dtype=torch.float32)
    initial[first] = entering
    o, final = op(q, k, v, g, beta, initial_state=initial, output_final_state=True, **kwargs)
    transitions = gathered[rank + 1:, ..., :dk].contiguous()
    plan = _Plan(cp, (H, dk, dv), scale, use_qk_l2norm, gate is not None, None if gate is None else gate[2])
    return ExitStateGradient.apply(o, final, plan, q.detach(), k.detach(), g.detach(), beta.detach(),
                                   gate_a, gate_b, transitions)


def chunkwise_kda_core(cp: ContextParallel, projections, kernels, g, beta_logits, gate, head_dim: int):
    """The KDA layer's core under chunkwise CP (see ``ContextParallel.kda``): short conv with the
    previous rank's halo, SiLU, then ``chunkwise_kda``."""
    t = projections[0].shape[0]
    q, k, v = (x.view(1, t, -1, head_dim) for x in conv_silu_with_halo(cp, projections, kernels))
    beta = torch.sigmoid(beta_logits.float()).view(1, t, -1)
    return chunkwise_kda(q, k, v, g.unsqueeze(0), beta, cp, use_qk_l2norm=True, gate=gate)

