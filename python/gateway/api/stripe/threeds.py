"""The 3-D Secure test page: where `next_action.redirect_to_url.url` of a challenged PaymentIntent
leads. `GET` shows the page (two buttons); `POST` with `result=succeed` completes the challenge (the
payment goes back to `processing` and the worker authorizes it), `result=fail` fails it (the intent
becomes `requires_payment_method` with `payment_intent_authentication_failure`). The page needs no API
key, as the customer's browser has none: the `client_secret` in its URL authorizes it (test mode:
docs/stripe-compatibility.md).
"""

from __future__ import annotations

import hmac
import html
import re
from typing import Any
from urllib.parse import parse_qsl, quote

from gateway.api.http import Api, Response, read_body
from gateway.api.stripe import objects, wire
from gateway.store.processing import Refused

HTML = ("content-type", "text/html; charset=utf-8")
PAGE_BODY_BYTES_MAX = 1024
MERCHANT_ID = r"[A-Za-z0-9_]{1,64}"


def _page(title: str, text: str, form: bool, action: str = "") -> bytes:
    buttons = (f'<form method="post" action="{html.escape(action)}">'
               '<button name="result" value="succeed">Complete authentication</button> '
               '<button name="result" value="fail">Fail authentication</button></form>') if form else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{buttons}</body></html>").encode()


def _params(query: str) -> dict[str, str]:
    return dict(parse_qsl(query or "", keep_blank_values=True, max_num_fields=8))


async def challenge(app: Api, scope: Any, proto: Any, m: re.Match[str]) -> Response:
    merchant_id, pi = m["merchant"], m["id"]
    pid = objects.payment_id_of(pi, "pi")
    try:
        query = _params(scope.query_string)
    except ValueError:
        query = {}
    secret = query.get("client_secret", "")
    # (As bytes: compare_digest refuses non-ASCII text, and a client may send any.)
    if pid is None or not hmac.compare_digest(secret.encode(), objects.client_secret(merchant_id, pid).encode()):
        return wire.stripe_error(404, "invalid_request_error", "resource_missing", f"No such payment_intent: '{pi}'",
                                 "id")
    rt = app.runtime
    ps = rt.processing
    if not rt.ready or ps is None:
        return 503, [HTML, ("retry-after", "1")], _page("Starting", "The gateway is starting.", False)
    action = f"/v1/test_3ds/{merchant_id}/{pi}?client_secret={quote(secret)}"
    if scope.method == "GET":
        return 200, [HTML], _page("3D Secure test authentication", f"Authenticate the payment {pi}.", True, action)
    raw = await read_body(scope, proto, PAGE_BODY_BYTES_MAX)
    if not isinstance(raw, bytes):
        return raw
    try:
        result = _params(raw.decode("utf-8", errors="replace")).get("result")
    except ValueError:
        result = None
    if result not in ("succeed", "fail"):
        return 400, [HTML], _page("Invalid", "Choose to complete or to fail the authentication.", True, action)
    outcome = "succeeded" if result == "succeed" else "failed"
    done = await rt.run(ps.resolve_challenge, merchant_id, pid, outcome, "customer")
    if done is None:
        return wire.missing("payment_intent", pi)
    if isinstance(done, Refused):
        return 409, [HTML], _page("Already done", "This authentication is over.", False)
    if outcome == "succeeded":
        rt.submit_operation(pid)  # the worker takes the payment to the PSP (cluster: its scan finds it too)
    return 200, [HTML], _page("Done", f"Authentication {'completed' if result == 'succeed' else 'failed'}.", False)


def routes() -> list[tuple[str, str, str, Any]]:
    path = rf"/v1/test_3ds/(?P<merchant>{MERCHANT_ID})/(?P<id>pi_[0-9a-z]{{24}})"
    return [("GET", path, "stripe_3ds_page", challenge), ("POST", path, "stripe_3ds_complete", challenge)]
