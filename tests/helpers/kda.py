"""KDA test inputs, comparisons and cases, shared by the kernel tests, the model and context-parallel
tests and the GPU debugging aid (benchmarks/kda_debug.py)."""
import torch

HAS_CUDA = torch.cuda.is_available()


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (NaN/inf in ``actual`` gives inf)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / max(denom, 1e-30)


def assert_close(name: str, actual, expected, tol: float):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = rel_rms(actual, expected)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"
    return err


def make_inputs(B, T, H, Dk, Dv, *, dtype=torch.float32, device="cpu", gate_kind="log",
                scalar_gate=False, decay=(0.0, 1.0), n_docs=None, seed=0, h0=True):
    """Random KDA inputs. gate_kind: 'log' (g is the log-decay, uniform in -decay range),
    'softplus' (raw gate with A_log/dt_bias, unbounded), 'bounded' (lower_bound=-5)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    gshape = (B, T, H) if scalar_gate else (B, T, H, Dk)
    gate = None
    if gate_kind == "log":
        lo, hi = decay
        g = -(lo + (hi - lo) * torch.rand(*gshape, generator=gen, dtype=torch.float64))
    else:
        g = rnd(*gshape) * 2.0
        A_log = torch.log(torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=gen))
        nb = H if scalar_gate else H * Dk
        dt_bias = rnd(nb) * 0.5
        gate = [A_log.float(), dt_bias.float(), None if gate_kind == "softplus" else -5.0]
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    n = B if n_docs is None else n_docs
    initial_state = rnd(n, H, Dk, Dv).float() * 0.5 if h0 else None
    to = lambda x: x.to(device=device, dtype=dtype)
    out = dict(q=to(q), k=to(k), v=to(v), g=to(g) if gate_kind == "log" else g.to(device, torch.float32),
               beta=to(beta), initial_state=None if initial_state is None else initial_state.to(device))
    if gate is not None:
        gate = [gate[0].to(device), gate[1].to(device), gate[2]]
    out["gate"] = gate
    return out


def random_cu_seqlens(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def run_with_grads(fn, inputs, cu_seqlens=None, seed=1, do=None, dht=None):
    """Run fn (reference or kernel) on leaf copies of ``inputs``; return (o, final, grads dict)."""
    leaves = {}
    for key in ("q", "k", "v", "g", "beta", "initial_state"):
        x = inputs[key]
        if x is not None:
            leaves[key] = x.detach().clone().requires_grad_(True)
    gate = None
    if inputs["gate"] is not None:
        A_log, dt_bias, lb = inputs["gate"]
        leaves["A_log"] = A_log.detach().clone().requires_grad_(True)
        leaves["dt_bias"] = dt_bias.detach().clone().requires_grad_(True)
        gate = (leaves["A_log"], leaves["dt_bias"], lb)
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
                  initial_state=leaves.get("initial_state"), output_final_state=True,
                  cu_seqlens=cu_seqlens, gate=gate)
    gen = torch.Generator().manual_seed(seed)
    if do is None:
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    if dht is None:
        dht = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * do.to(o.device)).sum() + (final.double() * dht.to(final.device)).sum()
    loss.backward()
    grads = {key: x.grad for key, x in leaves.items()}
    return o, final, grads


# name -> (make_inputs kwargs, varlen lengths or None): the cases every KDA implementation is tested on
CASES = {
    "basic_T150": (dict(B=2, T=150, H=2, Dk=32, Dv=16), None),
    "dk_ne_dv": (dict(B=1, T=100, H=2, Dk=16, Dv=32), None),
    "dk256": (dict(B=1, T=70, H=1, Dk=256, Dv=32), None),
    "softplus_gate_strong": (dict(B=1, T=130, H=2, Dk=16, Dv=16, gate_kind="softplus"), None),
    "bounded_gate": (dict(B=1, T=96, H=2, Dk=16, Dv=16, gate_kind="bounded"), None),
    "log_decay_to_-20": (dict(B=1, T=140, H=2, Dk=16, Dv=16, decay=(0.0, 20.0)), None),
    "near_zero_decay": (dict(B=1, T=140, H=2, Dk=16, Dv=16, decay=(0.0, 1e-4)), None),
    "varlen": (dict(B=1, T=160, H=2, Dk=16, Dv=16), [1, 70, 3, 64, 22]),
    "varlen_softplus_gate": (dict(B=1, T=160, H=2, Dk=16, Dv=16, gate_kind="softplus"), [65, 1, 94]),
    "varlen_empty_docs": (dict(B=1, T=80, H=2, Dk=16, Dv=16), [10, 0, 70, 0]),
    "gdn_scalar_gate": (dict(B=2, T=80, H=2, Dk=16, Dv=16, scalar_gate=True, decay=(0.0, 3.0)), None),
    "gdn_scalar_raw_gate": (dict(B=1, T=80, H=2, Dk=16, Dv=16, scalar_gate=True, gate_kind="softplus"), None),
}


def case(name, dtype=torch.float32):
    """(inputs, cu_seqlens or None) of ``CASES[name]``."""
    kw, lens = CASES[name]
    cu = None
    if lens is not None:
        assert sum(lens) == kw["T"]
        cu = random_cu_seqlens(lens)
        kw = dict(kw, n_docs=len(lens))
    return make_inputs(dtype=dtype, **kw), cu


def on_device(inputs, device, dtype=None):
    """``inputs`` on ``device``, q/k/v cast to ``dtype`` when given (the gate's parameters stay fp32)."""
    out = {}
    for key, x in inputs.items():
        if key == "gate":
            out[key] = None if x is None else [x[0].to(device), x[1].to(device), x[2]]
        elif x is None:
            out[key] = None
        else:
            cast = dtype if (dtype is not None and key in ("q", "k", "v")) else None
            out[key] = x.to(device=device, dtype=cast) if cast else x.to(device)
    return out


def gdn_reference(q, k, v, a_log, beta, scale, S):
    """Gated DeltaNet written directly: S = a S; S += beta k (v - S^T k)^T; o = S^T q (fp64)."""
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * scale
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    B, T, H, _ = q.shape
    out = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64)
    S = S.clone()
    for b in range(B):
        for t in range(T):
            for h in range(H):
                St = torch.exp(a_log[b, t, h]) * S[b, h]
                St = St + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - St.T @ k[b, t, h])
                S[b, h] = St
                out[b, t, h] = St.T @ q[b, t, h]
    return out, S
