"""Stripe's objects (gateway.domain.stripe_objects, shared with the webhook dispatcher) and the client
secrets of the 3-D Secure test page."""

from __future__ import annotations

import hashlib
import hmac
import os

from gateway.domain.stripe_objects import (
    CHALLENGE_TOKEN,
    EVENT_TYPES,
    STRIPE_EVENT_TYPES,
    STRIPE_MARK,
    TEST_PAYMENT_METHODS,
    card_error,
    charge,
    charge_id,
    event,
    intent_id,
    native_event_types,
    payment_id_of,
    payment_intent,
    payment_method_name,
    payment_method_token,
    refunds,
)

# The key of the 3-D Secure page's client secrets; without it (tests, laptops) they are derived from
# the ids alone, which is enough for test mode only (docs/stripe-compatibility.md).
CLIENT_SECRET_ENV = "GATEWAY_STRIPE_SECRET"


def client_secret(merchant_id: str, payment_id: str) -> str:
    key = os.environ.get(CLIENT_SECRET_ENV, "gateway-test-mode").encode()
    mac = hmac.new(key, f"{merchant_id}:{payment_id}".encode(), hashlib.sha256).hexdigest()[:24]
    return f"{intent_id(payment_id)}_secret_{mac}"


__all__ = [
    "CHALLENGE_TOKEN", "CLIENT_SECRET_ENV", "EVENT_TYPES", "STRIPE_EVENT_TYPES", "STRIPE_MARK",
    "TEST_PAYMENT_METHODS", "card_error", "charge", "charge_id", "client_secret", "event", "intent_id",
    "native_event_types", "payment_id_of", "payment_intent", "payment_method_name", "payment_method_token",
    "refunds",
]
