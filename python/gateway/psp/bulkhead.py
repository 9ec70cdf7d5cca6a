"""A bulkhead per PSP: at most `inflight_max` calls to one PSP at a time from this worker.

A PSP degrades before its capacity (the simulator's errors start at 80% utilisation, as real
processors' do), so a worker that sends whatever its queue holds turns a burst into errors and
retries. Behind the bulkhead the excess waits in this worker, in arrival order, counted by
`waiting`; the router still chooses where each payment goes, and a status query is a call like any
other. The bound is `[psp] inflight_share_max` of the PSP's capacity (psp_sim profiles).
"""

from __future__ import annotations

import asyncio

from gateway.psp.client import PSPClient, PSPResult, PSPStatus


class Bulkhead(PSPClient):
    def __init__(self, inner: PSPClient, inflight_max: int) -> None:
        if inflight_max < 1:
            raise ValueError("a PSP bulkhead needs room for at least one call")
        self.inner = inner
        self.name = inner.name
        self.inflight_max = inflight_max
        self._slots = asyncio.Semaphore(inflight_max)
        self.inflight = 0
        self.waiting = 0

    async def _enter(self) -> None:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.inflight += 1

    def _leave(self) -> None:
        self.inflight -= 1
        self._slots.release()

    async def authorize(self, *, reference: str, amount: int, currency: str, token: str,
                        idempotency_key: str) -> PSPResult:
        await self._enter()
        try:
            return await self.inner.authorize(reference=reference, amount=amount, currency=currency, token=token,
                                              idempotency_key=idempotency_key)
        finally:
            self._leave()

    async def capture(self, *, psp_reference: str, amount: int, idempotency_key: str,
                      final: bool = False) -> PSPResult:
        await self._enter()
        try:
            return await self.inner.capture(psp_reference=psp_reference, amount=amount,
                                            idempotency_key=idempotency_key, final=final)
        finally:
            self._leave()

    async def void(self, *, psp_reference: str, idempotency_key: str) -> PSPResult:
        await self._enter()
        try:
            return await self.inner.void(psp_reference=psp_reference, idempotency_key=idempotency_key)
        finally:
            self._leave()

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        await self._enter()
        try:
            return await self.inner.refund(psp_reference=psp_reference, amount=amount,
                                           idempotency_key=idempotency_key)
        finally:
            self._leave()

    async def _status(self, query: dict[str, str]) -> PSPStatus | None:
        await self._enter()
        try:
            return await self.inner.status(**query)
        finally:
            self._leave()
