"""Worker for test_lm_head_loss_parallel.py: on TP=2 gloo ranks, with and without sequence
parallelism, the chunked LM head loss against megatron's output layer + vocab-parallel cross
entropy on the same model; each rank writes the largest loss and per-parameter gradient errors of
its shard."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def errors_for(sequence_parallel: bool) -> dict:
    from model.model import build_model, set_loss_chunk_tokens
    from parallel import state
    from tests.helpers.small_models import mixed_config
    from train.grads import all_reduce_sequence_parallel

    state.initialize(state.ParallelDims(tensor=2), seed=9)
    model = build_model(mixed_config(first_k_dense=4), sequence_parallel=sequence_parallel)
    gen = torch.Generator().manual_seed(2)
    vocab = model.model_config.vocab_size
    tokens = torch.randint(0, vocab, (2, 40), generator=gen)
    labels = torch.randint(0, vocab, (2, 40), generator=gen)
    cu = torch.tensor([0, 17, 40, 41, 80], dtype=torch.int32)
    weights = torch.rand(2, 40, generator=gen)

    def run(chunk):
        set_loss_chunk_tokens(model, chunk)
        model.zero_grad(set_to_none=True)
        per_token = model(tokens, cu, labels=labels)
        (per_token * weights).sum().backward()
        all_reduce_sequence_parallel(model)
        return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    reference, reference_grads = run(0)
    out = {}
    for chunk in (16, 7):
        losses, grads = run(chunk)
        out[f"chunk{chunk}"] = {
            "loss": float((losses - reference).abs().max()),
            "grads": {n: float((g - reference_grads[n]).norm() / reference_grads[n].norm().clamp_min(1e-30))
                      for n, g in grads.items()},
        }
    return out


def main(workdir: Path) -> None:
    result = {"sp": errors_for(True), "no-sp": errors_for(False)}
    (workdir / f"lm_head_rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    from parallel import state

    state.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
