"""Signing and verifying webhook payloads, the way Stripe does it.

The header is `Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
The timestamp is inside the signed message, so a captured request cannot be replayed later than the
receiver's tolerance; several `v1=` entries are accepted (the gateway sends one; a receiver rotating
its secret may check against both).

Merchants verify with `verify_signature(payload, header, secret)`; it raises
`WebhookSignatureError` with the reason, and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from gateway.domain.secrets import Secret

SIGNATURE_HEADER = "Gateway-Signature"
SIGNATURE_SCHEME = "v1"
TOLERANCE_S_DEFAULT = 300
# A header longer than this is not one of ours (a few signatures and a timestamp).
SIGNATURE_HEADER_CHARS_MAX = 1024
SIGNATURES_MAX = 8


class WebhookSignatureError(ValueError):
    """The payload is not signed by the given secret within the tolerance; the message says why."""


def _secret_bytes(secret: str | Secret) -> bytes:
    return (secret.expose() if isinstance(secret, Secret) else secret).encode()


def compute_signature(payload: bytes, secret: str | Secret, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `"{timestamp}.{payload}"` under the secret."""
    message = str(timestamp).encode() + b"." + payload
    return hmac.new(_secret_bytes(secret), message, hashlib.sha256).hexdigest()


def sign(payload: bytes, secret: str | Secret, timestamp: int | None = None) -> str:
    """The `Gateway-Signature` header value for `payload`, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SIGNATURE_SCHEME}={compute_signature(payload, secret, t)}"


def verify_signature(
    payload: bytes | str,
    header: str,
    secret: str | Secret,
    tolerance_s: int = TOLERANCE_S_DEFAULT,
    now: float | None = None,
) -> int:
    """Checks a `Gateway-Signature` header against the raw request body; returns its timestamp.

    Raises `WebhookSignatureError` if the header is malformed, no `v1` signature matches the
    secret, or the timestamp is more than `tolerance_s` seconds away from now (0 disables that check).
    Pass the body exactly as received: any re-serialisation changes the bytes and breaks the match."""
    body = payload.encode() if isinstance(payload, str) else payload
    if not header or len(header) > SIGNATURE_HEADER_CHARS_MAX:
        raise WebhookSignatureError(f"missing or oversized {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not value.isdigit() or len(value) > 12:
                raise WebhookSignatureError("the timestamp is not a unix time in seconds")
            timestamp = int(value)
        elif key == SIGNATURE_SCHEME and len(signatures) < SIGNATURES_MAX:
            signatures.append(value)
    if timestamp is None:
        raise WebhookSignatureError("no timestamp (t=) in the signature header")
    if not signatures:
        raise WebhookSignatureError(f"no {SIGNATURE_SCHEME} signature in the signature header")
    expected = compute_signature(body, secret, timestamp)
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise WebhookSignatureError("no signature matches the payload and the secret")
    current = time.time() if now is None else now
    if tolerance_s > 0 and abs(current - timestamp) > tolerance_s:
        raise WebhookSignatureError(f"the timestamp is outside the tolerance of {tolerance_s} s")
    return timestamp
