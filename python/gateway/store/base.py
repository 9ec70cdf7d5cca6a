"""The storage interface every backend implements and the contract tests exercise."""

from __future__ import annotations

from typing import Protocol

import msgspec


class Merchant(msgspec.Struct, frozen=True):
    id: str
    name: str
    rate_limit_per_s: float | None = None
    rate_limit_burst: float | None = None


class WalRecord(msgspec.Struct, frozen=True):
    """A `payment.created` record as the fast path writes it to the WAL."""

    type: str
    merchant_id: str
    status_code: int
    created_ms: int
    payment: msgspec.Raw
    idempotency_key: str | None = None
    fingerprint: str | None = None


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
