"""One behaviour, every backend: the `EventLog` contract that the local WAL (embedded mode) and the Kafka
topic (cluster mode) both honour, over the same records: written through the real fast path into a
real WAL, and for Kafka shipped from that WAL by the real relay to a topic of the test's own (3
partitions, so the reader merges them)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.conftest import run_services_up
from confluent_kafka.admin import AdminClient
from gateway._fastpath import FastPath
from gateway.feed.eventlog import EventLog, EventLogError, KafkaEventLog, ReadStats, WalEventLog
from gateway.feed.relay import Relay, ensure_topic

BACKENDS = [
    pytest.param("wal", id="wal"),
    pytest.param("kafka", id="kafka", marks=[pytest.mark.cluster, pytest.mark.timeout(900)]),
]
PARTITIONS = 3
RELAY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def kafka_bootstrap() -> str:
    return run_services_up()["KAFKA_BOOTSTRAP"]


class Written:
    """The records of one test: a WAL written by a fast path and, for Kafka, relayed to a topic."""

    def __init__(self, backend: str, tmp: Path, bootstrap: str | None) -> None:
        self.backend = backend
        self.wal_dir = str(tmp / "wal")
        self.fastpath = FastPath(json.dumps({"wal_dir": self.wal_dir}))
        self.ids: list[str] = []
        self.created_ms: list[int] = []
        self.bootstrap = bootstrap
        self.topic = f"eventlog-{uuid.uuid4().hex[:10]}"
        self.tmp = tmp
        self.relays = 0
        if bootstrap is not None:
            ensure_topic(bootstrap, self.topic, PARTITIONS)

    def pay(self, n: int) -> None:
        for _ in range(n):
            body = json.dumps({"amount": 1000 + len(self.ids), "currency": "EUR", "payment_method": "tok_visa"})
            r = self.fastpath.create_payment("acct_c", uuid.uuid4().hex, body.encode())
            assert r.status == 201, r.body
            assert self.fastpath.wait_committed(r.lsn, 5_000)
            self.ids.append(json.loads(r.body)["id"])
        self.created_ms = [r.created_ms for r in WalEventLog(self.wal_dir, self.fastpath.committed_lsn()).read()]
        if self.bootstrap is not None:
            self.relay()

    def relay(self, *, from_start: bool = False) -> None:
        """Ships the WAL to the topic until everything committed is acknowledged. `from_start`: a relay
        without a checkpoint, as after a crash before its first checkpoint: every record is sent again."""
        assert self.bootstrap is not None
        if not from_start:
            self.relays = max(self.relays, 1)
        else:
            self.relays += 1
        checkpoint = self.tmp / f"relay-{self.relays}.checkpoint"
        r = Relay(self.wal_dir, checkpoint, self.fastpath, self.bootstrap, self.topic, source_name="contract")
        r.start()
        deadline = time.monotonic() + RELAY_TIMEOUT_S
        while r.acked_lsn < self.fastpath.committed_lsn():
            assert r.error is None and time.monotonic() < deadline, r.error
            time.sleep(0.01)
        r.stop()

    def log(self) -> EventLog:
        if self.backend == "wal":
            return WalEventLog(self.wal_dir, self.fastpath.committed_lsn())
        assert self.bootstrap is not None
        return KafkaEventLog(self.bootstrap, self.topic, timeout_s=10)

    def close(self) -> None:
        self.fastpath.close()
        if self.bootstrap is not None:
            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            with contextlib.suppress(Exception):
                admin.delete_topics([self.topic])[self.topic].result(timeout=30)


@pytest.fixture(params=BACKENDS)
def written(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Written]:
    bootstrap = request.getfixturevalue("kafka_bootstrap") if request.param == "kafka" else None
    w = Written(request.param, tmp_path, bootstrap)
    yield w
    w.close()


def ids(records: Any) -> list[str]:
    return [r.event_id for r in records]


def test_every_record_comes_once_in_the_order_it_was_written(written: Written) -> None:
    written.pay(20)
    got = list(written.log().read())
    assert ids(got) == written.ids
    assert {r.type for r in got} == {"payment.created"}
    assert [r.lsn for r in got] == list(range(1, 21))
    assert [r.created_ms for r in got] == written.created_ms
    assert all(json.loads(r.payload)["payment"]["id"] == r.event_id for r in got)


def test_limit_stops_the_read_and_says_so_whatever_the_batch_size(written: Written) -> None:
    written.pay(12)
    log = written.log()
    stats = ReadStats()
    assert ids(log.read(limit=5, batch_records_max=2, stats=stats)) == written.ids[:5]
    assert stats.truncated and stats.returned == 5
    stats = ReadStats()
    assert ids(log.read(limit=12, batch_records_max=1, stats=stats)) == written.ids
    assert not stats.truncated and stats.returned == 12
    for bad in ({"limit": 0}, {"batch_records_max": 0}, {"since_ms": 5, "until_ms": 4}, {"after_lsn": -1}):
        with pytest.raises(EventLogError):
            log.read(**bad)


def test_time_range_returns_the_records_accepted_within_it(written: Written) -> None:
    written.pay(6)
    time.sleep(0.02)
    since_ms = int(time.time() * 1000)
    time.sleep(0.02)
    written.pay(5)
    time.sleep(0.02)
    until_ms = int(time.time() * 1000)
    time.sleep(0.02)
    written.pay(4)
    stats = ReadStats()
    got = list(written.log().read(since_ms=since_ms, until_ms=until_ms, stats=stats))
    assert ids(got) == written.ids[6:11]
    assert all(since_ms <= r.created_ms < until_ms for r in got)
    if written.backend == "kafka":
        # The read starts at the offsets of `since_ms` (offsets_for_times): the first burst is skipped.
        assert stats.scanned <= 11 - 6 + 4
    assert list(written.log().read(since_ms=until_ms + 60_000)) == []


def test_records_sent_twice_are_returned_once(written: Written) -> None:
    written.pay(10)
    if written.backend == "kafka":
        written.relay(from_start=True)  # a relay that lost its checkpoint sends all 10 again
    stats = ReadStats()
    got = list(written.log().read(stats=stats))
    assert ids(got) == written.ids
    assert stats.duplicates == (10 if written.backend == "kafka" else 0)
    assert stats.scanned == (20 if written.backend == "kafka" else 10)


def test_an_empty_log_reads_as_no_records(written: Written) -> None:
    stats = ReadStats()
    assert list(written.log().read(stats=stats)) == []
    assert (stats.returned, stats.truncated) == (0, False)
