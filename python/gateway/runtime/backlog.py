"""Cluster mode's backlog: payments accepted by any gateway process and not yet sent to a PSP.

Embedded mode counts its backlog in the process (runtime/embedded.py). In cluster mode the accepted
payments wait in two places no single process holds: records in the Kafka topic that the workers have
not yet written to PostgreSQL (the consumer group's lag: each partition's end offset minus the group's
committed offset), and payments PostgreSQL holds as `processing` (stored, not yet through a PSP). Every
gateway process measures both on a thread of its own every `[cluster] backlog_check_ms` (two Kafka
requests and one indexed count); a create reads the last figure, so the check costs a request nothing.

At `[worker] backlog_max` a create answers `503 backlog_full` with `Retry-After`, and nothing is
written. While the figure is unknown (the first check has not answered, or Kafka or PostgreSQL cannot
be reached) no create is refused for it: the other dependencies' own answers apply. A figure older than
`STALE_CHECKS` intervals counts as unknown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger("gateway.backlog")

# A figure is used for this many check intervals at most (a check that hangs makes it unknown).
STALE_CHECKS = 5
# One Kafka request of a check (metadata, committed offsets, one partition's end offsets).
KAFKA_REQUEST_TIMEOUT_S = 2.0


class ClusterBacklog:
    """The cluster's backlog, measured every `interval_s` on a daemon thread; `value` is the last figure
    (None: unknown). `count_stored` counts the `processing` payments PostgreSQL holds (None: not counted,
    when this gateway's workers only store payments, `[worker] enabled = false`)."""

    def __init__(self, bootstrap: str, topic: str, group: str, count_stored: Callable[[], int] | None,
                 interval_s: float) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.count_stored = count_stored
        self.interval_s = interval_s
        self._value: int | None = None
        self._at = 0.0
        self.lag = 0
        self.stored = 0
        self.checks_failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None

    @property
    def value(self) -> int | None:
        if self._value is None or time.monotonic() - self._at > STALE_CHECKS * self.interval_s:
            return None
        return self._value

    def start(self) -> ClusterBacklog:
        self._thread = threading.Thread(target=self._run, name="cluster-backlog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(KAFKA_REQUEST_TIMEOUT_S * 3 + 1)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except (KafkaException, psycopg.Error, RuntimeError) as e:
                # Kafka or PostgreSQL away: the figure ages out, the next check retries.
                self.checks_failed += 1
                log.warning("backlog check failed: %s", e)
            self._stop.wait(self.interval_s)

    def check(self) -> int:
        """Measures the backlog once (on the calling thread) and returns it."""
        lag = self.kafka_lag()
        stored = self.count_stored() if self.count_stored is not None else 0
        self.lag, self.stored = lag, stored
        self._value, self._at = lag + stored, time.monotonic()
        return lag + stored

    def kafka_lag(self) -> int:
        """Records of the topic not yet committed by the workers' consumer group (a partition the group
        never committed counts from its first retained offset)."""
        if self._consumer is None:
            # Never subscribes, so it never joins the group: it only reads the group's committed offsets.
            self._consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group,
                                       "enable.auto.commit": False, "socket.timeout.ms": 2000})
        consumer = self._consumer
        topic = consumer.list_topics(self.topic, timeout=KAFKA_REQUEST_TIMEOUT_S).topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise RuntimeError(f"topic {self.topic} not readable: {getattr(topic, 'error', 'missing')}")
        partitions = [TopicPartition(self.topic, p) for p in sorted(topic.partitions)]
        committed = consumer.committed(partitions, timeout=KAFKA_REQUEST_TIMEOUT_S)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, tp.partition), timeout=KAFKA_REQUEST_TIMEOUT_S)
            lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return lag
