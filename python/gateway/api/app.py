"""The RSGI application: routing, authentication, and the hand-off to the runtime.

The app knows nothing of the mode: `create_app` builds the runtime (runtime/__init__.py, embedded or
cluster) and the route table from the handler modules' `routes()`, once. The create and read routes
are matched first, without a regex, because they are the hot path; every other route is matched in
table order (a path that matches with another method is 405).

Before routing, every `/v1/` request passes the guard (`api/guard.py`): header count and bytes
(`[limits] headers_count_max`, `headers_bytes_max`: 431), card numbers in the path or query string
(400 `card_number_not_allowed`), and the `Idempotency-Key` header (400 with `param:
"Idempotency-Key"` when it is not 1 to 255 printable ASCII characters: a key is never ignored).
Any exception a handler lets escape is a bug: a 500 with the error object, and its traceback logged
once per cause (exception type and raising line) every `TRACEBACK_INTERVAL_S`, with a count of the
ones not logged, so that a flood of one bad request cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway import config as config_mod
from gateway import logs
from gateway._fastpath import mask_pans
from gateway.api import guard, merchant_admin, operations, payments, risk_admin, stripe, webhooks
from gateway.api.http import JSON, Response, Route, error
from gateway.api.metrics import HttpMetrics
from gateway.domain.secrets import hash_api_key
from gateway.runtime import build_runtime
from gateway.runtime.base import Runtime
from gateway.store.base import Merchant

log = logging.getLogger("gateway.api")

API_KEY_CHARS_MAX = 128
# Unknown keys are remembered briefly so that a flood of bad keys cannot turn into store lookups.
UNKNOWN_KEYS_MAX = 10_000
UNKNOWN_KEY_TTL_S = 5.0
CREATE_PATH = "/v1/payments"
PAYMENTS_PREFIX = "/v1/payments/"
# Tracebacks of unhandled errors: at most one per cause in this interval, and a bound on the causes
# remembered (past it the memory is cleared and counting starts again).
TRACEBACK_INTERVAL_S = 60.0
TRACEBACK_CAUSES_MAX = 1_000


class TracebackLimiter:
    """Decides whether an unhandled error's traceback is logged: once per cause per interval."""

    def __init__(self, interval_s: float = TRACEBACK_INTERVAL_S, causes_max: int = TRACEBACK_CAUSES_MAX) -> None:
        self.interval_s = interval_s
        self.causes_max = causes_max
        self._last: dict[tuple[str, str, int], tuple[float, int]] = {}

    @staticmethod
    def cause(exc: BaseException) -> tuple[str, str, int]:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)
        return type(exc).__qualname__, *where

    def admit(self, exc: BaseException, now: float) -> int | None:
        """None to stay quiet; else the number of the same cause's errors not logged since the last."""
        key = self.cause(exc)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) >= self.causes_max:
            self._last.clear()
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0


class Settings(msgspec.Struct):
    """What `gateway serve` hands to the server processes (through the environment)."""

    config_path: str | None = None
    data_dir: str | None = None
    demo: bool = False


def build_routes() -> list[Route]:
    """The route table: every endpoint beside the hot create and read, in matching order."""
    # The Stripe-compatible routes come first: where a path is also native (`/v1/webhook_endpoints`,
    # `/v1/events`), its handler hands a request that is not Stripe's to the native one.
    return [*stripe.routes(), *operations.routes(), *risk_admin.routes(), *webhooks.routes(),
            *merchant_admin.routes()]


class GatewayApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.routes = build_routes()
        self.metrics = HttpMetrics()
        self._merchants: dict[str, Merchant] = {}
        self._unknown_keys: dict[str, float] = {}
        # The rate limit last given to the fast path per merchant: set again only when it changed, so a
        # merchant change elsewhere (which drops the key cache) does not refill the merchant's bucket.
        self._limits_set: dict[str, tuple[float, float]] = {}
        self._merchant_refresh: asyncio.Task[None] | None = None
        # [log] format = "json": a request id on every line and in the `Request-Id` header.
        self._request_ids = self.config.log.format == "json"
        self.tracebacks = TracebackLimiter()
        self._openapi_doc: bytes | None = None
        limits = self.config.limits
        self._headers_count_max = limits.headers_count_max
        self._headers_bytes_max = limits.headers_bytes_max

    # -- lifecycle -------------------------------------------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime.start(loop)
        # Merchant changes (rate limits, key rotation and revocation) made anywhere reach this cache.
        self._merchant_refresh = loop.create_task(merchant_admin.refresh_loop(
            self.runtime, self.forget_merchants, self.config.merchants.refresh_ms / 1000))

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._merchant_refresh is not None:
            self._merchant_refresh.cancel()
        self.runtime.stop(loop)

    # -- request handling ------------------------------------------------------------------------

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        started = time.perf_counter()
        rid = None
        if self._request_ids:
            # JSON-log mode: every log line of this request carries its id (the request runs in a task
            # of its own, so the context variable is this request's), sent back as `Request-Id`.
            rid = logs.request_id(scope.headers.get("request-id"))
            logs.REQUEST_ID.set(rid)
        path = scope.path
        method = scope.method
        route = "other"
        try:
            if path == CREATE_PATH and method == "POST" and not scope.query_string:
                # The hot create. Its path is a constant with no card number and no control character
                # and it has no query string, so the path guard has nothing to scan; the header checks
                # run as for every `/v1/` request, and the key they read is handed on, not read again.
                key = self._guard_headers(scope)
                if isinstance(key, tuple):
                    status, headers, body = key
                else:
                    route = "create_payment"
                    status, headers, body = await payments.create_payment(self, scope, proto, key)
            elif (refused := self._guard(scope, path) if path.startswith("/v1/") else None) is not None:
                status, headers, body = refused
            elif path == CREATE_PATH and method == "POST":
                route = "create_payment"
                status, headers, body = await payments.create_payment(self, scope, proto)
            elif path.startswith(PAYMENTS_PREFIX) and method == "GET" and path.count("/") == 3:
                route = "get_payment"
                status, headers, body = await payments.get_payment(self, scope, path[len(PAYMENTS_PREFIX):])
            elif path == "/healthz":
                route = "healthz"
                status, headers, body = 200, [JSON], b'{"status":"ok"}'
            elif path == "/readyz":
                route = "readyz"
                status, headers, body = (200, [JSON], b'{"status":"ready"}') if self.runtime.healthy() else (
                    503, [JSON], b'{"status":"starting"}')
            elif path == "/openapi.json" and method == "GET":
                route = "openapi"
                status, headers, body = 200, [JSON], self._openapi()
            elif path == "/metrics":
                route = "metrics"
                status, headers, body = 200, [("content-type", "text/plain; version=0.0.4")], self._metrics()
            else:
                route, (status, headers, body) = await self._dispatch(method, path, scope, proto)
        except Exception as e:  # noqa: BLE001 - every request gets an answer; the cause is logged
            self._log_unhandled(e, method, path)
            status, headers, body = error(500, "internal_error", "Internal error.", kind="api_error")
        if rid is not None:
            headers = [*headers, ("request-id", rid)]
            if status >= 400:
                log.info("%s %s answered %d (%s)", method, route, status, mask_pans(path[:128]))
        proto.response_bytes(status, headers, body)
        self.metrics.observe(route, status, time.perf_counter() - started)

    def _guard(self, scope: Any, path: str) -> Response | None:
        """The answer that refuses a `/v1/` request before routing, or None (see the module doc)."""
        headers = scope.headers
        names = headers.keys()
        if len(names) > self._headers_count_max or (
                sum(map(len, names)) + sum(map(len, headers.values())) > self._headers_bytes_max):
            return self._headers_too_large()
        refused = guard.check_request(path, scope.query_string)
        if refused is not None:
            return refused
        key = guard.idempotency_key(scope)
        return key if isinstance(key, tuple) else None

    def _guard_headers(self, scope: Any) -> str | None | Response:
        """`_guard` without the path and query checks (the hot create's path needs none): the request's
        `Idempotency-Key` (None when absent), or the answer that refuses the request."""
        headers = scope.headers
        names = headers.keys()
        if len(names) > self._headers_count_max or (
                sum(map(len, names)) + sum(map(len, headers.values())) > self._headers_bytes_max):
            return self._headers_too_large()
        return guard.idempotency_key(scope)

    def _headers_too_large(self) -> Response:
        return error(431, "headers_too_large", f"At most {self._headers_count_max} header fields and"
                     f" {self._headers_bytes_max} bytes of headers are accepted.")

    def _log_unhandled(self, e: Exception, method: str, path: str) -> None:
        skipped = self.tracebacks.admit(e, time.monotonic())
        if skipped is None:
            return
        more = f" ({skipped} more of this cause since the last report)" if skipped else ""
        log.error("unhandled error on %s %s%s", method, mask_pans(path[:200]), more, exc_info=e)

    async def _dispatch(self, method: str, path: str, scope: Any, proto: Any) -> tuple[str, Response]:
        answer = error(404, "resource_missing", "Unrecognized request URL.")
        for r in self.routes:
            m = r.pattern.match(path)
            if m is None:
                continue
            if r.method != method:
                answer = error(405, "method_not_allowed", "Method not allowed.")
                continue
            return r.name, await r.handler(self, scope, proto, m)
        return "other", answer

    def authenticate(self, scope: Any) -> Merchant | Response:
        """The merchant of the request's API key, or the 401 response to send."""
        header = scope.headers.get("authorization")
        key = None
        if header and header.startswith("Bearer "):
            key = header[7:].strip()
        return self.authenticate_key(key)

    def authenticate_key(self, key: str | None) -> Merchant | Response:
        """The merchant of an API key however it was sent (Bearer, or HTTP Basic on the Stripe surface)."""
        challenge = ("www-authenticate", "Bearer")
        if not key or len(key) > API_KEY_CHARS_MAX:
            return error(401, "missing_api_key" if not key else "invalid_api_key",
                         "Provide your API key as 'Authorization: Bearer sk_...'.", kind="authentication_error",
                         headers=(challenge,))
        digest = hash_api_key(key)
        merchant = self._merchants.get(digest)
        if merchant is not None and (merchant.key_expires_ms is None or merchant.key_expires_ms > time.time() * 1000):
            return merchant
        now = time.monotonic()
        merchant = None if self._unknown_keys.get(digest, 0.0) > now else self.runtime.merchant_by_key_hash(digest)
        if merchant is None:
            if len(self._unknown_keys) >= UNKNOWN_KEYS_MAX:
                self._unknown_keys.clear()
            self._unknown_keys[digest] = now + UNKNOWN_KEY_TTL_S
            return error(401, "invalid_api_key", "Invalid API key provided.", kind="authentication_error",
                         headers=(challenge,))
        fastpath = self.runtime.fastpath
        if merchant.rate_limit_per_s is not None and fastpath is not None:
            # Looked at again after every merchant change (the cache is dropped): an updated limit applies.
            limit = (merchant.rate_limit_per_s, merchant.rate_limit_burst or max(1.0, merchant.rate_limit_per_s))
            if self._limits_set.get(merchant.id) != limit:
                fastpath.set_rate_limit(merchant.id, *limit)
                self._limits_set[merchant.id] = limit
        self._merchants[digest] = merchant
        return merchant

    def forget_merchants(self) -> None:
        """A merchant changed somewhere: authenticate every key against the store again."""
        self._merchants.clear()
        self._unknown_keys.clear()

    def _openapi(self) -> bytes:
        """The OpenAPI description (api/openapi.py), built on first use."""
        if self._openapi_doc is None:
            from gateway.api import openapi

            self._openapi_doc = openapi.document()
        return self._openapi_doc

    def _metrics(self) -> bytes:
        return (self.metrics.render() + stripe.wire.VERSIONS.render() + self.runtime.metrics_text()).encode()


def create_app() -> GatewayApp:
    """Granian factory: settings come from the environment set by `gateway serve`."""
    raw = os.environ.get("GATEWAY_SETTINGS", "{}")
    settings = msgspec.json.decode(raw.encode(), type=Settings)
    cfg = config_mod.load(settings.config_path)
    app = GatewayApp(build_runtime(cfg, Path(settings.data_dir or cfg.server.data_dir)))
    logs.setup(cfg.log.level, cfg.log.format)
    return app
