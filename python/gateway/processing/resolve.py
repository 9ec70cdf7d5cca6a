"""Resolution of ambiguous attempts: a PSP call that timed out, or a crash in the middle of one.

The PSP is asked for the attempt by its idempotency key; where it has no record of it, the same key
is replayed (never a new one), so the PSP can never charge twice.
No I/O except the PSP calls: the results are returned for the caller to persist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, Outcome, ProcessingResult
from gateway.processing.attempts import apply_operation, call_operation, finish_attempt
from gateway.psp.client import PSPClient, PSPTimeout, PSPUnavailable


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
        return await replay_operation(payment, attempt, client, now, actor, out)
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


async def replay_operation(
    payment: sm.Payment,
    attempt: AttemptRow,
    client: PSPClient,
    now: Callable[[], int],
    actor: str,
    out: ProcessingResult,
) -> ProcessingResult:
    result = await call_operation(client, attempt, payment)
    if result.outcome is Outcome.TIMEOUT or (result.outcome is Outcome.ERROR and result.retryable):
        return out
    out.attempts.append(finish_attempt(attempt, result, now()))
    out.outcome = result.outcome
    if result.outcome is Outcome.APPROVED:
        apply_operation(payment, attempt, result, now(), actor, out)
    return out
