"""Request fingerprints: what "the same request" means for an `Idempotency-Key` (docs/idempotency.md).

There is one fingerprint per kind of request, and every path that needs it calls the same function:

- **Creates** (`POST /v1/payments`): the fast path's own, computed in Rust over the parsed request
  (so key order and whitespace do not matter) and exposed as
  `FastPath.request_fingerprint`. Embedded mode's idempotency table, the WAL record's `fingerprint`
  and cluster mode's shared admission (Redis) all compare this value; `create_fingerprint` is the one
  Python entry to it.
- **Merchant operations** (capture, void, refund): `operation_fingerprint`, over the operation kind,
  the payment id and the canonical request, stored with the key in `operation_idempotency_keys`.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

# Stripe's limit, for creates and operations alike.
IDEMPOTENCY_KEY_CHARS_MAX = 255


class _Fingerprinter(Protocol):
    def request_fingerprint(self, body: bytes) -> str | None: ...


def fingerprint(*parts: str | bytes) -> str:
    """SHA-256 (hex) over the parts, each followed by a NUL so that no two sequences collide."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\x00")
    return h.hexdigest()


def create_fingerprint(fastpath: _Fingerprinter, body: bytes) -> str:
    """The fingerprint of a create body: the fast path's, or for a body the fast path will refuse as
    invalid (nothing is created, nothing is stored for replay) a hash of its bytes."""
    return fastpath.request_fingerprint(body) or fingerprint("invalid", body)


def operation_fingerprint(kind: str, payment_id: str, canonical_request: bytes) -> str:
    """The fingerprint of a capture/void/refund: `canonical_request` is the decoded request encoded
    again (msgspec), so field order and whitespace do not matter."""
    return fingerprint(kind, payment_id, canonical_request)
