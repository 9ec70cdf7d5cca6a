"""The one SQL layer of the store: every statement is written once, for SQLite and PostgreSQL alike.

Statements use `?` placeholders; for psycopg they become `%s` and a literal `%` becomes `%%` (`pg_sql`),
so the same text runs on both backends. What really differs sits in one seam, `Dialect`:

- how a transaction begins: SQLite takes `BEGIN IMMEDIATE` under the store's write lock, which
  serialises every writer of the file; PostgreSQL takes a pooled connection's transaction, optionally
  in pipeline mode (statements share round trips);
- row locks where a check and a write must not interleave (`lock_payment`, `for_update`) and
  transaction-scoped advisory locks (`xact_lock`): no-ops on SQLite, whose writers are serialised;
- JSON extraction (`json_text`, `json_bool`);
- notifications to other processes (`notify`, sent only once the transaction has committed);
- session advisory locks that let one of several worker processes drive a payment (`claim`/`release`).

Invariant: a `Db` is only used inside the `read()` or `tx()` that yielded it; results are fetched
before the block ends.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.store.sqlite import SqliteStore

log = logging.getLogger("gateway.store.sql")

# Values bound in one `IN (...)` list; longer lists are split (SQLite allows 32,766 variables a statement).
IN_LIST_MAX = 500
# Rows of one batched statement on PostgreSQL (`INSERT ... SELECT FROM unnest(...)`, `UPDATE ... FROM unnest`).
PG_ROWS_PER_INSERT = 1_000


def now_ms() -> int:
    return int(time.time() * 1000)


_PG_SQL: dict[str, str] = {}
# `INSERT INTO t (...) VALUES (one row's placeholders)` and what follows (`ON CONFLICT ...`).
_INSERT_VALUES = re.compile(r"^(INSERT INTO [^()]+\([^()]*\) VALUES )(\([^()]*\))(.*)$", re.DOTALL)


def pg_sql(sql: str) -> str:
    """The statement in psycopg's placeholder style: `?` -> `%s`, `%` -> `%%` (cached per statement)."""
    out = _PG_SQL.get(sql)
    if out is None:
        out = _PG_SQL[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


def marks(n: int) -> str:
    """`?, ?, ...` for an `IN (...)` list of `n` values."""
    return ", ".join("?" * n)


def any_of(db: Db, column: str, values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
    """`column IN (values)` and its arguments: one array parameter on PostgreSQL (the statement's text,
    and so its conversion and plan, is the same whatever the count), a placeholder a value on SQLite."""
    if db.pg:
        return f"{column} = ANY(?)", (list(values),)
    return f"{column} IN ({marks(len(values))})", values


def chunked(values: Sequence[Any], size: int = IN_LIST_MAX) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), size):
        yield values[i:i + size]


def pg_unnest(types: Sequence[str], alias: str) -> str:
    """`unnest(%b::type[], ...) AS alias(c0, c1, ...)`: the rows of `pg_arrays`, one array a column."""
    arrays = ", ".join(f"%b::{t}[]" for t in types)
    return f"unnest({arrays}) AS {alias}({', '.join(f'c{i}' for i in range(len(types)))})"


_INTEGER_TYPES = frozenset(("bigint", "integer", "smallint"))
_FLOAT_TYPES = frozenset(("double precision", "real"))


def pg_arrays(rows: Sequence[Sequence[Any]], types: Sequence[str]) -> list[list[Any]]:
    """The columns of `rows` as the arrays of `pg_unnest(types)`: a list of one Python type each, as
    psycopg's array dumper needs (a flag stored as an integer column arrives as an int, a whole amount
    in a float column as a float)."""
    out: list[list[Any]] = []
    for values, sql_type in zip(zip(*rows, strict=True), types, strict=True):
        if sql_type in _INTEGER_TYPES:
            out.append([v if v is None or type(v) is int else int(v) for v in values])
        elif sql_type in _FLOAT_TYPES:
            out.append([v if v is None or type(v) is float else float(v) for v in values])
        else:
            out.append(list(values))
    return out


# Per INSERT statement: its unnest form and the types of its arrays, or None where it has no such form.
_PG_UNNEST: dict[str, tuple[str, list[str]] | None] = {}
# Column types of a table, read from the catalog once per process (every schema has the same tables).
_PG_TYPES: dict[str, dict[str, str]] = {}


def pg_column_types(db: Db, table: str) -> dict[str, str]:
    """The SQL type of each column of `table` (read from the catalog once per process)."""
    known = _PG_TYPES.get(table)
    if known is None:
        known = _PG_TYPES[table] = dict(db.fetchall(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = CAST(? AS regclass) AND attnum > 0 AND NOT attisdropped", (table,)))
    return known


def _pg_unnest_insert(db: Db, sql: str) -> tuple[str, list[str]] | None:
    """`INSERT INTO t (a, b, c) VALUES (?, 'x', ?) tail` as `INSERT INTO t (a, b, c) SELECT u.c0,
    CAST('x' AS type of b), u.c1 FROM unnest(...) AS u(c0, c1) tail`, with the array types; None for a
    statement of another shape (parameters inside expressions, or in the tail)."""
    if sql in _PG_UNNEST:
        return _PG_UNNEST[sql]
    plan = None
    m = _INSERT_VALUES.match(sql)
    if m is not None:
        head, one, tail = m.groups()
        table, column_list = head[len("INSERT INTO "):].split("(", 1)
        columns = [c.strip() for c in column_list.split(")")[0].split(",")]
        items = [i.strip() for i in one[1:-1].split(",")]
        simple = all(i == "?" or ("?" not in i and i.count("'") % 2 == 0) for i in items)
        if simple and len(items) == len(columns) and "?" not in tail:
            known = pg_column_types(db, table.strip())
            types: list[str] = []
            select: list[str] = []
            for column, item in zip(columns, items, strict=True):
                if item == "?":
                    select.append(f"u.c{len(types)}")
                    types.append(known[column])
                else:
                    select.append(f"CAST({item} AS {known[column]})")
            into, values = head[:-len("VALUES ")].replace("%", "%%"), ", ".join(select).replace("%", "%%")
            plan = (f"{into}SELECT {values} FROM {pg_unnest(types, 'u')}{tail.replace('%', '%%')}", types)
    _PG_UNNEST[sql] = plan
    return plan


class Db:
    """One connection inside a read or a transaction, executing the shared SQL on either backend."""

    __slots__ = ("notifications", "pg", "pipeline", "raw")

    def __init__(self, raw: Any, pg: bool) -> None:
        self.raw = raw
        self.pg = pg
        # psycopg pipeline of a pipelined transaction: statements are queued and go out together with
        # the next one whose result is fetched (one round trip), or at `sync`.
        self.pipeline: Any = None
        # (channel, payload) to send once the transaction has committed.
        self.notifications: list[tuple[str, str]] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if self.pg:
            return self.raw.execute(pg_sql(sql), tuple(args))
        return self.raw.execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """One statement over many rows; returns the rows it wrote (outside a pipeline). SQLite steps
        one prepared statement; on PostgreSQL an `INSERT ... VALUES (...)` goes out as one `INSERT ...
        SELECT FROM unnest(...)` per `PG_ROWS_PER_INSERT` rows, a column an array (one statement for the
        server to run instead of one per row, and one text whatever the count: psycopg converts it once
        and the server prepares it; an `ON CONFLICT DO UPDATE` caller must not repeat a key within one
        call, `DO NOTHING` may); anything else as a pipelined executemany."""
        if not rows:
            return 0
        if not self.pg:
            return int(self.raw.executemany(sql, rows).rowcount)
        plan = _pg_unnest_insert(self, sql) if len(rows) > 1 else None
        if plan is None:
            with self.raw.cursor() as cur:
                cur.executemany(pg_sql(sql), rows)
                return int(cur.rowcount)
        text, types = plan
        written = 0
        for chunk in chunked(rows, PG_ROWS_PER_INSERT):
            written += self.raw.execute(text, pg_arrays(chunk, types)).rowcount
        return written

    def update_many(self, table: str, key: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        """`UPDATE table SET column = ... WHERE key = ?` for each row `(key value, column values...)`;
        `columns` are (name, SQL type). On PostgreSQL one `UPDATE ... FROM unnest(...)` per chunk of
        rows (one statement for the server, not one per row); SQLite steps one prepared statement."""
        if not rows:
            return
        if not self.pg:
            sets = ", ".join(f"{name} = ?" for name, _ in columns)
            self.raw.executemany(f"UPDATE {table} SET {sets} WHERE {key} = ?", [(*r[1:], r[0]) for r in rows])
            return
        types = ["text", *(sql_type.lower() for _, sql_type in columns)]
        sets = ", ".join(f"{name} = v.c{i}" for i, (name, _) in enumerate(columns, 1))
        text = (f"UPDATE {table} SET {sets} FROM {pg_unnest(types, 'v')}"
                f" WHERE {table}.{key} = v.c0")
        for chunk in chunked(rows, PG_ROWS_PER_INSERT):
            self.raw.execute(text, pg_arrays(chunk, types))

    def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query (an empty list for a statement that returns none)."""
        return self._rows(self.execute(sql, args))

    def fetchall_pg(self, text: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """`fetchall` of a PostgreSQL statement already in psycopg's style (`%b` arrays of `pg_unnest`)."""
        return self._rows(self.raw.execute(text, args))

    def _rows(self, cur: Any) -> list[tuple[Any, ...]]:
        if self.pg and self.pipeline is not None:
            self.pipeline.sync()  # in a pipeline a cursor knows its result's shape only once it has arrived
        if self.pg and cur.description is None:
            return []
        return [tuple(r) for r in cur.fetchall()]

    def fetchone(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, args).fetchone()
        return None if row is None else tuple(row)

    def sync(self) -> None:
        """Sends what a pipeline has queued and waits for its results (so that `rowcount` is known)."""
        if self.pipeline is not None:
            self.pipeline.sync()


class Dialect:
    """What differs between SQLite and PostgreSQL; everything else is shared SQL."""

    pg = False

    def json_text(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    def json_bool(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    @contextmanager
    def read(self) -> Iterator[Db]:
        raise NotImplementedError
        yield

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[Db]:
        """A transaction; `pipelined`: the caller calls `Db.sync` before any `rowcount` it reads."""
        raise NotImplementedError
        yield

    @contextmanager
    def durable_tx(self) -> Iterator[Db]:
        """A transaction whose commit is on disk when it returns, for rows that exist nowhere else (no
        WAL record stands behind them): PostgreSQL's commits are (synchronous_commit); SQLite's below."""
        with self.tx() as db:
            yield db

    def lock_payment(self, db: Db, payment_id: str) -> None:
        """Holds the payment's state row until the transaction ends (no-op where writers are serialised)."""

    def xact_lock(self, db: Db, lock_id: int) -> None:
        """Holds an advisory lock until the transaction ends (no-op where writers are serialised)."""

    def notify(self, db: Db, channel: str, ident: str) -> None:
        """Announces a committed change to other processes (no-op where there are none)."""

    def for_update(self, alias: str | None = None, skip_locked: bool = False) -> str:
        """Row-lock suffix of a SELECT (empty where writers are serialised anyway)."""
        return ""

    def claim(self, payment_id: str) -> bool:
        return True

    def claim_many(self, payment_ids: Sequence[str]) -> list[bool]:
        """`claim` of each payment, in one statement."""
        return [True] * len(payment_ids)

    def release_many(self, payment_ids: Sequence[str]) -> None:
        """`release` of each payment, in one statement."""

    def release(self, payment_id: str) -> None:
        return None

    def close(self) -> None:
        return None


class SqliteDialect(Dialect):
    """SQLite: a connection per thread (`connect`), every writer serialised by one lock and
    `BEGIN IMMEDIATE` (the WAL tailer writes the same file)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], write_lock: threading.Lock) -> None:
        self.connect = connect
        self.write_lock = write_lock

    @classmethod
    def of(cls, store: SqliteStore) -> SqliteDialect:
        return cls(store._conn, store._write_lock)

    @contextmanager
    def read(self) -> Iterator[Db]:
        yield Db(self.connect(), False)

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[Db]:
        conn = self.connect()
        with self.write_lock, self._immediate(conn) as db:
            yield db

    @contextmanager
    def durable_tx(self) -> Iterator[Db]:
        # The store syncs NORMAL (it is a view of the WAL); a row that only this transaction holds is
        # fsynced at its commit (synchronous FULL for this one commit, under the write lock).
        conn = self.connect()
        with self.write_lock:
            conn.execute("PRAGMA synchronous=FULL")
            try:
                with self._immediate(conn) as db:
                    yield db
            finally:
                conn.execute("PRAGMA synchronous=NORMAL")

    @staticmethod
    @contextmanager
    def _immediate(conn: sqlite3.Connection) -> Iterator[Db]:
        """One write transaction on `conn` (the caller holds the write lock)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield Db(conn, False)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class PgStore(Protocol):
    """What the PostgreSQL dialect needs of `PostgresStore` (which builds on this module)."""

    schema: str
    pool: Any

    def connect(self) -> Any: ...


class PostgresDialect(Dialect):
    pg = True

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.schema = store.schema
        # Session advisory locks of the payments this process drives, all on one connection: the
        # server drops them when the connection dies, so a killed worker's payments are free again.
        self._claims: Any = None
        self._claims_lock = threading.Lock()

    def json_text(self, column: str, field: str) -> str:
        return f"({column}::jsonb ->> '{field}')"

    def json_bool(self, column: str, field: str) -> str:
        return f"({column}::jsonb ->> '{field}')::boolean::int"

    @contextmanager
    def read(self) -> Iterator[Db]:
        with self.store.pool.connection() as conn:
            yield Db(conn, True)

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[Db]:
        with self.store.pool.connection() as conn:
            db = Db(conn, True)
            if pipelined:
                # BEGIN, the statements whose results are not read at once, COMMIT and the notification
                # share round trips; an error still aborts the transaction (psycopg raises it at the
                # next fetch or sync, and what follows it in the pipeline is not executed).
                with conn.pipeline() as pipeline:
                    db.pipeline = pipeline
                    with conn.transaction():
                        yield db
                    db.pipeline = None
                    self._notify_committed(conn, db)
            else:
                with conn.transaction():
                    yield db
                self._notify_committed(conn, db)

    @staticmethod
    def _notify_committed(conn: Any, db: Db) -> None:
        if db.notifications:
            # After the commit, in a statement of its own: PostgreSQL serialises the commits of
            # transactions that NOTIFY (a global lock held through the WAL flush), which would
            # queue every payment's commit behind the others'. A notification lost to a crash
            # right here is covered by the listeners' periodic checks.
            channels, payloads = zip(*db.notifications, strict=True)
            conn.execute("SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
                         (list(channels), list(payloads)))

    def lock_payment(self, db: Db, payment_id: str) -> None:
        db.execute("SELECT 1 FROM payments WHERE id = ? FOR UPDATE", (payment_id,))

    def xact_lock(self, db: Db, lock_id: int) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (lock_id,))

    def for_update(self, alias: str | None = None, skip_locked: bool = False) -> str:
        return " FOR UPDATE" + (f" OF {alias}" if alias else "") + (" SKIP LOCKED" if skip_locked else "")

    def notify(self, db: Db, channel: str, ident: str) -> None:
        # Sent once the transaction has committed, and only if it does (see `tx`).
        db.notifications.append((channel, f"{self.schema} {ident}"))

    def _claim_key(self, payment_id: str) -> str:
        return f"{self.schema}:{payment_id}"

    def claim(self, payment_id: str) -> bool:
        return self.claim_many([payment_id])[0]

    def release(self, payment_id: str) -> None:
        self.release_many([payment_id])

    def claim_many(self, payment_ids: Sequence[str]) -> list[bool]:
        import psycopg

        with self._claims_lock:
            try:
                if self._claims is None or self._claims.closed:
                    self._claims = self.store.connect()
                rows = self._claims.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended(k, 0)) FROM unnest(%s::text[]) WITH ORDINALITY"
                    " AS u(k, i) ORDER BY i", ([self._claim_key(pid) for pid in payment_ids],)).fetchall()
                return [bool(r[0]) for r in rows]
            except psycopg.Error as e:
                # Whatever this connection held is gone with it; the version check still guards writes.
                log.warning("claim of %d payments failed (%s); the reconciler will retry", len(payment_ids), e)
                if self._claims is not None:
                    self._claims.close()
                self._claims = None
                return [False] * len(payment_ids)

    def release_many(self, payment_ids: Sequence[str]) -> None:
        import psycopg

        with self._claims_lock:
            if self._claims is None or self._claims.closed:
                return
            try:
                self._claims.execute("SELECT pg_advisory_unlock(hashtextextended(k, 0)) FROM unnest(%s::text[]) AS k",
                                     ([self._claim_key(pid) for pid in payment_ids],))
            except psycopg.Error as e:
                log.warning("release of %d payments failed (%s); reconnecting drops every claim", len(payment_ids), e)
                self._claims.close()
                self._claims = None

    def close(self) -> None:
        with self._claims_lock:
            if self._claims is not None:
                self._claims.close()
                self._claims = None


def dialect_for(store: SqliteStore | PgStore) -> Dialect:
    """The dialect of a backend store: SQLite's connections and write lock, or PostgreSQL's pool."""
    from gateway.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return SqliteDialect.of(store)
    return PostgresDialect(store)


def is_unique_violation(e: BaseException) -> bool:
    """A UNIQUE constraint refused the statement (PostgreSQL; SQLite's writers never race)."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency of the package
        return False
    return isinstance(e, psycopg.errors.UniqueViolation)
