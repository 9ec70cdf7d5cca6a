//! Velocity shared between processes (cluster mode): what one payment contributes, in a form an
//! external store can apply (`python/gateway/shared/redis_velocity.py` does it in one Redis script),
//! and the counters that store answers, mapped back into the features the rules and the model read.
//!
//! The store applies exactly the semantics of [`crate::velocity`] (bucketed windows, distinct members
//! capped at 64 by most recent); `tests/contract/test_velocity_contract.py` proves both give the same
//! features for the same events. Keys leave the process only as hashes: a card token, an e-mail or an
//! IP address never appears in the shared store, which sees 64-bit SHA-256 prefixes, separated per
//! dimension so that equal strings of two dimensions do not share counters.

use std::fmt;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::attrs::{Features, DIMS, DISTINCT, NUM_NUMERIC, VELOCITY_BASE, WINDOWS};
use crate::velocity::Event;

/// Numeric attributes produced by velocity: counts and USD sums per dimension and window, then the
/// distinct counts, laid out as in [`Features::values`] from [`VELOCITY_BASE`] on.
pub const VELOCITY_FEATURES: usize = NUM_NUMERIC - VELOCITY_BASE;
const COUNTER_FEATURES: usize = DIMS.len() * WINDOWS.len() * 2;
/// Hex digits of a key hash (64 bits).
pub const KEY_HASH_HEX_LEN: usize = 16;
/// Domain separation of the key hashes; a new version changes every shared key.
const HASH_DOMAIN: &[u8] = b"gateway.velocity.v1";

/// Counters sent by the store are in `[-1, COUNTER_MAX]`; -1 marks a dimension absent from the payment.
pub const COUNTER_MAX: i64 = 1 << 53;

/// The hashed key of `value` in dimension `dim` (an index into [`DIMS`]): 16 lowercase hex digits.
pub fn key_hash(dim: usize, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update([0, dim as u8, 0]);
    h.update(value.as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(KEY_HASH_HEX_LEN);
    for b in &digest[..KEY_HASH_HEX_LEN / 2] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What one payment contributes to the shared store: its USD amount in cents and, per dimension of
/// [`DIMS`], the hash of its key (`None` when the payment has no usable key for that dimension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEvent {
    pub cents: i64,
    pub keys: [Option<String>; 6],
}

impl SharedEvent {
    pub fn from_event(event: &Event<'_>) -> SharedEvent {
        let mut keys: [Option<String>; 6] = Default::default();
        for (d, k) in event.keys.iter().enumerate() {
            keys[d] = k.map(|k| key_hash(d, k));
        }
        SharedEvent {
            cents: event.cents,
            keys,
        }
    }
}

/// Why counters from the shared store were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedVelocityError {
    Length { len: usize },
    OutOfRange { index: usize, value: i64 },
}

impl fmt::Display for SharedVelocityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharedVelocityError::Length { len } => write!(
                f,
                "shared velocity needs exactly {VELOCITY_FEATURES} counters, got {len}"
            ),
            SharedVelocityError::OutOfRange { index, value } => write!(
                f,
                "shared velocity counter {index} is {value}, outside -1..={COUNTER_MAX}"
            ),
        }
    }
}

impl std::error::Error for SharedVelocityError {}

/// Velocity features computed elsewhere, to be used in place of the engine's own store.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedFeatures {
    pub values: [f64; VELOCITY_FEATURES],
}

impl SharedFeatures {
    /// From the store's integers: per dimension and window `count, cents` (in [`DIMS`] then
    /// [`WINDOWS`] order), then the distinct counts per [`DISTINCT`] pair and window; -1 is missing.
    pub fn from_counters(raw: &[i64]) -> Result<SharedFeatures, SharedVelocityError> {
        if raw.len() != VELOCITY_FEATURES {
            return Err(SharedVelocityError::Length { len: raw.len() });
        }
        let mut values = [f64::NAN; VELOCITY_FEATURES];
        for (index, &value) in raw.iter().enumerate() {
            if !(-1..=COUNTER_MAX).contains(&value) {
                return Err(SharedVelocityError::OutOfRange { index, value });
            }
            if value < 0 {
                continue;
            }
            let is_amount = index < COUNTER_FEATURES && index % 2 == 1;
            values[index] = if is_amount {
                value as f64 / 100.0
            } else {
                value as f64
            };
        }
        Ok(SharedFeatures { values })
    }

    /// The velocity slice of `features`, e.g. as computed by the local store.
    pub fn from_features(features: &Features) -> SharedFeatures {
        let mut values = [f64::NAN; VELOCITY_FEATURES];
        values.copy_from_slice(&features.values[VELOCITY_BASE..]);
        SharedFeatures { values }
    }

    /// Writes these velocity features into `features` (other attributes are untouched).
    pub fn apply(&self, features: &mut Features) {
        features.values[VELOCITY_BASE..].copy_from_slice(&self.values);
    }
}

const _: () = assert!(VELOCITY_FEATURES == COUNTER_FEATURES + DISTINCT.len() * WINDOWS.len());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{distinct_index, velocity_index, DIM_CARD, DIM_EMAIL, DIM_MERCHANT};
    use crate::input::{Context, RiskInput};

    #[test]
    fn keys_are_hashed_per_dimension_and_never_raw() {
        let input = RiskInput {
            merchant_id: "m1",
            amount: 1234,
            currency: "EUR",
            card: Some("tok_visa"),
            email: Some("tok_visa"),
            ..Default::default()
        };
        let ctx = Context::new(&input);
        let e = SharedEvent::from_event(&Event::from_context(&ctx));
        assert_eq!(
            e.cents, 1333,
            "12.34 EUR at 1.08 is 13.33 USD, rounded half up"
        );
        let card = e.keys[DIM_CARD].clone().unwrap();
        let email = e.keys[DIM_EMAIL].clone().unwrap();
        assert_eq!(card.len(), KEY_HASH_HEX_LEN);
        assert!(card
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(card, email, "same string, two dimensions, two keys");
        assert_eq!(
            card,
            key_hash(DIM_CARD, "tok_visa"),
            "stable across processes"
        );
        assert!(e.keys[DIM_MERCHANT].is_some());
        assert_eq!(e.keys[2..5], [None, None, None]);
    }

    #[test]
    fn counters_map_to_features_with_missing_dimensions() {
        let mut raw = vec![-1i64; VELOCITY_FEATURES];
        raw[0] = 3; // card count 1m
        raw[1] = 4_550; // card cents 1m
        raw[DIMS.len() * WINDOWS.len() * 2] = 2; // cards_per_device 1m
        let s = SharedFeatures::from_counters(&raw).unwrap();
        let mut f = Features::default();
        s.apply(&mut f);
        assert_eq!(f.values[velocity_index(DIM_CARD, 0)], 3.0);
        assert_eq!(f.values[velocity_index(DIM_CARD, 0) + 1], 45.5);
        assert_eq!(f.values[distinct_index(0, 0)], 2.0);
        assert!(f.values[velocity_index(DIM_CARD, 1)].is_nan());
        let back = SharedFeatures::from_features(&f);
        assert_eq!(back.values.map(f64::to_bits), s.values.map(f64::to_bits));
    }

    #[test]
    fn malformed_counters_are_refused() {
        assert_eq!(
            SharedFeatures::from_counters(&[0; 3]),
            Err(SharedVelocityError::Length { len: 3 })
        );
        let mut raw = vec![0i64; VELOCITY_FEATURES];
        raw[7] = -2;
        let err = SharedFeatures::from_counters(&raw).unwrap_err();
        assert_eq!(
            err,
            SharedVelocityError::OutOfRange {
                index: 7,
                value: -2
            }
        );
        assert!(err.to_string().contains("counter 7"));
    }
}
