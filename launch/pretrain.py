"""Pretrain a Kimi Linear (or MLA / GDN-hybrid) model.

    torchrun --nproc-per-node 2 launch/pretrain.py --config tiny --train-iters 200 --save runs/tiny

``--config`` is a preset name (``tiny``, ``kimi-linear-48b-a3b``, ``scaling-653m``, ...) or a JSON
file. Any field is overridable: ``--set train.lr=1e-3 --set model.layer_pattern=GGGA`` (the
section may be left out when the name is unique). Runs on GPUs (nccl) or CPUs (gloo). ``--dry-run``
prints the model's size, layers, FLOPs per token and memory per GPU for the parallel flags instead
of training (one process; the model is built on the meta device).

SIGTERM or SIGUSR1 saves a checkpoint and exits 0; errors in the command or its inputs print one
line and exit 2, a diverged run exits 3. Under a cluster scheduler launch it with
``launch/torchrun.py`` (torchrun's options, same meaning) so that a signal to the launcher reaches
the ranks: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from train.config import FLAG_FIELDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name or JSON run file")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any model./train. field (repeatable)")
    for name, kind in FLAG_FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="indexed dataset prefixes, optionally weighted: W1 P1 W2 P2 ...")
    parser.add_argument("--sequence-parallel", action="store_true", default=None)
    parser.add_argument("--bf16", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true", default=None,
                        help="fuse the norms with torch.compile (CUDA only; the KDA short convolutions take "
                             "their Triton kernels there either way)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device and print its size, layers, FLOPs per token "
                             "and the estimated memory per GPU for the parallel flags; train nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs of the run, for --dry-run (default: the smallest that fits, DP = EP)")
    parser.add_argument("--find-max-seq-length", action="store_true",
                        help="with --dry-run: the longest --seq-length whose memory estimate fits each GPU of "
                             "this layout (context parallelism included), with the run's recompute setting, "
                             "none and all, and all with the loss in chunks of 4096 tokens (--loss-chunk-tokens) "
                             "if the run does not chunk it")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory of one GPU in GiB as CUDA reports it, for --find-max-seq-length (default "
                             "139.8: an H200, sold as 141 GB); the search leaves 2 GiB and 5%% of the rest free")
    return parser.parse_args(argv)


def build_run_config(args: argparse.Namespace):
    from train.config import FLAG_FIELDS, apply_override, load_run_config

    run = load_run_config(args.config)
    for name in FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            setattr(run.train, name, value)
    if args.sequence_parallel:
        run.train.sequence_parallel = True
    if args.bf16:
        run.train.bf16 = True
    if args.compile:
        run.train.compile = True
    if args.data_path:
        items = args.data_path
        if len(items) % 2 == 0 and all(_is_number(x) for x in items[::2]):
            run.train.data_weights = [float(x) for x in items[::2]]
            run.train.data_prefixes = list(items[1::2])
        else:
            run.train.data_prefixes = list(items)
    for assignment in args.set:
        apply_override(run, assignment)
    if run.train.save and not run.train.run_dir:
        run.train.run_dir = run.train.save
    return run


def _longest_sequences(run, args) -> str:
    """--dry-run --find-max-seq-length: the report at the longest length for the run's recompute
    setting, then the longest length with that setting, with none and with all layers recomputed (with
    the run's loss chunking), and, when the run does not chunk its loss, with all layers recomputed
    and the loss in chunks of SUGGESTED_LOSS_CHUNK_TOKENS."""
    import copy

    from train.dry_run import (DEFAULT_DEVICE_MEMORY_GIB, SUGGESTED_LOSS_CHUNK_TOKENS, dry_run, find_max_seq_length,
                               format_fits, format_report)

    memory = DEFAULT_DEVICE_MEMORY_GIB if args.device_memory_gib is None else args.device_memory_gib
    chunk = run.train.loss_chunk_tokens
    settings = [(recompute, chunk) for recompute in dict.fromkeys([run.train.recompute_layers, "", "all"])]
    if not chunk:
        settings.append(("all", SUGGESTED_LOSS_CHUNK_TOKENS))
    fits = []
    for recompute, chunk_tokens in settings:
        variant = copy.deepcopy(run)
        variant.train.recompute_layers, variant.train.loss_chunk_tokens = recompute, chunk_tokens
        fits.append(find_max_seq_length(variant, args.world_size, memory))
    text = ""
    if fits[0].seq_length:
        run.train.seq_length, run.train.global_batch_tokens = fits[0].seq_length, 0
        text = format_report(dry_run(run, args.world_size)) + "\n"
    return text + format_fits(fits, run.train.micro_batch_size)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def main(argv=None) -> int:
    from train import signals

    signals.install()  # first: a stop request during the (long) start-up is kept, not fatal
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from parallel.state import destroy
    from train.errors import ConfigError, PeerFailed, clean_error_types, report
    from train.loop import train

    args = parse_args(argv)
    try:
        run = build_run_config(args)
        if (args.find_max_seq_length or args.device_memory_gib is not None) and not args.dry_run:
            raise ConfigError("--find-max-seq-length and --device-memory-gib belong to --dry-run: add --dry-run")
        if args.device_memory_gib is not None and not args.find_max_seq_length:
            raise ConfigError("--device-memory-gib is the budget of --find-max-seq-length: add --find-max-seq-length")
        if args.dry_run:
            from train.dry_run import dry_run, format_report

            if args.find_max_seq_length:
                print(_longest_sequences(run, args), flush=True)
            else:
                print(format_report(dry_run(run, args.world_size)), flush=True)
            return 0
        train(run)
    except clean_error_types() as err:
        return report(err)  # one line on one rank; exit 2 (fix the command) or 3 (diverged)
    except PeerFailed:
        return 1  # the rank that crashed printed the traceback
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
