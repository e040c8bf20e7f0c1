#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine, for the tests and for trying `perennial
# slurm` by hand: Debian's slurmctld + slurmd + munge, loopback only, no cgroups or systemd.
#
#   scripts/setup_slurm.sh        # idempotent; exits non-zero with a message if it cannot
#
# The daemons (munged, slurmctld, slurmd) stay running in the background afterwards; stop them
# with `scripts/setup_slurm.sh --stop`. Logs: /var/log/slurm/. Needs root (apt-get, daemons).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
SPOOL=/var/spool/slurm
NODE="$(hostname -s)"

die() { echo "setup_slurm: $*" >&2; exit 1; }

stop_daemons() {
    for daemon in slurmd slurmctld munged; do
        pid_file="/run/$daemon.pid"
        [[ $daemon == munged ]] && pid_file=/run/munge/munged.pid
        if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
            kill "$(cat "$pid_file")"
        fi
    done
}

cluster_ready() {
    command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP \
        && sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_config() {
    # The node's real CPU layout and memory, as slurmd itself detects them.
    local hardware
    hardware="$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')"
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/ctld" "$SPOOL/d"
    cat > "$CONF" <<EOF
# Written by scripts/setup_slurm.sh: a one-node, loopback-only test cluster.
ClusterName=perennial
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munge does not answer (see /var/log/munge/munged.log)"
}

start_daemon() {  # name, then its command line
    local name=$1 pid_file="/run/$1.pid"
    shift
    if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        return
    fi
    "$@" || die "$name did not start (see $LOG_DIR/$name.log)"
}

wait_until_ready() {
    for _ in $(seq 60); do
        if cluster_ready; then
            return
        fi
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N -l >&2 || true
    die "the node did not become idle (see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log)"
}

main() {
    if [[ ${1:-} == --stop ]]; then
        stop_daemons
        return
    fi
    if cluster_ready; then
        echo "setup_slurm: cluster already up ($(sinfo -h -o '%P %D %C'))"
        return
    fi
    install_packages
    [[ $(id -u) -eq 0 ]] || die "starting the Slurm daemons needs root"
    write_config
    start_munge
    start_daemon slurmctld /usr/sbin/slurmctld
    start_daemon slurmd /usr/sbin/slurmd
    wait_until_ready
    echo "setup_slurm: cluster up: partition debug, node $NODE ($(sinfo -h -o '%C' | cut -d/ -f4) CPUs)"
}

main "$@"
