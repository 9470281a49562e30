"""megatron-core's DistributedDataParallel + distributed optimizer (ZeRO-1), for AdamW runs.

``train.distributed_optimizer=true``: gradients live in megatron's contiguous fp32 buffers and are
reduce-scattered over data-parallel ranks; each rank keeps the fp32 master weights and Adam state of
its shard only (memory per rank ~ 1/DP of the optimizer state) and all-gathers the updated
weights. ``finalize_model_grads`` also sums the sequence-parallel weights over TP and updates the
MoE expert bias. The loss is a token sum scaled by 1/(global tokens) (``calculate_per_token_loss``:
megatron sums, it does not average, over DP). Checkpoints use the optimizer's own sharded state
dict ("fully_reshardable": loadable at another DP/TP/PP layout).
"""

from __future__ import annotations

import math

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from model.config import ConfigError
from train import context
from train.optimizer import TrainingOptimizer, reset_router_counters

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def check(train) -> None:
    if train.optimizer != "adamw":
        raise ConfigError(
            f"train.distributed_optimizer=true works with train.optimizer=adamw (megatron's Adam), not "
            f"{train.optimizer!r}; turn one of them off"
        )
    if train.virtual_pipeline_model_parallel_size > 1:
        raise ConfigError("train.distributed_optimizer=true is not wired for virtual pipeline stages yet")


def _tolerate_state_keys_missing_from_checkpoint() -> None:
    """megatron-core 0.19.2 with torch's Adam (no Apex/TE) keeps a tensor ``step`` per parameter,
    which the fully-reshardable checkpoint does not store, and then fails copying it back
    (KeyError 'step'). Missing keys are skipped instead; ``load_checkpoint_state`` sets the step afterwards."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_tolerant", False):
        return

    class _MissingIsNone(dict):
        def __missing__(self, key):
            return None

    def tolerant(self, model_param, tensors):
        return original(self, model_param, _MissingIsNone(tensors))

    tolerant._tolerant = True
    DistributedOptimizer._set_main_param_and_optimizer_states = tolerant


def wrap(model, train):
    """(DDP-wrapped model, megatron optimizer). Call after the model is on its device (and in bf16)."""
    from parallel import cpu_compat

    check(train)
    _tolerate_state_keys_missing_from_checkpoint()
    cpu_compat.enable_device_rewrite()  # megatron's optimizer allocates with device="cuda"
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, check_for_nan_in_grad=False,
        ),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
            clip_grad=train.clip_grad, use_distributed_optimizer=True, bf16=train.bf16,
            params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        ),
        [ddp],
    )
    set_lr_and_wd(optimizer, train.lr, train.weight_decay)
    return ddp, optimizer


def set_lr_and_wd(optimizer, lr: float, weight_decay: float) -> None:
    """megatron's groups carry multipliers its own scheduler applies (wd_mult = 0 for norms,
    biases, A_log, dt_bias); we drive the schedule, so apply them here."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def _materialize_state(optimizer) -> None:
    """Create Adam's state tensors (and step) before loading: megatron's loading template reads
    them, and without Apex/TE (CPUs) nothing creates them before the first step."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _inner_states(optimizer):
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from sub.optimizer.state.values()


class MegatronOptimizer(TrainingOptimizer):
    """megatron's DDP + distributed optimizer behind the loop's optimizer interface
    (train/optimizer.py). Its ``update`` reduces, clips and steps in one go."""

    def __init__(self, model, train):
        self.model = model
        self.weight_decay = train.weight_decay
        self.runner, self.optimizer = wrap(model, train)

    def begin_step(self, lr: float) -> None:
        set_lr_and_wd(self.optimizer, lr, self.weight_decay)
        self.runner.zero_grad_buffer()
        self.optimizer.zero_grad()

    def loss_scale(self, total_tokens):
        return context.gradient_scale(total_tokens, megatron_ddp=True)

    def update(self, loss: torch.Tensor) -> tuple[float, dict]:
        grad_norm = float("nan")
        if math.isfinite(float(loss)):  # the DP reduce-scatter, the SP and expert groups, the expert-bias update
            with torch.profiler.record_function("optimizer"):
                finalize_model_grads([self.runner])
                _, norm, _ = self.optimizer.step()
            grad_norm = float(norm) if norm is not None else float("nan")
        reset_router_counters(self.model)
        return grad_norm, {}

    def discard_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        reset_router_counters(self.model)

    def reload_model_params(self) -> None:
        self.optimizer.reload_model_params()  # its fp32 main weights were copied before the load

    def state_for_checkpoint(self) -> dict:
        return self.optimizer.sharded_state_dict(self.model.sharded_state_dict(), metadata=SHARDING)

    def load_checkpoint_state(self, folder, step: int) -> None:
        """Load (and reshard) the distributed optimizer's state, then set Adam's step counters."""
        _materialize_state(self.optimizer)
        template = self.optimizer.sharded_state_dict(self.model.sharded_state_dict(), is_loading=True,
                                                     metadata=SHARDING)
        self.optimizer.load_state_dict(dist_checkpointing.load(template, str(folder)))
        for state in _inner_states(self.optimizer):
            state["step"] = torch.tensor(float(step))
