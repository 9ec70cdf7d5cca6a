"""Error objects produced on the Python side (the fast path builds its own in Rust).

No error ever repeats a card number: a card-number-like run in a message or `param` (an unknown
parameter's name, a path segment echoed in a 404) is masked here, whatever the caller passed, as the
last line of defence behind the API's guard (`gateway.api.guard`).
"""

from __future__ import annotations

import msgspec

from gateway._fastpath import mask_pans

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 409: "idempotency_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 431: "invalid_request_error", 503: "api_error"}


def error_body(status: int, code: str, message: str, param: str | None = None, kind: str | None = None) -> bytes:
    message = mask_pans(message)
    if param is not None:
        param = mask_pans(param)
    return msgspec.json.encode(
        {"error": {"type": kind or _STATUS_TYPES.get(status, "api_error"), "code": code, "message": message,
                   "param": param}}
    )
