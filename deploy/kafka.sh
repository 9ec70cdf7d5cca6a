#!/usr/bin/env bash
# Kafka for cluster mode: the event bus between the WAL relay and the workers.
# Apache Kafka 4.x in KRaft mode (broker and controller in one process per node) from Maven Central jars.
#
# - One node (the default, KAFKA_BROKERS=1): PLAINTEXT://127.0.0.1:$KAFKA_PORT (19092) and
#   CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT (19093), data, log and pidfile under $SERVICES_DIR/kafka.
# - Three nodes (KAFKA_BROKERS=3, for `[cluster] durability = "replicated"`): node i (1..3) listens on
#   $KAFKA_PORT + 10*i and $KAFKA_CONTROLLER_PORT + 10*i (19102/19103, 19112/19113, 19122/19123 by
#   default; common.sh), under $SERVICES_DIR/kafka3/node-i; one static KRaft quorum of the three
#   controllers, default replication factor 3 and min.insync.replicas 2. It uses other ports and folders
#   than the single node, so both may run at once.
#
#   deploy/kafka.sh install|start|stop|status
#
# `start` starts the nodes that are not running (so it also restarts one a test has killed); `stop` and
# `status` cover the layout KAFKA_BROKERS selects.

# Read by the helpers in common.sh (log prefix, lock file name).
# shellcheck disable=SC2034
SERVICE_NAME=kafka
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KAFKA_POM="$DEPLOY_DIR/kafka/pom.xml"
KAFKA_PROBE="$DEPLOY_DIR/kafka/probe.py"
KAFKA_LIBS="$CACHE_DIR/kafka-libs"
# The class path is re-resolved whenever pom.xml changes; this file records which pom it came from.
KAFKA_LIBS_STAMP="$KAFKA_LIBS/.pom.sha256"
KAFKA_BROKERS="${KAFKA_BROKERS:-1}"
[[ "$KAFKA_BROKERS" == 1 || "$KAFKA_BROKERS" == 3 ]] || die "KAFKA_BROKERS must be 1 or 3, not $KAFKA_BROKERS"

# Selects node $1 of the layout: its folder, ports and files (the KAFKA_NODE_* variables below).
select_node() {
    KAFKA_NODE_ID="$1"
    if (( KAFKA_BROKERS == 1 )); then
        KAFKA_DIR="$SERVICES_DIR/kafka"
        KAFKA_NODE_PORT="$KAFKA_PORT"
        KAFKA_NODE_CONTROLLER_PORT="$KAFKA_CONTROLLER_PORT"
        KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
    else
        KAFKA_DIR="$SERVICES_DIR/kafka3/node-$1"
        KAFKA_NODE_PORT="$(kafka_node_port "$1")"
        KAFKA_NODE_CONTROLLER_PORT="$(kafka_node_controller_port "$1")"
        # The three nodes share one cluster id.
        KAFKA_CLUSTER_ID_FILE="$SERVICES_DIR/kafka3/cluster.id"
    fi
    # KAFKA_DATA_DIR puts the nodes' logs elsewhere (configuration, pidfile and broker log stay here):
    # e.g. a tmpfs, so that three nodes sharing one machine's disk do not stall together on it.
    KAFKA_DATA="${KAFKA_DATA_DIR:+$KAFKA_DATA_DIR/${KAFKA_DIR#"$SERVICES_DIR"/}}"
    KAFKA_DATA="${KAFKA_DATA:-$KAFKA_DIR/data}"
    KAFKA_CONF="$KAFKA_DIR/server.properties"
    KAFKA_LOG4J="$KAFKA_DIR/log4j2.properties"
    KAFKA_PID="$KAFKA_DIR/kafka.pid"
    KAFKA_LOG="$KAFKA_DIR/server.log"
    KAFKA_STDOUT="$KAFKA_DIR/stdout.log"
}

# The static quorum of the three-node layout: id@host:controller_port of every node.
quorum_voters() {
    local i voters=""
    for (( i = 1; i <= 3; i++ )); do
        voters+="${voters:+,}$i@$SERVICES_HOST:$(kafka_node_controller_port "$i")"
    done
    echo "$voters"
}

KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_GC_OPTS="${KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"
KAFKA_START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-120}"
KAFKA_STOP_TIMEOUT_S=60

# The JVM command line shared by the storage tool and the broker, as an array in JAVA_ARGV.
java_argv() {
    # KAFKA_HEAP_OPTS and KAFKA_GC_OPTS are lists of JVM flags, split on spaces on purpose.
    # shellcheck disable=SC2206
    JAVA_ARGV=(java $KAFKA_HEAP_OPTS $KAFKA_GC_OPTS -XX:+ExitOnOutOfMemoryError
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_DIR"
        -cp "$KAFKA_LIBS/*" "$@")
}

pom_hash() { sha256sum "$KAFKA_POM" | cut -d' ' -f1; }

cmd_install() {
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    if [[ -s "$KAFKA_LIBS_STAMP" && "$(cat "$KAFKA_LIBS_STAMP")" == "$(pom_hash)" ]] &&
        compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
        return 0
    fi
    command -v mvn >/dev/null || apt_install maven
    log "resolving the broker's jars from Maven Central into $KAFKA_LIBS"
    # Resolve into a fresh directory and swap it in, so an interrupted download never leaves a mixed class path.
    local staging="$KAFKA_LIBS.tmp.$$"
    rm -rf "$staging"
    mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$staging" >&2 ||
        { rm -rf "$staging"; die "mvn dependency:copy-dependencies failed for $KAFKA_POM"; }
    pom_hash >"$staging/.pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$staging" "$KAFKA_LIBS"
}

# The quorum setting of the selected node: a dynamic quorum of one voter, or the static three.
quorum_line() {
    if (( KAFKA_BROKERS == 1 )); then
        echo "controller.quorum.bootstrap.servers=$SERVICES_HOST:$KAFKA_NODE_CONTROLLER_PORT"
    else
        echo "controller.quorum.voters=$(quorum_voters)"
    fi
}

write_config() {
    local rf=1 isr=1 failover=""
    if (( KAFKA_BROKERS == 3 )); then
        rf=3
        isr=2
        # A killed node is fenced (and leaves every ISR) within 3 s instead of the defaults' 9-30 s, so
        # acks=all writes stall for at most that long when one of the three dies.
        failover="broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
replica.lag.time.max.ms=3000"
    fi
    mkdir -p "$KAFKA_DATA"
    cat >"$KAFKA_CONF" <<CONF
# Generated by deploy/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=$KAFKA_NODE_ID
$(quorum_line)
listeners=PLAINTEXT://$SERVICES_HOST:$KAFKA_NODE_PORT,CONTROLLER://$SERVICES_HOST:$KAFKA_NODE_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$SERVICES_HOST:$KAFKA_NODE_PORT,CONTROLLER://$SERVICES_HOST:$KAFKA_NODE_CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA

# One node: every replication factor and ISR minimum is 1. Three nodes: 3 copies, 2 in sync to accept
# a write (the topic of the gateway sets its own, from [cluster] in the config file).
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
$failover

# Few internal partitions: the node starts and creates its internal topics faster on a small machine.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
share.coordinator.state.topic.num.partitions=3
num.partitions=3
auto.create.topics.enable=true
# Consumers in tests join immediately instead of waiting for more members.
group.initial.rebalance.delay.ms=0

num.network.threads=2
num.io.threads=4
log.retention.hours=168
log.segment.bytes=268435456
CONF
    cat >"$KAFKA_LOG4J" <<CONF
# Generated by deploy/kafka.sh. Broker log: $KAFKA_LOG, rotated at 50 MB, three files kept.
status = warn
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = $KAFKA_LOG
appender.server.filePattern = $KAFKA_LOG.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.server.ref = server
logger.state.name = state.change.logger
logger.state.level = warn
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = warn
CONF
}

# Formats the storage directory once; a formatted directory keeps its cluster id across restarts.
format_storage() {
    [[ -s "$KAFKA_DATA/meta.properties" ]] && return 0
    local cluster_id
    if [[ ! -s "$KAFKA_CLUSTER_ID_FILE" ]]; then
        mkdir -p "$(dirname "$KAFKA_CLUSTER_ID_FILE")"
        # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding (22 characters).
        head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$KAFKA_CLUSTER_ID_FILE"
    fi
    cluster_id="$(cat "$KAFKA_CLUSTER_ID_FILE")"
    log "formatting storage in $KAFKA_DATA (cluster id $cluster_id)"
    # --standalone makes a single node the one voter of a dynamic KRaft quorum; three nodes name their
    # static quorum in controller.quorum.voters instead.
    local quorum=()
    (( KAFKA_BROKERS == 1 )) && quorum=(--standalone)
    java_argv kafka.tools.StorageTool format --cluster-id "$cluster_id" --config "$KAFKA_CONF" \
        "${quorum[@]}" --ignore-formatted
    "${JAVA_ARGV[@]}" >"$KAFKA_DIR/format.log" 2>&1 ||
        { show_log_tail "$KAFKA_DIR/format.log"; die "kafka storage format failed"; }
}

is_alive() { pidfile_alive "$KAFKA_PID" "$KAFKA_CONF"; }
is_ready() { python3 "$KAFKA_PROBE" "$SERVICES_HOST" "$KAFKA_NODE_PORT" "$KAFKA_NODE_ID" 2>/dev/null; }

wait_ready() {
    local deadline=$(( SECONDS + KAFKA_START_TIMEOUT_S ))
    until port_open "$SERVICES_HOST" "$KAFKA_NODE_PORT" && is_ready; do
        if ! is_alive; then
            show_log_tail "$KAFKA_STDOUT" "$KAFKA_LOG"
            die "broker $KAFKA_NODE_ID exited during start-up"
        fi
        if (( SECONDS >= deadline )); then
            show_log_tail "$KAFKA_STDOUT" "$KAFKA_LOG"
            stop_broker
            die "broker $KAFKA_NODE_ID did not answer a metadata request on $SERVICES_HOST:$KAFKA_NODE_PORT within ${KAFKA_START_TIMEOUT_S}s"
        fi
        sleep 0.25
    done
}

# Launches the selected node if it is not running (does not wait for it to be ready).
launch_node() {
    if is_alive; then
        return 0
    fi
    local port
    for port in "$KAFKA_NODE_PORT" "$KAFKA_NODE_CONTROLLER_PORT"; do
        if port_open "$SERVICES_HOST" "$port"; then
            die "port $SERVICES_HOST:$port is taken by a process this script did not start"
        fi
    done
    write_config
    format_storage
    # setsid detaches the broker from the caller's session, so it outlives the shell or test run that
    # started it; the wrapper records its own pid, which `exec` hands over to the JVM.
    rm -f "$KAFKA_PID"
    java_argv kafka.Kafka "$KAFKA_CONF"
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell.
    setsid -f bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-start "$KAFKA_PID" "${JAVA_ARGV[@]}" \
        >>"$KAFKA_STDOUT" 2>&1 </dev/null 9>&-
    local waited_ds=0
    until [[ -s "$KAFKA_PID" ]]; do
        (( waited_ds++ < 50 )) || die "broker $KAFKA_NODE_ID did not start"
        sleep 0.1
    done
    log "broker $KAFKA_NODE_ID launched on $SERVICES_HOST:$KAFKA_NODE_PORT, controller on $SERVICES_HOST:$KAFKA_NODE_CONTROLLER_PORT (pid $(cat "$KAFKA_PID"))"
}

cmd_start() {
    take_service_lock
    compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null || die "broker jars are missing; run: deploy/kafka.sh install"
    local i
    # Every node is launched before any is waited for: three nodes elect their controller together.
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
        select_node "$i"
        launch_node
    done
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
        select_node "$i"
        wait_ready
    done
    log "$KAFKA_BROKERS broker(s) ready; bootstrap $(kafka_bootstrap)"
}

stop_broker() {
    local pid
    pid="$(cat "$KAFKA_PID")"
    # SIGTERM runs the broker's controlled shutdown, which flushes and closes every log segment cleanly.
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" "$KAFKA_STOP_TIMEOUT_S"
    rm -f "$KAFKA_PID"
    log "broker $KAFKA_NODE_ID stopped (pid $pid)"
}

cmd_stop() {
    take_service_lock
    local i pids=() pid
    # Three nodes stop together: a node waiting for a controlled shutdown needs the quorum still up,
    # so they get SIGTERM at once and are then awaited.
    for (( i = KAFKA_BROKERS; i >= 1; i-- )); do
        select_node "$i"
        if is_alive; then
            pid="$(cat "$KAFKA_PID")"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid:$KAFKA_PID:$i")
        else
            rm -f "$KAFKA_PID"
        fi
    done
    (( ${#pids[@]} > 0 )) || { log "not running"; return 0; }
    local entry
    for entry in "${pids[@]}"; do
        IFS=: read -r pid pidfile i <<<"$entry"
        wait_pid_exit "$pid" "$KAFKA_STOP_TIMEOUT_S"
        rm -f "$pidfile"
        log "broker $i stopped (pid $pid)"
    done
}

cmd_status() {
    local i rc=0
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
        select_node "$i"
        if is_alive && is_ready; then
            echo "kafka: broker $i running on $SERVICES_HOST:$KAFKA_NODE_PORT (pid $(cat "$KAFKA_PID"))"
        elif is_alive; then
            echo "kafka: broker $i process $(cat "$KAFKA_PID") alive but not answering on $SERVICES_HOST:$KAFKA_NODE_PORT"
            rc=1
        else
            echo "kafka: broker $i stopped"
            (( rc == 0 )) && rc=3
        fi
    done
    return "$rc"
}

service_main "$@"
