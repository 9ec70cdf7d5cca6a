"""The risk control plane's rows: versioned rulesets, persisted lists and their entries, the audit trail.

The tables are migration 3 (`risk_schema.py`), on SQLite in embedded mode and PostgreSQL in cluster
mode, through the store's one dialect seam (`gateway.store.sql`). Reads return plain rows; every change
runs in `RiskStore.change()`, one transaction that, in cluster mode, first takes the control plane's
advisory lock (`PG_LOCK_ID`), so changes of every process are serialised and the ids of one list's
audit rows grow in commit order (a list's version is the id of its newest audit row). The caller
decides what to write and may swap the engine inside the transaction: an exception rolls it back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gateway.store.sql import Db, Dialect, SqliteDialect, chunked, dialect_for, marks, now_ms

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore
    from gateway.store.sqlite import SqliteStore

# Cluster mode: every control-plane change takes this PostgreSQL advisory lock ("risk").
PG_LOCK_ID = 0x7269_736B
RULESET_COLUMNS = "version, scope, merchant_id, source, author, comment, operation, rollback_of, created_ms"
_NEWEST_OF_EACH_SLOT = (
    f"SELECT {RULESET_COLUMNS} FROM risk_rulesets r WHERE version = (SELECT max(version) FROM risk_rulesets"
    " WHERE scope = r.scope AND merchant_id = r.merchant_id)"
)

Row = tuple[Any, ...]


def _present(db: Db, name: str, values: Sequence[str]) -> set[str]:
    """Which of `values` the stored list holds (looked up per value batch, never the whole list)."""
    out: set[str] = set()
    for part in chunked(values):
        out.update(v for (v,) in db.fetchall(
            f"SELECT value FROM risk_list_entries WHERE list_name = ? AND value IN ({marks(len(part))})",
            (name, *part)))
    return out


class RiskTx:
    """The statements of one control-plane change, inside its transaction."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def next_version(self) -> int:
        row = self.db.fetchone("SELECT coalesce(max(version), 0) + 1 FROM risk_rulesets")
        assert row is not None
        return int(row[0])

    def insert_ruleset(self, row: Row) -> None:
        """A ruleset version, columns as `RULESET_COLUMNS` (`merchant_id` '' for the global and shadow slots)."""
        self.db.execute(f"INSERT INTO risk_rulesets ({RULESET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def list_exists(self, name: str) -> bool:
        return self.db.fetchone("SELECT 1 FROM risk_lists WHERE name = ?", (name,)) is not None

    def insert_list(self, name: str, kind: str, entries_max: int | None, author: str) -> None:
        self.db.execute("INSERT INTO risk_lists (name, kind, entries_max, author, created_ms) VALUES (?, ?, ?, ?, ?)",
                        (name, kind, entries_max, author, now_ms()))

    def present(self, name: str, values: Sequence[str]) -> set[str]:
        return _present(self.db, name, values)

    def add_entries(self, name: str, values: Sequence[str]) -> None:
        t = now_ms()
        self.db.executemany(
            "INSERT INTO risk_list_entries (list_name, value, added_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(name, v, t) for v in values])

    def remove_entries(self, name: str, values: Sequence[str]) -> None:
        self.db.executemany("DELETE FROM risk_list_entries WHERE list_name = ? AND value = ?",
                            [(name, v) for v in values])

    def audit(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO risk_audit (at_ms, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                        (now_ms(), actor, action, target, json.dumps(detail, separators=(",", ":"))))


class RiskStore:
    """The control plane's store over a `SqliteStore` or a `PostgresStore` (or, read-only, one SQLite
    connection: `on_connection`)."""

    def __init__(self, store: SqliteStore | PostgresStore | None = None, *, dialect: Dialect | None = None) -> None:
        if dialect is None:
            if store is None:
                raise TypeError("RiskStore needs a store or a dialect")
            dialect = dialect_for(store)
        self._d = dialect
        self.pg = dialect.pg

    @classmethod
    def on_connection(cls, conn: sqlite3.Connection) -> RiskStore:
        """A store over one SQLite connection (a backtest's reads; changes would serialise on a lock of
        their own, not the store's)."""
        return cls(dialect=SqliteDialect(lambda: conn, threading.Lock()))

    @contextmanager
    def change(self, lock: bool = True) -> Iterator[RiskTx]:
        """One change in one transaction; `lock`: serialised with every process's changes (cluster mode)."""
        with self._d.tx() as db:
            if lock:
                self._d.xact_lock(db, PG_LOCK_ID)
            yield RiskTx(db)

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._d.read() as db:
            return db.fetchall(sql, args)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        with self._d.read() as db:
            return db.fetchone(sql, args)

    # -- rulesets -------------------------------------------------------------------------------------

    def newest_rulesets(self) -> list[Row]:
        """The newest version of every slot (scope, merchant), cleared ones included, by scope and merchant."""
        return self._all(_NEWEST_OF_EACH_SLOT + " ORDER BY scope, merchant_id")

    def live_rulesets(self) -> list[Row]:
        """The newest version of every slot that has a source, shadow excepted (what a backtest replays)."""
        return self._all(_NEWEST_OF_EACH_SLOT + " AND source IS NOT NULL AND scope != 'shadow'")

    def max_version(self) -> int:
        row = self._one("SELECT max(version) FROM risk_rulesets")
        return int(row[0] or 0) if row else 0

    def ruleset(self, version: int) -> Row | None:
        return self._one(f"SELECT {RULESET_COLUMNS} FROM risk_rulesets WHERE version = ?", (version,))

    def rulesets(self, scope: str | None, merchant_id: str | None, limit: int, before: int | None) -> list[Row]:
        """Versions newest first, optionally of one scope, one merchant, before one version."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if scope:
            where.append("scope = ?")
            args.append(scope)
        if merchant_id:
            where.append("merchant_id = ?")
            args.append(merchant_id)
        if before:
            where.append("version < ?")
            args.append(before)
        return self._all(
            f"SELECT {RULESET_COLUMNS} FROM risk_rulesets WHERE {' AND '.join(where)} ORDER BY version DESC LIMIT ?",
            (*args, limit))

    # -- lists ----------------------------------------------------------------------------------------

    def lists(self) -> list[tuple[str, str, int | None]]:
        """(name, kind, entries_max) of every list, by name."""
        return [(r[0], r[1], r[2]) for r in self._all("SELECT name, kind, entries_max FROM risk_lists ORDER BY name")]

    def list_info(self, name: str) -> Row | None:
        """(kind, entries_max, author, created_ms) of a list."""
        return self._one("SELECT kind, entries_max, author, created_ms FROM risk_lists WHERE name = ?", (name,))

    def list_kind(self, name: str) -> str | None:
        row = self._one("SELECT kind FROM risk_lists WHERE name = ?", (name,))
        return None if row is None else str(row[0])

    def list_values(self, name: str) -> list[str]:
        return [v for (v,) in self._all("SELECT value FROM risk_list_entries WHERE list_name = ?", (name,))]

    def list_page(self, name: str, after: str, limit: int) -> list[str]:
        return [v for (v,) in self._all(
            "SELECT value FROM risk_list_entries WHERE list_name = ? AND value > ? ORDER BY value LIMIT ?",
            (name, after, limit))]

    def list_count(self, name: str) -> int:
        row = self._one("SELECT count(*) FROM risk_list_entries WHERE list_name = ?", (name,))
        return int(row[0]) if row else 0

    def entry_counts(self) -> dict[str, int]:
        return {name: int(count) for name, count in self._all(
            "SELECT l.name, count(e.value) FROM risk_lists l LEFT JOIN risk_list_entries e ON e.list_name = l.name"
            " GROUP BY l.name")}

    def present(self, name: str, values: Sequence[str]) -> set[str]:
        with self._d.read() as db:
            return _present(db, name, values)

    def list_versions(self) -> dict[str, int]:
        """The stored version of every list (one index probe per list: `risk_audit_by_target`)."""
        rows = self._all(
            "SELECT l.name, (SELECT max(a.id) FROM risk_audit a WHERE a.target = '@' || l.name) FROM risk_lists l")
        return {name: int(v or 0) for name, v in rows}

    def list_changes(self, name: str, after: int, version: int, limit: int) -> list[tuple[int, str, str]]:
        """(id, action, detail) of the list's audit rows in (after, version], oldest first."""
        rows = self._all(
            "SELECT id, action, detail FROM risk_audit WHERE target = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (f"@{name}", after, version, limit))
        return [(int(r[0]), r[1], r[2]) for r in rows]

    # -- audit ----------------------------------------------------------------------------------------

    def audit(self, target: str | None, limit: int) -> list[Row]:
        """(id, at_ms, actor, action, target, detail) newest first, optionally of one target."""
        q = "SELECT id, at_ms, actor, action, target, detail FROM risk_audit"
        args: tuple[Any, ...] = ()
        if target:
            q += " WHERE target = ?"
            args = (target,)
        return self._all(q + " ORDER BY id DESC LIMIT ?", (*args, limit))
