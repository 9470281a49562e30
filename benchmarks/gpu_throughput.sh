#!/usr/bin/env bash
# The training-throughput GPU call (issue 10) on the lent H200: the GPU-only model tests (flash
# attention over cu_seqlens, grouped experts, recompute memory, fusion, no host sync), optionally
# where the memory of a step goes (memory_probe.py), then benchmarks/train_throughput.py on
# scaling-653m over Gutenberg documents with the flags given.
# Carry .whl (megatron-core, fla-core wheels) and .gbdata (a tokenized Gutenberg shard, 32k BPE:
#   python launch/prepare_data.py --input train-00000-of-00004.jsonl.xz --text-field text \
#     --train-tokenizer --vocab-size 32768 --tokenizer /tmp/tok32k --out /tmp/gb; cp /tmp/gb/train/* .gbdata/).
# SKIP_GPU_TESTS=1 skips the tests; MEMORY_PROBE=1 adds the per-layer memory timelines;
# THROUGHPUT_TIMEOUT (s) bounds the table (its JSON keeps finished rows).
# Usage: bash benchmarks/gpu_throughput.sh --recompute --compile --contexts 4096,16384,32768 --tokens-per-step 32768
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
filter() { grep -vE "Warning|warn|^ +\"\"\"|^$"; }
[ -n "${SKIP_GPU_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_attention_gpu.py tests/model/test_grouped_experts.py \
  tests/model/test_recompute_memory_gpu.py tests/model/test_fusion_gpu.py tests/model/test_no_host_sync_gpu.py 2>&1 | tail -3
[ -z "${MEMORY_PROBE:-}" ] || for arm in kimi-linear mla; do timeout 150 python3 benchmarks/memory_probe.py --arm $arm --context 4096 --tokens 16384 --recompute \
  --data-path .gbdata/tokens_00000 2>&1 | filter | tail -45 | tee -a "$OUT/memory_probe.log"; done
timeout "${THROUGHPUT_TIMEOUT:-560}" python3 benchmarks/train_throughput.py --preset scaling-653m --bf16 --data-path .gbdata/tokens_00000 \
  --vocab-size 32768 --out "$OUT/throughput.json" "$@" 2>&1 | filter | tee "$OUT/throughput.log"
