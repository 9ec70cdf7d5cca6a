//! Attributes of test card tokens.
//!
//! Raw card numbers never enter the gateway; payment methods are opaque tokens. For tokens that follow
//! the test convention below, the engine derives a BIN, an issuing country and a brand so that rules
//! about `:card_bin:` and `:card_country:` are testable end to end:
//!
//! * `tok_<brand>` and `tok_<brand>_<cc>`: brand from the table below, its BIN, country `<cc>`
//!   (two ASCII letters, upper-cased) or `US` when absent.
//! * `tok_bin_<6 digits>` and `tok_bin_<6 digits>_<cc>`: that BIN, brand from its first digit
//!   (3 amex, 4 visa, 5 mastercard, 6 discover, other unknown), country `<cc>` or unknown.
//! * any other `tok_<x>[_<cc>]`: brand `unknown`, no BIN, country `<cc>` or unknown.
//! * anything else: no attributes.

use serde::Serialize;

/// Brand name and BIN of each known test brand.
pub const TEST_BRANDS: [(&str, &str); 7] = [
    ("visa", "424242"),
    ("mastercard", "555555"),
    ("amex", "378282"),
    ("discover", "601111"),
    ("jcb", "353011"),
    ("unionpay", "620000"),
    ("diners", "305693"),
];

/// An ISO 3166-1 alpha-2 country code held inline (no allocation), always upper case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Country([u8; 2]);

impl Country {
    /// Parses two ASCII letters in any case.
    pub fn parse(s: &str) -> Option<Country> {
        let b = s.as_bytes();
        if b.len() == 2 && b[0].is_ascii_alphabetic() && b[1].is_ascii_alphabetic() {
            Some(Country([
                b[0].to_ascii_uppercase(),
                b[1].to_ascii_uppercase(),
            ]))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl Serialize for Country {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the engine knows about a card from its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CardAttributes<'a> {
    pub bin: Option<&'a str>,
    pub country: Option<Country>,
    pub brand: Option<&'static str>,
}

impl CardAttributes<'_> {
    pub const NONE: CardAttributes<'static> = CardAttributes {
        bin: None,
        country: None,
        brand: None,
    };
}

fn brand_of_bin(bin: &str) -> &'static str {
    match bin.as_bytes().first() {
        Some(b'3') => "amex",
        Some(b'4') => "visa",
        Some(b'5') => "mastercard",
        Some(b'6') => "discover",
        _ => "unknown",
    }
}

/// Derives `(bin, country, brand)` from a test token; see the module documentation for the table.
pub fn card_attributes(token: &str) -> CardAttributes<'_> {
    let Some(rest) = token.strip_prefix("tok_") else {
        return CardAttributes::NONE;
    };
    let mut parts = rest.split('_');
    let head = parts.next().unwrap_or("");
    if head.is_empty() {
        return CardAttributes::NONE;
    }
    if head == "bin" {
        let bin = parts.next().unwrap_or("");
        if bin.len() != 6 || !bin.bytes().all(|b| b.is_ascii_digit()) {
            return CardAttributes {
                bin: None,
                country: None,
                brand: Some("unknown"),
            };
        }
        let country = parts.next().and_then(Country::parse);
        return CardAttributes {
            bin: Some(bin),
            country,
            brand: Some(brand_of_bin(bin)),
        };
    }
    let country = parts.next().and_then(Country::parse);
    match TEST_BRANDS.iter().find(|(brand, _)| *brand == head) {
        Some((brand, bin)) => CardAttributes {
            bin: Some(bin),
            country: Some(country.unwrap_or(Country(*b"US"))),
            brand: Some(brand),
        },
        None => CardAttributes {
            bin: None,
            country,
            brand: Some("unknown"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_brand_without_country_defaults_to_us() {
        let a = card_attributes("tok_visa");
        assert_eq!(a.bin, Some("424242"));
        assert_eq!(a.country.unwrap().as_str(), "US");
        assert_eq!(a.brand, Some("visa"));
    }

    #[test]
    fn known_brand_with_country_suffix() {
        let a = card_attributes("tok_mastercard_de");
        assert_eq!(a.bin, Some("555555"));
        assert_eq!(a.country.unwrap().as_str(), "DE");
        assert_eq!(a.brand, Some("mastercard"));
        assert_eq!(
            card_attributes("tok_visa_gb").country.unwrap().as_str(),
            "GB"
        );
    }

    #[test]
    fn explicit_bin_token_derives_brand_from_first_digit() {
        let a = card_attributes("tok_bin_411111_fr");
        assert_eq!(a.bin, Some("411111"));
        assert_eq!(a.country.unwrap().as_str(), "FR");
        assert_eq!(a.brand, Some("visa"));
        assert_eq!(card_attributes("tok_bin_12ab").bin, None);
    }

    #[test]
    fn unknown_brand_and_non_tokens() {
        let a = card_attributes("tok_whatever_it");
        assert_eq!(a.bin, None);
        assert_eq!(a.brand, Some("unknown"));
        assert_eq!(a.country.unwrap().as_str(), "IT");
        assert_eq!(card_attributes("pm_123"), CardAttributes::NONE);
        assert_eq!(card_attributes("tok_"), CardAttributes::NONE);
        assert_eq!(card_attributes("tok_abc_toolong").country, None);
    }
}
