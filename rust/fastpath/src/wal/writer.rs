//! Group commit: appends go to an in-memory batch; one flusher thread writes and fsyncs batches.
//!
//! A batch is flushed when `batch_records_max` records wait or `fsync_interval_us` has passed since
//! its first record, whichever comes first. Records keep arriving while an fsync runs, so under load
//! batches grow by themselves and the fsync cost is shared.

use super::{encode_record, fsync_dir, segment_name, WalError, RECORD_BYTES_MAX, SEGMENT_MAGIC};
use crate::metrics::{Histogram, BATCH_BOUNDS};
use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dir: PathBuf,
    pub fsync_interval_us: u64,
    pub batch_records_max: usize,
    pub segment_bytes_max: u64,
    pub pending_records_max: usize,
}

/// Told of every commit, on the flusher thread, after the batch is on disk.
pub trait CommitListener: Send + Sync {
    /// Runs before `committed_lsn()` moves, so whatever it records is visible to anyone who sees
    /// the new LSN.
    fn before_publish(&self, committed_lsn: u64);
    /// Runs after `committed_lsn()` moved (and after a failure, with the unchanged LSN).
    fn after_publish(&self, committed_lsn: u64);
}

pub struct WalStats {
    pub fsync_ns: Histogram,
    pub batch_records: Histogram,
    pub bytes_written: AtomicU64,
}

struct State {
    buf: Vec<u8>,
    pending_records: usize,
    first_pending_at: Option<Instant>,
    next_lsn: u64,
    closed: bool,
    error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    committed_cv: Condvar,
    committed: AtomicU64,
    cfg: WriterConfig,
    stats: WalStats,
    listener: Mutex<Option<Arc<dyn CommitListener>>>,
}

/// A handle that reads the committed LSN from another thread (the maintenance thread).
#[derive(Clone)]
pub struct CommittedLsn(Arc<Shared>);

impl CommittedLsn {
    pub fn get(&self) -> u64 {
        self.0.committed.load(Ordering::Acquire)
    }
}

pub struct WalWriter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Segment {
    file: File,
    bytes: u64,
}

impl WalWriter {
    /// Opens for appending after recovery said where to resume.
    pub fn open(
        cfg: WriterConfig,
        next_lsn: u64,
        tail: Option<(u64, PathBuf)>,
    ) -> Result<Self, WalError> {
        let segment = match tail {
            Some((_, path)) => {
                let file = OpenOptions::new().append(true).open(&path)?;
                let bytes = file.metadata()?.len();
                Segment { file, bytes }
            }
            None => create_segment(&cfg.dir, next_lsn)?,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::with_capacity(1 << 20),
                pending_records: 0,
                first_pending_at: None,
                next_lsn,
                closed: false,
                error: None,
            }),
            work: Condvar::new(),
            committed_cv: Condvar::new(),
            committed: AtomicU64::new(next_lsn - 1),
            cfg,
            stats: WalStats {
                fsync_ns: Histogram::latency(),
                batch_records: Histogram::new(&BATCH_BOUNDS),
                bytes_written: AtomicU64::new(0),
            },
            listener: Mutex::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wal-flusher".into())
            .spawn(move || flusher(s, segment))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn set_listener(&self, listener: Arc<dyn CommitListener>) {
        *self.shared.listener.lock() = Some(listener);
    }

    /// Queues a record and returns its LSN; durable once `committed_lsn() >= lsn`.
    pub fn append(&self, payload: &[u8]) -> Result<u64, AppendError> {
        if payload.len() > RECORD_BYTES_MAX {
            return Err(AppendError::Wal(WalError::RecordTooLarge(payload.len())));
        }
        let mut st = self.shared.state.lock();
        if let Some(e) = &st.error {
            return Err(AppendError::Failed(e.clone()));
        }
        if st.closed {
            return Err(AppendError::Wal(WalError::Closed));
        }
        if st.pending_records >= self.shared.cfg.pending_records_max {
            return Err(AppendError::Full);
        }
        let lsn = st.next_lsn;
        st.next_lsn += 1;
        encode_record(lsn, payload, &mut st.buf);
        st.pending_records += 1;
        if st.pending_records == 1 {
            st.first_pending_at = Some(Instant::now());
            self.shared.work.notify_one();
        } else if st.pending_records >= self.shared.cfg.batch_records_max {
            self.shared.work.notify_one();
        }
        Ok(lsn)
    }

    pub fn committed_lsn(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    pub fn committed_handle(&self) -> CommittedLsn {
        CommittedLsn(self.shared.clone())
    }

    pub fn error(&self) -> Option<String> {
        self.shared.state.lock().error.clone()
    }

    /// Blocks until `lsn` is durable or the timeout passes; false on timeout or WAL failure.
    pub fn wait_committed(&self, lsn: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        loop {
            if self.committed_lsn() >= lsn {
                return true;
            }
            if st.error.is_some() || (st.closed && st.pending_records == 0) {
                return false;
            }
            if self
                .shared
                .committed_cv
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                return self.committed_lsn() >= lsn;
            }
        }
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Flushes everything queued and stops the flusher. Appends after this fail.
    pub fn close(&self) {
        {
            let mut st = self.shared.state.lock();
            st.closed = true;
            self.shared.work.notify_one();
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug)]
pub enum AppendError {
    /// Too many records wait for the disk: back-pressure, retry later.
    Full,
    /// The flusher hit an I/O error; nothing more is accepted.
    Failed(String),
    Wal(WalError),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full => write!(f, "WAL queue is full"),
            AppendError::Failed(e) => write!(f, "WAL failed: {e}"),
            AppendError::Wal(e) => write!(f, "{e}"),
        }
    }
}

fn create_segment(dir: &std::path::Path, first_lsn: u64) -> Result<Segment, WalError> {
    let path = dir.join(segment_name(first_lsn));
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    file.write_all(SEGMENT_MAGIC)?;
    file.sync_all()?;
    fsync_dir(dir)?;
    Ok(Segment {
        file,
        bytes: SEGMENT_MAGIC.len() as u64,
    })
}

fn flusher(shared: Arc<Shared>, mut segment: Segment) {
    let interval = Duration::from_micros(shared.cfg.fsync_interval_us);
    let mut spare: Vec<u8> = Vec::with_capacity(1 << 20);
    loop {
        let (batch, records, last_lsn) = {
            let mut st = shared.state.lock();
            while st.pending_records == 0 && !st.closed {
                shared.work.wait(&mut st);
            }
            if st.pending_records == 0 {
                break;
            }
            if !st.closed {
                let deadline = st.first_pending_at.unwrap_or_else(Instant::now) + interval;
                while st.pending_records < shared.cfg.batch_records_max && !st.closed {
                    if shared.work.wait_until(&mut st, deadline).timed_out() {
                        break;
                    }
                }
            }
            spare.clear();
            let batch = std::mem::replace(&mut st.buf, std::mem::take(&mut spare));
            let records = st.pending_records;
            st.pending_records = 0;
            st.first_pending_at = None;
            (batch, records, st.next_lsn - 1)
        };
        let first_lsn = last_lsn + 1 - records as u64;
        let result = write_batch(&shared.cfg, &mut segment, &batch, first_lsn);
        spare = batch;
        match result {
            Ok(fsync_ns) => {
                shared.stats.fsync_ns.observe(fsync_ns);
                shared.stats.batch_records.observe(records as u64);
                shared
                    .stats
                    .bytes_written
                    .fetch_add(spare.len() as u64, Ordering::Relaxed);
                let listener = shared.listener.lock().clone();
                if let Some(l) = &listener {
                    l.before_publish(last_lsn);
                }
                {
                    let _st = shared.state.lock();
                    shared.committed.store(last_lsn, Ordering::Release);
                    shared.committed_cv.notify_all();
                }
                if let Some(l) = &listener {
                    l.after_publish(last_lsn);
                }
            }
            Err(e) => {
                let mut st = shared.state.lock();
                st.error = Some(e.to_string());
                shared.committed_cv.notify_all();
                drop(st);
                if let Some(l) = shared.listener.lock().clone() {
                    l.after_publish(shared.committed.load(Ordering::Acquire));
                }
                return;
            }
        }
    }
    let _ = segment.file.sync_all();
}

fn write_batch(
    cfg: &WriterConfig,
    segment: &mut Segment,
    batch: &[u8],
    first_lsn: u64,
) -> Result<u64, WalError> {
    if segment.bytes >= cfg.segment_bytes_max {
        segment.file.sync_all()?;
        *segment = create_segment(&cfg.dir, first_lsn)?;
    }
    segment.file.write_all(batch)?;
    segment.bytes += batch.len() as u64;
    let start = Instant::now();
    segment.file.sync_data()?;
    Ok(start.elapsed().as_nanos() as u64)
}
