"""The native API's request and response shapes as msgspec types, for its OpenAPI description
(api/openapi.py). The requests of capture, void, refund and webhook endpoints are the very types the
handlers decode with (api/operations.py, api/webhooks.py); the create's body is parsed by the Rust
fast path (rust/fastpath/src/validate.rs), described here with the same fields and limits; the
responses list the fields the gateway writes, and allow more (a new field is not a breaking change).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.domain.payment import AMOUNT_MINOR_MAX

Amount = Annotated[int, Meta(ge=1, le=AMOUNT_MINOR_MAX, description="Integer minor units of `currency`.")]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$", description="ISO 4217, upper case.")]
Token = Annotated[str, Meta(min_length=1, max_length=255, description="A payment method token (`tok_visa`).")]
PaymentStatus = Literal["processing", "requires_action", "pending_verification", "authorized", "captured",
                        "partially_refunded", "refunded", "failed", "canceled"]


class Customer(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: Annotated[str, Meta(max_length=255)] | None = None
    email: Annotated[str, Meta(max_length=320)] | None = None
    ip: Annotated[str, Meta(max_length=64)] | None = None
    device_id: Annotated[str, Meta(max_length=255)] | None = None
    country: Annotated[str, Meta(pattern="^[A-Za-z]{2}$")] | None = None


class PaymentCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/payments`: only amount, currency and payment_method are required."""

    amount: Amount
    currency: Currency
    payment_method: Token
    capture: bool = True
    description: Annotated[str, Meta(max_length=1000)] | None = None
    metadata: Annotated[dict[Annotated[str, Meta(max_length=40)], Annotated[str, Meta(max_length=500)]],
                        Meta(max_length=50)] = {}
    customer: Customer | None = None


class Risk(msgspec.Struct, kw_only=True):
    action: str | None = None
    risk_score: int | None = None
    rule: str | None = None
    decline_code: str | None = None
    matched_rules: list[Any] = []
    ruleset_version: int | None = None
    merchant_ruleset_version: int | None = None
    model_hash: str | None = None
    review: bool | None = None


class Attempt(msgspec.Struct, kw_only=True):
    id: str
    operation: str
    psp: str | None = None
    status: str
    code: str | None = None
    amount: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None


class RefundSummary(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["refund"] = "refund"
    amount: int
    status: str
    reason: str | None = None
    failure_code: str | None = None


class PendingOperation(msgspec.Struct, kw_only=True):
    id: str
    type: str
    amount: int
    status: str


class Payment(msgspec.Struct, kw_only=True):
    """A payment as every endpoint answers it (`GET /v1/payments/{id}`)."""

    id: Annotated[str, Meta(pattern="^pay_[0-9a-z]{24}$")]
    object: Literal["payment"]
    status: PaymentStatus
    amount: int
    currency: str
    payment_method: str | None = None
    capture: bool | None = None
    capture_method: Literal["automatic", "manual"] | None = None
    amount_capturable: int | None = None
    amount_captured: int | None = None
    amount_refunded: int | None = None
    amount_authorized: int | None = None
    capture_final: bool | None = None
    description: str | None = None
    metadata: dict[str, str] = {}
    customer: dict[str, Any] | None = None
    risk: Risk | None = None
    failure_code: str | None = None
    next_action: dict[str, Any] | None = None
    psp: str | None = None
    attempts: list[Attempt] = []
    refunds: list[RefundSummary] = []
    pending_operation: PendingOperation | None = None
    created: int | None = None
    livemode: bool | None = None


class ListPage(msgspec.Struct, kw_only=True):
    """The envelope of every list answer (both surfaces): a subclass of it names the type of `data`."""

    object: Literal["list"]
    url: str
    has_more: bool


class PaymentList(ListPage, kw_only=True):
    data: list[Payment]


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    decline_code: str | None = None


class Error(msgspec.Struct, kw_only=True):
    """Every error answer (both surfaces): `{"error": {type, code, message, param, ...}}`."""

    error: ErrorDetail


class WebhookEndpointFields(msgspec.Struct, kw_only=True):
    """A webhook endpoint's fields that both surfaces answer alike; each adds its `secret`."""

    id: str
    object: Literal["webhook_endpoint"]
    url: str
    enabled_events: list[str] = []
    description: str | None = None
    status: str | None = None
    created: int | None = None


class WebhookEndpoint(WebhookEndpointFields, kw_only=True):
    secret: Annotated[str, Meta(description="Shown once, when the endpoint is created.")] | None = None


class EndpointList(ListPage, kw_only=True):
    data: list[dict[str, Any]]


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    object: str
    deleted: bool


class EventFields(msgspec.Struct, kw_only=True):
    """An event's fields that both surfaces answer alike; the native one adds its deliveries."""

    id: str
    object: Literal["event"]
    type: str
    created: int | None = None
    data: dict[str, Any] = {}


class Event(EventFields, kw_only=True):
    deliveries: list[dict[str, Any]] = []


class EventList(ListPage, kw_only=True):
    data: list[dict[str, Any]]


class Status(msgspec.Struct, kw_only=True):
    status: str
