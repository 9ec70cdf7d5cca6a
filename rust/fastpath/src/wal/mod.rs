//! The write-ahead log: the fast path's durability promise.
//!
//! A record on disk is `[len u32 LE][crc32 u32 LE][lsn u64 LE][payload]`, where the CRC covers the LSN
//! and the payload. Records live in segment files named by the LSN of their first record
//! (`00000000000000000001.wal`), each starting with an 8-byte magic. LSNs start at 1 and have no gaps.
//! Recovery replays every complete record (or only those after a checkpoint: earlier segments are
//! not read) and truncates a torn tail of the last segment; damage anywhere else is refused, because
//! silently dropping acknowledged records would break the promise. Retention (`retention.rs`)
//! removes the oldest segments once nothing needs them, so the first segment may start after LSN 1.

mod reader;
mod recovery;
mod retention;
mod writer;

pub use reader::WalReader;
pub use recovery::{recover, recover_after, scan_read_only, Recovered};
pub use retention::{apply_retention, RetentionConfig};
pub use writer::{AppendError, CommitListener, CommittedLsn, WalStats, WalWriter, WriterConfig};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const SEGMENT_MAGIC: &[u8; 8] = b"GWWAL001";
pub const HEADER_BYTES: usize = 16;
/// A single record may not exceed this; the fast path's body limit keeps records far below it.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

#[derive(Debug)]
pub enum WalError {
    Io(io::Error),
    /// Damage that is not a torn tail: a bad record followed by more data, or in a sealed segment.
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    RecordTooLarge(usize),
    Closed,
}

impl std::fmt::Display for WalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalError::Io(e) => write!(f, "WAL I/O error: {e}"),
            WalError::Corrupt {
                segment,
                offset,
                reason,
            } => {
                write!(
                    f,
                    "WAL segment {} is corrupt at byte {offset}: {reason}",
                    segment.display()
                )
            }
            WalError::RecordTooLarge(n) => {
                write!(f, "WAL record of {n} bytes exceeds {RECORD_BYTES_MAX}")
            }
            WalError::Closed => write!(f, "WAL is closed"),
        }
    }
}

impl std::error::Error for WalError {}

impl From<io::Error> for WalError {
    fn from(e: io::Error) -> Self {
        WalError::Io(e)
    }
}

pub fn encode_record(lsn: u64, payload: &[u8], out: &mut Vec<u8>) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

/// Segment files of `dir` as (first LSN, path), in LSN order.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".wal") {
            if let Ok(lsn) = stem.parse::<u64>() {
                out.push((lsn, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Outcome of decoding one record at the front of `buf`.
pub enum Decoded<'a> {
    Record {
        lsn: u64,
        payload: &'a [u8],
        len: usize,
    },
    /// Not enough bytes for a whole record: a torn tail if nothing follows.
    Incomplete,
    Bad(String),
}

pub fn decode_record(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_BYTES {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if len > RECORD_BYTES_MAX {
        return Decoded::Bad(format!("record length {len} exceeds the limit"));
    }
    if buf.len() < HEADER_BYTES + len {
        return Decoded::Incomplete;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let lsn = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let payload = &buf[HEADER_BYTES..HEADER_BYTES + len];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[8..16]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Decoded::Bad("checksum mismatch".into());
    }
    Decoded::Record {
        lsn,
        payload,
        len: HEADER_BYTES + len,
    }
}

#[cfg(test)]
mod tests;
