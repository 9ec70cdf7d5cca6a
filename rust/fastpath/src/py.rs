//! The thin PyO3 layer: every method converts arguments, releases the GIL and calls pure Rust.

use crate::config::Config;
use crate::engine::{Engine, Outcome};
use crate::idempotency::Durable;
use crate::wal::{self, WalError};
use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::Path;
use std::time::Duration;

create_exception!(
    _fastpath,
    WalCorruptError,
    PyOSError,
    "The WAL holds damage other than a torn tail."
);
create_exception!(
    _fastpath,
    RulesError,
    PyValueError,
    "A ruleset that does not compile; args[1] lists the errors."
);
create_exception!(
    _fastpath,
    RiskListError,
    PyValueError,
    "A list operation that was refused."
);

fn rules_err(py: Python<'_>, e: risk::RulesError) -> PyErr {
    let errors: Vec<(usize, usize, String, String)> = e
        .errors
        .iter()
        .map(|r| {
            let kind = serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            (r.line, r.column, kind, r.message.clone())
        })
        .collect();
    let _ = py;
    RulesError::new_err((e.to_string(), errors))
}

fn list_err(e: risk::ListError) -> PyErr {
    RiskListError::new_err(e.to_string())
}

/// Every Rust error reaches Python through this one mapping.
fn wal_err(e: WalError) -> PyErr {
    match e {
        WalError::Corrupt { .. } => WalCorruptError::new_err(e.to_string()),
        other => PyOSError::new_err(other.to_string()),
    }
}

type SharedEventTuple = (i64, Vec<Option<String>>);

/// What one create call decided: the answer to send and what the caller must wait for before it.
#[pyclass(module = "gateway._fastpath", frozen, get_all)]
struct CreateResult {
    /// HTTP status of the answer.
    status: u16,
    /// The answer's body: the payment object (2xx) or the error object.
    body: Py<PyBytes>,
    /// WAL position of the record this call wrote; 0 when it wrote none. The answer may only be
    /// sent once this position is durable.
    lsn: u64,
    /// The answer is the stored one of an earlier request with the same Idempotency-Key.
    replayed: bool,
    /// Seconds for a `Retry-After` header (429), when set.
    retry_after_s: Option<u32>,
    /// Id of the payment this call accepted or declined (a record was written), else None.
    payment_id: Option<String>,
    /// The memory table missed a key the filter may have seen: call again with `durable=` what the
    /// store holds for it (status is 0 and nothing was decided).
    check_durable: bool,
}

#[pymethods]
impl CreateResult {
    fn __repr__(&self) -> String {
        format!(
            "CreateResult(status={}, lsn={}, replayed={}, payment_id={:?})",
            self.status, self.lsn, self.replayed, self.payment_id
        )
    }
}

#[pyclass(module = "gateway._fastpath", frozen, subclass)]
struct FastPath {
    engine: Engine,
}

#[pymethods]
impl FastPath {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let cfg = Config::from_json(config_json).map_err(PyValueError::new_err)?;
        let engine = py.allow_threads(|| Engine::open(cfg)).map_err(wal_err)?;
        Ok(Self { engine })
    }

    /// Validation, idempotency, rate limit, risk and WAL append in one call (the GIL released); see
    /// `CreateResult`. `velocity`: the counters of the shared store (see `velocity_event`), used
    /// instead of this process's velocity store. `checked=True` after a `check_durable` answer, with
    /// `durable` = (fingerprint hex, status, body, created_ms) of the store's record or None.
    #[pyo3(signature = (merchant_id, idempotency_key, body, now_ms=None, *, velocity=None, checked=false, durable=None))]
    #[allow(clippy::too_many_arguments)]
    fn create_payment<'py>(
        &self,
        py: Python<'py>,
        merchant_id: &str,
        idempotency_key: Option<&str>,
        body: &[u8],
        now_ms: Option<u64>,
        velocity: Option<Vec<i64>>,
        checked: bool,
        durable: Option<(String, u16, Vec<u8>, u64)>,
    ) -> PyResult<CreateResult> {
        let now = now_ms.unwrap_or_else(crate::engine::now_ms);
        let durable = if checked || durable.is_some() {
            Durable::Checked(durable.and_then(|(fp, status, body, created_ms)| {
                Engine::durable_record(&fp, status, &body, created_ms)
            }))
        } else {
            Durable::Unchecked
        };
        let shared = velocity
            .map(|v| risk::SharedFeatures::from_counters(&v))
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let out = py.allow_threads(|| {
            self.engine.create_payment_with(
                merchant_id,
                idempotency_key,
                body,
                now,
                shared.as_ref(),
                durable,
            )
        });
        Ok(match out {
            Outcome::Immediate {
                status,
                body,
                replayed,
                retry_after_s,
            } => CreateResult {
                status,
                body: PyBytes::new(py, &body).unbind(),
                lsn: 0,
                replayed,
                retry_after_s,
                payment_id: None,
                check_durable: false,
            },
            Outcome::CheckDurable => CreateResult {
                status: 0,
                body: PyBytes::new(py, b"").unbind(),
                lsn: 0,
                replayed: false,
                retry_after_s: None,
                payment_id: None,
                check_durable: true,
            },
            Outcome::Pending {
                status,
                body,
                lsn,
                payment_id,
            } => CreateResult {
                status,
                body: PyBytes::new(py, &body).unbind(),
                lsn,
                replayed: false,
                retry_after_s: None,
                payment_id: Some(payment_id),
                check_durable: false,
            },
        })
    }

    /// The request fingerprint that idempotency compares for a create body: the same function the
    /// create call itself uses (32 hex digits), so other processes' checks (cluster mode's shared
    /// admission) agree with it; None for a body the create would refuse as invalid.
    fn request_fingerprint(&self, body: &[u8]) -> Option<String> {
        self.engine.request_fingerprint(body)
    }

    /// (usd_cents, [key hash or None per dimension]) of a create request, deciding and recording
    /// nothing; None for a body the create would refuse.
    fn velocity_event(&self, merchant_id: &str, body: &[u8]) -> Option<SharedEventTuple> {
        self.engine
            .velocity_event(merchant_id, body)
            .map(|e| (e.cents, e.keys.to_vec()))
    }

    fn committed_lsn(&self) -> u64 {
        self.engine.committed_lsn()
    }

    /// An eventfd that becomes readable after every group commit.
    fn notify_fd(&self) -> i32 {
        self.engine.notify_fd()
    }

    fn drain_notify(&self) {
        self.engine.drain_notify()
    }

    fn wait_committed(&self, py: Python<'_>, lsn: u64, timeout_ms: u64) -> bool {
        py.allow_threads(|| {
            self.engine
                .wait_committed(lsn, Duration::from_millis(timeout_ms))
        })
    }

    /// Highest LSN written to the WAL file, fsynced or not (`committed_lsn` <= it).
    fn written_lsn(&self) -> u64 {
        self.engine.written_lsn()
    }

    fn wait_written(&self, py: Python<'_>, lsn: u64, timeout_ms: u64) -> bool {
        py.allow_threads(|| {
            self.engine
                .wait_written(lsn, Duration::from_millis(timeout_ms))
        })
    }

    fn wal_error(&self) -> Option<String> {
        self.engine.wal_error()
    }

    fn set_rate_limit(&self, merchant_id: &str, rate_per_s: f64, burst: f64) -> PyResult<()> {
        if rate_per_s <= 0.0 || burst < 1.0 {
            return Err(PyValueError::new_err(
                "rate_per_s must be > 0 and burst >= 1",
            ));
        }
        self.engine.set_rate_limit(merchant_id, rate_per_s, burst);
        Ok(())
    }

    fn metrics_text(&self) -> String {
        self.engine.metrics_text()
    }

    fn idempotency_entries(&self) -> usize {
        self.engine.idempotency_entries()
    }

    /// Records up to `lsn` are in the store (embedded) or acknowledged by the broker (cluster).
    fn set_materialised_lsn(&self, lsn: u64) {
        self.engine.set_materialised_lsn(lsn)
    }

    /// One maintenance round now: persist the key filter, apply WAL retention.
    fn run_maintenance(&self, py: Python<'_>) {
        py.allow_threads(|| self.engine.run_maintenance())
    }

    fn maintenance_error(&self) -> Option<String> {
        self.engine.maintenance_error()
    }

    /// The key filter could not be rebuilt at start-up (the store answers every miss for one TTL).
    #[getter]
    fn filter_cold(&self) -> bool {
        self.engine.filter_cold
    }

    #[getter]
    fn recovered_records(&self) -> u64 {
        self.engine.recovered_records
    }

    #[getter]
    fn truncated_bytes(&self) -> u64 {
        self.engine.truncated_bytes
    }

    /// The risk engine this fast path decides with (shared, not a copy).
    #[getter]
    fn risk(&self) -> RiskEngine {
        RiskEngine {
            inner: self.engine.risk.clone(),
        }
    }

    /// Replaces the IP-to-country table with the built-in ranges plus `cidr,country` lines.
    fn set_geo_csv(&self, text: &str) -> PyResult<()> {
        let table = crate::geo::GeoTable::from_csv(text).map_err(PyValueError::new_err)?;
        self.engine.set_geo_table(table);
        Ok(())
    }

    fn ip_country(&self, ip: &str) -> Option<String> {
        self.engine.ip_country(ip)
    }

    /// Flushes everything queued to disk and stops the flusher.
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| self.engine.close())
    }
}

/// Lists, velocity, rules and model: the fast path's risk engine, or a standalone one (backtests).
#[pyclass(module = "gateway._fastpath", frozen)]
struct RiskEngine {
    inner: std::sync::Arc<risk::Engine>,
}

#[pymethods]
impl RiskEngine {
    #[new]
    #[pyo3(signature = (keys_per_dimension_max=16_384, shadow_samples_max=100))]
    fn new(keys_per_dimension_max: usize, shadow_samples_max: usize) -> PyResult<Self> {
        if keys_per_dimension_max == 0 || keys_per_dimension_max > 10_000_000 {
            return Err(PyValueError::new_err(
                "keys_per_dimension_max must be 1 to 10000000",
            ));
        }
        let cfg = risk::EngineConfig {
            velocity: risk::VelocityConfig {
                keys_per_dimension_max,
            },
            shadow_samples_max: shadow_samples_max.min(10_000),
        };
        Ok(Self {
            inner: std::sync::Arc::new(risk::Engine::new(cfg)),
        })
    }

    /// Compiles without installing; raises RulesError with every located error.
    fn check_rules(&self, py: Python<'_>, source: &str) -> PyResult<usize> {
        let rs = self
            .inner
            .compile_rules(source, 0)
            .map_err(|e| rules_err(py, e))?;
        Ok(rs.rules.len())
    }

    /// Compiles and atomically installs the global ruleset; a source that does not compile changes nothing.
    fn set_rules(&self, py: Python<'_>, source: &str, version: u64) -> PyResult<()> {
        let rs = self
            .inner
            .compile_rules(source, version)
            .map_err(|e| rules_err(py, e))?;
        self.inner.set_global_rules(rs);
        Ok(())
    }

    #[pyo3(signature = (merchant_id, source, version))]
    fn set_merchant_rules(
        &self,
        py: Python<'_>,
        merchant_id: &str,
        source: Option<&str>,
        version: u64,
    ) -> PyResult<()> {
        let rs = self.compile_optional(py, source, version)?;
        self.inner
            .set_merchant_rules(merchant_id, rs)
            .map_err(PyValueError::new_err)
    }

    /// Installs (or with None removes) the shadow ruleset, evaluated beside the live one without acting.
    #[pyo3(signature = (source, version))]
    fn set_shadow_rules(&self, py: Python<'_>, source: Option<&str>, version: u64) -> PyResult<()> {
        let rs = self.compile_optional(py, source, version)?;
        self.inner.set_shadow_rules(rs);
        Ok(())
    }

    fn rules_version(&self) -> u64 {
        self.inner.global_rules().version
    }

    #[pyo3(signature = (name, kind, entries_max=None))]
    fn create_list(&self, name: &str, kind: &str, entries_max: Option<usize>) -> PyResult<()> {
        let kind = risk::ListKind::parse(kind).map_err(list_err)?;
        self.inner
            .lists()
            .create(name, kind, entries_max)
            .map_err(list_err)?;
        Ok(())
    }

    /// Adds values; returns how many were new. Stops at the first refused value, naming it.
    fn list_add(&self, py: Python<'_>, name: &str, values: Vec<String>) -> PyResult<usize> {
        py.allow_threads(|| count_changed(&values, |v| self.inner.lists().add(name, v)))
            .map_err(list_err)
    }

    /// Removes values; returns how many were present.
    fn list_remove(&self, py: Python<'_>, name: &str, values: Vec<String>) -> PyResult<usize> {
        py.allow_threads(|| count_changed(&values, |v| self.inner.lists().remove(name, v)))
            .map_err(list_err)
    }

    /// JSON array of {name, kind, len, entries_max, ...} for every list.
    fn lists_json(&self) -> String {
        serde_json::to_string(&self.inner.lists().info()).unwrap_or_else(|_| "[]".into())
    }

    /// Loads an XGBoost JSON model; returns its short hash.
    fn load_model(&self, py: Python<'_>, model_json: &[u8]) -> PyResult<String> {
        py.allow_threads(|| self.inner.load_model(model_json))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn model_hash(&self) -> Option<String> {
        self.inner.model().map(|m| m.short_hash().to_string())
    }

    /// A RiskRequest as JSON to a Decision as JSON, recording the payment in the velocity counters.
    fn decide_json(&self, py: Python<'_>, request_json: &str, now_ms: u64) -> PyResult<String> {
        py.allow_threads(|| self.inner.decide_json(request_json, now_ms))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// What decide_json would answer, changing no state.
    fn simulate_json(&self, py: Python<'_>, request_json: &str, now_ms: u64) -> PyResult<String> {
        py.allow_threads(|| {
            let req: risk::RiskRequest = serde_json::from_str(request_json)?;
            serde_json::to_string(&self.inner.simulate(&req.as_input(), now_ms))
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// The velocity event of a RiskRequest (JSON), as `FastPath.velocity_event` gives it.
    fn velocity_event_json(&self, request_json: &str) -> PyResult<SharedEventTuple> {
        let req: risk::RiskRequest =
            serde_json::from_str(request_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let input = req.as_input();
        let ctx = risk::Context::new(&input);
        let e = risk::SharedEvent::from_event(&risk::velocity::Event::from_context(&ctx));
        Ok((e.cents, e.keys.to_vec()))
    }

    /// Records a RiskRequest (JSON) in this engine's velocity store and returns its velocity
    /// features, in `Features` order (NaN: missing).
    fn observe_velocity_json(&self, request_json: &str, now_ms: u64) -> PyResult<Vec<f64>> {
        let req: risk::RiskRequest =
            serde_json::from_str(request_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let input = req.as_input();
        let f = self
            .inner
            .features(&risk::Context::new(&input), now_ms, true);
        Ok(risk::SharedFeatures::from_features(&f).values.to_vec())
    }

    fn shadow_stats_json(&self) -> String {
        serde_json::to_string(&self.inner.shadow_stats()).unwrap_or_else(|_| "{}".into())
    }
}

/// Applies `op` to each value in order, counting the values it changed; stops at the first error.
fn count_changed(
    values: &[String],
    mut op: impl FnMut(&str) -> Result<bool, risk::ListError>,
) -> Result<usize, risk::ListError> {
    let mut changed = 0;
    for v in values {
        if op(v)? {
            changed += 1;
        }
    }
    Ok(changed)
}

impl RiskEngine {
    /// A ruleset compiled against this engine's lists, or None for None (the ruleset is removed).
    fn compile_optional(
        &self,
        py: Python<'_>,
        source: Option<&str>,
        version: u64,
    ) -> PyResult<Option<risk::Ruleset>> {
        source
            .map(|src| {
                self.inner
                    .compile_rules(src, version)
                    .map_err(|e| rules_err(py, e))
            })
            .transpose()
    }
}

#[pyclass(module = "gateway._fastpath", frozen)]
struct WalReader {
    inner: Mutex<wal::WalReader>,
}

#[pymethods]
impl WalReader {
    #[new]
    fn new(wal_dir: &str, after_lsn: u64) -> Self {
        Self {
            inner: Mutex::new(wal::WalReader::new(Path::new(wal_dir), after_lsn)),
        }
    }

    /// Up to `max_records` (lsn, payload) pairs with lsn ≤ committed_lsn.
    fn read<'py>(
        &self,
        py: Python<'py>,
        committed_lsn: u64,
        max_records: usize,
    ) -> PyResult<Vec<(u64, Bound<'py, PyBytes>)>> {
        let records = py
            .allow_threads(|| self.inner.lock().read(committed_lsn, max_records))
            .map_err(wal_err)?;
        Ok(records
            .into_iter()
            .map(|(lsn, p)| (lsn, PyBytes::new(py, &p)))
            .collect())
    }
}

/// True when `text` holds a Luhn-valid 12-19 digit run (the log filter's second line of defence).
#[pyfunction]
fn contains_pan(text: &str) -> bool {
    crate::guard::contains_pan(text)
}

/// True when an idempotency key holds a card-number-like run outside a UUID or long hex token.
#[pyfunction]
fn key_contains_pan(key: &str) -> bool {
    crate::guard::key_contains_pan(key)
}

/// `text` with every card-number-like run replaced by `[REDACTED]` (`text` itself when none).
#[pyfunction]
fn mask_pans(text: &str) -> String {
    crate::guard::mask_pans(text).into_owned()
}

/// Why a JSON body must be refused, or None: `("card_number", None)`, `("duplicate_key", key)`,
/// `("too_deep", None)` or `("invalid", "line L, column C")`. `numbers`: scan numbers too.
#[pyfunction]
#[pyo3(signature = (body, numbers=true))]
fn json_refusal(
    py: Python<'_>,
    body: &[u8],
    numbers: bool,
) -> Option<(&'static str, Option<String>)> {
    use crate::guard::JsonRefusal;
    let out = py.allow_threads(|| crate::guard::scan_json(body, numbers));
    match out {
        Ok(()) => None,
        Err(JsonRefusal::CardNumber) => Some(("card_number", None)),
        Err(JsonRefusal::DuplicateKey(k)) => Some(("duplicate_key", Some(k))),
        Err(JsonRefusal::TooDeep) => Some(("too_deep", None)),
        Err(JsonRefusal::Invalid(e)) => Some((
            "invalid",
            Some(format!("line {}, column {}", e.line(), e.column())),
        )),
    }
}

/// The shared store's counters as velocity features (the mapping `create_payment(velocity=...)` uses).
#[pyfunction]
fn velocity_features(counters: Vec<i64>) -> PyResult<Vec<f64>> {
    risk::SharedFeatures::from_counters(&counters)
        .map(|f| f.values.to_vec())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pyfunction]
fn currency_exponent(code: &str) -> Option<u8> {
    crate::currency::exponent(code)
}

/// Reads a WAL folder without changing it, even beside a running gateway: (records, next_lsn).
#[pyfunction]
fn wal_scan(py: Python<'_>, wal_dir: &str) -> PyResult<(u64, u64)> {
    let r = py
        .allow_threads(|| wal::scan_read_only(Path::new(wal_dir), |_, _| {}))
        .map_err(wal_err)?;
    Ok((r.records, r.next_lsn))
}

#[pymodule]
fn _fastpath(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<FastPath>()?;
    m.add_class::<CreateResult>()?;
    m.add_class::<WalReader>()?;
    m.add_class::<RiskEngine>()?;
    m.add("RulesError", m.py().get_type::<RulesError>())?;
    m.add("RiskListError", m.py().get_type::<RiskListError>())?;
    m.add_function(wrap_pyfunction!(contains_pan, m)?)?;
    m.add_function(wrap_pyfunction!(mask_pans, m)?)?;
    m.add_function(wrap_pyfunction!(key_contains_pan, m)?)?;
    m.add_function(wrap_pyfunction!(json_refusal, m)?)?;
    m.add("JSON_DEPTH_MAX", crate::guard::JSON_DEPTH_MAX)?;
    m.add_function(wrap_pyfunction!(currency_exponent, m)?)?;
    m.add_function(wrap_pyfunction!(velocity_features, m)?)?;
    m.add("VELOCITY_FEATURES", risk::VELOCITY_FEATURES)?;
    m.add_function(wrap_pyfunction!(wal_scan, m)?)?;
    m.add("WalCorruptError", m.py().get_type::<WalCorruptError>())?;
    m.add("STAGES", crate::engine::STAGES.to_vec())?;
    Ok(())
}
