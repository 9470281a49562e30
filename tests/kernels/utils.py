"""Helpers shared by the KDA kernel tests."""
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
