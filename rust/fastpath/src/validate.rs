//! Decoding and validation of `POST /v1/payments` bodies, with a precise `param` on every error.
//!
//! Order matters for card data: the whole body is scanned for anything that looks like a card number
//! before any field is checked, so that no later error message can echo one.

// Errors are the cold path and each is built once per refused request; boxing them would only move
// the cost, so the large `Err` variant is accepted here.
#![allow(clippy::result_large_err)]

use crate::config::Config;
use crate::currency;
use crate::error::ApiError;
pub use crate::guard::{contains_pan, luhn_valid, JSON_DEPTH_MAX};
use crate::guard::{scan_value, JsonRefusal};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const PAYMENT_METHOD_CHARS_MAX: usize = 128;
pub const EMAIL_CHARS_MAX: usize = 254;
pub const DEVICE_ID_CHARS_MAX: usize = 128;
pub const CUSTOMER_ID_CHARS_MAX: usize = 128;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Customer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

/// A validated, normalised payment request. Its JSON form is what the idempotency fingerprint hashes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PaymentRequest {
    pub amount: i64,
    pub currency: String,
    pub payment_method: String,
    pub capture: bool,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub customer: Customer,
}

pub fn pan_error() -> ApiError {
    let mut e = ApiError::invalid(
        "card_number_not_allowed",
        "body",
        "The request contains what looks like a card number. Send a payment method token instead; raw card numbers are never accepted.",
    );
    // The field is deliberately not named: naming it would tell where the card number sits in logs.
    e.param = None;
    e
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn take_string(
    obj: &mut Map<String, Value>,
    key: &str,
    param: &str,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if chars(&s) > max {
                Err(ApiError::invalid(
                    "parameter_too_long",
                    param,
                    format!("{param} must be at most {max} characters."),
                ))
            } else {
                Ok(Some(s))
            }
        }
        Some(_) => Err(ApiError::invalid(
            "parameter_invalid_type",
            param,
            format!("{param} must be a string."),
        )),
    }
}

fn reject_unknown(obj: &Map<String, Value>, prefix: Option<&str>) -> Result<(), ApiError> {
    if let Some(k) = obj.keys().next() {
        let param = match prefix {
            Some(p) => format!("{p}[{k}]"),
            None => k.clone(),
        };
        return Err(ApiError::invalid(
            "parameter_unknown",
            param.clone(),
            format!("Received unknown parameter: {param}"),
        ));
    }
    Ok(())
}

/// Parses and validates a body. `body` has already passed the size check.
pub fn parse_payment(body: &[u8], cfg: &Config) -> Result<PaymentRequest, ApiError> {
    if body.len() > cfg.body_bytes_max {
        return Err(ApiError::body_too_large(cfg.body_bytes_max));
    }
    // One pass that refuses card numbers (every key, string and number, duplicates included),
    // duplicate keys and deep nesting while it parses, before any field is looked at.
    let value = scan_value(body).map_err(|r| match r {
        JsonRefusal::CardNumber => pan_error(),
        JsonRefusal::DuplicateKey(k) => ApiError::invalid(
            "parameter_duplicate",
            k.clone(),
            format!("Received the parameter {k} more than once."),
        ),
        JsonRefusal::TooDeep => ApiError::malformed(format!(
            "The body is nested deeper than {JSON_DEPTH_MAX} levels."
        )),
        JsonRefusal::Invalid(e) => ApiError::malformed(format!(
            "The body is not valid JSON (line {}, column {}).",
            e.line(),
            e.column()
        )),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::malformed("The body must be a JSON object."));
    };

    let amount =
        match obj.remove("amount") {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    "parameter_missing",
                    "amount",
                    "Missing required param: amount.",
                ))
            }
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => v,
                None => return Err(ApiError::invalid(
                    "parameter_invalid_integer",
                    "amount",
                    "amount must be an integer number of minor units (e.g. 1000 for 10.00 USD).",
                )),
            },
            Some(_) => {
                return Err(ApiError::invalid(
                    "parameter_invalid_integer",
                    "amount",
                    "amount must be an integer.",
                ))
            }
        };
    if amount <= 0 {
        return Err(ApiError::invalid(
            "amount_too_small",
            "amount",
            "amount must be greater than 0.",
        ));
    }
    if amount > cfg.amount_max {
        return Err(ApiError::invalid(
            "amount_too_large",
            "amount",
            format!("amount must be at most {} minor units.", cfg.amount_max),
        ));
    }

    let currency = match take_string(&mut obj, "currency", "currency", 3)? {
        None => {
            return Err(ApiError::invalid(
                "parameter_missing",
                "currency",
                "Missing required param: currency.",
            ))
        }
        Some(c) => c.to_ascii_uppercase(),
    };
    if currency.len() != 3 || currency::exponent(&currency).is_none() {
        return Err(ApiError::invalid(
            "invalid_currency",
            "currency",
            "currency must be a three-letter ISO 4217 code in circulation (e.g. USD, EUR, JPY).",
        ));
    }

    let payment_method = match take_string(
        &mut obj,
        "payment_method",
        "payment_method",
        PAYMENT_METHOD_CHARS_MAX,
    )? {
        None => {
            return Err(ApiError::invalid(
                "parameter_missing",
                "payment_method",
                "Missing required param: payment_method.",
            ))
        }
        Some(p) => p,
    };
    let well_formed = (payment_method.starts_with("tok_") || payment_method.starts_with("pm_"))
        && payment_method.len() > 4
        && payment_method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !well_formed {
        return Err(ApiError::invalid(
            "invalid_payment_method",
            "payment_method",
            "payment_method must be a token such as tok_visa (letters, digits and underscores after tok_ or pm_).",
        ));
    }

    let capture = match obj.remove("capture") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid_type",
                "capture",
                "capture must be a boolean.",
            ))
        }
    };

    let description = take_string(
        &mut obj,
        "description",
        "description",
        cfg.description_chars_max,
    )?;
    let metadata = parse_metadata(obj.remove("metadata"), cfg)?;
    let customer = parse_customer(obj.remove("customer"))?;
    reject_unknown(&obj, None)?;

    Ok(PaymentRequest {
        amount,
        currency,
        payment_method,
        capture,
        description,
        metadata,
        customer,
    })
}

fn parse_metadata(v: Option<Value>, cfg: &Config) -> Result<BTreeMap<String, String>, ApiError> {
    let map = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid_type",
                "metadata",
                "metadata must be an object.",
            ))
        }
    };
    if map.len() > cfg.metadata_keys_max {
        return Err(ApiError::invalid(
            "metadata_too_many_keys",
            "metadata",
            format!("metadata can have at most {} keys.", cfg.metadata_keys_max),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, val) in map {
        if k.is_empty() || chars(&k) > cfg.metadata_key_chars_max {
            return Err(ApiError::invalid(
                "metadata_key_invalid",
                "metadata",
                format!(
                    "metadata keys must be 1 to {} characters.",
                    cfg.metadata_key_chars_max
                ),
            ));
        }
        let param = format!("metadata[{k}]");
        let s = match val {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(ApiError::invalid(
                    "parameter_invalid_type",
                    param.clone(),
                    format!("{param} must be a string, number or boolean."),
                ))
            }
        };
        if chars(&s) > cfg.metadata_value_chars_max {
            return Err(ApiError::invalid(
                "metadata_value_too_long",
                param.clone(),
                format!(
                    "{param} must be at most {} characters.",
                    cfg.metadata_value_chars_max
                ),
            ));
        }
        out.insert(k, s);
    }
    Ok(out)
}

fn parse_customer(v: Option<Value>) -> Result<Customer, ApiError> {
    let mut obj = match v {
        None | Some(Value::Null) => return Ok(Customer::default()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid_type",
                "customer",
                "customer must be an object.",
            ))
        }
    };
    let id = take_string(&mut obj, "id", "customer[id]", CUSTOMER_ID_CHARS_MAX)?;
    let email = take_string(&mut obj, "email", "customer[email]", EMAIL_CHARS_MAX)?
        .map(|e| e.to_ascii_lowercase());
    if let Some(e) = &email {
        let ok = e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !e.contains(char::is_whitespace)
        });
        if !ok {
            return Err(ApiError::invalid(
                "email_invalid",
                "customer[email]",
                "customer[email] is not a valid email address.",
            ));
        }
    }
    let ip = take_string(&mut obj, "ip", "customer[ip]", 45)?;
    if let Some(ip) = &ip {
        if ip.parse::<IpAddr>().is_err() {
            return Err(ApiError::invalid(
                "ip_invalid",
                "customer[ip]",
                "customer[ip] must be an IPv4 or IPv6 address.",
            ));
        }
    }
    let device_id = take_string(
        &mut obj,
        "device_id",
        "customer[device_id]",
        DEVICE_ID_CHARS_MAX,
    )?;
    let country =
        take_string(&mut obj, "country", "customer[country]", 2)?.map(|c| c.to_ascii_uppercase());
    if let Some(c) = &country {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ApiError::invalid(
                "country_invalid",
                "customer[country]",
                "customer[country] must be a two-letter ISO 3166-1 code.",
            ));
        }
    }
    reject_unknown(&obj, Some("customer"))?;
    Ok(Customer {
        id,
        email,
        ip,
        device_id,
        country,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::default()
    }

    fn err(body: &str) -> ApiError {
        parse_payment(body.as_bytes(), &cfg()).unwrap_err()
    }

    #[test]
    fn minimal_body_is_accepted_with_defaults() {
        let p = parse_payment(
            br#"{"amount": 1000, "currency": "usd", "payment_method": "tok_visa"}"#,
            &cfg(),
        )
        .unwrap();
        assert_eq!(p.amount, 1000);
        assert_eq!(p.currency, "USD");
        assert!(p.capture);
        assert!(p.metadata.is_empty());
    }

    #[test]
    fn errors_name_the_parameter() {
        assert_eq!(
            err(r#"{"currency":"USD","payment_method":"tok_x"}"#)
                .param
                .as_deref(),
            Some("amount")
        );
        assert_eq!(
            err(r#"{"amount":1.5,"currency":"USD","payment_method":"tok_x"}"#).code,
            "parameter_invalid_integer"
        );
        assert_eq!(
            err(r#"{"amount":0,"currency":"USD","payment_method":"tok_x"}"#).code,
            "amount_too_small"
        );
        assert_eq!(
            err(r#"{"amount":100000000,"currency":"USD","payment_method":"tok_x"}"#).code,
            "amount_too_large"
        );
        assert_eq!(
            err(r#"{"amount":1,"currency":"XYZ","payment_method":"tok_x"}"#)
                .param
                .as_deref(),
            Some("currency")
        );
        assert_eq!(
            err(r#"{"amount":1,"currency":"USD","payment_method":"tok_x","foo":1}"#)
                .param
                .as_deref(),
            Some("foo")
        );
        assert_eq!(
            err(
                r#"{"amount":1,"currency":"USD","payment_method":"tok_x","customer":{"emali":"a"}}"#
            )
            .param
            .as_deref(),
            Some("customer[emali]")
        );
        assert_eq!(
            err(r#"{"amount":1,"currency":"USD","payment_method":"tok_x","customer":{"ip":"300.1.1.1"}}"#).param.as_deref(),
            Some("customer[ip]")
        );
        assert_eq!(err("{not json").code, "invalid_json");
        assert_eq!(err("[1,2]").code, "invalid_json");
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let many: Vec<String> = (0..51).map(|i| format!("\"k{i}\":\"v\"")).collect();
        let body = format!(
            r#"{{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{{{}}}}}"#,
            many.join(",")
        );
        assert_eq!(err(&body).code, "metadata_too_many_keys");
        let long = "v".repeat(501);
        let body = format!(
            r#"{{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{{"k":"{long}"}}}}"#
        );
        assert_eq!(err(&body).param.as_deref(), Some("metadata[k]"));
    }

    #[test]
    fn card_numbers_are_found_anywhere_and_never_echoed() {
        for body in [
            r#"{"amount":1,"currency":"USD","payment_method":"tok_x","description":"card 4242424242424242"}"#,
            r#"{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{"n":"4242 4242 4242 4242"}}"#,
            r#"{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{"n":"5555-5555-5555-4444"}}"#,
            r#"{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{"4111111111111111":"k"}}"#,
            r#"{"amount":1,"currency":"USD","payment_method":"tok_x","metadata":{"n":4111111111111111}}"#,
            r#"{"amount":1,"currency":"XXX","payment_method":"tok_x","customer":{"id":"ab378282246310005cd"}}"#,
        ] {
            let e = err(body);
            assert_eq!(e.code, "card_number_not_allowed", "{body}");
            let text = String::from_utf8(e.to_json()).unwrap();
            assert!(!text.contains("4242") && !text.contains("4111") && !text.contains("3782"));
        }
    }

    #[test]
    fn non_luhn_digit_runs_are_allowed() {
        assert!(!contains_pan("order 4242424242424241"));
        assert!(!contains_pan("run 42424242424242424242424242"));
        assert!(!contains_pan("12345"));
        assert!(contains_pan("x4242424242424242y"));
    }

    #[test]
    fn luhn_matches_known_numbers() {
        assert!(luhn_valid(b"4242424242424242"));
        assert!(luhn_valid(b"378282246310005"));
        assert!(!luhn_valid(b"4242424242424243"));
    }
}
