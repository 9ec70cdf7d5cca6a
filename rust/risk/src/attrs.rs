//! Attributes that rules can read and the numeric feature vector shared by rules and the model.
//!
//! Numeric attributes live at fixed indices of [`Features::values`] (NaN means missing); string
//! attributes are read from the [`Context`] without copying. Velocity feature names are systematic:
//!
//! * `<dim>_count_<win>`: payments seen for this value of `<dim>` in the window, current one included;
//! * `<dim>_amount_usd_<win>`: their summed USD amount;
//! * `<members>_per_<owner>_<win>`: distinct `<members>` seen with this `<owner>` in the window;
//!
//! with `<dim>` in card, email, ip, device, customer, merchant and `<win>` in 1m, 1h, 24h.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::input::{non_empty, Context};

pub const DIMS: [&str; 6] = ["card", "email", "ip", "device", "customer", "merchant"];
pub const DIM_CARD: usize = 0;
pub const DIM_EMAIL: usize = 1;
pub const DIM_IP: usize = 2;
pub const DIM_DEVICE: usize = 3;
pub const DIM_CUSTOMER: usize = 4;
pub const DIM_MERCHANT: usize = 5;

/// Window name, bucket width and bucket count: the window length is `bucket_ms * buckets`.
pub const WINDOWS: [(&str, u64, usize); 3] = [
    ("1m", 2_000, 30),
    ("1h", 60_000, 60),
    ("24h", 1_800_000, 48),
];
pub const WINDOW_MS: [u64; 3] = [60_000, 3_600_000, 86_400_000];

/// Distinct-count features: (name prefix, owner dimension, member dimension).
pub const DISTINCT: [(&str, usize, usize); 6] = [
    ("cards_per_device", DIM_DEVICE, DIM_CARD),
    ("cards_per_email", DIM_EMAIL, DIM_CARD),
    ("cards_per_ip", DIM_IP, DIM_CARD),
    ("cards_per_customer", DIM_CUSTOMER, DIM_CARD),
    ("emails_per_card", DIM_CARD, DIM_EMAIL),
    ("devices_per_card", DIM_CARD, DIM_DEVICE),
];

pub const AMOUNT: usize = 0;
pub const AMOUNT_USD: usize = 1;
pub const RISK_SCORE: usize = 2;
pub const CARD_IP_COUNTRY_MISMATCH: usize = 3;
pub const CARD_CUSTOMER_COUNTRY_MISMATCH: usize = 4;
const SCALAR_NAMES: [&str; 5] = [
    "amount",
    "amount_usd",
    "risk_score",
    "card_ip_country_mismatch",
    "card_customer_country_mismatch",
];
pub const VELOCITY_BASE: usize = SCALAR_NAMES.len();
pub const DISTINCT_BASE: usize = VELOCITY_BASE + DIMS.len() * WINDOWS.len() * 2;
pub const NUM_NUMERIC: usize = DISTINCT_BASE + DISTINCT.len() * WINDOWS.len();

/// Index of `<dim>_count_<win>`; `+ 1` is `<dim>_amount_usd_<win>`.
pub const fn velocity_index(dim: usize, window: usize) -> usize {
    VELOCITY_BASE + (dim * WINDOWS.len() + window) * 2
}

pub const fn distinct_index(pair: usize, window: usize) -> usize {
    DISTINCT_BASE + pair * WINDOWS.len() + window
}

/// The model's input, in order: each entry is a numeric attribute index. Shared with
/// `python/gateway/risk/train_model.py` and `tests/reference/risk_ref.py` by name (see `MODEL_FEATURE_NAMES`).
pub const MODEL_FEATURES: [usize; 15] = [
    AMOUNT_USD,
    CARD_IP_COUNTRY_MISMATCH,
    CARD_CUSTOMER_COUNTRY_MISMATCH,
    velocity_index(DIM_CARD, 1),
    velocity_index(DIM_CARD, 2),
    velocity_index(DIM_CARD, 2) + 1,
    velocity_index(DIM_IP, 1),
    velocity_index(DIM_IP, 2),
    velocity_index(DIM_EMAIL, 2),
    velocity_index(DIM_DEVICE, 1),
    distinct_index(0, 2),
    distinct_index(1, 2),
    distinct_index(2, 2),
    velocity_index(DIM_CUSTOMER, 2),
    distinct_index(4, 2),
];

/// Names of every numeric attribute, by index.
pub fn numeric_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names: Vec<String> = SCALAR_NAMES.iter().map(|s| s.to_string()).collect();
        for dim in DIMS {
            for (win, _, _) in WINDOWS {
                names.push(format!("{dim}_count_{win}"));
                names.push(format!("{dim}_amount_usd_{win}"));
            }
        }
        for (prefix, _, _) in DISTINCT {
            for (win, _, _) in WINDOWS {
                names.push(format!("{prefix}_{win}"));
            }
        }
        assert_eq!(names.len(), NUM_NUMERIC);
        names
    })
}

/// Names of the model's features, in model order.
pub fn model_feature_names() -> Vec<&'static str> {
    MODEL_FEATURES
        .iter()
        .map(|&i| numeric_names()[i].as_str())
        .collect()
}

/// String attributes. `case_insensitive` ones compare with ASCII case folding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrAttr {
    Currency,
    Card,
    CardBin,
    CardBrand,
    CardCountry,
    Email,
    EmailDomain,
    Ip,
    IpCountry,
    DeviceId,
    CustomerId,
    CustomerCountry,
    MerchantId,
}

impl StrAttr {
    pub const ALL: [StrAttr; 13] = [
        StrAttr::Currency,
        StrAttr::Card,
        StrAttr::CardBin,
        StrAttr::CardBrand,
        StrAttr::CardCountry,
        StrAttr::Email,
        StrAttr::EmailDomain,
        StrAttr::Ip,
        StrAttr::IpCountry,
        StrAttr::DeviceId,
        StrAttr::CustomerId,
        StrAttr::CustomerCountry,
        StrAttr::MerchantId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StrAttr::Currency => "currency",
            StrAttr::Card => "card",
            StrAttr::CardBin => "card_bin",
            StrAttr::CardBrand => "card_brand",
            StrAttr::CardCountry => "card_country",
            StrAttr::Email => "email",
            StrAttr::EmailDomain => "email_domain",
            StrAttr::Ip => "ip",
            StrAttr::IpCountry => "ip_country",
            StrAttr::DeviceId => "device_id",
            StrAttr::CustomerId => "customer_id",
            StrAttr::CustomerCountry => "customer_country",
            StrAttr::MerchantId => "merchant_id",
        }
    }

    pub fn case_insensitive(self) -> bool {
        matches!(
            self,
            StrAttr::Currency
                | StrAttr::CardBrand
                | StrAttr::CardCountry
                | StrAttr::Email
                | StrAttr::EmailDomain
                | StrAttr::IpCountry
                | StrAttr::CustomerCountry
        )
    }

    /// The attribute's value for this request, `None` when absent or empty.
    #[inline]
    pub fn get<'c>(self, ctx: &'c Context<'_>) -> Option<&'c str> {
        let i = ctx.input;
        match self {
            StrAttr::Currency => non_empty(Some(i.currency)),
            StrAttr::Card => non_empty(i.card),
            StrAttr::CardBin => ctx.card.bin,
            StrAttr::CardBrand => ctx.card.brand,
            StrAttr::CardCountry => ctx.card.country.as_ref().map(|c| c.as_str()),
            StrAttr::Email => non_empty(i.email),
            StrAttr::EmailDomain => ctx.email_domain,
            StrAttr::Ip => non_empty(i.ip),
            StrAttr::IpCountry => non_empty(i.ip_country),
            StrAttr::DeviceId => non_empty(i.device_id),
            StrAttr::CustomerId => non_empty(i.customer_id),
            StrAttr::CustomerCountry => non_empty(i.customer_country),
            StrAttr::MerchantId => non_empty(Some(i.merchant_id)),
        }
    }
}

/// A resolved attribute reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Num(usize),
    Str(StrAttr),
}

/// Looks an attribute up by its name (without the surrounding colons).
pub fn lookup_attr(name: &str) -> Option<Attr> {
    static MAP: OnceLock<HashMap<&'static str, Attr>> = OnceLock::new();
    let map = MAP.get_or_init(|| {
        let mut m = HashMap::new();
        for (i, n) in numeric_names().iter().enumerate() {
            m.insert(n.as_str(), Attr::Num(i));
        }
        for a in StrAttr::ALL {
            m.insert(a.name(), Attr::Str(a));
        }
        m
    });
    map.get(name).copied()
}

/// The numeric attribute vector of one request. NaN marks a missing value.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub values: [f64; NUM_NUMERIC],
}

impl Default for Features {
    fn default() -> Self {
        Features {
            values: [f64::NAN; NUM_NUMERIC],
        }
    }
}

impl Features {
    /// Fills the stateless numeric attributes (amounts, country mismatches); velocity and score stay missing.
    pub fn from_context(ctx: &Context<'_>) -> Features {
        let mut f = Features::default();
        f.values[AMOUNT] = ctx.input.amount as f64;
        f.values[AMOUNT_USD] = ctx.amount_usd.unwrap_or(f64::NAN);
        let card_country = StrAttr::CardCountry.get(ctx);
        let mismatch = |other: Option<&str>| match (card_country, other) {
            (Some(a), Some(b)) => (!a.eq_ignore_ascii_case(b)) as u8 as f64,
            _ => f64::NAN,
        };
        f.values[CARD_IP_COUNTRY_MISMATCH] = mismatch(StrAttr::IpCountry.get(ctx));
        f.values[CARD_CUSTOMER_COUNTRY_MISMATCH] = mismatch(StrAttr::CustomerCountry.get(ctx));
        f
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        match lookup_attr(name) {
            Some(Attr::Num(i)) if !self.values[i].is_nan() => Some(self.values[i]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_systematic_and_unique() {
        let names = numeric_names();
        assert_eq!(names[velocity_index(DIM_CARD, 1)], "card_count_1h");
        assert_eq!(
            names[velocity_index(DIM_CARD, 2) + 1],
            "card_amount_usd_24h"
        );
        assert_eq!(names[velocity_index(DIM_MERCHANT, 0)], "merchant_count_1m");
        assert_eq!(names[distinct_index(0, 1)], "cards_per_device_1h");
        assert_eq!(names[distinct_index(4, 2)], "emails_per_card_24h");
        let set: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len());
        assert_eq!(
            lookup_attr("ip_country"),
            Some(Attr::Str(StrAttr::IpCountry))
        );
        assert_eq!(lookup_attr("nope"), None);
    }

    #[test]
    fn model_feature_names_in_order() {
        let names = model_feature_names();
        assert_eq!(names[0], "amount_usd");
        assert_eq!(names[3], "card_count_1h");
        assert_eq!(names[14], "emails_per_card_24h");
    }
}
