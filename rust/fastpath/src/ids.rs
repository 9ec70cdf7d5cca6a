//! Payment ids: derived from (merchant, idempotency key) when a key is given, so that replays converge
//! on one id even across processes; otherwise time-ordered random ids.

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | *b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

pub fn derived_payment_id(merchant: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"payment\0");
    h.update(merchant.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    format!("pay_{}", base32(&h.finalize()[..15]))
}

fn rng_state() -> &'static AtomicU64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut seed = [0u8; 8];
        if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
            let h = Sha256::digest(&bytes);
            seed.copy_from_slice(&h[..8]);
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        AtomicU64::new(u64::from_le_bytes(seed) ^ t as u64 ^ ((std::process::id() as u64) << 32))
    })
}

/// splitmix64 over a shared counter: unique per call, uniformly spread.
pub fn random_u64() -> u64 {
    let mut z = rng_state()
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 48 bits of milliseconds then 72 random bits: ids sort by creation time.
pub fn random_payment_id(now_ms: u64) -> String {
    let mut b = [0u8; 15];
    b[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
    b[6..14].copy_from_slice(&random_u64().to_le_bytes());
    b[14] = random_u64() as u8;
    format!("pay_{}", base32(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_scoped() {
        assert_eq!(derived_payment_id("m", "k"), derived_payment_id("m", "k"));
        assert_ne!(derived_payment_id("m", "k"), derived_payment_id("m2", "k"));
        assert_eq!(derived_payment_id("m", "k").len(), 4 + 24);
    }

    #[test]
    fn random_ids_are_unique_and_time_ordered() {
        let a = random_payment_id(1_000);
        let b = random_payment_id(2_000);
        assert!(a < b);
        let set: std::collections::HashSet<_> = (0..10_000).map(|_| random_payment_id(5)).collect();
        assert_eq!(set.len(), 10_000);
    }
}
