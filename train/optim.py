"""Optimizers and their parameter groups: AdamW, or Muon for hidden matrices + AdamW for the rest.

Weight decay: none for norms (1-D weights), biases, and the KDA decay parameters ``A_log``/``dt_bias``
(marked ``no_weight_decay`` by the layer), as in FLA and Megatron; every matrix (including the
embedding and the LM head) and the conv kernels decay.

Muon/AdamW split (``uses_muon``), for ``train.optimizer = "muon"``:

* Muon: every 2-D weight of the hidden layers (a mixer's: as its plan says, model/mixers.py): KDA/GDN
  ``q/k/v/o_proj``, the low-rank gate projections ``f_a/f_b/g_a/g_b_proj``, ``b_proj`` (beta
  logits), MLA ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``, dense-MLP and expert
  ``linear_fc1``/``linear_fc2`` (routed and shared; fused SwiGLU fc1 as two matrices, see
  ``train.muon``).
* AdamW: the embedding and the LM head (``output_layer``), as Moonlight/K2 do (row-wise lookup
  tables/classifiers, not hidden linear maps); all 1-D parameters (norm weights, the KDA output-norm
  weight, ``A_log``, ``dt_bias``, biases); the MoE router weight (a 2-D matrix, but each row is one
  expert's score direction feeding a sigmoid plus the aux-loss-free bias: orthogonalising would tie
  the experts' score scales together, and it is tiny, so we keep it on AdamW); the short-conv kernels
  ``[C, 1, W]`` (depthwise: C independent 4-tap filters, not a linear map between spaces).
"""

from __future__ import annotations

import torch
from torch import nn

from train.muon import MatrixSpec, Muon


def decays(name: str, param: nn.Parameter) -> bool:
    if getattr(param, "no_weight_decay", False):
        return False
    if param.dim() < 2 or name.endswith(".bias"):
        return False
    return True


def uses_muon(name: str, param: nn.Parameter) -> bool:
    """True for the hidden 2-D matrices that Muon updates (see the module docstring); a mixer's
    parameters as its plan says (model/plan.py: by default its 2-D matrices that decay)."""
    placement = getattr(param, "placement", None)
    if placement is not None:
        return placement.uses_muon()
    if param.dim() != 2 or getattr(param, "no_weight_decay", False):
        return False
    if name.startswith(("embedding.", "output_layer.")) or ".embedding." in name or ".output_layer." in name:
        return False
    if ".router." in name:
        return False
    return True


def matrix_spec(name: str, param: nn.Parameter, swiglu: bool = True) -> MatrixSpec:
    """How a Muon parameter is split over ranks (a mixer's: its plan's axis) and how many matrices
    it stacks."""
    placement = getattr(param, "placement", None)
    if placement is not None:
        partition_dim = placement.axis if placement.split else None
    else:
        split = bool(getattr(param, "tensor_model_parallel", False))
        partition_dim = int(getattr(param, "partition_dim", 0)) if split else None
    group = "expert_tp" if ".experts.local_experts." in name else "tp"
    fused = 2 if swiglu and name.endswith("linear_fc1.weight") else 1
    return MatrixSpec(partition_dim=partition_dim, group=group, fused=fused)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups for all trainable parameters: with and without weight decay."""
    with_decay, without_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (with_decay if decays(name, param) else without_decay).append(param)
    return [
        {"params": with_decay, "weight_decay": weight_decay},
        {"params": without_decay, "weight_decay": 0.0},
    ]


def muon_parameter_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], dict]:
    """Groups for ``train.muon.Muon`` (Muon matrices; AdamW with/without decay) and the specs."""
    swiglu = bool(getattr(getattr(model, "config", None), "gated_linear_unit", True))
    muon, with_decay, without_decay, specs = [], [], [], {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if uses_muon(name, param):
            muon.append(param)
            specs[param] = matrix_spec(name, param, swiglu)
        else:
            (with_decay if decays(name, param) else without_decay).append(param)
    groups = [
        {"params": muon, "weight_decay": weight_decay, "use_muon": True},
        {"params": with_decay, "weight_decay": weight_decay, "use_muon": False},
        {"params": without_decay, "weight_decay": 0.0, "use_muon": False},
    ]
    return [g for g in groups if g["params"]], specs


def build_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    """``train.optimizer``: "adamw" (torch AdamW) or "muon" (Muon + AdamW, MuonClip with the
    loop's QK-Clip). Reads lr, weight_decay, adam_beta1/2, adam_eps and, for Muon,
    muon_momentum (0.95), muon_nesterov (True), muon_ns_steps (5)."""
    betas = (train.adam_beta1, train.adam_beta2)
    if train.optimizer == "adamw":
        groups = parameter_groups(model, train.weight_decay)
        # the fused kernel (CPU and CUDA) does the whole update in one pass per tensor: on the tiny
        # preset's 3M parameters it takes 1.8 ms on one CPU core, the foreach path 12 ms
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=train.lr, betas=betas, eps=train.adam_eps,
                                 **({"fused": True} if fused else {"foreach": True}))
    if train.optimizer == "muon":
        groups, specs = muon_parameter_groups(model, train.weight_decay)
        return Muon(
            groups, lr=train.lr, weight_decay=train.weight_decay,
            momentum=getattr(train, "muon_momentum", 0.95),
            nesterov=getattr(train, "muon_nesterov", True),
            ns_steps=getattr(train, "muon_ns_steps", 5),
            betas=betas, eps=train.adam_eps, specs=specs,
        )
    raise ValueError(f"train.optimizer={train.optimizer!r}: use adamw or muon")


def qk_clip_enabled(train) -> bool:
    """MuonClip: QK-Clip runs with the Muon optimizer when ``qk_clip_tau > 0``."""
    return train.optimizer == "muon" and getattr(train, "qk_clip_tau", 100.0) > 0
