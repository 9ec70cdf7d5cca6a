//! Velocity counters over sliding windows, with bounded memory.
//!
//! Every dimension (card, email, ip, device, customer, merchant) keeps, per key, three bucketed windows
//! (see [`WINDOWS`]): a ring of `buckets` sub-buckets of `bucket_ms` each, plus running totals. At time
//! `now` the current bucket is `b = max(now / bucket_ms, newest bucket seen by the key)` and a window sums
//! buckets `b - buckets + 1 ..= b`. Hence an event is counted while it is younger than
//! `window - bucket_ms` and never once it is `window` old or older (an event at the start of a bucket is
//! counted for exactly `window`). Late events (time going backwards) are added to the newest bucket.
//!
//! Distinct counts keep, per owner key, the 64 most recently seen members (64-bit hashes) with their last
//! time; a member counts while `now - last_seen < window`. The count is exact up to 64 and saturates
//! at 64: it equals `min(true distinct count, 64)` (up to 64-bit hash collisions).
//!
//! Memory is bounded by `keys_per_dimension_max`. The store is sharded; a full shard first drops keys
//! idle for 24 hours, then evicts the least recently updated eighth of its keys (amortised O(1)).

use std::collections::HashMap;

use ahash::RandomState;
use parking_lot::Mutex;

use crate::attrs::{distinct_index, velocity_index, Features, DIMS, DISTINCT, WINDOWS, WINDOW_MS};
use crate::input::{non_empty, Context};

/// Distinct members kept per owner key.
pub const DISTINCT_MEMBERS_MAX: usize = 64;
/// Longest key tracked (bytes); longer keys get no velocity features.
pub const KEY_LEN_MAX: usize = 256;
const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VelocityConfig {
    /// Upper bound of tracked keys per dimension (about 1.7 KB each).
    pub keys_per_dimension_max: usize,
}

impl Default for VelocityConfig {
    fn default() -> Self {
        VelocityConfig {
            keys_per_dimension_max: 16_384,
        }
    }
}

/// One sub-bucket: its count and amount share a 16-byte slot so an update touches one cache line.
#[derive(Clone, Copy, Default)]
struct Slot {
    cents: i64,
    count: u32,
}

const SLOTS_1M: usize = WINDOWS[0].2;
const SLOTS_1H: usize = WINDOWS[1].2;
const SLOTS_24H: usize = WINDOWS[2].2;

/// The running state of the three windows of one key, in one 64-byte cache line, followed by the rings of
/// sub-buckets (one slot touched per window and update).
#[derive(Clone)]
#[repr(C, align(64))]
struct Entry {
    /// Newest bucket index per window (`now_ms / bucket_ms`, saturating at `u32::MAX`).
    bucket: [u32; 3],
    count: [u64; 3],
    cents: [i64; 3],
    s1m: [Slot; SLOTS_1M],
    s1h: [Slot; SLOTS_1H],
    s24h: [Slot; SLOTS_24H],
    last_seen_ms: u64,
    /// (member hash, last seen ms) per distinct feature owned by this dimension.
    distinct: [Vec<(u64, u64)>; 2],
}

impl Entry {
    fn new() -> Entry {
        Entry {
            bucket: [0; 3],
            count: [0; 3],
            cents: [0; 3],
            s1m: [Slot::default(); SLOTS_1M],
            s1h: [Slot::default(); SLOTS_1H],
            s24h: [Slot::default(); SLOTS_24H],
            last_seen_ms: 0,
            distinct: [Vec::new(), Vec::new()],
        }
    }

    /// Records one payment in every window.
    #[inline]
    fn add(&mut self, now_ms: u64, cents: i64) {
        add_to_ring(
            &mut self.bucket[0],
            &mut self.count[0],
            &mut self.cents[0],
            &mut self.s1m,
            now_ms / WINDOWS[0].1,
            cents,
        );
        add_to_ring(
            &mut self.bucket[1],
            &mut self.count[1],
            &mut self.cents[1],
            &mut self.s1h,
            now_ms / WINDOWS[1].1,
            cents,
        );
        add_to_ring(
            &mut self.bucket[2],
            &mut self.count[2],
            &mut self.cents[2],
            &mut self.s24h,
            now_ms / WINDOWS[2].1,
            cents,
        );
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
    }
}

/// Moves a window to `bucket` (never backwards), dropping expired sub-buckets from its totals, then adds
/// the payment to the newest sub-bucket.
#[inline]
fn add_to_ring(
    newest: &mut u32,
    count: &mut u64,
    total: &mut i64,
    slots: &mut [Slot],
    bucket: u64,
    cents: i64,
) {
    let n = slots.len() as u64;
    let bucket = bucket.min(u32::MAX as u64) as u32;
    if bucket > *newest {
        if (bucket - *newest) as u64 >= n || *count == 0 {
            if *count != 0 {
                slots.fill(Slot::default());
            }
            *count = 0;
            *total = 0;
        } else {
            for b in *newest as u64 + 1..=bucket as u64 {
                let slot = &mut slots[(b % n) as usize];
                *count -= slot.count as u64;
                *total -= slot.cents;
                *slot = Slot::default();
            }
        }
        *newest = bucket;
    }
    let slot = &mut slots[(*newest as u64 % n) as usize];
    slot.count = slot.count.saturating_add(1);
    slot.cents = slot.cents.saturating_add(cents);
    *count += 1;
    *total = total.saturating_add(cents);
}

fn touch_member(set: &mut Vec<(u64, u64)>, member: u64, now_ms: u64) {
    if let Some(slot) = set.iter_mut().find(|(m, _)| *m == member) {
        slot.1 = slot.1.max(now_ms);
        return;
    }
    if set.len() < DISTINCT_MEMBERS_MAX {
        set.push((member, now_ms));
        return;
    }
    // Keep the most recent members: replace the least recently seen one.
    if let Some(oldest) = set.iter_mut().min_by_key(|(_, t)| *t) {
        if oldest.1 <= now_ms {
            *oldest = (member, now_ms);
        }
    }
}

/// Members seen within each window (one pass over the set).
fn count_members(set: &[(u64, u64)], now_ms: u64) -> [f64; 3] {
    let mut n = [0u32; 3];
    for &(_, t) in set {
        for (w, window_ms) in WINDOW_MS.iter().enumerate() {
            n[w] += (t.saturating_add(*window_ms) > now_ms) as u32;
        }
    }
    n.map(|c| c as f64)
}

/// Keys are stored as their 64-bit hash: no allocation or string comparison per lookup. Two different
/// keys of one dimension share counters only on a hash collision (probability about n²/2⁶⁵).
type KeyMap = HashMap<u64, Box<Entry>, RandomState>;
type Shard = Mutex<KeyMap>;

struct Dimension {
    shards: Vec<Shard>,
    shard_keys_max: usize,
    /// For each of this dimension's distinct slots: (index into DISTINCT, member dimension).
    distinct: Vec<(usize, usize)>,
}

/// What one payment contributes to the store.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub keys: [Option<&'a str>; 6],
    pub cents: i64,
}

impl<'a> Event<'a> {
    pub fn from_context(ctx: &Context<'a>) -> Event<'a> {
        let i = ctx.input;
        let cents = ctx
            .amount_usd
            .map(|u| (u * 100.0 + 0.5).floor() as i64)
            .unwrap_or(0)
            .max(0);
        let key = |v: Option<&'a str>| non_empty(v).filter(|k| k.len() <= KEY_LEN_MAX);
        Event {
            keys: [
                key(i.card),
                key(i.email),
                key(i.ip),
                key(i.device_id),
                key(i.customer_id),
                key(Some(i.merchant_id)),
            ],
            cents,
        }
    }
}

/// The velocity store of an engine.
pub struct VelocityStore {
    dims: Vec<Dimension>,
    hasher: RandomState,
}

impl VelocityStore {
    pub fn new(config: VelocityConfig) -> VelocityStore {
        let hasher = RandomState::with_seeds(0x7e10_c17e, 0x5eed_0001, 0x0dd5_eed5, 0x00c0_ffee);
        let shard_keys_max = (config.keys_per_dimension_max / SHARDS).max(8);
        let dims = (0..DIMS.len())
            .map(|d| Dimension {
                shards: (0..SHARDS)
                    .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                    .collect(),
                shard_keys_max,
                distinct: DISTINCT
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, owner, _))| *owner == d)
                    .map(|(i, (_, _, member))| (i, *member))
                    .collect(),
            })
            .collect();
        VelocityStore { dims, hasher }
    }

    fn hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    /// Records the payment (when `record`) and writes every velocity feature, current payment included,
    /// into `out`. With `record == false` the features are what they would be, and nothing changes.
    pub fn observe(&self, event: &Event<'_>, now_ms: u64, record: bool, out: &mut Features) {
        let member_hashes: [Option<u64>; 6] = event.keys.map(|k| k.map(|k| self.hash(k)));
        for (d, dim) in self.dims.iter().enumerate() {
            let Some(h) = member_hashes[d] else {
                continue; // features stay missing
            };
            let shard = &dim.shards[(h >> 60) as usize % SHARDS];
            let mut map = shard.lock();
            let mut scratch;
            let entry: &mut Entry = if record {
                if map.len() >= dim.shard_keys_max && !map.contains_key(&h) {
                    evict(&mut map, dim.shard_keys_max, now_ms);
                }
                map.entry(h).or_insert_with(|| Box::new(Entry::new()))
            } else {
                scratch = map
                    .get(&h)
                    .map(|e| (**e).clone())
                    .unwrap_or_else(Entry::new);
                &mut scratch
            };
            entry.add(now_ms, event.cents);
            for w in 0..WINDOWS.len() {
                let i = velocity_index(d, w);
                out.values[i] = entry.count[w] as f64;
                out.values[i + 1] = entry.cents[w] as f64 / 100.0;
            }
            for (slot, &(pair, member_dim)) in dim.distinct.iter().enumerate() {
                let set = &mut entry.distinct[slot];
                if let Some(m) = member_hashes[member_dim] {
                    touch_member(set, m, now_ms);
                }
                for (w, n) in count_members(set, now_ms).into_iter().enumerate() {
                    out.values[distinct_index(pair, w)] = n;
                }
            }
        }
    }

    /// Number of keys tracked per dimension.
    pub fn keys(&self) -> [usize; 6] {
        let mut out = [0; 6];
        for (d, dim) in self.dims.iter().enumerate() {
            out[d] = dim.shards.iter().map(|s| s.lock().len()).sum();
        }
        out
    }
}

/// Frees at least an eighth of a full shard: idle keys first, then the least recently updated.
fn evict(map: &mut KeyMap, keys_max: usize, now_ms: u64) {
    let idle_before = now_ms.saturating_sub(WINDOW_MS[2]);
    map.retain(|_, e| e.last_seen_ms > idle_before);
    let target = keys_max - keys_max / 8;
    if map.len() <= target {
        return;
    }
    let mut seen: Vec<u64> = map.values().map(|e| e.last_seen_ms).collect();
    let drop = map.len() - target;
    let (_, threshold, _) = seen.select_nth_unstable(drop - 1);
    let threshold = *threshold;
    map.retain(|_, e| e.last_seen_ms > threshold);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{DIM_CARD, DIM_DEVICE, DIM_IP, DIM_MERCHANT};
    use crate::input::RiskInput;

    fn input<'a>(card: &'a str, device: &'a str) -> RiskInput<'a> {
        RiskInput {
            merchant_id: "m1",
            amount: 1000,
            currency: "USD",
            card: Some(card),
            device_id: Some(device),
            ip: Some("1.2.3.4"),
            ..Default::default()
        }
    }

    fn observe(store: &VelocityStore, i: &RiskInput<'_>, now_ms: u64) -> Features {
        let ctx = Context::new(i);
        let mut f = Features::default();
        store.observe(&Event::from_context(&ctx), now_ms, true, &mut f);
        f
    }

    #[test]
    fn count_includes_current_payment_and_sums_amounts() {
        let store = VelocityStore::new(VelocityConfig::default());
        let i = input("tok_visa", "d1");
        for n in 1..=4 {
            let f = observe(&store, &i, 1_000 * n);
            assert_eq!(f.values[velocity_index(DIM_CARD, 1)], n as f64);
            assert_eq!(f.values[velocity_index(DIM_CARD, 1) + 1], 10.0 * n as f64);
            assert_eq!(f.values[velocity_index(DIM_MERCHANT, 0)], n as f64);
        }
        let f = Features::default();
        assert!(f.values[velocity_index(DIM_CARD, 0)].is_nan());
    }

    #[test]
    fn one_minute_window_expires_exactly_at_its_length_for_bucket_aligned_events() {
        let store = VelocityStore::new(VelocityConfig::default());
        let a = input("tok_a", "d1");
        let b = input("tok_b", "d2");
        observe(&store, &a, 0);
        // At 59_999 ms the first event is still counted, at 60_000 it is gone.
        assert_eq!(
            observe(&store, &b, 59_999).values[velocity_index(DIM_IP, 0)],
            2.0
        );
        assert_eq!(
            observe(&store, &b, 60_000).values[velocity_index(DIM_IP, 0)],
            2.0
        );
        let f = observe(&store, &b, 60_000);
        assert_eq!(f.values[velocity_index(DIM_IP, 0)], 3.0);
        assert_eq!(f.values[velocity_index(DIM_IP, 1)], 4.0);
    }

    #[test]
    fn unaligned_event_expires_with_its_bucket() {
        let store = VelocityStore::new(VelocityConfig::default());
        let a = input("tok_a", "d1");
        observe(&store, &a, 1_999); // bucket 0 of the 1m window (2 s buckets)
        let peek = |now| {
            let ctx = Context::new(&a);
            let mut f = Features::default();
            store.observe(&Event::from_context(&ctx), now, false, &mut f);
            f.values[velocity_index(DIM_CARD, 0)]
        };
        assert_eq!(peek(59_999), 2.0);
        assert_eq!(
            peek(60_000),
            1.0,
            "58.001 s old but its bucket left the window"
        );
        // Peeking recorded nothing.
        assert_eq!(peek(1_999), 2.0);
    }

    #[test]
    fn day_window_and_late_events() {
        let store = VelocityStore::new(VelocityConfig::default());
        let a = input("tok_a", "d1");
        observe(&store, &a, 10_000_000);
        let f = observe(&store, &a, 9_000_000); // late: added to the newest bucket
        assert_eq!(f.values[velocity_index(DIM_CARD, 2)], 2.0);
        let f = observe(&store, &a, 10_000_000 + 86_400_000);
        assert_eq!(f.values[velocity_index(DIM_CARD, 2)], 1.0);
    }

    #[test]
    fn distinct_cards_per_device_by_window_and_saturation() {
        let store = VelocityStore::new(VelocityConfig::default());
        let pair = DISTINCT
            .iter()
            .position(|p| p.0 == "cards_per_device")
            .unwrap();
        observe(&store, &input("tok_1", "dev"), 0);
        observe(&store, &input("tok_2", "dev"), 1_000);
        let f = observe(&store, &input("tok_1", "dev"), 2_000);
        assert_eq!(f.values[distinct_index(pair, 0)], 2.0);
        // tok_2 last seen at 1_000: it leaves the 1 m window at 61_000, tok_1 at 62_000.
        let f = observe(&store, &input("tok_3", "dev"), 61_000);
        assert_eq!(f.values[distinct_index(pair, 0)], 2.0);
        assert_eq!(f.values[distinct_index(pair, 1)], 3.0);
        for i in 0..100 {
            observe(&store, &input(&format!("tok_x{i}"), "dev"), 100_000 + i);
        }
        let f = observe(&store, &input("tok_x99", "dev"), 100_200);
        assert_eq!(
            f.values[distinct_index(pair, 1)],
            DISTINCT_MEMBERS_MAX as f64
        );
        let _ = DIM_DEVICE;
    }

    #[test]
    fn memory_is_bounded_by_eviction() {
        let store = VelocityStore::new(VelocityConfig {
            keys_per_dimension_max: 256,
        });
        for i in 0..5_000u64 {
            observe(&store, &input(&format!("tok_{i}"), "d"), i);
        }
        assert!(store.keys()[DIM_CARD] <= 256, "{:?}", store.keys());
        // The most recent key survived eviction.
        let f = observe(&store, &input("tok_4999", "d"), 5_000);
        assert_eq!(f.values[velocity_index(DIM_CARD, 0)], 2.0);
    }
}
