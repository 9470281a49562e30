"""Worker for test_init_layouts.py: one 4-rank launch builds the model from the seed under several
layouts, one after another, and every rank writes its local tensors with its coordinates.

    torchrun --nproc-per-node 4 tests/parallel/init_worker.py OUTDIR

OUTDIR/{layout}_rank{r}.pt: {"tp": (rank, size), "etp": (rank, size), "ep": (rank, size),
"tensors": {name: (tensor, tensor_parallel, partition_dim)}} with names as in the single-process
model (pipeline chunks' "chunks.{c}." prefix removed; layer keys are global already).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

SEED = 17
# name: (tensor, expert, pipeline, virtual pipeline)
LAYOUTS = {
    "dp4": (1, 1, 1, None),
    "ep2": (1, 2, 1, None),
    "ep4": (1, 4, 1, None),
    "tp2": (2, 1, 1, None),
    "tp4": (4, 1, 1, None),
    "tp2-ep2": (2, 2, 1, None),
    "tp2-pp2": (2, 1, 2, None),
    "pp4": (1, 1, 4, None),
    "pp2-vpp2": (1, 1, 2, 2),
}


def config():
    from tests.helpers.small_models import mixed_config

    return mixed_config()


def local_tensors(model) -> dict:
    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(tensor, torch.nn.Parameter) or name.endswith("expert_bias"):
            if name.startswith("chunks."):
                name = name.split(".", 2)[2]
            tensors[name] = (tensor.detach().clone(), bool(getattr(tensor, "tensor_model_parallel", False)),
                             int(getattr(tensor, "partition_dim", -1)))
    return tensors


def main(outdir: Path) -> None:
    from megatron.core import parallel_state as ps

    from model.model import build_model
    from parallel import state

    for layout, (tp, ep, pp, vpp) in LAYOUTS.items():
        state.initialize(state.ParallelDims(tensor=tp, expert=ep, pipeline=pp, virtual_pipeline=vpp), seed=SEED)
        model = build_model(config(), expert_parallel=ep)
        record = {
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "tensors": local_tensors(model),
        }
        torch.save(record, outdir / f"{layout}_rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
