//! Named lists of typed values with a Bloom filter in front of an exact set.
//!
//! A lookup first probes the Bloom filter (no false negatives); only on a filter hit is the exact set
//! consulted, so a filter false positive can never cause a block. Additions set filter bits in place.
//! Removals delete from the exact set and leave stale bits behind (they can only add filter false
//! positives, which the exact set rejects); the filter is rebuilt from the exact set once removals since
//! the last rebuild exceed a quarter of the entries, and grown (rebuilt at double size) when the entry
//! count exceeds its design capacity, so the false-positive rate stays near 1%.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use parking_lot::RwLock;

use crate::attrs::StrAttr;
use crate::error::ListError;

/// Longest value accepted in any list (bytes); e-mail addresses are at most 254.
pub const VALUE_LEN_MAX: usize = 256;
/// Default and hard upper bound of entries per list.
pub const LIST_ENTRIES_DEFAULT: usize = 1_000_000;
pub const LIST_ENTRIES_MAX: usize = 10_000_000;
pub const LISTS_MAX: usize = 1024;
const BLOOM_BITS_PER_ENTRY: usize = 10;
const BLOOM_HASHES: u32 = 7;
const BLOOM_CAPACITY_MIN: usize = 1024;

/// The type of value a list holds; it decides normalisation and which attributes may be looked up in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// Card tokens or fingerprints (`:card:`).
    Card,
    /// Six-digit BINs (`:card_bin:`).
    Bin,
    /// E-mail addresses (`x@y.com`) and domains (`y.com`), case-insensitive (`:email:`, `:email_domain:`).
    Email,
    /// IP addresses, exact string (`:ip:`).
    Ip,
    /// Device ids (`:device_id:`).
    Device,
    /// ISO 3166 alpha-2 codes, case-insensitive (`:card_country:`, `:ip_country:`, `:customer_country:`).
    Country,
    /// Merchant-defined strings; any string attribute may be looked up.
    String,
}

impl ListKind {
    pub fn parse(s: &str) -> Result<ListKind, ListError> {
        Ok(match s {
            "card" => ListKind::Card,
            "bin" => ListKind::Bin,
            "email" => ListKind::Email,
            "ip" => ListKind::Ip,
            "device" => ListKind::Device,
            "country" => ListKind::Country,
            "string" => ListKind::String,
            _ => return Err(ListError::UnknownKind(s.to_string())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Card => "card",
            ListKind::Bin => "bin",
            ListKind::Email => "email",
            ListKind::Ip => "ip",
            ListKind::Device => "device",
            ListKind::Country => "country",
            ListKind::String => "string",
        }
    }

    /// Whether `attr` can be looked up in a list of this kind.
    pub fn accepts(self, attr: StrAttr) -> bool {
        match self {
            ListKind::String => true,
            ListKind::Card => attr == StrAttr::Card,
            ListKind::Bin => attr == StrAttr::CardBin,
            ListKind::Email => matches!(attr, StrAttr::Email | StrAttr::EmailDomain),
            ListKind::Ip => attr == StrAttr::Ip,
            ListKind::Device => attr == StrAttr::DeviceId,
            ListKind::Country => {
                matches!(
                    attr,
                    StrAttr::CardCountry | StrAttr::IpCountry | StrAttr::CustomerCountry
                )
            }
        }
    }

    fn fold(self) -> Fold {
        match self {
            ListKind::Email => Fold::Lower,
            ListKind::Country => Fold::Upper,
            _ => Fold::None,
        }
    }
}

#[derive(Clone, Copy)]
enum Fold {
    None,
    Lower,
    Upper,
}

fn hasher() -> RandomState {
    // Fixed seeds: filters are rebuilt in-process only, but fixed seeds make tests reproducible.
    RandomState::with_seeds(0x5a17_c0de, 0x0b10_0f11, 0x7e57_ab1e, 0x12ab_34cd)
}

fn hash_value(state: &RandomState, v: &[u8]) -> u64 {
    state.hash_one(v)
}

/// A blocked Bloom filter over 64-bit hashes: all `BLOOM_HASHES` bits of a value lie in one 64-byte
/// block, so a lookup costs one cache miss instead of up to seven.
#[derive(Debug, Clone)]
pub struct BloomFilter {
    blocks: Vec<[u64; 8]>,
    block_mask: u64,
    capacity: usize,
}

impl BloomFilter {
    /// A filter sized for `capacity` entries at `BLOOM_BITS_PER_ENTRY` bits each (about 1% false positives).
    pub fn with_capacity(capacity: usize) -> BloomFilter {
        let capacity = capacity.max(BLOOM_CAPACITY_MIN);
        let nblocks = (capacity * BLOOM_BITS_PER_ENTRY)
            .div_ceil(512)
            .next_power_of_two();
        BloomFilter {
            blocks: vec![[0; 8]; nblocks],
            block_mask: nblocks as u64 - 1,
            capacity,
        }
    }

    /// The block of `h` (from its high bits) and the bit positions inside it (9-bit groups of a remix).
    #[inline]
    fn locate(&self, h: u64) -> (usize, u64) {
        let block = ((h >> 32) & self.block_mask) as usize;
        let mut x = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut positions = 0u64;
        for _ in 0..BLOOM_HASHES {
            // Position p in 0..512, packed as word (p / 64) and bit (p % 64) into a 9-bit group of `x`.
            positions = (positions << 9) | (x & 511);
            x >>= 9;
        }
        (block, positions)
    }

    pub fn insert_hash(&mut self, h: u64) {
        let (block, mut positions) = self.locate(h);
        let words = &mut self.blocks[block];
        for _ in 0..BLOOM_HASHES {
            let p = positions & 511;
            words[(p >> 6) as usize] |= 1 << (p & 63);
            positions >>= 9;
        }
    }

    #[inline]
    pub fn might_contain_hash(&self, h: u64) -> bool {
        let (block, mut positions) = self.locate(h);
        let words = &self.blocks[block];
        let mut all = true;
        for _ in 0..BLOOM_HASHES {
            let p = positions & 511;
            all &= words[(p >> 6) as usize] & (1 << (p & 63)) != 0;
            positions >>= 9;
        }
        all
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn memory_bytes(&self) -> usize {
        self.blocks.len() * 64
    }
}

struct ListInner {
    set: hashbrown_like::Set,
    bloom: BloomFilter,
    removed_since_rebuild: usize,
}

/// A tiny alias so the exact set's hasher is spelled once.
mod hashbrown_like {
    pub type Set = std::collections::HashSet<Box<[u8]>, ahash::RandomState>;
}

/// One named list.
pub struct List {
    name: Arc<str>,
    kind: ListKind,
    entries_max: usize,
    hasher: RandomState,
    inner: RwLock<ListInner>,
}

impl std::fmt::Debug for List {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("List")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Statistics of one list, for operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListInfo {
    pub name: String,
    pub kind: ListKind,
    pub entries: usize,
    pub entries_max: usize,
    pub bloom_capacity: usize,
    pub bloom_bytes: usize,
}

/// Normalises `value` into `buf` for `kind`; `None` when it is too long to be a member.
#[inline]
fn normalise<'b>(
    kind: ListKind,
    value: &[u8],
    buf: &'b mut [u8; VALUE_LEN_MAX],
) -> Option<&'b [u8]> {
    if value.len() > VALUE_LEN_MAX {
        return None;
    }
    let out = &mut buf[..value.len()];
    out.copy_from_slice(value);
    match kind.fold() {
        Fold::None => {}
        Fold::Lower => out.make_ascii_lowercase(),
        Fold::Upper => out.make_ascii_uppercase(),
    }
    Some(out)
}

impl List {
    fn new(name: &str, kind: ListKind, entries_max: usize) -> List {
        let hasher = hasher();
        List {
            name: name.into(),
            kind,
            entries_max,
            inner: RwLock::new(ListInner {
                set: hashbrown_like::Set::with_hasher(hasher.clone()),
                bloom: BloomFilter::with_capacity(BLOOM_CAPACITY_MIN),
                removed_since_rebuild: 0,
            }),
            hasher,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> ListKind {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.inner.read().set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn info(&self) -> ListInfo {
        let inner = self.inner.read();
        ListInfo {
            name: self.name.to_string(),
            kind: self.kind,
            entries: inner.set.len(),
            entries_max: self.entries_max,
            bloom_capacity: inner.bloom.capacity(),
            bloom_bytes: inner.bloom.memory_bytes(),
        }
    }

    fn check_value(&self, value: &str) -> Result<(), ListError> {
        if value.is_empty() {
            return Err(ListError::EmptyValue {
                list: self.name.to_string(),
            });
        }
        if value.len() > VALUE_LEN_MAX {
            return Err(ListError::ValueTooLong {
                list: self.name.to_string(),
                len: value.len(),
                value_len_max: VALUE_LEN_MAX,
            });
        }
        Ok(())
    }

    /// Adds `value`; returns whether it was new.
    pub fn add(&self, value: &str) -> Result<bool, ListError> {
        self.check_value(value)?;
        let mut buf = [0u8; VALUE_LEN_MAX];
        let v = normalise(self.kind, value.as_bytes(), &mut buf).expect("length checked");
        let h = hash_value(&self.hasher, v);
        let mut inner = self.inner.write();
        if inner.set.contains(v) {
            return Ok(false);
        }
        if inner.set.len() >= self.entries_max {
            return Err(ListError::Full {
                list: self.name.to_string(),
                entries_max: self.entries_max,
            });
        }
        inner.set.insert(v.into());
        if inner.set.len() > inner.bloom.capacity() {
            self.rebuild(&mut inner);
        } else {
            inner.bloom.insert_hash(h);
        }
        Ok(true)
    }

    /// Removes `value`; returns whether it was present.
    pub fn remove(&self, value: &str) -> Result<bool, ListError> {
        let mut buf = [0u8; VALUE_LEN_MAX];
        let Some(v) = normalise(self.kind, value.as_bytes(), &mut buf) else {
            return Ok(false);
        };
        let mut inner = self.inner.write();
        if !inner.set.remove(v) {
            return Ok(false);
        }
        inner.removed_since_rebuild += 1;
        if inner.removed_since_rebuild * 4 > inner.set.len().max(BLOOM_CAPACITY_MIN) {
            self.rebuild(&mut inner);
        }
        Ok(true)
    }

    /// Removes every entry.
    pub fn clear(&self) {
        let mut inner = self.inner.write();
        inner.set.clear();
        inner.bloom = BloomFilter::with_capacity(BLOOM_CAPACITY_MIN);
        inner.removed_since_rebuild = 0;
    }

    fn rebuild(&self, inner: &mut ListInner) {
        let mut bloom = BloomFilter::with_capacity(inner.set.len() * 2);
        for v in inner.set.iter() {
            bloom.insert_hash(hash_value(&self.hasher, v));
        }
        inner.bloom = bloom;
        inner.removed_since_rebuild = 0;
    }

    /// Exact membership of one already-normalised value, filter first.
    #[inline]
    fn contains_normalised(&self, inner: &ListInner, v: &[u8]) -> bool {
        inner.bloom.might_contain_hash(hash_value(&self.hasher, v)) && inner.set.contains(v)
    }

    /// Whether the Bloom filter alone reports `value` (for tests of the exact confirmation).
    pub fn filter_might_contain(&self, value: &str) -> bool {
        let mut buf = [0u8; VALUE_LEN_MAX];
        match normalise(self.kind, value.as_bytes(), &mut buf) {
            Some(v) => self
                .inner
                .read()
                .bloom
                .might_contain_hash(hash_value(&self.hasher, v)),
            None => false,
        }
    }

    /// Exact membership of `value` looked up as attribute `attr`.
    ///
    /// For e-mail lists an address matches an address entry, or a domain entry equal to its domain or to
    /// any parent domain of it that still contains a dot (`x@a.mailinator.com` matches `mailinator.com`,
    /// never `com`). `:email_domain:` matches domain entries the same way.
    pub fn contains(&self, attr: StrAttr, value: &str) -> bool {
        let mut buf = [0u8; VALUE_LEN_MAX];
        let Some(v) = normalise(self.kind, value.as_bytes(), &mut buf) else {
            return false;
        };
        let inner = self.inner.read();
        if inner.set.is_empty() {
            return false;
        }
        if self.kind != ListKind::Email {
            return self.contains_normalised(&inner, v);
        }
        let mut domain: &[u8] = match attr {
            StrAttr::Email => {
                if self.contains_normalised(&inner, v) {
                    return true;
                }
                match v.iter().rposition(|&b| b == b'@') {
                    Some(at) => &v[at + 1..],
                    None => return false,
                }
            }
            _ => v,
        };
        loop {
            if domain.is_empty() || !domain.contains(&b'.') {
                return false;
            }
            if self.contains_normalised(&inner, domain) {
                return true;
            }
            match domain.iter().position(|&b| b == b'.') {
                Some(dot) => domain = &domain[dot + 1..],
                None => return false,
            }
        }
    }
}

/// All lists of an engine. Lists are created at runtime and never deleted (clear them instead), so that a
/// compiled ruleset can hold its lists directly.
pub struct Lists {
    by_name: RwLock<HashMap<String, Arc<List>>>,
}

impl Default for Lists {
    fn default() -> Self {
        Lists {
            by_name: RwLock::new(HashMap::new()),
        }
    }
}

fn valid_list_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl Lists {
    /// Creates an empty list; `entries_max` defaults to [`LIST_ENTRIES_DEFAULT`].
    pub fn create(
        &self,
        name: &str,
        kind: ListKind,
        entries_max: Option<usize>,
    ) -> Result<Arc<List>, ListError> {
        if !valid_list_name(name) {
            return Err(ListError::InvalidListName(name.to_string()));
        }
        let mut map = self.by_name.write();
        if map.contains_key(name) {
            return Err(ListError::ListExists(name.to_string()));
        }
        if map.len() >= LISTS_MAX {
            return Err(ListError::TooManyLists {
                lists_max: LISTS_MAX,
            });
        }
        let entries_max = entries_max
            .unwrap_or(LIST_ENTRIES_DEFAULT)
            .clamp(1, LIST_ENTRIES_MAX);
        let list = Arc::new(List::new(name, kind, entries_max));
        map.insert(name.to_string(), list.clone());
        Ok(list)
    }

    pub fn get(&self, name: &str) -> Option<Arc<List>> {
        self.by_name.read().get(name).cloned()
    }

    fn require(&self, name: &str) -> Result<Arc<List>, ListError> {
        self.get(name)
            .ok_or_else(|| ListError::UnknownList(name.to_string()))
    }

    pub fn add(&self, name: &str, value: &str) -> Result<bool, ListError> {
        self.require(name)?.add(value)
    }

    pub fn remove(&self, name: &str, value: &str) -> Result<bool, ListError> {
        self.require(name)?.remove(value)
    }

    pub fn info(&self) -> Vec<ListInfo> {
        let mut v: Vec<ListInfo> = self.by_name.read().values().map(|l| l.info()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_and_exact_membership() {
        let lists = Lists::default();
        let l = lists.create("blocked_cards", ListKind::Card, None).unwrap();
        assert!(!l.contains(StrAttr::Card, "tok_visa"));
        assert!(lists.add("blocked_cards", "tok_visa").unwrap());
        assert!(!lists.add("blocked_cards", "tok_visa").unwrap());
        assert!(l.contains(StrAttr::Card, "tok_visa"));
        assert!(
            !l.contains(StrAttr::Card, "TOK_VISA"),
            "card tokens are case-sensitive"
        );
        assert!(lists.remove("blocked_cards", "tok_visa").unwrap());
        assert!(!lists.remove("blocked_cards", "tok_visa").unwrap());
        assert!(!l.contains(StrAttr::Card, "tok_visa"));
    }

    #[test]
    fn bloom_false_positive_is_rejected_by_exact_set() {
        let lists = Lists::default();
        let l = lists.create("ips", ListKind::Ip, None).unwrap();
        for i in 0..1000 {
            l.add(&format!("10.0.{}.{}", i / 256, i % 256)).unwrap();
        }
        let mut filter_hits = 0;
        for i in 0..50_000 {
            let probe = format!("192.168.{}.{}", i / 256, i % 256);
            if l.filter_might_contain(&probe) {
                filter_hits += 1;
                assert!(
                    !l.contains(StrAttr::Ip, &probe),
                    "false positive must not be a member"
                );
            }
        }
        assert!(
            filter_hits > 0,
            "the test needs at least one filter false positive"
        );
        assert!(
            filter_hits < 50_000 / 20,
            "false-positive rate far above design: {filter_hits}"
        );
    }

    #[test]
    fn blocked_filter_false_positive_rate_is_near_design_at_capacity() {
        let mut f = BloomFilter::with_capacity(100_000);
        let state = hasher();
        for i in 0..f.capacity() {
            f.insert_hash(hash_value(&state, format!("member{i}").as_bytes()));
        }
        let probes = 200_000;
        let hits = (0..probes)
            .filter(|i| f.might_contain_hash(hash_value(&state, format!("other{i}").as_bytes())))
            .count();
        let rate = hits as f64 / probes as f64;
        eprintln!("blocked Bloom filter false-positive rate at capacity: {rate}");
        assert!(rate < 0.025, "false-positive rate {rate}");
    }

    #[test]
    fn removal_rebuilds_filter_and_growth_keeps_members() {
        let lists = Lists::default();
        let l = lists.create("devices", ListKind::Device, None).unwrap();
        for i in 0..5000 {
            l.add(&format!("dev{i}")).unwrap();
        }
        assert!(l.info().bloom_capacity >= 5000);
        for i in 0..4000 {
            l.remove(&format!("dev{i}")).unwrap();
        }
        for i in 0..5000 {
            assert_eq!(l.contains(StrAttr::DeviceId, &format!("dev{i}")), i >= 4000);
        }
    }

    #[test]
    fn size_and_length_limits_give_clear_errors() {
        let lists = Lists::default();
        lists.create("small", ListKind::String, Some(2)).unwrap();
        lists.add("small", "a").unwrap();
        lists.add("small", "b").unwrap();
        let err = lists.add("small", "c").unwrap_err();
        assert_eq!(
            err,
            ListError::Full {
                list: "small".into(),
                entries_max: 2
            }
        );
        assert_eq!(err.to_string(), "list @small is full: at most 2 entries");
        let long = "x".repeat(VALUE_LEN_MAX + 1);
        assert!(matches!(
            lists.add("small", &long),
            Err(ListError::ValueTooLong { .. })
        ));
        assert!(matches!(
            lists.add("nope", "x"),
            Err(ListError::UnknownList(_))
        ));
        assert!(matches!(
            lists.create("small", ListKind::Ip, None),
            Err(ListError::ListExists(_))
        ));
        assert!(matches!(
            lists.create("bad name", ListKind::Ip, None),
            Err(ListError::InvalidListName(_))
        ));
    }

    #[test]
    fn email_list_matches_addresses_domains_and_parent_domains() {
        let lists = Lists::default();
        let l = lists
            .create("disposable_domains", ListKind::Email, None)
            .unwrap();
        l.add("Mailinator.com").unwrap();
        l.add("fraudster@example.org").unwrap();
        assert!(l.contains(StrAttr::Email, "x@mailinator.com"));
        assert!(l.contains(StrAttr::Email, "X@MAILINATOR.COM"));
        assert!(l.contains(StrAttr::Email, "x@eu.mailinator.com"));
        assert!(!l.contains(StrAttr::Email, "x@notmailinator.com"));
        assert!(l.contains(StrAttr::Email, "Fraudster@Example.org"));
        assert!(!l.contains(StrAttr::Email, "other@example.org"));
        assert!(l.contains(StrAttr::EmailDomain, "mailinator.com"));
        assert!(!l.contains(StrAttr::Email, "x@com"));
    }

    #[test]
    fn country_lists_fold_case_and_kinds_check_attributes() {
        let lists = Lists::default();
        let l = lists.create("high_risk", ListKind::Country, None).unwrap();
        l.add("ng").unwrap();
        assert!(l.contains(StrAttr::IpCountry, "NG"));
        assert!(ListKind::Country.accepts(StrAttr::CardCountry));
        assert!(!ListKind::Country.accepts(StrAttr::Email));
        assert!(ListKind::String.accepts(StrAttr::CustomerId));
        assert!(ListKind::Email.accepts(StrAttr::EmailDomain));
    }
}
