"""Named model configurations (an explicit registry, no magic).

- ``tiny``: a toy that trains on two CPU cores (vocab 8192 = the embedded-corpus tokenizer).
- ``small``: 208M parameters (87M activated), the scaling presets' shapes at 12 layers and hidden
  512: the size for comparing the arms at 4k context on one GPU in minutes (``configs/small-*.json``).
- ``kimi-linear-48b-a3b``: the released model exactly (docs/architecture.md; 49,122,681,728 parameters).
- ``scaling-653m`` ... ``scaling-1.7b``: the paper's scaling-law sizes (tech report Table 2: MoE 8 of 64
  experts). The paper gives heads, layers and hidden size only; the remaining widths follow the
  released model's proportions (KDA/MLA head dim 128, dense MLP 4x hidden, 1 shared expert) and the
  expert width is chosen so that the activated parameters without embeddings match the table (see
  ``docs/presets.md``). Their vocab is 32768, the size of the BPE we train on the Gutenberg corpus.

Any preset is a starting point: ``with_pattern`` turns it into the MLA baseline ("A"), the GDN
hybrid ("GGGA") or Kimi Linear ("KKKA") with everything else identical.
"""

from __future__ import annotations

from . import mixers
from .config import ConfigError, ModelConfig, expand_pattern


def hybrid_pattern(num_layers: int, linear: str = "K", ratio: int = 3) -> str:
    """``ratio`` linear layers then one MLA, repeated; a shorter last block still ends with MLA
    (the released 27-layer model is KKKA x 6 + KKA)."""
    return expand_pattern(linear * ratio + "A", num_layers)


KIMI_48B_PATTERN = hybrid_pattern(27)  # MLA at 0-based layers 3, 7, ..., 23 and 26


def _tiny() -> ModelConfig:
    # KKKA, first layer dense, then MoE 2 of 4 experts + 1 shared; sized so that the quick start
    # (2 gloo ranks on 2 CPU cores) runs at about 20 steps/s (docs/training.md)
    return ModelConfig(name="tiny", hidden_size=64, num_experts=4)


def _kimi_48b() -> ModelConfig:
    return ModelConfig(
        name="kimi-linear-48b-a3b",
        vocab_size=163840,
        hidden_size=2304,
        num_layers=27,
        layer_pattern=KIMI_48B_PATTERN,
        rms_norm_eps=1e-5,
        kda_num_heads=32,
        kda_head_dim=128,
        short_conv_kernel=4,
        num_attention_heads=32,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense=1,
        intermediate_size=9216,
        num_experts=256,
        num_experts_per_token=8,
        moe_intermediate_size=1024,
        num_shared_experts=1,
        routed_scaling_factor=2.446,
        num_expert_group=1,
        topk_group=1,
        bos_token_id=163584,
        eos_token_id=163586,
        pad_token_id=163839,
    )


# (heads, layers, hidden, moe_intermediate_size) per activated size of the tech report's Table 2; the expert width
# is the one that brings the activated parameters without embeddings to the paper's number.
_SCALING = {
    "scaling-653m": (16, 16, 1216, 960),  # 657.9M activated without embeddings
    "scaling-878m": (18, 18, 1376, 992),  # 884.0M
    "scaling-1.1b": (20, 20, 1536, 960),  # 1,106.0M
    "scaling-1.4b": (22, 22, 1632, 1024),  # 1,387.2M
    "scaling-1.7b": (24, 24, 1776, 1024),  # 1,693.4M
}


def _scaling(name: str, heads: int, layers: int, hidden: int, moe_width: int) -> ModelConfig:
    """The scaling-law shape: head dim 128, MLA kv_lora 512 / nope 128 / rope 64 / v 128, dense MLP
    4x hidden, 8 of 64 experts + 1 shared, vocab 32768."""
    return ModelConfig(
        name=name,
        vocab_size=32768,
        hidden_size=hidden,
        num_layers=layers,
        layer_pattern=hybrid_pattern(layers),
        kda_num_heads=heads,
        kda_head_dim=128,
        num_attention_heads=heads,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense=1,
        intermediate_size=4 * hidden,
        num_experts=64,
        num_experts_per_token=8,
        moe_intermediate_size=moe_width,
        num_shared_experts=1,
    )


PRESETS = {
    "tiny": _tiny,
    # the scaling shape at 12 layers (KKKA x 3), hidden 512, 8 heads, expert width 128: 208.2M
    # parameters, 87.1M activated per token (53.5M without embeddings), for 4k-context comparisons
    "small": lambda: _scaling("small", 8, 12, 512, 128),
    "kimi-linear-48b-a3b": _kimi_48b,
    **{name: (lambda n=name: _scaling(n, *_SCALING[n])) for name in _SCALING},
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()


def with_pattern(config: ModelConfig, pattern: str) -> ModelConfig:
    """The same model with another layer pattern."""
    return config.replace(layer_pattern=pattern, name=f"{config.name}[{pattern}]").validate()


ARMS = mixers.arms()  # the registered mixers' arms: ("mla", "gdn-h", "kimi-linear")


def as_arm(config: ModelConfig, arm: str) -> ModelConfig:
    """The paper's identical-recipe arms: a linear mixer's arm (``gdn-h``, ``kimi-linear``) makes
    every linear layer of the pattern that mixer, an attention mixer's arm (``mla``) the whole
    pattern; everything else stays. So ``gdn-h`` turns every KDA layer into a GDN layer and
    ``kimi-linear`` every GDN layer into a KDA layer, with the MLA layers where they are."""
    mixer = mixers.of_arm(arm)
    if mixer.linear:
        linear = {m.symbol for m in mixers.registered() if m.linear}
        expanded = expand_pattern(config.layer_pattern, config.num_layers)
        pattern = "".join(mixer.symbol if s in linear else s for s in expanded)
    else:
        pattern = mixer.symbol
    return config.replace(layer_pattern=pattern, name=f"{config.name}:{arm}").validate()
