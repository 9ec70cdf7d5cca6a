//! Recursive-descent parser and type checker: one line of source into one compiled rule.
//!
//! ```text
//! rule    := [name ':'] action 'if' expr
//! expr    := and ('or' and)*
//! and     := unary ('and' unary)*
//! unary   := 'not' unary | '(' expr ')' | operand cmp operand | operand ['not'] 'in' @list
//! operand := :attribute: | 'string' | "string" | number
//! ```

use std::sync::Arc;

use super::lexer::{CmpOp, Tok, Token};
use super::{Expr, ListProbe};
use crate::attrs::{lookup_attr, Attr, RISK_SCORE, VELOCITY_BASE};
use crate::error::{RuleError, RuleErrorKind};
use crate::input::Action;
use crate::lists::Lists;

/// Limits on a single ruleset.
pub const EXPR_DEPTH_MAX: usize = 32;
pub const LIST_PROBES_MAX: usize = 256;

/// What the compiler learns about a rule besides its expression.
#[derive(Debug, Default, Clone, Copy)]
pub struct Uses {
    pub list: bool,
    pub velocity: bool,
    pub risk_score: bool,
}

pub struct Parsed {
    pub name: Option<String>,
    pub action: Action,
    pub expr: Expr,
    pub uses: Uses,
}

enum Operand {
    Attr(Attr, usize),
    Str(String, usize),
    Num(f64, usize),
}

pub struct Parser<'a> {
    toks: &'a [Token],
    pos: usize,
    line: usize,
    line_len: usize,
    lists: &'a Lists,
    probes: &'a mut Vec<ListProbe>,
    uses: Uses,
    depth: usize,
}

impl<'a> Parser<'a> {
    pub fn new(
        toks: &'a [Token],
        line: usize,
        line_len: usize,
        lists: &'a Lists,
        probes: &'a mut Vec<ListProbe>,
    ) -> Self {
        Parser {
            toks,
            pos: 0,
            line,
            line_len,
            lists,
            probes,
            uses: Uses::default(),
            depth: 0,
        }
    }

    fn err(&self, column: usize, kind: RuleErrorKind, message: String) -> RuleError {
        RuleError {
            line: self.line,
            column,
            kind,
            message,
        }
    }

    fn column(&self) -> usize {
        self.toks
            .get(self.pos)
            .map(|t| t.column)
            .unwrap_or(self.line_len + 1)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn peek_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }

    fn unexpected(&self, expected: &str) -> RuleError {
        let found = match self.peek() {
            None => "end of line".to_string(),
            Some(t) => describe(t),
        };
        self.err(
            self.column(),
            RuleErrorKind::Syntax,
            format!("expected {expected}, found {found}"),
        )
    }

    pub fn rule(mut self) -> Result<Parsed, RuleError> {
        let mut name = None;
        if let (Some(Tok::Word(w)), Some(Tok::Colon)) =
            (self.peek(), self.toks.get(self.pos + 1).map(|t| &t.tok))
        {
            name = Some(w.clone());
            self.pos += 2;
        }
        let action = match self.peek() {
            Some(Tok::Word(w)) => match Action::parse(w) {
                Some(a) => a,
                None => return Err(self.unexpected("an action (allow, block, challenge, review)")),
            },
            _ => return Err(self.unexpected("an action (allow, block, challenge, review)")),
        };
        self.pos += 1;
        if !self.peek_word("if") {
            return Err(self.unexpected("'if'"));
        }
        self.pos += 1;
        let expr = self.expr()?;
        if self.pos < self.toks.len() {
            return Err(self.unexpected("'and', 'or' or end of line"));
        }
        Ok(Parsed {
            name,
            action,
            expr,
            uses: self.uses,
        })
    }

    /// One level deeper into the expression; refused past `EXPR_DEPTH_MAX` (the caller undoes it).
    fn nest(&mut self) -> Result<(), RuleError> {
        self.depth += 1;
        if self.depth > EXPR_DEPTH_MAX {
            return Err(self.err(
                self.column(),
                RuleErrorKind::Limit,
                format!("expression nested deeper than {EXPR_DEPTH_MAX}"),
            ));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Expr, RuleError> {
        self.nest()?;
        let mut terms = vec![self.and()?];
        while self.peek_word("or") {
            self.pos += 1;
            terms.push(self.and()?);
        }
        self.depth -= 1;
        Ok(if terms.len() == 1 {
            terms.pop().expect("one term")
        } else {
            Expr::Or(terms.into())
        })
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut terms = vec![self.unary()?];
        while self.peek_word("and") {
            self.pos += 1;
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one term")
        } else {
            Expr::And(terms.into())
        })
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.peek_word("not") {
            self.pos += 1;
            self.nest()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let e = self.expr()?;
            if self.peek() != Some(&Tok::RParen) {
                return Err(self.unexpected("')'"));
            }
            self.pos += 1;
            return Ok(e);
        }
        let left = self.operand()?;
        let op_column = self.column();
        // Membership.
        let negated = self.peek_word("not");
        if negated || self.peek_word("in") {
            if negated {
                self.pos += 1;
                if !self.peek_word("in") {
                    return Err(self.unexpected("'in'"));
                }
            }
            self.pos += 1;
            let list_column = self.column();
            let Some(Tok::List(list_name)) = self.peek().cloned() else {
                return Err(self.unexpected("a list (@name)"));
            };
            self.pos += 1;
            let attr = match left {
                Operand::Attr(Attr::Str(a), _) => a,
                Operand::Attr(Attr::Num(i), c) => {
                    return Err(self.err(
                        c,
                        RuleErrorKind::TypeMismatch,
                        format!(
                            "numeric attribute :{}: cannot be looked up in a list",
                            crate::attrs::numeric_names()[i]
                        ),
                    ))
                }
                Operand::Str(_, c) | Operand::Num(_, c) => {
                    return Err(self.err(
                        c,
                        RuleErrorKind::TypeMismatch,
                        "only an attribute can be looked up in a list".into(),
                    ))
                }
            };
            let Some(list) = self.lists.get(&list_name) else {
                return Err(self.err(
                    list_column,
                    RuleErrorKind::UnknownList,
                    format!("unknown list @{list_name}"),
                ));
            };
            if !list.kind().accepts(attr) {
                return Err(self.err(
                    op_column,
                    RuleErrorKind::TypeMismatch,
                    format!(
                        "attribute :{}: cannot be looked up in @{list_name}, a {} list",
                        attr.name(),
                        list.kind().as_str()
                    ),
                ));
            }
            let probe = match self
                .probes
                .iter()
                .position(|p| p.attr == attr && Arc::ptr_eq(&p.list, &list))
            {
                Some(p) => p,
                None => {
                    if self.probes.len() >= LIST_PROBES_MAX {
                        return Err(self.err(
                            list_column,
                            RuleErrorKind::Limit,
                            format!(
                                "more than {LIST_PROBES_MAX} distinct list lookups in one ruleset"
                            ),
                        ));
                    }
                    self.probes.push(ListProbe { attr, list });
                    self.probes.len() - 1
                }
            };
            if !negated {
                self.uses.list = true;
            }
            let e = Expr::InList(probe as u16);
            return Ok(if negated { Expr::Not(Box::new(e)) } else { e });
        }
        let Some(Tok::Op(op)) = self.peek().cloned() else {
            return Err(self.unexpected("a comparison operator (= != > >= < <=) or 'in'"));
        };
        self.pos += 1;
        let right = self.operand()?;
        self.comparison(left, op, op_column, right)
    }

    fn operand(&mut self) -> Result<Operand, RuleError> {
        let column = self.column();
        let op = match self.peek().cloned() {
            Some(Tok::Attr(name)) => {
                let Some(attr) = lookup_attr(&name) else {
                    return Err(self.err(
                        column,
                        RuleErrorKind::UnknownAttribute,
                        format!("unknown attribute :{name}:"),
                    ));
                };
                if let Attr::Num(i) = attr {
                    if i == RISK_SCORE {
                        self.uses.risk_score = true;
                    } else if i >= VELOCITY_BASE {
                        self.uses.velocity = true;
                    }
                }
                Operand::Attr(attr, column)
            }
            Some(Tok::Str(s)) => Operand::Str(s, column),
            Some(Tok::Num(n)) => Operand::Num(n, column),
            _ => return Err(self.unexpected("an attribute (:name:), a string or a number")),
        };
        self.pos += 1;
        Ok(op)
    }

    fn comparison(
        &self,
        left: Operand,
        op: CmpOp,
        column: usize,
        right: Operand,
    ) -> Result<Expr, RuleError> {
        let mismatch = |msg: String| self.err(column, RuleErrorKind::TypeMismatch, msg);
        let string_op = |op: CmpOp| -> Result<bool, RuleError> {
            match op {
                CmpOp::Eq => Ok(false),
                CmpOp::Ne => Ok(true),
                _ => Err(mismatch(format!(
                    "operator {} needs numbers; strings compare only with = and !=",
                    op.as_str()
                ))),
            }
        };
        let num_name = |i: usize| crate::attrs::numeric_names()[i].clone();
        match (left, right) {
            (Operand::Attr(Attr::Num(a), _), Operand::Num(n, _)) => Ok(Expr::NumLit {
                attr: a as u16,
                op,
                lit: n,
            }),
            (Operand::Num(n, _), Operand::Attr(Attr::Num(a), _)) => Ok(Expr::NumLit {
                attr: a as u16,
                op: op.flipped(),
                lit: n,
            }),
            (Operand::Attr(Attr::Num(a), _), Operand::Attr(Attr::Num(b), _)) => Ok(Expr::NumAttr {
                a: a as u16,
                op,
                b: b as u16,
            }),
            (Operand::Attr(Attr::Str(a), _), Operand::Str(s, _))
            | (Operand::Str(s, _), Operand::Attr(Attr::Str(a), _)) => Ok(Expr::StrLit {
                attr: a,
                negated: string_op(op)?,
                lit: s.into_boxed_str(),
            }),
            (Operand::Attr(Attr::Str(a), _), Operand::Attr(Attr::Str(b), _)) => Ok(Expr::StrAttr {
                a,
                negated: string_op(op)?,
                b,
            }),
            (Operand::Attr(Attr::Num(a), _), Operand::Str(s, _))
            | (Operand::Str(s, _), Operand::Attr(Attr::Num(a), _)) => Err(mismatch(format!(
                "cannot compare numeric attribute :{}: with string {s:?}",
                num_name(a)
            ))),
            (Operand::Attr(Attr::Str(a), _), Operand::Num(n, _))
            | (Operand::Num(n, _), Operand::Attr(Attr::Str(a), _)) => Err(mismatch(format!(
                "cannot compare string attribute :{}: with number {n}",
                a.name()
            ))),
            (Operand::Attr(Attr::Num(a), _), Operand::Attr(Attr::Str(b), _)) => {
                Err(mismatch(format!(
                    "cannot compare numeric attribute :{}: with string attribute :{}:",
                    num_name(a),
                    b.name()
                )))
            }
            (Operand::Attr(Attr::Str(a), _), Operand::Attr(Attr::Num(b), _)) => {
                Err(mismatch(format!(
                    "cannot compare string attribute :{}: with numeric attribute :{}:",
                    a.name(),
                    num_name(b)
                )))
            }
            _ => Err(mismatch("a comparison needs at least one attribute".into())),
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => format!("'{w}'"),
        Tok::Attr(a) => format!("attribute :{a}:"),
        Tok::List(l) => format!("list @{l}"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Num(n) => format!("number {n}"),
        Tok::Op(o) => format!("operator {}", o.as_str()),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Colon => "':'".into(),
    }
}
