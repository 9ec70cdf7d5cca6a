"""Behaviour of the PSP simulator: latency, capacity, lost responses, idempotency, settlement."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import gateway
import httpx
import pytest
from gateway.domain.attempt import Outcome
from gateway.psp.client import HTTPPSPClient
from gateway.psp_sim import (
    DEFAULT_PROFILES,
    PSP_A,
    PSP_B,
    TEST_TOKENS,
    PSPProfile,
    ResponseLost,
    SimulatedPSP,
)
from gateway.psp_sim.client import InProcessPSPClient
from support import free_port, stop_process, wait_ready

T = TypeVar("T")
DAY = date(2025, 3, 14)
DAY_TS = datetime(2025, 3, 14, 12, 0, tzinfo=UTC).timestamp()


def auth(sim: SimulatedPSP, ref: str, key: str, token: str = "tok_visa", amount: int = 1000):
    return sim.authorize(reference=ref, amount=amount, currency="EUR", token=token, idempotency_key=key)


class SleepRecorder:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_latency_follows_profile_scaled_by_time_scale() -> None:
    sleep = SleepRecorder()
    profile = PSPProfile(name="p", fee_bps=100, fee_fixed_minor=0, latency_tail_rate=0.0)
    sim = SimulatedPSP(profile, time_scale=0.01, sleep=sleep)

    async def run() -> None:
        for i in range(50):
            await auth(sim, f"pay_{i}", f"k{i}")

    asyncio.run(run())
    assert len(sleep.calls) == 50
    # 220 ms ± 40 ms, scaled by 0.01.
    assert all(0.0018 <= s <= 0.0026 for s in sleep.calls)
    assert len(set(sleep.calls)) > 40, "jitter varies the latency"


def test_scaled_latency_is_real_and_fast() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.01)

    async def run() -> float:
        started = time.perf_counter()
        await auth(sim, "pay_1", "k1")
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    assert 0.001 <= elapsed < 0.2


def test_same_seed_gives_same_latencies_and_other_seed_differs() -> None:
    a, b, c = (SimulatedPSP(PSP_A, seed=s) for s in (7, 7, 8))
    la = [a.latency_ms("authorize", f"k{i}", i) for i in range(20)]
    assert la == [b.latency_ms("authorize", f"k{i}", i) for i in range(20)]
    assert la != [c.latency_ms("authorize", f"k{i}", i) for i in range(20)]


def test_errors_start_above_80_percent_utilisation_and_capacity_rejects_the_rest() -> None:
    profile = PSPProfile(
        name="small", fee_bps=100, fee_fixed_minor=0, capacity_inflight_max=50, overload_error_rate_max=1.0
    )
    sim = SimulatedPSP(profile, time_scale=0.001)

    async def run():
        return await asyncio.gather(*(auth(sim, f"pay_{i}", f"k{i}") for i in range(100)))

    results = asyncio.run(run())
    assert all(r.outcome == "approved" for r in results[:40]), "no errors at or below 80% utilisation"
    overloaded = [r for r in results[40:50] if r.code == "processor_overloaded"]
    assert overloaded and all(r.retryable for r in overloaded)
    assert results[49].code == "processor_overloaded", "at 100% utilisation the error rate is the maximum"
    assert all(r.code == "capacity_exceeded" and r.retryable for r in results[50:])
    # Rejected and errored requests were not processed.
    assert sim.transaction_count == sum(r.outcome == "approved" for r in results)
    assert sim.inflight == 0


def test_timeout_processes_the_charge_and_status_query_shows_it() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.0)

    async def run():
        with pytest.raises(ResponseLost):
            await auth(sim, "pay_t", "key_t", token="tok_timeout")
        status = await sim.status(idempotency_key="key_t")
        by_reference = await sim.status(reference="pay_t")
        replay = await auth(sim, "pay_t", "key_t", token="tok_timeout")
        return status, by_reference, replay

    status, by_reference, replay = asyncio.run(run())
    assert status is not None and status.status == "authorized" and status.amount_authorized == 1000
    assert by_reference == status
    # Retrying with the same key returns the stored result instead of charging again.
    assert replay.outcome == "approved" and replay.psp_reference == status.psp_reference
    assert sim.transaction_count == 1


def test_in_process_client_maps_lost_response_to_timeout_never_decline() -> None:
    client = InProcessPSPClient(SimulatedPSP(PSP_A, time_scale=0.0))

    async def run():
        return await client.authorize(
            reference="pay_t", amount=500, currency="EUR", token="tok_timeout_declined", idempotency_key="k"
        ), await client.status(idempotency_key="k")

    result, status = asyncio.run(run())
    assert result.outcome is Outcome.TIMEOUT and result.ambiguous
    assert status is not None and status.status == "declined" and status.decline_code == "do_not_honor"


def test_client_timeout_fires_when_psp_is_slower_than_the_deadline() -> None:
    slow = PSPProfile(
        name="slow", fee_bps=0, fee_fixed_minor=0, latency_ms_base=1000.0, latency_ms_jitter=0.0
    )
    client = InProcessPSPClient(SimulatedPSP(slow, time_scale=0.1), timeout_s=0.02)
    result = asyncio.run(
        client.authorize(reference="p", amount=1, currency="EUR", token="tok_visa", idempotency_key="k")
    )
    assert result.outcome is Outcome.TIMEOUT and result.code == "psp_timeout"


def test_same_idempotency_key_never_charges_twice() -> None:
    sim = SimulatedPSP(PSP_B, time_scale=0.0)

    async def run():
        first = await auth(sim, "pay_1", "k1")
        again = await auth(sim, "pay_1", "k1")
        changed = await auth(sim, "pay_1", "k1", amount=999)
        cap1 = await sim.capture(psp_reference=first.psp_reference, amount=400, idempotency_key="c1")
        cap2 = await sim.capture(psp_reference=first.psp_reference, amount=400, idempotency_key="c1")
        status = await sim.status(psp_reference=first.psp_reference)
        return first, again, changed, cap1, cap2, status

    first, again, changed, cap1, cap2, status = asyncio.run(run())
    assert again == first and sim.transaction_count == 1
    assert changed.outcome == "error" and changed.code == "idempotency_key_reused" and not changed.retryable
    assert cap1 == cap2 and status.amount_captured == 400
    assert len(sim.settlement_lines()) == 1


def test_a_restarted_simulator_never_reuses_a_reference_and_knows_none_of_the_old_ones() -> None:
    # The embedded worker child's simulators die with it; the new ones must not hand a new transaction
    # the reference of an old one (a capture resumed after the restart would land on the wrong payment).
    old = SimulatedPSP(PSP_B, time_scale=0.0, clock=lambda: DAY_TS)
    new = SimulatedPSP(PSP_B, time_scale=0.0, clock=lambda: DAY_TS + 1.5)

    async def run():
        before = await auth(old, "pay_1", "pay_1:auth:1")
        after = await auth(new, "pay_2", "pay_2:auth:1")
        resumed = await new.capture(psp_reference=before.psp_reference, amount=1000, idempotency_key="pay_1:capture:1")
        own = await new.capture(psp_reference=after.psp_reference, amount=1000, idempotency_key="pay_2:capture:1")
        return before, after, resumed, own

    before, after, resumed, own = asyncio.run(run())
    assert before.outcome == after.outcome == "approved"
    assert before.psp_reference != after.psp_reference
    assert resumed.outcome == "error" and resumed.code == "no_such_transaction"
    assert own.outcome == "approved"


def test_concurrent_request_with_same_key_is_refused_while_in_flight() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.001)

    async def run():
        return await asyncio.gather(auth(sim, "p", "same"), auth(sim, "p", "same"))

    first, second = asyncio.run(run())
    assert first.outcome == "approved"
    assert second.code == "request_in_progress" and second.retryable
    assert sim.transaction_count == 1


@pytest.mark.parametrize(
    ("token", "outcome", "code"),
    [
        ("tok_decline_insufficient_funds", "soft_decline", "insufficient_funds"),
        ("tok_decline_do_not_honor", "soft_decline", "do_not_honor"),
        ("tok_decline_stolen", "hard_decline", "stolen_card"),
        ("tok_decline_lost", "hard_decline", "lost_card"),
        ("tok_decline_expired", "hard_decline", "expired_card"),
        ("tok_decline_generic", "hard_decline", "generic_decline"),
        ("tok_decline_fraudulent", "hard_decline", "fraudulent"),
        ("tok_psp_error", "error", "processor_unavailable"),
        ("tok_visa", "approved", None),
        ("tok_anything_else", "approved", None),
    ],
)
def test_test_tokens_choose_the_outcome(token: str, outcome: str, code: str | None) -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.0)
    result = asyncio.run(auth(sim, "pay_1", "k1", token=token))
    assert (result.outcome, result.code) == (outcome, code)
    assert token not in TEST_TOKENS or TEST_TOKENS[token].code == code or outcome == "approved"


def test_error_once_token_fails_first_then_succeeds() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.0)

    async def run():
        return await auth(sim, "p", "k1", "tok_psp_error_once"), await auth(
            sim, "p", "k2", "tok_psp_error_once"
        )

    first, second = asyncio.run(run())
    assert first.outcome == "error" and first.retryable
    assert second.outcome == "approved"
    assert sim.transaction_count == 1


def test_capture_void_refund_rules_at_the_psp() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.0)

    async def run():
        a = await auth(sim, "p1", "a1")
        ref = a.psp_reference
        too_much = await sim.capture(psp_reference=ref, amount=1001, idempotency_key="c0")
        c1 = await sim.capture(psp_reference=ref, amount=300, idempotency_key="c1")
        void_after_capture = await sim.void(psp_reference=ref, idempotency_key="v1")
        over_refund = await sim.refund(psp_reference=ref, amount=301, idempotency_key="r0")
        r1 = await sim.refund(psp_reference=ref, amount=100, idempotency_key="r1")
        r2 = await sim.refund(psp_reference=ref, amount=200, idempotency_key="r2")
        capture_after_refund = await sim.capture(psp_reference=ref, amount=10, idempotency_key="c2")
        b = await auth(sim, "p2", "a2")
        v = await sim.void(psp_reference=b.psp_reference, idempotency_key="v2")
        unknown = await sim.capture(psp_reference="nope", amount=1, idempotency_key="c3")
        return too_much, c1, void_after_capture, over_refund, r1, r2, capture_after_refund, v, unknown

    too_much, c1, void_after, over_refund, r1, r2, cap_after_refund, v, unknown = asyncio.run(run())
    assert too_much.code == "amount_exceeds_capturable"
    assert c1.outcome == "approved" and c1.fee_minor == PSP_A.fee_minor(300)
    assert void_after.code == "invalid_state"
    assert over_refund.code == "amount_exceeds_refundable"
    assert (r1.status, r2.status) == ("partially_refunded", "refunded")
    assert cap_after_refund.code == "invalid_state"
    assert v.outcome == "approved" and v.status == "voided"
    assert unknown.code == "no_such_transaction"


def test_settlement_csv_lists_captures_with_fees_and_refunds_for_the_day() -> None:
    now = [DAY_TS]
    sim = SimulatedPSP(PSP_A, time_scale=0.0, clock=lambda: now[0])

    async def run() -> None:
        a = await auth(sim, "pay_1", "a1", amount=10_000)
        await sim.capture(psp_reference=a.psp_reference, amount=6_000, idempotency_key="c1")
        await sim.capture(psp_reference=a.psp_reference, amount=4_000, idempotency_key="c2")
        await sim.refund(psp_reference=a.psp_reference, amount=2_500, idempotency_key="r1")
        now[0] += 86_400
        b = await auth(sim, "pay_2", "a2", amount=500)
        await sim.capture(psp_reference=b.psp_reference, amount=500, idempotency_key="c3")

    asyncio.run(run())
    # psp_a: 150 bps + 10 minor units per capture.
    assert sim.settlement_csv(DAY) == (
        "reference,amount,currency,fee,net,status\n"
        "pay_1,6000,EUR,100,5900,captured\n"
        "pay_1,4000,EUR,70,3930,captured\n"
        "pay_1,-2500,EUR,0,-2500,refunded\n"
    )
    assert sim.settlement_csv(date(2025, 3, 15)) == (
        "reference,amount,currency,fee,net,status\npay_2,500,EUR,18,482,captured\n"
    )


def test_stored_transactions_are_bounded_with_a_clear_error() -> None:
    sim = SimulatedPSP(PSP_A, time_scale=0.0, transactions_max=2)

    async def run():
        return [await auth(sim, f"p{i}", f"k{i}") for i in range(3)]

    results = asyncio.run(run())
    assert [r.outcome for r in results[:2]] == ["approved", "approved"]
    assert results[2].code == "simulator_storage_full" and not results[2].retryable
    assert "transactions_max=2" in (results[2].message or "")
    assert sim.transaction_count == 2


def test_profiles_differ_in_cost_latency_and_reliability() -> None:
    a, b, c = DEFAULT_PROFILES["psp_a"], DEFAULT_PROFILES["psp_b"], DEFAULT_PROFILES["psp_c"]
    assert a.fee_minor(10_000) < b.fee_minor(10_000)
    assert b.latency_ms_base < a.latency_ms_base
    assert c.error_rate > 0 and c.timeout_rate > 0 and a.error_rate == b.error_rate == 0


# -- HTTP transport, black box: a real granian process on a real port ---------------------------


@pytest.fixture(scope="module")
def sim_server() -> Iterator[str]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(gateway.__file__).parents[1]), env.get("PYTHONPATH")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.psp_sim", "--port", str(port), "--time-scale", "0.01", "--seed", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/health", proc, "simulator", 20, poll_s=0.1)
        yield base
    finally:
        stop_process(proc, 10)


def over_http(base: str, psp: str, timeout_s: float,
              steps: Callable[[HTTPPSPClient, httpx.AsyncClient], Awaitable[T]]) -> T:
    """Runs `steps` with an `HTTPPSPClient` of `psp` at `base` and an HTTP client of the test's own."""
    async def run() -> T:
        client = HTTPPSPClient(base, psp, timeout_s=timeout_s)
        try:
            async with httpx.AsyncClient() as http:
                return await steps(client, http)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_http_authorize_capture_refund_and_settlement(sim_server: str) -> None:
    async def steps(client: HTTPPSPClient, http: httpx.AsyncClient) -> tuple[Any, ...]:
        a = await client.authorize(
            reference="http_1", amount=2000, currency="USD", token="tok_visa", idempotency_key="h_a1"
        )
        again = await client.authorize(
            reference="http_1", amount=2000, currency="USD", token="tok_visa", idempotency_key="h_a1"
        )
        c = await client.capture(psp_reference=a.psp_reference, amount=2000, idempotency_key="h_c1")
        r = await client.refund(psp_reference=a.psp_reference, amount=500, idempotency_key="h_r1")
        declined = await client.authorize(
            reference="http_2",
            amount=100,
            currency="USD",
            token="tok_decline_stolen",
            idempotency_key="h_a2",
        )
        status = await client.status(reference="http_1")
        missing = await client.status(idempotency_key="never_used")
        csv_text = (await http.get(f"{sim_server}/v1/psp_b/settlement/{date.today()}.csv")).text
        return a, again, c, r, declined, status, missing, csv_text

    a, again, c, r, declined, status, missing, csv_text = over_http(sim_server, "psp_b", 2.0, steps)
    assert a.outcome is Outcome.APPROVED and again.psp_reference == a.psp_reference
    assert c.outcome is Outcome.APPROVED and c.fee_minor == PSP_B.fee_minor(2000)
    assert r.outcome is Outcome.APPROVED
    assert declined.outcome is Outcome.HARD_DECLINE and declined.code == "stolen_card"
    assert status is not None and (status.amount_captured, status.amount_refunded) == (2000, 500)
    assert missing is None
    fee = PSP_B.fee_minor(2000)
    assert f"http_1,2000,USD,{fee},{2000 - fee},captured" in csv_text
    assert "http_1,-500,USD,0,-500,refunded" in csv_text


def test_http_lost_response_is_a_timeout_and_status_shows_the_charge(sim_server: str) -> None:
    async def steps(client: HTTPPSPClient, _http: httpx.AsyncClient) -> tuple[Any, ...]:
        result = await client.authorize(
            reference="http_t", amount=700, currency="EUR", token="tok_timeout", idempotency_key="h_t1"
        )
        status = await client.status(idempotency_key="h_t1")
        return result, status

    # The lost response hangs for 30 s × 0.01; the client gives up after 0.1 s.
    result, status = over_http(sim_server, "psp_a", 0.1, steps)
    assert result.outcome is Outcome.TIMEOUT
    assert status is not None and status.status == "authorized" and status.amount_authorized == 700


def test_http_unreachable_psp_is_a_retryable_error_not_a_timeout() -> None:
    async def steps(client: HTTPPSPClient, _http: httpx.AsyncClient) -> Any:
        return await client.authorize(reference="p", amount=1, currency="EUR", token="tok_visa", idempotency_key="k")

    result = over_http(f"http://127.0.0.1:{free_port()}", "psp_a", 1.0, steps)
    assert result.outcome is Outcome.ERROR and result.retryable
