"""Forward and backward over the micro-batches of one step, with or without pipeline stages.

The loss of a micro-batch is the sum of its masked per-token losses times ``scale`` (so that after
the data-parallel average the gradient is that of the global token mean). Without pipeline
parallelism the micro-batches run one after another (gradient accumulation); with it, megatron's
schedules (1F1B) run them, every stage reading the same micro-batches for their ``cu_seqlens``.
Under context parallelism a micro-batch is this rank's slice and carries its ``ContextParallel``.
Returns the summed (unscaled) token loss of this rank's micro-batches, on every stage, as an fp64
0-dim tensor on the batches' device (nothing here waits for the GPU).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token.float() * mask.to(torch.float32)).sum()


def _context(batch: dict) -> dict:
    """The model's ``context_parallel`` argument when the batch is a CP slice (train/context.py)."""
    cp = batch.get("context_parallel")
    return {} if cp is None else {"context_parallel": cp}


def forward_backward(model, micro_batches: list[dict], scale: torch.Tensor, forward_only: bool = False) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return _sequential(model, micro_batches, scale, forward_only)
    return _pipelined(model, micro_batches, scale, forward_only)


def _sequential(model, micro_batches, scale, forward_only) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["tokens"].device)
    for batch in micro_batches:
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            per_token = model(batch["tokens"], batch["cu_seqlens"], labels=batch["labels"], **_context(batch))
            loss = masked_sum(per_token, batch["loss_mask"])
        if not forward_only:
            (loss * scale.to(loss.dtype)).backward()
        total += loss.detach().double()  # on the device: a read here would wait for the backward
    return total


def _pipelined(model, micro_batches, scale, forward_only) -> torch.Tensor:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel import cpu_compat

    cpu_compat.enable_device_rewrite()  # the schedules allocate with device="cuda"

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        output = stage_model(batch["tokens"], batch["cu_seqlens"], labels=batch["labels"], **_context(batch))

        def loss_func(per_token):
            loss = masked_sum(per_token, batch["loss_mask"])
            tokens = batch["loss_mask"].sum().to(torch.int)
            return loss * scale.to(loss.dtype), tokens, {"loss_sum": loss.detach()}

        return output, loss_func

    chunks = list(model.chunks) if hasattr(model, "chunks") else [model]
    first = micro_batches[0]["tokens"]
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        # every model chunk walks the same micro-batches (it needs their cu_seqlens)
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        # the packed stream [B*S, 1, hidden] travels between stages; megatron divides by the CP size
        seq_length=first.numel() * parallel_state.get_context_parallel_world_size(),
        micro_batch_size=1,
        forward_only=forward_only,
    )
    total = torch.zeros((), dtype=torch.float64, device=first.device)  # NCCL reduces device tensors
    for item in results or []:  # loss dicts exist only on the rank holding the last (virtual) stage
        total += item["loss_sum"].double()
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total
