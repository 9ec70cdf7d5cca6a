"""Merchant API of webhooks: endpoints (create, list, delete) and events (read, list per payment).

`POST /v1/webhook_endpoints` `{url, enabled_events?, description?}` answers 201 with the endpoint and
its signing secret (`whsec_...`), shown this once: later reads never include it. Limits, each with a
400 naming the parameter: `url` http(s), at most `ENDPOINT_URL_CHARS_MAX` characters, no credentials
or fragment, and (unless GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS=1) no loopback, private or link-local
address; `enabled_events` 1..`ENABLED_EVENTS_MAX` known types or `*` (the default); at most
`ENDPOINTS_PER_MERCHANT_MAX` endpoints per merchant. Everything is scoped to the merchant of the API
key: another merchant's endpoint or event is 404.

`GET /v1/events/{id}` is the event as delivered plus its `deliveries` (status, attempts, next
attempt, last HTTP status or error); `GET /v1/events?payment=pay_...` lists a payment's events,
oldest first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import msgspec

from gateway.api import guard
from gateway.api.http import JSON, PAYMENT_ID, Api, Response, Route, list_page, route, starting
from gateway.config import ENV_ALLOW_PRIVATE_URLS as ALLOW_PRIVATE_ENV
from gateway.domain import events as ev
from gateway.domain.errors import error_body
from gateway.store.base import Merchant

if TYPE_CHECKING:
    from gateway.runtime.base import Runtime
    from gateway.store.processing import ProcessingStore

EVENTS_LIST_LIMIT_DEFAULT = 10
EVENTS_LIST_LIMIT_MAX = 100

Url = Annotated[str, msgspec.Meta(min_length=1, max_length=ev.ENDPOINT_URL_CHARS_MAX)]
EventName = Annotated[str, msgspec.Meta(max_length=64)]
# No control characters but line breaks and tabs: PostgreSQL refuses a NUL in text.
Description = Annotated[str, msgspec.Meta(max_length=ev.DESCRIPTION_CHARS_MAX, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]


class CreateEndpoint(msgspec.Struct, forbid_unknown_fields=True):
    url: Url
    enabled_events: Annotated[list[EventName], msgspec.Meta(min_length=1, max_length=ev.ENABLED_EVENTS_MAX)] = (
        msgspec.field(default_factory=lambda: [ev.ALL_EVENTS]))
    description: Description | None = None


_AT_PATH = re.compile(r" - at `\$\.(\w+)")


def _invalid(code: str, message: str, param: str | None = None, status: int = 400) -> Response:
    return status, [JSON], error_body(status, code, message, param)


# Endpoint bodies are small: a URL, a few event names and a description.
WEBHOOK_BODY_BYTES_MAX = 4096


class _Ctx(NamedTuple):
    merchant: Merchant
    runtime: Runtime
    store: ProcessingStore


def _merchant_and_state(app: Api, scope: Any) -> _Ctx | Response:
    """The authenticated merchant and the processing store, or the answer that refuses the request
    (401, or 503 while the gateway starts)."""
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    rt = app.runtime
    if not rt.ready or rt.processing is None:
        return starting()
    return _Ctx(auth, rt, rt.processing)


def _decode(body: bytes) -> CreateEndpoint | Response:
    try:
        return msgspec.json.decode(body, type=CreateEndpoint)
    except msgspec.ValidationError as e:
        text = str(e)
        if text.startswith("Object contains unknown field"):
            name = text.split("`")[1][:64]
            return _invalid("parameter_unknown", f"Received unknown parameter: {name}", name)
        if text.startswith("Object missing required field"):
            return _invalid("parameter_missing", "Missing required param: url.", "url")
        at = _AT_PATH.search(text)
        param = at.group(1) if at else None
        if param == "url":
            return _invalid("url_invalid", f"url must be a string of 1 to {ev.ENDPOINT_URL_CHARS_MAX} characters.",
                            "url")
        if param == "enabled_events":
            return _invalid("parameter_invalid", f"enabled_events must be a list of 1 to {ev.ENABLED_EVENTS_MAX}"
                            f" event types among: {', '.join(ev.EVENT_TYPES)}, or \"*\".", "enabled_events")
        if param == "description":
            return _invalid("parameter_too_long" if "length" in text else "parameter_invalid",
                            f"description must be a string of at most {ev.DESCRIPTION_CHARS_MAX} characters,"
                            " without control characters.", "description")
        return _invalid("invalid_json", "The request body must be a JSON object.")
    except msgspec.DecodeError:
        return _invalid("invalid_json", "The request body is not valid JSON.")


def _private_host(host: str) -> bool:
    # A name is resolved, and its addresses checked, at each delivery (processing/webhooks.py).
    return host == "localhost" or host.endswith(".localhost") or ev.private_address(host)


def check_url(url: str, allow_private: bool) -> str | None:
    """Why `url` cannot be a webhook endpoint, or None if it can."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "url must not contain whitespace or control characters."
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "url is not a valid URL."
    if parts.scheme not in ("http", "https"):
        return "url must be an http:// or https:// URL."
    host = parts.hostname
    if not host:
        return "url must name a host."
    if parts.username is not None or parts.password is not None:
        return "url must not contain credentials; authenticate the requests by their signature."
    if parts.fragment:
        return "url must not contain a fragment."
    if port == 0:
        return "url has an invalid port."
    if not allow_private and _private_host(host):
        return f"url must not point to a loopback, private or link-local address (set {ALLOW_PRIVATE_ENV}=1 to allow)."
    return None


def _allow_private(app: Api) -> bool:
    return app.config.webhooks.allow_private_urls


async def create_endpoint(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    got = _merchant_and_state(app, scope)
    if not isinstance(got, _Ctx):
        return got
    auth, rt, ps = got
    raw = await guard.read_json_body(scope, proto, WEBHOOK_BODY_BYTES_MAX)
    if not isinstance(raw, bytes):
        return raw
    req = _decode(raw)
    if not isinstance(req, CreateEndpoint):
        return req
    # A URL is stored and shown: refused when it holds a card number once percent-decoded (`%20`).
    if guard.has_card_number(req.url):
        return guard.card_number_refused()
    reason = check_url(req.url, _allow_private(app))
    if reason is not None:
        return _invalid("url_invalid", reason, "url")
    unknown = [e for e in req.enabled_events if e != ev.ALL_EVENTS and e not in ev.EVENT_TYPES]
    if unknown:
        return _invalid("parameter_invalid", f"Unknown event type {unknown[0]!r}; known: {', '.join(ev.EVENT_TYPES)},"
                        " or \"*\" for all.", "enabled_events")
    enabled = sorted(set(req.enabled_events))
    secret = ev.new_endpoint_secret()
    endpoint = await rt.run(ps.create_endpoint, auth.id, req.url, enabled, req.description, secret.expose())
    if endpoint is None:
        return _invalid("endpoints_limit_reached",
                        f"A merchant may have at most {ev.ENDPOINTS_PER_MERCHANT_MAX} webhook endpoints; delete one"
                        " first.")
    # The one and only time the secret leaves the gateway.
    return 201, [JSON], msgspec.json.encode({**endpoint, "secret": secret.expose()})


async def list_endpoints(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    got = _merchant_and_state(app, scope)
    if not isinstance(got, _Ctx):
        return got
    auth, rt, ps = got
    data = await rt.run(ps.list_endpoints, auth.id)
    return 200, [JSON], msgspec.json.encode(
        {"object": "list", "url": "/v1/webhook_endpoints", "has_more": False, "data": data})


async def delete_endpoint(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    got = _merchant_and_state(app, scope)
    if not isinstance(got, _Ctx):
        return got
    auth, rt, ps = got
    endpoint_id = match["id"]
    if not await rt.run(ps.delete_endpoint, auth.id, endpoint_id):
        return _invalid("resource_missing", f"No such webhook endpoint: '{endpoint_id}'", "id", status=404)
    return 200, [JSON], msgspec.json.encode({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})


async def get_event(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    got = _merchant_and_state(app, scope)
    if not isinstance(got, _Ctx):
        return got
    auth, rt, ps = got
    found = await rt.run(ps.event, auth.id, match["id"])
    if found is None:
        return _invalid("resource_missing", f"No such event: '{match['id']}'", "id", status=404)
    body, deliveries = found
    # The stored event JSON is an object: the deliveries are appended to it without re-encoding it.
    return 200, [JSON], body[:-1] + b',"deliveries":' + msgspec.json.encode(deliveries) + b"}"


async def list_events(app: Api, scope: Any, proto: Any, match: re.Match[str]) -> Response:
    auth = app.authenticate(scope)
    if not isinstance(auth, Merchant):
        return auth
    payment_id: str | None = None
    limit = EVENTS_LIST_LIMIT_DEFAULT
    for name, value in parse_qsl(scope.query_string or "", keep_blank_values=True):
        if name == "payment":
            if not PAYMENT_ID.match(value):
                return _invalid("parameter_invalid_type", "payment must be a payment id (pay_...).", "payment")
            payment_id = value
        elif name == "limit":
            parsed = guard.strict_int(value, 1, EVENTS_LIST_LIMIT_MAX)
            if parsed is None:
                return _invalid("parameter_invalid_integer",
                                f"limit must be an integer in 1..{EVENTS_LIST_LIMIT_MAX}.", "limit")
            limit = parsed
        else:
            return _invalid("parameter_unknown", f"Received unknown parameter: {name[:64]}", name[:64])
    if payment_id is None:
        return _invalid("parameter_missing", "Missing required param: payment.", "payment")
    rt = app.runtime
    ps = rt.processing
    if not rt.ready or ps is None:
        return starting()
    rows = await rt.run(ps.payment_events, auth.id, payment_id, limit)
    return list_page("/v1/events", rows, len(rows) >= limit)


def routes() -> list[Route]:
    """This module's endpoints, for the app's route table."""
    return [
        route("POST", r"/v1/webhook_endpoints", "create_webhook_endpoint", create_endpoint),
        route("GET", r"/v1/webhook_endpoints", "list_webhook_endpoints", list_endpoints),
        route("DELETE", r"/v1/webhook_endpoints/(?P<id>[A-Za-z0-9_]{1,64})", "delete_webhook_endpoint", delete_endpoint),
        route("GET", r"/v1/events/(?P<id>[A-Za-z0-9_]{1,64})", "get_event", get_event),
        route("GET", r"/v1/events", "list_events", list_events),
    ]
