"""The event log behind one small interface: the durable records of accepted (and declined) payments,
read in order over a time or position range, for backtests and audits.

Two implementations pass the same contract suite (tests/contract/test_eventlog_contract.py):

- `WalEventLog`: embedded mode's log, the local write-ahead log, read-only (`WalReader`): it never
  truncates or repairs anything, so it is safe against the WAL of a running gateway.
- `KafkaEventLog`: cluster mode's log, the `payments` topic every process's relay ships its WAL to. A
  throw-away consumer (no group, no commits) reads every partition from the beginning, or from the
  offset of `since_ms` (`offsets_for_times`), up to the high watermarks taken when the read starts,
  then stops: records produced during the read are not part of it. The relay delivers at least once
  (a rewind sends records again), so records are de-duplicated by (event id, type).

Order: `WalEventLog` returns its WAL's LSN order. `KafkaEventLog` keeps each partition's order (one
payment's records, and one relay's records, in the order they were produced: LSN order) and merges
the partitions by (`created_ms`, source, LSN), so the records of all processes come in time order.
The fast path stamps `created_ms` when a request starts, so two concurrent requests of one process can
differ by a millisecond between the two orders; a replay at each record's own `created_ms` does not
depend on it.

Limits: `limit` records at most per read (then `truncated` is set), `batch_records_max` records
fetched per call (from the WAL) or buffered per partition (from Kafka), so memory is bounded by the
batch size times the partitions, plus the ids seen for de-duplication.

The producer side (what the relay writes: the topic's producer settings) lives here too, so that
the writer and the readers of the topic agree on one place.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any, Protocol

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from gateway._fastpath import WalReader
from gateway.domain.records import decode_summary

# Records one read returns at most, whatever the caller asks.
READ_RECORDS_MAX = 100_000_000
BATCH_RECORDS_MAX = 100_000
BATCH_RECORDS_DEFAULT = 10_000
# "Everything that is complete": offline readers do not know the committed LSN of a running writer.
LSN_MAX = 2**63 - 1
TIME_MS_MAX = 2**63 - 1
KAFKA_TIMEOUT_S = 30.0
KAFKA_POLL_S = 1.0
# Kafka headers the relay writes on every record.
HEADER_LSN = "lsn"
HEADER_SOURCE = "source"


class EventLogError(Exception):
    """The log could not be read (a broker or WAL error), or a read was asked with invalid bounds."""


def producer_config(bootstrap: str, *, linger_ms: int, message_timeout_ms: int,
                    inflight_records_max: int) -> dict[str, Any]:
    """The relay's producer settings: idempotent, `acks=all` (a record is acknowledged once every
    in-sync replica has it), bounded local queue."""
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        "message.timeout.ms": message_timeout_ms,
        "queue.buffering.max.messages": max(inflight_records_max * 2, 1000),
        "compression.type": "lz4",
    }


class EventRecord(msgspec.Struct, frozen=True):
    """One durable record: its source (a WAL; "" for the local one), LSN in that WAL, time of
    acceptance, type (`payment.created`, ...), event id (the payment id) and the WAL payload bytes."""

    source: str
    lsn: int
    created_ms: int
    type: str
    event_id: str
    payload: bytes

    def order_key(self) -> tuple[int, str, int]:
        return (self.created_ms, self.source, self.lsn)


class ReadStats(msgspec.Struct):
    """What one read did: records looked at, duplicates dropped, records returned, whether `limit`
    stopped it before the end of the range, and how long it took."""

    scanned: int = 0
    duplicates: int = 0
    returned: int = 0
    truncated: bool = False
    elapsed_ms: float = 0.0


class EventLog(Protocol):
    def read(self, *, since_ms: int = 0, until_ms: int = TIME_MS_MAX, after_lsn: int = 0,
             limit: int = READ_RECORDS_MAX, batch_records_max: int = BATCH_RECORDS_DEFAULT,
             stats: ReadStats | None = None) -> Iterator[EventRecord]:
        """The records with `since_ms <= created_ms < until_ms` and an LSN above `after_lsn` (in its
        own source), in order (module docstring), at most `limit` of them; `stats`, when given, is
        filled in as the iterator advances."""
        ...


def decode(source: str, lsn: int, payload: bytes) -> EventRecord | None:
    """The record of a WAL payload, None for bytes that are not a record (never written by the fast
    path; skipped rather than failing a whole audit)."""
    s = decode_summary(payload)
    if s is None:
        return None
    return EventRecord(source, lsn, s.created_ms, s.type, s.payment_id, payload)


def _check_bounds(since_ms: int, until_ms: int, after_lsn: int, limit: int, batch_records_max: int) -> None:
    if not 0 <= since_ms <= until_ms:
        raise EventLogError(f"invalid time range: since_ms={since_ms} until_ms={until_ms}")
    if after_lsn < 0:
        raise EventLogError(f"after_lsn must be >= 0, got {after_lsn}")
    if not 1 <= limit <= READ_RECORDS_MAX:
        raise EventLogError(f"limit must be from 1 to {READ_RECORDS_MAX}, got {limit}")
    if not 1 <= batch_records_max <= BATCH_RECORDS_MAX:
        raise EventLogError(f"batch_records_max must be from 1 to {BATCH_RECORDS_MAX}, got {batch_records_max}")


class _RangeReader:
    """What both logs do around their own scan (`_records`): the bounds check, the `limit` (the
    record past it is not returned, `truncated` is set and the scan is closed) and the timing."""

    def read(self, *, since_ms: int = 0, until_ms: int = TIME_MS_MAX, after_lsn: int = 0,
             limit: int = READ_RECORDS_MAX, batch_records_max: int = BATCH_RECORDS_DEFAULT,
             stats: ReadStats | None = None) -> Iterator[EventRecord]:
        _check_bounds(since_ms, until_ms, after_lsn, limit, batch_records_max)
        stats = stats or ReadStats()
        return self._limited(self._records(since_ms, until_ms, after_lsn, batch_records_max, stats), limit, stats)

    def _records(self, since_ms: int, until_ms: int, after_lsn: int, batch: int,
                 stats: ReadStats) -> Generator[EventRecord, None, None]:
        """The records in the range, in order, counting what was scanned (and dropped) in `stats`."""
        raise NotImplementedError

    @staticmethod
    def _limited(records: Generator[EventRecord, None, None], limit: int,
                 stats: ReadStats) -> Iterator[EventRecord]:
        started = time.perf_counter()
        try:
            for rec in records:
                if stats.returned >= limit:
                    stats.truncated = True
                    return
                stats.returned += 1
                yield rec
        finally:
            # Ends the scan (closing its consumer) before the time is taken, also on an early stop.
            records.close()
            stats.elapsed_ms = round((time.perf_counter() - started) * 1000, 1)


class WalEventLog(_RangeReader):
    """The local WAL, read-only, up to `committed_lsn` (LSN_MAX: every complete record)."""

    def __init__(self, wal_dir: str, committed_lsn: int = LSN_MAX) -> None:
        self.wal_dir = wal_dir
        self.committed_lsn = committed_lsn

    def _records(self, since_ms: int, until_ms: int, after_lsn: int, batch: int,
                 stats: ReadStats) -> Generator[EventRecord, None, None]:
        try:
            reader = WalReader(self.wal_dir, after_lsn)
        except OSError as e:
            raise EventLogError(f"the WAL in {self.wal_dir} cannot be read: {e}") from None
        # One WAL holds one record per LSN: there is nothing to de-duplicate.
        while True:
            got = reader.read(self.committed_lsn, batch)
            for lsn, payload in got:
                stats.scanned += 1
                rec = decode("", lsn, payload)
                if rec is None or not since_ms <= rec.created_ms < until_ms:
                    continue
                yield rec
            if not got or got[-1][0] >= self.committed_lsn or len(got) < batch:
                return


class KafkaEventLog(_RangeReader):
    """The topic the relays write, read by a throw-away consumer up to the high watermarks taken at the
    start of each read."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = KAFKA_TIMEOUT_S) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s

    def _consumer(self) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.bootstrap,
            # A group id is required by librdkafka; it is never joined (assign, not subscribe) and
            # never committed to, so the read leaves no trace on the broker.
            "group.id": f"eventlog-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "isolation.level": "read_committed",
        })

    def _ranges(self, consumer: Consumer, since_ms: int) -> list[tuple[int, int, int]]:
        """(partition, first offset, high watermark) of every partition with records to read."""
        meta = consumer.list_topics(self.topic, timeout=self.timeout_s)
        tmeta = meta.topics.get(self.topic)
        if tmeta is None or tmeta.error is not None:
            if tmeta is not None and tmeta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise EventLogError(f"topic {self.topic}: {tmeta.error}")
            return []
        parts = sorted(tmeta.partitions)
        starts = {p: OFFSET_BEGINNING for p in parts}
        if since_ms > 0:
            found = consumer.offsets_for_times([TopicPartition(self.topic, p, since_ms) for p in parts],
                                               timeout=self.timeout_s)
            # -1: no record at or after since_ms in that partition (nothing to read there).
            starts = {tp.partition: tp.offset for tp in found}
        out = []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.timeout_s)
            start = starts[p]
            if start == OFFSET_BEGINNING:
                start = low
            if start < 0 or start >= high:
                continue
            out.append((p, max(start, low), high))
        return out

    def _records(self, since_ms: int, until_ms: int, after_lsn: int, batch: int,
                 stats: ReadStats) -> Generator[EventRecord, None, None]:
        consumer = self._consumer()
        try:
            try:
                ranges = self._ranges(consumer, since_ms)
            except KafkaException as e:
                raise EventLogError(f"topic {self.topic} cannot be read: {e}") from None
            if not ranges:
                return
            high = {p: h for p, _, h in ranges}
            consumer.assign([TopicPartition(self.topic, p, start) for p, start, _ in ranges])
            # A k-way merge over the partitions: a record is released only when every partition that
            # still has records to read has one buffered, so the smallest head is the smallest of all.
            buffers: dict[int, deque[EventRecord]] = {p: deque() for p in high}
            done: set[int] = set()
            paused: set[int] = set()
            seen: set[tuple[str, str]] = set()
            deadline = time.monotonic() + self.timeout_s
            while True:
                active = [p for p in high if p not in done or buffers[p]]
                if not active:
                    return
                if all(buffers[p] for p in active):
                    p = min(active, key=lambda q: buffers[q][0].order_key())
                    rec = buffers[p].popleft()
                    if p in paused and len(buffers[p]) < batch:
                        consumer.resume([TopicPartition(self.topic, p)])
                        paused.discard(p)
                    yield rec
                    continue
                msgs = consumer.consume(num_messages=batch, timeout=KAFKA_POLL_S)
                if not msgs:
                    if time.monotonic() > deadline:
                        raise EventLogError(
                            f"topic {self.topic}: no record for {self.timeout_s:.0f}s before the high "
                            f"watermarks {high} were reached")
                    continue
                deadline = time.monotonic() + self.timeout_s
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise EventLogError(f"topic {self.topic}: {err}")
                    p, offset = m.partition() or 0, m.offset() or 0
                    if p in done or offset >= high[p]:
                        continue  # produced after the read started
                    if offset >= high[p] - 1:
                        done.add(p)
                    stats.scanned += 1
                    got = self._record(m)
                    if got is None or not since_ms <= got.created_ms < until_ms or got.lsn <= after_lsn:
                        continue
                    key = (got.event_id, got.type)
                    if key in seen:
                        stats.duplicates += 1
                        continue
                    seen.add(key)
                    buffers[p].append(got)
                for p, buf in buffers.items():
                    if p not in paused and p not in done and len(buf) >= batch:
                        consumer.pause([TopicPartition(self.topic, p)])
                        paused.add(p)
        finally:
            consumer.close()

    @staticmethod
    def _record(m: Any) -> EventRecord | None:
        headers = dict(m.headers() or ())
        raw_lsn = headers.get(HEADER_LSN) or b"0"
        lsn = int(raw_lsn) if raw_lsn.isdigit() else 0
        source = (headers.get(HEADER_SOURCE) or b"").decode(errors="replace")
        value = m.value()
        return decode(source, lsn, value) if value is not None else None


def merge_in_order(logs: list[Iterator[EventRecord]]) -> Iterator[EventRecord]:
    """Several ordered reads as one ordered read (by `created_ms`, source, LSN)."""
    return heapq.merge(*logs, key=EventRecord.order_key)
