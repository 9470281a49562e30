"""Kimi Delta Attention mixer (docs/architecture.md, "Kimi Delta Attention"), and Gated DeltaNet as its
one-decay-per-head case.

Tensor parallel by head, as its plan (``model.mixers.kda_plan``) declares: q/k/v, the forget-gate
and output-gate up-projections, beta, the short-conv kernels, ``A_log`` and ``dt_bias`` are split
over TP ranks; the low-rank down-projections (``f_a_proj``, ``g_a_proj``) and the output-norm
weight are replicated; ``o_proj`` is row-parallel.
The recurrence itself is ``kda_op``: ``kernels.kda.chunk_kda`` on GPUs (Triton, run with the layer's
``kernel_options``) and ``kernels.kda.chunk_kda_cpu`` on CPUs (the chunked PyTorch reference with its
intra-chunk products vectorised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.kda import KDAOptions, chunk_kda, chunk_kda_cpu
from kernels.short_conv import short_conv_silu_triton

from . import tp
from .config import ModelConfig
from .fusion import fused
from .mixers import kda_plan
from .norms import gated_rms_norm
from .packed import PackedSequence, causal_depthwise_conv
from .profiling import profiled


def kda_op(q, k, v, g, beta, options: KDAOptions | None = None, **kwargs):
    """The model's KDA op: the Triton kernels on CUDA tensors (run with ``options``, default
    ``KDAOptions()``), the vectorised PyTorch path on CPU (no options)."""
    if q.is_cuda:
        return chunk_kda(q, k, v, g, beta, options=options, **kwargs)
    return chunk_kda_cpu(q, k, v, g, beta, **kwargs)


def kernel_options(model) -> dict:
    """The ``KDAOptions`` of the model's KDA/GDN layers as a JSON-ready dict (what a run records in its
    checkpoints' meta.json and its first metrics record); ``{}`` for a model without such layers. Layers
    whose options differ from the first one's are listed by module name under ``"layers"``."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, KimiDeltaAttention)]
    if not layers:
        return {}
    record = layers[0][1].kernel_options.to_dict()
    others = {name: m.kernel_options.to_dict() for name, m in layers if m.kernel_options.to_dict() != record}
    return {**record, "layers": others} if others else record


@fused
def _short_conv_silu_pytorch(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return F.silu(causal_depthwise_conv(x, weight, position))


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The q/k/v path after its projection: SiLU of the per-document causal short convolution. CUDA
    tensors take the Triton kernels (kernels/short_conv.py: one pass forward, one backward), others
    the PyTorch expression (compiled when fusion is on, model/fusion.py)."""
    if x.is_cuda:
        return short_conv_silu_triton(x, weight, position)
    return _short_conv_silu_pytorch(x, weight, position)


short_conv_silu.eager = _short_conv_silu_pytorch.eager


def a_log_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """FLA's default decay rate (docs/architecture.md, "The forget gate") from U(0, 1) draws: A_log = log U(1, 16)."""
    return u.mul(15.0).add_(1.0).log_()


def dt_bias_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """FLA's default dt bias (docs/architecture.md, "The forget gate") from U(0, 1) draws: dt = exp U(log 1e-3, log 0.1), at
    least 1e-4, and dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))."""
    low, high = math.log(1e-3), math.log(0.1)
    dt = u.mul(high - low).add_(low).exp_().clamp_min_(1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class KimiDeltaAttention(tp.PlannedMixer):
    """One KDA (``per_channel_decay=True``) or GDN (``False``) token mixer; its parameters and their
    tensor-parallel layout are ``model.mixers.kda_plan``."""

    def __init__(self, config: ModelConfig, tconfig, layer_idx: int, per_channel_decay: bool = True):
        # values are filled after the model is built (model/init.py)
        super().__init__(config, tconfig, layer_idx, kda_plan(config, per_channel_decay))
        self.kernel_options = KDAOptions()  # how the Triton kernels run (kernels/kda/options.py)
        self.per_channel_decay = per_channel_decay
        self.head_dim = config.kda_head_dim
        self.eps = config.rms_norm_eps
        self.lower_bound = config.kda_gate_lower_bound

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(1, x.shape[0], self.local_heads, -1)

    def forward(self, hidden: torch.Tensor, packed: PackedSequence, initial_state=None, output_final_state=False,
                context_parallel=None):
        """hidden: [T, 1, hidden] (the packed stream; [T/TP, 1, hidden] under sequence parallelism,
        the column-parallel projections gather the tokens). Returns the same shape.
        ``context_parallel``: a ``parallel.context.ContextParallel`` when the stream is this rank's
        slice of longer sequences (``packed`` then describes the slice; docs/parallelism.md)."""
        x = hidden.squeeze(1)
        t = packed.num_tokens
        projections = (self.q_proj(x)[0], self.k_proj(x)[0], self.v_proj(x)[0])  # before the short conv
        kernels = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        raw_gate = self.f_b_proj(self.f_a_proj(x))[0]
        beta_logits = self.b_proj(x)[0]
        g = raw_gate.view(t, self.local_heads, -1)
        if not self.per_channel_decay:
            g = g.squeeze(-1)  # one decay per head: [T, H]
        gate = (self.A_log, self.dt_bias, self.lower_bound)
        if context_parallel is not None:
            if initial_state is not None or output_final_state:
                raise ValueError("KDA under context parallelism takes no initial_state/output_final_state")
            out = profiled("kda_core", context_parallel.kda, projections, kernels, g, beta_logits, gate,
                           self.head_dim, self.kernel_options)
            final_state = None
        else:
            position = packed.position_in_document
            q, k, v = (self._heads(short_conv_silu(p, w, position)) for p, w in zip(projections, kernels))
            beta = torch.sigmoid(beta_logits.float())
            out, final_state = profiled(  # the profile breakdown's "KDA" part
                "kda_core", kda_op, q, k, v, g.unsqueeze(0), beta.view(1, t, self.local_heads),
                initial_state=initial_state,
                output_final_state=output_final_state,
                cu_seqlens=packed.cu_seqlens,
                use_qk_l2norm=True,
                gate=gate,
                options=self.kernel_options,
            )
        out_gate = self.g_b_proj(self.g_a_proj(x))[0].view(t, self.local_heads, self.head_dim)
        norm_weight = tp.reduce_grad_over_tp(self.o_norm_weight)
        y = gated_rms_norm(out.squeeze(0), out_gate, norm_weight, self.eps)
        y = self.o_proj(y.reshape(t, -1))[0]
        y = y.unsqueeze(1)
        return (y, final_state) if output_final_state else y
