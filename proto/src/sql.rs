//! SQL92 message filters (RocketMQ's `MessageSelector.bySql`): a condition on a message's
//! properties, evaluated by the broker at pull time and again by the client. Pure: a parser
//! and an evaluator over a property lookup.
//!
//! The language is RocketMQ's subset:
//! - numbers (`10`, `-3`, `2.5`) compare with `=`, `<>`, `>`, `>=`, `<`, `<=` and
//!   `[NOT] BETWEEN a AND b`; a property compared with a number is read as one;
//! - strings (`'a'`, a quote doubled inside: `'it''s'`) compare with `=`, `<>` and
//!   `[NOT] IN ('a', 'b')`;
//! - `TRUE` / `FALSE`, `IS [NOT] NULL`, `AND`, `OR`, `NOT`, parentheses; keywords in any case.
//!
//! `TAGS` names the message's tag. A missing property, or one that is not a number where a
//! number is compared, makes its comparison unknown, as SQL's NULL: unknown is not a match,
//! and `NOT` of unknown is unknown.

use std::cmp::Ordering;

use crate::limits::MAX_SUB_EXPR_LEN;

/// A subscription's expression type (RocketMQ's `ExpressionType`): tags (`*`, `A || B`).
pub const EXPR_TYPE_TAG: u8 = 0;
/// A subscription's expression type: an SQL92 filter ([`SqlFilter`]).
pub const EXPR_TYPE_SQL92: u8 = 1;

/// How a subscription is shown: the tag expression, or `SQL92 <filter>`.
pub fn display(expr_type: u8, expr: &str) -> String {
    match expr_type {
        EXPR_TYPE_SQL92 => format!("SQL92 {expr}"),
        _ => expr.to_owned(),
    }
}

/// Deepest nesting of parentheses and `NOT`s a filter may have (the parser recurses).
pub const MAX_SQL_DEPTH: usize = 64;
/// The property that stands for the message's tag.
pub const TAGS_PROPERTY: &str = "TAGS";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SQL92 filter {expr:?}: {why} (at byte {at})")]
pub struct SqlError {
    pub expr: String,
    pub why: String,
    pub at: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn parse(s: &str) -> Option<Num> {
        let s = s.trim();
        if let Ok(i) = s.parse::<i64>() {
            return Some(Num::Int(i));
        }
        s.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Num::Float)
    }

    fn cmp(&self, other: &Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(&self) -> f64 {
        match self {
            Num::Int(i) => *i as f64,
            Num::Float(f) => *f,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn holds(self, o: Ordering) -> bool {
        match self {
            Op::Eq => o == Ordering::Equal,
            Op::Ne => o != Ordering::Equal,
            Op::Gt => o == Ordering::Greater,
            Op::Ge => o != Ordering::Less,
            Op::Lt => o == Ordering::Less,
            Op::Le => o != Ordering::Greater,
        }
    }

    /// The same comparison with its sides swapped (`5 < a` is `a > 5`).
    fn swapped(self) -> Op {
        match self {
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            o => o,
        }
    }
}

/// A constant of a filter.
#[derive(Clone, Debug, PartialEq)]
enum Lit {
    Num(Num),
    Str(String),
    Bool(bool),
    Null,
}

#[derive(Clone, Debug, PartialEq)]
enum Cond {
    Const(Option<bool>),
    /// A property compared with a constant.
    Cmp(String, Op, Lit),
    /// Two properties compared (as numbers if both read as numbers, else as strings for
    /// `=` / `<>`).
    CmpProps(String, Op, String),
    Between {
        prop: String,
        low: Num,
        high: Num,
        negated: bool,
    },
    In {
        prop: String,
        set: Vec<String>,
        negated: bool,
    },
    IsNull(String, bool),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

/// A parsed filter; [`SqlFilter::matches`] evaluates it. Two filters are equal when their
/// texts are.
#[derive(Clone, Debug)]
pub struct SqlFilter {
    source: String,
    cond: Cond,
}

impl PartialEq for SqlFilter {
    fn eq(&self, other: &SqlFilter) -> bool {
        self.source == other.source
    }
}

impl Eq for SqlFilter {}

impl std::fmt::Display for SqlFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl SqlFilter {
    pub fn parse(expr: &str) -> Result<SqlFilter, SqlError> {
        let err = |why: String, at: usize| SqlError {
            expr: expr.chars().take(200).collect(),
            why,
            at,
        };
        if expr.len() > MAX_SUB_EXPR_LEN {
            return Err(err(
                format!("{} bytes, over the limit of {MAX_SUB_EXPR_LEN}", expr.len()),
                0,
            ));
        }
        let tokens = lex(expr).map_err(|(why, at)| err(why, at))?;
        if tokens.is_empty() {
            return Err(err("empty".into(), 0));
        }
        let mut p = Parser {
            tokens,
            pos: 0,
            end: expr.len(),
        };
        let cond = p.or(0).map_err(|(why, at)| err(why, at))?;
        if let Some((_, at)) = p.tokens.get(p.pos) {
            return Err(err("unexpected text after the condition".into(), *at));
        }
        Ok(SqlFilter {
            source: expr.trim().to_owned(),
            cond,
        })
    }

    /// Whether a stored message matches (its properties, and its tag as [`TAGS_PROPERTY`]).
    pub fn matches_record(&self, r: &crate::record::RecordView<'_>) -> bool {
        self.matches(|k| match k {
            TAGS_PROPERTY => Some(r.tags).filter(|t| !t.is_empty()),
            _ => r.property(k),
        })
    }

    /// Whether a message whose properties `prop` looks up (with [`TAGS_PROPERTY`] its tag)
    /// matches: the condition is true (not false, not unknown).
    pub fn matches<'a>(&self, prop: impl Fn(&str) -> Option<&'a str>) -> bool {
        eval(&self.cond, &prop) == Some(true)
    }
}

fn eval<'a>(c: &Cond, prop: &impl Fn(&str) -> Option<&'a str>) -> Option<bool> {
    match c {
        Cond::Const(v) => *v,
        Cond::Cmp(name, op, lit) => {
            let v = prop(name)?;
            match lit {
                Lit::Num(n) => Some(op.holds(Num::parse(v)?.cmp(n)?)),
                Lit::Str(s) => Some(op.holds(v.cmp(s.as_str()))),
                Lit::Bool(b) => {
                    let v = match v.trim().to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return None,
                    };
                    Some(op.holds(v.cmp(b)))
                }
                Lit::Null => None,
            }
        }
        Cond::CmpProps(a, op, b) => {
            let (a, b) = (prop(a)?, prop(b)?);
            match (Num::parse(a), Num::parse(b)) {
                (Some(x), Some(y)) => Some(op.holds(x.cmp(&y)?)),
                _ if matches!(op, Op::Eq | Op::Ne) => Some(op.holds(a.cmp(b))),
                _ => None,
            }
        }
        Cond::Between {
            prop: name,
            low,
            high,
            negated,
        } => {
            let v = Num::parse(prop(name)?)?;
            let inside = v.cmp(low)? != Ordering::Less && v.cmp(high)? != Ordering::Greater;
            Some(inside != *negated)
        }
        Cond::In {
            prop: name,
            set,
            negated,
        } => {
            let v = prop(name)?;
            Some(set.iter().any(|s| s == v) != *negated)
        }
        Cond::IsNull(name, negated) => Some(prop(name).is_none() != *negated),
        Cond::Not(c) => eval(c, prop).map(|b| !b),
        // Short-circuits: the right side is not looked at once the left decides.
        Cond::And(a, b) => match eval(a, prop) {
            Some(false) => Some(false),
            l => match (l, eval(b, prop)) {
                (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
        },
        Cond::Or(a, b) => match eval(a, prop) {
            Some(true) => Some(true),
            l => match (l, eval(b, prop)) {
                (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
        },
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// A keyword, upper-cased.
    Kw(&'static str),
    Str(String),
    Num(Num),
    Op(Op),
    Open,
    Close,
    Comma,
}

const KEYWORDS: [&str; 9] = [
    "AND", "OR", "NOT", "BETWEEN", "IN", "IS", "NULL", "TRUE", "FALSE",
];

/// Tokens with their byte positions.
fn lex(s: &str) -> Result<Vec<(Tok, usize)>, (String, usize)> {
    let b = s.as_bytes();
    let mut out: Vec<(Tok, usize)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let after_operand = matches!(
            out.last(),
            Some((Tok::Ident(_) | Tok::Str(_) | Tok::Num(_) | Tok::Close, _))
        );
        let tok = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Tok::Open
            }
            b')' => {
                i += 1;
                Tok::Close
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'=' => {
                i += 1;
                Tok::Op(Op::Eq)
            }
            b'<' | b'>' | b'!' => {
                let next = b.get(i + 1).copied();
                let (op, n) = match (c, next) {
                    (b'<', Some(b'>')) | (b'!', Some(b'=')) => (Op::Ne, 2),
                    (b'<', Some(b'=')) => (Op::Le, 2),
                    (b'>', Some(b'=')) => (Op::Ge, 2),
                    (b'<', _) => (Op::Lt, 1),
                    (b'>', _) => (Op::Gt, 1),
                    _ => return Err(("'!' not followed by '='".into(), i)),
                };
                i += n;
                Tok::Op(op)
            }
            b'\'' => {
                let mut v = String::new();
                i += 1;
                loop {
                    let Some(rest) = s.get(i..) else {
                        return Err(("unterminated string".into(), start));
                    };
                    let Some(q) = rest.find('\'') else {
                        return Err(("unterminated string".into(), start));
                    };
                    v.push_str(&rest[..q]);
                    i += q + 1;
                    if b.get(i) == Some(&b'\'') {
                        v.push('\'');
                        i += 1;
                    } else {
                        break;
                    }
                }
                Tok::Str(v)
            }
            c if c.is_ascii_digit() || (c == b'-' && !after_operand) => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                let text = &s[start..i];
                match Num::parse(text) {
                    Some(n) if text != "-" => Tok::Num(n),
                    _ => return Err((format!("bad number {text:?}"), start)),
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'$' | b'.'))
                {
                    i += 1;
                }
                let word = &s[start..i];
                let upper = word.to_ascii_uppercase();
                match KEYWORDS.iter().find(|k| **k == upper) {
                    Some(k) => Tok::Kw(k),
                    None => Tok::Ident(word.to_owned()),
                }
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err((format!("unexpected character {ch:?}"), i));
            }
        };
        out.push((tok, start));
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(Tok, usize)>,
    pos: usize,
    /// The expression's length: where "the end" is reported.
    end: usize,
}

type PResult<T> = Result<T, (String, usize)>;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(_, at)| *at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).map(|(t, _)| t.clone());
        self.pos += 1;
        t
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.peek() == Some(&Tok::Kw(keyword(kw))) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> PResult<()> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err((format!("expected {kw}"), self.at()))
        }
    }

    fn or(&mut self, depth: usize) -> PResult<Cond> {
        let mut c = self.and(depth)?;
        while self.eat_kw("OR") {
            c = Cond::Or(Box::new(c), Box::new(self.and(depth)?));
        }
        Ok(c)
    }

    fn and(&mut self, depth: usize) -> PResult<Cond> {
        let mut c = self.not(depth)?;
        while self.eat_kw("AND") {
            c = Cond::And(Box::new(c), Box::new(self.not(depth)?));
        }
        Ok(c)
    }

    fn not(&mut self, depth: usize) -> PResult<Cond> {
        if depth >= MAX_SQL_DEPTH {
            return Err((format!("nested deeper than {MAX_SQL_DEPTH}"), self.at()));
        }
        if self.eat_kw("NOT") {
            return Ok(Cond::Not(Box::new(self.not(depth + 1)?)));
        }
        self.predicate(depth)
    }

    fn predicate(&mut self, depth: usize) -> PResult<Cond> {
        let at = self.at();
        match self.next() {
            Some(Tok::Open) => {
                let c = self.or(depth + 1)?;
                match self.next() {
                    Some(Tok::Close) => Ok(c),
                    _ => Err(("expected ')'".into(), self.prev_at())),
                }
            }
            Some(Tok::Ident(name)) => self.after_property(name),
            Some(Tok::Kw("TRUE")) => Ok(Cond::Const(Some(true))),
            Some(Tok::Kw("FALSE")) => Ok(Cond::Const(Some(false))),
            // A constant first: `5 < a` is `a > 5`.
            Some(Tok::Num(n)) => self.constant_first(Lit::Num(n), at),
            Some(Tok::Str(s)) => self.constant_first(Lit::Str(s), at),
            Some(_) => Err(("expected a condition".into(), at)),
            None => Err(("expected a condition, found the end".into(), at)),
        }
    }

    fn prev_at(&self) -> usize {
        self.tokens
            .get(self.pos.saturating_sub(1))
            .map_or(self.end, |(_, at)| *at)
    }

    fn constant_first(&mut self, lit: Lit, at: usize) -> PResult<Cond> {
        let Some(Tok::Op(op)) = self.next() else {
            return Err(("a constant must be compared with a property".into(), at));
        };
        match self.next() {
            Some(Tok::Ident(name)) => comparison(name, op.swapped(), lit, at),
            _ => Err(("a constant must be compared with a property".into(), at)),
        }
    }

    fn after_property(&mut self, name: String) -> PResult<Cond> {
        let at = self.at();
        match self.next() {
            Some(Tok::Op(op)) => {
                let at = self.at();
                match self.next() {
                    Some(Tok::Ident(other)) => Ok(Cond::CmpProps(name, op, other)),
                    Some(Tok::Num(n)) => comparison(name, op, Lit::Num(n), at),
                    Some(Tok::Str(s)) => comparison(name, op, Lit::Str(s), at),
                    Some(Tok::Kw("TRUE")) => comparison(name, op, Lit::Bool(true), at),
                    Some(Tok::Kw("FALSE")) => comparison(name, op, Lit::Bool(false), at),
                    Some(Tok::Kw("NULL")) => comparison(name, op, Lit::Null, at),
                    _ => Err(("expected a property or a constant".into(), at)),
                }
            }
            Some(Tok::Kw("IS")) => {
                let negated = self.eat_kw("NOT");
                self.expect_kw("NULL")?;
                Ok(Cond::IsNull(name, negated))
            }
            Some(Tok::Kw("NOT")) => match self.peek() {
                Some(Tok::Kw("BETWEEN")) => {
                    self.pos += 1;
                    self.between(name, true)
                }
                Some(Tok::Kw("IN")) => {
                    self.pos += 1;
                    self.in_list(name, true)
                }
                _ => Err(("expected BETWEEN or IN after NOT".into(), self.at())),
            },
            Some(Tok::Kw("BETWEEN")) => self.between(name, false),
            Some(Tok::Kw("IN")) => self.in_list(name, false),
            _ => Err((
                format!(
                    "property {name} must be compared (=, <>, >, >=, <, <=, BETWEEN, IN, IS NULL)"
                ),
                at,
            )),
        }
    }

    fn number(&mut self) -> PResult<Num> {
        let at = self.at();
        match self.next() {
            Some(Tok::Num(n)) => Ok(n),
            _ => Err(("expected a number".into(), at)),
        }
    }

    fn between(&mut self, prop: String, negated: bool) -> PResult<Cond> {
        let low = self.number()?;
        self.expect_kw("AND")?;
        let high = self.number()?;
        Ok(Cond::Between {
            prop,
            low,
            high,
            negated,
        })
    }

    fn in_list(&mut self, prop: String, negated: bool) -> PResult<Cond> {
        if self.next() != Some(Tok::Open) {
            return Err(("expected '(' after IN".into(), self.prev_at()));
        }
        let mut set = Vec::new();
        loop {
            let at = self.at();
            match self.next() {
                Some(Tok::Str(s)) => set.push(s),
                _ => return Err(("IN takes strings: ('a', 'b')".into(), at)),
            }
            match self.next() {
                Some(Tok::Comma) => {}
                Some(Tok::Close) => break,
                _ => return Err(("expected ',' or ')'".into(), self.prev_at())),
            }
        }
        Ok(Cond::In { prop, set, negated })
    }
}

/// `name op lit`, refusing what RocketMQ's filters do not compare: strings by order.
fn comparison(name: String, op: Op, lit: Lit, at: usize) -> PResult<Cond> {
    if matches!(lit, Lit::Str(_) | Lit::Bool(_)) && !matches!(op, Op::Eq | Op::Ne) {
        return Err(("strings and booleans compare only with = and <>".into(), at));
    }
    if lit == Lit::Null {
        return Err(("compare with NULL by IS NULL or IS NOT NULL".into(), at));
    }
    Ok(Cond::Cmp(name, op, lit))
}

fn keyword(kw: &str) -> &'static str {
    KEYWORDS
        .iter()
        .find(|k| **k == kw)
        .expect("a keyword of the list")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |k| kv.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
    }

    fn m(expr: &str, kv: &[(&str, &str)]) -> bool {
        SqlFilter::parse(expr)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(props(kv))
    }

    #[test]
    fn numbers_compare_as_numbers() {
        let kv = [("a", "10"), ("b", "2.5"), ("big", "9007199254740993")];
        assert!(m("a > 9", &kv));
        assert!(!m("a > 10", &kv));
        assert!(m("a >= 10 AND a <= 10 AND a = 10", &kv));
        assert!(m("a <> 11 and a != 11", &kv));
        assert!(m("b < 3 AND b > 2", &kv));
        assert!(m("9 < a", &kv), "a constant first");
        assert!(m("a BETWEEN 10 AND 12", &kv));
        assert!(!m("a NOT BETWEEN 10 AND 12", &kv));
        assert!(m("a > -5", &kv));
        // Integers compare exactly, past what a double holds.
        assert!(m("big = 9007199254740993", &kv));
        assert!(!m("big = 9007199254740992", &kv));
    }

    #[test]
    fn strings_and_booleans_compare_for_equality() {
        let kv = [("c", "red"), ("TAGS", "TagA"), ("q", "it's"), ("f", "TRUE")];
        assert!(m("c = 'red'", &kv));
        assert!(m("c <> 'blue'", &kv));
        assert!(m("c IN ('blue', 'red')", &kv));
        assert!(!m("c NOT IN ('blue', 'red')", &kv));
        assert!(m("TAGS = 'TagA'", &kv));
        assert!(m("q = 'it''s'", &kv));
        assert!(m("f = TRUE and not (f = false)", &kv));
        assert!(m("c = c", &kv), "two properties");
    }

    #[test]
    fn a_missing_or_unreadable_property_is_unknown_not_a_match() {
        let kv = [("a", "x"), ("n", "5")];
        assert!(!m("missing > 1", &kv));
        assert!(!m("NOT (missing > 1)", &kv), "NOT of unknown is unknown");
        assert!(!m("a > 1", &kv), "not a number");
        assert!(!m("NOT (a > 1)", &kv));
        assert!(m("missing IS NULL AND a IS NOT NULL", &kv));
        assert!(m("missing > 1 OR n = 5", &kv), "true OR unknown");
        assert!(!m("missing > 1 AND n = 5", &kv), "unknown AND true");
        assert!(!m("missing > 1 OR n = 6", &kv));
        assert!(m("TRUE", &kv) && !m("FALSE", &kv));
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let kv = [("a", "1"), ("b", "2")];
        assert!(m("a = 1 OR a = 2 AND b = 3", &kv));
        assert!(!m("(a = 1 OR a = 2) AND b = 3", &kv));
        assert!(m("NOT a = 2 AND b = 2", &kv));
        assert!(m("((a = 1))", &kv));
    }

    #[test]
    fn bad_filters_are_refused_with_where_and_why() {
        for (bad, why) in [
            ("", "empty"),
            ("a", "must be compared"),
            ("a >", "expected a property or a constant"),
            ("a > 'x'", "only with = and <>"),
            ("a = NULL", "IS NULL"),
            ("a BETWEEN 1", "expected AND"),
            ("a BETWEEN 'x' AND 2", "expected a number"),
            ("a IN (1, 2)", "IN takes strings"),
            ("a IN ('x'", "expected ',' or ')'"),
            ("(a = 1", "expected ')'"),
            ("a = 1 b = 2", "unexpected text"),
            ("a = 'open", "unterminated string"),
            ("a # 1", "unexpected character"),
            ("a ! 1", "'!'"),
            ("5 = 5", "compared with a property"),
            ("a = 1 AND", "found the end"),
            ("a = 1.2.3", "bad number"),
        ] {
            let e = SqlFilter::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
        let deep = format!("{}a = 1{}", "(".repeat(100), ")".repeat(100));
        assert!(SqlFilter::parse(&deep).unwrap_err().why.contains("nested"));
        let nots = format!("{}a = 1", "NOT ".repeat(100));
        assert!(SqlFilter::parse(&nots).unwrap_err().why.contains("nested"));
        let long = format!("a IN ({})", vec!["'x'"; 2000].join(","));
        assert!(SqlFilter::parse(&long)
            .unwrap_err()
            .why
            .contains("over the limit"));
    }

    #[test]
    fn the_source_is_kept_for_display() {
        let f = SqlFilter::parse("  a > 1 ").unwrap();
        assert_eq!(f.to_string(), "a > 1");
    }
}
