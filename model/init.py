"""Layout-invariant initialisation: a parameter's initial value depends only on the seed, its global
name and each element's global index, never on the parallel layout or the device.

megatron-core's layers are built without drawing anything (``perform_initialization=False``) and
our own layers allocate empty shards; then ``initialize_model`` fills every local tensor in one
pass. It reads the model's sharded state dict, the description checkpoints use: each local tensor
with its global key, global shape and offset in it (layer keys are global under pipeline
parallelism, routed experts carry the global expert id as a leading axis, tensor-parallel shards
their offsets, megatron's fused SwiGLU ``linear_fc1`` its two halves ``[gate_r; up_r]`` of the
global ``[gate; up]``). So a TP=2 shard is the slice of the TP=1 tensor that the checkpoint says it
is, expert ``e`` is the same at every expert-parallel size, and two models that share a parameter
name and shape (the arms ``A``, ``GGGA``, ``KKKA`` share embedding, norms, MLP/MoE and LM head)
start with equal values there.

Values come from a counter-based generator: 32 random bits for counter ``n`` of tensor ``key`` are
a keyed integer hash of ``n`` (exact int64 arithmetic: every intermediate is below 2**63 and never
negative), made into a uniform in (0, 1) and a normal (inverse normal CDF) in float64 on the CPU, a
chunk at a time, then cast and copied to the parameter's device. Memory is bounded by the local shard
plus one chunk; nothing is ever drawn for the full tensor. The distributions per parameter are in
``parameter_init`` (docs/training.md, "Initialisation").
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from . import mixers
from .config import ModelConfig

CHUNK = 1 << 16  # elements generated at a time: 512 KiB temporaries stay in the CPU's cache
_MASK32 = 0xFFFFFFFF
# multipliers of a 32-bit integer hash with good avalanche (the "lowbias32" family); both are
# below 2**31, so a 32-bit value times either stays below 2**63: exact in int64 on every device
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97


def _key_words(seed: int, key: str) -> tuple[int, int]:
    """Two 32-bit words naming the stream of tensor ``key`` under ``seed`` (blake2b: the same on
    every platform and Python version, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """In place: a bijective 32 -> 32 bit mixer on int64 values in [0, 2**32)."""
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


def random_bits(seed: int, key: str, counter: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for each non-negative int64 ``counter``."""
    k0, k1 = _key_words(seed, key)
    x = _mix32((counter & _MASK32) ^ k0)
    x ^= (counter >> 32) ^ k1  # high counter bits (tensors beyond 2**32 elements)
    return _mix32(x)


def uniform(seed: int, key: str, index: torch.Tensor) -> torch.Tensor:
    """U(0, 1) in float64, open at both ends, for each element index (int64, CPU)."""
    return random_bits(seed, key, index).double().add_(0.5).mul_(2.0**-32)


def normal(seed: int, key: str, index: torch.Tensor) -> torch.Tensor:
    """N(0, 1) in float64 for each element index: the inverse normal CDF of its uniform,
    sqrt(2) erfinv(2u - 1) (one draw per element; |z| < 6.3 since the uniform has 32 bits)."""
    return torch.erfinv(uniform(seed, key, index).mul_(2.0).sub_(1.0)).mul_(math.sqrt(2.0))


@dataclass(frozen=True)
class Init:
    """How a parameter is initialised: ``draw`` ("normal", "uniform" or None for a constant) and
    the float64 function applied to the draws (or the constant)."""

    draw: str | None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    value: float = 0.0

    def values(self, seed: int, key: str, index: torch.Tensor) -> torch.Tensor:
        if self.draw is None:
            return torch.full(index.shape, self.value, dtype=torch.float64, device="cpu")
        draws = (normal if self.draw == "normal" else uniform)(seed, key, index)
        return self.transform(draws)


def normal_init(std: float) -> Init:
    return Init("normal", lambda z: z.mul_(std))


def uniform_init(low: float, high: float) -> Init:
    return Init("uniform", lambda u: u.mul_(high - low).add_(low))


def constant_init(value: float) -> Init:
    return Init(None, value=value)


def parameter_init(key: str, config: ModelConfig) -> Init:
    """The distribution of the tensor with global key ``key`` (unchanged from megatron-core's and
    FLA's defaults): a mixer parameter's plan entry when it names one (model/mixers.py: e.g.
    nn.Conv1d's U(+-1/sqrt(width)) for the short convolutions, FLA's KDA decay); else
    normal(0, initializer_range) for every linear, the embedding and the LM head; the second matrix
    of every MLP (dense, routed and shared experts) scaled by 1/sqrt(2 x layers) as megatron's
    ``output_layer_init_method``; ones for norm weights; zeros for the router's expert bias."""
    placement = mixers.placement_of(key, config)
    if placement is not None and placement.init is not None:
        return placement.init(config)
    std = config.initializer_range
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("norm.weight"):
        return constant_init(1.0)
    if leaf == "expert_bias":
        return constant_init(0.0)
    if key.endswith("linear_fc2.weight"):
        return normal_init(std / math.sqrt(2.0 * config.num_layers))
    if leaf == "weight":
        return normal_init(std)
    raise ValueError(f"no initialisation rule for parameter {key!r}; give its plan entry an init "
                     f"(model/mixers.py) or add one to model/init.py::parameter_init")


def index_chunks(local_shape, global_shape, global_offset, chunk: int = CHUNK):
    """Split a box of ``local_shape`` at ``global_offset`` in a tensor of ``global_shape`` into
    consecutive local flat ranges of at most ``chunk`` elements (or one contiguous run). Yields
    ``(start, stop, index)``: the range and its global flat (row-major) indices, int64 on the CPU."""
    dims = len(global_shape)
    strides = [math.prod(global_shape[axis + 1:]) for axis in range(dims)]
    base = sum(o * s for o, s in zip(global_offset, strides))
    differing = [axis for axis in range(dims) if local_shape[axis] != global_shape[axis]]
    axis = differing[-1] if differing else 0
    run = math.prod(local_shape[axis:])  # elements from here on are contiguous in the global tensor
    rows = math.prod(local_shape[:axis])
    per_chunk = max(1, chunk // run)
    for first in range(0, rows, per_chunk):
        last = min(rows, first + per_chunk)
        starts = torch.full((last - first,), base, dtype=torch.int64, device="cpu")  # whatever the default device
        row = torch.arange(first, last, dtype=torch.int64, device="cpu")
        for outer in reversed(range(axis)):  # global start of each row
            starts += (row % local_shape[outer]) * strides[outer]
            row //= local_shape[outer]
        if run <= chunk:
            within = torch.arange(run, dtype=torch.int64, device="cpu")
            yield first * run, last * run, (starts[:, None] + within).reshape(-1)
        else:  # one long run, in pieces
            for lo in range(0, run, chunk):
                hi = min(run, lo + chunk)
                yield first * run + lo, first * run + hi, torch.arange(lo, hi, dtype=torch.int64, device="cpu") + starts


@torch.no_grad()
def fill_shard(local: torch.Tensor, init: Init, seed: int, key: str, global_shape, global_offset,
               chunk: int = CHUNK) -> None:
    """Write the values of tensor ``key`` at this shard's global positions into ``local`` (any
    device and dtype), ``chunk`` elements at a time. Leading global axes that ``local`` lacks
    (megatron's expert axis) count as size 1."""
    if init.draw is None:
        local.fill_(init.value)
        return
    if not local.is_contiguous():
        raise ValueError(f"{key}: expected a contiguous local tensor")
    shape = (1,) * (len(global_shape) - local.dim()) + tuple(local.shape)
    flat = local.view(-1)
    for start, stop, index in index_chunks(shape, tuple(global_shape), tuple(global_offset), chunk):
        flat[start:stop].copy_(init.values(seed, key, index))


def local_tensors(model) -> list:
    """This rank's tensors as megatron ShardedTensors (global key, shape, offset), with the fused
    SwiGLU halves split out; ``data`` of each is the parameter or a view of it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    return [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]


def initialize_model(model, config: ModelConfig, seed: int) -> None:
    """Fill every parameter and the expert-bias buffers of this rank's ``model`` (a model or its
    pipeline chunks) from ``seed``. A model on the meta device is left as it is."""
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params):
        return
    filled = defaultdict(int)
    for shard in local_tensors(model):
        if shard.flattened_range is not None:
            raise ValueError(f"{shard.key}: flattened shards are not supported by the initialisation")
        init = parameter_init(shard.key, config)
        fill_shard(shard.data, init, seed, shard.key, shard.global_shape, shard.global_offset)
        filled[shard.data.untyped_storage().data_ptr()] += shard.data.numel()
    targets = [(name, p) for name, p in model.named_parameters()]
    targets += [(name, b) for name, b in model.named_buffers() if name.endswith("expert_bias")]
    missed = [name for name, t in targets if filled[t.untyped_storage().data_ptr()] != t.numel()]
    if missed:
        raise ValueError(f"initialisation did not cover {missed[:5]}: their sharded state dict entries are missing")
