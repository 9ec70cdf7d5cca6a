"""The relay's bookkeeping without a broker: the contiguously acknowledged LSN under out-of-order
delivery callbacks, rewinds on a failed delivery, and the fsync'd checkpoint file; and the one WAL
record schema its Kafka key, the event log, the workers and the stores decode with."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import pytest
from gateway.domain import records
from gateway.feed.relay import Checkpoint, Relay, record_key
from gateway.store.base import wal_rows


class NoSource:
    def committed_lsn(self) -> int:
        return 0

    def wait_committed(self, lsn: int, timeout_ms: int) -> bool:
        return False


def relay(tmp_path: Path, acked: list[int] | None = None) -> Relay:
    r = Relay(str(tmp_path / "wal"), tmp_path / "relay.checkpoint", NoSource(), "127.0.0.1:1", "t",
              on_acked=(acked.append if acked is not None else None))
    return r


def test_acked_lsn_advances_only_over_a_contiguous_prefix(tmp_path: Path) -> None:
    acked: list[int] = []
    r = relay(tmp_path, acked)
    r._inflight.extend([1, 2, 3, 5])
    r._delivered(r._generation, 2, None)
    r._delivered(r._generation, 5, None)
    assert r.acked_lsn == 0 and acked == []
    r._delivered(r._generation, 1, None)
    assert r.acked_lsn == 2 and acked == [2]
    r._delivered(r._generation, 3, None)
    assert r.acked_lsn == 5 and acked == [2, 5]
    assert r.inflight() == 0


def test_failed_delivery_requests_a_rewind_and_stale_callbacks_are_ignored(tmp_path: Path) -> None:
    r = relay(tmp_path)
    r._inflight.extend([1, 2])
    r._delivered(r._generation - 1, 1, None)  # a callback of a producer dropped by an earlier rewind
    assert r.acked_lsn == 0
    r._delivered(r._generation, 1, object())  # type: ignore[arg-type]
    assert r._rewind.is_set() and r.acked_lsn == 0


def test_checkpoint_survives_a_new_relay(tmp_path: Path) -> None:
    r = relay(tmp_path)
    r._inflight.extend([1, 2])
    r._delivered(r._generation, 1, None)
    r._delivered(r._generation, 2, None)
    r._save_checkpoint(force=True)
    assert Checkpoint(tmp_path / "relay.checkpoint").load() == 2
    assert relay(tmp_path).acked_lsn == 2


def test_records_are_keyed_by_payment_id() -> None:
    payload = msgspec.json.encode({"type": "payment.created", "payment": {"id": "pay_x", "amount": 1}})
    assert record_key(payload) == b"pay_x"
    assert record_key(b"not json") is None


# The record as the fast path writes it (rust/fastpath/src/engine.rs, `CreatedRecord`), with a field a
# newer writer might add: the one schema (domain/records.py) ignores what it does not know.
CREATED = msgspec.json.encode({
    "type": "payment.created", "merchant_id": "acct_1", "idempotency_key": "k1", "fingerprint": "ab" * 16,
    "status_code": 201, "created_ms": 1_700_000_000_123,
    "payment": {"id": "pay_1", "object": "payment", "status": "processing", "amount": 1000, "currency": "EUR",
                "created": 1_700_000_000, "livemode": False},
    "added_later": {"x": 1},
})


def test_one_record_schema_serves_the_relay_the_event_log_the_workers_and_the_stores() -> None:
    rec = records.decode_record(CREATED)
    assert (rec.type, rec.merchant_id, rec.status_code, rec.created_ms) == (
        "payment.created", "acct_1", 201, 1_700_000_000_123)
    assert rec.head() == records.PaymentHead("pay_1", "processing", 1000, "EUR", 1_700_000_000)
    summary = records.decode_summary(CREATED)
    assert summary is not None and (summary.type, summary.created_ms, summary.payment_id) == (
        "payment.created", 1_700_000_000_123, "pay_1")
    assert records.payment_id_of(CREATED) == "pay_1" and record_key(CREATED) == b"pay_1"
    other = msgspec.json.encode({"type": "payment.other", "merchant_id": "acct_1", "status_code": 200,
                                 "created_ms": 1, "payment": {"id": "pay_2"}})
    assert records.created_payment_ids([(1, CREATED), (2, b"{"), (3, other)]) == ["pay_1"]
    payments, keys = wal_rows([(7, CREATED), (8, other)])
    assert [p[:8] for p in payments] == [("pay_1", "acct_1", "processing", 1000, "EUR", "k1", 1_700_000_000, 7)]
    assert msgspec.json.decode(payments[0][8])["livemode"] is False
    assert keys == [("acct_1", "k1", "ab" * 16, 201, payments[0][8], 1_700_000_000_123)]


def test_bytes_that_are_not_a_record_are_refused_by_the_stores_and_skipped_by_the_readers() -> None:
    assert records.decode_summary(b"not json") is None and records.payment_id_of(b"[]") is None
    with pytest.raises(msgspec.DecodeError):
        wal_rows([(1, b'{"type": "payment.created"}')])


class AckingProducer:
    """Stands in for librdkafka's producer in the poller: each `poll` delivers the LSNs queued so far."""

    def __init__(self, r: Relay) -> None:
        self.relay, self.queued = r, []

    def poll(self, timeout: float) -> int:
        lsns, self.queued = self.queued, []
        for lsn in lsns:
            self.relay._delivered(self.relay._generation, lsn, None)
        time.sleep(min(timeout, 0.005))
        return len(lsns)


def test_acks_keep_flowing_while_the_checkpoint_write_is_stuck_on_the_disk(tmp_path: Path) -> None:
    """A checkpoint fsync held up by a stalling disk must not hold acknowledgements back: durability
    "replicated" answers a create on the ack alone."""
    r = Relay(str(tmp_path / "wal"), tmp_path / "relay.checkpoint", NoSource(), "127.0.0.1:1", "t",
              checkpoint_interval_ms=1)
    disk = threading.Event()
    stores: list[int] = []

    def stalled_store(lsn: int) -> None:
        disk.wait(10)
        stores.append(lsn)

    r._checkpoint.store = stalled_store  # type: ignore[method-assign]
    producer = AckingProducer(r)
    r._producer = producer  # type: ignore[assignment]
    threads = [threading.Thread(target=t, daemon=True) for t in (r._poll_loop, r._checkpoint_loop)]
    for t in threads:
        t.start()
    try:
        for lsn in range(1, 51):
            with r._lock:
                r._inflight.append(lsn)
            producer.queued.append(lsn)
        deadline = time.monotonic() + 5
        while r.acked_lsn < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.acked_lsn == 50, "acks waited for the checkpoint's disk write"
        assert stores == [] and r.checkpointed_lsn == 0
        disk.set()
        deadline = time.monotonic() + 5
        while r.checkpointed_lsn < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.checkpointed_lsn == 50 and stores[-1] == 50
    finally:
        disk.set()
        r._stop.set()
        for t in threads:
            t.join(5)
