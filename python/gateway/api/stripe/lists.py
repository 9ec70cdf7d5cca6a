"""Stripe's list parameters, shared by every list of the surface: `limit` (1..100), `starting_after` and
`ending_before` (an object id of the list: the page after it, or the page before it, both newest first,
as Stripe pages), and `created` (an exact second or `gt`/`gte`/`lt`/`lte`).

PaymentIntents, Charges and Refunds page over the merchant's payments (with the unconfirmed intents
for PaymentIntents), Events over the merchant's stored events, both newest first by (created, id)
(store/stripe_intents.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.api.stripe import objects, wire
from gateway.api.stripe.common import Ctx, intents_store

LIST_LIMIT_MAX = 100
CREATED_MAX = 2**62


class Paging(NamedTuple):
    limit: int
    starting_after: str | None
    ending_before: str | None
    lo: int
    hi: int


def created_filter(params: wire.Params) -> tuple[int, int] | None:
    value = params.pop("created", None)
    if value is None or value == "":
        return None
    lo, hi = 0, CREATED_MAX
    if isinstance(value, str):
        exact = wire.take_int({"created": value}, "created", 0, CREATED_MAX, required=True)
        assert exact is not None
        return exact, exact
    if not isinstance(value, dict):
        raise wire.ParamError("parameter_invalid", "Invalid created: an integer or a hash of gt, gte, lt, lte.",
                              "created")
    for op, raw in value.items():
        n = wire.take_int({op: raw}, op, 0, CREATED_MAX, required=True)
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


def paging(params: wire.Params) -> Paging:
    limit = wire.take_int(params, "limit", 1, LIST_LIMIT_MAX) or 10
    after = wire.take_str(params, "starting_after", 64)
    before = wire.take_str(params, "ending_before", 64)
    if after is not None and before is not None:
        raise wire.ParamError("parameter_invalid", "Pass starting_after or ending_before, not both.", "ending_before")
    lo, hi = created_filter(params) or (0, CREATED_MAX)
    return Paging(limit, after, before, lo, hi)


def cursor_param(p: Paging) -> tuple[str, str] | tuple[None, None]:
    if p.starting_after is not None:
        return "starting_after", p.starting_after
    if p.ending_before is not None:
        return "ending_before", p.ending_before
    return None, None


async def payments_page(ctx: Ctx, p: Paging, prefix: str, drafts: bool) -> tuple[list[dict[str, Any]], bool]:
    """A page of the merchant's payments (native bodies; with `drafts` its unconfirmed intents too),
    newest first; `prefix` is the kind of id the cursor names (`pi`, `ch`)."""
    name, ident = cursor_param(p)
    store = intents_store(ctx)
    rt = ctx.app.runtime
    cursor = None
    if ident is not None:
        pid = objects.payment_id_of(ident, prefix)
        cursor = await rt.run(store.position, ctx.merchant.id, pid) if pid is not None else None
        if cursor is None:
            raise wire.ParamError("resource_missing", f"No such object: '{ident}'", name)
    return await rt.run(store.page, ctx.merchant.id, p.limit, cursor, p.ending_before is not None, p.lo, p.hi, drafts)


def listed(url: str, data: list[Any], more: bool) -> dict[str, Any]:
    return {"object": "list", "url": url, "has_more": more, "data": data}


def slice_ids(p: Paging, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """A page of a short list held whole (newest first), by the ids of its items."""
    ids = [x["id"] for x in items]
    if p.starting_after is not None:
        rest = items[ids.index(p.starting_after) + 1:] if p.starting_after in ids else []
        return rest[:p.limit], len(rest) > p.limit
    if p.ending_before is not None:
        head = items[:ids.index(p.ending_before)] if p.ending_before in ids else []
        return head[-p.limit:], len(head) > p.limit
    return items[:p.limit], len(items) > p.limit
