//! The thin PyO3 layer: every method converts arguments, releases the GIL and calls pure Rust.

use crate::config::Config;
use crate::engine::{Engine, Outcome};
use crate::wal::{self, WalError};
use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::Path;
use std::time::Duration;

create_exception!(_fastpath, WalCorruptError, PyOSError, "The WAL holds damage other than a torn tail.");

/// Every Rust error reaches Python through this one mapping.
fn wal_err(e: WalError) -> PyErr {
    match e {
        WalError::Corrupt { .. } => WalCorruptError::new_err(e.to_string()),
        other => PyOSError::new_err(other.to_string()),
    }
}

type Response<'py> = (u16, Bound<'py, PyBytes>, u64, bool, Option<u32>, Option<String>);

#[pyclass(module = "gateway._fastpath", frozen)]
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

    /// Returns (status, body, lsn, replayed, retry_after_s, payment_id); lsn > 0 means "answer once
    /// committed", and payment_id is set for a payment accepted by this call.
    #[pyo3(signature = (merchant_id, idempotency_key, body, now_ms=None))]
    fn create_payment<'py>(
        &self,
        py: Python<'py>,
        merchant_id: &str,
        idempotency_key: Option<&str>,
        body: &[u8],
        now_ms: Option<u64>,
    ) -> Response<'py> {
        let now = now_ms.unwrap_or_else(crate::engine::now_ms);
        let out = py.allow_threads(|| self.engine.create_payment(merchant_id, idempotency_key, body, now));
        match out {
            Outcome::Immediate { status, body, replayed, retry_after_s } => {
                (status, PyBytes::new(py, &body), 0, replayed, retry_after_s, None)
            }
            Outcome::Pending { status, body, lsn, payment_id } => {
                (status, PyBytes::new(py, &body), lsn, false, None, Some(payment_id))
            }
        }
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
        py.allow_threads(|| self.engine.wait_committed(lsn, Duration::from_millis(timeout_ms)))
    }

    fn wal_error(&self) -> Option<String> {
        self.engine.wal_error()
    }

    fn set_rate_limit(&self, merchant_id: &str, rate_per_s: f64, burst: f64) -> PyResult<()> {
        if rate_per_s <= 0.0 || burst < 1.0 {
            return Err(PyValueError::new_err("rate_per_s must be > 0 and burst >= 1"));
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

    #[getter]
    fn recovered_records(&self) -> u64 {
        self.engine.recovered_records
    }

    #[getter]
    fn truncated_bytes(&self) -> u64 {
        self.engine.truncated_bytes
    }

    /// Flushes everything queued to disk and stops the flusher.
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| self.engine.close())
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
        Self { inner: Mutex::new(wal::WalReader::new(Path::new(wal_dir), after_lsn)) }
    }

    /// Up to `max_records` (lsn, payload) pairs with lsn ≤ committed_lsn.
    fn read<'py>(&self, py: Python<'py>, committed_lsn: u64, max_records: usize) -> PyResult<Vec<(u64, Bound<'py, PyBytes>)>> {
        let records = py.allow_threads(|| self.inner.lock().read(committed_lsn, max_records)).map_err(wal_err)?;
        Ok(records.into_iter().map(|(lsn, p)| (lsn, PyBytes::new(py, &p))).collect())
    }
}

/// True when `text` holds a Luhn-valid 12-19 digit run (the log filter's second line of defence).
#[pyfunction]
fn contains_pan(text: &str) -> bool {
    crate::validate::contains_pan(text)
}

#[pyfunction]
fn currency_exponent(code: &str) -> Option<u8> {
    crate::currency::exponent(code)
}

/// Recovers a WAL folder (truncating a torn tail, as start-up would) and returns (records, next_lsn).
#[pyfunction]
fn wal_scan(py: Python<'_>, wal_dir: &str) -> PyResult<(u64, u64)> {
    let r = py.allow_threads(|| wal::recover(Path::new(wal_dir), |_, _| {})).map_err(wal_err)?;
    Ok((r.records, r.next_lsn))
}

#[pymodule]
fn _fastpath(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<FastPath>()?;
    m.add_class::<WalReader>()?;
    m.add_function(wrap_pyfunction!(contains_pan, m)?)?;
    m.add_function(wrap_pyfunction!(currency_exponent, m)?)?;
    m.add_function(wrap_pyfunction!(wal_scan, m)?)?;
    m.add("WalCorruptError", m.py().get_type::<WalCorruptError>())?;
    m.add("STAGES", crate::engine::STAGES.to_vec())?;
    Ok(())
}
