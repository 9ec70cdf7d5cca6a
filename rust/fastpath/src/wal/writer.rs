//! Group commit: appends go to an in-memory batch; one flusher thread writes and fsyncs batches.
//!
//! A batch is flushed when `batch_records_max` records wait or `fsync_interval_us` has passed since
//! its first record, whichever comes first. Records keep arriving while an fsync runs, so under load
//! batches grow by themselves and the fsync cost is shared.
//!
//! With `fsync_behind` (cluster durability "replicated") the fsync moves to a second thread: the
//! flusher only writes batches (to the page cache) and publishes `written_lsn()`, which the relay
//! reads up to, while the syncer fdatasyncs whatever is written and publishes `committed_lsn()`. A
//! stalled disk then holds back the committed LSN, never the written one. A process crash loses
//! nothing written (the kernel holds it); only a power loss can, and the brokers hold those records.

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
    /// fsync on its own thread behind the writes (see the module comment).
    pub fsync_behind: bool,
    /// Fault injection for tests and benchmarks: sleep this long before an fdatasync
    /// (`GATEWAY_FAULT_WAL_FSYNC_DELAY_MS`, read by the engine); zero in production.
    pub fsync_fault_delay: Duration,
    /// With a delay: at most one delayed fdatasync per this period (a disk that stalls now and
    /// then, `GATEWAY_FAULT_WAL_FSYNC_EVERY_MS`); zero: every fdatasync is delayed.
    pub fsync_fault_every: Duration,
}

/// The injected stall of the next fdatasync, if one is due (see `WriterConfig::fsync_fault_delay`).
fn fault_stall(cfg: &WriterConfig, last: &mut Option<Instant>) {
    if cfg.fsync_fault_delay.is_zero() {
        return;
    }
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < cfg.fsync_fault_every) {
        return;
    }
    *last = Some(now);
    std::thread::sleep(cfg.fsync_fault_delay);
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
    /// The flusher (and the syncer, with `fsync_behind`) has exited: nothing more becomes durable.
    done: bool,
    error: Option<String>,
    /// `fsync_behind`: segments written since the last fsync that were sealed (need `sync_all`),
    /// the segment being written, and whether a new segment's folder entry needs an fsync.
    sealed: Vec<Arc<File>>,
    current: Option<Arc<File>>,
    dir_dirty: bool,
    flusher_exited: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    committed_cv: Condvar,
    committed: AtomicU64,
    /// Highest LSN written to the segment file (maybe not yet fsynced); >= `committed`.
    written: AtomicU64,
    sync_cv: Condvar,
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
    file: Arc<File>,
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
                Segment {
                    file: Arc::new(file),
                    bytes,
                }
            }
            None => create_segment(&cfg.dir, next_lsn, true)?,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::with_capacity(1 << 20),
                pending_records: 0,
                first_pending_at: None,
                next_lsn,
                closed: false,
                done: false,
                error: None,
                sealed: Vec::new(),
                current: None,
                dir_dirty: false,
                flusher_exited: false,
            }),
            work: Condvar::new(),
            committed_cv: Condvar::new(),
            committed: AtomicU64::new(next_lsn - 1),
            written: AtomicU64::new(next_lsn - 1),
            sync_cv: Condvar::new(),
            cfg,
            stats: WalStats {
                fsync_ns: Histogram::latency(),
                batch_records: Histogram::new(&BATCH_BOUNDS),
                bytes_written: AtomicU64::new(0),
            },
            listener: Mutex::new(None),
        });
        let s = shared.clone();
        let syncer = if shared.cfg.fsync_behind {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("wal-syncer".into())
                    .spawn(move || syncer(s))?,
            )
        } else {
            None
        };
        let thread = std::thread::Builder::new()
            .name("wal-flusher".into())
            .spawn(move || {
                flusher(s.clone(), segment);
                if let Some(t) = syncer {
                    {
                        let mut st = s.state.lock();
                        st.flusher_exited = true;
                        s.sync_cv.notify_one();
                    }
                    let _ = t.join();
                }
                let mut st = s.state.lock();
                st.done = true;
                s.committed_cv.notify_all();
            })?;
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
        let cfg = &self.shared.cfg;
        // With the fsync behind, records written but not yet fsynced count against the same bound:
        // a disk that stalls for long fills it and the fast path answers 503, instead of the page
        // cache holding an unbounded backlog.
        let unsynced = st.next_lsn - 1 - self.shared.committed.load(Ordering::Acquire);
        if st.pending_records >= cfg.pending_records_max
            || (cfg.fsync_behind && unsynced >= cfg.pending_records_max as u64)
        {
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

    /// Highest LSN written to the segment file: readable by a `WalReader`, durable once committed.
    pub fn written_lsn(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Blocks until `lsn` is written (not necessarily fsynced) or the timeout passes.
    pub fn wait_written(&self, lsn: u64, timeout: Duration) -> bool {
        self.wait_for(&self.shared.written, lsn, timeout)
    }

    pub fn committed_handle(&self) -> CommittedLsn {
        CommittedLsn(self.shared.clone())
    }

    pub fn error(&self) -> Option<String> {
        self.shared.state.lock().error.clone()
    }

    /// Blocks until `lsn` is durable or the timeout passes; false on timeout or WAL failure.
    pub fn wait_committed(&self, lsn: u64, timeout: Duration) -> bool {
        self.wait_for(&self.shared.committed, lsn, timeout)
    }

    /// Blocks until `mark` (the written or the committed LSN, both signalled on `committed_cv`)
    /// reaches `lsn`, the WAL fails or stops, or the timeout passes.
    fn wait_for(&self, mark: &AtomicU64, lsn: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        loop {
            if mark.load(Ordering::Acquire) >= lsn {
                return true;
            }
            if st.error.is_some() || st.done {
                return false;
            }
            if self
                .shared
                .committed_cv
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                return mark.load(Ordering::Acquire) >= lsn;
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

/// A new segment file with its magic; `sync`: fsynced with its folder entry now (otherwise the
/// syncer does it before it publishes any record of the segment).
fn create_segment(dir: &std::path::Path, first_lsn: u64, sync: bool) -> Result<Segment, WalError> {
    let path = dir.join(segment_name(first_lsn));
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    file.write_all(SEGMENT_MAGIC)?;
    if sync {
        file.sync_all()?;
        fsync_dir(dir)?;
    }
    Ok(Segment {
        file: Arc::new(file),
        bytes: SEGMENT_MAGIC.len() as u64,
    })
}

fn flusher(shared: Arc<Shared>, mut segment: Segment) {
    let interval = Duration::from_micros(shared.cfg.fsync_interval_us);
    let mut spare: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut last_stall = None;
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
        if shared.cfg.fsync_behind {
            let result = write_behind(&shared, &mut segment, &batch, first_lsn);
            spare = batch;
            match result {
                Ok(()) => {
                    shared.stats.batch_records.observe(records as u64);
                    shared
                        .stats
                        .bytes_written
                        .fetch_add(spare.len() as u64, Ordering::Relaxed);
                    let mut st = shared.state.lock();
                    st.current = Some(segment.file.clone());
                    shared.written.store(last_lsn, Ordering::Release);
                    shared.sync_cv.notify_one();
                    shared.committed_cv.notify_all();
                }
                Err(e) => {
                    fail(&shared, e.to_string());
                    return;
                }
            }
            continue;
        }
        let result = write_batch(
            &shared.cfg,
            &mut segment,
            &batch,
            first_lsn,
            &mut last_stall,
        );
        spare = batch;
        match result {
            Ok(fsync_ns) => {
                shared.stats.fsync_ns.observe(fsync_ns);
                shared.stats.batch_records.observe(records as u64);
                shared
                    .stats
                    .bytes_written
                    .fetch_add(spare.len() as u64, Ordering::Relaxed);
                shared.written.store(last_lsn, Ordering::Release);
                publish(&shared, last_lsn);
            }
            Err(e) => {
                fail(&shared, e.to_string());
                return;
            }
        }
    }
    let _ = segment.file.sync_all();
}

/// Makes `committed_lsn` = `last_lsn` visible: the listener first records what it must, then the
/// waiters and the event loop are told.
fn publish(shared: &Shared, last_lsn: u64) {
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

/// An I/O error stops the WAL: nothing more is accepted, and waiters are told.
fn fail(shared: &Shared, error: String) {
    let mut st = shared.state.lock();
    if st.error.is_none() {
        st.error = Some(error);
    }
    shared.committed_cv.notify_all();
    shared.sync_cv.notify_one();
    shared.work.notify_one();
    drop(st);
    if let Some(l) = shared.listener.lock().clone() {
        l.after_publish(shared.committed.load(Ordering::Acquire));
    }
}

/// `fsync_behind`: writes one batch without fsyncing it; a full segment is handed to the syncer.
fn write_behind(
    shared: &Shared,
    segment: &mut Segment,
    batch: &[u8],
    first_lsn: u64,
) -> Result<(), WalError> {
    if segment.bytes >= shared.cfg.segment_bytes_max {
        let next = create_segment(&shared.cfg.dir, first_lsn, false)?;
        let sealed = std::mem::replace(segment, next);
        let mut st = shared.state.lock();
        st.sealed.push(sealed.file);
        st.dir_dirty = true;
    }
    (&*segment.file).write_all(batch)?;
    segment.bytes += batch.len() as u64;
    Ok(())
}

/// `fsync_behind`: fdatasyncs whatever the flusher has written and publishes it as committed, one
/// fsync after the other, until the flusher has exited and everything it wrote is durable.
fn syncer(shared: Arc<Shared>) {
    let mut last_stall = None;
    loop {
        let (target, sealed, current, dir_dirty) = {
            let mut st = shared.state.lock();
            loop {
                if st.error.is_some() {
                    return;
                }
                let written = shared.written.load(Ordering::Acquire);
                if written > shared.committed.load(Ordering::Acquire) {
                    break;
                }
                if st.flusher_exited {
                    return;
                }
                shared.sync_cv.wait(&mut st);
            }
            let dir_dirty = std::mem::take(&mut st.dir_dirty);
            (
                shared.written.load(Ordering::Acquire),
                std::mem::take(&mut st.sealed),
                st.current.clone(),
                dir_dirty,
            )
        };
        let result = (|| -> Result<u64, WalError> {
            fault_stall(&shared.cfg, &mut last_stall);
            let start = Instant::now();
            for f in &sealed {
                f.sync_all()?;
            }
            if let Some(f) = &current {
                f.sync_data()?;
            }
            if dir_dirty {
                fsync_dir(&shared.cfg.dir)?;
            }
            Ok(start.elapsed().as_nanos() as u64)
        })();
        match result {
            Ok(fsync_ns) => {
                shared.stats.fsync_ns.observe(fsync_ns);
                publish(&shared, target);
            }
            Err(e) => {
                fail(&shared, e.to_string());
                return;
            }
        }
    }
}

fn write_batch(
    cfg: &WriterConfig,
    segment: &mut Segment,
    batch: &[u8],
    first_lsn: u64,
    last_stall: &mut Option<Instant>,
) -> Result<u64, WalError> {
    if segment.bytes >= cfg.segment_bytes_max {
        segment.file.sync_all()?;
        *segment = create_segment(&cfg.dir, first_lsn, true)?;
    }
    (&*segment.file).write_all(batch)?;
    segment.bytes += batch.len() as u64;
    fault_stall(cfg, last_stall);
    let start = Instant::now();
    segment.file.sync_data()?;
    Ok(start.elapsed().as_nanos() as u64)
}
