"""One behaviour, every backend: the `Store` contract that SQLite (embedded) and PostgreSQL (cluster)
must both honour. The PostgreSQL parameter runs against the real server of deploy/ in a schema of its
own, dropped afterwards."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cluster.conftest import run_services_up
from gateway.store.sqlite import SqliteStore

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=[pytest.mark.cluster, pytest.mark.timeout(900)]),
]


@pytest.fixture(scope="module")
def database_url() -> str:
    return run_services_up()["DATABASE_URL"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "gateway.db")
        s.migrate()
        yield s
        s.close()
        return
    from gateway.store.postgres import PostgresStore

    pg = PostgresStore(request.getfixturevalue("database_url"), schema=f"contract_{uuid.uuid4().hex[:12]}")
    pg.migrate()
    try:
        yield pg
    finally:
        pg.drop_schema()
        pg.close()


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def record(merchant_id: str, payment_id: str, amount: int = 1000, key: str | None = None) -> bytes:
    payment = {"id": payment_id, "object": "payment", "status": "processing", "amount": amount,
               "currency": "USD", "created": 1_700_000_000, "payment_method": "tok_visa"}
    return msgspec.json.encode({
        "type": "payment.created", "merchant_id": merchant_id, "idempotency_key": key,
        "fingerprint": "f" * 64 if key else None, "status_code": 201, "created_ms": 1_700_000_000_000,
        "payment": payment,
    })


def pid(n: int) -> str:
    return f"pay_{n:024d}"


def test_migrate_is_idempotent_and_returns_the_schema_version(store) -> None:
    first = store.migrate()
    assert first >= 2
    assert store.migrate() == first


def test_merchant_is_found_by_key_hash_only(store) -> None:
    m = store.create_merchant("Shop", key_hash("sk_test_a"), merchant_id="acct_a", rate_limit_per_s=5.0)
    assert m.id == "acct_a"
    got = store.merchant_by_key_hash(key_hash("sk_test_a"))
    assert got is not None and got.id == "acct_a" and got.name == "Shop" and got.rate_limit_per_s == 5.0
    assert store.merchant_by_key_hash(key_hash("sk_test_other")) is None


def test_duplicate_api_key_hash_is_refused(store) -> None:
    store.create_merchant("A", key_hash("sk_test_dup"), merchant_id="acct_1")
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError or psycopg.IntegrityError
        store.create_merchant("B", key_hash("sk_test_dup"), merchant_id="acct_2")


def test_apply_wal_records_is_idempotent_and_advances_the_checkpoint(store) -> None:
    store.create_merchant("A", key_hash("sk_a"), merchant_id="acct_a")
    assert store.checkpoint() == 0
    batch = [(1, record("acct_a", pid(1), key="k1")), (2, record("acct_a", pid(2)))]
    assert store.apply_wal_records(batch) == 2
    assert store.checkpoint() == 2
    # Replaying the same records (a crash before the checkpoint reached the caller) changes nothing.
    assert store.apply_wal_records(batch) == 0
    assert store.apply_wal_records([(3, record("acct_a", pid(1), key="k1")), (4, record("acct_a", pid(3)))]) == 1
    assert store.checkpoint() == 4
    assert store.count_payments() == 3
    assert store.count_payments("acct_a") == 3
    # The checkpoint never moves backwards.
    store.apply_wal_records([(2, record("acct_a", pid(2)))])
    assert store.checkpoint() == 4


def test_get_payment_is_scoped_by_merchant(store) -> None:
    store.create_merchant("A", key_hash("sk_a"), merchant_id="acct_a")
    store.create_merchant("B", key_hash("sk_b"), merchant_id="acct_b")
    store.apply_wal_records([(1, record("acct_a", pid(7), amount=4321))])
    body = store.get_payment("acct_a", pid(7))
    assert body is not None and msgspec.json.decode(body)["amount"] == 4321
    assert store.get_payment("acct_b", pid(7)) is None
    assert store.get_payment("acct_a", pid(8)) is None
    assert store.count_payments("acct_b") == 0


def test_same_idempotency_key_never_makes_two_payments(store) -> None:
    store.create_merchant("A", key_hash("sk_a"), merchant_id="acct_a")
    store.apply_wal_records([(1, record("acct_a", pid(1), key="order-1"))])
    # A second record under the same (merchant, key) with another id is ignored by the UNIQUE constraint.
    store.apply_wal_records([(2, record("acct_a", pid(2), key="order-1"))])
    assert store.count_payments("acct_a") == 1
    assert store.get_payment("acct_a", pid(2)) is None


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_postgres_event_records_refused_by_a_constraint_go_to_the_migrated_dead_letters_table(
    database_url: str,
) -> None:
    from gateway.store.postgres import PostgresStore

    pg = PostgresStore(database_url, schema=f"contract_{uuid.uuid4().hex[:12]}")
    pg.migrate()
    try:
        with pg.pool.connection() as conn:  # created by the migrations, not on first use
            assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        m = pg.create_merchant("Shop", key_hash("sk_dead"))
        bad_amount = record(m.id, pid(2), amount=0)  # CHECK (amount > 0) refuses it
        inserted = pg.apply_events([(1, record(m.id, pid(1))), (2, bad_amount), (3, b"{not json"),
                                    (4, record(m.id, pid(3)))])
        assert inserted == 2 and pg.count_payments(m.id) == 2
        with pg.pool.connection() as conn:
            rows = conn.execute("SELECT reason, payload FROM dead_letters ORDER BY id").fetchall()
        assert [(r[0].split(" ")[0], bytes(r[1])) for r in rows] == [("constraint", bad_amount),
                                                                     ("undecodable", b"{not json")]
    finally:
        pg.drop_schema()
        pg.close()
