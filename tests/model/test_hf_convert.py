"""HF conversion: name map, config mapping, round trips, TP resharding, refusals and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model.hf_names import (
    HFConversionError,
    canonical_hf_names,
    hf_config_from_model_config,
    hf_tensor_specs,
    model_config_from_hf_config,
)
from tests.model import hf_fixtures as fx


# ---------------------------------------------------------------------------- name map and config
def test_name_map_counts_48b():
    """The released checkpoint (docs/architecture.md): 20,493 tensors holding 49,122,681,728 values,
    computed from the config alone."""
    from model.presets import get_preset

    cfg = get_preset("kimi-linear-48b-a3b")
    specs = hf_tensor_specs(cfg)
    assert len(specs) == 20_493
    assert len({s.hf for s in specs}) == 20_493
    assert sum(s.numel for s in specs) == 49_122_681_728
    by_name = {s.hf: s for s in specs}
    assert by_name["model.layers.0.self_attn.A_log"].shape == (1, 1, 32, 1)
    assert by_name["model.layers.0.self_attn.q_conv1d.weight"].shape == (4096, 1, 4)
    assert by_name["model.layers.3.self_attn.kv_b_proj.weight"].shape == (8192, 512)
    assert by_name["model.layers.0.mlp.gate_proj.weight"].shape == (9216, 2304)
    assert by_name["model.layers.26.block_sparse_moe.experts.255.w2.weight"].shape == (2304, 1024)
    assert by_name["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"].shape == (256,)
    assert "model.layers.3.self_attn.q_conv1d.weight" not in by_name  # layer 3 is MLA


def test_config_48b_parsed_by_transformers(tmp_path):
    from transformers import AutoConfig

    from model.presets import get_preset

    cfg = get_preset("kimi-linear-48b-a3b")
    d = hf_config_from_model_config(cfg)
    assert d["linear_attn_config"]["full_attn_layers"] == [4, 8, 12, 16, 20, 24, 27]
    assert d["linear_attn_config"]["kda_layers"] == [i for i in range(1, 27) if i % 4]
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "KimiLinearConfig"
    assert [i for i, t in enumerate(hf.layer_types) if t == "full_attention"] == [3, 7, 11, 15, 19, 23, 26]
    assert hf.mlp_layer_types == ["dense"] + ["sparse"] * 26
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.n_shared_experts) == (256, 8, 1)
    assert (hf.n_group, hf.topk_group, hf.norm_topk_prob, hf.routed_scaling_factor) == (1, 1, True, 2.446)
    assert (hf.linear_num_heads, hf.linear_head_dim, hf.linear_conv_kernel_dim) == (32, 128, 4)
    mla = (hf.kv_lora_rank, hf.q_lora_rank, hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim)
    assert mla == (512, None, 128, 64, 128)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (163584, 163586, 163839)
    assert hf.tie_word_embeddings is False and hf.max_position_embeddings == 1048576
    # transformers' own 48B model (meta device) has exactly our tensors once its runtime names are undone
    from transformers import KimiLinearForCausalLM

    with torch.device("meta"):
        state = KimiLinearForCausalLM(hf).state_dict()
    canonical = canonical_hf_names(state)
    specs = {s.hf: s.shape for s in hf_tensor_specs(cfg)}
    assert set(canonical) == set(specs)
    assert not [k for k, t in canonical.items() if tuple(t.shape) != specs[k]]
    # and back: the same model config
    back = model_config_from_hf_config(d)
    assert {k: v for k, v in back.to_dict().items() if k not in ("name", "extra")} == {
        k: v for k, v in cfg.to_dict().items() if k not in ("name", "extra")
    }


def test_hf_config_errors_name_the_field():
    d = hf_config_from_model_config(fx.small_config())
    for key, value, words in [
        ("q_lora_rank", 64, "q_lora_rank"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("moe_router_activation_func", "softmax", "sigmoid"),
        ("moe_layer_freq", 2, "moe_layer_freq"),
        ("mlp_layer_types", ["sparse", "dense", "sparse", "sparse"], "mlp_layer_types"),
    ]:
        with pytest.raises(HFConversionError, match=words):
            model_config_from_hf_config({**d, key: value})
    grouped = {**d, "num_expert_group": 2, "topk_group": 2}  # top-1 of 2 groups: megatron ranks by top-1
    with pytest.raises(HFConversionError, match="top-2"):
        model_config_from_hf_config(grouped)
    assert model_config_from_hf_config(grouped, allow_group_routing_mismatch=True).num_expert_group == 2


# ---------------------------------------------------------------------------- refusals
def test_gdn_pattern_refused(tmp_path):
    from train.hf_checkpoint import export_checkpoint

    fx.ensure_parallel()
    model = fx.build(fx.small_config(layer_pattern="KGAK"), randomize=False)
    fx.save(model, tmp_path / "ckpt")
    with pytest.raises(HFConversionError, match=r"Gated DeltaNet \('G'\) layers at 0-based \[1\].*no GDN layer"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_other_unrepresentable_models_refused():
    from model.hf_names import check_exportable

    with pytest.raises(HFConversionError, match="kda_gate_lower_bound"):
        check_exportable(fx.small_config(kda_gate_lower_bound=-5.0))
    with pytest.raises(HFConversionError, match="top-2"):
        check_exportable(fx.small_config(num_expert_group=2, topk_group=2, num_experts_per_token=2))
    check_exportable(fx.small_config(num_expert_group=2, topk_group=1, num_experts_per_token=2))  # same rule
    with pytest.raises(HFConversionError, match="kv_a_layernorm"):
        check_exportable(fx.small_config(kv_norm_eps=1e-5))


# ---------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A TP=1 checkpoint of a randomised small model."""
    fx.ensure_parallel()
    root = tmp_path_factory.mktemp("ckpt")
    model = fx.build(fx.small_config(), seed=11)
    fx.save(model, root)
    return root, {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_round_trip_bit_exact_through_clis(checkpoint, tmp_path):
    """ours -> HF (convert_to_hf.py) -> ours (convert_from_hf.py): every tensor equal."""
    from train.checkpoint import load_model_for_inference

    root, original = checkpoint
    env = fx.clean_env()
    for cmd in (
        ["launch/convert_to_hf.py", "--load", str(root), "--out", str(tmp_path / "hf"), "--dtype", "float32"],
        ["launch/convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")],
    ):
        result = subprocess.run(
            [sys.executable, *cmd], cwd=fx.ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()  # one file below --max-shard-size
    assert (tmp_path / "back" / "run.json").exists()
    # pretrain.py --config SAVE/run.json --load SAVE accepts it (same model config)
    from train.checkpoint import check_model_config, read_meta, resolve
    from train.config import load_run_config

    path = resolve(tmp_path / "back")
    assert path.name == "iter_0000000" and read_meta(path)["step"] == 0
    check_model_config(read_meta(path)["model"], load_run_config(str(tmp_path / "back" / "run.json")).model, path)
    fx.ensure_parallel()
    back = load_model_for_inference(tmp_path / "back").state_dict()
    assert back.keys() >= original.keys()
    for name, value in original.items():
        assert back[name].dtype == value.dtype, name
        assert torch.equal(back[name], value), name


def test_bf16_export_dtypes_and_sharding(checkpoint, tmp_path):
    from train.hf_checkpoint import export_checkpoint

    root, original = checkpoint
    export_checkpoint(root, tmp_path / "hf", dtype="bfloat16", max_shard_size="60KB", progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) > 2
    tensors = fx.read_safetensors_folder(tmp_path / "hf")
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    fp32 = ("A_log", "dt_bias", "gate.weight", "e_score_correction_bias")
    for name, t in tensors.items():
        assert t.dtype == (torch.float32 if name.endswith(fp32) else torch.bfloat16), name
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"],
                       original["layers.1.ffn.router.expert_bias"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "kimi_linear"


def test_import_accepts_runtime_names(tmp_path):
    """transformers' in-memory names (conv1d, forget_gate, experts.gate_up_proj, mlp.gate) import the same."""
    from safetensors.torch import save_file

    from model.hf_export import HFFolder, load_hf_weights_into
    from model.model import build_model

    fx.ensure_parallel()
    hf = fx.random_hf_model(seed=9)
    hf.save_pretrained(str(tmp_path / "saved"))
    runtime = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.self_attn.conv1d.weight" in runtime and "model.layers.1.mlp.experts.gate_up_proj" in runtime
    (tmp_path / "runtime").mkdir()
    save_file(runtime, str(tmp_path / "runtime" / "model.safetensors"))
    (tmp_path / "runtime" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())

    states = []
    for folder in ("saved", "runtime"):
        source = HFFolder(tmp_path / folder)
        config = model_config_from_hf_config(source.config)
        model = build_model(config)
        load_hf_weights_into(model, config, source, progress=False)
        states.append(model.state_dict())
    for name, value in states[0].items():
        if torch.is_tensor(value):
            assert torch.equal(value, states[1][name]), name
    renamed = canonical_hf_names({"model.layers.0.self_attn.forget_gate.A_log": 0})
    assert set(renamed) == {"model.layers.0.self_attn.A_log"}


@pytest.mark.distributed
def test_tp2_export_equals_tp1_export(tmp_path):
    """A checkpoint saved by 2 TP ranks exports bit-identically to the same model saved at TP=1."""
    from train.hf_checkpoint import export_checkpoint

    config = fx.small_config()
    fx.torchrun_save(config, tmp_path / "tp2", tp=2, seed=7)
    fx.ensure_parallel()
    fx.save(fx.build(config, seed=7), tmp_path / "tp1")
    export_checkpoint(tmp_path / "tp2", tmp_path / "hf2", dtype="float32", progress=False)
    export_checkpoint(tmp_path / "tp1", tmp_path / "hf1", dtype="float32", progress=False)
    a, b = fx.read_safetensors_folder(tmp_path / "hf2"), fx.read_safetensors_folder(tmp_path / "hf1")
    assert a.keys() == b.keys() and len(a) == len(hf_tensor_specs(config))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]


# ---------------------------------------------------------------------------- clear errors
def test_corrupt_checkpoint_clear_error(checkpoint, tmp_path):
    import shutil

    from train.hf_checkpoint import export_checkpoint
    from train.checkpoint import CheckpointError

    root, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    step = bad / "iter_0000001"
    biggest = max((p for p in (step / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        export_checkpoint(bad, tmp_path / "hf", progress=False)

    wrong = tmp_path / "wrong"
    shutil.copytree(root, wrong)
    meta = json.loads((wrong / "iter_0000001" / "meta.json").read_text())
    meta["model"]["hidden_size"] = 96
    (wrong / "iter_0000001" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="iter_0000001"):
        export_checkpoint(wrong, tmp_path / "hf", progress=False)

    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "hf", progress=False)


def test_bad_hf_folder_clear_errors(checkpoint, tmp_path):
    from train.hf_checkpoint import export_checkpoint, import_hf_folder

    root, _ = checkpoint
    export_checkpoint(root, tmp_path / "hf", dtype="float32", progress=False)
    file = tmp_path / "hf" / "model.safetensors"
    data = file.read_bytes()

    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFConversionError, match="corrupt or truncated"):
        import_hf_folder(tmp_path / "hf", tmp_path / "out", progress=False)

    from safetensors.torch import load_file, save_file

    file.write_bytes(data)
    tensors = load_file(str(file))
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(HFConversionError, match="kv_b_proj"):
        import_hf_folder(tmp_path / "hf", tmp_path / "out", progress=False)

    file.write_bytes(data)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["linear_attn_config"]["num_heads"] = 4  # the tensors hold 2 heads
    config.pop("layer_types")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFConversionError, match=r"q_proj.weight has shape \(32, 64\), expected \(64, 64\)"):
        import_hf_folder(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
