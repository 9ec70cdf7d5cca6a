"""Append-only double-entry ledger for the money path.

Chart of accounts (per currency; balances are debit-positive):

    customer_holds              memo asset: funds held on customers' cards by authorizations
    merchant:{id}:pending       memo liability: authorized for the merchant, not captured yet
    merchant:{id}:available     liability: captured funds owed to the merchant, net of refunds
    psp:{name}:receivable       asset: what the PSP owes us (settled by its settlement file)
    fees:{name}                 expense: processing fees charged by the PSP

Postings (every one balances; amounts are positive minor units):

    authorization_hold  A   Dr customer_holds          Cr merchant:{m}:pending
    hold_release        R   Dr merchant:{m}:pending    Cr customer_holds
    capture             C   Dr merchant:{m}:pending    Cr customer_holds          (hold consumed)
                            Dr psp:{p}:receivable      Cr merchant:{m}:available  (money earned)
    refund              R   Dr merchant:{m}:available  Cr psp:{p}:receivable
    psp_fee             F   Dr fees:{p}                Cr psp:{p}:receivable

Corrections are new postings that mirror the original line by line (`reverse`), never updates.
This module does no I/O: builders return `Posting`s, `Posting.rows()` gives the table rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.domain.payment import FastStrEnum, Transition

LINES_PER_POSTING_MAX = 16
POSTING_ID_LENGTH_MAX = 255


class Direction(FastStrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


class PostingKind(FastStrEnum):
    AUTHORIZATION_HOLD = "authorization_hold"
    HOLD_RELEASE = "hold_release"
    CAPTURE = "capture"
    REFUND = "refund"
    PSP_FEE = "psp_fee"


_DEBIT = Direction.DEBIT
_CREDIT = Direction.CREDIT
_AUTHORIZATION_HOLD = PostingKind.AUTHORIZATION_HOLD
_HOLD_RELEASE = PostingKind.HOLD_RELEASE
_CAPTURE = PostingKind.CAPTURE
_REFUND = PostingKind.REFUND
_PSP_FEE = PostingKind.PSP_FEE
# `:{kind}`, the tail of a posting id (`{op_id}:{kind}`).
_HOLD_TAIL = f":{_AUTHORIZATION_HOLD._value_}"
_RELEASE_TAIL = f":{_HOLD_RELEASE._value_}"
_CAPTURE_TAIL = f":{_CAPTURE._value_}"
_REFUND_TAIL = f":{_REFUND._value_}"
_FEE_TAIL = f":{_PSP_FEE._value_}"


class UnbalancedPosting(AssertionError):
    """A posting whose debits and credits differ, or that is otherwise malformed: a bug."""


def customer_holds() -> str:
    return "customer_holds"


def merchant_pending(merchant_id: str) -> str:
    return f"merchant:{merchant_id}:pending"


def merchant_available(merchant_id: str) -> str:
    return f"merchant:{merchant_id}:available"


def psp_receivable(psp: str) -> str:
    return f"psp:{psp}:receivable"


def psp_fees(psp: str) -> str:
    return f"fees:{psp}"


@dataclass(frozen=True, slots=True)
class Line:
    account: str
    direction: Direction
    amount: int


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One row of table `ledger_entries` (exactly one of debit/credit is non-zero)."""

    posting_id: str
    line_no: int
    payment_id: str
    kind: str
    account: str
    currency: str
    debit: int
    credit: int
    at_ms: int
    reverses: str | None


@dataclass(frozen=True, slots=True)
class Posting:
    """One balanced journal entry. `amount` is the business amount (e.g. the captured amount).

    The constructor refuses anything unbalanced: this is the ledger's core invariant.
    """

    posting_id: str
    payment_id: str
    kind: PostingKind
    currency: str
    amount: int
    lines: tuple[Line, ...]
    at_ms: int
    reverses: str | None = None

    def __post_init__(self) -> None:
        lines = self.lines
        if not (0 < len(self.posting_id) <= POSTING_ID_LENGTH_MAX):
            raise UnbalancedPosting(f"posting id must be 1..{POSTING_ID_LENGTH_MAX} characters")
        if not (2 <= len(lines) <= LINES_PER_POSTING_MAX):
            raise UnbalancedPosting(f"posting {self.posting_id} has {len(lines)} lines")
        # One pass over the lines: debits, credits and whether every amount is positive.
        debits = credits = 0
        positive = self.amount > 0
        for x in lines:
            amount = x.amount
            if amount <= 0:
                positive = False
            direction = x.direction
            if direction is _DEBIT:
                debits += amount
            elif direction is _CREDIT:
                credits += amount
        if not positive:
            raise UnbalancedPosting(f"posting {self.posting_id} has a non-positive amount")
        if debits != credits:
            raise UnbalancedPosting(f"posting {self.posting_id}: debits {debits} != credits {credits}")

    @property
    def sign(self) -> int:
        """+1 for an original posting, -1 for a reversal (for per-kind totals)."""
        return -1 if self.reverses else 1

    def row_values(self) -> list[tuple[str, int, str, str, str, str, int, int, int, str | None]]:
        """`rows()` as plain tuples in `LedgerRow`'s field order (what a batched INSERT sends)."""
        posting_id, payment_id, kind = self.posting_id, self.payment_id, self.kind._value_
        currency, at_ms, reverses = self.currency, self.at_ms, self.reverses
        return [
            (posting_id, i, payment_id, kind, x.account, currency, x.amount, 0, at_ms, reverses)
            if x.direction is _DEBIT else
            (posting_id, i, payment_id, kind, x.account, currency, 0, x.amount, at_ms, reverses)
            for i, x in enumerate(self.lines)
        ]

    def rows(self) -> list[LedgerRow]:
        return [
            LedgerRow(
                posting_id=self.posting_id,
                line_no=i,
                payment_id=self.payment_id,
                kind=self.kind.value,
                account=x.account,
                currency=self.currency,
                debit=x.amount if x.direction is Direction.DEBIT else 0,
                credit=x.amount if x.direction is Direction.CREDIT else 0,
                at_ms=self.at_ms,
                reverses=self.reverses,
            )
            for i, x in enumerate(self.lines)
        ]


# -- builders ---------------------------------------------------------------------------------

_CUSTOMER_HOLDS = customer_holds()


def hold(
    posting_id: str, payment_id: str, merchant_id: str, currency: str, amount: int, at_ms: int
) -> Posting:
    lines = (Line(_CUSTOMER_HOLDS, _DEBIT, amount), Line(merchant_pending(merchant_id), _CREDIT, amount))
    return Posting(posting_id, payment_id, _AUTHORIZATION_HOLD, currency, amount, lines, at_ms)


def hold_release(
    posting_id: str, payment_id: str, merchant_id: str, currency: str, amount: int, at_ms: int
) -> Posting:
    lines = (Line(merchant_pending(merchant_id), _DEBIT, amount), Line(_CUSTOMER_HOLDS, _CREDIT, amount))
    return Posting(posting_id, payment_id, _HOLD_RELEASE, currency, amount, lines, at_ms)


def capture(
    posting_id: str, payment_id: str, merchant_id: str, psp: str, currency: str, amount: int, at_ms: int
) -> Posting:
    lines = (
        Line(merchant_pending(merchant_id), _DEBIT, amount),
        Line(_CUSTOMER_HOLDS, _CREDIT, amount),
        Line(psp_receivable(psp), _DEBIT, amount),
        Line(merchant_available(merchant_id), _CREDIT, amount),
    )
    return Posting(posting_id, payment_id, _CAPTURE, currency, amount, lines, at_ms)


def refund(
    posting_id: str, payment_id: str, merchant_id: str, psp: str, currency: str, amount: int, at_ms: int
) -> Posting:
    lines = (Line(merchant_available(merchant_id), _DEBIT, amount),
             Line(psp_receivable(psp), _CREDIT, amount))
    return Posting(posting_id, payment_id, _REFUND, currency, amount, lines, at_ms)


def psp_fee(posting_id: str, payment_id: str, psp: str, currency: str, amount: int, at_ms: int) -> Posting:
    lines = (Line(psp_fees(psp), _DEBIT, amount), Line(psp_receivable(psp), _CREDIT, amount))
    return Posting(posting_id, payment_id, _PSP_FEE, currency, amount, lines, at_ms)


def reverse(original: Posting, posting_id: str, at_ms: int) -> Posting:
    """A correction: the same lines with debit and credit swapped, pointing at the original."""
    if original.reverses is not None:
        raise UnbalancedPosting(f"posting {original.posting_id} is itself a reversal")
    flipped = tuple(
        Line(x.account, Direction.CREDIT if x.direction is Direction.DEBIT else Direction.DEBIT, x.amount)
        for x in original.lines
    )
    return Posting(
        posting_id,
        original.payment_id,
        original.kind,
        original.currency,
        original.amount,
        flipped,
        at_ms,
        reverses=original.posting_id,
    )


def postings_for_transition(t: Transition, op_id: str, *, fee_minor: int = 0) -> list[Posting]:
    """The postings a state transition implies, derived from the change in amounts.

    Posting ids are `{op_id}:{kind}`, so replaying the same operation (same `op_id`, e.g. the PSP
    idempotency key) yields the same ids and the store can de-duplicate on them.
    """
    b, a = t.before, t.payment
    at = t.audit.at_ms
    out: list[Posting] = []
    authorized = a.amount_authorized - b.amount_authorized
    captured = a.amount_captured - b.amount_captured
    refunded = a.amount_refunded - b.amount_refunded
    # b.amount_held + authorized - captured - a.amount_held
    released = ((0 if b.capture_final else b.amount_authorized - b.amount_captured) + authorized - captured
                - (0 if a.capture_final else a.amount_authorized - a.amount_captured))
    assert authorized >= 0 and captured >= 0 and refunded >= 0 and released >= 0, (b, a)
    pid, merchant_id, currency = a.id, a.merchant_id, a.currency
    if authorized:
        out.append(hold(op_id + _HOLD_TAIL, pid, merchant_id, currency, authorized, at))
    if captured:
        assert a.psp is not None
        out.append(capture(op_id + _CAPTURE_TAIL, pid, merchant_id, a.psp, currency, captured, at))
    if released:
        out.append(hold_release(op_id + _RELEASE_TAIL, pid, merchant_id, currency, released, at))
    if refunded:
        assert a.psp is not None
        out.append(refund(op_id + _REFUND_TAIL, pid, merchant_id, a.psp, currency, refunded, at))
    if fee_minor:
        assert a.psp is not None and fee_minor > 0
        out.append(psp_fee(op_id + _FEE_TAIL, pid, a.psp, currency, fee_minor, at))
    return out


# -- invariants -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    code: str
    message: str
    payment_id: str | None = None
    currency: str | None = None


def balances(postings: Iterable[Posting]) -> dict[tuple[str, str], int]:
    """Net balance (debits minus credits) per (account, currency)."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for p in postings:
        for x in p.lines:
            out[(x.account, p.currency)] += x.amount if x.direction is Direction.DEBIT else -x.amount
    return dict(out)


def check(postings: Iterable[Posting]) -> list[Violation]:
    """Every invariant the ledger must satisfy; an empty list means a healthy ledger.

    Per currency debits equal credits; posting ids are unique; a reversal points at an existing
    original and each original is reversed at most once; per payment and currency,
    refunds ≤ captures and captures + releases ≤ holds.
    """
    violations: list[Violation] = []
    seen: dict[str, Posting] = {}
    reversed_ids: set[str] = set()
    debit_total: dict[str, int] = defaultdict(int)
    credit_total: dict[str, int] = defaultdict(int)
    per_payment: dict[tuple[str, str], dict[PostingKind, int]] = defaultdict(lambda: defaultdict(int))
    ordered = list(postings)
    for p in ordered:
        if p.posting_id in seen:
            violations.append(
                Violation("duplicate_posting", f"posting {p.posting_id} appears twice", p.payment_id)
            )
            continue
        seen[p.posting_id] = p
    for p in seen.values():
        d = sum(x.amount for x in p.lines if x.direction is Direction.DEBIT)
        c = sum(x.amount for x in p.lines if x.direction is Direction.CREDIT)
        debit_total[p.currency] += d
        credit_total[p.currency] += c
        if d != c:
            violations.append(
                Violation("unbalanced_posting", f"posting {p.posting_id}: {d} != {c}", p.payment_id)
            )
        if p.reverses is not None:
            original = seen.get(p.reverses)
            if original is None:
                violations.append(
                    Violation(
                        "reversal_of_unknown_posting",
                        f"{p.posting_id} reverses unknown {p.reverses}",
                        p.payment_id,
                    )
                )
            elif p.reverses in reversed_ids:
                violations.append(
                    Violation(
                        "posting_reversed_twice", f"{p.reverses} is reversed more than once", p.payment_id
                    )
                )
            reversed_ids.add(p.reverses)
        per_payment[(p.payment_id, p.currency)][p.kind] += p.sign * p.amount
    for currency in sorted(debit_total):
        if debit_total[currency] != credit_total[currency]:
            violations.append(
                Violation(
                    "currency_unbalanced",
                    f"{currency}: debits {debit_total[currency]} != credits {credit_total[currency]}",
                    currency=currency,
                )
            )
    for (payment_id, currency), totals in sorted(per_payment.items()):
        held = totals[PostingKind.AUTHORIZATION_HOLD]
        captured = totals[PostingKind.CAPTURE]
        released = totals[PostingKind.HOLD_RELEASE]
        refunded = totals[PostingKind.REFUND]
        if refunded > captured:
            violations.append(
                Violation(
                    "refunds_exceed_captures",
                    f"refunded {refunded} > captured {captured}",
                    payment_id,
                    currency,
                )
            )
        if captured > held:
            violations.append(
                Violation(
                    "captures_exceed_authorizations",
                    f"captured {captured} > held {held}",
                    payment_id,
                    currency,
                )
            )
        if captured + released > held:
            violations.append(
                Violation(
                    "hold_overdrawn",
                    f"captured {captured} + released {released} > held {held}",
                    payment_id,
                    currency,
                )
            )
        if min(held, captured, released, refunded) < 0:
            violations.append(
                Violation(
                    "negative_total", f"a per-kind total is negative: {dict(totals)}", payment_id, currency
                )
            )
    return violations
