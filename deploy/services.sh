#!/usr/bin/env bash
# Installs and starts (up), stops (down) or reports on (status) the three cluster-mode services on
# loopback: Redis, PostgreSQL and Kafka. Every step is idempotent: `up` on a running set is a quick no-op.
# KAFKA_BROKERS=3 selects a three-node Kafka cluster instead of the single node (deploy/kafka.sh); `down`
# and `status` then cover those three nodes.
#
# `up` picks the ports: REDIS_PORT, POSTGRES_PORT, KAFKA_PORT, KAFKA_CONTROLLER_PORT from the
# environment when given, else the ones this checkout used before, else the defaults (16379, 15432,
# 19092, 19093); a port held by something this checkout did not start (another checkout's services)
# moves to the next free one. It also picks GATEWAY_PORT (8080), PSP_SIM_PORT (8700) and
# WORKER_METRICS_PORT (9464) for the gateway, the PSP simulator and the first worker the same way. It records every port and the connection settings in
# $SERVICES_DIR/env, which every deploy script reads again (so `status` and `stop` need no variables),
# and writes $SERVICES_DIR/cluster.toml: config/cluster.toml with these addresses, ready to use:
#
#   source .services/env   # the ports, REDIS_URL, DATABASE_URL, KAFKA_BOOTSTRAP, GATEWAY_PSP_URL
#   .venv/bin/gateway serve --config .services/cluster.toml
#
#   deploy/services.sh up|down|status|ports   (ports: print the ports `up` would use)

# Read by the helpers in common.sh (log prefix, lock file name).
# shellcheck disable=SC2034
SERVICE_NAME=services
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Start order follows dependencies of the gateway's workers; stop order is the reverse.
SERVICES=(redis postgres kafka)

run() { bash "$DEPLOY_DIR/$1.sh" "$2"; }

# Ports of the gateway's own processes (not started here), recorded with the services' ports.
for port_name in GATEWAY_PORT PSP_SIM_PORT WORKER_METRICS_PORT; do
    [[ -n "${!port_name:-}" ]] && PORTS_FROM_ENV[$port_name]=1
done
: "${GATEWAY_PORT:=$(recorded_port GATEWAY_PORT || echo $(( 8080 + SERVICES_PORT_OFFSET )))}"
: "${PSP_SIM_PORT:=$(recorded_port PSP_SIM_PORT || echo $(( 8700 + SERVICES_PORT_OFFSET )))}"
# The first worker's /metrics and /readyz; a second worker takes the next port, and so on.
: "${WORKER_METRICS_PORT:=$(recorded_port WORKER_METRICS_PORT || echo $(( 9464 + SERVICES_PORT_OFFSET )))}"
ALL_PORT_NAMES=("${PORT_NAMES[@]}" GATEWAY_PORT PSP_SIM_PORT WORKER_METRICS_PORT)
# Which service owns which port (the gateway's ports belong to no service here).
declare -A PORT_SERVICE=([REDIS_PORT]=redis [POSTGRES_PORT]=postgres [KAFKA_PORT]=kafka [KAFKA_CONTROLLER_PORT]=kafka)
PORT_SEARCH_MAX=200

# True when a listener could bind 127.0.0.1:port now: nothing listens there and no socket (a client's
# ephemeral port, a connection in TIME_WAIT) holds it. Stricter than a connect probe: ports in the
# kernel's ephemeral range are often held by clients.
port_bindable() {
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)' "$SERVICES_HOST" "$1" 2>/dev/null
}

# Moves every port that something else holds to the next free one (never a port named in the
# environment, nor one of a service of this checkout that is running).
choose_ports() {
    local name port service taken=" " tries
    for name in "${ALL_PORT_NAMES[@]}"; do
        port="${!name}"
        service="${PORT_SERVICE[$name]:-}"
        if [[ -z "${PORTS_FROM_ENV[$name]:-}" ]] &&
            ! { [[ -n "$service" ]] && run "$service" status >/dev/null 2>&1; }; then
            tries=0
            while port_open "$SERVICES_HOST" "$port" || ! port_bindable "$port" || [[ "$taken" == *" $port "* ]]; do
                (( ++tries <= PORT_SEARCH_MAX )) || die "no free port in ${!name}..$port for $name"
                port=$(( port + 1 ))
            done
            [[ "$port" == "${!name}" ]] || log "$name ${!name} is taken by another process: using $port"
        fi
        printf -v "$name" '%s' "$port"
        export "${name?}"
        taken+="$port "
    done
}

write_env() {
    local env_file="$SERVICES_DIR/env" name
    {
        echo "# Written by deploy/services.sh up: the ports and connection settings of this checkout's services."
        echo "export SERVICES_ENV_DIR=$SERVICES_DIR"
        for name in "${ALL_PORT_NAMES[@]}"; do
            echo "export $name=${!name}"
        done
        echo "export REDIS_URL=redis://$SERVICES_HOST:$REDIS_PORT/0"
        echo "export DATABASE_URL=postgresql://gateway:gateway@$SERVICES_HOST:$POSTGRES_PORT/gateway"
        echo "export KAFKA_BROKERS=$KAFKA_BROKERS"
        echo "export KAFKA_BOOTSTRAP=$(kafka_bootstrap)"
        echo "export GATEWAY_PSP_URL=http://$SERVICES_HOST:$PSP_SIM_PORT"
    } >"$env_file.tmp"
    mv "$env_file.tmp" "$env_file"
}

# config/cluster.toml with this checkout's addresses: the walkthrough needs no hand edits.
write_cluster_config() {
    local out="$SERVICES_DIR/cluster.toml"
    sed -e "s|^redis_url = .*|redis_url = \"redis://$SERVICES_HOST:$REDIS_PORT/0\"|" \
        -e "s|^database_url = .*|database_url = \"postgresql://gateway:gateway@$SERVICES_HOST:$POSTGRES_PORT/gateway\"|" \
        -e "s|^kafka_bootstrap = .*|kafka_bootstrap = \"$(kafka_bootstrap)\"|" \
        -e "s|^port = 8080$|port = $GATEWAY_PORT|" \
        -e "s|^url = \"\"$|url = \"http://$SERVICES_HOST:$PSP_SIM_PORT\"|" \
        "$REPO_DIR/config/cluster.toml" >"$out.tmp"
    printf '# Written by deploy/services.sh up from config/cluster.toml, with the addresses of this checkout.\n' |
        cat - "$out.tmp" >"$out"
    rm -f "$out.tmp"
}

cmd_up() {
    local service started=$SECONDS
    for service in "${SERVICES[@]}"; do
        run "$service" install
    done
    choose_ports
    # Recorded before the starts: each service script reads its ports from this file.
    write_env
    for service in "${SERVICES[@]}"; do
        run "$service" start
    done
    write_cluster_config
    log "all services up in $(( SECONDS - started ))s; settings in $SERVICES_DIR/env, config in $SERVICES_DIR/cluster.toml"
    sed -n 's/^export //p' "$SERVICES_DIR/env"
}

cmd_down() {
    local service i
    for (( i = ${#SERVICES[@]} - 1; i >= 0; i-- )); do
        run "${SERVICES[i]}" stop
    done
}

cmd_status() {
    local service rc=0
    for service in "${SERVICES[@]}"; do
        run "$service" status || rc=1
    done
    return "$rc"
}

# The ports `up` would use now, without starting or recording anything.
cmd_ports() {
    local name
    choose_ports
    for name in "${ALL_PORT_NAMES[@]}"; do
        echo "$name=${!name}"
    done
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    ports) cmd_ports ;;
    *) echo "usage: $0 up|down|status|ports" >&2; exit 2 ;;
esac
