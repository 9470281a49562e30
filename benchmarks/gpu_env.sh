# Sourced by the GPU-call scripts (gpu_check.sh, gpu_throughput.sh, gpu_kda.sh) on the lent GPU machine:
# installs the carried wheels (.whl: megatron-core, fla-core) into /tmp/site, puts them and the
# repository on PYTHONPATH, prints the GPU and the versions the run used, and defines `step`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

# step NAME SECONDS COMMAND...: runs COMMAND when NAME is in $STEPS, under its own time limit, its log
# in $OUT/NAME.log; prints the log's tail without warnings (nor lines matching the extended
# regex $STEP_HIDE).
step() {
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"; local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -vE "Warning|warn${STEP_HIDE:+|$STEP_HIDE}" "$OUT/$name.log" | tail -"${STEP_TAIL:-25}"
  echo "-- $name: rc=$rc, $((SECONDS - start)) s"
}
