# Sourced by the GPU-call scripts (gpu_check.sh, gpu_throughput.sh, gpu_kda.sh) on the lent GPU machine:
# installs the carried wheels (.whl: megatron-core, fla-core) into /tmp/site, puts them and the
# repository on PYTHONPATH, prints the GPU and the versions the run used, and defines `step`.
[ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# TRITON_PACK=.triton/triton-X.tar.xz (scripts/pack_triton.sh; carry .triton): that Triton instead of
# the machine's, first on PYTHONPATH (the machine has 3.6; FLA's backward needs >= 3.7.1 on Hopper)
if [ -n "${TRITON_PACK:-}" ]; then
  [ -f /tmp/triton_pack/triton/__init__.py ] || { mkdir -p /tmp/triton_pack && tar -C /tmp/triton_pack -xJf "$TRITON_PACK"; } || exit 1
  export PYTHONPATH=/tmp/triton_pack:$PYTHONPATH
fi
# FLA autotunes its kernels for minutes in every new process; Triton keeps the results
# (cache_results) in its cache dir, and gpu_kda.sh returns them as $OUT/autotune.tar: copied to
# .triton/autotune.tar (carried), a later call starts from them
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f .triton/autotune.tar ]; then mkdir -p "$TRITON_CACHE" && tar -C "$TRITON_CACHE" -xf .triton/autotune.tar; fi
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

# step NAME SECONDS COMMAND...: runs COMMAND when NAME is in $STEPS, under its own time limit, its log
# in $OUT/NAME.log; prints the log's tail without warnings (nor lines matching the extended
# regex $STEP_HIDE). STEP_SIGNAL (default TERM) is what the time limit sends: ABRT makes a Python
# started with PYTHONFAULTHANDLER=1 print every thread's stack, to see where it hangs.
step() {
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"; local start=$SECONDS
  # -k: a run that outlives the signal (a training loop turns SIGTERM into "save at the next step",
  # and none comes while it compiles) is killed 15 s later, so it cannot hold the GPU's memory
  timeout -k 15 -s "${STEP_SIGNAL:-TERM}" "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -vE "Warning|warn${STEP_HIDE:+|$STEP_HIDE}" "$OUT/$name.log" | tail -"${STEP_TAIL:-25}"
  echo "-- $name: rc=$rc, $((SECONDS - start)) s"
}

# mps_start: CUDA MPS for the processes started after it (several small runs sharing the GPU at once
# instead of time-slicing), checked with one CUDA call; where the machine has no MPS it says so and
# leaves things as they were. mps_stop ends it (a no-op when it is not on).
mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d \
      && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "MPS: on"
  else
    echo "MPS: not available here, running without it"
    mps_stop
  fi
}
mps_stop() {
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || return 0
  echo quit | nvidia-cuda-mps-control 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
