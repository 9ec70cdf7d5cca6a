//! Membership filter of the idempotency keys seen in the last `ttl`: Bloom filter blocks.
//!
//! The in-memory idempotency table is a bounded cache; the durable record of a key (the store's
//! `idempotency_keys` row, written from the WAL record) is the truth. A new key, the common case,
//! must not cost a store read, so every key is added to this filter when it is first used, and the
//! store is read only when the filter says "maybe" and the table misses.
//!
//! Keys go to the newest block; a block is sealed when it holds `block_keys` keys or spans an hour,
//! and dropped once its newest key is older than the TTL. Each block is sized for `block_keys` at
//! the configured false-positive rate, so memory follows the keys actually seen:
//! `-ln(p) / ln(2)^2` bits per key (9.6 bits, 1.2 bytes at p = 1 %).
//!
//! Blocks are persisted (written whole to a temporary file, fsynced, renamed) by the maintenance
//! thread, with the WAL LSN they cover: every record at or below it had its key added before the
//! snapshot was taken, so recovery adds only the keys of later records.

use parking_lot::RwLock;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const BLOCK_MAGIC: &[u8; 8] = b"GWBLM002";
const LINE_BITS: u64 = 512;
const LSN_FILE: &str = "filter.lsn";
/// A block holds keys of at most this span, so expiry drops them at hourly granularity.
pub const BLOCK_SPAN_MS: u64 = 3_600_000;

#[derive(Debug, Clone)]
pub struct FilterConfig {
    pub dir: PathBuf,
    pub false_positive_rate: f64,
    pub block_keys: u64,
    pub ttl_ms: u64,
    /// Live blocks at most (memory bound). At the bound no block is added: the filter turns cold
    /// (every miss reads the store) until a TTL has passed, so a key is never falsely "new".
    pub blocks_max: usize,
}

struct Block {
    id: u64,
    first_ms: u64,
    last_ms: AtomicU64,
    count: AtomicU64,
    bits: Box<[AtomicU64]>,
    k: u32,
    dirty: AtomicBool,
}

impl Block {
    fn new(id: u64, first_ms: u64, nbits: u64, k: u32) -> Self {
        Self {
            id,
            first_ms,
            last_ms: AtomicU64::new(first_ms),
            count: AtomicU64::new(0),
            bits: (0..nbits / 64).map(|_| AtomicU64::new(0)).collect(),
            k,
            dirty: AtomicBool::new(true),
        }
    }

    fn nbits(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// A blocked Bloom filter: all k bits of a key lie in one 512-bit cache line, so a lookup costs
    /// one cache miss per block.
    fn positions(&self, h: (u64, u64)) -> impl Iterator<Item = u64> + '_ {
        let line = (h.0 % (self.nbits() / LINE_BITS)) * LINE_BITS;
        let start = h.0 >> 32;
        (0..self.k as u64)
            .map(move |i| line + (start.wrapping_add(i.wrapping_mul(h.1)) % LINE_BITS))
    }

    fn contains(&self, h: (u64, u64)) -> bool {
        self.positions(h)
            .all(|p| self.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
    }

    fn add(&self, h: (u64, u64), now_ms: u64) {
        for p in self.positions(h) {
            self.bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.last_ms.fetch_max(now_ms, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56 + self.bits.len() * 8);
        out.extend_from_slice(BLOCK_MAGIC);
        for v in [
            self.id,
            self.first_ms,
            self.last_ms.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
            self.nbits(),
            self.k as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for w in self.bits.iter() {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(data: &[u8]) -> Option<Self> {
        if data.len() < 60 || &data[..8] != BLOCK_MAGIC {
            return None;
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(body[8 + i * 8..16 + i * 8].try_into().unwrap());
        let (id, first_ms, last_ms, count, nbits, k) =
            (word(0), word(1), word(2), word(3), word(4), word(5));
        if nbits % LINE_BITS != 0
            || nbits == 0
            || body.len() != 56 + (nbits / 8) as usize
            || k == 0
            || k > 32
        {
            return None;
        }
        let bits = body[56..]
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap())))
            .collect();
        Some(Self {
            id,
            first_ms,
            last_ms: AtomicU64::new(last_ms),
            count: AtomicU64::new(count),
            bits,
            k: k as u32,
            dirty: AtomicBool::new(false),
        })
    }
}

pub struct KeyFilter {
    cfg: FilterConfig,
    nbits: u64,
    k: u32,
    blocks: RwLock<Vec<Arc<Block>>>,
    next_id: AtomicU64,
    /// WAL LSN the persisted blocks cover (0: none persisted yet).
    persisted_lsn: AtomicU64,
    /// Until then every lookup answers "maybe": the filter could not be rebuilt (its files were lost
    /// while the WAL that would rebuild it was already deleted), so the store decides.
    cold_until_ms: AtomicU64,
}

/// Bits and hash count of a block for `keys` keys at false-positive rate `p`: the classic
/// `-ln(p) / ln(2)^2` bits per key, plus one for the cache-line blocking.
pub fn block_shape(keys: u64, p: f64) -> (u64, u32) {
    let ln2 = std::f64::consts::LN_2;
    let bits = ((keys as f64) * (1.0 - p.ln() / (ln2 * ln2))).ceil() as u64;
    let nbits = bits.div_ceil(LINE_BITS).max(1) * LINE_BITS;
    let k = ((nbits as f64 / keys as f64) * ln2)
        .round()
        .clamp(1.0, 32.0) as u32;
    (nbits, k)
}

/// A stable 64-bit hash (the filter is persisted, so it must not change between builds or runs).
fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut h = seed ^ (data.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(b).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = h.rotate_left(27).wrapping_mul(0x94D0_49BB_1331_11EB);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

fn hashes(key: &str) -> (u64, u64) {
    (
        hash64(key.as_bytes(), 0x5EED_0001),
        hash64(key.as_bytes(), 0x5EED_0002) | 1,
    )
}

fn block_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.bloom"))
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

impl KeyFilter {
    /// Loads the persisted blocks of `cfg.dir` (created if missing); returns the filter and the LSN
    /// those blocks cover, None when nothing was persisted.
    pub fn open(cfg: FilterConfig, now_ms: u64) -> io::Result<(Self, Option<u64>)> {
        fs::create_dir_all(&cfg.dir)?;
        let (nbits, k) = block_shape(cfg.block_keys, cfg.false_positive_rate);
        let lsn = fs::read_to_string(cfg.dir.join(LSN_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let mut blocks = Vec::new();
        if lsn.is_some() {
            for entry in fs::read_dir(&cfg.dir)? {
                let path = entry?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("bloom") {
                    continue;
                }
                match fs::read(&path).ok().and_then(|d| Block::decode(&d)) {
                    Some(b) if b.last_ms.load(Ordering::Relaxed) + cfg.ttl_ms > now_ms => {
                        blocks.push(Arc::new(b))
                    }
                    Some(_) => {
                        let _ = fs::remove_file(&path);
                    }
                    // A damaged block cannot say which keys it held: start over from the WAL.
                    None => return Self::open_empty(cfg, nbits, k),
                }
            }
        }
        blocks.sort_by_key(|b| b.id);
        let next_id = blocks.last().map_or(1, |b| b.id + 1);
        let f = Self {
            cfg,
            nbits,
            k,
            blocks: RwLock::new(blocks),
            next_id: AtomicU64::new(next_id),
            persisted_lsn: AtomicU64::new(lsn.unwrap_or(0)),
            cold_until_ms: AtomicU64::new(0),
        };
        Ok((f, lsn))
    }

    fn open_empty(cfg: FilterConfig, nbits: u64, k: u32) -> io::Result<(Self, Option<u64>)> {
        let _ = fs::remove_file(cfg.dir.join(LSN_FILE));
        let f = Self {
            cfg,
            nbits,
            k,
            blocks: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            persisted_lsn: AtomicU64::new(0),
            cold_until_ms: AtomicU64::new(0),
        };
        Ok((f, None))
    }

    /// From now until a TTL has passed, every lookup answers "maybe".
    pub fn set_cold(&self, now_ms: u64) {
        self.cold_until_ms
            .store(now_ms + self.cfg.ttl_ms, Ordering::Relaxed);
    }

    pub fn is_cold(&self, now_ms: u64) -> bool {
        self.cold_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// False: the key was certainly not added in the last TTL. True: maybe (or the filter is cold).
    pub fn maybe_contains(&self, key: &str, now_ms: u64) -> bool {
        if self.is_cold(now_ms) {
            return true;
        }
        let h = hashes(key);
        let ttl = self.cfg.ttl_ms;
        self.blocks
            .read()
            .iter()
            .rev()
            .any(|b| b.last_ms.load(Ordering::Relaxed) + ttl > now_ms && b.contains(h))
    }

    pub fn add(&self, key: &str, now_ms: u64) {
        let h = hashes(key);
        {
            let blocks = self.blocks.read();
            if let Some(b) = blocks.last() {
                if self.accepts(b, now_ms) {
                    b.add(h, now_ms);
                    return;
                }
            }
        }
        let mut blocks = self.blocks.write();
        let reuse = blocks.last().filter(|b| self.accepts(b, now_ms)).cloned();
        let b = match reuse {
            Some(b) => b,
            None if blocks.len() >= self.cfg.blocks_max => {
                drop(blocks);
                self.set_cold(now_ms);
                return;
            }
            None => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let b = Arc::new(Block::new(id, now_ms, self.nbits, self.k));
                blocks.push(b.clone());
                b
            }
        };
        b.add(h, now_ms);
    }

    fn accepts(&self, b: &Block, now_ms: u64) -> bool {
        b.count.load(Ordering::Relaxed) < self.cfg.block_keys
            && now_ms < b.first_ms + BLOCK_SPAN_MS
            && b.nbits() == self.nbits
    }

    /// Drops the blocks whose newest key is older than the TTL; returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        let ttl = self.cfg.ttl_ms;
        let mut gone = Vec::new();
        self.blocks.write().retain(|b| {
            let live = b.last_ms.load(Ordering::Relaxed) + ttl > now_ms;
            if !live {
                gone.push(b.id);
            }
            live
        });
        for id in &gone {
            let _ = fs::remove_file(block_path(&self.cfg.dir, *id));
        }
        gone.len()
    }

    /// Writes every changed block, then records that they cover `covered_lsn`. The caller reads
    /// `covered_lsn` (the committed LSN) before calling, so every key of those records is in the bits.
    pub fn persist(&self, covered_lsn: u64) -> io::Result<()> {
        let blocks: Vec<Arc<Block>> = self.blocks.read().clone();
        for b in &blocks {
            if b.dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = write_atomic(&block_path(&self.cfg.dir, b.id), &b.encode()) {
                    b.dirty.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        write_atomic(
            &self.cfg.dir.join(LSN_FILE),
            covered_lsn.to_string().as_bytes(),
        )?;
        crate::wal::fsync_dir(&self.cfg.dir)?;
        self.persisted_lsn.store(covered_lsn, Ordering::Release);
        Ok(())
    }

    /// The LSN up to which the filter on disk holds every key.
    pub fn persisted_lsn(&self) -> u64 {
        self.persisted_lsn.load(Ordering::Acquire)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.blocks.read().iter().map(|b| b.nbits() / 8).sum()
    }

    pub fn keys(&self) -> u64 {
        self.blocks
            .read()
            .iter()
            .map(|b| b.count.load(Ordering::Relaxed))
            .sum()
    }

    pub fn blocks(&self) -> usize {
        self.blocks.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> FilterConfig {
        FilterConfig {
            dir: dir.to_path_buf(),
            false_positive_rate: 0.01,
            block_keys: 10_000,
            ttl_ms: 86_400_000,
            blocks_max: 4,
        }
    }

    #[test]
    fn added_keys_are_found_and_new_keys_rarely_are() {
        let dir = tempfile::tempdir().unwrap();
        let (f, lsn) = KeyFilter::open(cfg(dir.path()), 0).unwrap();
        assert_eq!(lsn, None);
        for i in 0..25_000 {
            f.add(&format!("m\0k{i}"), 10);
        }
        assert_eq!(f.blocks(), 3, "a block per 10,000 keys");
        assert!((0..25_000).all(|i| f.maybe_contains(&format!("m\0k{i}"), 20)));
        let false_hits = (0..100_000)
            .filter(|i| f.maybe_contains(&format!("m\0other{i}"), 20))
            .count();
        // Each block answers "maybe" for about 1 % of new keys; a lookup asks every live block.
        assert!(
            false_hits < 4_000,
            "false-positive rate {false_hits}/100000"
        );
        let (g, _) = KeyFilter::open(cfg(&dir.path().join("one")), 0).unwrap();
        for i in 0..10_000 {
            g.add(&format!("m\0k{i}"), 10);
        }
        let one_block = (0..100_000)
            .filter(|i| g.maybe_contains(&format!("m\0other{i}"), 20))
            .count();
        assert!(
            one_block < 1_300,
            "one block's false-positive rate {one_block}/100000"
        );
    }

    #[test]
    fn persisted_blocks_survive_a_restart_and_expire_after_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (f, _) = KeyFilter::open(cfg(dir.path()), 0).unwrap();
            f.add("m\0a", 1_000);
            f.persist(42).unwrap();
            f.add("m\0b", 2_000); // not persisted: recovery re-adds it from the WAL after LSN 42
        }
        let (f, lsn) = KeyFilter::open(cfg(dir.path()), 3_000).unwrap();
        assert_eq!(lsn, Some(42));
        assert!(f.maybe_contains("m\0a", 3_000));
        assert!(!f.maybe_contains("m\0b", 3_000));
        assert!(!f.maybe_contains("m\0a", 1_000 + 86_400_000));
        assert_eq!(f.expire(2_000 + 86_400_000), 1);
        let (f, _) = KeyFilter::open(cfg(dir.path()), 3_000).unwrap();
        assert_eq!(f.blocks(), 0);
    }

    #[test]
    fn a_cold_filter_answers_maybe_until_the_ttl_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = KeyFilter::open(cfg(dir.path()), 0).unwrap();
        f.set_cold(0);
        assert!(f.maybe_contains("m\0never", 1));
        assert!(!f.maybe_contains("m\0never", 86_400_000));
    }

    #[test]
    fn past_its_block_bound_the_filter_turns_cold_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = KeyFilter::open(cfg(dir.path()), 0).unwrap();
        for i in 0..40_001 {
            f.add(&format!("m\0k{i}"), 10);
        }
        assert_eq!(f.blocks(), 4);
        assert!(f.is_cold(10) && f.maybe_contains("m\0new", 10));
    }

    #[test]
    fn block_shape_follows_the_false_positive_rate() {
        let (nbits, k) = block_shape(1_000_000, 0.01);
        assert!((10_585_000..10_586_000).contains(&nbits), "{nbits}");
        assert_eq!(k, 7);
    }
}
