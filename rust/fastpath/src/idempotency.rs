//! Bounded in-memory idempotency table with TTL, sharded to keep lock hold times tiny.
//!
//! An entry is created in flight when a keyed request passes validation, and completed with the
//! stored response once its WAL record is durable. Entries are keyed by merchant and key together.
//!
//! With a key filter (embedded mode) the table is a cache in front of the durable record of each key
//! (the store's `idempotency_keys`): a miss on a key the filter may have seen answers `Check`, and
//! the caller asks again with what the store holds. An entry whose record is not materialised in the
//! store yet (LSN above `materialised_lsn`) is never evicted, so a miss never loses a key.

use crate::keyfilter::KeyFilter;
use ahash::RandomState;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const SHARDS: usize = 64;

pub type Fingerprint = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// First use of the key: the caller owns it until `complete` or `abandon`.
    New,
    Replay {
        status: u16,
        body: Arc<[u8]>,
    },
    Mismatch,
    InFlight,
    /// Not in the table but maybe seen in the last TTL: ask again with the durable record.
    Check,
}

/// What the store holds for a key, for a second `begin` after `Lookup::Check`.
#[derive(Debug, Clone)]
pub struct DurableRecord {
    pub fingerprint: Fingerprint,
    pub status: u16,
    pub body: Arc<[u8]>,
    pub created_ms: u64,
}

/// How `begin` treats a key missing from the table.
#[derive(Debug, Clone)]
pub enum Durable {
    /// Consult the filter; `Lookup::Check` when it may have seen the key.
    Unchecked,
    /// The store was read: its record of the key, or None when it has none.
    Checked(Option<DurableRecord>),
}

enum State {
    InFlight,
    Done { status: u16, body: Arc<[u8]> },
}

struct Entry {
    fingerprint: Fingerprint,
    state: State,
    created_ms: u64,
    /// LSN of the entry's WAL record; 0 when unknown (in flight) or already in the store.
    lsn: u64,
}

struct Shard {
    map: HashMap<String, Entry, RandomState>,
    /// Insertion order for expiry and eviction; stale rows (replaced entries) are skipped.
    order: VecDeque<(String, u64)>,
}

pub struct IdempotencyTable {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    ttl_ms: u64,
    per_shard_max: usize,
    filter: Option<Arc<KeyFilter>>,
    /// Records up to this LSN are in the store, so their entries may be evicted (with a filter).
    materialised_lsn: AtomicU64,
}

pub fn table_key(merchant: &str, key: &str) -> String {
    let mut s = String::with_capacity(merchant.len() + key.len() + 1);
    s.push_str(merchant);
    s.push('\0');
    s.push_str(key);
    s
}

impl IdempotencyTable {
    pub fn new(ttl_s: u64, entries_max: usize) -> Self {
        Self::with_filter(ttl_s, entries_max, None)
    }

    pub fn with_filter(ttl_s: u64, entries_max: usize, filter: Option<Arc<KeyFilter>>) -> Self {
        let state = RandomState::with_seeds(1, 2, 3, 4);
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::with_hasher(state.clone()),
                        order: VecDeque::new(),
                    })
                })
                .collect(),
            hasher: state,
            ttl_ms: ttl_s * 1000,
            per_shard_max: entries_max.div_ceil(SHARDS).max(1),
            filter,
            materialised_lsn: AtomicU64::new(0),
        }
    }

    pub fn filter(&self) -> Option<&Arc<KeyFilter>> {
        self.filter.as_ref()
    }

    pub fn set_materialised_lsn(&self, lsn: u64) {
        self.materialised_lsn.fetch_max(lsn, Ordering::Release);
    }

    pub fn materialised_lsn(&self) -> u64 {
        self.materialised_lsn.load(Ordering::Acquire)
    }

    fn shard(&self, k: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(k) as usize) % SHARDS]
    }

    pub fn begin(&self, k: &str, fingerprint: Fingerprint, now_ms: u64) -> Lookup {
        self.begin_with(k, fingerprint, now_ms, Durable::Checked(None))
    }

    /// Looks the key up; `New` means the caller owns it (in flight) until `complete` or `abandon`.
    pub fn begin_with(
        &self,
        k: &str,
        fingerprint: Fingerprint,
        now_ms: u64,
        durable: Durable,
    ) -> Lookup {
        let mut shard = self.shard(k).lock();
        if let Some(e) = shard.map.get(k) {
            if e.created_ms + self.ttl_ms > now_ms {
                if e.fingerprint != fingerprint {
                    return Lookup::Mismatch;
                }
                return match &e.state {
                    State::InFlight => Lookup::InFlight,
                    State::Done { status, body } => Lookup::Replay {
                        status: *status,
                        body: body.clone(),
                    },
                };
            }
        }
        match durable {
            Durable::Unchecked => {
                if self
                    .filter
                    .as_ref()
                    .is_some_and(|f| f.maybe_contains(k, now_ms))
                {
                    return Lookup::Check;
                }
            }
            Durable::Checked(Some(rec)) if rec.created_ms + self.ttl_ms > now_ms => {
                let answer = if rec.fingerprint != fingerprint {
                    Lookup::Mismatch
                } else {
                    Lookup::Replay {
                        status: rec.status,
                        body: rec.body.clone(),
                    }
                };
                let entry = Entry {
                    fingerprint: rec.fingerprint,
                    state: State::Done {
                        status: rec.status,
                        body: rec.body,
                    },
                    created_ms: rec.created_ms,
                    lsn: 0,
                };
                self.insert(&mut shard, k, entry, now_ms);
                return answer;
            }
            Durable::Checked(_) => {}
        }
        if let Some(f) = &self.filter {
            // Before the record is appended, so a filter snapshot that covers its LSN holds the key.
            f.add(k, now_ms);
        }
        self.insert(
            &mut shard,
            k,
            Entry {
                fingerprint,
                state: State::InFlight,
                created_ms: now_ms,
                lsn: 0,
            },
            now_ms,
        );
        Lookup::New
    }

    pub fn complete(&self, k: &str, status: u16, body: Arc<[u8]>, lsn: u64) {
        if let Some(e) = self.shard(k).lock().map.get_mut(k) {
            e.state = State::Done { status, body };
            e.lsn = lsn;
        }
    }

    /// Releases an in-flight key whose request failed before it was accepted (rate limit, full WAL).
    pub fn abandon(&self, k: &str) {
        let mut shard = self.shard(k).lock();
        if matches!(
            shard.map.get(k),
            Some(Entry {
                state: State::InFlight,
                ..
            })
        ) {
            shard.map.remove(k);
        }
    }

    /// Re-creates a completed entry during recovery (`lsn`: of its record).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &self,
        k: &str,
        fingerprint: Fingerprint,
        status: u16,
        body: Arc<[u8]>,
        created_ms: u64,
        now_ms: u64,
        lsn: u64,
    ) {
        if created_ms + self.ttl_ms <= now_ms {
            return;
        }
        let mut shard = self.shard(k).lock();
        self.insert(
            &mut shard,
            k,
            Entry {
                fingerprint,
                state: State::Done { status, body },
                created_ms,
                lsn,
            },
            now_ms,
        );
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, shard: &mut Shard, k: &str, entry: Entry, now_ms: u64) {
        // Drop expired entries from the front, then evict the oldest completed ones past the bound.
        // In-flight entries are never evicted: their owner will complete or abandon them. With a
        // filter, neither is an entry whose record is not in the store yet: the store could not answer
        // for it. Entries come in LSN order, so eviction stops at the first such entry.
        let pinned_above = self
            .filter
            .as_ref()
            .map(|_| self.materialised_lsn.load(Ordering::Acquire));
        let mut budget = shard.order.len();
        while budget > 0 {
            budget -= 1;
            let Some((front, created)) = shard.order.front().cloned() else {
                break;
            };
            let live = shard.map.get(&front).filter(|e| e.created_ms == created);
            let Some(e) = live else {
                shard.order.pop_front();
                continue;
            };
            let expired = e.created_ms + self.ttl_ms <= now_ms;
            let over = shard.map.len() >= self.per_shard_max;
            if !(expired || over) {
                break;
            }
            let pinned =
                matches!(e.state, State::Done { .. }) && pinned_above.is_some_and(|m| e.lsn > m);
            if pinned && !expired {
                break;
            }
            shard.order.pop_front();
            if matches!(e.state, State::InFlight) && !expired {
                shard.order.push_back((front, created));
            } else {
                shard.map.remove(&front);
            }
        }
        shard.order.push_back((k.to_string(), entry.created_ms));
        shard.map.insert(k.to_string(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: Fingerprint = [1; 16];

    #[test]
    fn first_use_then_in_flight_then_replay() {
        let t = IdempotencyTable::new(60, 1000);
        let k = table_key("m1", "key");
        assert_eq!(t.begin(&k, FP, 0), Lookup::New);
        assert_eq!(t.begin(&k, FP, 1), Lookup::InFlight);
        t.complete(&k, 201, Arc::from(&b"body"[..]), 1);
        assert_eq!(
            t.begin(&k, FP, 2),
            Lookup::Replay {
                status: 201,
                body: Arc::from(&b"body"[..])
            }
        );
        assert_eq!(t.begin(&k, [2; 16], 3), Lookup::Mismatch);
    }

    #[test]
    fn keys_are_scoped_per_merchant() {
        let t = IdempotencyTable::new(60, 1000);
        assert_eq!(t.begin(&table_key("m1", "k"), FP, 0), Lookup::New);
        assert_eq!(t.begin(&table_key("m2", "k"), [9; 16], 0), Lookup::New);
    }

    #[test]
    fn entries_expire_after_ttl() {
        let t = IdempotencyTable::new(1, 1000);
        let k = table_key("m", "k");
        t.begin(&k, FP, 0);
        t.complete(&k, 201, Arc::from(&b"x"[..]), 1);
        assert!(matches!(t.begin(&k, FP, 999), Lookup::Replay { .. }));
        assert_eq!(t.begin(&k, [3; 16], 1000), Lookup::New);
    }

    #[test]
    fn abandoned_key_can_be_used_again() {
        let t = IdempotencyTable::new(60, 1000);
        let k = table_key("m", "k");
        t.begin(&k, FP, 0);
        t.abandon(&k);
        assert_eq!(t.begin(&k, [4; 16], 0), Lookup::New);
    }

    #[test]
    fn table_is_bounded_and_keeps_in_flight_entries() {
        let t = IdempotencyTable::new(3600, 64 * 4);
        let inflight = table_key("m", "held");
        t.begin(&inflight, FP, 0);
        for i in 0..10_000 {
            let k = table_key("m", &format!("k{i}"));
            t.begin(&k, FP, 1);
            t.complete(&k, 201, Arc::from(&b"x"[..]), 1);
        }
        assert!(t.len() <= 64 * 4 + 64, "len {}", t.len());
        assert_eq!(t.begin(&inflight, FP, 2), Lookup::InFlight);
    }

    fn filtered(dir: &std::path::Path, entries_max: usize) -> IdempotencyTable {
        let (f, _) = KeyFilter::open(
            crate::keyfilter::FilterConfig {
                dir: dir.to_path_buf(),
                false_positive_rate: 0.001,
                block_keys: 100_000,
                ttl_ms: 3_600_000,
                blocks_max: 10,
            },
            0,
        )
        .unwrap();
        IdempotencyTable::with_filter(3600, entries_max, Some(Arc::new(f)))
    }

    /// A first use as the engine makes it: a filter false positive is answered "no record".
    fn begin_new(t: &IdempotencyTable, k: &str, now: u64) -> Lookup {
        match t.begin_with(k, FP, now, Durable::Unchecked) {
            Lookup::Check => t.begin_with(k, FP, now, Durable::Checked(None)),
            other => other,
        }
    }

    #[test]
    fn evicted_key_asks_for_the_durable_record_and_answers_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = filtered(dir.path(), 64);
        let k = table_key("m", "k0");
        assert_eq!(t.begin_with(&k, FP, 1, Durable::Unchecked), Lookup::New);
        t.complete(&k, 201, Arc::from(&b"first"[..]), 1);
        t.set_materialised_lsn(u64::MAX);
        for i in 0..10_000 {
            let o = table_key("m", &format!("k{}", i + 1));
            assert_eq!(begin_new(&t, &o, 2), Lookup::New, "{i}");
            t.complete(&o, 201, Arc::from(&b"x"[..]), i + 2);
        }
        assert_eq!(t.begin_with(&k, FP, 3, Durable::Unchecked), Lookup::Check);
        let rec = DurableRecord {
            fingerprint: FP,
            status: 201,
            body: Arc::from(&b"first"[..]),
            created_ms: 1,
        };
        assert_eq!(
            t.begin_with(&k, [7; 16], 3, Durable::Checked(Some(rec.clone()))),
            Lookup::Mismatch
        );
        assert_eq!(
            t.begin_with(&k, FP, 3, Durable::Unchecked),
            Lookup::Replay {
                status: 201,
                body: Arc::from(&b"first"[..])
            },
            "cached again"
        );
        // No record after all (a false positive): the key is new, and owned by one caller.
        let fresh = table_key("m", "never-seen");
        assert_eq!(
            t.begin_with(&fresh, FP, 4, Durable::Checked(None)),
            Lookup::New
        );
        assert_eq!(
            t.begin_with(&fresh, FP, 4, Durable::Checked(None)),
            Lookup::InFlight
        );
    }

    #[test]
    fn entries_not_yet_in_the_store_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let t = filtered(dir.path(), 64);
        t.set_materialised_lsn(0);
        for i in 0..5_000u64 {
            let o = table_key("m", &format!("k{i}"));
            assert_eq!(begin_new(&t, &o, 1), Lookup::New);
            t.complete(&o, 201, Arc::from(&b"x"[..]), i + 1);
        }
        assert_eq!(t.len(), 5_000, "nothing is materialised yet");
        t.set_materialised_lsn(5_000);
        let o = table_key("m", "one-more");
        t.begin_with(&o, FP, 1, Durable::Unchecked);
        assert!(t.len() < 5_000, "evictable once materialised");
    }
}
