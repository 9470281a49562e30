"""The model configuration: one dataclass for every arm of the comparison.

The layer pattern is data: one symbol per layer, ``K`` (Kimi Delta Attention), ``A`` (MLA, NoPE),
``G`` (Gated DeltaNet: the KDA layer with one decay per head) or any mixer registered in
model/mixers.py. A pattern shorter than the model is repeated, so ``"KKKA"`` with 16 layers is the
3:1 hybrid, ``"A"`` the all-MLA baseline and ``"GGGA"`` the GDN hybrid. When its length does not
divide the number of layers, the last, partial repeat is the pattern's tail: ``"KKKA"`` on 27
layers is ``KKKA`` x 6 + ``KKA``, the released model. The first ``first_k_dense`` layers use a
dense SwiGLU MLP, the rest MoE.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import mixers
from .errors import ConfigError

__all__ = ["ConfigError", "ModelConfig", "coerce_field", "expand_pattern"]


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 4
    layer_pattern: str = "KKKA"
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    # Kimi Delta Attention / Gated DeltaNet layers (docs/architecture.md, "Kimi Delta Attention")
    kda_num_heads: int = 2
    kda_head_dim: int = 32
    short_conv_kernel: int = 4
    # optional bounded gate (lower_bound * sigmoid(...)); None is the released model's unbounded gate
    kda_gate_lower_bound: float | None = None

    # MLA layers (docs/architecture.md); NoPE: the "rope" slice of the key is shared and never rotated
    num_attention_heads: int = 2
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    kv_norm_eps: float = 1e-6  # transformers builds kv_a_layernorm with its default eps

    # feed-forward: dense SwiGLU for the first layers, MoE after (docs/architecture.md, "Mixture of experts")
    first_k_dense: int = 1
    intermediate_size: int = 256
    num_experts: int = 8
    num_experts_per_token: int = 2
    moe_intermediate_size: int = 64
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    router_bias_update_rate: float = 1e-3

    # special tokens written into the HF config on export
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def layer_types(self) -> list[str]:
        """The mixer kind of each layer ('kda', 'mla', 'gdn', ...: model/mixers.py), the pattern
        expanded to num_layers."""
        return [mixers.get(s).kind for s in expand_pattern(self.layer_pattern, self.num_layers)]

    @property
    def ffn_types(self) -> list[str]:
        return ["dense" if i < self.first_k_dense else "moe" for i in range(self.num_layers)]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    # ------------------------------------------------------------------ checks
    def validate(self, tensor_parallel_size: int = 1, expert_parallel_size: int = 1) -> "ModelConfig":
        """Raise ConfigError naming the field and the fix for any inconsistent value."""
        positive = [
            "vocab_size", "hidden_size", "num_layers", "kda_num_heads", "kda_head_dim",
            "short_conv_kernel", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "v_head_dim", "intermediate_size", "num_experts", "num_experts_per_token",
            "moe_intermediate_size", "num_expert_group", "topk_group",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.qk_rope_head_dim < 0:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim}: must be >= 0")
        expand_pattern(self.layer_pattern, self.num_layers)  # raises on bad symbols / length
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ConfigError(
                f"first_k_dense={self.first_k_dense}: must be between 0 and num_layers={self.num_layers}"
            )
        if self.num_experts_per_token > self.num_experts:
            raise ConfigError(
                f"num_experts_per_token={self.num_experts_per_token} exceeds num_experts={self.num_experts}"
            )
        if self.num_experts % self.num_expert_group:
            raise ConfigError(
                f"num_experts={self.num_experts} is not divisible by num_expert_group={self.num_expert_group}"
            )
        if self.topk_group > self.num_expert_group:
            raise ConfigError(
                f"topk_group={self.topk_group} exceeds num_expert_group={self.num_expert_group}"
            )
        if self.kda_head_dim > 256:
            raise ConfigError(f"kda_head_dim={self.kda_head_dim}: the KDA kernels support head dims up to 256")
        if self.kda_gate_lower_bound is not None and self.kda_gate_lower_bound >= 0:
            raise ConfigError(
                f"kda_gate_lower_bound={self.kda_gate_lower_bound}: must be negative (e.g. -5.0) or None"
            )
        tp = tensor_parallel_size
        for mixer in mixers.in_config(self):  # each mixer's plan says what it splits over TP
            problem = mixer.plan(self).check_tensor_parallel(tp)
            if problem:
                raise ConfigError(problem)
        if self.vocab_size % tp:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}; pad the vocab"
            )
        if self.num_experts % expert_parallel_size:
            raise ConfigError(
                f"num_experts={self.num_experts} is not divisible by "
                f"expert_model_parallel_size={expert_parallel_size}"
            )
        return self

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def expand_pattern(pattern: str, num_layers: int) -> str:
    """Repeat ``pattern`` to ``num_layers`` symbols; an exact-length pattern is used as is. A partial
    last repeat takes the pattern's last symbols, so a hybrid still ends with its MLA layer
    (``"KKKA"`` on 27 layers: ``KKKA`` x 6 + ``KKA``)."""
    if not pattern:
        raise ConfigError(f"layer_pattern is empty; use the symbols {mixers.known()}, e.g. 'KKKA'")
    known = {m.symbol for m in mixers.registered()}
    bad = sorted(set(pattern) - known)
    if bad:
        raise ConfigError(f"layer_pattern={pattern!r} has unknown symbol(s) {bad}; known symbols: {mixers.known()}")
    if len(pattern) > num_layers:
        raise ConfigError(
            f"layer_pattern={pattern!r} (length {len(pattern)}) is longer than num_layers={num_layers}: give "
            f"one symbol per layer or a shorter pattern, which repeats"
        )
    full, rest = divmod(num_layers, len(pattern))
    return pattern * full + (pattern[-rest:] if rest else "")


def coerce_field(config: ModelConfig, name: str, text: str):
    """Parse a command-line string into the type of ModelConfig field ``name``."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if name not in fields:
        raise ConfigError(f"unknown model config field {name!r}; known fields: {sorted(fields)}")
    current = getattr(config, name)
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    annotation = str(fields[name].type)
    try:
        if isinstance(current, int) or annotation.startswith("int"):
            return int(text)
        if isinstance(current, float) or annotation.startswith("float"):
            return float(text)
    except ValueError as err:
        raise ConfigError(f"{name}={text!r}: {err}") from None
    if isinstance(current, dict):
        return json.loads(text)
    return text
