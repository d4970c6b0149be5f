#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the tests and for rehearsing the sbatch templates before a real cluster:
# slurmctld and NODES slurmd daemons (node1, node2, ...), all on localhost, each node with every core of the machine.
#
#     sudo slurm/local_cluster.sh            # install (Debian: slurmctld slurmd slurm-client munge) and start
#     sudo slurm/local_cluster.sh status     # what runs; exit 1 when the cluster is not up
#     sudo slurm/local_cluster.sh stop       # stop the daemons (the installed packages stay)
#
# Idempotent: when the cluster is already up with this configuration it only checks it (0.05 s; ~1 s to start it).
# Environment: NODES (2): nodes to present; one slurmd per node (slurmd -N), each on its own port, so that
# `sbatch --nodes=2` runs two real job steps, one per "node", as on a cluster. Every node lives on this host, so a
# multi-node job here shares one file system and the cores, like a cluster with a shared file system.
# Needs root (the daemons run as root here; a cluster of one's own laptop, not a production set-up).
set -euo pipefail

NODES="${NODES:-2}"
ACTION="${1:-start}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
# Finished jobs stay visible to `scontrol show job` this long (the tests read JobState= and Restarts= there: a
# one-node test cluster runs no accounting database, so sacct has nothing).
MIN_JOB_AGE=3600

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

running() { pgrep -x "$1" >/dev/null 2>&1; }

status() {
    running munged || { echo "munged: not running"; return 1; }
    running slurmctld || { echo "slurmctld: not running"; return 1; }
    local up
    up="$(pgrep -xc slurmd || true)"
    [[ "$up" -ge "$NODES" ]] || { echo "slurmd: $up of $NODES running"; return 1; }
    timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | grep -Eq ' (idle|mix|alloc)' || { echo "no node is up"; return 1; }
    sinfo -N -o '%N %T %c'
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    echo "local_cluster.sh: installing slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; }
}

write_config() {
    local host cpus memory nodes="" i
    host="$(hostname)"
    cpus="$(nproc)"
    memory="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    for ((i = 1; i <= NODES; i++)); do
        nodes+="NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$memory State=UNKNOWN"$'\n'
    done
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat > "$CONF.new" <<EOF
# Written by sftdist's slurm/local_cluster.sh: a test cluster on localhost.
ClusterName=sftdist-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=$MIN_JOB_AGE
KillWait=30
InactiveLimit=0
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    [[ -s /etc/munge/munge.key ]] || { mungekey -c -f -k /etc/munge/munge.key 2>/dev/null || \
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    running munged || runuser -u munge -- munged --force
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    for _ in $(seq 50); do running slurmd || running slurmctld || return 0; sleep 0.2; done
    pkill -9 -x slurmd || true
    pkill -9 -x slurmctld || true
}

start() {
    install
    write_config
    if status >/dev/null 2>&1 && cmp -s "$CONF" "$CONF.new"; then
        rm -f "$CONF.new"
        status
        return
    fi
    if ! cmp -s "$CONF" "$CONF.new" 2>/dev/null; then
        stop  # a different configuration (another NODES, say): restart the daemons with the new one
        mv "$CONF.new" "$CONF"
    else
        rm -f "$CONF.new"
    fi
    start_munge
    running slurmctld || slurmctld
    local i
    for ((i = 1; i <= NODES; i++)); do
        pgrep -f "slurmd -N node$i\$" >/dev/null || slurmd -N "node$i"
    done
    for _ in $(seq 100); do
        if [[ "$(sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l)" -ge "$NODES" ]]; then
            status
            return
        fi
        sleep 0.2
    done
    tail -n 20 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log >&2 || true
    die "the nodes did not come up within 20 s (logs above)"
}

[[ "$(id -u)" == 0 ]] || die "needs root (it installs packages and starts the Slurm daemons)"
case "$ACTION" in
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) die "unknown action '$ACTION': start, status or stop" ;;
esac
