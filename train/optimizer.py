"""The optimizer as the training loop and the checkpoint code see it: one interface, two implementations.

* ``LocalOptimizer``: our own gradient reductions (train/grads.py: the sequence-parallel sum over TP,
  the data x context average, the global-norm clip), AdamW or Muon with QK-Clip (train/optim.py,
  train/muon.py), fp32 master weights for bf16 parameters (train/precision.py). Its state is saved
  shaped like the parameters, so it reshards with the model.
* ``MegatronOptimizer`` (train/distributed_optimizer.py, ``train.distributed_optimizer=true``):
  megatron-core's DDP and ZeRO-1 distributed optimizer.

A step, as the loop drives it::

    optimizer.begin_step(lr)                                  # set the LR, clear the gradients
    forward_backward(optimizer.runner, batches, optimizer.loss_scale(global_tokens))
    optimizer.reduce_gradients()
    grad_norm, stats = optimizer.update(mean_loss)            # clip and step unless non-finite
    if the loss or grad_norm is not finite: optimizer.discard_step()

``update`` may decide on the device (train/optimizer.py, ``LocalOptimizer._update_on_device``):
then nothing in the step makes the host wait for the GPU until the loop reads the loss and norm
at its end, and that read waits for them only, not for the update's kernels (train/host_copy.py).

Between ``reduce_gradients`` and ``update`` the MoE router still holds the step's token counts
(the detailed metrics read them); ``update`` moves the experts' biases and clears them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from train import context
from train.checkpoint import load_sharded
from train.grads import (
    all_reduce_data_parallel,
    all_reduce_sequence_parallel,
    clip_factor,
    grad_norm_on_device,
    parameter_plan,
    scale_gradients,
)
from train.host_copy import HostCopy
from train.muon import qk_clip, set_max_logit_recording
from train.optim import build_optimizer, qk_clip_enabled
from train.precision import MasterWeights


def _router_modules(model) -> list[nn.Module]:
    """The modules megatron-core's per-step MoE bookkeeping touches (routers with token counters
    or load trackers), found once: its own walk over every module of the model took ~20 ms of host
    time per call at scaling-653m, twice per step, while the GPU waited."""
    routers = model.__dict__.get("_router_modules")
    if routers is None:
        routers = model.__dict__["_router_modules"] = [
            m for m in model.modules()
            if hasattr(m, "expert_bias") or hasattr(m, "reset_global_aux_loss_tracker")
            or getattr(m, "qb_beta_accum", None) is not None]
    return routers


def mask_router_counts(model, keep: torch.Tensor) -> None:
    """Multiply the routers' per-step token counts by ``keep`` (a 0-dim bool tensor): all zero,
    the expert-bias update moves no bias (every expert is at the mean)."""
    counts = [m.local_tokens_per_expert for m in _router_modules(model)
              if getattr(m, "local_tokens_per_expert", None) is not None and hasattr(m, "expert_bias")]
    if counts:
        torch._foreach_mul_(counts, keep.to(counts[0].dtype))


def reset_router_counters(model) -> None:
    """Clear the MoE routers' per-step token counters (megatron-core's temporary tensors)."""
    from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors

    # megatron walks each given module's submodules: given the routers, it visits only them
    reset_model_temporary_tensors(model.config, _router_modules(model))


def update_expert_bias(model) -> None:
    """Aux-loss-free balancing: move each router's expert bias by the sign of (mean load - load)
    over the global batch, then clear the token counters for the next step."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    if model.config.num_moe_experts:
        _update_router_expert_bias(_router_modules(model), model.config)
        reset_router_counters(model)


class TrainingOptimizer(ABC):
    """What a training run needs from its optimizer (see the module docstring).

    ``runner``: the module that forward and backward run through (the model itself, or megatron's
    DDP wrapper around it); ``model``: the model whose parameters are optimized."""

    runner: nn.Module
    model: nn.Module

    @abstractmethod
    def begin_step(self, lr: float) -> None:
        """Set the learning rate of this step and clear the gradients of the previous one."""

    @abstractmethod
    def loss_scale(self, total_tokens: torch.Tensor) -> torch.Tensor:
        """The factor on a micro-batch's token-sum loss that makes the reduced gradients those of the
        global token mean (``total_tokens``: loss tokens of the global batch)."""

    def reduce_gradients(self) -> None:
        """Reduce the gradients over the ranks that share parameters (where that is done apart
        from ``update``)."""

    @abstractmethod
    def update(self, loss: torch.Tensor) -> tuple[HostCopy | float, dict]:
        """Clip the gradients and apply them unless ``loss`` (the step's global mean loss, a 0-dim
        tensor where the model is) or the gradient norm is non-finite. Returns the norm before
        clipping (a float, or where the decision was made on the device a ``HostCopy`` of it, whose
        ``float()`` waits for the norm but not for the update's kernels) and metrics of the update
        (e.g. QK-Clip's)."""

    @abstractmethod
    def discard_step(self) -> None:
        """Drop this step's gradients and router counts (after a non-finite loss or norm)."""

    def reload_model_params(self) -> None:
        """The model's weights were loaded from a checkpoint: copy them into the optimizer's own
        (fp32 master) copies."""

    @abstractmethod
    def state_for_checkpoint(self) -> dict | None:
        """The optimizer state as a megatron sharded state dict, or None when there is none yet."""

    @abstractmethod
    def load_checkpoint_state(self, folder, step: int) -> None:
        """Load (and reshard) the state saved in ``folder`` by a run at ``step``."""


class LocalOptimizer(TrainingOptimizer):
    """Our reductions and clip around AdamW or Muon (MuonClip with QK-Clip when configured);
    bf16 parameters get fp32 master weights."""

    def __init__(self, model: nn.Module, train):
        self.model = self.runner = model
        self.clip_grad = train.clip_grad
        inner = build_optimizer(model, train)
        self.optimizer = MasterWeights(inner) if train.bf16 else inner
        self.qk_clip_tau = train.qk_clip_tau if qk_clip_enabled(train) else 0.0
        set_max_logit_recording(model, self.qk_clip_tau > 0)

    def begin_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self, total_tokens):
        return context.gradient_scale(total_tokens, megatron_ddp=False)

    def reduce_gradients(self) -> None:
        all_reduce_sequence_parallel(self.model)
        all_reduce_data_parallel(self.model)

    def update(self, loss: torch.Tensor):
        with torch.profiler.record_function("optimizer"):
            norm = grad_norm_on_device(self.model)
        if self._skips_on_device():
            return self._update_on_device(loss, norm), {}
        # read both at once; the update waits for the host's decision
        loss_value, grad_norm = (float(x) for x in torch.stack([loss.double(), norm]).cpu())
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return grad_norm, {}
        update_expert_bias(self.model)
        with torch.profiler.record_function("optimizer"):
            self._step(clip_factor(norm, self.clip_grad))  # from the device norm, as the device path
        if self.qk_clip_tau <= 0:
            return grad_norm, {}
        return grad_norm, {f"qk_clip/{k}": v for k, v in qk_clip(self.model, self.qk_clip_tau).items()}

    def _skips_on_device(self) -> bool:
        """Whether this step can clip and skip without the host reading the norm: fused AdamW on
        fp32 masters (after its first step), no QK-Clip (which reads the logit maxima)."""
        return (self.qk_clip_tau <= 0 and isinstance(self.optimizer, MasterWeights)
                and self.optimizer.device_skip_ready())

    def _update_on_device(self, loss: torch.Tensor, norm: torch.Tensor) -> HostCopy:
        """The clip, the expert-bias move and the update, decided on the device: a non-finite loss
        or norm zeroes the routers' token counts (no bias moves) and makes the fused kernel return
        at once. The host runs on to the next step while the GPU works."""
        with torch.profiler.record_function("optimizer"):
            skip = ~(torch.isfinite(norm) & torch.isfinite(loss))
            norm_read = HostCopy(norm)  # queued before the update's kernels: reading it waits for the norm only
            mask_router_counts(self.model, ~skip)
            update_expert_bias(self.model)
            self._step(clip_factor(norm, self.clip_grad), found_inf=skip.float())
        return norm_read

    def _step(self, factor, found_inf=None) -> None:
        """The optimizer's step on gradients multiplied by ``factor`` (MasterWeights applies it in
        fp32, inside the fused kernel where that runs; other optimizers get them scaled in place)."""
        if isinstance(self.optimizer, MasterWeights):
            self.optimizer.step(grad_scale=factor, found_inf=found_inf)
        else:
            scale_gradients(parameter_plan(self.model).by_dtype, factor)
            self.optimizer.step()

    def discard_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        reset_router_counters(self.model)

    def reload_model_params(self) -> None:
        if isinstance(self.optimizer, MasterWeights):
            self.optimizer.sync_masters_from_model()

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_for_checkpoint(self) -> dict | None:
        """Per-parameter tensors as sharded tensors shaped like their parameters (so they reshard
        with the model); scalar step counters are restored from the step number."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if not self.optimizer.state:  # no step taken yet
            return None
        id_map = get_param_id_to_sharded_param_map(self.model.sharded_state_dict(), self._params())
        state = self.optimizer.state_dict()
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        return {"state": state["state"]}

    def _materialize_state(self) -> None:
        """Create every state tensor (one optimizer step with zero gradients and zero learning rate
        and weight decay changes no parameter), so a checkpoint has a template to load into."""
        optimizer = self.optimizer
        if optimizer.state:
            return
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
        grads = {}
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for p in group["params"]:
                grads[p] = p.grad
                p.grad = torch.zeros_like(p)
        optimizer.step()
        for group, (lr, wd) in zip(optimizer.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, wd
            for p in group["params"]:
                p.grad = grads[p]

    def load_checkpoint_state(self, folder, step: int) -> None:
        self._materialize_state()
        loaded = load_sharded(self.state_for_checkpoint(), folder, "optimizer state",
                              "the checkpoint is corrupt or was written by another optimizer")
        params = self._params()
        restore_extra = getattr(self.optimizer, "load_tensor", None)  # the fp32 master weights
        for index, tensors in loaded["state"].items():
            target = self.optimizer.state[params[index]]
            for key, value in tensors.items():
                if restore_extra is not None and restore_extra(params[index], key, value):
                    continue
                target[key].copy_(value)
            if "step" in target:
                target["step"].fill_(float(step))


def build_training_optimizer(model: nn.Module, train) -> TrainingOptimizer:
    """``train.distributed_optimizer``: megatron's DDP + distributed optimizer; otherwise ours.
    Call after the model is on its device (and in bf16)."""
    if train.distributed_optimizer:
        from train.distributed_optimizer import MegatronOptimizer

        return MegatronOptimizer(model, train)  # AdamW only (it refuses Muon): no QK-Clip
    return LocalOptimizer(model, train)
