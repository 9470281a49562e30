"""Only healthy weights are saved, so a diverged run always points at a checkpoint that resumes.

The checkpoint written after step N holds the update of step N, which step N's loss never saw:
with a learning rate far too large, step N's loss is finite while the weights it produced give
NaN logits. Before a checkpoint is written, ``weights_are_healthy`` runs one forward pass (no
gradients, eval mode: no router counters, no QK-Clip records, no RNG draws, so training continues
bitwise as without it) on the step's first micro-batch with the weights about to be saved; the
save is skipped when any rank's loss is not finite. Every committed checkpoint has passed this
check (``meta.json`` keeps its loss), so ``latest`` and the divergence error below name one that
resumes with a finite loss (see docs/reliability.md).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from train import checkpoint as ckpt
from train.errors import DivergenceError
from train.step import forward_backward


def weights_are_healthy(model, batch: dict) -> tuple[bool, float]:
    """(every rank's loss on ``batch`` with the current weights is finite, this rank's mean loss).
    A collective over all ranks."""
    was_training = model.training
    model.eval()
    try:
        loss_sum = forward_backward(model, [batch], torch.ones(()), forward_only=True)
    finally:
        model.train(was_training)
    tokens = float(batch["loss_mask"].sum())
    loss = float(loss_sum) / max(tokens, 1.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces only GPU tensors
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0.0), loss


def divergence_error(what: str, save: str) -> DivergenceError:
    """The error that stops a diverged run (``what`` happened), naming where to resume."""
    last = ckpt.latest_step(save) if save else None
    where = (
        f"The last good checkpoint is {ckpt.iteration_dir(save, last)} (its weights gave a finite loss when "
        f"it was saved; a run on --save {save} resumes from it)"
        if last is not None else "There is no checkpoint to resume from"
    )
    return DivergenceError(
        f"{what}; stopping. {where}. Lower the learning rate (--lr, --min-lr), check the data, or raise "
        f"train.max_nonfinite_steps"
    )
