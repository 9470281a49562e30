#!/usr/bin/env bash
# GPU call: where the memory of a Kimi Linear scaling-653m step goes (benchmarks/memory_probe.py),
# then the throughput table (train_throughput.py) with the arguments given. Carry .whl and .gbdata
# (see gpu_throughput.sh). Usage: bash benchmarks/gpu_probe.sh [train_throughput.py flags]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 150 python3 benchmarks/memory_probe.py --arm kimi-linear --context 4096 --tokens 32768 --recompute \
  --data-path .gbdata/tokens_00000 2>&1 | grep -vE "Warning|warn|^ +\"\"\"|^$" | tail -25 | tee "$OUT/memory_probe.log"
python3 benchmarks/train_throughput.py --preset scaling-653m --bf16 --data-path .gbdata/tokens_00000 \
  --vocab-size 32768 --out "$OUT/throughput.json" "$@" 2>&1 | grep -vE "Warning|warn|^ +\"\"\"|^$" | tee "$OUT/throughput.log"
