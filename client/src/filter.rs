//! Subscription expressions: `*` (every message), `TagA || TagB` (messages whose tag is one
//! of these), or an SQL92 filter on the messages' properties. The broker filters (tags by
//! hash); the client checks again (the exact tag string, since two tags can share a hash).

use std::collections::BTreeSet;
use std::fmt;

use orbitmq_proto::limits::MAX_TAGS_LEN;
use orbitmq_proto::record::RecordView;
use orbitmq_proto::sql::{SqlFilter, EXPR_TYPE_SQL92, EXPR_TYPE_TAG, TAGS_PROPERTY};

use crate::error::{ClientError, Result};

/// The expression that matches every message.
pub const SUB_ALL: &str = "*";
/// Separator of tags in an expression.
pub const TAG_SEPARATOR: &str = "||";
pub use orbitmq_proto::limits::MAX_SUB_EXPR_LEN;

/// What a consumer subscribes to of a topic (RocketMQ's `MessageSelector`): every message,
/// some tags, or the messages an SQL92 filter on their properties matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubExpr {
    All,
    Tags(BTreeSet<String>),
    Sql(SqlFilter),
}

impl SubExpr {
    /// Parses `*`, an empty string (same as `*`, as RocketMQ), `TagA` or `TagA || TagB`.
    pub fn parse(expr: &str) -> Result<SubExpr> {
        let e = expr.trim();
        if e.len() > MAX_SUB_EXPR_LEN {
            return Err(ClientError::InvalidArgument(format!(
                "subscription expression is {} bytes, over the limit of {MAX_SUB_EXPR_LEN}",
                e.len()
            )));
        }
        if e.is_empty() || e == SUB_ALL {
            return Ok(SubExpr::All);
        }
        let mut tags = BTreeSet::new();
        for t in e.split(TAG_SEPARATOR).map(str::trim) {
            if t.is_empty() {
                return Err(ClientError::InvalidArgument(format!(
                    "subscription expression {expr:?} has an empty tag"
                )));
            }
            if t.contains(['*', '|']) || t.chars().any(char::is_whitespace) {
                return Err(ClientError::InvalidArgument(format!(
                    "subscription expression {expr:?}: tag {t:?} is not a plain tag \
                     (use \"*\" alone, or \"TagA || TagB\")"
                )));
            }
            if t.len() > MAX_TAGS_LEN {
                return Err(ClientError::InvalidArgument(format!(
                    "tag {t:?} is over the limit of {MAX_TAGS_LEN} bytes"
                )));
            }
            tags.insert(t.to_owned());
        }
        Ok(SubExpr::Tags(tags))
    }

    /// An SQL92 filter on the messages' properties (`TAGS` is the tag), as RocketMQ's
    /// `MessageSelector.bySql`: `a BETWEEN 1 AND 3 AND TAGS = 'TagA'`. The broker filters
    /// (unless its `enablePropertyFilter` is false: then the pull is refused).
    pub fn sql(expr: &str) -> Result<SubExpr> {
        SqlFilter::parse(expr)
            .map(SubExpr::Sql)
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))
    }

    /// Whether a message with these tags matches (exact string comparison); an SQL92
    /// filter needs the properties: [`Self::matches_record`].
    pub fn matches(&self, tags: &str) -> bool {
        match self {
            SubExpr::All => true,
            SubExpr::Tags(set) => set.contains(tags),
            SubExpr::Sql(f) => {
                f.matches(|k| (k == TAGS_PROPERTY && !tags.is_empty()).then_some(tags))
            }
        }
    }

    /// Whether a stored message matches.
    pub fn matches_record(&self, r: &RecordView<'_>) -> bool {
        match self {
            SubExpr::Sql(f) => f.matches_record(r),
            other => other.matches(r.tags),
        }
    }

    /// `orbitmq_proto::sql::EXPR_TYPE_TAG` or `EXPR_TYPE_SQL92`, as pulls and heartbeats
    /// carry it.
    pub fn expr_type(&self) -> u8 {
        match self {
            SubExpr::Sql(_) => EXPR_TYPE_SQL92,
            _ => EXPR_TYPE_TAG,
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, SubExpr::All)
    }
}

/// The normalized form sent to the broker: `*` or `A || B` (sorted, deduplicated), or the
/// SQL92 filter's text.
impl fmt::Display for SubExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubExpr::All => f.write_str(SUB_ALL),
            SubExpr::Sql(s) => write!(f, "{s}"),
            SubExpr::Tags(set) => {
                for (i, t) in set.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" || ")?;
                    }
                    f.write_str(t)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rocketmq_expressions() {
        assert_eq!(SubExpr::parse("*").unwrap(), SubExpr::All);
        assert_eq!(SubExpr::parse(" ").unwrap(), SubExpr::All);
        let e = SubExpr::parse("TagB || TagA ||TagB").unwrap();
        assert_eq!(e.to_string(), "TagA || TagB");
        assert!(e.matches("TagA"));
        assert!(e.matches("TagB"));
        assert!(!e.matches("TagC"));
        assert!(!e.matches(""));
        assert!(!e.matches("TagA || TagB"));
        assert!(SubExpr::All.matches(""));
        assert_eq!(SubExpr::parse("Only").unwrap().to_string(), "Only");
    }

    #[test]
    fn rejects_malformed_expressions() {
        for bad in ["A ||", "|| A", "A || || B", "A || *", "A | B", "A B"] {
            assert!(SubExpr::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(SubExpr::parse(&"x".repeat(MAX_TAGS_LEN + 1)).is_err());
        assert!(SubExpr::parse(&"x".repeat(MAX_SUB_EXPR_LEN + 1)).is_err());
    }
}
