"""The Stripe-compatible surface's shapes as msgspec types, for the OpenAPI description
(api/openapi.py): the form bodies the handlers accept (api/stripe/intents.py, charges.py,
webhooks.py) and the objects they answer (gateway.domain.stripe_objects). Field names and meanings are
Stripe's; what is supported, partly or not, is in docs/stripe-compatibility.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.api.schemas import EventFields, ListPage, WebhookEndpointFields
from gateway.domain.payment import AMOUNT_MINOR_MAX

Amount = Annotated[int, Meta(ge=1, le=AMOUNT_MINOR_MAX)]
IntentStatus = Literal["requires_payment_method", "requires_confirmation", "requires_action", "processing",
                       "requires_capture", "succeeded", "canceled"]


class PaymentIntentCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Without `confirm` the intent waits (`requires_payment_method`, or `requires_confirmation` with a
    `payment_method`) for its update and confirmation; `confirm=true` needs a `payment_method`."""

    amount: Amount
    currency: Annotated[str, Meta(pattern="^[A-Za-z]{3}$", description="Lower case, as Stripe's.")]
    payment_method: Annotated[str, Meta(max_length=255, description="`pm_card_visa`, ... (docs/psp.md).")] | None = None
    confirm: bool | None = None
    capture_method: Literal["automatic", "automatic_async", "manual"] | None = None
    description: Annotated[str, Meta(max_length=1000)] | None = None
    metadata: dict[str, str] | None = None
    customer: Annotated[str, Meta(max_length=255)] | None = None
    receipt_email: Annotated[str, Meta(max_length=320)] | None = None
    payment_method_types: list[Literal["card"]] | None = None
    return_url: str | None = None
    expand: list[str] | None = None


class PaymentIntentConfirm(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    payment_method: str | None = None
    return_url: str | None = None
    expand: list[str] | None = None


class PaymentIntentUpdate(msgspec.Struct, kw_only=True):
    """Before its confirmation: what Stripe lets change (metadata merged key by key; an empty value
    unsets a key). After it: accepted only when it changes nothing (the payment is immutable)."""

    amount: Amount | None = None
    currency: Annotated[str, Meta(pattern="^[A-Za-z]{3}$")] | None = None
    payment_method: Annotated[str, Meta(max_length=255)] | None = None
    capture_method: Literal["automatic", "automatic_async", "manual"] | None = None
    description: Annotated[str, Meta(max_length=1000)] | None = None
    metadata: dict[str, str] | None = None
    customer: Annotated[str, Meta(max_length=255)] | None = None
    receipt_email: Annotated[str, Meta(max_length=320)] | None = None
    expand: list[str] | None = None


class PaymentIntentCapture(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_to_capture: Amount | None = None
    expand: list[str] | None = None


class PaymentIntentCancel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    cancellation_reason: Literal["duplicate", "fraudulent", "requested_by_customer", "abandoned"] | None = None
    expand: list[str] | None = None


class RefundCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One of `payment_intent` or `charge`."""

    payment_intent: str | None = None
    charge: str | None = None
    amount: Amount | None = None
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = None
    metadata: dict[str, str] | None = None


class WebhookEndpointCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    enabled_events: list[str]
    description: Annotated[str, Meta(max_length=255)] | None = None


class ThreeDSResult(msgspec.Struct, kw_only=True):
    result: Literal["succeed", "fail"]


class RedirectToUrl(msgspec.Struct, kw_only=True):
    url: str
    return_url: str | None = None


class NextAction(msgspec.Struct, kw_only=True):
    type: Literal["redirect_to_url"]
    redirect_to_url: RedirectToUrl


class LastPaymentError(msgspec.Struct, kw_only=True):
    type: str
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None


class PaymentIntent(msgspec.Struct, kw_only=True):
    id: Annotated[str, Meta(pattern="^pi_[0-9a-z]{24}$")]
    object: Literal["payment_intent"]
    amount: int
    amount_capturable: int | None = None
    amount_received: int | None = None
    canceled_at: int | None = None
    cancellation_reason: str | None = None
    capture_method: str | None = None
    client_secret: str | None = None
    confirmation_method: str | None = None
    created: int | None = None
    currency: str | None = None
    customer: str | None = None
    description: str | None = None
    last_payment_error: LastPaymentError | None = None
    latest_charge: str | dict[str, Any] | None = None
    livemode: bool | None = None
    metadata: dict[str, str] = {}
    next_action: NextAction | None = None
    payment_method: str | None = None
    payment_method_types: list[str] = []
    receipt_email: str | None = None
    status: IntentStatus


class Outcome(msgspec.Struct, kw_only=True):
    network_status: str | None = None
    reason: str | None = None
    risk_level: str | None = None
    risk_score: int | None = None
    rule: str | None = None
    seller_message: str | None = None
    type: str | None = None


class Charge(msgspec.Struct, kw_only=True):
    id: Annotated[str, Meta(pattern="^ch_[0-9a-z]{24}$")]
    object: Literal["charge"]
    amount: int
    amount_captured: int | None = None
    amount_refunded: int | None = None
    captured: bool | None = None
    created: int | None = None
    currency: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    metadata: dict[str, str] = {}
    outcome: Outcome | None = None
    paid: bool | None = None
    payment_intent: str | None = None
    payment_method: str | None = None
    refunded: bool | None = None
    status: Literal["succeeded", "pending", "failed"]


class Refund(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["refund"]
    amount: int
    charge: str | None = None
    created: int | None = None
    currency: str | None = None
    failure_reason: str | None = None
    metadata: dict[str, str] = {}
    payment_intent: str | None = None
    reason: str | None = None
    status: str


class StripeWebhookEndpoint(WebhookEndpointFields, kw_only=True):
    secret: str | None = None


class StripeEvent(EventFields, kw_only=True):
    pass


class PaymentIntentList(ListPage, kw_only=True):
    data: list[PaymentIntent]


class ChargeList(ListPage, kw_only=True):
    data: list[Charge]


class RefundList(ListPage, kw_only=True):
    data: list[Refund]
