//! Filters (AIP-160 subset): tokenizer, parser, compilation against a data type's
//! members, evaluation.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use super::catalogue::{DATA_TYPES, DataType, Shape};
use super::points::Times;
use super::time::{parse_civil_literal, parse_instant};

/// A filter error: catalogue reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FilterError {
    pub(super) reason: &'static str,
    pub(super) message: String,
}

fn ferr(reason: &'static str, message: impl Into<String>) -> FilterError {
    FilterError {
        reason,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Tok {
    Word(String),
    Str(String),
    Op(&'static str),
    LParen,
    RParen,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                out.push(Tok::RParen);
            }
            '"' | '\'' => {
                let quote = c;
                chars.next();
                let mut lit = String::new();
                let mut closed = false;
                while let Some(ch) = chars.next() {
                    match ch {
                        '\\' => {
                            if let Some(esc) = chars.next() {
                                lit.push(esc);
                            }
                        }
                        ch if ch == quote => {
                            closed = true;
                            break;
                        }
                        ch => lit.push(ch),
                    }
                }
                if !closed {
                    return Err(ferr(
                        "INVALID_DATA_POINT_FILTER_SYNTAX",
                        "Invalid filter syntax: unterminated string literal.",
                    ));
                }
                out.push(Tok::Str(lit));
            }
            '>' | '<' | '=' | '!' | ':' => {
                chars.next();
                let two = chars.peek() == Some(&'=');
                let op = match (c, two) {
                    ('>', true) => ">=",
                    ('<', true) => "<=",
                    ('!', true) => "!=",
                    ('>', false) => ">",
                    ('<', false) => "<",
                    ('=', _) => "=",
                    (':', _) => ":",
                    _ => {
                        return Err(ferr(
                            "INVALID_DATA_POINT_FILTER_SYNTAX",
                            format!("Invalid filter syntax at {c:?}."),
                        ));
                    }
                };
                if two && c != '=' {
                    chars.next();
                }
                out.push(Tok::Op(op));
            }
            c if c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '+') => {
                // A bare timestamp keeps its colons (and is then refused as unquoted).
                let numeric = c.is_ascii_digit();
                let mut w = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_alphanumeric()
                        || matches!(ch, '_' | '.' | '-' | '+')
                        || (numeric && ch == ':')
                    {
                        w.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(w));
            }
            other => {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_SYNTAX",
                    format!("Invalid filter syntax: unexpected character {other:?}."),
                ));
            }
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Cmp {
        member: String,
        op: &'static str,
        value: Tok,
    },
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eoi() -> FilterError {
        ferr(
            "INVALID_DATA_POINT_FILTER_UNEXPECTED_END_OF_INPUT",
            "Invalid filter: unexpected end of input.",
        )
    }

    fn unexpected(t: &Tok) -> FilterError {
        ferr(
            "INVALID_DATA_POINT_FILTER_UNEXPECTED_TOKEN",
            format!("Invalid filter: unexpected token {t:?}."),
        )
    }

    fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
        matches!(t, Some(Tok::Word(w)) if w == kw)
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.and_expr()?];
        while Self::is_kw(self.peek(), "OR") {
            self.pos += 1;
            terms.push(self.and_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.term()?];
        while Self::is_kw(self.peek(), "AND") {
            self.pos += 1;
            terms.push(self.term()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        match self.next() {
            None => Err(Self::eoi()),
            Some(Tok::LParen) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    None => Err(ferr(
                        "INVALID_DATA_POINT_FILTER_MISSING_TOKEN",
                        "Invalid filter: missing ')'.",
                    )),
                    Some(t) => Err(Self::unexpected(&t)),
                }
            }
            Some(Tok::Word(w)) if w == "NOT" => Err(ferr(
                "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE",
                "Invalid filter: NOT is not supported.",
            )),
            Some(Tok::Word(member)) if !matches!(member.as_str(), "AND" | "OR") => {
                let op = match self.next() {
                    None => return Err(Self::eoi()),
                    Some(Tok::Op(op)) => op,
                    Some(t) => return Err(Self::unexpected(&t)),
                };
                match self.next() {
                    None => Err(Self::eoi()),
                    Some(v @ (Tok::Str(_) | Tok::Word(_))) => Ok(Expr::Cmp {
                        member,
                        op,
                        value: v,
                    }),
                    Some(t) => Err(Self::unexpected(&t)),
                }
            }
            Some(t) => Err(Self::unexpected(&t)),
        }
    }
}

pub(super) fn parse_filter(s: &str) -> Result<Option<Expr>, FilterError> {
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { toks, pos: 0 };
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        return Err(Parser::unexpected(t));
    }
    Ok(Some(e))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field {
    PhysStart,
    PhysEnd,
    CivilStart,
    CivilEnd,
    Date,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Bound {
    Instant(DateTime<Utc>),
    Civil(NaiveDateTime),
    Date(NaiveDate),
}

/// A compiled filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    /// `field >= bound` when `ge`, else `field < bound`.
    Test {
        field: Field,
        ge: bool,
        bound: Bound,
    },
}

/// Members a data type's filter accepts, with the comparators allowed on them.
fn members(t: &DataType) -> Vec<(&'static str, Field, &'static [&'static str])> {
    const GE_LT: &[&str] = &[">=", "<"];
    match (t.shape, t.id) {
        (Shape::Interval, _) => vec![
            ("interval.start_time", Field::PhysStart, GE_LT),
            ("interval.civil_start_time", Field::CivilStart, GE_LT),
        ],
        (Shape::Sample, _) => vec![
            ("sample_time.physical_time", Field::PhysStart, GE_LT),
            ("sample_time.civil_time", Field::CivilStart, GE_LT),
        ],
        (Shape::Daily, _) => vec![("date", Field::Date, GE_LT)],
        (Shape::Session, "sleep") => vec![
            ("interval.end_time", Field::PhysEnd, GE_LT),
            ("interval.civil_end_time", Field::CivilEnd, GE_LT),
        ],
        (Shape::Session, "electrocardiogram") => {
            vec![("interval.start_time", Field::PhysStart, &[">="])]
        }
        (Shape::Session, _) => vec![("interval.civil_start_time", Field::CivilStart, GE_LT)],
        (Shape::Untimed, _) => vec![],
    }
}

pub(super) fn compile_filter(t: &DataType, e: &Expr) -> Result<Cond, FilterError> {
    // Whole-expression checks first: one data type, OR only for sleep, no mixed time kinds.
    fn walk<'a>(e: &'a Expr, cmps: &mut Vec<(&'a str, &'static str, &'a Tok)>, has_or: &mut bool) {
        match e {
            Expr::And(v) => v.iter().for_each(|x| walk(x, cmps, has_or)),
            Expr::Or(v) => {
                *has_or = true;
                v.iter().for_each(|x| walk(x, cmps, has_or));
            }
            Expr::Cmp { member, op, value } => cmps.push((member, op, value)),
        }
    }
    let mut cmps = Vec::new();
    let mut has_or = false;
    walk(e, &mut cmps, &mut has_or);
    let own = t.filter_name();
    let prefixes: BTreeSet<&str> = cmps
        .iter()
        .map(|(m, _, _)| m.split('.').next().unwrap_or(""))
        .collect();
    if prefixes.len() > 1 {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_MIXED_DATA_TYPE_RESTRICTIONS",
            "Invalid filter: restrictions on more than one data type.",
        ));
    }
    if let Some(p) = prefixes.iter().next()
        && *p != own
    {
        let known = DATA_TYPES.iter().any(|d| d.filter_name() == *p);
        return Err(if known {
            ferr(
                "INVALID_DATA_POINT_FILTER_COLLECTION_MISMATCH",
                format!(
                    "Invalid filter: data type '{p}' does not match the collection '{}'.",
                    t.id
                ),
            )
        } else {
            ferr(
                "INVALID_DATA_POINT_FILTER_DATA_TYPE_RESTRICTION",
                format!("Invalid filter: unknown data type '{p}'."),
            )
        });
    }
    if has_or && t.id != "sleep" {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE",
            "Invalid filter: OR is only supported for sleep.",
        ));
    }
    let allowed = members(t);
    let mut kinds = BTreeSet::new();
    for (member, _, _) in &cmps {
        let rest = member
            .strip_prefix(own.as_str())
            .and_then(|r| r.strip_prefix('.'));
        let Some((_, field, _)) = allowed.iter().find(|(m, _, _)| Some(*m) == rest) else {
            return Err(ferr(
                "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER",
                format!(
                    "Invalid filter: '{member}' is not a supported filter field for '{}'.",
                    t.id
                ),
            ));
        };
        kinds.insert(matches!(field, Field::PhysStart | Field::PhysEnd));
    }
    if kinds.len() > 1 {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_MIXED_TIME_RESTRICTIONS",
            "Invalid filter: physical and civil time restrictions cannot be mixed.",
        ));
    }
    compile_expr(&own, &allowed, e)
}

fn compile_expr(
    own: &str,
    allowed: &[(&'static str, Field, &'static [&'static str])],
    e: &Expr,
) -> Result<Cond, FilterError> {
    match e {
        Expr::And(v) => Ok(Cond::And(
            v.iter()
                .map(|x| compile_expr(own, allowed, x))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Or(v) => Ok(Cond::Or(
            v.iter()
                .map(|x| compile_expr(own, allowed, x))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Cmp { member, op, value } => {
            let rest = member.strip_prefix(own).and_then(|r| r.strip_prefix('.'));
            let Some((_, field, ops)) = allowed.iter().find(|(m, _, _)| Some(*m) == rest) else {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER",
                    format!("Invalid filter: unsupported field '{member}'."),
                ));
            };
            if !ops.contains(op) {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR",
                    format!(
                        "Invalid filter: comparator '{op}' is not supported for '{member}' (supported: {}).",
                        ops.join(", ")
                    ),
                ));
            }
            let Tok::Str(lit) = value else {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_RESTRICTION_ARGUMENT",
                    format!("Invalid filter: the value of '{member}' must be a quoted string."),
                ));
            };
            let bound = match field {
                Field::PhysStart | Field::PhysEnd => {
                    Bound::Instant(parse_instant(lit).ok_or_else(|| {
                        ferr(
                            "INVALID_DATA_POINT_FILTER_TIMESTAMP_FORMAT",
                            format!("Invalid filter: '{lit}' is not an RFC 3339 timestamp."),
                        )
                    })?)
                }
                Field::CivilStart | Field::CivilEnd => Bound::Civil(
                    parse_civil_literal(lit)
                        .map_err(|out_of_range| civil_error(lit, out_of_range))?,
                ),
                Field::Date => {
                    let parsed = if lit.len() == 10 {
                        parse_civil_literal(lit)
                    } else {
                        Err(false)
                    };
                    Bound::Date(
                        parsed
                            .map_err(|out_of_range| civil_error(lit, out_of_range))?
                            .date(),
                    )
                }
            };
            Ok(Cond::Test {
                field: *field,
                ge: *op == ">=",
                bound,
            })
        }
    }
}

fn civil_error(lit: &str, out_of_range: bool) -> FilterError {
    if out_of_range {
        ferr(
            "INVALID_CIVIL_DATE_TIME",
            format!("Invalid filter: '{lit}' is not a valid civil date time."),
        )
    } else {
        ferr(
            "INVALID_DATA_POINT_FILTER_CIVIL_DATE_TIME_FORMAT",
            format!("Invalid filter: '{lit}' is not in the format YYYY-MM-DD[THH:mm:ss]."),
        )
    }
}

pub(super) fn eval(c: &Cond, t: &Times) -> bool {
    match c {
        Cond::And(v) => v.iter().all(|x| eval(x, t)),
        Cond::Or(v) => v.iter().any(|x| eval(x, t)),
        Cond::Test { field, ge, bound } => {
            let ord = match (field, bound) {
                (Field::PhysStart, Bound::Instant(b)) => t.start.cmp(b),
                (Field::PhysEnd, Bound::Instant(b)) => t.end.cmp(b),
                (Field::CivilStart, Bound::Civil(b)) => t.civil_start.cmp(b),
                (Field::CivilEnd, Bound::Civil(b)) => t.civil_end.cmp(b),
                (Field::Date, Bound::Date(b)) => t.date.unwrap_or(t.civil_start.date()).cmp(b),
                _ => return false,
            };
            if *ge { ord.is_ge() } else { ord.is_lt() }
        }
    }
}
