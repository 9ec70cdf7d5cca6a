"""The gateway's view of a PSP: one interface and its HTTP implementation (the in-process one, over
the simulator, is psp_sim/client.py: psp/ never imports the simulator).

Every call returns a `PSPResult` whose `outcome` is one of five values. The important
distinction is between `ERROR` (the PSP says it did not process the request: safe to retry or
fail over) and `TIMEOUT` (we do not know whether it was processed: the payment must be resolved
by a status query before anything else happens). A timeout is never reported as a decline.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from gateway.domain.attempt import Outcome
from gateway.psp.wire import (
    AuthorizeRequest,
    CaptureRequest,
    RefundRequest,
    Response,
    TransactionStatus,
    VoidRequest,
)

TIMEOUT_S_DEFAULT = 10.0


class PSPTimeout(Exception):
    """A PSP call (or status query) ended without an answer: its effect is unknown."""


class PSPUnavailable(Exception):
    """A status query could not be sent or was refused; nothing is known about the transaction."""


@dataclass(frozen=True, slots=True)
class PSPResult:
    outcome: Outcome
    psp: str
    operation: str
    idempotency_key: str
    code: str | None = None
    message: str | None = None
    # Only meaningful for ERROR: true when the PSP did not process the request.
    retryable: bool = False
    psp_reference: str | None = None
    amount: int = 0
    fee_minor: int = 0
    latency_ms: float = 0.0

    @property
    def ambiguous(self) -> bool:
        return self.outcome is Outcome.TIMEOUT


# Told a submitted call's result, or the exception its coroutine would have raised (`submit_authorize`).
Done = Callable[["PSPResult | BaseException"], None]


# What the PSP reports about a transaction: the wire type itself (`status` is the PSP's own vocabulary:
# authorized, declined, captured, voided, partially_refunded, refunded).
PSPStatus = TransactionStatus


class PSPClient(abc.ABC):
    """Async operations on one PSP. Implementations never raise for PSP outcomes."""

    name: str

    async def aclose(self) -> None:
        """Releases what the client holds (connections); a no-op where it holds nothing."""

    @abc.abstractmethod
    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> PSPResult: ...

    @abc.abstractmethod
    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> PSPResult: ...

    @abc.abstractmethod
    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult: ...

    @abc.abstractmethod
    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult: ...

    def send_authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> Awaitable[PSPResult]:
        """`authorize` as an awaitable to run as a task or future (`asyncio.ensure_future`), not to
        await in place: a client that answers through the event loop's callbacks (a bulkhead over the
        in-process simulator at time scale 0) gives a future with the call under way, in the turns its
        task would have taken; any other, the coroutine."""
        return self.authorize(reference=reference, amount=amount, currency=currency, token=token,
                              idempotency_key=idempotency_key)

    def send_capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> Awaitable[PSPResult]:
        """`capture` as `send_authorize` gives `authorize`."""
        return self.capture(psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key, final=final)

    def submits(self) -> bool:
        """Whether `submit_authorize` and `submit_capture` can be used now."""
        return False

    def submit_authorize(
        self, call: asyncio.Future[Any], done: Done, *, reference: str, amount: int, currency: str, token: str,
        idempotency_key: str,
    ) -> None:
        """`authorize` as callbacks on `call`'s loop, started in the turn where its task's first step would
        run: `done` gets the result, or the exception the coroutine would raise, where it would return or
        raise (a CancelledError once `call` is cancelled). Only where `submits()`."""
        raise NotImplementedError

    def submit_capture(
        self, call: asyncio.Future[Any], done: Done, *, psp_reference: str, amount: int, idempotency_key: str,
        final: bool = False,
    ) -> None:
        """`capture` as `submit_authorize` gives `authorize`."""
        raise NotImplementedError

    def has_room(self) -> bool:
        """Whether a new call would go out at once (a bulkhead at its bound says no): the router's
        choice prefers PSPs with room."""
        return True

    def promise(self) -> None:
        """Told that an authorization was routed here and is about to be sent."""

    async def status(
        self,
        *,
        reference: str | None = None,
        psp_reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> PSPStatus | None:
        """The PSP's record, found by the keys given; None when it has none; raises PSPTimeout or
        PSPUnavailable."""
        query = {
            k: v
            for k, v in (
                ("reference", reference),
                ("psp_reference", psp_reference),
                ("idempotency_key", idempotency_key),
            )
            if v is not None
        }
        return await self._status(query)

    @abc.abstractmethod
    async def _status(self, query: dict[str, str]) -> PSPStatus | None:
        """`status` with its keys that are not None, by name."""


def result_of(wire: Response, outcome: Outcome, psp: str, operation: str, key: str, started: float) -> PSPResult:
    """The `PSPResult` of a PSP's answer (over HTTP or from an in-process simulator) to a call that
    started at `started` (`time.perf_counter()`)."""
    return PSPResult(
        outcome=outcome,
        psp=psp,
        operation=operation,
        idempotency_key=key,
        code=wire.code,
        message=wire.message,
        retryable=wire.retryable,
        psp_reference=wire.psp_reference,
        amount=wire.amount,
        fee_minor=wire.fee_minor,
        latency_ms=(time.perf_counter() - started) * 1000.0,
    )


def failure_of(
    outcome: Outcome, psp: str, operation: str, key: str, started: float, code: str, message: str,
    retryable: bool = False,
) -> PSPResult:
    """The `PSPResult` of a call that got no usable answer (a timeout, or an error before sending):
    that of an error body (outcome, code, message, retryable and nothing more)."""
    body = Response(outcome=outcome.value, code=code, message=message, retryable=retryable)
    return result_of(body, outcome, psp, operation, key, started)


# Failures where the request provably never reached the PSP: safe to retry or fail over (no
# connection could be made, or none was free in time).
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Connections kept to one PSP: above the most calls its bulkhead lets through at once, so a call
# never waits for a free one (`[psp]` shares of capacity bound them well below).
PSP_CONNECTIONS_MAX = 1_024
_encoder = msgspec.json.Encoder()
_response_decoder = msgspec.json.Decoder(Response)
_status_decoder = msgspec.json.Decoder(TransactionStatus)


class HTTPPSPClient(PSPClient):
    """Talks to a PSP (the simulator's HTTP transport) over HTTP/1.1 with keep-alive (aiohttp: its
    connection pool and C parser cost ~0.1-0.2 ms of CPU a call where httpx's pool, whose bookkeeping
    grows with the square of the calls in flight, cost 2.5-4 ms at 32-256 in flight).

    Any failure after the request may have been sent (a timeout, a dropped connection, a 504 or an
    unreadable body) is a TIMEOUT, never an error or a decline: only a status query can tell what
    happened. Failures before sending (connection refused, no connection in time) are retryable errors.
    """

    def __init__(self, base_url: str, psp: str, *, timeout_s: float = TIMEOUT_S_DEFAULT) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.name = psp
        self.timeout_s = timeout_s
        self._base = f"{base_url.rstrip('/')}/v1/{psp}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Made on first use, in the event loop that uses it (a session belongs to one loop).
        self._http: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._loop is not loop:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=PSP_CONNECTIONS_MAX, limit_per_host=0),
                timeout=self._timeout, raise_for_status=False, auto_decompress=False)
            self._loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and not self._http.closed and self._loop is asyncio.get_running_loop():
            await self._http.close()
        self._http = None

    async def _post(self, operation: str, key: str, body: msgspec.Struct) -> PSPResult:
        started = time.perf_counter()

        def result(outcome: Outcome, code: str, message: str, retryable: bool = False) -> PSPResult:
            return failure_of(outcome, self.name, operation, key, started, code, message, retryable)

        try:
            async with self._session().post(
                f"{self._base}/{operation}", data=_encoder.encode(body),
                headers={"idempotency-key": key, "content-type": "application/json"},
            ) as response:
                status, content = response.status, await response.read()
        except _NOT_SENT as exc:
            return result(Outcome.ERROR, "psp_unreachable", f"{self.name}: {exc!r}", retryable=True)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return result(Outcome.TIMEOUT, "psp_timeout", f"{self.name}: {exc!r}")
        if status == 504:
            return result(Outcome.TIMEOUT, "psp_timeout", f"{self.name} answered 504")
        try:
            wire = _response_decoder.decode(content)
            outcome = Outcome(wire.outcome)
        except (msgspec.DecodeError, ValueError):
            return result(Outcome.TIMEOUT, "psp_bad_response", f"{self.name} answered {status}")
        return result_of(wire, outcome, self.name, operation, key, started)

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> PSPResult:
        body = AuthorizeRequest(reference=reference, amount=amount, currency=currency, token=token)
        return await self._post("authorize", idempotency_key, body)

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> PSPResult:
        body = CaptureRequest(psp_reference=psp_reference, amount=amount, final=final)
        return await self._post("capture", idempotency_key, body)

    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult:
        return await self._post("void", idempotency_key, VoidRequest(psp_reference=psp_reference))

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        body = RefundRequest(psp_reference=psp_reference, amount=amount)
        return await self._post("refund", idempotency_key, body)

    async def _status(self, query: dict[str, str]) -> PSPStatus | None:
        try:
            async with self._session().get(f"{self._base}/status", params=query) as response:
                status, content = response.status, await response.read()
        except TimeoutError as exc:
            raise PSPTimeout(f"status query to {self.name} timed out") from exc
        except aiohttp.ClientError as exc:
            raise PSPUnavailable(f"status query to {self.name} failed: {exc!r}") from exc
        if status == 404:
            return None
        if status != 200:
            raise PSPUnavailable(f"status query to {self.name} answered {status}")
        return _status_decoder.decode(content)
