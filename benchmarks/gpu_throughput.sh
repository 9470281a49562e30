#!/usr/bin/env bash
# The training-throughput table on the lent H200 (issue 10): the MLA attention GPU test, then
# benchmarks/train_throughput.py on scaling-653m over Gutenberg packed documents.
# Carry .whl (megatron-core, fla-core wheels) and .gbdata (a tokenized Gutenberg shard, 32k BPE:
#   python launch/prepare_data.py --input train-00000-of-00004.jsonl.xz --text-field text \
#     --train-tokenizer --vocab-size 32768 --tokenizer /tmp/tok32k --out /tmp/gb; cp /tmp/gb/train/* .gbdata/).
# Usage: bash benchmarks/gpu_throughput.sh [extra train_throughput.py flags]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model/test_attention_gpu.py 2>&1 | tail -4
python3 benchmarks/train_throughput.py --preset scaling-653m --bf16 --data-path .gbdata/tokens_00000 \
  --vocab-size 32768 --out "$OUT/throughput.json" "$@" 2>&1 | grep -vE "Warning|warn|^ +\"\"\"|^$" | tee "$OUT/throughput.log"
