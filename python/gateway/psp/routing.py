"""PSP routing and the retry policy.

Routing: every PSP gets a score from its recent window of outcomes (health rate, median latency) and
its cost for the payment's amount; the best available PSP goes first, and a PSP whose circuit breaker
is open is skipped (psp/breaker.py).

Retries: hard declines never retry; soft declines retry on the same PSP after a backoff (a limited
number of times); retryable errors (the PSP did not process the request) fail over to the next PSP; a
timeout is ambiguous and stops everything: the payment goes to `pending_verification` and is
resolved by a status query (processing/authorize.py).
"""

from __future__ import annotations

import bisect
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.domain.attempt import ATTEMPTS_MAX_LIMIT, Outcome
from gateway.psp.breaker import DEFAULT_BREAKER, WINDOW_SIZE_MAX, BreakerConfig, CircuitBreaker
from gateway.psp.client import PSPResult


@dataclass(frozen=True, slots=True)
class PSPRoute:
    """What the router knows about a PSP before it has seen any traffic."""

    name: str
    fee_bps: int
    fee_fixed_minor: int
    latency_ms_expected: float = 200.0

    def cost_bps(self, amount: int) -> float:
        """Total fee for `amount` expressed in basis points of it."""
        assert amount > 0
        return self.fee_bps + self.fee_fixed_minor * 10_000 / amount


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """score = success_points × health rate − latency_points_per_ms × median latency
    − cost_points_per_bps × cost; with the defaults 1 % of health ≈ 50 ms ≈ 50 bps.
    The `[router.weights]` config section (same names)."""

    success_points: float = 100.0
    latency_points_per_ms: float = 0.02
    cost_points_per_bps: float = 0.02
    # A new PSP starts as if it had `prior_weight` calls at `prior_success_rate`.
    prior_success_rate: float = 0.95
    prior_weight: float = 5.0


def is_healthy(result: PSPResult) -> bool:
    """A PSP answered properly: declines are the card's doing, invalid requests ours."""
    if result.outcome is Outcome.TIMEOUT:
        return False
    return not (result.outcome is Outcome.ERROR and result.retryable)


class Router:
    def __init__(
        self,
        routes: Sequence[PSPRoute],
        *,
        window_size: int = 100,
        weights: ScoreWeights = ScoreWeights(),
        breaker: BreakerConfig = DEFAULT_BREAKER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert routes and 1 <= window_size <= WINDOW_SIZE_MAX
        assert len({r.name for r in routes}) == len(routes), "duplicate PSP names"
        self.routes = {r.name: r for r in routes}
        self.weights = weights
        self.window_size = window_size
        self._window: dict[str, deque[tuple[bool, float]]] = {
            r.name: deque(maxlen=window_size) for r in routes
        }
        # Kept in step with each window as it moves, so that ranking a payment reads two numbers per
        # PSP instead of summing and sorting its window: the healthy calls, and the latencies in order.
        self._healthy = dict.fromkeys(self.routes, 0)
        self._latencies: dict[str, list[float]] = {r.name: [] for r in routes}
        self.breakers = {r.name: CircuitBreaker(breaker, clock) for r in routes}

    def success_rate(self, name: str) -> float:
        w = self.weights
        return (self._healthy[name] + w.prior_success_rate * w.prior_weight) / (
            len(self._window[name]) + w.prior_weight)

    def latency_ms(self, name: str) -> float:
        """The median latency of the window (the mean of the middle two for an even count)."""
        ordered = self._latencies[name]
        n = len(ordered)
        if not n:
            return self.routes[name].latency_ms_expected
        mid = n // 2
        return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def score(self, name: str, amount: int) -> float:
        w = self.weights
        return (
            w.success_points * self.success_rate(name)
            - w.latency_points_per_ms * self.latency_ms(name)
            - w.cost_points_per_bps * self.routes[name].cost_bps(amount)
        )

    def rank(self, amount: int, exclude: Sequence[str] = ()) -> list[str]:
        """PSPs whose breaker would let a call through, best score first (ties by name)."""
        names = [n for n in self.routes if n not in exclude and self.breakers[n].can_try()]
        return sorted(names, key=lambda n: (-self.score(n, amount), n))

    def record(self, result: PSPResult) -> None:
        healthy = is_healthy(result)
        name = result.psp
        window, ordered = self._window[name], self._latencies[name]
        if len(window) == self.window_size:
            old_ok, old_latency = window[0]  # leaves the window with the append below
            self._healthy[name] -= old_ok
            del ordered[bisect.bisect_left(ordered, old_latency)]
        window.append((healthy, result.latency_ms))
        self._healthy[name] += healthy
        bisect.insort(ordered, result.latency_ms)
        self.breakers[result.psp].record(healthy)


class Action(StrEnum):
    STOP = "stop"
    RETRY_SAME = "retry_same"
    FAILOVER = "failover"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_ms: float
    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The `[router.retry]` config section (same names; gateway.config checks the ranges, the asserts
    below are invariants)."""

    attempts_max: int = 4
    backoff_ms_base: float = 100.0
    backoff_ms_max: float = 5_000.0
    multiplier: float = 2.0
    soft_decline_retries_max: int = 1

    def __post_init__(self) -> None:
        assert 1 <= self.attempts_max <= ATTEMPTS_MAX_LIMIT
        assert 0 <= self.backoff_ms_base <= self.backoff_ms_max and self.multiplier >= 1.0

    def backoff_ms(self, retry_no: int, rng: random.Random) -> float:
        """Equal jitter: half the capped exponential delay, plus a random part up to the other half."""
        assert retry_no >= 1
        cap = min(self.backoff_ms_max, self.backoff_ms_base * self.multiplier ** (retry_no - 1))
        return cap / 2 + rng.uniform(0, cap / 2)

    def decide(self, result: PSPResult, attempt_no: int, soft_declines: int, rng: random.Random) -> Decision:
        """What to do after attempt `attempt_no` (1-based) ended with `result`.

        `soft_declines` counts soft declines so far, including this one if it is one.
        """
        outcome = result.outcome
        if outcome is Outcome.APPROVED:
            return Decision(Action.STOP, 0.0, "approved")
        if outcome is Outcome.HARD_DECLINE:
            return Decision(Action.STOP, 0.0, "hard decline: never retried")
        if outcome is Outcome.TIMEOUT:
            return Decision(Action.RESOLVE, 0.0, "timeout is ambiguous: resolve by status query first")
        if outcome is Outcome.ERROR and not result.retryable:
            return Decision(Action.STOP, 0.0, "non-retryable error")
        if attempt_no >= self.attempts_max:
            return Decision(Action.STOP, 0.0, "attempts exhausted")
        delay = self.backoff_ms(attempt_no, rng)
        if outcome is Outcome.SOFT_DECLINE:
            if soft_declines > self.soft_decline_retries_max:
                return Decision(Action.STOP, 0.0, "soft decline retries exhausted")
            return Decision(Action.RETRY_SAME, delay, "soft decline: retry later on the same PSP")
        return Decision(Action.FAILOVER, delay, "retryable error: fail over to the next PSP")


DEFAULT_RETRY_POLICY = RetryPolicy()
