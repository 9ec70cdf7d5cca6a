//! Lock-free latency histograms rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds in nanoseconds: 1 µs to 1 s, roughly three per decade.
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

pub const BATCH_BOUNDS: [u64; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound plus the overflow (+Inf) bucket; counts are not cumulative here.
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn latency() -> Self {
        Self::new(&LATENCY_BOUNDS_NS)
    }

    pub fn observe(&self, v: u64) {
        let idx = self.bounds.partition_point(|b| *b < v);
        self.buckets[idx].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Writes the series; `scale` divides raw values (1e9 turns nanoseconds into seconds).
    pub fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *b as f64 / scale
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {}",
            self.sum.load(Relaxed) as f64 / scale
        );
        let _ = writeln!(out, "{name}_count{braced} {}", self.count.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_in_text() {
        let h = Histogram::latency();
        h.observe(800);
        h.observe(3_000);
        h.observe(2_000_000_000);
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "stage=\"a\"", 1e9);
        assert!(s.contains("x_seconds_bucket{stage=\"a\",le=\"0.000001\"} 1"));
        assert!(s.contains("x_seconds_bucket{stage=\"a\",le=\"0.000005\"} 2"));
        assert!(s.contains("x_seconds_bucket{stage=\"a\",le=\"1\"} 2"));
        assert!(s.contains("x_seconds_bucket{stage=\"a\",le=\"+Inf\"} 3"));
        assert!(s.contains("x_seconds_count{stage=\"a\"} 3"));
    }
}

/// Most (action, rule) series kept by `DecisionCounts`; decisions past it are counted under the
/// rule `_other`, so a ruleset with thousands of rules cannot grow the metrics without bound.
pub const DECISION_SERIES_MAX: usize = 512;

/// Risk decisions by action and deciding rule (the empty rule is the default allow). The default
/// allow, by far the most frequent, is one atomic add; a decision made by a rule takes a short lock.
pub struct DecisionCounts {
    default_allow: AtomicU64,
    by_rule:
        parking_lot::Mutex<std::collections::HashMap<(&'static str, std::sync::Arc<str>), u64>>,
}

impl Default for DecisionCounts {
    fn default() -> Self {
        Self::new()
    }
}

impl DecisionCounts {
    pub fn new() -> Self {
        Self {
            default_allow: AtomicU64::new(0),
            by_rule: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn record(&self, action: &'static str, rule: Option<&std::sync::Arc<str>>) {
        let Some(rule) = rule else {
            if action == "allow" {
                self.default_allow.fetch_add(1, Relaxed);
                return;
            }
            return self.record(action, Some(&std::sync::Arc::from("")));
        };
        let mut map = self.by_rule.lock();
        let key = (action, rule.clone());
        if let Some(n) = map.get_mut(&key) {
            *n += 1;
        } else if map.len() < DECISION_SERIES_MAX {
            map.insert(key, 1);
        } else {
            *map.entry((action, std::sync::Arc::from("_other")))
                .or_insert(0) += 1;
        }
    }

    /// `gateway_risk_decisions_total{action,rule}`; rule names are escaped for the text format.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP gateway_risk_decisions_total Risk decisions by action and deciding rule.\n",
        );
        out.push_str("# TYPE gateway_risk_decisions_total counter\n");
        let _ = writeln!(
            out,
            "gateway_risk_decisions_total{{action=\"allow\",rule=\"\"}} {}",
            self.default_allow.load(Relaxed)
        );
        let map = self.by_rule.lock();
        let mut rows: Vec<_> = map.iter().collect();
        rows.sort();
        for ((action, rule), n) in rows {
            let rule = rule
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "gateway_risk_decisions_total{{action=\"{action}\",rule=\"{rule}\"}} {n}"
            );
        }
    }
}

#[cfg(test)]
mod decision_tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_action_and_rule_within_the_series_bound() {
        let d = DecisionCounts::new();
        d.record("allow", None);
        d.record("allow", None);
        let r: std::sync::Arc<str> = std::sync::Arc::from("big_amount");
        d.record("block", Some(&r));
        for i in 0..(DECISION_SERIES_MAX + 5) {
            d.record(
                "review",
                Some(&std::sync::Arc::from(format!("r{i}").as_str())),
            );
        }
        let mut out = String::new();
        d.render(&mut out);
        assert!(out.contains("gateway_risk_decisions_total{action=\"allow\",rule=\"\"} 2\n"));
        assert!(
            out.contains("gateway_risk_decisions_total{action=\"block\",rule=\"big_amount\"} 1\n")
        );
        assert!(out.contains("rule=\"_other\"} 6\n"));
        assert_eq!(
            out.matches("gateway_risk_decisions_total{").count(),
            DECISION_SERIES_MAX + 2
        );
    }
}
