//! Fast-path configuration, decoded from the JSON the Python side builds out of `gateway.toml`.

use serde::Deserialize;

/// Every limit the fast path enforces, named with its unit last.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder holding the WAL segment files.
    pub wal_dir: String,
    /// Longest time a record waits for the group commit that makes it durable.
    pub fsync_interval_us: u64,
    /// The fsync runs on its own thread behind the writes; the relay reads written records
    /// (cluster durability "replicated", whose answer waits for the brokers instead of the disk).
    pub fsync_behind: bool,
    /// A group commit starts as soon as this many records wait, without waiting for the interval.
    pub batch_records_max: usize,
    /// A new segment file starts once the current one reaches this size.
    pub segment_bytes_max: u64,
    /// Records accepted but not yet durable; past this the fast path answers 503.
    pub pending_records_max: usize,
    /// Largest request body accepted.
    pub body_bytes_max: usize,
    /// Largest amount in minor units, whatever the currency.
    pub amount_max: i64,
    pub description_chars_max: usize,
    pub metadata_keys_max: usize,
    pub metadata_key_chars_max: usize,
    pub metadata_value_chars_max: usize,
    pub idempotency_key_chars_max: usize,
    /// How long a stored idempotent response is replayed.
    pub idempotency_ttl_s: u64,
    /// Bound on the in-memory idempotency table; the oldest entries are evicted past it.
    pub idempotency_entries_max: usize,
    /// Default token-bucket refill rate per merchant.
    pub rate_limit_per_s: f64,
    /// Default token-bucket size per merchant.
    pub rate_limit_burst: f64,
    /// Velocity keys the risk engine tracks per dimension.
    pub risk_velocity_keys_per_dimension_max: usize,
    /// Folder of the persisted idempotency key filter; empty: no filter, the table alone answers
    /// (cluster mode, where Redis and PostgreSQL hold the keys).
    pub idempotency_filter_dir: String,
    /// False-positive rate each filter block is sized for.
    pub idempotency_filter_false_positive_rate: f64,
    /// Keys per filter block (a block also ends after an hour).
    pub idempotency_filter_block_keys: u64,
    /// Live filter blocks at most; past it the filter turns cold (the store answers every miss).
    pub idempotency_filter_blocks_max: usize,
    /// Records up to this LSN are materialised in the store (its checkpoint): recovery rebuilds the
    /// idempotency table only from later records and does not read segments that hold none.
    pub recover_after_lsn: u64,
    /// Sealed WAL segments older than this whose records are all materialised are removed; 0: kept.
    pub wal_retention_s: u64,
    /// Removed segments are moved here instead of deleted, when set.
    pub wal_archive_dir: String,
    /// Period of the maintenance thread: filter persistence and WAL retention.
    pub maintenance_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wal_dir: "data/wal".into(),
            fsync_interval_us: 200,
            fsync_behind: false,
            batch_records_max: 512,
            segment_bytes_max: 64 * 1024 * 1024,
            pending_records_max: 65_536,
            body_bytes_max: 16 * 1024,
            amount_max: 99_999_999,
            description_chars_max: 1000,
            metadata_keys_max: 50,
            metadata_key_chars_max: 40,
            metadata_value_chars_max: 500,
            idempotency_key_chars_max: 255,
            idempotency_ttl_s: 24 * 3600,
            idempotency_entries_max: 1_000_000,
            rate_limit_per_s: 1000.0,
            rate_limit_burst: 2000.0,
            risk_velocity_keys_per_dimension_max: 16_384,
            idempotency_filter_dir: String::new(),
            idempotency_filter_false_positive_rate: 0.01,
            idempotency_filter_block_keys: 1_000_000,
            idempotency_filter_blocks_max: 1024,
            recover_after_lsn: 0,
            wal_retention_s: 0,
            wal_archive_dir: String::new(),
            maintenance_interval_ms: 1000,
        }
    }
}

impl Config {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let cfg: Config =
            serde_json::from_str(text).map_err(|e| format!("invalid fast-path config: {e}"))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects settings that cannot work, so a bad config fails at start-up, not under load.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("batch_records_max", self.batch_records_max as u64),
            ("segment_bytes_max", self.segment_bytes_max),
            ("pending_records_max", self.pending_records_max as u64),
            ("body_bytes_max", self.body_bytes_max as u64),
            (
                "idempotency_entries_max",
                self.idempotency_entries_max as u64,
            ),
            (
                "idempotency_key_chars_max",
                self.idempotency_key_chars_max as u64,
            ),
            (
                "risk_velocity_keys_per_dimension_max",
                self.risk_velocity_keys_per_dimension_max as u64,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.amount_max <= 0 {
            return Err("amount_max must be greater than 0".into());
        }
        if self.fsync_interval_us > 1_000_000 {
            return Err("fsync_interval_us must be at most 1000000 (1 s)".into());
        }
        let p = self.idempotency_filter_false_positive_rate;
        if !(p > 0.0 && p < 0.5) {
            return Err("idempotency_filter_false_positive_rate must be > 0 and < 0.5".into());
        }
        if self.idempotency_filter_blocks_max == 0 {
            return Err("idempotency_filter_blocks_max must be greater than 0".into());
        }
        if self.idempotency_filter_block_keys < 1000 {
            return Err("idempotency_filter_block_keys must be at least 1000".into());
        }
        if !(10..=3_600_000).contains(&self.maintenance_interval_ms) {
            return Err("maintenance_interval_ms must be 10 to 3600000".into());
        }
        if self.rate_limit_per_s <= 0.0 || self.rate_limit_burst < 1.0 {
            return Err("rate_limit_per_s must be > 0 and rate_limit_burst >= 1".into());
        }
        Ok(())
    }
}
