"""Our model vs transformers' KimiLinearForCausalLM on the same weights (fp32, CPU), both directions.

Rows are single documents (HF does not reset state at document boundaries) of 80 tokens, so the
chunked KDA of both sides crosses a 64-token chunk boundary. Routers have nonzero expert biases that
change the selected experts, so a dropped or misplaced e_score_correction_bias fails the test.
"""

from __future__ import annotations

import pytest
import torch

from tests.model import hf_fixtures as fx

TOL = 1e-4


def _load_hf(folder):
    from transformers import KimiLinearForCausalLM

    model, info = KimiLinearForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    # a tensor transformers did not find would be silently random: the comparison would mean nothing
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("shared", [1, 0], ids=["shared-expert", "no-shared-expert"])
def test_export_matches_transformers(tmp_path, shared):
    from model.hf_export import export_model

    fx.ensure_parallel()
    ours = fx.build(fx.small_config(num_shared_experts=shared), seed=3)
    # small shards: the folder is loaded through model.safetensors.index.json
    export_model(ours, tmp_path / "hf", dtype="float32", max_shard_size="100KB", progress=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = _load_hf(tmp_path / "hf")
    assert hf.config.layer_types == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    assert hf.config.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]

    tokens = fx.tokens(seed=1)
    with torch.no_grad():
        expected = ours(tokens)
    got = _hf_logits(hf, tokens)
    err = fx.rel_err(got, expected)
    print(f"export parity: relative error (Frobenius) {err:.2e}")
    assert err < TOL, err

    # the expert bias really decides the routing here: without it, HF's logits move far off
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
    assert fx.rel_err(_hf_logits(hf, tokens), expected) > 1e-3


def test_import_from_transformers_matches(tmp_path):
    from train.hf_checkpoint import import_hf_folder
    from train.checkpoint import load_model_for_inference

    fx.ensure_parallel()
    hf = fx.random_hf_model(seed=5)
    hf.save_pretrained(str(tmp_path / "hf"))
    path = import_hf_folder(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert path.name == "iter_0000000"
    ours = load_model_for_inference(tmp_path / "ckpt")
    assert ours.model_config.layer_pattern == "KAKA"
    assert ours.model_config.first_k_dense == 1

    tokens = fx.tokens(seed=2)
    with torch.no_grad():
        got = ours(tokens)
    expected = _hf_logits(hf, tokens)
    err = fx.rel_err(got, expected)
    print(f"import parity: relative error (Frobenius) {err:.2e}")
    assert err < TOL, err
