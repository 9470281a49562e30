"""Muon (with AdamW for the non-matrix parameters) and QK-Clip: the MuonClip optimizer of Kimi K2.

Muon, per 2-D hidden weight matrix ``W`` (n x m) with gradient ``G``::

    B  <- mu * B + G                       momentum buffer (mu = 0.95)
    U  <- G + mu * B                       Nesterov direction (or U = B without Nesterov)
    O  <- NS5(U)                           quintic Newton-Schulz, 5 steps: ~ the polar factor U V^T
    W  <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(n, m)) * O

``NS5`` normalises ``X = U / (||U||_F + 1e-7)`` (transposed so that rows <= columns) and iterates
``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, which
pushes every singular value into roughly [0.7, 1.2]. The factor ``0.2 * sqrt(max(n, m))``
(Moonlight / Kimi K2) gives the update the RMS of a typical AdamW update, so one learning rate
and weight decay serve both kinds of parameters.

Parameters that are not hidden matrices use AdamW inside the same optimizer object (one
``state_dict`` for checkpoints, one ``param_groups`` list for the LR schedule): see
``train.optim.uses_muon`` for the split.

Tensor parallelism. ``NS5`` of a shard is not the shard of ``NS5`` of the matrix, so every
TP-split matrix (megatron attributes ``tensor_model_parallel``/``partition_dim``) is all-gathered
over its TP group along ``partition_dim`` (coalesced all-gathers in buckets of at most
``BUCKET_NUMEL`` gathered elements), every rank orthogonalises the full matrix (identical work,
identical result) and keeps its own slice. Routed
experts use megatron's expert-tensor-parallel group, everything else the TP group. Expert
parallelism needs no communication: each rank owns whole experts, each expert's matrices are
orthogonalised separately (batched by shape).

Fused SwiGLU ``linear_fc1`` (dense MLP, shared and routed experts) holds ``[gate; up]`` at TP=1
and ``[gate_r; up_r]`` on TP rank r. It is treated as two matrices, gate and up, orthogonalised
separately at every TP size (the HF checkpoint's ``gate_proj``/``up_proj`` are separate matrices
too), so TP=1 and TP=2 give the same update.

QK-Clip (``qk_clip``): after the optimizer step, for every MLA layer (every mixer registered with
``qk_clip``, model/mixers.py) and head h whose largest attention logit over the step ``S_h``
(recorded by ``MultiLatentAttention`` when ``record_max_logits`` is set) exceeds ``tau``, with
``gamma = tau / S_h``, the layer's ``clip_qk(gamma)`` scales the rows of ``q_proj`` for head h's
nope part and of ``kv_b_proj`` for head h's k_nope part by sqrt(gamma), the rows of ``q_proj`` for
head h's rope ("q_rot") part by gamma; the shared k_rot slice of ``kv_a_proj_with_mqa`` is not
touched (it feeds every head). Every logit of head h is then exactly ``gamma`` times its old value,
so the head's maximum on the same batch becomes ``tau``. The maxima are max-reduced over the
data(+context)-parallel group first, so all replicas clip identically.
KDA/GDN layers have L2-normalised q/k and get no QK-Clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.buckets import consecutive_groups

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Newton-Schulz iterations of at most this many matrices are batched into one bmm chain
NS_BATCH = 32
# gathered elements alive at once (per all-gather bucket): bounds the optimizer's transient memory
BUCKET_NUMEL = 128 * 2**20


# ----------------------------------------------------------------------------- the math
def newton_schulz(update: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None,
                  eps: float = 1e-7) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation of ``update`` ([..., n, m], batched over leading
    dims). ``dtype``: the iteration's precision (default: bf16 on GPUs, fp32 elsewhere)."""
    if dtype is None:
        dtype = torch.bfloat16 if update.is_cuda else torch.float32
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transposed:
        x = x.mT
    return x.to(update.dtype)


def muon_scale(shape) -> float:
    """RMS matching of Moonlight / Kimi K2: 0.2 * sqrt(max(n, m)) for an n x m matrix."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


# ----------------------------------------------------------------------------- sharded matrices
@dataclass(frozen=True)
class MatrixSpec:
    """How one Muon parameter maps onto full matrices.

    partition_dim: the dimension split over the parallel group (None: replicated, every rank holds
    the whole matrix). group: "tp" (tensor-parallel group) or "expert_tp" (routed experts).
    fused: number of matrices stacked along dim 0 in every shard (2 for SwiGLU [gate; up]).
    """

    partition_dim: int | None = None
    group: str = "tp"
    fused: int = 1


def full_matrices(shards: list[torch.Tensor], spec: MatrixSpec) -> list[torch.Tensor]:
    """The full matrices of a parameter from every rank's local shard (rank order)."""
    parts = [s.chunk(spec.fused, dim=0) for s in shards]
    if spec.partition_dim is None or len(shards) == 1:
        return list(parts[0])
    return [torch.cat([p[i] for p in parts], dim=spec.partition_dim) for i in range(spec.fused)]


DEFAULT_SPEC = MatrixSpec()


def local_parts(updates: list[torch.Tensor], spec: MatrixSpec, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's slice of each per-matrix update: the parameter's ``spec.fused`` row blocks, in order."""
    if spec.partition_dim is not None and world > 1:
        return [u.chunk(world, dim=spec.partition_dim)[rank] for u in updates]
    return list(updates)


def local_update(updates: list[torch.Tensor], spec: MatrixSpec, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the per-matrix updates, stacked back in the parameter's layout."""
    parts = local_parts(updates, spec, rank, world)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def orthogonalize(matrices: list[torch.Tensor], steps: int = NS_STEPS, dtype=None) -> list[torch.Tensor]:
    """``0.2 sqrt(max(n,m)) NS5(M)`` for every matrix, batched over equal shapes."""
    out: list[torch.Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for (shape, _, _), index in by_shape.items():
        scale = muon_scale(shape)
        for start in range(0, len(index), NS_BATCH):
            chunk = index[start:start + NS_BATCH]
            result = newton_schulz(torch.stack([matrices[i] for i in chunk]), steps, dtype) * scale
            for j, i in enumerate(chunk):
                out[i] = result[j]
    return out


def orthogonalized_from_shards(shards: list[torch.Tensor], spec: MatrixSpec, rank: int,
                               steps: int = NS_STEPS, dtype=None) -> torch.Tensor:
    """Muon update of rank ``rank``'s shard given every rank's shard (a pure function: what the
    optimizer computes after its all-gather; used by the tests with fake shards)."""
    return local_update(orthogonalize(full_matrices(shards, spec), steps, dtype), spec, rank, len(shards))


def _process_group(kind: str):
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if kind == "expert_tp":
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _all_gather_coalesced(tensors: list[torch.Tensor], group) -> list[list[torch.Tensor]]:
    """Every rank's version of each tensor (same shapes on all ranks), one collective in total."""
    world = dist.get_world_size(group)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(gathered, flat, group=group)
    per_rank = gathered.view(world, -1)
    result, offset = [], 0
    for t in tensors:
        result.append([per_rank[r, offset:offset + t.numel()].view_as(t) for r in range(world)])
        offset += t.numel()
    return result


# ----------------------------------------------------------------------------- the optimizer
class Muon(torch.optim.Optimizer):
    """Muon for the groups with ``use_muon=True``, AdamW for the others (one optimizer object).

    ``specs`` maps each Muon parameter to its ``MatrixSpec`` (default: replicated, not fused).
    Group keys: lr, weight_decay, and momentum/nesterov/ns_steps (Muon) or betas/eps (AdamW).
    """

    def __init__(self, param_groups, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, betas=(0.9, 0.95), eps: float = 1e-8,
                 specs: dict | None = None, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=betas, eps=eps, use_muon=False)
        super().__init__(param_groups, defaults)
        self.specs = specs or {}
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"Muon needs matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype) for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        directions = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else [b.clone() for b in bufs]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        # buckets of parameters sharing a process group (replicated ones: no group), bounded in size
        # so that the gathered full matrices of one bucket at a time are alive
        by_kind: dict[str | None, list[int]] = {}
        for i, p in enumerate(params):
            spec = self.specs.get(p, DEFAULT_SPEC)
            by_kind.setdefault(spec.group if spec.partition_dim is not None else None, []).append(i)
        for kind, index in by_kind.items():
            pg = _process_group(kind) if kind is not None else None
            world = dist.get_world_size(pg) if pg is not None else 1
            rank = dist.get_rank(pg) if pg is not None else 0
            for bucket in consecutive_groups(index, [directions[i].numel() for i in index], BUCKET_NUMEL // world):
                if world > 1:
                    shards = _all_gather_coalesced([directions[i] for i in bucket], pg)
                else:
                    shards = [[directions[i]] for i in bucket]
                specs = [self.specs.get(params[i], DEFAULT_SPEC) for i in bucket]
                matrices = []
                for every, spec in zip(shards, specs):
                    matrices.extend(full_matrices(every, spec))
                updates = orthogonalize(matrices, group["ns_steps"], self.ns_dtype)
                # each update into its row block of the parameter, all in one multi-tensor add (a
                # concatenation and an add per parameter were ~3,000 launches per step at 653M)
                blocks, parts, offset = [], [], 0
                for i, spec in zip(bucket, specs):
                    blocks.extend(params[i].chunk(spec.fused, dim=0) if spec.fused > 1 else [params[i]])
                    parts.extend(local_parts(updates[offset:offset + spec.fused], spec, rank, world))
                    offset += spec.fused
                torch._foreach_add_(blocks, [u.to(b.dtype) for u, b in zip(parts, blocks)], alpha=-lr)

    def _adamw_step(self, group) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        by_step: dict[float, list] = {}  # parameters that started later have their own bias correction
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault(float(state["step"]), []).append(p)
        for step, params in by_step.items():
            grads = [p.grad.to(p.dtype) for p in params]
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            bias1 = 1 - beta1 ** step
            bias2_sqrt = math.sqrt(1 - beta2 ** step)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias1)


# ----------------------------------------------------------------------------- QK-Clip
def mla_layers(model) -> list:
    """The mixers that take QK-Clip (``qk_clip`` in model/mixers.py: MLA), found once per model (a
    walk over its modules is ~10 ms of host time at 653M, and QK-Clip runs every step)."""
    from model import mixers
    from model.model import DecoderLayer

    layers = model.__dict__.get("_qk_clip_layers")
    if layers is None:
        layers = model.__dict__["_qk_clip_layers"] = [
            layer.mixer for layer in model.modules()
            if isinstance(layer, DecoderLayer) and mixers.of_kind(layer.layer_type).qk_clip]
    return layers


def set_max_logit_recording(model, enabled: bool) -> None:
    """Turn the per-head max-logit recording of every MLA layer on or off."""
    for layer in mla_layers(model):
        layer.record_max_logits = enabled
        layer.max_logits = None


@torch.no_grad()
def clip_layer(layer, max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Apply QK-Clip to one MLA layer given its local heads' max logits; returns gamma per head."""
    gamma = (tau / max_logits.float().clamp_min(1e-30)).clamp(max=1.0)
    layer.clip_qk(gamma)
    return gamma


@torch.no_grad()
def qk_clip(model, tau: float, group=None) -> dict:
    """QK-Clip every MLA layer whose recorded max logits exceed ``tau``; resets the records.

    ``group``: where the maxima are max-reduced first (default: megatron's data-parallel group
    with context parallelism, when distributed). Returns ``{"max_logit": float,
    "clipped_heads": int}`` (this rank's heads) for logging.
    """
    layers = [layer for layer in mla_layers(model) if getattr(layer, "max_logits", None) is not None]
    stats = {"max_logit": 0.0, "clipped_heads": 0}
    if not layers:
        return stats
    maxima = torch.cat([layer.max_logits.float().reshape(-1) for layer in layers])
    if group is None:
        group = _data_parallel_group()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    host = maxima.cpu()  # one read of a few hundred values, not two per layer
    offset = 0
    for layer in layers:
        n = layer.max_logits.numel()
        if tau > 0 and bool((host[offset:offset + n] > tau).any()):
            clip_layer(layer, maxima[offset:offset + n].to(layer.q_proj.weight.device), tau)
        offset += n
        layer.max_logits = None
    if tau > 0:
        stats["clipped_heads"] = int((host > tau).sum())
    stats["max_logit"] = float(host.max())
    return stats


def _data_parallel_group():
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
