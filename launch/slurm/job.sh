# Sourced by launch/slurm/pretrain.sbatch and launch/slurm/sweep.sbatch inside a SLURM allocation.
# `kimi_train RUN_DIR PRETRAIN_ARGS...` runs launch/pretrain.py on every node of the allocation
# (one srun task per node, torchrun inside with c10d rendezvous on the first node) with checkpoints
# and metrics in RUN_DIR, and handles stops (docs/launch.md, "Preemption and time limits"):
#
# - SIGUSR1 to this batch shell (`--signal=B:USR1@300` before the time limit, or
#   `scancel --batch --signal=USR1 JOB`): every rank saves at the next step boundary and exits 0,
#   then the job requeues itself (KIMI_REQUEUE=0: it does not) and resumes from that checkpoint.
# - SIGTERM (scancel, preemption): the same save and exit, no self-requeue (a preempting SLURM
#   requeues the job itself when the partition's PreemptMode is REQUEUE).
#
# Settings (environment, all optional):
#   KIMI_REPO        repository root (default: the submission directory)
#   PYTHON           interpreter with the project installed (default: $KIMI_REPO/.venv/bin/python)
#   NPROC_PER_NODE   processes per node (default: the GPUs SLURM gave the node, else 1)
#   KIMI_RDZV_PORT   first rendezvous port to try (default: 15000 + job id mod 15000)
#   KIMI_REQUEUE     1 (default): requeue after a SIGUSR1 stop; 0: just exit
#   TORCHRUN_ARGS    extra torchrun flags
#   KIMI_LAUNCHER    the launcher, with torchrun's options (default: launch/torchrun.py where the
#                    repository has it, else torch's own torchrun, -m torch.distributed.run)

KIMI_REPO=${KIMI_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-$KIMI_REPO/.venv/bin/python}
KIMI_REQUEUE=${KIMI_REQUEUE:-1}
if [ -z "${KIMI_LAUNCHER:-}" ]; then
    KIMI_LAUNCHER="-m torch.distributed.run"
    if [ -f "$KIMI_REPO/launch/torchrun.py" ]; then KIMI_LAUNCHER=launch/torchrun.py; fi
fi

# --- NCCL / torch.distributed (multi-node GPU runs; unused by gloo on CPU)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                       # INFO to see rings/transports chosen
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer ends the job, no hang
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}             # no NVLink multicast (see docs/launch.md)
# Cluster-specific (set in your environment or here): the interface NCCL and gloo use between
# nodes, e.g. NCCL_SOCKET_IFNAME=ib0 / GLOO_SOCKET_IFNAME=eth0, and the InfiniBand adapters,
# e.g. NCCL_IB_HCA=mlx5. Left unset, NCCL picks them itself.

# the address of the allocation's first node (its NodeAddr: the hostname on most clusters)
kimi_master_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    echo "${addr:-$first}"
}

# a free TCP port on this node (the batch shell runs on the allocation's first node, the
# rendezvous host), starting from a number derived from the job id: concurrent jobs and the
# tasks of an array (each has its own job id) start from different ports, and a port in use
# (another job, an earlier try) is skipped
kimi_free_port() {
    local first=${KIMI_RDZV_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    "$PYTHON" - "$first" <<'EOF'
import socket, sys
first = int(sys.argv[1])
for port in range(first, first + 500):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit(f"no free port in {first}..{first + 499}; set KIMI_RDZV_PORT")
EOF
}

# kimi_event RUN_DIR EVENT [KEY=VALUE ...]: one JSON line in RUN_DIR/slurm.jsonl (what the sweep
# summary and the comparison report read: starts, stops, ends, ports)
kimi_event() {
    "$PYTHON" - "$@" <<'EOF'
import json, os, sys, time
run_dir, event, *pairs = sys.argv[1:]
record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": os.environ.get("SLURM_JOB_ID")}
for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
    if key in os.environ:
        record[key[6:].lower()] = os.environ[key]
for pair in pairs:
    key, _, value = pair.partition("=")
    record[key] = int(value) if value.lstrip("-").isdigit() else value
with open(os.path.join(run_dir, "slurm.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
EOF
}

# a stop signal reached this batch shell: pass it on (kimi_deliver) from the wait loop
kimi_stop() {
    KIMI_STOP_SIGNAL=$1
    KIMI_DELIVERED=0
    KIMI_DELIVERY_TRIES=0
    echo "job $SLURM_JOB_ID: SIG$1 received; every rank saves at its next step boundary and exits"
    kimi_event "$KIMI_RUN_DIR" signal "signal=$1"
    kimi_deliver
}

# send the stop to node.sh on every node through a step that overlaps the training step; it fails
# while a node.sh has not started yet (then the wait loop tries again), and after a minute of
# failures every process of the job's steps is signalled instead
kimi_deliver() {
    KIMI_DELIVERY_TRIES=$((KIMI_DELIVERY_TRIES + 1))
    if srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        bash -c 'f="$1/$SLURMD_NODENAME.pid"; [ -s "$f" ] && kill -s "$2" "$(cat "$f")"' \
        deliver "$KIMI_PIDS_DIR" "$KIMI_STOP_SIGNAL" 2>/dev/null; then
        KIMI_DELIVERED=1
    elif [ "$KIMI_DELIVERY_TRIES" -ge 12 ]; then
        echo "job $SLURM_JOB_ID: node.sh unreachable on some node; signalling every process of the job's steps" >&2
        scancel --signal="$KIMI_STOP_SIGNAL" "$SLURM_JOB_ID"
        KIMI_DELIVERED=1
    fi
}

# kimi_train RUN_DIR PRETRAIN_ARGS...
kimi_train() {
    KIMI_RUN_DIR=$1
    shift
    local arg
    for arg in "$@"; do
        case "$arg" in --save | --save=*)
            echo "error: the job script chooses the save folder; set RUN_DIR=... instead of passing --save" >&2
            return 2 ;;
        esac
    done
    cd "$KIMI_REPO" || return 1
    mkdir -p "$KIMI_RUN_DIR"
    KIMI_PIDS_DIR=$KIMI_RUN_DIR/.slurm/$SLURM_JOB_ID
    KIMI_STOP_SIGNAL=""
    KIMI_DELIVERED=0
    local nodes master port nproc status step_resources=()
    nodes=$SLURM_JOB_NUM_NODES
    master=$(kimi_master_addr)
    port=$(kimi_free_port) || return 1
    nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
    # srun does not pass the job's CPUs and GPUs on to a step by itself (Slurm >= 22.05): the one
    # task per node gets all that the job holds there
    step_resources+=("--cpus-per-task=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}")
    if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
        step_resources+=("--gpus-per-node=$SLURM_GPUS_ON_NODE")
    fi
    kimi_event "$KIMI_RUN_DIR" start "nodes=$nodes" "nproc_per_node=$nproc" "master=$master" "port=$port" \
        "node_list=$SLURM_JOB_NODELIST" "args=$*"
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $nproc process(es), rendezvous" \
        "$master:$port, run folder $KIMI_RUN_DIR"

    trap 'kimi_stop USR1' USR1
    trap 'kimi_stop TERM' TERM
    # shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
    srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 "${step_resources[@]}" \
        bash "$KIMI_REPO/launch/slurm/node.sh" "$KIMI_PIDS_DIR" \
        "$PYTHON" $KIMI_LAUNCHER --nnodes="$nodes" --nproc-per-node="$nproc" \
        --rdzv-backend=c10d --rdzv-endpoint="$master:$port" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 \
        ${TORCHRUN_ARGS:-} launch/pretrain.py "$@" --save "$KIMI_RUN_DIR" &
    local step=$!
    # the traps run while we wait (bash runs a trap only between commands, hence the background step)
    while kill -0 "$step" 2>/dev/null; do
        if [ -n "$KIMI_STOP_SIGNAL" ] && [ "$KIMI_DELIVERED" = 0 ]; then
            sleep 5
            kimi_deliver
        else
            wait "$step"
        fi
    done
    wait "$step"
    status=$?
    trap - USR1 TERM
    rm -rf "$KIMI_PIDS_DIR"

    echo "job $SLURM_JOB_ID: training step ended with exit code $status"
    if [ "$KIMI_STOP_SIGNAL" = USR1 ] && [ "$KIMI_REQUEUE" = 1 ]; then
        # recorded first: a requeue ends this script
        kimi_event "$KIMI_RUN_DIR" end "exit_code=$status" "stop_signal=USR1" "requeue=1"
        echo "job $SLURM_JOB_ID: requeueing; it resumes from the newest complete checkpoint in $KIMI_RUN_DIR"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return "$status"
        fi
        echo "job $SLURM_JOB_ID: requeue refused (submitted with --no-requeue?); resubmit to resume" >&2
        kimi_event "$KIMI_RUN_DIR" requeue_failed
        return "$status"
    fi
    kimi_event "$KIMI_RUN_DIR" end "exit_code=$status" "stop_signal=$KIMI_STOP_SIGNAL" "requeue=0"
    return "$status"
}
