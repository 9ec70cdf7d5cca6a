"""Persistence of the async payment path: SQLite in embedded mode, PostgreSQL in cluster mode.

Every state change is written in ONE transaction together with its audit rows, its ledger postings,
its attempt rows, the operation it finishes and the recomposed payment body (so that
`GET /v1/payments/{id}` stays a single-row read). Concurrency is optimistic: `payment_state.version`
must still be the version the change was computed from, or the transaction is rolled back with
`StaleVersion` and nothing is written; two writers can therefore never both apply a transition.

The ledger is append-only: this module only ever INSERTs into `ledger_entries` and `audit_log`
(PostgreSQL also refuses any UPDATE or DELETE of them with a trigger, migration 4).

One code path serves both backends; what differs sits in `_Dialect`: placeholders (`?` here,
rewritten to `%s` for psycopg), JSON extraction, how a transaction begins (SQLite: `BEGIN
IMMEDIATE` under the store's write lock, which serialises all writers; PostgreSQL: a pooled
connection's transaction plus `SELECT ... FOR UPDATE` of the payment's state row where a check and a
write must not interleave), and notifications. On PostgreSQL, several worker processes share the
store: a payment is driven by one of them at a time through `claim`/`release` (session advisory
locks, released by the server if the worker dies), and every committed change is announced with
`pg_notify` right after its commit (channel `CHANGES_CHANNEL`, new merchant operations on
`OPERATIONS_CHANNEL`) so that gateway processes wake their `Prefer: wait` requests and workers pick
up operations at once; notifications are hints, the periodic checks of both sides are the guarantee.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.domain import events as ev
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, ProcessingResult
from gateway.domain.secrets import Secret
from gateway.store.processing_schema import MIGRATION_2_PROCESSING

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore

log = logging.getLogger("gateway.store.processing")

# PostgreSQL notification channels (database-wide, so the payload starts with the schema name).
CHANGES_CHANNEL = "gateway_payment_changes"
OPERATIONS_CHANNEL = "gateway_operations"

OPEN_OPERATION_STATUSES = ("pending", "pending_verification")
OPERATION_ID_PREFIX = {"capture": "cap", "void": "void", "refund": "re"}
ATTEMPTS_IN_BODY_MAX = 32
OPERATIONS_IN_BODY_MAX = 100


ERROR_CHARS_MAX = 200


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed webhook delivery: what to send, where, and with which secret."""

    event_id: str
    endpoint_id: str
    attempts: int
    body: bytes
    url: str
    secret: Secret


class StaleVersion(Exception):
    """Another writer changed the payment first; the caller must reload and recompute."""


def now_ms() -> int:
    return int(time.time() * 1000)


def fingerprint(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    payment: sm.Payment
    token: str
    auto_capture: bool


@dataclass(frozen=True, slots=True)
class Operation:
    id: str
    payment_id: str
    merchant_id: str
    kind: str
    seq: int
    amount: int
    final_capture: bool
    reason: str | None
    actor: str
    status: str
    psp_idempotency_key: str
    failure_code: str | None


@dataclass(frozen=True, slots=True)
class OperationFinish:
    """How a merchant operation ends in the same transaction as the payment change."""

    operation_id: str
    status: str  # succeeded | failed | pending_verification | pending
    failure_code: str | None = None


# Results of accepting a merchant operation (capture, void, refund).
@dataclass(frozen=True, slots=True)
class Accepted:
    operation: Operation
    body: bytes


@dataclass(frozen=True, slots=True)
class Replayed:
    status_code: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """A business-rule or conflict refusal: `status_code` with an error object in `body`."""

    status_code: int
    code: str
    message: str
    param: str | None = None
    store_for_replay: bool = True


_OP_COLUMNS = (
    "id, payment_id, merchant_id, kind, seq, amount, final_capture, reason, actor, status,"
    " psp_idempotency_key, failure_code"
)
_STATE_COLUMNS = (
    "payment_id, merchant_id, status, amount, currency, amount_authorized, amount_captured,"
    " amount_refunded, capture_final, psp, psp_reference, failure_code, version, payment_method, auto_capture"
)


def _op(row: tuple[Any, ...]) -> Operation:
    return Operation(
        row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[9], row[10], row[11]
    )


def _record(row: tuple[Any, ...]) -> PaymentRecord:
    p = sm.Payment(
        id=row[0],
        merchant_id=row[1],
        status=sm.PaymentStatus(row[2]),
        amount=row[3],
        currency=row[4],
        amount_authorized=row[5],
        amount_captured=row[6],
        amount_refunded=row[7],
        capture_final=bool(row[8]),
        psp=row[9],
        psp_reference=row[10],
        failure_code=row[11],
        version=row[12],
    )
    return PaymentRecord(payment=p, token=row[13], auto_capture=bool(row[14]))


class _Db:
    """One connection inside a read or a transaction, with the SQL written once for both backends
    (`?` placeholders; for psycopg they become `%s`, so no statement here may contain a `%`)."""

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
            return self.raw.execute(_pg_sql(sql), args)
        return self.raw.execute(sql, args)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self.pg:
            with self.raw.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)
        else:
            self.raw.executemany(sql, rows)

    def sync(self) -> None:
        """Sends what a pipeline has queued and waits for its results (so that `rowcount` is known)."""
        if self.pipeline is not None:
            self.pipeline.sync()


_PG_SQL: dict[str, str] = {}


def _pg_sql(sql: str) -> str:
    out = _PG_SQL.get(sql)
    if out is None:
        assert "%" not in sql, sql
        out = _PG_SQL[sql] = sql.replace("?", "%s")
    return out


class _Dialect:
    """What differs between SQLite and PostgreSQL; everything else is shared SQL."""

    pg = False

    def json_text(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    def json_bool(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    @contextmanager
    def read(self) -> Iterator[_Db]:
        raise NotImplementedError
        yield

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[_Db]:
        """A transaction; `pipelined`: the caller calls `_Db.sync` before any `rowcount` it reads."""
        raise NotImplementedError
        yield

    def lock_payment(self, db: _Db, payment_id: str) -> None:
        """Holds the payment's state row until the transaction ends (no-op where writers are serialised)."""

    def notify(self, db: _Db, channel: str, ident: str) -> None:
        """Announces a committed change to other processes (no-op where there are none)."""

    def for_update(self, alias: str | None = None, skip_locked: bool = False) -> str:
        """Row-lock suffix of a SELECT (empty where writers are serialised anyway)."""
        return ""

    def claim(self, payment_id: str) -> bool:
        return True

    def release(self, payment_id: str) -> None:
        return None

    def close(self) -> None:
        return None


class _SqliteDialect(_Dialect):
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @contextmanager
    def read(self) -> Iterator[_Db]:
        yield _Db(self.store._conn(), False)

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[_Db]:
        conn = self.store._conn()
        with self.store._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Db(conn, False)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


class _PostgresDialect(_Dialect):
    pg = True

    def __init__(self, store: PostgresStore) -> None:
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
    def read(self) -> Iterator[_Db]:
        with self.store.pool.connection() as conn:
            yield _Db(conn, True)

    @contextmanager
    def tx(self, pipelined: bool = False) -> Iterator[_Db]:
        with self.store.pool.connection() as conn:
            db = _Db(conn, True)
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
    def _notify_committed(conn: Any, db: _Db) -> None:
            if db.notifications:
                # After the commit, in a statement of its own: PostgreSQL serialises the commits of
                # transactions that NOTIFY (a global lock held through the WAL flush), which would
                # queue every payment's commit behind the others'. A notification lost to a crash
                # right here is covered by the listeners' periodic checks.
                channels, payloads = zip(*db.notifications, strict=True)
                conn.execute("SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
                             (list(channels), list(payloads)))

    def lock_payment(self, db: _Db, payment_id: str) -> None:
        db.execute("SELECT 1 FROM payment_state WHERE payment_id = ? FOR UPDATE", (payment_id,))

    def for_update(self, alias: str | None = None, skip_locked: bool = False) -> str:
        return " FOR UPDATE" + (f" OF {alias}" if alias else "") + (" SKIP LOCKED" if skip_locked else "")

    def notify(self, db: _Db, channel: str, ident: str) -> None:
        # Sent once the transaction has committed, and only if it does (see `tx`).
        db.notifications.append((channel, f"{self.schema} {ident}"))

    def _claim_key(self, payment_id: str) -> str:
        return f"{self.schema}:{payment_id}"

    def claim(self, payment_id: str) -> bool:
        import psycopg

        with self._claims_lock:
            try:
                if self._claims is None or self._claims.closed:
                    self._claims = self.store.connect()
                row = self._claims.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                           (self._claim_key(payment_id),)).fetchone()
                return bool(row and row[0])
            except psycopg.Error as e:
                # Whatever this connection held is gone with it; the version check still guards writes.
                log.warning("claim of %s failed (%s); the reconciler will retry", payment_id, e)
                if self._claims is not None:
                    self._claims.close()
                self._claims = None
                return False

    def release(self, payment_id: str) -> None:
        import psycopg

        with self._claims_lock:
            if self._claims is None or self._claims.closed:
                return
            try:
                self._claims.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                                     (self._claim_key(payment_id),))
            except psycopg.Error as e:
                log.warning("release of %s failed (%s); reconnecting drops every claim", payment_id, e)
                self._claims.close()
                self._claims = None

    def close(self) -> None:
        with self._claims_lock:
            if self._claims is not None:
                self._claims.close()
                self._claims = None


class ProcessingStore:
    """Processing persistence on top of a `SqliteStore` (its per-thread connections and write lock) or
    a `PostgresStore` (its connection pool)."""

    def __init__(self, store: SqliteStore | PostgresStore) -> None:
        from gateway.store.sqlite import SqliteStore

        self.store = store
        self._d: _Dialect = _SqliteDialect(store) if isinstance(store, SqliteStore) else _PostgresDialect(store)
        self.pg = self._d.pg
        # Set when a change wrote webhook deliveries: a hint for this process's dispatcher to look now
        # (most payments' merchants have no endpoint, and their changes need not wake it).
        self.new_deliveries = False

    def _read(self) -> Any:
        return self._d.read()

    def _tx(self, pipelined: bool = False) -> Any:
        return self._d.tx(pipelined)

    def claim(self, payment_id: str) -> bool:
        """True if this process may drive the payment now (always, with one worker on SQLite)."""
        return self._d.claim(payment_id)

    def release(self, payment_id: str) -> None:
        self._d.release(payment_id)

    def close(self) -> None:
        self._d.close()

    # -- reads -----------------------------------------------------------------------------------

    def _ensure_state(self, conn: _Db, payment_id: str) -> None:
        d = self._d
        conn.execute(
            "INSERT INTO payment_state (payment_id, merchant_id, status, amount, currency,"
            " payment_method, auto_capture, updated_ms)"
            " SELECT id, merchant_id, status, amount, currency,"
            f" coalesce({d.json_text('body', 'payment_method')}, ''),"
            f" coalesce({d.json_bool('body', 'capture')}, 1), ? FROM payments WHERE id = ?"
            " ON CONFLICT DO NOTHING",
            (now_ms(), payment_id),
        )

    def _load(self, conn: _Db, payment_id: str) -> PaymentRecord | None:
        row = conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM payment_state WHERE payment_id = ?", (payment_id,)
        ).fetchone()
        return _record(row) if row else None

    def load(self, payment_id: str) -> PaymentRecord | None:
        """The payment's processing state, creating it from the accepted payment on first use."""
        with self._read() as conn:
            rec = self._load(conn, payment_id)
        if rec is not None:
            return rec
        with self._tx() as conn:
            self._ensure_state(conn, payment_id)
            return self._load(conn, payment_id)

    def payment_ids_with_status(self, status: str, limit: int = 10_000, created_before_s: int | None = None) -> list[str]:
        """Payments in `status`, oldest first; with `created_before_s` only those created before then."""
        with self._read() as conn:
            if created_before_s is None:
                rows = conn.execute(
                    "SELECT id FROM payments WHERE status = ? ORDER BY lsn LIMIT ?", (status, limit)
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT id FROM payments WHERE status = ? AND created < ? ORDER BY created LIMIT ?",
                    (status, created_before_s, limit),
                ).fetchall()
        return [r[0] for r in rows]

    def open_operations(self, limit: int = 10_000) -> list[Operation]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_OP_COLUMNS} FROM payment_operations WHERE status IN ('pending', 'pending_verification')"
                " ORDER BY created_ms LIMIT ?",
                (limit,),
            ).fetchall()
        return [_op(r) for r in rows]

    def operation(self, operation_id: str) -> Operation | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_OP_COLUMNS} FROM payment_operations WHERE id = ?", (operation_id,)
            ).fetchone()
        return _op(row) if row else None

    def settled(self, payment_id: str) -> bool:
        """Neither `processing` nor `pending_verification`, and no operation open."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT status, (SELECT count(*) FROM payment_operations o WHERE o.payment_id = p.id"
                " AND o.status IN ('pending', 'pending_verification')) FROM payments p WHERE id = ?",
                (payment_id,),
            ).fetchone()
        return row is not None and row[0] not in ("processing", "pending_verification") and row[1] == 0

    def attempts(self, payment_id: str, operation_id: str | None = None) -> list[AttemptRow]:
        sql = (
            "SELECT attempt_id, payment_id, attempt_no, operation, psp, idempotency_key, amount, currency,"
            " status, started_at_ms, final_capture, psp_reference, code, fee_minor, latency_ms, finished_at_ms"
            " FROM payment_attempts WHERE payment_id = ?"
        )
        args: tuple[Any, ...] = (payment_id,)
        if operation_id is not None:
            sql += " AND operation_id = ?"
            args += (operation_id,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY started_at_ms, attempt_id", args).fetchall()
        return [
            AttemptRow(
                attempt_id=r[0], payment_id=r[1], attempt_no=r[2], operation=r[3], psp=r[4],
                idempotency_key=r[5], amount=r[6], currency=r[7], status=AttemptStatus(r[8]),
                started_at_ms=r[9], final_capture=bool(r[10]), psp_reference=r[11], code=r[12],
                fee_minor=r[13], latency_ms=r[14], finished_at_ms=r[15],
            )
            for r in rows
        ]

    def audit_trail(self, payment_id: str) -> list[tuple[str, str, str, str]]:
        """(old_status, new_status, actor, reason) in the order they happened."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT old_status, new_status, actor, reason FROM audit_log WHERE payment_id = ? ORDER BY id",
                (payment_id,),
            ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def all_postings(self) -> tuple[list[ledger.Posting], list[ledger.Violation]]:
        """Every stored posting, rebuilt from its rows; rows that cannot form a posting are violations."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT posting_id, line_no, payment_id, kind, account, currency, debit, credit, at_ms, reverses"
                " FROM ledger_entries ORDER BY posting_id, line_no"
            ).fetchall()
        return postings_from_rows(rows)

    def list_payments(self, merchant_id: str, limit: int, starting_after: str | None) -> tuple[list[str], bool] | None:
        """Bodies newest first; None when `starting_after` is not one of the merchant's payments.

        SQLite orders by the one WAL's LSN; PostgreSQL holds the records of many WALs (one per
        gateway process), whose LSNs are not comparable, so there the order is (created, id)."""
        order = "created DESC, id DESC" if self.pg else "lsn DESC"
        after = "(created, id) < (?, ?)" if self.pg else "lsn < ?"
        with self._read() as conn:
            if starting_after is None:
                rows = conn.execute(
                    f"SELECT body FROM payments WHERE merchant_id = ? ORDER BY {order} LIMIT ?",
                    (merchant_id, limit + 1),
                ).fetchall()
            else:
                cursor = conn.execute(
                    "SELECT created, id, lsn FROM payments WHERE id = ? AND merchant_id = ?",
                    (starting_after, merchant_id),
                ).fetchone()
                if cursor is None:
                    return None
                key = (cursor[0], cursor[1]) if self.pg else (cursor[2],)
                rows = conn.execute(
                    f"SELECT body FROM payments WHERE merchant_id = ? AND {after} ORDER BY {order} LIMIT ?",
                    (merchant_id, *key, limit + 1),
                ).fetchall()
        return [r[0] for r in rows[:limit]], len(rows) > limit

    def payment_body(self, merchant_id: str, payment_id: str) -> bytes | None:
        return self.store.get_payment(merchant_id, payment_id)

    # -- writes ----------------------------------------------------------------------------------

    def record_intent(self, row: AttemptRow, operation_id: str | None = None) -> None:
        """Persist a `started` attempt before its PSP call (its own transaction, committed first).
        The payment body is recomposed when the attempt's result is applied, not here: one
        transaction less per PSP call."""
        if self.pg:
            # One statement on an autocommit connection is a transaction of its own: no BEGIN/COMMIT.
            with self._read() as conn:
                assert conn.raw.autocommit
                self._upsert_attempt(conn, row, operation_id)
            return
        with self._tx() as conn:
            self._upsert_attempt(conn, row, operation_id)

    def _upsert_attempt(self, conn: _Db, a: AttemptRow, operation_id: str | None) -> None:
        conn.execute(
            "INSERT INTO payment_attempts (attempt_id, payment_id, operation_id, attempt_no, operation, psp,"
            " idempotency_key, amount, currency, status, final_capture, psp_reference, code, fee_minor,"
            " latency_ms, started_at_ms, finished_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (attempt_id) DO UPDATE SET status = excluded.status,"
            " psp_reference = coalesce(excluded.psp_reference, payment_attempts.psp_reference),"
            " code = excluded.code, fee_minor = excluded.fee_minor, latency_ms = excluded.latency_ms,"
            " finished_at_ms = excluded.finished_at_ms",
            (
                a.attempt_id, a.payment_id, operation_id, a.attempt_no, a.operation, a.psp, a.idempotency_key,
                a.amount, a.currency, a.status.value, int(a.final_capture), a.psp_reference, a.code,
                a.fee_minor, a.latency_ms, a.started_at_ms, a.finished_at_ms,
            ),
        )

    def apply(
        self,
        result: ProcessingResult,
        *,
        base_version: int,
        operation_id: str | None = None,
        finish: OperationFinish | None = None,
        new_operation: tuple[str, int, bool, str] | None = None,
    ) -> Operation | None:
        """Persist one orchestration result atomically: attempts, the payment change (checked against
        `base_version`), audit rows, ledger rows, the operation's end and optionally a follow-up
        operation `(kind, amount, final_capture, actor)` (the auto-capture). Returns that operation."""
        created: Operation | None = None
        with self._tx(pipelined=True) as conn:
            for a in result.attempts:
                self._upsert_attempt(conn, a, operation_id)
            if result.transitions:
                first, last = result.transitions[0], result.transitions[-1]
                assert first.before.version == base_version, (first.before.version, base_version)
                for t in result.transitions:
                    sm.check_invariants(t.payment)
                p = last.payment
                cur = conn.execute(
                    "UPDATE payment_state SET status = ?, amount_authorized = ?, amount_captured = ?,"
                    " amount_refunded = ?, capture_final = ?, psp = ?, psp_reference = ?, failure_code = ?,"
                    " version = ?, updated_ms = ? WHERE payment_id = ? AND version = ?",
                    (
                        p.status.value, p.amount_authorized, p.amount_captured, p.amount_refunded,
                        int(p.capture_final), p.psp, p.psp_reference, p.failure_code, p.version, now_ms(),
                        p.id, base_version,
                    ),
                )
                conn.sync()
                if cur.rowcount != 1:
                    raise StaleVersion(f"payment {p.id} changed since version {base_version}")
                conn.execute("UPDATE payments SET status = ? WHERE id = ?", (p.status.value, p.id))
                conn.executemany(
                    "INSERT INTO audit_log (payment_id, old_status, new_status, actor, reason, at_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (t.audit.payment_id, t.audit.old_status, t.audit.new_status, t.audit.actor,
                         t.audit.reason, t.audit.at_ms)
                        for t in result.transitions
                    ],
                )
            rows = [r for posting in result.postings for r in posting.rows()]
            conn.executemany(
                "INSERT INTO ledger_entries (posting_id, line_no, payment_id, kind, account, currency, debit,"
                " credit, at_ms, reverses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.posting_id, r.line_no, r.payment_id, r.kind, r.account, r.currency, r.debit, r.credit,
                     r.at_ms, r.reverses)
                    for r in rows
                ],
            )
            if finish is not None:
                conn.execute(
                    "UPDATE payment_operations SET status = ?, failure_code = ?, updated_ms = ? WHERE id = ?",
                    (finish.status, finish.failure_code, now_ms(), finish.operation_id),
                )
            if new_operation is not None:
                kind, amount, final, actor = new_operation
                p = result.payment
                created = self._insert_operation(conn, p.id, p.merchant_id, kind, amount, final, None, actor)
            body = self._compose_body(conn, result.payment.id)
            # The outbox: the events of this change commit with it, or not at all.
            p = result.payment
            if result.transitions:
                event_type = ev.event_type_for_status(result.transitions[-1].payment.status.value)
                if event_type is not None:
                    self._emit(conn, p.merchant_id, p.id, event_type, body)
            if finish is not None and finish.status == "failed":
                self._emit(conn, p.merchant_id, p.id, ev.OPERATION_FAILED, body)
            self._d.notify(conn, CHANGES_CHANNEL, result.payment.id)
        return created

    def _insert_operation(
        self,
        conn: _Db,
        payment_id: str,
        merchant_id: str,
        kind: str,
        amount: int,
        final_capture: bool,
        reason: str | None,
        actor: str,
    ) -> Operation:
        seq = int(
            conn.execute(
                "SELECT coalesce(max(seq), 0) + 1 FROM payment_operations WHERE payment_id = ? AND kind = ?",
                (payment_id, kind),
            ).fetchone()[0]
        )
        op = Operation(
            id=f"{OPERATION_ID_PREFIX[kind]}_{secrets.token_hex(12)}",
            payment_id=payment_id,
            merchant_id=merchant_id,
            kind=kind,
            seq=seq,
            amount=amount,
            final_capture=final_capture,
            reason=reason,
            actor=actor,
            status="pending",
            # The PSP idempotency key of the operation, reused on every retry and on recovery.
            psp_idempotency_key=f"{payment_id}:{kind}:{seq}",
            failure_code=None,
        )
        t = now_ms()
        conn.execute(
            f"INSERT INTO payment_operations ({_OP_COLUMNS}, created_ms, updated_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (op.id, op.payment_id, op.merchant_id, op.kind, op.seq, op.amount, int(op.final_capture), op.reason,
             op.actor, op.status, op.psp_idempotency_key, op.failure_code, t, t),
        )
        return op

    def finish_operation(self, finish: OperationFinish, payment_id: str,
                         attempts: Sequence[AttemptRow] = ()) -> None:
        with self._tx(pipelined=True) as conn:
            for a in attempts:
                self._upsert_attempt(conn, a, finish.operation_id)
            conn.execute(
                "UPDATE payment_operations SET status = ?, failure_code = ?, updated_ms = ? WHERE id = ?",
                (finish.status, finish.failure_code, now_ms(), finish.operation_id),
            )
            body = self._compose_body(conn, payment_id)
            if finish.status == "failed":
                owner = conn.execute("SELECT merchant_id FROM payments WHERE id = ?", (payment_id,)).fetchone()
                self._emit(conn, owner[0], payment_id, ev.OPERATION_FAILED, body)
            self._d.notify(conn, CHANGES_CHANNEL, payment_id)

    # -- events and webhooks ---------------------------------------------------------------------

    def _emit(self, conn: _Db, merchant_id: str, payment_id: str, event_type: str, payment_body: bytes) -> str:
        """Writes one event (inside the caller's transaction) and a pending delivery for each of the
        merchant's endpoints subscribed to its type. Returns the event id."""
        count_cur = conn.execute(
            "UPDATE payment_state SET events_count = events_count + 1 WHERE payment_id = ? RETURNING events_count",
            (payment_id,),
        )
        # Sent with the counter's update (one round trip in a pipeline): the endpoints do not depend on it.
        endpoints_cur = conn.execute(
            "SELECT id, enabled_events FROM webhook_endpoints WHERE merchant_id = ? AND deleted_ms IS NULL",
            (merchant_id,),
        )
        n = count_cur.fetchone()[0]
        event_id = ev.event_id(payment_id, int(n))
        t = now_ms()
        body = b'{"id":"%s","object":"event","type":"%s","created":%d,"data":{"object":%s}}' % (
            event_id.encode(), event_type.encode(), t // 1000, payment_body)
        conn.execute(
            "INSERT INTO payment_events (id, merchant_id, payment_id, type, created_ms, body) VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, merchant_id, payment_id, event_type, t, body.decode()),
        )
        endpoints = endpoints_cur.fetchall()
        targets = [e[0] for e in endpoints if ev.subscribed(msgspec.json.decode(e[1]), event_type)]
        if targets:
            self.new_deliveries = True
            conn.executemany(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, payment_id, status, attempts, next_attempt_ms,"
                " updated_ms) VALUES (?, ?, ?, 'pending', 0, ?, ?)",
                [(event_id, endpoint_id, payment_id, t, t) for endpoint_id in targets],
            )
        return event_id

    def create_endpoint(self, merchant_id: str, url: str, enabled_events: list[str], description: str | None,
                        secret: str) -> dict[str, Any] | None:
        """A new endpoint, or None when the merchant already has `ENDPOINTS_PER_MERCHANT_MAX`."""
        endpoint_id = ev.new_endpoint_id()
        t = now_ms()
        with self._tx() as conn:
            # Serialises the creates of one merchant (PostgreSQL), so the limit holds across processes.
            conn.execute("SELECT id FROM merchants WHERE id = ?" + self._d.for_update(), (merchant_id,))
            count = conn.execute(
                "SELECT count(*) FROM webhook_endpoints WHERE merchant_id = ? AND deleted_ms IS NULL", (merchant_id,)
            ).fetchone()[0]
            if int(count) >= ev.ENDPOINTS_PER_MERCHANT_MAX:
                return None
            conn.execute(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, secret, enabled_events, description, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint_id, merchant_id, url, secret, msgspec.json.encode(enabled_events).decode(), description, t),
            )
        return _endpoint_dict((endpoint_id, url, msgspec.json.encode(enabled_events).decode(), description, t))

    def list_endpoints(self, merchant_id: str) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, url, enabled_events, description, created_ms FROM webhook_endpoints"
                " WHERE merchant_id = ? AND deleted_ms IS NULL ORDER BY created_ms, id LIMIT ?",
                (merchant_id, ev.ENDPOINTS_PER_MERCHANT_MAX),
            ).fetchall()
        return [_endpoint_dict(r) for r in rows]

    def delete_endpoint(self, merchant_id: str, endpoint_id: str) -> bool:
        """Deletes the endpoint; its pending deliveries end `failed` (endpoint_deleted)."""
        t = now_ms()
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE webhook_endpoints SET deleted_ms = ? WHERE id = ? AND merchant_id = ? AND deleted_ms IS NULL",
                (t, endpoint_id, merchant_id),
            )
            if cur.rowcount != 1:
                return False
            conn.execute(
                "UPDATE webhook_deliveries SET status = 'failed', last_error = 'endpoint_deleted', updated_ms = ?"
                " WHERE endpoint_id = ? AND status = 'pending'",
                (t, endpoint_id),
            )
        return True

    def event(self, merchant_id: str, event_id: str) -> tuple[bytes, list[dict[str, Any]]] | None:
        """The event's JSON and its deliveries; None if it is not this merchant's."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT body FROM payment_events WHERE id = ? AND merchant_id = ?", (event_id, merchant_id)
            ).fetchone()
            if row is None:
                return None
            deliveries = conn.execute(
                "SELECT endpoint_id, status, attempts, next_attempt_ms, last_status_code, last_error, updated_ms"
                " FROM webhook_deliveries WHERE event_id = ? ORDER BY endpoint_id LIMIT ?",
                (event_id, ev.DELIVERIES_PER_EVENT_MAX),
            ).fetchall()
        return row[0].encode(), [
            {"endpoint": d[0], "status": d[1], "attempts": d[2],
             "next_attempt": d[3] // 1000 if d[1] == "pending" else None, "last_status_code": d[4],
             "last_error": d[5], "updated": d[6] // 1000}
            for d in deliveries
        ]

    def payment_events(self, merchant_id: str, payment_id: str, limit: int) -> list[str]:
        """The payment's events, oldest first (their JSON)."""
        with self._read() as conn:
            # The ids of a payment's events share a prefix and sort in the order they happened.
            prefix = ev.event_id_prefix(payment_id)
            rows = conn.execute(
                "SELECT body FROM payment_events WHERE id > ? AND id < ? AND payment_id = ? AND merchant_id = ?"
                " ORDER BY id LIMIT ?",
                (prefix, prefix + "~", payment_id, merchant_id, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def claim_deliveries(self, limit: int, lease_ms: int) -> list[Delivery]:
        """Takes up to `limit` due deliveries for one send each, hiding them from every dispatcher for
        `lease_ms` (their next attempt moves to then; a dispatcher that dies leaves them to come back).

        Per (endpoint, payment) only the oldest pending delivery is due, so a merchant receives a
        payment's events in the order they happened. On PostgreSQL the rows are taken with `FOR UPDATE
        SKIP LOCKED`: concurrent dispatchers in other workers take other rows, never the same one."""
        t = now_ms()
        with self._read() as conn:
            # Most polls find nothing: a read, not a write transaction (SQLite's write lock) to learn it.
            due = conn.execute(
                "SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_ms <= ? LIMIT 1", (t,)
            ).fetchone()
        if due is None:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT d.event_id, d.endpoint_id, d.attempts, e.body, w.url, w.secret"
                " FROM webhook_deliveries d JOIN payment_events e ON e.id = d.event_id"
                " JOIN webhook_endpoints w ON w.id = d.endpoint_id"
                " WHERE d.status = 'pending' AND d.next_attempt_ms <= ? AND NOT EXISTS ("
                " SELECT 1 FROM webhook_deliveries h WHERE h.endpoint_id = d.endpoint_id"
                " AND h.payment_id = d.payment_id AND h.status = 'pending' AND h.event_id < d.event_id)"
                " ORDER BY d.next_attempt_ms LIMIT ?" + self._d.for_update("d", skip_locked=True),
                (t, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE webhook_deliveries SET next_attempt_ms = ?, updated_ms = ? WHERE event_id = ?"
                " AND endpoint_id = ?",
                [(t + lease_ms, t, r[0], r[1]) for r in rows],
            )
        return [Delivery(r[0], r[1], r[2], r[3].encode(), r[4], Secret(r[5])) for r in rows]

    def finish_delivery(self, d: Delivery, status: str, status_code: int | None, error: str | None,
                        next_attempt_ms: int | None) -> None:
        """Records one attempt: `delivered`, `failed` (no attempts left) or `pending` until `next_attempt_ms`."""
        assert status in ("delivered", "failed", "pending")
        assert (status == "pending") == (next_attempt_ms is not None)
        t = now_ms()
        with self._tx() as conn:
            conn.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, next_attempt_ms = ?,"
                " last_status_code = ?, last_error = ?, updated_ms = ? WHERE event_id = ? AND endpoint_id = ?"
                " AND status = 'pending'",
                (status, next_attempt_ms if next_attempt_ms is not None else t, status_code,
                 None if error is None else error[:ERROR_CHARS_MAX], t, d.event_id, d.endpoint_id),
            )

    # -- merchant operations ---------------------------------------------------------------------

    def accept_operation(
        self,
        merchant_id: str,
        payment_id: str,
        kind: str,
        amount: int | None,
        final_capture: bool,
        reason: str | None,
        idempotency_key: str | None,
        request_fingerprint: str,
    ) -> Accepted | Replayed | Refused | None:
        """Check and record a capture/void/refund in one transaction. None: no such payment.

        The payment's state row is locked first (PostgreSQL; SQLite serialises every writer), so two
        gateway processes cannot both pass the one-operation-at-a-time check, and a second request
        with the same key waits for the first to commit and then sees it in flight (409)."""
        try:
            return self._accept_operation(merchant_id, payment_id, kind, amount, final_capture, reason,
                                          idempotency_key, request_fingerprint)
        except Exception as e:
            if self.pg and isinstance(e, _pg_unique_violation()):
                # The same key for another payment at the same instant, or a racing follow-up operation.
                return Refused(409, "idempotency_key_in_use",
                               "A request with this Idempotency-Key is still being processed.",
                               store_for_replay=False)
            raise

    def _accept_operation(
        self,
        merchant_id: str,
        payment_id: str,
        kind: str,
        amount: int | None,
        final_capture: bool,
        reason: str | None,
        idempotency_key: str | None,
        request_fingerprint: str,
    ) -> Accepted | Replayed | Refused | None:
        with self._tx() as conn:
            owner = conn.execute("SELECT merchant_id FROM payments WHERE id = ?", (payment_id,)).fetchone()
            mine = owner is not None and owner[0] == merchant_id
            if mine:
                self._ensure_state(conn, payment_id)
                self._d.lock_payment(conn, payment_id)
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT fingerprint, state, status_code, response FROM operation_idempotency_keys"
                    " WHERE merchant_id = ? AND key = ?",
                    (merchant_id, idempotency_key),
                ).fetchone()
                if row is not None:
                    if row[0] != request_fingerprint:
                        return Refused(400, "idempotency_key_reused",
                                       "This Idempotency-Key was used with different parameters.",
                                       store_for_replay=False)
                    if row[1] == "in_flight":
                        return Refused(409, "idempotency_key_in_use",
                                       "A request with this Idempotency-Key is still being processed.",
                                       store_for_replay=False)
                    return Replayed(int(row[2]), row[3].encode())
            if not mine:
                return None
            rec = self._load(conn, payment_id)
            assert rec is not None
            p = rec.payment
            refusal: Refused | None = None
            busy = conn.execute(
                "SELECT id, kind FROM payment_operations WHERE payment_id = ?"
                " AND status IN ('pending', 'pending_verification') LIMIT 1",
                (payment_id,),
            ).fetchone()
            if busy is not None:
                refusal = Refused(409, "payment_operation_in_progress",
                                  f"The {busy[1]} {busy[0]} of this payment is still in progress; retry after it"
                                  " finishes.", store_for_replay=False)
            else:
                try:
                    if kind == "capture":
                        amount = p.amount_capturable if amount is None else amount
                        sm.check_capture(p, amount if amount > 0 else 1)
                    elif kind == "void":
                        sm.check_void(p)
                        amount = p.amount_authorized
                    else:
                        amount = p.amount_refundable if amount is None else amount
                        sm.check_refund(p, amount if amount > 0 else 1)
                except sm.TransitionError as e:
                    refusal = Refused(422, e.code, e.message, e.param)
            if refusal is not None:
                if idempotency_key is not None and refusal.store_for_replay:
                    from gateway.domain.errors import error_body

                    conn.execute(
                        "INSERT INTO operation_idempotency_keys (merchant_id, key, fingerprint, state, payment_id,"
                        " status_code, response, created_ms) VALUES (?, ?, ?, 'done', ?, ?, ?, ?)",
                        (merchant_id, idempotency_key, request_fingerprint, payment_id, refusal.status_code,
                         error_body(refusal.status_code, refusal.code, refusal.message, refusal.param).decode(),
                         now_ms()),
                    )
                return refusal
            assert amount is not None and amount > 0
            op = self._insert_operation(conn, payment_id, merchant_id, kind, amount, final_capture, reason,
                                        "merchant")
            if idempotency_key is not None:
                conn.execute(
                    "INSERT INTO operation_idempotency_keys (merchant_id, key, fingerprint, state, payment_id,"
                    " created_ms) VALUES (?, ?, ?, 'in_flight', ?, ?)",
                    (merchant_id, idempotency_key, request_fingerprint, payment_id, now_ms()),
                )
            body = self._compose_body(conn, payment_id)
            self._d.notify(conn, OPERATIONS_CHANNEL, op.id)
            self._d.notify(conn, CHANGES_CHANNEL, payment_id)
        return Accepted(op, body)

    def finish_idempotency(self, merchant_id: str, key: str, status_code: int, body: bytes) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE operation_idempotency_keys SET state = 'done', status_code = ?, response = ?"
                " WHERE merchant_id = ? AND key = ? AND state = 'in_flight'",
                (status_code, body.decode(), merchant_id, key),
            )

    def finish_abandoned_keys(self, created_before_ms: int | None = None) -> int:
        """Keys left in flight by a gateway that stopped answering get the payment as it is now, with 202
        (accepted). Embedded mode calls it at start (no request can be in flight then); where other
        gateway processes share the store, only keys older than any request can live are touched."""
        sql = (
            "UPDATE operation_idempotency_keys SET state = 'done', status_code = 202,"
            " response = (SELECT body FROM payments WHERE payments.id = operation_idempotency_keys.payment_id)"
            " WHERE state = 'in_flight'"
        )
        with self._tx() as conn:
            if created_before_ms is None:
                cur = conn.execute(sql)
            else:
                cur = conn.execute(sql + " AND created_ms < ?", (created_before_ms,))
            return int(cur.rowcount)

    # -- the payment body ------------------------------------------------------------------------

    def _compose_body(self, conn: _Db, payment_id: str) -> bytes:
        """Rewrite `payments.body` from the processing state: status, amounts, attempts, refunds and
        the operation in progress. Done at write time so reads stay one indexed row."""
        # The four reads are sent before any result is read: one round trip in a pipeline.
        body_cur = conn.execute("SELECT body FROM payments WHERE id = ?", (payment_id,))
        state_cur = conn.execute(f"SELECT {_STATE_COLUMNS} FROM payment_state WHERE payment_id = ?", (payment_id,))
        attempts_cur = conn.execute(
            "SELECT attempt_id, operation, psp, status, code, amount, started_at_ms, finished_at_ms"
            " FROM payment_attempts WHERE payment_id = ? ORDER BY started_at_ms, attempt_id LIMIT ?",
            (payment_id, ATTEMPTS_IN_BODY_MAX),
        )
        ops_cur = conn.execute(
            f"SELECT {_OP_COLUMNS} FROM payment_operations WHERE payment_id = ? ORDER BY created_ms, seq LIMIT ?",
            (payment_id, OPERATIONS_IN_BODY_MAX),
        )
        row = body_cur.fetchone()
        body: dict[str, Any] = msgspec.json.decode(row[0])
        state = state_cur.fetchone()
        rec = _record(state) if state else None
        if rec is not None:
            p = rec.payment
            body["status"] = p.status.value
            body["amount_authorized"] = p.amount_authorized
            body["amount_capturable"] = p.amount_capturable
            body["amount_captured"] = p.amount_captured
            body["amount_refunded"] = p.amount_refunded
            body["capture_final"] = p.capture_final
            body["psp"] = p.psp
            body["failure_code"] = p.failure_code
        attempts = attempts_cur.fetchall()
        body["attempts"] = [
            {"id": a[0], "operation": a[1], "psp": a[2], "status": a[3], "code": a[4], "amount": a[5],
             "started_ms": a[6], "finished_ms": a[7]}
            for a in attempts
        ]
        ops = ops_cur.fetchall()
        operations = [_op(o) for o in ops]
        body["refunds"] = [
            {"id": o.id, "object": "refund", "amount": o.amount, "status": _refund_status(o.status),
             "reason": o.reason, "failure_code": o.failure_code}
            for o in operations
            if o.kind == "refund"
        ]
        pending = [o for o in operations if o.status in OPEN_OPERATION_STATUSES]
        body["pending_operation"] = (
            {"id": pending[0].id, "type": pending[0].kind, "amount": pending[0].amount, "status": pending[0].status}
            if pending
            else None
        )
        out = msgspec.json.encode(body)
        conn.execute("UPDATE payments SET body = ? WHERE id = ?", (out.decode(), payment_id))
        return out


def _pg_unique_violation() -> type[Exception]:
    import psycopg

    return psycopg.errors.UniqueViolation


def _endpoint_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "object": "webhook_endpoint", "url": row[1], "enabled_events": msgspec.json.decode(row[2]),
            "description": row[3], "status": "enabled", "created": row[4] // 1000}


def _refund_status(op_status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed"}.get(op_status, "pending")


def postings_from_rows(rows: list[tuple[Any, ...]]) -> tuple[list[ledger.Posting], list[ledger.Violation]]:
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        grouped.setdefault(r[0], []).append(r)
    postings: list[ledger.Posting] = []
    violations: list[ledger.Violation] = []
    for posting_id, lines in grouped.items():
        first = lines[0]
        amount = sum(r[6] for r in lines) // 2 if first[3] == "capture" else sum(r[6] for r in lines)
        try:
            postings.append(
                ledger.Posting(
                    posting_id=posting_id,
                    payment_id=first[2],
                    kind=ledger.PostingKind(first[3]),
                    currency=first[5],
                    amount=amount,
                    lines=tuple(
                        ledger.Line(r[4], ledger.Direction.DEBIT if r[6] else ledger.Direction.CREDIT, r[6] or r[7])
                        for r in lines
                    ),
                    at_ms=first[8],
                    reverses=first[9],
                )
            )
        except (ledger.UnbalancedPosting, ValueError) as e:
            violations.append(ledger.Violation("unbalanced_posting", str(e), first[2], first[5]))
    return postings, violations


__all__ = [
    "MIGRATION_2_PROCESSING",
    "Accepted",
    "Delivery",
    "Operation",
    "OperationFinish",
    "PaymentRecord",
    "ProcessingStore",
    "Refused",
    "Replayed",
    "StaleVersion",
]
