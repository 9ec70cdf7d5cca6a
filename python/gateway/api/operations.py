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

import logging
import re
from typing import Annotated, Any
from urllib.parse import parse_qsl

import msgspec

from gateway.api import guard
from gateway.api.http import (
    JSON,
    PAYMENT_ID,
    Api,
    Response,
    Route,
    list_page,
    prefer_wait_ms,
    route,
    starting,
)
from gateway.domain.errors import error_body
from gateway.domain.idempotency import operation_fingerprint
from gateway.domain.payment import AMOUNT_MINOR_MAX
from gateway.store.base import Merchant
from gateway.store.processing import Accepted, Refused, Replayed

log = logging.getLogger("gateway.api.operations")

OPERATION_BODY_BYTES_MAX = 4096
REASON_CHARS_MAX = 255
LIST_LIMIT_DEFAULT = 10
LIST_LIMIT_MAX = 100

Amount = Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MINOR_MAX)]
# No control characters but line breaks and tabs: PostgreSQL refuses a NUL in text.
Reason = Annotated[str, msgspec.Meta(max_length=REASON_CHARS_MAX, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]


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
_AT_PATH = re.compile(r" - at `\$\.(\w+)`$")


# -- helpers ---------------------------------------------------------------------------------------


def _invalid(code: str, message: str, param: str | None = None, status: int = 400) -> Response:
    return status, [JSON], error_body(status, code, message, param)


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
        if "regex" in text:
            return _invalid("parameter_invalid", f"{param} must not contain control characters.", param)
        expected = text.split("`")[1] if "`" in text else "value"
        kind_name = {"bool": "a boolean", "str": "a string"}.get(expected, expected)
        return _invalid("parameter_invalid_type", f"{param} must be {kind_name}.", param)
    except msgspec.DecodeError:
        return _invalid("invalid_json", "The request body is not valid JSON.")


# -- capture, void, refund -------------------------------------------------------------------------


async def _operation(app: Api, scope: Any, proto: Any, payment_id: str, kind: str) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    rt = app.runtime
    ps = rt.processing
    if not rt.ready or ps is None or rt.changes is None:
        return starting()
    raw = await guard.read_json_body(scope, proto, OPERATION_BODY_BYTES_MAX)
    if not isinstance(raw, bytes):
        return raw
    req = _decode(kind, raw)
    if not isinstance(req, msgspec.Struct):
        return req
    # (The app's guard refused an unreadable, too long or card-number key before routing; this is the
    # same check again, so that no caller of this handler can store such a key.)
    key = guard.idempotency_key(scope)
    if isinstance(key, tuple):
        return key
    return await run_operation(app, auth, payment_id, kind, req, key, prefer_wait_ms(scope))


async def run_operation(app: Api, auth: Merchant, payment_id: str, kind: str, req: msgspec.Struct,
                        key: str | None, wait_ms: int) -> Response:
    """An operation's request decoded and checked: accepted (202), or waited for up to `wait_ms` (200 or
    402), or refused; also the Stripe-compatible surface's capture, cancel and refund (api/stripe/)."""
    rt = app.runtime
    ps = rt.processing
    if not rt.ready or ps is None or rt.changes is None:
        return starting()
    changes = rt.changes
    amount = getattr(req, "amount", None)
    final_capture = bool(getattr(req, "final_capture", False))
    reason = getattr(req, "reason", None)
    fp = operation_fingerprint(kind, payment_id, msgspec.json.encode(req))
    outcome = await rt.run(ps.accept_operation, auth.id, payment_id, kind, amount, final_capture, reason,
                           key, fp)
    if outcome is None:
        if await rt.accepted_not_yet_stored(auth.id, payment_id):
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
        rt.submit_operation(op.id)  # (cluster mode: the NOTIFY of the accepting transaction does it)
        if wait_ms:
            headers.append(("preference-applied", f"wait={wait_ms}"))

            async def finished() -> bool:
                cur = await rt.run(ps.operation, op.id)
                return cur is not None and cur.status in ("succeeded", "failed")

            await changes.wait(payment_id, finished, wait_ms)
            cur = await rt.run(ps.operation, op.id)
            latest = await rt.run(ps.payment_body, auth.id, payment_id)
            body = latest or body
            if cur is not None and cur.status == "succeeded":
                status = 200
            elif cur is not None and cur.status == "failed":
                status = 402
                body = error_body(402, cur.failure_code or "psp_failed",
                                  f"The PSP refused the {kind} {op.id}.", kind="card_error")
    finally:
        if key is not None:
            await rt.run(ps.finish_idempotency, auth.id, key, status, body)
    if key is not None:
        headers.append(("idempotency-key", key))
    return status, headers, body


async def capture_payment(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "capture")


async def void_payment(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "void")


async def refund_payment(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    return await _operation(app, scope, proto, match["id"], "refund")


# -- list ------------------------------------------------------------------------------------------


async def list_payments(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    limit = LIST_LIMIT_DEFAULT
    starting_after: str | None = None
    for name, value in parse_qsl(scope.query_string or "", keep_blank_values=True):
        if name == "limit":
            parsed = guard.strict_int(value, 1, LIST_LIMIT_MAX)
            if parsed is None:
                return _invalid("parameter_invalid_integer", f"limit must be an integer in 1..{LIST_LIMIT_MAX}.",
                                "limit")
            limit = parsed
        elif name == "starting_after":
            if not PAYMENT_ID.match(value):
                return _invalid("parameter_invalid_type", "starting_after must be a payment id (pay_...).",
                                "starting_after")
            starting_after = value
        else:
            return _invalid("parameter_unknown", f"Received unknown parameter: {name[:64]}", name[:64])
    rt = app.runtime
    ps = rt.processing
    if not rt.ready or ps is None:
        return starting()
    page = await rt.run(ps.list_payments, auth.id, limit, starting_after)
    if page is None:
        return _invalid("resource_missing", f"No such payment: '{starting_after}'", "starting_after")
    bodies, has_more = page
    return list_page("/v1/payments", bodies, has_more)


def routes() -> list[Route]:
    """This module's endpoints, for the app's route table."""
    return [
        route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/capture", "capture_payment", capture_payment),
        route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/void", "void_payment", void_payment),
        route("POST", r"/v1/payments/(?P<id>pay_[0-9a-z]{24})/refunds", "refund_payment", refund_payment),
        route("GET", r"/v1/payments", "list_payments", list_payments),
    ]
