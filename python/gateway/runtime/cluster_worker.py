"""Cluster mode's workers: consume the payments topic in a consumer group and write PostgreSQL.

Offsets are committed only after the batch is committed in PostgreSQL (manual commit), so a worker
killed at any point leaves its records to be consumed again; the store applies them by payment id,
so a record seen twice is written once. After the write the read-your-writes copies in Redis are
dropped, and GETs read PostgreSQL from then on.

Then the payments of the batch go to the payment worker of this process (processing/worker.py: state
machine, router, PSP calls, ledger), which runs on its own thread and event loop, exactly as in
embedded mode but on PostgreSQL. The topic is keyed by payment id, so a new payment reaches the one
worker that owns its partition; whatever else could drive the same payment (a redelivery after a
rebalance, the periodic scan of every worker, a merchant operation announced to all) goes through the
store's claim first (a PostgreSQL advisory lock per payment, freed by the server if its holder dies),
and the optimistic version check refuses any write computed from a stale state. Merchant operations
accepted by any gateway process are announced with NOTIFY (`OPERATIONS_CHANNEL`, sent at the commit
of the operation's intent) and found by the periodic scan if a notification is missed.

SIGTERM and SIGINT stop the loop after the batch in hand: it is written and committed, the consumer
leaves the group (a quick rebalance for the others), the payment worker finishes (or leaves to the
others' scans) what it has in flight, and the process exits 0, within `[cluster] worker_stop_timeout_ms`
or the watchdog ends it (runtime/watchdog.py).

Every dependency call of the loop has a deadline: `consume` its poll timeout, PostgreSQL its
`statement_timeout` and `connect_timeout`, Redis its socket timeouts, the PSP `[psp] timeout_ms`. The
offset commit is asynchronous (a synchronous one has no deadline and hung every worker across a broker
restart): its result arrives in `_on_commit` during a later `consume`; a commit unconfirmed for
`worker_stall_timeout_ms` makes the worker not ready and re-creates its consumer (closed in the
background, with a bound). A loop that stops iterating shows on `/readyz` and `gateway_worker_stalled`,
and ends the process for its supervisor (runtime/watchdog.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from gateway.config import Config
from gateway.domain.metrics import Registry
from gateway.domain.records import payment_id_of
from gateway.feed.relay import ensure_topic
from gateway.processing.worker import Worker, WorkerSettings
from gateway.runtime.base import stop_each
from gateway.runtime.watchdog import LoopWatchdog
from gateway.shared.redis_state import forget_recent
from gateway.store.postgres import Listener, PostgresStore
from gateway.store.processing import OPERATIONS_CHANNEL

log = logging.getLogger("gateway.worker")

POLL_TIMEOUT_S = 0.2
# A worker that dies without leaving the group (SIGKILL, power loss) keeps its partitions until the
# broker misses its heartbeats for this long; Kafka's 45 s default would stall those partitions that long.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 1_000
STORE_RETRY_S = 1.0
TOPIC_RETRY_S = 2.0
TOPIC_ATTEMPT_TIMEOUT_S = 5.0
# The consumer's lag per partition (for /metrics) is read from its cached watermarks this often.
LAG_REFRESH_S = 1.0
# A consumer being replaced gets this long to leave its group; then it is abandoned to the broker's
# session timeout.
CONSUMER_CLOSE_TIMEOUT_S = 5.0


def _lsn(message: Message) -> int:
    for header in message.headers() or []:
        name, value = header[0], header[1]
        if name == "lsn" and isinstance(value, bytes) and value.isdigit():
            return int(value)
    return 0


class KafkaWorker:
    def __init__(self, cfg: Config, store: PostgresStore, processing: bool = True) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.store = store
        self.batch_records_max = c.worker_batch_records_max
        self.stall_s = c.worker_stall_timeout_ms / 1000
        # Since when an offset commit waits for its confirmation (None: none outstanding).
        self._commit_pending_since: float | None = None
        self.commit_failures = 0
        self.consumer = self._new_consumer()
        self.redis = redis.Redis.from_url(c.redis_url, socket_timeout=c.redis_timeout_ms / 1000,
                                          socket_connect_timeout=c.redis_timeout_ms / 1000)
        self.prefix = c.redis_key_prefix
        self.topic = c.topic
        self.stopping = threading.Event()
        self.applied_records = 0
        self.inserted_payments = 0
        # The feed's own metrics, beside the payment worker's (served on `[metrics] worker_port`).
        self.feed_metrics = Registry()
        self.records_total = self.feed_metrics.counter(
            "gateway_feed_records_total", "Kafka records this worker consumed and wrote to PostgreSQL.")
        self.consumer_lag = self.feed_metrics.gauge(
            "gateway_feed_consumer_lag_messages", "Kafka consumer lag of this worker per assigned partition.",
            ("partition",))
        self.commit_failures_total = self.feed_metrics.counter(
            "gateway_feed_commit_failures_total", "Kafka offset commits of this worker that failed (the records are read again).")
        self.consumer_recreations = self.feed_metrics.counter(
            "gateway_feed_consumer_recreations_total",
            "Times this worker replaced its Kafka consumer after a commit unconfirmed for worker_stall_timeout_ms.")
        self.stalled_gauge = self.feed_metrics.gauge(
            "gateway_worker_stalled",
            "1 while this worker's loop or its Kafka commits made no progress for worker_stall_timeout_ms.")
        self.loop_age = self.feed_metrics.gauge(
            "gateway_worker_loop_age_seconds", "Seconds since this worker's consume loop last completed an iteration.")
        self.watchdog: LoopWatchdog | None = None
        self._lag_at = 0.0
        # The async payment path of this process (None: materialise only, e.g. a benchmark of that), on
        # a pool of its own: its transactions run on threads, many at once.
        self.processor: Worker | None = None
        self.processing_store: PostgresStore | None = None
        if processing:
            settings = WorkerSettings.from_config(cfg)
            self.processing_store = PostgresStore(c.database_url, c.database_schema, 1, settings.db_connections,
                                                  c.database_timeout_ms)
            self.processor = Worker(self.processing_store, settings, shared=True)
            if settings.psp_url is None:
                log.warning("PSP simulators in this process (psp.url empty): right for one worker; with"
                            " several, a payment authorized through another worker cannot be captured, refunded"
                            " or resolved here. Run `gateway psp-sim` and set psp.url (or GATEWAY_PSP_URL) on"
                            " every worker.")
        self.listener: Listener | None = None

    def _new_consumer(self) -> Consumer:
        c = self.cfg.cluster
        return Consumer({
            "bootstrap.servers": c.kafka_bootstrap,
            "group.id": c.consumer_group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "on_commit": self._on_commit,
        })

    def _on_commit(self, err: KafkaError | None, _partitions: object) -> None:
        # Called from `consume` on this thread. An empty commit (nothing new to commit) is no failure.
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.commit_failures += 1
            self.commit_failures_total.inc()
            log.warning("offset commit failed (the records will be read again): %s", err)
            return
        self._commit_pending_since = None

    def commit_stalled(self) -> bool:
        since = self._commit_pending_since
        return since is not None and time.monotonic() - since > self.stall_s

    def ready(self) -> tuple[bool, str]:
        """For /readyz: (ready, why not)."""
        if self.watchdog is not None and self.watchdog.stalled:
            return False, f"consume loop stalled for {self.watchdog.since_beat_s():.1f} s"
        if self.commit_stalled():
            return False, "Kafka offset commits unconfirmed for over worker_stall_timeout_ms"
        return True, ""

    def _recreate_consumer(self) -> None:
        """A consumer whose commits go unconfirmed is replaced: the new one joins the group afresh."""
        log.error("offset commit unconfirmed for %.1f s: re-creating the Kafka consumer", self.stall_s)
        old = self.consumer
        closer = threading.Thread(target=old.close, name="consumer-close", daemon=True)
        closer.start()
        closer.join(CONSUMER_CLOSE_TIMEOUT_S)
        if closer.is_alive():
            log.warning("the old consumer did not close in %.0f s; abandoned", CONSUMER_CLOSE_TIMEOUT_S)
        self.consumer = self._new_consumer()
        self.consumer.subscribe([self.topic])
        self._commit_pending_since = None
        self.consumer_recreations.inc()

    def _beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    def step(self) -> int:
        """Consumes one batch, writes it, then commits its offsets; returns the records consumed."""
        self._beat()
        if self.commit_stalled():
            self._recreate_consumer()
        messages: list[Message] = self.consumer.consume(self.batch_records_max, POLL_TIMEOUT_S)
        self._beat()
        if time.monotonic() >= self._lag_at:
            self._lag_at = time.monotonic() + LAG_REFRESH_S
            self._refresh_lag()
        payloads: list[tuple[int, bytes]] = []
        produced_ms: list[int] = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            value = m.value()
            if value is not None:
                payloads.append((_lsn(m), value))
                produced_ms.append(m.timestamp()[1])
        if not payloads:
            return 0
        while True:
            try:
                inserted = self.store.apply_events(payloads)
                break
            except Exception as e:
                if self.stopping.is_set():
                    raise
                log.error("store write failed (%s); retrying in %.1fs", e, STORE_RETRY_S)
                # Waiting for PostgreSQL is progress of a kind: the loop is alive and retrying.
                self._beat()
                if self.stopping.wait(STORE_RETRY_S):
                    raise
        # The batch is committed in PostgreSQL: only now may the group forget it. Asynchronous: a
        # synchronous commit has no deadline (see the module's docstring).
        try:
            self.consumer.commit(asynchronous=True)
            if self._commit_pending_since is None:
                self._commit_pending_since = time.monotonic()
        except KafkaException as e:
            # Not fatal: the records will be delivered again and applied as no-ops.
            log.warning("offset commit failed: %s", e)
        ids: list[str] = []
        accepted_ms: list[int] = []
        for (_, p), ms in zip(payloads, produced_ms):
            pid = payment_id_of(p)
            if pid is not None:
                ids.append(pid)
                accepted_ms.append(ms)
        forget_recent(self.redis, self.prefix, ids)
        if self.processor is not None:
            # Every id, new or not: a record delivered again after a crash may be a payment that is
            # still `processing`; one already settled is skipped at its first read. The record's
            # broker timestamp (its production, right after the acknowledgement) starts the
            # ack-to-final clock.
            self.processor.submit_payments(ids, accepted_ms)
        self.applied_records += len(payloads)
        self.records_total.inc(n=len(payloads))
        self.inserted_payments += inserted
        return len(payloads)

    def _refresh_lag(self) -> None:
        """Lag per assigned partition: the high watermark (as last fetched) minus the position."""
        try:
            assigned = self.consumer.assignment()
            positions = self.consumer.position(assigned) if assigned else []
        except KafkaException:
            return
        self.consumer_lag.values.clear()
        for tp in positions:
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0:
                position = max(tp.offset, 0)
                self.consumer_lag.set(max(0, high - position), (str(tp.partition),))

    def metrics_text(self) -> str:
        """What the worker's /metrics serves: the feed's metrics and the payment worker's."""
        self.stalled_gauge.set(0 if self.ready()[0] else 1)
        if self.watchdog is not None:
            self.loop_age.set(round(self.watchdog.since_beat_s(), 3))
        text = self.feed_metrics.render()
        if self.processor is not None:
            text += self.processor.metrics.registry.render()
        return text

    def _on_operation(self, _channel: str, operation_id: str) -> None:
        if self.processor is not None:
            self.processor.submit_operation(operation_id)

    def run(self) -> None:
        if self.processor is not None:
            self.processor.start()
            self.listener = Listener(self.store, [OPERATIONS_CHANNEL], self._on_operation).start()
        self.consumer.subscribe([self.topic])
        log.info("worker consuming %s as %s", self.topic, self.cfg.cluster.consumer_group)
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            # Leaving the group needs the broker: bounded, like every other call (the watchdog bounds
            # the whole stop as well).
            closer = threading.Thread(target=self.consumer.close, name="consumer-close", daemon=True)
            closer.start()
            closer.join(CONSUMER_CLOSE_TIMEOUT_S)
            stop_each(self.listener, self.processor)
            if self.processing_store is not None:
                self.processing_store.close()
            self.redis.close()
            log.info("worker stopped: %d records applied, %d new payments, %d payments settled here",
                     self.applied_records, self.inserted_payments,
                     self.processor.settled if self.processor is not None else 0)


def run_worker(cfg: Config, metrics_port: int | None = None) -> int:
    """Runs one cluster worker until SIGTERM/SIGINT; `metrics_port` (default `[metrics] worker_port`,
    0: none) serves its /metrics."""
    metrics_port = cfg.metrics.worker_port if metrics_port is None else metrics_port
    from gateway.store.postgres import open_postgres

    c = cfg.cluster
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A worker started while Kafka is away (a broker restart, a cluster coming up in any order) waits for
    # it instead of exiting; a signal still stops it at once.
    while True:
        try:
            ensure_topic(c.kafka_bootstrap, c.topic, c.topic_partitions, c.topic_retention_ms, TOPIC_ATTEMPT_TIMEOUT_S,
                         replication_factor=c.topic_replication_factor,
                         min_insync_replicas=c.topic_min_insync_replicas)
            break
        except (KafkaException, TimeoutError) as e:
            log.warning("Kafka at %s not reachable to check topic %s (%s); retrying in %.0f s",
                        c.kafka_bootstrap, c.topic, e or type(e).__name__, TOPIC_RETRY_S)
            if stopping.wait(TOPIC_RETRY_S):
                return 0
    store = open_postgres(cfg)
    store.migrate()
    # worker.enabled = false (GATEWAY_WORKER=off): materialise only (benchmarks of the Kafka -> PostgreSQL
    # path alone).
    worker = KafkaWorker(cfg, store, processing=cfg.worker.enabled)
    worker.stopping = stopping
    watchdog = worker.watchdog = LoopWatchdog(c.worker_stall_timeout_ms / 1000, c.worker_stop_timeout_ms / 1000,
                                              stopping).start()
    print(f"gateway worker: consuming {c.topic} into PostgreSQL schema {c.database_schema}", flush=True)
    server = None
    if metrics_port:
        from gateway.runtime.metrics_server import MetricsServer

        server = MetricsServer(cfg.metrics.worker_host, metrics_port, worker.metrics_text, worker.ready).start()
        print(f"gateway worker: metrics on http://{cfg.metrics.worker_host}:{server.port}/metrics", flush=True)
    try:
        worker.run()
    finally:
        if server is not None:
            server.stop()
        store.close()
        watchdog.done()
    return 0
