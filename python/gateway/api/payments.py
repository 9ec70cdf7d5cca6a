"""The hot path: `POST /v1/payments` (create) and `GET /v1/payments/{id}` (read).

A create is one call into the runtime (the fast path and its wait for durability, plus in cluster
mode the shared admission); the answer is sent only once the runtime says the record is durable.
A read answers from the runtime's read-your-writes copy or its store. With `Prefer: wait=MS` (at
most `PREFER_WAIT_MS_MAX`), a read waits until the payment is neither `processing` nor
`pending_verification` and has no open operation, then answers from the store of record.
"""

from __future__ import annotations

from typing import Any

from gateway.api.http import JSON, PAYMENT_ID, Api, Response, not_found, prefer_wait_ms, read_body
from gateway.runtime.base import CreateAnswer
from gateway.store.base import Merchant

_UNREAD: Any = object()


async def create_payment(app: Api, scope: Any, proto: Any, idem_key: str | None = _UNREAD) -> Response:
    """`idem_key`: the request's key as the guard already read and checked it (else read here)."""
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    body = await read_body(scope, proto, app.config.limits.body_bytes_max)
    if not isinstance(body, bytes):
        return body
    if idem_key is _UNREAD:
        idem_key = scope.headers.get("idempotency-key")
    # (A runtime that is not ready answers 503 `starting` itself.)
    return respond(await app.runtime.create(auth, idem_key, body), idem_key)


# The headers of a plain answer: one list shared by every such response (the server only reads it).
_PLAIN = [JSON]


def respond(a: CreateAnswer, idem_key: str | None) -> Response:
    """The HTTP response of a create's answer."""
    if not (a.replayed or a.retry_after_s is not None or (a.echo_key and idem_key is not None)):
        return a.status, _PLAIN, a.body
    headers = [JSON]
    if a.replayed:
        headers.append(("idempotent-replayed", "true"))
    if a.retry_after_s is not None:
        headers.append(("retry-after", str(a.retry_after_s)))
    if a.echo_key and idem_key is not None:
        headers.append(("idempotency-key", idem_key))
    return a.status, headers, a.body


async def get_payment(app: Api, scope: Any, payment_id: str) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    if PAYMENT_ID.match(payment_id):
        body = await app.runtime.read_payment(auth.id, payment_id)
        if body is not None:
            if scope.headers.get("prefer"):
                return await _wait_settled(app, scope, auth, payment_id, body)
            return 200, [JSON], body
    return not_found(payment_id)


async def _wait_settled(app: Api, scope: Any, auth: Merchant, payment_id: str, first: bytes) -> Response:
    wait_ms = prefer_wait_ms(scope)
    rt = app.runtime
    ps = rt.processing
    if not wait_ms or ps is None or rt.changes is None:
        return 200, [JSON], first

    async def settled() -> bool:
        return await rt.run(ps.settled, payment_id)

    await rt.changes.wait(payment_id, settled, wait_ms)
    # From the store of record: a read-your-writes copy may still show the payment as accepted.
    body = await rt.read_payment(auth.id, payment_id, fresh=True)
    return 200, [JSON, ("preference-applied", f"wait={wait_ms}")], body if body is not None else first
