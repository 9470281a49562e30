"""megatron-core's DistributedDataParallel + distributed optimizer (ZeRO-1), for AdamW runs.

``train.distributed_optimizer=true``: gradients live in megatron's contiguous fp32 buffers and are
reduce-scattered over data-parallel ranks; each rank keeps the fp32 master weights and Adam state of
its shard only (memory per rank ~ 1/DP of the optimizer state) and all-gathers the updated
weights. ``finalize_model_grads`` also sums the sequence-parallel weights over TP and updates the
MoE expert bias. The loss is a token sum scaled by 1/(global tokens) (``calculate_per_token_loss``:
megatron sums, it does not average, over DP). Checkpoints use the optimizer's own sharded state
dict ("fully_reshardable": loadable at another DP/TP/PP layout). Restoring that state needs
Apex or Transformer Engine in megatron-core 0.19.2 (``restore_supported``); without them a resumed
run keeps the weights, data position and RNG and restarts the Adam moments, with a warning.
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


def wrap(model, train):
    """(DDP-wrapped model, megatron optimizer). Call after the model is on its device (and in bf16)."""
    from parallel import cpu_compat

    check(train)
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


def restore_supported() -> bool:
    """megatron-core 0.19.2 loads distributed-optimizer state only with Apex/TE fused Adam (its
    torch-Adam path fails on the per-parameter ``step``; seen on CPU with gloo)."""
    from megatron.core.optimizer import distrib_optimizer

    return bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False))


def _inner_states(optimizer):
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from sub.optimizer.state.values()


def load(model, optimizer, folder, step: int) -> None:
    """Load (and reshard) the distributed optimizer's state. megatron-core 0.19.2 without Apex/TE
    needs Adam's per-parameter ``step`` to build the loading template but then fails on it while
    copying the loaded tensors: drop it for the copy and set it from the checkpoint's step."""
    from megatron.core import dist_checkpointing

    _materialize_state(optimizer)
    template = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=SHARDING)
    loaded = dist_checkpointing.load(template, str(folder))
    for state in _inner_states(optimizer):
        state.pop("step", None)
    optimizer.load_state_dict(loaded)
    for state in _inner_states(optimizer):
        state["step"] = torch.tensor(float(step))
