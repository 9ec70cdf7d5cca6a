"""PSP routing, circuit breakers, retries, and the worker-facing orchestration.

Routing: every PSP gets a score from its recent window of outcomes (health rate, median
latency) and its cost for the payment's amount; the best available PSP goes first. A circuit
breaker per PSP keeps traffic away from one that is failing and probes it again after a cool-down.

Retries: hard declines never retry; soft declines retry on the same PSP after a backoff (a
limited number of times); retryable errors (the PSP did not process the request) fail over to
the next PSP; a timeout is ambiguous and stops everything: the payment goes to
`pending_verification` and `resolve_pending` asks the PSP what happened. Every attempt has its
own PSP idempotency key derived from the payment id and attempt number.

Orchestration functions do no I/O except the PSP calls: they return the attempt rows, state
transitions (with audit rows) and ledger postings for the caller to persist. Intent is recorded
before each PSP call through the optional `record_intent` callback, so a crash mid-call leaves a
`started` attempt that the reconciler can resolve by its idempotency key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from . import ledger
from . import state_machine as sm
from .psp_client import Outcome, PSPClient, PSPResult, PSPTimeout, PSPUnavailable

ATTEMPTS_MAX_LIMIT = 16
WINDOW_SIZE_MAX = 10_000


# -- idempotency keys ---------------------------------------------------------------------------


def attempt_idempotency_key(payment_id: str, attempt_no: int) -> str:
    """PSP idempotency key of authorization attempt `attempt_no` (1-based) of a payment."""
    assert 1 <= attempt_no <= ATTEMPTS_MAX_LIMIT * 4
    key = f"{payment_id}:auth:{attempt_no}"
    assert len(key) <= 255, "payment id too long for a PSP idempotency key"
    return key


def operation_idempotency_key(payment_id: str, operation: str, seq: int) -> str:
    """PSP idempotency key of the `seq`-th capture/void/refund of a payment."""
    assert operation in ("capture", "void", "refund") and seq >= 1
    key = f"{payment_id}:{operation}:{seq}"
    assert len(key) <= 255, "payment id too long for a PSP idempotency key"
    return key


# -- circuit breaker ----------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    # Opens when, over the last `window_calls` calls (at least `calls_min`), the failure ratio
    # reaches `failure_ratio_threshold`, or after `consecutive_failures_max` failures in a row.
    window_calls: int = 20
    calls_min: int = 10
    failure_ratio_threshold: float = 0.5
    consecutive_failures_max: int = 5
    cooldown_s: float = 30.0
    half_open_probes_max: int = 1


class CircuitBreaker:
    def __init__(
        self, config: BreakerConfig = BreakerConfig(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert 1 <= config.calls_min <= config.window_calls <= WINDOW_SIZE_MAX
        assert 0.0 < config.failure_ratio_threshold <= 1.0 and config.half_open_probes_max >= 1
        self.config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._recent: deque[bool] = deque(maxlen=config.window_calls)
        self._consecutive_failures = 0
        self._probes_inflight = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probes_inflight = 0
        return self._state

    def can_try(self) -> bool:
        """Whether a call would be allowed now (does not reserve a half-open probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._probes_inflight < self.config.half_open_probes_max

    def allow(self) -> bool:
        """Whether to make a call now; in half-open this reserves one of the probe slots."""
        if not self.can_try():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probes_inflight += 1
        return True

    def record(self, success: bool) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._probes_inflight = max(0, self._probes_inflight - 1)
            if success:
                self._close()
            else:
                self._open()
            return
        if state is BreakerState.OPEN:
            return
        self._recent.append(success)
        self._consecutive_failures = 0 if success else self._consecutive_failures + 1
        failures = self._recent.count(False)
        ratio_tripped = (
            len(self._recent) >= self.config.calls_min
            and failures / len(self._recent) >= self.config.failure_ratio_threshold
        )
        if ratio_tripped or self._consecutive_failures >= self.config.consecutive_failures_max:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._recent.clear()
        self._consecutive_failures = 0

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._recent.clear()
        self._consecutive_failures = 0


# -- scoring ------------------------------------------------------------------------------------


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
    − cost_points_per_bps × cost; with the defaults 1 % of health ≈ 50 ms ≈ 50 bps."""

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
        breaker: BreakerConfig = BreakerConfig(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert routes and 1 <= window_size <= WINDOW_SIZE_MAX
        assert len({r.name for r in routes}) == len(routes), "duplicate PSP names"
        self.routes = {r.name: r for r in routes}
        self.weights = weights
        self._window: dict[str, deque[tuple[bool, float]]] = {
            r.name: deque(maxlen=window_size) for r in routes
        }
        self.breakers = {r.name: CircuitBreaker(breaker, clock) for r in routes}

    def success_rate(self, name: str) -> float:
        w = self.weights
        window = self._window[name]
        healthy = sum(1 for ok, _ in window if ok)
        return (healthy + w.prior_success_rate * w.prior_weight) / (len(window) + w.prior_weight)

    def latency_ms(self, name: str) -> float:
        window = self._window[name]
        if not window:
            return self.routes[name].latency_ms_expected
        return statistics.median(latency for _, latency in window)

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
        self._window[result.psp].append((healthy, result.latency_ms))
        self.breakers[result.psp].record(healthy)


# -- retry policy -------------------------------------------------------------------------------


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


# -- attempt rows -------------------------------------------------------------------------------


class AttemptStatus(StrEnum):
    STARTED = "started"
    APPROVED = "approved"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    ERROR = "error"
    TIMEOUT = "timeout"
    # Set by resolve_pending when the PSP has no record of the attempt.
    NOT_PROCESSED = "not_processed"


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One row of table `payment_attempts`, keyed by `attempt_id` (= the PSP idempotency key).

    A call produces two versions of the row: `started` (written before the PSP call) and the
    result (an upsert of the same `attempt_id`).
    """

    attempt_id: str
    payment_id: str
    attempt_no: int
    operation: str
    psp: str
    idempotency_key: str
    amount: int
    currency: str
    status: AttemptStatus
    started_at_ms: int
    final_capture: bool = False
    psp_reference: str | None = None
    code: str | None = None
    fee_minor: int = 0
    latency_ms: float = 0.0
    finished_at_ms: int | None = None


def _finish(row: AttemptRow, result: PSPResult, at_ms: int) -> AttemptRow:
    return dataclasses.replace(
        row,
        status=AttemptStatus(result.outcome.value),
        psp_reference=result.psp_reference or row.psp_reference,
        code=result.code,
        fee_minor=result.fee_minor,
        latency_ms=result.latency_ms,
        finished_at_ms=at_ms,
    )


@dataclass(slots=True)
class ProcessingResult:
    """Everything one orchestration call produced, in the order it should be persisted."""

    payment: sm.Payment
    outcome: Outcome | None
    attempts: list[AttemptRow] = field(default_factory=list)
    transitions: list[sm.Transition] = field(default_factory=list)
    postings: list[ledger.Posting] = field(default_factory=list)

    @property
    def audit_rows(self) -> list[sm.AuditRow]:
        return [t.audit for t in self.transitions]


RecordIntent = Callable[[AttemptRow], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


# -- authorization ------------------------------------------------------------------------------


async def process_authorization(
    payment: sm.Payment,
    router: Router,
    clients: Mapping[str, PSPClient],
    now: Callable[[], int],
    *,
    token: str,
    policy: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    record_intent: RecordIntent | None = None,
    actor: str = "worker",
) -> ProcessingResult:
    """Take a `processing` payment to authorized, failed or pending_verification.

    `now()` returns the wall-clock time in ms for rows; `sleep(seconds)` waits between retries.
    """
    if payment.status is not sm.PaymentStatus.PROCESSING:
        raise sm.TransitionError(
            "invalid_transition", f"payment {payment.id} is {payment.status}, not processing"
        )
    rng = rng or random.Random(payment.id)
    out = ProcessingResult(payment=payment, outcome=None)
    tried: set[str] = set()
    soft_declines = 0
    psp: str | None = None
    last: PSPResult | None = None
    # Whether `psp` already holds the breaker's permission for the next call.
    reserved = False
    for attempt_no in range(1, policy.attempts_max + 1):
        if psp is not None and not reserved and not router.breakers[psp].allow():
            psp = None
        if psp is None:
            psp = _next_psp(router, clients, payment.amount, tried)
        if psp is None:
            break
        reserved = False
        tried.add(psp)
        key = attempt_idempotency_key(payment.id, attempt_no)
        started = AttemptRow(
            attempt_id=key,
            payment_id=payment.id,
            attempt_no=attempt_no,
            operation="authorize",
            psp=psp,
            idempotency_key=key,
            amount=payment.amount,
            currency=payment.currency,
            status=AttemptStatus.STARTED,
            started_at_ms=now(),
        )
        out.attempts.append(started)
        if record_intent is not None:
            await record_intent(started)
        last = await clients[psp].authorize(
            reference=payment.id,
            amount=payment.amount,
            currency=payment.currency,
            token=token,
            idempotency_key=key,
        )
        router.record(last)
        out.attempts.append(_finish(started, last, now()))
        if last.outcome is Outcome.SOFT_DECLINE:
            soft_declines += 1
        decision = policy.decide(last, attempt_no, soft_declines, rng)
        if decision.action is Action.STOP:
            break
        if decision.action is Action.RESOLVE:
            t = sm.mark_pending_verification(
                payment, psp=psp, actor=actor, at_ms=now(), reason=decision.reason
            )
            out.transitions.append(t)
            out.payment, out.outcome = t.payment, Outcome.TIMEOUT
            return out
        if decision.action is Action.FAILOVER:
            alternative = _next_psp(router, clients, payment.amount, tried)
            if alternative is not None:
                psp, reserved = alternative, True
                continue
            # Every PSP was tried: back off, then start over from the best one still available.
            tried.clear()
            psp = None
        await sleep(decision.delay_ms / 1000.0)
    if last is not None and last.outcome is Outcome.APPROVED:
        assert last.psp_reference is not None
        t = sm.authorize(
            payment,
            amount=last.amount,
            psp=last.psp,
            psp_reference=last.psp_reference,
            actor=actor,
            at_ms=now(),
        )
        out.postings.extend(ledger.postings_for_transition(t, last.idempotency_key))
    else:
        code = "psp_unavailable" if last is None else (last.code or last.outcome.value)
        t = sm.fail(payment, code=code, actor=actor, at_ms=now(), reason=_failure_reason(last))
    out.transitions.append(t)
    out.payment = t.payment
    out.outcome = last.outcome if last is not None else Outcome.ERROR
    return out


def _next_psp(router: Router, clients: Mapping[str, PSPClient], amount: int, tried: set[str]) -> str | None:
    for name in router.rank(amount, exclude=sorted(tried)):
        if name in clients and router.breakers[name].allow():
            return name
    return None


def _failure_reason(last: PSPResult | None) -> str:
    if last is None:
        return "no PSP available (all circuit breakers open)"
    return f"{last.outcome.value} from {last.psp}: {last.code or 'no code'}"


async def resolve_pending(
    payment: sm.Payment,
    attempt: AttemptRow,
    client: PSPClient,
    now: Callable[[], int],
    *,
    actor: str = "reconciler",
) -> ProcessingResult:
    """Resolve an attempt whose outcome is unknown (timed out, or `started` after a crash).

    Authorizations are resolved by a status query on the attempt's idempotency key: the PSP's
    record decides authorized or failed; no record means it never processed the request and the
    payment fails with `psp_not_processed` (call this only after the PSP's own timeout has
    passed). Captures, voids and refunds are resolved by re-sending the same request with the
    same idempotency key, which the PSP answers from its stored result without acting twice.
    If the PSP cannot be reached the result has `outcome=None` and nothing to persist.
    """
    assert attempt.payment_id == payment.id
    out = ProcessingResult(payment=payment, outcome=None)
    if attempt.operation != "authorize":
        return await _replay_operation(payment, attempt, client, now, actor, out)
    if payment.status not in (sm.PaymentStatus.PENDING_VERIFICATION, sm.PaymentStatus.PROCESSING):
        return out
    try:
        found = await client.status(idempotency_key=attempt.idempotency_key)
    except (PSPTimeout, PSPUnavailable):
        return out
    at = now()
    if found is None:
        out.attempts.append(
            dataclasses.replace(
                attempt, status=AttemptStatus.NOT_PROCESSED, code="psp_not_processed", finished_at_ms=at
            )
        )
        t = sm.fail(
            payment,
            code="psp_not_processed",
            actor=actor,
            at_ms=at,
            reason="PSP has no record of the attempt",
        )
        out.outcome = Outcome.ERROR
    elif found.status == "declined":
        out.attempts.append(
            dataclasses.replace(
                attempt,
                status=AttemptStatus.SOFT_DECLINE,
                code=found.decline_code,
                psp_reference=found.psp_reference,
                finished_at_ms=at,
            )
        )
        t = sm.fail(
            payment, code=found.decline_code or "declined", actor=actor, at_ms=at, reason="resolved: declined"
        )
        out.outcome = Outcome.SOFT_DECLINE
    else:
        out.attempts.append(
            dataclasses.replace(
                attempt, status=AttemptStatus.APPROVED, psp_reference=found.psp_reference, finished_at_ms=at
            )
        )
        t = sm.authorize(
            payment,
            amount=found.amount_authorized,
            psp=attempt.psp,
            psp_reference=found.psp_reference,
            actor=actor,
            at_ms=at,
            reason="resolved: approved",
        )
        out.postings.extend(ledger.postings_for_transition(t, attempt.idempotency_key))
        out.outcome = Outcome.APPROVED
    out.transitions.append(t)
    out.payment = t.payment
    return out


async def _replay_operation(
    payment: sm.Payment,
    attempt: AttemptRow,
    client: PSPClient,
    now: Callable[[], int],
    actor: str,
    out: ProcessingResult,
) -> ProcessingResult:
    result = await _call_operation(client, attempt, payment)
    if result.outcome is Outcome.TIMEOUT or (result.outcome is Outcome.ERROR and result.retryable):
        return out
    out.attempts.append(_finish(attempt, result, now()))
    out.outcome = result.outcome
    if result.outcome is Outcome.APPROVED:
        _apply_operation(payment, attempt, result, now(), actor, out)
    return out


# -- capture, void, refund ----------------------------------------------------------------------


async def _call_operation(client: PSPClient, row: AttemptRow, payment: sm.Payment) -> PSPResult:
    assert payment.psp_reference is not None
    if row.operation == "capture":
        return await client.capture(
            psp_reference=payment.psp_reference,
            amount=row.amount,
            idempotency_key=row.idempotency_key,
            final=row.final_capture,
        )
    if row.operation == "void":
        return await client.void(psp_reference=payment.psp_reference, idempotency_key=row.idempotency_key)
    assert row.operation == "refund", row.operation
    return await client.refund(
        psp_reference=payment.psp_reference, amount=row.amount, idempotency_key=row.idempotency_key
    )


def _apply_operation(
    payment: sm.Payment, row: AttemptRow, result: PSPResult, at_ms: int, actor: str, out: ProcessingResult
) -> None:
    if row.operation == "capture":
        t = sm.capture(payment, amount=row.amount, final_capture=row.final_capture, actor=actor, at_ms=at_ms)
    elif row.operation == "void":
        t = sm.void(payment, actor=actor, at_ms=at_ms)
    else:
        t = sm.refund(payment, amount=row.amount, actor=actor, at_ms=at_ms)
    out.transitions.append(t)
    out.postings.extend(ledger.postings_for_transition(t, row.idempotency_key, fee_minor=result.fee_minor))
    out.payment = t.payment


async def _process_operation(
    payment: sm.Payment,
    operation: str,
    amount: int,
    final_capture: bool,
    client: PSPClient,
    idempotency_key: str,
    now: Callable[[], int],
    policy: RetryPolicy,
    rng: random.Random | None,
    sleep: Sleep,
    record_intent: RecordIntent | None,
    actor: str,
) -> ProcessingResult:
    assert payment.psp == client.name, "operations go to the PSP that authorized the payment"
    rng = rng or random.Random(idempotency_key)
    out = ProcessingResult(payment=payment, outcome=None)
    for attempt_no in range(1, policy.attempts_max + 1):
        row = AttemptRow(
            attempt_id=f"{idempotency_key}#{attempt_no}",
            payment_id=payment.id,
            attempt_no=attempt_no,
            operation=operation,
            psp=client.name,
            idempotency_key=idempotency_key,
            amount=amount,
            currency=payment.currency,
            status=AttemptStatus.STARTED,
            started_at_ms=now(),
            final_capture=final_capture,
            psp_reference=payment.psp_reference,
        )
        out.attempts.append(row)
        if record_intent is not None:
            await record_intent(row)
        result = await _call_operation(client, row, payment)
        out.attempts.append(_finish(row, result, now()))
        out.outcome = result.outcome
        if result.outcome is Outcome.APPROVED:
            _apply_operation(payment, row, result, now(), actor, out)
            return out
        # Same key on every retry: the PSP did not process the earlier ones, and if it somehow
        # did, it answers from its stored result instead of acting twice.
        decision = policy.decide(result, attempt_no, 0, rng)
        if decision.action is not Action.FAILOVER:
            return out
        await sleep(decision.delay_ms / 1000.0)
    return out


async def process_capture(
    payment: sm.Payment,
    client: PSPClient,
    now: Callable[[], int],
    *,
    amount: int,
    final_capture: bool,
    idempotency_key: str,
    policy: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    record_intent: RecordIntent | None = None,
    actor: str = "merchant",
) -> ProcessingResult:
    """Capture at the PSP, then transition. Raises TransitionError before any PSP call if the
    capture is not allowed. A timeout leaves the payment unchanged with a `timeout` attempt."""
    sm.check_capture(payment, amount)
    return await _process_operation(
        payment,
        "capture",
        amount,
        final_capture,
        client,
        idempotency_key,
        now,
        policy,
        rng,
        sleep,
        record_intent,
        actor,
    )


async def process_void(
    payment: sm.Payment,
    client: PSPClient,
    now: Callable[[], int],
    *,
    idempotency_key: str,
    policy: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    record_intent: RecordIntent | None = None,
    actor: str = "merchant",
) -> ProcessingResult:
    sm.check_void(payment)
    return await _process_operation(
        payment,
        "void",
        payment.amount_authorized,
        False,
        client,
        idempotency_key,
        now,
        policy,
        rng,
        sleep,
        record_intent,
        actor,
    )


async def process_refund(
    payment: sm.Payment,
    client: PSPClient,
    now: Callable[[], int],
    *,
    amount: int,
    idempotency_key: str,
    policy: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    record_intent: RecordIntent | None = None,
    actor: str = "merchant",
) -> ProcessingResult:
    sm.check_refund(payment, amount)
    return await _process_operation(
        payment,
        "refund",
        amount,
        False,
        client,
        idempotency_key,
        now,
        policy,
        rng,
        sleep,
        record_intent,
        actor,
    )
