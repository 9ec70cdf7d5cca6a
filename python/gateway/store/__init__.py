"""Durable state behind the `Store` interface: SQLite in embedded mode, PostgreSQL in cluster mode."""

from gateway.store.base import Merchant, Store

__all__ = ["Merchant", "Store"]
