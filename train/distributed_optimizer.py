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

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from model.config import ConfigError

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
    (KeyError 'step'). Missing keys are skipped instead; ``load`` sets the step afterwards."""
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


def zero_grad(ddp, optimizer) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()


def set_lr_and_wd(optimizer, lr: float, weight_decay: float) -> None:
    """megatron's groups carry multipliers its own scheduler applies (wd_mult = 0 for norms,
    biases, A_log, dt_bias); we drive the schedule, so apply them here."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def finish_step(ddp, optimizer) -> tuple[bool, float]:
    """Reduce gradients (DP reduce-scatter, SP and expert groups, expert-bias update), clip and step.
    Returns (updated, grad norm)."""
    finalize_model_grads([ddp])
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")


def state_for_save(model, optimizer) -> dict:
    return optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=SHARDING)


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


def load(model, optimizer, folder, step: int) -> None:
    """Load (and reshard) the distributed optimizer's state, then set Adam's step counters."""
    from megatron.core import dist_checkpointing

    _materialize_state(optimizer)
    template = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=SHARDING)
    loaded = dist_checkpointing.load(template, str(folder))
    optimizer.load_state_dict(loaded)
    for state in _inner_states(optimizer):
        state["step"] = torch.tensor(float(step))
