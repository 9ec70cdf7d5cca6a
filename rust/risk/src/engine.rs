//! The engine: lists, velocity, model and rulesets behind atomic swaps, and `decide`.
//!
//! Precedence (see `docs/risk.md`): within one ruleset the winning rule is the first matching rule of
//! the highest-priority action, allow > block > challenge > review; no match is the default allow.
//! Between the global ruleset and the merchant's ruleset:
//! global allow > global block > merchant allow > merchant block > challenge > review (global before
//! merchant at equal action) > default allow. A merchant can therefore loosen a global challenge or
//! review with its own allow rule, but can never override a global block.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::attrs::{Features, RISK_SCORE};
use crate::error::{ModelError, RulesError};
use crate::input::{Action, Context, Decision, MatchedRule, RiskInput, RiskRequest, Scope};
use crate::lists::Lists;
use crate::model::Model;
use crate::rules::{Rule, Ruleset};
use crate::shared_velocity::SharedFeatures;
use crate::velocity::{Event, VelocityConfig, VelocityStore};

pub const MERCHANT_RULESETS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EngineConfig {
    pub velocity: VelocityConfig,
    /// Most recent differing shadow decisions kept for inspection.
    pub shadow_samples_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            velocity: VelocityConfig::default(),
            shadow_samples_max: 100,
        }
    }
}

/// Nanoseconds spent in each stage of one `decide_timed` call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StageTimings {
    /// Derivation of card attributes, amounts and stateless features, plus the velocity update.
    pub velocity_ns: u64,
    pub model_ns: u64,
    pub lists_ns: u64,
    pub rules_ns: u64,
}

/// A differing shadow decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowSample {
    pub now_ms: u64,
    pub merchant_id: String,
    pub live_action: Action,
    pub live_rule: Option<Arc<str>>,
    pub shadow_action: Action,
    pub shadow_rule: Option<Arc<str>>,
    pub risk_score: Option<u8>,
}

/// Counters of the shadow ruleset since it was installed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowStats {
    pub shadow_ruleset_version: Option<u64>,
    pub evaluated: u64,
    pub differences: u64,
    /// `(live action, shadow action, count)` for every pair seen, differing or not.
    pub by_actions: Vec<(Action, Action, u64)>,
    pub samples: Vec<ShadowSample>,
}

struct ShadowCounters {
    evaluated: AtomicU64,
    differences: AtomicU64,
    by_actions: [[AtomicU64; 4]; 4],
    samples: Mutex<VecDeque<ShadowSample>>,
}

impl ShadowCounters {
    fn new() -> Self {
        ShadowCounters {
            evaluated: AtomicU64::new(0),
            differences: AtomicU64::new(0),
            by_actions: Default::default(),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    fn reset(&self) {
        self.evaluated.store(0, Ordering::Relaxed);
        self.differences.store(0, Ordering::Relaxed);
        for row in &self.by_actions {
            for c in row {
                c.store(0, Ordering::Relaxed);
            }
        }
        self.samples.lock().clear();
    }
}

/// The risk engine. `Send + Sync`: share one per process (e.g. in an `Arc`) and call `decide` from any
/// thread.
pub struct Engine {
    config: EngineConfig,
    lists: Lists,
    velocity: VelocityStore,
    /// The model and its short hash, swapped together.
    model: RwLock<Option<(Arc<Model>, Arc<str>)>>,
    global: RwLock<Arc<Ruleset>>,
    merchants: RwLock<HashMap<Box<str>, Arc<Ruleset>, ahash::RandomState>>,
    shadow: RwLock<Option<Arc<Ruleset>>>,
    shadow_counters: ShadowCounters,
}

/// The outcome of a set of rulesets: the deciding rule and its scope.
fn rank(action: Action, scope: Scope) -> u8 {
    match (action, scope) {
        (Action::Allow, Scope::Global) => 8,
        (Action::Block, Scope::Global) => 7,
        (Action::Allow, Scope::Merchant) => 6,
        (Action::Block, Scope::Merchant) => 5,
        (Action::Challenge, Scope::Global) => 4,
        (Action::Challenge, Scope::Merchant) => 3,
        (Action::Review, Scope::Global) => 2,
        (Action::Review, Scope::Merchant) => 1,
    }
}

fn combine<'r>(global: Option<&'r Rule>, merchant: Option<&'r Rule>) -> Option<&'r Rule> {
    match (global, merchant) {
        (Some(g), Some(m)) => {
            if rank(g.action, Scope::Global) >= rank(m.action, Scope::Merchant) {
                Some(g)
            } else {
                Some(m)
            }
        }
        (g, m) => g.or(m),
    }
}

fn better(best: Option<&Rule>, candidate: &Rule) -> bool {
    best.is_none_or(|b| candidate.action.priority() > b.action.priority())
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config,
            lists: Lists::default(),
            velocity: VelocityStore::new(config.velocity),
            model: RwLock::new(None),
            global: RwLock::new(Arc::new(Ruleset::empty(0))),
            merchants: RwLock::new(HashMap::with_hasher(ahash::RandomState::new())),
            shadow: RwLock::new(None),
            shadow_counters: ShadowCounters::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn lists(&self) -> &Lists {
        &self.lists
    }

    pub fn velocity(&self) -> &VelocityStore {
        &self.velocity
    }

    /// Compiles a ruleset against this engine's lists (it is not installed).
    pub fn compile_rules(&self, source: &str, version: u64) -> Result<Ruleset, RulesError> {
        Ruleset::compile(source, version, &self.lists)
    }

    /// Atomically replaces the global ruleset; returns the previous one.
    pub fn set_global_rules(&self, rules: Ruleset) -> Arc<Ruleset> {
        std::mem::replace(&mut *self.global.write(), Arc::new(rules))
    }

    pub fn global_rules(&self) -> Arc<Ruleset> {
        self.global.read().clone()
    }

    /// Installs (`Some`) or removes (`None`) a merchant's ruleset.
    pub fn set_merchant_rules(
        &self,
        merchant_id: &str,
        rules: Option<Ruleset>,
    ) -> Result<(), String> {
        let mut map = self.merchants.write();
        match rules {
            Some(r) => {
                if !map.contains_key(merchant_id) && map.len() >= MERCHANT_RULESETS_MAX {
                    return Err(format!("at most {MERCHANT_RULESETS_MAX} merchant rulesets"));
                }
                map.insert(merchant_id.into(), Arc::new(r));
            }
            None => {
                map.remove(merchant_id);
            }
        }
        Ok(())
    }

    pub fn merchant_rules(&self, merchant_id: &str) -> Option<Arc<Ruleset>> {
        self.merchants.read().get(merchant_id).cloned()
    }

    /// Installs or removes the shadow (candidate) ruleset; shadow counters restart from zero.
    pub fn set_shadow_rules(&self, rules: Option<Ruleset>) {
        let mut slot = self.shadow.write();
        *slot = rules.map(Arc::new);
        self.shadow_counters.reset();
    }

    /// Loads an XGBoost JSON model from its file bytes and installs it; returns its short hash.
    pub fn load_model(&self, json: &[u8]) -> Result<String, ModelError> {
        let model = Model::from_json(json)?;
        let hash = model.short_hash().to_string();
        self.set_model(Some(model));
        Ok(hash)
    }

    pub fn set_model(&self, model: Option<Model>) {
        let slot = model.map(|m| {
            let hash: Arc<str> = m.short_hash().into();
            (Arc::new(m), hash)
        });
        *self.model.write() = slot;
    }

    pub fn model(&self) -> Option<Arc<Model>> {
        self.model.read().as_ref().map(|(m, _)| m.clone())
    }

    /// Decides one payment and records it in the velocity counters.
    pub fn decide(&self, input: &RiskInput<'_>, now_ms: u64) -> Decision {
        self.run::<false>(input, now_ms, true, None, &mut StageTimings::default())
    }

    /// `decide` with per-stage timings, for the fast path's histograms and benchmarks.
    pub fn decide_timed(
        &self,
        input: &RiskInput<'_>,
        now_ms: u64,
        timings: &mut StageTimings,
    ) -> Decision {
        self.run::<true>(input, now_ms, true, None, timings)
    }

    /// `decide_timed` with velocity features computed elsewhere (the store shared by the processes of a
    /// cluster): this engine's own velocity store is neither read nor updated.
    pub fn decide_shared(
        &self,
        input: &RiskInput<'_>,
        now_ms: u64,
        velocity: &SharedFeatures,
        timings: &mut StageTimings,
    ) -> Decision {
        self.run::<true>(input, now_ms, true, Some(velocity), timings)
    }

    /// What `decide` would answer, without recording the payment or counting shadow differences.
    pub fn simulate(&self, input: &RiskInput<'_>, now_ms: u64) -> Decision {
        self.run::<false>(input, now_ms, false, None, &mut StageTimings::default())
    }

    /// JSON in, JSON out: a `RiskRequest` to a `Decision` (for tests across languages, not the hot path).
    pub fn decide_json(
        &self,
        request_json: &str,
        now_ms: u64,
    ) -> Result<String, serde_json::Error> {
        let req: RiskRequest = serde_json::from_str(request_json)?;
        serde_json::to_string(&self.decide(&req.as_input(), now_ms))
    }

    /// The velocity and stateless features of a payment (the "velocity" stage), optionally recording it.
    pub fn features(&self, ctx: &Context<'_>, now_ms: u64, record: bool) -> Features {
        let mut f = Features::from_context(ctx);
        self.velocity
            .observe(&Event::from_context(ctx), now_ms, record, &mut f);
        f
    }

    /// The model stage: `risk_score`, or `None` without a model.
    pub fn score(&self, features: &Features) -> Option<u8> {
        self.model.read().as_ref().map(|(m, _)| m.score(features))
    }

    fn run<const TIMED: bool>(
        &self,
        input: &RiskInput<'_>,
        now_ms: u64,
        record: bool,
        shared: Option<&SharedFeatures>,
        timings: &mut StageTimings,
    ) -> Decision {
        let mut clock = if TIMED { Some(Instant::now()) } else { None };
        let mut lap = |slot: &mut u64| {
            if let Some(start) = clock.as_mut() {
                let now = Instant::now();
                *slot = now.duration_since(*start).as_nanos() as u64;
                *start = now;
            }
        };

        let ctx = Context::new(input);
        let mut features = match shared {
            Some(velocity) => {
                let mut f = Features::from_context(&ctx);
                velocity.apply(&mut f);
                f
            }
            None => self.features(&ctx, now_ms, record),
        };
        lap(&mut timings.velocity_ns);

        let model = self.model.read().clone();
        let risk_score = model.as_ref().map(|(m, _)| m.score(&features));
        let model_hash = model.map(|(_, h)| h);
        if let Some(s) = risk_score {
            features.values[RISK_SCORE] = s as f64;
        }
        lap(&mut timings.model_ns);

        let global = self.global.read().clone();
        let merchant = {
            let map = self.merchants.read();
            if map.is_empty() {
                None
            } else {
                map.get(input.merchant_id).cloned()
            }
        };
        let shadow = self.shadow.read().clone();
        let global_hits = global.probe_lists(&ctx);
        let merchant_hits = merchant
            .as_ref()
            .map(|m| m.probe_lists(&ctx))
            .unwrap_or_default();
        let shadow_hits = shadow
            .as_ref()
            .map(|s| s.probe_lists(&ctx))
            .unwrap_or_default();
        lap(&mut timings.lists_ns);

        let mut matched_rules = Vec::new();
        let mut best_global: Option<&Rule> = None;
        global.evaluate(&ctx, &features, &global_hits, |r| {
            matched_rules.push(MatchedRule {
                name: r.name.clone(),
                action: r.action,
                scope: Scope::Global,
            });
            if better(best_global, r) {
                best_global = Some(r);
            }
        });
        let mut best_merchant: Option<&Rule> = None;
        if let Some(m) = merchant.as_deref() {
            m.evaluate(&ctx, &features, &merchant_hits, |r| {
                matched_rules.push(MatchedRule {
                    name: r.name.clone(),
                    action: r.action,
                    scope: Scope::Merchant,
                });
                if better(best_merchant, r) {
                    best_merchant = Some(r);
                }
            });
        }
        let deciding = combine(best_global, best_merchant);
        let action = deciding.map(|r| r.action).unwrap_or(Action::Allow);
        let shadow_rule = shadow
            .as_deref()
            .map(|s| combine(s.decide(&ctx, &features, &shadow_hits), best_merchant));
        let shadow_action = shadow_rule.map(|r| r.map(|r| r.action).unwrap_or(Action::Allow));
        lap(&mut timings.rules_ns);

        if let (true, Some(s_action)) = (record, shadow_action) {
            let c = &self.shadow_counters;
            c.evaluated.fetch_add(1, Ordering::Relaxed);
            c.by_actions[action.index()][s_action.index()].fetch_add(1, Ordering::Relaxed);
            if s_action != action {
                c.differences.fetch_add(1, Ordering::Relaxed);
                // Sampling is best effort: under contention the sample is skipped, the counters stay exact.
                if self.config.shadow_samples_max > 0 {
                    if let Some(mut samples) = c.samples.try_lock() {
                        if samples.len() >= self.config.shadow_samples_max {
                            samples.pop_front();
                        }
                        samples.push_back(ShadowSample {
                            now_ms,
                            merchant_id: input.merchant_id.to_string(),
                            live_action: action,
                            live_rule: deciding.map(|r| r.name.clone()),
                            shadow_action: s_action,
                            shadow_rule: shadow_rule.flatten().map(|r| r.name.clone()),
                            risk_score,
                        });
                    }
                }
            }
        }

        Decision {
            action,
            risk_score,
            decline_code: deciding
                .filter(|r| r.action == Action::Block)
                .map(|r| r.decline_code),
            rule: deciding.map(|r| r.name.clone()),
            matched_rules,
            ruleset_version: global.version,
            merchant_ruleset_version: merchant.as_ref().map(|m| m.version),
            model_hash,
            shadow_action,
            shadow_ruleset_version: shadow.as_ref().map(|s| s.version),
        }
    }

    /// Shadow counters and the most recent differing samples.
    pub fn shadow_stats(&self) -> ShadowStats {
        let c = &self.shadow_counters;
        let mut by_actions = Vec::new();
        for (i, row) in c.by_actions.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    by_actions.push((Action::from_index(i), Action::from_index(j), n));
                }
            }
        }
        ShadowStats {
            shadow_ruleset_version: self.shadow.read().as_ref().map(|s| s.version),
            evaluated: c.evaluated.load(Ordering::Relaxed),
            differences: c.differences.load(Ordering::Relaxed),
            by_actions,
            samples: c.samples.lock().iter().cloned().collect(),
        }
    }
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(EngineConfig::default())
    }
}

#[cfg(test)]
mod tests;
