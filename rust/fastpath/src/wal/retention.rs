//! WAL retention: the oldest sealed segments go once nothing needs them.
//!
//! A segment may go when every record in it is at or below the `safe_lsn` the caller gives (embedded:
//! materialised in the store and covered by the persisted idempotency filter; cluster: acknowledged by
//! the broker) and its last write is older than the retention. Segments go oldest first, one at a
//! time, and the folder is fsynced after each, so a crash at any point leaves a contiguous run of
//! segments that starts above every record recovery still needs (recovery accepts a WAL whose first
//! segment starts after LSN 1). The tail segment (the one appends go to) never goes.

use super::{fsync_dir, list_segments};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub dir: PathBuf,
    pub retention: Duration,
    /// Segments are moved here instead of deleted, when set.
    pub archive_dir: Option<PathBuf>,
}

/// Removes (or archives) what the retention allows; returns how many segments went.
pub fn apply_retention(cfg: &RetentionConfig, safe_lsn: u64, now: SystemTime) -> io::Result<usize> {
    let segments = list_segments(&cfg.dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
        let last_lsn = next_first.saturating_sub(1);
        if last_lsn > safe_lsn {
            break;
        }
        let modified = fs::metadata(path)?.modified()?;
        if now.duration_since(modified).unwrap_or_default() < cfg.retention {
            break;
        }
        match &cfg.archive_dir {
            Some(archive) => archive_segment(path, archive)?,
            None => fs::remove_file(path)?,
        }
        fsync_dir(&cfg.dir)?;
        removed += 1;
    }
    Ok(removed)
}

fn archive_segment(path: &Path, archive: &Path) -> io::Result<()> {
    fs::create_dir_all(archive)?;
    let target = archive.join(path.file_name().expect("segment has a name"));
    if fs::rename(path, &target).is_err() {
        // Another file system: copy, make the copy durable, then remove the original.
        let tmp = target.with_extension("tmp");
        fs::copy(path, &tmp)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &target)?;
        fsync_dir(archive)?;
        fs::remove_file(path)?;
        return Ok(());
    }
    fsync_dir(archive)
}
