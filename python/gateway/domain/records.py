"""THE WAL/event record schema: what the Rust fast path appends for an accepted (or declined) payment,
decoded here and nowhere else.

The fast path (`rust/fastpath/src/engine.rs`, `CreatedRecord`) writes one JSON object per record:
`type`, `merchant_id`, `idempotency_key`, `fingerprint`, `status_code`, `created_ms`, `payment` (the
payment object the API returns) and, for a 402 decline only, `response` (the error body). The same
bytes travel through the WAL, the Kafka topic and the event log readers.

Invariants:
- The schema is append-only: new fields may be added, none renamed or removed; unknown fields are
  ignored on decode, so an older reader accepts a newer record.
- `payment.created` is the only record type written today; readers filter by `type`, never assume it.
- Decoders are built once at import. Hot paths (the relay's Kafka key, the workers' submissions, the
  event log) decode only the fields they need (`payment_id_of`, `decode_summary`); the stores decode the
  whole record (`decode_record`), and that decode raises `msgspec.DecodeError` on bytes that are not a
  record, so a store can tell a bad record from a good one instead of skipping it silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

PAYMENT_CREATED = "payment.created"


class PaymentHead(msgspec.Struct, frozen=True):
    """The columns the stores index of the payment object in a record (the rest stays JSON)."""

    id: str
    status: str
    amount: int
    currency: str
    created: int
    # What the worker needs of the create (the card token, auto-capture), stored in the payment's row.
    # Typed loosely: a record is never refused by the store for these (`token_and_capture`).
    payment_method: Any = None
    capture: Any = None

    def token_and_capture(self) -> tuple[str, int]:
        """The card token as the worker sends it to a PSP ('' if none) and whether to capture (1/0)."""
        pm = self.payment_method
        token = pm if isinstance(pm, str) else ("" if pm is None else msgspec.json.encode(pm).decode())
        return token, 0 if self.capture is False else 1


class Record(msgspec.Struct, frozen=True):
    """A whole record as the fast path writes it. `payment` stays raw JSON: it is stored as it is and
    decoded further only by `head()`. `response`: the 402 body of a decline, raw (the store keeps it
    as the answer a replay of the key sends)."""

    type: str
    merchant_id: str
    status_code: int
    created_ms: int
    payment: msgspec.Raw
    idempotency_key: str | None = None
    fingerprint: str | None = None
    # Empty when the record has none (msgspec decodes no `Raw | None`).
    response: msgspec.Raw = msgspec.Raw(b"")

    def head(self) -> PaymentHead:
        return _head_decoder.decode(self.payment)


class PaymentRef(msgspec.Struct, frozen=True):
    id: str


class RecordSummary(msgspec.Struct, frozen=True):
    """The few fields the event log orders and de-duplicates by."""

    type: str
    created_ms: int = 0
    payment: PaymentRef | None = None

    @property
    def payment_id(self) -> str:
        """The payment id, "" for a record without a payment."""
        return self.payment.id if self.payment is not None else ""


class _PaymentOnly(msgspec.Struct, frozen=True):
    payment: PaymentRef


class Customer(msgspec.Struct, frozen=True):
    email: str | None = None
    ip: str | None = None
    device_id: str | None = None
    id: str | None = None
    country: str | None = None


class RiskOutcome(msgspec.Struct, frozen=True):
    action: str | None = None


class RiskPayment(msgspec.Struct, frozen=True):
    """The payment fields the risk engine decided with, and what it decided."""

    amount: int
    currency: str
    payment_method: str | None = None
    customer: Customer | None = None
    risk: RiskOutcome | None = None


class RiskRecord(msgspec.Struct, frozen=True):
    """A `payment.created` record as a backtest replays it."""

    type: str
    merchant_id: str
    created_ms: int
    payment: RiskPayment


_record_decoder = msgspec.json.Decoder(Record)
_head_decoder = msgspec.json.Decoder(PaymentHead)
_summary_decoder = msgspec.json.Decoder(RecordSummary)
_payment_only_decoder = msgspec.json.Decoder(_PaymentOnly)
_risk_decoder = msgspec.json.Decoder(RiskRecord)


def decode_record(payload: bytes) -> Record:
    """The whole record; raises `msgspec.DecodeError` for bytes that are not one."""
    return _record_decoder.decode(payload)


def decode_summary(payload: bytes) -> RecordSummary | None:
    """Type, time and payment id of a record; None for bytes that are not a record."""
    try:
        return _summary_decoder.decode(payload)
    except msgspec.DecodeError:
        return None


def decode_risk_record(payload: bytes) -> RiskRecord | None:
    """What a backtest replays of a `payment.created` record; None for any other record or bytes."""
    try:
        rec = _risk_decoder.decode(payload)
    except msgspec.DecodeError:
        return None
    return rec if rec.type == PAYMENT_CREATED else None


def payment_id_of(payload: bytes) -> str | None:
    """The payment id of a record (its Kafka key); None for a record without one."""
    try:
        return _payment_only_decoder.decode(payload).payment.id
    except msgspec.DecodeError:
        return None


def created_payment_ids(records: Iterable[tuple[int, bytes]]) -> list[str]:
    """Ids of the payments the `payment.created` records among `(lsn, payload)` pairs accepted, in order;
    bytes that are not a record are skipped."""
    out = []
    for _, payload in records:
        s = decode_summary(payload)
        if s is not None and s.type == PAYMENT_CREATED and s.payment is not None:
            out.append(s.payment.id)
    return out


def created_payments(records: Iterable[tuple[int, bytes]]) -> tuple[list[str], list[int]]:
    """`created_payment_ids` and, beside each id, when its record was written (ms: the acknowledgement)."""
    ids: list[str] = []
    created_ms: list[int] = []
    for _, payload in records:
        s = decode_summary(payload)
        if s is not None and s.type == PAYMENT_CREATED and s.payment is not None:
            ids.append(s.payment.id)
            created_ms.append(s.created_ms)
    return ids, created_ms
