"""Capture, void and refund: the PSP call of a merchant operation accepted by the API.

Each operation has its own PSP idempotency key (`P:capture:k`, ...), recorded before the call; the
state machine checks the operation against the payment before anything is sent.
No I/O except the PSP calls: the results are returned for the caller to persist.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypedDict, Unpack

from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, Outcome, ProcessingResult, operation_attempt
from gateway.processing.attempts import (
    RecordIntent,
    Sleep,
    apply_operation,
    call_operation,
    finish_attempt,
    send_operation,
)
from gateway.psp.client import PSPClient, PSPResult
from gateway.psp.routing import DEFAULT_RETRY_POLICY, Action, RetryPolicy


class OperationOptions(TypedDict, total=False):
    """What every operation may be given besides its own arguments. Defaults: `DEFAULT_RETRY_POLICY`, a
    random generator seeded with the idempotency key, `asyncio.sleep`, no intent recording, and the
    actor `merchant`. `recorded`: the attempt id whose `started` row the caller has already committed
    (the auto-capture's first attempt, written with the authorization's outcome), not recorded again."""

    policy: RetryPolicy
    rng: random.Random | None
    sleep: Sleep
    record_intent: RecordIntent | None
    actor: str
    recorded: str | None


class OperationRun:
    """One capture, void or refund call as steps (see authorize.AuthorizationRun): `next_call()` gives
    the `started` row of the next attempt (same key every time), `on_result()` takes the answer and
    says whether another attempt follows after `delay_s`, `result` is final once `done`."""

    __slots__ = ("actor", "amount", "attempt_no", "call", "client", "delay_s", "done", "final_capture",
                 "idempotency_key", "now", "operation", "out", "payment", "policy", "rng")

    def __init__(self, payment: sm.Payment, operation: str, amount: int, final_capture: bool, client: PSPClient,
                 idempotency_key: str, now: Callable[[], int], *, policy: RetryPolicy = DEFAULT_RETRY_POLICY,
                 rng: random.Random | None = None, actor: str = "merchant") -> None:
        assert payment.psp == client.name, "operations go to the PSP that authorized the payment"
        self.payment, self.operation, self.amount, self.final_capture = payment, operation, amount, final_capture
        self.client, self.idempotency_key, self.now = client, idempotency_key, now
        self.policy, self.rng, self.actor = policy, rng, actor
        self.out = ProcessingResult(payment=payment, outcome=None)
        self.attempt_no = 0
        self.done = False
        self.delay_s = 0.0
        self.call: AttemptRow | None = None

    @property
    def result(self) -> ProcessingResult:
        assert self.done
        return self.out

    def next_call(self) -> AttemptRow | None:
        if self.done or self.attempt_no >= self.policy.attempts_max:
            self.done = True
            return None
        self.attempt_no += 1
        row = self.call = operation_attempt(self.payment, self.operation, self.amount, self.final_capture,
                                            self.client.name, self.idempotency_key, self.attempt_no, self.now())
        self.out.attempts.append(row)
        return row

    def send(self) -> Awaitable[PSPResult]:
        """The call, to run as a task or future (see `AuthorizationRun.send`)."""
        assert self.call is not None
        return send_operation(self.client, self.call, self.payment)

    def request(self) -> Awaitable[PSPResult]:
        """The call, as a coroutine to await in place."""
        assert self.call is not None
        return call_operation(self.client, self.call, self.payment)

    def on_result(self, result: PSPResult) -> bool:
        """True when another attempt follows (after `delay_s`)."""
        row = self.call
        assert row is not None and not self.done
        self.call = None
        out = self.out
        out.attempts.append(finish_attempt(row, result, self.now()))
        out.outcome = result.outcome
        if result.outcome is Outcome.APPROVED:
            apply_operation(self.payment, row, result, self.now(), self.actor, out)
            self.done = True
            return False
        # Same key on every retry: the PSP did not process the earlier ones, and if it somehow
        # did, it answers from its stored result instead of acting twice.
        if self.rng is None:
            self.rng = random.Random(self.idempotency_key)
        decision = self.policy.decide(result, self.attempt_no, 0, self.rng)
        if decision.action is not Action.FAILOVER or self.attempt_no >= self.policy.attempts_max:
            self.done = True
            return False
        self.delay_s = decision.delay_ms / 1000.0
        return True


async def drive_operation(run: OperationRun, sleep: Sleep = asyncio.sleep, record_intent: RecordIntent | None = None,
                          recorded: str | None = None, delay_s: float | None = None) -> ProcessingResult:
    """Takes `run` through its remaining attempts; `recorded`: an attempt whose intent is committed
    already; `delay_s`: a wait before the first attempt."""
    if delay_s is not None:
        await sleep(delay_s)
    while (row := run.next_call()) is not None:
        if record_intent is not None and row.attempt_id != recorded:
            await record_intent(row)
        if not run.on_result(await run.request()):
            break
        await sleep(run.delay_s)
    run.done = True
    return run.out


async def _process_operation(
    payment: sm.Payment,
    operation: str,
    amount: int,
    final_capture: bool,
    client: PSPClient,
    idempotency_key: str,
    now: Callable[[], int],
    options: OperationOptions,
) -> ProcessingResult:
    unknown = options.keys() - OperationOptions.__annotations__.keys()
    if unknown:
        raise TypeError(f"process_{operation}() got unexpected keyword arguments {sorted(unknown)}")
    run = OperationRun(payment, operation, amount, final_capture, client, idempotency_key, now,
                       policy=options.get("policy", DEFAULT_RETRY_POLICY), rng=options.get("rng"),
                       actor=options.get("actor", "merchant"))
    return await drive_operation(run, options.get("sleep", asyncio.sleep), options.get("record_intent"),
                                 options.get("recorded"))


async def process_capture(
    payment: sm.Payment, client: PSPClient, now: Callable[[], int], *,
    amount: int, final_capture: bool, idempotency_key: str, **options: Unpack[OperationOptions],
) -> ProcessingResult:
    """Capture at the PSP, then transition. Raises TransitionError before any PSP call if the
    capture is not allowed. A timeout leaves the payment unchanged with a `timeout` attempt."""
    sm.check_capture(payment, amount)
    return await _process_operation(payment, "capture", amount, final_capture, client, idempotency_key, now, options)


async def process_void(
    payment: sm.Payment, client: PSPClient, now: Callable[[], int], *,
    idempotency_key: str, **options: Unpack[OperationOptions],
) -> ProcessingResult:
    """Void the authorization at the PSP, then transition (see `process_capture`)."""
    sm.check_void(payment)
    amount = payment.amount_authorized
    return await _process_operation(payment, "void", amount, False, client, idempotency_key, now, options)


async def process_refund(
    payment: sm.Payment, client: PSPClient, now: Callable[[], int], *,
    amount: int, idempotency_key: str, **options: Unpack[OperationOptions],
) -> ProcessingResult:
    """Refund at the PSP, then transition (see `process_capture`)."""
    sm.check_refund(payment, amount)
    return await _process_operation(payment, "refund", amount, False, client, idempotency_key, now, options)
