"""Schema of the async payment path (migration 2), kept apart so that the store modules share one definition."""

# No statement below may contain a semicolon inside it: the migrator splits on them.
MIGRATION_2_PROCESSING = """
CREATE TABLE payment_state (
    payment_id TEXT PRIMARY KEY REFERENCES payments(id),
    merchant_id TEXT NOT NULL,
    status TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    payment_method TEXT NOT NULL,
    auto_capture INTEGER NOT NULL,
    amount_authorized INTEGER NOT NULL DEFAULT 0,
    amount_captured INTEGER NOT NULL DEFAULT 0,
    amount_refunded INTEGER NOT NULL DEFAULT 0,
    capture_final INTEGER NOT NULL DEFAULT 0,
    psp TEXT,
    psp_reference TEXT,
    failure_code TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL,
    CHECK (0 <= amount_refunded AND amount_refunded <= amount_captured
           AND amount_captured <= amount_authorized AND amount_authorized <= amount)
);
CREATE INDEX payment_state_by_status ON payment_state (status);
CREATE INDEX payments_by_status ON payments (status);
CREATE INDEX payments_by_merchant_lsn ON payments (merchant_id, lsn DESC);
CREATE TABLE payment_attempts (
    attempt_id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    operation_id TEXT,
    attempt_no INTEGER NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('authorize', 'capture', 'void', 'refund')),
    psp TEXT NOT NULL,
    idempotency_key TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    final_capture INTEGER NOT NULL,
    psp_reference TEXT,
    code TEXT,
    fee_minor INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER
);
CREATE INDEX payment_attempts_by_payment ON payment_attempts (payment_id, started_at_ms, attempt_id);
CREATE TABLE payment_operations (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    merchant_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('capture', 'void', 'refund')),
    seq INTEGER NOT NULL CHECK (seq >= 1),
    amount INTEGER NOT NULL CHECK (amount > 0),
    final_capture INTEGER NOT NULL,
    reason TEXT,
    actor TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'pending_verification', 'succeeded', 'failed')),
    psp_idempotency_key TEXT NOT NULL UNIQUE,
    failure_code TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    UNIQUE (payment_id, kind, seq)
);
CREATE INDEX payment_operations_open ON payment_operations (status)
    WHERE status IN ('pending', 'pending_verification');
CREATE INDEX payment_operations_by_payment ON payment_operations (payment_id, created_ms);
CREATE VIEW refunds AS
    SELECT id, payment_id, merchant_id, seq, amount, reason, status, failure_code, created_ms, updated_ms
    FROM payment_operations WHERE kind = 'refund';
CREATE TABLE ledger_entries (
    posting_id TEXT NOT NULL,
    line_no INTEGER NOT NULL,
    payment_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    currency TEXT NOT NULL,
    debit INTEGER NOT NULL CHECK (debit >= 0),
    credit INTEGER NOT NULL CHECK (credit >= 0),
    at_ms INTEGER NOT NULL,
    reverses TEXT,
    PRIMARY KEY (posting_id, line_no),
    CHECK ((debit > 0 AND credit = 0) OR (credit > 0 AND debit = 0))
);
CREATE INDEX ledger_entries_by_payment ON ledger_entries (payment_id);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id TEXT NOT NULL,
    old_status TEXT NOT NULL,
    new_status TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX audit_log_by_payment ON audit_log (payment_id, id);
CREATE TABLE operation_idempotency_keys (
    merchant_id TEXT NOT NULL,
    key TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    payment_id TEXT,
    status_code INTEGER,
    response TEXT,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (merchant_id, key)
)
"""

# Events and webhooks (migration 5): `payment_events` is the transactional outbox (written in the
# same transaction as the payment change it reports), `webhook_deliveries` one row per (event,
# endpoint) with the delivery state that survives a crash, `webhook_endpoints` the merchants'
# subscriptions. An event's id is `evt_<payment id suffix>_<n>`, n counted per payment in
# `payment_state.events_count` (whose row the change writes anyway): the primary key alone then orders a
# payment's events and finds them by prefix, so an event costs one row and one index entry.
# No foreign keys into the payment tables: those can be truncated on their own (tests, retention).
MIGRATION_5_WEBHOOKS = """
ALTER TABLE payment_state ADD COLUMN events_count INTEGER NOT NULL DEFAULT 0;
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    url TEXT NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    secret TEXT NOT NULL CHECK (length(secret) BETWEEN 16 AND 128),
    enabled_events TEXT NOT NULL,
    description TEXT,
    created_ms INTEGER NOT NULL,
    deleted_ms INTEGER
);
CREATE INDEX webhook_endpoints_by_merchant ON webhook_endpoints (merchant_id) WHERE deleted_ms IS NULL;
CREATE TABLE payment_events (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE webhook_deliveries (
    event_id TEXT NOT NULL REFERENCES payment_events(id),
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id),
    payment_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_ms INTEGER NOT NULL,
    last_status_code INTEGER,
    last_error TEXT,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_ms) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_head ON webhook_deliveries (endpoint_id, payment_id, event_id)
    WHERE status = 'pending'
"""

# A payment stored once (migration 9): its processing state moves from `payment_state` into its own row
# of `payments`, beside the body and the status lists filter on, so that a change writes one row with
# one statement. The token and auto-capture flag of the create are columns of the row from its insert.
_STATE_COLUMNS_ADDED = (
    "payment_method TEXT NOT NULL DEFAULT ''",
    "auto_capture INTEGER NOT NULL DEFAULT 1",
    "amount_authorized INTEGER NOT NULL DEFAULT 0",
    "amount_captured INTEGER NOT NULL DEFAULT 0",
    "amount_refunded INTEGER NOT NULL DEFAULT 0",
    "capture_final INTEGER NOT NULL DEFAULT 0",
    "psp TEXT",
    "psp_reference TEXT",
    "failure_code TEXT",
    "version INTEGER NOT NULL DEFAULT 0",
    "events_count INTEGER NOT NULL DEFAULT 0",
    "updated_ms INTEGER NOT NULL DEFAULT 0",
)
_AMOUNTS_CHECK = ("0 <= amount_refunded AND amount_refunded <= amount_captured"
                  " AND amount_captured <= amount_authorized AND amount_authorized <= amount")
_MOVED = ("status, amount_authorized, amount_captured, amount_refunded, capture_final, psp, psp_reference,"
          " failure_code, version, events_count, updated_ms, payment_method, auto_capture")
MIGRATION_9_ONE_ROW_SQLITE = (
    "".join(f"ALTER TABLE payments ADD COLUMN {c};\n" for c in _STATE_COLUMNS_ADDED[:-1])
    # SQLite adds a CHECK only with a column (and tests it against the rows there are).
    + f"ALTER TABLE payments ADD COLUMN {_STATE_COLUMNS_ADDED[-1]} CHECK ({_AMOUNTS_CHECK});\n"
    + "UPDATE payments SET payment_method = coalesce(json_extract(body, '$.payment_method'), ''),"
      " auto_capture = coalesce(json_extract(body, '$.capture'), 1);\n"
    + f"UPDATE payments SET ({_MOVED}) = (SELECT {_MOVED} FROM payment_state s WHERE s.payment_id = payments.id)"
      " WHERE id IN (SELECT payment_id FROM payment_state);\n"
    + "DROP INDEX payment_state_by_status;\n"
    + "DROP TABLE payment_state"
)
MIGRATION_9_ONE_ROW_PG = [
    "ALTER TABLE payments " + ", ".join(f"ADD COLUMN {c.replace('INTEGER', 'BIGINT')}" for c in _STATE_COLUMNS_ADDED)
    + f", ADD CONSTRAINT payments_amounts_check CHECK ({_AMOUNTS_CHECK})",
    ("UPDATE payments SET payment_method = coalesce(body::jsonb ->> 'payment_method', ''),"
     " auto_capture = coalesce((body::jsonb ->> 'capture')::boolean::int, 1)"),
    (f"UPDATE payments p SET ({_MOVED}) = (SELECT {_MOVED} FROM payment_state s WHERE s.payment_id = p.id)"
     " WHERE p.id IN (SELECT payment_id FROM payment_state)"),
    "DROP TABLE payment_state",
]
