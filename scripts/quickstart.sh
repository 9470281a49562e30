#!/usr/bin/env bash
# One command from a fresh clone: environment, then 200 steps of the tiny model on 2 processes
# (real English text: the Python documentation every CPython ships), with a checkpoint at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 launch/pretrain.py --config tiny \
    --train-iters "${TRAIN_ITERS:-200}" --save "${SAVE:-runs/tiny}" "$@"
