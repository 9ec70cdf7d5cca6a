"""The 3-D Secure challenge in the payment state machine: a `requires_action` payment can be resumed,
failed or cancelled, and every merchant operation on it is a 422 with a stable code."""

from __future__ import annotations

import dataclasses

import pytest
from gateway.domain import payment as sm

CHALLENGED = dataclasses.replace(sm.new_payment("pay_" + "c" * 24, "acct_x", 5000, "USD"),
                                 status=sm.PaymentStatus.REQUIRES_ACTION)


def test_requires_action_is_a_status_with_nothing_authorized() -> None:
    assert sm.PaymentStatus("requires_action") is sm.PaymentStatus.REQUIRES_ACTION
    sm.check_invariants(CHALLENGED)
    assert CHALLENGED.amount_capturable == CHALLENGED.amount_refundable == CHALLENGED.amount_held == 0


def test_completed_challenge_resumes_processing() -> None:
    t = sm.complete_challenge(CHALLENGED, actor="merchant", at_ms=1)
    assert t.payment.status is sm.PaymentStatus.PROCESSING and t.payment.version == CHALLENGED.version + 1
    assert (t.audit.old_status, t.audit.new_status) == ("requires_action", "processing")


def test_failed_challenge_fails_and_cancel_cancels_without_a_psp() -> None:
    failed = sm.fail_challenge(CHALLENGED, actor="merchant", at_ms=1).payment
    assert failed.status is sm.PaymentStatus.FAILED and failed.failure_code == "authentication_failed"
    canceled = sm.cancel_unauthorized(CHALLENGED, actor="merchant", at_ms=1).payment
    assert canceled.status is sm.PaymentStatus.CANCELED and canceled.capture_final


@pytest.mark.parametrize("check", [lambda p: sm.check_capture(p, 100), sm.check_void, lambda p: sm.check_refund(p, 1)])
def test_operations_on_a_challenged_payment_are_refused_with_a_code(check) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sm.TransitionError) as e:
        check(CHALLENGED)
    assert e.value.code == "payment_requires_action" and e.value.http_status == 422


def test_only_a_challenged_payment_has_a_challenge_to_end() -> None:
    processing = sm.new_payment("pay_" + "d" * 24, "acct_x", 5000, "USD")
    for end in (sm.complete_challenge, sm.fail_challenge, sm.cancel_unauthorized):
        with pytest.raises(sm.TransitionError) as e:
            end(processing, actor="merchant", at_ms=1)
        assert e.value.code == "payment_not_challenged"
