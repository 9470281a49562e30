"""The one mapping between our model and the Hugging Face ``kimi_linear`` layout
(docs/architecture.md, "Hugging Face names").

Both directions use what is defined here:

- ``hf_config_from_model_config`` / ``model_config_from_hf_config``: our ``ModelConfig`` <-> the HF
  ``config.json`` dict (``linear_attn_config`` with 1-based layer lists, MoE and MLA keys, plus the
  ``layer_types`` / ``mlp_layer_types`` lists transformers 5.x reads first);
- ``hf_tensor_specs``: one ``HFTensor`` per tensor of the checkpoint, in file order, with its checkpoint
  name and shape (computed from the config alone, so the 48B model is counted without allocating),
  the name of our parameter it comes from and, when one of ours is split into several HF tensors
  (``[gate; up]`` SwiGLU weights), which part it is;
- ``canonical_hf_names``: transformers' runtime names (``conv1d.weight``, ``forget_gate.*``,
  ``mlp.experts.gate_up_proj`` ...) and ``save_pretrained``'s variants rewritten to the checkpoint's names.

HF/ours semantics that cannot be expressed in the other format raise ``HFConversionError`` naming the
field (GDN layers, a bounded KDA gate, q-LoRA, grouped routing that differs, ...).

Semantics checked against transformers 5.24 ``modeling_kimi_linear.py`` (and held by the parity
tests, fp32 logits within 1e-4):

- KDA: q/k/v short convs + SiLU (v included), L2-normalised q/k (eps 1e-6), gate
  ``-exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)`` without a lower bound, beta = sigmoid(b_proj),
  gated output RMSNorm with eps = ``rms_norm_eps``; ``A_log`` is ``[1, 1, H, 1]`` there, ``[H]`` here.
- MLA: NoPE, scale ``(nope + rope)^-0.5``; transformers builds ``kv_a_layernorm`` with eps 1e-6
  whatever the config says (vLLM uses ``rms_norm_eps``): our ``kv_norm_eps`` must be 1e-6 to export.
- MoE: sigmoid scores in fp32, top-k over ``score + e_score_correction_bias`` (our router's
  ``expert_bias``), unbiased weights renormalised (+1e-20) and scaled by ``routed_scaling_factor``,
  plus the shared expert: the same in both. Group-limited top-k differs: transformers ranks groups
  by the sum of their top-2 scores, megatron by the sum of their top-(k / topk_group): identical
  only when ``num_expert_group == 1`` (the released model) or ``k / topk_group == 2``; otherwise
  both directions refuse unless ``allow_group_routing_mismatch`` is given.
- transformers never resets KDA state or attention at document boundaries inside a row: only
  single-document rows compare (our ``cu_seqlens`` packing has no HF counterpart).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from . import mixers
from .config import ConfigError, ModelConfig

# transformers builds kv_a_layernorm without an eps argument: KimiLinearRMSNorm's default
HF_KV_NORM_EPS = 1e-6
# the released model's context length (NoPE MLA + KDA: nothing in the weights depends on it)
DEFAULT_MODEL_MAX_LENGTH = 1048576


class HFConversionError(ConfigError):
    """A model or an HF folder cannot be represented in the other format; the message says why."""


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the HF checkpoint.

    ``ours`` is our state-dict name ("" for the zero-width shared expert transformers builds when the
    model has none: written as an empty tensor, never read back); ``part = (index, count)`` when our tensor is the concatenation
    (along dim 0) of ``count`` HF tensors; ``fp32`` marks tensors exported in float32 whatever the
    requested dtype (``A_log``, ``dt_bias``, router weight and bias: transformers keeps them fp32).
    """

    hf: str
    shape: tuple
    ours: str
    part: tuple | None = None
    fp32: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------------- config
def check_exportable(cfg: ModelConfig, allow_group_routing_mismatch: bool = False) -> None:
    """Raise HFConversionError if the HF model would not compute what ours computes."""
    types = cfg.layer_types
    exportable = ", ".join(m.label for m in mixers.registered() if m.hf is not None)
    for mixer in mixers.in_config(cfg):
        if mixer.hf is None:
            layers = [i for i, t in enumerate(types) if t == mixer.kind]
            raise HFConversionError(
                f"layer_pattern={cfg.layer_pattern!r} has {mixer.name} ('{mixer.symbol}') layers at 0-based "
                f"{layers}: the HF kimi_linear model has no {mixer.kind.upper()} layer, so this checkpoint cannot "
                f"be exported; only {exportable} layers can"
            )
    for mixer in mixers.in_config(cfg):
        if mixer.hf.check is not None:
            mixer.hf.check(cfg)
    if not cfg.moe_renormalize and cfg.num_experts_per_token > 1:
        raise HFConversionError("moe_renormalize=False is not supported by our MoE; nothing to export")
    check_group_routing(cfg, allow_group_routing_mismatch)


def check_group_routing(cfg: ModelConfig, allow_mismatch: bool = False) -> None:
    """Refuse grouped top-k settings for which megatron and transformers choose different experts."""
    if cfg.num_expert_group > 1 and "moe" in cfg.ffn_types:
        per_group = cfg.num_experts_per_token // cfg.topk_group
        if per_group != 2 and not allow_mismatch:
            raise HFConversionError(
                f"num_expert_group={cfg.num_expert_group}, topk_group={cfg.topk_group}: megatron ranks expert "
                f"groups by the sum of their top-{per_group} (= num_experts_per_token/topk_group) scores, "
                f"transformers by the sum of their top-2; the two models would route differently. "
                f"Pass --allow-group-routing-mismatch to convert anyway"
            )


def hf_config_from_model_config(
    cfg: ModelConfig, dtype: str = "bfloat16", model_max_length: int | None = None
) -> dict:
    """The HF ``config.json`` dict (the released model's keys) for ``cfg``."""
    hf_types = [_hf_layout(kind).layer_type for kind in cfg.layer_types]
    kda_layers = [i + 1 for i, t in enumerate(hf_types) if t == "linear_attention"]
    mla_layers = [i + 1 for i, t in enumerate(hf_types) if t == "full_attention"]
    if model_max_length is None:
        model_max_length = int(cfg.extra.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH))
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "model_max_length": model_max_length,
        "rope_theta": 10000.0,  # unused (NoPE); no rope_scaling key: transformers 5 warns on it
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "q_lora_rank": None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "mla_use_nope": True,
        "attention_bias": False,
        "linear_attn_config": {
            "kda_layers": kda_layers,
            "full_attn_layers": mla_layers,
            "num_heads": cfg.kda_num_heads,
            "head_dim": cfg.kda_head_dim,
            "short_conv_kernel_size": cfg.short_conv_kernel,
        },
        # transformers 5.x reads these first (and save_pretrained writes them)
        "layer_types": hf_types,
        "mlp_layer_types": ["dense" if f == "dense" else "sparse" for f in cfg.ffn_types],
        "num_experts": cfg.num_experts,
        "num_experts_per_token": cfg.num_experts_per_token,
        "num_shared_experts": cfg.num_shared_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_renormalize": cfg.moe_renormalize,
        "moe_router_activation_func": "sigmoid",
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "use_grouped_topk": True,
        "num_expert_group": cfg.num_expert_group,
        "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }


def _get(d: dict, *names, default=None):
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    return default


def _need(d: dict, key: str):
    """A key every kimi_linear config.json has."""
    if d.get(key) is None:
        raise HFConversionError(f"config.json has no {key!r}, which every kimi_linear config needs")
    return d[key]


def model_config_from_hf_config(
    d: dict, name: str = "hf-import", allow_group_routing_mismatch: bool = False
) -> ModelConfig:
    """Our ModelConfig for an HF ``config.json`` dict; HFConversionError names what does not fit."""
    try:
        return _model_config_from_hf_config(d, name, allow_group_routing_mismatch)
    except HFConversionError:
        raise
    except (TypeError, ValueError, AttributeError) as err:  # a value of the wrong kind, e.g. "abc" for a size
        raise HFConversionError(f"config.json has a malformed value ({type(err).__name__}: {err})") from None


def _model_config_from_hf_config(d: dict, name: str, allow_group_routing_mismatch: bool) -> ModelConfig:
    if d.get("model_type") not in (None, "kimi_linear"):
        raise HFConversionError(f"config.json model_type={d.get('model_type')!r}: expected 'kimi_linear'")

    def require(key, ok, why):
        if key in d and d[key] is not None and not ok(d[key]):
            raise HFConversionError(f"config.json {key}={d[key]!r}: {why}")

    require("q_lora_rank", lambda v: v is None, "q-LoRA MLA is not supported by our model (needs null)")
    require("mla_use_nope", lambda v: v is True, "only NoPE MLA (mla_use_nope=true) is supported")
    require("hidden_act", lambda v: v == "silu", "only silu is supported")
    require("attention_bias", lambda v: v is False, "biases are not supported")
    require("moe_router_activation_func", lambda v: v == "sigmoid", "only sigmoid routing is supported")
    require("moe_layer_freq", lambda v: v == 1, "only moe_layer_freq=1 (every layer after the dense ones) is supported")
    require("num_nextn_predict_layers", lambda v: v == 0, "multi-token-prediction layers are not supported")
    renorm = _get(d, "moe_renormalize", "norm_topk_prob", default=True)
    if not renorm:
        raise HFConversionError("config.json moe_renormalize=false: our MoE always renormalises the top-k weights")

    layers = int(_need(d, "num_hidden_layers"))
    lac = d.get("linear_attn_config") or {}
    layer_types = d.get("layer_types")
    if layer_types is None:
        if "kda_layers" not in lac or "full_attn_layers" not in lac:
            raise HFConversionError(
                "config.json has neither layer_types nor linear_attn_config.kda_layers/full_attn_layers"
            )
        layer_types = [None] * layers
        for i in lac["full_attn_layers"]:
            layer_types[i - 1] = "full_attention"
        for i in lac["kda_layers"]:
            layer_types[i - 1] = "linear_attention"
    if len(layer_types) != layers:
        raise HFConversionError(f"config.json layer_types has {len(layer_types)} entries, num_hidden_layers={layers}")
    symbols = {m.hf.layer_type: m.symbol for m in mixers.registered() if m.hf is not None}
    bad = sorted({str(t) for t in layer_types if t not in symbols})
    if bad:
        raise HFConversionError(
            f"config.json layer types {bad} are not supported (only {', '.join(symbols)})"
        )
    pattern = "".join(symbols[t] for t in layer_types)

    mlp_types = d.get("mlp_layer_types")
    if mlp_types is None:
        first_dense = int(_get(d, "first_k_dense_replace", default=1))
        mlp_types = ["dense" if i < first_dense else "sparse" for i in range(layers)]
    first_dense = sum(1 for t in mlp_types if t == "dense")
    if list(mlp_types) != ["dense"] * first_dense + ["sparse"] * (layers - first_dense):
        raise HFConversionError(
            f"config.json mlp_layer_types={mlp_types}: only dense layers first, then MoE layers, are supported"
        )
    kv_heads = _get(d, "num_key_value_heads", default=None)
    heads = int(_need(d, "num_attention_heads"))
    if kv_heads is not None and int(kv_heads) != heads:
        raise HFConversionError(f"config.json num_key_value_heads={kv_heads} != num_attention_heads={heads}")
    if d.get("tie_word_embeddings"):
        raise HFConversionError("config.json tie_word_embeddings=true: our model has an untied LM head")

    extra = {}
    max_len = _get(d, "model_max_length", "max_position_embeddings")
    if max_len is not None:
        extra["model_max_length"] = int(max_len)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    cfg = ModelConfig(
        name=name,
        vocab_size=int(_need(d, "vocab_size")),
        hidden_size=int(_need(d, "hidden_size")),
        num_layers=layers,
        layer_pattern=pattern,
        rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-5)),
        initializer_range=float(_get(d, "initializer_range", default=0.02)),
        kda_num_heads=int(_get(lac, "num_heads", default=_get(d, "linear_num_heads", default=32))),
        kda_head_dim=int(_get(lac, "head_dim", default=_get(d, "linear_head_dim", default=128))),
        short_conv_kernel=int(
            _get(lac, "short_conv_kernel_size", default=_get(d, "linear_conv_kernel_dim", default=4))
        ),
        kda_gate_lower_bound=None,
        num_attention_heads=heads,
        kv_lora_rank=int(_need(d, "kv_lora_rank")),
        qk_nope_head_dim=int(_need(d, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_need(d, "qk_rope_head_dim")),
        v_head_dim=int(_need(d, "v_head_dim")),
        kv_norm_eps=HF_KV_NORM_EPS,
        first_k_dense=first_dense,
        intermediate_size=int(_need(d, "intermediate_size")),
        num_experts=int(_get(d, "num_experts", "num_local_experts", default=1)),
        num_experts_per_token=int(_get(d, "num_experts_per_token", "num_experts_per_tok", default=1)),
        moe_intermediate_size=int(_get(d, "moe_intermediate_size", default=1)),
        num_shared_experts=int(_get(d, "num_shared_experts", "n_shared_experts", default=0)),
        routed_scaling_factor=float(_get(d, "routed_scaling_factor", default=1.0)),
        moe_renormalize=True,
        num_expert_group=int(_get(d, "num_expert_group", "n_group", default=1)),
        topk_group=int(_get(d, "topk_group", default=1)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
        extra=extra,
    )
    try:
        cfg.validate()
    except ConfigError as err:
        raise HFConversionError(f"config.json does not give a valid model: {err}") from None
    check_group_routing(cfg, allow_group_routing_mismatch)
    return cfg


# ---------------------------------------------------------------------------- tensors
def hf_tensor_specs(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor of the HF checkpoint for ``cfg``, with its checkpoint name, shape and our source."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs = [HFTensor("model.embed_tokens.weight", (v, h), "embedding.weight")]
    for i, (mixer, ffn) in enumerate(zip(cfg.layer_types, cfg.ffn_types)):
        hp, op = f"model.layers.{i}.", f"layers.{i}."
        a, m = hp + "self_attn.", op + "mixer."
        specs.append(HFTensor(hp + "input_layernorm.weight", (h,), op + "input_norm.weight"))
        specs += _hf_layout(mixer, cfg, i).tensors(cfg, a, m)
        specs.append(HFTensor(hp + "post_attention_layernorm.weight", (h,), op + "post_mixer_norm.weight"))
        f = op + "ffn."
        if ffn == "dense":
            inter = cfg.intermediate_size
            specs += _swiglu(hp + "mlp.", ("gate_proj", "up_proj", "down_proj"), f, h, inter)
        else:
            e, inter = cfg.num_experts, cfg.moe_intermediate_size
            b = hp + "block_sparse_moe."
            specs += [
                HFTensor(b + "gate.weight", (e, h), f + "router.weight", fp32=True),
                HFTensor(b + "gate.e_score_correction_bias", (e,), f + "router.expert_bias", fp32=True),
            ]
            for j in range(e):
                specs += _swiglu(f"{b}experts.{j}.", ("w1", "w3", "w2"), f"{f}experts.local_experts.{j}.", h, inter)
            if cfg.num_shared_experts:
                shared = inter * cfg.num_shared_experts
                specs += _swiglu(b + "shared_experts.", ("gate_proj", "up_proj", "down_proj"),
                                 f + "shared_experts.", h, shared)
            else:  # transformers always builds the shared expert; zero-width adds nothing
                s = b + "shared_experts."
                specs += [
                    HFTensor(s + "gate_proj.weight", (0, h), ""),
                    HFTensor(s + "up_proj.weight", (0, h), ""),
                    HFTensor(s + "down_proj.weight", (h, 0), ""),
                ]
    specs += [
        HFTensor("model.norm.weight", (h,), "final_norm.weight"),
        HFTensor("lm_head.weight", (v, h), "output_layer.weight"),
    ]
    return specs


def _hf_layout(kind: str, cfg: ModelConfig | None = None, layer: int | None = None) -> mixers.HFLayout:
    """The HF layout of mixer ``kind``; HFConversionError for a mixer the HF model does not have."""
    mixer = mixers.of_kind(kind)
    if mixer.hf is None:
        where = f"layer {layer} is a {kind!r} layer (layer_pattern={cfg.layer_pattern!r}): " if cfg else ""
        raise HFConversionError(
            f"{where}the HF kimi_linear model has no {mixer.name} ({mixer.label}) layer, so this model cannot be "
            f"exported"
        )
    return mixer.hf


def _swiglu(hf_prefix: str, names: tuple, our_prefix: str, hidden: int, inter: int) -> list[HFTensor]:
    gate, up, down = names
    return [
        HFTensor(f"{hf_prefix}{gate}.weight", (inter, hidden), our_prefix + "linear_fc1.weight", part=(0, 2)),
        HFTensor(f"{hf_prefix}{up}.weight", (inter, hidden), our_prefix + "linear_fc1.weight", part=(1, 2)),
        HFTensor(f"{hf_prefix}{down}.weight", (hidden, inter), our_prefix + "linear_fc2.weight"),
    ]


def hf_tensor_from_ours(spec: HFTensor, ours: torch.Tensor) -> torch.Tensor:
    """The HF tensor ``spec`` cut out of our (full, TP=1) tensor."""
    if not spec.ours:
        return torch.zeros(spec.shape)
    t = ours.detach()
    if spec.part is not None:
        index, count = spec.part
        if t.shape[0] % count:
            raise HFConversionError(f"{spec.ours} has {t.shape[0]} rows, not divisible into {count} parts")
        t = t.chunk(count, dim=0)[index]
    if t.numel() != spec.numel:
        raise HFConversionError(
            f"{spec.ours} has shape {tuple(ours.shape)}, which does not give {spec.hf} of shape {spec.shape}"
        )
    return t.reshape(spec.shape)


def ours_from_hf_tensors(specs: list[HFTensor], tensors: list[torch.Tensor], our_shape) -> torch.Tensor:
    """Our tensor assembled from its HF tensor(s) (the parts of one of ours, in order)."""
    for spec, t in zip(specs, tensors):
        if tuple(t.shape) != tuple(spec.shape) and t.numel() != spec.numel:
            raise HFConversionError(f"{spec.hf} has shape {tuple(t.shape)}, expected {spec.shape}")
    parts = [t.reshape(spec.shape) for spec, t in zip(specs, tensors)]
    full = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if full.numel() != math.prod(our_shape):
        raise HFConversionError(
            f"{specs[0].ours}: HF tensors give {full.numel()} values, our model has shape {tuple(our_shape)}"
        )
    return full.reshape(our_shape)


def group_by_ours(specs: list[HFTensor]) -> dict[str, list[HFTensor]]:
    """Our name -> its HF tensors, parts in order."""
    groups: dict[str, list[HFTensor]] = {}
    for spec in specs:
        if not spec.ours:
            continue
        groups.setdefault(spec.ours, []).append(spec)
    for name, group in groups.items():
        group.sort(key=lambda s: s.part[0] if s.part else 0)
    return groups


# ---------------------------------------------------------------------------- runtime names
_FORGET = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.)forget_gate\.(f_a_proj\.weight|f_b_proj\.weight|dt_bias|A_log)$"
)
_CONV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)conv1d\.weight$")
_MOE_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.(gate\.weight|gate\.e_score_correction_bias|shared_experts\..*)$")
_DENSE_BSM = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.((gate|up|down)_proj\.weight)$")
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.gate_up_proj$")
_DOWN = re.compile(r"^(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.down_proj$")


def canonical_hf_names(tensors: dict) -> dict:
    """Rewrite transformers' runtime names to the checkpoint's names (values are tensors or zero-arg loaders).

    Handles: ``self_attn.conv1d.weight`` (q/k/v convs concatenated), ``self_attn.forget_gate.*``,
    ``mlp.experts.gate_up_proj`` / ``down_proj`` (experts stacked, [w1; w3] merged), ``mlp.gate.*`` and
    ``mlp.shared_experts.*`` on MoE layers, and ``block_sparse_moe.{gate,up,down}_proj`` on dense layers
    (what ``save_pretrained`` writes for them). The checkpoint's names pass through unchanged.
    """
    out = {}
    for name, value in tensors.items():
        if m := _FORGET.match(name):
            out[m.group(1) + m.group(2)] = value
        elif m := _CONV.match(name):
            w = _load(value)
            for prefix, piece in zip("qkv", w.chunk(3, dim=0)):
                out[f"{m.group(1)}{prefix}_conv1d.weight"] = piece
        elif m := _MOE_MLP.match(name):
            out[f"{m.group(1)}block_sparse_moe.{m.group(2)}"] = value
        elif m := _DENSE_BSM.match(name):
            out[f"{m.group(1)}mlp.{m.group(2)}"] = value
        elif m := _GATE_UP.match(name):
            w = _load(value)  # [E, 2I, H]
            for e in range(w.shape[0]):
                w1, w3 = w[e].chunk(2, dim=0)
                out[f"{m.group(1)}block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{m.group(1)}block_sparse_moe.experts.{e}.w3.weight"] = w3
        elif m := _DOWN.match(name):
            w = _load(value)  # [E, H, I]
            for e in range(w.shape[0]):
                out[f"{m.group(1)}block_sparse_moe.experts.{e}.w2.weight"] = w[e]
        else:
            out[name] = value
    return out


def _load(value):
    return value() if callable(value) else value
