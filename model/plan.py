"""Declarative parallel plans: where every parameter of a mixer lives, in one function per mixer.

A mixer's plan (``ParallelPlan``) names each of its parameters once (``Param``) and says

- how it is laid out over the tensor-parallel (TP) ranks: ``column`` (megatron's
  ColumnParallelLinear: output rows split by head, axis 0), ``row`` (RowParallelLinear: input
  columns split, axis 1), ``heads`` (a plain tensor split by head along ``axis``) or
  ``replicated`` (every rank holds it whole: a linear, a norm or a plain tensor);
- how a replicated parameter's gradient is completed over TP: one applied to this rank's tokens
  only under sequence parallelism (``local_tokens``) is summed over TP after backward (the
  ``sequence_parallel`` attribute train/grads.py reads); one whose consumers are this rank's heads
  only (``head_local``) is summed by ``model.tp.reduce_grad_over_tp`` in the mixer's forward;
- its initial distribution (default: normal(0, initializer_range) for weights, ones for norms),
  whether it stays fp32 under mixed precision, decays, and is updated by Muon.

``model.tp.build_from_plan`` builds the mixer's layers and tensors from the plan and marks every
parameter with its ``Param`` (attribute ``placement``); the checkpoint axes, the initialisation's
view of shards (both from the sharded state dict), the sequence-parallel gradient sum and Muon's
partition dims follow from what it built. The plan also has the context-parallel slot
(``ContextParallelPlan``): what the mixer does when a sequence is split over ranks.

Standard library only: configs and the registry read plans without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COLUMN, ROW, HEADS, REPLICATED = "column", "row", "heads", "replicated"
LINEAR, NORM, TENSOR = "linear", "norm", "tensor"


@dataclass(frozen=True)
class Param:
    """One parameter of a mixer: its global shape and TP layout, and how it is trained.

    ``builds``: what holds it: a ``linear`` (shape ``[out, in]``, parameter ``<name>.weight``), a
    ``norm`` (RMSNorm, parameter ``<name>.weight``) or a plain ``tensor`` (parameter ``<name>``).
    ``init``: ``config -> model.init.Init`` (None: the model-wide rule for its name).
    ``muon``: whether Muon updates it (None: every 2-D matrix that decays)."""

    layout: str
    shape: tuple[int, ...]
    builds: str
    axis: int | None = None
    local_tokens: bool = False
    head_local: bool = False
    eps: float | None = None
    init: Callable | None = None
    keep_fp32: bool = False
    weight_decay: bool = True
    muon: bool | None = None

    def parameter_name(self, attribute: str) -> str:
        return attribute if self.builds == TENSOR else f"{attribute}.weight"

    @property
    def split(self) -> bool:
        return self.layout != REPLICATED

    def uses_muon(self) -> bool:
        if self.muon is not None:
            return self.muon
        return len(self.shape) == 2 and self.weight_decay


# ----------------------------------------------------------------------------- constructors
def column(in_features: int, out_features: int, **training) -> Param:
    """A linear whose output rows (heads) are split over TP; the input is the whole hidden state
    (gathered from the token shards under sequence parallelism)."""
    return Param(COLUMN, (out_features, in_features), LINEAR, axis=0, **training)


def row(in_features: int, out_features: int, **training) -> Param:
    """A linear whose input columns are split over TP; its output is summed over the TP ranks
    (reduce-scattered to the token shards under sequence parallelism)."""
    return Param(ROW, (out_features, in_features), LINEAR, axis=1, **training)


def replicated_linear(in_features: int, out_features: int, **training) -> Param:
    """A small linear every rank holds whole, applied to this rank's tokens: under sequence
    parallelism its gradient covers only those tokens and is summed over TP after backward."""
    return Param(REPLICATED, (out_features, in_features), LINEAR, local_tokens=True, **training)


def norm(size: int, eps: float, local_tokens: bool = True) -> Param:
    """An RMSNorm weight, whole on every rank (ones at initialisation)."""
    return Param(REPLICATED, (size,), NORM, local_tokens=local_tokens, eps=eps)


def head_sharded(shape: tuple[int, ...], axis: int = 0, **training) -> Param:
    """A plain fp32 tensor split by head along ``axis`` (short-conv kernels, decay rates)."""
    return Param(HEADS, tuple(shape), TENSOR, axis=axis, **training)


def replicated(shape: tuple[int, ...], head_local: bool = True, **training) -> Param:
    """A plain tensor every rank holds whole. ``head_local``: only this rank's heads consume it, so
    the mixer sums its gradient over TP in the forward (``model.tp.reduce_grad_over_tp``)."""
    return Param(REPLICATED, tuple(shape), TENSOR, head_local=head_local, **training)


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ContextParallelPlan:
    """What a mixer does under context parallelism, per mode of ``parallel.context.MODES``: the
    entry points (``"package.module:function"``) that ``parallel.context.ContextParallel`` runs for
    it. A mode a mixer lacks is refused before training (``model.mixers.check_context_parallel``)."""

    modes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def supports(self, mode: str) -> bool:
        return mode in self.modes


@dataclass(frozen=True)
class ParallelPlan:
    """Every parameter of one mixer (attribute name -> ``Param``, in construction order) and the
    config field whose heads the ``column``/``row``/``heads`` layouts split over TP."""

    params: dict[str, Param]
    heads_field: str
    heads: int
    context_parallel: ContextParallelPlan = field(default_factory=ContextParallelPlan)

    def parameters(self) -> dict[str, Param]:
        """Parameter name (as ``named_parameters`` of the mixer gives it) -> its ``Param``."""
        return {p.parameter_name(attribute): p for attribute, p in self.params.items()}

    def checkpoint_axes(self) -> dict[str, int]:
        """The mixer's own plain tensors that are split over TP, and their axes: what its sharded
        state dict declares (megatron's linears describe their own splits)."""
        return {attribute: p.axis for attribute, p in self.params.items() if p.builds == TENSOR and p.split}

    def check_tensor_parallel(self, size: int) -> str | None:
        """Why this plan cannot be split over ``size`` TP ranks (None: it can)."""
        if self.heads % size:
            return (f"{self.heads_field}={self.heads} is not divisible by tensor_model_parallel_size={size}; "
                    f"choose a tensor-parallel size that divides it")
        for attribute, p in self.params.items():
            if p.split and p.shape[p.axis] % size:
                return (f"{attribute} ({p.layout}, global shape {p.shape}) does not split over {size} "
                        f"tensor-parallel ranks along axis {p.axis}")
        return None
