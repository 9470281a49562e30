"""The dry run's memory estimate (train/dry_run.py, train/activation_memory.py) against the measured
peak of real training steps, at several sequence lengths and recompute settings.

For each length and setting, the run that ``launch/pretrain.py`` would start with the flags after
``--`` (plus ``--seq-length``) trains ``--steps`` steps through ``train.loop.train``; the peak of
``torch.cuda.max_memory_allocated`` over those steps (less what was allocated before) is compared with
the estimate for this rank: weights + grads + optimizer state (exact) and the activation model.
Under torchrun every rank prints its own row (pipeline rank, context-parallel rank).

    python benchmarks/memory_model.py --seq-lengths 4096,8192,16384 --recompute none,all -- \\
        --config scaling-653m --bf16 --micro-batch-size 1 --global-batch-size 1 --set optimizer=adamw
    torchrun --nproc-per-node 2 benchmarks/memory_model.py --seq-lengths 16384,32768 -- \\
        --config scaling-653m --bf16 --context-parallel-size 2 --micro-batch-size 1 --global-batch-size 1

``--loss-chunk-tokens 0,4096`` also compares megatron's LM head loss with the chunked one
(``train.loss_chunk_tokens``) at every length and setting.

On a CPU it runs the steps and prints the estimates with the process's peak RSS instead (a smoke
test of the script, not a comparison).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile

GIB = 2.0**30


def estimate(run, world_size: int, pipeline_rank: int, cp_rank: int) -> tuple[float, float]:
    """(weights + grads + optimizer, activations) in bytes on this rank, from the dry run."""
    from model.model import stage_layers
    from train.activation_memory import activation_bytes
    from train.dry_run import dry_run

    report = dry_run(copy.deepcopy(run), world_size)
    lay = report.layout
    stages = lay["pipeline"] * lay["virtual_pipeline"]
    chunks = [list(stage_layers(run.model.num_layers, stages, s)) for s in range(stages)]
    mine = report.memory[pipeline_rank]
    activations = activation_bytes(run, chunks, pipeline_rank, lay["micro_batches"], lay["sequence_parallel"], cp_rank)
    return mine.weights + mine.grads + mine.optimizer, activations


def measure(run) -> float:
    """Peak bytes the training steps allocated (CUDA) or the process's peak RSS (CPU)."""
    import torch

    from train.loop import train
    from train.metrics import memory_metrics

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        run.train.run_dir = run_dir
        train(run)
    if cuda:
        return torch.cuda.max_memory_allocated() - before
    return memory_metrics().get("memory/peak_rss_gib", 0.0) * GIB


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, pretrain_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", default="4096,8192,16384", help="comma-separated --seq-length values")
    parser.add_argument("--recompute", default="none,all", help="comma-separated: none, all or layer lists 0;3")
    parser.add_argument("--loss-chunk-tokens", default="",
                        help="comma-separated train.loss_chunk_tokens values to compare, e.g. 0,4096 "
                             "(default: the run's)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(ours)
    if not pretrain_argv:
        parser.error("give the run's launch/pretrain.py flags after --, e.g. -- --config scaling-653m --bf16")

    import torch.distributed as dist
    from megatron.core import parallel_state

    from launch.pretrain import build_run_config, parse_args

    rows = []
    chunks = [int(x) for x in args.loss_chunk_tokens.split(",")] if args.loss_chunk_tokens else [None]
    for seq, setting, chunk in itertools.product(args.seq_lengths.split(","), args.recompute.split(","), chunks):
        run = build_run_config(parse_args(pretrain_argv + ["--seq-length", seq]))
        run.train.recompute_layers = "" if setting == "none" else setting.replace(";", ",")
        if chunk is not None:
            run.train.loss_chunk_tokens = chunk
        run.train.train_iters, run.train.log_interval, run.train.eval_interval = args.steps, 10**9, 0
        run.train.save = ""
        measured = measure(run)
        world = dist.get_world_size() if dist.is_initialized() else 1
        pp_rank = parallel_state.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0
        cp_rank = parallel_state.get_context_parallel_rank() if dist.is_initialized() else 0
        static, activations = estimate(run, world, pp_rank, cp_rank)
        rows.append((int(seq), setting, run.train.loss_chunk_tokens, pp_rank, cp_rank, static, activations, measured))
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"[rank {rank}] GiB: seq recompute loss-chunk | pp cp | estimate: static activations total | measured peak | "
          f"measured - static | activations measured/estimated")
    for seq, setting, chunk, pp_rank, cp_rank, static, activations, measured in rows:
        print(f"[rank {rank}] {seq:>8,} {setting:>9s} {chunk:>10,} | {pp_rank:2d} {cp_rank:2d} | {static / GIB:7.2f} "
              f"{activations / GIB:7.2f} {(static + activations) / GIB:7.2f} | {measured / GIB:7.2f} | "
              f"{(measured - static) / GIB:7.2f} | {(measured - static) / max(activations, 1):5.2f}", flush=True)
    from parallel.state import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
