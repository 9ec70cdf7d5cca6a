//! Tokens of one rule line.

use crate::error::{RuleError, RuleErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }

    /// The operator with its operands swapped (`a < b` is `b > a`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            other => other,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A bare word: keyword, action or rule name.
    Word(String),
    /// `:name:`
    Attr(String),
    /// `@name`
    List(String),
    Str(String),
    Num(f64),
    Op(CmpOp),
    LParen,
    RParen,
    Colon,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub tok: Tok,
    /// 1-based byte column.
    pub column: usize,
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Splits one line (comment already removed) into tokens.
pub fn lex(line: &str, line_no: usize) -> Result<Vec<Token>, RuleError> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |column: usize, message: String| RuleError {
        line: line_no,
        column,
        kind: RuleErrorKind::Syntax,
        message,
    };
    while i < b.len() {
        let c = b[i];
        let column = i + 1;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let tok = match c {
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b':' => {
                // `:name:` is an attribute; a lone `:` ends a rule name.
                let mut j = i + 1;
                while j < b.len() && is_word(b[j]) {
                    j += 1;
                }
                if j > i + 1 && j < b.len() && b[j] == b':' {
                    let name = line[i + 1..j].to_string();
                    i = j + 1;
                    Tok::Attr(name)
                } else {
                    i += 1;
                    Tok::Colon
                }
            }
            b'@' => {
                let mut j = i + 1;
                while j < b.len() && is_word(b[j]) {
                    j += 1;
                }
                if j == i + 1 {
                    return Err(err(column, "expected a list name after '@'".into()));
                }
                let name = line[i + 1..j].to_string();
                i = j;
                Tok::List(name)
            }
            b'\'' | b'"' => {
                let Some(len) = line[i + 1..].find(c as char) else {
                    return Err(err(column, "unterminated string literal".into()));
                };
                let s = line[i + 1..i + 1 + len].to_string();
                i += len + 2;
                Tok::Str(s)
            }
            b'=' => {
                i += if b.get(i + 1) == Some(&b'=') { 2 } else { 1 };
                Tok::Op(CmpOp::Eq)
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::Op(CmpOp::Ne)
            }
            b'>' | b'<' => {
                let eq = b.get(i + 1) == Some(&b'=');
                i += 1 + eq as usize;
                Tok::Op(match (c, eq) {
                    (b'>', false) => CmpOp::Gt,
                    (b'>', true) => CmpOp::Ge,
                    (_, false) => CmpOp::Lt,
                    (_, true) => CmpOp::Le,
                })
            }
            b'0'..=b'9' | b'-' | b'.' => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'_') {
                    j += 1;
                }
                let text: String = line[i..j].chars().filter(|&c| c != '_').collect();
                let n: f64 = text
                    .parse()
                    .map_err(|_| err(column, format!("invalid number {:?}", &line[i..j])))?;
                if !n.is_finite() {
                    return Err(err(column, format!("invalid number {:?}", &line[i..j])));
                }
                i = j;
                Tok::Num(n)
            }
            c if is_word_start(c) => {
                let mut j = i + 1;
                while j < b.len() && (is_word(b[j]) || b[j] == b'-') {
                    j += 1;
                }
                let w = line[i..j].to_string();
                i = j;
                Tok::Word(w)
            }
            _ => {
                let ch = line[i..].chars().next().unwrap_or('?');
                return Err(err(column, format!("unexpected character {ch:?}")));
            }
        };
        out.push(Token { tok, column });
    }
    Ok(out)
}
