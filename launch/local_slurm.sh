#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests and CI (no systemd needed).
#
#   launch/local_slurm.sh start   install slurmctld/slurmd/slurm-client/munge with apt-get when
#                                 missing, write slurm.conf from nproc and /proc/meminfo, start
#                                 munged, slurmctld and slurmd, wait until the node is idle.
#                                 Prints "started" when it started daemons, "running" when a working
#                                 Slurm answered already (then it starts nothing).
#   launch/local_slurm.sh stop    stop the daemons this script started, by the PIDs it recorded.
#   launch/local_slurm.sh status  exit 0 when `sinfo` answers.
#
# Idempotent: `start` twice starts nothing the second time; `stop` only kills PIDs from its own
# state folder ($TITANS_SLURM_STATE, default /run/titans-slurm), never daemons it did not start.
# Needs root (apt-get, /etc/slurm, /run). Slurm 22.05 (Debian 12) is what it is tested with.
set -euo pipefail

STATE=${TITANS_SLURM_STATE:-/run/titans-slurm}
CONF=/etc/slurm/slurm.conf
PARTITION=${TITANS_SLURM_PARTITION:-debug}

die() { echo "local_slurm: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm); use sudo"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || die "Slurm is missing (${missing[*]}) and apt-get is not available: \
install slurmctld slurmd slurm-client munge by hand"
    echo "local_slurm: installing ${missing[*]} with apt-get (~1 min)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed: no package registry reachable?"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

write_conf() {
    local cpus mem_mb
    # not plain nproc: it reports OMP_NUM_THREADS when that is set (test runners set it to 1)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # RealMemory in MB, 90% of the total so that slurmd never reports less than configured
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && ! grep -q "^# written by titans_pretrain" "$CONF"; then
        cp "$CONF" "$STATE/slurm.conf.orig"  # someone else's: keep a copy, put it back on stop
    fi
    cat >"$CONF" <<EOF
# written by titans_pretrain launch/local_slurm.sh: a one-node test cluster
ClusterName=test
SlurmctldHost=localhost
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
KillWait=30
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

wait_idle() {
    for _ in $(seq 1 100); do
        if sinfo -h -N -o "%T" 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.2
    done
    die "the node did not become idle within 20 s; see $STATE/slurmctld.log and $STATE/slurmd.log"
}

start() {
    need_root
    if sinfo -h >/dev/null 2>&1; then  # a controller answers: start nothing beside it
        wait_idle
        echo running
        return 0
    fi
    install_packages
    mkdir -p "$STATE/slurmctld" "$STATE/slurmd" /var/log/munge /run/munge /etc/munge
    write_conf
    if [ ! -s /etc/munge/munge.key ]; then
        if [ -x /usr/sbin/create-munge-key ]; then /usr/sbin/create-munge-key -f >/dev/null
        else mungekey --create --force; fi
    fi
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        munged --force --pid-file="$STATE/munged.pid"
    fi
    # -c: clear state from an earlier run (stale jobs would otherwise come back)
    slurmctld -c
    slurmd
    wait_idle
    echo started
}

stop_pid() {  # stop_pid NAME: SIGTERM the PID in $STATE/NAME.pid, wait, SIGKILL if needed
    local file="$STATE/$1.pid" pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

stop() {
    need_root
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    if [ -f "$STATE/slurm.conf.orig" ]; then mv "$STATE/slurm.conf.orig" "$CONF"; fi
    echo stopped
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -h >/dev/null 2>&1 ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
