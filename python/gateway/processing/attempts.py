"""What every PSP call of the async path shares: finishing an attempt row from the PSP's answer,
and sending and applying one capture, void or refund call (also when it is replayed).

No I/O except the PSP call itself; the results are returned for the caller to persist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.attempt import AttemptRow, AttemptStatus, Outcome, ProcessingResult
from gateway.psp.client import PSPClient, PSPResult

RecordIntent = Callable[[AttemptRow], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


# The attempt status of each outcome (same values), looked up once instead of converted per call.
_STATUS_OF = {outcome: AttemptStatus(outcome.value) for outcome in Outcome}
# The fields `finish_attempt` copies from the started row: every field it does not set. Spelt out in the
# constructor below (a third of the cost of `dataclasses.replace`); checked against the dataclass here, so
# a field added to `AttemptRow` fails at import instead of being dropped.
_COPIED = ("attempt_id", "payment_id", "attempt_no", "operation", "psp", "idempotency_key", "amount", "currency",
           "started_at_ms", "final_capture")
_SET = ("status", "psp_reference", "code", "fee_minor", "latency_ms", "finished_at_ms")
assert sorted(f.name for f in dataclasses.fields(AttemptRow)) == sorted(_COPIED + _SET), "finish_attempt: fields"


def finish_attempt(row: AttemptRow, result: PSPResult, at_ms: int) -> AttemptRow:
    return AttemptRow(
        attempt_id=row.attempt_id,
        payment_id=row.payment_id,
        attempt_no=row.attempt_no,
        operation=row.operation,
        psp=row.psp,
        idempotency_key=row.idempotency_key,
        amount=row.amount,
        currency=row.currency,
        started_at_ms=row.started_at_ms,
        final_capture=row.final_capture,
        status=_STATUS_OF[result.outcome],
        psp_reference=result.psp_reference or row.psp_reference,
        code=result.code,
        fee_minor=result.fee_minor,
        latency_ms=result.latency_ms,
        finished_at_ms=at_ms,
    )


async def call_operation(client: PSPClient, row: AttemptRow, payment: sm.Payment) -> PSPResult:
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


def send_operation(client: PSPClient, row: AttemptRow, payment: sm.Payment) -> Awaitable[PSPResult]:
    """`call_operation` to run as a task or future: a capture through `PSPClient.send_capture`."""
    if row.operation != "capture":
        return call_operation(client, row, payment)
    assert payment.psp_reference is not None
    return client.send_capture(psp_reference=payment.psp_reference, amount=row.amount,
                               idempotency_key=row.idempotency_key, final=row.final_capture)


def apply_operation(
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
