"""Merchant operations on payments: capture, void, refund, list, and `Prefer: wait`.

Capture, void and refund are *accepted* here and executed by the payment worker
(`gateway.processing.worker`), which makes the PSP call: the request is checked against the
payment's state, its intent is recorded (one SQLite transaction, together with its
`Idempotency-Key`), and the answer is `202` with the payment showing `pending_operation`. With
`Prefer: wait=MS` (at most `PREFER_WAIT_MS_MAX`) the answer waits for the PSP's verdict instead:
`200` with the payment once the operation succeeded, `402` with the PSP's code if it failed, still
`202` if it is not finished by then. One operation at a time per payment: another one while the
first is open is `409 payment_operation_in_progress`. In cluster mode an operation on a payment that
is acknowledged but not yet written to PostgreSQL by a worker is `409 payment_not_ready` with
`Retry-After: 1` (not 404).

`GET /v1/payments/{id}` with `Prefer: wait=MS` waits until the payment is neither `processing`
nor `pending_verification` and has no open operation.

Cluster mode (`server.mode = "cluster"`): every gateway process accepts operations against
PostgreSQL (same store code, `ProcessingStore` on the `PostgresStore`, called off the event loop);
the operation's intent, its `Idempotency-Key` and a NOTIFY to the workers (`gateway worker`) commit
in one transaction. `Prefer: wait` learns of a worker's change in another process from the NOTIFY on
`CHANGES_CHANNEL` that every committed change sends, with a re-check every `CLUSTER_RECHECK_S` in
case a notification is missed.

Idempotency of operations (`Idempotency-Key`, per merchant, stored in SQLite or PostgreSQL): the same key and
the same request replay the stored status and body (`Idempotent-Replayed: true`), the same key with
another request is `400 idempotency_error`, and the same key while the first is still being
answered is `409`. Business-rule refusals (`422`) are stored and replayed too; requests refused
before they began (malformed, unauthenticated, too large) are not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

import msgspec

from gateway._fastpath import contains_pan
from gateway.api import app as app_mod
from gateway.api.app import JSON, ON_APPLIED, ON_START, ON_STOP, PAYMENT_ID, GatewayApp, Response, route
from gateway.domain.errors import error_body
from gateway.domain.payment import AMOUNT_MINOR_MAX
from gateway.runtime.worker_process import WorkerProcess
from gateway.shared.redis_state import SharedStateUnavailable
from gateway.store.base import Merchant, created_payment_ids
from gateway.store.postgres import Listener, PostgresStore
from gateway.store.processing import (
    CHANGES_CHANNEL,
    Accepted,
    ProcessingStore,
    Refused,
    Replayed,
    fingerprint,
)

log = logging.getLogger("gateway.api.operations")

OPERATION_BODY_BYTES_MAX = 4096
IDEMPOTENCY_KEY_CHARS_MAX = 255
REASON_CHARS_MAX = 255
PREFER_WAIT_MS_MAX = 10_000
LIST_LIMIT_DEFAULT = 10
LIST_LIMIT_MAX = 100
# Cluster mode: a waiting request re-reads PostgreSQL this often even without a notification.
CLUSTER_RECHECK_S = 0.25

T = TypeVar("T")

Amount = Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MINOR_MAX)]
Reason = Annotated[str, msgspec.Meta(max_length=REASON_CHARS_MAX)]


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount | None = None
    final_capture: bool = False


class VoidRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason | None = None


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount | None = None
    reason: Reason | None = None


_REQUESTS: dict[str, type[msgspec.Struct]] = {
    "capture": CaptureRequest,
    "void": VoidRequest,
    "refund": RefundRequest,
}
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,9})(?:$|[,;\s])")
_AT_PATH = re.compile(r" - at `\$\.(\w+)`$")


class _State:
    """Per-app processing state: the worker (embedded mode), the store view, and the merchants' waiters."""

    def __init__(self, app: GatewayApp, loop: asyncio.AbstractEventLoop) -> None:
        assert app.store is not None
        self.cluster = app.cluster is not None
        self.pstore = ProcessingStore(app.store)
        # Embedded mode: this gateway's own worker process. Cluster mode: the `gateway worker`
        # processes, told by NOTIFY from the store; their changes come back the same way.
        self.worker: WorkerProcess | None = None
        self.listener: Listener | None = None
        if self.cluster:
            assert isinstance(app.store, PostgresStore)
            self.listener = Listener(app.store, [CHANGES_CHANNEL], lambda _c, pid: self._changed(pid))
        else:
            self.worker = WorkerProcess(str(getattr(app.store, "path", "")), loop)
            self.worker.on_change.append(self._changed)
        self.loop = loop
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
        if self.listener is not None:
            self.listener.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.listener is not None:
            self.listener.stop()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call: inline on SQLite (local, sub-millisecond), on a thread on PostgreSQL (a
        network round trip must not stall the event loop)."""
        if self.cluster:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _changed(self, payment_id: str) -> None:
        # Worker or listener thread: only bother the HTTP loop when someone waits for this payment.
        if payment_id in self.waiters and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, payment_id)

    def _wake(self, payment_id: str) -> None:
        for fut in self.waiters.pop(payment_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, payment_id: str, done: Callable[[], Awaitable[bool]], wait_ms: int) -> None:
        deadline = self.loop.time() + wait_ms / 1000
        while True:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            fut: asyncio.Future[None] = self.loop.create_future()
            self.waiters.setdefault(payment_id, set()).add(fut)
            try:
                if await done():
                    return
                await asyncio.wait_for(fut, min(remaining, CLUSTER_RECHECK_S) if self.cluster else remaining)
            except TimeoutError:
                if not self.cluster:
                    return
            finally:
                waiting = self.waiters.get(payment_id)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        self.waiters.pop(payment_id, None)


_STATES: dict[int, _State] = {}


def _state(app: GatewayApp) -> _State | None:
    """The app's processing state; in cluster mode made on first use (the embedded start hooks do not
    run there), None while the app is not ready."""
    st = _STATES.get(id(app))
    if st is None and app.cluster is not None and app.ready and app._loop is not None:
        st = _STATES[id(app)] = _State(app, app._loop)
        st.start()
    return st


# -- lifecycle hooks -----------------------------------------------------------------------------


def _start(app: GatewayApp) -> None:
    assert app._loop is not None
    st = _State(app, app._loop)
    _STATES[id(app)] = st
    st.start()


def _stop(app: GatewayApp) -> None:
    st = _STATES.pop(id(app), None)
    if st is not None:
        st.stop()


def stop_cluster(app: GatewayApp) -> None:
    """Cluster mode's stop (called by runtime/cluster.py, since the embedded hooks do not run there)."""
    _stop(app)


def _applied(app: GatewayApp, records: list[tuple[int, bytes]]) -> None:
    st = _STATES.get(id(app))
    if st is not None and st.worker is not None:  # records applied during start-up: the worker's first scan
        st.worker.submit_payments(created_payment_ids(records))


ON_START.append(_start)
ON_STOP.append(_stop)
ON_APPLIED.append(_applied)


# -- helpers ---------------------------------------------------------------------------------------


def _invalid(code: str, message: str, param: str | None = None, status: int = 400) -> Response:
    return status, [JSON], error_body(status, code, message, param)


def prefer_wait_ms(scope: Any) -> int:
    """The `Prefer: wait=MS` value, bounded by PREFER_WAIT_MS_MAX; 0 when absent or malformed."""
    header = scope.headers.get("prefer")
    if not header:
        return 0
    m = _PREFER_WAIT.search(header)
    return min(int(m.group(1)), PREFER_WAIT_MS_MAX) if m else 0


def _decode(kind: str, body: bytes) -> msgspec.Struct | Response:
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=_REQUESTS[kind])
    except msgspec.ValidationError as e:
        text = str(e)
        at = _AT_PATH.search(text)
        param = at.group(1) if at else None
        if text.startswith("Object contains unknown field"):
            name = text.split("`")[1]
            return _invalid("parameter_unknown", f"Received unknown parameter: {name}", name)
        if param is None:
            return _invalid("invalid_json", "The request body must be a JSON object.")
        if param == "amount":
            return _invalid("parameter_invalid_integer",
                            f"amount must be an integer in 1..{AMOUNT_MINOR_MAX} (minor units).", "amount")
        if "length" in text:
            return _invalid("parameter_too_long", f"{param} must be at most {REASON_CHARS_MAX} characters.", param)
        expected = text.split("`")[1] if "`" in text else "value"
        kind_name = {"bool": "a boolean", "str": "a string"}.get(expected, expected)
        return _invalid("parameter_invalid_type", f"{param} must be {kind_name}.", param)
    except msgspec.DecodeError:
        return _invalid("invalid_json", "The request body is not valid JSON.")


def _string_values(obj: msgspec.Struct) -> list[str]:
    return [v for v in (getattr(obj, f) for f in obj.__struct_fields__) if isinstance(v, str)]


async def _read_body(scope: Any, proto: Any) -> bytes | Response:
    too_large = _invalid("body_too_large",
                         f"The request body is larger than the limit of {OPERATION_BODY_BYTES_MAX} bytes.",
                         status=413)
    length = scope.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > OPERATION_BODY_BYTES_MAX:
        return too_large
    body: bytes = await proto()
    return too_large if len(body) > OPERATION_BODY_BYTES_MAX else body


# -- capture, void, refund -------------------------------------------------------------------------


async def _operation(app: GatewayApp, scope: Any, proto: Any, payment_id: str, kind: str) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    st = _state(app) if app.ready else None
    if st is None:
        return 503, [JSON, ("retry-after", "1")], error_body(503, "starting", "The gateway is starting.")
    raw = await _read_body(scope, proto)
    if not isinstance(raw, bytes):
        return raw
    if contains_pan(raw.decode("utf-8", errors="replace")):
        return _invalid("card_number_not_allowed",
                        "Card numbers are not accepted here; use a payment method token.")
    req = _decode(kind, raw)
    if not isinstance(req, msgspec.Struct):
        return req
    if any(contains_pan(v) for v in _string_values(req)):
        return _invalid("card_number_not_allowed", "Card numbers are not accepted here; use a payment method token.")
    key = scope.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= IDEMPOTENCY_KEY_CHARS_MAX:
        return _invalid("parameter_too_long",
                        f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_CHARS_MAX} characters.", "Idempotency-Key")
    wait_ms = prefer_wait_ms(scope)
    amount = getattr(req, "amount", None)
    final_capture = bool(getattr(req, "final_capture", False))
    reason = getattr(req, "reason", None)
    fp = fingerprint(kind, payment_id, msgspec.json.encode(req))
    outcome = await st.run(st.pstore.accept_operation, auth.id, payment_id, kind, amount, final_capture, reason,
                           key, fp)
    if outcome is None:
        if await _accepted_not_yet_stored(app, auth.id, payment_id):
            return 409, [JSON, ("retry-after", "1")], error_body(
                409, "payment_not_ready", "The payment was accepted and is not processed yet; retry shortly.")
        return _invalid("resource_missing", f"No such payment: '{payment_id}'", "id", status=404)
    if isinstance(outcome, Replayed):
        return outcome.status_code, [JSON, ("idempotent-replayed", "true")], outcome.body
    if isinstance(outcome, Refused):
        kind_name = "idempotency_error" if outcome.status_code in (400, 409) else None
        return outcome.status_code, [JSON], error_body(outcome.status_code, outcome.code, outcome.message,
                                                       outcome.param, kind=kind_name)
    assert isinstance(outcome, Accepted)
    op = outcome.operation
    status, headers, body = 202, [JSON], outcome.body
    try:
        if st.worker is not None:
            st.worker.submit_operation(op.id)  # (cluster mode: the NOTIFY of the accepting transaction)
        if wait_ms:
            headers.append(("preference-applied", f"wait={wait_ms}"))

            async def finished() -> bool:
                cur = await st.run(st.pstore.operation, op.id)
                return cur is not None and cur.status in ("succeeded", "failed")

            await st.wait(payment_id, finished, wait_ms)
            cur = await st.run(st.pstore.operation, op.id)
            latest = await st.run(st.pstore.payment_body, auth.id, payment_id)
            body = latest or body
            if cur is not None and cur.status == "succeeded":
                status = 200
            elif cur is not None and cur.status == "failed":
                status = 402
                body = error_body(402, cur.failure_code or "psp_failed",
                                  f"The PSP refused the {kind} {op.id}.", kind="card_error")
    finally:
        if key is not None:
            await st.run(st.pstore.finish_idempotency, auth.id, key, status, body)
    if key is not None:
        headers.append(("idempotency-key", key))
    return status, headers, body


async def _accepted_not_yet_stored(app: GatewayApp, merchant_id: str, payment_id: str) -> bool:
    """Cluster mode: the payment is acknowledged (its read-your-writes copy is in Redis) but no worker
    has written it to PostgreSQL yet, so an operation on it is early, not aimed at a missing payment."""
    cluster = app.cluster
    if cluster is None or cluster.shared is None:
        return False
    try:
        hit = await cluster.shared.recent_payment(payment_id)
    except SharedStateUnavailable:
        return False
    return hit is not None and hit[0] == merchant_id


@route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/capture", "capture_payment")
async def capture_payment(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "capture")


@route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/void", "void_payment")
async def void_payment(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "void")


@route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/refunds", "refund_payment")
async def refund_payment(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "refund")


# -- list ------------------------------------------------------------------------------------------


@route("GET", r"/v1/payments", "list_payments")
async def list_payments(app: GatewayApp, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    limit = LIST_LIMIT_DEFAULT
    starting_after: str | None = None
    for name, value in parse_qsl(scope.query_string or "", keep_blank_values=True):
        if name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= LIST_LIMIT_MAX:
                return _invalid("parameter_invalid_integer", f"limit must be an integer in 1..{LIST_LIMIT_MAX}.",
                                "limit")
            limit = int(value)
        elif name == "starting_after":
            if not PAYMENT_ID.match(value):
                return _invalid("parameter_invalid_type", "starting_after must be a payment id (pay_...).",
                                "starting_after")
            starting_after = value
        else:
            return _invalid("parameter_unknown", f"Received unknown parameter: {name[:64]}", name[:64])
    st = _state(app)
    if st is None:
        return 503, [JSON, ("retry-after", "1")], error_body(503, "starting", "The gateway is starting.")
    page = await st.run(st.pstore.list_payments, auth.id, limit, starting_after)
    if page is None:
        return _invalid("resource_missing", f"No such payment: '{starting_after}'", "starting_after")
    bodies, has_more = page
    out = b'{"object":"list","url":"/v1/payments","has_more":%s,"data":[%s]}' % (
        b"true" if has_more else b"false",
        ",".join(bodies).encode(),
    )
    return 200, [JSON], out


# -- GET with Prefer: wait -------------------------------------------------------------------------


async def get_payment_wait(app: GatewayApp, scope: Any, payment_id: str, first: Response) -> Response:
    wait_ms = prefer_wait_ms(scope)
    st = _state(app)
    if not wait_ms or st is None:
        return first

    async def settled() -> bool:
        return await st.run(st.pstore.settled, payment_id)

    await st.wait(payment_id, settled, wait_ms)
    if st.cluster:
        # PostgreSQL directly: the read-your-writes copy in Redis may still show the payment as accepted.
        auth = app.authenticate(scope)
        body = await st.run(st.pstore.payment_body, auth.id, payment_id) if isinstance(auth, Merchant) else None
        status, headers, out = (200, [JSON], body) if body is not None else first
    else:
        status, headers, out = app._get_payment(scope, payment_id)
    return status, [*headers, ("preference-applied", f"wait={wait_ms}")], out


app_mod.GET_PAYMENT_WAIT.append(get_payment_wait)
