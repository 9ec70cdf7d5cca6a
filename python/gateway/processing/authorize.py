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
from collections.abc import Awaitable, Callable, Mapping

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


class AuthorizationRun:
    """One payment's authorization as steps, so that one driver can take a whole batch through each
    step together (processing/batch.py) and another one payment through all of them
    (`process_authorization`): `next_call()` gives the next PSP call (its `started` row is the intent
    to record before it), `on_result()` takes its answer and says whether to call again (after
    `delay_s`), and `result` is final once `done`."""

    __slots__ = ("actor", "attempt_no", "call", "clients", "delay_s", "done", "last", "now", "out", "payment",
                 "policy", "psp", "reserved", "rng", "router", "soft_declines", "token", "tried")

    def __init__(self, payment: sm.Payment, router: Router, clients: Mapping[str, PSPClient],
                 now: Callable[[], int], *, token: str, policy: RetryPolicy = DEFAULT_RETRY_POLICY,
                 rng: random.Random | None = None, actor: str = "worker") -> None:
        if payment.status is not sm.PaymentStatus.PROCESSING:
            raise sm.TransitionError(
                "invalid_transition", f"payment {payment.id} is {payment.status}, not processing"
            )
        self.payment, self.router, self.clients, self.now = payment, router, clients, now
        self.token, self.policy, self.actor = token, policy, actor
        self.rng = rng  # made on the first retry decision that needs one (most payments never do)
        self.out = ProcessingResult(payment=payment, outcome=None)
        self.tried: set[str] = set()
        self.soft_declines = 0
        self.psp: str | None = None
        self.last: PSPResult | None = None
        # Whether `psp` already holds the breaker's permission for the next call.
        self.reserved = False
        self.attempt_no = 0
        self.done = False
        # The wait before the next call; None: it follows at once (a failover to another PSP).
        self.delay_s: float | None = None
        self.call: AttemptRow | None = None

    @property
    def result(self) -> ProcessingResult:
        assert self.done
        return self.out

    def next_call(self) -> AttemptRow | None:
        """The `started` row of the next PSP call (record it, then call `clients[row.psp]`), or None
        when the run is done (no PSP left, or out of attempts)."""
        if self.done:
            return None
        if self.attempt_no >= self.policy.attempts_max:
            self._finish()
            return None
        router, psp = self.router, self.psp
        if psp is not None and not self.reserved and not router.breakers[psp].allow():
            psp = None
        if psp is None:
            psp = _next_psp(router, self.clients, self.payment.amount, self.tried)
        self.psp = psp
        if psp is None:
            self._finish()
            return None
        self.reserved = False
        self.tried.add(psp)
        self.attempt_no += 1
        key = attempt_idempotency_key(self.payment.id, self.attempt_no)
        p = self.payment
        self.call = AttemptRow(attempt_id=key, payment_id=p.id, attempt_no=self.attempt_no, operation="authorize",
                               psp=psp, idempotency_key=key, amount=p.amount, currency=p.currency,
                               status=AttemptStatus.STARTED, started_at_ms=self.now())
        self.out.attempts.append(self.call)
        return self.call

    def send(self) -> Awaitable[PSPResult]:
        """The PSP call of the row `next_call()` gave, to run as a task or future (`asyncio.ensure_future`;
        see `PSPClient.send_authorize`); `request()` is the same call to await in place."""
        row = self.call
        assert row is not None
        p = self.payment
        return self.clients[row.psp].send_authorize(reference=p.id, amount=p.amount, currency=p.currency,
                                                    token=self.token, idempotency_key=row.idempotency_key)

    def request(self) -> Awaitable[PSPResult]:
        """The PSP call of the row `next_call()` gave, as a coroutine."""
        row = self.call
        assert row is not None
        p = self.payment
        return self.clients[row.psp].authorize(reference=p.id, amount=p.amount, currency=p.currency,
                                               token=self.token, idempotency_key=row.idempotency_key)

    def on_result(self, last: PSPResult) -> bool:
        """Takes the answer to the last call; True when another call follows (after `delay_s`, if not
        None)."""
        started = self.call
        assert started is not None and not self.done
        self.call = None
        self.last = last
        self.router.record(last)
        self.out.attempts.append(finish_attempt(started, last, self.now()))
        if last.outcome is Outcome.APPROVED:
            self._finish()  # what the policy says of an approval: stop
            return False
        if last.outcome is Outcome.SOFT_DECLINE:
            self.soft_declines += 1
        if self.rng is None:
            self.rng = random.Random(self.payment.id)
        decision = self.policy.decide(last, self.attempt_no, self.soft_declines, self.rng)
        self.delay_s = None
        if decision.action is Action.STOP:
            self._finish()
            return False
        if decision.action is Action.RESOLVE:
            t = sm.mark_pending_verification(self.payment, psp=started.psp, actor=self.actor, at_ms=self.now(),
                                             reason=decision.reason)
            self.out.transitions.append(t)
            self.out.payment, self.out.outcome = t.payment, Outcome.TIMEOUT
            self.done = True
            return False
        if decision.action is Action.FAILOVER:
            alternative = _next_psp(self.router, self.clients, self.payment.amount, self.tried)
            if alternative is not None:
                self.psp, self.reserved = alternative, True
                return self._more()
            # Every PSP was tried: back off, then start over from the best one still available.
            self.tried.clear()
            self.psp = None
        self.delay_s = decision.delay_ms / 1000.0
        return self._more()

    def _more(self) -> bool:
        if self.attempt_no >= self.policy.attempts_max:
            self._finish()
            return False
        return True

    def _finish(self) -> None:
        payment, last, actor, now = self.payment, self.last, self.actor, self.now
        if last is not None and last.outcome is Outcome.APPROVED:
            assert last.psp_reference is not None
            t = sm.authorize(payment, amount=last.amount, psp=last.psp, psp_reference=last.psp_reference,
                             actor=actor, at_ms=now())
            self.out.postings.extend(ledger.postings_for_transition(t, last.idempotency_key))
        else:
            code = "psp_unavailable" if last is None else (last.code or last.outcome.value)
            t = sm.fail(payment, code=code, actor=actor, at_ms=now(), reason=_failure_reason(last))
        self.out.transitions.append(t)
        self.out.payment = t.payment
        self.out.outcome = last.outcome if last is not None else Outcome.ERROR
        self.done = True


async def drive_authorization(run: AuthorizationRun, sleep: Sleep = asyncio.sleep,
                              record_intent: RecordIntent | None = None, delay_s: float = 0.0) -> ProcessingResult:
    """Takes `run` through its remaining calls one after another; `delay_s`: a wait before the first."""
    if delay_s:
        await sleep(delay_s)
    while (row := run.next_call()) is not None:
        if record_intent is not None:
            await record_intent(row)
        if not run.on_result(await run.request()):
            break
        if run.delay_s is not None:
            await sleep(run.delay_s)
    return run.result


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
    run = AuthorizationRun(payment, router, clients, now, token=token, policy=policy, rng=rng, actor=actor)
    return await drive_authorization(run, sleep, record_intent)


def _next_psp(router: Router, clients: Mapping[str, PSPClient], amount: int, tried: set[str]) -> str | None:
    """The best-ranked PSP whose breaker allows a call, preferring one with room behind its bulkhead:
    a full PSP's calls would wait there while another has capacity (spill-over); when every PSP is
    full, the ranking alone decides."""
    ranked = [name for name in router.rank(amount, exclude=sorted(tried)) if name in clients]
    with_room = [name for name in ranked if clients[name].has_room()]
    for name in with_room + [name for name in ranked if name not in with_room]:
        if router.breakers[name].allow():
            clients[name].promise()
            return name
    return None


def _failure_reason(last: PSPResult | None) -> str:
    if last is None:
        return "no PSP available (all circuit breakers open)"
    return f"{last.outcome.value} from {last.psp}: {last.code or 'no code'}"
