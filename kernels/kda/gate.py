"""The KDA forget gate, defined once (docs/architecture.md, "The forget gate").

From the raw gate projection x (per key channel, or per head for GDN) and the layer's fp32
parameters A_log [H] and dt_bias, the log-decay g <= 0:

  unbounded (the released model):   g = -exp(A_log[h]) * softplus(x + dt_bias)   (softplus threshold 20)
  bounded (lower_bound < 0):        g = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias))

``kda_log_decay`` is the PyTorch form (references, CPU paths, gate statistics, benchmarks);
``gate_log_decay`` / ``gate_backward`` are the Triton forms the chunk kernels inline (on a
[rows, BK] tile) and ``gate_activation`` the elementwise core they and the decode kernel share.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# the GATE constexpr of the kernels: what g holds
GATE_LOG, GATE_SOFTPLUS, GATE_BOUNDED = 0, 1, 2


def gate_mode(lower_bound) -> int:
    """GATE_SOFTPLUS without a lower bound, GATE_BOUNDED with one."""
    return GATE_SOFTPLUS if lower_bound is None else GATE_BOUNDED


def kda_log_decay(g: torch.Tensor, gate, dtype=torch.float32) -> torch.Tensor:
    """Log-decay from ``g``. ``gate=None``: g already is the log-decay.
    ``gate=(A_log, dt_bias, lower_bound)``: g is the raw projection (per key channel
    [..., H, Dk] with dt_bias [H*Dk], or per head [B, T, H] with dt_bias [H])."""
    g = g.to(dtype)
    if gate is None:
        return g
    A_log, dt_bias, lower_bound = gate
    H = A_log.shape[0]
    if g.dim() == 4:
        bias = dt_bias.to(dtype).view(H, -1)
        a = A_log.to(dtype).view(H, 1)
    else:
        bias = dt_bias.to(dtype).view(H)
        a = A_log.to(dtype).view(H)
    x = g + bias
    if lower_bound is None:
        return -torch.exp(a) * F.softplus(x, beta=1.0, threshold=20.0)
    return lower_bound * torch.sigmoid(torch.exp(a) * x)


@triton.jit
def softplus(z):
    """log(1 + e^z) with PyTorch's threshold 20; for e^-|z| < 1e-2 a 3-term series replaces
    log(1 + t), which in fp32 loses the low bits of small t (no log1p in tl)."""
    t = tl.exp(-tl.abs(z))
    small = t * (1. - t * (0.5 - t / 3.))
    sp = tl.maximum(z, 0.) + tl.where(t < 1e-2, small, tl.log(1. + t))
    return tl.where(z > 20., z, sp)


@triton.jit
def gate_activation(z, a, lower_bound, GATE: tl.constexpr):
    """The log-decay from z = x + dt_bias and a = exp(A_log[h]) (GATE 1 or 2, see module doc)."""
    if GATE == 1:
        return -a * softplus(z)
    else:
        return lower_bound * tl.sigmoid(a * z)


@triton.jit
def _gate_inputs(x, A_log, dt_bias, i_h, dk, K: tl.constexpr):
    """(z = x + dt_bias, a = exp(A_log[h])) for a [rows, BK] raw-gate tile of head i_h."""
    a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    z = x + tl.load(dt_bias + i_h * K + dk, mask=dk < K, other=0.).to(tl.float32)[None, :]
    return z, a


@triton.jit
def gate_log_decay(x, A_log, dt_bias, lower_bound, i_h, dk, K: tl.constexpr, GATE: tl.constexpr):
    """The log-decay of a [rows, BK] raw-gate tile x of head i_h."""
    z, a = _gate_inputs(x, A_log, dt_bias, i_h, dk, K)
    return gate_activation(z, a, lower_bound, GATE)


@triton.jit
def gate_backward(dglog, x, A_log, dt_bias, lower_bound, i_h, dk, K: tl.constexpr, GATE: tl.constexpr):
    """(d raw gate, per-element d A_log) of a tile from d log-decay; see gate_log_decay."""
    z, a = _gate_inputs(x, A_log, dt_bias, i_h, dk, K)
    if GATE == 1:
        return -a * tl.sigmoid(z) * dglog, -a * softplus(z) * dglog
    else:
        s = tl.sigmoid(a * z)
        ds = lower_bound * s * (1. - s) * dglog
        return ds * a, ds * a * z
