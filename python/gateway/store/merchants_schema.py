"""Schema of merchants managed live (store/merchants.py): API keys with expiry and revocation, and the
merchants' audit trail. The version it is registered under lives in store/sqlite.py."""

# Migration 8 (SQLite and PostgreSQL; no semicolon inside a statement: the migrator splits on them).
# Keys that existed before are carried over without a prefix (only their hash was ever stored).
MIGRATION_MERCHANT_KEYS = """
CREATE TABLE merchant_keys (
    key_hash TEXT PRIMARY KEY CHECK (length(key_hash) = 64),
    merchant_id TEXT NOT NULL REFERENCES merchants(id),
    prefix TEXT,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    revoked_ms INTEGER
);
CREATE INDEX merchant_keys_by_merchant ON merchant_keys (merchant_id);
INSERT INTO merchant_keys (key_hash, merchant_id, prefix, created_ms)
    SELECT api_key_hash, id, NULL, created * 1000 FROM merchants;
CREATE TABLE merchant_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    merchant_id TEXT NOT NULL,
    actor TEXT NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX merchant_audit_by_merchant ON merchant_audit (merchant_id, id)
"""

# The merchant of a key that is neither revoked nor expired at the given time (ms).
KEY_LOOKUP = (
    "SELECT m.id, m.name, m.rate_limit_per_s, m.rate_limit_burst, k.expires_ms FROM merchant_keys k"
    " JOIN merchants m ON m.id = k.merchant_id"
    " WHERE k.key_hash = ? AND k.revoked_ms IS NULL AND (k.expires_ms IS NULL OR k.expires_ms > ?)"
)
