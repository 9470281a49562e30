"""The context-parallel pre-passes against the fp64 token recurrence.

For selected documents of a packed batch: the transition ``[M | E]`` (M = the map of the entering
state, the final state of the recurrence with v = 0 started at the identity; E = the final state from
zero) and the gradient that reaches the entering state through the document's outputs (autograd of
the recurrence, no final-state gradient). Both implementations: the Triton kernels on the forward's
WY pieces (kernels/kda/cp_prepass.py; interpreter on CPU) and the PyTorch reference
(parallel/context/kda_prepass.py).
"""
import pytest
import torch

from kernels.kda import recurrent_kda_reference
from kernels.kda.chunk import chunk_kda_triton
from kernels.kda.options import KDAOptions
from parallel.context import kda_prepass
from tests.helpers.kda import HAS_CUDA, assert_close, make_inputs, random_cu_seqlens

LENGTHS = [1, 70, 3, 150, 64]  # one token, a partial chunk, exactly one chunk, several chunks
DOCS = [0, 1, 3, 4]
WITH_M = [True, False, True, True]


def _case(dtype=torch.float32, device="cpu"):
    inputs = make_inputs(B=1, T=sum(LENGTHS), H=2, Dk=16, Dv=32, gate_kind="softplus", n_docs=len(LENGTHS),
                         h0=False, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(*inputs["v"].shape, generator=gen).to(device=device, dtype=dtype)
    return inputs, random_cu_seqlens(LENGTHS, device), do


def _oracle(inputs, cu, do):
    """fp64 ([M | E] for DOCS with WITH_M, entering-state gradients for DOCS)."""
    f64 = {key: inputs[key].double().cpu() for key in ("q", "k", "v", "g", "beta")}
    gate = [x.double().cpu() if torch.is_tensor(x) else x for x in inputs["gate"]]
    cu = cu.cpu()
    n, H, dk = len(LENGTHS), f64["q"].shape[2], f64["q"].shape[3]
    eye = torch.eye(dk, dtype=torch.float64).expand(n, H, dk, dk).contiguous()
    no_values = torch.zeros_like(f64["k"])
    _, M = recurrent_kda_reference(f64["q"], f64["k"], no_values, f64["g"], f64["beta"], initial_state=eye,
                                   output_final_state=True, cu_seqlens=cu, gate=gate)
    _, E = recurrent_kda_reference(**f64, output_final_state=True, cu_seqlens=cu, gate=gate)
    pairs = torch.cat([M, E], -1)[DOCS]
    pairs[:, :, :, :dk] *= torch.tensor(WITH_M, dtype=torch.float64)[:, None, None, None]
    h0 = torch.zeros(n, H, dk, f64["v"].shape[-1], dtype=torch.float64, requires_grad=True)
    o, _ = recurrent_kda_reference(**f64, initial_state=h0, cu_seqlens=cu, gate=gate)
    o.backward(do.double().cpu())
    return pairs, h0.grad[DOCS]


class _Capture:
    """A state hook that records the Triton pre-passes' results and leaves the op's states at zero."""

    def initial_state(self, pieces, cu, offsets, options):
        from kernels.kda import cp_prepass

        self.pairs = cp_prepass.transition_pairs(pieces, cu, offsets, DOCS, WITH_M, options)
        W = pieces["W"]
        return W.new_zeros(len(LENGTHS), W.shape[1], W.shape[3], pieces["U"].shape[3], dtype=torch.float32)

    def final_state_gradient(self, pieces, do, cu, offsets, options):
        from kernels.kda import cp_prepass

        self.grads = cp_prepass.entry_state_gradients(pieces, do, cu, offsets, DOCS, options)
        return None


def _triton(inputs, cu, do, options=None):
    capture = _Capture()
    leaves = {key: inputs[key].clone().requires_grad_() for key in ("q", "k", "v", "g", "beta")}
    o, _ = chunk_kda_triton(**leaves, cu_seqlens=cu, gate=inputs["gate"], state_hook=capture, options=options)
    o.backward(do)
    return capture.pairs, capture.grads


def test_pytorch_prepasses_match_recurrence():
    inputs, cu, do = _case()
    pairs_ref, grads_ref = _oracle(inputs, cu, do)
    cu_list = cu.tolist()
    pairs = kda_prepass.transition_pairs(inputs["k"], inputs["v"], inputs["g"], inputs["beta"], cu_list, DOCS, WITH_M,
                                         gate=inputs["gate"])
    grads = kda_prepass.entry_state_gradients(inputs["q"], inputs["k"], inputs["g"], inputs["beta"], do, cu_list,
                                              DOCS, gate=inputs["gate"])
    assert_close("[M | E]", pairs, pairs_ref, 1e-5)
    assert_close("entering-state gradient", grads, grads_ref, 1e-5)


def test_triton_prepasses_match_recurrence():
    """fp32 (the interpreter on CPU: exact fp32 dots)."""
    inputs, cu, do = _case(device="cuda" if HAS_CUDA else "cpu")
    pairs_ref, grads_ref = _oracle(inputs, cu, do)
    pairs, grads = _triton(inputs, cu, do)
    assert_close("[M | E]", pairs, pairs_ref, 1e-5)
    assert_close("entering-state gradient", grads, grads_ref, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_triton_prepasses_bf16(precision):
    """bf16 inputs: the pieces are stored in bf16, the pre-passes keep fp32 states and take tf32x3 or
    tf32 dots (their error is well below the pieces' bf16 rounding)."""
    inputs, cu, do = _case(torch.bfloat16, "cuda")
    pairs_ref, grads_ref = _oracle(inputs, cu, do)
    pairs, grads = _triton(inputs, cu, do, KDAOptions(cp_precision=precision))
    assert_close("[M | E]", pairs, pairs_ref, 2e-2)
    assert_close("entering-state gradient", grads, grads_ref, 2e-2)
