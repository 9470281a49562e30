"""Worker for test_dry_run.py (torchrun, 2 gloo ranks): builds the tiny preset on the meta device at
real parallel layouts and writes each rank's parameter count, to compare with the dry run's; at TP2
and EP2 it also builds the real model in bf16, takes one optimizer step (AdamW and Muon, with fp32
masters) and writes the bytes of its weights, gradients and optimizer state."""

import json
import sys

import torch
import torch.distributed as dist

LAYOUTS = {  # name: ParallelDims fields
    "tp2": dict(tensor=2),
    "pp2": dict(pipeline=2),
    "vpp2": dict(pipeline=2, virtual_pipeline=2),
    "ep2": dict(expert=2),
}


def step_bytes(dims, optimizer: str) -> dict:
    """Bytes of this rank's weights, gradients and optimizer state (masters included) after one step
    of the real tiny model in bf16."""
    from model.model import build_model
    from model.presets import get_preset
    from train.config import load_run_config
    from train.optim import build_optimizer
    from train.precision import MasterWeights, to_bf16

    run = load_run_config("tiny")
    run.train.optimizer = optimizer
    model = build_model(get_preset("tiny"), expert_parallel=dims.expert)
    to_bf16(model)
    inner = build_optimizer(model, run.train)
    opt = MasterWeights(inner)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    grads = sum(p.grad.nbytes for p in model.parameters())
    opt.step()
    state = sum(v.nbytes for s in inner.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step")
    return dict(weights=sum(p.nbytes for p in model.parameters()), grads=grads,
                optimizer_bytes=state + sum(m.nbytes for m in opt.masters.values()))


def main(out_path: str) -> None:
    from megatron.core import parallel_state

    from model.model import build_model
    from model.presets import get_preset
    from parallel import state

    rows = []
    for name, fields in LAYOUTS.items():
        dims = state.initialize(state.ParallelDims(**fields))
        with torch.device("meta"):
            model = build_model(get_preset("tiny"), expert_parallel=dims.expert, initialize_weights=False)
        rows.append(dict(layout=name, rank=dist.get_rank(),
                         pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
                         parameters=sum(p.numel() for p in model.parameters())))
        if name in ("tp2", "ep2"):
            rows += [dict(layout=name, optimizer=optimizer, rank=dist.get_rank(), **step_bytes(dims, optimizer))
                     for optimizer in ("adamw", "muon")]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump([row for part in gathered for row in part], f)
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
