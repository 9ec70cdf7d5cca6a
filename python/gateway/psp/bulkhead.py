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
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from gateway.psp.client import Done, PSPClient, PSPResult, PSPStatus, PSPTimeout, PSPUnavailable

# An inner client's `submit_authorize` or `submit_capture` with the call's arguments.
Submit = Callable[[asyncio.Future[Any], Done], None]


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

    # -- calls as callbacks (over a client that `submits()`: the in-process simulator at time scale 0) ---

    def send_authorize(self, *, reference: str, amount: int, currency: str, token: str,
                       idempotency_key: str) -> Awaitable[PSPResult]:
        if "authorize" in self.__dict__ or not self.inner.submits():
            # A client that cannot submit, or an `authorize` replaced on this bulkhead (tests inject
            # failures so): the coroutine.
            return self.authorize(reference=reference, amount=amount, currency=currency, token=token,
                                  idempotency_key=idempotency_key)
        return self._send(partial(self.inner.submit_authorize, reference=reference, amount=amount, currency=currency,
                                  token=token, idempotency_key=idempotency_key), True)

    def send_capture(self, *, psp_reference: str, amount: int, idempotency_key: str,
                     final: bool = False) -> Awaitable[PSPResult]:
        if "capture" in self.__dict__ or not self.inner.submits():
            return self.capture(psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key,
                                final=final)
        return self._send(partial(self.inner.submit_capture, psp_reference=psp_reference, amount=amount,
                                  idempotency_key=idempotency_key, final=final), False)

    def _send(self, submit: Submit, authorize: bool) -> asyncio.Future[PSPResult]:
        """`authorize` (`capture`) as a future, its task's steps as callbacks: the first step where the
        task's would run (the next turn), then the inner client's, then the result where the task's
        would be set. The bulkhead's counts and its semaphore move exactly as the coroutine moves them."""
        loop = asyncio.get_running_loop()
        call: asyncio.Future[PSPResult] = loop.create_future()
        loop.call_soon(self._start, call, submit, authorize)
        return call

    def _start(self, call: asyncio.Future[PSPResult], submit: Submit, authorize: bool) -> None:
        if call.cancelled():
            return  # a task cancelled before its first step never runs its coroutine
        if authorize and self.promised:
            self.promised -= 1
        acquire = self._slots.acquire()
        try:
            waiter = acquire.send(None)
        except StopIteration:
            self._entered(call, submit)
            return
        # No slot free: `acquire` has queued its waiter; resumed when that is done (given a slot, or
        # cancelled along with `call`, as a task's wait would be).
        self.waiting += 1
        waiter.add_done_callback(lambda _: self._resume(call, submit, acquire))
        call.add_done_callback(lambda _: call.cancelled() and waiter.cancel())

    def _resume(self, call: asyncio.Future[PSPResult], submit: Submit,
                acquire: Coroutine[Any, Any, bool]) -> None:
        self.waiting -= 1
        try:
            if call.cancelled():
                acquire.throw(asyncio.CancelledError())
            else:
                acquire.send(None)
        except StopIteration:
            self._entered(call, submit)
        except asyncio.CancelledError:
            pass  # out of the queue (a slot it had been given is passed on)

    def _entered(self, call: asyncio.Future[PSPResult], submit: Submit) -> None:
        self.inflight += 1
        try:
            submit(call, partial(self._done, call))
        except Exception as exc:  # noqa: BLE001 - raised before there was an answer: the task ends with it
            self._done(call, exc)

    def _done(self, call: asyncio.Future[PSPResult], result: PSPResult | BaseException) -> None:
        try:
            self._leave(result if isinstance(result, PSPResult) else None)
        except Exception as exc:  # noqa: BLE001 - the observer's: the task would end with it
            result = exc
        if call.done():
            return  # cancelled
        if isinstance(result, PSPResult):
            call.set_result(result)
        else:
            call.set_exception(result)

    # -- calls as coroutines -------------------------------------------------------------------------

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
