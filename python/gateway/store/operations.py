"""Merchant operations (capture, void, refund) and the idempotency keys of their requests.

Rows only: the checks that decide whether an operation is accepted (the payment's state machine)
and the transaction that composes them with the payment's state live in `gateway.store.processing`.
Every function runs inside the caller's `Db` (a read or a transaction) and commits nothing itself.

Invariants: at most one operation of a payment is open (`pending` or `pending_verification`) at a
time, which `open_operation_of` lets the caller check under the payment's row lock; an operation's
PSP idempotency key is `<payment>:<kind>:<seq>` and never changes, so retries and recovery reuse it;
an idempotency key is `in_flight` until its response is stored (`done`), then replays that response;
the request fingerprint stored with it is `gateway.domain.idempotency`'s (docs/idempotency.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.domain.events import ID_RANDOM_CHARS, random_letters
from gateway.domain.idempotency import fingerprint
from gateway.store.sql import Db, any_of, chunked, now_ms

__all__ = ["Accepted", "Operation", "OperationFinish", "Refused", "Replayed", "StoredKey", "fingerprint"]

OPEN_OPERATION_STATUSES = ("pending", "pending_verification")
OPERATION_ID_PREFIX = {"capture": "cap", "void": "void", "refund": "re"}


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


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An operation idempotency key as stored: `state` is `in_flight` or `done` (then the response)."""

    fingerprint: str
    state: str
    status_code: int | None
    response: str | None


OP_COLUMNS = (
    "id, payment_id, merchant_id, kind, seq, amount, final_capture, reason, actor, status,"
    " psp_idempotency_key, failure_code"
)
_OPEN = "status IN ('pending', 'pending_verification')"


def op_from_row(row: Sequence[Any]) -> Operation:
    return Operation(
        row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[9], row[10], row[11]
    )


@dataclass(frozen=True, slots=True)
class NewOperation:
    """An operation to open on a payment."""

    payment_id: str
    merchant_id: str
    kind: str
    amount: int
    final_capture: bool
    reason: str | None
    actor: str


def insert_operation(db: Db, payment_id: str, merchant_id: str, kind: str, amount: int, final_capture: bool,
                     reason: str | None, actor: str) -> Operation:
    """A new `pending` operation, numbered after the payment's previous ones of the same kind."""
    [op] = insert_operations(db, [NewOperation(payment_id, merchant_id, kind, amount, final_capture, reason, actor)])
    return op


def insert_operations(db: Db, new: Sequence[NewOperation]) -> list[Operation]:
    """New `pending` operations, each numbered after its payment's previous ones of the same kind: one
    query for the numbers of the whole batch, one statement for the rows."""
    last: dict[tuple[str, str], int] = {}
    for chunk in chunked(sorted({n.payment_id for n in new})):
        where, args = any_of(db, "payment_id", chunk)
        last.update(((r[0], r[1]), int(r[2])) for r in db.fetchall(
            f"SELECT payment_id, kind, max(seq) FROM payment_operations WHERE {where} GROUP BY payment_id, kind", args))
    t = now_ms()
    out = []
    for n in new:
        seq = last[(n.payment_id, n.kind)] = last.get((n.payment_id, n.kind), 0) + 1
        out.append(Operation(
            id=f"{OPERATION_ID_PREFIX[n.kind]}_{random_letters(ID_RANDOM_CHARS)}",
            payment_id=n.payment_id,
            merchant_id=n.merchant_id,
            kind=n.kind,
            seq=seq,
            amount=n.amount,
            final_capture=n.final_capture,
            reason=n.reason,
            actor=n.actor,
            status="pending",
            # The PSP idempotency key of the operation, reused on every retry and on recovery.
            psp_idempotency_key=f"{n.payment_id}:{n.kind}:{seq}",
            failure_code=None,
        ))
    db.executemany(
        f"INSERT INTO payment_operations ({OP_COLUMNS}, created_ms, updated_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(op.id, op.payment_id, op.merchant_id, op.kind, op.seq, op.amount, int(op.final_capture), op.reason,
          op.actor, op.status, op.psp_idempotency_key, op.failure_code, t, t) for op in out],
    )
    return out


def finish_operations(db: Db, finishes: Sequence[OperationFinish]) -> None:
    """Records how each operation ended (one statement over the batch)."""
    t = now_ms()
    db.update_many("payment_operations", "id", [("status", "TEXT"), ("failure_code", "TEXT"), ("updated_ms", "BIGINT")],
                   [(f.operation_id, f.status, f.failure_code, t) for f in finishes])


def open_operation_of(db: Db, payment_id: str) -> tuple[str, str] | None:
    """(id, kind) of the payment's open operation, if one is."""
    row = db.execute(
        f"SELECT id, kind FROM payment_operations WHERE payment_id = ? AND {_OPEN} LIMIT 1", (payment_id,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


def open_operations(db: Db, limit: int) -> list[Operation]:
    rows = db.execute(
        f"SELECT {OP_COLUMNS} FROM payment_operations WHERE {_OPEN} ORDER BY created_ms LIMIT ?", (limit,)
    ).fetchall()
    return [op_from_row(r) for r in rows]


def operation(db: Db, operation_id: str) -> Operation | None:
    return operations_many(db, [operation_id])[0]


def operations_many(db: Db, operation_ids: Sequence[str]) -> list[Operation | None]:
    """Each operation by id (None: no such operation), one statement for the whole list."""
    found: dict[str, Operation] = {}
    for chunk in chunked(list(dict.fromkeys(operation_ids))):
        where, args = any_of(db, "id", chunk)
        rows = db.execute(f"SELECT {OP_COLUMNS} FROM payment_operations WHERE {where}", args).fetchall()
        found.update((r[0], op_from_row(r)) for r in rows)
    return [found.get(i) for i in operation_ids]


# -- idempotency keys of operation requests --------------------------------------------------------


def stored_key(db: Db, merchant_id: str, key: str) -> StoredKey | None:
    row = db.execute(
        "SELECT fingerprint, state, status_code, response FROM operation_idempotency_keys"
        " WHERE merchant_id = ? AND key = ?",
        (merchant_id, key),
    ).fetchone()
    return None if row is None else StoredKey(row[0], row[1], row[2], row[3])


def insert_done_key(db: Db, merchant_id: str, key: str, request_fingerprint: str, payment_id: str,
                    status_code: int, response: bytes) -> None:
    """A key whose response is already known (a refusal): replays return it."""
    db.execute(
        "INSERT INTO operation_idempotency_keys (merchant_id, key, fingerprint, state, payment_id,"
        " status_code, response, created_ms) VALUES (?, ?, ?, 'done', ?, ?, ?, ?)",
        (merchant_id, key, request_fingerprint, payment_id, status_code, response.decode(), now_ms()),
    )


def insert_in_flight_key(db: Db, merchant_id: str, key: str, request_fingerprint: str, payment_id: str) -> None:
    """A key whose request is being answered: a replay meanwhile is refused with 409."""
    db.execute(
        "INSERT INTO operation_idempotency_keys (merchant_id, key, fingerprint, state, payment_id,"
        " created_ms) VALUES (?, ?, ?, 'in_flight', ?, ?)",
        (merchant_id, key, request_fingerprint, payment_id, now_ms()),
    )


def finish_key(db: Db, merchant_id: str, key: str, status_code: int, body: bytes) -> None:
    db.execute(
        "UPDATE operation_idempotency_keys SET state = 'done', status_code = ?, response = ?"
        " WHERE merchant_id = ? AND key = ? AND state = 'in_flight'",
        (status_code, body.decode(), merchant_id, key),
    )


def finish_abandoned_keys(db: Db, created_before_ms: int | None) -> int:
    """Keys left in flight get the payment as it is now, with 202; returns how many."""
    sql = (
        "UPDATE operation_idempotency_keys SET state = 'done', status_code = 202,"
        " response = (SELECT body FROM payments WHERE payments.id = operation_idempotency_keys.payment_id)"
        " WHERE state = 'in_flight'"
    )
    if created_before_ms is None:
        cur = db.execute(sql)
    else:
        cur = db.execute(sql + " AND created_ms < ?", (created_before_ms,))
    return int(cur.rowcount)
