"""A PSP attempt as the gateway records it: outcomes, attempt rows, PSP idempotency keys.

Every PSP call of a payment has its own idempotency key derived from the payment id and the attempt
or operation number (`P:auth:n`, `P:capture:k`), recorded in `payment_attempts` before the call; after
a crash the same key is resolved or replayed, never replaced, so a PSP never charges twice.
A call produces two versions of its row: `started` (before the call) and the result (an upsert).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.domain import ledger
from gateway.domain import payment as sm

ATTEMPTS_MAX_LIMIT = 16
PSP_IDEMPOTENCY_KEY_CHARS_MAX = 255


class Outcome(sm.FastStrEnum):
    """How one PSP call ended. `ERROR` (retryable or not) means the PSP says it did not process
    the request; `TIMEOUT` means nobody knows, and the payment must be resolved by a status query."""

    APPROVED = "approved"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    ERROR = "error"
    TIMEOUT = "timeout"


def attempt_idempotency_key(payment_id: str, attempt_no: int) -> str:
    """PSP idempotency key of authorization attempt `attempt_no` (1-based) of a payment."""
    assert 1 <= attempt_no <= ATTEMPTS_MAX_LIMIT * 4
    key = f"{payment_id}:auth:{attempt_no}"
    assert len(key) <= PSP_IDEMPOTENCY_KEY_CHARS_MAX, "payment id too long for a PSP idempotency key"
    return key


def operation_idempotency_key(payment_id: str, operation: str, seq: int) -> str:
    """PSP idempotency key of the `seq`-th capture/void/refund of a payment."""
    assert operation in ("capture", "void", "refund") and seq >= 1
    key = f"{payment_id}:{operation}:{seq}"
    assert len(key) <= PSP_IDEMPOTENCY_KEY_CHARS_MAX, "payment id too long for a PSP idempotency key"
    return key


class AttemptStatus(sm.FastStrEnum):
    STARTED = "started"
    APPROVED = "approved"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    ERROR = "error"
    TIMEOUT = "timeout"
    # Set by resolve_pending when the PSP has no record of the attempt.
    NOT_PROCESSED = "not_processed"


_STARTED = AttemptStatus.STARTED


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


def operation_attempt(payment: sm.Payment, operation: str, amount: int, final_capture: bool, psp: str,
                      idempotency_key: str, attempt_no: int, at_ms: int) -> AttemptRow:
    """The `started` row of attempt `attempt_no` of a capture, void or refund of `payment`."""
    return AttemptRow(f"{idempotency_key}#{attempt_no}", payment.id, attempt_no, operation, psp, idempotency_key,
                      amount, payment.currency, _STARTED, at_ms, final_capture, payment.psp_reference)


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
