//! The card-number scanner: never panics, masking leaves nothing it would find, and the JSON scan
//! agrees with the detector on a string it is given.
#![no_main]

use fastpath::guard::{contains_pan, mask_pans, scan_json, JsonRefusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scan_json(data, true);
    let _ = scan_json(data, false);
    if let Ok(text) = std::str::from_utf8(data) {
        let masked = mask_pans(text);
        assert!(!contains_pan(&masked), "masking left a card number");
        assert_eq!(contains_pan(text), masked.as_ref() != text);
        let as_json = serde_json_string(text);
        let found = matches!(scan_json(as_json.as_bytes(), false), Err(JsonRefusal::CardNumber));
        assert_eq!(found, contains_pan(text));
    }
});

/// `text` as a JSON string literal (quotes, backslashes and control characters escaped).
fn serde_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
