#!/usr/bin/env bash
# One call on a multi-GPU machine (2, 4 or 8 GPUs) of the multi-GPU validation (benchmarks/multi_gpu.py):
# loss curves of the parallel layouts against one GPU, the context-parallel KDA core's accuracy and
# scaling, the small hybrid preset's throughput and its longest context under CP. Each step is a
# multi_gpu.py call with its own time limit; all write their parts into $OUT/multi_gpu.json (+ .md).
# Usage on the GPU machine (carry .whl, .triton and cache/ with the default corpus):
#   bash benchmarks/gpu_multi.sh [steps...]
#   steps: loss cp_chunkwise cp_ulysses throughput longest_cp2 longest_cp4 longest_cp8   (default: all
#   that the GPU count allows; a call is limited to 10 minutes, so one or two steps a call: each
#   step's limit below is its worst case)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TRITON_PACK=${TRITON_PACK:-.triton/triton-3.7.1.tar.xz}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
GPUS=$(nvidia-smi -L | wc -l)
STEPS=${*:-"loss cp_chunkwise cp_ulysses throughput longest_cp2 $([ "$GPUS" -ge 4 ] && echo longest_cp4) $([ "$GPUS" -ge 8 ] && echo longest_cp8)"}
RESULT="$OUT/multi_gpu.json"
STEP_TAIL=40
# loss: the layouts of one world size share a torchrun job (--group-jobs) so that 8 GPUs fit one step
step loss 580 python3 benchmarks/multi_gpu.py --parts loss --group-jobs --job-timeout 240 --out "$RESULT"
step cp_chunkwise 580 python3 benchmarks/multi_gpu.py --parts cp_kda --cp-modes chunkwise --out "$RESULT"
step cp_ulysses 580 python3 benchmarks/multi_gpu.py --parts cp_kda --cp-modes ulysses --out "$RESULT"
step throughput 580 python3 benchmarks/multi_gpu.py --parts throughput --out "$RESULT"
# longest: two tries per CP size (the dry run's prediction, then 25 % shorter), one step per size
for cp in 2 4 8; do
  step longest_cp$cp 580 python3 benchmarks/multi_gpu.py --parts longest --cp-sizes $cp --longest-tries 2 \
    --job-timeout 270 --out "$RESULT"
done
