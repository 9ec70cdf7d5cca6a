"""Error objects produced on the Python side (the fast path builds its own in Rust)."""

from __future__ import annotations

import msgspec

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 409: "idempotency_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 503: "api_error"}


def error_body(status: int, code: str, message: str, param: str | None = None, kind: str | None = None) -> bytes:
    return msgspec.json.encode(
        {"error": {"type": kind or _STATUS_TYPES.get(status, "api_error"), "code": code, "message": message,
                   "param": param}}
    )
