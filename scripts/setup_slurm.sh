#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (controller + compute node on localhost), for the
# launch tests in CI and for developers trying the sbatch scripts. Needs root (or sudo). Safe to
# run again: installs only what is missing, rewrites slurm.conf only when it changed, starts only
# the daemons that are not running, and brings the node back to service.
#
#   bash scripts/setup_slurm.sh            # install + configure + start
#   bash scripts/setup_slurm.sh --stop     # stop the daemons this script started
#
# Environment: SLURM_CPUS (CPUs the node offers; default 2, the CI machine's cores).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
    echo "error: setup_slurm.sh needs root (apt-get, daemons); run it as root or install sudo" >&2
    exit 1
fi

NODE=$(hostname -s)
CPUS=${SLURM_CPUS:-2}
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

alive() {  # alive PID: running (a zombie, which kill -0 still finds, is not)
    [ -n "$1" ] && [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

running() {  # running PIDFILE NAME: alive and still NAME (after a reboot the pid may be another process's)
    local pid
    pid=$(cat "$1" 2>/dev/null || true)  # no pid file: not running (and no exit under set -e)
    alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    if running "$2" "$1"; then
        kill "$pid"
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        echo "stopped $1"
    fi
}

if [ "${1:-}" = "--stop" ]; then
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
    exit 0
fi

# --- packages (Debian's slurm-wlm 22.05 on bookworm)
missing=()
for pkg in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # quiet on success; on a failure (seen once on a fresh machine, cause not kept) show why and try
    # once more after finishing any half-configured package
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" > /tmp/setup_slurm_apt.log 2>&1; then
        echo "apt-get install failed, retrying once; its output:" >&2
        tail -n 20 /tmp/setup_slurm_apt.log >&2
        dpkg --configure -a || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" > /tmp/setup_slurm_apt.log 2>&1 ||
            { tail -n 40 /tmp/setup_slurm_apt.log >&2; echo "error: could not install ${missing[*]}" >&2; exit 1; }
    fi
fi

# --- munge: the authentication daemon every SLURM command talks through
mkdir -p /run/munge /etc/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /run/munge /etc/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "error: munged did not start (see /var/log/munge)" >&2; exit 1; }
fi

# --- slurm.conf: one node that is also the controller; jobs are plain processes (no cgroups)
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
conf=$(mktemp)
cat >"$conf" <<EOF
# written by scripts/setup_slurm.sh: a one-node test cluster
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
# small test jobs should start and finish quickly
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
changed=0
if ! cmp -s "$conf" "$CONF_DIR/slurm.conf"; then
    install -m 0644 "$conf" "$CONF_DIR/slurm.conf"
    changed=1
fi
rm -f "$conf"

if [ "$changed" = 1 ]; then  # daemons started with an older file reread it by restarting
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi
running "$RUN_DIR/slurmctld.pid" slurmctld || /usr/sbin/slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping | grep -q UP || { echo "error: slurmctld did not start; see $LOG_DIR/slurmctld.log" >&2; exit 1; }
running "$RUN_DIR/slurmd.pid" slurmd || /usr/sbin/slurmd

# --- the node is idle (a restarted slurmd can leave it DOWN or DRAINED)
for _ in $(seq 100); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*) break ;;
        down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
state=$(sinfo -h -n "$NODE" -o %T)
case "$state" in
    idle*|mixed*|allocated*) echo "slurm ready: node $NODE ($CPUS CPUs) is $state; partition debug" ;;
    *) echo "error: node $NODE is '$state'; see $LOG_DIR/slurmd.log and $LOG_DIR/slurmctld.log" >&2; exit 1 ;;
esac
