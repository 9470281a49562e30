"""Context parallelism in a training run: the startup checks, and each micro-batch cut to this rank's
slice together with the context object the mixers take (docs/parallelism.md).

With ``--context-parallel-size P`` the ranks of one CP group (megatron-core's, built by
``parallel.state.initialize``) read the same micro-batches: they share a data-parallel rank. Each
keeps only positions ``[r S/P, (r+1) S/P)`` of every sample (``data.cp_slice``, on the host, before
anything reaches the device); the batch's ``cu_seqlens`` stays the one source of document
boundaries and travels in the ``ContextParallel`` object, from which every rank derives the same
tables. What the rest of the loop has to know:

* the loss is a token sum over this rank's slice: token counts, loss sums and the model FLOPs are
  reduced over the data x context group (``reduction_group``), so the logged loss is the mean over
  whole sequences;
* gradients: every parameter's gradient on a CP rank is its slice's share; the data x context
  reduction (train/grads.py, megatron's DDP / distributed optimizer) sums the shares, and
  ``gradient_scale`` makes our averaging reduction come out as the global token mean;
* the MoE router counts and the expert-bias update already reduce over tensor x data x context ranks
  (megatron-core), so they see every token.
"""

from __future__ import annotations

import importlib.util

from megatron.core import parallel_state

from data.context_parallel import cp_slice
from model.config import ConfigError
from parallel.context import MODES, ContextParallel

CP_FLAG = "--context-parallel-size"


def check_layout(run) -> None:
    """Raise ConfigError (one line naming the flag and the fix) for a CP layout that cannot run."""
    t, model = run.train, run.model
    if t.cp_mode not in MODES:
        raise ConfigError(f"--cp-mode {t.cp_mode!r} (train.cp_mode): choose one of {', '.join(MODES)}")
    size = t.context_parallel_size
    if size == 1:
        return
    if t.seq_length % size:
        raise ConfigError(
            f"--seq-length {t.seq_length} is not divisible by {CP_FLAG} {size}: every CP rank holds seq_length / CP "
            f"tokens of each sequence; choose a multiple of {size}")
    local, tp = t.seq_length // size, t.tensor_model_parallel_size
    types = set(model.layer_types)
    if t.cp_mode == "ulysses":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("--cp-mode ulysses runs DeepSpeed's all-to-all: pip install deepspeed, or use --cp-mode chunkwise")
        for heads, name, kinds in ((model.kda_num_heads, "kda_num_heads", {"kda", "gdn"}),
                                   (model.num_attention_heads, "num_attention_heads", {"mla"})):
            if types & kinds and heads % (size * tp):
                raise ConfigError(
                    f"--cp-mode ulysses gives each of the CP x TP = {size} x {tp} ranks whole heads, but "
                    f"model.{name}={heads} does not divide by {size * tp}; use --cp-mode chunkwise or change "
                    f"{CP_FLAG} / --tensor-model-parallel-size")
    elif types & {"kda", "gdn"} and local < model.short_conv_kernel - 1:
        raise ConfigError(
            f"{CP_FLAG} {size} leaves {local} tokens per rank, fewer than the short convolution reads back "
            f"({model.short_conv_kernel - 1}); use a longer --seq-length or a smaller {CP_FLAG}")
    sequence_parallel = t.sequence_parallel or (tp > 1 and "moe" in model.ffn_types)
    if sequence_parallel and (t.micro_batch_size * local) % tp:
        raise ConfigError(
            f"sequence parallelism splits each rank's micro_batch_size x seq_length / CP = {t.micro_batch_size * local} "
            f"tokens over --tensor-model-parallel-size {tp}; change --micro-batch-size, --seq-length or {CP_FLAG}")


class ContextSlicer:
    """This rank's view of context parallelism for one run: ``slice`` cuts a micro-batch."""

    def __init__(self, mode: str = "chunkwise"):
        self.mode = mode
        self.size = parallel_state.get_context_parallel_world_size()
        self.rank = parallel_state.get_context_parallel_rank()
        self.group = parallel_state.get_context_parallel_group() if self.size > 1 else None

    def slice(self, batch: dict) -> dict:
        """This rank's part of a host micro-batch (``cp_slice``) with its ``ContextParallel`` under
        ``"context_parallel"``; the batch itself when CP = 1."""
        if self.size == 1:
            return batch
        part = cp_slice(batch, self.rank, self.size)
        part["context_parallel"] = ContextParallel.from_slice(part, self.group, self.rank, self.size, self.mode)
        return part


def global_cu_seqlens(batch: dict):
    """The document boundaries of the whole micro-batch (of a sliced batch too)."""
    return batch.get("global_cu_seqlens", batch["cu_seqlens"])


def reduction_group():
    """The data x context parallel group: token counts, loss sums and gradients are reduced over it."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def reduction_size() -> int:
    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def gradient_scale(total_tokens, megatron_ddp: bool):
    """The factor on a micro-batch's token-sum loss that makes the reduced gradients those of the
    global token mean: megatron's DDP sums over data x context ranks, train/grads.py averages."""
    return (1 if megatron_ddp else reduction_size()) / total_tokens
