"""The OpenAPI 3.1 description of both merchant surfaces: the native API and the Stripe-compatible one.

The schemas are generated from the msgspec types (api/schemas.py, api/stripe/schemas.py, and the
request types the handlers decode with); the paths, parameters and answers are listed here next to
the route table they describe. `GET /openapi.json` serves it; `docs/openapi.json` is the same
document checked in (`python -m gateway.api.openapi > docs/openapi.json` writes it; a test keeps the
two equal), validated by openapi-spec-validator and exercised by schemathesis in `make test`. The
admin APIs (risk rules, merchants) are not part of it.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from gateway.api import operations, schemas
from gateway.api import webhooks as native_webhooks
from gateway.api.stripe import schemas as ss

REF = "#/components/schemas/{name}"
FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

_TYPES: list[Any] = [
    schemas.PaymentCreate, schemas.Payment, schemas.PaymentList, schemas.Error, schemas.WebhookEndpoint,
    schemas.EndpointList, schemas.Deleted, schemas.Event, schemas.EventList, schemas.Status,
    operations.CaptureRequest, operations.VoidRequest, operations.RefundRequest, native_webhooks.CreateEndpoint,
    ss.PaymentIntentCreate, ss.PaymentIntentConfirm, ss.PaymentIntentUpdate, ss.PaymentIntentCapture,
    ss.PaymentIntentCancel, ss.RefundCreate, ss.WebhookEndpointCreate, ss.ThreeDSResult, ss.PaymentIntent,
    ss.PaymentIntentList, ss.Charge, ss.ChargeList, ss.Refund, ss.RefundList, ss.StripeWebhookEndpoint,
    ss.StripeEvent,
]


def _ref(t: Any) -> dict[str, str]:
    return {"$ref": REF.format(name=t.__name__)}


def _content(t: Any, media: str = JSON_TYPE) -> dict[str, Any]:
    return {media: {"schema": _ref(t)}}


def _answer(description: str, t: Any = schemas.Error) -> dict[str, Any]:
    return {"description": description, "content": _content(t)}


# The refusals any `/v1/` call may meet before its own checks (guard, authentication, limits).
_COMMON = {
    "400": _answer("Invalid request (the error names its `param`), or a card number anywhere in it."),
    "401": _answer("Missing or invalid API key."),
    "413": _answer("Body over the limit."),
    "429": _answer("Over the merchant's rate limit (with Retry-After)."),
    "431": _answer("Too many or too large headers."),
    "503": _answer("Starting, storage saturated or failing, or the backlog at its bound (with Retry-After)."),
}
_NOT_FOUND = {"404": _answer("No such object of this merchant (`resource_missing`, `param: id`).")}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
_PREFER = {"name": "Prefer", "in": "header", "required": False, "description": "`wait=MS`: wait for the outcome.",
           "schema": {"type": "string", "maxLength": 64}}
_STRIPE_VERSION = {"name": "Stripe-Version", "in": "header", "required": False,
                   "description": "Any dated version; recorded.", "schema": {"type": "string", "maxLength": 64}}
_LIMIT = {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100}}
_STARTING_AFTER = {"name": "starting_after", "in": "query", "required": False,
                   "schema": {"type": "string", "maxLength": 64}}
_ENDING_BEFORE = {"name": "ending_before", "in": "query", "required": False,
                  "description": "The page before this object (Stripe's; not with starting_after).",
                  "schema": {"type": "string", "maxLength": 64}}


def _path_id(pattern: str) -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


def _op(op_id: str, summary: str, ok: dict[str, Any], *, body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
        tag: str = "native") -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag],
                           "responses": {**ok, **_COMMON, **(extra or {})}}
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {"required": False, "content": body}
    return out


def _native_paths() -> dict[str, Any]:
    pay_id = _path_id("^pay_[0-9a-z]{24}$")
    operation_answers = {
        "200": _answer("With `Prefer: wait`: the operation succeeded.", schemas.Payment),
        "202": _answer("Accepted: the worker makes the PSP call (`pending_operation`).", schemas.Payment),
        "402": _answer("With `Prefer: wait`: the PSP refused it."),
        "409": _answer("Another operation of the payment is in progress, the key is in flight, or the payment"
                       " is not stored yet."),
        "422": _answer("Not possible in the payment's state (a stable `code`)."),
        **_NOT_FOUND,
    }

    def operation(name: str, request: Any) -> dict[str, Any]:
        return {"post": _op(f"{name}Payment", f"{name.capitalize()} a payment.", operation_answers,
                            body=_content(request), params=[pay_id, _IDEMPOTENCY, _PREFER])}

    return {
        "/v1/payments": {
            "post": _op("createPayment", "Create a payment (201 once durable in the write-ahead log).",
                        {"201": _answer("Accepted, or challenged (`requires_action`).", schemas.Payment)},
                        body=_content(schemas.PaymentCreate), params=[_IDEMPOTENCY],
                        extra={"402": _answer("Declined by the risk engine (`card_error`)."),
                               "409": _answer("The same key is still being answered.")}),
            "get": _op("listPayments", "The merchant's payments, newest first.",
                       {"200": _answer("A page.", schemas.PaymentList)}, params=[_LIMIT, _STARTING_AFTER]),
        },
        "/v1/payments/{id}": {
            "get": _op("getPayment", "A payment.", {"200": _answer("The payment.", schemas.Payment)},
                       params=[pay_id, _PREFER], extra=_NOT_FOUND),
        },
        "/v1/payments/{id}/capture": operation("capture", operations.CaptureRequest),
        "/v1/payments/{id}/void": operation("void", operations.VoidRequest),
        "/v1/payments/{id}/refunds": operation("refund", operations.RefundRequest),
    }


def _stripe_paths() -> dict[str, Any]:
    pi = _path_id("^[A-Za-z0-9_]{1,64}$")
    version = [_STRIPE_VERSION]
    post = [_IDEMPOTENCY, _STRIPE_VERSION]
    card = {"402": _answer("Declined (`card_error`, with `decline_code` and the `payment_intent`).")}
    conflict = {"409": _answer("The same Idempotency-Key is still being answered, or the payment changed.")}
    expand = {"name": "expand[]", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 64}}
    created = {"name": "created", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}

    def stripe(op_id: str, summary: str, ok: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return _op(op_id, summary, ok, tag="stripe", **kw)

    intent = {"200": _answer("The PaymentIntent.", ss.PaymentIntent)}
    return {
        "/v1/payment_intents": {
            "post": stripe("stripeCreatePaymentIntent", "Create a PaymentIntent (confirmed with `confirm=true`).", intent,
                           body=_content(ss.PaymentIntentCreate, FORM), params=post, extra={**card, **conflict}),
            "get": stripe("stripeListPaymentIntents", "PaymentIntents, newest first.",
                          {"200": _answer("A page.", ss.PaymentIntentList)},
                          params=[_LIMIT, _STARTING_AFTER, _ENDING_BEFORE, created, *version]),
        },
        "/v1/payment_intents/{id}": {
            "get": stripe("stripeRetrievePaymentIntent", "A PaymentIntent.", intent, params=[pi, expand, *version],
                          extra=_NOT_FOUND),
            "post": stripe("stripeUpdatePaymentIntent", "Update (before its confirmation; after it only to the"
                           " same values).", intent,
                           body=_content(ss.PaymentIntentUpdate, FORM), params=[pi, *post], extra=_NOT_FOUND),
        },
        "/v1/payment_intents/{id}/confirm": {
            "post": stripe("stripeConfirmPaymentIntent", "Confirm an unconfirmed intent through the fast path (a"
                           " challenged intent shows its next action).", intent,
                           body=_content(ss.PaymentIntentConfirm, FORM), params=[pi, *post],
                           extra={**_NOT_FOUND, **card, **conflict}),
        },
        "/v1/payment_intents/{id}/capture": {
            "post": stripe("stripeCapturePaymentIntent", "Capture (partially: the rest is released).", intent,
                           body=_content(ss.PaymentIntentCapture, FORM), params=[pi, *post],
                           extra={**_NOT_FOUND, **card, **conflict}),
        },
        "/v1/payment_intents/{id}/cancel": {
            "post": stripe("stripeCancelPaymentIntent", "Cancel (unconfirmed, authorized or challenged).", intent,
                           body=_content(ss.PaymentIntentCancel, FORM), params=[pi, *post],
                           extra={**_NOT_FOUND, **card, **conflict}),
        },
        "/v1/charges": {
            "get": stripe("stripeListCharges", "Charges, newest first.", {"200": _answer("A page.", ss.ChargeList)},
                          params=[_LIMIT, _STARTING_AFTER, _ENDING_BEFORE, *version]),
        },
        "/v1/charges/{id}": {
            "get": stripe("stripeRetrieveCharge", "A Charge.", {"200": _answer("The Charge.", ss.Charge)},
                          params=[pi, *version], extra=_NOT_FOUND),
        },
        "/v1/refunds": {
            "post": stripe("stripeCreateRefund", "Refund a PaymentIntent or Charge (partially, repeatedly).",
                           {"200": _answer("The Refund.", ss.Refund)}, body=_content(ss.RefundCreate, FORM),
                           params=post, extra={**card, **conflict}),
            "get": stripe("stripeListRefunds", "Refunds.", {"200": _answer("A page.", ss.RefundList)},
                          params=[_LIMIT, _STARTING_AFTER, _ENDING_BEFORE, *version]),
        },
        "/v1/refunds/{id}": {
            "get": stripe("stripeRetrieveRefund", "A Refund.", {"200": _answer("The Refund.", ss.Refund)},
                          params=[pi, *version], extra=_NOT_FOUND),
        },
    }


def _shared_paths() -> dict[str, Any]:
    """Paths both surfaces serve: a form body, `Stripe-Version` or HTTP Basic makes a request Stripe's."""
    we = _path_id("^[A-Za-z0-9_]{1,64}$")
    endpoint = _answer("The endpoint (Stripe's shape).", ss.StripeWebhookEndpoint)
    return {
        "/v1/webhook_endpoints": {
            "post": _op("createWebhookEndpoint", "Create an endpoint; its `whsec_` secret is shown once.",
                        {"201": _answer("Native: the endpoint.", schemas.WebhookEndpoint), "200": endpoint},
                        body={**_content(native_webhooks.CreateEndpoint), **_content(ss.WebhookEndpointCreate, FORM)},
                        params=[_STRIPE_VERSION], tag="both"),
            "get": _op("listWebhookEndpoints", "The merchant's endpoints.",
                       {"200": _answer("The endpoints.", schemas.EndpointList)}, params=[_STRIPE_VERSION], tag="both"),
        },
        "/v1/webhook_endpoints/{id}": {
            "get": _op("stripeRetrieveWebhookEndpoint", "An endpoint.", {"200": endpoint}, params=[we, _STRIPE_VERSION],
                       extra=_NOT_FOUND, tag="stripe"),
            "post": _op("stripeUpdateWebhookEndpoint", "Update (only to the same values).", {"200": endpoint},
                        params=[we, _STRIPE_VERSION], extra=_NOT_FOUND, tag="stripe",
                        body={FORM: {"schema": {"type": "object"}}}),
            "delete": _op("deleteWebhookEndpoint", "Delete an endpoint.", {"200": _answer("Deleted.", schemas.Deleted)},
                          params=[we, _STRIPE_VERSION], extra=_NOT_FOUND, tag="both"),
        },
        "/v1/events/{id}": {
            "get": _op("getEvent", "An event (native: with its deliveries; Stripe: Stripe's type and object).",
                       {"200": _answer("The event.", schemas.Event)}, params=[we, _STRIPE_VERSION],
                       extra=_NOT_FOUND, tag="both"),
        },
        "/v1/events": {
            "get": _op("listEvents", "Native: a payment's events (`payment` required). Stripe: every stored event,"
                       " newest first (`type`, `types[]`, `created`, `starting_after`, `ending_before`).",
                       {"200": _answer("A page.", schemas.EventList)},
                       params=[{"name": "payment", "in": "query", "required": False,
                                "schema": {"type": "string", "maxLength": 64}}, _LIMIT, _STARTING_AFTER,
                               _ENDING_BEFORE, _STRIPE_VERSION], tag="both"),
        },
        "/v1/test_3ds/{merchant}/{id}": {
            "get": {"operationId": "stripeThreeDSPage", "summary": "The 3-D Secure test page.", "tags": ["stripe"],
                    "security": [],
                    "parameters": [{"name": "merchant", "in": "path", "required": True,
                                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,64}$"}},
                                   _path_id("^pi_[0-9a-z]{24}$"),
                                   {"name": "client_secret", "in": "query", "required": True,
                                    "schema": {"type": "string", "maxLength": 128}}],
                    "responses": {"200": {"description": "The page.", "content": {"text/html": {}}},
                                  "404": _answer("Unknown intent or wrong client secret."),
                                  "400": _answer("Refused request (guard)."),
                                  "503": {"description": "Starting.", "content": {"text/html": {}}}}},
        },
    }


def _ops_paths() -> dict[str, Any]:
    plain = {"200": {"description": "Alive.", "content": _content(schemas.Status)}}
    return {
        "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness.", "security": [], "responses": plain}},
        "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness (WAL open and healthy).", "security": [],
                            "responses": {"200": plain["200"], "503": {"description": "Not ready.",
                                                                       "content": _content(schemas.Status)}}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text.", "security": [],
                             "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {}}}}}},
    }


def build() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_TYPES, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Payment gateway API", "version": "1",
                 "description": "The native merchant API and the Stripe-compatible surface"
                                " (docs/stripe-compatibility.md). Errors are `{\"error\": {...}}` on both."},
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}, {"basic": []}],
        "paths": {**_native_paths(), **_stripe_paths(), **_shared_paths(), **_ops_paths()},
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic",
                                          "description": "Stripe's convention: the API key as the user."}},
        },
    }


def document() -> bytes:
    """The description as served and checked in: sorted keys, two-space indent, a final newline."""
    import json

    return (json.dumps(build(), indent=2, sort_keys=True) + "\n").encode()


if __name__ == "__main__":
    sys.stdout.buffer.write(document())
