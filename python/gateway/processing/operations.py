"""Capture, void and refund: the PSP call of a merchant operation accepted by the API.

Each operation has its own PSP idempotency key (`P:capture:k`, ...), recorded before the call; the
state machine checks the operation against the payment before anything is sent.
No I/O except the PSP calls: the results are returned for the caller to persist.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TypedDict, Unpack

from gateway.domain import payment as sm
from gateway.domain.attempt import Outcome, ProcessingResult, operation_attempt
from gateway.processing.attempts import RecordIntent, Sleep, apply_operation, call_operation, finish_attempt
from gateway.psp.client import PSPClient
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
    policy = options.get("policy", DEFAULT_RETRY_POLICY)
    sleep = options.get("sleep", asyncio.sleep)
    record_intent = options.get("record_intent")
    recorded = options.get("recorded")
    actor = options.get("actor", "merchant")
    assert payment.psp == client.name, "operations go to the PSP that authorized the payment"
    rng = options.get("rng") or random.Random(idempotency_key)
    out = ProcessingResult(payment=payment, outcome=None)
    for attempt_no in range(1, policy.attempts_max + 1):
        row = operation_attempt(payment, operation, amount, final_capture, client.name, idempotency_key,
                                attempt_no, now())
        out.attempts.append(row)
        if record_intent is not None and row.attempt_id != recorded:
            await record_intent(row)
        result = await call_operation(client, row, payment)
        out.attempts.append(finish_attempt(row, result, now()))
        out.outcome = result.outcome
        if result.outcome is Outcome.APPROVED:
            apply_operation(payment, row, result, now(), actor, out)
            return out
        # Same key on every retry: the PSP did not process the earlier ones, and if it somehow
        # did, it answers from its stored result instead of acting twice.
        decision = policy.decide(result, attempt_no, 0, rng)
        if decision.action is not Action.FAILOVER:
            return out
        await sleep(decision.delay_ms / 1000.0)
    return out


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
