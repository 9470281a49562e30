"""Worker for test_dry_run.py (torchrun, 2 gloo ranks): builds the tiny preset on the meta device at
real parallel layouts and writes each rank's parameter count, to compare with the dry run's."""

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
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump([row for part in gathered for row in part], f)
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
