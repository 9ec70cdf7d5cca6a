"""Charges (read-only views of a payment's authorization) and Refunds (the native refund operation).

A refund is created with `payment_intent` or `charge`, an optional `amount` (default: what is left)
and `reason`; it is the native `POST /v1/payments/{id}/refunds` (same idempotency, same worker), and
the answer waits for the PSP's outcome like Stripe's. `GET /v1/refunds/{re_...}` finds the refund's
payment through its operation row.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.api import operations
from gateway.api.http import Response
from gateway.api.stripe import lists, objects, wire
from gateway.api.stripe.common import Ctx, ok, read, settle, translate_error
from gateway.domain.payment import AMOUNT_MINOR_MAX

REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")


async def _charged_payment(ctx: Ctx, ident: str) -> dict[str, Any] | Response:
    pid = objects.payment_id_of(ident, "ch")
    b = await read(ctx, pid) if pid is not None else None
    if b is None or objects.payment_intent(b)["latest_charge"] is None:
        return wire.missing("charge", ident)
    return b


async def retrieve_charge(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    wire.take_expand(params)
    wire.no_more(params)
    b = await _charged_payment(ctx, m["id"])
    return b if not isinstance(b, dict) else ok(objects.charge(b))


async def list_charges(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    wire.take_expand(params)
    pi = wire.take_str(params, "payment_intent", 64)
    if pi is not None:
        wire.no_more(params)
        pid = objects.payment_id_of(pi, "pi")
        b = await read(ctx, pid) if pid is not None else None
        data = [objects.charge(b)] if b is not None and objects.payment_intent(b)["latest_charge"] else []
        return ok({"object": "list", "url": "/v1/charges", "has_more": False, "data": data})
    p = lists.paging(params)
    wire.no_more(params)
    bodies, more = await lists.payments_page(ctx, p, "ch", drafts=False)
    data = [objects.charge(b) for b in bodies if objects.payment_intent(b)["latest_charge"]]
    return ok(lists.listed("/v1/charges", data, more))


async def _refund_target(ctx: Ctx, params: wire.Params) -> str:
    pi = wire.take_str(params, "payment_intent", 64)
    ch = wire.take_str(params, "charge", 64)
    if (pi is None) == (ch is None):
        raise wire.ParamError("parameter_missing", "Provide one of payment_intent or charge.",
                              "payment_intent" if pi is None else "charge")
    pid = objects.payment_id_of(pi, "pi") if pi is not None else objects.payment_id_of(ch or "", "ch")
    if pid is None or await read(ctx, pid) is None:
        kind, ident = ("payment_intent", pi) if pi is not None else ("charge", ch)
        raise wire.ParamError("resource_missing", f"No such {kind}: '{(ident or '')[:64]}'", kind)
    return pid


async def create_refund(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    pid = await _refund_target(ctx, params)
    amount = wire.take_int(params, "amount", 1, AMOUNT_MINOR_MAX)
    reason = wire.take_choice(params, "reason", REFUND_REASONS)
    wire.take_metadata(params)
    wire.take_expand(params)
    params.pop("instructions_email", None)
    wire.no_more(params)
    key = ctx.scope.headers.get("idempotency-key")
    req = operations.RefundRequest(amount=amount, reason=reason)
    status, headers, body = await operations.run_operation(ctx.app, ctx.merchant, pid, "refund", req, key, 0)
    if status >= 400:
        return translate_error(status, body)
    b = await settle(ctx, pid)
    refunds = objects.refunds(b) if b is not None else []
    if not refunds:
        return wire.stripe_error(500, "api_error", None, "The refund was accepted but cannot be read back yet.")
    # One operation at a time per payment: the newest refund is this request's.
    replayed = ("idempotent-replayed", "true")
    return ok(refunds[0], headers=(replayed,) if replayed in headers else ())


async def _refund(ctx: Ctx, refund_id: str) -> dict[str, Any] | None:
    rt = ctx.app.runtime
    assert rt.processing is not None
    op = await rt.run(rt.processing.operation, refund_id)
    if op is None or op.kind != "refund" or op.merchant_id != ctx.merchant.id:
        return None
    b = await read(ctx, op.payment_id)
    return next((r for r in objects.refunds(b) if r["id"] == refund_id), None) if b is not None else None


async def retrieve_refund(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    wire.take_expand(params)
    wire.no_more(params)
    r = await _refund(ctx, m["id"])
    return ok(r) if r is not None else wire.missing("refund", m["id"])


async def list_refunds(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    wire.take_expand(params)
    pi = wire.take_str(params, "payment_intent", 64)
    ch = wire.take_str(params, "charge", 64)
    if pi is not None or ch is not None:
        p = lists.paging(params)
        wire.no_more(params)
        pid = objects.payment_id_of(pi, "pi") if pi is not None else objects.payment_id_of(ch or "", "ch")
        b = await read(ctx, pid) if pid is not None else None
        data, more = lists.slice_ids(p, objects.refunds(b) if b is not None else [])
        return ok(lists.listed("/v1/refunds", data, more))
    # Without a filter: the refunds of a page of the newest payments (the cursor is a payment's).
    p = lists.paging(params)
    wire.no_more(params)
    bodies, more = await lists.payments_page(ctx, p, "pi", drafts=False)
    data = [r for b in bodies for r in objects.refunds(b)]
    return ok(lists.listed("/v1/refunds", data, more))


def routes() -> list[tuple[str, str, str, Any]]:
    return [
        ("GET", r"/v1/charges", "stripe_list_charges", list_charges),
        ("GET", r"/v1/charges/(?P<id>[A-Za-z0-9_]{1,64})", "stripe_retrieve_charge", retrieve_charge),
        ("POST", r"/v1/refunds", "stripe_create_refund", create_refund),
        ("GET", r"/v1/refunds", "stripe_list_refunds", list_refunds),
        ("GET", r"/v1/refunds/(?P<id>[A-Za-z0-9_]{1,64})", "stripe_retrieve_refund", retrieve_refund),
    ]
