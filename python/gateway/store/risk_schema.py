"""Schema of the risk control plane (migration 3): versioned rulesets, persisted lists and an audit trail.

Written only by `gateway.store.risk` (for `gateway.risk.control`). No statement below may contain a
semicolon inside it: the migrator splits on them.
"""

MIGRATION_3_RISK = """
CREATE TABLE risk_rulesets (
    version INTEGER PRIMARY KEY CHECK (version >= 1),
    scope TEXT NOT NULL CHECK (scope IN ('global', 'merchant', 'shadow')),
    merchant_id TEXT NOT NULL DEFAULT '',
    source TEXT,
    author TEXT NOT NULL CHECK (length(author) BETWEEN 1 AND 200),
    comment TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 2000),
    operation TEXT NOT NULL CHECK (operation IN ('push', 'rollback', 'clear')),
    rollback_of INTEGER REFERENCES risk_rulesets(version),
    created_ms INTEGER NOT NULL,
    CHECK ((scope = 'merchant') = (merchant_id != '')),
    CHECK ((operation = 'clear') = (source IS NULL))
);
CREATE INDEX risk_rulesets_by_slot ON risk_rulesets (scope, merchant_id, version DESC);
CREATE TABLE risk_lists (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('card', 'bin', 'email', 'ip', 'device', 'country', 'string')),
    entries_max INTEGER,
    author TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE risk_list_entries (
    list_name TEXT NOT NULL REFERENCES risk_lists(name),
    value TEXT NOT NULL,
    added_ms INTEGER NOT NULL,
    PRIMARY KEY (list_name, value)
) WITHOUT ROWID;
CREATE TABLE risk_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX risk_audit_by_target ON risk_audit (target, id)
"""
