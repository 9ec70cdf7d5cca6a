"""WebhookEndpoints and Events with Stripe's names, on the native endpoints and events.

A Stripe endpoint is a native endpoint subscribed to the native types its Stripe types stand for
(`objects.EVENT_TYPES`), plus marker entries (`@stripe`, `@stripe:<type>`) that keep the Stripe types
it was created with and tell the dispatcher to deliver Stripe-shaped events to it. Deliveries carry
`Stripe-Signature` (the same `t=...,v1=...` scheme as `Gateway-Signature`), which the SDKs'
`Webhook.construct_event` verifies. `GET /v1/events` pages over every stored event of the merchant
(store/stripe_intents.py), newest first, with `type`/`types[]` and `created` filters.

On `/v1/webhook_endpoints` and `/v1/events`, paths the native API serves too, a request that is not
Stripe's (`wire.stripe_request`) goes to the native handler.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.api import webhooks as native
from gateway.api.http import Api, Response
from gateway.api.stripe import lists, objects, wire
from gateway.api.stripe.common import Ctx, handle, intents_store, ok
from gateway.domain import events as ev

STRIPE_MARK = objects.STRIPE_MARK


def _stripe_types(enabled: list[str]) -> list[str]:
    marked = [e.removeprefix(STRIPE_MARK + ":") for e in enabled if e.startswith(STRIPE_MARK + ":")]
    if marked:
        return marked
    if ev.ALL_EVENTS in enabled:
        return ["*"]
    return sorted({objects.EVENT_TYPES[e] for e in enabled if e in objects.EVENT_TYPES})


def _endpoint(d: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    out = {"id": d["id"], "object": "webhook_endpoint", "api_version": None, "application": None,
           "created": d.get("created"), "description": d.get("description"),
           "enabled_events": _stripe_types(d.get("enabled_events") or []), "livemode": False, "metadata": {},
           "status": "enabled", "url": d["url"]}
    if secret is not None:
        out["secret"] = secret
    return out


async def create_endpoint(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    url = wire.take_str(params, "url", ev.ENDPOINT_URL_CHARS_MAX, required=True)
    types = wire.take_list(params, "enabled_events")
    description = wire.take_str(params, "description", ev.DESCRIPTION_CHARS_MAX)
    for name in ("api_version", "metadata", "connect"):
        params.pop(name, None)
    wire.no_more(params)
    if not types:
        raise wire.ParamError("parameter_missing", "Missing required param: enabled_events.", "enabled_events")
    unknown = [t for t in types if t != "*" and t not in objects.STRIPE_EVENT_TYPES]
    if unknown:
        raise wire.ParamError("parameter_invalid", f"Invalid enabled_events: {unknown[0][:64]} is not supported;"
                              f" supported: {', '.join(objects.STRIPE_EVENT_TYPES)}, or \"*\".", "enabled_events")
    assert url is not None
    if wire.guard.has_card_number(url):
        return wire.guard.card_number_refused()
    reason = native.check_url(url, ctx.app.config.webhooks.allow_private_urls)
    if reason is not None:
        raise wire.ParamError("url_invalid", reason, "url")
    stored = [*objects.native_event_types(types), STRIPE_MARK, *(f"{STRIPE_MARK}:{t}" for t in dict.fromkeys(types))]
    rt = ctx.app.runtime
    assert rt.processing is not None
    secret = ev.new_endpoint_secret()
    d = await rt.run(rt.processing.create_endpoint, ctx.merchant.id, url, stored, description, secret.expose())
    if d is None:
        return wire.invalid(f"A merchant may have at most {ev.ENDPOINTS_PER_MERCHANT_MAX} webhook endpoints.",
                            code="endpoints_limit_reached")
    return ok(_endpoint(d, secret.expose()))


async def _endpoints(ctx: Ctx) -> list[dict[str, Any]]:
    rt = ctx.app.runtime
    assert rt.processing is not None
    return list(await rt.run(rt.processing.list_endpoints, ctx.merchant.id))


async def list_endpoints(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    p = lists.paging(params)
    wire.no_more(params)
    data, more = lists.slice_ids(p, [_endpoint(d) for d in reversed(await _endpoints(ctx))])
    return ok(lists.listed("/v1/webhook_endpoints", data, more))


async def retrieve_endpoint(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    wire.no_more(params)
    found = next((d for d in await _endpoints(ctx) if d["id"] == m["id"]), None)
    return ok(_endpoint(found)) if found is not None else wire.missing("webhook_endpoint", m["id"])


async def update_endpoint(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    found = next((d for d in await _endpoints(ctx) if d["id"] == m["id"]), None)
    if found is None:
        return wire.missing("webhook_endpoint", m["id"])
    current = _endpoint(found)
    for name in list(params):
        value = params.pop(name)
        if value != current.get(name) and not (name == "disabled" and value == "false"):
            raise wire.ParamError("parameter_unsupported", f"{name} cannot be changed: delete the endpoint and create"
                                  " another (docs/stripe-compatibility.md).", name)
    return ok(current)


async def delete_endpoint(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    wire.no_more(params)
    rt = ctx.app.runtime
    assert rt.processing is not None
    if not await rt.run(rt.processing.delete_endpoint, ctx.merchant.id, m["id"]):
        return wire.missing("webhook_endpoint", m["id"])
    return ok({"id": m["id"], "object": "webhook_endpoint", "deleted": True})


async def retrieve_event(ctx: Ctx, params: wire.Params, m: re.Match[str]) -> Response:
    wire.no_more(params)
    rt = ctx.app.runtime
    assert rt.processing is not None
    found = await rt.run(rt.processing.event, ctx.merchant.id, m["id"])
    if found is None:
        return wire.missing("event", m["id"])
    return ok(objects.event(msgspec.json.decode(found[0])))


def _stored_types(kind: str | None, kinds: list[str]) -> list[str] | None:
    """The stored (native) event types a `type` / `types[]` filter stands for; None: every type."""
    if kind is None and not kinds:
        return None
    known = list(objects.EVENT_TYPES.items())

    def matches(stripe_type: str) -> bool:
        if kind is not None and not (stripe_type == kind or (kind.endswith(".*") and stripe_type.startswith(kind[:-1]))):
            return False
        return not kinds or stripe_type in kinds

    return sorted({native_type for native_type, stripe_type in known if matches(stripe_type)})


async def list_events(ctx: Ctx, params: wire.Params, _m: Any) -> Response:
    kind = wire.take_str(params, "type", 64)
    kinds = wire.take_list(params, "types")
    p = lists.paging(params)
    wire.no_more(params)
    store = intents_store(ctx)
    rt = ctx.app.runtime
    name, ident = lists.cursor_param(p)
    cursor = None
    if ident is not None:
        cursor = await rt.run(store.event_position, ctx.merchant.id, ident)
        if cursor is None:
            raise wire.ParamError("resource_missing", f"No such event: '{ident}'", name)
    hi_ms = min(p.hi, lists.CREATED_MAX // 1000) * 1000 + 999
    bodies, more = await rt.run(store.events, ctx.merchant.id, p.limit, _stored_types(kind, kinds), cursor,
                                p.ending_before is not None, p.lo * 1000, hi_ms)
    data = [objects.event(msgspec.json.decode(b)) for b in bodies]
    return ok(lists.listed("/v1/events", data, more))


def _either(stripe_fn: Any, native_fn: Any) -> Any:
    """A handler for a path both surfaces serve: Stripe's requests to `stripe_fn`, others to the native."""

    async def handler(app: Api, scope: Any, proto: Any, m: re.Match[str]) -> Response:
        if wire.stripe_request(scope):
            return await handle(app, scope, proto, m, stripe_fn)
        return await native_fn(app, scope, proto, m)  # type: ignore[no-any-return]

    return handler


def routes() -> list[tuple[str, str, str, Any, bool]]:
    """(method, path, name, handler, shared): `shared` paths are the native API's too (and keep its route
    names, which label the HTTP metrics)."""
    we = r"/v1/webhook_endpoints/(?P<id>[A-Za-z0-9_]{1,64})"
    ev_id = r"/v1/events/(?P<id>[A-Za-z0-9_]{1,64})"
    return [
        ("POST", r"/v1/webhook_endpoints", "create_webhook_endpoint",
         _either(create_endpoint, native.create_endpoint), True),
        ("GET", r"/v1/webhook_endpoints", "list_webhook_endpoints",
         _either(list_endpoints, native.list_endpoints), True),
        ("GET", we, "stripe_retrieve_webhook_endpoint", retrieve_endpoint, False),
        ("POST", we, "stripe_update_webhook_endpoint", update_endpoint, False),
        ("DELETE", we, "delete_webhook_endpoint", _either(delete_endpoint, native.delete_endpoint), True),
        ("GET", ev_id, "get_event", _either(retrieve_event, native.get_event), True),
        ("GET", r"/v1/events", "list_events", _either(list_events, native.list_events), True),
    ]
