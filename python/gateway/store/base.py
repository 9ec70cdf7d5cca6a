"""The storage interface every backend implements and the contract tests exercise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

# Re-exported for the API's imports; the one definition is in domain/records.py.
from gateway.domain.records import PAYMENT_CREATED, decode_record

__all__ = ["Merchant", "PaymentRow", "Row", "Store", "wal_rows"]


class Merchant(msgspec.Struct, frozen=True):
    id: str
    name: str
    rate_limit_per_s: float | None = None
    rate_limit_burst: float | None = None
    # When the key this merchant was found by stops working (ms; None: no expiry): an overlap window.
    key_expires_ms: int | None = None


Row = tuple[object, ...]


def wal_rows(records: Iterable[tuple[int, bytes]]) -> tuple[list[Row], list[Row]]:
    """The `payments` rows (id, merchant_id, status, amount, currency, idempotency_key, created, lsn,
    body, payment_method, auto_capture) and `idempotency_keys` rows (merchant_id, key, fingerprint, status_code, response,
    created_ms) of the `payment.created` records among `records`; every store writes these. Raises
    `msgspec.DecodeError` for bytes that are not a record (domain/records.py)."""
    payments: list[Row] = []
    keys: list[Row] = []
    for lsn, payload in records:
        rec = decode_record(payload)
        if rec.type != PAYMENT_CREATED:
            continue
        head = rec.head()
        text = bytes(rec.payment).decode()
        payments.append((head.id, rec.merchant_id, head.status, head.amount, head.currency,
                         rec.idempotency_key, head.created, lsn, text, *head.token_and_capture()))
        if rec.idempotency_key is not None and rec.fingerprint is not None:
            # The answer a replay sends: the payment, or the error body of a 402 decline.
            declined = bytes(rec.response)
            response = declined.decode() if declined else text
            keys.append((rec.merchant_id, rec.idempotency_key, rec.fingerprint, rec.status_code, response,
                         rec.created_ms))
    return payments, keys


class PaymentRow(msgspec.Struct, frozen=True):
    id: str
    merchant_id: str
    status: str
    amount: int
    currency: str
    created: int
    idempotency_key: str | None = None


class Store(Protocol):
    def migrate(self) -> int:
        """Applies pending schema migrations; returns the schema version."""
        ...

    def create_merchant(
        self, name: str, api_key_hash: str, merchant_id: str | None = None, rate_limit_per_s: float | None = None
    ) -> Merchant: ...

    def merchant_by_key_hash(self, api_key_hash: str) -> Merchant | None: ...

    def apply_wal_records(self, records: list[tuple[int, bytes]]) -> int:
        """Materialises WAL records and advances the checkpoint in one transaction; returns how many
        payments were new. Replaying records already applied changes nothing."""
        ...

    def checkpoint(self) -> int: ...

    def get_payment(self, merchant_id: str, payment_id: str) -> bytes | None: ...

    def count_payments(self, merchant_id: str | None = None) -> int: ...

    def close(self) -> None: ...
