"""The chunked LM head loss on the GPU in bf16 (model/lm_head_loss.py): the same losses and
gradients as megatron's output layer + vocab-parallel cross entropy within bf16 rounding, and a
peak of the head's forward + backward that holds one chunk's logits, not the micro-batch's.
The CPU tests (fp32, TP 1 and 2, training curves) are tests/model/test_lm_head_loss.py and
tests/parallel/test_lm_head_loss_parallel.py."""

import pytest
import torch

from model.lm_head_loss import chunked_lm_head_loss

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

TOKENS, VOCAB, HIDDEN, CHUNK = 16384, 65536, 1024, 2048


def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    states = (torch.randn(TOKENS, 1, HIDDEN, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    scale = torch.rand(TOKENS, device="cuda", generator=gen)
    return states.requires_grad_(), weight.requires_grad_(), labels, scale


def head(chunk: int):
    """(losses, d states, d weight, peak bytes above what was allocated before)."""
    from megatron.core import tensor_parallel

    states, weight, labels, scale = inputs()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if chunk:
        loss = chunked_lm_head_loss(states, weight, labels, chunk)
    else:
        logits = torch.matmul(states, weight.t())
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.view(-1, 1)).view(-1)
        del logits
    (loss * scale).sum().backward()
    torch.cuda.synchronize()
    return loss.detach(), states.grad, weight.grad, torch.cuda.max_memory_allocated() - before


@pytest.fixture(scope="module")
def parallel_state():
    from parallel import state

    state.initialize(state.ParallelDims(), seed=1)
    yield
    state.destroy()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_losses_gradients_and_peak(parallel_state):
    plain, chunked = head(0), head(CHUNK)
    assert rel(chunked[0], plain[0]) < 1e-3  # fp32 losses of the same bf16 logits
    assert rel(chunked[1], plain[1]) < 2e-2 and rel(chunked[2], plain[2]) < 2e-2
    # megatron's path: bf16 logits + fp32 softmax of all tokens (6 GiB); chunked: one chunk's (0.75 GiB)
    # plus the weight's fp32 and bf16 gradients (0.38 GiB) and the states' gradient
    assert plain[3] > TOKENS * VOCAB * 6 * 0.9
    assert chunked[3] < plain[3] / 3, (chunked[3] / 2**30, plain[3] / 2**30)
