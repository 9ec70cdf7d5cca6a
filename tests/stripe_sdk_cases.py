"""The Stripe-compatible surface driven by the official `stripe` Python SDK, unchanged but for its base
URL: shared by the embedded-mode tests (tests/e2e/test_stripe_sdk.py) and the cluster-mode ones
(tests/cluster/test_cluster_stripe.py). Each case takes the gateway's URL, the admin key's headers
(rules for the risk cases were pushed by the caller) and a webhook receiver."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe
from support import DEMO_KEY, unique_token

# Rules the caller pushes: the 3-D Secure test card is challenged, an amount is blocked.
RULES = "stripe_test_3ds: challenge if :card: = \"tok_visa_3ds\"\nstripe_block: block if :amount: = 6666\n"
WAIT_S = 20


class Receiver:
    """An HTTP endpoint on loopback that records every webhook delivery (raw body and headers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.lock:
                    outer.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, pred: Any, timeout_s: float = WAIT_S) -> tuple[bytes, dict[str, str]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for r in self.requests:
                    if pred(json.loads(r[0])):
                        return r
            time.sleep(0.05)
        raise AssertionError(f"no matching delivery in {timeout_s}s; got {len(self.requests)}")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # the listening socket too, or it is left to the garbage collector


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """One receiver for the tests of the module that imports this fixture."""
    r = Receiver()
    yield r
    r.stop()


def push_rules(url: str, admin_key: str) -> int:
    """Pushes RULES through the admin API of the gateway at `url`; the version of the ruleset."""
    r = httpx.post(f"{url}/v1/admin/rules", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30,
                   json={"source": RULES, "author": "tests"})
    assert r.status_code == 201, r.text
    return r.json()["version"]


def close_sdk_connections() -> None:
    """The SDK's pooled keep-alive connections, closed (not left to the garbage collector's warnings)."""
    client = stripe.default_http_client
    if client is not None and hasattr(client, "close"):
        client.close()
    stripe.default_http_client = None


def configure(url: str) -> None:
    stripe.api_key = DEMO_KEY
    stripe.api_base = url
    stripe.max_network_retries = 0


def poll_intent(pi_id: str, status: str) -> stripe.PaymentIntent:
    deadline = time.monotonic() + WAIT_S
    while True:
        pi = stripe.PaymentIntent.retrieve(pi_id)
        if pi.status == status or time.monotonic() > deadline:
            assert pi.status == status, pi
            return pi
        time.sleep(0.05)


def confirmed_intent_succeeds_with_its_charge() -> None:
    pi = stripe.PaymentIntent.create(amount=2000, currency="usd", payment_method="pm_card_visa", confirm=True,
                                     metadata={"order_id": "A-1"}, description="two books")
    assert pi.status == "succeeded" and pi.amount_received == 2000 and pi.currency == "usd"
    assert pi.id.startswith("pi_") and pi.metadata["order_id"] == "A-1" and pi.description == "two books"
    got = stripe.PaymentIntent.retrieve(pi.id, expand=["latest_charge"])
    charge = got.latest_charge
    assert charge.id == "ch_" + pi.id[3:] and charge.paid and charge.captured and charge.amount_captured == 2000
    assert charge.outcome.type == "authorized" and charge.payment_intent == pi.id
    assert stripe.Charge.retrieve(charge.id).status == "succeeded"


def manual_capture_partial_then_partial_refunds() -> None:
    pi = stripe.PaymentIntent.create(amount=5000, currency="eur", payment_method="pm_card_mastercard", confirm=True,
                                     capture_method="manual")
    assert pi.status == "requires_capture" and pi.amount_capturable == 5000 and pi.amount_received == 0
    pi = stripe.PaymentIntent.capture(pi.id, amount_to_capture=3000)
    assert pi.status == "succeeded" and pi.amount_received == 3000 and pi.amount_capturable == 0
    first = stripe.Refund.create(payment_intent=pi.id, amount=1000, reason="requested_by_customer")
    second = stripe.Refund.create(charge=pi.latest_charge, amount=500)
    assert first.status == second.status == "succeeded" and first.id != second.id
    assert (first.amount, second.amount, first.payment_intent) == (1000, 500, pi.id)
    charge = stripe.Charge.retrieve(pi.latest_charge)
    assert charge.amount_refunded == 1500 and not charge.refunded
    listed = stripe.Refund.list(payment_intent=pi.id)
    assert [r.id for r in listed.data] == [second.id, first.id]
    assert stripe.Refund.retrieve(first.id).amount == 1000
    rest = stripe.Refund.create(payment_intent=pi.id)
    assert rest.amount == 1500 and stripe.Charge.retrieve(pi.latest_charge).refunded
    try:
        stripe.Refund.create(payment_intent=pi.id, amount=1)
        raise AssertionError("a refund past the captured amount was accepted")
    except stripe.InvalidRequestError as e:
        assert e.http_status == 400 and e.code == "charge_already_refunded"


def cancel_authorized_intent() -> None:
    pi = stripe.PaymentIntent.create(amount=1200, currency="usd", payment_method="pm_card_visa", confirm=True,
                                     capture_method="manual")
    pi = stripe.PaymentIntent.cancel(pi.id, cancellation_reason="abandoned")
    assert pi.status == "canceled" and pi.amount_capturable == 0
    try:
        stripe.PaymentIntent.capture(pi.id)
        raise AssertionError("a canceled intent was captured")
    except stripe.InvalidRequestError as e:
        assert e.code == "payment_intent_unexpected_state" and e.http_status == 400


def declines_are_card_errors() -> None:
    for pm, code, decline in (("pm_card_chargeDeclined", "card_declined", "generic_decline"),
                              ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
                              ("pm_card_chargeDeclinedFraudulent", "card_declined", "fraudulent"),
                              ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card")):
        try:
            stripe.PaymentIntent.create(amount=1500, currency="usd", payment_method=pm, confirm=True)
            raise AssertionError(f"{pm} was not declined")
        except stripe.CardError as e:
            assert e.http_status == 402 and e.code == code and e.error.decline_code == decline, (pm, e.error)
            intent = e.error.payment_intent
            assert intent.status == "requires_payment_method"
            assert intent.last_payment_error.decline_code == decline
            assert stripe.PaymentIntent.retrieve(intent.id).status == "requires_payment_method"


def risk_block_is_a_synchronous_card_error() -> None:
    try:
        stripe.PaymentIntent.create(amount=6666, currency="usd", payment_method="pm_card_visa", confirm=True)
        raise AssertionError("the blocked amount was accepted")
    except stripe.CardError as e:
        assert e.http_status == 402 and e.code == "card_declined" and e.error.payment_intent.id.startswith("pi_")


def validation_errors_name_the_param() -> None:
    cases = [
        ({"currency": "usd", "payment_method": "pm_card_visa", "confirm": True}, "parameter_missing", "amount"),
        ({"amount": "ten", "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
         "parameter_invalid_integer", "amount"),
        ({"amount": 100, "currency": "dollars", "payment_method": "pm_card_visa", "confirm": True},
         "parameter_invalid", "currency"),
        ({"amount": 100, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True, "colour": "red"},
         "parameter_unknown", "colour"),
        ({"amount": 100, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True,
              "capture_method": "later"}, "parameter_invalid", "capture_method"),
    ]
    for params, code, param in cases:
        try:
            stripe.PaymentIntent.create(**params)
            raise AssertionError(f"{params} was accepted")
        except stripe.InvalidRequestError as e:
            assert (e.http_status, e.code, e.param) == (400, code, param), (params, e.error)
    try:
        stripe.PaymentIntent.retrieve("pi_" + "z" * 24)
        raise AssertionError("an unknown intent was found")
    except stripe.InvalidRequestError as e:
        assert (e.http_status, e.code, e.param) == (404, "resource_missing", "id")
    try:
        stripe.PaymentIntent.create(amount=100, currency="usd", payment_method="pm_card_visa", confirm=True,
                                    metadata={"note": "4242424242424242"})
        raise AssertionError("a card number was accepted")
    except stripe.InvalidRequestError as e:
        assert e.code == "card_number_not_allowed" and "4242424242424242" not in str(e)


def authentication_errors(url: str) -> None:
    try:
        stripe.PaymentIntent.list(api_key="sk_test_not_a_key")
        raise AssertionError("a bad key was accepted")
    except stripe.AuthenticationError as e:
        assert e.http_status == 401
    # No key at all, and the key as HTTP Basic's user (curl -u sk_test_...:), as Stripe accepts.
    assert httpx.get(f"{url}/v1/payment_intents", timeout=10).status_code == 401
    r = httpx.get(f"{url}/v1/payment_intents", auth=(DEMO_KEY, ""), timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "list"


def idempotent_replay_and_mismatch() -> None:
    key = unique_token("order")
    first = stripe.PaymentIntent.create(amount=3100, currency="usd", payment_method="pm_card_visa", confirm=True,
                                        idempotency_key=key)
    again = stripe.PaymentIntent.create(amount=3100, currency="usd", payment_method="pm_card_visa", confirm=True,
                                        idempotency_key=key)
    assert again.id == first.id and again.last_response.headers.get("idempotent-replayed") == "true"
    try:
        stripe.PaymentIntent.create(amount=3200, currency="usd", payment_method="pm_card_visa", confirm=True,
                                    idempotency_key=key)
        raise AssertionError("the same key with other parameters was accepted")
    except stripe.IdempotencyError as e:
        assert e.http_status == 400
    refund_key = unique_token("refund")
    r1 = stripe.Refund.create(payment_intent=first.id, amount=100, idempotency_key=refund_key)
    r2 = stripe.Refund.create(payment_intent=first.id, amount=100, idempotency_key=refund_key)
    assert r1.id == r2.id and stripe.Charge.retrieve(first.latest_charge).amount_refunded == 100


def list_with_auto_pagination() -> None:
    created = [stripe.PaymentIntent.create(amount=700 + i, currency="usd", payment_method="pm_card_visa",
                                           confirm=True).id for i in range(5)]
    page = stripe.PaymentIntent.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    listed = list(stripe.PaymentIntent.list(limit=2).auto_paging_iter())
    seen = [pi.id for pi in listed]
    assert len(seen) == len(set(seen)) and set(created) <= set(seen)
    # Newest first, as Stripe lists (within one second, in no particular order on PostgreSQL).
    stamps = [pi.created for pi in listed]
    assert stamps == sorted(stamps, reverse=True)
    since = stripe.PaymentIntent.retrieve(created[0]).created
    recent = [pi.id for pi in stripe.PaymentIntent.list(limit=3, created={"gte": since}).auto_paging_iter()]
    assert set(created) <= set(recent)


def stripe_version_is_recorded(url: str) -> None:
    r = httpx.get(f"{url}/v1/payment_intents?limit=1", timeout=10,
                  headers={"Authorization": f"Bearer {DEMO_KEY}", "Stripe-Version": "2024-06-20"})
    assert r.status_code == 200 and r.headers.get("stripe-version") == "2024-06-20"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'gateway_stripe_requests_total{version="2024-06-20"}' in metrics


def webhooks_signed_and_verified_by_the_sdk(receiver: Receiver) -> None:
    endpoint = stripe.WebhookEndpoint.create(url=receiver.url,
                                             enabled_events=["payment_intent.succeeded", "charge.refunded"])
    assert endpoint.secret.startswith("whsec_") and endpoint.enabled_events == ["payment_intent.succeeded",
                                                                                "charge.refunded"]
    assert "secret" not in stripe.WebhookEndpoint.retrieve(endpoint.id)
    assert endpoint.id in [e.id for e in stripe.WebhookEndpoint.list().data]
    pi = stripe.PaymentIntent.create(amount=4400, currency="usd", payment_method="pm_card_visa", confirm=True)
    body, headers = receiver.wait_for(lambda e: e["data"]["object"].get("id") == pi.id)
    event = stripe.Webhook.construct_event(body.decode(), headers["stripe-signature"], endpoint.secret)
    assert event.type == "payment_intent.succeeded" and event.data.object.id == pi.id
    assert event.data.object.object == "payment_intent" and event.data.object.status == "succeeded"
    try:
        stripe.Webhook.construct_event(body.decode(), headers["stripe-signature"], "whsec_wrong")
        raise AssertionError("a wrong secret verified")
    except stripe.SignatureVerificationError:
        pass
    stripe.Refund.create(payment_intent=pi.id, amount=400)
    body, headers = receiver.wait_for(lambda e: e["type"] == "charge.refunded" and e["data"]["object"].get(
        "payment_intent") == pi.id)
    refunded = stripe.Webhook.construct_event(body.decode(), headers["stripe-signature"], endpoint.secret)
    assert refunded.data.object.object == "charge" and refunded.data.object.amount_refunded == 400
    # Only subscribed types are delivered: a manual-capture authorization is not.
    with receiver.lock:
        types = {json.loads(b)["type"] for b, _h in receiver.requests}
    assert types <= {"payment_intent.succeeded", "charge.refunded"}, types
    fetched = stripe.Event.retrieve(event.id)
    assert fetched.type == "payment_intent.succeeded" and fetched.data.object.id == pi.id
    listed = stripe.Event.list(type="payment_intent.succeeded", limit=100)
    assert event.id in [e.id for e in listed.data]
    assert stripe.WebhookEndpoint.delete(endpoint.id).deleted


def three_d_secure_completion(url: str) -> None:
    pi = stripe.PaymentIntent.create(amount=2500, currency="usd", payment_method="pm_card_authenticationRequired",
                                     confirm=True)
    assert pi.status == "requires_action" and pi.next_action.type == "redirect_to_url"
    page = pi.next_action.redirect_to_url.url
    assert page.startswith(url)
    assert httpx.get(page, timeout=10).status_code == 200
    assert httpx.get(page.split("?")[0] + "?client_secret=wrong", timeout=10).status_code == 404
    # The customer completes the challenge: the payment is authorized and, captured automatically, succeeds.
    assert httpx.post(page, data={"result": "succeed"}, timeout=10).status_code == 200
    done = poll_intent(pi.id, "succeeded")
    assert done.amount_received == 2500 and done.next_action is None
    # A failed challenge: requires_payment_method with the authentication failure.
    failing = stripe.PaymentIntent.create(amount=2500, currency="usd",
                                          payment_method="pm_card_authenticationRequired", confirm=True)
    httpx.post(failing.next_action.redirect_to_url.url, data={"result": "fail"}, timeout=10)
    failed = poll_intent(failing.id, "requires_payment_method")
    assert failed.last_payment_error.code == "payment_intent_authentication_failure"
    # A challenged intent can be cancelled.
    waiting = stripe.PaymentIntent.create(amount=2500, currency="usd",
                                          payment_method="pm_card_authenticationRequired", confirm=True)
    assert stripe.PaymentIntent.confirm(waiting.id).status == "requires_action"
    canceled = stripe.PaymentIntent.cancel(waiting.id)
    assert canceled.status == "canceled" and canceled.next_action is None


def unconfirmed_intent_updated_confirmed_captured() -> None:
    pi = stripe.PaymentIntent.create(amount=1000, currency="usd", capture_method="manual",
                                     metadata={"order_id": "U-1", "drop": "x"})
    assert pi.status == "requires_payment_method" and pi.payment_method is None and pi.latest_charge is None
    assert stripe.PaymentIntent.retrieve(pi.id).status == "requires_payment_method"
    assert pi.id in [x.id for x in stripe.PaymentIntent.list(limit=5).data]
    updated = stripe.PaymentIntent.modify(pi.id, amount=1500, currency="eur", description="updated",
                                          metadata={"drop": "", "gift": "yes"}, payment_method="pm_card_visa")
    assert (updated.id, updated.status, updated.amount, updated.currency) == (pi.id, "requires_confirmation", 1500,
                                                                              "eur")
    assert updated.metadata.to_dict() == {"order_id": "U-1", "gift": "yes"} and updated.description == "updated"
    assert updated.payment_method == "pm_card_visa" and updated.capture_method == "manual"
    # The confirmation is the fast path's create: the same id, the PSP's authorization, then a capture.
    confirmed = stripe.PaymentIntent.confirm(pi.id)
    assert (confirmed.id, confirmed.status, confirmed.amount_capturable) == (pi.id, "requires_capture", 1500)
    captured = stripe.PaymentIntent.capture(pi.id, amount_to_capture=1200)
    assert captured.status == "succeeded" and captured.amount_received == 1200
    assert captured.latest_charge == "ch_" + pi.id[3:] and stripe.Charge.retrieve(captured.latest_charge).captured
    assert stripe.PaymentIntent.retrieve(pi.id).metadata.to_dict() == {"order_id": "U-1", "gift": "yes"}
    try:
        stripe.PaymentIntent.modify(pi.id, amount=99)
        raise AssertionError("a confirmed intent was changed")
    except stripe.InvalidRequestError as e:
        assert (e.http_status, e.code) == (400, "parameter_unsupported")
    # A payment method given with the confirmation; without one the confirmation is refused.
    bare = stripe.PaymentIntent.create(amount=800, currency="usd")
    try:
        stripe.PaymentIntent.confirm(bare.id)
        raise AssertionError("an intent without a payment method was confirmed")
    except stripe.InvalidRequestError as e:
        assert (e.http_status, e.code, e.param) == (400, "payment_intent_unexpected_state", "payment_method")
    done = stripe.PaymentIntent.confirm(bare.id, payment_method="pm_card_mastercard")
    assert (done.id, done.status, done.amount_received, done.payment_method) == (bare.id, "succeeded", 800,
                                                                                  "pm_card_mastercard")


def unconfirmed_intent_canceled() -> None:
    pi = stripe.PaymentIntent.create(amount=600, currency="usd", payment_method="pm_card_visa")
    assert pi.status == "requires_confirmation"
    canceled = stripe.PaymentIntent.cancel(pi.id, cancellation_reason="abandoned")
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "abandoned") and canceled.canceled_at
    assert stripe.PaymentIntent.retrieve(pi.id).status == "canceled"
    for call in (lambda: stripe.PaymentIntent.confirm(pi.id), lambda: stripe.PaymentIntent.modify(pi.id, amount=700),
                 lambda: stripe.PaymentIntent.cancel(pi.id), lambda: stripe.PaymentIntent.capture(pi.id)):
        try:
            call()
            raise AssertionError("a canceled intent changed")
        except stripe.InvalidRequestError as e:
            assert (e.http_status, e.code) == (400, "payment_intent_unexpected_state"), e.error


def unconfirmed_decline_then_another_method() -> None:
    pi = stripe.PaymentIntent.create(amount=1700, currency="usd", payment_method="pm_card_chargeDeclined")
    try:
        stripe.PaymentIntent.confirm(pi.id)
        raise AssertionError("the declining card was not declined")
    except stripe.CardError as e:
        assert e.http_status == 402 and e.error.payment_intent.id == pi.id
    failed = stripe.PaymentIntent.retrieve(pi.id)
    assert failed.status == "requires_payment_method" and failed.last_payment_error.decline_code == "generic_decline"
    # The declined payment is final: confirming the intent again is refused (docs/stripe-compatibility.md).
    try:
        stripe.PaymentIntent.confirm(pi.id, payment_method="pm_card_visa")
        raise AssertionError("a declined intent was confirmed again")
    except stripe.InvalidRequestError as e:
        assert e.code == "payment_intent_unexpected_state"


def unconfirmed_idempotency() -> None:
    key = unique_token("draft")
    first = stripe.PaymentIntent.create(amount=2100, currency="usd", idempotency_key=key)
    again = stripe.PaymentIntent.create(amount=2100, currency="usd", idempotency_key=key)
    assert again.id == first.id and again.last_response.headers.get("idempotent-replayed") == "true"
    try:
        stripe.PaymentIntent.create(amount=2200, currency="usd", idempotency_key=key)
        raise AssertionError("the same key with other parameters was accepted")
    except stripe.IdempotencyError as e:
        assert e.http_status == 400
    ukey = unique_token("update")
    u1 = stripe.PaymentIntent.modify(first.id, payment_method="pm_card_visa", idempotency_key=ukey)
    u2 = stripe.PaymentIntent.modify(first.id, payment_method="pm_card_visa", idempotency_key=ukey)
    assert u1.status == u2.status == "requires_confirmation" and u2.last_response.headers.get("idempotent-replayed")
    ckey = unique_token("confirm")
    c1 = stripe.PaymentIntent.confirm(first.id, idempotency_key=ckey)
    c2 = stripe.PaymentIntent.confirm(first.id, idempotency_key=ckey)
    assert c1.status == c2.status == "succeeded" and c2.last_response.headers.get("idempotent-replayed") == "true"
    try:
        stripe.PaymentIntent.confirm(first.id, payment_method="pm_card_amex", idempotency_key=ckey)
        raise AssertionError("the confirmation's key with other parameters was accepted")
    except stripe.IdempotencyError:
        pass
    assert stripe.Charge.retrieve(c1.latest_charge).amount_captured == 2100


def ending_before_pages_back() -> None:
    ids = [stripe.PaymentIntent.create(amount=900 + i, currency="usd", payment_method="pm_card_visa",
                                       confirm=True).id for i in range(4)]
    ids.append(stripe.PaymentIntent.create(amount=905, currency="usd").id)  # an unconfirmed one among them
    first = stripe.PaymentIntent.list(limit=2)
    second = stripe.PaymentIntent.list(limit=2, starting_after=first.data[-1].id)
    back = stripe.PaymentIntent.list(limit=2, ending_before=second.data[0].id)
    assert [x.id for x in back.data] == [x.id for x in first.data] and not back.has_more
    # The SDK pages backwards from ending_before: every intent listed before it, each once.
    listed = [x.id for x in stripe.PaymentIntent.list(limit=20).data]
    assert set(ids) <= set(listed)
    newer = [x.id for x in stripe.PaymentIntent.list(limit=2, ending_before=listed[4]).auto_paging_iter()]
    assert sorted(newer) == sorted(listed[:4]), (newer, listed)
    charges = stripe.Charge.list(limit=2)
    again = stripe.Charge.list(limit=2, ending_before=stripe.Charge.list(limit=2, starting_after=charges.data[-1].id
                                                                         ).data[0].id)
    assert [c.id for c in again.data] == [c.id for c in charges.data]


def events_beyond_the_newest_payments(url: str) -> None:
    pi = stripe.PaymentIntent.create(amount=3300, currency="usd", payment_method="pm_card_visa", confirm=True)
    first = next(e for e in stripe.Event.list(type="payment_intent.succeeded", limit=20).auto_paging_iter()
                 if e.data.object.id == pi.id)
    # More than a hundred payments after it (the native API, which answers at once).
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as client:
        for i in range(105):
            r = client.post("/v1/payments", json={"amount": 100 + i, "currency": "USD", "payment_method": "tok_visa"})
            assert r.status_code in (201, 202), r.text
    assert stripe.Event.retrieve(first.id).data.object.id == pi.id
    found = [e.id for e in stripe.Event.list(type="payment_intent.succeeded", limit=100).auto_paging_iter()]
    assert first.id in found and len(found) == len(set(found)) and len(found) > 1
    created = [e.id for e in stripe.Event.list(created={"gte": first.created, "lte": first.created},
                                               types=["payment_intent.succeeded"]).auto_paging_iter()]
    assert first.id in created
    everything = stripe.Event.list(limit=3)
    assert everything.has_more and len(everything.data) == 3
    stamps = [e.created for e in everything.data]
    assert stamps == sorted(stamps, reverse=True)
    back = stripe.Event.list(limit=3, ending_before=stripe.Event.list(limit=1, starting_after=everything.data[-1].id
                                                                      ).data[0].id)
    assert [e.id for e in back.data] == [e.id for e in everything.data]


def created_and_requires_action_events(receiver: Receiver) -> None:
    endpoint = stripe.WebhookEndpoint.create(url=receiver.url, enabled_events=["payment_intent.created",
                                                                               "payment_intent.requires_action"])
    draft = stripe.PaymentIntent.create(amount=1900, currency="usd", metadata={"hook": "created"})
    body, headers = receiver.wait_for(lambda e: e["data"]["object"].get("id") == draft.id)
    event = stripe.Webhook.construct_event(body.decode(), headers["stripe-signature"], endpoint.secret)
    assert event.type == "payment_intent.created" and event.data.object.status == "requires_payment_method"
    assert stripe.Event.retrieve(event.id).type == "payment_intent.created"
    challenged = stripe.PaymentIntent.create(amount=2600, currency="usd", confirm=True,
                                             payment_method="pm_card_authenticationRequired")
    assert challenged.status == "requires_action"
    for kind in ("payment_intent.created", "payment_intent.requires_action"):
        body, headers = receiver.wait_for(lambda e, k=kind: e["type"] == k and e["data"]["object"]["id"] == challenged.id)
        got = stripe.Webhook.construct_event(body.decode(), headers["stripe-signature"], endpoint.secret)
        assert got.type == kind
    # A challenge reached by the confirmation of an unconfirmed intent.
    later = stripe.PaymentIntent.create(amount=2700, currency="usd", payment_method="pm_card_authenticationRequired")
    assert stripe.PaymentIntent.confirm(later.id).status == "requires_action"
    receiver.wait_for(lambda e: e["type"] == "payment_intent.requires_action" and e["data"]["object"]["id"] == later.id)
    stripe.PaymentIntent.cancel(challenged.id)
    with receiver.lock:
        types = {json.loads(b)["type"] for b, _h in receiver.requests}
    assert types <= {"payment_intent.created", "payment_intent.requires_action"}, types
    listed = [e.id for e in stripe.Event.list(type="payment_intent.created", limit=10).data]
    assert event.id in listed
    assert stripe.WebhookEndpoint.delete(endpoint.id).deleted
