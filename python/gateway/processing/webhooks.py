"""Delivers webhook events: claims due deliveries from the store, POSTs them signed, records outcomes.

It runs as a task on the payment worker's event loop (embedded mode: the worker process; cluster
mode: every `gateway worker`). The delivery state lives in the store, not here: a delivery is
claimed by moving its next attempt one lease ahead (`ProcessingStore.claim_deliveries`, `FOR UPDATE
SKIP LOCKED` on PostgreSQL, so two workers never send the same delivery at the same time), sent, and
then recorded. A worker killed in between leaves the delivery pending; it is due again when its
lease runs out and is sent again (at-least-once: the event id lets the receiver de-duplicate).

A 2xx answer within the timeout is a delivery; anything else (another status, a timeout, a refused
connection) is retried after `WebhookSettings.retry_delay_ms` until `attempts_max` attempts, then
the delivery is `failed`. Sends run concurrently up to `concurrency`; redirects are not followed.
Its settings are the `[webhooks]` config section (`webhook_settings`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from gateway.config import WebhooksConfig
from gateway.domain import stripe_objects
from gateway.domain.events import WebhookSettings, private_address
from gateway.domain.metrics import Counter
from gateway.domain.signature import SIGNATURE_HEADER, sign
from gateway.store.processing import Delivery, ProcessingStore, now_ms

log = logging.getLogger("gateway.webhooks")

T = TypeVar("T")
USER_AGENT = "gateway-webhooks/1"


def webhook_settings(section: WebhooksConfig) -> WebhookSettings:
    """The dispatcher's settings from the validated `[webhooks]` section (the same field names)."""
    return WebhookSettings(**msgspec.structs.asdict(section))


class _NotAllowed(Exception):
    pass


class _PrivateAddress(OSError):
    """A host name resolved to a private address: raised by the resolver, so nothing connects to it."""


class PublicResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver, refusing a name when any address it resolves to is loopback, private or
    link-local (SSRF): the connection goes to exactly the addresses checked, so a DNS answer that
    changes between a check and the connect (rebinding) cannot slip a private address in."""

    def __init__(self, inner: aiohttp.abc.AbstractResolver | None = None) -> None:
        self._inner = inner or aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        if any(private_address(str(info["host"])) for info in infos):
            raise _PrivateAddress(f"{host} resolves to a private address")
        return infos

    async def close(self) -> None:
        await self._inner.close()


def failure_name(e: BaseException) -> str:
    """The `last_error` of a send that raised `e`."""
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, aiohttp.ClientConnectorError):
        # Refused, unreachable, unresolvable: the name merchants have seen; or refused by the resolver.
        return "address_not_allowed" if isinstance(e.os_error, _PrivateAddress) else "ConnectError"
    return type(e).__name__  # reset, TLS, a malformed answer or URL: retried like a 5xx


DbCall = Callable[..., Awaitable[Any]]


class Dispatcher:
    def __init__(self, pstore: ProcessingStore, settings: WebhookSettings | None = None,
                 db: DbCall | None = None, outcomes: Counter | None = None) -> None:
        self.pstore = pstore
        # `gateway_webhook_deliveries_total{outcome}`: delivered, retrying, failed.
        self.outcomes = outcomes
        self.settings = settings or WebhookSettings()
        self._db_call = db
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed_attempts = 0

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        if self._db_call is None:
            return fn(*args)
        out: T = await self._db_call(fn, *args)
        return out

    def _count(self, outcome: str) -> None:
        if self.outcomes is not None:
            self.outcomes.inc((outcome,))

    def wake(self) -> None:
        """Something new may be due (a payment changed in this process): look now, not at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        s = self.settings
        sem = asyncio.Semaphore(s.concurrency)
        # aiohttp: its connection pool stays cheap with every send in flight (httpx's re-scanned all its
        # connections on each event, ~2.5 ms of CPU a call at 32 in flight). No timeout of its own: each
        # attempt has one deadline (`_deliver`).
        connector = aiohttp.TCPConnector(limit=s.concurrency, limit_per_host=0,
                                         resolver=None if s.allow_private_urls else PublicResolver())
        async with aiohttp.ClientSession(connector=connector, headers={"user-agent": USER_AGENT},
                                         timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False) as client:
            try:
                while True:
                    free = s.concurrency - len(self._inflight)
                    claimed: list[Delivery] = []
                    if free > 0:
                        try:
                            claimed = await self._db(self.pstore.claim_deliveries, min(free, s.batch_max),
                                                     s.lease_ms)
                        except Exception:
                            log.exception("claiming webhook deliveries failed; retrying at the next poll")
                    for d in claimed:
                        await sem.acquire()
                        task = asyncio.ensure_future(self._deliver(client, d))
                        self._inflight.add(task)
                        task.add_done_callback(functools.partial(self._done, sem))
                    if claimed and len(claimed) == min(free, s.batch_max):
                        await asyncio.sleep(0)  # more may be due at once
                        continue
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), s.poll_ms / 1000)
                    except TimeoutError:
                        pass
            finally:
                # Stopping: sends in flight get a moment; any cut short stays pending and comes back.
                if self._inflight:
                    await asyncio.wait(self._inflight, timeout=2)
                    for t in self._inflight:
                        t.cancel()

    async def _private_target(self, url: str) -> bool:
        """Whether the URL's host is a loopback, private or link-local address, or a localhost name: a
        public endpoint URL must not reach into the gateway's own network (SSRF). A host name is checked
        where it is resolved, at every connect (`PublicResolver`): the address checked is the one used."""
        host = urlsplit(url).hostname or ""
        return host == "localhost" or host.endswith(".localhost") or private_address(host)

    def _done(self, sem: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        sem.release()
        self._wake.set()  # a delivery finished: the next event of its payment may be due now

    async def _deliver(self, client: aiohttp.ClientSession, d: Delivery) -> None:
        status_code: int | None = None
        error: str | None = None
        try:
            # One deadline for the whole attempt: an attempt must end well inside its lease, or another
            # dispatcher could send it meanwhile.
            async with asyncio.timeout(self.settings.timeout_ms / 1000):
                if not self.settings.allow_private_urls and await self._private_target(d.url):
                    raise _NotAllowed
                body = d.body if d.stripe_types is None else stripe_objects.event_body(d.body, d.stripe_types)
                signature = sign(body, d.secret)
                # The same signature under Stripe's name too: Stripe's SDKs verify it (`construct_event`).
                headers = {"content-type": "application/json", SIGNATURE_HEADER: signature,
                           "stripe-signature": signature, "gateway-event-id": d.event_id}
                # The body is not read: a receiver's answer matters only by its status.
                async with client.post(d.url, data=body, headers=headers, allow_redirects=False) as response:
                    status_code = response.status
        except _NotAllowed:
            error = "address_not_allowed"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            error = failure_name(e)
        attempts = d.attempts + 1
        try:
            if status_code is not None and 200 <= status_code < 300:
                await self._db(self.pstore.finish_delivery, d, "delivered", status_code, None, None)
                self.delivered += 1
                self._count("delivered")
                return
            self.failed_attempts += 1
            if error is None:
                error = f"http_{status_code}"
            if attempts >= self.settings.attempts_max:
                log.warning("webhook %s to endpoint %s failed after %d attempts (%s)", d.event_id, d.endpoint_id,
                            attempts, error)
                await self._db(self.pstore.finish_delivery, d, "failed", status_code, error, None)
                self._count("failed")
            else:
                retry_at = now_ms() + self.settings.retry_delay_ms(attempts)
                await self._db(self.pstore.finish_delivery, d, "pending", status_code, error, retry_at)
                self._count("retrying")
        except Exception:
            # Not recorded: the lease runs out and the delivery is sent again.
            log.exception("recording webhook delivery %s/%s failed", d.event_id, d.endpoint_id)
