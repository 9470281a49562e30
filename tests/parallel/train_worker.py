"""Worker for test_parallel_training.py: the same 10 training steps under different layouts.

train:  torchrun with the layout given as TP EP PP [VPP [ZERO [CHUNK]]] (ZERO=1: megatron's distributed
        optimizer; CHUNK: train.loss_chunk_tokens); every layout builds its model from the seed (no
        shared checkpoint), trains on the same global batches, and rank 0 writes the loss curve.
save-half / resume: 5 steps at one layout and a checkpoint, then the other 5 at another layout.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_config(workdir: Path, tp: int, ep: int, pp: int = 1, vpp: int = 1, zero: int = 0, **changes):
    from tests.helpers.small_models import mixed_config
    from train.config import RunConfig, TrainConfig

    train = TrainConfig(
        data_cache_dir=str(ROOT / "cache" / "data"), seq_length=64, micro_batch_size=2, global_batch_size=8,
        train_iters=10, lr=5e-3, lr_warmup_iters=2, log_interval=100, seed=3,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, distributed_optimizer=bool(zero),
    )
    for key, value in changes.items():
        setattr(train, key, value)
    return RunConfig(model=mixed_config(vocab_size=8192), train=train)


def main(mode: str, workdir: Path, tp: int, ep: int, pp: int, vpp: int = 1, zero: int = 0, chunk: int = 0) -> None:
    import torch.distributed as dist

    if mode == "save-half":  # train 5 of the 10 steps and save (model, optimizer, data position)
        from train.loop import train

        name = "resharded_zero" if zero else "resharded"
        train(run_config(workdir, tp, ep, pp, vpp, zero, exit_interval=5, save=str(workdir / name)))
    elif mode == "resume":  # continue that checkpoint at this layout
        from train.loop import train

        name = "resharded_zero" if zero else "resharded"
        losses = train(run_config(workdir, tp, ep, pp, vpp, zero, save=str(workdir / name)))
        if dist.get_rank() == 0:
            (workdir / f"resumed_tp{tp}_pp{pp}{'_zero' if zero else ''}.json").write_text(json.dumps(losses))
    else:
        from train.loop import train

        losses = train(run_config(workdir, tp, ep, pp, vpp, zero, loss_chunk_tokens=chunk))
        if dist.get_rank() == 0:
            suffix = (f"_vpp{vpp}" if vpp > 1 else "") + ("_zero" if zero else "") + (f"_chunk{chunk}" if chunk else "")
            name = f"losses_tp{tp}_ep{ep}_pp{pp}{suffix}_n{dist.get_world_size()}.json"
            (workdir / name).write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *(int(x) for x in sys.argv[3:]))
