"""Persistence of the async payment path: SQLite in embedded mode, PostgreSQL in cluster mode.

`ProcessingStore` is the facade the API, the workers and the CLI use; the rows of each entity live
in their own module (`payments`, `operations`, `webhooks`, `ledger`) and the one SQL layer with the
one dialect seam in `sql`. What this module adds is the units of work that cross entities:

- every state change is written in ONE transaction together with its audit rows, its ledger postings,
  its attempt rows, the operation it finishes, the recomposed payment body (so that
  `GET /v1/payments/{id}` stays a single-row read) and its events (the outbox); `apply_many` writes a
  batch of changes in one transaction, one statement per kind of row over the whole batch;
- concurrency is optimistic: `payments.version` must still be the version a change was computed
  from, or that change is refused (`Applied.applied` False; `apply` raises `StaleVersion`) and nothing
  of it is written, so two writers can never both apply a transition;
- accepting a capture/void/refund checks the state machine and the idempotency key under the payment's
  row lock (PostgreSQL; SQLite serialises every writer), so at most one operation of a payment is open.

On PostgreSQL several worker processes share the store: a payment is driven by one of them at a time
through `claim`/`release`, and every committed change is announced on `CHANGES_CHANNEL` (new merchant
operations on `OPERATIONS_CHANNEL`); notifications are hints, the periodic checks are the guarantee.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.domain import events as ev
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, ProcessingResult, operation_attempt
from gateway.store import health
from gateway.store import ledger as ledger_rows
from gateway.store import operations as ops
from gateway.store import payments as pay
from gateway.store.ledger import postings_from_rows
from gateway.store.operations import (
    OPEN_OPERATION_STATUSES,
    OPERATION_ID_PREFIX,
    Accepted,
    Operation,
    OperationFinish,
    Refused,
    Replayed,
    fingerprint,
)
from gateway.store.payments import (
    ATTEMPTS_IN_BODY_MAX,
    OPERATIONS_IN_BODY_MAX,
    Applied,
    Change,
    Intent,
    PaymentRecord,
    StaleVersion,
)
from gateway.store.processing_schema import MIGRATION_2_PROCESSING
from gateway.store.sql import Db, Dialect, dialect_for, is_unique_violation, now_ms
from gateway.store.webhooks import ERROR_CHARS_MAX, Delivery, NewEvent, WebhookRows, emit, emit_many

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore

log = logging.getLogger("gateway.store.processing")

# PostgreSQL notification channels (database-wide, so the payload starts with the schema name).
CHANGES_CHANNEL = "gateway_payment_changes"
OPERATIONS_CHANNEL = "gateway_operations"
# Changes one `apply_many` writes in one transaction.
CHANGES_PER_BATCH_MAX = 1_000


class ProcessingStore:
    """Processing persistence on top of a `SqliteStore` (its per-thread connections and write lock) or
    a `PostgresStore` (its connection pool)."""

    def __init__(self, store: SqliteStore | PostgresStore) -> None:
        self.store = store
        self._d: Dialect = dialect_for(store)
        self.pg = self._d.pg
        self._webhooks = WebhookRows(self._d)
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

    def claim_many(self, payment_ids: Sequence[str]) -> list[bool]:
        """`claim` of each payment of a batch, in one statement."""
        return self._d.claim_many(payment_ids)

    def release_many(self, payment_ids: Sequence[str]) -> list[None]:
        """`release` of each payment of a batch, in one statement."""
        self._d.release_many(payment_ids)
        return [None] * len(payment_ids)

    def close(self) -> None:
        self._d.close()

    # -- reads -----------------------------------------------------------------------------------

    def load_many(self, payment_ids: Sequence[str]) -> list[PaymentRecord | None]:
        """The processing state of each payment (None: no such payment), in one read."""
        with self._read() as db:
            found = pay.load_states(db, payment_ids)
        return [found.get(pid) for pid in payment_ids]

    def load(self, payment_id: str) -> PaymentRecord | None:
        """The payment's processing state, creating it from the accepted payment on first use."""
        return self.load_many([payment_id])[0]

    def payment_ids_with_status(self, status: str, limit: int = 10_000, created_before_s: int | None = None) -> list[str]:
        """Payments in `status`, oldest first; with `created_before_s` only those created before then."""
        with self._read() as db:
            return pay.ids_with_status(db, status, limit, created_before_s)

    def open_operations(self, limit: int = 10_000) -> list[Operation]:
        with self._read() as db:
            return ops.open_operations(db, limit)

    def operation(self, operation_id: str) -> Operation | None:
        with self._read() as db:
            return ops.operation(db, operation_id)

    def settled(self, payment_id: str) -> bool:
        """Neither `processing` nor `pending_verification`, and no operation open."""
        with self._read() as db:
            return pay.settled(db, payment_id)

    def attempts(self, payment_id: str, operation_id: str | None = None) -> list[AttemptRow]:
        with self._read() as db:
            return pay.attempts(db, payment_id, operation_id)

    def attempts_many(self, keys: Sequence[tuple[str, str | None]]) -> list[list[AttemptRow]]:
        """`attempts` of each (payment id, operation id or None), in one read."""
        with self._read() as db:
            return pay.attempts_many(db, keys)

    def operations_many(self, operation_ids: Sequence[str]) -> list[Operation | None]:
        """`operation` of each id, in one read."""
        with self._read() as db:
            return ops.operations_many(db, operation_ids)

    def audit_trail(self, payment_id: str) -> list[tuple[str, str, str, str]]:
        """(old_status, new_status, actor, reason) in the order they happened."""
        with self._read() as db:
            return pay.audit_trail(db, payment_id)

    def health_snapshot(self) -> health.Snapshot:
        """The counts the operators' metrics show (store/health.py): a few aggregate queries."""
        with self._read() as db:
            return health.snapshot(db, now_ms())

    def ledger_check(self) -> health.LedgerCheck:
        """Debits equal credits per currency and per posting, over the whole ledger (a scan)."""
        with self._read() as db:
            return health.ledger_check(db)

    def all_postings(self) -> tuple[list[ledger.Posting], list[ledger.Violation]]:
        """Every stored posting, rebuilt from its rows; rows that cannot form a posting are violations."""
        with self._read() as db:
            return ledger_rows.all_postings(db)

    def list_payments(self, merchant_id: str, limit: int, starting_after: str | None) -> tuple[list[str], bool] | None:
        """Bodies newest first; None when `starting_after` is not one of the merchant's payments."""
        with self._read() as db:
            return pay.list_bodies(db, merchant_id, limit, starting_after)

    def payment_body(self, merchant_id: str, payment_id: str) -> bytes | None:
        return self.store.get_payment(merchant_id, payment_id)

    # -- writes ----------------------------------------------------------------------------------

    def record_intents(self, intents: Sequence[Intent]) -> None:
        """Persist the `started` attempts of a batch before their PSP calls, in one transaction committed
        first. Payment bodies are recomposed when the attempts' results are applied, not here."""
        if not intents:
            return
        if self.pg and len(intents) == 1:
            # One statement on an autocommit connection is a transaction of its own: no BEGIN/COMMIT.
            with self._read() as db:
                assert db.raw.autocommit
                pay.upsert_attempts(db, intents)
            return
        with self._tx() as db:
            pay.upsert_attempts(db, intents)

    def record_intent(self, row: AttemptRow, operation_id: str | None = None) -> None:
        """Persist a `started` attempt before its PSP call (its own transaction, committed first)."""
        self.record_intents([Intent(row, operation_id)])

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
        operation `(kind, amount, final_capture, actor)` (the auto-capture). Returns that operation;
        StaleVersion if the payment changed since `base_version` (then nothing is written)."""
        [out] = self.apply_many([Change(result, base_version, operation_id, finish, new_operation)])
        if not out.applied:
            raise StaleVersion(f"payment {out.payment_id} changed since version {base_version}")
        return out.operation

    def apply_many(self, changes: Sequence[Change]) -> list[Applied]:
        """Persist a batch of orchestration results in ONE transaction (each as `apply` would), one
        statement per kind of row over the batch. A change whose base version is stale is refused
        without writing anything of it; the others are written. One change per payment per batch."""
        if len(changes) > CHANGES_PER_BATCH_MAX:
            raise ValueError(f"{len(changes)} changes in one batch (at most {CHANGES_PER_BATCH_MAX})")
        ids = [c.result.payment.id for c in changes]
        if len(set(ids)) != len(ids):
            raise ValueError("a batch of changes holds two changes of one payment")
        for c in changes:
            if c.result.transitions:
                first = c.result.transitions[0]
                assert first.before.version == c.base_version, (first.before.version, c.base_version)
                for t in c.result.transitions:
                    sm.check_invariants(t.payment)
        if not changes:
            return []
        events_of = {c.result.payment.id: c.event_types() for c in changes}
        with self._tx(pipelined=True) as db:
            # The rows first, locked: versions are checked and events numbered before anything is
            # written, so a stale change writes nothing, and each row is then written once, whole.
            rows = pay.lock_rows(db, ids)
            stale = {c.result.payment.id for c in changes if c.result.transitions
                     and rows.get(c.result.payment.id, (None,))[0] != c.base_version}
            live = [c for c in changes if c.result.payment.id not in stale and c.result.payment.id in rows]
            counts = {c.result.payment.id: rows[c.result.payment.id][1] + len(events_of[c.result.payment.id])
                      for c in live}
            pay.upsert_attempts(db, [Intent(a, c.operation_id) for c in live for a in c.result.attempts],
                                recorded=True)
            pay.insert_audit(db, [t for c in live for t in c.result.transitions])
            ledger_rows.insert_postings(db, [p for c in live for p in c.result.postings])
            ops.finish_operations(db, [c.finish for c in live if c.finish is not None])
            following = [c for c in live if c.new_operation is not None]
            opened = ops.insert_operations(db, [c.follow_up() for c in following])
            created = {c.result.payment.id: op for c, op in zip(following, opened, strict=True)}
            states = {c.result.payment.id: c.result.transitions[-1].payment for c in live if c.result.transitions}
            bodies = pay.compose_bodies(db, [c.result.payment.id for c in live], states,
                                        {pid: row[2] for pid, row in rows.items()}, write=False)
            moving = [c for c in live if c.result.transitions]
            written = pay.write_states(db, [(states[c.result.payment.id], c.base_version, counts[c.result.payment.id],
                                             bodies[c.result.payment.id]) for c in moving])
            assert written == {c.result.payment.id for c in moving}, "a locked row changed under its lock"
            db.update_many("payments", "id", [("body", "TEXT"), ("events_count", "BIGINT")],
                           [(c.result.payment.id, bodies[c.result.payment.id].decode(), counts[c.result.payment.id])
                            for c in live if not c.result.transitions])
            # The first attempt of each follow-up operation, `started`: its intent, committed with this
            # change so that its PSP call can follow at once (after the bodies: they show outcomes).
            at = now_ms()
            intents_of = {
                c.result.payment.id: operation_attempt(c.result.payment, op.kind, op.amount, op.final_capture,
                                                       c.result.payment.psp, op.psp_idempotency_key, 1, at)
                for c, op in zip(following, opened, strict=True) if c.result.payment.psp
            }
            pay.upsert_attempts(db, [Intent(intents_of[pid], op.id) for pid, op in created.items() if pid in intents_of])
            events = []
            for c in live:
                p = c.result.payment
                types = events_of[p.id]
                before = counts[p.id] - len(types)
                events += [NewEvent(p.merchant_id, p.id, before + i, t, bodies[p.id]) for i, t in enumerate(types, 1)]
                self._d.notify(db, CHANGES_CHANNEL, p.id)
            if emit_many(db, events)[1]:
                self.new_deliveries = True
            out = [Applied(c.result.payment.id, False) if c.result.payment.id in stale or c.result.payment.id not in rows
                   else Applied(c.result.payment.id, True, created.get(c.result.payment.id),
                                intents_of.get(c.result.payment.id)) for c in changes]
        return out

    def finish_operation(self, finish: OperationFinish, payment_id: str,
                         attempts: Sequence[AttemptRow] = ()) -> None:
        with self._tx(pipelined=True) as db:
            pay.upsert_attempts(db, [Intent(a, finish.operation_id) for a in attempts])
            ops.finish_operations(db, [finish])
            body = pay.compose_body(db, payment_id)
            if finish.status == "failed":
                merchant_id = pay.owner(db, payment_id)
                assert merchant_id is not None, payment_id
                self._emit(db, merchant_id, payment_id, ev.OPERATION_FAILED, body)
            self._d.notify(db, CHANGES_CHANNEL, payment_id)

    def _emit(self, db: Db, merchant_id: str, payment_id: str, event_type: str, payment_body: bytes) -> str:
        event_id, delivered = emit(db, merchant_id, payment_id, event_type, payment_body)
        if delivered:
            self.new_deliveries = True
        return event_id

    # -- webhooks (gateway.store.webhooks) ---------------------------------------------------------

    def create_endpoint(self, merchant_id: str, url: str, enabled_events: list[str], description: str | None,
                        secret: str) -> dict[str, Any] | None:
        """A new endpoint, or None when the merchant already has `ENDPOINTS_PER_MERCHANT_MAX`."""
        return self._webhooks.create_endpoint(merchant_id, url, enabled_events, description, secret)

    def list_endpoints(self, merchant_id: str) -> list[dict[str, Any]]:
        return self._webhooks.list_endpoints(merchant_id)

    def delete_endpoint(self, merchant_id: str, endpoint_id: str) -> bool:
        """Deletes the endpoint; its pending deliveries end `failed` (endpoint_deleted)."""
        return self._webhooks.delete_endpoint(merchant_id, endpoint_id)

    def event(self, merchant_id: str, event_id: str) -> tuple[bytes, list[dict[str, Any]]] | None:
        """The event's JSON and its deliveries; None if it is not this merchant's."""
        return self._webhooks.event(merchant_id, event_id)

    def payment_events(self, merchant_id: str, payment_id: str, limit: int) -> list[str]:
        """The payment's events, oldest first (their JSON)."""
        return self._webhooks.payment_events(merchant_id, payment_id, limit)

    def claim_deliveries(self, limit: int, lease_ms: int) -> list[Delivery]:
        """Takes up to `limit` due deliveries for one send each, hiding them for `lease_ms`."""
        return self._webhooks.claim_deliveries(limit, lease_ms)

    def finish_delivery(self, d: Delivery, status: str, status_code: int | None, error: str | None,
                        next_attempt_ms: int | None) -> None:
        """Records one attempt: `delivered`, `failed` (no attempts left) or `pending` until `next_attempt_ms`."""
        self._webhooks.finish_delivery(d, status, status_code, error, next_attempt_ms)

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
            with self._tx() as db:
                mine = pay.owner(db, payment_id) == merchant_id
                if mine:
                    self._d.lock_payment(db, payment_id)
                if idempotency_key is not None:
                    stored = ops.stored_key(db, merchant_id, idempotency_key)
                    if stored is not None:
                        return _replay(stored, request_fingerprint)
                if not mine:
                    return None
                rec = pay.load_states(db, [payment_id]).get(payment_id)
                assert rec is not None, payment_id
                amount, refusal = _check_operation(db, rec.payment, kind, amount)
                if refusal is not None:
                    if idempotency_key is not None and refusal.store_for_replay:
                        from gateway.domain.errors import error_body

                        error = error_body(refusal.status_code, refusal.code, refusal.message, refusal.param)
                        ops.insert_done_key(db, merchant_id, idempotency_key, request_fingerprint, payment_id,
                                            refusal.status_code, error)
                    return refusal
                if amount <= 0:
                    raise ValueError(f"an operation's amount must be positive, not {amount}")
                op = ops.insert_operation(db, payment_id, merchant_id, kind, amount, final_capture, reason, "merchant")
                if idempotency_key is not None:
                    ops.insert_in_flight_key(db, merchant_id, idempotency_key, request_fingerprint, payment_id)
                body = pay.compose_body(db, payment_id)
                self._d.notify(db, OPERATIONS_CHANNEL, op.id)
                self._d.notify(db, CHANGES_CHANNEL, payment_id)
            return Accepted(op, body)
        except Exception as e:
            if self.pg and is_unique_violation(e):
                # The same key for another payment at the same instant, or a racing follow-up operation.
                return _KEY_IN_USE
            raise

    def resolve_challenge(self, merchant_id: str, payment_id: str, outcome: str, actor: str,
                          reason: str = "canceled") -> bytes | Refused | None:
        """Ends the 3-D Secure challenge of a `requires_action` payment: `outcome` "succeeded" (back to
        `processing`: the caller then hands the payment to the worker), "failed" or "canceled". None: no
        such payment of the merchant; a Refused 422 when it has no challenge, 409 if it changed meanwhile."""
        move = {"succeeded": sm.complete_challenge, "failed": sm.fail_challenge}.get(outcome)
        with self._read() as db:
            if pay.owner(db, payment_id) != merchant_id:
                return None
        rec = self.load(payment_id)
        assert rec is not None, payment_id
        try:
            t = (move(rec.payment, actor=actor, at_ms=now_ms()) if move is not None
                 else sm.cancel_unauthorized(rec.payment, actor=actor, at_ms=now_ms(), reason=reason))
        except sm.TransitionError as e:
            return Refused(422, e.code, e.message, e.param)
        try:
            self.apply(ProcessingResult(payment=t.payment, outcome=None, transitions=[t]),
                       base_version=rec.payment.version)
        except StaleVersion:
            return Refused(409, "payment_changed", "The payment changed meanwhile; retry.", store_for_replay=False)
        if outcome == "succeeded":
            with self._tx() as db:  # cluster workers learn of the resumed payment as of a new operation
                self._d.notify(db, OPERATIONS_CHANNEL, payment_id)
        return self.payment_body(merchant_id, payment_id)

    def finish_idempotency(self, merchant_id: str, key: str, status_code: int, body: bytes) -> None:
        with self._tx() as db:
            ops.finish_key(db, merchant_id, key, status_code, body)

    def finish_abandoned_keys(self, created_before_ms: int | None = None) -> int:
        """Keys left in flight by a gateway that stopped answering get the payment as it is now, with 202
        (accepted). Embedded mode calls it at start (no request can be in flight then); where other
        gateway processes share the store, only keys older than any request can live are touched."""
        with self._tx() as db:
            return ops.finish_abandoned_keys(db, created_before_ms)


_KEY_IN_USE = Refused(409, "idempotency_key_in_use", "A request with this Idempotency-Key is still being processed.",
                      store_for_replay=False)


def _replay(stored: ops.StoredKey, request_fingerprint: str) -> Replayed | Refused:
    """The answer to a request whose idempotency key is already stored."""
    if stored.fingerprint != request_fingerprint:
        return Refused(400, "idempotency_key_reused", "This Idempotency-Key was used with different parameters.",
                       store_for_replay=False)
    if stored.state == "in_flight":
        return _KEY_IN_USE
    assert stored.status_code is not None and stored.response is not None
    return Replayed(int(stored.status_code), stored.response.encode())


def _check_operation(db: Db, p: sm.Payment, kind: str, amount: int | None) -> tuple[int, Refused | None]:
    """The operation's amount (defaulted) and its refusal, if the payment cannot take it now."""
    busy = ops.open_operation_of(db, p.id)
    if busy is not None:
        return 0, Refused(409, "payment_operation_in_progress",
                          f"The {busy[1]} {busy[0]} of this payment is still in progress; retry after it finishes.",
                          store_for_replay=False)
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
        return amount or 0, Refused(422, e.code, e.message, e.param)
    return amount, None


__all__ = [
    "ATTEMPTS_IN_BODY_MAX",
    "CHANGES_CHANNEL",
    "ERROR_CHARS_MAX",
    "MIGRATION_2_PROCESSING",
    "OPEN_OPERATION_STATUSES",
    "OPERATIONS_CHANNEL",
    "OPERATIONS_IN_BODY_MAX",
    "OPERATION_ID_PREFIX",
    "Accepted",
    "Applied",
    "Change",
    "Delivery",
    "Intent",
    "Operation",
    "OperationFinish",
    "PaymentRecord",
    "ProcessingStore",
    "Refused",
    "Replayed",
    "StaleVersion",
    "fingerprint",
    "now_ms",
    "postings_from_rows",
]
