"""The PSP wire schema: the JSON bodies the HTTP client sends and reads, and the ones the simulator
(psp_sim/http.py) reads and sends. One set of types for both ends, so they cannot drift apart; the
simulator also uses `Response` and `TransactionStatus` as its in-process results.

Invariants:
- Request bodies refuse unknown fields (`forbid_unknown_fields`): a misspelt field is a 400, never
  silently dropped.
- Response bodies carry `outcome` (approved, soft_decline, hard_decline, error); every other field has
  a default, because an error body (`{"outcome", "code", "message", "retryable"}`) carries no more.
  Readers ignore unknown fields, so a field may be added to a response without breaking a client.
"""

from __future__ import annotations

import msgspec


class AuthorizeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reference: str
    amount: int
    currency: str
    token: str


class CaptureRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    psp_reference: str
    amount: int
    final: bool = False


class VoidRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    psp_reference: str


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    psp_reference: str
    amount: int


class Response(msgspec.Struct, frozen=True):
    """The answer to one operation.

    `outcome` is one of approved, soft_decline, hard_decline, error. Errors carry `retryable`: true
    when the request was not processed and may be sent again (capacity, outage), false when the
    request itself is invalid for the transaction's state.
    """

    outcome: str
    psp: str = ""
    operation: str = ""
    code: str | None = None
    message: str | None = None
    retryable: bool = False
    psp_reference: str | None = None
    reference: str | None = None
    status: str | None = None
    amount: int = 0
    currency: str | None = None
    fee_minor: int = 0


class TransactionStatus(msgspec.Struct, frozen=True):
    """Snapshot of a transaction as the PSP sees it, the answer to a status query (`status` is the
    PSP's vocabulary: authorized, declined, captured, voided, partially_refunded, refunded)."""

    psp: str
    psp_reference: str
    reference: str
    status: str
    currency: str
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture_final: bool
    decline_code: str | None = None
    created_at: float = 0.0
