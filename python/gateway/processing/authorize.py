"""Authorization of accepted payments: route, call, retry or fail over, and stop at a timeout.

Retries follow psp/routing.py's policy; a timeout is never treated as a decline: the payment goes to
`pending_verification` and processing/resolve.py asks the PSP what happened.

No I/O except the PSP calls: the attempt rows, state transitions (with audit rows) and ledger
postings are returned for the caller to persist. Intent is recorded before each PSP call through the
optional `record_intent` callback, so a crash mid-call leaves a `started` attempt that the
reconciler can resolve by its idempotency key.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping

from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import (
    AttemptRow,
    AttemptStatus,
    Outcome,
    ProcessingResult,
    attempt_idempotency_key,
)
from gateway.processing.attempts import RecordIntent, Sleep, finish_attempt
from gateway.psp.client import PSPClient, PSPResult
from gateway.psp.routing import DEFAULT_RETRY_POLICY, Action, RetryPolicy, Router


async def process_authorization(
    payment: sm.Payment,
    router: Router,
    clients: Mapping[str, PSPClient],
    now: Callable[[], int],
    *,
    token: str,
    policy: RetryPolicy = DEFAULT_RETRY_POLICY,
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
        out.attempts.append(finish_attempt(started, last, now()))
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
