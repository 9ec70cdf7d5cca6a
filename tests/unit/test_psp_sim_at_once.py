"""At time scale 0 a bulkhead over the in-process simulator runs its authorizations and captures as the
event loop's callbacks (`send_authorize`, `send_capture`) instead of a task each: the results, the
simulator's state and draws, the bulkhead's counts and the order of everything else on the loop must be
what the coroutines (one task per call) give."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from typing import Any

import pytest
from gateway.domain.attempt import AttemptRow, AttemptStatus, Outcome
from gateway.processing.attempts import finish_attempt
from gateway.psp.bulkhead import Bulkhead
from gateway.psp.client import PSPResult
from gateway.psp_sim import PSPProfile, SimulatedPSP
from gateway.psp_sim.client import InProcessPSPClient

# Small enough that a batch of calls overloads it (errors above 50 % of capacity) and exceeds it.
PROFILE = PSPProfile(name="psp_t", fee_bps=100, fee_fixed_minor=5, capacity_inflight_max=24,
                     overload_utilisation_threshold=0.5, overload_error_rate_max=0.9, error_rate=0.1,
                     timeout_rate=0.05)
TOKENS = ("tok_visa", "tok_decline_insufficient_funds", "tok_decline_stolen", "tok_timeout", "tok_psp_error",
          "tok_psp_error_once", "tok_timeout_capture", "tok_visa")


def _setup(inflight_max: int) -> tuple[SimulatedPSP, Bulkhead, list[tuple[str, Any]]]:
    sim = SimulatedPSP(PROFILE, seed=7, time_scale=0, clock=lambda: 1_700_000_000.0)
    observed: list[tuple[str, Any]] = []

    class Observer:
        def psp_call(self, psp: str, operation: str, outcome: str, seconds: float) -> None:
            observed.append(("call", (operation, outcome)))

    return sim, Bulkhead(InProcessPSPClient(sim), inflight_max, observer=Observer()), observed


def _shape(r: PSPResult) -> tuple[object, ...]:
    return dataclasses.astuple(dataclasses.replace(r, latency_ms=0.0))


async def _watch(sim: SimulatedPSP, bulkhead: Bulkhead, observed: list[tuple[str, Any]], stop: list[bool]) -> None:
    """What the simulator and the bulkhead hold at every turn of the loop."""
    while not stop:
        observed.append(("turn", (sim.inflight, bulkhead.inflight, bulkhead.waiting)))
        await asyncio.sleep(0)


def _run(fast: bool, inflight_max: int) -> tuple[list[Any], SimulatedPSP, list[tuple[str, Any]]]:
    async def main() -> tuple[list[Any], SimulatedPSP, list[tuple[str, Any]]]:
        sim, bulkhead, observed = _setup(inflight_max)
        stop: list[bool] = []
        watcher = asyncio.ensure_future(_watch(sim, bulkhead, observed, stop))
        await asyncio.sleep(0)

        def authorize(i: int, key: str) -> Awaitable[PSPResult]:
            kw: dict[str, Any] = {"reference": f"pay_{i}", "amount": 1000 + i, "currency": "EUR",
                                  "token": TOKENS[i % len(TOKENS)], "idempotency_key": key}
            return bulkhead.send_authorize(**kw) if fast else bulkhead.authorize(**kw)

        # Repeated keys: in progress while the first is in flight, replayed once it is stored.
        keys = [f"k{i}" for i in range(40)] + ["k1", "k2"]
        first = await asyncio.gather(*(authorize(i % 40, k) for i, k in enumerate(keys)), return_exceptions=True)
        again = await asyncio.gather(*(authorize(i, f"k{i}") for i in range(5)), return_exceptions=True)
        approved = [r for r in first if isinstance(r, PSPResult) and r.outcome is Outcome.APPROVED]

        def capture(r: PSPResult, n: int) -> Awaitable[PSPResult]:
            kw: dict[str, Any] = {"psp_reference": r.psp_reference, "amount": 500,
                                  "idempotency_key": f"c{n}:{r.psp_reference}", "final": n % 2 == 0}
            return bulkhead.send_capture(**kw) if fast else bulkhead.capture(**kw)

        captured = await asyncio.gather(*(capture(r, n) for n in range(2) for r in approved), return_exceptions=True)
        stop.append(True)
        await watcher
        results = [_shape(r) if isinstance(r, PSPResult) else repr(r) for r in [*first, *again, *captured]]
        assert bulkhead.inflight == bulkhead.waiting == 0 and sim.inflight == 0
        return results, sim, observed

    return asyncio.run(main())


@pytest.mark.parametrize("inflight_max", [64, 5])
def test_calls_as_callbacks_give_what_the_coroutines_give(inflight_max: int) -> None:
    slow, slow_sim, slow_observed = _run(False, inflight_max)
    fast, fast_sim, fast_observed = _run(True, inflight_max)
    assert fast == slow
    outcomes = {r[0] for r in slow}
    assert {Outcome.APPROVED, Outcome.ERROR, Outcome.TIMEOUT, Outcome.HARD_DECLINE} <= outcomes, outcomes
    codes = {r[4] for r in slow}
    if inflight_max == 64:  # at 64 the simulator is overloaded and over capacity; at 5 the bulkhead queues
        assert {"processor_overloaded", "capacity_exceeded", "request_in_progress"} <= codes, codes
    else:
        assert any(kind == "turn" and state[2] > 0 for kind, state in slow_observed)
    # The same order of everything on the loop: each turn's counts, each call's end.
    assert fast_observed == slow_observed
    assert fast_sim._sequence == slow_sim._sequence and fast_sim.transaction_count == slow_sim.transaction_count
    assert fast_sim.settlement_lines() == slow_sim.settlement_lines()


def test_a_call_cancelled_before_its_answer_is_not_processed() -> None:
    async def main() -> None:
        sim, bulkhead, _ = _setup(1)
        first = bulkhead.send_authorize(reference="pay_1", amount=1000, currency="EUR", token="tok_visa",
                                        idempotency_key="a")
        queued = bulkhead.send_authorize(reference="pay_2", amount=1000, currency="EUR", token="tok_visa",
                                         idempotency_key="b")
        assert isinstance(first, asyncio.Future) and isinstance(queued, asyncio.Future)
        await asyncio.sleep(0)  # both started: the first in flight at the simulator, the second queued
        assert (sim.inflight, bulkhead.inflight, bulkhead.waiting) == (1, 1, 1)
        first.cancel()
        queued.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (sim.inflight, bulkhead.inflight, bulkhead.waiting) == (0, 0, 0)
        assert sim.transaction_count == 0
        # The key is free again (nothing stored) and the slot too.
        again = await bulkhead.send_authorize(reference="pay_1", amount=1000, currency="EUR", token="tok_visa",
                                              idempotency_key="a")
        assert again.outcome is Outcome.APPROVED and sim.transaction_count == 1

    asyncio.run(main())


def test_other_clients_and_time_scales_keep_the_coroutine() -> None:
    async def main() -> None:
        sim = SimulatedPSP(PROFILE, time_scale=0.001)
        bulkhead = Bulkhead(InProcessPSPClient(sim), 4)
        call = bulkhead.send_authorize(reference="pay_1", amount=1000, currency="EUR", token="tok_visa",
                                       idempotency_key="a")
        assert asyncio.iscoroutine(call)
        assert (await call).outcome is Outcome.APPROVED

    asyncio.run(main())


def test_finish_attempt_keeps_every_field_of_the_started_row() -> None:
    row = AttemptRow(attempt_id="a#1", payment_id="pay_1", attempt_no=1, operation="capture", psp="psp_a",
                     idempotency_key="a", amount=10, currency="EUR", status=AttemptStatus.STARTED,
                     started_at_ms=5, final_capture=True, psp_reference="ref")
    result = PSPResult(outcome=Outcome.APPROVED, psp="psp_a", operation="capture", idempotency_key="a",
                       code="c", fee_minor=3, latency_ms=1.5)
    assert finish_attempt(row, result, 9) == dataclasses.replace(
        row, status=AttemptStatus.APPROVED, code="c", fee_minor=3, latency_ms=1.5, finished_at_ms=9)
