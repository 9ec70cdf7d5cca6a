"""The store's durable record of a create key is the answer a replay sends: the payment, or the 402
error body of a declined one (docs/idempotency.md, "Beyond the memory table")."""

from __future__ import annotations

import json
from pathlib import Path

from gateway._fastpath import FastPath, WalReader
from gateway.config import Config
from gateway.store.sqlite import SqliteStore

BODY = b'{"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}'
BIG = b'{"amount": 900000, "currency": "USD", "payment_method": "tok_visa"}'


def test_the_durable_record_holds_the_answer_and_is_replayed_after_eviction(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data / "gateway.db")
    store.migrate()
    store.create_merchant("m", "a" * 64, merchant_id="m1")
    fp = FastPath(Config().fastpath_json(data, key_filter=True))
    fp.risk.set_rules("big: block if :amount_usd: > 5000\n", 1)
    ok = fp.create_payment("m1", "k-ok", BODY)
    declined = fp.create_payment("m1", "k-big", BIG)
    assert (ok.status, declined.status) == (201, 402)
    assert fp.wait_committed(declined.lsn, 5000)
    store.apply_wal_records(WalReader(str(data / "wal"), 0).read(declined.lsn, 100))

    rec = store.idempotency_record("m1", "k-big")
    assert rec is not None and rec[1] == 402
    assert json.loads(rec[2])["error"]["decline_code"] == "fraudulent"
    ok_rec = store.idempotency_record("m1", "k-ok")
    assert ok_rec is not None and ok_rec[1] == 201 and json.loads(ok_rec[2])["id"] == ok.payment_id
    assert store.idempotency_record("m1", "never") is None

    # A second call with the record answers as the first did, and refuses other parameters.
    again = fp.create_payment("m1", "k-big", BIG, checked=True, durable=rec)
    assert again.status == 402 and again.replayed and again.body == declined.body
    other = fp.create_payment("m1", "k-evicted", BODY, checked=True, durable=ok_rec)
    assert other.status == 201 and other.replayed and other.lsn == 0
    mismatch = fp.create_payment("m1", "k-evicted2", BIG, checked=True, durable=ok_rec)
    assert mismatch.status == 400 and b"idempotency_key_reused" in mismatch.body
    fp.close()
    store.close()
