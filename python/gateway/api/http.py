"""Shared HTTP plumbing of the API: the route type, the response triple, error responses, body reads.

A handler is `async (app, scope, proto, match) -> Response`, where `app` is the `Api` (the
authenticated entry to the runtime) and `match` the match of its path pattern. Each handler module
exposes `routes()`: the app's route table is those lists, put together once when the app is built
(api/app.py); nothing registers itself at import time.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from gateway.domain.errors import error_body

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.runtime.base import Runtime
    from gateway.store.base import Merchant

JSON = ("content-type", "application/json")
PAYMENT_ID = re.compile(r"^pay_[0-9a-z]{24}$")

Response = tuple[int, list[tuple[str, str]], bytes]


class Api(Protocol):
    """What handlers use of the app: its runtime and configuration, and API-key authentication."""

    runtime: Runtime
    config: Config

    def authenticate(self, scope: Any) -> Merchant | Response: ...

    def authenticate_key(self, key: str | None) -> Merchant | Response: ...


Handler = Callable[[Api, Any, Any, "re.Match[str]"], Awaitable[Response]]


class Route(msgspec.Struct):
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler


def route(method: str, pattern: str, name: str, handler: Handler) -> Route:
    """A route whose `pattern` is matched against the whole path."""
    return Route(method, re.compile(f"^{pattern}$"), name, handler)


def error(status: int, code: str, message: str, param: str | None = None, kind: str | None = None,
          headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return status, [JSON, *headers], error_body(status, code, message, param, kind=kind)


def list_page(url: str, rows: list[str], has_more: bool) -> Response:
    """The 200 answer of a list: `rows` are its objects already encoded as JSON (as the store keeps
    them), put in the envelope as they are, without decoding and encoding them again."""
    return 200, [JSON], b'{"object":"list","url":"%s","has_more":%s,"data":[%s]}' % (
        url.encode(), b"true" if has_more else b"false", ",".join(rows).encode())


def starting() -> Response:
    return error(503, "starting", "The gateway is starting.", headers=(("retry-after", "1"),))


def not_found(payment_id: str, param: str = "id") -> Response:
    return error(404, "resource_missing", f"No such payment: '{payment_id[:64]}'", param)


# What granian raises when the body cannot be read: the client sent a Content-Length longer than
# the body and closed, bad chunk sizes or trailers, or gave up. (Imported by name so that the unit
# tests' fake protocols may raise them too.)
try:
    from granian._granian import RSGIProtocolClosed, RSGIProtocolError

    BODY_READ_ERRORS: tuple[type[BaseException], ...] = (RSGIProtocolClosed, RSGIProtocolError, ConnectionError)
except ImportError:  # pragma: no cover - granian is a dependency of the server, not of every tool
    BODY_READ_ERRORS = (ConnectionError,)


def body_unreadable() -> Response:
    return error(400, "body_unreadable", "The request body could not be read (cut short or malformed framing).")


async def read_body(scope: Any, proto: Any, limit: int) -> bytes | Response:
    """The request body, or the 413 to answer when it is larger than `limit` bytes (checked against
    Content-Length first, so a declared oversize body is refused without reading it), or the 400 when
    it cannot be read at all (cut short, malformed chunked framing): never an exception."""
    length = scope.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        return body_too_large(limit)
    try:
        body: bytes = await proto()
    except BODY_READ_ERRORS:
        return body_unreadable()
    return body_too_large(limit) if len(body) > limit else body


def body_too_large(limit: int) -> Response:
    return error(413, "body_too_large", f"The request body is larger than the limit of {limit} bytes.")


PREFER_WAIT_MS_MAX = 10_000
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([0-9]{1,9})(?:$|[,;\s])", re.ASCII)


def prefer_wait_ms(scope: Any) -> int:
    """The `Prefer: wait=MS` value, bounded by PREFER_WAIT_MS_MAX; 0 when absent or malformed."""
    header = scope.headers.get("prefer")
    if not header:
        return 0
    m = _PREFER_WAIT.search(header)
    return min(int(m.group(1)), PREFER_WAIT_MS_MAX) if m else 0
