"""Shared helpers of the HF conversion tests (tests/model/test_hf_*.py).

Run as a script under torchrun it saves a checkpoint of a freshly built model at a given
tensor-parallel size (the TP=2 export test):

    torchrun --nproc-per-node 2 tests/model/hf_fixtures.py --config CFG.json --save DIR --tp 2 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub (kernels fall back to PyTorch)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402

SEQ = 80  # crosses the 64-token chunk boundary of both KDA implementations


def small_config(**changes) -> ModelConfig:
    """KDA and MLA layers, a dense first layer, MoE after it (8 experts, top-2, one shared)."""
    from tests.helpers.small_models import mixed_config

    values = dict(
        name="hf-test", layer_pattern="KKAK", kda_num_heads=2, num_attention_heads=2, intermediate_size=96,
        num_experts=8, num_shared_experts=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(changes)
    return mixed_config(**values)


def ensure_parallel() -> None:
    """Single-process megatron parallel state (gloo) for in-process tests."""
    from megatron.core import parallel_state

    from parallel import state

    if not parallel_state.model_parallel_is_initialized():
        state.initialize(state.ParallelDims())


def seed_all(seed: int) -> None:
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build(config: ModelConfig, seed: int = 0, randomize: bool = True):
    """Our model at the current parallel layout; ``randomize`` makes routing and norms nontrivial."""
    from model.model import build_model

    seed_all(seed)
    model = build_model(config, seed=seed)
    if randomize:
        randomize_(model, seed)
    return model.eval()


def _perturb_routing_and_norms(model, gen, bias_suffix: str, router_suffix: str) -> None:
    """Nonzero expert biases (they decide the selection), sharper routers, non-unit norm weights."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(bias_suffix):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.3)
        for name, param in model.named_parameters():
            if name.endswith(router_suffix):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "norm" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def randomize_(model, seed: int = 0) -> None:
    """Our model with nonzero expert biases, sharper routers and non-unit norm weights."""
    _perturb_routing_and_norms(model, torch.Generator().manual_seed(seed + 1000), "expert_bias", "router.weight")


def tokens(batch: int = 2, seq: int = SEQ, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def save(model, root, step: int = 1) -> Path:
    from train.checkpoint import save_checkpoint

    return save_checkpoint(root, step, model, None, {"model": model.model_config.to_dict()})


def hf_small_config():
    """A KimiLinearConfig matching small_config's shapes, built the way a user would."""
    from transformers import KimiLinearConfig

    return KimiLinearConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
        num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.446, norm_topk_prob=True, rms_norm_eps=1e-5,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        linear_attn_config={"num_heads": 2, "head_dim": 16, "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def random_hf_model(seed: int = 0):
    """transformers' KimiLinearForCausalLM with random weights, a nonzero routing bias and norms."""
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(hf_small_config()).eval()
    _perturb_routing_and_norms(model, torch.Generator().manual_seed(seed + 2000), "e_score_correction_bias",
                               "gate.weight")
    return model


def read_safetensors_folder(folder) -> dict:
    """Every tensor of an HF folder (all shards)."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def clean_env() -> dict:
    """The environment for a child process: without this process's torch.distributed variables."""
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def torchrun_save(config: ModelConfig, save_dir, tp: int, seed: int, timeout: int = 240) -> None:
    """Build ``config`` at tensor-parallel size ``tp`` in ``tp`` gloo ranks and save a checkpoint."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg_file = Path(save_dir).with_suffix(".config.json")
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(config.to_dict()))
    env = clean_env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", f"--master-port={port}",
        str(Path(__file__).resolve()), "--config", str(cfg_file), "--save", str(save_dir),
        "--tp", str(tp), "--seed", str(seed),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from parallel import state

    state.initialize(state.ParallelDims(tensor=args.tp), seed=args.seed)
    config = ModelConfig.from_dict(json.loads(Path(args.config).read_text()))
    model = build(config, seed=args.seed)
    save(model, args.save)
    state.destroy()


if __name__ == "__main__":
    _worker_main()
