#!/usr/bin/env bash
# One GPU session: kernel tests on the GPU, the KDA benchmark, and short real training runs of the
# stack (bf16 autocast, Triton KDA path) with AdamW and Muon. Results under $OUT.
# Usage on the lent GPU machine (wheels for megatron-core and fla-core in .whl/, the default
# corpus cache in cache/data):  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
echo "== kernel tests on the GPU"
timeout 240 python3 -m pytest tests/kernels -q -x -p no:cacheprovider -n 8 2>&1 | tail -8 | tee "$OUT/kernel_tests.txt"
echo "== KDA benchmark"
timeout 120 python3 benchmarks/kda.py --shapes 8x4096,1x32768 --out "$OUT/kda_bench.json" 2>&1 | tail -12
timeout 60 python3 benchmarks/kda.py --gate raw --shapes 8x4096 --out "$OUT/kda_bench_raw.json" 2>&1 | tail -6
echo "== training smoke (tiny, bf16, Triton KDA)"
for opt in adamw muon; do
  timeout 120 python3 launch/pretrain.py --config tiny --train-iters 40 --bf16 --log-interval 10 \
    --set train.data_cache_dir=cache/data --set train.optimizer=$opt --save /tmp/run_$opt 2>&1 \
    | grep -E "^step|error|Error" | tail -5
done
echo "== scaling-653m (Kimi Linear arm), 4k context, bf16, 6 steps"
timeout 180 python3 launch/pretrain.py --config scaling-653m --train-iters 6 --bf16 --log-interval 1 \
  --seq-length 4096 --micro-batch-size 2 --global-batch-size 2 --set train.data_cache_dir=cache/data \
  --set model.vocab_size=8192 --set train.lr_warmup_iters=2 2>&1 | grep -E "^step|rror" | tail -7
