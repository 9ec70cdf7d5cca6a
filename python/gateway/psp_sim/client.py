"""`InProcessPSPClient`: the `PSPClient` interface over a `SimulatedPSP` in the same event loop.

It lives with the simulator, not in psp/, so that psp/ never imports psp_sim/: the gateway's code
sees only the `PSPClient` interface, and only the runtime (and tests) choose this implementation.
The timeout rules are those of the HTTP client: no answer within `timeout_s`, or a response the
simulator lost, is a TIMEOUT (the effect is unknown), never an error or a decline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

from gateway.domain.attempt import Outcome
from gateway.psp.client import (
    TIMEOUT_S_DEFAULT,
    Done,
    PSPClient,
    PSPResult,
    PSPStatus,
    PSPTimeout,
    failure_of,
    result_of,
)
from gateway.psp.wire import Response

from .core import ResponseLost, SimulatedPSP

_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


def _outcome(value: str) -> Outcome:
    """`Outcome(value)` without the enum's call (a dict lookup; anything else raises as that would)."""
    return _OUTCOMES.get(value) or Outcome(value)


class InProcessPSPClient(PSPClient):
    """Calls a `SimulatedPSP` in the same event loop, with the same timeout rules as HTTP."""

    def __init__(self, sim: SimulatedPSP, *, timeout_s: float = TIMEOUT_S_DEFAULT) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.sim = sim
        self.name = sim.name
        self.timeout_s = timeout_s

    async def _run(self, operation: str, key: str, call: Awaitable[Response]) -> PSPResult:
        started = time.perf_counter()
        try:
            if self.sim.answers_at_once():
                # At time scale 0 the answer comes within a turn or two of the loop (the latency's, a lost
                # answer's hang): nothing for a timeout to bound.
                response = await call
            else:
                # A timeout scope on this task (no second task per call, as wait_for would make).
                async with asyncio.timeout(self.timeout_s):
                    response = await call
        except (TimeoutError, ResponseLost):
            return self._timed_out(operation, key, started)
        return result_of(response, _outcome(response.outcome), response.psp, response.operation, key, started)

    def _timed_out(self, operation: str, key: str, started: float) -> PSPResult:
        message = f"no answer from {self.name} within {self.timeout_s} s"
        return failure_of(Outcome.TIMEOUT, self.name, operation, key, started, "psp_timeout", message)

    def _answered(self, done: Done, operation: str, key: str, started: float,
                  answer: Response | BaseException) -> None:
        """What `_run` makes of the simulator's answer (or exception) to a submitted call, to `done`."""
        if isinstance(answer, Response):
            done(result_of(answer, _outcome(answer.outcome), answer.psp, answer.operation, key, started))
        elif isinstance(answer, TimeoutError | ResponseLost):
            done(self._timed_out(operation, key, started))
        else:
            done(answer)

    def submits(self) -> bool:
        return self.sim.answers_at_once()

    def submit_authorize(
        self, call: asyncio.Future[Any], done: Done, *, reference: str, amount: int, currency: str, token: str,
        idempotency_key: str,
    ) -> None:
        started = time.perf_counter()
        self.sim.submit_authorize(call, partial(self._answered, done, "authorize", idempotency_key, started),
                                  reference=reference, amount=amount, currency=currency, token=token,
                                  idempotency_key=idempotency_key)

    def submit_capture(
        self, call: asyncio.Future[Any], done: Done, *, psp_reference: str, amount: int, idempotency_key: str,
        final: bool = False,
    ) -> None:
        started = time.perf_counter()
        self.sim.submit_capture(call, partial(self._answered, done, "capture", idempotency_key, started),
                                psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key,
                                final=final)

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
        call = self.sim.void(psp_reference=psp_reference, idempotency_key=idempotency_key)
        return await self._run("void", idempotency_key, call)

    async def refund(self, *, psp_reference: str, amount: int, idempotency_key: str) -> PSPResult:
        call = self.sim.refund(psp_reference=psp_reference, amount=amount, idempotency_key=idempotency_key)
        return await self._run("refund", idempotency_key, call)

    async def _status(self, query: dict[str, str]) -> PSPStatus | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.sim.status(**query)
        except TimeoutError as exc:
            raise PSPTimeout(f"status query to {self.name} timed out") from exc
