//! Sequential reader over committed records, used by the tailer, the relay and the backtest.

use super::{decode_record, list_segments, Decoded, WalError, SEGMENT_MAGIC};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct WalReader {
    dir: PathBuf,
    /// LSN of the next record to return.
    next_lsn: u64,
    current: Option<Cursor>,
    buf: Vec<u8>,
}

struct Cursor {
    first_lsn: u64,
    file: File,
    /// Offset in the file of `buf[0]`.
    offset: u64,
}

impl WalReader {
    /// A reader that returns records with LSN greater than `after_lsn`.
    pub fn new(dir: &Path, after_lsn: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            next_lsn: after_lsn + 1,
            current: None,
            buf: Vec::new(),
        }
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Up to `max` records with LSN ≤ `committed_lsn`, in order.
    pub fn read(
        &mut self,
        committed_lsn: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let mut out = Vec::new();
        while out.len() < max && self.next_lsn <= committed_lsn {
            if self.current.is_none() && !self.open_segment()? {
                break;
            }
            match self.next_in_segment()? {
                Some((lsn, payload)) => {
                    if lsn >= self.next_lsn {
                        self.next_lsn = lsn + 1;
                        out.push((lsn, payload));
                    }
                }
                None => {
                    // End of this segment: move on only if a later segment exists.
                    let first = self.current.as_ref().map(|c| c.first_lsn).unwrap_or(0);
                    let later = list_segments(&self.dir)?
                        .into_iter()
                        .any(|(l, _)| l > first && l <= self.next_lsn);
                    if later {
                        self.current = None;
                        self.buf.clear();
                    } else {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn open_segment(&mut self) -> Result<bool, WalError> {
        let segments = list_segments(&self.dir)?;
        let found = segments
            .iter()
            .rev()
            .find(|(l, _)| *l <= self.next_lsn)
            .or_else(|| segments.first())
            .cloned();
        let Some((first_lsn, path)) = found else {
            return Ok(false);
        };
        // Retention removed the segments before it: the reader starts at the oldest record held
        // (backtests report the window they read by its first LSN and time).
        self.next_lsn = self.next_lsn.max(first_lsn);
        let mut file = File::open(&path)?;
        file.seek(SeekFrom::Start(SEGMENT_MAGIC.len() as u64))?;
        self.current = Some(Cursor {
            first_lsn,
            file,
            offset: SEGMENT_MAGIC.len() as u64,
        });
        self.buf.clear();
        let _: &Path = &path;
        Ok(true)
    }

    fn next_in_segment(&mut self) -> Result<Option<(u64, Vec<u8>)>, WalError> {
        loop {
            match decode_record(&self.buf) {
                Decoded::Record { lsn, payload, len } => {
                    let rec = (lsn, payload.to_vec());
                    self.buf.drain(..len);
                    if let Some(c) = self.current.as_mut() {
                        c.offset += len as u64;
                    }
                    return Ok(Some(rec));
                }
                Decoded::Incomplete => {
                    let cur = self.current.as_mut().expect("segment open");
                    let mut chunk = vec![0u8; 256 * 1024];
                    let n = cur.file.read(&mut chunk)?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Decoded::Bad(reason) => {
                    let cur = self.current.as_ref().expect("segment open");
                    return Err(WalError::Corrupt {
                        segment: self.dir.join(super::segment_name(cur.first_lsn)),
                        offset: cur.offset,
                        reason,
                    });
                }
            }
        }
    }
}
