//! The latency-critical path of the payment gateway.
//!
//! Pure-Rust modules hold all the logic and are tested with `cargo test`; the `py` module is a thin
//! PyO3 binding compiled only with the `python` feature (the maturin build).

pub mod config;
pub mod currency;
pub mod engine;
pub mod error;
pub mod guard;
pub mod idempotency;
pub mod ids;
pub mod keyfilter;
pub mod maintenance;
pub mod metrics;
pub mod ratelimit;
pub mod validate;
pub mod wal;

pub mod geo;
#[cfg(feature = "python")]
mod py;
