"""PaymentIntents on the one engine: create-and-confirm is the fast path's create, capture and cancel
are the native operations, retrieve and list are the native reads (docs/stripe-compatibility.md).

A PaymentIntent is confirmed when it is created (`confirm=true`): the engine has no stored state before
a payment exists, so an unconfirmed intent (and its `update`) is refused with a 400 that says so.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.api import operations
from gateway.api.http import Response
from gateway.api.stripe import objects, wire
from gateway.api.stripe.common import Ctx, intent_of, ok, read, settle, translate_error
from gateway.domain.payment import AMOUNT_MINOR_MAX
from gateway.store.processing import Refused

CURRENCY = re.compile(r"^[A-Za-z]{3}$")
LIST_LIMIT_MAX = 100
# A `created` filter is applied over at most this many of the newest payments per page.
CREATED_SCAN_MAX = 1000
CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
CAPTURE_METHODS = ("automatic", "automatic_async", "manual")
# Parameters Stripe defines that change nothing here (card is the only payment method type).
ACCEPTED_AND_IGNORED = ("automatic_payment_methods", "return_url", "use_stripe_sdk", "statement_descriptor",
                        "statement_descriptor_suffix", "setup_future_usage", "off_session", "mandate_data",
                        "payment_method_options", "confirmation_method")


def _unexpected(intent: dict[str, Any], action: str) -> Response:
    return wire.stripe_error(400, "invalid_request_error", "payment_intent_unexpected_state",
                             f"You cannot {action} this PaymentIntent because it has a status of {intent['status']}.",
                             payment_intent=intent)


async def _intent(ctx: Ctx, ident: str) -> dict[str, Any] | Response:
    """The native payment of a PaymentIntent id, or the 404."""
    pid = objects.payment_id_of(ident, "pi")
    b = await read(ctx, pid) if pid is not None else None
    if pid is None or b is None:
        return wire.missing("payment_intent", ident)
    return b


async def create(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    amount = wire.take_int(params, "amount", 1, AMOUNT_MINOR_MAX, required=True)
    currency = wire.take_str(params, "currency", 16, required=True)
    if currency is None or not CURRENCY.match(currency):
        raise wire.ParamError("parameter_invalid", "Invalid currency: must be a three-letter ISO code.", "currency")
    pm = wire.take_str(params, "payment_method", 255)
    confirm = wire.take_bool(params, "confirm")
    capture_method = wire.take_choice(params, "capture_method", CAPTURE_METHODS)
    description = wire.take_str(params, "description", 1000)
    metadata = wire.take_metadata(params)
    customer = wire.take_str(params, "customer", 255)
    email = wire.take_str(params, "receipt_email", 320)
    types = wire.take_list(params, "payment_method_types")
    if any(t != "card" for t in types):
        raise wire.ParamError("payment_method_type_unsupported", "Only the payment method type card is supported.",
                              "payment_method_types")
    for name in ACCEPTED_AND_IGNORED:
        params.pop(name, None)
    expand = wire.take_expand(params)
    wire.no_more(params)
    if not confirm:
        raise wire.ParamError("parameter_missing", "This gateway confirms a PaymentIntent when it is created: pass"
                              " confirm=true with a payment_method (docs/stripe-compatibility.md).", "confirm")
    if pm is None:
        raise wire.ParamError("parameter_missing", "Missing required param: payment_method.", "payment_method")
    native: dict[str, Any] = {"amount": amount, "currency": currency.upper(),
                              "payment_method": objects.payment_method_token(pm),
                              "capture": capture_method != "manual"}
    if description is not None:
        native["description"] = description
    if metadata:
        native["metadata"] = metadata
    if customer is not None or email is not None:
        native["customer"] = {k: v for k, v in (("id", customer), ("email", email)) if v is not None}
    key = ctx.scope.headers.get("idempotency-key")
    a = await ctx.app.runtime.create(ctx.merchant, key, msgspec.json.encode(native))
    replayed = (("idempotent-replayed", "true"),) if a.replayed else ()
    if a.status != 201:
        status, headers, body = translate_error(a.status, a.body)
        if a.retry_after_s is not None:
            headers.append(("retry-after", str(a.retry_after_s)))
        return status, [*headers, *replayed], body
    first = msgspec.json.decode(a.body)
    b = await settle(ctx, first["id"]) or first
    intent = await intent_of(ctx, b, expand)
    if b.get("status") == "failed":
        # The PSP declined while the call waited: Stripe's answer to a declined confirmation.
        err = intent["last_payment_error"]
        return wire.stripe_error(402, "card_error", err["code"], err["message"], None,
                                 decline_code=err.get("decline_code"), charge=intent["latest_charge"],
                                 payment_intent=intent)
    return ok(intent, headers=replayed)


async def retrieve(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    params.pop("client_secret", None)
    expand = wire.take_expand(params)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if not isinstance(got, dict):
        return got
    return ok(await intent_of(ctx, got, expand))


async def update(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    got = await _intent(ctx, m["id"])
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
                                  " confirmed, which here is when it is created.", name)
    return ok(intent)


async def confirm(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    for name in ("return_url", "use_stripe_sdk", "client_secret", *ACCEPTED_AND_IGNORED):
        params.pop(name, None)
    expand = wire.take_expand(params)
    pm = wire.take_str(params, "payment_method", 255)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if not isinstance(got, dict):
        return got
    intent = await intent_of(ctx, got, expand)
    # Confirming again what is waiting for its customer shows the same next action, as Stripe does.
    if intent["status"] == "requires_action" and pm in (None, intent["payment_method"]):
        return ok(intent)
    return _unexpected(intent, "confirm")


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
    if not isinstance(got, dict):
        return got
    pid, b = got["id"], got
    intent = await intent_of(ctx, b)
    if intent["status"] != "requires_capture":
        return _unexpected(intent, "capture")
    if amount is not None and amount > intent["amount_capturable"]:
        return wire.stripe_error(400, "invalid_request_error", "amount_too_large",
                                 f"The amount to capture must be at most {intent['amount_capturable']}.",
                                 "amount_to_capture")
    # Stripe releases what is not captured: one capture, final.
    out = await _operate(ctx, pid, "capture", operations.CaptureRequest(amount=amount, final_capture=True))
    return out if not isinstance(out, dict) else ok(await intent_of(ctx, out, expand))


async def cancel(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    reason = wire.take_choice(params, "cancellation_reason", CANCELLATION_REASONS) or "requested_by_customer"
    expand = wire.take_expand(params)
    wire.no_more(params)
    got = await _intent(ctx, m["id"])
    if not isinstance(got, dict):
        return got
    pid, b = got["id"], got
    native = b.get("status")
    if native == "requires_action":
        rt = ctx.app.runtime
        assert rt.processing is not None
        done = await rt.run(rt.processing.resolve_challenge, ctx.merchant.id, pid, "canceled", "merchant", reason)
        if isinstance(done, Refused):
            return _unexpected(await intent_of(ctx, b), "cancel")
        after = await read(ctx, pid, fresh=True) or b
        return ok(await intent_of(ctx, after, expand))
    if native != "authorized":
        return _unexpected(await intent_of(ctx, b), "cancel")
    out = await _operate(ctx, pid, "void", operations.VoidRequest(reason=reason))
    return out if not isinstance(out, dict) else ok(await intent_of(ctx, out, expand))


def _created_filter(params: wire.Params) -> tuple[int, int] | None:
    value = params.pop("created", None)
    if value is None or value == "":
        return None
    lo, hi = 0, 2**63
    if isinstance(value, str):
        exact = wire.take_int({"created": value}, "created", 0, 2**62, required=True)
        assert exact is not None
        return exact, exact
    if not isinstance(value, dict):
        raise wire.ParamError("parameter_invalid", "Invalid created: an integer or a hash of gt, gte, lt, lte.",
                              "created")
    for op, raw in value.items():
        n = wire.take_int({op: raw}, op, 0, 2**62, required=True)
        assert n is not None
        if op == "gt":
            lo = max(lo, n + 1)
        elif op == "gte":
            lo = max(lo, n)
        elif op == "lt":
            hi = min(hi, n - 1)
        elif op == "lte":
            hi = min(hi, n)
        else:
            raise wire.ParamError("parameter_unknown", f"Received unknown parameter: created[{op[:16]}]",
                                  f"created[{op[:16]}]")
    return lo, hi


async def page(ctx: Ctx, params: wire.Params, prefix: str) -> tuple[list[dict[str, Any]], bool]:
    """A page of the merchant's payments, newest first (`limit`, `starting_after`, `created`), as the
    native bodies; shared by the lists of PaymentIntents and Charges."""
    limit = wire.take_int(params, "limit", 1, LIST_LIMIT_MAX) or 10
    after = wire.take_str(params, "starting_after", 64)
    if wire.take_str(params, "ending_before", 64) is not None:
        raise wire.ParamError("parameter_unsupported", "ending_before is not supported: page forwards with"
                              " starting_after (docs/stripe-compatibility.md).", "ending_before")
    created = _created_filter(params)
    after_pid = objects.payment_id_of(after, prefix) if after is not None else None
    if after is not None and after_pid is None:
        raise wire.ParamError("resource_missing", f"No such object: '{after}'", "starting_after")
    rt = ctx.app.runtime
    ps = rt.processing
    assert ps is not None
    if created is None:
        got = await rt.run(ps.list_payments, ctx.merchant.id, limit, after_pid)
        if got is None:
            raise wire.ParamError("resource_missing", f"No such object: '{after}'", "starting_after")
        return [msgspec.json.decode(raw) for raw in got[0]], got[1]
    # Newest first: past the first payment older than the range nothing more can match.
    lo, hi = created
    out: list[dict[str, Any]] = []
    scanned = 0
    while scanned < CREATED_SCAN_MAX:
        got = await rt.run(ps.list_payments, ctx.merchant.id, LIST_LIMIT_MAX, after_pid)
        if got is None:
            raise wire.ParamError("resource_missing", f"No such object: '{after}'", "starting_after")
        bodies, more = got
        for raw in bodies:
            b = msgspec.json.decode(raw)
            scanned += 1
            if b.get("created", 0) < lo:
                return out, False
            if b.get("created", 0) <= hi:
                if len(out) == limit:
                    return out, True
                out.append(b)
        if not more or not bodies:
            return out, False
        after_pid = msgspec.json.decode(bodies[-1])["id"]
    return out, True


async def list_intents(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    expand = {e.removeprefix("data.") for e in wire.take_expand(params)}
    params.pop("customer", None)
    bodies, more = await page(ctx, params, "pi")
    wire.no_more(params)
    data = [await intent_of(ctx, b, expand) for b in bodies]
    return ok({"object": "list", "url": "/v1/payment_intents", "has_more": more, "data": data})


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
