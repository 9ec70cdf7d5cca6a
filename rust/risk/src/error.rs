//! One error type per area of the risk engine, each with a `Display` that an operator can act on.

use std::fmt;

/// Errors of list management (create, add, remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    UnknownList(String),
    ListExists(String),
    InvalidListName(String),
    TooManyLists {
        lists_max: usize,
    },
    Full {
        list: String,
        entries_max: usize,
    },
    ValueTooLong {
        list: String,
        len: usize,
        value_len_max: usize,
    },
    EmptyValue {
        list: String,
    },
    UnknownKind(String),
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListError::UnknownList(name) => write!(f, "unknown list @{name}"),
            ListError::ListExists(name) => write!(f, "list @{name} already exists"),
            ListError::InvalidListName(name) => write!(
                f,
                "invalid list name {name:?}: use 1-64 characters of [A-Za-z0-9_], starting with a letter or _"
            ),
            ListError::TooManyLists { lists_max } => {
                write!(f, "too many lists: at most {lists_max} lists can exist")
            }
            ListError::Full { list, entries_max } => {
                write!(f, "list @{list} is full: at most {entries_max} entries")
            }
            ListError::ValueTooLong { list, len, value_len_max } => write!(
                f,
                "value of {len} bytes is too long for list @{list}: at most {value_len_max} bytes"
            ),
            ListError::EmptyValue { list } => write!(f, "empty value cannot be added to list @{list}"),
            ListError::UnknownKind(kind) => write!(
                f,
                "unknown list kind {kind:?}: expected one of card, bin, email, ip, device, country, string"
            ),
        }
    }
}

impl std::error::Error for ListError {}

/// What went wrong on one line of a ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleErrorKind {
    Syntax,
    UnknownAttribute,
    UnknownList,
    TypeMismatch,
    DuplicateName,
    Limit,
}

/// One compile error of a ruleset, located by 1-based line and 1-based column (in bytes).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RuleError {
    pub line: usize,
    pub column: usize,
    pub kind: RuleErrorKind,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// All compile errors of a ruleset: every line is checked so an analyst sees every mistake at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RulesError {
    pub errors: Vec<RuleError>,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RulesError {}

/// Errors of loading an XGBoost JSON model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    Json(String),
    Missing(&'static str),
    Unsupported(String),
    Invalid(String),
    TooLarge(String),
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Json(e) => write!(f, "model is not valid JSON: {e}"),
            ModelError::Missing(field) => write!(f, "model has no field {field}"),
            ModelError::Unsupported(what) => write!(f, "unsupported model: {what}"),
            ModelError::Invalid(what) => write!(f, "invalid model: {what}"),
            ModelError::TooLarge(what) => write!(f, "model too large: {what}"),
        }
    }
}

impl std::error::Error for ModelError {}
