"""Rows of the Stripe-compatible surface: PaymentIntents not confirmed yet, the events the surface writes
itself, and the pages its lists read (PaymentIntents, Events) in Stripe's order.

An unconfirmed intent (`stripe_intents`, store/stripe_schema.py) lives in the store of the mode:
SQLite in embedded mode, committed with a full fsync (`Dialect.durable_tx`) because no WAL record
stands behind it; PostgreSQL in cluster mode, so that every HTTP process sees it. Changes are checked
against the row's `version` (optimistic, as payments are), so two requests cannot both move one intent.

Events of the surface (`payment_intent.created`, `.requires_action`, and `.canceled` of an intent
cancelled before its confirmation) are rows of the same outbox as the payment's (`payment_events`),
delivered by the same dispatcher, but only to endpoints of this surface. Their ids are the payment's
event prefix with number 0 and a fixed tail per type, so they sort before the payment's own events
and writing one twice (a retried request) stores it once.

Lists are newest first by (`created`, id) on both backends; an intent is listed once: as its payment
once that exists, before that as its row here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.domain import events as ev
from gateway.domain.stripe_objects import STRIPE_MARK
from gateway.store import operations as ops
from gateway.store.sql import Db, dialect_for, is_unique_violation, marks, now_ms

if TYPE_CHECKING:
    from gateway.store.processing import ProcessingStore

# The tails of the surface's own events (letters only, fixed: a retry writes the same id).
EVENT_TAILS = {"payment.created": "aaaaaaaa", "payment.requires_action": "bbbbbbbb", "payment.canceled": "cccccccc"}
# The surface's idempotency keys share `operation_idempotency_keys` under this prefix.
KEY_PREFIX = "stripe:"
OPEN_STATUSES = ("requires_payment_method", "requires_confirmation", "confirming")
_COLUMNS = "id, merchant_id, status, confirm_key, created, version, body"


@dataclass(frozen=True, slots=True)
class Draft:
    id: str
    merchant_id: str
    status: str
    confirm_key: str
    created: int
    version: int
    body: dict[str, Any]


def _draft(row: Sequence[Any]) -> Draft:
    return Draft(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), msgspec.json.decode(row[6]))


def surface_event_id(payment_id: str, event_type: str) -> str:
    return f"{ev.event_id_prefix(payment_id)}000000{EVENT_TAILS[event_type]}"


def _emit(db: Db, merchant_id: str, payment_id: str, event_type: str, payment_body: bytes) -> bool:
    """Writes the surface's event (once) and a delivery to each of the merchant's Stripe endpoints
    subscribed to it. True if a delivery was written."""
    event_id = surface_event_id(payment_id, event_type)
    t = now_ms()
    body = b'{"id":"%s","object":"event","type":"%s","created":%d,"data":{"object":%s}}' % (
        event_id.encode(), event_type.encode(), t // 1000, payment_body)
    cur = db.execute("INSERT INTO payment_events (id, merchant_id, payment_id, type, created_ms, body)"
                     " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (event_id, merchant_id, payment_id, event_type, t, body.decode()))
    if cur.rowcount != 1:
        return False
    rows = db.fetchall("SELECT id, enabled_events FROM webhook_endpoints WHERE merchant_id = ? AND deleted_ms IS NULL",
                       (merchant_id,))
    deliveries = [(event_id, endpoint_id, payment_id, t, t) for endpoint_id, enabled in rows
                  if STRIPE_MARK in (events := msgspec.json.decode(enabled)) and ev.subscribed(events, event_type)]
    db.executemany("INSERT INTO webhook_deliveries (event_id, endpoint_id, payment_id, status, attempts,"
                   " next_attempt_ms, updated_ms) VALUES (?, ?, ?, 'pending', 0, ?, ?)", deliveries)
    return bool(deliveries)


def _bounds(lo: int, hi: int, cursor: tuple[Any, Any] | None, backwards: bool, columns: str) -> tuple[str, list[Any]]:
    where, args = f" AND {columns.split(',')[0]} BETWEEN ? AND ?", [lo, hi]
    if cursor is not None:
        where += f" AND ({columns}) {'>' if backwards else '<'} (?, ?)"
        args += list(cursor)
    return where, args


class StripeIntents:
    """The surface's rows beside a `ProcessingStore` (the same SQLite file or PostgreSQL schema)."""

    def __init__(self, processing: ProcessingStore) -> None:
        self._ps = processing
        self._d = dialect_for(processing.store)

    def _delivered(self) -> None:
        # A hint for this process's dispatcher to look now (the others poll).
        self._ps.new_deliveries = True

    # -- idempotency keys ---------------------------------------------------------------------------

    def begin_key(self, merchant_id: str, key: str, fingerprint: str, payment_id: str) -> ops.StoredKey | None:
        """Records the key in flight; or, if it is stored already, what is stored (nothing is written)."""
        try:
            with self._d.durable_tx() as db:
                stored = ops.stored_key(db, merchant_id, KEY_PREFIX + key)
                if stored is not None:
                    return stored
                ops.insert_in_flight_key(db, merchant_id, KEY_PREFIX + key, fingerprint, payment_id)
        except Exception as e:
            if not (self._d.pg and is_unique_violation(e)):
                raise
            # Another process inserted the same key at the same instant: that request is in flight.
            return ops.StoredKey(fingerprint, "in_flight", None, None)
        return None

    def stored_key(self, merchant_id: str, key: str) -> ops.StoredKey | None:
        with self._d.read() as db:
            return ops.stored_key(db, merchant_id, KEY_PREFIX + key)

    def finish_key(self, merchant_id: str, key: str, status_code: int, body: bytes) -> None:
        with self._d.durable_tx() as db:
            ops.finish_key(db, merchant_id, KEY_PREFIX + key, status_code, body)

    def drop_key(self, merchant_id: str, key: str) -> None:
        """A key whose request was refused before it began (malformed): not kept, as the native API's."""
        with self._d.durable_tx() as db:
            db.execute("DELETE FROM operation_idempotency_keys WHERE merchant_id = ? AND key = ? AND state = 'in_flight'",
                       (merchant_id, KEY_PREFIX + key))

    # -- unconfirmed intents --------------------------------------------------------------------------

    def get(self, merchant_id: str, payment_id: str) -> Draft | None:
        with self._d.read() as db:
            row = db.fetchone(f"SELECT {_COLUMNS} FROM stripe_intents WHERE id = ? AND merchant_id = ?",
                              (payment_id, merchant_id))
        return None if row is None else _draft(row)

    def create(self, merchant_id: str, payment_id: str, confirm_key: str, status: str, body: dict[str, Any]) -> Draft:
        """A new intent and its `payment_intent.created` event, in one transaction; the one stored if
        the id exists already (the same create retried)."""
        t = now_ms()
        encoded = msgspec.json.encode(body)
        with self._d.durable_tx() as db:
            cur = db.execute(f"INSERT INTO stripe_intents ({_COLUMNS}, updated_ms) VALUES (?, ?, ?, ?, ?, 0, ?, ?)"
                             " ON CONFLICT DO NOTHING",
                             (payment_id, merchant_id, status, confirm_key, body["created"], encoded.decode(), t))
            if cur.rowcount == 1 and _emit(db, merchant_id, payment_id, "payment.created", encoded):
                self._delivered()
            row = db.fetchone(f"SELECT {_COLUMNS} FROM stripe_intents WHERE id = ?", (payment_id,))
        assert row is not None
        return _draft(row)

    def move(self, d: Draft, status: str, body: dict[str, Any] | None = None, event: str | None = None) -> Draft | None:
        """The intent in `status` (with `body`), if it is still at `d.version`; None if it changed
        meanwhile. `event`: the surface's event written with the change."""
        new_body = d.body if body is None else body
        encoded = msgspec.json.encode(new_body)
        with self._d.durable_tx() as db:
            cur = db.execute("UPDATE stripe_intents SET status = ?, body = ?, version = version + 1, updated_ms = ?"
                             " WHERE id = ? AND merchant_id = ? AND version = ?",
                             (status, encoded.decode(), now_ms(), d.id, d.merchant_id, d.version))
            if cur.rowcount != 1:
                return None
            if event is not None and _emit(db, d.merchant_id, d.id, event, encoded):
                self._delivered()
        return Draft(d.id, d.merchant_id, status, d.confirm_key, d.created, d.version + 1, new_body)

    def emit(self, merchant_id: str, payment_id: str, event_type: str, payment_body: bytes) -> None:
        """The surface's event of a payment (its creation, its challenge), written once."""
        with self._d.durable_tx() as db:
            if _emit(db, merchant_id, payment_id, event_type, payment_body):
                self._delivered()

    # -- lists -------------------------------------------------------------------------------------------

    def position(self, merchant_id: str, payment_id: str) -> tuple[int, str] | None:
        """(created, id) of a payment or unconfirmed intent of the merchant: a list's cursor."""
        with self._d.read() as db:
            row = db.fetchone("SELECT created FROM payments WHERE id = ? AND merchant_id = ?", (payment_id, merchant_id))
            if row is None:
                row = db.fetchone("SELECT created FROM stripe_intents WHERE id = ? AND merchant_id = ?",
                                  (payment_id, merchant_id))
        return None if row is None else (int(row[0]), payment_id)

    def page(self, merchant_id: str, limit: int, cursor: tuple[int, str] | None, backwards: bool, lo: int, hi: int,
             drafts: bool) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` bodies (payments, and with `drafts` the unconfirmed intents) newest first, after
        `cursor` (or before it, `backwards`), created within [lo, hi]; and whether more follow that way."""
        order = "ASC" if backwards else "DESC"
        where, args = _bounds(lo, hi, cursor, backwards, "created, id")
        with self._d.read() as db:
            rows = [(int(r[1]), r[2], r[0]) for r in db.fetchall(
                f"SELECT body, created, id FROM payments WHERE merchant_id = ?{where}"
                f" ORDER BY created {order}, id {order} LIMIT ?", (merchant_id, *args, limit + 1))]
            if drafts:
                found = db.fetchall(
                    f"SELECT body, created, id FROM stripe_intents WHERE merchant_id = ?{where}"
                    f" AND status IN ({marks(len(OPEN_STATUSES))}) ORDER BY created {order}, id {order} LIMIT ?",
                    (merchant_id, *args, *OPEN_STATUSES, limit + 1))
                stored = {r[1] for r in rows}
                rows += [(int(r[1]), r[2], r[0]) for r in found if r[2] not in stored]
        rows.sort(key=lambda r: (r[0], r[1]), reverse=not backwards)
        bodies = [msgspec.json.decode(r[2]) for r in rows[:limit]]
        return (bodies[::-1] if backwards else bodies), len(rows) > limit

    def event_position(self, merchant_id: str, event_id: str) -> tuple[int, str] | None:
        with self._d.read() as db:
            row = db.fetchone("SELECT created_ms FROM payment_events WHERE id = ? AND merchant_id = ?",
                              (event_id, merchant_id))
        return None if row is None else (int(row[0]), event_id)

    def events(self, merchant_id: str, limit: int, types: Sequence[str] | None, cursor: tuple[int, str] | None,
               backwards: bool, lo_ms: int, hi_ms: int) -> tuple[list[bytes], bool]:
        """A page of the merchant's stored events (their JSON), newest first, of `types` (None: all)."""
        order = "ASC" if backwards else "DESC"
        where, args = _bounds(lo_ms, hi_ms, cursor, backwards, "created_ms, id")
        if types is not None:
            if not types:
                return [], False
            where += f" AND type IN ({marks(len(types))})"
            args += list(types)
        with self._d.read() as db:
            rows = db.fetchall(f"SELECT body FROM payment_events WHERE merchant_id = ?{where}"
                               f" ORDER BY created_ms {order}, id {order} LIMIT ?", (merchant_id, *args, limit + 1))
        bodies = [r[0].encode() for r in rows[:limit]]
        return (bodies[::-1] if backwards else bodies), len(rows) > limit
