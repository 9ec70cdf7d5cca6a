#!/usr/bin/env bash
# Installs and starts (up), stops (down) or reports on (status) the three cluster-mode services on
# loopback: Redis, PostgreSQL and Kafka. Every step is idempotent: `up` on a running set is a quick no-op.
# KAFKA_BROKERS=3 selects a three-node Kafka cluster instead of the single node (deploy/kafka.sh); `down`
# and `status` then cover those three nodes.
# `up` prints the connection settings and writes them to $SERVICES_DIR/env as shell exports:
#
#   source .services/env   # REDIS_URL, DATABASE_URL, KAFKA_BOOTSTRAP
#
#   deploy/services.sh up|down|status

# Read by the helpers in common.sh (log prefix, lock file name).
# shellcheck disable=SC2034
SERVICE_NAME=services
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Start order follows dependencies of the gateway's workers; stop order is the reverse.
SERVICES=(redis postgres kafka)

run() { bash "$DEPLOY_DIR/$1.sh" "$2"; }

write_env() {
    local env_file="$SERVICES_DIR/env"
    cat >"$env_file.tmp" <<ENV
# Connection settings of the services started by deploy/services.sh (loopback only).
export REDIS_URL=redis://$SERVICES_HOST:$REDIS_PORT/0
export DATABASE_URL=postgresql://gateway:gateway@$SERVICES_HOST:$POSTGRES_PORT/gateway
export KAFKA_BOOTSTRAP=$(kafka_bootstrap)
ENV
    mv "$env_file.tmp" "$env_file"
    sed -n 's/^export //p' "$env_file"
}

cmd_up() {
    local service started=$SECONDS
    for service in "${SERVICES[@]}"; do
        run "$service" install
    done
    for service in "${SERVICES[@]}"; do
        run "$service" start
    done
    log "all services up in $(( SECONDS - started ))s; settings in $SERVICES_DIR/env"
    write_env
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

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
