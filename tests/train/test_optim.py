"""Muon + AdamW, parameter-group rules, TP-sharded orthogonalisation, and QK-Clip (MuonClip).

References are independent: a float64 Newton-Schulz written out here, hand-applied update rules,
torch's own AdamW, float64 attention logits recomputed from the MLA weights.
"""

import math
import re
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from train.muon import MatrixSpec, Muon, newton_schulz, orthogonalized_from_shards, qk_clip

A, B, C = 3.4445, -4.7750, 2.0315


def ns_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz in float64, written out independently of train.muon."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + B * (gram @ x) + C * (gram @ gram @ x)
    return x.T if tall else x


def muon_reference(g: torch.Tensor) -> torch.Tensor:
    n, m = g.shape
    return ns_reference(g) * 0.2 * math.sqrt(max(n, m))


# ----------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(6, 10), (48, 16), (32, 32)])
def test_newton_schulz_matches_float64_and_is_near_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    ours = newton_schulz(g.float(), dtype=torch.float32).double()
    torch.testing.assert_close(ours, ns_reference(g), rtol=0, atol=2e-5)
    # all singular values pulled into the quintic's band around 1, direction ~ the polar factor U V^T
    sv = torch.linalg.svdvals(ours)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert (ours * polar).sum() / (ours.norm() * polar.norm()) > 0.97
    # batched = one by one
    stack = torch.randn(3, *shape)
    batched = newton_schulz(stack, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(stack[i], dtype=torch.float32), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the optimizer step
def test_muon_step_matches_hand_math_and_adamw_part_matches_torch():
    torch.manual_seed(0)
    lr, wd, mu = 0.02, 0.1, 0.95
    w0, v0 = torch.randn(6, 10), torch.randn(10)
    w, v = nn.Parameter(w0.clone()), nn.Parameter(v0.clone())
    v_torch = nn.Parameter(v0.clone())
    opt = Muon([{"params": [w], "use_muon": True, "weight_decay": wd},
                {"params": [v], "use_muon": False, "weight_decay": wd}],
               lr=lr, momentum=mu, betas=(0.9, 0.95), eps=1e-8)
    ref_adamw = torch.optim.AdamW([v_torch], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    grads = [torch.randn(6, 10) for _ in range(3)]
    vgrads = [torch.randn(10) for _ in range(3)]
    expected, buf = w0.double(), torch.zeros(6, 10, dtype=torch.float64)
    for g, gv in zip(grads, vgrads):
        w.grad, v.grad, v_torch.grad = g.clone(), gv.clone(), gv.clone()
        opt.step()
        ref_adamw.step()
        buf = mu * buf + g.double()
        expected = expected * (1 - lr * wd) - lr * muon_reference(g.double() + mu * buf)
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(v.detach(), v_torch.detach(), rtol=1e-6, atol=1e-7)
    assert set(opt.state[w]) == {"momentum_buffer"}


def test_muon_update_has_adamw_like_rms():
    """0.2 sqrt(max(n, m)) makes the update RMS ~0.2 lr for any shape (the singular values of NS5
    are ~0.7-1.1, so ~0.15-0.22)."""
    for shape in [(256, 32), (32, 256), (64, 64)]:
        w = nn.Parameter(torch.zeros(shape))
        opt = Muon([{"params": [w], "use_muon": True, "weight_decay": 0.0}], lr=1.0)
        w.grad = torch.randn(shape)
        opt.step()
        rms = float(w.detach().pow(2).mean().sqrt())
        assert 0.14 < rms < 0.23, (shape, rms)


# ----------------------------------------------------------------------------- tensor parallelism
def _shard(full: torch.Tensor, dim: int, world: int, fused: int) -> list[torch.Tensor]:
    """What megatron stores on each rank: per fused part, the rank's slice, stacked along dim 0."""
    parts = full.chunk(fused, dim=0)
    return [torch.cat([p.chunk(world, dim=dim)[r] for p in parts], dim=0) for r in range(world)]


@pytest.mark.parametrize(
    "shape,spec",
    [
        ((16, 12), MatrixSpec(partition_dim=0)),  # column-parallel (q_proj, kv_b_proj, ...)
        ((12, 16), MatrixSpec(partition_dim=1)),  # row-parallel (o_proj, linear_fc2)
        ((32, 12), MatrixSpec(partition_dim=0, fused=2)),  # SwiGLU fc1 [gate; up]
        ((32, 12), MatrixSpec(partition_dim=0, group="expert_tp", fused=2)),  # a routed expert's fc1
    ],
)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_orthogonalisation_equals_tp1(shape, spec, world):
    torch.manual_seed(1)
    full = torch.randn(*shape, dtype=torch.float64)
    tp1 = orthogonalized_from_shards([full], spec, 0, dtype=torch.float64)
    # TP=1 reference: each fused part orthogonalised on its own, in float64
    parts = full.chunk(spec.fused, dim=0)
    torch.testing.assert_close(tp1, torch.cat([muon_reference(p) for p in parts], 0), rtol=0, atol=1e-10)
    shards = _shard(full, spec.partition_dim, world, spec.fused)
    expected = _shard(tp1, spec.partition_dim, world, spec.fused)
    for rank in range(world):
        ours = orthogonalized_from_shards(shards, spec, rank, dtype=torch.float64)
        torch.testing.assert_close(ours, expected[rank], rtol=0, atol=1e-10)
    # orthogonalising the shard alone is a different (wrong) update: the gather matters
    alone = orthogonalized_from_shards([shards[0]], MatrixSpec(fused=spec.fused), 0, dtype=torch.float64)
    assert (alone - expected[0]).abs().max() > 1e-2


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from parallel import state
    state.initialize(state.ParallelDims(tensor=2))
    from megatron.core import tensor_parallel
    import train.muon
    from train.muon import MatrixSpec, Muon

    train.muon.BUCKET_NUMEL = 800  # several all-gather buckets
    rank = dist.get_rank()
    torch.manual_seed(0)
    layout = [((16, 12), 0, 1, "tp"), ((12, 16), 1, 1, "tp"), ((32, 12), 0, 2, "tp"), ((32, 12), 0, 2, "expert_tp"),
              ((8, 12), None, 1, "tp")]
    fulls = [torch.randn(*s) for s, *_ in layout]
    grads = [[torch.randn(*s) for s, *_ in layout] for _ in range(2)]

    def shard(x, dim, fused):
        if dim is None:
            return x.clone()
        return torch.cat([p.chunk(2, dim=dim)[rank] for p in x.chunk(fused, dim=0)], dim=0)

    def run(tp):
        params, specs = [], {}
        for full, (shape, dim, fused, group) in zip(fulls, layout):
            p = nn.Parameter(shard(full, dim, fused) if tp else full.clone())
            if tp and dim is not None:
                tensor_parallel.set_tensor_model_parallel_attributes(p, is_parallel=True, dim=dim, stride=1)
            params.append(p)
            specs[p] = MatrixSpec(partition_dim=dim if tp else None, group=group, fused=fused)
        opt = Muon([{"params": params, "use_muon": True, "weight_decay": 0.1}], lr=0.05, specs=specs)
        for step_grads in grads:
            for p, g, (shape, dim, fused, group) in zip(params, step_grads, layout):
                p.grad = shard(g, dim, fused) if tp else g.clone()
            opt.step()
        return params

    sharded, whole = run(True), run(False)
    for p_tp, p_full, (shape, dim, fused, group) in zip(sharded, whole, layout):
        expected = shard(p_full.detach(), dim, fused)
        err = (p_tp.detach() - expected).abs().max().item()
        assert err < 1e-5, (shape, dim, fused, err)
    print("OK", rank)
    """
)


@pytest.mark.distributed
def test_muon_tp2_matches_tp1_under_torchrun(tmp_path):
    from tests.helpers.distributed import torchrun

    script = tmp_path / "muon_tp_worker.py"
    script.write_text(WORKER)
    result = torchrun(script, 2)
    assert result.stdout.count("OK") == 2


# ----------------------------------------------------------------------------- parameter groups
@pytest.fixture(scope="module")
def mixed_model():
    from parallel import state

    state.initialize(state.ParallelDims())
    from model.model import build_model
    from tests.helpers.small_models import mixed_config

    return build_model(mixed_config())


MUON_PATTERNS = [
    r"layers\.\d+\.mixer\.(q|k|v|o|f_a|f_b|b|g_a|g_b)_proj\.weight",  # KDA / GDN matrices
    r"layers\.\d+\.mixer\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight",  # MLA
    r"layers\.\d+\.ffn\.linear_fc[12]\.weight",  # dense SwiGLU
    r"layers\.\d+\.ffn\.experts\.local_experts\.\d+\.linear_fc[12]\.weight",
    r"layers\.\d+\.ffn\.shared_experts\.linear_fc[12]\.weight",
]
NO_DECAY_PATTERNS = [
    r"layers\.\d+\.(input_norm|post_mixer_norm)\.weight", r"final_norm\.weight",
    r"layers\.\d+\.mixer\.kv_a_layernorm\.weight", r"layers\.\d+\.mixer\.(A_log|dt_bias|o_norm_weight)",
]


def test_parameter_group_rules(mixed_model):
    from train.optim import build_optimizer, muon_parameter_groups, parameter_groups

    names = {id(p): n for n, p in mixed_model.named_parameters()}
    groups, specs = muon_parameter_groups(mixed_model, 0.1)
    by_kind = {}
    for g in groups:
        key = ("muon" if g["use_muon"] else "adamw", g["weight_decay"] > 0)
        by_kind[key] = {names[id(p)] for p in g["params"]}
    every = set(names.values())
    muon = {n for n in every if any(re.fullmatch(pat, n) for pat in MUON_PATTERNS)}
    no_decay = {n for n in every if any(re.fullmatch(pat, n) for pat in NO_DECAY_PATTERNS)}
    assert by_kind[("muon", True)] == muon
    assert by_kind[("adamw", False)] == no_decay
    assert by_kind[("adamw", True)] == every - muon - no_decay
    # hand count for mixed_config (KAGK, dense first layer, 4 experts + 1 shared per MoE layer):
    # KDA/GDN 9 matrices x 3 layers, MLA 4, dense 2, MoE 3 layers x (4 + 1) x 2
    assert len(muon) == 27 + 4 + 2 + 30
    # AdamW with decay: embedding, LM head, 3 routers, 3 x 3 conv kernels
    assert by_kind[("adamw", True)] == {"embedding.weight", "output_layer.weight"} | {
        f"layers.{i}.ffn.router.weight" for i in (1, 2, 3)} | {
        f"layers.{i}.mixer.{c}_conv1d" for i in (0, 2, 3) for c in "qkv"}
    # 2 norms x 4 layers + final + kv_a_layernorm + 3 x (A_log, dt_bias, o_norm_weight)
    assert len(no_decay) == 8 + 1 + 1 + 9
    # plain AdamW groups: same decay rule
    adamw = parameter_groups(mixed_model, 0.1)
    assert {names[id(p)] for p in adamw[1]["params"]} == no_decay
    # specs: fused SwiGLU fc1, expert group, TP split dims
    spec = {names[id(p)]: s for p, s in specs.items()}
    assert spec["layers.0.ffn.linear_fc1.weight"] == MatrixSpec(partition_dim=0, group="tp", fused=2)
    assert spec["layers.1.ffn.experts.local_experts.3.linear_fc1.weight"] == MatrixSpec(0, "expert_tp", 2)
    assert spec["layers.1.ffn.shared_experts.linear_fc2.weight"] == MatrixSpec(1, "tp", 1)
    assert spec["layers.1.mixer.kv_a_proj_with_mqa.weight"] == MatrixSpec(None, "tp", 1)
    train = SimpleNamespace(optimizer="muon", lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                            adam_eps=1e-8)
    assert isinstance(build_optimizer(mixed_model, train), Muon)
    with pytest.raises(ValueError, match="adamw or muon"):
        build_optimizer(mixed_model, SimpleNamespace(**{**vars(train), "optimizer": "sgd"}))


def test_muon_trains_the_mixed_model(mixed_model):
    """One real step on every layer kind: all parameters move, Muon matrices by ~0.2 lr RMS."""
    from train.optim import build_optimizer

    model = mixed_model
    train = SimpleNamespace(optimizer="muon", lr=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                            adam_eps=1e-8)
    opt = build_optimizer(model, train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 512, (2, 32))
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    w = dict(model.named_parameters())["layers.1.mixer.q_proj.weight"]
    assert opt.state[w]["momentum_buffer"].shape == w.shape
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(before)


# ----------------------------------------------------------------------------- QK-Clip
@torch.no_grad()
def _reference_max_logits(layer, x: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-head max of q.k*scale in float64 straight from the weights (one sample, document-causal)."""
    x = x.double()
    h, nope, rope = layer.local_heads, layer.nope, layer.rope
    q = (x @ layer.q_proj.weight.double().T).view(-1, h, nope + rope)
    a = x @ layer.kv_a_proj_with_mqa.weight.double().T
    latent, k_rot = a[:, :layer.kv_lora_rank], a[:, layer.kv_lora_rank:]
    eps = layer.kv_a_layernorm.eps
    normed = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps) * layer.kv_a_layernorm.weight.double()
    kv = (normed @ layer.kv_b_proj.weight.double().T).view(-1, h, nope + layer.v_dim)
    k = torch.cat([kv[..., :nope], k_rot[:, None, :].expand(-1, h, rope)], -1)
    logits = torch.einsum("shd,thd->hst", q, k) * (nope + rope) ** -0.5
    t = x.shape[0]
    mask = torch.ones(t, t, dtype=torch.bool).tril() & (doc_ids[:, None] == doc_ids[None, :])
    return logits.masked_fill(~mask, float("-inf")).amax(dim=(1, 2))


def test_qk_clip_records_and_clips_mla_heads(mixed_model):
    from model.packed import pack
    from train.muon import set_max_logit_recording

    layer = mixed_model.layers[1].mixer
    torch.manual_seed(3)
    with torch.no_grad():  # large, head-dependent logits
        layer.q_proj.weight.mul_(torch.tensor([4.0, 8.0, 16.0, 32.0]).repeat_interleave(24)[:, None])
        layer.kv_b_proj.weight.mul_(3.0)
    layer.train()
    set_max_logit_recording(mixed_model, True)
    cu = torch.tensor([0, 10, 32, 50, 64], dtype=torch.int32)  # 2 samples of 32, 4 documents
    packed = pack(2, 32, cu, "cpu")
    x1, x2 = torch.randn(64, 1, 64), torch.randn(64, 1, 64)
    layer(x1, packed)
    layer(x2, packed)  # running max over two micro-batches
    ids = packed.document_ids

    def reference(x):
        return torch.stack([_reference_max_logits(layer, x[i * 32:(i + 1) * 32, 0], ids[i]) for i in range(2)]
                           ).amax(0)

    expected = torch.maximum(reference(x1), reference(x2))
    torch.testing.assert_close(layer.max_logits.double(), expected, rtol=1e-4, atol=1e-4)
    # eval forwards do not record
    layer.eval()
    layer(torch.randn(64, 1, 64) * 100, packed)
    torch.testing.assert_close(layer.max_logits.double(), expected, rtol=1e-4, atol=1e-4)
    layer.train()

    tau = float(expected.sort().values[1:3].mean())  # two heads above tau, two below
    over = expected > tau
    assert over.sum() == 2
    q_before, kv_before = layer.q_proj.weight.detach().clone(), layer.kv_b_proj.weight.detach().clone()
    kva_before = layer.kv_a_proj_with_mqa.weight.detach().clone()
    stats = qk_clip(mixed_model, tau)
    assert stats["clipped_heads"] == 2 and layer.max_logits is None
    after = torch.maximum(reference(x1), reference(x2))
    # clipped heads: every logit scaled by gamma = tau / S_max, so the max is exactly tau
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-5, atol=1e-5)
    assert torch.equal(after[~over], expected[~over])
    # heads under tau are untouched; the shared k_rot (kv_a_proj_with_mqa) never is
    qv, kvv = layer.q_proj.weight.detach().view(4, 24, -1), layer.kv_b_proj.weight.detach().view(4, 32, -1)
    qb, kvb = q_before.view(4, 24, -1), kv_before.view(4, 32, -1)
    assert torch.equal(qv[~over], qb[~over]) and torch.equal(kvv[~over], kvb[~over])
    assert torch.equal(layer.kv_a_proj_with_mqa.weight, kva_before)
    gamma = tau / expected[over]
    fp32 = dict(rtol=1e-6, atol=1e-8)  # fp32 weights times an fp32 gamma against float64: a few fp32 ulps
    root = gamma.sqrt()[:, None, None]
    torch.testing.assert_close(qv[over][:, :16].double(), qb[over][:, :16].double() * root, **fp32)
    torch.testing.assert_close(qv[over][:, 16:].double(), qb[over][:, 16:].double() * gamma[:, None, None], **fp32)
    torch.testing.assert_close(kvv[over][:, :16].double(), kvb[over][:, :16].double() * root, **fp32)
    assert torch.equal(kvv[over][:, 16:], kvb[over][:, 16:])  # value rows untouched
    set_max_logit_recording(mixed_model, False)


def test_training_loop_with_muon_resumes_exactly(tmp_path):
    """build_optimizer(optimizer="muon") in the real loop: the loss falls, and the Muon momentum and
    AdamW moments survive a checkpoint (2 + 2 steps == 4 steps, bitwise on CPU)."""
    from pathlib import Path

    from train.config import load_run_config
    from train.loop import train

    def run(**changes):
        r = load_run_config("tiny")
        r.model = r.model.replace(name="t", hidden_size=64, num_layers=2, layer_pattern="KA", kda_num_heads=2,
                                  kda_head_dim=16, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16,
                                  qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, num_experts=4,
                                  num_experts_per_token=2, moe_intermediate_size=32)
        values = dict(data_cache_dir=str(Path(__file__).resolve().parents[2] / "cache" / "data"), seq_length=32,
                      micro_batch_size=2, global_batch_size=2, lr_warmup_iters=1, log_interval=100,
                      optimizer="muon", lr=0.02, train_iters=4)
        for key, value in {**values, **changes}.items():
            setattr(r.train, key, value)
        return r

    straight = train(run(save=str(tmp_path / "a")))
    first = train(run(exit_interval=2, save=str(tmp_path / "b")))
    resumed = train(run(save=str(tmp_path / "b")))
    assert first + resumed == straight
    assert straight[-1] < straight[0]
