//! The rules language: compile a ruleset once, evaluate it per request without any string parsing.
//!
//! See `docs/risk.md` for the language. A compiled [`Ruleset`] holds its lists directly, so evaluation
//! needs no name lookups; the list lookups a ruleset needs are collected at compile time
//! ([`Ruleset::probe_lists`]) so they run once per request as a separate, timeable stage.

mod lexer;
mod parser;

use std::collections::HashSet;
use std::sync::Arc;

use crate::attrs::{Features, StrAttr};
use crate::error::{RuleError, RuleErrorKind, RulesError};
use crate::input::{Action, Context, DeclineCode};
use crate::lists::{List, Lists};
pub use lexer::CmpOp;
pub use parser::{EXPR_DEPTH_MAX, LIST_PROBES_MAX};

pub const RULES_MAX: usize = 10_000;
pub const LINE_LEN_MAX: usize = 4_096;
pub const RULE_NAME_LEN_MAX: usize = 64;

/// A compiled boolean expression.
#[derive(Debug, Clone)]
pub enum Expr {
    Or(Box<[Expr]>),
    And(Box<[Expr]>),
    Not(Box<Expr>),
    NumLit {
        attr: u16,
        op: CmpOp,
        lit: f64,
    },
    NumAttr {
        a: u16,
        op: CmpOp,
        b: u16,
    },
    StrLit {
        attr: StrAttr,
        negated: bool,
        lit: Box<str>,
    },
    StrAttr {
        a: StrAttr,
        negated: bool,
        b: StrAttr,
    },
    /// Index into [`Ruleset::probes`].
    InList(u16),
}

/// One (attribute, list) lookup needed by a ruleset.
#[derive(Debug, Clone)]
pub struct ListProbe {
    pub attr: StrAttr,
    pub list: Arc<List>,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub action: Action,
    pub line: usize,
    /// The decline code reported when this rule blocks a payment.
    pub decline_code: DeclineCode,
    pub expr: Expr,
}

/// Results of a ruleset's list lookups for one request (one bit per probe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListHits {
    bits: [u64; LIST_PROBES_MAX / 64],
}

impl ListHits {
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    #[inline]
    fn set(&mut self, i: usize) {
        self.bits[i / 64] |= 1 << (i % 64);
    }
}

/// A compiled ruleset with its version number.
#[derive(Debug, Clone)]
pub struct Ruleset {
    pub version: u64,
    pub rules: Vec<Rule>,
    pub probes: Vec<ListProbe>,
    pub source: Arc<str>,
}

#[inline]
fn cmp(x: f64, op: CmpOp, y: f64) -> bool {
    // A missing (NaN) value makes every comparison false, `!=` included.
    if x.is_nan() || y.is_nan() {
        return false;
    }
    match op {
        CmpOp::Eq => x == y,
        CmpOp::Ne => x != y,
        CmpOp::Gt => x > y,
        CmpOp::Ge => x >= y,
        CmpOp::Lt => x < y,
        CmpOp::Le => x <= y,
    }
}

#[inline]
fn str_eq(a: &str, b: &str, case_insensitive: bool) -> bool {
    if case_insensitive {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

impl Expr {
    #[inline]
    fn eval(&self, ctx: &Context<'_>, f: &Features, hits: &ListHits) -> bool {
        match self {
            Expr::Or(terms) => terms.iter().any(|t| t.eval(ctx, f, hits)),
            Expr::And(terms) => terms.iter().all(|t| t.eval(ctx, f, hits)),
            Expr::Not(e) => !e.eval(ctx, f, hits),
            Expr::NumLit { attr, op, lit } => cmp(f.values[*attr as usize], *op, *lit),
            Expr::NumAttr { a, op, b } => cmp(f.values[*a as usize], *op, f.values[*b as usize]),
            Expr::StrLit { attr, negated, lit } => match attr.get(ctx) {
                Some(v) => str_eq(v, lit, attr.case_insensitive()) != *negated,
                None => false,
            },
            Expr::StrAttr { a, negated, b } => match (a.get(ctx), b.get(ctx)) {
                (Some(x), Some(y)) => {
                    str_eq(x, y, a.case_insensitive() || b.case_insensitive()) != *negated
                }
                _ => false,
            },
            Expr::InList(i) => hits.get(*i as usize),
        }
    }
}

/// Removes a `#` comment that is not inside a string literal.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '#') => return &line[..i],
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    line
}

fn valid_rule_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= RULE_NAME_LEN_MAX
}

impl Ruleset {
    /// An empty ruleset: every payment gets the default allow.
    pub fn empty(version: u64) -> Ruleset {
        Ruleset {
            version,
            rules: Vec::new(),
            probes: Vec::new(),
            source: "".into(),
        }
    }

    /// Compiles `source`, resolving `@list` names against `lists`. Every line is checked; all errors are
    /// returned together.
    pub fn compile(source: &str, version: u64, lists: &Lists) -> Result<Ruleset, RulesError> {
        let mut rules = Vec::new();
        let mut probes = Vec::new();
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        for (idx, raw) in source.lines().enumerate() {
            let line_no = idx + 1;
            if raw.len() > LINE_LEN_MAX {
                errors.push(RuleError {
                    line: line_no,
                    column: LINE_LEN_MAX + 1,
                    kind: RuleErrorKind::Limit,
                    message: format!("line longer than {LINE_LEN_MAX} bytes"),
                });
                continue;
            }
            let text = strip_comment(raw);
            if text.trim().is_empty() {
                continue;
            }
            let toks = match lexer::lex(text, line_no) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let parsed = match parser::Parser::new(
                &toks,
                line_no,
                text.trim_end().len(),
                lists,
                &mut probes,
            )
            .rule()
            {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let name = parsed.name.unwrap_or_else(|| format!("rule_{line_no}"));
            if !valid_rule_name(&name) || !names.insert(name.clone()) {
                errors.push(RuleError {
                    line: line_no,
                    column: toks.first().map(|t| t.column).unwrap_or(1),
                    kind: RuleErrorKind::DuplicateName,
                    message: format!(
                        "rule name {name:?} is already used (or longer than {RULE_NAME_LEN_MAX})"
                    ),
                });
                continue;
            }
            if rules.len() >= RULES_MAX {
                errors.push(RuleError {
                    line: line_no,
                    column: 1,
                    kind: RuleErrorKind::Limit,
                    message: format!("more than {RULES_MAX} rules"),
                });
                break;
            }
            let decline_code = if parsed.uses.list {
                DeclineCode::Blocklisted
            } else if parsed.uses.velocity {
                DeclineCode::VelocityExceeded
            } else if parsed.uses.risk_score {
                DeclineCode::HighestRiskLevel
            } else {
                DeclineCode::Fraudulent
            };
            rules.push(Rule {
                name: name.into(),
                action: parsed.action,
                line: line_no,
                decline_code,
                expr: parsed.expr,
            });
        }
        if errors.is_empty() {
            Ok(Ruleset {
                version,
                rules,
                probes,
                source: source.into(),
            })
        } else {
            Err(RulesError { errors })
        }
    }

    /// Runs every list lookup the ruleset needs (the "lists" stage).
    #[inline]
    pub fn probe_lists(&self, ctx: &Context<'_>) -> ListHits {
        let mut hits = ListHits::default();
        for (i, p) in self.probes.iter().enumerate() {
            if let Some(v) = p.attr.get(ctx) {
                if p.list.contains(p.attr, v) {
                    hits.set(i);
                }
            }
        }
        hits
    }

    /// Evaluates every rule (the "rules" stage), calling `on_match` for each matching rule in source order.
    #[inline]
    pub fn evaluate<'r>(
        &'r self,
        ctx: &Context<'_>,
        features: &Features,
        hits: &ListHits,
        mut on_match: impl FnMut(&'r Rule),
    ) {
        for rule in &self.rules {
            if rule.expr.eval(ctx, features, hits) {
                on_match(rule);
            }
        }
    }

    /// The deciding rule of this ruleset alone: the first matching rule of the highest-priority action.
    pub fn decide<'r>(
        &'r self,
        ctx: &Context<'_>,
        features: &Features,
        hits: &ListHits,
    ) -> Option<&'r Rule> {
        let mut best: Option<&Rule> = None;
        self.evaluate(ctx, features, hits, |r| {
            if best.is_none_or(|b| r.action.priority() > b.action.priority()) {
                best = Some(r);
            }
        });
        best
    }
}

#[cfg(test)]
mod tests;
