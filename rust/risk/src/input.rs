//! The engine's input (one payment request) and output (one decision).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::card::{card_attributes, CardAttributes};

/// One payment as the risk engine sees it, borrowed from the caller so that `decide` allocates nothing
/// for its input. Empty strings are treated exactly like absent values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RiskInput<'a> {
    pub merchant_id: &'a str,
    /// Amount in minor units of `currency` (cents, or yen for JPY).
    pub amount: i64,
    /// ISO 4217 code, upper case.
    pub currency: &'a str,
    /// Amount in US dollars (major units). When `None` it is derived from the built-in rate table.
    pub amount_usd: Option<f64>,
    /// Payment method token (`tok_...`); also the card velocity key.
    pub card: Option<&'a str>,
    pub email: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub ip_country: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub customer_id: Option<&'a str>,
    pub customer_country: Option<&'a str>,
}

/// The owned, serde form of [`RiskInput`]: the JSON shape shared with the Python reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskRequest {
    pub merchant_id: String,
    pub amount: i64,
    pub currency: String,
    #[serde(default)]
    pub amount_usd: Option<f64>,
    #[serde(default)]
    pub card: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub ip_country: Option<String>,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub customer_country: Option<String>,
}

impl RiskRequest {
    pub fn as_input(&self) -> RiskInput<'_> {
        RiskInput {
            merchant_id: &self.merchant_id,
            amount: self.amount,
            currency: &self.currency,
            amount_usd: self.amount_usd,
            card: self.card.as_deref(),
            email: self.email.as_deref(),
            ip: self.ip.as_deref(),
            ip_country: self.ip_country.as_deref(),
            device_id: self.device_id.as_deref(),
            customer_id: self.customer_id.as_deref(),
            customer_country: self.customer_country.as_deref(),
        }
    }
}

/// ISO 4217 exponent and an illustrative USD rate per unit of the currency. The fast path may pass
/// `amount_usd` itself when it has live rates; the table keeps the engine self-contained and testable.
pub const CURRENCIES: [(&str, u32, f64); 12] = [
    ("USD", 2, 1.0),
    ("EUR", 2, 1.08),
    ("GBP", 2, 1.27),
    ("CAD", 2, 0.73),
    ("AUD", 2, 0.66),
    ("CHF", 2, 1.13),
    ("SEK", 2, 0.095),
    ("JPY", 0, 0.0067),
    ("KRW", 0, 0.00075),
    ("INR", 2, 0.012),
    ("BRL", 2, 0.2),
    ("MXN", 2, 0.058),
];

/// `amount` (minor units) converted to USD major units, `None` for a currency not in [`CURRENCIES`].
pub fn amount_to_usd(amount: i64, currency: &str) -> Option<f64> {
    let (_, exponent, rate) = CURRENCIES
        .iter()
        .find(|(code, _, _)| code.eq_ignore_ascii_case(currency))?;
    Some(amount as f64 / 10f64.powi(*exponent as i32) * rate)
}

pub(crate) fn non_empty(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty())
}

/// The input plus everything derived from it without state: card attributes, e-mail domain, USD amount.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub input: &'a RiskInput<'a>,
    pub card: CardAttributes<'a>,
    pub email_domain: Option<&'a str>,
    pub amount_usd: Option<f64>,
}

impl<'a> Context<'a> {
    pub fn new(input: &'a RiskInput<'a>) -> Context<'a> {
        let card = non_empty(input.card)
            .map(card_attributes)
            .unwrap_or(CardAttributes::NONE);
        let email_domain = non_empty(input.email)
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d)
            .filter(|d| !d.is_empty());
        let amount_usd = input
            .amount_usd
            .or_else(|| amount_to_usd(input.amount, input.currency));
        Context {
            input,
            card,
            email_domain,
            amount_usd,
        }
    }
}

/// What the engine tells the caller to do with the payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Block,
    Challenge,
    Review,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Allow,
        Action::Block,
        Action::Challenge,
        Action::Review,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Challenge => "challenge",
            Action::Review => "review",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Priority within one ruleset: allow > block > challenge > review (higher wins).
    pub fn priority(self) -> u8 {
        match self {
            Action::Allow => 4,
            Action::Block => 3,
            Action::Challenge => 2,
            Action::Review => 1,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn from_index(i: usize) -> Action {
        Action::ALL[i]
    }
}

/// Why a blocked payment was declined (the `decline_code` of the 402 error object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineCode {
    /// The deciding rule tests membership in a list (`in @list`).
    Blocklisted,
    /// The deciding rule reads a velocity feature (`*_count_*`, `*_amount_usd_*`, `*_per_*`).
    VelocityExceeded,
    /// The deciding rule reads `:risk_score:`.
    HighestRiskLevel,
    /// Any other blocking rule.
    Fraudulent,
}

impl DeclineCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeclineCode::Blocklisted => "blocklisted",
            DeclineCode::VelocityExceeded => "velocity_exceeded",
            DeclineCode::HighestRiskLevel => "highest_risk_level",
            DeclineCode::Fraudulent => "fraudulent",
        }
    }
}

/// Which ruleset a rule belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Global,
    Merchant,
}

/// One rule that matched, for the decision trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    pub name: Arc<str>,
    pub action: Action,
    pub scope: Scope,
}

/// The outcome of [`crate::Engine::decide`], with its trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub action: Action,
    /// round(100 * model probability), `None` when no model is loaded.
    pub risk_score: Option<u8>,
    /// Set only when `action` is `block`.
    pub decline_code: Option<DeclineCode>,
    /// The rule that determined `action`; `None` for the default allow.
    pub rule: Option<Arc<str>>,
    /// Every rule that matched (global rules first, then the merchant's), in source order.
    pub matched_rules: Vec<MatchedRule>,
    pub ruleset_version: u64,
    pub merchant_ruleset_version: Option<u64>,
    /// First 12 hex digits of the model file's SHA-256.
    pub model_hash: Option<Arc<str>>,
    /// Action of the shadow (candidate) ruleset in place of the global one, when one is installed.
    pub shadow_action: Option<Action>,
    pub shadow_ruleset_version: Option<u64>,
}
