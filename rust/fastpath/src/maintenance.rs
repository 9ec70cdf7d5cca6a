//! The fast path's maintenance thread: persists the idempotency key filter, drops its expired
//! blocks and applies WAL retention, every `maintenance_interval_ms`, off the request path.
//!
//! Order matters for crash safety: the filter is persisted (with the committed LSN read before its
//! bits are copied) before retention runs, and retention removes only segments whose records are at
//! or below both the store's checkpoint and the filter's persisted LSN, so recovery never needs a
//! removed segment.

use crate::idempotency::IdempotencyTable;
use crate::wal::{apply_retention, CommittedLsn, RetentionConfig};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

#[derive(Default)]
pub struct MaintenanceStats {
    pub segments_removed: AtomicU64,
    pub filter_persists: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

pub struct Maintenance {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub stats: Arc<MaintenanceStats>,
    task: Arc<Task>,
}

struct Task {
    table: Arc<IdempotencyTable>,
    committed: CommittedLsn,
    retention: Option<RetentionConfig>,
    stats: Arc<MaintenanceStats>,
}

impl Task {
    fn run_once(&self) {
        if let Err(e) = self.step() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            *self.stats.last_error.lock() = Some(e.to_string());
        }
    }

    fn step(&self) -> std::io::Result<()> {
        let now_ms = crate::engine::now_ms();
        let mut safe_lsn = self.table.materialised_lsn();
        if let Some(f) = self.table.filter() {
            f.expire(now_ms);
            let covered = self.committed.get();
            if covered > f.persisted_lsn() {
                f.persist(covered)?;
                self.stats.filter_persists.fetch_add(1, Ordering::Relaxed);
            }
            safe_lsn = safe_lsn.min(f.persisted_lsn());
        }
        if let Some(r) = &self.retention {
            let n = apply_retention(r, safe_lsn, SystemTime::now())?;
            self.stats
                .segments_removed
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Maintenance {
    /// Starts the thread; None when there is nothing to maintain (no filter, no retention).
    pub fn start(
        table: Arc<IdempotencyTable>,
        committed: CommittedLsn,
        retention: Option<RetentionConfig>,
        interval: Duration,
    ) -> std::io::Result<Option<Self>> {
        if table.filter().is_none() && retention.is_none() {
            return Ok(None);
        }
        let stats = Arc::new(MaintenanceStats::default());
        let task = Arc::new(Task {
            table,
            committed,
            retention,
            stats: stats.clone(),
        });
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (t, s) = (task.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fastpath-maintenance".into())
            .spawn(move || loop {
                {
                    let mut stopped = s.0.lock();
                    if !*stopped {
                        s.1.wait_for(&mut stopped, interval);
                    }
                    if *stopped {
                        return;
                    }
                }
                t.run_once();
            })?;
        Ok(Some(Self {
            stop,
            thread: Mutex::new(Some(thread)),
            stats,
            task,
        }))
    }

    /// Runs one round now, on the caller's thread (tests, and a last persist at close).
    pub fn run_once(&self) {
        self.task.run_once();
    }

    /// Stops the thread, then persists the filter one last time (the WAL is flushed by then).
    pub fn close(&self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
            self.task.run_once();
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.close();
    }
}
