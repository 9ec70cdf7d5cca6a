"""Stripe's objects drawn from the engine's: PaymentIntent, Charge, Refund and Event, and the ids (pure:
the API's Stripe surface, api/stripe/, and the webhook dispatcher use them).

One native payment (`pay_<24>`) is one PaymentIntent (`pi_<24>`) and at most one Charge (`ch_<24>`,
once the PSP was asked); a refund operation is a Refund (`re_...`, the same id on both surfaces); an
event (`evt_...`) is the same event. Ids convert both ways without a lookup. Nothing is stored twice:
every Stripe object is computed from the payment's one stored body when it is read.

Statuses: `processing` and `pending_verification` are `processing`; `requires_action` is
`requires_action` (with `next_action`); `authorized` is `requires_capture`; `captured`,
`partially_refunded` and `refunded` are `succeeded`; `failed` is `requires_payment_method` with
`last_payment_error`; `canceled` is `canceled`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

PAYMENT_ID = re.compile(r"^pay_[0-9a-z]{24}$")

# Stripe's test payment methods and the simulator's tokens they stand for (docs/psp.md). A Stripe
# test card token (`tok_visa`) is the simulator's own token already.
TEST_PAYMENT_METHODS: dict[str, str] = {
    "pm_card_visa": "tok_visa",
    "pm_card_visa_debit": "tok_visa",
    "pm_card_mastercard": "tok_mastercard",
    "pm_card_mastercard_debit": "tok_mastercard",
    "pm_card_amex": "tok_amex",
    "pm_card_discover": "tok_discover",
    "pm_card_jcb": "tok_jcb",
    "pm_card_unionpay": "tok_unionpay",
    "pm_card_diners": "tok_diners",
    "pm_card_chargeDeclined": "tok_decline_generic",
    "pm_card_chargeDeclinedInsufficientFunds": "tok_decline_insufficient_funds",
    "pm_card_chargeDeclinedFraudulent": "tok_decline_fraudulent",
    "pm_card_chargeDeclinedLostCard": "tok_decline_lost",
    "pm_card_chargeDeclinedStolenCard": "tok_decline_stolen",
    "pm_card_chargeDeclinedExpiredCard": "tok_decline_expired",
    "pm_card_chargeDeclinedProcessingError": "tok_psp_error",
    # 3-D Secure: the challenge itself is the risk engine's (rule `stripe_test_3ds`, docs/psp.md).
    "pm_card_authenticationRequired": "tok_visa_3ds",
    "pm_card_threeDSecure2Required": "tok_visa_3ds",
    "pm_card_authenticationRequiredOnSetup": "tok_visa_3ds",
}
CHALLENGE_TOKEN = "tok_visa_3ds"
_TOKENS_BACK = {tok: pm for pm, tok in reversed(list(TEST_PAYMENT_METHODS.items()))}

# Stripe's `code` for a PSP decline code (the `decline_code` is the PSP's own).
_CARD_ERROR_CODES = {"expired_card": "expired_card", "incorrect_cvc": "incorrect_cvc",
                     "processor_unavailable": "processing_error", "authentication_failed":
                     "payment_intent_authentication_failure"}
_DECLINE_MESSAGES = {
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "processor_unavailable": "An error occurred while processing your card. Try again in a little bit.",
    "authentication_failed": "The provided PaymentMethod has failed authentication.",
}

_STATUS = {"requires_payment_method": "requires_payment_method", "requires_confirmation": "requires_confirmation",
           "confirming": "requires_confirmation", "confirmed": "processing", "processing": "processing", "pending_verification": "processing", "requires_action": "requires_action",
           "authorized": "requires_capture", "captured": "succeeded", "partially_refunded": "succeeded",
           "refunded": "succeeded", "failed": "requires_payment_method", "canceled": "canceled"}

# Stripe's statuses of a PaymentIntent not confirmed yet (api/stripe/drafts.py; store/stripe_intents.py).
UNCONFIRMED = ("requires_payment_method", "requires_confirmation")
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_KEY_LETTERS = "abcdefghjkmnpqrstvwxyz"


def derived_payment_id(merchant_id: str, key: str) -> str:
    """The payment id the fast path gives a create with this Idempotency-Key (rust/fastpath/src/ids.rs):
    an intent created without `confirm` takes the id its confirmation will create."""
    digest = hashlib.sha256(b"payment\0" + merchant_id.encode() + b"\0" + key.encode()).digest()[:15]
    n = int.from_bytes(digest, "big")
    return "pay_" + "".join(_ID_ALPHABET[(n >> (5 * i)) & 31] for i in range(23, -1, -1))


def letters_of(data: bytes, n: int = 32) -> str:
    """`n` letters drawn from a digest of `data`: a key part that never holds a card-number-like run."""
    digest = hashlib.sha256(data).digest()
    return "".join(_KEY_LETTERS[b % len(_KEY_LETTERS)] for b in digest[:n])


def intent_id(payment_id: str) -> str:
    return "pi_" + payment_id[4:]


def charge_id(payment_id: str) -> str:
    return "ch_" + payment_id[4:]


def payment_id_of(stripe_id: str, prefix: str) -> str | None:
    """The native payment id of `pi_...` / `ch_...`, or None when it is not one."""
    if not stripe_id.startswith(prefix + "_"):
        return None
    pid = "pay_" + stripe_id[len(prefix) + 1:]
    return pid if PAYMENT_ID.match(pid) else None


def payment_method_token(pm: str) -> str:
    return TEST_PAYMENT_METHODS.get(pm, pm)


def payment_method_name(token: str) -> str:
    return _TOKENS_BACK.get(token, token)


def card_error(code: str | None) -> dict[str, Any]:
    """Stripe's `last_payment_error` / error fields of a decline with the PSP's (or risk's) code."""
    decline = code or "generic_decline"
    err: dict[str, Any] = {"type": "card_error", "code": _CARD_ERROR_CODES.get(decline, "card_declined"),
                           "message": _DECLINE_MESSAGES.get(decline, "Your card was declined.")}
    if err["code"] == "card_declined" or decline == "expired_card":
        err["decline_code"] = decline
    return err


def _charged(b: dict[str, Any]) -> bool:
    return bool(b.get("attempts")) or b.get("amount_authorized", 0) > 0


def payment_intent(b: dict[str, Any], *, next_action_url: str | None = None,
                   charge: dict[str, Any] | None = None) -> dict[str, Any]:
    pid = b["id"]
    native = b.get("status", "processing")
    status = _STATUS.get(native, "processing")
    failed = native == "failed"
    canceled = native == "canceled"
    next_action = None
    if native == "requires_action" and next_action_url is not None:
        next_action = {"type": "redirect_to_url", "redirect_to_url": {"url": next_action_url, "return_url": None}}
    return {
        "id": intent_id(pid),
        "object": "payment_intent",
        "amount": b["amount"],
        "amount_capturable": b.get("amount_capturable", 0),
        "amount_received": b.get("amount_captured", 0),
        "canceled_at": (b.get("canceled_at") or b.get("created")) if canceled else None,
        "cancellation_reason": (b.get("stripe_cancellation_reason") or "requested_by_customer") if canceled else None,
        "capture_method": "automatic" if b.get("capture", True) else "manual",
        "client_secret": None,
        "confirmation_method": "automatic",
        "created": b.get("created"),
        "currency": str(b.get("currency", "")).lower(),
        "customer": (b.get("customer") or {}).get("id"),
        "description": b.get("description"),
        "last_payment_error": card_error(b.get("failure_code")) if failed else None,
        "latest_charge": (charge if charge is not None else charge_id(pid)) if _charged(b) else None,
        "livemode": False,
        "metadata": b.get("metadata") or {},
        "next_action": next_action,
        "payment_method": payment_method_name(b.get("payment_method") or "") or None,
        "payment_method_types": ["card"],
        "receipt_email": (b.get("customer") or {}).get("email"),
        "status": status,
    }


def _outcome(b: dict[str, Any]) -> dict[str, Any]:
    risk = b.get("risk") or {}
    score = risk.get("risk_score")
    failed = b.get("status") == "failed"
    blocked = risk.get("action") == "block"
    level = "highest" if blocked else ("elevated" if risk.get("review") or (score or 0) >= 75 else "normal")
    return {
        "network_status": "not_sent_to_network" if blocked else ("declined_by_network" if failed
                                                                  else "approved_by_network"),
        "reason": (b.get("failure_code") if failed else None),
        "risk_level": level,
        "risk_score": score,
        "rule": risk.get("rule"),
        "seller_message": "Payment complete." if not failed else "The bank did not return any further details.",
        "type": "blocked" if blocked else ("issuer_declined" if failed else "authorized"),
    }


def charge(b: dict[str, Any]) -> dict[str, Any]:
    pid = b["id"]
    native = b.get("status", "processing")
    failed = native == "failed"
    captured = b.get("amount_captured", 0)
    refunded = b.get("amount_refunded", 0)
    err = card_error(b.get("failure_code")) if failed else None
    return {
        "id": charge_id(pid),
        "object": "charge",
        "amount": b["amount"],
        "amount_captured": captured,
        "amount_refunded": refunded,
        "balance_transaction": None,
        "captured": captured > 0,
        "created": b.get("created"),
        "currency": str(b.get("currency", "")).lower(),
        "customer": (b.get("customer") or {}).get("id"),
        "description": b.get("description"),
        "disputed": False,
        "failure_code": err["code"] if err else None,
        "failure_message": err["message"] if err else None,
        "livemode": False,
        "metadata": b.get("metadata") or {},
        "outcome": _outcome(b),
        "paid": native in ("authorized", "captured", "partially_refunded", "refunded"),
        "payment_intent": intent_id(pid),
        "payment_method": payment_method_name(b.get("payment_method", "")),
        "refunded": refunded > 0 and refunded == captured,
        "status": "failed" if failed else ("pending" if native in ("processing", "pending_verification")
                                           else "succeeded"),
    }


def refunds(b: dict[str, Any]) -> list[dict[str, Any]]:
    """The payment's refunds as Stripe's, newest first (Stripe's list order)."""
    pid = b["id"]
    out = []
    for r in reversed(b.get("refunds") or []):
        out.append({
            "id": r["id"], "object": "refund", "amount": r["amount"], "charge": charge_id(pid),
            "created": b.get("created"), "currency": str(b.get("currency", "")).lower(),
            "failure_reason": r.get("failure_code"), "metadata": {}, "payment_intent": intent_id(pid),
            "reason": r.get("reason"), "status": {"pending_verification": "pending"}.get(r["status"], r["status"]),
        })
    return out


# The entry of a Stripe endpoint's stored `enabled_events` that marks it as Stripe's (api/stripe/webhooks.py).
STRIPE_MARK = "@stripe"

# Native event types and the Stripe ones they are delivered and listed as.
EVENT_TYPES: dict[str, str] = {
    # Written by the Stripe surface itself (store/stripe_intents.py), delivered to its endpoints only.
    "payment.created": "payment_intent.created",
    "payment.requires_action": "payment_intent.requires_action",
    "payment.pending_verification": "payment_intent.processing",
    "payment.authorized": "payment_intent.amount_capturable_updated",
    "payment.captured": "payment_intent.succeeded",
    "payment.refunded": "charge.refunded",
    "payment.partially_refunded": "charge.refunded",
    "payment.failed": "payment_intent.payment_failed",
    "payment.canceled": "payment_intent.canceled",
    "payment.operation_failed": "charge.updated",
}
STRIPE_EVENT_TYPES: tuple[str, ...] = (
    "payment_intent.created", "payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled",
    "payment_intent.amount_capturable_updated", "payment_intent.processing", "payment_intent.requires_action",
    "charge.succeeded", "charge.refunded", "charge.updated",
)


def native_event_types(stripe_types: list[str]) -> list[str]:
    """The native event types a Stripe endpoint subscribed to `stripe_types` receives."""
    if "*" in stripe_types:
        return ["*"]
    wanted = set(stripe_types)
    if "charge.succeeded" in wanted:
        wanted.add("payment_intent.succeeded")
    return sorted({n for n, s in EVENT_TYPES.items() if s in wanted})


def stripe_types(enabled_events: list[str]) -> tuple[str, ...] | None:
    """The Stripe event types an endpoint of the Stripe-compatible surface was created with (it is sent
    Stripe-shaped events); None for a native endpoint."""
    if STRIPE_MARK not in enabled_events:
        return None
    return tuple(e.removeprefix(STRIPE_MARK + ":") for e in enabled_events if e.startswith(STRIPE_MARK + ":"))


def event_body(native_body: bytes, wanted: tuple[str, ...] = ("*",)) -> bytes:
    """A stored native event's JSON as a Stripe event's, for an endpoint subscribed to `wanted`."""
    out = event(msgspec.json.decode(native_body))
    if out["type"] == "payment_intent.succeeded" and "charge.succeeded" in wanted and not (
            "*" in wanted or "payment_intent.succeeded" in wanted):
        out["type"] = "charge.succeeded"
        out["data"]["object"] = charge((msgspec.json.decode(native_body).get("data") or {}).get("object") or {})
    return msgspec.json.encode(out)


def event(e: dict[str, Any]) -> dict[str, Any]:
    """A stored native event as Stripe's: its type and its `data.object` (a PaymentIntent, or a Charge
    for `charge.*` events)."""
    stripe_type = EVENT_TYPES.get(e.get("type", ""), e.get("type", ""))
    obj = (e.get("data") or {}).get("object") or {}
    data = charge(obj) if stripe_type.startswith("charge.") else payment_intent(obj)
    return {"id": e["id"], "object": "event", "api_version": None, "created": e.get("created"),
            "data": {"object": data}, "livemode": False, "pending_webhooks": 0,
            "request": {"id": None, "idempotency_key": None}, "type": stripe_type}
