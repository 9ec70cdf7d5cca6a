"""Router scoring, circuit breakers, retry rules and the worker-facing orchestration."""

from __future__ import annotations

import asyncio
import random

import pytest
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptStatus, Outcome, attempt_idempotency_key
from gateway.processing.authorize import process_authorization
from gateway.processing.operations import process_capture, process_refund, process_void
from gateway.processing.resolve import resolve_pending
from gateway.psp.breaker import BreakerConfig, BreakerState, CircuitBreaker
from gateway.psp.client import PSPResult
from gateway.psp.routing import Action, PSPRoute, RetryPolicy, Router
from gateway.psp_sim import PSP_A, PSP_B, PSP_C, PSPProfile, SimulatedPSP
from gateway.psp_sim.client import InProcessPSPClient

T0 = 1_700_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def result(psp: str, outcome: Outcome, latency_ms: float = 100.0, retryable: bool = True) -> PSPResult:
    return PSPResult(
        outcome=outcome,
        psp=psp,
        operation="authorize",
        idempotency_key="k",
        retryable=retryable,
        latency_ms=latency_ms,
    )


ROUTES = [
    PSPRoute("psp_a", fee_bps=150, fee_fixed_minor=10, latency_ms_expected=260),
    PSPRoute("psp_b", fee_bps=290, fee_fixed_minor=30, latency_ms_expected=120),
    PSPRoute("psp_c", fee_bps=120, fee_fixed_minor=5, latency_ms_expected=220),
]


# -- scoring ------------------------------------------------------------------------------------


def test_cheaper_psp_wins_when_health_and_latency_are_equal() -> None:
    router = Router([PSPRoute("cheap", 100, 0, 200), PSPRoute("dear", 300, 0, 200)])
    assert router.rank(10_000) == ["cheap", "dear"]


def test_faster_psp_wins_when_cost_and_health_are_equal() -> None:
    router = Router([PSPRoute("slow", 200, 0), PSPRoute("fast", 200, 0)])
    for _ in range(20):
        router.record(result("slow", Outcome.APPROVED, latency_ms=400))
        router.record(result("fast", Outcome.APPROVED, latency_ms=80))
    assert router.rank(10_000) == ["fast", "slow"]


def test_recent_failures_push_a_cheap_psp_below_a_healthy_one() -> None:
    router = Router(
        ROUTES, breaker=BreakerConfig(consecutive_failures_max=1000, calls_min=1000, window_calls=1000)
    )
    assert router.rank(10_000)[0] == "psp_c", "cheapest first while all are healthy"
    for i in range(30):
        router.record(result("psp_c", Outcome.ERROR if i % 3 else Outcome.APPROVED))
        router.record(result("psp_a", Outcome.APPROVED, latency_ms=260))
        router.record(result("psp_b", Outcome.APPROVED, latency_ms=120))
    ranking = router.rank(10_000)
    assert ranking[-1] == "psp_c"
    assert router.success_rate("psp_c") < 0.5 < router.success_rate("psp_a")


def test_declines_do_not_count_against_a_psp_but_timeouts_do() -> None:
    router = Router(ROUTES)
    for _ in range(10):
        router.record(result("psp_a", Outcome.HARD_DECLINE))
        router.record(result("psp_b", Outcome.TIMEOUT))
    assert router.success_rate("psp_a") > 0.95 > router.success_rate("psp_b")


def test_fixed_fee_weighs_more_on_small_amounts() -> None:
    route = PSPRoute("x", fee_bps=100, fee_fixed_minor=30)
    assert route.cost_bps(100) == 100 + 3000
    assert route.cost_bps(100_000) == 103


# -- circuit breaker ----------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures_max=3, cooldown_s=30), clock)
    for _ in range(2):
        breaker.record(False)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.t += 29.9
    assert breaker.state is BreakerState.OPEN
    clock.t += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow(), "one probe is let through"
    assert not breaker.allow(), "only one probe at a time"
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_failed_probe_reopens_the_breaker_for_another_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures_max=1, cooldown_s=10), clock)
    breaker.record(False)
    clock.t += 10
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN
    clock.t += 9
    assert not breaker.can_try()
    clock.t += 1
    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_opens_on_failure_ratio_over_the_window() -> None:
    breaker = CircuitBreaker(
        BreakerConfig(
            window_calls=10, calls_min=10, failure_ratio_threshold=0.5, consecutive_failures_max=100
        ),
        FakeClock(),
    )
    for i in range(9):
        breaker.record(i % 2 == 0)  # 5 successes, 4 failures
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)  # 5 of 10 failed
    assert breaker.state is BreakerState.OPEN


def test_router_skips_psps_with_open_breakers() -> None:
    clock = FakeClock()
    router = Router(ROUTES, breaker=BreakerConfig(consecutive_failures_max=2, cooldown_s=5), clock=clock)
    router.record(result("psp_c", Outcome.ERROR))
    router.record(result("psp_c", Outcome.ERROR))
    assert "psp_c" not in router.rank(10_000)
    clock.t += 5
    assert "psp_c" in router.rank(10_000)


# -- retry policy -------------------------------------------------------------------------------


def test_retry_policy_rules() -> None:
    policy = RetryPolicy(attempts_max=4, soft_decline_retries_max=1)
    rng = random.Random(1)
    assert policy.decide(result("a", Outcome.APPROVED), 1, 0, rng).action is Action.STOP
    assert policy.decide(result("a", Outcome.HARD_DECLINE), 1, 0, rng).action is Action.STOP
    assert policy.decide(result("a", Outcome.TIMEOUT), 1, 0, rng).action is Action.RESOLVE
    assert policy.decide(result("a", Outcome.ERROR), 1, 0, rng).action is Action.FAILOVER
    assert policy.decide(result("a", Outcome.ERROR, retryable=False), 1, 0, rng).action is Action.STOP
    assert policy.decide(result("a", Outcome.ERROR), 4, 0, rng).action is Action.STOP
    assert policy.decide(result("a", Outcome.SOFT_DECLINE), 1, 1, rng).action is Action.RETRY_SAME
    assert policy.decide(result("a", Outcome.SOFT_DECLINE), 2, 2, rng).action is Action.STOP


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(backoff_ms_base=100, backoff_ms_max=1000, multiplier=2)
    rng = random.Random(3)
    for retry_no, cap in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)]:
        delays = [policy.backoff_ms(retry_no, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


def test_attempt_keys_are_derived_from_payment_and_attempt() -> None:
    assert attempt_idempotency_key("pay_1", 1) == "pay_1:auth:1"
    assert attempt_idempotency_key("pay_1", 2) != attempt_idempotency_key("pay_1", 1)


# -- orchestration over in-process simulators -----------------------------------------------------


class Env:
    """Three in-process simulated PSPs at time_scale 0, a router and recorders."""

    def __init__(self, profiles: list[PSPProfile] | None = None) -> None:
        profiles = profiles or [
            PSP_A,
            PSP_B,
            PSP_C.__class__(**{**_fields(PSP_C), "error_rate": 0.0, "timeout_rate": 0.0}),
        ]
        self.sims = {p.name: SimulatedPSP(p, time_scale=0.0) for p in profiles}
        self.clients = {n: InProcessPSPClient(s) for n, s in self.sims.items()}
        self.router = Router(
            [PSPRoute(p.name, p.fee_bps, p.fee_fixed_minor, p.latency_ms_base) for p in profiles]
        )
        self.sleeps: list[float] = []
        self.intents: list[tuple[str, int]] = []
        self.ms = T0

    def now(self) -> int:
        self.ms += 1
        return self.ms

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def record_intent(self, row) -> None:
        # Intent is persisted before the PSP sees the request.
        self.intents.append((row.attempt_id, self.sims[row.psp].transaction_count))

    def authorize(self, token: str, payment: sm.Payment | None = None, **kw):
        payment = payment or sm.new_payment("pay_1", "m_1", 10_000, "EUR")
        return asyncio.run(
            process_authorization(
                payment,
                self.router,
                self.clients,
                self.now,
                token=token,
                sleep=self.sleep,
                record_intent=self.record_intent,
                **kw,
            )
        )


def _fields(p: PSPProfile) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def test_approved_authorization_returns_rows_transition_and_hold() -> None:
    env = Env()
    out = env.authorize("tok_visa")
    assert out.outcome is Outcome.APPROVED and out.payment.status is sm.PaymentStatus.AUTHORIZED
    assert [a.status for a in out.attempts] == [AttemptStatus.STARTED, AttemptStatus.APPROVED]
    assert out.attempts[0].attempt_id == out.attempts[1].attempt_id == "pay_1:auth:1"
    assert env.intents == [("pay_1:auth:1", 0)]
    assert [(a.old_status, a.new_status) for a in out.audit_rows] == [("processing", "authorized")]
    [hold] = out.postings
    assert hold.kind is ledger.PostingKind.AUTHORIZATION_HOLD and hold.amount == 10_000


def test_retryable_error_fails_over_to_the_next_psp_with_a_new_key() -> None:
    broken_a = PSPProfile(**{**_fields(PSP_A), "fee_bps": 1, "error_rate": 1.0})
    env = Env([broken_a, PSP_B])
    out = env.authorize("tok_visa")
    finished = [a for a in out.attempts if a.status is not AttemptStatus.STARTED]
    assert [(a.psp, a.status) for a in finished] == [
        ("psp_a", AttemptStatus.ERROR),
        ("psp_b", AttemptStatus.APPROVED),
    ]
    assert finished[0].idempotency_key != finished[1].idempotency_key
    assert out.payment.status is sm.PaymentStatus.AUTHORIZED and out.payment.psp == "psp_b"
    assert env.sleeps == [], "failover to another PSP does not wait"


def test_errors_everywhere_exhaust_attempts_and_fail_without_charging() -> None:
    env = Env()
    out = env.authorize("tok_psp_error", policy=RetryPolicy(attempts_max=4))
    finished = [a for a in out.attempts if a.status is not AttemptStatus.STARTED]
    assert len(finished) == 4 and all(a.status is AttemptStatus.ERROR for a in finished)
    assert {a.psp for a in finished} == {"psp_a", "psp_b", "psp_c"}
    assert len(env.sleeps) == 1, "after trying every PSP, back off before starting over"
    assert (
        out.payment.status is sm.PaymentStatus.FAILED and out.payment.failure_code == "processor_unavailable"
    )
    assert out.postings == [] and all(s.transaction_count == 0 for s in env.sims.values())


def test_timeout_never_fails_over_and_goes_to_pending_verification() -> None:
    env = Env()
    out = env.authorize("tok_timeout")
    assert out.outcome is Outcome.TIMEOUT and out.payment.status is sm.PaymentStatus.PENDING_VERIFICATION
    assert [a.status for a in out.attempts] == [AttemptStatus.STARTED, AttemptStatus.TIMEOUT]
    assert out.postings == [], "nothing is assumed: no hold, no decline"
    assert sum(s.transaction_count for s in env.sims.values()) == 1

    resolved = asyncio.run(
        resolve_pending(out.payment, out.attempts[-1], env.clients[out.payment.psp], env.now)
    )
    assert resolved.outcome is Outcome.APPROVED and resolved.payment.status is sm.PaymentStatus.AUTHORIZED
    assert [p.kind for p in resolved.postings] == [ledger.PostingKind.AUTHORIZATION_HOLD]
    assert resolved.attempts[0].status is AttemptStatus.APPROVED


def test_pending_payment_resolves_to_failed_when_the_psp_declined() -> None:
    env = Env()
    out = env.authorize("tok_timeout_declined")
    resolved = asyncio.run(
        resolve_pending(out.payment, out.attempts[-1], env.clients[out.payment.psp], env.now)
    )
    assert (
        resolved.payment.status is sm.PaymentStatus.FAILED and resolved.payment.failure_code == "do_not_honor"
    )
    assert resolved.postings == []


def test_started_attempt_unknown_to_the_psp_resolves_to_failed() -> None:
    env = Env()
    payment = sm.mark_pending_verification(
        sm.new_payment("pay_2", "m", 100, "EUR"), psp="psp_a", actor="w", at_ms=T0
    ).payment
    attempt = (
        env.authorize("tok_visa")
        .attempts[0]
        .__class__(
            attempt_id="pay_2:auth:1",
            payment_id="pay_2",
            attempt_no=1,
            operation="authorize",
            psp="psp_a",
            idempotency_key="pay_2:auth:1",
            amount=100,
            currency="EUR",
            status=AttemptStatus.STARTED,
            started_at_ms=T0,
        )
    )
    resolved = asyncio.run(resolve_pending(payment, attempt, env.clients["psp_a"], env.now))
    assert resolved.payment.failure_code == "psp_not_processed"


def test_hard_decline_is_never_retried() -> None:
    env = Env()
    out = env.authorize("tok_decline_stolen")
    assert len(out.attempts) == 2 and env.sleeps == []
    assert out.payment.status is sm.PaymentStatus.FAILED and out.payment.failure_code == "stolen_card"


def test_soft_decline_retries_on_the_same_psp_after_backoff_then_fails() -> None:
    env = Env()
    out = env.authorize("tok_decline_insufficient_funds", policy=RetryPolicy(soft_decline_retries_max=1))
    finished = [a for a in out.attempts if a.status is not AttemptStatus.STARTED]
    assert [a.status for a in finished] == [AttemptStatus.SOFT_DECLINE] * 2
    assert finished[0].psp == finished[1].psp and finished[0].idempotency_key != finished[1].idempotency_key
    assert len(env.sleeps) == 1 and env.sleeps[0] > 0
    assert out.payment.failure_code == "insufficient_funds"


def test_open_breakers_everywhere_fail_the_payment_without_calling_a_psp() -> None:
    env = Env()
    for name in env.sims:
        for _ in range(5):
            env.router.record(result(name, Outcome.ERROR))
    out = env.authorize("tok_visa")
    assert out.attempts == [] and out.payment.failure_code == "psp_unavailable"


def test_capture_refund_void_flow_keeps_the_ledger_balanced() -> None:
    env = Env()
    auth = env.authorize("tok_visa")
    p = auth.payment
    client = env.clients[p.psp]
    postings = list(auth.postings)
    cap = asyncio.run(
        process_capture(
            p, client, env.now, amount=6_000, final_capture=True, idempotency_key="pay_1:capture:1"
        )
    )
    assert cap.outcome is Outcome.APPROVED and cap.payment.amount_captured == 6_000
    kinds = {x.kind: x.amount for x in cap.postings}
    fee = env.sims[p.psp].profile.fee_minor(6_000)
    assert kinds == {
        ledger.PostingKind.CAPTURE: 6_000,
        ledger.PostingKind.HOLD_RELEASE: 4_000,
        ledger.PostingKind.PSP_FEE: fee,
    }
    postings += cap.postings
    ref = asyncio.run(
        process_refund(cap.payment, client, env.now, amount=1_000, idempotency_key="pay_1:refund:1")
    )
    assert ref.payment.status is sm.PaymentStatus.PARTIALLY_REFUNDED
    postings += ref.postings
    assert ledger.check(postings) == []
    assert ledger.balances(postings)[(f"psp:{p.psp}:receivable", "EUR")] == 6_000 - fee - 1_000
    with pytest.raises(sm.TransitionError) as err:
        asyncio.run(
            process_refund(ref.payment, client, env.now, amount=5_001, idempotency_key="pay_1:refund:2")
        )
    assert err.value.code == "refund_exceeds_captured"

    other = env.authorize("tok_visa", payment=sm.new_payment("pay_v", "m_1", 500, "EUR"))
    voided = asyncio.run(
        process_void(other.payment, env.clients[other.payment.psp], env.now, idempotency_key="pay_v:void:1")
    )
    assert voided.payment.status is sm.PaymentStatus.CANCELED
    assert ledger.check(other.postings + voided.postings) == []


def test_capture_timeout_leaves_payment_unchanged_until_replay_resolves_it_once() -> None:
    env = Env()
    p = env.authorize("tok_timeout_capture").payment
    client = env.clients[p.psp]
    cap = asyncio.run(
        process_capture(
            p, client, env.now, amount=10_000, final_capture=False, idempotency_key="pay_1:capture:1"
        )
    )
    assert cap.outcome is Outcome.TIMEOUT and cap.payment == p and cap.postings == []
    resolved = asyncio.run(resolve_pending(p, cap.attempts[-1], client, env.now))
    # The replay with the same key is answered from the PSP's stored result, without a second capture.
    assert resolved.outcome is Outcome.APPROVED and resolved.payment.amount_captured == 10_000
    assert {x.kind for x in resolved.postings} == {ledger.PostingKind.CAPTURE, ledger.PostingKind.PSP_FEE}
    assert len(env.sims[p.psp].settlement_lines()) == 1, "captured exactly once"


def test_health_rate_and_median_latency_follow_the_moving_window_exactly() -> None:
    """The router keeps running counts and an ordered latency list in step with each window; after
    any sequence of calls, longer than the window, they equal what the window itself gives."""
    import statistics

    rng = random.Random(7)
    window = 9
    router = Router([PSPRoute("a", 100, 0), PSPRoute("b", 100, 0)], window_size=window)
    seen: dict[str, list[tuple[bool, float]]] = {"a": [], "b": []}
    outcomes = [Outcome.APPROVED, Outcome.ERROR, Outcome.HARD_DECLINE, Outcome.TIMEOUT]
    for i in range(300):
        psp = rng.choice("ab")
        latency = float(rng.choice([5, 10, 10, 50, 120, 300, rng.uniform(0, 400)]))
        r = result(psp, rng.choice(outcomes), latency_ms=latency)
        router.record(r)
        recent = seen[psp]
        recent.append((r.outcome in (Outcome.APPROVED, Outcome.HARD_DECLINE), latency))
        del recent[:-window]
        healthy = sum(ok for ok, _ in recent)
        assert router.success_rate(psp) == pytest.approx((healthy + 0.95 * 5) / (len(recent) + 5)), i
        assert router.latency_ms(psp) == statistics.median(x for _, x in recent), i
