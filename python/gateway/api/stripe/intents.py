"""PaymentIntents on the one engine: a confirmation is the fast path's create (api/stripe/submit.py),
capture and cancel are the native operations, retrieve and list are the native reads
(docs/stripe-compatibility.md).

An intent created without `confirm` is not a payment yet: it is a row of the store
(api/stripe/unconfirmed.py) until its confirmation submits it, and keeps its id. Each call here first
reads the payment; only an id that is not one reads the unconfirmed intent.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.api import operations
from gateway.api.http import Response
from gateway.api.stripe import lists, objects, unconfirmed, wire
from gateway.api.stripe.common import Ctx, intent_of, intents_store, ok, read, settle, translate_error
from gateway.api.stripe.submit import (
    ACCEPTED_AND_IGNORED,
    CANCELLATION_REASONS,
    create_fields,
    submit,
    unexpected,
)
from gateway.domain.payment import AMOUNT_MINOR_MAX
from gateway.store.processing import Refused
from gateway.store.stripe_intents import Draft


async def _intent(ctx: Ctx, ident: str) -> dict[str, Any] | Draft | Response:
    """The native payment of a PaymentIntent id, else its unconfirmed intent, else the 404."""
    pid = objects.payment_id_of(ident, "pi")
    if pid is None:
        return wire.missing("payment_intent", ident)
    b = await read(ctx, pid)
    if b is not None:
        return b
    d = await ctx.app.runtime.run(intents_store(ctx).get, ctx.merchant.id, pid)
    return d if d is not None else wire.missing("payment_intent", ident)


async def create(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    sent = dict(params)
    f = create_fields(params)
    confirm = wire.take_bool(params, "confirm")
    expand = wire.take_expand(params)
    wire.no_more(params)
    if not confirm:
        return await unconfirmed.create(ctx, f, sent)
    if f.get("payment_method") is None:
        raise wire.ParamError("parameter_missing", "Missing required param: payment_method.", "payment_method")
    f["payment_method"] = objects.payment_method_token(f["payment_method"])
    return (await submit(ctx, ctx.scope.headers.get("idempotency-key"), f, expand, created_event=True))[0]


async def retrieve(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    params.pop("client_secret", None)
    expand = wire.take_expand(params)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if isinstance(got, Draft):
        return ok(unconfirmed.intent(got))
    if not isinstance(got, dict):
        return got
    return ok(await intent_of(ctx, got, expand))


async def update(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    got = await _intent(ctx, m["id"])
    if isinstance(got, dict):
        replayed = await unconfirmed.replay(ctx, "update", got["id"], dict(params))
        if replayed is not None:
            return replayed
    if isinstance(got, Draft):
        return await unconfirmed.update(ctx, got, params)
    if not isinstance(got, dict):
        return got
    expand = wire.take_expand(params)
    intent = await intent_of(ctx, got, expand)
    # Only a change to nothing: the engine's payment is immutable once accepted.
    for name in list(params):
        value = params.pop(name)
        current = intent.get(name)
        if not (value == current or (value == "" and not current) or str(current) == value):
            raise wire.ParamError("parameter_unsupported", f"{name} cannot be changed once the PaymentIntent is"
                                  " confirmed.", name)
    return ok(intent)


async def confirm(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    sent = dict(params)
    for name in ("return_url", "use_stripe_sdk", "client_secret", *ACCEPTED_AND_IGNORED):
        params.pop(name, None)
    expand = wire.take_expand(params)
    pm = wire.take_str(params, "payment_method", 255)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if isinstance(got, dict):
        replayed = await unconfirmed.replay(ctx, "confirm", got["id"], sent)
        if replayed is not None:
            return replayed
    if isinstance(got, Draft):
        return await unconfirmed.confirm(ctx, got, pm, expand, sent)
    if not isinstance(got, dict):
        return got
    intent = await intent_of(ctx, got, expand)
    # Confirming again what is waiting for its customer shows the same next action, as Stripe does.
    if intent["status"] == "requires_action" and pm in (None, intent["payment_method"]):
        return ok(intent)
    return unexpected(intent, "confirm")


async def _operate(ctx: Ctx, pid: str, kind: str, req: msgspec.Struct) -> Response | dict[str, Any]:
    key = ctx.scope.headers.get("idempotency-key")
    status, _headers, body = await operations.run_operation(ctx.app, ctx.merchant, pid, kind, req, key, 0)
    if status >= 400:
        return translate_error(status, body)
    b = await settle(ctx, pid)
    if b is None:
        return wire.missing("payment_intent", objects.intent_id(pid))
    return b


async def capture(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    amount = wire.take_int(params, "amount_to_capture", 1, AMOUNT_MINOR_MAX)
    params.pop("final_capture", None)
    expand = wire.take_expand(params)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if isinstance(got, Draft):
        return unexpected(unconfirmed.intent(got), "capture")
    if not isinstance(got, dict):
        return got
    pid, b = got["id"], got
    intent = await intent_of(ctx, b)
    if intent["status"] != "requires_capture":
        return unexpected(intent, "capture")
    if amount is not None and amount > intent["amount_capturable"]:
        return wire.stripe_error(400, "invalid_request_error", "amount_too_large",
                                 f"The amount to capture must be at most {intent['amount_capturable']}.",
                                 "amount_to_capture")
    # Stripe releases what is not captured: one capture, final.
    out = await _operate(ctx, pid, "capture", operations.CaptureRequest(amount=amount, final_capture=True))
    return out if not isinstance(out, dict) else ok(await intent_of(ctx, out, expand))


async def cancel(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    sent = dict(params)
    reason = wire.take_choice(params, "cancellation_reason", CANCELLATION_REASONS) or "requested_by_customer"
    expand = wire.take_expand(params)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if isinstance(got, Draft):
        return await unconfirmed.cancel(ctx, got, reason, sent)
    if not isinstance(got, dict):
        return got
    pid, b = got["id"], got
    native = b.get("status")
    if native == "requires_action":
        rt = ctx.app.runtime
        assert rt.processing is not None
        done = await rt.run(rt.processing.resolve_challenge, ctx.merchant.id, pid, "canceled", "merchant", reason)
        if isinstance(done, Refused):
            return unexpected(await intent_of(ctx, b), "cancel")
        after = await read(ctx, pid, fresh=True) or b
        return ok(await intent_of(ctx, after, expand))
    if native != "authorized":
        return unexpected(await intent_of(ctx, b), "cancel")
    out = await _operate(ctx, pid, "void", operations.VoidRequest(reason=reason))
    return out if not isinstance(out, dict) else ok(await intent_of(ctx, out, expand))



async def list_intents(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    expand = {e.removeprefix("data.") for e in wire.take_expand(params)}
    params.pop("customer", None)
    p = lists.paging(params)
    wire.no_more(params)
    bodies, more = await lists.payments_page(ctx, p, "pi", drafts=True)
    data = [unconfirmed.intent_of_body(b) if unconfirmed.is_unconfirmed(b) else await intent_of(ctx, b, expand)
            for b in bodies]
    return ok(lists.listed("/v1/payment_intents", data, more))


def routes() -> list[tuple[str, str, str, Any]]:
    pi = r"/v1/payment_intents/(?P<id>[A-Za-z0-9_]{1,64})"
    return [
        ("POST", r"/v1/payment_intents", "stripe_create_payment_intent", create),
        ("GET", r"/v1/payment_intents", "stripe_list_payment_intents", list_intents),
        ("GET", pi, "stripe_retrieve_payment_intent", retrieve),
        ("POST", pi, "stripe_update_payment_intent", update),
        ("POST", pi + "/confirm", "stripe_confirm_payment_intent", confirm),
        ("POST", pi + "/capture", "stripe_capture_payment_intent", capture),
        ("POST", pi + "/cancel", "stripe_cancel_payment_intent", cancel),
    ]
