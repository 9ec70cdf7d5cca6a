"""The Stripe-compatible surface in embedded mode, driven by the official `stripe` Python SDK pointed at
a real gateway (`stripe.api_base`): the cases are in tests/stripe_sdk_cases.py, shared with cluster mode."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import stripe
import stripe_sdk_cases as cases
from stripe_sdk_cases import Receiver, receiver  # noqa: F401 - the fixture, shared
from support import Gateway

ADMIN_KEY = "ak_test_" + "s" * 24
ENV = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_PSP_TIME_SCALE": "0.01", "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1",
       "GATEWAY_WEBHOOK_POLL_MS": "20"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("stripe") / "data", extra_env=ENV).start()
    cases.push_rules(g.url, ADMIN_KEY)
    cases.configure(g.url)
    yield g
    cases.close_sdk_connections()
    g.stop()
    assert "Traceback" not in g.log(), g.log()[-3000:]


def test_confirmed_intent_succeeds_with_its_charge(gw: Gateway) -> None:
    cases.confirmed_intent_succeeds_with_its_charge()


def test_manual_capture_partial_then_partial_refunds(gw: Gateway) -> None:
    cases.manual_capture_partial_then_partial_refunds()


def test_cancel_authorized_intent(gw: Gateway) -> None:
    cases.cancel_authorized_intent()


def test_declines_are_card_errors_with_decline_codes(gw: Gateway) -> None:
    cases.declines_are_card_errors()


def test_risk_block_is_a_synchronous_card_error(gw: Gateway) -> None:
    cases.risk_block_is_a_synchronous_card_error()


def test_validation_errors_name_the_param(gw: Gateway) -> None:
    cases.validation_errors_name_the_param()


def test_authentication_errors(gw: Gateway) -> None:
    cases.authentication_errors(gw.url)


def test_idempotent_replay_and_mismatch(gw: Gateway) -> None:
    cases.idempotent_replay_and_mismatch()


def test_list_with_auto_pagination(gw: Gateway) -> None:
    cases.list_with_auto_pagination()


def test_stripe_version_is_recorded(gw: Gateway) -> None:
    cases.stripe_version_is_recorded(gw.url)


def test_webhooks_signed_and_verified_by_the_sdk(gw: Gateway, receiver: Receiver) -> None:  # noqa: F811
    cases.webhooks_signed_and_verified_by_the_sdk(receiver)


def test_three_d_secure_completion(gw: Gateway) -> None:
    cases.three_d_secure_completion(gw.url)


def test_native_api_is_unchanged_beside_it(gw: Gateway) -> None:
    # The native surface on the shared paths: JSON bodies, native shapes.
    auth = {"Authorization": "Bearer sk_test_demo"}
    r = httpx.post(f"{gw.url}/v1/webhook_endpoints", headers=auth, json={"url": "https://example.com/h"}, timeout=10)
    assert r.status_code == 201 and r.json()["enabled_events"] == ["*"], r.text
    assert httpx.delete(f"{gw.url}/v1/webhook_endpoints/{r.json()['id']}", headers=auth, timeout=10).json()["deleted"]
    r = httpx.get(f"{gw.url}/v1/events", headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "payment"


def test_unconfirmed_intent_updated_confirmed_captured(gw: Gateway) -> None:
    cases.unconfirmed_intent_updated_confirmed_captured()


def test_unconfirmed_intent_canceled(gw: Gateway) -> None:
    cases.unconfirmed_intent_canceled()


def test_unconfirmed_decline_then_another_method(gw: Gateway) -> None:
    cases.unconfirmed_decline_then_another_method()


def test_unconfirmed_idempotency(gw: Gateway) -> None:
    cases.unconfirmed_idempotency()


def test_ending_before_pages_back(gw: Gateway) -> None:
    cases.ending_before_pages_back()


def test_events_beyond_the_newest_payments(gw: Gateway) -> None:
    cases.events_beyond_the_newest_payments(gw.url)


def test_created_and_requires_action_events(gw: Gateway) -> None:
    r = Receiver()
    try:
        cases.created_and_requires_action_events(r)
    finally:
        r.stop()


def test_unconfirmed_intent_survives_a_kill_and_an_interrupted_confirmation(gw: Gateway, tmp_path: Path) -> None:
    # Its own gateway: SIGKILLed with an unconfirmed intent, then again as if between marking the
    # confirmation and submitting it; the intent is there each time, and confirming completes it once.
    g = Gateway(tmp_path / "data", extra_env=ENV).start()
    try:
        cases.configure(g.url)
        pi = stripe.PaymentIntent.create(amount=1234, currency="usd", payment_method="pm_card_visa")
        g.kill()
        with sqlite3.connect(tmp_path / "data" / "gateway.db") as db:
            db.execute("UPDATE stripe_intents SET status = 'confirming' WHERE id = ?", ("pay_" + pi.id[3:],))
        g.start()
        cases.close_sdk_connections()
        got = stripe.PaymentIntent.retrieve(pi.id)
        assert (got.status, got.amount, got.payment_method) == ("requires_confirmation", 1234, "pm_card_visa")
        try:
            stripe.PaymentIntent.modify(pi.id, amount=1)
            raise AssertionError("an intent being confirmed was changed")
        except stripe.InvalidRequestError as e:
            assert e.code == "payment_intent_unexpected_state"
        done = stripe.PaymentIntent.confirm(pi.id)
        assert (done.id, done.status, done.amount_received) == (pi.id, "succeeded", 1234)
        assert [x.id for x in stripe.PaymentIntent.list(limit=10).data] == [pi.id]
    finally:
        cases.close_sdk_connections()
        cases.configure(gw.url)
        g.stop()
    assert "Traceback" not in g.log(), g.log()[-3000:]
