"""Ledger rows: the postings of payment changes, written and read back.

The ledger is append-only: this module only ever INSERTs into `ledger_entries` (PostgreSQL also
refuses any UPDATE or DELETE with a trigger, migration 4). A posting is stored as its lines, one row
each, sharing `posting_id`; reading rebuilds the postings, and rows that cannot form a balanced
posting are reported as violations instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.domain import ledger
from gateway.store.sql import Db

LEDGER_COLUMNS = "posting_id, line_no, payment_id, kind, account, currency, debit, credit, at_ms, reverses"


def insert_postings(db: Db, postings: Sequence[ledger.Posting]) -> None:
    """The rows of every posting, in one statement over the batch (inside the caller's transaction)."""
    db.executemany(
        f"INSERT INTO ledger_entries ({LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [r for posting in postings for r in posting.row_values()],
    )


def all_postings(db: Db) -> tuple[list[ledger.Posting], list[ledger.Violation]]:
    """Every stored posting, rebuilt from its rows; rows that cannot form a posting are violations."""
    rows = db.execute(f"SELECT {LEDGER_COLUMNS} FROM ledger_entries ORDER BY posting_id, line_no").fetchall()
    return postings_from_rows(rows)


def postings_from_rows(rows: list[tuple[Any, ...]]) -> tuple[list[ledger.Posting], list[ledger.Violation]]:
    """Postings from `ledger_entries` rows (columns as `LEDGER_COLUMNS`, ordered by posting and line)."""
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        grouped.setdefault(r[0], []).append(r)
    postings: list[ledger.Posting] = []
    violations: list[ledger.Violation] = []
    for posting_id, lines in grouped.items():
        first = lines[0]
        amount = sum(r[6] for r in lines) // 2 if first[3] == "capture" else sum(r[6] for r in lines)
        try:
            postings.append(
                ledger.Posting(
                    posting_id=posting_id,
                    payment_id=first[2],
                    kind=ledger.PostingKind(first[3]),
                    currency=first[5],
                    amount=amount,
                    lines=tuple(
                        ledger.Line(r[4], ledger.Direction.DEBIT if r[6] else ledger.Direction.CREDIT, r[6] or r[7])
                        for r in lines
                    ),
                    at_ms=first[8],
                    reverses=first[9],
                )
            )
        except (ledger.UnbalancedPosting, ValueError) as e:
            violations.append(ledger.Violation("unbalanced_posting", str(e), first[2], first[5]))
    return postings, violations
