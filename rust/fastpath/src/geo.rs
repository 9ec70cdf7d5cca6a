//! IP address to country, for the risk engine's `:ip_country:`.
//!
//! Production deployments load a CIDR table exported from their GeoIP provider
//! (`risk.geoip_file`, lines `cidr,country`); the built-in table maps only the documentation ranges
//! (RFC 5737 and RFC 3849) so that tests and demos have stable, known countries.

use std::net::IpAddr;

#[derive(Debug, Clone)]
pub struct GeoTable {
    /// (first, last, country) over IPv6-mapped addresses, sorted by `first`, non-overlapping.
    ranges: Vec<(u128, u128, [u8; 2])>,
}

pub const BUILTIN: &[(&str, &str)] = &[
    ("192.0.2.0/24", "US"),
    ("198.51.100.0/24", "GB"),
    ("203.0.113.0/24", "DE"),
    ("2001:db8::/32", "NL"),
];

/// Entries accepted from a file; a GeoIP export of a few million ranges fits well below it.
pub const RANGES_MAX: usize = 10_000_000;

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn parse_cidr(s: &str) -> Result<(u128, u128), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not CIDR notation"))?;
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IP address"))?;
    let len: u32 = len
        .parse()
        .map_err(|_| format!("'{len}' is not a prefix length"))?;
    // IPv4 lives in the IPv4-mapped part of the IPv6 space, behind a fixed 96-bit prefix.
    let (bits, mapped_prefix) = if ip.is_ipv4() { (32, 96) } else { (128, 0) };
    if len > bits {
        return Err(format!("prefix /{len} is longer than the address"));
    }
    let host_bits = 128 - (len + mapped_prefix);
    let host_mask = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let first = to_u128(ip) & !host_mask;
    Ok((first, first | host_mask))
}

impl GeoTable {
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for (i, (cidr, country)) in entries.into_iter().enumerate() {
            if ranges.len() >= RANGES_MAX {
                return Err(format!("more than {RANGES_MAX} ranges"));
            }
            let (first, last) =
                parse_cidr(cidr.trim()).map_err(|e| format!("entry {}: {e}", i + 1))?;
            let c = country.trim().to_ascii_uppercase();
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "entry {}: '{country}' is not a two-letter country code",
                    i + 1
                ));
            }
            let cb = c.as_bytes();
            ranges.push((first, last, [cb[0], cb[1]]));
        }
        ranges.sort_by_key(|r| r.0);
        for w in ranges.windows(2) {
            if w[1].0 <= w[0].1 {
                return Err("ranges overlap".into());
            }
        }
        Ok(Self { ranges })
    }

    pub fn builtin() -> Self {
        Self::from_entries(BUILTIN.iter().copied()).expect("built-in table is valid")
    }

    /// Parses `cidr,country` lines (blank lines and `#` comments skipped) and adds the built-in ranges.
    pub fn from_csv(text: &str) -> Result<Self, String> {
        let mut entries: Vec<(&str, &str)> = BUILTIN.to_vec();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (cidr, country) = line
                .split_once(',')
                .ok_or_else(|| format!("line {}: expected cidr,country", n + 1))?;
            entries.push((cidr, country));
        }
        Self::from_entries(entries)
    }

    pub fn country(&self, ip: &str) -> Option<&str> {
        let v = to_u128(ip.parse().ok()?);
        let idx = self.ranges.partition_point(|r| r.0 <= v);
        let (first, last, c) = self.ranges.get(idx.checked_sub(1)?)?;
        if *first <= v && v <= *last {
            std::str::from_utf8(c).ok()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_ranges_resolve() {
        let g = GeoTable::builtin();
        assert_eq!(g.country("192.0.2.1"), Some("US"));
        assert_eq!(g.country("198.51.100.255"), Some("GB"));
        assert_eq!(g.country("203.0.113.7"), Some("DE"));
        assert_eq!(g.country("2001:db8::1"), Some("NL"));
        assert_eq!(g.country("8.8.8.8"), None);
        assert_eq!(g.country("not an ip"), None);
    }

    #[test]
    fn csv_adds_ranges_and_reports_bad_lines() {
        let g = GeoTable::from_csv("# export\n10.0.0.0/8,fr\n").unwrap();
        assert_eq!(g.country("10.1.2.3"), Some("FR"));
        assert!(GeoTable::from_csv("10.0.0.0/8\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(GeoTable::from_csv("10.0.0.0/8,FRA\n").is_err());
        assert!(GeoTable::from_csv("10.0.0.0/8,FR\n10.1.0.0/16,DE\n")
            .unwrap_err()
            .contains("overlap"));
    }
}
