"""Payment rows of the async path: the processing state, PSP attempts, the audit log, the payment body.

A payment is stored once: one row of `payments` holds its body (the API's JSON), the columns lists
filter on and its processing state (amounts, PSP, version), from the insert of the accepted payment
on. Concurrency is optimistic: `payments.version` must still be the version a change was computed
from (`write_states`), or that payment's change is refused and nothing of it is written.
`audit_log` is append-only. `compose_body` rewrites the body from the state, attempts and operations
at write time, so that `GET /v1/payments/{id}` stays a single-row read. Every function runs inside
the caller's `Db` and commits nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.domain import events as ev
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, ProcessingResult
from gateway.store.operations import (
    OP_COLUMNS,
    OPEN_OPERATION_STATUSES,
    NewOperation,
    Operation,
    OperationFinish,
    op_from_row,
)
from gateway.store.sql import Db, any_of, chunked, now_ms, pg_arrays, pg_column_types, pg_unnest

ATTEMPTS_IN_BODY_MAX = 32
OPERATIONS_IN_BODY_MAX = 100

STATE_COLUMNS = (
    "id, merchant_id, status, amount, currency, amount_authorized, amount_captured,"
    " amount_refunded, capture_final, psp, psp_reference, failure_code, version, payment_method, auto_capture"
)
_ATTEMPT_COLUMNS = (
    "attempt_id, payment_id, attempt_no, operation, psp, idempotency_key, amount, currency,"
    " status, started_at_ms, final_capture, psp_reference, code, fee_minor, latency_ms, finished_at_ms"
)


class StaleVersion(Exception):
    """Another writer changed the payment first; the caller must reload and recompute."""


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    payment: sm.Payment
    token: str
    auto_capture: bool


@dataclass(frozen=True, slots=True)
class Intent:
    """A PSP attempt row to persist, and the merchant operation it belongs to (None: the authorization)."""

    attempt: AttemptRow
    operation_id: str | None = None


def record_from_row(row: Sequence[Any]) -> PaymentRecord:
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


# -- state rows --------------------------------------------------------------------------------------


def load_states(db: Db, payment_ids: Sequence[str]) -> dict[str, PaymentRecord]:
    """The states of the payments there are among `payment_ids`, by payment id."""
    out: dict[str, PaymentRecord] = {}
    for part in chunked(list(dict.fromkeys(payment_ids))):
        if len(part) == 1:
            rows = db.execute(f"SELECT {STATE_COLUMNS} FROM payments WHERE id = ?", tuple(part)).fetchall()
        else:
            where, args = any_of(db, "id", part)
            rows = db.execute(f"SELECT {STATE_COLUMNS} FROM payments WHERE {where}", args).fetchall()
        for r in rows:
            out[r[0]] = record_from_row(r)
    return out


def lock_rows(db: Db, payment_ids: Sequence[str]) -> dict[str, tuple[int, int, str]]:
    """(version, events count, body) of each payment there is among `payment_ids`, its row locked until
    the transaction ends (PostgreSQL's FOR UPDATE; SQLite's writer holds the whole database): what a
    batch's apply checks its versions against and composes its bodies from, before writing them."""
    out: dict[str, tuple[int, int, str]] = {}
    lock = " FOR UPDATE" if db.pg else ""
    for part in chunked(sorted(set(payment_ids))):  # one order for every locker: no deadlock between workers
        where, args = any_of(db, "id", part)
        rows = db.fetchall(f"SELECT id, version, events_count, body FROM payments WHERE {where} ORDER BY id{lock}", args)
        out.update((r[0], (int(r[1]), int(r[2]), r[3])) for r in rows)
    return out


# Rows of one multi-row VALUES list in a batched UPDATE (13 parameters each: well under SQLite's 32,766).
STATE_ROWS_PER_STATEMENT = 500
# The arrays of a batched state write on PostgreSQL: id, status, the three amounts, capture_final, psp,
# psp_reference, failure_code, version, base version, events count, body.
_STATE_TYPES = ("text", "text", "bigint", "bigint", "bigint", "bigint", "text", "text", "text", "bigint", "bigint",
                "bigint", "text")


def write_states(db: Db, changes: Sequence[tuple[sm.Payment, int, int, bytes]]) -> set[str]:
    """Writes each (new state, base version, events count after, body): the payment's whole row, state
    and body together, if its version is still the base one; on PostgreSQL one `UPDATE ... FROM
    unnest(...)` per `STATE_ROWS_PER_STATEMENT` changes. Returns the payments written."""
    t = now_ms()
    out: set[str] = set()
    if not db.pg:
        # SQLite plans `UPDATE ... FROM (VALUES ...)` as a scan of the whole table per statement (100 us a
        # payment at 4,000 rows, and growing with the table): one prepared statement stepped per row,
        # by primary key, instead. Its writer holds the whole database, so the versions `lock_rows`
        # read are still the rows' own: every row is written, which the change count confirms.
        before = db.raw.total_changes
        db.raw.executemany(
            "UPDATE payments SET status = ?, amount_authorized = ?, amount_captured = ?, amount_refunded = ?,"
            " capture_final = ?, psp = ?, psp_reference = ?, failure_code = ?, version = ?, events_count = ?,"
            " body = ?, updated_ms = ? WHERE id = ? AND version = ?",
            [(p.status.value, p.amount_authorized, p.amount_captured, p.amount_refunded, int(p.capture_final), p.psp,
              p.psp_reference, p.failure_code, p.version, events, body.decode(), t, p.id, base_version)
             for p, base_version, events, body in changes])
        if db.raw.total_changes - before != len(changes):
            raise RuntimeError("a payment row changed while the store's writer held the database")
        return {p.id for p, *_ in changes}
    text = ("UPDATE payments SET status = v.c1, amount_authorized = v.c2, amount_captured = v.c3,"
            " amount_refunded = v.c4, capture_final = v.c5, psp = v.c6, psp_reference = v.c7, failure_code = v.c8,"
            f" version = v.c9, events_count = v.c11, body = v.c12, updated_ms = %b FROM {pg_unnest(_STATE_TYPES, 'v')}"
            " WHERE payments.id = v.c0 AND payments.version = v.c10 RETURNING id")
    for chunk in chunked(changes, STATE_ROWS_PER_STATEMENT):
        rows = [(p.id, p.status.value, p.amount_authorized, p.amount_captured, p.amount_refunded, int(p.capture_final),
                 p.psp, p.psp_reference, p.failure_code, p.version, base_version, events, body.decode())
                for p, base_version, events, body in chunk]
        out.update(r[0] for r in db.fetchall_pg(text, [t, *pg_arrays(rows, _STATE_TYPES)]))
    return out


def count_events(db: Db, counts: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Adds (payment id, events) to each payment's events count, in one statement per chunk; returns the
    counts after."""
    out: dict[str, int] = {}
    for chunk in chunked(counts, STATE_ROWS_PER_STATEMENT):
        if db.pg:
            rows = db.fetchall_pg("UPDATE payments SET events_count = payments.events_count + v.c1"
                               f" FROM {pg_unnest(('text', 'bigint'), 'v')} WHERE payments.id = v.c0"
                               " RETURNING id, events_count", pg_arrays(chunk, ('text', 'bigint')))
        else:
            rows = db.fetchall(
                "UPDATE payments SET events_count = payments.events_count + v.column2"
                f" FROM (VALUES {', '.join(['(CAST(? AS TEXT), CAST(? AS BIGINT))'] * len(chunk))}) AS v"
                " WHERE payments.id = v.column1 RETURNING id, events_count",
                [a for pid, n in chunk for a in (pid, n)],
            )
        out.update((r[0], int(r[1])) for r in rows)
    return out


def insert_audit(db: Db, transitions: Sequence[sm.Transition]) -> None:
    db.executemany(
        "INSERT INTO audit_log (payment_id, old_status, new_status, actor, reason, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
        [(t.audit.payment_id, t.audit.old_status, t.audit.new_status, t.audit.actor, t.audit.reason, t.audit.at_ms)
         for t in transitions],
    )


def audit_trail(db: Db, payment_id: str) -> list[tuple[str, str, str, str]]:
    rows = db.execute(
        "SELECT old_status, new_status, actor, reason FROM audit_log WHERE payment_id = ? ORDER BY id", (payment_id,)
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


# -- attempts ------------------------------------------------------------------------------------------


def upsert_attempts(db: Db, intents: Sequence[Intent], recorded: bool = False) -> None:
    """Inserts the attempts, or updates their outcome where they exist (one statement over the batch).
    `recorded`: the attempts are expected to exist already (outcomes of intents written before their
    calls): on SQLite they are first updated by primary key, half the cost of the upsert's failed
    insert, and the upsert runs only if some row was not there."""
    rows = list(_one_row_per_attempt(intents).values())
    if recorded and rows and db.pg:
        outcomes = [(r[0], r[9], r[11], r[12], r[13], r[14], r[16]) for r in rows]
        types = [pg_column_types(db, "payment_attempts")[c] for c in _OUTCOME_COLUMNS]
        updated = {r[0] for r in db.fetchall_pg(
            "UPDATE payment_attempts SET status = v.c1, psp_reference = coalesce(v.c2, payment_attempts.psp_reference),"
            f" code = v.c3, fee_minor = v.c4, latency_ms = v.c5, finished_at_ms = v.c6 FROM {pg_unnest(types, 'v')}"
            " WHERE payment_attempts.attempt_id = v.c0 RETURNING v.c0", pg_arrays(outcomes, types))}
        rows = [r for r in rows if r[0] not in updated]
        if not rows:
            return
    elif recorded and rows:
        before = db.raw.total_changes
        db.raw.executemany(
            "UPDATE payment_attempts SET status = ?, psp_reference = coalesce(?, psp_reference), code = ?,"
            " fee_minor = ?, latency_ms = ?, finished_at_ms = ? WHERE attempt_id = ?",
            [(r[9], r[11], r[12], r[13], r[14], r[16], r[0]) for r in rows])
        if db.raw.total_changes - before == len(rows):
            return
    db.executemany(
        "INSERT INTO payment_attempts (attempt_id, payment_id, operation_id, attempt_no, operation, psp,"
        " idempotency_key, amount, currency, status, final_capture, psp_reference, code, fee_minor,"
        " latency_ms, started_at_ms, finished_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (attempt_id) DO UPDATE SET status = excluded.status,"
        " psp_reference = coalesce(excluded.psp_reference, payment_attempts.psp_reference),"
        " code = excluded.code, fee_minor = excluded.fee_minor, latency_ms = excluded.latency_ms,"
        " finished_at_ms = excluded.finished_at_ms",
        rows,
    )


# The columns of an attempt's outcome, as a recorded attempt's UPDATE on PostgreSQL sets them.
_OUTCOME_COLUMNS = ("attempt_id", "status", "psp_reference", "code", "fee_minor", "latency_ms", "finished_at_ms")
# Columns of an attempt row that a later row of the same attempt replaces (the upsert's DO UPDATE SET).
_ATTEMPT_OUTCOME_COLUMNS = (9, 12, 13, 14, 16)
_ATTEMPT_PSP_REFERENCE = 11


def _one_row_per_attempt(intents: Sequence[Intent]) -> dict[str, tuple[Any, ...]]:
    """The rows to upsert, one per attempt: a later row of an attempt already in the batch folds into
    the first as the upsert would have applied it (one multi-row statement may not touch a row twice)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for i in intents:
        a = i.attempt
        row = (a.attempt_id, a.payment_id, i.operation_id, a.attempt_no, a.operation, a.psp, a.idempotency_key,
               a.amount, a.currency, a.status.value, int(a.final_capture), a.psp_reference, a.code,
               a.fee_minor, a.latency_ms, a.started_at_ms, a.finished_at_ms)
        first = rows.get(a.attempt_id)
        if first is not None:
            merged = list(first)
            for c in _ATTEMPT_OUTCOME_COLUMNS:
                merged[c] = row[c]
            if row[_ATTEMPT_PSP_REFERENCE] is not None:
                merged[_ATTEMPT_PSP_REFERENCE] = row[_ATTEMPT_PSP_REFERENCE]
            row = tuple(merged)
        rows[a.attempt_id] = row
    return rows


def attempts(db: Db, payment_id: str, operation_id: str | None) -> list[AttemptRow]:
    return attempts_many(db, [(payment_id, operation_id)])[0]


def attempts_many(db: Db, keys: Sequence[tuple[str, str | None]]) -> list[list[AttemptRow]]:
    """For each (payment id, operation id or None for all), the payment's attempts in the order they
    started: one statement for the whole list."""
    by_payment: dict[str, list[tuple[str | None, AttemptRow]]] = {pid: [] for pid, _ in keys}
    for chunk in chunked(list(by_payment)):
        where, args = any_of(db, "payment_id", chunk)
        rows = db.execute(f"SELECT {_ATTEMPT_COLUMNS}, operation_id FROM payment_attempts WHERE {where}"
                          " ORDER BY payment_id, started_at_ms, attempt_id", args).fetchall()
        for r in rows:
            by_payment[r[1]].append((r[16], AttemptRow(
                attempt_id=r[0], payment_id=r[1], attempt_no=r[2], operation=r[3], psp=r[4],
                idempotency_key=r[5], amount=r[6], currency=r[7], status=AttemptStatus(r[8]),
                started_at_ms=r[9], final_capture=bool(r[10]), psp_reference=r[11], code=r[12],
                fee_minor=r[13], latency_ms=r[14], finished_at_ms=r[15],
            )))
    return [[a for op, a in by_payment[pid] if operation_id is None or op == operation_id]
            for pid, operation_id in keys]


# -- payment reads ---------------------------------------------------------------------------------------


def owner(db: Db, payment_id: str) -> str | None:
    """The merchant of an accepted payment."""
    row = db.execute("SELECT merchant_id FROM payments WHERE id = ?", (payment_id,)).fetchone()
    return None if row is None else str(row[0])


def ids_with_status(db: Db, status: str, limit: int, created_before_s: int | None) -> list[str]:
    if created_before_s is None:
        rows = db.execute("SELECT id FROM payments WHERE status = ? ORDER BY lsn LIMIT ?", (status, limit)).fetchall()
    else:
        rows = db.execute(
            "SELECT id FROM payments WHERE status = ? AND created < ? ORDER BY created LIMIT ?",
            (status, created_before_s, limit),
        ).fetchall()
    return [r[0] for r in rows]


def settled(db: Db, payment_id: str) -> bool:
    """Neither `processing` nor `pending_verification`, and no operation open."""
    row = db.execute(
        "SELECT status, (SELECT count(*) FROM payment_operations o WHERE o.payment_id = p.id"
        " AND o.status IN ('pending', 'pending_verification')) FROM payments p WHERE id = ?",
        (payment_id,),
    ).fetchone()
    return row is not None and row[0] not in ("processing", "pending_verification") and row[1] == 0


def list_bodies(db: Db, merchant_id: str, limit: int, starting_after: str | None) -> tuple[list[str], bool] | None:
    """Bodies newest first; None when `starting_after` is not one of the merchant's payments.

    SQLite orders by the one WAL's LSN; PostgreSQL holds the records of many WALs (one per
    gateway process), whose LSNs are not comparable, so there the order is (created, id)."""
    order = "created DESC, id DESC" if db.pg else "lsn DESC"
    after = "(created, id) < (?, ?)" if db.pg else "lsn < ?"
    if starting_after is None:
        rows = db.execute(
            f"SELECT body FROM payments WHERE merchant_id = ? ORDER BY {order} LIMIT ?", (merchant_id, limit + 1)
        ).fetchall()
    else:
        cursor = db.execute(
            "SELECT created, id, lsn FROM payments WHERE id = ? AND merchant_id = ?", (starting_after, merchant_id)
        ).fetchone()
        if cursor is None:
            return None
        key = (cursor[0], cursor[1]) if db.pg else (cursor[2],)
        rows = db.execute(
            f"SELECT body FROM payments WHERE merchant_id = ? AND {after} ORDER BY {order} LIMIT ?",
            (merchant_id, *key, limit + 1),
        ).fetchall()
    return [r[0] for r in rows[:limit]], len(rows) > limit


# -- the payment body -------------------------------------------------------------------------------------


def compose_body(db: Db, payment_id: str) -> bytes:
    """`compose_bodies` of one payment."""
    return compose_bodies(db, [payment_id])[payment_id]


def compose_bodies(db: Db, payment_ids: Sequence[str], known: Mapping[str, sm.Payment] | None = None,
                   texts: Mapping[str, str] | None = None, write: bool = True) -> dict[str, bytes]:
    """The body of each payment composed from its processing state: status, amounts, attempts, refunds
    and the operation in progress. Done at write time so reads stay one indexed row; for a batch the
    reads are three statements, whatever the batch's size. `known`: the states the caller is writing
    (a batch's apply) and `texts` the bodies it has read already, neither read again; `write` False:
    the caller writes the bodies itself (with the state, in one statement)."""
    ids = list(dict.fromkeys(payment_ids))
    known = known or {}
    texts = texts or {}
    bodies: dict[str, dict[str, Any]] = {pid: msgspec.json.decode(texts[pid]) for pid in ids if pid in texts}
    states: dict[str, sm.Payment] = {pid: known[pid] for pid in ids if pid in known}
    attempts: dict[str, list[dict[str, Any]]] = {pid: [] for pid in ids}
    operations: dict[str, list[Operation]] = {pid: [] for pid in ids}
    for chunk in chunked(ids):
        of_chunk, args = any_of(db, "payment_id", chunk)
        # The reads are sent before any result is read: one round trip in a pipeline.
        reading = [pid for pid in chunk if pid not in bodies or pid not in states]
        row_cur = None
        if reading:
            of_reading, reading_args = any_of(db, "id", reading)
            row_cur = db.execute(f"SELECT body, {STATE_COLUMNS} FROM payments WHERE {of_reading}", reading_args)
        attempts_cur = db.execute(
            "SELECT payment_id, attempt_id, operation, psp, status, code, amount, started_at_ms, finished_at_ms"
            f" FROM payment_attempts WHERE {of_chunk} ORDER BY payment_id, started_at_ms, attempt_id", args,
        )
        ops_cur = db.execute(
            f"SELECT {OP_COLUMNS} FROM payment_operations WHERE {of_chunk} ORDER BY payment_id, created_ms, seq", args,
        )
        for r in row_cur.fetchall() if row_cur is not None else ():
            bodies.setdefault(r[1], msgspec.json.decode(r[0]))
            states.setdefault(r[1], record_from_row(r[1:]).payment)
        for a in attempts_cur.fetchall():
            rows = attempts[a[0]]
            if len(rows) < ATTEMPTS_IN_BODY_MAX:
                rows.append({"id": a[1], "operation": a[2], "psp": a[3], "status": a[4], "code": a[5],
                             "amount": a[6], "started_ms": a[7], "finished_ms": a[8]})
        for o in ops_cur.fetchall():
            if len(operations[o[1]]) < OPERATIONS_IN_BODY_MAX:
                operations[o[1]].append(op_from_row(o))
    out = {pid: _compose(bodies[pid], states.get(pid), attempts[pid], operations[pid]) for pid in ids}
    if write:
        db.update_many("payments", "id", [("body", "TEXT")], [(pid, b.decode()) for pid, b in out.items()])
    return out


def _compose(body: dict[str, Any], p: sm.Payment | None, attempts: list[dict[str, Any]],
             operations: list[Operation]) -> bytes:
    if p is not None:
        body["status"] = p.status.value
        body["amount_authorized"] = p.amount_authorized
        body["amount_capturable"] = p.amount_capturable
        body["amount_captured"] = p.amount_captured
        body["amount_refunded"] = p.amount_refunded
        body["capture_final"] = p.capture_final
        body["psp"] = p.psp
        body["failure_code"] = p.failure_code
        if p.status is not sm.PaymentStatus.REQUIRES_ACTION and body.get("next_action") is not None:
            body["next_action"] = None  # the challenge is over
    body["attempts"] = attempts
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
    return msgspec.json.encode(body)


def _refund_status(op_status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed"}.get(op_status, "pending")


# -- a batch of changes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One orchestration result to persist: checked against `base_version`, attributed to
    `operation_id`, optionally ending an operation (`finish`) and opening a follow-up one
    (`new_operation`: kind, amount, final_capture, actor; the auto-capture)."""

    result: ProcessingResult
    base_version: int
    operation_id: str | None = None
    finish: OperationFinish | None = None
    new_operation: tuple[str, int, bool, str] | None = None

    def follow_up(self) -> NewOperation:
        """The follow-up operation the change opens (the auto-capture)."""
        assert self.new_operation is not None
        kind, amount, final, actor = self.new_operation
        p = self.result.payment
        return NewOperation(p.id, p.merchant_id, kind, amount, final, None, actor)

    def event_types(self) -> list[str]:
        """The events the change announces: its new status's, and an operation's failure."""
        types = []
        if self.result.transitions:
            event_type = ev.event_type_for_status(self.result.transitions[-1].payment.status.value)
            if event_type is not None:
                types.append(event_type)
        if self.finish is not None and self.finish.status == "failed":
            types.append(ev.OPERATION_FAILED)
        return types


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of one `Change` of a batch: `applied` False means its version was stale and
    nothing of it was written; `operation` is the follow-up operation it opened, if any, and `intent`
    the `started` row of that operation's first PSP attempt, committed with the change (so the call
    can go out at once: intent first, one transaction fewer)."""

    payment_id: str
    applied: bool
    operation: Operation | None = None
    intent: AttemptRow | None = None
