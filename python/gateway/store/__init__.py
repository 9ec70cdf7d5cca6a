"""Durable state behind the `Store` interface: SQLite in embedded mode, PostgreSQL in cluster mode."""

from gateway.store.base import Merchant, Store, WalRecord

__all__ = ["Merchant", "Store", "WalRecord"]
