"""Migration 9 (a payment stored once): a store written by the schema before it keeps every payment's
processing state, and payments never processed get their token and auto-capture flag from the body."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from gateway.store import postgres as pg_mod
from gateway.store import sqlite as sqlite_mod
from gateway.store.payments import load_states
from gateway.store.postgres import PostgresStore
from gateway.store.processing import ProcessingStore
from gateway.store.sqlite import SqliteStore
from schema_before import reopened_after_old_schema
from support import DATABASE_URL

LATEST = max(v for v, _ in sqlite_mod.MIGRATIONS)
PG_LATEST = max(v for v, _ in pg_mod.MIGRATIONS)  # PostgreSQL has migrations of its own after SQLite's

OLD_STATE = ("INSERT INTO payment_state (payment_id, merchant_id, status, amount, currency, payment_method,"
             " auto_capture, amount_authorized, amount_captured, amount_refunded, capture_final, psp, psp_reference,"
             " failure_code, version, updated_ms, events_count)"
             " VALUES (?, 'acct_m', 'captured', 1000, 'EUR', 'tok_visa', 1, 1000, 700, 200, 1, 'psp_b', 'ref_1', NULL,"
             " 3, 5, 4)")


def _payment(pid: str, body: str) -> tuple[object, ...]:
    return (pid, "acct_m", "processing", 1000, "EUR", None, 1, 1, body)


def _seed_old(store: SqliteStore | PostgresStore) -> None:
    store.create_merchant("M", "0" * 64, merchant_id="acct_m")
    with ProcessingStore(store)._tx() as db:
        for pid, body in (("pay_done", '{"payment_method": "tok_visa"}'),
                          ("pay_new", '{"payment_method": "tok_mastercard", "capture": false}'),
                          ("pay_bare", "{}")):
            db.execute("INSERT INTO payments (id, merchant_id, status, amount, currency, idempotency_key, created,"
                       " lsn, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", _payment(pid, body))
        db.execute(OLD_STATE, ("pay_done",))


def _check(store: SqliteStore | PostgresStore) -> None:
    with ProcessingStore(store)._read() as db:
        states = load_states(db, ["pay_done", "pay_new", "pay_bare"])
    done = states["pay_done"]
    p = done.payment
    assert (p.status.value, p.amount_authorized, p.amount_captured, p.amount_refunded, p.capture_final, p.psp,
            p.psp_reference, p.version, done.token, done.auto_capture) == (
        "captured", 1000, 700, 200, True, "psp_b", "ref_1", 3, "tok_visa", True)
    new = states["pay_new"]
    assert (new.payment.status.value, new.payment.version, new.token, new.auto_capture) == (
        "processing", 0, "tok_mastercard", False)
    assert (states["pay_bare"].token, states["pay_bare"].auto_capture) == ("", True)


def test_sqlite_store_of_the_schema_before_keeps_every_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.db"
    store = reopened_after_old_schema(monkeypatch, sqlite_mod, lambda: SqliteStore(path), 9, _seed_old)
    assert store.migrate() == LATEST
    _check(store)
    with ProcessingStore(store)._read() as db:
        assert db.fetchall("SELECT name FROM sqlite_master WHERE name = 'payment_state'") == []
    store.close()


def test_postgres_store_of_the_schema_before_keeps_every_state(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {DATABASE_URL}: {e}")
    schema = f"mig9_{uuid.uuid4().hex[:10]}"
    store = reopened_after_old_schema(monkeypatch, pg_mod, lambda: PostgresStore(DATABASE_URL, schema), 9, _seed_old)
    try:
        assert store.migrate() == PG_LATEST
        _check(store)
        with ProcessingStore(store)._read() as db:
            assert db.fetchall("SELECT 1 FROM information_schema.tables WHERE table_schema = ?"
                               " AND table_name = 'payment_state'", (schema,)) == []
    finally:
        store.drop_schema()
        store.close()
