"""The LM head and its vocab-parallel cross entropy, a chunk of tokens at a time.

``chunked_lm_head_loss`` gives the same per-token losses and gradients as megatron's
``ColumnParallelLinear`` output layer followed by ``vocab_parallel_cross_entropy(logits.float(),
labels)``, without ever holding the logits of the whole micro-batch: the forward computes, per chunk of
``chunk_tokens`` tokens, the logits ``[chunk, vocab / TP]`` in the weight's dtype, their fp32 copy, the
softmax statistics across TP ranks (all-reduced maximum, sum of exponentials and target logit) and the
loss, then drops the chunk; it keeps only the maximum and the sum of exponentials of each token (fp32).
The backward recomputes each chunk's logits (one extra LM-head matmul over the micro-batch), forms the
softmax minus the one-hot target, and accumulates the hidden states' gradient and the weight's gradient
(fp32) chunk by chunk. Peak memory of the head: one chunk's logits instead of all of them
(docs/training.md, "Chunked LM head and loss").

Tensor parallelism follows the output layer it replaces: the weight is this rank's vocabulary shard; the
hidden states are whole on every TP rank (their gradient is summed over the TP group), or with sequence
parallelism this rank's token shard, all-gathered here and again in the backward (as megatron does, so
only the shard is kept), the gradient reduce-scattered back. The weight's gradient is returned to
autograd like megatron's layer does without gradient-accumulation fusion: it lands in ``weight.grad``,
where the optimizers and megatron's DDP hooks (distributed optimizer) take it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim


def _target_columns(labels: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this rank's vocabulary shard, 0 where it lies outside; outside mask)."""
    local = labels - vocab_start
    outside = (local < 0) | (local >= vocab_local)
    return local.masked_fill(outside, 0), outside


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, sequence_parallel, group):
        size = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        full = _gather_along_first_dim(hidden, group) if sequence_parallel and size > 1 else hidden
        vocab_local = weight.shape[0]
        vocab_start = rank * vocab_local
        tokens = full.shape[0]
        losses = torch.empty(tokens, dtype=torch.float32, device=full.device)
        maxima = torch.empty(tokens, dtype=torch.float32, device=full.device)
        sums_exp = torch.empty(tokens, dtype=torch.float32, device=full.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            logits = torch.matmul(full[start:end], weight.t()).float()
            maximum = logits.max(dim=-1).values
            if size > 1:
                dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
            logits -= maximum.unsqueeze(-1)
            column, outside = _target_columns(labels[start:end], vocab_start, vocab_local)
            target = logits.gather(1, column.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
            sums = torch.stack([logits.exp_().sum(dim=-1), target])  # one all-reduce for both
            if size > 1:
                dist.all_reduce(sums, group=group)
            losses[start:end] = sums[0].log() - sums[1]
            maxima[start:end], sums_exp[start:end] = maximum, sums[0]
            del logits
        # the softmax statistics of every token (8 bytes) are all the backward needs besides the inputs
        ctx.save_for_backward(hidden, weight, labels, maxima, sums_exp)
        ctx.chunk_tokens, ctx.sequence_parallel, ctx.group = chunk_tokens, sequence_parallel, group
        ctx.size, ctx.vocab_start = size, vocab_start
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, maxima, sums_exp = ctx.saved_tensors
        size, group = ctx.size, ctx.group
        gathered = ctx.sequence_parallel and size > 1
        full = _gather_along_first_dim(hidden, group) if gathered else hidden
        vocab_local = weight.shape[0]
        tokens = full.shape[0]
        grad_full = torch.empty_like(full)
        # fp32 accumulation over chunks; a low-precision weight gets its gradient rounded once at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_losses = grad_losses.float()
        for start in range(0, tokens, ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, tokens)
            chunk = full[start:end]
            probs = torch.matmul(chunk, weight.t()).float()
            probs -= maxima[start:end].unsqueeze(-1)
            probs.exp_()
            probs /= sums_exp[start:end].unsqueeze(-1)  # the softmax over the whole vocabulary (all TP ranks)
            column, outside = _target_columns(labels[start:end], ctx.vocab_start, vocab_local)
            rows = torch.arange(end - start, device=probs.device)
            probs[rows, column] -= (~outside).to(probs.dtype)
            probs *= grad_losses[start:end].unsqueeze(-1)
            grad_logits = probs.to(chunk.dtype)
            del probs
            grad_full[start:end] = torch.matmul(grad_logits, weight)
            if grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), chunk)
            else:
                grad_weight += torch.matmul(grad_logits.t(), chunk)
            del grad_logits
        if gathered:
            grad_hidden = _reduce_scatter_along_first_dim(grad_full, group)
        else:
            grad_hidden = grad_full
            if size > 1:  # every TP rank saw only its vocabulary shard: sum the partial gradients
                dist.all_reduce(grad_hidden, group=group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                         sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token cross entropy (fp32, ``[tokens]``) of the LM head ``weight`` (this rank's vocabulary
    shard ``[vocab / TP, hidden]``) on ``hidden`` (``[tokens, ..., hidden]``; with sequence parallelism
    this rank's token shard) against ``labels`` (``tokens`` ids of the whole micro-batch), computed
    ``chunk_tokens`` tokens at a time (module docstring)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be positive (0 means the unchunked head)")
    group = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLMHeadLoss.apply(flat, weight, labels.reshape(-1), chunk_tokens, sequence_parallel, group)
