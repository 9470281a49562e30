"""The mixer registry: every token-mixer type of the layer pattern, registered in one place.

An entry (``Mixer``) holds everything the stack needs to know about one layer type: its symbol in
``layer_pattern`` and its name, its module, its parallel plan (model/plan.py: every parameter's
tensor-parallel layout, how it is initialised and trained, and the context-parallel slot), its
forward FLOPs, the activations it keeps for backward (the dry run's memory estimate), its
Hugging Face tensors, its arm of the paper's comparison, its profile region and what the training
loop does with it (QK-Clip, gate statistics). The config, the model, the FLOPs count, the optimizer
split, the initialisation, the HF conversion, the dry run, the metrics and the profile all read
the registry; nothing else switches on a mixer's kind. An unknown symbol is an error that names
the known ones.

Adding a mixer: write its module (a ``model.tp.PlannedMixer`` built from its plan) and
``register`` a ``Mixer`` for it (docs/mixers.md; tests/model/test_mixer_registry.py adds a toy
one and trains it at TP=2). The built-in mixers follow: ``A`` (MLA), ``G`` (Gated DeltaNet), ``K``
(Kimi Delta Attention), in the order of the paper's comparison arms.

Standard library only (modules and HF tensors are imported when used), so configs stay light.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from kernels.chunking import CHUNK_SIZE

from .errors import ConfigError
from .plan import (
    ContextParallelPlan,
    ParallelPlan,
    Param,
    column,
    head_sharded,
    norm,
    replicated,
    replicated_linear,
    row,
)


@dataclass(frozen=True)
class HFLayout:
    """How a mixer appears in the HF ``kimi_linear`` format: its ``layer_types`` entry, its tensors
    ``(config, hf_prefix, our_prefix) -> [model.hf_names.HFTensor]`` and a check that raises
    ``HFConversionError`` for settings the HF model cannot express."""

    layer_type: str
    tensors: Callable
    check: Callable | None = None


# What ``Mixer.activations`` may return, in elements (docs/training.md, "Dry run and memory estimate").
# Per token of the rank's slice: what one layer keeps for its backward (``split``: head- or width-split
# over TP, ``tokens``: whole per token, split over TP only under sequence parallelism, ``fp32``:
# head-split and fp32 whatever the compute dtype) and what its core op's backward allocates while it
# runs (``backward_split``, ``backward_fp32``). Per key token gathered from earlier context-parallel
# ranks under ``chunkwise`` (MLA's latent): what the layer keeps of it (``keys_split``, whole
# ``keys_tokens``) and what its backward allocates (``keys_backward_split``, ``keys_backward_tokens``).
# Per sample under ``chunkwise``: fp32 state kept per later CP rank (``cp_state_fp32``) and the
# all-gathered exchange buffer per CP rank while the layer runs (``cp_exchange_fp32``), both head-split.
ACTIVATION_KEYS = ("split", "tokens", "fp32", "backward_split", "backward_fp32", "keys_split", "keys_tokens",
                   "keys_backward_split", "keys_backward_tokens", "cp_state_fp32", "cp_exchange_fp32")


@dataclass(frozen=True)
class Mixer:
    """One registered mixer type (see the module docstring).

    ``module``: the class, or ``"package.module:Class"`` imported when a model is built; it is
    called as ``module(config, tconfig, layer_idx, **options)``. ``plan``: ``config -> ParallelPlan``.
    ``flops``: ``(config, document lengths, kernel chunk) -> {part: forward FLOPs}`` of one layer,
    with the parts ``flops_parts`` (model/flops.py counts them as ``<kind>_<part>``).
    ``activations``: ``config -> {key: elements}`` for the dry run's memory estimate
    (train/activation_memory.py), with keys from ``ACTIVATION_KEYS`` (missing ones are 0). ``arm``:
    the comparison arm made of this mixer (``linear`` mixers replace the linear layers of a hybrid,
    the others make the whole pattern).
    ``profile_regions``: the ``profiled`` region names of its core op -> their part of the step-time
    breakdown. ``qk_clip``: the module records per-head max logits and takes QK-Clip (train/muon.py).
    ``gate_statistics``: it has KDA's forget gate, whose statistics train/metrics.py logs."""

    symbol: str
    kind: str
    name: str
    module: type | str
    plan: Callable
    flops: Callable
    activations: Callable
    flops_parts: tuple[str, ...] = ("projections",)
    options: dict = field(default_factory=dict)
    hf: HFLayout | None = None
    arm: str | None = None
    linear: bool = False
    profile_regions: dict = field(default_factory=dict)
    qk_clip: bool = False
    gate_statistics: bool = False

    @property
    def label(self) -> str:
        return f"{self.symbol} ({self.kind.upper()})"

    def module_class(self) -> type:
        if not isinstance(self.module, str):
            return self.module
        path, _, attribute = self.module.partition(":")
        return getattr(importlib.import_module(path), attribute)

    def build(self, config, tconfig, layer_idx: int):
        return self.module_class()(config, tconfig, layer_idx, **self.options)


_REGISTRY: dict[str, Mixer] = {}


def register(mixer: Mixer) -> Mixer:
    """Add ``mixer``; its symbol (one character) and kind must be new."""
    if len(mixer.symbol) != 1 or not mixer.symbol.isalpha():
        raise ValueError(f"mixer symbol {mixer.symbol!r}: must be one letter")
    taken = [m for m in _REGISTRY.values() if m.symbol == mixer.symbol or m.kind == mixer.kind]
    if taken:
        raise ValueError(f"mixer {mixer.label} clashes with the registered {taken[0].label}")
    _REGISTRY[mixer.symbol] = mixer
    return mixer


def unregister(symbol: str) -> None:
    _REGISTRY.pop(symbol, None)


def registered() -> list[Mixer]:
    return list(_REGISTRY.values())


def known() -> str:
    """The registered symbols for messages: ``A (MLA), G (GDN), K (KDA)``."""
    return ", ".join(m.label for m in _REGISTRY.values())


def get(symbol: str) -> Mixer:
    if symbol not in _REGISTRY:
        raise ConfigError(f"unknown mixer symbol {symbol!r}; known symbols: {known()}")
    return _REGISTRY[symbol]


def of_kind(kind: str) -> Mixer:
    for mixer in _REGISTRY.values():
        if mixer.kind == kind:
            return mixer
    raise ConfigError(f"unknown mixer kind {kind!r}; known: {', '.join(m.kind for m in _REGISTRY.values())}")


def in_config(config) -> list[Mixer]:
    """The mixers ``config``'s layers use, in the order they first appear in the layer pattern."""
    return [of_kind(kind) for kind in dict.fromkeys(config.layer_types)]


def arms() -> tuple[str, ...]:
    return tuple(m.arm for m in _REGISTRY.values() if m.arm)


def of_arm(arm: str) -> Mixer:
    for mixer in _REGISTRY.values():
        if mixer.arm == arm:
            return mixer
    raise ConfigError(f"unknown arm {arm!r}; choose one of {arms()}")


def profile_regions() -> dict[str, str]:
    return {name: part for m in _REGISTRY.values() for name, part in m.profile_regions.items()}


def check_context_parallel(config, mode: str) -> None:
    """Refuse context-parallel ``mode`` when a mixer of ``config`` has no strategy for it."""
    lacking = [m.label for m in in_config(config) if not m.plan(config).context_parallel.supports(mode)]
    if lacking:
        raise ConfigError(f"--cp-mode={mode}: the {', '.join(lacking)} layers of layer_pattern="
                          f"{config.layer_pattern!r} have no context-parallel strategy for it")


_MIXER_KEY = re.compile(r"^layers\.(\d+)\.mixer\.(.+)$")


def placement_of(key: str, config) -> Param | None:
    """The plan entry of the mixer parameter with global name ``key`` (``layers.3.mixer.A_log``);
    None for a parameter outside the mixers."""
    match = _MIXER_KEY.match(key)
    if match is None:
        return None
    mixer = of_kind(config.layer_types[int(match.group(1))])
    return mixer.plan(config).parameters().get(match.group(2))


# ----------------------------------------------------------------------------- shared initialisers
def _ones(config):
    from .init import constant_init

    return constant_init(1.0)


# ============================================================================= K and G: KDA, GDN
KDA_CHUNK = CHUNK_SIZE  # the chunk length of the chunked KDA recurrence (its FLOPs and saved states)


def _conv_init(config):
    from .init import uniform_init

    bound = 1.0 / config.short_conv_kernel**0.5
    return uniform_init(-bound, bound)


def _a_log_init(config):
    from .init import Init
    from .kda import a_log_from_uniform

    return Init("uniform", a_log_from_uniform)


def _dt_bias_init(config):
    from .init import Init
    from .kda import dt_bias_from_uniform

    return Init("uniform", dt_bias_from_uniform)


def kda_plan(config, per_channel_decay: bool = True) -> ParallelPlan:
    """KDA (``per_channel_decay``) or GDN, split by head: q/k/v, the gate up-projections, beta, the
    short-conv kernels, ``A_log`` and ``dt_bias``; the low-rank gate down-projections are replicated
    (they see this rank's tokens), the output-norm weight too (consumed by this rank's heads);
    ``o_proj`` is row-parallel. ``A_log``/``dt_bias`` stay fp32 and do not decay."""
    heads, dim, hidden, width = config.kda_num_heads, config.kda_head_dim, config.hidden_size, config.short_conv_kernel
    qkv = heads * dim
    decay = qkv if per_channel_decay else heads
    decay_rate = dict(keep_fp32=True, weight_decay=False)
    params = {
        "q_proj": column(hidden, qkv),
        "k_proj": column(hidden, qkv),
        "v_proj": column(hidden, qkv),
        "q_conv1d": head_sharded((qkv, 1, width), init=_conv_init),
        "k_conv1d": head_sharded((qkv, 1, width), init=_conv_init),
        "v_conv1d": head_sharded((qkv, 1, width), init=_conv_init),
        "f_a_proj": replicated_linear(hidden, dim),
        "f_b_proj": column(dim, decay),
        "A_log": head_sharded((heads,), init=_a_log_init, **decay_rate),
        "dt_bias": head_sharded((decay,), init=_dt_bias_init, **decay_rate),
        "b_proj": column(hidden, heads),
        "g_a_proj": replicated_linear(hidden, dim),
        "g_b_proj": column(dim, qkv),
        "o_norm_weight": replicated((dim,), head_local=True, init=_ones),
        "o_proj": row(qkv, hidden),
    }
    cp = ContextParallelPlan({
        # state passing between ranks plus the short convolution's halo
        "chunkwise": ("parallel.context.kda_chunkwise:chunkwise_kda_core",),
        # all-to-all to whole samples for a share of the heads (gate and beta ride along)
        "ulysses": ("parallel.context.ulysses:ulysses_kda_core",),
    })
    return ParallelPlan(params, "kda_num_heads", heads, cp)


def kda_recurrence_flops(doc_lengths: Sequence[int], head_dim: int, chunk: int = KDA_CHUNK) -> int:
    """Forward FLOPs of the chunked KDA/GDN recurrence for ONE head over the given documents:
    ``6 T dh^2 + 3 T C dh + T C^2`` per chunk (TR Eq. 13), a partial last chunk of length c as
    ``6 c dh^2 + 3 c^2 dh + c^3`` (the state resets at document starts)."""
    total = 0
    for length in doc_lengths:
        full, rest = divmod(int(length), chunk)
        for c, n in ((chunk, full), (rest, 1 if rest else 0)):
            total += n * (6 * c * head_dim**2 + 3 * c * c * head_dim + c**3)
    return total


def kda_flops(config, doc_lengths: Sequence[int], chunk: int = KDA_CHUNK, per_channel_decay: bool = True) -> dict:
    """Projections (q/k/v, low-rank forget gate, beta, low-rank output gate, o) and the three
    depthwise short convs per token, plus the chunked recurrence of every head."""
    d, heads, dh, width = config.hidden_size, config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel
    decay = heads * dh if per_channel_decay else heads
    per_token = (
        2 * d * 3 * heads * dh  # q, k, v
        + 2 * d * dh + 2 * dh * decay  # forget gate, low rank
        + 2 * d * heads  # beta
        + 2 * d * dh + 2 * dh * heads * dh  # output gate, low rank
        + 2 * heads * dh * d  # o_proj
        + 3 * 2 * width * heads * dh  # three depthwise short convs
    )
    tokens = sum(int(x) for x in doc_lengths)
    return {"projections": per_token * tokens, "recurrence": heads * kda_recurrence_flops(doc_lengths, dh, chunk)}


def kda_activations(config, per_channel_decay: bool = True) -> dict:
    """Kept (split, in the compute dtype): q, k, v before and after the short convolutions, the raw
    gate, beta's logit, the l2-normalised q and k, the chunk op's WY pieces (W, q e^G, k e^G) and
    per-chunk states (stored in the input dtype), the op's output, the output gate and the gated-norm
    output; (whole) the low-rank gate down-projections; (fp32) the cumulative log-decay, the op's
    three C x C intra-chunk matrices, v_new and beta (GDN also its per-head gate broadcast to the key
    width). Backward buffers of the chunk op (kernels/kda/chunk.py::kda_chunk_bwd): the state
    gradients per chunk, dv, dq, dk and the raw gate's gradient (split), dv_new, the intra-chunk and
    per-64-column partial gradients, the log-decay's gradient and dbeta (fp32). Under chunkwise
    context parallelism, per sample: the transitions M (dh x dh per head) of the later ranks, kept
    for the backward fold, and the all-gathered [M | E] pairs while the layer runs (fp32)."""
    heads, dh, chunk = config.kda_num_heads, config.kda_head_dim, KDA_CHUNK
    width = heads * dh
    gate = width if per_channel_decay else heads
    blocks = -(-dh // 64)  # the backward's 64-wide key-column blocks
    return {
        "split": 6 * width + gate + heads + 2 * width + 3 * width + width * dh / chunk + 3 * width,
        "tokens": 2 * dh,
        "fp32": width + 3 * chunk * heads + width + heads + (0 if per_channel_decay else width),
        "backward_split": width * dh / chunk + width + 2 * width + (width if per_channel_decay else 0),
        "backward_fp32": width + 2 * chunk * heads + 3 * width + blocks * chunk * heads + width + heads,
        "cp_state_fp32": width * dh,
        "cp_exchange_fp32": width * 2 * dh,
    }


def kda_hf_tensors(config, a: str, m: str) -> list:
    from .hf_names import HFTensor

    heads, dim, h = config.kda_num_heads, config.kda_head_dim, config.hidden_size
    qkv, width = heads * dim, config.short_conv_kernel
    return [
        HFTensor(a + "q_proj.weight", (qkv, h), m + "q_proj.weight"),
        HFTensor(a + "k_proj.weight", (qkv, h), m + "k_proj.weight"),
        HFTensor(a + "v_proj.weight", (qkv, h), m + "v_proj.weight"),
        HFTensor(a + "q_conv1d.weight", (qkv, 1, width), m + "q_conv1d"),
        HFTensor(a + "k_conv1d.weight", (qkv, 1, width), m + "k_conv1d"),
        HFTensor(a + "v_conv1d.weight", (qkv, 1, width), m + "v_conv1d"),
        HFTensor(a + "A_log", (1, 1, heads, 1), m + "A_log", fp32=True),
        HFTensor(a + "dt_bias", (qkv,), m + "dt_bias", fp32=True),
        HFTensor(a + "f_a_proj.weight", (dim, h), m + "f_a_proj.weight"),
        HFTensor(a + "f_b_proj.weight", (qkv, dim), m + "f_b_proj.weight"),
        HFTensor(a + "b_proj.weight", (heads, h), m + "b_proj.weight"),
        HFTensor(a + "g_a_proj.weight", (dim, h), m + "g_a_proj.weight"),
        HFTensor(a + "g_b_proj.weight", (qkv, dim), m + "g_b_proj.weight"),
        HFTensor(a + "o_norm.weight", (dim,), m + "o_norm_weight"),
        HFTensor(a + "o_proj.weight", (h, qkv), m + "o_proj.weight"),
    ]


def kda_hf_check(config) -> None:
    from .hf_names import HFConversionError

    if config.kda_gate_lower_bound is not None:
        raise HFConversionError(
            f"kda_gate_lower_bound={config.kda_gate_lower_bound}: the HF KDA gate is unbounded "
            f"(-exp(A_log)*softplus(.)); a bounded-gate model cannot be exported"
        )


# ============================================================================= A: MLA (NoPE)
def mla_plan(config) -> ParallelPlan:
    """MLA split by head: ``q_proj`` and ``kv_b_proj`` column-parallel, ``o_proj`` row-parallel;
    the compressed-key projection ``kv_a_proj_with_mqa`` and its norm replicated (they see this
    rank's tokens). The shared k_rot slice is an activation whose gradient the layer sums over TP."""
    heads, hidden, rank = config.num_attention_heads, config.hidden_size, config.kv_lora_rank
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    params = {
        "q_proj": column(hidden, heads * (nope + rope)),
        "kv_a_proj_with_mqa": replicated_linear(hidden, rank + rope),
        "kv_a_layernorm": norm(rank, config.kv_norm_eps),
        "kv_b_proj": column(rank, heads * (nope + v)),
        "o_proj": row(heads * v, hidden),
    }
    cp = ContextParallelPlan({
        # all-gather of the compressed keys, attention of the local queries against them
        "chunkwise": ("parallel.context.mla_latent:gather_latent", "parallel.context.mla_latent:latent_attention"),
        # all-to-all of q, k, v to whole samples for a share of the heads
        "ulysses": ("parallel.context.ulysses:ulysses_attention",),
    })
    return ParallelPlan(params, "num_attention_heads", heads, cp)


def mla_flops(config, doc_lengths: Sequence[int], chunk: int = KDA_CHUNK) -> dict:
    """Projections per token; attention ``L^2 / 2`` causal (q, k) pairs per document of length L,
    each ``2 H (n + r)`` for the logits and ``2 H v`` for the weighted values."""
    d, heads, rank = config.hidden_size, config.num_attention_heads, config.kv_lora_rank
    n, r, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    tokens = sum(int(x) for x in doc_lengths)
    pairs = sum(int(x) ** 2 for x in doc_lengths) / 2
    per_token = 2 * d * heads * (n + r) + 2 * d * (rank + r) + 2 * rank * heads * (n + v) + 2 * heads * v * d
    return {"projections": per_token * tokens, "attention": pairs * (2 * heads * (n + r) + 2 * heads * v)}


def mla_activations(config) -> dict:
    """Kept: q, the kv_b output, the assembled keys, the attention output (split; flash attention
    keeps no S x S); the kv_a output and its norm (whole); the softmax log-sum-exp (fp32). Backward
    of flash attention: dq, dk, dv (split) and its fp32 dq accumulator and softmax-gradient row sums.
    Under chunkwise context parallelism each gathered key keeps its compressed stream and its norm
    (whole), its kv_b output and assembled key (split); the backward adds its dk, dv (split) and the
    compressed stream's gradient before the reduce-scatter (whole)."""
    heads, n, r, v, rank = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                            config.v_head_dim, config.kv_lora_rank)
    return {"split": 2 * heads * (n + r) + heads * (n + v) + heads * v, "tokens": 2 * rank + r, "fp32": heads,
            "backward_split": 2 * heads * (n + r) + heads * v, "backward_fp32": heads * (n + r) + heads,
            "keys_split": heads * (n + v) + heads * (n + r), "keys_tokens": 2 * rank + r,
            "keys_backward_split": heads * (n + r) + heads * v, "keys_backward_tokens": rank + r}


def mla_hf_tensors(config, a: str, m: str) -> list:
    from .hf_names import HFTensor

    h, heads, qk, rank = config.hidden_size, config.num_attention_heads, config.qk_head_dim, config.kv_lora_rank
    kv_a, kv_b = rank + config.qk_rope_head_dim, heads * (config.qk_nope_head_dim + config.v_head_dim)
    return [
        HFTensor(a + "q_proj.weight", (heads * qk, h), m + "q_proj.weight"),
        HFTensor(a + "kv_a_proj_with_mqa.weight", (kv_a, h), m + "kv_a_proj_with_mqa.weight"),
        HFTensor(a + "kv_a_layernorm.weight", (rank,), m + "kv_a_layernorm.weight"),
        HFTensor(a + "kv_b_proj.weight", (kv_b, rank), m + "kv_b_proj.weight"),
        HFTensor(a + "o_proj.weight", (h, heads * config.v_head_dim), m + "o_proj.weight"),
    ]


def mla_hf_check(config) -> None:
    from .hf_names import HF_KV_NORM_EPS, HFConversionError

    if abs(config.kv_norm_eps - HF_KV_NORM_EPS) > 0:
        raise HFConversionError(
            f"kv_norm_eps={config.kv_norm_eps}: transformers' kv_a_layernorm always uses eps={HF_KV_NORM_EPS}"
        )


# ============================================================================= the built-in entries
register(Mixer(
    symbol="A", kind="mla", name="Multi-head Latent Attention (NoPE)", module="model.mla:MultiLatentAttention",
    plan=mla_plan, flops=mla_flops, flops_parts=("projections", "attention"), activations=mla_activations,
    hf=HFLayout("full_attention", mla_hf_tensors, mla_hf_check), arm="mla",
    profile_regions={"mla_core_attention": "MLA core attention"}, qk_clip=True,
))
register(Mixer(
    symbol="G", kind="gdn", name="Gated DeltaNet", module="model.kda:KimiDeltaAttention",
    options={"per_channel_decay": False}, plan=functools.partial(kda_plan, per_channel_decay=False),
    flops=functools.partial(kda_flops, per_channel_decay=False), flops_parts=("projections", "recurrence"),
    activations=functools.partial(kda_activations, per_channel_decay=False),
    arm="gdn-h", linear=True, profile_regions={"kda_core": "KDA"}, gate_statistics=True,
))
register(Mixer(
    symbol="K", kind="kda", name="Kimi Delta Attention", module="model.kda:KimiDeltaAttention",
    options={"per_channel_decay": True}, plan=kda_plan, flops=kda_flops, flops_parts=("projections", "recurrence"),
    activations=kda_activations,
    hf=HFLayout("linear_attention", kda_hf_tensors, kda_hf_check), arm="kimi-linear", linear=True,
    profile_regions={"kda_core": "KDA"}, gate_statistics=True,
))
