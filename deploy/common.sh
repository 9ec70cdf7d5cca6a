# shellcheck shell=bash
# Shared helpers for the deploy/*.sh service scripts. Sourced, never executed.
#
# Every service keeps its configuration, data, logs and pidfile under $SERVICES_DIR/<service>, so a
# whole test environment can be thrown away with `rm -rf .services` after `deploy/services.sh down`.

set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
CACHE_DIR="${CACHE_DIR:-$REPO_DIR/.cache}"

# True when every directory from / down to the given one is searchable by any user (o+x): the
# service OS users (postgres) can then reach what lies below it.
path_searchable_by_all() {
    local dir="$1" mode
    while [[ -n "$dir" && "$dir" != / ]]; do
        mode="$(stat -c %a "$dir" 2>/dev/null)" || return 1
        (( (8#$mode & 1) == 1 )) || return 1
        dir="$(dirname "$dir")"
    done
}

# The services' data lives in $REPO_DIR/.services unless SERVICES_DIR says otherwise. A checkout under
# a folder the service OS users cannot enter (mode 0700, like root's home) gets its data in a folder
# they can reach, /var/tmp/gateway-services-<hash of the checkout's path>, and .services becomes a
# symbolic link to it: every path below still reads .services/..., and each checkout has its own.
if [[ -z "${SERVICES_DIR:-}" ]]; then
    SERVICES_DIR="$REPO_DIR/.services"
    if [[ ! -e "$SERVICES_DIR" ]] && ! path_searchable_by_all "$REPO_DIR"; then
        reachable_dir="/var/tmp/gateway-services-$(printf '%s' "$REPO_DIR" | sha256sum | cut -c1-12)"
        mkdir -p "$reachable_dir"
        chmod 755 "$reachable_dir"
        ln -sfn "$reachable_dir" "$SERVICES_DIR"
    fi
fi
mkdir -p "$SERVICES_DIR"
# The physical path: the postgres OS user must not need to pass through the link's 0700 parents.
SERVICES_DIR="$(cd "$SERVICES_DIR" && pwd -P)"

# All services listen on loopback only; the ports are far from the defaults so that a system-wide
# Redis, PostgreSQL or Kafka on the same machine never collides with the project's own.
# A port comes from the environment, else from $SERVICES_DIR/env (what `services.sh up` chose for this
# checkout, another checkout's services holding the defaults), else the default.
# shellcheck disable=SC2034 # used by the scripts that source this file
SERVICES_HOST=127.0.0.1
PORT_NAMES=(REDIS_PORT POSTGRES_PORT KAFKA_PORT KAFKA_CONTROLLER_PORT)
# SERVICES_PORT_OFFSET shifts every default (tests simulate two checkouts on one machine with it).
SERVICES_PORT_OFFSET="${SERVICES_PORT_OFFSET:-0}"
[[ "$SERVICES_PORT_OFFSET" =~ ^[0-9]{1,5}$ ]] || { echo "SERVICES_PORT_OFFSET must be a number" >&2; exit 2; }
declare -A DEFAULT_PORTS=([REDIS_PORT]=$(( 16379 + SERVICES_PORT_OFFSET )) [POSTGRES_PORT]=$(( 15432 + SERVICES_PORT_OFFSET ))
    [KAFKA_PORT]=$(( 19092 + SERVICES_PORT_OFFSET )) [KAFKA_CONTROLLER_PORT]=$(( 19093 + SERVICES_PORT_OFFSET )))
# Names of the ports given in the environment (never moved by `services.sh up`).
declare -A PORTS_FROM_ENV=()
recorded_port() {
    [[ -s "$SERVICES_DIR/env" ]] || return 1
    sed -n "s/^export $1=\([0-9]\{1,5\}\)$/\1/p" "$SERVICES_DIR/env" | tail -n 1 | grep .
}
# A shell that sourced another checkout's .services/env carries its ports (and SERVICES_ENV_DIR, its
# data folder): they describe that checkout's services, not this one's, so they are ignored here.
if [[ -n "${SERVICES_ENV_DIR:-}" && "$SERVICES_ENV_DIR" != "$SERVICES_DIR" ]]; then
    unset REDIS_PORT POSTGRES_PORT KAFKA_PORT KAFKA_CONTROLLER_PORT GATEWAY_PORT PSP_SIM_PORT WORKER_METRICS_PORT
fi
for port_name in "${PORT_NAMES[@]}"; do
    if [[ -n "${!port_name:-}" ]]; then
        PORTS_FROM_ENV[$port_name]=1
    else
        printf -v "$port_name" '%s' "$(recorded_port "$port_name" || echo "${DEFAULT_PORTS[$port_name]}")"
    fi
done
unset port_name
# With KAFKA_BROKERS=3 (deploy/kafka.sh) node i of 1..3 listens on KAFKA_PORT + 10*i and its controller
# on KAFKA_CONTROLLER_PORT + 10*i: 19102/19103, 19112/19113, 19122/19123 by default; a worker given
# KAFKA_PORT=49092 gets 49102.. 49123. They never collide with the single node's two ports.
KAFKA_BROKERS="${KAFKA_BROKERS:-1}"
kafka_node_port() { echo $(( KAFKA_PORT + 10 * $1 )); }
kafka_node_controller_port() { echo $(( KAFKA_CONTROLLER_PORT + 10 * $1 )); }
# The bootstrap list of the layout KAFKA_BROKERS selects.
kafka_bootstrap() {
    if [[ "$KAFKA_BROKERS" == 1 ]]; then
        echo "$SERVICES_HOST:$KAFKA_PORT"
        return
    fi
    local i out=""
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
        out+="${out:+,}$SERVICES_HOST:$(kafka_node_port "$i")"
    done
    echo "$out"
}

log() { printf '[%s] %s\n' "${SERVICE_NAME:-deploy}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Serialises concurrent runs of one service script (for example `make services-up` in one shell and a
# pytest session in another), so two starts never race on the same data directory. The lock lives on
# file descriptor 9: every daemon must be started with `9>&-`, or it would hold the lock for its lifetime.
take_service_lock() {
    exec 9>"$SERVICES_DIR/.$SERVICE_NAME.lock"
    flock -w 600 9 || die "another deploy/$SERVICE_NAME.sh is still running (lock $SERVICES_DIR/.$SERVICE_NAME.lock)"
}

# True when a TCP connect to host:port succeeds within one second.
port_open() {
    timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# True when the process in the pidfile is alive and its command line contains the given marker,
# so that a pid recycled by an unrelated process is never mistaken for the service.
pidfile_alive() {
    local pidfile="$1" marker="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker"
}

# Waits until the pid in the pidfile has exited; sends SIGKILL after the grace period.
wait_pid_exit() {
    local pid="$1" grace_s="$2" waited_ds=0
    while kill -0 "$pid" 2>/dev/null; do
        if (( waited_ds >= grace_s * 10 )); then
            log "pid $pid still running after ${grace_s}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            return 0
        fi
        sleep 0.1
        waited_ds=$(( waited_ds + 1 ))
    done
}

# Polls a readiness check (the command and arguments after the first four) every 0.1 s until it
# succeeds. Gives up after timeout_s seconds, or as soon as the process of the given pid (empty: no
# process to watch) has exited: then shows the tail of the log file and dies with the message.
wait_ready_or_die() {
    local timeout_s="$1" pid="$2" log_file="$3" message="$4" waited_ds=0
    shift 4
    until "$@"; do
        if (( waited_ds >= timeout_s * 10 )) || { [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; }; then
            show_log_tail "$log_file"
            die "$message"
        fi
        sleep 0.1
        waited_ds=$(( waited_ds + 1 ))
    done
}

deb_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}

# Installs Debian packages that are missing; runs `apt-get update` only when something must be installed.
# The packages' own system-wide services (redis-server on 6379, the postgresql "main" cluster on 5432)
# are kept from starting through a temporary policy-rc.d: the project runs its own instances instead.
apt_install() {
    local missing=() pkg policy=/usr/sbin/policy-rc.d created_policy=0
    for pkg in "$@"; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    (( ${#missing[@]} == 0 )) && return 0
    [[ "$(id -u)" == 0 ]] || die "installing ${missing[*]} needs root (apt-get)"
    log "installing Debian packages: ${missing[*]}"
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# Written by deploy/common.sh while it installs packages.\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
            install --no-install-recommends "${missing[@]}" >/dev/null
    } || rc=$?
    (( created_policy )) && rm -f "$policy"
    (( rc == 0 )) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# Prints the last lines of each given log file, for start-up errors.
show_log_tail() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        log "last lines of $f:"
        tail -n 40 "$f" >&2
    done
}

usage_and_exit() {
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
}

# What `status` prints: running, with the port and pid, or stopped (exit status 3, as for init scripts).
report_running() { echo "$SERVICE_NAME: running on $SERVICES_HOST:$1 (pid $2)"; }
report_stopped() { echo "$SERVICE_NAME: stopped"; return 3; }

# The command line of a service script: `install|start|stop|status` runs its cmd_install, cmd_start,
# cmd_stop or cmd_status.
service_main() {
    case "${1:-}" in
        install | start | stop | status) "cmd_$1" ;;
        *) usage_and_exit ;;
    esac
}
