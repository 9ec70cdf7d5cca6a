//! Bounded in-memory idempotency table with TTL, sharded to keep lock hold times tiny.
//!
//! An entry is created in flight when a keyed request passes validation, and completed with the
//! stored response once its WAL record is durable. Entries are keyed by merchant and key together.

use ahash::RandomState;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
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
}

enum State {
    InFlight,
    Done { status: u16, body: Arc<[u8]> },
}

struct Entry {
    fingerprint: Fingerprint,
    state: State,
    created_ms: u64,
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
        }
    }

    fn shard(&self, k: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(k) as usize) % SHARDS]
    }

    pub fn begin(&self, k: &str, fingerprint: Fingerprint, now_ms: u64) -> Lookup {
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
        self.insert(
            &mut shard,
            k,
            Entry {
                fingerprint,
                state: State::InFlight,
                created_ms: now_ms,
            },
            now_ms,
        );
        Lookup::New
    }

    pub fn complete(&self, k: &str, status: u16, body: Arc<[u8]>) {
        if let Some(e) = self.shard(k).lock().map.get_mut(k) {
            e.state = State::Done { status, body };
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

    /// Re-creates a completed entry during recovery.
    pub fn restore(
        &self,
        k: &str,
        fingerprint: Fingerprint,
        status: u16,
        body: Arc<[u8]>,
        created_ms: u64,
        now_ms: u64,
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
        // In-flight entries are never evicted: their owner will complete or abandon them.
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
        t.complete(&k, 201, Arc::from(&b"body"[..]));
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
        t.complete(&k, 201, Arc::from(&b"x"[..]));
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
            t.complete(&k, 201, Arc::from(&b"x"[..]));
        }
        assert!(t.len() <= 64 * 4 + 64, "len {}", t.len());
        assert_eq!(t.begin(&inflight, FP, 2), Lookup::InFlight);
    }
}
