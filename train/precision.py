"""bf16 training with fp32 master weights (megatron's mixed precision, written for our optimizers).

``to_bf16(model)`` casts the parameters to bf16 except those that must stay fp32 (``keep_fp32``:
the KDA ``A_log``/``dt_bias`` and the MoE router weight, whose scores are computed in fp32);
buffers such as the expert bias are left fp32. ``MasterWeights`` wraps any torch optimizer built
on the model's parameters: each bf16 parameter has an fp32 master copy; during ``step`` the
parameter's storage is swapped to the master and the gradient upcast, so the inner optimizer (and
its state) works in fp32, then the result is rounded back into the bf16 weight. Masters travel in
checkpoints under the optimizer-state key ``master_param``.
"""

from __future__ import annotations

import torch
from torch import nn

from train.grads import same_dtype_groups

MASTER_KEY = "master_param"


def keeps_fp32(name: str, param: nn.Parameter) -> bool:
    return bool(getattr(param, "keep_fp32", False)) or name.endswith("router.weight")


def to_bf16(model: nn.Module) -> nn.Module:
    for name, param in model.named_parameters():
        if not keeps_fp32(name, param) and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
    return model


class MasterWeights:
    """Optimizer proxy keeping fp32 masters for low-precision parameters (see module docstring)."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner
        self.masters: dict[nn.Parameter, torch.Tensor] = {}
        for group in inner.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    self.masters[p] = p.detach().float().clone()

    # the loop and the checkpoint code see the inner optimizer's groups and state
    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def sync_masters_from_model(self) -> None:
        """After loading weights into the model without optimizer state (e.g. an HF import)."""
        for p, master in self.masters.items():
            master.copy_(p.detach().float())

    @torch.no_grad()
    def step(self) -> None:
        # bulk copies (one multi-tensor kernel each on a GPU), not a cast and a copy per parameter:
        # at ~2,000 parameters the per-parameter launches kept the GPU waiting on the host
        params = [p for p in self.masters if p.grad is not None]
        lows = [p.data for p in params]
        grads32 = [None] * len(params)
        for indices, grads in same_dtype_groups([p.grad for p in params]):
            flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.float32, device=grads[0].device)
            views = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
            torch._foreach_copy_(views, grads)
            for i, view in zip(indices, views):
                grads32[i] = view
        for p, grad32 in zip(params, grads32):
            p.grad = None
            p.data = self.masters[p]
            p.grad = grad32
        self.inner.step()
        masters = [self.masters[p] for p in params]
        for indices, group in same_dtype_groups(lows):
            torch._foreach_copy_(group, [masters[i] for i in indices])
        for p, low in zip(params, lows):
            p.grad = None
            p.data = low

    def state_dict(self) -> dict:
        state = self.inner.state_dict()
        params = [p for group in self.inner.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if p in self.masters:
                state["state"].setdefault(index, {})[MASTER_KEY] = self.masters[p]
        return state

    def load_tensor(self, param: nn.Parameter, key: str, value: torch.Tensor) -> bool:
        """Checkpoint loading hook: restore a master copy (True if ``key`` was ours)."""
        if key != MASTER_KEY or param not in self.masters:
            return False
        self.masters[param].copy_(value)
        param.data.copy_(value)
        return True
