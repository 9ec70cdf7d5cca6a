"""Stores written by the schema before a migration, for the tests that prove the migration keeps them."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import pytest
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore

S = TypeVar("S", SqliteStore, PostgresStore)


def reopened_after_old_schema(monkeypatch: pytest.MonkeyPatch, store_module: ModuleType, open_store: Callable[[], S],
                              version: int, seed: Callable[[S], None]) -> S:
    """Opens a store with only the migrations below `version` of `store_module`, lets `seed` write the
    rows of that schema, closes it, and returns it opened again with every migration known (not yet
    migrated)."""
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", [x for x in store_module.MIGRATIONS if x[0] < version])
        old = open_store()
        assert old.migrate() == version - 1
        seed(old)
        old.close()
    return open_store()
