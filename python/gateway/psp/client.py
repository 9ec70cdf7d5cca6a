"""The gateway's view of a PSP: one interface, an in-process and an HTTP implementation.

Every call returns a `PSPResult` whose `outcome` is one of five values. The important
distinction is between `ERROR` (the PSP says it did not process the request: safe to retry or
fail over) and `TIMEOUT` (we do not know whether it was processed: the payment must be resolved
by a status query before anything else happens). A timeout is never reported as a decline.
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from gateway.domain.attempt import Outcome
from gateway.psp_sim.core import ResponseLost, SimResponse, SimulatedPSP, TransactionStatus

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


@dataclass(frozen=True, slots=True)
class PSPStatus:
    """What the PSP reports about a transaction (`status` is the PSP's own vocabulary:
    authorized, declined, captured, voided, partially_refunded, refunded)."""

    psp: str
    psp_reference: str
    reference: str
    status: str
    currency: str
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture_final: bool
    decline_code: str | None


class PSPClient(abc.ABC):
    """Async operations on one PSP. Implementations never raise for PSP outcomes."""

    name: str

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

    @abc.abstractmethod
    async def status(
        self,
        *,
        reference: str | None = None,
        psp_reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> PSPStatus | None:
        """The PSP's record, None when it has none; raises PSPTimeout or PSPUnavailable."""


def _from_sim(response: SimResponse, key: str, latency_ms: float) -> PSPResult:
    return PSPResult(
        outcome=Outcome(response.outcome),
        psp=response.psp,
        operation=response.operation,
        idempotency_key=key,
        code=response.code,
        message=response.message,
        retryable=response.retryable,
        psp_reference=response.psp_reference,
        amount=response.amount,
        fee_minor=response.fee_minor,
        latency_ms=latency_ms,
    )


def _status_from(found: TransactionStatus) -> PSPStatus:
    return PSPStatus(
        psp=found.psp,
        psp_reference=found.psp_reference,
        reference=found.reference,
        status=found.status,
        currency=found.currency,
        amount_authorized=found.amount_authorized,
        amount_captured=found.amount_captured,
        amount_refunded=found.amount_refunded,
        capture_final=found.capture_final,
        decline_code=found.decline_code,
    )


class InProcessPSPClient(PSPClient):
    """Calls a `SimulatedPSP` in the same event loop, with the same timeout rules as HTTP."""

    def __init__(self, sim: SimulatedPSP, *, timeout_s: float = TIMEOUT_S_DEFAULT) -> None:
        assert timeout_s > 0
        self.sim = sim
        self.name = sim.name
        self.timeout_s = timeout_s

    async def _run(self, operation: str, key: str, call: Any) -> PSPResult:
        started = time.perf_counter()
        try:
            response = await asyncio.wait_for(call, self.timeout_s)
        except (TimeoutError, ResponseLost):
            return PSPResult(
                outcome=Outcome.TIMEOUT,
                psp=self.name,
                operation=operation,
                idempotency_key=key,
                code="psp_timeout",
                message=f"no answer from {self.name} within {self.timeout_s} s",
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        return _from_sim(response, key, (time.perf_counter() - started) * 1000.0)

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> PSPResult:
        call = self.sim.authorize(
            reference=reference,
            amount=amount,
            currency=currency,
            token=token,
            idempotency_key=idempotency_key,
        )
        return await self._run("authorize", idempotency_key, call)

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> PSPResult:
        call = self.sim.capture(
            psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key, final=final
        )
        return await self._run("capture", idempotency_key, call)

    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult:
        return await self._run(
            "void",
            idempotency_key,
            self.sim.void(psp_reference=psp_reference, idempotency_key=idempotency_key),
        )

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        call = self.sim.refund(psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key)
        return await self._run("refund", idempotency_key, call)

    async def status(
        self,
        *,
        reference: str | None = None,
        psp_reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> PSPStatus | None:
        try:
            found = await asyncio.wait_for(
                self.sim.status(
                    reference=reference, psp_reference=psp_reference, idempotency_key=idempotency_key
                ),
                self.timeout_s,
            )
        except TimeoutError as exc:
            raise PSPTimeout(f"status query to {self.name} timed out") from exc
        return _status_from(found) if found is not None else None


class _WireResponse(msgspec.Struct):
    outcome: str
    code: str | None = None
    message: str | None = None
    retryable: bool = False
    psp_reference: str | None = None
    amount: int = 0
    fee_minor: int = 0


class _WireStatus(msgspec.Struct):
    psp: str
    psp_reference: str
    reference: str
    status: str
    currency: str
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture_final: bool
    decline_code: str | None = None
    created_at: float = 0.0


# Failures where the request provably never reached the PSP: safe to retry or fail over.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class HTTPPSPClient(PSPClient):
    """Talks to a PSP (the simulator's HTTP transport) with httpx.

    Any failure after the request may have been sent (read/write timeout, dropped connection,
    a 504 or an unreadable body) is a TIMEOUT, never an error or a decline: only a status query
    can tell what happened. Failures before sending (connect errors, pool exhaustion) are
    retryable errors.
    """

    def __init__(
        self,
        base_url: str,
        psp: str,
        *,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        assert timeout_s > 0
        self.name = psp
        self.timeout_s = timeout_s
        self._base = f"{base_url.rstrip('/')}/v1/{psp}"
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _post(self, operation: str, key: str, body: dict[str, object]) -> PSPResult:
        started = time.perf_counter()

        def result(outcome: Outcome, code: str, message: str, retryable: bool = False) -> PSPResult:
            return PSPResult(
                outcome=outcome,
                psp=self.name,
                operation=operation,
                idempotency_key=key,
                code=code,
                message=message,
                retryable=retryable,
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )

        try:
            response = await self._client.post(
                f"{self._base}/{operation}",
                content=msgspec.json.encode(body),
                headers={"idempotency-key": key, "content-type": "application/json"},
                timeout=self.timeout_s,
            )
        except _NOT_SENT as exc:
            return result(Outcome.ERROR, "psp_unreachable", f"{self.name}: {exc!r}", retryable=True)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            return result(Outcome.TIMEOUT, "psp_timeout", f"{self.name}: {exc!r}")
        if response.status_code == 504:
            return result(Outcome.TIMEOUT, "psp_timeout", f"{self.name} answered 504")
        try:
            wire = msgspec.json.decode(response.content, type=_WireResponse)
            outcome = Outcome(wire.outcome)
        except (msgspec.DecodeError, ValueError):
            return result(Outcome.TIMEOUT, "psp_bad_response", f"{self.name} answered {response.status_code}")
        return PSPResult(
            outcome=outcome,
            psp=self.name,
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

    async def authorize(
        self, *, reference: str, amount: int, currency: str, token: str, idempotency_key: str
    ) -> PSPResult:
        body: dict[str, object] = {
            "reference": reference,
            "amount": amount,
            "currency": currency,
            "token": token,
        }
        return await self._post("authorize", idempotency_key, body)

    async def capture(
        self, *, psp_reference: str, amount: int, idempotency_key: str, final: bool = False
    ) -> PSPResult:
        body: dict[str, object] = {"psp_reference": psp_reference, "amount": amount, "final": final}
        return await self._post("capture", idempotency_key, body)

    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult:
        return await self._post("void", idempotency_key, {"psp_reference": psp_reference})

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        body: dict[str, object] = {"psp_reference": psp_reference, "amount": amount}
        return await self._post("refund", idempotency_key, body)

    async def status(
        self,
        *,
        reference: str | None = None,
        psp_reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> PSPStatus | None:
        params = {
            k: v
            for k, v in (
                ("reference", reference),
                ("psp_reference", psp_reference),
                ("idempotency_key", idempotency_key),
            )
            if v is not None
        }
        try:
            response = await self._client.get(f"{self._base}/status", params=params, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            raise PSPTimeout(f"status query to {self.name} timed out") from exc
        except httpx.TransportError as exc:
            raise PSPUnavailable(f"status query to {self.name} failed: {exc!r}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise PSPUnavailable(f"status query to {self.name} answered {response.status_code}")
        w = msgspec.json.decode(response.content, type=_WireStatus)
        return PSPStatus(
            psp=w.psp,
            psp_reference=w.psp_reference,
            reference=w.reference,
            status=w.status,
            currency=w.currency,
            amount_authorized=w.amount_authorized,
            amount_captured=w.amount_captured,
            amount_refunded=w.amount_refunded,
            capture_final=w.capture_final,
            decline_code=w.decline_code,
        )
