"""Payment state machine: every transition checked, every transition audited.

Pure functions: each takes a `Payment` and returns a `Transition` (the new payment plus the
audit-log row to persist), or raises `TransitionError` with a stable `code` for an HTTP 422.

    processing ──► authorized ──► captured ──► partially_refunded ──► refunded
        │  ▲           │             │  ▲               │
        │  │           │             └──┘ (more partial captures until final)
        ▼  │           ▼
    pending_verification   canceled (void, only before any capture)
        │
        ▼
      failed   (also from processing)

    requires_action (the risk engine asked for a 3-D Secure challenge; nothing is authorized yet)
        ├──► processing (challenge completed: the authorization goes ahead)
        ├──► failed     (challenge failed)
        └──► canceled   (the merchant cancelled it)

Amounts are integers in minor units. Invariants, asserted after every transition:
0 ≤ refunded ≤ captured ≤ authorized ≤ amount, and capture is closed (`capture_final`) once the
payment is voided, finally captured, or refunded (the first refund releases any uncaptured hold).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

AMOUNT_MINOR_MAX = 10**12
ACTOR_LENGTH_MAX = 64
REASON_LENGTH_MAX = 255


class FastStrEnum(StrEnum):
    """A `StrEnum` whose `.value` is a plain property: `Enum.value` costs two Python calls a read on
    Python 3.11, and the hot path reads statuses, kinds and outcomes many times per payment. The same
    value, the same members, lookups and pickling."""

    @property
    def value(self) -> str:
        return self._value_  # type: ignore[no-any-return]


class PaymentStatus(FastStrEnum):
    PROCESSING = "processing"
    REQUIRES_ACTION = "requires_action"
    PENDING_VERIFICATION = "pending_verification"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    FAILED = "failed"
    CANCELED = "canceled"


S = PaymentStatus
TERMINAL_STATUSES = frozenset({S.FAILED, S.CANCELED, S.REFUNDED})
# The members as plain globals for the hot paths (an enum class attribute costs a lookup through the
# metaclass on every use).
_PROCESSING = S.PROCESSING
_PENDING_VERIFICATION = S.PENDING_VERIFICATION
_AUTHORIZED = S.AUTHORIZED
_CAPTURED = S.CAPTURED
_PARTIALLY_REFUNDED = S.PARTIALLY_REFUNDED
_REFUNDED = S.REFUNDED
_CANCELED = S.CANCELED
_FAILED = S.FAILED
_REQUIRES_ACTION = S.REQUIRES_ACTION
_AUTHORIZABLE = frozenset({S.PROCESSING, S.PENDING_VERIFICATION})
_NOTHING_AUTHORIZED = frozenset({S.PROCESSING, S.PENDING_VERIFICATION, S.FAILED, S.REQUIRES_ACTION})


class TransitionError(Exception):
    """A business-rule violation; `code` is stable and meant for the API's 422 error object."""

    http_status = 422

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    merchant_id: str
    amount: int
    currency: str
    status: PaymentStatus = S.PROCESSING
    amount_authorized: int = 0
    amount_captured: int = 0
    amount_refunded: int = 0
    # True once no further capture is possible and any uncaptured hold has been released.
    capture_final: bool = False
    psp: str | None = None
    psp_reference: str | None = None
    failure_code: str | None = None
    # Optimistic-concurrency version for the store: +1 on every transition.
    version: int = 0

    @property
    def amount_capturable(self) -> int:
        if self.capture_final or self.status not in (S.AUTHORIZED, S.CAPTURED):
            return 0
        return self.amount_authorized - self.amount_captured

    @property
    def amount_refundable(self) -> int:
        if self.status not in (S.CAPTURED, S.PARTIALLY_REFUNDED):
            return 0
        return self.amount_captured - self.amount_refunded

    @property
    def amount_held(self) -> int:
        """Authorized but neither captured nor released: what the customer's card still holds."""
        return 0 if self.capture_final else self.amount_authorized - self.amount_captured


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of the payment audit log (table `payment_audit`)."""

    payment_id: str
    old_status: str
    new_status: str
    actor: str
    reason: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Transition:
    before: Payment
    payment: Payment
    audit: AuditRow


def check_invariants(p: Payment) -> None:
    """Raise AssertionError if `p` is internally inconsistent (a bug, never a user error)."""
    assert 0 < p.amount <= AMOUNT_MINOR_MAX, p
    assert 0 <= p.amount_refunded <= p.amount_captured <= p.amount_authorized <= p.amount, p
    status = p.status
    if status is _AUTHORIZED:
        assert p.amount_authorized > 0 and p.amount_captured == 0 and not p.capture_final, p
    elif status is _CAPTURED:
        assert p.amount_captured > 0 and p.amount_refunded == 0, p
    elif status in _NOTHING_AUTHORIZED:
        assert p.amount_authorized == 0 and p.amount_captured == 0, p
    elif status is _PARTIALLY_REFUNDED:
        assert 0 < p.amount_refunded < p.amount_captured and p.capture_final, p
    elif status is _REFUNDED:
        assert p.amount_refunded == p.amount_captured > 0 and p.capture_final, p
    elif status is _CANCELED:
        assert p.amount_captured == 0 and p.capture_final, p


def new_payment(payment_id: str, merchant_id: str, amount: int, currency: str) -> Payment:
    _check_amount(amount)
    p = Payment(id=payment_id, merchant_id=merchant_id, amount=amount, currency=currency)
    check_invariants(p)
    return p


def _check_amount(amount: int) -> None:
    if type(amount) is int and 0 < amount <= AMOUNT_MINOR_MAX:  # the common case, decided at once
        return
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= AMOUNT_MINOR_MAX:
        raise TransitionError(
            "invalid_amount", f"amount must be in 1..{AMOUNT_MINOR_MAX} minor units", "amount"
        )


def _move(before: Payment, actor: str, reason: str, at_ms: int, **changes: object) -> Transition:
    after = dataclasses.replace(before, version=before.version + 1, **changes)  # type: ignore[arg-type]
    return _transition(before, after, actor, reason, at_ms)


def _transition(before: Payment, after: Payment, actor: str, reason: str, at_ms: int) -> Transition:
    """`before` → `after` (already built with `version` + 1), checked and audited. The hot transitions
    build `after` directly: the same values as `dataclasses.replace`, without its per-field walk."""
    assert actor and len(actor) <= ACTOR_LENGTH_MAX, actor
    check_invariants(after)
    audit = AuditRow(before.id, before.status._value_, after.status._value_, actor, reason[:REASON_LENGTH_MAX],
                     at_ms)
    return Transition(before, after, audit)


# -- async path (workers): outcome of the PSP authorization -------------------------------------


def authorize(
    p: Payment,
    *,
    amount: int,
    psp: str,
    psp_reference: str,
    actor: str,
    at_ms: int,
    reason: str = "psp_approved",
) -> Transition:
    """processing|pending_verification → authorized (the PSP approved `amount`, ≤ requested)."""
    if p.status not in _AUTHORIZABLE:
        raise TransitionError("invalid_transition", f"cannot authorize a payment that is {p.status}")
    _check_amount(amount)
    if amount > p.amount:
        raise TransitionError(
            "amount_exceeds_requested", "authorized amount exceeds the requested amount", "amount"
        )
    after = Payment(p.id, p.merchant_id, p.amount, p.currency, _AUTHORIZED, amount, p.amount_captured,
                    p.amount_refunded, p.capture_final, psp, psp_reference, None, p.version + 1)
    return _transition(p, after, actor, reason, at_ms)


def fail(p: Payment, *, code: str, actor: str, at_ms: int, reason: str | None = None) -> Transition:
    """processing|pending_verification → failed (declined, or every attempt errored)."""
    if p.status not in _AUTHORIZABLE:
        raise TransitionError("invalid_transition", f"cannot fail a payment that is {p.status}")
    after = Payment(p.id, p.merchant_id, p.amount, p.currency, _FAILED, p.amount_authorized, p.amount_captured,
                    p.amount_refunded, p.capture_final, p.psp, p.psp_reference, code, p.version + 1)
    return _transition(p, after, actor, reason or code, at_ms)


def mark_pending_verification(
    p: Payment, *, psp: str, actor: str, at_ms: int, reason: str = "psp_timeout"
) -> Transition:
    """processing → pending_verification: the PSP call timed out, the outcome is unknown."""
    if p.status is not S.PROCESSING:
        raise TransitionError("invalid_transition", f"cannot mark a payment that is {p.status} as pending")
    after = Payment(p.id, p.merchant_id, p.amount, p.currency, _PENDING_VERIFICATION, p.amount_authorized,
                    p.amount_captured, p.amount_refunded, p.capture_final, psp, p.psp_reference, p.failure_code,
                    p.version + 1)
    return _transition(p, after, actor, reason, at_ms)


# -- 3-D Secure challenge (requires_action) -------------------------------------------------------


def _check_challenged(p: Payment) -> None:
    if p.status is not S.REQUIRES_ACTION:
        raise TransitionError("payment_not_challenged",
                              f"payment {p.id} is {p.status}; only a payment that requires action has a challenge")


def complete_challenge(p: Payment, *, actor: str, at_ms: int) -> Transition:
    """requires_action → processing: the customer passed the challenge; the authorization goes ahead."""
    _check_challenged(p)
    return _move(p, actor, "challenge_succeeded", at_ms, status=S.PROCESSING)


def fail_challenge(p: Payment, *, actor: str, at_ms: int, code: str = "authentication_failed") -> Transition:
    """requires_action → failed: the customer failed or abandoned the challenge."""
    _check_challenged(p)
    return _move(p, actor, "challenge_failed", at_ms, status=S.FAILED, failure_code=code)


def cancel_unauthorized(p: Payment, *, actor: str, at_ms: int, reason: str = "canceled") -> Transition:
    """requires_action → canceled: nothing was authorized, so no PSP call is needed."""
    _check_challenged(p)
    return _move(p, actor, reason, at_ms, status=S.CANCELED, capture_final=True)


def _refuse_challenged(p: Payment, what: str) -> None:
    if p.status is _REQUIRES_ACTION:
        raise TransitionError("payment_requires_action",
                              f"payment {p.id} requires action (a 3-D Secure challenge) and cannot be {what} yet")


# -- merchant operations ------------------------------------------------------------------------


def check_capture(p: Payment, amount: int) -> None:
    """Raise TransitionError unless `amount` can be captured now (call before asking the PSP)."""
    status = p.status
    if status is _CANCELED:
        raise TransitionError("payment_already_canceled", f"payment {p.id} is canceled")
    _refuse_challenged(p, "captured")
    _check_amount(amount)
    if (status is not _AUTHORIZED and status is not _CAPTURED) or p.capture_final:
        raise TransitionError(
            "payment_not_capturable", f"payment {p.id} is {p.status} and cannot be captured"
        )
    # = amount_capturable (authorized or captured, capture not final)
    if amount > p.amount_authorized - p.amount_captured:
        raise TransitionError(
            "amount_exceeds_capturable", f"at most {p.amount_capturable} can still be captured", "amount"
        )


def capture(
    p: Payment, *, amount: int, final_capture: bool, actor: str, at_ms: int, reason: str = "capture"
) -> Transition:
    """authorized|captured → captured. With `final_capture` the uncaptured rest of the hold is
    released and no further capture is possible; capturing everything is always final."""
    check_capture(p, amount)
    captured = p.amount_captured + amount
    final = final_capture or captured == p.amount_authorized
    after = Payment(p.id, p.merchant_id, p.amount, p.currency, _CAPTURED, p.amount_authorized, captured,
                    p.amount_refunded, final, p.psp, p.psp_reference, p.failure_code, p.version + 1)
    return _transition(p, after, actor, reason, at_ms)


def check_void(p: Payment) -> None:
    if p.status is S.CANCELED:
        raise TransitionError("payment_already_canceled", f"payment {p.id} is already canceled")
    _refuse_challenged(p, "voided")
    if p.status is not S.AUTHORIZED:
        raise TransitionError(
            "payment_not_voidable", f"payment {p.id} is {p.status}; only authorized payments can be voided"
        )


def void(p: Payment, *, actor: str, at_ms: int, reason: str = "void") -> Transition:
    """authorized → canceled, releasing the whole hold. Not possible after any capture."""
    check_void(p)
    return _move(p, actor, reason, at_ms, status=S.CANCELED, capture_final=True)


def check_refund(p: Payment, amount: int) -> None:
    if p.status is S.CANCELED:
        raise TransitionError("payment_already_canceled", f"payment {p.id} is canceled")
    if p.status is S.REFUNDED:
        raise TransitionError("payment_already_refunded", f"payment {p.id} is fully refunded")
    _refuse_challenged(p, "refunded")
    _check_amount(amount)
    if p.status not in (S.CAPTURED, S.PARTIALLY_REFUNDED):
        raise TransitionError(
            "payment_not_refundable", f"payment {p.id} is {p.status}; nothing captured to refund"
        )
    if amount > p.amount_refundable:
        raise TransitionError(
            "refund_exceeds_captured", f"at most {p.amount_refundable} can be refunded", "amount"
        )


def refund(p: Payment, *, amount: int, actor: str, at_ms: int, reason: str = "refund") -> Transition:
    """captured|partially_refunded → partially_refunded|refunded. The first refund also closes
    capturing, releasing any uncaptured hold."""
    check_refund(p, amount)
    refunded = p.amount_refunded + amount
    status = _REFUNDED if refunded == p.amount_captured else _PARTIALLY_REFUNDED
    after = Payment(p.id, p.merchant_id, p.amount, p.currency, status, p.amount_authorized, p.amount_captured,
                    refunded, True, p.psp, p.psp_reference, p.failure_code, p.version + 1)
    return _transition(p, after, actor, reason, at_ms)
