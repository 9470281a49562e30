"""Worker for test_context_parallel_training.py: the tiny mixed model's 10 training steps under
context-parallel layouts, each from scratch (layout-invariant initialisation, no shared checkpoint).

usage: cp_train_worker.py WORKDIR LAYOUT [LAYOUT ...]

LAYOUT: ``[save:|resume:]name`` with name dash-separated sizes and a mode, e.g. ``cp1``,
``cp2-chunkwise``, ``tp2-cp2-ulysses``, ``pp2-cp2-chunkwise``, ``ep2-cp2-chunkwise``,
``cp2-chunkwise-zero`` (megatron's DDP + distributed optimizer), ``cp2-chunkwise-muon`` (Muon with
QK-Clip at a threshold the MLA heads exceed, so the max-logit record under CP decides the update),
``cp2-chunkwise-bf16`` (bf16 weights and compute), ``cp2-chunkwise-losschunk`` (the chunked LM head
loss, model/lm_head_loss.py, 24 tokens a chunk: not a divisor of a rank's tokens), ``cp2-chunkwise-steps20``
(20 training steps instead of 10; benchmarks/multi_gpu.py). Sizes without a ``cp`` part (``tp2``,
``ep2``, ``pp2``) train at CP=1. The layouts of one call run one
after another in the same torchrun job (the world size must fit each; starting a job costs more
than a layout's 10 steps on 2 CPU cores). ``save:`` trains the first 5 steps and checkpoints to
WORKDIR/saved; ``resume:`` continues that checkpoint. Rank 0 writes WORKDIR/NAME/losses.json
(and metrics.jsonl: validation loss, FLOPs, MoE balance).

Every micro-batch gets extra document starts (the same at every layout; ``cu_seqlens`` is the one
source of document boundaries): in 64-token samples, starts at 16 and 17 (a length-1 document
beginning exactly at a CP=4 slice boundary, then one spanning three CP=4 ranks), at 32 (a CP=2 and
CP=4 boundary) and 63 (a length-1 document at the end); the corpus's own documents, most longer than
a sample, straddle every boundary.
"""

import json
import sys
from pathlib import Path

import torch

EXTRA_STARTS = {0: (16, 17), 1: (32, 63)}  # per sample index modulo 2


def parse(spec: str) -> tuple[str, str, dict]:
    action, _, name = spec.rpartition(":")
    sizes = {"tp": 1, "pp": 1, "ep": 1, "cp": 1}
    options = {"mode": "chunkwise", "zero": False, "muon": False, "bf16": False, "losschunk": False, "steps": 10}
    for part in name.split("-"):
        if part.startswith("steps"):
            options["steps"] = int(part[5:])
        elif part in ("chunkwise", "ulysses"):
            options["mode"] = part
        elif part in ("zero", "muon", "bf16", "losschunk"):
            options[part] = True
        else:
            sizes[part[:2]] = int(part[2:])
    return action or "train", name, {**sizes, **options}


class ExtraBoundaries:
    """A loader whose micro-batches carry the extra document starts of ``EXTRA_STARTS``."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        b, s = batch["tokens"].shape
        starts = set(batch["cu_seqlens"].tolist())
        for i in range(b):
            starts.update(i * s + x for x in EXTRA_STARTS[i % 2])
        batch["cu_seqlens"] = torch.tensor(sorted(starts), dtype=torch.int32)
        return batch

    def __getattr__(self, name):  # state_dict, load_state_dict, reset, source_shares
        return getattr(self.loader, name)


def with_extra_boundaries(run, dims):
    from train.loop import build_data

    train_loader, valid_loader = build_data(run, dims)
    return ExtraBoundaries(train_loader), ExtraBoundaries(valid_loader) if valid_loader is not None else None


def run_layout(workdir: Path, spec: str) -> None:
    import torch.distributed as dist

    from tests.parallel.train_worker import run_config
    from train.loop import train

    action, name, layout = parse(spec)
    out = workdir / (f"{action}-{name}" if action != "train" else name)
    changes = dict(context_parallel_size=layout["cp"], cp_mode=layout["mode"], eval_interval=5, eval_iters=2,
                   metrics_interval=1, run_dir=str(out), train_iters=layout["steps"])
    if layout["bf16"]:
        changes.update(bf16=True)
    if layout["muon"]:
        changes.update(optimizer="muon", qk_clip_tau=0.05)
    if layout["losschunk"]:
        changes.update(loss_chunk_tokens=24)
    if action == "save":
        changes.update(exit_interval=5, save=str(workdir / "saved"))
    elif action == "resume":  # reads step 5 and saves nothing, so that every resume starts there
        changes.update(load=str(workdir / "saved"))
    run = run_config(workdir, layout["tp"], layout["ep"], layout["pp"], zero=int(layout["zero"]), **changes)
    losses = train(run, data=with_extra_boundaries)
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()


def main(workdir: Path, specs: list[str]) -> None:
    import torch.distributed as dist

    for spec in specs:
        run_layout(workdir, spec)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
