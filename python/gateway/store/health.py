"""What the operators' metrics read from the store now and then: counts and checks, not per payment.

`snapshot` runs a handful of aggregate queries (every `[metrics] check_interval_ms`, on the worker):
payments in `pending_verification`, the oldest webhook event still waiting for delivery, the ledger's
balance per currency and the number of postings that do not balance, and the discrepancies of the
latest reconciliation run of each PSP. The ledger queries scan `ledger_entries`, which is why they
run on an interval of their own (`ledger_check_interval_ms`) and not at every scrape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.store.sql import Db


@dataclass(slots=True)
class LedgerCheck:
    balanced: bool
    # Per currency: debits minus credits over the whole ledger (0 when balanced).
    imbalance_minor: dict[str, int] = field(default_factory=dict)
    unbalanced_postings: int = 0
    checked_at_s: float = 0.0
    duration_s: float = 0.0


@dataclass(slots=True)
class Snapshot:
    pending_verification: int = 0
    # Age of the oldest event with a delivery still pending (0: none is waiting).
    oldest_undelivered_age_s: float = 0.0
    undelivered: int = 0
    # PSP -> discrepancies of its latest reconciliation run.
    reconciliation_discrepancies: dict[str, int] = field(default_factory=dict)


def snapshot(db: Db, now_ms: int) -> Snapshot:
    out = Snapshot()
    row = db.fetchone("SELECT count(*) FROM payments WHERE status = 'pending_verification'")
    out.pending_verification = int(row[0]) if row else 0
    row = db.fetchone(
        "SELECT count(*), min(e.created_ms) FROM webhook_deliveries d JOIN payment_events e ON e.id = d.event_id"
        " WHERE d.status = 'pending'")
    if row and row[0]:
        out.undelivered = int(row[0])
        out.oldest_undelivered_age_s = max(0.0, (now_ms - int(row[1])) / 1000)
    for psp, discrepancies in db.fetchall(
            "SELECT r.psp, r.discrepancies FROM reconciliation_runs r WHERE r.finished_ms ="
            " (SELECT max(finished_ms) FROM reconciliation_runs q WHERE q.psp = r.psp)"):
        out.reconciliation_discrepancies[str(psp)] = int(discrepancies)
    return out


def ledger_check(db: Db) -> LedgerCheck:
    """Debits equal credits in every currency and within every posting (the double-entry invariant)."""
    started = time.perf_counter()
    imbalance = {
        str(cur): int(diff)
        for cur, diff in db.fetchall(
            "SELECT currency, sum(debit) - sum(credit) FROM ledger_entries GROUP BY currency")
    }
    row = db.fetchone(
        "SELECT count(*) FROM (SELECT posting_id FROM ledger_entries GROUP BY posting_id, currency"
        " HAVING sum(debit) <> sum(credit)) AS unbalanced")
    unbalanced = int(row[0]) if row else 0
    return LedgerCheck(balanced=unbalanced == 0 and all(v == 0 for v in imbalance.values()),
                       imbalance_minor=imbalance, unbalanced_postings=unbalanced, checked_at_s=time.time(),
                       duration_s=time.perf_counter() - started)
