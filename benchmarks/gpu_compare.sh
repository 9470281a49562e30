#!/usr/bin/env bash
# The identical-recipe comparison (issue 23) on one lent H200: MLA vs GDN hybrid vs Kimi Linear,
# configs/small-*.json, 2 seeds, all six runs at once on the one GPU, the Gutenberg corpus with its
# long-document validation. A call runs at most COMPARE_LIMIT seconds; the runs save when it ends and
# the next call (same warm machine) resumes them. The report and the run records come back in $OUT.
# Prepare here (docs/launch.md, "The comparison on an H200"; results: docs/comparison.md):
#   mkdir -p .gbdata/raw && cp ../shared/data/gutenberg/*.xz .gbdata/raw/
#   python launch/prepare_data.py --input .gbdata/raw/train-00000-of-00004.jsonl.xz --out .gbdata/tok/train \
#       --tokenizer .gbdata/tokenizer --train-tokenizer --vocab-size 32768
#   python launch/prepare_data.py --input .gbdata/raw/valid.jsonl.xz --out .gbdata/tok/valid --tokenizer .gbdata/tokenizer
# and carry .gbdata/tok and .gbdata/tokenizer (30 MB; or all of .gbdata to tokenize the four train shards there)
# Usage on the GPU machine: bash benchmarks/gpu_compare.sh
#   ITERS (steps per run, default 200), COMPARE_LIMIT (seconds of training this call, default 480)
#   COMPARE_ARGS: more arguments for every arm, e.g. "--set train.eval_interval=8" (a short run's recipe)
#   MPS=1: run the six processes under CUDA MPS where the machine has it (their kernels may then share
#     the GPU at once instead of time-slicing; small models leave it mostly idle); falls back if not
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
DATA=/tmp/gutenberg ROOT=/tmp/compare
# carried tokens (.gbdata/tok/{train,valid}: one train shard, 11 M tokens, is more than a short comparison
# reads) are used as they are; else the raw corpus is tokenized once per machine (the whole of it, ~90 MB
# of tokens, does not fit a call's carry)
[ -f .gbdata/tok/train/tokens_00000.idx ] && DATA=.gbdata/tok
for split in train valid; do
  case $split in train) inputs=(.gbdata/raw/train-*.jsonl.xz) ;; valid) inputs=(.gbdata/raw/valid.jsonl.xz) ;; esac
  [ -f "$DATA/$split/tokens_00000.idx" ] || python3 launch/prepare_data.py --input "${inputs[@]}" --out "$DATA/$split" \
    --tokenizer .gbdata/tokenizer --no-progress 2>&1 | tail -1
done
[ -n "${MPS:-}" ] && mps_start
timeout -s INT "${COMPARE_LIMIT:-480}" python3 launch/compare.py \
  --arm-config mla=configs/small-mla.json --arm-config gdn-h=configs/small-gdn-h.json \
  --arm-config kimi-linear=configs/small-kimi-linear.json --seeds 2 --concurrent 6 --runs-per-gpu 6 \
  --eval-long 8192 --root "$ROOT" --set train.data_prefixes="$DATA/train/tokens_00000" \
  --set train.valid_prefixes="$DATA/valid/tokens_00000" --set train.tokenizer_dir=.gbdata/tokenizer \
  --set train.train_iters="${ITERS:-200}" ${COMPARE_ARGS:-} 2>&1 | tr '\r' '\n' | grep -vE "Warning|warn" | tail -40
nvidia-smi --query-gpu=memory.used --format=csv,noheader
mps_stop
python3 launch/compare.py report "$ROOT"/*-seed* --out "$OUT" 2>&1 | tail -5
# the run records (no checkpoints) for docs/results/, as one archive: a call returns a limited number of files
(cd "$ROOT" && tar -czf "$OUT/runs.tar.gz" ./*-seed*/*.jsonl ./*-seed*/*.json)
true
