"""PaymentIntents created without `confirm`: stored rows until their confirmation makes them payments.

Create answers `requires_payment_method` (no payment method) or `requires_confirmation`, once the row
is durable in the mode's store (store/stripe_intents.py: SQLite fsynced, or PostgreSQL, which every
HTTP process reads). Update changes what Stripe lets change before a confirmation (amount, currency,
payment_method, capture_method, description, metadata merged key by key, customer, receipt_email).
Cancel ends it `canceled` (no PSP call: nothing was authorized). Confirm (with an optional
payment_method) marks it `confirming` and submits it through the one fast path exactly as a create
with `confirm=true` (api/stripe/submit.py), under the Idempotency-Key its id was derived from
(`confirm_key`), so the payment has the intent's id; from then on the payment is the intent. A
confirmation retried after a crash or a 503 submits the same fields again and converges on that
payment; one refused before anything was stored (400, 422, 429) returns the intent to
`requires_confirmation`, to be updated and confirmed again.

A decline is the payment's end (`requires_payment_method` with `last_payment_error`, as Stripe shows
it), but it cannot be confirmed again with another payment method: the payment of that id exists and
is final (docs/stripe-compatibility.md).

`Idempotency-Key` on create, update, confirm and cancel: the same key with the same parameters
replays the stored answer (`Idempotent-Replayed: true`), with other parameters `400 idempotency_error`,
while the first is answered `409`; answers that say "retry" (409, 429, 5xx) and refused parameters are
not kept. The keys are stored with the native operations' (`operation_idempotency_keys`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from gateway.api import guard
from gateway.api.http import JSON, Response
from gateway.api.stripe import objects, wire
from gateway.api.stripe.common import Ctx, intents_store, ok, translate_error
from gateway.api.stripe.submit import ACCEPTED_AND_IGNORED, submit, take_fields, unexpected
from gateway.domain.events import random_letters
from gateway.domain.stripe_objects import UNCONFIRMED, derived_payment_id, letters_of
from gateway.store.operations import StoredKey
from gateway.store.stripe_intents import OPEN_STATUSES, Draft

CONFIRM_KEY_PREFIX = "stripe_intent_"
# Attempts of an update whose row another request changed meanwhile.
UPDATE_ATTEMPTS_MAX = 3


def is_unconfirmed(b: dict[str, Any]) -> bool:
    """A listed body that is an unconfirmed intent's (no native payment has these statuses)."""
    return b.get("status") in OPEN_STATUSES


def intent_of_body(b: dict[str, Any]) -> dict[str, Any]:
    return objects.payment_intent(b)


def intent(d: Draft) -> dict[str, Any]:
    return objects.payment_intent({**d.body, "status": d.status})


def _changed() -> Response:
    return wire.stripe_error(409, "invalid_request_error", "lock_timeout",
                             "This PaymentIntent was changed by another request at the same time; retry.")


def fields_of(body: dict[str, Any]) -> dict[str, Any]:
    """The intent's fields as `submit` takes them (the stored body holds the token already)."""
    customer = body.get("customer") or {}
    return {"amount": body["amount"], "currency": body["currency"], "payment_method": body.get("payment_method"),
            "capture_method": "automatic" if body.get("capture", True) else "manual",
            "description": body.get("description"), "metadata": body.get("metadata") or {},
            "customer": customer.get("id"), "receipt_email": customer.get("email")}


def _apply(body: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for name in ("amount", "currency", "description"):
        if name in f:
            out[name] = f[name]
    if "payment_method" in f:
        out["payment_method"] = objects.payment_method_token(f["payment_method"]) if f["payment_method"] else None
    if "capture_method" in f:
        out["capture"] = f["capture_method"] != "manual"
    if "metadata" in f:
        # Stripe merges metadata key by key; an empty value unsets a key, an empty hash all of them.
        merged = {} if not f["metadata"] else dict(out.get("metadata") or {})
        for k, v in f["metadata"].items():
            if v == "":
                merged.pop(k, None)
            else:
                merged[k] = v
        out["metadata"] = merged
    customer = dict(out.get("customer") or {})
    for name, field in (("customer", "id"), ("receipt_email", "email")):
        if name in f:
            customer[field] = f[name]
    if customer:
        out["customer"] = customer
    return out


def _fingerprint(name: str, payment_id: str, sent: wire.Params) -> str:
    return hashlib.sha256(msgspec.json.encode([name, payment_id, sent], order="sorted")).hexdigest()


async def _stored_answer(ctx: Ctx, stored: StoredKey, fp: str, payment_id: str) -> Response:
    replayed = ("idempotent-replayed", "true")
    if stored.fingerprint != fp:
        return wire.stripe_error(400, "idempotency_error", "idempotency_key_reused",
                                 "Keys for idempotent requests can only be used with the same parameters they"
                                 " were first used with.")
    if stored.state == "in_flight":
        return wire.stripe_error(409, "invalid_request_error", "idempotency_key_in_use",
                                 "A request with this Idempotency-Key is still being processed.")
    if stored.status_code == 202 or stored.response is None:
        # Its request was interrupted (the gateway stopped): the intent as it is now.
        b = await ctx.app.runtime.read_payment(ctx.merchant.id, payment_id)
        if b is not None:
            return ok(objects.payment_intent(msgspec.json.decode(b)), headers=(replayed,))
        d = await ctx.app.runtime.run(intents_store(ctx).get, ctx.merchant.id, payment_id)
        return ok(intent(d), headers=(replayed,)) if d is not None else wire.missing("payment_intent", payment_id)
    return int(stored.status_code or 200), [JSON, replayed], stored.response.encode()


async def replay(ctx: Ctx, name: str, payment_id: str, sent: wire.Params) -> Response | None:
    """The stored answer of a request of this surface with the request's Idempotency-Key, if one is
    stored (an intent's confirmation replayed once its payment exists); None otherwise."""
    key = ctx.scope.headers.get("idempotency-key")
    if not key:
        return None
    stored = await ctx.app.runtime.run(intents_store(ctx).stored_key, ctx.merchant.id, key)
    return None if stored is None else await _stored_answer(ctx, stored, _fingerprint(name, payment_id, sent),
                                                            payment_id)


async def _idempotent(ctx: Ctx, name: str, payment_id: str, sent: wire.Params,
                      run: Callable[[], Awaitable[Response]]) -> Response:
    """`run()` under the request's Idempotency-Key (Stripe's semantics; see the module's docstring)."""
    key = guard.idempotency_key(ctx.scope)
    if key is None:
        return await run()
    if not isinstance(key, str):
        return translate_error(key[0], key[2])
    fp = _fingerprint(name, payment_id, sent)
    store = intents_store(ctx)
    rt = ctx.app.runtime
    stored = await rt.run(store.begin_key, ctx.merchant.id, key, fp, payment_id)
    if stored is not None:
        return await _stored_answer(ctx, stored, fp, payment_id)
    try:
        status, headers, body = await run()
    except BaseException:
        await rt.run(store.drop_key, ctx.merchant.id, key)
        raise
    if status in (409, 429) or status >= 500:
        await rt.run(store.drop_key, ctx.merchant.id, key)
    else:
        await rt.run(store.finish_key, ctx.merchant.id, key, status, body)
    return status, headers, body


async def create(ctx: Ctx, f: dict[str, Any], sent: wire.Params) -> Response:
    key = ctx.scope.headers.get("idempotency-key")
    # With a key, the id is derived from it (a retry in another process converges on the same intent).
    confirm_key = CONFIRM_KEY_PREFIX + (letters_of(key.encode()) if key else random_letters(32))
    pid = derived_payment_id(ctx.merchant.id, confirm_key)

    async def run() -> Response:
        pm = f.get("payment_method")
        status = "requires_confirmation" if pm else "requires_payment_method"
        body: dict[str, Any] = {"id": pid, "object": "payment", "status": status, "amount": f["amount"],
                                "currency": f["currency"], "payment_method": objects.payment_method_token(pm) if pm
                                else None, "capture": f.get("capture_method") != "manual",
                                "description": f.get("description"), "metadata": f.get("metadata") or {},
                                "created": int(time.time()), "livemode": False}
        customer = {k: v for k, v in (("id", f.get("customer")), ("email", f.get("receipt_email"))) if v is not None}
        if customer:
            body["customer"] = customer
        d = await ctx.app.runtime.run(intents_store(ctx).create, ctx.merchant.id, pid, confirm_key, status, body)
        return ok(intent(d))

    return await _idempotent(ctx, "create", pid, sent, run)


async def update(ctx: Ctx, d: Draft, params: wire.Params) -> Response:
    sent = dict(params)
    wire.take_expand(params)
    for name in ACCEPTED_AND_IGNORED:
        params.pop(name, None)
    f = take_fields(params, creating=False)
    wire.no_more(params)
    store = intents_store(ctx)
    rt = ctx.app.runtime

    async def run() -> Response:
        cur: Draft | None = d
        for _ in range(UPDATE_ATTEMPTS_MAX):
            if cur is None:
                return wire.missing("payment_intent", objects.intent_id(d.id))
            if cur.status not in UNCONFIRMED:
                return unexpected(intent(cur), "update")
            body = _apply(cur.body, f)
            status = "requires_confirmation" if body.get("payment_method") else "requires_payment_method"
            moved = await rt.run(store.move, cur, status, {**body, "status": status})
            if moved is not None:
                return ok(intent(moved))
            cur = await rt.run(store.get, ctx.merchant.id, d.id)
        return _changed()

    return await _idempotent(ctx, "update", d.id, sent, run)


async def confirm(ctx: Ctx, d: Draft, pm: str | None, expand: set[str], sent: wire.Params) -> Response:
    store = intents_store(ctx)
    rt = ctx.app.runtime

    async def run() -> Response:
        cur = d
        token = objects.payment_method_token(pm) if pm is not None else None
        if cur.status == "canceled":
            return unexpected(intent(cur), "confirm")
        if cur.status in UNCONFIRMED:
            body = dict(cur.body)
            if token is not None:
                body["payment_method"] = token
            if not body.get("payment_method"):
                return wire.stripe_error(400, "invalid_request_error", "payment_intent_unexpected_state",
                                         "You cannot confirm this PaymentIntent because it's missing a payment"
                                         " method: pass payment_method.", "payment_method", payment_intent=intent(cur))
            moved = await rt.run(store.move, cur, "confirming", {**body, "status": "confirming"})
            if moved is None:
                return _changed()
            cur = moved
        elif token is not None and token != cur.body.get("payment_method"):
            # Its confirmation is under way with another payment method (a retry resubmits that one).
            return unexpected(intent(cur), "confirm")
        answer, code = await submit(ctx, cur.confirm_key, fields_of(cur.body), expand, created_event=False)
        if code in (201, 402):
            if cur.status != "confirmed":
                await rt.run(store.move, cur, "confirmed", {**cur.body, "status": "confirmed"})
        elif code in (400, 422, 429) and cur.status == "confirming":
            # Refused before anything was written: the intent waits for its confirmation again.
            await rt.run(store.move, cur, "requires_confirmation", {**cur.body, "status": "requires_confirmation"})
        return answer

    return await _idempotent(ctx, "confirm", d.id, sent, run)


async def cancel(ctx: Ctx, d: Draft, reason: str, sent: wire.Params) -> Response:
    store = intents_store(ctx)
    rt = ctx.app.runtime

    async def run() -> Response:
        if d.status not in UNCONFIRMED:
            return unexpected(intent(d), "cancel")
        body = {**d.body, "status": "canceled", "stripe_cancellation_reason": reason, "canceled_at": int(time.time())}
        moved = await rt.run(store.move, d, "canceled", body, "payment.canceled")
        return ok(intent(moved)) if moved is not None else _changed()

    return await _idempotent(ctx, "cancel", d.id, sent, run)
