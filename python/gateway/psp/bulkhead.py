"""A bulkhead per PSP: at most `inflight_max` calls to one PSP at a time from this worker.

A PSP degrades before its capacity (the simulator's errors start at 80% utilisation, as real
processors' do), so a worker that sends whatever its queue holds turns a burst into errors and
retries. Behind the bulkhead the excess waits in this worker, in arrival order, counted by
`waiting`; the router still chooses where each payment goes, and a status query is a call like any
other. The bound is `[psp] inflight_share_max` of the PSP's capacity (psp_sim profiles).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from gateway.psp.client import PSPClient, PSPResult, PSPStatus, PSPTimeout, PSPUnavailable


class CallObserver(Protocol):
    """Told of every PSP call that returned (the worker's metrics): PSP, operation, outcome, seconds."""

    def psp_call(self, psp: str, operation: str, outcome: str, seconds: float) -> None: ...


class Bulkhead(PSPClient):
    def __init__(self, inner: PSPClient, inflight_max: int, *, capacity_inflight: int | None = None,
                 observer: CallObserver | None = None) -> None:
        if inflight_max < 1:
            raise ValueError("a PSP bulkhead needs room for at least one call")
        self.inner = inner
        self.name = inner.name
        self.inflight_max = inflight_max
        # The PSP's own capacity (calls in flight before it degrades): what `inflight` is a share of.
        self.capacity_inflight = capacity_inflight or inflight_max
        self.observer = observer
        self._slots = asyncio.Semaphore(inflight_max)
        self.inflight = 0
        self.waiting = 0
        # Authorizations routed here and not sent yet (their intents are being recorded): counted as
        # taken, so that one batch's choices spill over to another PSP once this one is full.
        self.promised = 0

    def has_room(self) -> bool:
        return self.inflight + self.waiting + self.promised < self.inflight_max

    def promise(self) -> None:
        self.promised += 1

    async def _enter(self) -> None:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.inflight += 1

    def _leave(self, result: PSPResult | None = None) -> None:
        self.inflight -= 1
        self._slots.release()
        if self.inflight == 0 and self.waiting == 0:
            self.promised = 0  # a promise not kept (its intent was never committed) ends here
        if result is not None and self.observer is not None:
            self.observer.psp_call(self.name, result.operation, result.outcome.value, result.latency_ms / 1000)

    async def authorize(self, *, reference: str, amount: int, currency: str, token: str,
                        idempotency_key: str) -> PSPResult:
        if self.promised:
            self.promised -= 1
        await self._enter()
        result = None
        try:
            result = await self.inner.authorize(reference=reference, amount=amount, currency=currency, token=token,
                                                idempotency_key=idempotency_key)
            return result
        finally:
            self._leave(result)

    async def capture(self, *, psp_reference: str, amount: int, idempotency_key: str,
                      final: bool = False) -> PSPResult:
        await self._enter()
        result = None
        try:
            result = await self.inner.capture(psp_reference=psp_reference, amount=amount,
                                              idempotency_key=idempotency_key, final=final)
            return result
        finally:
            self._leave(result)

    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult:
        await self._enter()
        result = None
        try:
            result = await self.inner.void(psp_reference=psp_reference, idempotency_key=idempotency_key)
            return result
        finally:
            self._leave(result)

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        await self._enter()
        result = None
        try:
            result = await self.inner.refund(psp_reference=psp_reference, amount=amount,
                                             idempotency_key=idempotency_key)
            return result
        finally:
            self._leave(result)

    async def _status(self, query: dict[str, str]) -> PSPStatus | None:
        await self._enter()
        started = time.perf_counter()
        outcome = "error"
        try:
            found = await self.inner.status(**query)
            outcome = "found" if found is not None else "not_found"
            return found
        except PSPTimeout:
            outcome = "timeout"
            raise
        except PSPUnavailable:
            outcome = "unavailable"
            raise
        finally:
            self._leave()
            if self.observer is not None:
                self.observer.psp_call(self.name, "status", outcome, time.perf_counter() - started)
