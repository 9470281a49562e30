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
    def step(self, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """One update. ``grad_scale`` (an fp32 0-dim tensor): a factor on every gradient
        of the step (the gradient clip), applied in fp32: inside the fused AdamW kernel, or to the
        fp32 copies of the mastered gradients and in place to the fp32 parameters' own. ``found_inf``
        (fp32 0-dim tensor, 1 = skip): the update is skipped on the device, without the host reading
        anything; only ``device_skip_ready`` steps take it."""
        fast = self._fused_adamw_groups()
        if fast is not None:
            divisor = _reciprocal(grad_scale, fast[0].targets[0].device)
            for group in fast:
                group.step(divisor, found_inf)
            return
        if found_inf is not None:
            raise RuntimeError("MasterWeights.step: found_inf needs the fused AdamW path (see device_skip_ready)")
        # bulk copies (one multi-tensor kernel each on a GPU), not a cast and a copy per parameter:
        # at ~2,000 parameters the per-parameter launches kept the GPU waiting on the host
        params = [p for p in self.masters if p.grad is not None]
        lows = [p.data for p in params]
        grads32 = fp32_copies([p.grad for p in params], grad_scale)
        own = [p.grad for g in self.inner.param_groups for p in g["params"]  # fp32: no master
               if p not in self.masters and p.grad is not None]
        if grad_scale is not None and own:
            torch._foreach_mul_(own, grad_scale)
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

    def device_skip_ready(self) -> bool:
        """True when the next ``step`` runs the fused path, which can skip an update on the device."""
        return self._fused_adamw_groups() is not None

    def _fused_adamw_groups(self):
        """Per parameter group, what a direct fused-AdamW update needs; None where ``inner.step``
        must run.

        ``inner.step`` and the storage swaps around it cost ~60 ms of host time per step at 2,200
        parameters (per-parameter Python in torch's optimizer and here) while the GPU idles. Once
        torch's fused AdamW has created its state (the first step), the same update is the fused
        kernel called on fixed lists of masters, moments and step counters. Anything else (Muon,
        amsgrad, a missing gradient, replaced state tensors) takes the general path.
        """
        inner = self.inner
        if not (isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")):
            return None
        if any(g["amsgrad"] or g["maximize"] for g in inner.param_groups):
            return None
        cached = self.__dict__.get("_fused_cache")
        # the first parameter's moment tensor identifies the state the lists were built from
        if cached is not None and inner.state.get(cached[0][0], {}).get("exp_avg") is not cached[2]:
            cached = None  # the state tensors were replaced (e.g. loaded wholesale): rebuild
        if cached is None:
            params = [p for g in inner.param_groups for p in g["params"]]
            if not params or any("exp_avg" not in inner.state.get(p, {}) for p in params):
                return None  # no step taken yet: torch creates the state
            groups = [_FusedGroup(g, inner.state, self.masters) for g in inner.param_groups if g["params"]]
            cached = self._fused_cache = (params, groups, inner.state[params[0]]["exp_avg"])
        params, groups, _ = cached
        if any(p.grad is None for p in params):
            return None
        return groups

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


def fp32_copies(grads: list[torch.Tensor], scale=None) -> list[torch.Tensor]:
    """fp32 copies of ``grads``: views of one flat buffer per source dtype, each filled by one
    multi-tensor copy, then multiplied by ``scale`` (an fp32 0-dim tensor) if given."""
    out = [None] * len(grads)
    for indices, same in same_dtype_groups(grads):
        flat = torch.empty(sum(g.numel() for g in same), dtype=torch.float32, device=same[0].device)
        views = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in same]), same)]
        torch._foreach_copy_(views, same)
        if scale is not None:
            torch._foreach_mul_(views, scale)
        for i, view in zip(indices, views):
            out[i] = view
    return out


def _reciprocal(factor: torch.Tensor | None, device) -> torch.Tensor | None:
    """The fused kernel's ``grad_scale`` for a gradient factor: it divides the gradients by it (as
    when unscaling a loss scale), so the reciprocal, an fp32 0-dim tensor on ``device``."""
    return None if factor is None else torch.reciprocal(factor.to(device=device, dtype=torch.float32))


class _FusedGroup:
    """One parameter group's fixed lists for ``torch._fused_adamw_`` on the fp32 masters (see
    ``MasterWeights._fused_adamw_groups``), the low-precision members split by dtype once."""

    def __init__(self, group: dict, state: dict, masters: dict):
        self.group = group
        self.params = list(group["params"])
        self.targets = [masters.get(p, p) for p in self.params]
        self.exp_avgs = [state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [state[p]["exp_avg_sq"] for p in self.params]
        self.steps = [state[p]["step"] for p in self.params]
        self.low = [i for i, p in enumerate(self.params) if p in masters]
        self.low_groups = [[self.low[j] for j in indices]
                           for indices, _ in same_dtype_groups([self.params[i] for i in self.low])]

    def step(self, divisor: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """One fused update; ``divisor``: the kernel divides every gradient by it (no extra pass)."""
        g, params = self.group, self.params
        grads = [p.grad for p in params]
        for i, grad32 in zip(self.low, fp32_copies([grads[i] for i in self.low])):  # the masters' gradients
            grads[i] = grad32
        if found_inf is None:
            torch._foreach_add_(self.steps, 1)
        else:  # a skipped update leaves the step counters (the kernel itself returns at once)
            torch._foreach_add_(self.steps, 1.0 - found_inf)
        beta1, beta2 = g["betas"]
        torch._fused_adamw_(self.targets, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, lr=g["lr"],
                            beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False,
                            maximize=False, grad_scale=divisor, found_inf=found_inf)
        for indices in self.low_groups:  # round the updated masters back into the weights
            torch._foreach_copy_([params[i].data for i in indices], [self.targets[i] for i in indices])
