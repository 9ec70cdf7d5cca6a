"""The Stripe-compatible surface: Stripe's calls, names and wire conventions as a translation layer over
the one engine (the same fast-path call, WAL, idempotency, risk, workers and store as the native API).

Modules: `wire` (form bodies, API keys, errors, versions), `objects` (Stripe's objects computed from
the native payment), `common` (the handler frame), `intents` (PaymentIntents), `submit` (a
confirmation through the fast path), `unconfirmed` (intents stored until their confirmation), `lists`
(Stripe's list parameters), `charges` (Charges and Refunds), `webhooks` (WebhookEndpoints and Events),
`threeds` (the 3-D Secure test page). What is supported, partly or not: docs/stripe-compatibility.md.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.api.http import Api, Response, Route, route
from gateway.api.stripe import charges, intents, threeds, webhooks
from gateway.api.stripe.common import StripeHandler, handle


def _framed(fn: StripeHandler) -> Any:
    async def handler(app: Api, scope: Any, proto: Any, m: re.Match[str]) -> Response:
        return await handle(app, scope, proto, m, fn)

    return handler


def routes() -> list[Route]:
    """This surface's endpoints, for the app's route table (placed before the native ones)."""
    out = [route(method, path, name, _framed(fn)) for method, path, name, fn in
           (*intents.routes(), *charges.routes())]
    for method, path, name, fn, shared in webhooks.routes():
        out.append(route(method, path, name, fn if shared else _framed(fn)))
    out += [route(method, path, name, fn) for method, path, name, fn in threeds.routes()]
    return out
