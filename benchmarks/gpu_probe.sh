#!/usr/bin/env bash
# GPU call: the GPU-only model tests (flash attention over cu_seqlens, grouped experts), per-step
# memory of a Kimi Linear scaling-653m run at 4k x 8 with recompute, then the throughput of the
# MLA and Kimi Linear arms at 4k (carry .whl and .gbdata, see gpu_throughput.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_attention_gpu.py tests/model/test_grouped_experts.py 2>&1 | tail -3
timeout 150 python3 launch/pretrain.py --config scaling-653m --train-iters 4 --bf16 --log-interval 1 --seq-length 4096 \
  --micro-batch-size 8 --global-batch-size 8 --data-path .gbdata/tokens_00000 --set train.recompute_layers=all \
  --set train.metrics_interval=0 --set train.lr_warmup_iters=1 2>&1 | grep -E "^step|rror|memory" | tee "$OUT/probe.log"
timeout 250 python3 benchmarks/train_throughput.py --preset scaling-653m --bf16 --data-path .gbdata/tokens_00000 \
  --vocab-size 32768 --arms kimi-linear,mla --contexts 4096 --recompute --steps 3 --no-transformers \
  --out "$OUT/throughput.json" 2>&1 | grep -vE "Warning|warn|^ +\"\"\"|^$" | tail -14
