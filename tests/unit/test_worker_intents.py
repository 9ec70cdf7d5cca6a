"""Intent first for the auto-capture: its first attempt's `started` row is committed with the
authorization's outcome, before the capture call leaves, and is not written a second time."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
from gateway.processing.worker import Worker, WorkerSettings
from gateway.store.sqlite import SqliteStore

PAYMENTS = 40


def _accept(store: SqliteStore, ids: list[str]) -> None:
    records = []
    for lsn, pid in enumerate(ids, 1):
        payment = {"id": pid, "object": "payment", "status": "processing", "amount": 1000 + lsn,
                   "currency": "USD", "payment_method": "tok_visa", "capture": True, "created": 1}
        records.append((lsn, msgspec.json.encode({"type": "payment.created", "merchant_id": "acct_t",
                                                  "status_code": 201, "created_ms": 1, "payment": payment})))
    store.apply_wal_records(records)


def test_the_auto_capture_call_leaves_only_after_its_intent_is_committed(tmp_path: Path) -> None:
    db_path = tmp_path / "gateway.db"
    store = SqliteStore(db_path)
    store.migrate()
    store.create_merchant("T", "0" * 64, merchant_id="acct_t")
    ids = [f"pay_{i:024d}" for i in range(PAYMENTS)]
    _accept(store, ids)
    worker = Worker(store, WorkerSettings(psp_time_scale=0, psps=("psp_a",), inflight_max=64))
    reader = sqlite3.connect(db_path, check_same_thread=False)  # another connection: sees commits only
    seen: list[tuple[str, Any]] = []
    intent_batches: list[list[str]] = []
    client = worker.clients["psp_a"]
    inner_capture = client.capture

    async def capture(**kwargs: Any) -> Any:
        key = kwargs["idempotency_key"]
        row = reader.execute("SELECT status FROM payment_attempts WHERE attempt_id = ?", (f"{key}#1",)).fetchone()
        seen.append((key, row[0] if row else None))
        return await inner_capture(**kwargs)

    client.capture = capture  # type: ignore[method-assign]
    record_intents = worker.pstore.record_intents

    def counting(intents: Any) -> None:
        intent_batches.append([i.attempt.operation for i in intents])
        record_intents(intents)

    worker.pstore.record_intents = counting  # type: ignore[method-assign]
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = reader.execute("SELECT count(*) FROM payments WHERE status = 'captured'").fetchone()[0]
            if done == PAYMENTS:
                break
            time.sleep(0.02)
    finally:
        worker.stop()
        store.close()
    assert done == PAYMENTS
    assert sorted(k for k, _ in seen) == sorted(f"{pid}:capture:1" for pid in ids)
    assert {status for _, status in seen} == {"started"}
    # The worker itself recorded only the authorizations' intents; the captures' came with the apply.
    assert sorted(op for batch in intent_batches for op in batch) == ["authorize"] * PAYMENTS
    final = reader.execute("SELECT operation, status, count(*) FROM payment_attempts GROUP BY 1, 2").fetchall()
    assert sorted(final) == [("authorize", "approved", PAYMENTS), ("capture", "approved", PAYMENTS)]
