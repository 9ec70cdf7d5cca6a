"""What creating and confirming a PaymentIntent share: its fields, checked as Stripe checks them, and
its submission through the one fast path (`runtime.create`: validation, idempotency, rate limit, risk,
WAL), whose answer becomes Stripe's answer to a confirmation (docs/stripe-compatibility.md).

A create with `confirm=true` submits at once; an intent created without it (api/stripe/unconfirmed.py)
is submitted by its confirmation, under the Idempotency-Key its id was derived from, so the payment
keeps the intent's `pi_` id.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.api.http import Response
from gateway.api.stripe import objects, wire
from gateway.api.stripe.common import Ctx, intent_of, intents_store, ok, settle, translate_error
from gateway.domain.payment import AMOUNT_MINOR_MAX

CURRENCY = re.compile(r"^[A-Za-z]{3}$")
CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
CAPTURE_METHODS = ("automatic", "automatic_async", "manual")
# Parameters Stripe defines that change nothing here (card is the only payment method type).
ACCEPTED_AND_IGNORED = ("automatic_payment_methods", "return_url", "use_stripe_sdk", "statement_descriptor",
                        "statement_descriptor_suffix", "setup_future_usage", "off_session", "mandate_data",
                        "payment_method_options", "confirmation_method")


def unexpected(intent: dict[str, Any], action: str) -> Response:
    return wire.stripe_error(400, "invalid_request_error", "payment_intent_unexpected_state",
                             f"You cannot {action} this PaymentIntent because it has a status of {intent['status']}.",
                             payment_intent=intent)


def take_fields(params: wire.Params, creating: bool) -> dict[str, Any]:
    """The intent's fields a create or an update sets (only those given), checked as Stripe checks them."""
    out: dict[str, Any] = {}
    amount = wire.take_int(params, "amount", 1, AMOUNT_MINOR_MAX, required=creating)
    currency = wire.take_str(params, "currency", 16, required=creating)
    if currency is not None and not CURRENCY.match(currency):
        raise wire.ParamError("parameter_invalid", "Invalid currency: must be a three-letter ISO code.", "currency")
    has_pm = "payment_method" in params
    pm = wire.take_str(params, "payment_method", 255)
    for name, value in (("amount", amount), ("currency", currency and currency.upper()),
                        ("capture_method", wire.take_choice(params, "capture_method", CAPTURE_METHODS)),
                        ("description", wire.take_str(params, "description", 1000)),
                        ("metadata", wire.take_metadata(params)), ("customer", wire.take_str(params, "customer", 255)),
                        ("receipt_email", wire.take_str(params, "receipt_email", 320))):
        if value is not None:
            out[name] = value
    if has_pm:
        out["payment_method"] = pm  # None: unset (an update with payment_method="")
    types = wire.take_list(params, "payment_method_types")
    if any(t != "card" for t in types):
        raise wire.ParamError("payment_method_type_unsupported", "Only the payment method type card is supported.",
                              "payment_method_types")
    for name in ACCEPTED_AND_IGNORED:
        params.pop(name, None)
    return out


def create_fields(params: wire.Params) -> dict[str, Any]:
    return take_fields(params, creating=True)


def native_body(f: dict[str, Any]) -> bytes:
    """The fast path's create body of an intent's fields (`payment_method` the token already)."""
    native: dict[str, Any] = {"amount": f["amount"], "currency": f["currency"], "payment_method": f["payment_method"],
                              "capture": f.get("capture_method") != "manual"}
    if f.get("description") is not None:
        native["description"] = f["description"]
    if f.get("metadata"):
        native["metadata"] = f["metadata"]
    if f.get("customer") is not None or f.get("receipt_email") is not None:
        native["customer"] = {k: v for k, v in (("id", f.get("customer")), ("email", f.get("receipt_email")))
                              if v is not None}
    return msgspec.json.encode(native)


async def submit(ctx: Ctx, key: str | None, f: dict[str, Any], expand: set[str],
                 created_event: bool) -> tuple[Response, int]:
    """The intent through the one fast path (`runtime.create`: validation, idempotency, risk, WAL), then
    its outcome as Stripe answers a confirmation; with the fast path's status code."""
    a = await ctx.app.runtime.create(ctx.merchant, key, native_body(f))
    replayed = (("idempotent-replayed", "true"),) if a.replayed else ()
    store = intents_store(ctx)
    rt = ctx.app.runtime
    if a.status != 201:
        status, headers, body = translate_error(a.status, a.body)
        if a.retry_after_s is not None:
            headers.append(("retry-after", str(a.retry_after_s)))
        if a.status == 402 and created_event:
            # A risk block is a stored (declined) payment: it was created, as Stripe's would be.
            pid = objects.payment_id_of(msgspec.json.decode(body)["error"].get("payment_intent", {}).get("id", ""), "pi")
            if pid is not None:
                declined = await ctx.app.runtime.read_payment(ctx.merchant.id, pid)
                if declined is not None:
                    await rt.run(store.emit, ctx.merchant.id, pid, "payment.created", declined)
        return (status, [*headers, *replayed], body), a.status
    first = msgspec.json.decode(a.body)
    if created_event:
        await rt.run(store.emit, ctx.merchant.id, first["id"], "payment.created", a.body)
    if first.get("status") == "requires_action":
        await rt.run(store.emit, ctx.merchant.id, first["id"], "payment.requires_action", a.body)
    b = await settle(ctx, first["id"]) or first
    intent = await intent_of(ctx, b, expand)
    if b.get("status") == "failed":
        # The PSP declined while the call waited: Stripe's answer to a declined confirmation.
        err = intent["last_payment_error"]
        return wire.stripe_error(402, "card_error", err["code"], err["message"], None,
                                 decline_code=err.get("decline_code"), charge=intent["latest_charge"],
                                 payment_intent=intent), a.status
    return ok(intent, headers=replayed), a.status
