"""Worker for test_tensor_parallel.py (run under torchrun with gloo ranks).

reference (1 rank):  build the model, save its weights as a checkpoint, forward+backward, save the
                     loss, logits and every gradient.
tp (2 ranks, TP=2):  load that checkpoint (megatron reshards it), forward+backward, save loss and
                     logits, write the gradients as a sharded checkpoint, and record whether the
                     replicated parameters got identical gradients on both TP ranks.
compare (1 rank):    load the TP=2 gradient checkpoint into a TP=1 model, compare with reference.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def batch(vocab: int):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (2, 80), generator=gen)
    labels = torch.randint(0, vocab, (2, 80), generator=gen)
    cu_seqlens = torch.tensor([0, 37, 80, 81, 150, 160], dtype=torch.int32)  # docs cross chunks, one of length 1
    return tokens, labels, cu_seqlens


VARIANT = "moe"


def setup(tp: int):
    from parallel import state
    from tests.helpers.small_models import mixed_config
    from model.model import build_model

    state.initialize(state.ParallelDims(tensor=tp), seed=7)
    # "moe": MoE layers, so TP=2 runs with sequence parallelism; "dense": no MoE, plain TP
    config = mixed_config() if VARIANT == "moe" else mixed_config(first_k_dense=4)
    model = build_model(config)
    return config, model


def forward_backward(model, config):
    tokens, labels, cu = batch(config.vocab_size)
    loss = model(tokens, cu, labels=labels).mean()
    loss.backward()
    from train.grads import all_reduce_sequence_parallel

    all_reduce_sequence_parallel(model)
    with torch.no_grad():
        logits = model(tokens, cu)
    return loss.detach(), logits


def main(mode: str, workdir: Path) -> None:
    from megatron.core import dist_checkpointing

    if mode == "reference":
        config, model = setup(1)
        gen = torch.Generator().manual_seed(3)
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 0.2)  # routing must depend on it
        (workdir / "init").mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(workdir / "init"))
        loss, logits = forward_backward(model, config)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save({"loss": loss, "logits": logits, "grads": grads}, workdir / "reference.pt")
    elif mode == "compare":
        config, model = setup(1)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(workdir / "grads_tp"))
        model.load_state_dict(state, strict=False)
        reference = torch.load(workdir / "reference.pt")
        errors = {}
        for name, param in model.named_parameters():
            ref = reference["grads"][name]
            errors[name] = float((param.data - ref).norm() / ref.norm().clamp_min(1e-30))
        print("max relative gradient error TP2 vs TP1:", max(errors.values()))
        (workdir / "compare.json").write_text(json.dumps(errors, indent=1))


def tp_mode(workdir: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    config, model = setup(2)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(workdir / "init"))
    model.load_state_dict(state, strict=False)
    loss, logits = forward_backward(model, config)
    mismatch = {}
    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            gathered = [torch.empty_like(param.grad) for _ in range(2)]
            dist.all_gather(gathered, param.grad.contiguous(), group=group)
            mismatch[name] = float((gathered[0] - gathered[1]).abs().max())
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
    (workdir / "grads_tp").mkdir(exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(workdir / "grads_tp"))
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "logits": logits, "replica_mismatch": mismatch}, workdir / "tp.pt")


if __name__ == "__main__":
    mode, workdir, VARIANT = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if mode == "tp":
        tp_mode(workdir)
    else:
        main(mode, workdir)
    dist.barrier()
    dist.destroy_process_group()
