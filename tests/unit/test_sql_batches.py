"""The batched statements of the SQL layer on both backends: multi-row inserts (PostgreSQL: one
`INSERT ... SELECT FROM unnest(...)`), `update_many` and `any_of`, with the values a caller passes
(flags as bools into integer columns, whole amounts into float columns, literals, `%`, upserts)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway.store import sql
from gateway.store.postgres import PostgresStore
from gateway.store.sql import Db, Dialect, any_of, dialect_for
from gateway.store.sqlite import SqliteStore
from support import throwaway_pg_store

TABLE = ("CREATE TABLE batch_rows (id TEXT PRIMARY KEY, status TEXT NOT NULL, n BIGINT, flag INTEGER,"
         " ratio DOUBLE PRECISION, note TEXT, doc {json})")
INSERT = ("INSERT INTO batch_rows (id, status, n, flag, ratio, note, doc) VALUES (?, 'new', ?, ?, ?, '5% off', ?)"
          " ON CONFLICT (id) DO UPDATE SET n = excluded.n, status = 'again'")


@pytest.fixture(scope="module")
def pg_store() -> Iterator[PostgresStore]:
    yield from throwaway_pg_store("sqlb")


@pytest.fixture(params=["sqlite", "postgres"])
def dialect(request: pytest.FixtureRequest) -> Iterator[Dialect]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            store = SqliteStore(Path(folder) / "gateway.db")
            store.migrate()
            d = dialect_for(store)
            with d.tx() as db:
                db.execute(TABLE.format(json="TEXT"))
            yield d
        return
    d = dialect_for(request.getfixturevalue("pg_store"))
    with d.tx() as db:
        db.execute("DROP TABLE IF EXISTS batch_rows")
        db.execute(TABLE.format(json="JSONB"))
    sql._PG_TYPES.pop("batch_rows", None)  # the table is new to this process's catalog cache
    yield d


def _rows(db: Db) -> list[tuple[object, ...]]:
    return db.fetchall("SELECT id, status, n, flag, ratio, note, doc FROM batch_rows ORDER BY id")


@pytest.mark.parametrize("pipelined", [False, True])
def test_multi_row_insert_converts_values_and_keeps_literals(dialect: Dialect, pipelined: bool) -> None:
    rows = [(f"r{i}", i * 10, i % 2 == 0, i, None if i == 2 else f'{{"k": {i}}}') for i in range(3)]
    with dialect.tx(pipelined=pipelined) as db:
        db.executemany(INSERT, rows)
    with dialect.read() as db:
        got = _rows(db)
    doc = (lambda i: {"k": i}) if dialect.pg else (lambda i: f'{{"k": {i}}}')
    assert got == [("r0", "new", 0, 1, 0.0, "5% off", doc(0)), ("r1", "new", 10, 0, 1.0, "5% off", doc(1)),
                   ("r2", "new", 20, 1, 2.0, "5% off", None)]


def test_multi_row_upsert_updates_existing_rows_and_inserts_new_ones(dialect: Dialect) -> None:
    with dialect.tx() as db:
        db.executemany(INSERT, [("a", 1, True, 0.5, None), ("b", 2, False, 1.5, None)])
    with dialect.tx() as db:
        db.executemany(INSERT, [("b", 20, False, 1.5, None), ("c", 30, True, 2.5, None), ("d", 40, True, 3, None)])
    with dialect.read() as db:
        got = [(r[0], r[1], r[2]) for r in _rows(db)]
    assert got == [("a", "new", 1), ("b", "again", 20), ("c", "new", 30), ("d", "new", 40)]


def test_pg_insert_text_is_the_same_whatever_the_row_count(dialect: Dialect) -> None:
    if not dialect.pg:
        pytest.skip("SQLite steps one prepared statement already")
    with dialect.tx() as db:
        db.executemany(INSERT, [("a", 1, True, 0.5, None), ("b", 2, False, 1.5, None)])
        plan = sql._PG_UNNEST[INSERT]
        db.executemany(INSERT, [(f"x{i}", i, True, 1.0, None) for i in range(1_500)])  # two chunks
        assert sql._PG_UNNEST[INSERT] == plan
    assert plan is not None
    text, types = plan
    assert "VALUES" not in text and "unnest(" in text and "'5%% off'" in text
    assert types == ["text", "bigint", "integer", "double precision", "jsonb"]
    with dialect.read() as db:
        assert db.fetchone("SELECT count(*) FROM batch_rows") == (1_502,)


def test_update_many_and_any_of(dialect: Dialect) -> None:
    with dialect.tx() as db:
        db.executemany(INSERT, [(f"r{i}", i, True, 1.0, None) for i in range(5)])
    with dialect.tx(pipelined=True) as db:
        db.update_many("batch_rows", "id", [("status", "TEXT"), ("n", "BIGINT")],
                       [("r1", "moved", 100), ("r3", "moved", 300), ("nope", "moved", 1)])
    with dialect.read() as db:
        where, args = any_of(db, "id", ["r1", "r2", "r3", "absent"])
        got = db.fetchall(f"SELECT id, status, n FROM batch_rows WHERE {where} ORDER BY id", args)
    assert got == [("r1", "moved", 100), ("r2", "new", 2), ("r3", "moved", 300)]


def test_pg_a_value_of_the_wrong_kind_is_refused_and_nothing_is_written(dialect: Dialect) -> None:
    if not dialect.pg:
        pytest.skip("SQLite stores any value in any column")
    with pytest.raises(ValueError, match="two"), dialect.tx() as db:
        db.executemany(INSERT, [("a", 1, True, 0.5, None), ("b", "two", False, 1.5, None)])
    with dialect.read() as db:
        assert db.fetchone("SELECT count(*) FROM batch_rows") == (0,)


def test_pg_payments_keep_only_the_indexes_postgresql_reads(pg_store: PostgresStore) -> None:
    with dialect_for(pg_store).read() as db:
        names = {r[0] for r in db.fetchall("SELECT indexname FROM pg_indexes WHERE schemaname = ? AND tablename = 'payments'",
                                           (pg_store.schema,))}
    assert "payments_by_merchant" in names and "payments_by_status" in names
    assert not names & {"payments_by_merchant_created", "payments_by_merchant_lsn"}
