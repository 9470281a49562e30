"""Layout-invariant initialisation (model/init.py): the counter-based generator, the distribution of
every parameter, equal shared parameters across the arms of the comparison, shard-by-shard memory
at the 48B size. Multi-rank layouts: tests/parallel/test_init_layouts.py; CPU vs GPU:
test_init_gpu.py."""

import math

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from model import init
from model.presets import as_arm, get_preset
from tests.helpers.small_models import mixed_config

N = 1 << 20


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


def build(config, seed: int = 5):
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=seed)  # build_model's default seed
    return build_model(config)


# ---------------------------------------------------------------------------- the generator
def test_normal_statistics():
    index = torch.arange(N)
    z = init.normal(1, "a.weight", index)
    bound = 5 / math.sqrt(N)  # five standard errors
    assert abs(float(z.mean())) < bound and abs(float(z.std()) - 1) < bound
    assert abs(float((z < 1).double().mean()) - 0.841345) < 5 * math.sqrt(0.16 / N)
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 5 * math.sqrt(0.0027 / N)
    assert abs(corr(z[:-1], z[1:])) < bound  # neighbouring elements
    assert abs(corr(z, init.normal(1, "b.weight", index))) < bound  # another tensor
    assert abs(corr(z, init.normal(2, "a.weight", index))) < bound  # another seed
    assert not torch.equal(z, init.normal(1, "a.weight", index + 1))


def test_uniform_statistics_and_high_counter_bits():
    index = torch.arange(N)
    u = init.uniform(3, "k", index)
    assert 0 < float(u.min()) and float(u.max()) < 1
    bound = 5 / math.sqrt(N)
    assert abs(float(u.mean()) - 0.5) < bound / math.sqrt(12) and abs(float(u.var()) - 1 / 12) < bound / 10
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    chi2 = float(((counts - N / 16) ** 2 / (N / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 50
    assert abs(corr(u[:-1], u[1:])) < bound
    # elements 2**32 apart differ only in the counter's high word
    assert abs(corr(u, init.uniform(3, "k", index + 2**32))) < bound


@pytest.mark.parametrize("offset,shape", [((0, 0, 0), (6, 10, 12)), ((2, 5, 0), (3, 5, 12)), ((1, 0, 4), (2, 10, 4)),
                                          ((5, 9, 11), (1, 1, 1)), ((3, 0, 0), (2, 10, 12)), ((0, 4, 0), (6, 3, 12))])
def test_a_shard_alone_equals_the_slice_of_the_whole(offset, shape):
    whole = torch.empty(6, 10, 12)
    init.fill_shard(whole, init.normal_init(0.02), 7, "w", whole.shape, (0, 0, 0))
    shard = torch.empty(shape)
    init.fill_shard(shard, init.normal_init(0.02), 7, "w", whole.shape, offset, chunk=7)  # chunks of any size
    box = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    assert torch.equal(shard, whole[box])
    # a missing leading axis (megatron's expert axis) counts as size 1
    expert = torch.empty(shape[1:])
    init.fill_shard(expert, init.normal_init(0.02), 7, "w", whole.shape, offset, chunk=11)
    assert torch.equal(expert, whole[box][0])


def test_values_are_computed_on_the_cpu_whatever_the_default_device():
    """(so that parameters allocated on a GPU get the CPU's bits: test_init_gpu.py)"""
    expected, local = torch.empty(3, 5), torch.empty(3, 5)
    init.fill_shard(expected, init.normal_init(1.0), 0, "w", (6, 5), (3, 0))
    with torch.device("meta"):
        init.fill_shard(local, init.normal_init(1.0), 0, "w", (6, 5), (3, 0))
    assert torch.equal(local, expected)


# ---------------------------------------------------------------------------- the model
def test_every_parameter_has_its_distribution():
    config = mixed_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256)
    model = build(config)
    std = config.initializer_range
    fc2_std = std / math.sqrt(2 * config.num_layers)
    bound = 1 / math.sqrt(config.short_conv_kernel)
    for name, p in model.named_parameters():
        p = p.detach().double()
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("_conv1d"):
            assert p.abs().max() <= bound and p.std() > bound / 2, name
        elif name.endswith("A_log"):
            assert (p >= 0).all() and (p <= math.log(16)).all() and p.std() > 0.1, name
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in [1e-3, 0.1]
            dt = torch.nn.functional.softplus(p)
            assert (dt >= 1e-3 - 1e-12).all() and (dt <= 0.1 + 1e-12).all() and p.std() > 0.1, name
        else:  # within five standard errors
            expected = fc2_std if name.endswith("linear_fc2.weight") else std
            n = p.numel()
            assert abs(float(p.std()) / expected - 1) < 5 / math.sqrt(2 * n), name
            assert abs(float(p.mean())) < 5 * expected / math.sqrt(n), name
    for name, b in model.named_buffers():
        if name.endswith("expert_bias"):
            assert torch.equal(b, torch.zeros_like(b))


def test_arms_share_the_initial_values_of_shared_parameters():
    """MLA baseline, GDN hybrid and Kimi Linear of one preset differ in their mixers only."""
    base = get_preset("tiny")
    arms = {arm: build(as_arm(base, arm)).state_dict() for arm in ("mla", "gdn-h", "kimi-linear")}
    shared = [n for n in arms["mla"] if ".mixer." not in n and torch.is_tensor(arms["mla"][n])]
    assert {"embedding.weight", "output_layer.weight", "final_norm.weight", "layers.0.ffn.linear_fc1.weight",
            "layers.1.ffn.router.weight", "layers.3.ffn.experts.local_experts.3.linear_fc2.weight"} <= set(shared)
    for name in shared:
        values = [arms[arm][name] for arm in arms]
        assert all(torch.equal(values[0], v) for v in values[1:]), name


def test_seed_changes_every_drawn_parameter():
    a, b = build(mixed_config(), seed=1), build(mixed_config(), seed=2)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if "norm" not in name:
            assert not torch.equal(p, q), name


def test_loading_a_checkpoint_draws_nothing(monkeypatch, tmp_path):
    """load_model_for_inference builds without initialising (its weights are loaded next)."""
    from model.model import build_model
    from train.checkpoint import load_model_for_inference, save_checkpoint

    model = build(mixed_config())
    save_checkpoint(tmp_path, 1, model, None, {"model": mixed_config().to_dict()})

    def forbidden(*args, **kwargs):
        raise AssertionError("initialised weights that are loaded next")

    monkeypatch.setattr(init, "initialize_model", forbidden)
    loaded = load_model_for_inference(tmp_path)
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(AssertionError, match="loaded next"):
        build_model(mixed_config())


# ---------------------------------------------------------------------------- the 48B model
class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage any op creates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_48b_initialises_shard_by_shard():
    """The 48B model's embedding at TP=64 and one routed expert at EP=256: filling a rank's shard
    allocates nothing larger than one chunk of the generator (the full embedding would be 1.5 GB,
    the layer's experts 9.7 GB), and a shard equals its two halves filled as at TP=128."""
    from model.model import KimiLinearModel
    from model.ffn import megatron_config
    from parallel import state

    config = get_preset("kimi-linear-48b-a3b")
    state.initialize(state.ParallelDims())
    with torch.device("meta"):  # the real keys and global shapes of one layer
        layer = KimiLinearModel(config, megatron_config(config), post_process=False, layer_range=range(1, 2))
    shards = {t.key: t for t in init.local_tensors(layer)}
    embedding, experts = shards["embedding.weight"], shards["layers.1.ffn.experts.experts.linear_fc1.weight"]
    assert tuple(embedding.global_shape) == (163840, 2304) and tuple(experts.global_shape) == (256, 2048, 2304)
    chunk_bytes = 8 * init.CHUNK  # an int64 / float64 chunk
    for shard, local_shape, offset in [
        (embedding, (163840 // 64, 2304), (5 * 2560, 0)),
        (experts, (2048, 2304), (77, 0, 0)),  # expert 77 of 256, its [gate; up] matrix
    ]:
        rule = init.parameter_init(shard.key, config)
        local = torch.empty(local_shape)
        with LargestAllocation() as counter:
            init.fill_shard(local, rule, 3, shard.key, shard.global_shape, offset)
        assert counter.largest <= chunk_bytes, counter.largest
        assert counter.largest < local.numel() * 4  # below even one fp32 copy of the shard
        row_axis = len(offset) - 2
        halves = []
        for half in range(2):
            part = torch.empty(local_shape[0] // 2, *local_shape[1:])
            start = list(offset)
            start[row_axis] += half * part.shape[0]
            init.fill_shard(part, rule, 3, shard.key, shard.global_shape, tuple(start))
            halves.append(part)
        assert torch.equal(local, torch.cat(halves))
        assert abs(float(local.std()) / config.initializer_range - 1) < 0.01
