"""Every SQL statement of settlement reconciliation, on SQLite or PostgreSQL through the processing store.

Reads go through `ProcessingStore._read` and the run's writes through `ProcessingStore._tx` (the one
dialect seam of store/sql.py: placeholders, transactions); fee corrections are written by the store's
ledger path (`store.ledger.insert_postings`, the insert every processing change uses), so the ledger
stays append-only and balanced.

Invariants: a run commits in ONE transaction with its fee corrections and their audit rows; on
PostgreSQL that transaction first takes an advisory lock on (PSP, file SHA-256), so concurrent runs of
one file are serialised and cannot both correct the same capture (SQLite serialises every writer).
Calls take and return lists; `IN (...)` lists are cut at `sql.IN_LIST_MAX` ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from gateway.domain import ledger
from gateway.domain import payment as sm
from gateway.domain.settlement import Movement, SettledAttempt
from gateway.store.ledger import insert_postings
from gateway.store.processing import ProcessingStore
from gateway.store.sql import chunked, marks

RUNS_LIMIT_MAX = 1000
RUN_SUMMARY_COLUMNS = (
    "id",
    "psp",
    "file_sha256",
    "file_name",
    "settlement_day",
    "lines",
    "matched",
    "discrepancies",
    "fee_corrections",
    "forced",
    "actor",
    "finished_ms",
)

_ATTEMPT_COLUMNS = (
    "SELECT idempotency_key, payment_id, operation, amount, currency, psp_reference, started_at_ms,"
    " coalesce(finished_at_ms, started_at_ms) FROM payment_attempts"
    " WHERE psp = ? AND status = 'approved' AND operation IN ('capture', 'refund')"
)
_STORED_RUN = (
    "SELECT report FROM reconciliation_runs WHERE psp = ? AND file_sha256 = ? ORDER BY id DESC LIMIT 1"
)


def _attempt(row: Sequence[Any]) -> SettledAttempt:
    key, pid, op, amount, currency, psp_ref, started, finished = row
    return SettledAttempt(key, pid, op, int(amount), currency, psp_ref, int(started), int(finished))


def _movements(conn: Any, payment_ids: Sequence[str], accounts: Sequence[str]) -> list[Movement]:
    out: list[Movement] = []
    for chunk in chunked(sorted(set(payment_ids))):
        out += [
            Movement(posting_id, account, int(debit) - int(credit))
            for posting_id, account, debit, credit in conn.execute(
                "SELECT posting_id, account, debit, credit FROM ledger_entries"
                f" WHERE payment_id IN ({marks(len(chunk))}) AND account IN ({marks(len(accounts))})",
                (*chunk, *accounts),
            ).fetchall()
        ]
    return out


class ReconcileStore:
    """Reconciliation's reads and its run transaction, over a `ProcessingStore`."""

    def __init__(self, pstore: ProcessingStore) -> None:
        self.pstore = pstore

    def settled_attempts(
        self, psp: str, start_ms: int, end_ms: int, payment_ids: Sequence[str]
    ) -> list[SettledAttempt]:
        """Approved captures and refunds at `psp` that started in [start_ms, end_ms), then those of
        `payment_ids` (whenever they ran): the same attempt may come twice, callers keep one per key."""
        out: list[SettledAttempt] = []
        with self.pstore._read() as conn:
            out += [
                _attempt(r)
                for r in conn.execute(
                    _ATTEMPT_COLUMNS + " AND started_at_ms >= ? AND started_at_ms < ?",
                    (psp, start_ms, end_ms),
                ).fetchall()
            ]
            for chunk in chunked(sorted(set(payment_ids))):
                # By payment id only, the PSP filtered here: with `psp = ?` in the query the planner picks
                # the PSP's index and reads every settled attempt of the PSP for each chunk.
                out += [
                    _attempt(r[1:])
                    for r in conn.execute(
                        "SELECT psp, idempotency_key, payment_id, operation, amount, currency, psp_reference,"
                        " started_at_ms, coalesce(finished_at_ms, started_at_ms) FROM payment_attempts"
                        f" WHERE payment_id IN ({marks(len(chunk))}) AND status = 'approved'",
                        chunk,
                    ).fetchall()
                    if r[0] == psp and r[3] in ("capture", "refund")
                ]
        return out

    def movements(self, payment_ids: Sequence[str], accounts: Sequence[str]) -> list[Movement]:
        """The ledger lines of `payment_ids` on `accounts` (debit-positive)."""
        with self.pstore._read() as conn:
            return _movements(conn, payment_ids, accounts)

    def stored_run(self, psp: str, sha256: str) -> dict[str, Any] | None:
        """The report of the latest run of this file for this PSP, if any."""
        with self.pstore._read() as conn:
            row = conn.execute(_STORED_RUN, (psp, sha256)).fetchone()
        return json.loads(row[0]) if row else None

    def runs(self, psp: str | None, limit: int) -> list[dict[str, Any]]:
        """The latest runs' summaries (`RUN_SUMMARY_COLUMNS`), newest first."""
        if not 1 <= limit <= RUNS_LIMIT_MAX:
            raise ValueError(f"limit must be 1..{RUNS_LIMIT_MAX}, not {limit}")
        where, args = ("WHERE psp = ?", (psp,)) if psp else ("", ())
        with self.pstore._read() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(RUN_SUMMARY_COLUMNS)} FROM reconciliation_runs {where}"
                " ORDER BY id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [dict(zip(RUN_SUMMARY_COLUMNS, r, strict=True)) for r in rows]

    @contextmanager
    def run_tx(self, psp: str, sha256: str) -> Iterator[RunTx]:
        """The transaction that stores one run of (psp, file), serialised with other runs of it."""
        with self.pstore._tx() as conn:
            if self.pstore.pg:
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (f"reconcile:{psp}:{sha256}",)
                )
            yield RunTx(conn)


class RunTx:
    """Reads that must see what other runs committed, and the writes of a run, in its transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def stored_run(self, psp: str, sha256: str) -> dict[str, Any] | None:
        row = self._conn.execute(_STORED_RUN, (psp, sha256)).fetchone()
        return json.loads(row[0]) if row else None

    def movements(self, payment_ids: Sequence[str], accounts: Sequence[str]) -> list[Movement]:
        return _movements(self._conn, payment_ids, accounts)

    def statuses(self, payment_ids: Sequence[str]) -> dict[str, str]:
        """The current status of each payment there is among `payment_ids`."""
        out: dict[str, str] = {}
        for chunk in chunked(sorted(set(payment_ids))):
            out.update(
                self._conn.execute(
                    f"SELECT id, status FROM payments WHERE id IN ({marks(len(chunk))})",
                    chunk,
                ).fetchall()
            )
        return out

    def post(self, postings: Sequence[ledger.Posting], audits: Sequence[sm.AuditRow]) -> None:
        """New ledger postings (through the store's ledger path) with their audit rows."""
        insert_postings(self._conn, postings)
        self._conn.executemany(
            "INSERT INTO audit_log (payment_id, old_status, new_status, actor, reason, at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(a.payment_id, a.old_status, a.new_status, a.actor, a.reason, a.at_ms) for a in audits],
        )

    def insert_run(self, report: dict[str, Any]) -> None:
        """Stores a finished run; its summary columns are read from the report itself."""
        self._conn.execute(
            "INSERT INTO reconciliation_runs (id, psp, file_sha256, file_name, file_bytes, settlement_day,"
            " lines, matched, discrepancies, fee_corrections, forced, actor, report, started_ms, finished_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                report["run_id"],
                report["psp"],
                report["file_sha256"],
                report["file"],
                report["file_bytes"],
                report["settlement_day"],
                report["lines"],
                report["counts"]["matched"],
                report["discrepancies"],
                len(report["fee_corrections"]),
                int(report["forced"]),
                report["actor"],
                json.dumps(report, separators=(",", ":")),
                report["started_ms"],
                report["finished_ms"],
            ),
        )
