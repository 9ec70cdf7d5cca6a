//! Start-up recovery: validate every segment, truncate a torn tail, report where appends resume.

use super::{decode_record, fsync_dir, list_segments, Decoded, WalError, SEGMENT_MAGIC};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Recovered {
    /// LSN the next appended record gets.
    pub next_lsn: u64,
    /// Segment appends continue in (None when the folder holds no segment yet).
    pub tail_segment: Option<(u64, PathBuf)>,
    /// Bytes cut from the tail of the last segment.
    pub truncated_bytes: u64,
    /// Records visited.
    pub records: u64,
    /// LSN of the first record the WAL still holds (retention removes the oldest segments).
    pub first_lsn: u64,
}

/// Scans all segments of `dir` (created if missing), calling `visit(lsn, payload)` for every complete
/// record in order.
pub fn recover(dir: &Path, visit: impl FnMut(u64, &[u8])) -> Result<Recovered, WalError> {
    recover_after(dir, 0, visit)
}

/// `recover` that visits only records after `after_lsn` and does not read the segments that hold
/// none (their records are checkpointed: start-up time then follows what is not, not the history).
pub fn recover_after(
    dir: &Path,
    after_lsn: u64,
    visit: impl FnMut(u64, &[u8]),
) -> Result<Recovered, WalError> {
    fs::create_dir_all(dir)?;
    scan(dir, visit, true, after_lsn)
}

/// Reads every complete record without changing any file: safe beside a running writer, whose
/// unfinished batch it reports as a torn tail (`truncated_bytes`) but leaves alone.
pub fn scan_read_only(dir: &Path, visit: impl FnMut(u64, &[u8])) -> Result<Recovered, WalError> {
    scan(dir, visit, false, 0)
}

fn scan(
    dir: &Path,
    mut visit: impl FnMut(u64, &[u8]),
    repair: bool,
    after_lsn: u64,
) -> Result<Recovered, WalError> {
    let segments = list_segments(dir)?;
    let mut next_lsn = 1u64;
    let mut truncated_bytes = 0;
    let mut records = 0;
    let count = segments.len();
    let first_lsn_held = segments.first().map_or(1, |(l, _)| *l);
    for (idx, (first_lsn, path)) in segments.iter().enumerate() {
        let last = idx + 1 == count;
        if idx == 0 {
            next_lsn = *first_lsn;
        }
        if let Some((next_first, _)) = segments.get(idx + 1) {
            if *next_first > *first_lsn && next_first - 1 <= after_lsn && *first_lsn == next_lsn {
                // Every record of this sealed segment is checkpointed: not read.
                next_lsn = *next_first;
                continue;
            }
        }
        let data = fs::read(path)?;
        let corrupt = |offset: u64, reason: String| WalError::Corrupt {
            segment: path.clone(),
            offset,
            reason,
        };
        if idx > 0 && *first_lsn != next_lsn {
            return Err(corrupt(
                0,
                format!("segment starts at LSN {first_lsn}, expected {next_lsn}"),
            ));
        }
        if data.len() < SEGMENT_MAGIC.len() || &data[..8] != SEGMENT_MAGIC {
            if last && data.len() <= SEGMENT_MAGIC.len() && SEGMENT_MAGIC.starts_with(&data) {
                // A crash while creating the segment: rewrite its magic and carry on.
                if repair {
                    fs::write(path, SEGMENT_MAGIC)?;
                }
                truncated_bytes += data.len() as u64;
                continue;
            }
            return Err(corrupt(0, "missing segment magic".into()));
        }
        let mut offset = SEGMENT_MAGIC.len();
        while offset < data.len() {
            match decode_record(&data[offset..]) {
                Decoded::Record { lsn, payload, len } => {
                    if lsn != next_lsn {
                        return Err(corrupt(
                            offset as u64,
                            format!("record has LSN {lsn}, expected {next_lsn}"),
                        ));
                    }
                    if lsn > after_lsn {
                        visit(lsn, payload);
                        records += 1;
                    }
                    next_lsn += 1;
                    offset += len;
                }
                Decoded::Incomplete if last => break,
                Decoded::Bad(reason) if last && tail_is_torn(&data[offset..]) => {
                    // A torn write leaves a partial record whose length header or checksum is
                    // garbage; it is the last thing in the file, so nothing after it was acknowledged.
                    let _ = reason;
                    break;
                }
                Decoded::Incomplete => {
                    return Err(corrupt(
                        offset as u64,
                        "sealed segment ends mid-record".into(),
                    ))
                }
                Decoded::Bad(reason) => return Err(corrupt(offset as u64, reason)),
            }
        }
        if offset < data.len() {
            truncated_bytes += (data.len() - offset) as u64;
            if !repair {
                continue;
            }
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(offset as u64)?;
            f.sync_all()?;
        }
    }
    if truncated_bytes > 0 && repair {
        fsync_dir(dir)?;
    }
    Ok(Recovered {
        next_lsn,
        tail_segment: segments.last().cloned(),
        truncated_bytes,
        records,
        first_lsn: first_lsn_held,
    })
}

/// A bad record is a torn tail when no valid record can be found after it: group commit writes
/// whole batches, so a crash can only damage the end of the file.
fn tail_is_torn(rest: &[u8]) -> bool {
    for start in 1..rest.len() {
        if let Decoded::Record { .. } = decode_record(&rest[start..]) {
            return false;
        }
    }
    true
}
