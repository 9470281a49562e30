"""Elementwise chains of the model, compiled into fused kernels on request (``train.compile``).

Functions decorated with ``fused`` are short chains of elementwise ops and row reductions
(RMSNorm and the KDA output norm in norms.py, the KDA short convolution with its SiLU in kda.py,
whose CUDA tensors take its Triton kernels instead: kernels/short_conv.py).
Run eagerly, each op is its own kernel that reads and writes the whole activation, and the
backward adds as many again: on the H200 the KDA mixer's convolutions, gates and norms took 18.5%
of a Kimi Linear step against 5.8% for MLA's projections (docs/benchmarks.md). With fusion enabled,
each of them is compiled by ``torch.compile`` (inductor) into a few fused Triton kernels for its
forward and its backward (+32% tokens/s for Kimi Linear on the H200); on CPU tensors, or with
fusion off, the same Python runs eagerly, so both paths compute the same expression.

The compiled graphs are specialised to static shapes: a training run has one token count per micro
batch, so each function compiles once (twice with a different validation length).

What a compiled function keeps for its backward is decided when it compiles (AOTAutograd's
partitioner). By default it kept intermediates it could recompute: a short convolution kept shifted
copies of its input, ~9 x the KDA width per token and layer more than the layer needs (~15 GiB of a
32k-token step of scaling-653m's Kimi Linear). These functions are cheap elementwise chains and row
reductions, so they compile with an activation-memory budget of 0: the backward recomputes
everything it can from the saved inputs.
"""

from __future__ import annotations

import functools

import torch
import torch._functorch.config

_enabled = {"cuda": False, "cpu": False}
RECOMPUTE_BUDGET = 0.0  # torch._functorch.config.activation_memory_budget while a function compiles


def enable(on: bool = True, cpu: bool = False) -> None:
    """Compile the fused functions for CUDA tensors (and, for tests, CPU tensors) from now on."""
    _enabled["cuda"] = on
    _enabled["cpu"] = on and cpu


def enabled(device: torch.device) -> bool:
    return _enabled.get(device.type, False)


def fused(fn):
    """``fn`` compiled (once, lazily) when its first argument lives where fusion is enabled."""
    compiled = None

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args):
        nonlocal compiled
        if not enabled(x.device):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        # compilation happens inside a call (the first, or one with new shapes): the budget is set there
        with torch._functorch.config.patch(activation_memory_budget=RECOMPUTE_BUDGET):
            return compiled(x, *args)

    call.eager = fn
    return call
