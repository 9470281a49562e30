"""Training FLOPs against hand counts, varlen behaviour, and MFU."""

import pytest
import torch

from model.config import ModelConfig
from train.flops import mfu, model_flops_per_step, peak_flops_per_gpu

# layer 0: KDA + dense SwiGLU, layer 1: MLA + MoE
TWO_LAYERS = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=2, layer_pattern="KA", first_k_dense=1,
    kda_num_heads=2, kda_head_dim=16, short_conv_kernel=4,
    num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    intermediate_size=128, num_experts=4, num_experts_per_token=2, moe_intermediate_size=32,
    num_shared_experts=1,
)

# ---- hand count, forward FLOPs per token (d = 64) ----
KDA_PROJ = (
    3 * 2 * 64 * 32  # q, k, v: 64 -> 2 heads x 16          12288
    + 2 * 64 * 16 + 2 * 16 * 32  # f_a 64->16, f_b 16->32    2048 + 1024
    + 2 * 64 * 2  # beta 64 -> 2 heads                         256
    + 2 * 64 * 16 + 2 * 16 * 32  # g_a, g_b                  2048 + 1024
    + 2 * 32 * 64  # o_proj                                   4096
    + 3 * 2 * 4 * 32  # three width-4 depthwise convs on 32 channels   768
)
DENSE = 3 * 2 * 64 * 128  # gate, up, down                    49152
MLA_PROJ = (
    2 * 64 * 2 * 24  # q_proj: 2 heads x (16 nope + 8 rope)  6144
    + 2 * 64 * 40  # kv_a: 32 latent + 8 k_rot               5120
    + 2 * 32 * 2 * 32  # kv_b: 2 heads x (16 k_nope + 16 v)   4096
    + 2 * 32 * 64  # o_proj                                   4096
)
ROUTER = 2 * 64 * 4  # 512
EXPERTS = (2 + 1) * 3 * 2 * 64 * 32  # top-2 + 1 shared, SwiGLU 64 -> 32   36864
LM_HEAD = 2 * 64 * 512  # 65536
PER_TOKEN = KDA_PROJ + DENSE + MLA_PROJ + ROUTER + EXPERTS + LM_HEAD
# MLA attention per causal pair: logits 2 x 2 heads x 24, values 2 x 2 heads x 16 = 160
PAIR = 2 * 2 * 24 + 2 * 2 * 16


def kda_chunk(c, dh=16):
    """The tech report's chunkwise count for one chunk of length c (T = C = c), one head."""
    return 6 * c * dh * dh + 3 * c * c * dh + c**3


def test_hand_count_one_document_of_100():
    assert KDA_PROJ == 23552 and MLA_PROJ == 19456 and PER_TOKEN == 195072
    out = model_flops_per_step(TWO_LAYERS, doc_lengths=[100])
    assert out["tokens"] == 100
    # KDA: one full chunk of 64 and one of 36, 2 heads: 2 x (557056 + 164160)
    assert kda_chunk(64) == 98304 + 196608 + 262144 and kda_chunk(36) == 55296 + 62208 + 46656
    recurrence = 2 * (557056 + 164160)
    attention = 100 * 100 // 2 * PAIR  # 5000 pairs x 160 = 800000
    assert out["kda_recurrence"] == 3 * recurrence
    assert out["mla_attention"] == 3 * attention == 3 * 800000
    assert out["kda_projections"] == 3 * 100 * KDA_PROJ
    assert out["dense_mlp"] == 3 * 100 * DENSE and out["mla_projections"] == 3 * 100 * MLA_PROJ
    assert out["moe_router"] == 3 * 100 * ROUTER and out["moe_experts"] == 3 * 100 * EXPERTS
    assert out["lm_head"] == 3 * 100 * LM_HEAD and out["embedding"] == 0
    assert out["gdn_projections"] == 0 == out["gdn_recurrence"]
    assert out["total"] == 3 * (19_507_200 + 800_000 + 1_442_432) == 65_248_896
    assert model_flops_per_step(TWO_LAYERS, doc_lengths=[100], training=False)["total"] == 21_749_632


def test_two_documents_of_50_vs_one_of_100():
    one = model_flops_per_step(TWO_LAYERS, doc_lengths=[100])
    two = model_flops_per_step(TWO_LAYERS, doc_lengths=[50, 50])
    # attention: 2 x 50^2/2 = 2500 pairs vs 5000: exactly half
    assert two["mla_attention"] * 2 == one["mla_attention"]
    # KDA: two partial chunks of 50 per head instead of 64 + 36
    assert two["kda_recurrence"] == 3 * 2 * 2 * kda_chunk(50) == 3 * 1_287_200
    for key in ("kda_projections", "mla_projections", "dense_mlp", "moe_router", "moe_experts", "lm_head"):
        assert two[key] == one[key]
    assert two["total"] == 3 * (19_507_200 + 400_000 + 1_287_200)
    # the loader's cu_seqlens (per micro-batch) give the same documents
    cu = [torch.tensor([0, 50, 100], dtype=torch.int32)]
    assert model_flops_per_step(TWO_LAYERS, cu_seqlens_list=cu) == two
    # no document information: one document per sample
    assert model_flops_per_step(TWO_LAYERS, seq_length=100, micro_batch_size=1) == one
    four = model_flops_per_step(TWO_LAYERS, seq_length=100, micro_batch_size=2, num_micro_batches=2)
    assert four["total"] == 4 * one["total"] and four["tokens"] == 400


def test_gdn_layers_and_chunk_multiples():
    gdn = TWO_LAYERS.replace(layer_pattern="GA")
    out = model_flops_per_step(gdn, doc_lengths=[128], training=False)
    # GDN: forget-gate up-projection 16 -> 2 (one decay per head) instead of 16 -> 32
    assert out["gdn_projections"] == 128 * (KDA_PROJ - 2 * 16 * 32 + 2 * 16 * 2)
    # documents that are chunk multiples: exactly TR Eq. 13 with T = 128, C = 64, per head
    assert out["gdn_recurrence"] == 2 * (6 * 128 * 16**2 + 3 * 128 * 64 * 16 + 128 * 64**2)
    assert out["kda_recurrence"] == 0


def test_48b_matmul_flops_are_six_times_the_active_parameters():
    """Without attention/recurrence, training FLOPs per token = 6 x the active weights used in
    matmuls and convs; counts from docs/architecture.md minus the vectors (dt_bias, A_log, o_norm,
    kv_a_layernorm, router bias): KDA 20 x 39,510,016, MLA 7 x 29,114,368, dense 63,700,992,
    routers 26 x 256 x 2304, shared 184,025,088, routed 26 x 8 x 7,077,888, LM head 377,487,360."""
    from model.presets import get_preset

    config = get_preset("kimi-linear-48b-a3b")
    out = model_flops_per_step(config, doc_lengths=[4096])
    linear = out["total"] - out["kda_recurrence"] - out["mla_attention"]
    assert linear == 6 * 3_106_750_464 * 4096


def test_mfu_and_peaks():
    assert mfu(989e12 * 8 * 0.5 * 2.0, 2.0, 8, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None
    assert peak_flops_per_gpu("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_gpu("NVIDIA H200") == 989e12
    assert peak_flops_per_gpu("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_gpu("Some Other Accelerator") is None
    if not torch.cuda.is_available():
        assert peak_flops_per_gpu() is None
