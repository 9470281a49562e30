"""Named regions of the model for the step-time breakdown by part (train/profile.py).

``profiled(name, fn, *args)`` runs ``fn`` inside a torch-profiler range ``name`` and, for the
backward pass, opens a range ``name.backward`` when the gradient reaches the region's outputs and
closes it when the gradients of its inputs are ready. The autograd engine runs the region's backward
in between, so the kernels it launches fall inside that range. Regions nest (a mixer contains its
core op); the breakdown gives each kernel to the innermost region around its launch.

Outside an active profiler ``profiled`` is a plain call: no markers, no cost.
"""

from __future__ import annotations

import torch

from . import mixers

# the regions outside the mixers' core ops, and the part of the breakdown each one stands for
COMMON_REGIONS = {
    "moe": "MoE (router, dispatch, experts)",
    "mixer": "dense projections",  # mixer layers outside their core op: projections, conv, norms
    "dense_mlp": "dense projections",
    "optimizer": "optimizer",
}


def regions() -> dict[str, str]:
    """Every region the model declares -> its part: the mixers' core ops (model/mixers.py), then
    the common ones."""
    return {**mixers.profile_regions(), **COMMON_REGIONS}


class _BackwardRange:
    """A profiler range opened by one autograd node and closed by another, on the same thread."""

    def __init__(self, name: str):
        self.name = name
        self.range = None
        self.closed = False

    def open(self) -> None:
        if self.range is None and not self.closed:
            self.range = torch.profiler.record_function(self.name)
            self.range.__enter__()

    def close(self) -> None:
        if self.range is not None and not self.closed:
            self.range.__exit__(None, None, None)
        self.closed = True


class _OpenInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backward_range):
        ctx.backward_range = backward_range
        return x.clone()  # a copy, not a view: callers may modify the output in place

    @staticmethod
    def backward(ctx, grad):
        ctx.backward_range.open()
        return grad, None


class _CloseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backward_range):
        ctx.backward_range = backward_range
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.backward_range.close()
        return grad, None


def _mark(value, marker, backward_range):
    if torch.is_tensor(value) and value.requires_grad:
        return marker.apply(value, backward_range)
    if isinstance(value, tuple):
        return tuple(_mark(v, marker, backward_range) for v in value)
    return value


def profiled(name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside the forward range ``name`` and the backward range ``name.backward``."""
    if not torch.autograd._profiler_enabled():
        return fn(*args, **kwargs)
    with torch.profiler.record_function(name):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        backward_range = _BackwardRange(name + ".backward")
        args = tuple(_mark(a, _CloseInBackward, backward_range) for a in args)
        return _mark(fn(*args, **kwargs), _OpenInBackward, backward_range)
