"""The mixer registry (model/mixers.py) and the parallel plans (model/plan.py).

A toy mixer defined here, with its plan, reaches the whole stack through ``mixers.register`` alone:
it trains at TP=2 (with sequence parallelism and Muon) like at TP=1, and its checkpoint, written at
TP=2, resumes at TP=1. Every registered mixer's plan names each of its parameters exactly once, and
an unknown symbol is an error naming the known ones.

Run as a script (under torchrun) this file is the worker of the TP test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import mixers
from model.config import ConfigError, ModelConfig
from model.plan import ParallelPlan, column, head_sharded, norm, replicated, replicated_linear, row
from model.tp import PlannedMixer, reduce_grad_over_tp

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the toy mixer
def _decay_init(config):
    from model.init import uniform_init

    return uniform_init(-1.0, 1.0)


def _ones(config):
    from model.init import constant_init

    return constant_init(1.0)


def toy_plan(config):
    """Every kind of placement: a replicated norm and low-rank linear fed this rank's tokens,
    column- and row-parallel linears, a head-split fp32 tensor, a replicated head-local tensor."""
    heads, dim, hidden = config.num_attention_heads, config.v_head_dim, config.hidden_size
    params = {
        "x_norm": norm(hidden, config.rms_norm_eps),
        "v_proj": column(hidden, heads * dim),
        "f_a_proj": replicated_linear(hidden, dim),
        "f_b_proj": column(dim, heads * dim),
        "decay": head_sharded((heads,), init=_decay_init, keep_fp32=True, weight_decay=False),
        "out_norm_weight": replicated((dim,), head_local=True, init=_ones),
        "o_proj": row(heads * dim, hidden),
    }
    return ParallelPlan(params, "num_attention_heads", heads)


class ToyGatedMixer(PlannedMixer):
    """Per head, a causal sum of the values inside each document with weights
    exp(-softplus(decay) * distance), RMS-normalised and gated by sigmoid of a low-rank gate."""

    def __init__(self, config, tconfig, layer_idx: int):
        super().__init__(config, tconfig, layer_idx, toy_plan(config))
        self.dim, self.eps = config.v_head_dim, config.rms_norm_eps

    def forward(self, hidden, packed, context_parallel=None):
        if context_parallel is not None:
            raise NotImplementedError("the toy mixer has no context-parallel strategy")
        x = self.x_norm(hidden.squeeze(1))  # this rank's tokens under sequence parallelism
        t = packed.num_tokens
        v = self.v_proj(x)[0].view(t, self.local_heads, self.dim)  # the column layers gather the tokens
        gate = self.f_b_proj(self.f_a_proj(x))[0].view(t, self.local_heads, self.dim)
        position = packed.position_in_document.float()
        document = packed.document_ids.reshape(-1)
        visible = (document[:, None] == document[None, :]) & (position[:, None] >= position[None, :])
        distance = (position[:, None] - position[None, :]).clamp_min(0)
        weights = torch.exp(-F.softplus(self.decay)[:, None, None] * distance) * visible  # [H, T, T]
        mixed = torch.einsum("hts,shd->thd", weights, v)
        mixed = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + self.eps)
        y = mixed * reduce_grad_over_tp(self.out_norm_weight) * torch.sigmoid(gate)
        return self.o_proj(y.reshape(t, -1))[0].unsqueeze(1)


def toy_flops(config, doc_lengths, chunk=None):
    heads, dim, d = config.num_attention_heads, config.v_head_dim, config.hidden_size
    tokens = sum(doc_lengths)
    per_token = 2 * d * heads * dim + 2 * d * dim + 2 * dim * heads * dim + 2 * heads * dim * d
    return {"projections": per_token * tokens, "mixing": sum(n * (n + 1) for n in doc_lengths) * heads * dim}


def toy_activations(config):
    return {"split": 4 * config.num_attention_heads * config.v_head_dim, "tokens": config.hidden_size}


TOY = mixers.Mixer(symbol="T", kind="toy", name="toy gated mixer", module=ToyGatedMixer, plan=toy_plan,
                   flops=toy_flops, flops_parts=("projections", "mixing"), activations=toy_activations)


@contextlib.contextmanager
def toy_registered():
    mixers.register(TOY)
    try:
        yield TOY
    finally:
        mixers.unregister(TOY.symbol)


def toy_config(**changes) -> ModelConfig:
    values = dict(name="toy", vocab_size=8192, hidden_size=32, num_layers=2, layer_pattern="T",
                  num_attention_heads=2, v_head_dim=16, first_k_dense=1, intermediate_size=64, num_experts=4,
                  num_experts_per_token=2, moe_intermediate_size=16)
    values.update(changes)
    return ModelConfig(**values)


# ----------------------------------------------------------------------------- the registry
def test_unknown_symbol_is_an_error_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        ModelConfig(layer_pattern="KKX").validate()
    assert "'X'" in str(err.value) or "['X']" in str(err.value)
    for label in ("K (KDA)", "A (MLA)", "G (GDN)"):
        assert label in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown mixer symbol 'T'; known symbols: .*K \(KDA\)"):
        mixers.get("T")
    with pytest.raises(ConfigError, match="unknown mixer kind 'toy'"):
        mixers.of_kind("toy")


def test_registering_a_taken_symbol_or_kind_fails():
    kda = mixers.get("K")
    with pytest.raises(ValueError, match="clashes with the registered K"):
        mixers.register(dataclasses.replace(TOY, symbol="K"))
    with pytest.raises(ValueError, match="clashes with the registered K"):
        mixers.register(dataclasses.replace(TOY, kind="kda"))
    assert mixers.get("K") is kda and "T" not in {m.symbol for m in mixers.registered()}


def test_the_toy_reaches_config_flops_arms_and_export_through_the_registry():
    from model.flops import forward_flops
    from model.hf_names import HFConversionError, check_exportable
    from model.presets import ARMS

    with toy_registered():
        config = toy_config().validate(tensor_parallel_size=2)
        assert config.layer_types == ["toy", "toy"]
        with pytest.raises(ConfigError, match="num_attention_heads=2 is not divisible by tensor_model_parallel_size=4"):
            config.validate(tensor_parallel_size=4)
        parts = forward_flops(config, [10, 6])
        assert parts["toy_mixing"] == 2 * (110 + 42) * 2 * 16 and parts["kda_recurrence"] == 0
        assert parts["toy_projections"] == 2 * 16 * toy_flops(config, [1])["projections"]
        with pytest.raises(HFConversionError, match=r"toy gated mixer \('T'\) layers at 0-based \[0, 1\]"):
            check_exportable(config)
        with pytest.raises(ConfigError, match=r"--cp-mode=chunkwise: the T \(TOY\) layers"):
            mixers.check_context_parallel(config, "chunkwise")
    assert ARMS == ("mla", "gdn-h", "kimi-linear")
    with pytest.raises(ConfigError):
        toy_config().validate()  # unregistered again


@pytest.fixture(scope="module")
def single_process():
    from parallel import state

    state.initialize(state.ParallelDims(), seed=3)


@pytest.mark.parametrize("symbol", ["K", "G", "A", "T"])
def test_every_plan_covers_every_parameter_exactly_once(single_process, symbol):
    """The module built from the plan has exactly the plan's parameters, each with the plan's global
    shape and split, and the marks the training code reads."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from model.ffn import megatron_config
    from model.plan import REPLICATED
    from tests.helpers.small_models import mixed_config

    with toy_registered():
        mixer = mixers.get(symbol)
        config = mixed_config(layer_pattern=symbol, v_head_dim=16)
        module = mixer.build(config, megatron_config(config, sequence_parallel=False), 0)
        plan = mixer.plan(config)
        assert module.plan == plan
        names = [name for name, _ in module.named_parameters()]
        assert len(names) == len(set(names)) and sorted(names) == sorted(plan.parameters())
        for name, param in module.named_parameters():
            entry = plan.parameters()[name]
            assert param.placement == entry and tuple(param.shape) == entry.shape, name
            assert bool(getattr(param, "tensor_model_parallel", False)) == entry.split, name
            if entry.split:
                assert param.partition_dim == entry.axis, name
            assert bool(getattr(param, "keep_fp32", False)) == entry.keep_fp32, name
            assert getattr(param, "no_weight_decay", False) == (not entry.weight_decay), name
            if entry.layout == REPLICATED:
                assert not getattr(param, "sequence_parallel", False), name  # no SP in this build
        shards = {t.key: t for t in module.sharded_state_dict().values() if isinstance(t, ShardedTensor)}
        assert sorted(shards) == sorted(plan.parameters())
        for name, shard in shards.items():
            assert tuple(shard.global_shape) == plan.parameters()[name].shape, name
        assert set(mixer.activations(config)) <= set(mixers.ACTIVATION_KEYS)
        assert set(mixer.flops(config, [7])) == set(mixer.flops_parts)


def test_context_parallel_slots_name_the_functions_in_use():
    """The built-in mixers' slots hold what parallel/context runs for them today, for every mode."""
    import importlib

    from parallel.context import MODES

    for mixer in mixers.registered():
        slot = mixer.plan(toy_config()).context_parallel
        assert set(slot.modes) == set(MODES), mixer.label
        for entries in slot.modes.values():
            for entry in entries:
                module, _, name = entry.partition(":")
                assert callable(getattr(importlib.import_module(module), name)), entry


# ----------------------------------------------------------------------------- TP=2 against TP=1
@pytest.mark.distributed
def test_toy_mixer_trains_at_tp2_like_tp1_and_its_checkpoint_reshards(tmp_path):
    """One launch of two gloo ranks, Muon throughout: 4 steps at TP=1 (two data-parallel replicas),
    saved at steps 2 and 4; 2 steps at TP=2 with sequence parallelism, saved; those resumed at TP=1
    for the last 2 steps. Losses and the weights of both checkpoints (read at TP=1: the TP=2 one
    resharded) match the TP=1 run."""
    from tests.helpers.distributed import torchrun

    torchrun(Path(__file__), 2, tmp_path, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    reference, tp2, resumed = result["tp1"], result["tp2"], result["tp2_then_tp1"]
    assert len(reference) == 4 and len(tp2) == 2 and len(resumed) == 2
    assert reference[-1] < reference[0] - 0.1  # it trains
    diffs = [abs(a - b) for a, b in zip(tp2 + resumed, reference)]
    assert max(diffs) < 2e-4, diffs
    for step, errors in result["weights"].items():
        assert set(errors) >= {"layers.0.mixer.f_a_proj.weight", "layers.1.mixer.decay"}, step
        assert max(errors.values()) < 1e-4, (step, {k: v for k, v in errors.items() if v >= 1e-4})


def _run(workdir: Path, name: str, tp: int, steps: int, **train):
    from train.config import RunConfig, TrainConfig
    from train.loop import train as run_training

    t = TrainConfig(data_cache_dir=str(ROOT / "cache" / "data"), seq_length=32, micro_batch_size=2,
                    global_batch_size=4, train_iters=steps, lr=2e-2, lr_warmup_iters=1, log_interval=100, seed=3,
                    optimizer="muon", tensor_model_parallel_size=tp, keep_last=0, run_dir=str(workdir / name))
    for key, value in train.items():
        setattr(t, key, value)
    return run_training(RunConfig(model=toy_config(), train=t))


def _weight_errors(a: Path, b: Path) -> dict:
    """Relative difference of every parameter of two checkpoints, both read into a TP=1 model."""
    from model.model import build_model
    from train.checkpoint import load_model_state

    models = []
    for path in (a, b):
        models.append(build_model(toy_config(), initialize_weights=False))
        load_model_state(models[-1], path)
    second = dict(models[1].named_parameters())
    return {name: float((p - second[name]).norm() / p.norm()) for name, p in models[0].named_parameters()}


def worker(workdir: Path) -> None:
    import torch.distributed as dist

    mixers.register(TOY)
    reference = _run(workdir, "tp1", 1, 4, save=str(workdir / "reference"), save_interval=2)
    tp2 = _run(workdir, "tp2", 2, 4, exit_interval=2, save=str(workdir / "ckpt"))
    resumed = _run(workdir, "resumed", 1, 4, save=str(workdir / "ckpt"))  # resumes the TP=2 checkpoint
    weights = {step: _weight_errors(workdir / "reference" / step, workdir / "ckpt" / step)
               for step in ("iter_0000002", "iter_0000004")}
    if dist.get_rank() == 0:
        (workdir / "result.json").write_text(json.dumps(
            {"tp1": reference, "tp2": tp2, "tp2_then_tp1": resumed, "weights": weights}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
