"""Export a checkpoint of this stack to a Hugging Face ``kimi_linear`` folder.

    python launch/convert_to_hf.py --load runs/tiny --out hf/tiny [--dtype bfloat16] [--max-shard-size 5GB]

``--load`` is a save folder (its newest checkpoint is used, or ``--step N``) or an ``iter_*`` folder,
saved at any tensor/expert-parallel layout. The output holds ``config.json`` (model_type
``kimi_linear``), ``generation_config.json``, safetensors with the original checkpoint names
(``q_conv1d``, ``block_sparse_moe.experts.{e}.w1`` ...), sharded with ``model.safetensors.index.json``
when larger than ``--max-shard-size``, and the run's tokenizer (the one the training run recorded, or
``--tokenizer DIR``) with its BOS/EOS/PAD ids in both configs. Load it with
``transformers.AutoTokenizer`` and ``transformers.KimiLinearForCausalLM.from_pretrained`` (tested);
other loaders of ``kimi_linear`` folders are not tested here. Models with GDN (``G``) layers or a
bounded KDA gate cannot be exported (HF has neither).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint: a save folder or an iter_* folder")
    parser.add_argument("--out", required=True, help="output folder for the HF model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weights (A_log, dt_bias and the router stay float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--model-max-length", type=int, default=None,
                        help="model_max_length written into config.json (default: 1048576 as released)")
    parser.add_argument("--allow-group-routing-mismatch", action="store_true",
                        help="export even if grouped top-k routing differs between megatron and transformers")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer folder to ship (default: the one the training run recorded)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="the tokenizer needs its own code (e.g. Kimi's tiktoken tokenizer)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    from model.config import ConfigError
    from train.hf_checkpoint import export_checkpoint
    from parallel.state import destroy
    from train.checkpoint import CheckpointError

    try:
        out = export_checkpoint(
            args.load, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
            model_max_length=args.model_max_length, progress=not args.no_progress,
            allow_group_routing_mismatch=args.allow_group_routing_mismatch,
            tokenizer_dir=args.tokenizer, trust_remote_code=args.trust_remote_code,
        )
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
