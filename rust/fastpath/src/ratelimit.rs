//! Token-bucket rate limit per merchant.

use ahash::RandomState;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;

const SHARDS: usize = 16;
/// Merchants tracked per shard; past it, buckets that have refilled completely are dropped
/// (a full bucket carries no state worth keeping).
const BUCKETS_PER_SHARD_MAX: usize = 65_536;

struct Bucket {
    tokens: f64,
    last_ns: u64,
}

pub struct RateLimiter {
    shards: Vec<Mutex<HashMap<String, Bucket, RandomState>>>,
    hasher: RandomState,
    default: (f64, f64),
    overrides: RwLock<HashMap<String, (f64, f64)>>,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        let state = RandomState::with_seeds(5, 6, 7, 8);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(state.clone())))
                .collect(),
            hasher: state,
            default: (rate_per_s, burst),
            overrides: RwLock::new(HashMap::new()),
        }
    }

    /// Sets a merchant's own limit; its bucket starts again full at the new size.
    pub fn set_limit(&self, merchant: &str, rate_per_s: f64, burst: f64) {
        self.overrides
            .write()
            .insert(merchant.to_string(), (rate_per_s, burst));
        self.shards[(self.hasher.hash_one(merchant) as usize) % SHARDS]
            .lock()
            .remove(merchant);
    }

    /// Takes one token, or says after how many whole seconds one will be there.
    pub fn check(&self, merchant: &str, now_ns: u64) -> Result<(), u32> {
        let (rate, burst) = self
            .overrides
            .read()
            .get(merchant)
            .copied()
            .unwrap_or(self.default);
        let mut shard = self.shards[(self.hasher.hash_one(merchant) as usize) % SHARDS].lock();
        if shard.len() >= BUCKETS_PER_SHARD_MAX && !shard.contains_key(merchant) {
            shard.retain(|_, b| {
                b.tokens + (now_ns.saturating_sub(b.last_ns)) as f64 * rate / 1e9 < burst
            });
        }
        let b = shard.entry(merchant.to_string()).or_insert(Bucket {
            tokens: burst,
            last_ns: now_ns,
        });
        let elapsed_s = now_ns.saturating_sub(b.last_ns) as f64 / 1e9;
        b.tokens = (b.tokens + elapsed_s * rate).min(burst);
        b.last_ns = now_ns;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / rate).ceil() as u32).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let r = RateLimiter::new(10.0, 3.0);
        for _ in 0..3 {
            assert!(r.check("m", 0).is_ok());
        }
        assert_eq!(r.check("m", 0), Err(1));
        assert!(
            r.check("m", 100_000_000).is_ok(),
            "one token after 100 ms at 10/s"
        );
        assert!(r.check("m", 100_000_000).is_err());
        assert!(
            r.check("other", 0).is_ok(),
            "merchants have separate buckets"
        );
    }

    #[test]
    fn per_merchant_override() {
        let r = RateLimiter::new(1000.0, 1000.0);
        r.set_limit("slow", 0.5, 1.0);
        assert!(r.check("slow", 0).is_ok());
        assert_eq!(r.check("slow", 0), Err(2));
    }
}
