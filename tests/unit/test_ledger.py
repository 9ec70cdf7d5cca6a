"""Double-entry ledger: balanced postings, chart of accounts, reversals, invariant checks."""

from __future__ import annotations

import pytest
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.ledger import Direction, Line, Posting, PostingKind, UnbalancedPosting

T0 = 1_700_000_000_000


def test_every_builder_produces_a_balanced_posting() -> None:
    postings = [
        ledger.hold("h", "p", "m", "EUR", 1000, T0),
        ledger.hold_release("rel", "p", "m", "EUR", 200, T0),
        ledger.capture("c", "p", "m", "psp_a", "EUR", 800, T0),
        ledger.refund("r", "p", "m", "psp_a", "EUR", 300, T0),
        ledger.psp_fee("f", "p", "psp_a", "EUR", 22, T0),
    ]
    for p in postings:
        debits = sum(x.amount for x in p.lines if x.direction is Direction.DEBIT)
        credits = sum(x.amount for x in p.lines if x.direction is Direction.CREDIT)
        assert debits == credits > 0
    assert ledger.check(postings) == []


def test_constructor_refuses_an_unbalanced_posting() -> None:
    with pytest.raises(UnbalancedPosting):
        Posting(
            "x",
            "p",
            PostingKind.CAPTURE,
            "EUR",
            100,
            (Line("a", Direction.DEBIT, 100), Line("b", Direction.CREDIT, 99)),
            T0,
        )
    with pytest.raises(AssertionError):
        Posting("x", "p", PostingKind.CAPTURE, "EUR", 100, (Line("a", Direction.DEBIT, 100),), T0)
    with pytest.raises(AssertionError):
        Posting(
            "x",
            "p",
            PostingKind.CAPTURE,
            "EUR",
            0,
            (Line("a", Direction.DEBIT, 0), Line("b", Direction.CREDIT, 0)),
            T0,
        )


def test_constructor_refuses_a_balanced_posting_with_a_non_positive_line_or_an_empty_id() -> None:
    lines = (Line("a", Direction.DEBIT, 100), Line("b", Direction.CREDIT, 150), Line("c", Direction.CREDIT, -50))
    with pytest.raises(UnbalancedPosting, match="non-positive"):
        Posting("x", "p", PostingKind.CAPTURE, "EUR", 100, lines, T0)
    ok = (Line("a", Direction.DEBIT, 100), Line("b", Direction.CREDIT, 100))
    with pytest.raises(UnbalancedPosting, match="non-positive"):
        Posting("x", "p", PostingKind.CAPTURE, "EUR", -1, ok, T0)
    with pytest.raises(UnbalancedPosting, match="posting id"):
        Posting("", "p", PostingKind.CAPTURE, "EUR", 100, ok, T0)
    with pytest.raises(UnbalancedPosting, match="posting id"):
        Posting("x" * (ledger.POSTING_ID_LENGTH_MAX + 1), "p", PostingKind.CAPTURE, "EUR", 100, ok, T0)
    with pytest.raises(UnbalancedPosting, match="lines"):
        Posting("x", "p", PostingKind.CAPTURE, "EUR", 100, ok * 9, T0)


def test_postings_for_a_transition_are_named_after_the_operation_and_their_kind() -> None:
    p = sm.new_payment("pay_1", "m1", 1000, "EUR")
    t = sm.authorize(p, amount=1000, psp="psp_a", psp_reference="r", actor="w", at_ms=T0)
    assert [(x.posting_id, x.kind, x.amount) for x in ledger.postings_for_transition(t, "k1")] == [
        ("k1:authorization_hold", PostingKind.AUTHORIZATION_HOLD, 1000)]
    t = sm.capture(t.payment, amount=600, final_capture=True, actor="w", at_ms=T0 + 1)
    posted = ledger.postings_for_transition(t, "k2", fee_minor=7)
    assert [(x.posting_id, x.kind, x.amount, x.at_ms) for x in posted] == [
        ("k2:capture", PostingKind.CAPTURE, 600, T0 + 1), ("k2:hold_release", PostingKind.HOLD_RELEASE, 400, T0 + 1),
        ("k2:psp_fee", PostingKind.PSP_FEE, 7, T0 + 1)]
    assert [x.account for x in posted[0].lines] == [
        "merchant:m1:pending", "customer_holds", "psp:psp_a:receivable", "merchant:m1:available"]
    t = sm.refund(t.payment, amount=600, actor="m", at_ms=T0 + 2)
    assert [(x.posting_id, x.kind, x.amount) for x in ledger.postings_for_transition(t, "k3")] == [
        ("k3:refund", PostingKind.REFUND, 600)]


def test_lifecycle_balances_by_account() -> None:
    postings = [
        ledger.hold("h", "p", "m1", "EUR", 1000, T0),
        ledger.capture("c", "p", "m1", "psp_a", "EUR", 600, T0),
        ledger.hold_release("rel", "p", "m1", "EUR", 400, T0),
        ledger.psp_fee("f", "p", "psp_a", "EUR", 19, T0),
        ledger.refund("r", "p", "m1", "psp_a", "EUR", 200, T0),
    ]
    assert ledger.balances(postings) == {
        ("customer_holds", "EUR"): 0,
        ("merchant:m1:pending", "EUR"): 0,
        ("merchant:m1:available", "EUR"): -400,
        ("psp:psp_a:receivable", "EUR"): 600 - 19 - 200,
        ("fees:psp_a", "EUR"): 19,
    }
    assert sum(ledger.balances(postings).values()) == 0


def test_rows_are_one_per_line_with_debit_or_credit() -> None:
    rows = ledger.capture("c1", "pay_1", "m1", "psp_b", "USD", 500, T0).rows()
    assert [(r.line_no, r.account, r.debit, r.credit) for r in rows] == [
        (0, "merchant:m1:pending", 500, 0),
        (1, "customer_holds", 0, 500),
        (2, "psp:psp_b:receivable", 500, 0),
        (3, "merchant:m1:available", 0, 500),
    ]
    assert all(r.posting_id == "c1" and r.kind == "capture" and r.currency == "USD" for r in rows)


def test_row_values_are_the_rows_as_tuples_in_column_order() -> None:
    """What the batched INSERT sends (`row_values`) is what `rows()` describes, field by field."""
    import dataclasses

    original = ledger.capture("c", "p", "m", "psp_a", "EUR", 500, T0)
    for p in (original, ledger.refund("r", "p", "m", "psp_a", "EUR", 300, T0), ledger.reverse(original, "c:rev", T0)):
        assert p.row_values() == [dataclasses.astuple(r) for r in p.rows()]
    assert ledger.reverse(original, "c:rev", T0).row_values()[0][-1] == "c"


def test_reversal_is_a_new_posting_that_cancels_the_original() -> None:
    original = ledger.capture("c", "p", "m", "psp_a", "EUR", 500, T0)
    fix = ledger.reverse(original, "c:rev", T0 + 1)
    assert fix.reverses == "c" and fix.posting_id != original.posting_id
    assert all(v == 0 for v in ledger.balances([original, fix]).values())
    assert ledger.check([ledger.hold("h", "p", "m", "EUR", 500, T0), original, fix]) == []
    with pytest.raises(AssertionError):
        ledger.reverse(fix, "c:rev:rev", T0)


def codes(violations: list[ledger.Violation]) -> set[str]:
    return {v.code for v in violations}


def test_check_reports_refunds_above_captures_and_captures_above_holds() -> None:
    over_refund = [
        ledger.hold("h", "p", "m", "EUR", 100, T0),
        ledger.capture("c", "p", "m", "a", "EUR", 100, T0),
        ledger.refund("r", "p", "m", "a", "EUR", 150, T0),
    ]
    assert codes(ledger.check(over_refund)) == {"refunds_exceed_captures"}
    over_capture = [
        ledger.hold("h", "p", "m", "EUR", 100, T0),
        ledger.capture("c", "p", "m", "a", "EUR", 120, T0),
    ]
    assert codes(ledger.check(over_capture)) == {"captures_exceed_authorizations", "hold_overdrawn"}
    released_twice = [
        ledger.hold("h", "p", "m", "EUR", 100, T0),
        ledger.hold_release("r1", "p", "m", "EUR", 100, T0),
        ledger.hold_release("r2", "p", "m", "EUR", 100, T0),
    ]
    assert codes(ledger.check(released_twice)) == {"hold_overdrawn"}


def test_check_reports_duplicate_ids_and_bad_reversals() -> None:
    h = ledger.hold("h", "p", "m", "EUR", 100, T0)
    rev = ledger.reverse(h, "h:rev", T0)
    assert codes(ledger.check([h, h])) == {"duplicate_posting"}
    assert "posting_reversed_twice" in codes(ledger.check([h, rev, ledger.reverse(h, "h:rev2", T0)]))
    assert "reversal_of_unknown_posting" in codes(ledger.check([rev]))


def test_check_reports_an_unbalanced_currency() -> None:
    bad = ledger.hold("h", "p", "m", "EUR", 100, T0)
    # Bypass the constructor the way a corrupted store row would.
    object.__setattr__(
        bad, "lines", (Line("customer_holds", Direction.DEBIT, 100), Line("x", Direction.CREDIT, 90))
    )
    assert codes(ledger.check([bad])) >= {"unbalanced_posting", "currency_unbalanced"}


def test_postings_for_transition_have_deterministic_ids_and_amounts() -> None:
    p = sm.new_payment("pay_9", "m9", 1000, "JPY")
    t = sm.authorize(p, amount=1000, psp="psp_c", psp_reference="r", actor="w", at_ms=T0)
    [h] = ledger.postings_for_transition(t, "pay_9:auth:1")
    assert (h.posting_id, h.kind, h.amount, h.currency) == (
        "pay_9:auth:1:authorization_hold",
        "authorization_hold",
        1000,
        "JPY",
    )
    t2 = sm.capture(t.payment, amount=1000, final_capture=False, actor="m", at_ms=T0)
    again = ledger.postings_for_transition(t2, "pay_9:capture:1", fee_minor=17)
    assert [x.posting_id for x in again] == ["pay_9:capture:1:capture", "pay_9:capture:1:psp_fee"]
    assert again == ledger.postings_for_transition(t2, "pay_9:capture:1", fee_minor=17)
