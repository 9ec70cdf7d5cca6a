"""The Stripe surface's rows (store/stripe_intents.py) on SQLite and PostgreSQL: migration 10 from a store
of the schema before keeps its events listable, an unconfirmed intent moves only from the version it was
read at, its events are written once and delivered to Stripe endpoints only, and the lists page both ways
over payments and unconfirmed intents together."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from gateway.domain.stripe_objects import derived_payment_id
from gateway.store import postgres as pg_mod
from gateway.store import sqlite as sqlite_mod
from gateway.store.postgres import PostgresStore
from gateway.store.processing import ProcessingStore
from gateway.store.sqlite import SqliteStore
from gateway.store.stripe_intents import StripeIntents, surface_event_id
from schema_before import reopened_after_old_schema
from support import DATABASE_URL

OLD_EVENT = ("INSERT INTO payment_events (id, merchant_id, payment_id, type, created_ms, body)"
             " VALUES ('evt_old', 'acct_m', 'pay_old', 'payment.captured', 1000, ?)")
OLD_BODY = '{"id":"evt_old","object":"event","type":"payment.captured","created":1,"data":{"object":{"id":"pay_old"}}}'
HI = 2**62


def _payment(db: object, pid: str, created: int) -> None:
    db.execute("INSERT INTO payments (id, merchant_id, status, amount, currency, idempotency_key, created, lsn, body)"  # type: ignore[attr-defined]
               " VALUES (?, 'acct_m', 'processing', 100, 'USD', NULL, ?, 1, ?)",
               (pid, created, msgspec.json.encode({"id": pid, "status": "processing", "created": created}).decode()))


def _check(store: SqliteStore | PostgresStore) -> None:
    ps = ProcessingStore(store)
    si = StripeIntents(ps)
    # The event written before the migration is listed.
    bodies, more = si.events("acct_m", 10, None, None, False, 0, HI)
    assert [msgspec.json.decode(b)["id"] for b in bodies] == ["evt_old"] and not more
    # Endpoints: a Stripe one subscribed to payment_intent.created, a native one to everything.
    stripe_ep = ps.create_endpoint("acct_m", "https://example.com/s", ["payment.created", "@stripe",
                                                                      "@stripe:payment_intent.created"], None,
                                   "whsec_" + "s" * 32)
    native_ep = ps.create_endpoint("acct_m", "https://example.com/n", ["*"], None, "whsec_" + "n" * 32)
    assert stripe_ep is not None and native_ep is not None
    pid = derived_payment_id("acct_m", "stripe_intent_abc")
    body = {"id": pid, "object": "payment", "status": "requires_payment_method", "amount": 500, "currency": "USD",
            "created": 2_000}
    d = si.create("acct_m", pid, "stripe_intent_abc", "requires_payment_method", body)
    assert (d.status, d.version) == ("requires_payment_method", 0)
    # The same create again stores nothing twice.
    assert si.create("acct_m", pid, "stripe_intent_abc", "requires_payment_method", body).version == 0
    with ps._read() as db:
        deliveries = db.fetchall("SELECT endpoint_id FROM webhook_deliveries WHERE event_id = ?",
                                 (surface_event_id(pid, "payment.created"),))
    assert deliveries == [(stripe_ep["id"],)]
    moved = si.move(d, "requires_confirmation", {**body, "payment_method": "tok_visa"})
    assert moved is not None and moved.version == 1
    assert si.move(d, "canceled") is None, "a change from a stale version was applied"
    assert si.get("acct_m", pid) == moved and si.get("acct_other", pid) is None
    # Lists: payments and unconfirmed intents in one order, newest first, both ways.
    with ps._tx() as db:
        for i, created in enumerate((1_000, 3_000, 4_000)):
            _payment(db, f"pay_{i:024d}", created)
    page, more = si.page("acct_m", 2, None, False, 0, HI, True)
    assert [b["id"] for b in page] == ["pay_" + "0" * 23 + "2", "pay_" + "0" * 23 + "1"] and more
    page, more = si.page("acct_m", 2, si.position("acct_m", page[-1]["id"]), False, 0, HI, True)
    assert [b["id"] for b in page] == [pid, "pay_" + "0" * 24] and not more
    back, more = si.page("acct_m", 2, si.position("acct_m", pid), True, 0, HI, True)
    assert [b["id"] for b in back] == ["pay_" + "0" * 23 + "2", "pay_" + "0" * 23 + "1"] and not more
    assert [b["id"] for b in si.page("acct_m", 10, None, False, 0, HI, False)[0]] == [
        "pay_" + "0" * 23 + "2", "pay_" + "0" * 23 + "1", "pay_" + "0" * 24]
    assert [b["id"] for b in si.page("acct_m", 10, None, False, 2_000, 3_000, True)[0]] == [
        "pay_" + "0" * 23 + "1", pid]
    typed, _ = si.events("acct_m", 10, ["payment.created"], None, False, 0, HI)
    assert [msgspec.json.decode(b)["id"] for b in typed] == [surface_event_id(pid, "payment.created")]
    newest, more = si.events("acct_m", 1, None, None, False, 0, HI)
    assert more and msgspec.json.decode(newest[0])["id"] == surface_event_id(pid, "payment.created")
    older, more = si.events("acct_m", 5, None, si.event_position("acct_m", msgspec.json.decode(newest[0])["id"]),
                            False, 0, HI)
    assert [msgspec.json.decode(b)["id"] for b in older] == ["evt_old"] and not more


def _seed_old(store: SqliteStore | PostgresStore) -> None:
    store.create_merchant("M", "0" * 64, merchant_id="acct_m")
    with ProcessingStore(store)._tx() as db:
        db.execute(OLD_EVENT, (OLD_BODY,))


def test_sqlite_store_of_the_schema_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.db"
    store = reopened_after_old_schema(monkeypatch, sqlite_mod, lambda: SqliteStore(path), 10, _seed_old)
    assert store.migrate() == 10
    _check(store)
    store.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    try:
        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {DATABASE_URL}: {e}")
    yield f"mig10_{uuid.uuid4().hex[:10]}"


def test_postgres_store_of_the_schema_before(monkeypatch: pytest.MonkeyPatch, pg_schema: str) -> None:
    store = reopened_after_old_schema(monkeypatch, pg_mod, lambda: PostgresStore(DATABASE_URL, pg_schema), 10,
                                      _seed_old)
    try:
        assert store.migrate() == max(v for v, _ in pg_mod.MIGRATIONS)
        _check(store)
    finally:
        store.drop_schema()
        store.close()
