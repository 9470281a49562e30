"""Optimizer parameter groups: which parameters get weight decay.

No weight decay for norms (1-D weights), biases, and the KDA decay parameters ``A_log``/``dt_bias``
(marked ``no_weight_decay`` by the layer), as in FLA and Megatron.
"""

from __future__ import annotations

import torch
from torch import nn


def decays(name: str, param: nn.Parameter) -> bool:
    if getattr(param, "no_weight_decay", False):
        return False
    if param.dim() < 2 or name.endswith(".bias"):
        return False
    return True


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    with_decay, without_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (with_decay if decays(name, param) else without_decay).append(param)
    return [
        {"params": with_decay, "weight_decay": weight_decay},
        {"params": without_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    if train.optimizer != "adamw":
        raise ValueError(f"train.optimizer={train.optimizer!r}: only adamw is available in this version")
    return torch.optim.AdamW(
        parameter_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        foreach=True,
    )
