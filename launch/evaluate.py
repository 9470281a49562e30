"""Evaluate a checkpoint: loss and perplexity on whole validation documents, optionally long ones only.

    python launch/evaluate.py --load RUN_OR_CHECKPOINT [--data-path PREFIX ...] [--min-document-length 8192]
        [--seq-length L] [--micro-batch-size b] [--max-tokens N] [--out FILE.json]
    torchrun --nproc-per-node N launch/evaluate.py --load ... [--tensor-model-parallel-size T ...]

``--load``: a run's save folder (its newest checkpoint) or one ``iter_*`` folder, saved with any
parallel layout. The documents are the run's validation documents (the split or ``valid_prefixes``
training used), or every document of ``--data-path``; ``--min-document-length N`` keeps those of
at least N tokens. Each document is read from its start in windows of ``--seq-length`` tokens (default:
the run's), so every token is predicted once, from the tokens before it in its own window
(docs/training.md, "Evaluation"). ``--min-document-length`` and ``--max-tokens`` default to the
run's long-document validation settings, so a checkpoint of a run trained with
``--eval-long-min-length N`` gives the ``valid_long/loss`` training logged at its step. Prints one
line, writes the result as JSON with ``--out``. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a run's save folder or an iter_* checkpoint folder")
    parser.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                        help="evaluate every document of these prepared prefixes/folders (default: the run's "
                             "validation documents)")
    parser.add_argument("--min-document-length", type=int, default=None, metavar="TOKENS",
                        help="only documents of at least this many tokens, EOS included (default: the run's "
                             "--eval-long-min-length, 0 = all documents when it had none)")
    parser.add_argument("--seq-length", type=int, default=None, help="window length (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="predict at most this many tokens (whole documents in a fixed order, the last one cut; "
                             "0: all; default: the run's train.eval_long_max_tokens)")
    parser.add_argument("--out", default=None, help="write the result here as JSON")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 weights and compute (default: as the run trained)")
    for flag in ("tensor-model", "pipeline-model", "expert-model", "context"):
        parser.add_argument(f"--{flag}-parallel-size", type=int, default=1)
    parser.add_argument("--cp-mode", default="chunkwise", help="context parallelism: chunkwise | ulysses")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from parallel.state import destroy
    from train.errors import PeerFailed, clean_error_types, report
    from train.evaluation import EvaluationRequest, evaluate_checkpoint, summary_line, write_result
    from train.loop import log

    args = parse_args(argv)
    request = EvaluationRequest(
        load=args.load, data_prefixes=args.data_path, min_document_length=args.min_document_length,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, max_tokens=args.max_tokens,
        bf16=args.bf16, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size, cp_mode=args.cp_mode, progress=not args.no_progress)
    try:
        result = evaluate_checkpoint(request)
        log(summary_line(result))
        if args.out:
            write_result(result, args.out)
    except clean_error_types() as err:
        return report(err)  # one line on one rank; exit 2
    except OSError as err:  # e.g. --out in a folder that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PeerFailed:
        return 1
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
