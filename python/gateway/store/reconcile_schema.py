"""Schema of PSP settlement reconciliation: one row per reconciliation run.

Written only by `gateway.store.reconcile`. No statement below may contain a semicolon inside it:
the migrator splits on them. The version it is registered under lives in store/sqlite.py (the next
free number when it was added); this constant does not depend on it.
"""

MIGRATION_RECONCILE = """
CREATE TABLE reconciliation_runs (
    id TEXT PRIMARY KEY,
    psp TEXT NOT NULL CHECK (length(psp) BETWEEN 1 AND 32),
    file_sha256 TEXT NOT NULL CHECK (length(file_sha256) = 64),
    file_name TEXT NOT NULL CHECK (length(file_name) <= 255),
    file_bytes INTEGER NOT NULL CHECK (file_bytes >= 0),
    settlement_day TEXT NOT NULL CHECK (length(settlement_day) = 10),
    lines INTEGER NOT NULL CHECK (lines >= 0),
    matched INTEGER NOT NULL CHECK (matched >= 0),
    discrepancies INTEGER NOT NULL CHECK (discrepancies >= 0),
    fee_corrections INTEGER NOT NULL CHECK (fee_corrections >= 0),
    forced INTEGER NOT NULL,
    actor TEXT NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    report TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL
);
CREATE INDEX reconciliation_runs_by_file ON reconciliation_runs (psp, file_sha256, finished_ms);
CREATE INDEX payment_attempts_settled_by_psp ON payment_attempts (psp, started_at_ms)
    WHERE status = 'approved' AND operation IN ('capture', 'refund')
"""
