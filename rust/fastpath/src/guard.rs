//! The one card-number guard: the detector, its masking form, and a strict scan of JSON bodies.
//!
//! Every part of the gateway that must refuse or hide card numbers calls these functions (the Python
//! side through `gateway._fastpath`), so that "looks like a card number" means one thing everywhere.
//! A card-number-like run is a Luhn-valid run of 12 to 19 ASCII digits, with single spaces or dashes
//! allowed between digits (`4242 4242 4242 4242`). A run is a maximal digit sequence: longer runs are
//! not card numbers, and checking every window of them would refuse one in ten long order numbers.
//!
//! JSON bodies are scanned as they are parsed, before any value is kept: every key and every string
//! (after its escapes are decoded, so `\u0034` is a `4`), and optionally every number. A key that
//! appears twice in one object is refused: a decoder that keeps the last value would otherwise let
//! the first one through unscanned, and the two sides of the gateway could disagree on which is meant.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// Nesting is refused beyond this depth so a hostile body cannot make the scan expensive.
pub const JSON_DEPTH_MAX: usize = 8;
/// The digits of a card number: shorter or longer runs are not card numbers.
pub const PAN_DIGITS_MIN: usize = 12;
pub const PAN_DIGITS_MAX: usize = 19;
/// What a masked run is replaced with.
pub const PAN_MASK: &str = "[REDACTED]";

/// True when `digits` (ASCII digits only) passes the Luhn check.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = (d - b'0') as u32;
        if !i.is_multiple_of(2) {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Calls `found(start, end)` (byte offsets into `text`) for every card-number-like run, in order;
/// stops early when `found` returns false. Allocates nothing: a run's digits are kept on the stack
/// (a run longer than `PAN_DIGITS_MAX` is only counted), and a text with fewer than
/// `PAN_DIGITS_MIN` digits in all is passed over in one pass.
fn scan(text: &str, mut found: impl FnMut(usize, usize) -> bool) {
    let bytes = text.as_bytes();
    if bytes.len() < PAN_DIGITS_MIN
        || bytes.iter().filter(|b| b.is_ascii_digit()).count() < PAN_DIGITS_MIN
    {
        return;
    }
    let mut digits = [0u8; PAN_DIGITS_MAX];
    let mut n = 0usize;
    let mut start = 0;
    let mut i = 0;
    while i <= bytes.len() {
        match bytes.get(i).copied() {
            Some(c) if c.is_ascii_digit() => {
                if n == 0 {
                    start = i;
                }
                if n < PAN_DIGITS_MAX {
                    digits[n] = c;
                }
                n += 1;
            }
            Some(b' ') | Some(b'-')
                if n > 0 && bytes.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {}
            _ => {
                if (PAN_DIGITS_MIN..=PAN_DIGITS_MAX).contains(&n)
                    && luhn_valid(&digits[..n])
                    && !found(start, i)
                {
                    return;
                }
                n = 0;
            }
        }
        i += 1;
    }
}

/// True when the decimal digits of `v` are a card-number-like run (a number in a JSON body).
pub fn integer_is_pan(v: u64) -> bool {
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut rest = v;
    loop {
        digits[n] = b'0' + (rest % 10) as u8;
        n += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    digits[..n].reverse();
    (PAN_DIGITS_MIN..=PAN_DIGITS_MAX).contains(&n) && luhn_valid(&digits[..n])
}

/// True when `text` contains a card-number-like run.
pub fn contains_pan(text: &str) -> bool {
    let mut any = false;
    scan(text, |_, _| {
        any = true;
        false
    });
    any
}

/// `text` with every card-number-like run replaced by `PAN_MASK` (borrowed when there is none).
pub fn mask_pans(text: &str) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut last = 0;
    scan(text, |start, end| {
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[last..start]);
        o.push_str(PAN_MASK);
        last = end;
        true
    });
    match out {
        None => Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[last..]);
            Cow::Owned(o)
        }
    }
}

/// Hex tokens at least this long are opaque identifiers (a UUID without dashes, a hash).
pub const OPAQUE_HEX_CHARS_MIN: usize = 32;

/// True when an idempotency key holds a card-number-like run outside an opaque identifier.
///
/// Keys are most often UUIDs (`550e8400-e29b-41d4-a716-446655440000`, or its 32 hex digits): a
/// UUID's digit groups, joined by its dashes or cut by its letters, form a Luhn-valid 12-19 digit
/// run in about 1 key in 300, and refusing those would refuse 1 payment in 300 for no reason. So a
/// token that is a UUID, or a run of at least `OPAQUE_HEX_CHARS_MIN` hex characters, bounded by
/// non-alphanumeric characters or the key's ends, is not read for card numbers; everything else
/// in the key is, with the same detector as every other input (`order-4242424242424242` is refused).
pub fn key_contains_pan(key: &str) -> bool {
    if !contains_pan(key) {
        return false;
    }
    let b = key.as_bytes();
    let mut masked = b.to_vec();
    let bounded = |i: usize| i >= b.len() || !b[i].is_ascii_alphanumeric();
    // Canonical UUIDs: 8-4-4-4-12 hex digits.
    let mut i = 0;
    while i + 36 <= b.len() {
        if (i == 0 || bounded(i - 1)) && bounded(i + 36) && is_uuid(&b[i..i + 36]) {
            masked[i..i + 36].fill(b'_');
            i += 36;
        } else {
            i += 1;
        }
    }
    // Long hex tokens.
    let mut start = 0;
    while start < b.len() {
        let mut end = start;
        while end < b.len() && b[end].is_ascii_alphanumeric() {
            end += 1;
        }
        if end - start >= OPAQUE_HEX_CHARS_MIN && b[start..end].iter().all(u8::is_ascii_hexdigit) {
            masked[start..end].fill(b'_');
        }
        start = end + 1;
    }
    // Only ASCII bytes were replaced by ASCII, so the text is still UTF-8.
    contains_pan(&String::from_utf8_lossy(&masked))
}

fn is_uuid(t: &[u8]) -> bool {
    t.iter().enumerate().all(|(j, c)| {
        if matches!(j, 8 | 13 | 18 | 23) {
            *c == b'-'
        } else {
            c.is_ascii_hexdigit()
        }
    })
}

/// Why a JSON body was refused by `scan_json`.
#[derive(Debug)]
pub enum JsonRefusal {
    /// A key, string (or number, when scanned) contains a card-number-like run. Where is not said.
    CardNumber,
    /// A key appears twice in one object (the key, cut to 64 characters; it passed the card scan).
    DuplicateKey(String),
    /// Nested deeper than `JSON_DEPTH_MAX`.
    TooDeep,
    /// Not JSON at all: the parser's error (line and column, never the text).
    Invalid(serde_json::Error),
}

impl fmt::Display for JsonRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CardNumber => write!(f, "card number"),
            Self::DuplicateKey(k) => write!(f, "duplicate key {k:?}"),
            Self::TooDeep => write!(f, "nested deeper than {JSON_DEPTH_MAX} levels"),
            Self::Invalid(e) => {
                write!(f, "invalid JSON (line {}, column {})", e.line(), e.column())
            }
        }
    }
}

/// Parses `body` only to scan it (nothing is kept): refuses card numbers in keys and strings (and
/// numbers when `numbers`), duplicate keys, and nesting deeper than `JSON_DEPTH_MAX`.
pub fn scan_json(body: &[u8], numbers: bool) -> Result<(), JsonRefusal> {
    let mut refusal = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = Scan {
        depth: 0,
        numbers,
        refusal: &mut refusal,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    match (refusal, parsed) {
        (Some(r), _) => Err(r),
        (None, Err(e)) => Err(JsonRefusal::Invalid(e)),
        (None, Ok(())) => Ok(()),
    }
}

/// `scan_json` (numbers scanned) that also returns the parsed value: the create path's one pass over
/// its body.
pub fn scan_value(body: &[u8]) -> Result<Value, JsonRefusal> {
    let mut refusal = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = Build(Scan {
        depth: 0,
        numbers: true,
        refusal: &mut refusal,
    });
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match (refusal, parsed) {
        (Some(r), _) => Err(r),
        (None, Err(e)) => Err(JsonRefusal::Invalid(e)),
        (None, Ok(v)) => Ok(v),
    }
}

struct Scan<'r> {
    depth: usize,
    numbers: bool,
    refusal: &'r mut Option<JsonRefusal>,
}

impl Scan<'_> {
    fn refuse<E: serde::de::Error>(&mut self, r: JsonRefusal) -> Result<(), E> {
        Err(self.fail(r))
    }

    /// Records why the body is refused, and the error that stops the parser.
    fn fail<E: serde::de::Error>(&mut self, r: JsonRefusal) -> E {
        *self.refusal = Some(r);
        E::custom("refused")
    }

    fn text<E: serde::de::Error>(&mut self, s: &str) -> Result<(), E> {
        if contains_pan(s) {
            return self.refuse(JsonRefusal::CardNumber);
        }
        Ok(())
    }

    fn integer<E: serde::de::Error>(&mut self, v: u64) -> Result<(), E> {
        if self.numbers && integer_is_pan(v) {
            return self.refuse(JsonRefusal::CardNumber);
        }
        Ok(())
    }

    fn float<E: serde::de::Error>(&mut self, v: f64) -> Result<(), E> {
        if self.numbers {
            return self.text(&v.to_string());
        }
        Ok(())
    }

    fn child(&mut self) -> Scan<'_> {
        Scan {
            depth: self.depth + 1,
            numbers: self.numbers,
            refusal: self.refusal,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(mut self, d: D) -> Result<(), D::Error> {
        if self.depth > JSON_DEPTH_MAX {
            return self.refuse(JsonRefusal::TooDeep);
        }
        d.deserialize_any(self)
    }
}

/// The keys seen in one object: a short list searched in place (most objects have a few keys, and
/// the keys are borrowed from the body when they have no escapes), a set past `FEW_KEYS_MAX` so that
/// an object with many keys stays linear.
#[derive(Default)]
struct Keys<'de> {
    few: Vec<Cow<'de, str>>,
    many: Option<HashSet<Cow<'de, str>>>,
}

const FEW_KEYS_MAX: usize = 16;

impl<'de> Keys<'de> {
    /// False when `key` was seen before.
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        if let Some(set) = &mut self.many {
            return set.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        if self.few.len() < FEW_KEYS_MAX {
            self.few.push(key);
        } else {
            let mut set: HashSet<Cow<'de, str>> = self.few.drain(..).collect();
            set.insert(key);
            self.many = Some(set);
        }
        true
    }
}

/// A key, scanned and remembered by its object's visitor.
struct Key<'a, 'r, 'de>(&'a mut Scan<'r>, &'a mut Keys<'de>);

impl<'de> DeserializeSeed<'de> for Key<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let key = d.deserialize_str(KeyText)?;
        self.0.text(&key)?;
        if !self.1.insert(key.clone()) {
            let shown: String = key.chars().take(64).collect();
            return self.0.refuse(JsonRefusal::DuplicateKey(shown));
        }
        Ok(())
    }
}

/// A key's text, borrowed from the body when it has no escapes.
struct KeyText;

impl<'de> Visitor<'de> for KeyText {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<(), E> {
        self.integer(v.unsigned_abs())
    }

    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<(), E> {
        self.integer(v)
    }

    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<(), E> {
        self.float(v)
    }

    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<(), E> {
        self.text(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.child())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut keys = Keys::default();
        while map.next_key_seed(Key(&mut self, &mut keys))?.is_some() {
            map.next_value_seed(self.child())?;
        }
        Ok(())
    }
}

/// The value-building form of `Scan`: the same checks, in the same order, on the way to a `Value`.
struct Build<'r>(Scan<'r>);

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(mut self, d: D) -> Result<Value, D::Error> {
        if self.0.depth > JSON_DEPTH_MAX {
            return Err(self.0.fail(JsonRefusal::TooDeep));
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<Value, E> {
        self.0.integer(v.unsigned_abs())?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<Value, E> {
        self.0.integer(v)?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<Value, E> {
        self.0.float(v)?;
        Ok(Value::from(v))
    }

    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<Value, E> {
        self.0.text(v)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(mut self, v: String) -> Result<Value, E> {
        self.0.text(&v)?;
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Build(self.0.child()))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(BuildKey(&mut self.0))? {
            if out.contains_key(key.as_str()) {
                let shown: String = key.chars().take(64).collect();
                return Err(self.0.fail(JsonRefusal::DuplicateKey(shown)));
            }
            let v = map.next_value_seed(Build(self.0.child()))?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// A key of the value-building form: scanned, then kept.
struct BuildKey<'a, 'r>(&'a mut Scan<'r>);

impl<'de> DeserializeSeed<'de> for BuildKey<'_, '_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let key = d.deserialize_str(KeyText)?;
        self.0.text(&key)?;
        Ok(key.into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_masks_runs() {
        assert!(contains_pan("card 4242 4242 4242 4242 here"));
        assert!(!contains_pan("order 4242424242424241"));
        assert!(!contains_pan("42424242424242424242424")); // a run longer than 19 digits
        assert_eq!(mask_pans("a 4242-4242-4242-4242 b"), "a [REDACTED] b");
        assert_eq!(
            mask_pans("x4242424242424242y4242424242424242"),
            "x[REDACTED]y[REDACTED]"
        );
        assert!(matches!(mask_pans("nothing 12"), Cow::Borrowed(_)));
        // Idempotency keys: UUIDs and long hex tokens are opaque, any other run is read.
        assert!(contains_pan("a6d3afa8-c491-4764-8511-0637b15f7e65"));
        assert!(!key_contains_pan("a6d3afa8-c491-4764-8511-0637b15f7e65"));
        assert!(!key_contains_pan(
            "order-a6d3afa8-c491-4764-8511-0637b15f7e65"
        ));
        assert!(!key_contains_pan("k:4242424242424242abcdef0123456789"));
        assert!(key_contains_pan("order-4242424242424242"));
        assert!(key_contains_pan(
            "4242424242424242:550e8400-e29b-41d4-a716-446655440000"
        ));
        assert!(key_contains_pan("x4242424242424242abcdef"));
        assert!(!key_contains_pan("order-1001"));
        assert!(integer_is_pan(4242424242424242));
        assert!(!integer_is_pan(4242424242424241));
        assert!(!integer_is_pan(0));
        assert!(!integer_is_pan(u64::MAX));
        assert!(!contains_pan("4242 4242 4242 4242 4242 4242")); // one run of 24 digits
    }

    #[test]
    fn scan_json_refuses_duplicates_escapes_and_depth() {
        assert!(scan_json(br#"{"a":1,"b":{"c":[1,"x"]}}"#, true).is_ok());
        assert!(matches!(
            scan_json(br#"{"amount":9223372036854775809,"amount":2}"#, true),
            Err(JsonRefusal::CardNumber)
        ));
        assert!(matches!(
            scan_json(br#"{"amount":1,"amount":2}"#, true),
            Err(JsonRefusal::DuplicateKey(k)) if k == "amount"
        ));
        assert!(matches!(
            scan_json(br#"{"d":"\u0034242424242424242"}"#, false),
            Err(JsonRefusal::CardNumber)
        ));
        assert!(scan_json(br#"{"since_ms":4242424242424242}"#, false).is_ok());
        assert!(matches!(
            scan_json(br#"{"4242424242424242":1}"#, false),
            Err(JsonRefusal::CardNumber)
        ));
        assert!(matches!(
            scan_json(&[b'['; 20], true),
            Err(JsonRefusal::TooDeep)
        ));
        assert!(matches!(
            scan_json(b"{\"a\":", true),
            Err(JsonRefusal::Invalid(_))
        ));
        assert!(matches!(
            scan_json(b"{} x", true),
            Err(JsonRefusal::Invalid(_))
        ));
        let many: Vec<String> = (0..100).map(|i| format!("\"k{i}\":1")).collect();
        let object = format!("{{{}}}", many.join(","));
        assert!(scan_json(object.as_bytes(), true).is_ok());
        let again = format!("{{{},\"k3\":2}}", many.join(","));
        assert!(
            matches!(scan_json(again.as_bytes(), true), Err(JsonRefusal::DuplicateKey(k)) if k == "k3")
        );
        assert!(matches!(
            scan_json(br#"{"a\u0062":1,"ab":2}"#, true),
            Err(JsonRefusal::DuplicateKey(_))
        ));
    }

    #[test]
    fn scan_value_refuses_what_scan_json_refuses_and_parses_the_rest() {
        let body = br#"{"a":1,"b":{"c":[1,"x",null,true,-2,1.5]}}"#;
        let v = scan_value(body).unwrap();
        assert_eq!(v, serde_json::from_slice::<Value>(body).unwrap());
        for bad in [
            &br#"{"amount":9223372036854775809,"amount":2}"#[..],
            br#"{"amount":1,"amount":2}"#,
            br#"{"d":"\u0034242424242424242"}"#,
            br#"{"4242424242424242":1}"#,
            br#"[[[[[[[[[[[1]]]]]]]]]]]"#,
            b"{\"a\":",
        ] {
            let a = scan_json(bad, true).unwrap_err().to_string();
            let b = scan_value(bad).unwrap_err().to_string();
            assert_eq!(a, b, "{}", String::from_utf8_lossy(bad));
        }
    }
}
