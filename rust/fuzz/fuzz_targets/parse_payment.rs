//! The create body parser: never panics, and never accepts a body the card-number guard refuses.
#![no_main]

use fastpath::config::Config;
use fastpath::guard::{contains_pan, scan_json};
use fastpath::validate::parse_payment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Config::default();
    match parse_payment(data, &cfg) {
        Ok(req) => {
            // Accepted: the guard agrees, and no accepted text field holds a card number.
            assert!(scan_json(data, true).is_ok());
            assert!(!contains_pan(&req.payment_method));
            assert!(!req.description.as_deref().is_some_and(contains_pan));
            assert!(!req.metadata.iter().any(|(k, v)| contains_pan(k) || contains_pan(v)));
        }
        Err(e) => {
            // Refused: the error never repeats a card number.
            assert!(!contains_pan(&e.message));
            assert!(!e.param.as_deref().is_some_and(contains_pan));
        }
    }
});
