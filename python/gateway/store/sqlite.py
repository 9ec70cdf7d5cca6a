"""SQLite store for embedded mode (WAL journal, one writer: the tailer; readers on their own
connections)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from gateway.store.base import Merchant, wal_rows
from gateway.store.merchants_schema import KEY_LOOKUP, MIGRATION_MERCHANT_KEYS
from gateway.store.processing_schema import (
    MIGRATION_2_PROCESSING,
    MIGRATION_5_WEBHOOKS,
    MIGRATION_9_ONE_ROW_SQLITE,
)
from gateway.store.reconcile_schema import MIGRATION_RECONCILE
from gateway.store.risk_schema import MIGRATION_3_RISK
from gateway.store.stripe_schema import MIGRATION_10_STRIPE_INTENTS

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE merchants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
            api_key_hash TEXT NOT NULL UNIQUE CHECK (length(api_key_hash) = 64),
            rate_limit_per_s REAL CHECK (rate_limit_per_s IS NULL OR rate_limit_per_s > 0),
            rate_limit_burst REAL CHECK (rate_limit_burst IS NULL OR rate_limit_burst >= 1),
            created INTEGER NOT NULL
        );
        CREATE TABLE payments (
            id TEXT PRIMARY KEY,
            merchant_id TEXT NOT NULL REFERENCES merchants(id),
            status TEXT NOT NULL,
            amount INTEGER NOT NULL CHECK (amount > 0),
            currency TEXT NOT NULL CHECK (length(currency) = 3),
            idempotency_key TEXT,
            created INTEGER NOT NULL,
            lsn INTEGER NOT NULL,
            body TEXT NOT NULL,
            UNIQUE (merchant_id, idempotency_key)
        );
        CREATE INDEX payments_by_merchant ON payments (merchant_id, created DESC, id DESC);
        CREATE TABLE idempotency_keys (
            merchant_id TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status_code INTEGER NOT NULL,
            response TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (merchant_id, key)
        );
        CREATE TABLE wal_checkpoint (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            lsn INTEGER NOT NULL
        );
        INSERT INTO wal_checkpoint (id, lsn) VALUES (1, 0);
        """,
    ),
    # Payment processing (async path): state, PSP attempts, merchant operations, the ledger, the
    # audit log and the idempotency keys of capture/void/refund. Written by store/payments.py,
    # store/operations.py and store/ledger.py (the units of work: store/processing.py).
    (2, MIGRATION_2_PROCESSING),
    # Risk control plane: versioned rulesets, persisted lists, audit trail. Written by store/risk.py.
    (3, MIGRATION_3_RISK),
    # (4 and 7 are PostgreSQL-only: store/postgres.py.) Events (the transactional outbox of every payment
    # change) and signed webhooks: endpoints and per-endpoint delivery state. Written by
    # store/webhooks.py, delivered by gateway/processing/webhooks.py.
    (5, MIGRATION_5_WEBHOOKS),
    (6, MIGRATION_RECONCILE),  # PSP settlement reconciliation runs: store/reconcile_schema.py
    # (7 is PostgreSQL-only.) Merchants managed live: API keys with expiry and revocation, audit trail.
    (8, MIGRATION_MERCHANT_KEYS),  # store/merchants.py
    # A payment stored once: its processing state in its own row of `payments` (PostgreSQL has its own
    # statements for it, store/postgres.py).
    (9, MIGRATION_9_ONE_ROW_SQLITE),
    # PaymentIntents created without `confirm`, and the index that lists a merchant's events (the same
    # statements on PostgreSQL): store/stripe_schema.py, written by store/stripe_intents.py.
    (10, MIGRATION_10_STRIPE_INTENTS),
]
# Migrations whose PostgreSQL statements are written apart (PG_OWN_MIGRATIONS in store/postgres.py).
PG_OWN_VERSIONS = frozenset({9})

_MERCHANT_COLUMNS = "SELECT id, name, rate_limit_per_s, rate_limit_burst FROM merchants WHERE"

log = logging.getLogger("gateway.store")


class SharedQueries:
    """The queries both backends run as they are, with `?` placeholders; each store supplies
    `_fetchone` and `_execute` in its own placeholder style and connection handling."""

    def _fetchone(self, statement: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        raise NotImplementedError

    def _execute(self, statement: str, args: tuple[object, ...]) -> None:
        """A write of its own (committed when it returns)."""
        raise NotImplementedError

    def create_merchant(
        self,
        name: str,
        api_key_hash: str,
        merchant_id: str | None = None,
        rate_limit_per_s: float | None = None,
        rate_limit_burst: float | None = None,
    ) -> Merchant:
        from gateway.domain.secrets import new_id

        mid = merchant_id or new_id("acct")
        self._execute(
            "INSERT INTO merchants (id, name, api_key_hash, rate_limit_per_s, rate_limit_burst, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (mid, name, api_key_hash, rate_limit_per_s, rate_limit_burst, int(time.time())),
        )
        self._execute("INSERT INTO merchant_keys (key_hash, merchant_id, created_ms) VALUES (?, ?, ?)",
                      (api_key_hash, mid, int(time.time() * 1000)))
        return Merchant(mid, name, rate_limit_per_s, rate_limit_burst)

    def merchant_by_id(self, merchant_id: str) -> Merchant | None:
        row = self._fetchone(f"{_MERCHANT_COLUMNS} id = ?", (merchant_id,))
        return Merchant(*row) if row else None

    def merchant_by_key_hash(self, api_key_hash: str) -> Merchant | None:
        """The merchant of a key that is neither revoked nor expired (store/merchants.py)."""
        row = self._fetchone(KEY_LOOKUP, (api_key_hash, int(time.time() * 1000)))
        return Merchant(*row) if row else None

    def get_payment(self, merchant_id: str, payment_id: str) -> bytes | None:
        row = self._fetchone("SELECT body FROM payments WHERE id = ? AND merchant_id = ?", (payment_id, merchant_id))
        return row[0].encode() if row else None

    def idempotency_record(self, merchant_id: str, key: str) -> tuple[str, int, bytes, int] | None:
        """The durable record of a create's key: (fingerprint, status code, response body, created_ms)."""
        row = self._fetchone("SELECT fingerprint, status_code, response, created_ms FROM idempotency_keys"
                             " WHERE merchant_id = ? AND key = ?", (merchant_id, key))
        return None if row is None else (row[0], int(row[1]), row[2].encode(), int(row[3]))

    def has_idempotency_keys_since(self, merchant_id: str, since_ms: int) -> bool:
        """Whether the merchant has a create key recorded at or after `since_ms` (a one-off probe after
        Redis lost its data: none means Redis forgot nothing that still counts)."""
        return self._fetchone("SELECT 1 FROM idempotency_keys WHERE merchant_id = ? AND created_ms >= ? LIMIT 1",
                              (merchant_id, since_ms)) is not None

    def count_with_status(self, status: str) -> int:
        """Accepted payments in `status` (an indexed count: the cluster's backlog check)."""
        row = self._fetchone("SELECT count(*) FROM payments WHERE status = ?", (status,))
        return int(row[0]) if row else 0

    def count_payments(self, merchant_id: str | None = None) -> int:
        if merchant_id is None:
            row = self._fetchone("SELECT count(*) FROM payments")
        else:
            row = self._fetchone("SELECT count(*) FROM payments WHERE merchant_id = ?", (merchant_id,))
        return int(row[0]) if row else 0


# Per connection: the page cache (KiB) and the memory-mapped part of the database file (bytes).
SQLITE_CACHE_KIB = 65_536
SQLITE_MMAP_BYTES = 1 << 30


# A background checkpointer copies the SQLite WAL into the database file this often.
CHECKPOINT_INTERVAL_S = 0.5


class SqliteStore(SharedQueries):
    def __init__(self, path: str | Path, *, background_checkpoint: bool = False) -> None:
        """`background_checkpoint`: the SQLite WAL is copied into the database file (and both are
        fsynced) by a thread of the store's own every `CHECKPOINT_INTERVAL_S`, never by a commit: a
        commit then only appends to the WAL, and the disk's fsync stalls (250-570 ms here) no longer
        stop the writer that happened to cross the auto-checkpoint size (the worker's event loop)."""
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._background_checkpoint = background_checkpoint
        self._checkpoints_stop = threading.Event()
        if background_checkpoint:
            threading.Thread(target=self._checkpoints, name="sqlite-checkpoint", daemon=True).start()

    def _checkpoints(self) -> None:
        conn = self._conn()
        while not self._checkpoints_stop.wait(CHECKPOINT_INTERVAL_S):
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                log.exception("background checkpoint of %s failed; the next one tries again", self.path)
        conn.close()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # The WAL of the gateway is the durability promise; SQLite is a materialised view of it
            # and is rebuilt from the checkpoint after a crash, so NORMAL sync is enough here.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Pages read through a memory map and a larger page cache: with the default 2 MB cache a
            # busy store re-read its B-tree pages with a system call each (30% of the worker's CPU was
            # system time); the map only covers what the file holds, so a small store costs nothing.
            conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            conn.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
            if self._background_checkpoint:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            self._local.conn = conn
        return conn

    def migrate(self) -> int:
        conn = self._conn()
        with self._write_lock:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, sql in MIGRATIONS:
                if version <= current:
                    continue
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in sql.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                current = version
        return current

    def _fetchone(self, statement: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        row = self._conn().execute(statement, args).fetchone()
        return None if row is None else tuple(row)

    def _execute(self, statement: str, args: tuple[object, ...]) -> None:
        with self._write_lock:
            self._conn().execute(statement, args)

    def apply_wal_records(self, records: list[tuple[int, bytes]]) -> int:
        if not records:
            return 0
        payments, keys = wal_rows(records)
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO payments (id, merchant_id, status, amount, currency, idempotency_key,"
                    " created, lsn, body, payment_method, auto_capture) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    payments,
                )
                inserted = conn.total_changes - before
                conn.executemany(
                    "INSERT OR IGNORE INTO idempotency_keys"
                    " (merchant_id, key, fingerprint, status_code, response, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    keys,
                )
                conn.execute("UPDATE wal_checkpoint SET lsn = ? WHERE id = 1 AND lsn < ?",
                             (records[-1][0], records[-1][0]))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return inserted

    def checkpoint(self) -> int:
        return int(self._conn().execute("SELECT lsn FROM wal_checkpoint WHERE id = 1").fetchone()[0])

    def close(self) -> None:
        self._checkpoints_stop.set()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
