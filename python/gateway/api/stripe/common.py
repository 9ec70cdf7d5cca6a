"""What every Stripe-compatible handler shares: the request context, the engine's answers translated.

Every call authenticates like Stripe (`wire.authenticate`), records its `Stripe-Version`, reads its
parameters (`wire.read_params`), then goes to the one engine: `runtime.create` (the fast path),
`operations.run_operation` (capture, void, refund: the same accept-then-worker path as the native
API) and the same store reads. A call that changes a payment then waits, up to `[stripe]
outcome_wait_ms`, for the worker's outcome, because Stripe answers with the final status.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec

from gateway.api.http import JSON, Api, Response, starting
from gateway.api.stripe import objects, wire
from gateway.store.base import Merchant
from gateway.store.processing import ProcessingStore
from gateway.store.stripe_intents import StripeIntents

StripeHandler = Callable[["Ctx", wire.Params, Any], Awaitable[Response]]


class Ctx(NamedTuple):
    app: Api
    scope: Any
    merchant: Merchant
    version_header: tuple[str, str] | None


async def handle(app: Api, scope: Any, proto: Any, match: Any, fn: StripeHandler) -> Response:
    """Authenticates, records the version, reads the parameters and runs `fn(ctx, params, match)`."""
    version = wire.VERSIONS.record(scope)
    auth = wire.authenticate(app, scope)
    if not isinstance(auth, Merchant):
        return auth
    rt = app.runtime
    if not rt.ready or rt.processing is None:
        return starting()
    params = await wire.read_params(scope, proto)
    if not isinstance(params, dict):
        return params
    try:
        status, headers, body = await fn(Ctx(app, scope, auth, version), params, match)
    except wire.ParamError as e:
        status, headers, body = wire.from_param_error(e)
    if version is not None:
        headers = [*headers, version]
    return status, headers, body


_INTENT_STORES: weakref.WeakKeyDictionary[ProcessingStore, StripeIntents] = weakref.WeakKeyDictionary()


def intents_store(ctx: Ctx) -> StripeIntents:
    """The surface's own rows (unconfirmed intents, its events, its lists), beside the runtime's store."""
    ps = ctx.app.runtime.processing
    assert ps is not None
    found = _INTENT_STORES.get(ps)
    if found is None:
        found = _INTENT_STORES[ps] = StripeIntents(ps)
    return found


def ok(obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return status, [JSON, *headers], msgspec.json.encode(obj)


def base_url(ctx: Ctx) -> str:
    configured = ctx.app.config.stripe.public_url
    if configured:
        return configured
    host = ctx.scope.headers.get("host") or f"127.0.0.1:{ctx.app.config.server.port}"
    return f"{ctx.scope.scheme}://{host}"


def challenge_url(ctx: Ctx, payment_id: str) -> str:
    return f"{base_url(ctx)}/v1/test_3ds/{ctx.merchant.id}/{objects.intent_id(payment_id)}" \
           f"?client_secret={objects.client_secret(ctx.merchant.id, payment_id)}"


async def read(ctx: Ctx, payment_id: str, fresh: bool = False) -> dict[str, Any] | None:
    body = await ctx.app.runtime.read_payment(ctx.merchant.id, payment_id, fresh=fresh)
    if body is None and fresh:
        body = await ctx.app.runtime.read_payment(ctx.merchant.id, payment_id)
    return msgspec.json.decode(body) if body is not None else None


async def settle(ctx: Ctx, payment_id: str) -> dict[str, Any] | None:
    """The payment once the worker is done with it (or `[stripe] outcome_wait_ms` passed)."""
    rt = ctx.app.runtime
    ps = rt.processing
    wait_ms = ctx.app.config.stripe.outcome_wait_ms
    if wait_ms and ps is not None and rt.changes is not None:

        async def settled() -> bool:
            return await rt.run(ps.settled, payment_id)

        await rt.changes.wait(payment_id, settled, wait_ms)
    return await read(ctx, payment_id, fresh=True)


async def intent_of(ctx: Ctx, b: dict[str, Any], expand: set[str] | None = None) -> dict[str, Any]:
    expanded = objects.charge(b) if expand and "latest_charge" in expand else None
    return objects.payment_intent(b, next_action_url=challenge_url(ctx, b["id"]), charge=expanded)


def translate_error(status: int, body: bytes) -> Response:
    """A native error answer as Stripe's: the same type, code and param (the native API's error object
    is Stripe's already), business-rule 422s as Stripe's 400 `payment_intent_unexpected_state`."""
    try:
        err = msgspec.json.decode(body)["error"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return wire.stripe_error(500, "api_error", None, "An unexpected error occurred.")
    kind, code, message, param = err.get("type"), err.get("code"), err.get("message", ""), err.get("param")
    extra: dict[str, Any] = {}
    if status == 422:
        status, kind = 400, "invalid_request_error"
        extra["native_code"] = code
        code = "amount_too_large" if code in ("amount_exceeds_capturable", "refund_exceeds_captured") else (
            "charge_already_refunded" if code == "payment_already_refunded" else "payment_intent_unexpected_state")
    if status == 402:
        kind = "card_error"
        decline = err.get("decline_code")
        card = objects.card_error(decline or code)
        code = card["code"]
        extra["decline_code"] = card.get("decline_code")
        pid = err.get("payment_id") or err.get("payment")
        if isinstance(pid, str):
            extra["payment_intent"] = {"id": objects.intent_id(pid), "object": "payment_intent",
                                       "status": "requires_payment_method"}
    if status == 400 and code == "idempotency_key_reused" or code == "idempotency_mismatch":
        kind = "idempotency_error"
    return wire.stripe_error(status, kind or "api_error", code, message, param, **extra)
