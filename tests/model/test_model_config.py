"""Config validation, presets and the released model's exact size."""

import pytest
import torch

from model.config import ConfigError, ModelConfig, expand_pattern
from model.presets import KIMI_48B_PATTERN, PRESETS, as_arm, get_preset, hybrid_pattern


def test_released_layout():
    cfg = get_preset("kimi-linear-48b-a3b")
    mla = [i for i, t in enumerate(cfg.layer_types) if t == "mla"]
    assert mla == [3, 7, 11, 15, 19, 23, 26]
    assert cfg.ffn_types[0] == "dense" and set(cfg.ffn_types[1:]) == {"moe"}
    assert KIMI_48B_PATTERN == "KKKA" * 6 + "KKA"


def test_48b_parameter_count_on_meta_device():
    from model.model import build_model, count_parameters
    from parallel import state

    state.initialize(state.ParallelDims())
    with torch.device("meta"):
        model = build_model(get_preset("kimi-linear-48b-a3b"), initialize_weights=False)
    assert count_parameters(model) == 49_122_681_728


def test_small_preset_size():
    """docs/presets.md: 208,184,200 parameters (within the 100-300M of a one-GPU comparison), the
    scaling presets' widths."""
    from model.hf_names import hf_tensor_specs

    small, scaling = get_preset("small"), get_preset("scaling-653m")
    assert sum(s.numel for s in hf_tensor_specs(small)) == 208_184_200
    same = ("kda_head_dim", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts",
            "num_experts_per_token", "num_shared_experts", "vocab_size", "first_k_dense")
    assert {k: getattr(small, k) for k in same} == {k: getattr(scaling, k) for k in same}
    assert small.intermediate_size == 4 * small.hidden_size and small.layer_pattern == "KKKA" * 3


def test_scaling_presets_have_paper_shapes():
    for name, heads, layers, hidden in [("scaling-653m", 16, 16, 1216), ("scaling-1.7b", 24, 24, 1776)]:
        cfg = get_preset(name).validate()
        assert (cfg.kda_num_heads, cfg.num_layers, cfg.hidden_size) == (heads, layers, hidden)
        assert (cfg.num_experts, cfg.num_experts_per_token) == (64, 8)
    for name in PRESETS:
        get_preset(name).validate()


def test_pattern_expansion_and_arms():
    assert expand_pattern("KKKA", 8) == "KKKAKKKA"
    assert hybrid_pattern(18) == "KKKA" * 4 + "KA"


def test_a_shorter_pattern_repeats_and_ends_with_its_tail():
    """README: a pattern shorter than the model repeats, also when its length does not divide the
    layers: the last, partial repeat is the pattern's tail, so KKKA on 27 layers is the released model."""
    assert expand_pattern("KKKA", 27) == KIMI_48B_PATTERN == "KKKA" * 6 + "KKA"
    assert expand_pattern("GGGA", 6) == "GGGAGA"
    assert expand_pattern("KA", 3) == "KAA"
    assert expand_pattern("A", 5) == "AAAAA"
    released = get_preset("kimi-linear-48b-a3b")
    assert released.replace(layer_pattern="KKKA").validate().layer_types == released.layer_types
    scaling = get_preset("scaling-878m")  # 18 layers: KKKA x 4 + KA
    assert scaling.replace(layer_pattern="KKKA").layer_types == scaling.layer_types
    cfg = get_preset("scaling-653m")
    assert as_arm(cfg, "mla").layer_types == ["mla"] * 16
    gdn = as_arm(cfg, "gdn-h")
    assert gdn.layer_types.count("gdn") == 12 and gdn.layer_types.count("mla") == 4
    assert as_arm(gdn, "kimi-linear").layer_types == cfg.layer_types
    # identical everything else
    assert {k: v for k, v in gdn.to_dict().items() if k not in ("layer_pattern", "name")} == {
        k: v for k, v in cfg.to_dict().items() if k not in ("layer_pattern", "name")
    }


@pytest.mark.parametrize(
    "changes,tp,needle",
    [
        (dict(layer_pattern="KKX"), 1, "unknown symbol"),
        (dict(layer_pattern="KKKAK", num_layers=4), 1, "is longer than num_layers=4"),
        (dict(kda_num_heads=3), 2, "kda_num_heads=3 is not divisible by tensor_model_parallel_size=2"),
        (dict(num_attention_heads=3), 2, "num_attention_heads=3"),
        (dict(num_experts_per_token=9, num_experts=8), 1, "num_experts_per_token=9"),
        (dict(hidden_size=0), 1, "hidden_size=0"),
        (dict(first_k_dense=9), 1, "first_k_dense=9"),
        (dict(kda_gate_lower_bound=1.0), 1, "kda_gate_lower_bound"),
        (dict(kda_head_dim=512), 1, "kda_head_dim=512"),
    ],
)
def test_validation_errors_name_the_field(changes, tp, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig(**changes).validate(tensor_parallel_size=tp)


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("kimi-linear-1t")


def test_run_config_overrides(tmp_path):
    from train.config import apply_override, load_run_config

    run = load_run_config("tiny")
    apply_override(run, "train.lr=1e-4")
    apply_override(run, "layer_pattern=GGGA")
    apply_override(run, "model.kda_gate_lower_bound=-5")
    assert run.train.lr == 1e-4 and run.model.layer_pattern == "GGGA" and run.model.kda_gate_lower_bound == -5.0
    # list fields: numbers stay numbers (weights), relative paths stay paths even when they start like one
    apply_override(run, "train.data_prefixes=0.3,.data/a,0.7,../b,-c")
    assert run.train.data_prefixes == [0.3, ".data/a", 0.7, "../b", "-c"]
    with pytest.raises(ConfigError, match="unknown field"):
        apply_override(run, "hidden=3")
    path = tmp_path / "run.json"
    path.write_text('{"preset": "tiny", "model": {"hidden_size": 96}, "train": {"seq_length": 64}}')
    run = load_run_config(str(path))
    assert run.model.hidden_size == 96 and run.train.seq_length == 64
    path.write_text('{"preset": "tiny", "train": {"seq_lenght": 64}}')
    with pytest.raises(ConfigError, match="seq_lenght"):
        load_run_config(str(path))
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        run = load_run_config("tiny")
        run.train.global_batch_size = 6
        run.validate(world_size=2)
