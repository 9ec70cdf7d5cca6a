//! The gateway's risk engine: lists, velocity counters, a rules language and a tree-model score.
//!
//! Pure Rust, no I/O, no Python. `Engine` is `Send + Sync`; `Engine::decide` is called once per payment
//! by the fast path. See `docs/risk.md` for the language and the semantics.

pub mod attrs;
pub mod card;
pub mod engine;
pub mod error;
pub mod input;
pub mod lists;
pub mod model;
pub mod rules;
pub mod shared_velocity;
pub mod velocity;

pub use card::{card_attributes, CardAttributes, Country};
pub use engine::{Engine, EngineConfig, ShadowSample, ShadowStats, StageTimings};
pub use error::{ListError, ModelError, RuleError, RuleErrorKind, RulesError};
pub use input::{
    Action, Context, Decision, DeclineCode, MatchedRule, RiskInput, RiskRequest, Scope,
};
pub use lists::{List, ListInfo, ListKind, Lists};
pub use model::Model;
pub use rules::{Rule, Ruleset};
pub use shared_velocity::{SharedEvent, SharedFeatures, SharedVelocityError, VELOCITY_FEATURES};
pub use velocity::{VelocityConfig, VelocityStore};
