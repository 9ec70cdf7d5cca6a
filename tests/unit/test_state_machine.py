"""Payment state machine: valid transitions, typed errors, audit rows, and a model-based property."""

from __future__ import annotations

import dataclasses

import pytest
from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.payment import PaymentStatus as S
from gateway.domain.payment import TransitionError
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = 1_700_000_000_000


def authorized(amount: int = 1000) -> sm.Payment:
    p = sm.new_payment("pay_1", "m_1", amount, "EUR")
    return sm.authorize(
        p, amount=amount, psp="psp_a", psp_reference="psp_a_1", actor="worker", at_ms=T0
    ).payment


def captured(amount: int = 1000, capture_amount: int = 1000) -> sm.Payment:
    return sm.capture(
        authorized(amount), amount=capture_amount, final_capture=False, actor="m", at_ms=T0
    ).payment


def test_full_lifecycle_with_partial_captures_and_refunds() -> None:
    p = sm.new_payment("pay_1", "m_1", 1000, "EUR")
    assert p.status is S.PROCESSING
    t = sm.authorize(p, amount=1000, psp="psp_a", psp_reference="r1", actor="worker", at_ms=T0)
    assert t.audit == sm.AuditRow("pay_1", "processing", "authorized", "worker", "psp_approved", T0)
    p = t.payment
    p = sm.capture(p, amount=300, final_capture=False, actor="merchant", at_ms=T0 + 1).payment
    assert (p.status, p.amount_captured, p.amount_capturable, p.capture_final) == (
        S.CAPTURED,
        300,
        700,
        False,
    )
    p = sm.capture(p, amount=700, final_capture=False, actor="merchant", at_ms=T0 + 2).payment
    assert p.capture_final and p.amount_capturable == 0, "capturing everything closes capture"
    p = sm.refund(p, amount=400, actor="merchant", at_ms=T0 + 3).payment
    assert (p.status, p.amount_refunded, p.amount_refundable) == (S.PARTIALLY_REFUNDED, 400, 600)
    t = sm.refund(p, amount=600, actor="merchant", at_ms=T0 + 4, reason="customer request")
    assert t.payment.status is S.REFUNDED
    assert (t.audit.old_status, t.audit.new_status, t.audit.reason) == (
        "partially_refunded",
        "refunded",
        "customer request",
    )
    assert t.payment.version == 5


def test_final_capture_releases_the_rest_of_the_hold() -> None:
    t = sm.capture(authorized(1000), amount=600, final_capture=True, actor="m", at_ms=T0)
    assert t.payment.capture_final and t.payment.amount_held == 0
    postings = ledger.postings_for_transition(t, "op1")
    kinds = {p.kind: p.amount for p in postings}
    assert kinds == {ledger.PostingKind.CAPTURE: 600, ledger.PostingKind.HOLD_RELEASE: 400}
    with pytest.raises(TransitionError) as err:
        sm.capture(t.payment, amount=1, final_capture=False, actor="m", at_ms=T0)
    assert err.value.code == "payment_not_capturable"


def test_void_releases_the_whole_hold() -> None:
    t = sm.void(authorized(1000), actor="merchant", at_ms=T0)
    assert t.payment.status is S.CANCELED and t.payment.amount_held == 0
    [release] = ledger.postings_for_transition(t, "void1")
    assert release.kind is ledger.PostingKind.HOLD_RELEASE and release.amount == 1000


def test_timeout_goes_to_pending_verification_and_resolves_either_way() -> None:
    p = sm.new_payment("pay_1", "m_1", 1000, "EUR")
    pending = sm.mark_pending_verification(p, psp="psp_a", actor="worker", at_ms=T0).payment
    assert pending.status is S.PENDING_VERIFICATION and pending.psp == "psp_a"
    ok = sm.authorize(pending, amount=1000, psp="psp_a", psp_reference="r", actor="reconciler", at_ms=T0)
    assert ok.payment.status is S.AUTHORIZED
    failed = sm.fail(pending, code="do_not_honor", actor="reconciler", at_ms=T0)
    assert failed.payment.status is S.FAILED and failed.payment.failure_code == "do_not_honor"


@pytest.mark.parametrize(
    ("make", "op", "code"),
    [
        (
            lambda: sm.fail(sm.new_payment("p", "m", 1000, "EUR"), code="x", actor="w", at_ms=T0).payment,
            lambda p: sm.capture(p, amount=1, final_capture=False, actor="m", at_ms=T0),
            "payment_not_capturable",
        ),
        (
            lambda: sm.new_payment("p", "m", 1000, "EUR"),
            lambda p: sm.capture(p, amount=1, final_capture=False, actor="m", at_ms=T0),
            "payment_not_capturable",
        ),
        (
            authorized,
            lambda p: sm.capture(p, amount=1001, final_capture=False, actor="m", at_ms=T0),
            "amount_exceeds_capturable",
        ),
        (
            lambda: captured(1000, 400),
            lambda p: sm.capture(p, amount=601, final_capture=False, actor="m", at_ms=T0),
            "amount_exceeds_capturable",
        ),
        (
            lambda: captured(1000, 400),
            lambda p: sm.refund(p, amount=401, actor="m", at_ms=T0),
            "refund_exceeds_captured",
        ),
        (authorized, lambda p: sm.refund(p, amount=1, actor="m", at_ms=T0), "payment_not_refundable"),
        (
            lambda: sm.void(authorized(), actor="m", at_ms=T0).payment,
            lambda p: sm.void(p, actor="m", at_ms=T0),
            "payment_already_canceled",
        ),
        (
            lambda: sm.void(authorized(), actor="m", at_ms=T0).payment,
            lambda p: sm.capture(p, amount=1, final_capture=False, actor="m", at_ms=T0),
            "payment_already_canceled",
        ),
        (
            lambda: sm.void(authorized(), actor="m", at_ms=T0).payment,
            lambda p: sm.refund(p, amount=1, actor="m", at_ms=T0),
            "payment_already_canceled",
        ),
        (lambda: captured(1000, 10), lambda p: sm.void(p, actor="m", at_ms=T0), "payment_not_voidable"),
        (
            lambda: sm.refund(captured(), amount=1000, actor="m", at_ms=T0).payment,
            lambda p: sm.refund(p, amount=1, actor="m", at_ms=T0),
            "payment_already_refunded",
        ),
        (
            authorized,
            lambda p: sm.capture(p, amount=0, final_capture=False, actor="m", at_ms=T0),
            "invalid_amount",
        ),
        (
            authorized,
            lambda p: sm.authorize(p, amount=1, psp="a", psp_reference="r", actor="w", at_ms=T0),
            "invalid_transition",
        ),
        (authorized, lambda p: sm.fail(p, code="x", actor="w", at_ms=T0), "invalid_transition"),
    ],
)
def test_invalid_transitions_raise_typed_errors(make, op, code: str) -> None:
    before = make()
    with pytest.raises(TransitionError) as err:
        op(before)
    assert err.value.code == code and err.value.http_status == 422


def test_invariant_violations_are_caught_by_assertions() -> None:
    broken = sm.Payment(
        id="p",
        merchant_id="m",
        amount=100,
        currency="EUR",
        status=S.CAPTURED,
        amount_authorized=100,
        amount_captured=150,
    )
    with pytest.raises(AssertionError):
        sm.check_invariants(broken)


def test_each_transition_builds_the_payment_dataclasses_replace_would() -> None:
    """The transitions build the new payment field by field: it is `replace` of the old one with the
    transition's changes and the version one higher, no field dropped or reordered."""
    pending = sm.Payment("pay_r", "m_r", 1000, "EUR", S.PENDING_VERIFICATION, psp="psp_b", failure_code="prev",
                         version=4)
    processing = dataclasses.replace(pending, status=S.PROCESSING, psp=None)
    auth = sm.authorize(pending, amount=900, psp="psp_a", psp_reference="r9", actor="w", at_ms=T0).payment
    cap = sm.capture(auth, amount=300, final_capture=False, actor="m", at_ms=T0).payment
    cases = [
        (sm.authorize(pending, amount=900, psp="psp_a", psp_reference="r9", actor="w", at_ms=T0),
         {"status": S.AUTHORIZED, "amount_authorized": 900, "psp": "psp_a", "psp_reference": "r9",
          "failure_code": None}),
        (sm.fail(pending, code="declined", actor="w", at_ms=T0), {"status": S.FAILED, "failure_code": "declined"}),
        (sm.mark_pending_verification(processing, psp="psp_c", actor="w", at_ms=T0),
         {"status": S.PENDING_VERIFICATION, "psp": "psp_c"}),
        (sm.capture(auth, amount=300, final_capture=False, actor="m", at_ms=T0),
         {"status": S.CAPTURED, "amount_captured": 300}),
        (sm.capture(auth, amount=300, final_capture=True, actor="m", at_ms=T0),
         {"status": S.CAPTURED, "amount_captured": 300, "capture_final": True}),
        (sm.capture(cap, amount=600, final_capture=False, actor="m", at_ms=T0),
         {"status": S.CAPTURED, "amount_captured": 900, "capture_final": True}),
        (sm.refund(cap, amount=100, actor="m", at_ms=T0),
         {"status": S.PARTIALLY_REFUNDED, "amount_refunded": 100, "capture_final": True}),
        (sm.refund(cap, amount=300, actor="m", at_ms=T0),
         {"status": S.REFUNDED, "amount_refunded": 300, "capture_final": True}),
        (sm.void(auth, actor="m", at_ms=T0), {"status": S.CANCELED, "capture_final": True}),
    ]
    for t, changes in cases:
        expected = dataclasses.replace(t.before, version=t.before.version + 1, **changes)
        assert dataclasses.astuple(t.payment) == dataclasses.astuple(expected), changes
        assert t.payment.status is changes["status"]
        assert t.audit.old_status == t.before.status.value and t.audit.new_status == t.payment.status.value
        assert type(t.audit.old_status) is str and type(t.audit.new_status) is str


def test_a_transition_refuses_an_actor_that_is_empty_or_too_long() -> None:
    p = sm.new_payment("pay_1", "m_1", 1000, "EUR")
    for actor in ("", "a" * (sm.ACTOR_LENGTH_MAX + 1)):
        with pytest.raises(AssertionError):
            sm.authorize(p, amount=1000, psp="psp_a", psp_reference="r", actor=actor, at_ms=T0)
        with pytest.raises(AssertionError):
            sm.capture(authorized(), amount=10, final_capture=False, actor=actor, at_ms=T0)


def test_the_domain_enums_values_lookups_and_pickling_are_a_str_enums() -> None:
    import pickle
    from enum import StrEnum

    from gateway.domain.attempt import AttemptStatus, Outcome

    for enum in (S, AttemptStatus, Outcome, ledger.Direction, ledger.PostingKind):
        assert issubclass(enum, StrEnum) and len(enum) == len(enum.__members__) > 1
        for member in enum:
            assert type(member.value) is str and member.value == member == str(member) == f"{member}"
            assert enum(member.value) is member and enum[member.name] is member
            assert pickle.loads(pickle.dumps(member)) is member
    assert S.AUTHORIZED.value == "authorized" and ledger.PostingKind.PSP_FEE.value == "psp_fee"


def test_an_operation_attempt_is_its_started_row() -> None:
    from gateway.domain.attempt import AttemptRow, AttemptStatus, operation_attempt

    p = authorized()
    assert operation_attempt(p, "capture", 400, True, "psp_a", "pay_1:capture:1", 2, T0) == AttemptRow(
        attempt_id="pay_1:capture:1#2", payment_id="pay_1", attempt_no=2, operation="capture", psp="psp_a",
        idempotency_key="pay_1:capture:1", amount=400, currency="EUR", status=AttemptStatus.STARTED,
        started_at_ms=T0, final_capture=True, psp_reference="psp_a_1")


# -- model-based property: random operation sequences -------------------------------------------

AMOUNT = 1000

operations = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(1, 1200)),
        st.tuples(st.just("fail")),
        st.tuples(st.just("pending")),
        st.tuples(st.just("capture"), st.integers(1, 1200), st.booleans(), st.integers(0, 30)),
        st.tuples(st.just("void")),
        st.tuples(st.just("refund"), st.integers(1, 1200)),
    ),
    max_size=25,
)


def model_step(m: dict, op: tuple) -> str | None:
    """The rules restated as simply as possible; returns the expected error code or None."""
    name, status = op[0], m["status"]
    if name in ("authorize", "fail", "pending"):
        allowed = ("processing",) if name == "pending" else ("processing", "pending_verification")
        if status not in allowed:
            return "invalid_transition"
        if name == "authorize":
            if op[1] > AMOUNT:
                return "amount_exceeds_requested"
            m.update(status="authorized", auth=op[1])
        else:
            m["status"] = "failed" if name == "fail" else "pending_verification"
        return None
    if status == "canceled":
        return "payment_already_canceled"
    if name == "capture":
        if status not in ("authorized", "captured") or m["final"]:
            return "payment_not_capturable"
        if op[1] > m["auth"] - m["cap"]:
            return "amount_exceeds_capturable"
        m["cap"] += op[1]
        m.update(status="captured", final=op[2] or m["cap"] == m["auth"])
        return None
    if name == "void":
        if status != "authorized":
            return "payment_not_voidable"
        m.update(status="canceled", final=True)
        return None
    if status == "refunded":
        return "payment_already_refunded"
    if status not in ("captured", "partially_refunded"):
        return "payment_not_refundable"
    if op[1] > m["cap"] - m["ref"]:
        return "refund_exceeds_captured"
    m["ref"] += op[1]
    m.update(status="refunded" if m["ref"] == m["cap"] else "partially_refunded", final=True)
    return None


def apply(p: sm.Payment, op: tuple, at_ms: int) -> sm.Transition:
    name = op[0]
    if name == "authorize":
        return sm.authorize(p, amount=op[1], psp="psp_a", psp_reference="r", actor="w", at_ms=at_ms)
    if name == "fail":
        return sm.fail(p, code="declined", actor="w", at_ms=at_ms)
    if name == "pending":
        return sm.mark_pending_verification(p, psp="psp_a", actor="w", at_ms=at_ms)
    if name == "capture":
        return sm.capture(p, amount=op[1], final_capture=op[2], actor="m", at_ms=at_ms)
    if name == "void":
        return sm.void(p, actor="m", at_ms=at_ms)
    return sm.refund(p, amount=op[1], actor="m", at_ms=at_ms)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_operation_sequences_match_the_model_and_keep_the_ledger_balanced(ops: list[tuple]) -> None:
    p = sm.new_payment("pay_h", "m_h", AMOUNT, "EUR")
    model = {"status": "processing", "auth": 0, "cap": 0, "ref": 0, "final": False}
    postings: list[ledger.Posting] = []
    for i, op in enumerate(ops):
        expected = model_step(model, op)
        try:
            t = apply(p, op, T0 + i)
        except TransitionError as err:
            assert err.code == expected, (op, model)
            continue
        assert expected is None, (op, expected)
        assert t.audit.old_status == p.status and t.audit.new_status == t.payment.status
        fee = op[3] if op[0] == "capture" else 0
        postings.extend(ledger.postings_for_transition(t, f"op{i}", fee_minor=fee))
        p = t.payment
        assert (
            p.status.value,
            p.amount_authorized,
            p.amount_captured,
            p.amount_refunded,
            p.capture_final,
        ) == (model["status"], model["auth"], model["cap"], model["ref"], model["final"])
        assert 0 <= p.amount_refunded <= p.amount_captured <= p.amount_authorized <= p.amount
        assert ledger.check(postings) == []
        bal = ledger.balances(postings)
        assert bal.get(("customer_holds", "EUR"), 0) == p.amount_held
        assert bal.get(("merchant:m_h:pending", "EUR"), 0) == -p.amount_held
        assert bal.get(("merchant:m_h:available", "EUR"), 0) == -(p.amount_captured - p.amount_refunded)
