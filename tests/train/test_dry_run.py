"""``launch/pretrain.py --dry-run``: the model on the meta device (nothing allocated), its size and
layout, and a memory estimate whose parameter and optimizer accounting matches real runs."""

import json
import resource
from pathlib import Path

import pytest
import torch

from model.presets import get_preset
from tests.helpers.distributed import torchrun
from train.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def test_48b_dry_run_prints_its_size_without_allocating(capsys):
    """49,122,681,728 parameters (docs/architecture.md), about 3.48 B activated per token (2.73 B without
    embedding and LM head); the fp32 weights would be 196 GB, one MoE layer's experts 7 GB."""
    from launch.pretrain import main

    before = _peak_rss_gib()
    assert main(["--config", "kimi-linear-48b-a3b", "--dry-run", "--tensor-model-parallel-size", "8",
                 "--expert-model-parallel-size", "8", "--seq-length", "4096", "--micro-batch-size", "1",
                 "--global-batch-size", "64", "--bf16"]) == 0
    assert _peak_rss_gib() - before < 2.0
    out = capsys.readouterr().out
    assert "parameters: 49,122,681,728 total, 3,484,459,904 activated per token (2,729,485,184 without" in out
    assert "layers: " + "KKKA" * 6 + "KKA" in out
    rows = [line.split() for line in out.splitlines() if line.split()[2:3] in (["moe"], ["dense"])]
    assert [r[1] for r in rows] == ["kda", "kda", "kda", "mla"] * 6 + ["kda", "kda", "mla"]
    assert [r[2] for r in rows] == ["dense"] + ["moe"] * 26
    # the smallest world for TP 8 x EP 8: expert parallelism splits the 8 data-parallel ranks
    assert "layout: 64 GPUs = TP 8 x PP 1 x CP 1 x DP 8 (EP 8, expert DP 1); sequence parallel on" in out
    assert "training FLOPs per token:" in out and "memory per GPU" in out


def test_dry_run_builds_on_meta_and_counts_per_layer():
    from model.model import build_model, count_parameters
    from parallel import state
    from train.dry_run import dry_run

    run = load_run_config("tiny")
    report = dry_run(run)
    assert report.on_meta
    state.initialize(state.ParallelDims())
    model = build_model(get_preset("tiny"))  # a real model, for the reference counts
    assert report.total_parameters == count_parameters(model)
    assert [x["parameters"] for x in report.layers] == [count_parameters(layer) for layer in model.layers]
    config = run.model
    routed = 3 * config.hidden_size * config.moe_intermediate_size * (config.num_experts - config.num_experts_per_token)
    assert report.activated_parameters == report.total_parameters - routed * config.ffn_types.count("moe")


@pytest.mark.distributed
def test_parameters_per_gpu_match_real_layouts(tmp_path):
    """The dry run's parameters per GPU equal those of models built at TP2, PP2, PP2 x VPP2 and EP2;
    at TP2 and EP2 its weight, gradient and optimizer-state bytes (bf16, fp32 masters, AdamW and
    Muon) equal those of the real tensors after a step on every rank."""
    from train.dry_run import dry_run

    torchrun(Path(__file__).parent / "dry_run_worker.py", 2, tmp_path / "counts.json")
    measured = json.loads((tmp_path / "counts.json").read_text())
    flags = {"tp2": dict(tensor_model_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2),
             "vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
             "ep2": dict(expert_model_parallel_size=2)}
    for layout, fields in flags.items():
        run = load_run_config("tiny")
        for key, value in fields.items():
            setattr(run.train, key, value)
        report = dry_run(run, world_size=2)
        for row in (r for r in measured if r["layout"] == layout and "parameters" in r):
            assert report.memory[row["pipeline_rank"]].parameters == row["parameters"], (layout, row)
        for optimizer in ("adamw", "muon"):
            run.train.bf16, run.train.optimizer = True, optimizer
            estimate = dry_run(run, world_size=2).memory[0]
            rows = [r for r in measured if r["layout"] == layout and r.get("optimizer") == optimizer]
            assert len(rows) == (2 if layout in ("tp2", "ep2") else 0)
            for row in rows:
                assert (estimate.weights, estimate.grads, estimate.optimizer) == (
                    row["weights"], row["grads"], row["optimizer_bytes"]), (layout, row)


@pytest.mark.parametrize("optimizer,bf16", [("adamw", False), ("adamw", True), ("muon", True)])
def test_weights_grads_and_optimizer_state_match_a_real_step(optimizer, bf16):
    """Bytes of the weights, the gradients and the optimizer state (with fp32 masters) after a real
    optimizer step of the tiny model equal the dry run's accounting."""
    from model.model import build_model
    from parallel import state
    from train.dry_run import dry_run
    from train.optim import build_optimizer
    from train.precision import MasterWeights, to_bf16

    run = load_run_config("tiny")
    run.train.optimizer, run.train.bf16 = optimizer, bf16
    estimate = dry_run(run).memory[0]
    state.initialize(state.ParallelDims())
    model = build_model(run.model)
    if bf16:
        to_bf16(model)
    inner = build_optimizer(model, run.train)
    opt = MasterWeights(inner) if bf16 else inner
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    grads = sum(p.grad.nbytes for p in model.parameters())
    opt.step()
    state_bytes = sum(v.nbytes for s in inner.state.values() for k, v in s.items()
                      if torch.is_tensor(v) and k != "step")
    masters = sum(m.nbytes for m in opt.masters.values()) if bf16 else 0
    assert estimate.weights == sum(p.nbytes for p in model.parameters())
    assert estimate.grads == grads
    assert estimate.optimizer == state_bytes + masters


def test_activation_estimate_follows_recompute_and_pipeline():
    from train.dry_run import dry_run

    def activations(**train):
        run = load_run_config("scaling-653m")
        run.train.seq_length, run.train.micro_batch_size, run.train.global_batch_size = 4096, 1, 8
        for key, value in train.items():
            setattr(run.train, key, value)
        return [m.activations for m in dry_run(run, world_size=train.get("pipeline_model_parallel_size", 1)).memory]

    (plain,) = activations()
    (recomputed,) = activations(recompute_layers="all")
    assert recomputed < plain / 2
    first, last = activations(pipeline_model_parallel_size=2)
    assert first > plain / 2 * 1.5  # two micro-batches in flight on the first of two stages


def test_context_parallel_splits_the_activations_and_the_optimizer_shards():
    """Under CP each rank keeps its slice's activations (ulysses: exactly half at CP 2; chunkwise: more,
    the keys MLA gathers and KDA's state pairs); the distributed optimizer shards over DP x CP."""
    from train.dry_run import dry_run

    def memory(cp, mode="ulysses"):
        run = load_run_config("scaling-653m")
        run.train.seq_length, run.train.micro_batch_size, run.train.global_batch_size = 4096, 1, 8
        run.train.context_parallel_size, run.train.distributed_optimizer, run.train.cp_mode = cp, True, mode
        return dry_run(run, world_size=2).memory[0]

    dp2, cp2 = memory(1), memory(2)
    assert cp2.activations == pytest.approx(dp2.activations / 2)
    assert memory(2, "chunkwise").activations > cp2.activations
    assert cp2.optimizer == pytest.approx(dp2.optimizer) and cp2.weights == dp2.weights


def test_dry_run_refuses_a_layout_that_does_not_fit(capsys):
    from launch.pretrain import main

    assert main(["--config", "tiny", "--dry-run", "--tensor-model-parallel-size", "3"]) == 2
    assert "kda_num_heads=2 is not divisible by tensor_model_parallel_size=3" in capsys.readouterr().err
    assert main(["--config", "tiny", "--dry-run", "--set", "distributed_optimizer=true",
                 "--set", "optimizer=muon"]) == 2
    assert "distributed_optimizer=true works with train.optimizer=adamw" in capsys.readouterr().err
