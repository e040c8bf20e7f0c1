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

wait_stopped() {
    for _ in $(seq 50); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.2
    done
    die "slurmctld/slurmd did not stop"
}

cluster_ready() {
    command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP \
        && sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o Acquire::Retries=1 -o Acquire::http::Timeout=20 >/dev/null \
        || die "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

render_config() {
    # The node's real CPU layout and memory, as slurmd itself detects them.
    local hardware
    hardware="$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')"
    cat <<EOF
# Written by scripts/setup_slurm.sh: a one-node, loopback-only test cluster.
# GresTypes=gpu lets sbatch understand GPU requests (this node has none to give).
ClusterName=perennial
GresTypes=gpu
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

loopback_only() {  # no Slurm daemon listens beyond this machine
    ! ss -Hltnp 2>/dev/null | grep -E 'slurmctld|slurmd' | awk '{print $4}' \
        | grep -qvE '^(127\.0\.0\.1|\[::1\]):'
}

config_current() {  # the running cluster uses exactly the configuration this script writes
    [[ -f $CONF ]] && command -v slurmd >/dev/null && cmp -s "$CONF" <(render_config)
}

write_config() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/ctld" "$SPOOL/d"
    render_config > "$CONF"
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

# Slurm has no setting for the address its daemons listen on (they bind every interface), so
# they start with a small LD_PRELOAD shim that turns a bind to "any address" into loopback.
SHIM=/usr/local/lib/perennial-bind-loopback.so

build_loopback_shim() {
    [[ -f $SHIM ]] && return
    command -v gcc >/dev/null || { echo "setup_slurm: no gcc; daemons bind all interfaces" >&2; return; }
    local src
    src="$(mktemp --suffix=.c)"
    cat > "$src" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real(fd, (struct sockaddr *)&in4, sizeof in4);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (!memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6.sin6_addr)) in6.sin6_addr = in6addr_loopback;
        return real(fd, (struct sockaddr *)&in6, sizeof in6);
    }
    return real(fd, addr, len);
}
C
    mkdir -p "$(dirname "$SHIM")"
    gcc -shared -fPIC -O2 -o "$SHIM" "$src" -ldl || echo "setup_slurm: shim did not build" >&2
    rm -f "$src"
}

start_daemon() {  # name, then its command line
    local name=$1 pid_file="/run/$1.pid"
    shift
    if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        return
    fi
    local preload=""
    [[ -f $SHIM ]] && preload=$SHIM
    LD_PRELOAD=$preload "$@" || die "$name did not start (see $LOG_DIR/$name.log)"
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
    if cluster_ready && config_current && loopback_only; then
        echo "setup_slurm: cluster already up ($(sinfo -h -o '%P %D %C'))"
        return
    fi
    install_packages
    [[ $(id -u) -eq 0 ]] || die "starting the Slurm daemons needs root"
    if ! config_current || ! loopback_only; then
        stop_daemons  # they would keep the old configuration (or addresses)
        wait_stopped
        write_config
    fi
    start_munge
    build_loopback_shim
    start_daemon slurmctld /usr/sbin/slurmctld
    start_daemon slurmd /usr/sbin/slurmd
    wait_until_ready
    echo "setup_slurm: cluster up: partition debug, node $NODE ($(sinfo -h -o '%C' | cut -d/ -f4) CPUs)"
}

main "$@"
