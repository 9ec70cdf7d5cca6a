"""Webhook rows: endpoints, the event outbox and per-endpoint deliveries.

The outbox: `emit` writes a payment's event and its pending deliveries inside the transaction of the
change it announces, so an event exists if and only if its change committed. Event ids of one payment
share a prefix and sort in the order the events happened (`payments.events_count` numbers them).
Per (endpoint, payment) only the oldest pending delivery is due, so a merchant receives a payment's
events in order; a claimed delivery is hidden from every dispatcher for its lease, and comes back if
the dispatcher dies. Functions taking a `Db` run inside the caller's read or transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.domain import events as ev
from gateway.domain.secrets import Secret
from gateway.domain.stripe_objects import stripe_types
from gateway.store.payments import count_events
from gateway.store.sql import Db, Dialect, any_of, chunked, now_ms

ERROR_CHARS_MAX = 200
DELIVERY_STATUSES = ("delivered", "failed", "pending")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed webhook delivery: what to send, where, and with which secret."""

    event_id: str
    endpoint_id: str
    attempts: int
    body: bytes
    url: str
    secret: Secret
    # An endpoint of the Stripe-compatible surface (the Stripe types it wants): sent Stripe-shaped events.
    stripe_types: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to write: the payment's `number`-th (its events count after it), of `event_type`,
    carrying the payment's JSON as it is after the change."""

    merchant_id: str
    payment_id: str
    number: int
    event_type: str
    payment_body: bytes


def emit(db: Db, merchant_id: str, payment_id: str, event_type: str, payment_body: bytes) -> tuple[str, bool]:
    """Writes one event (inside the caller's transaction) and a pending delivery for each of the
    merchant's endpoints subscribed to its type. Returns the event id and whether any delivery was written."""
    n = count_events(db, [(payment_id, 1)])[payment_id]
    [event_id], delivered = emit_many(db, [NewEvent(merchant_id, payment_id, n, event_type, payment_body)])
    return event_id, delivered


def emit_many(db: Db, events: Sequence[NewEvent]) -> tuple[list[str], bool]:
    """Writes the events of a batch (inside the caller's transaction, their numbers already counted in
    `payments.events_count`) and their pending deliveries: one query for the endpoints of every
    merchant of the batch, one statement per table. Returns the event ids and whether any delivery was
    written."""
    if not events:
        return [], False
    subscriptions: dict[str, list[tuple[str, list[str]]]] = {}
    for chunk in chunked(sorted({e.merchant_id for e in events})):
        where, args = any_of(db, "merchant_id", chunk)
        for merchant_id, endpoint_id, enabled in db.fetchall(
            f"SELECT merchant_id, id, enabled_events FROM webhook_endpoints WHERE {where}"
            " AND deleted_ms IS NULL ORDER BY merchant_id, id", args,
        ):
            subscriptions.setdefault(merchant_id, []).append((endpoint_id, msgspec.json.decode(enabled)))
    t = now_ms()
    ids, event_rows, deliveries = [], [], []
    for e in events:
        event_id = ev.event_id(e.payment_id, e.number)
        ids.append(event_id)
        body = b'{"id":"%s","object":"event","type":"%s","created":%d,"data":{"object":%s}}' % (
            event_id.encode(), e.event_type.encode(), t // 1000, e.payment_body)
        event_rows.append((event_id, e.merchant_id, e.payment_id, e.event_type, t, body.decode()))
        deliveries += [(event_id, endpoint_id, e.payment_id, t, t)
                       for endpoint_id, enabled in subscriptions.get(e.merchant_id, ())
                       if ev.subscribed(enabled, e.event_type)]
    db.executemany(
        "INSERT INTO payment_events (id, merchant_id, payment_id, type, created_ms, body) VALUES (?, ?, ?, ?, ?, ?)",
        event_rows,
    )
    db.executemany(
        "INSERT INTO webhook_deliveries (event_id, endpoint_id, payment_id, status, attempts, next_attempt_ms,"
        " updated_ms) VALUES (?, ?, ?, 'pending', 0, ?, ?)",
        deliveries,
    )
    return ids, bool(deliveries)


def endpoint_dict(row: Sequence[Any]) -> dict[str, Any]:
    return {"id": row[0], "object": "webhook_endpoint", "url": row[1], "enabled_events": msgspec.json.decode(row[2]),
            "description": row[3], "status": "enabled", "created": row[4] // 1000}


class WebhookRows:
    """The webhook statements that are transactions of their own, over one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect

    def create_endpoint(self, merchant_id: str, url: str, enabled_events: list[str], description: str | None,
                        secret: str) -> dict[str, Any] | None:
        """A new endpoint, or None when the merchant already has `ENDPOINTS_PER_MERCHANT_MAX`."""
        endpoint_id = ev.new_endpoint_id()
        t = now_ms()
        events = msgspec.json.encode(enabled_events).decode()
        with self._d.tx() as db:
            # Serialises the creates of one merchant (PostgreSQL), so the limit holds across processes.
            db.execute("SELECT id FROM merchants WHERE id = ?" + self._d.for_update(), (merchant_id,))
            count = db.execute(
                "SELECT count(*) FROM webhook_endpoints WHERE merchant_id = ? AND deleted_ms IS NULL", (merchant_id,)
            ).fetchone()[0]
            if int(count) >= ev.ENDPOINTS_PER_MERCHANT_MAX:
                return None
            db.execute(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, secret, enabled_events, description, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint_id, merchant_id, url, secret, events, description, t),
            )
        return endpoint_dict((endpoint_id, url, events, description, t))

    def list_endpoints(self, merchant_id: str) -> list[dict[str, Any]]:
        with self._d.read() as db:
            rows = db.execute(
                "SELECT id, url, enabled_events, description, created_ms FROM webhook_endpoints"
                " WHERE merchant_id = ? AND deleted_ms IS NULL ORDER BY created_ms, id LIMIT ?",
                (merchant_id, ev.ENDPOINTS_PER_MERCHANT_MAX),
            ).fetchall()
        return [endpoint_dict(r) for r in rows]

    def delete_endpoint(self, merchant_id: str, endpoint_id: str) -> bool:
        """Deletes the endpoint; its pending deliveries end `failed` (endpoint_deleted)."""
        t = now_ms()
        with self._d.tx() as db:
            cur = db.execute(
                "UPDATE webhook_endpoints SET deleted_ms = ? WHERE id = ? AND merchant_id = ? AND deleted_ms IS NULL",
                (t, endpoint_id, merchant_id),
            )
            if cur.rowcount != 1:
                return False
            db.execute(
                "UPDATE webhook_deliveries SET status = 'failed', last_error = 'endpoint_deleted', updated_ms = ?"
                " WHERE endpoint_id = ? AND status = 'pending'",
                (t, endpoint_id),
            )
        return True

    def event(self, merchant_id: str, event_id: str) -> tuple[bytes, list[dict[str, Any]]] | None:
        """The event's JSON and its deliveries; None if it is not this merchant's."""
        with self._d.read() as db:
            row = db.execute(
                "SELECT body FROM payment_events WHERE id = ? AND merchant_id = ?", (event_id, merchant_id)
            ).fetchone()
            if row is None:
                return None
            deliveries = db.execute(
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
        with self._d.read() as db:
            # The ids of a payment's events share a prefix and sort in the order they happened.
            prefix = ev.event_id_prefix(payment_id)
            rows = db.execute(
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
        with self._d.read() as db:
            # Most polls find nothing: a read, not a write transaction (SQLite's write lock) to learn it.
            due = db.execute(
                "SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_ms <= ? LIMIT 1", (t,)
            ).fetchone()
        if due is None:
            return []
        with self._d.tx() as db:
            rows = db.execute(
                "SELECT d.event_id, d.endpoint_id, d.attempts, e.body, w.url, w.secret, w.enabled_events"
                " FROM webhook_deliveries d JOIN payment_events e ON e.id = d.event_id"
                " JOIN webhook_endpoints w ON w.id = d.endpoint_id"
                " WHERE d.status = 'pending' AND d.next_attempt_ms <= ? AND NOT EXISTS ("
                " SELECT 1 FROM webhook_deliveries h WHERE h.endpoint_id = d.endpoint_id"
                " AND h.payment_id = d.payment_id AND h.status = 'pending' AND h.event_id < d.event_id)"
                " ORDER BY d.next_attempt_ms LIMIT ?" + self._d.for_update("d", skip_locked=True),
                (t, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhook_deliveries SET next_attempt_ms = ?, updated_ms = ? WHERE event_id = ?"
                " AND endpoint_id = ?",
                [(t + lease_ms, t, r[0], r[1]) for r in rows],
            )
        return [Delivery(r[0], r[1], r[2], r[3].encode(), r[4], Secret(r[5]),
                         stripe_types(msgspec.json.decode(r[6]))) for r in rows]

    def finish_delivery(self, d: Delivery, status: str, status_code: int | None, error: str | None,
                        next_attempt_ms: int | None) -> None:
        """Records one attempt: `delivered`, `failed` (no attempts left) or `pending` until `next_attempt_ms`."""
        if status not in DELIVERY_STATUSES:
            raise ValueError(f"delivery status {status!r} is not one of {DELIVERY_STATUSES}")
        if (status == "pending") != (next_attempt_ms is not None):
            raise ValueError("next_attempt_ms is given for a pending delivery and only for one")
        t = now_ms()
        with self._d.tx() as db:
            db.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, next_attempt_ms = ?,"
                " last_status_code = ?, last_error = ?, updated_ms = ? WHERE event_id = ? AND endpoint_id = ?"
                " AND status = 'pending'",
                (status, next_attempt_ms if next_attempt_ms is not None else t, status_code,
                 None if error is None else error[:ERROR_CHARS_MAX], t, d.event_id, d.endpoint_id),
            )
