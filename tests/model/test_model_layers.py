"""Each layer against a plain-PyTorch float64 reference written from the math of
docs/architecture.md.

The references below read the layer's weights by name and recompute the layer token by token
(short conv, L2 norm, gate, delta rule, gated norm; softmax attention per document; sigmoid top-k
routing with the expert bias), without calling any of the model's code.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model.packed import pack
from tests.helpers.small_models import mixed_config


@pytest.fixture(scope="module")
def model():
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=5)
    torch.manual_seed(5)
    m = build_model(mixed_config())
    with torch.no_grad():  # non-trivial values for the parameters initialised to constants
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "o_norm_weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
        for name, b in m.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.rand(b.shape) * 0.3)
    return m


CU = [0, 37, 70, 71, 100]  # documents ending mid-chunk and one of length 1
T = CU[-1]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def w(module, name):
    return dict(module.named_parameters())[name].detach().double()


def documents():
    return [(a, b) for a, b in zip(CU, CU[1:])]


def kda_reference(layer, x, per_channel: bool):
    """The KDA layer's token-level dataflow and recurrence, one document at a time, float64."""
    H, D = layer.local_heads, layer.head_dim
    out = torch.zeros(x.shape[0], layer.o_proj.weight.shape[0], dtype=torch.float64)
    for a, b in documents():
        xd = x[a:b]
        n = b - a

        def conv_silu(proj, kernel):
            y = xd @ w(layer, proj).T  # [n, C]
            k = w(layer, kernel)[:, 0, :]  # [C, W]
            width = k.shape[1]
            res = torch.zeros_like(y)
            for t in range(n):
                for i in range(width):
                    src = t - width + 1 + i
                    if src >= 0:
                        res[t] += k[:, i] * y[src]
            return F.silu(res).view(n, H, D)

        q, k, v = conv_silu("q_proj.weight", "q_conv1d"), conv_silu("k_proj.weight", "k_conv1d"), conv_silu("v_proj.weight", "v_conv1d")
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * D ** -0.5
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        raw = (xd @ w(layer, "f_a_proj.weight").T) @ w(layer, "f_b_proj.weight").T + w(layer, "dt_bias")
        raw = raw.view(n, H, D if per_channel else 1)
        glog = -torch.exp(w(layer, "A_log")).view(1, H, 1) * F.softplus(raw)
        glog = glog.expand(n, H, D)
        beta = torch.sigmoid(xd @ w(layer, "b_proj.weight").T)
        S = torch.zeros(H, D, D, dtype=torch.float64)
        o = torch.zeros(n, H, D, dtype=torch.float64)
        for t in range(n):
            S = torch.exp(glog[t])[:, :, None] * S
            err = v[t] - torch.einsum("hk,hkv->hv", k[t], S)
            S = S + beta[t][:, None, None] * k[t][:, :, None] * err[:, None, :]
            o[t] = torch.einsum("hk,hkv->hv", q[t], S)
        gate = ((xd @ w(layer, "g_a_proj.weight").T) @ w(layer, "g_b_proj.weight").T).view(n, H, D)
        normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps) * w(layer, "o_norm_weight")
        y = (normed * torch.sigmoid(gate)).reshape(n, H * D)
        out[a:b] = y @ w(layer, "o_proj.weight").T
    return out


def mla_reference(layer, x):
    """NoPE MLA: shared un-rotated k_rot, causal softmax within each document."""
    H, nope, rope, dv = layer.local_heads, layer.nope, layer.rope, layer.v_dim
    out = torch.zeros(x.shape[0], layer.o_proj.weight.shape[0], dtype=torch.float64)
    for a, b in documents():
        xd = x[a:b]
        n = b - a
        q = (xd @ w(layer, "q_proj.weight").T).view(n, H, nope + rope)
        ckv = xd @ w(layer, "kv_a_proj_with_mqa.weight").T
        latent, k_rot = ckv[:, : layer.kv_lora_rank], ckv[:, layer.kv_lora_rank :]
        latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + 1e-6) * w(layer, "kv_a_layernorm.weight")
        kv = (latent @ w(layer, "kv_b_proj.weight").T).view(n, H, nope + dv)
        k = torch.cat([kv[..., :nope], k_rot[:, None, :].expand(n, H, rope)], -1)
        v = kv[..., nope:]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(nope + rope)
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        o = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(n, H * dv)
        out[a:b] = o @ w(layer, "o_proj.weight").T
    return out


def swiglu(x, fc1, fc2):
    gate, up = fc1.chunk(2, dim=0)
    return (F.silu(x @ gate.T) * (x @ up.T)) @ fc2.T


def moe_reference(ffn, config, x):
    """MoE: sigmoid scores, top-k over score + bias, renormalised unbiased scores times the
    routed scaling factor, plus the shared expert."""
    scores = torch.sigmoid(x @ w(ffn, "router.weight").T)
    bias = dict(ffn.named_buffers())["router.expert_bias"].double()
    idx = torch.topk(scores + bias, config.num_experts_per_token, dim=-1).indices
    chosen = scores.gather(1, idx)
    weights = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * config.routed_scaling_factor
    out = swiglu(x, w(ffn, "shared_experts.linear_fc1.weight"), w(ffn, "shared_experts.linear_fc2.weight"))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            fc1 = w(ffn, f"experts.local_experts.{e}.linear_fc1.weight")
            fc2 = w(ffn, f"experts.local_experts.{e}.linear_fc2.weight")
            out[t] += weights[t, j] * swiglu(x[t : t + 1], fc1, fc2)[0]
    return out


def packed_input(hidden_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden_size, generator=gen)
    packed = pack(1, T, torch.tensor(CU, dtype=torch.int32), "cpu")
    return x, packed


@pytest.mark.parametrize("index,kind", [(0, "kda"), (2, "gdn")])
def test_kda_and_gdn_layers_match_reference(model, index, kind):
    layer = model.layers[index].mixer
    assert model.layers[index].layer_type == kind
    x, packed = packed_input(model.model_config.hidden_size)
    with torch.no_grad():
        ours = layer(x.unsqueeze(1), packed).squeeze(1)
    ref = kda_reference(layer, x.double(), per_channel=kind == "kda")
    assert rel(ours, ref) < 2e-5


def test_mla_layer_matches_reference(model):
    layer = model.layers[1].mixer
    x, packed = packed_input(model.model_config.hidden_size, seed=1)
    with torch.no_grad():
        ours = layer(x.unsqueeze(1), packed).squeeze(1)
    assert rel(ours, mla_reference(layer, x.double())) < 1e-5


def test_attention_and_state_do_not_cross_documents(model):
    """Changing one document leaves the outputs of every other document unchanged."""
    x, packed = packed_input(model.model_config.hidden_size, seed=2)
    x2 = x.clone()
    x2[37:70] += torch.randn(33, x.shape[1])
    for index in (0, 1, 2):
        layer = model.layers[index].mixer
        with torch.no_grad():
            a = layer(x.unsqueeze(1), packed).squeeze(1)
            b = layer(x2.unsqueeze(1), packed).squeeze(1)
        assert torch.equal(a[:37], b[:37]) and torch.allclose(a[70:], b[70:], atol=1e-6)
        assert not torch.allclose(a[37:70], b[37:70])


def test_moe_layer_matches_reference(model):
    ffn = model.layers[3].ffn
    x, _ = packed_input(model.model_config.hidden_size, seed=3)
    with torch.no_grad():
        ours = ffn(x.unsqueeze(1))[0].squeeze(1)
    assert rel(ours, moe_reference(ffn, model.model_config, x.double())) < 1e-5


def test_dense_mlp_matches_reference(model):
    ffn = model.layers[0].ffn
    x, _ = packed_input(model.model_config.hidden_size, seed=4)
    with torch.no_grad():
        ours = ffn(x.unsqueeze(1))[0].squeeze(1)
    ref = swiglu(x.double(), w(ffn, "linear_fc1.weight"), w(ffn, "linear_fc2.weight"))
    assert rel(ours, ref) < 1e-6


def test_expert_bias_changes_routing(model):
    """Setting the bias of one expert high must send (almost) every token to it."""
    ffn = model.layers[3].ffn
    x, _ = packed_input(model.model_config.hidden_size, seed=5)
    bias = dict(ffn.named_buffers())["router.expert_bias"]
    saved = bias.clone()
    try:
        with torch.no_grad():
            bias.zero_()
            bias[2] = 10.0
            _, routing_map = ffn.router(x.unsqueeze(1))
        assert routing_map[:, 2].all()
    finally:
        bias.copy_(saved)


def test_model_forward_shapes_and_block_structure(model):
    """The whole model equals embedding -> blocks (pre-norm residual) -> norm -> head, composed by hand."""
    config = model.model_config
    tokens = torch.randint(0, config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(9))
    cu = torch.tensor([0, 20, 50, 100], dtype=torch.int32)
    with torch.no_grad():
        logits = model(tokens, cu)
        packed = pack(2, 50, cu, "cpu")
        h = model.embedding.weight[tokens.reshape(-1)].unsqueeze(1)
        for layer in model.layers:
            h = h + layer.mixer(layer.input_norm(h), packed)
            out = layer.ffn(layer.post_mixer_norm(h))
            h = h + (out[0] if isinstance(out, tuple) else out)
        manual = (model.final_norm(h).squeeze(1) @ model.output_layer.weight.T).view(2, 50, -1)
    assert logits.shape == (2, 50, config.vocab_size)
    assert rel(logits, manual) < 1e-6


def test_group_limited_top_k_picks_experts_from_the_chosen_groups():
    """num_expert_group=2, topk_group=1: every token's experts come from one group of 4."""
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=4)
    config = mixed_config(num_experts=8, num_experts_per_token=2, num_expert_group=2, topk_group=1)
    model = build_model(config)
    router = model.layers[3].ffn.router
    x = torch.randn(200, 1, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, routing_map = router(x)
    groups = routing_map.view(200, 2, 4).any(-1)  # [tokens, groups]: which groups were used
    assert (groups.sum(-1) == 1).all()
    assert groups[:, 0].any() and groups[:, 1].any()  # both groups are used across tokens
