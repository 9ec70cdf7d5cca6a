"""Cluster mode's event feed: a relay per gateway process that ships its WAL to Kafka.

The relay reads committed records from the process's own WAL and produces them with an idempotent
producer (`enable.idempotence`, `acks=all`), keyed by payment id so one payment's events stay in order
on one partition. Delivery callbacks may arrive out of LSN order (different partitions), so the relay
tracks the highest *contiguously* acknowledged LSN and fsyncs it to a checkpoint file; after a crash
it resumes from there. Records between the checkpoint and the crash are sent again: the consumers
de-duplicate by payment id, so at-least-once here is exactly-once in PostgreSQL.

If librdkafka gives up on a record (the broker was down longer than `message.timeout.ms`) or the
producer hits a fatal error, the relay rewinds: it drops the producer, re-opens the WAL at the acked
checkpoint and sends everything after it again.

With `read_written` (durability "replicated") the relay reads records as soon as they are written to
the WAL file, before their fsync: the brokers' acknowledgement, not the local disk, makes them
durable. Its checkpoint then never passes the WAL's committed LSN, so a WAL that lost its unsynced
tail (a power loss) is resent from there rather than skipped.

Three threads: the sender blocks on the WAL's commit notification, the poller blocks in
`producer.poll()` serving delivery callbacks, so neither a new record nor an ack waits for the other,
and the checkpointer fsyncs the acked LSN every `checkpoint_interval_ms`, so no ack waits for the disk.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from gateway._fastpath import WalReader
from gateway.domain.records import payment_id_of
from gateway.feed.eventlog import HEADER_LSN, HEADER_SOURCE, producer_config

log = logging.getLogger("gateway.relay")

TOPIC_CREATE_TIMEOUT_S = 30.0
STOP_FLUSH_TIMEOUT_S = 10.0
IDLE_WAIT_MS = 50


class CommittedSource(Protocol):
    def committed_lsn(self) -> int: ...
    def wait_committed(self, lsn: int, timeout_ms: int) -> bool: ...
    def written_lsn(self) -> int: ...
    def wait_written(self, lsn: int, timeout_ms: int) -> bool: ...


def record_key(payload: bytes) -> bytes | None:
    """The Kafka key of a WAL record: its payment id (None for a record without one)."""
    pid = payment_id_of(payload)
    return pid.encode() if pid is not None else None


def ensure_topic(bootstrap: str, topic: str, partitions: int, retention_ms: int | None = None,
                 timeout_s: float = TOPIC_CREATE_TIMEOUT_S, replication_factor: int = 1,
                 min_insync_replicas: int | None = None) -> None:
    """Creates the topic when it does not exist yet (an existing topic keeps its partitions and its
    replication factor) with `replication_factor` copies of each partition (`[cluster]
    topic_replication_factor`); `retention_ms` (`topic_retention_ms`) and `min_insync_replicas`
    (`topic_min_insync_replicas`) are set on it, on an existing topic too, so the config file decides
    how long Kafka keeps the event log and how many copies an acknowledgement needs. TimeoutError
    when the brokers do not answer within `timeout_s`."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    extra: dict[str, str] = {}
    if retention_ms is not None:
        extra["retention.ms"] = str(retention_ms)
    if min_insync_replicas is not None:
        extra["min.insync.replicas"] = str(min_insync_replicas)
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor, config=extra)],
        request_timeout=timeout_s)
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        if extra:
            resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in extra.items()])
            for fut in admin.incremental_alter_configs([resource], request_timeout=timeout_s).values():
                fut.result(timeout=timeout_s)


class Checkpoint:
    """The relay's acked LSN in a small file, replaced atomically and fsynced (file and folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text.isdigit() else 0

    def store(self, lsn: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{lsn}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Relay:
    def __init__(
        self,
        wal_dir: str,
        checkpoint_path: Path,
        source: CommittedSource,
        bootstrap: str,
        topic: str,
        *,
        inflight_records_max: int = 10_000,
        batch_records_max: int = 1_000,
        linger_ms: int = 1,
        message_timeout_ms: int = 60_000,
        checkpoint_interval_ms: int = 100,
        on_acked: Callable[[int], None] | None = None,
        source_name: str = "",
        read_written: bool = False,
    ) -> None:
        assert inflight_records_max >= 1 and batch_records_max >= 1
        self.wal_dir = wal_dir
        self.source = source
        self.topic = topic
        self.bootstrap = bootstrap
        self.inflight_records_max = inflight_records_max
        self.batch_records_max = min(batch_records_max, inflight_records_max)
        self.checkpoint_interval_s = checkpoint_interval_ms / 1000
        self.on_acked = on_acked
        self.source_name = source_name.encode()
        # How far the relay may read, and how it waits for more: written or committed records.
        self.read_written = read_written
        self._readable = source.written_lsn if read_written else source.committed_lsn
        self._wait_readable = source.wait_written if read_written else source.wait_committed
        self._producer_conf = producer_config(bootstrap, linger_ms=linger_ms, message_timeout_ms=message_timeout_ms,
                                              inflight_records_max=inflight_records_max)
        self._checkpoint = Checkpoint(checkpoint_path)
        # Everything at or below acked_lsn is in Kafka; it only moves forward.
        self.acked_lsn = self._checkpoint.load()
        self._stored_lsn = self.acked_lsn
        self._stored_at = time.monotonic()
        self.sent_records = 0
        self.acked_records = 0
        self.rewinds = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        # LSNs sent and not yet part of the contiguous acked prefix, in send order (= LSN order).
        self._inflight: deque[int] = deque()
        self._acked_out_of_order: set[int] = set()
        self._rewind = threading.Event()
        self._stop = threading.Event()
        self._space = threading.Condition(self._lock)
        self._producer: Producer | None = None
        self._generation = 0
        self._threads: list[threading.Thread] = []

    # -- delivery --------------------------------------------------------------------------------

    def _delivered(self, generation: int, lsn: int, err: KafkaError | None) -> None:
        if generation != self._generation:
            return  # a callback of a producer dropped by a rewind
        if err is not None:
            log.warning("record lsn=%d not delivered (%s); the relay rewinds to lsn %d", lsn, err, self.acked_lsn)
            self._rewind.set()
            with self._lock:
                self._space.notify_all()
            return
        advanced = 0
        with self._lock:
            self.acked_records += 1
            inflight = self._inflight
            if inflight and inflight[0] == lsn:
                inflight.popleft()
                advanced = lsn
                pending = self._acked_out_of_order
                while inflight and inflight[0] in pending:
                    advanced = inflight.popleft()
                    pending.discard(advanced)
            else:
                self._acked_out_of_order.add(lsn)
            if advanced:
                self.acked_lsn = advanced
                self._space.notify_all()
        if advanced and self.on_acked is not None:
            self.on_acked(advanced)

    def _on_delivery(self, generation: int, lsn: int, err: KafkaError | None, _msg: object) -> None:
        self._delivered(generation, lsn, err)

    @property
    def checkpointed_lsn(self) -> int:
        """The LSN of the checkpoint file: a restarted relay never reads the WAL at or below it."""
        return self._stored_lsn

    def _save_checkpoint(self, force: bool = False) -> None:
        lsn = self.acked_lsn
        if self.read_written:
            lsn = min(lsn, self.source.committed_lsn())
        now = time.monotonic()
        if lsn != self._stored_lsn and (force or now - self._stored_at >= self.checkpoint_interval_s):
            self._checkpoint.store(lsn)
            self._stored_lsn = lsn
            self._stored_at = now

    # -- threads ---------------------------------------------------------------------------------

    def _new_producer(self) -> Producer:
        self._generation += 1
        with self._lock:
            self._inflight.clear()
            self._acked_out_of_order.clear()
        self._producer = Producer(self._producer_conf)
        return self._producer

    def _poll_loop(self) -> None:
        # Never touches the disk: a checkpoint fsync held up by a stalling disk would hold every
        # acknowledgement behind it (durability "replicated" answers on those).
        while not self._stop.is_set():
            producer = self._producer
            try:
                if producer is None:
                    time.sleep(0.01)
                else:
                    producer.poll(0.1)
            except KafkaException as e:
                log.error("relay producer error: %s; rewinding", e)
                self._rewind.set()
            except BaseException as e:
                self.error = e
                log.exception("relay poller stopped")
                return

    def _checkpoint_loop(self) -> None:
        # A checkpoint that cannot be written stops the relay with that error, as it did on the poller.
        while not self._stop.wait(self.checkpoint_interval_s):
            try:
                self._save_checkpoint()
            except BaseException as e:
                self.error = e
                log.exception("relay checkpointer stopped")
                return

    def _send_loop(self) -> None:
        reader = WalReader(self.wal_dir, self.acked_lsn)
        producer = self._new_producer()
        last_read = self.acked_lsn
        while not self._stop.is_set():
            try:
                if self._rewind.is_set():
                    self.rewinds += 1
                    old = producer
                    self._producer = None
                    self._generation += 1  # the purge's own failure callbacks must not rewind again
                    old.purge(in_queue=True, in_flight=True)
                    old.flush(0)
                    self._rewind.clear()
                    last_read = self.acked_lsn
                    reader = WalReader(self.wal_dir, last_read)
                    producer = self._new_producer()
                    continue
                with self._lock:
                    room = self.inflight_records_max - len(self._inflight)
                    if room <= 0:
                        self._space.wait(0.1)
                        continue
                records = reader.read(self._readable(), min(room, self.batch_records_max))
                if not records:
                    self._wait_readable(last_read + 1, IDLE_WAIT_MS)
                    continue
                generation = self._generation
                for lsn, payload in records:
                    with self._lock:
                        self._inflight.append(lsn)
                    while True:
                        try:
                            producer.produce(
                                self.topic, value=payload, key=record_key(payload),
                                headers=[(HEADER_LSN, str(lsn).encode()), (HEADER_SOURCE, self.source_name)],
                                on_delivery=functools.partial(self._on_delivery, generation, lsn),
                            )
                            break
                        except BufferError:
                            time.sleep(0.005)  # the local queue is full: the poller drains it
                self.sent_records += len(records)
                last_read = records[-1][0]
            except BaseException as e:
                self.error = e
                log.exception("relay sender stopped")
                return

    def start(self) -> None:
        for name, target in (("wal-relay-send", self._send_loop), ("wal-relay-poll", self._poll_loop),
                             ("wal-relay-checkpoint", self._checkpoint_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, flush_timeout_s: float = STOP_FLUSH_TIMEOUT_S) -> None:
        """Waits (bounded) for the records sent so far to be acknowledged, then saves the checkpoint."""
        deadline = time.monotonic() + flush_timeout_s
        # Let the sender catch up with what is committed, so a clean stop leaves nothing behind.
        while (time.monotonic() < deadline and self.error is None and not self._rewind.is_set()
               and self.acked_lsn < self._readable()):
            time.sleep(0.01)
        self._stop.set()
        for t in self._threads:
            t.join()
        if self._producer is not None:
            self._producer.flush(max(0.0, deadline - time.monotonic()))
        self._save_checkpoint(force=True)

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)
