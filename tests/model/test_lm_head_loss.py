"""The chunked LM head loss (model/lm_head_loss.py) against megatron's output layer + vocab-parallel
cross entropy on one process (fp32): per-token losses and every parameter's gradient, for chunk
sizes that divide the tokens, do not, equal them and exceed them; and it never creates a tensor as
large as the whole micro-batch's logits. TP=2 (with and without sequence parallelism) and training
runs: tests/parallel/test_lm_head_loss_parallel.py."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.lm_head_loss import chunked_lm_head_loss
from model.model import build_model, set_loss_chunk_tokens
from parallel import state
from tests.helpers.small_models import mixed_config

BATCH, SEQ = 2, 40  # 80 tokens


@pytest.fixture(scope="module")
def model():
    state.initialize(state.ParallelDims(), seed=9)
    yield build_model(mixed_config())
    state.destroy()


def inputs(vocab: int):
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels[0, 3] = -100  # a label outside the vocabulary: megatron's loss is log(sum exp), no target
    cu = torch.tensor([0, 17, 40, 41, 80], dtype=torch.int32)
    weights = torch.rand(BATCH, SEQ, generator=gen)  # a loss mask times a scale, as the step applies
    return tokens, labels, cu, weights


def loss_and_grads(model, chunk: int):
    set_loss_chunk_tokens(model, chunk)
    model.zero_grad(set_to_none=True)
    tokens, labels, cu, weights = inputs(model.model_config.vocab_size)
    per_token = model(tokens, cu, labels=labels)
    (per_token * weights).sum().backward()
    set_loss_chunk_tokens(model, 0)
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("chunk", [16, 7, 80, 1000], ids=["divides", "remainder", "all-tokens", "larger"])
def test_chunked_loss_and_gradients_equal_megatrons(model, chunk):
    reference, reference_grads = loss_and_grads(model, 0)
    losses, grads = loss_and_grads(model, chunk)
    assert losses.shape == reference.shape == (BATCH, SEQ) and losses.dtype == reference.dtype
    torch.testing.assert_close(losses, reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    errors = {n: rel(grads[n], reference_grads[n]) for n in grads}
    assert max(errors.values()) < 1e-5, errors
    assert reference_grads["output_layer.weight"].abs().sum() > 0


def test_generation_path_returns_full_logits(model):
    """Without labels the flag changes nothing: logits [B, S, vocab] as before."""
    tokens, _, cu, _ = inputs(model.model_config.vocab_size)
    with torch.no_grad():
        plain = model(tokens, cu)
        set_loss_chunk_tokens(model, 8)
        chunked = model(tokens, cu)
        set_loss_chunk_tokens(model, 0)
    assert chunked.shape == (BATCH, SEQ, model.model_config.vocab_size)
    assert torch.equal(plain, chunked)


def test_negative_chunk_is_refused(model):
    with pytest.raises(ValueError, match="must be >= 0"):
        set_loss_chunk_tokens(model, -1)
    with pytest.raises(ValueError, match="must be positive"):
        chunked_lm_head_loss(torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, dtype=torch.long), 0)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op creates under it (weakly held: nothing is kept alive)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.untyped_storage().nbytes() // value.element_size())
                self.refs.append(weakref.ref(value))
        return out


def head_forward_backward(chunk: int, tokens=256, vocab=512, hidden=16) -> int:
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(tokens, 1, hidden, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    with LargestTensor() as probe:
        if chunk:
            loss = chunked_lm_head_loss(states, weight, labels, chunk)
        else:
            from megatron.core import tensor_parallel

            logits = (states @ weight.t()).float()
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.view(-1, 1))
        loss.sum().backward()
    return probe.largest


@pytest.mark.parametrize("chunk", [1000, 48], ids=["one-chunk", "chunks"])
def test_head_function_equals_megatrons_head(model, chunk):
    """The function itself, also for one chunk longer than the tokens (the model takes megatron's
    path then): losses and the gradients of the hidden states and the weight."""
    def grads(chunk):
        gen = torch.Generator().manual_seed(1)
        states = torch.randn(200, 1, 16, generator=gen, requires_grad=True)
        weight = torch.randn(96, 16, generator=gen, requires_grad=True)
        labels = torch.randint(0, 96, (200,), generator=gen)
        scale = torch.rand(200, generator=gen)
        if chunk:
            loss = chunked_lm_head_loss(states, weight, labels, chunk)
        else:
            from megatron.core import tensor_parallel

            logits = torch.matmul(states, weight.t()).float()
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.view(-1, 1)).view(-1)
        (loss * scale).sum().backward()
        return loss.detach(), states.grad, weight.grad

    for got, want in zip(grads(chunk), grads(0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_head_never_creates_the_whole_logits(model):
    """The largest tensor of the head's forward + backward: one chunk's logits (32 x 512), or the
    weight's gradient (512 x 16), not the micro-batch's logits (256 x 512) as megatron's path does."""
    assert head_forward_backward(0) >= 256 * 512
    assert head_forward_backward(32) == 32 * 512
