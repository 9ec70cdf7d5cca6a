//! The fast path: one call per request runs every stage and queues the WAL record.
//!
//! `process` never waits for the disk. It returns `Outcome::Pending` with the record's LSN; the caller
//! answers once `committed_lsn() >= lsn` (the eventfd returned by `notify_fd` becomes readable after
//! every group commit), so one thread can keep thousands of requests in flight while they share fsyncs.

use crate::config::Config;
use crate::error::ApiError;
use crate::geo::GeoTable;
use crate::idempotency::{
    table_key, Durable, DurableRecord, Fingerprint, IdempotencyTable, Lookup,
};
use crate::ids;
use crate::keyfilter::{FilterConfig, KeyFilter};
use crate::maintenance::Maintenance;
use crate::metrics::{DecisionCounts, Histogram};
use crate::ratelimit::RateLimiter;
use crate::validate::{parse_payment, Customer, PaymentRequest};
use crate::wal::{self, AppendError, CommitListener, WalError, WalWriter, WriterConfig};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const STAGES: [&str; 10] = [
    "validate",
    "idempotency",
    "rate_limit",
    "risk",
    "wal_append",
    "total",
    "risk_velocity",
    "risk_model",
    "risk_lists",
    "risk_rules",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answer now: an error, a replay or anything that needs no durability.
    Immediate {
        status: u16,
        body: Vec<u8>,
        replayed: bool,
        retry_after_s: Option<u32>,
    },
    /// The key is not in the memory table but the filter may have seen it: call again with what
    /// the store holds for it (`create_payment_with`, `Durable::Checked`).
    CheckDurable,
    /// Answer once `lsn` is committed.
    Pending {
        status: u16,
        body: Arc<[u8]>,
        lsn: u64,
        payment_id: String,
    },
}

/// The decision trace shown to the merchant (`risk` on the payment) and kept in the WAL.
#[derive(Serialize)]
struct RiskTrace<'a> {
    action: &'static str,
    risk_score: Option<u8>,
    rule: Option<&'a str>,
    decline_code: Option<&'static str>,
    matched_rules: Vec<MatchedRuleView<'a>>,
    ruleset_version: u64,
    merchant_ruleset_version: Option<u64>,
    model_hash: Option<&'a str>,
    review: bool,
}

#[derive(Serialize)]
struct MatchedRuleView<'a> {
    name: &'a str,
    action: &'static str,
    scope: &'static str,
}

impl<'a> RiskTrace<'a> {
    fn from_decision(d: &'a risk::Decision) -> Self {
        Self {
            action: d.action.as_str(),
            risk_score: d.risk_score,
            rule: d.rule.as_deref(),
            decline_code: d.decline_code.map(|c| c.as_str()),
            matched_rules: d
                .matched_rules
                .iter()
                .map(|m| MatchedRuleView {
                    name: &m.name,
                    action: m.action.as_str(),
                    scope: match m.scope {
                        risk::Scope::Global => "global",
                        risk::Scope::Merchant => "merchant",
                    },
                })
                .collect(),
            ruleset_version: d.ruleset_version,
            merchant_ruleset_version: d.merchant_ruleset_version,
            model_hash: d.model_hash.as_deref(),
            review: d.action == risk::Action::Review,
        }
    }
}

#[derive(Serialize)]
struct NextAction {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct PaymentObject<'a> {
    id: &'a str,
    object: &'static str,
    status: &'static str,
    amount: i64,
    currency: &'a str,
    payment_method: &'a str,
    capture: bool,
    capture_method: &'static str,
    amount_capturable: i64,
    amount_captured: i64,
    amount_refunded: i64,
    description: Option<&'a str>,
    metadata: &'a BTreeMap<String, String>,
    customer: &'a Customer,
    risk: RiskTrace<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_action: Option<NextAction>,
    created: u64,
    livemode: bool,
}

/// The record appended to the WAL for an accepted payment. Card data never reaches it: a body that
/// looks like it holds a card number is refused before this is built.
#[derive(Serialize)]
struct CreatedRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    merchant_id: &'a str,
    idempotency_key: Option<&'a str>,
    fingerprint: Option<String>,
    status_code: u16,
    created_ms: u64,
    payment: &'a RawValue,
    /// The response body when it is not the payment itself (a 402 decline).
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RecoveredRecord<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    merchant_id: &'a str,
    idempotency_key: Option<&'a str>,
    fingerprint: Option<&'a str>,
    status_code: u16,
    created_ms: u64,
    #[serde(borrow)]
    payment: &'a RawValue,
    #[serde(borrow, default)]
    response: Option<&'a RawValue>,
}

struct Completion {
    lsn: u64,
    key: String,
    status: u16,
    body: Arc<[u8]>,
}

struct Committer {
    idempotency: Arc<IdempotencyTable>,
    completions: Arc<Mutex<VecDeque<Completion>>>,
    event_fd: i32,
}

impl CommitListener for Committer {
    fn before_publish(&self, committed_lsn: u64) {
        let mut q = self.completions.lock();
        while q.front().is_some_and(|c| c.lsn <= committed_lsn) {
            let c = q.pop_front().expect("front exists");
            self.idempotency.complete(&c.key, c.status, c.body, c.lsn);
        }
    }

    fn after_publish(&self, _committed_lsn: u64) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(self.event_fd, &one as *const u64 as *const libc::c_void, 8);
        }
    }
}

/// Fault injection for the fault tests and the benchmarks (a disk that stalls):
/// `GATEWAY_FAULT_WAL_FSYNC_DELAY_MS` delays WAL fdatasyncs, at most one per
/// `GATEWAY_FAULT_WAL_FSYNC_EVERY_MS` when that is set; unset or unparsable: zero.
fn fault_ms(name: &str) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::ZERO)
}

pub struct StageMetrics {
    pub stages: Vec<Histogram>,
    pub decisions: DecisionCounts,
}

pub struct Engine {
    pub cfg: Config,
    wal: WalWriter,
    idempotency: Arc<IdempotencyTable>,
    limiter: RateLimiter,
    pub risk: Arc<risk::Engine>,
    geo: parking_lot::RwLock<Arc<GeoTable>>,
    completions: Arc<Mutex<VecDeque<Completion>>>,
    event_fd: i32,
    pub metrics: StageMetrics,
    pub recovered_records: u64,
    pub truncated_bytes: u64,
    /// The key filter could not be rebuilt at start-up: every miss reads the store for one TTL.
    pub filter_cold: bool,
    maintenance: Option<Maintenance>,
    durable_checks: std::sync::atomic::AtomicU64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn fingerprint(req: &PaymentRequest) -> Fingerprint {
    let canonical = serde_json::to_vec(req).expect("request serializes");
    let mut fp = [0u8; 16];
    fp.copy_from_slice(&Sha256::digest(&canonical)[..16]);
    fp
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex16(s: &str) -> Option<Fingerprint> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Engine {
    /// Recovers the WAL (rebuilding the idempotency table and key filter from what is not yet
    /// checkpointed) and starts the flusher and the maintenance thread.
    pub fn open(cfg: Config) -> Result<Self, WalError> {
        let dir = PathBuf::from(&cfg.wal_dir);
        let now = now_ms();
        let ttl_ms = cfg.idempotency_ttl_s * 1000;
        let (filter, filter_lsn) = if cfg.idempotency_filter_dir.is_empty() {
            (None, u64::MAX)
        } else {
            let (f, lsn) = KeyFilter::open(
                FilterConfig {
                    dir: PathBuf::from(&cfg.idempotency_filter_dir),
                    false_positive_rate: cfg.idempotency_filter_false_positive_rate,
                    block_keys: cfg.idempotency_filter_block_keys,
                    ttl_ms,
                    blocks_max: cfg.idempotency_filter_blocks_max,
                },
                now,
            )?;
            (Some(Arc::new(f)), lsn.unwrap_or(0))
        };
        let idempotency = Arc::new(IdempotencyTable::with_filter(
            cfg.idempotency_ttl_s,
            cfg.idempotency_entries_max,
            filter.clone(),
        ));
        let table_after = cfg.recover_after_lsn;
        idempotency.set_materialised_lsn(table_after);
        let recovered = wal::recover_after(&dir, table_after.min(filter_lsn), |lsn, payload| {
            let Ok(rec) = serde_json::from_slice::<RecoveredRecord>(payload) else {
                return;
            };
            if rec.kind != "payment.created" {
                return;
            }
            let (Some(key), Some(fp)) = (rec.idempotency_key, rec.fingerprint.and_then(unhex16))
            else {
                return;
            };
            let k = table_key(rec.merchant_id, key);
            if let Some(f) = filter.as_ref().filter(|_| lsn > filter_lsn) {
                if rec.created_ms + ttl_ms > now {
                    f.add(&k, rec.created_ms);
                }
            }
            if lsn > table_after {
                let body: Arc<[u8]> =
                    Arc::from(rec.response.unwrap_or(rec.payment).get().as_bytes());
                idempotency.restore(&k, fp, rec.status_code, body, rec.created_ms, now, lsn);
            }
        })?;
        // Keys of records the WAL no longer holds and the filter never persisted are unknown: the
        // store answers for every miss until they have expired.
        let filter_cold = filter.as_ref().is_some_and(|f| {
            let gap = filter_lsn.saturating_add(1) < recovered.first_lsn;
            if gap {
                f.set_cold(now);
            }
            gap
        });
        let wal = WalWriter::open(
            WriterConfig {
                dir: dir.clone(),
                fsync_interval_us: cfg.fsync_interval_us,
                batch_records_max: cfg.batch_records_max,
                segment_bytes_max: cfg.segment_bytes_max,
                pending_records_max: cfg.pending_records_max,
                fsync_behind: cfg.fsync_behind,
                fsync_fault_delay: fault_ms("GATEWAY_FAULT_WAL_FSYNC_DELAY_MS"),
                fsync_fault_every: fault_ms("GATEWAY_FAULT_WAL_FSYNC_EVERY_MS"),
            },
            recovered.next_lsn,
            recovered.tail_segment,
        )?;
        // SAFETY: plain syscall; the fd is closed in Drop.
        let event_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if event_fd < 0 {
            return Err(WalError::Io(std::io::Error::last_os_error()));
        }
        let retention = (cfg.wal_retention_s > 0).then(|| wal::RetentionConfig {
            dir: dir.clone(),
            retention: Duration::from_secs(cfg.wal_retention_s),
            archive_dir: (!cfg.wal_archive_dir.is_empty())
                .then(|| PathBuf::from(&cfg.wal_archive_dir)),
        });
        let maintenance = Maintenance::start(
            idempotency.clone(),
            wal.committed_handle(),
            retention,
            Duration::from_millis(cfg.maintenance_interval_ms),
        )?;
        let completions = Arc::new(Mutex::new(VecDeque::new()));
        wal.set_listener(Arc::new(Committer {
            idempotency: idempotency.clone(),
            completions: completions.clone(),
            event_fd,
        }));
        Ok(Self {
            limiter: RateLimiter::new(cfg.rate_limit_per_s, cfg.rate_limit_burst),
            risk: Arc::new(risk::Engine::new(risk::EngineConfig {
                velocity: risk::VelocityConfig {
                    keys_per_dimension_max: cfg.risk_velocity_keys_per_dimension_max,
                },
                ..risk::EngineConfig::default()
            })),
            geo: parking_lot::RwLock::new(Arc::new(GeoTable::builtin())),
            cfg,
            wal,
            idempotency,
            completions,
            event_fd,
            metrics: StageMetrics {
                stages: STAGES.iter().map(|_| Histogram::latency()).collect(),
                decisions: DecisionCounts::new(),
            },
            recovered_records: recovered.records,
            truncated_bytes: recovered.truncated_bytes,
            filter_cold,
            maintenance,
            durable_checks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Records up to `lsn` are in the store (embedded) or acknowledged by the broker (cluster): their
    /// memory-table entries may be evicted and their segments removed once past the retention.
    pub fn set_materialised_lsn(&self, lsn: u64) {
        self.idempotency.set_materialised_lsn(lsn);
    }

    /// One maintenance round now (filter persistence, retention), on the caller's thread.
    pub fn run_maintenance(&self) {
        if let Some(m) = &self.maintenance {
            m.run_once();
        }
    }

    pub fn notify_fd(&self) -> i32 {
        self.event_fd
    }

    /// Clears the eventfd after a wake-up.
    pub fn drain_notify(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe {
            libc::read(self.event_fd, &mut v as *mut u64 as *mut libc::c_void, 8);
        }
    }

    pub fn committed_lsn(&self) -> u64 {
        self.wal.committed_lsn()
    }

    pub fn wal_error(&self) -> Option<String> {
        self.wal.error()
    }

    pub fn wait_committed(&self, lsn: u64, timeout: Duration) -> bool {
        self.wal.wait_committed(lsn, timeout)
    }

    pub fn written_lsn(&self) -> u64 {
        self.wal.written_lsn()
    }

    pub fn wait_written(&self, lsn: u64, timeout: Duration) -> bool {
        self.wal.wait_written(lsn, timeout)
    }

    pub fn wal(&self) -> &WalWriter {
        &self.wal
    }

    pub fn set_rate_limit(&self, merchant: &str, rate_per_s: f64, burst: f64) {
        self.limiter.set_limit(merchant, rate_per_s, burst);
    }

    pub fn set_geo_table(&self, table: GeoTable) {
        *self.geo.write() = Arc::new(table);
    }

    pub fn ip_country(&self, ip: &str) -> Option<String> {
        self.geo.read().country(ip).map(str::to_string)
    }

    pub fn idempotency_entries(&self) -> usize {
        self.idempotency.len()
    }

    /// A key's record as the store holds it (fingerprint in hex), for `Durable::Checked`; None for a
    /// fingerprint this build did not write.
    pub fn durable_record(
        fingerprint_hex: &str,
        status: u16,
        body: &[u8],
        created_ms: u64,
    ) -> Option<DurableRecord> {
        Some(DurableRecord {
            fingerprint: unhex16(fingerprint_hex)?,
            status,
            body: Arc::from(body),
            created_ms,
        })
    }

    fn observe(&self, stage: usize, since: Instant) -> Instant {
        let now = Instant::now();
        self.metrics.stages[stage].observe((now - since).as_nanos() as u64);
        now
    }

    fn error(e: ApiError) -> Outcome {
        Outcome::Immediate {
            status: e.status,
            body: e.to_json(),
            replayed: false,
            retry_after_s: e.retry_after_s,
        }
    }

    /// `POST /v1/payments` for an authenticated merchant.
    pub fn create_payment(
        &self,
        merchant: &str,
        idem_key: Option<&str>,
        body: &[u8],
        now_ms: u64,
    ) -> Outcome {
        self.create_payment_with(merchant, idem_key, body, now_ms, None, Durable::Unchecked)
    }

    /// `create_payment` whose risk stage reads `velocity` (features from the store shared by the
    /// processes of a cluster) instead of this process's velocity store, when given; `durable`: what
    /// the store holds for the key, after an `Outcome::CheckDurable`.
    pub fn create_payment_with(
        &self,
        merchant: &str,
        idem_key: Option<&str>,
        body: &[u8],
        now_ms: u64,
        velocity: Option<&risk::SharedFeatures>,
        durable: Durable,
    ) -> Outcome {
        let start = Instant::now();
        let out =
            self.create_payment_inner(merchant, idem_key, body, now_ms, velocity, durable, start);
        self.observe(5, start);
        out
    }

    /// The idempotency fingerprint of a create body (hex), as `create_payment` computes it; `None`
    /// for a body it would refuse as invalid.
    pub fn request_fingerprint(&self, body: &[u8]) -> Option<String> {
        parse_payment(body, &self.cfg)
            .ok()
            .map(|req| hex(&fingerprint(&req)))
    }

    /// The velocity event of a create request, for the shared store, without deciding or recording
    /// anything; `None` for a body the create would refuse as invalid.
    pub fn velocity_event(&self, merchant: &str, body: &[u8]) -> Option<risk::SharedEvent> {
        let req = parse_payment(body, &self.cfg).ok()?;
        let input = risk_input(merchant, &req, None);
        let ctx = risk::Context::new(&input);
        Some(risk::SharedEvent::from_event(
            &risk::velocity::Event::from_context(&ctx),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_payment_inner(
        &self,
        merchant: &str,
        idem_key: Option<&str>,
        body: &[u8],
        now_ms: u64,
        velocity: Option<&risk::SharedFeatures>,
        durable: Durable,
        start: Instant,
    ) -> Outcome {
        let req = match parse_payment(body, &self.cfg) {
            Ok(r) => r,
            Err(e) => return Self::error(e),
        };
        if let Some(k) = idem_key {
            // Printable ASCII only (as Stripe): a key is echoed in a header and stored in the WAL.
            if k.is_empty()
                || k.len() > self.cfg.idempotency_key_chars_max
                || !k.bytes().all(|b| (0x20..0x7f).contains(&b))
            {
                return Self::error(ApiError::invalid(
                    "idempotency_key_invalid",
                    "Idempotency-Key",
                    format!(
                        "The Idempotency-Key header must be 1 to {} printable ASCII characters.",
                        self.cfg.idempotency_key_chars_max
                    ),
                ));
            }
            // Nor a card number: the key is written to the WAL and the database.
            if crate::guard::key_contains_pan(k) {
                return Self::error(crate::validate::pan_error());
            }
        }
        let mut t = self.observe(0, start);

        let fp = idem_key.map(|_| fingerprint(&req));
        let table = idem_key.map(|k| table_key(merchant, k));
        if let (Some(tk), Some(fp)) = (&table, fp) {
            let looked = self.idempotency.begin_with(tk, fp, now_ms, durable);
            t = self.observe(1, t);
            match looked {
                Lookup::New => {}
                Lookup::Replay { status, body } => {
                    return Outcome::Immediate {
                        status,
                        body: body.to_vec(),
                        replayed: true,
                        retry_after_s: None,
                    }
                }
                Lookup::Mismatch => return Self::error(ApiError::idempotency_mismatch()),
                Lookup::InFlight => return Self::error(ApiError::idempotency_in_flight()),
                Lookup::Check => {
                    self.durable_checks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Outcome::CheckDurable;
                }
            }
        }
        let release = |e: ApiError| {
            if let Some(tk) = &table {
                self.idempotency.abandon(tk);
            }
            Self::error(e)
        };

        let now_ns = start.duration_since(*process_epoch()).as_nanos() as u64;
        if let Err(retry) = self.limiter.check(merchant, now_ns) {
            return release(ApiError::rate_limited(retry));
        }
        t = self.observe(2, t);

        let geo = self.geo.read().clone();
        let ip_country = req.customer.ip.as_deref().and_then(|ip| geo.country(ip));
        let input = risk_input(merchant, &req, ip_country);
        let mut timings = risk::StageTimings::default();
        let decision = match velocity {
            Some(v) => self.risk.decide_shared(&input, now_ms, v, &mut timings),
            None => self.risk.decide_timed(&input, now_ms, &mut timings),
        };
        for (i, ns) in [
            timings.velocity_ns,
            timings.model_ns,
            timings.lists_ns,
            timings.rules_ns,
        ]
        .into_iter()
        .enumerate()
        {
            self.metrics.stages[6 + i].observe(ns);
        }
        t = self.observe(3, t);
        self.metrics
            .decisions
            .record(decision.action.as_str(), decision.rule.as_ref());
        let (status, failure_code, next_action) = match decision.action {
            risk::Action::Block => ("failed", Some("card_declined"), None),
            risk::Action::Challenge => (
                "requires_action",
                None,
                Some(NextAction {
                    kind: "three_d_secure",
                }),
            ),
            risk::Action::Allow | risk::Action::Review => ("processing", None, None),
        };

        let id = match idem_key {
            Some(k) => ids::derived_payment_id(merchant, k),
            None => ids::random_payment_id(now_ms),
        };
        let payment = PaymentObject {
            id: &id,
            object: "payment",
            status,
            amount: req.amount,
            currency: &req.currency,
            payment_method: &req.payment_method,
            capture: req.capture,
            capture_method: if req.capture { "automatic" } else { "manual" },
            amount_capturable: 0,
            amount_captured: 0,
            amount_refunded: 0,
            description: req.description.as_deref(),
            metadata: &req.metadata,
            customer: &req.customer,
            risk: RiskTrace::from_decision(&decision),
            failure_code,
            next_action,
            created: now_ms / 1000,
            livemode: false,
        };
        let payment_json = serde_json::to_string(&payment).expect("payment serializes");
        let raw = RawValue::from_string(payment_json).expect("valid JSON");
        // A declined payment is recorded too: the trace of why it was declined is part of the log,
        // and the same key must replay the same 402.
        let decline = (decision.action == risk::Action::Block).then(|| {
            let code = decision
                .decline_code
                .map(|c| c.as_str())
                .unwrap_or("fraudulent");
            let e = ApiError::declined(code, id.clone(), "Your card was declined.");
            RawValue::from_string(String::from_utf8(e.to_json()).expect("utf-8"))
                .expect("valid JSON")
        });
        let status_code = if decline.is_some() { 402 } else { 201 };
        let record = CreatedRecord {
            kind: "payment.created",
            merchant_id: merchant,
            idempotency_key: idem_key,
            fingerprint: fp.map(|f| hex(&f)),
            status_code,
            created_ms: now_ms,
            payment: &raw,
            response: decline.as_deref(),
        };
        let payload = serde_json::to_vec(&record).expect("record serializes");
        let body: Arc<[u8]> = Arc::from(decline.as_deref().unwrap_or(&raw).get().as_bytes());

        // The completion queue lock is held across the append so the commit listener cannot run for
        // this LSN before its completion is queued.
        let mut q = self.completions.lock();
        let lsn = match self.wal.append(&payload) {
            Ok(lsn) => lsn,
            Err(AppendError::Full) => {
                drop(q);
                return release(ApiError::overloaded(
                    "The write-ahead log is saturated; retry shortly.",
                ));
            }
            Err(e) => {
                drop(q);
                return release(ApiError::overloaded(format!(
                    "Payments cannot be stored right now ({e})."
                )));
            }
        };
        if let Some(tk) = table {
            q.push_back(Completion {
                lsn,
                key: tk,
                status: status_code,
                body: body.clone(),
            });
        }
        drop(q);
        self.observe(4, t);
        Outcome::Pending {
            status: status_code,
            body,
            lsn,
            payment_id: id,
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP gateway_fastpath_stage_seconds Time spent in each fast-path stage.\n");
        out.push_str("# TYPE gateway_fastpath_stage_seconds histogram\n");
        for (i, name) in STAGES.iter().enumerate() {
            self.metrics.stages[i].render(
                &mut out,
                "gateway_fastpath_stage_seconds",
                &format!("stage=\"{name}\""),
                1e9,
            );
        }
        let stats = self.wal.stats();
        out.push_str("# HELP gateway_wal_fsync_seconds Duration of each WAL fdatasync.\n");
        out.push_str("# TYPE gateway_wal_fsync_seconds histogram\n");
        stats
            .fsync_ns
            .render(&mut out, "gateway_wal_fsync_seconds", "", 1e9);
        out.push_str("# HELP gateway_wal_batch_records Records per group commit.\n");
        out.push_str("# TYPE gateway_wal_batch_records histogram\n");
        stats
            .batch_records
            .render(&mut out, "gateway_wal_batch_records", "", 1.0);
        let _ = writeln!(
            out,
            "# HELP gateway_wal_committed_lsn Highest WAL LSN durable on disk.\n# TYPE gateway_wal_committed_lsn gauge\ngateway_wal_committed_lsn {}",
            self.committed_lsn()
        );
        let _ = writeln!(
            out,
            "# HELP gateway_wal_written_lsn Highest WAL LSN written to the segment file (fsynced or not; above the committed LSN only while the fsync runs behind).\n# TYPE gateway_wal_written_lsn gauge\ngateway_wal_written_lsn {}",
            self.written_lsn()
        );
        let _ =
            writeln!(
            out,
            "# HELP gateway_wal_bytes_written_total Bytes appended to the WAL.\n# TYPE gateway_wal_bytes_written_total counter\ngateway_wal_bytes_written_total {}",
            stats.bytes_written.load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP gateway_idempotency_entries Idempotency keys held in memory.\n# TYPE gateway_idempotency_entries gauge\ngateway_idempotency_entries {}",
            self.idempotency.len()
        );
        self.metrics.decisions.render(&mut out);
        self.maintenance_metrics(&mut out);
        out
    }

    fn maintenance_metrics(&self, out: &mut String) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# HELP gateway_idempotency_durable_checks_total Keyed creates the memory table missed and the key filter may have seen (answered from the store).\n\
             # TYPE gateway_idempotency_durable_checks_total counter\ngateway_idempotency_durable_checks_total {}",
            self.durable_checks.load(Relaxed)
        );
        if let Some(f) = self.idempotency.filter() {
            let now = now_ms();
            let _ = writeln!(
                out,
                "# HELP gateway_idempotency_filter_bytes Memory of the idempotency key filter.\n\
                 # TYPE gateway_idempotency_filter_bytes gauge\ngateway_idempotency_filter_bytes {}\n\
                 # HELP gateway_idempotency_filter_keys Keys in the idempotency key filter's live blocks.\n\
                 # TYPE gateway_idempotency_filter_keys gauge\ngateway_idempotency_filter_keys {}\n\
                 # HELP gateway_idempotency_filter_blocks Hourly blocks of the idempotency key filter.\n\
                 # TYPE gateway_idempotency_filter_blocks gauge\ngateway_idempotency_filter_blocks {}\n\
                 # HELP gateway_idempotency_filter_persisted_lsn WAL position the saved key filter covers.\n\
                 # TYPE gateway_idempotency_filter_persisted_lsn gauge\ngateway_idempotency_filter_persisted_lsn {}\n\
                 # HELP gateway_idempotency_filter_cold 1 while the key filter answers maybe to every key.\n\
                 # TYPE gateway_idempotency_filter_cold gauge\ngateway_idempotency_filter_cold {}",
                f.memory_bytes(),
                f.keys(),
                f.blocks(),
                f.persisted_lsn(),
                u8::from(f.is_cold(now))
            );
        }
        if let Some(m) = &self.maintenance {
            let _ = writeln!(
                out,
                "# HELP gateway_wal_segments_removed_total WAL segments deleted or archived by retention.\n\
                 # TYPE gateway_wal_segments_removed_total counter\ngateway_wal_segments_removed_total {}\n\
                 # HELP gateway_maintenance_errors_total Failed runs of the fast path's maintenance (filter save, retention).\n\
                 # TYPE gateway_maintenance_errors_total counter\ngateway_maintenance_errors_total {}",
                m.stats.segments_removed.load(Relaxed),
                m.stats.errors.load(Relaxed)
            );
        }
    }

    /// The last error of the maintenance thread (filter persistence, retention), if any.
    pub fn maintenance_error(&self) -> Option<String> {
        self.maintenance
            .as_ref()
            .and_then(|m| m.stats.last_error.lock().clone())
    }

    /// Flushes every queued record, stops the flusher, then persists the key filter.
    pub fn close(&self) {
        self.wal.close();
        if let Some(m) = &self.maintenance {
            m.close();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
        // SAFETY: closing the eventfd created in `open`.
        unsafe {
            libc::close(self.event_fd);
        }
    }
}

/// What the risk engine sees of a validated request.
fn risk_input<'a>(
    merchant: &'a str,
    req: &'a PaymentRequest,
    ip_country: Option<&'a str>,
) -> risk::RiskInput<'a> {
    risk::RiskInput {
        merchant_id: merchant,
        amount: req.amount,
        currency: &req.currency,
        amount_usd: None,
        card: Some(&req.payment_method),
        email: req.customer.email.as_deref(),
        ip: req.customer.ip.as_deref(),
        ip_country,
        device_id: req.customer.device_id.as_deref(),
        customer_id: req.customer.id.as_deref(),
        customer_country: req.customer.country.as_deref(),
    }
}

fn process_epoch() -> &'static Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(dir: &std::path::Path) -> Engine {
        let cfg = Config {
            wal_dir: dir.to_string_lossy().into(),
            ..Config::default()
        };
        Engine::open(cfg).unwrap()
    }

    const BODY: &[u8] = br#"{"amount": 1000, "currency": "USD", "payment_method": "tok_visa"}"#;

    #[test]
    fn blocked_payment_is_declined_durably_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let body = br#"{"amount": 900000, "currency": "USD", "payment_method": "tok_visa"}"#;
        let lsn = {
            let e = engine(dir.path());
            let rules = e
                .risk
                .compile_rules("big: block if :amount_usd: > 5000\n", 7)
                .unwrap();
            e.risk.set_global_rules(rules);
            let out = e.create_payment("m", Some("k"), body, now_ms());
            let Outcome::Pending {
                status: 402,
                body: b,
                lsn,
                ..
            } = out
            else {
                panic!("{out:?}")
            };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["error"]["code"], "card_declined");
            assert_eq!(v["error"]["decline_code"], "fraudulent");
            assert!(e.wait_committed(lsn, Duration::from_secs(5)));
            let ok = e.create_payment("m", None, BODY, now_ms());
            let Outcome::Pending {
                status: 201,
                body: b,
                ..
            } = ok
            else {
                panic!("{ok:?}")
            };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["risk"]["ruleset_version"], 7);
            assert_eq!(v["risk"]["action"], "allow");
            lsn
        };
        let e = engine(dir.path());
        assert!(e.committed_lsn() > lsn);
        match e.create_payment("m", Some("k"), body, now_ms()) {
            Outcome::Immediate {
                status: 402,
                replayed: true,
                body: b,
                ..
            } => {
                assert!(String::from_utf8(b).unwrap().contains("card_declined"))
            }
            other => panic!("{other:?}"),
        }
    }

    fn pending(o: Outcome) -> (u64, Arc<[u8]>) {
        match o {
            Outcome::Pending { lsn, body, .. } => (lsn, body),
            other => panic!("expected pending, got {other:?}"),
        }
    }

    #[test]
    fn keyed_request_replays_after_commit_and_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (lsn, body) = {
            let e = engine(dir.path());
            let (lsn, body) = pending(e.create_payment("m1", Some("k1"), BODY, now_ms()));
            let again = e.create_payment("m1", Some("k1"), BODY, now_ms());
            assert!(
                matches!(again, Outcome::Immediate { status: 409, .. }),
                "in flight until durable"
            );
            assert!(e.wait_committed(lsn, Duration::from_secs(5)));
            match e.create_payment("m1", Some("k1"), BODY, now_ms()) {
                Outcome::Immediate {
                    status: 201,
                    body: b,
                    replayed: true,
                    ..
                } => assert_eq!(&b[..], &body[..]),
                other => panic!("{other:?}"),
            }
            (lsn, body)
        };
        let e = engine(dir.path());
        assert_eq!(e.committed_lsn(), lsn);
        match e.create_payment(
            "m1",
            Some("k1"),
            br#"{"currency":"USD","amount":1000,"payment_method":"tok_visa"}"#,
            now_ms(),
        ) {
            Outcome::Immediate {
                status: 201,
                body: b,
                replayed: true,
                ..
            } => assert_eq!(&b[..], &body[..]),
            other => panic!("{other:?}"),
        }
        let other = br#"{"amount": 1001, "currency": "USD", "payment_method": "tok_visa"}"#;
        assert!(matches!(
            e.create_payment("m1", Some("k1"), other, now_ms()),
            Outcome::Immediate { status: 400, .. }
        ));
    }

    #[test]
    fn rate_limited_key_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            wal_dir: dir.path().to_string_lossy().into(),
            rate_limit_per_s: 0.001,
            rate_limit_burst: 1.0,
            ..Config::default()
        };
        let e = Engine::open(cfg).unwrap();
        pending(e.create_payment("m", None, BODY, now_ms()));
        match e.create_payment("m", Some("k"), BODY, now_ms()) {
            Outcome::Immediate {
                status: 429,
                retry_after_s: Some(s),
                ..
            } => assert!(s >= 1),
            other => panic!("{other:?}"),
        }
        e.set_rate_limit("m", 1000.0, 10.0);
        pending(e.create_payment("m", Some("k"), BODY, now_ms()));
    }

    #[test]
    fn shared_velocity_decides_and_leaves_the_local_store_alone() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let rules = e
            .risk
            .compile_rules("block if :card_count_1h: > 3\n", 2)
            .unwrap();
        e.risk.set_global_rules(rules);
        let event = e.velocity_event("m", BODY).unwrap();
        assert_eq!(event.cents, 1000);
        assert!(event.keys[0]
            .as_deref()
            .is_some_and(|k| !k.contains("visa")));
        assert!(e.velocity_event("m", b"{}").is_none());
        let mut raw = vec![-1i64; risk::VELOCITY_FEATURES];
        raw[2] = 4; // card_count_1h
        let shared = risk::SharedFeatures::from_counters(&raw).unwrap();
        match e.create_payment_with("m", None, BODY, now_ms(), Some(&shared), Durable::Unchecked) {
            Outcome::Pending { status: 402, .. } => {}
            other => panic!("{other:?}"),
        }
        pending(e.create_payment("m", None, BODY, now_ms()));
        assert_eq!(
            e.risk.velocity().keys()[0],
            1,
            "only the local create was counted"
        );
    }

    #[test]
    fn wal_never_holds_card_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let bad = br#"{"amount": 1, "currency": "USD", "payment_method": "tok_visa", "description": "4242424242424242"}"#;
        assert!(matches!(
            e.create_payment("m", None, bad, now_ms()),
            Outcome::Immediate { status: 400, .. }
        ));
        let (lsn, _) = pending(e.create_payment("m", None, BODY, now_ms()));
        assert!(e.wait_committed(lsn, Duration::from_secs(5)));
        e.close();
        for (_, path) in wal::list_segments(dir.path()).unwrap() {
            let data = std::fs::read(path).unwrap();
            assert!(!data.windows(16).any(|w| w == b"4242424242424242"));
        }
    }
}
