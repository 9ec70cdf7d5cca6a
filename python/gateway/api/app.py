"""The RSGI application: routing, authentication and the hand-off to the Rust fast path.

A create request costs one call into Rust (validation, idempotency, rate limit, risk, WAL append,
all with the GIL released). That call never waits for the disk: it returns the LSN of the record,
and the handler awaits a future that the group-commit notification (an eventfd registered with the
event loop) resolves, so one event loop keeps thousands of requests in flight while they share fsyncs.
A 2xx is sent only after the record is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import config as config_mod
from gateway._fastpath import FastPath
from gateway.api.metrics import HttpMetrics
from gateway.domain.errors import error_body
from gateway.domain.secrets import hash_api_key
from gateway.feed.tailer import Tailer
from gateway.runtime.waiters import LsnWaiters
from gateway.store.base import Merchant, created_payment_ids
from gateway.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from gateway.runtime.cluster import Cluster

log = logging.getLogger("gateway.api")

JSON = ("content-type", "application/json")
API_KEY_CHARS_MAX = 128
PAYMENT_ID = re.compile(r"^pay_[0-9a-z]{24}$")
# Unknown keys are remembered briefly so that a flood of bad keys cannot turn into store lookups.
UNKNOWN_KEYS_MAX = 10_000
UNKNOWN_KEY_TTL_S = 5.0
RECENT_MAX = 1_000_000


Response = tuple[int, list[tuple[str, str]], bytes]
# A route handler gets the app, the RSGI scope and protocol, and the match of its path pattern.
Handler = Callable[["GatewayApp", Any, Any, "re.Match[str]"], Awaitable[Response]]


class Route(msgspec.Struct):
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler


# Modules that add endpoints (payment operations, risk admin, ...) append here at import time; the
# core create and read routes are matched first, without a regex, because they are the hot path.
EXTRA_ROUTES: list[Route] = []
# Called with the app after the fast path, the store and the tailer are up, and before they stop.
ON_START: list[Callable[[GatewayApp], None]] = []
ON_STOP: list[Callable[[GatewayApp], None]] = []
# Called on the tailer thread with every batch of WAL records it has applied to the store.
ON_APPLIED: list[Callable[[GatewayApp, list[tuple[int, bytes]]], None]] = []
# Called after a successful `GET /v1/payments/{id}` that carries a `Prefer` header (e.g. `wait=MS`),
# with the id and the response so far; returns the response to send.
GET_PAYMENT_WAIT: list[Callable[[GatewayApp, Any, str, Response], Awaitable[Response]]] = []


def route(method: str, pattern: str, name: str) -> Callable[[Handler], Handler]:
    """Registers an extra endpoint; `pattern` is matched against the whole path."""

    def deco(fn: Handler) -> Handler:
        EXTRA_ROUTES.append(Route(method, re.compile(f"^{pattern}$"), name, fn))
        return fn

    return deco


class Settings(msgspec.Struct):
    """What `gateway serve` hands to the worker process (through the environment)."""

    config_path: str | None = None
    data_dir: str | None = None
    demo: bool = False


class GatewayApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = config_mod.load(settings.config_path)
        self.data_dir = Path(settings.data_dir or self.config.server.data_dir)
        self.metrics = HttpMetrics()
        self.ready = False
        self.fastpath: FastPath | None = None
        self.store: SqliteStore | None = None
        self.tailer: Tailer | None = None
        self._merchants: dict[str, Merchant] = {}
        self._unknown_keys: dict[str, float] = {}
        # (lsn, future, deadline) in LSN order, which is also arrival order: one event loop appends.
        self._waiters = LsnWaiters("WAL commit took longer than durable_wait_ms_max")
        # Payments acknowledged but not yet in the store: read-your-writes until the tailer applies them.
        self.recent: dict[str, tuple[str, bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Cluster mode (runtime/cluster.py): shared state, relay and PostgreSQL; None in embedded mode.
        self.cluster: Cluster | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.data_dir.mkdir(parents=True, exist_ok=True)
        caught_up = 0
        if self.config.server.mode == "cluster":
            from gateway.runtime.cluster import Cluster

            # The relay (WAL -> Kafka) replaces the tailer; workers write PostgreSQL. The embedded hooks
            # (ON_START/ON_STOP/ON_APPLIED: the SQLite payment-processing worker) do not run here.
            self.cluster = Cluster(self)
            self.store, self.fastpath = self.cluster.start(loop)  # type: ignore[assignment]
        else:
            self.store = SqliteStore(self.data_dir / "gateway.db")
            self.store.migrate()
            self.fastpath = FastPath(self.config.fastpath_json(self.data_dir))
            self.tailer = Tailer(
                str(self.data_dir / "wal"),
                self.store,
                self.fastpath,
                self.config.tailer.batch_records_max,
                on_applied=self._forget_applied,
            )
            caught_up = self.tailer.catch_up()
            self.tailer.start()
        loop.add_reader(self.fastpath.notify_fd(), self._on_commit)
        loop.call_later(0.1, self._expire_waiters)
        if self.cluster is None:
            for hook in ON_START:
                hook(self)
        else:
            self.cluster.start_risk()  # the risk control plane on PostgreSQL
        self.ready = True
        log.info(
            "gateway ready: %d WAL records recovered (%d torn bytes cut), %d applied on start",
            self.fastpath.recovered_records, self.fastpath.truncated_bytes, caught_up,
        )

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready = False
        for hook in ON_STOP if self.cluster is None else ():
            hook(self)
        if self.fastpath is not None:
            loop.remove_reader(self.fastpath.notify_fd())
            self.fastpath.close()
            self._on_commit()
        if self.cluster is not None:
            self.cluster.stop()  # ships the rest of the WAL to Kafka, closes PostgreSQL and Redis
            self.store = None
        if self.tailer is not None:
            self.tailer.stop()
        if self.store is not None:
            self.store.close()
        log.info("gateway stopped; WAL flushed")

    def _on_commit(self) -> None:
        fp = self.fastpath
        assert fp is not None
        fp.drain_notify()
        self._waiters.release(fp.committed_lsn())
        if len(self._waiters) and fp.wal_error() is not None:
            self._waiters.fail_all(OSError(fp.wal_error()))

    def _expire_waiters(self) -> None:
        """Fails requests whose record is not durable in time: one timer for all, not one per request."""
        self._waiters.expire()
        if self.ready and self._loop is not None:
            self._loop.call_later(0.1, self._expire_waiters)

    def _forget_applied(self, records: list[tuple[int, bytes]]) -> None:
        for hook in ON_APPLIED:
            hook(self, records)
        # Runs on the tailer thread; dict.pop is atomic under the GIL.
        for pid in created_payment_ids(records):
            self.recent.pop(pid, None)

    # -- request handling ------------------------------------------------------------------------

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        started = time.perf_counter()
        path = scope.path
        method = scope.method
        route = "other"
        try:
            if path == "/v1/payments" and method == "POST":
                route = "create_payment"
                status, headers, body = await self._create_payment(scope, proto)
            elif path.startswith("/v1/payments/") and method == "GET" and path.count("/") == 3:
                route = "get_payment"
                if self.cluster is not None:
                    status, headers, body = await self.cluster.get_payment(scope, path[len("/v1/payments/"):])
                else:
                    status, headers, body = self._get_payment(scope, path[len("/v1/payments/"):])
                if status == 200 and GET_PAYMENT_WAIT and scope.headers.get("prefer"):
                    status, headers, body = await GET_PAYMENT_WAIT[0](
                        self, scope, path[len("/v1/payments/"):], (status, headers, body))
            elif path == "/healthz":
                route = "healthz"
                status, headers, body = 200, [JSON], b'{"status":"ok"}'
            elif path == "/readyz":
                route = "readyz"
                ok = self.ready and self.fastpath is not None and self.fastpath.wal_error() is None
                ok = ok and (self.cluster is None or self.cluster.healthy())
                status, headers, body = (200, [JSON], b'{"status":"ready"}') if ok else (
                    503, [JSON], b'{"status":"starting"}')
            elif path == "/metrics":
                route = "metrics"
                status, headers, body = 200, [("content-type", "text/plain; version=0.0.4")], self._metrics()
            else:
                status, headers, body = 404, [JSON], error_body(404, "resource_missing", "Unrecognized request URL.")
                for r in EXTRA_ROUTES:
                    m = r.pattern.match(path)
                    if m is None:
                        continue
                    if r.method != method:
                        status, headers, body = 405, [JSON], error_body(
                            405, "method_not_allowed", "Method not allowed.")
                        continue
                    route = r.name
                    status, headers, body = await r.handler(self, scope, proto, m)
                    break
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            status, headers, body = 500, [JSON], error_body(500, "internal_error", "Internal error.", kind="api_error")
        proto.response_bytes(status, headers, body)
        self.metrics.observe(route, status, time.perf_counter() - started)

    def authenticate(self, scope: Any) -> Merchant | Response:
        """The merchant of the request's API key, or the 401 response to send."""
        return self._authenticate(scope)

    def _authenticate(self, scope: Any) -> Merchant | tuple[int, list[tuple[str, str]], bytes]:
        header = scope.headers.get("authorization")
        key = None
        if header and header.startswith("Bearer "):
            key = header[7:].strip()
        if not key or len(key) > API_KEY_CHARS_MAX:
            return 401, [JSON, ("www-authenticate", "Bearer")], error_body(
                401, "missing_api_key" if not key else "invalid_api_key",
                "Provide your API key as 'Authorization: Bearer sk_...'.", kind="authentication_error")
        digest = hash_api_key(key)
        merchant = self._merchants.get(digest)
        if merchant is not None:
            return merchant
        now = time.monotonic()
        if self._unknown_keys.get(digest, 0.0) > now:
            merchant = None
        else:
            assert self.store is not None
            merchant = self.store.merchant_by_key_hash(digest)
        if merchant is None:
            if len(self._unknown_keys) >= UNKNOWN_KEYS_MAX:
                self._unknown_keys.clear()
            self._unknown_keys[digest] = now + UNKNOWN_KEY_TTL_S
            return 401, [JSON, ("www-authenticate", "Bearer")], error_body(
                401, "invalid_api_key", "Invalid API key provided.", kind="authentication_error")
        if merchant.rate_limit_per_s is not None and self.fastpath is not None:
            burst = merchant.rate_limit_burst or max(1.0, merchant.rate_limit_per_s)
            self.fastpath.set_rate_limit(merchant.id, merchant.rate_limit_per_s, burst)
        self._merchants[digest] = merchant
        return merchant

    async def _create_payment(self, scope: Any, proto: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        auth = self._authenticate(scope)
        if not isinstance(auth, Merchant):
            return auth
        limit = self.config.limits.body_bytes_max
        length = scope.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return 413, [JSON], error_body(
                413, "body_too_large", f"The request body is larger than the limit of {limit} bytes.")
        body = await proto()
        if len(body) > limit:
            return 413, [JSON], error_body(
                413, "body_too_large", f"The request body is larger than the limit of {limit} bytes.")
        fp = self.fastpath
        assert fp is not None and self._loop is not None
        if not self.ready:
            return 503, [JSON, ("retry-after", "1")], error_body(503, "starting", "The gateway is starting.")
        idem_key = scope.headers.get("idempotency-key")
        if self.cluster is not None:
            return await self.cluster.create_payment(auth, idem_key, body)
        return (await self.accept_payment(auth, idem_key, body))[:3]

    async def accept_payment(
        self, auth: Merchant, idem_key: str | None, body: bytes, velocity: list[int] | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes, int, str | None, bool]:
        """The Rust call and the wait for the group commit: (status, headers, body, lsn, payment id,
        replayed). lsn > 0 means a record was written (and is durable unless the status is 503).
        `velocity`: the payment's velocity counters from a shared store (cluster mode), used by the risk
        stage instead of the fast path's own."""
        fp = self.fastpath
        assert fp is not None and self._loop is not None
        status, out, lsn, replayed, retry_after, payment_id = fp.create_payment(
            auth.id, idem_key, body, velocity=velocity)
        headers = [JSON]
        if lsn:
            # Only a 2xx body is the payment object; a 402 body is the decline error, and reading the
            # declined payment back must wait for the store rather than answer 200 with the error.
            if payment_id is not None and status < 300 and self.tailer is not None and len(self.recent) < RECENT_MAX:
                self.recent[payment_id] = (auth.id, out)
            if fp.committed_lsn() < lsn:
                fut = self._waiters.add(self._loop, lsn, self.config.server.durable_wait_ms_max / 1000)
                try:
                    await fut
                except OSError as e:
                    log.error("payment %s not confirmed durable: %s", payment_id, e)
                    return 503, [JSON, ("retry-after", "1")], error_body(
                        503, "storage_unavailable",
                        "The payment could not be confirmed as stored; retry with the same Idempotency-Key."
                    ), lsn, payment_id, replayed
        if replayed:
            headers.append(("idempotent-replayed", "true"))
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        if idem_key is not None and status < 500:
            headers.append(("idempotency-key", idem_key))
        return status, headers, out, lsn, payment_id, replayed

    def _get_payment(self, scope: Any, payment_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
        auth = self._authenticate(scope)
        if not isinstance(auth, Merchant):
            return auth
        if PAYMENT_ID.match(payment_id):
            hit = self.recent.get(payment_id)
            if hit is not None and hit[0] == auth.id:
                return 200, [JSON], hit[1]
            assert self.store is not None
            body = self.store.get_payment(auth.id, payment_id)
            if body is not None:
                return 200, [JSON], body
        return 404, [JSON], error_body(404, "resource_missing", f"No such payment: '{payment_id[:64]}'",
                                       param="id")

    def _metrics(self) -> bytes:
        parts = [self.metrics.render()]
        if self.fastpath is not None:
            parts.append(self.fastpath.metrics_text())
            parts.append(
                "# TYPE gateway_durable_waiters gauge\n"
                f"gateway_durable_waiters {len(self._waiters)}\n"
                "# TYPE gateway_tailer_applied_lsn gauge\n"
                f"gateway_tailer_applied_lsn {self.tailer.applied_lsn if self.tailer else 0}\n"
            )
        if self.cluster is not None:
            parts.append(self.cluster.metrics_text())
        return "".join(parts).encode()


def create_app() -> GatewayApp:
    """Granian factory: settings come from the environment set by `gateway serve`."""
    from gateway import logs
    from gateway.api import extensions  # noqa: F401 - registers the extra routes and hooks

    raw = os.environ.get("GATEWAY_SETTINGS", "{}")
    settings = msgspec.json.decode(raw.encode(), type=Settings)
    app = GatewayApp(settings)
    logs.setup(app.config.log.level)
    return app
