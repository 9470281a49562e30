"""The compiled (fused) norms and KDA short convolution equal their eager form: outputs and every
gradient, on CPU through inductor's C++ backend (the CUDA build runs the same graphs as Triton
kernels; tests/model/test_fusion_gpu.py checks that on a GPU)."""

import pytest
import torch

from model import fusion
from model.kda import short_conv_silu
from model.norms import gated_rms_norm, rms_norm
from model.packed import pack
from tests.helpers.saved import saved_storages


@pytest.fixture
def compiled():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fusion.enable(True, cpu=True)
    # parallel/cpu_compat.py switches dynamo off process-wide on GPU-less machines (megatron's own
    # compiled helpers); this test compiles on purpose
    with torch._dynamo.config.patch(disable=False):
        yield
    fusion.enable(False)
    torch._dynamo.reset()


def inputs(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    tokens, channels = 70, 32
    cu = torch.tensor([0, 3, 4, 40, tokens], dtype=torch.int32)  # short documents and one of length 1
    packed = pack(1, tokens, cu, device)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    return dict(
        conv=(make(tokens, channels), make(channels, 1, 4), packed.position_in_document),
        norm=(make(tokens, channels), make(channels), 1e-6),
        gated=(make(tokens, 4, 8), make(tokens, 4, 8), make(8), 1e-5),
    )


FUNCTIONS = {"conv": short_conv_silu, "norm": rms_norm, "gated": gated_rms_norm}


def run(fn, args):
    out = fn(*args)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    tensors = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    return out, torch.autograd.grad((out * weights).sum(), tensors)


def check_fused_equals_eager(device, dtype, tol):
    for name, args in inputs(device, dtype).items():
        fn = FUNCTIONS[name]
        out, grads = run(fn, args)
        ref, ref_grads = run(fn.eager, args)
        for got, want in [(out, ref), *zip(grads, ref_grads)]:
            assert got.dtype == want.dtype and got.shape == want.shape
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < tol, f"{name}: relative error {err}"


def test_fused_functions_compile_and_match_eager(compiled):
    from torch._dynamo.utils import counters

    check_fused_equals_eager("cpu", torch.float32, 1e-5)
    assert counters["stats"]["unique_graphs"] >= len(FUNCTIONS)  # each one really was compiled


def test_fusion_is_off_by_default():
    assert not fusion.enabled(torch.device("cpu")) and not fusion.enabled(torch.device("cuda"))


def _kept_elements(fn, args) -> int:
    return sum(nbytes // size for nbytes, size in saved_storages(fn, *args)[1])


def test_compiled_functions_keep_only_their_inputs(compiled, monkeypatch):
    """Compiled with an activation-memory budget of 0 (model/fusion.py), a fused function keeps what
    it cannot recompute (its inputs, at most a per-row statistic more) and recomputes the rest in
    backward; by default the short convolution kept shifted copies of its input (~4 x its size)."""
    for name, args in inputs().items():
        tensors = sum(a.numel() for a in args if torch.is_tensor(a))
        rows = args[0].shape[0] * (args[0].shape[1] if args[0].dim() == 3 else 1)
        kept = _kept_elements(FUNCTIONS[name], args)
        assert kept <= tensors + rows, f"{name}: keeps {kept} elements, its inputs have {tensors}"
    monkeypatch.setattr(fusion, "RECOMPUTE_BUDGET", 1.0)  # torch's default
    torch._dynamo.reset()
    conv = inputs()["conv"]
    default = _kept_elements(fusion.fused(short_conv_silu.eager), conv)
    assert default > 2 * conv[0].numel()  # what the budget saves (fails if the default ever changes)
