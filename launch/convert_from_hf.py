"""Import a Hugging Face ``kimi_linear`` folder as a checkpoint of this stack.

    python launch/convert_from_hf.py --hf hf/kimi-linear --save runs/imported
    torchrun --nproc-per-node 2 launch/pretrain.py --config runs/imported/run.json --load runs/imported ...

Reads ``config.json`` and the safetensors (one file or sharded with an index; the original names of
the released checkpoint or the runtime names transformers uses, e.g. ``conv1d.weight``,
``forget_gate.*``, ``mlp.experts.gate_up_proj``), builds the matching model config (a clear error
names any setting our model cannot represent) and writes ``SAVE/iter_0000000`` (step 0, no optimizer
state) plus ``SAVE/run.json`` holding the model config for ``pretrain.py --config``. The checkpoint
is reshardable: load it at any tensor-parallel size.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("--save", required=True, help="checkpoint save folder to write")
    parser.add_argument("--name", default=None, help="model name stored in the config (default: the folder name)")
    parser.add_argument("--allow-group-routing-mismatch", action="store_true",
                        help="import even if grouped top-k routing differs between transformers and megatron")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    from model.config import ConfigError
    from train.hf_checkpoint import import_hf_folder
    from parallel.state import destroy
    from train.checkpoint import CheckpointError

    try:
        path = import_hf_folder(
            args.hf, args.save, name=args.name, progress=not args.no_progress,
            allow_group_routing_mismatch=args.allow_group_routing_mismatch,
        )
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
