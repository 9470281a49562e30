#!/usr/bin/env bash
# The one task that srun starts on every node of a training job (launch/slurm/job.sh runs it):
#
#     node.sh PIDS_DIR torchrun ARGS...
#
# It starts the launcher and makes a stop reach the ranks, and only them:
# - the launcher runs with SIGUSR1 and SIGTERM ignored. Left alone, torchrun dies of SIGUSR1
#   (leaving the ranks without a parent) and answers SIGTERM by signalling each rank's whole
#   process group, which also stops the helper processes a rank uses to write checkpoints, in the
#   middle of the save.
# - SIGUSR1 or SIGTERM sent to this script goes to the launcher's children, the ranks: they save
#   at the next step boundary and exit 0, and torchrun then exits 0.
# - The ranks inherit the ignored signals until the training loop installs its handlers (seconds
#   to minutes after the start), so each rank gets the signal as soon as it catches it (its SigCgt
#   mask in /proc/PID/status), and exactly once: a second one could reach a rank in interpreter
#   shutdown, where Python has restored the default action (death). Later stops are not passed on.
# Its pid goes to PIDS_DIR/<node>.pid, so that the batch script can signal it on every node.
set -u

pids_dir=$1
shift
node=${SLURMD_NODENAME:-$(hostname -s)}

# torchrun catches these signals itself (and would pass them on to the process groups): not TERM
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

(trap '' USR1 TERM; exec "$@") &
launcher=$!
mkdir -p "$pids_dir"
echo $$ >"$pids_dir/$node.pid"

catches() {  # catches PID SIGNUM: the process has a handler for the signal
    local mask
    mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)
    [ -n "$mask" ] && (((16#$mask >> ($2 - 1)) & 1))
}

# deliver SIGNAME: signal every rank once, as soon as it catches the signal
deliver() {
    local number signalled=" " pid
    number=$(kill -l "$1")
    while kill -0 "$launcher" 2>/dev/null; do
        for pid in $(pgrep -P "$launcher"); do
            case "$signalled" in *" $pid "*) continue ;; esac
            if catches "$pid" "$number"; then
                kill "-$1" "$pid" 2>/dev/null && signalled="$signalled$pid "
                echo "[$node] SIG$1 sent to rank process $pid" >&2
            fi
        done
        sleep 1
    done
}

courier=""
forward() {  # the first stop signal only: a rank must not get a second one (see above)
    if [ -n "$courier" ]; then
        echo "[$node] SIG$1 received: a stop is already on its way to the ranks" >&2
        return
    fi
    echo "[$node] SIG$1 received: passing it to the ranks (children of launcher $launcher)" >&2
    deliver "$1" &
    courier=$!
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# a trapped signal interrupts wait; keep waiting until the launcher has really exited
status=0
while :; do
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break
done
if [ -n "$courier" ]; then kill "$courier" 2>/dev/null; fi
rm -f "$pids_dir/$node.pid"
exit "$status"
