"""Small configurations that exercise every layer kind (KDA, GDN, MLA, dense MLP, MoE), and a small
run config for training-loop tests."""

from pathlib import Path

from model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def mixed_config(**changes) -> ModelConfig:
    values = dict(
        name="test-mixed", vocab_size=512, hidden_size=64, num_layers=4, layer_pattern="KAGK",
        kda_num_heads=4, kda_head_dim=16, num_attention_heads=4, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense=1,
        intermediate_size=128, num_experts=4, num_experts_per_token=2, moe_intermediate_size=32,
    )
    values.update(changes)
    return ModelConfig(**values).validate()


def small_run(tmp_path=None, **train):
    """A two-layer (KA) run of 64-token sequences on the embedded corpus in the repository's cache;
    ``train`` sets TrainConfig fields."""
    from train.config import load_run_config

    run = load_run_config("tiny")
    run.model = ModelConfig(name="t", hidden_size=64, num_layers=2, layer_pattern="KA", kda_num_heads=2,
                            kda_head_dim=16, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, num_experts=4,
                            num_experts_per_token=2, moe_intermediate_size=32)
    run.train.data_cache_dir = str(ROOT / "cache" / "data")
    run.train.seq_length = 64
    run.train.micro_batch_size = 2
    run.train.global_batch_size = 4
    run.train.lr_warmup_iters = 2
    run.train.log_interval = 100
    for key, value in train.items():
        setattr(run.train, key, value)
    return run
