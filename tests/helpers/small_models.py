"""Small configurations that exercise every layer kind (KDA, GDN, MLA, dense MLP, MoE)."""

from model.config import ModelConfig


def mixed_config(**changes) -> ModelConfig:
    values = dict(
        name="test-mixed", vocab_size=512, hidden_size=64, num_layers=4, layer_pattern="KAGK",
        kda_num_heads=4, kda_head_dim=16, num_attention_heads=4, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense=1,
        intermediate_size=128, num_experts=4, num_experts_per_token=2, moe_intermediate_size=32,
    )
    values.update(changes)
    return ModelConfig(**values).validate()
