//! Google Health data points → Measurements (pure): the data type table ([`DataTypeTable`],
//! from `data_types.toml`) says how each Google data type is fetched and which record fields
//! hold which component in which unit.
//!
//! # proto3 JSON (google-health.md §3.1)
//! int64 values arrive as strings (`"beatsPerMinute": "61"`) and sometimes as numbers: both
//! are read. A double the service cannot compute arrives as the string `"NaN"` (or
//! `"Infinity"`): skipped and counted (`not_a_number`). Durations are strings of seconds
//! (`"-18000s"`, `"1.5s"`). Timestamps are RFC 3339 in UTC with 0, 3, 6 or 9 fractional
//! digits. Fields holding defaults are omitted: a `TimeOfDay` of midnight is `{}` or absent.
//!
//! # Time (§3.4)
//! Every sample and interval carries its UTC instant and the UTC offset in force
//! (`utcOffset` / `startUtcOffset`): `effective_start` is the instant in ms, and
//! `utc_offset_seconds` the offset. Without an offset it is derived from the civil time when
//! that is present (civil − instant); without both it stays unknown. Daily values carry only a
//! civil `date` "in the user's time zone": their Measurement covers that local day in the zone
//! passed to [`normalize_in`] (the user's `users/me/settings` `timeZone`, or a fixed offset),
//! else the UTC day with no offset.
//!
//! # Identity (§3.10)
//! `measurement_id` is `google-health:{provider_user_id}:{google type}:{key}:{ohx data type}`:
//! - identifiable types (sleep, weight, body fat, core temperature): the key is the point's id,
//!   the last segment of its `name` (`list`) or `dataPointName` (`reconcile`); the user segment
//!   of names is the numeric user id, not `me`, so it is never part of the key;
//! - daily values: the local date `YYYY-MM-DD`;
//! - other samples and intervals: the start instant in epoch ms.
//!
//! Points read with `list` are one per source, so the key of a non-identifiable `list` point
//! ends with its source (platform and device or app); `reconcile` points are one merged stream
//! and carry no source. The key never mixes the two (§3.10).
//!
//! # Devices
//! A `list` point's `dataSource.device` becomes a [`Device`] (`{platform}:{displayName}`, the
//! display name as model). Its manufacturer is the source's own for Google's platforms
//! (`[sources] first_party`: Fitbit, Nest; a `Pixel…` device is Google's), and left empty for
//! third-party sources (Health Connect, HealthKit, apps writing through an API), which must not
//! be labelled as Google hardware. A `MANUAL` recording is `manual` with no device.

use crate::policy::Policy;
use jiff::Timestamp;
use jiff::civil;
use jiff::tz::TimeZone;
use ohx_common::records::{
    AGGREGATION_HOURLY, AGGREGATION_INDIVIDUAL, Component, Context, Device, Measurement, Waveform,
    series_key,
};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The provider's name (records, routes, the `measurement_id` prefix).
pub const NAME: &str = "google-health";

/// Every Google Health user scope starts so (§2.4).
pub const SCOPE_PREFIX: &str = "https://www.googleapis.com/auth/googlehealth.";

/// The compiled-in table.
const BUILTIN: &str = include_str!("data_types.toml");

/// The largest UTC offset accepted, in seconds (±18 h, as `java.time` and RFC 3339 practice).
const MAX_OFFSET_SECONDS: i64 = 18 * 3600;

/// The largest page `list` / `reconcile` accept (§3.5).
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// The largest page for sessions with stages (`sleep`, `exercise`).
pub const MAX_SESSION_PAGE_SIZE: u32 = 25;

/// Where a data type's time is, which decides its filter member and how a point is dated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `sampleTime{physicalTime, utcOffset, civilTime}`.
    Sample,
    /// `interval{startTime, startUtcOffset, endTime, endUtcOffset, civil…}`.
    Interval,
    /// A session `interval` (same fields); sleep filters on its end.
    Session,
    /// `date{year, month, day}` in the user's zone.
    Daily,
    /// A `dailyRollUp` row: `civilStartTime` / `civilEndTime` at the row's top level.
    DailyRollup,
}

/// How a data type is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Method {
    /// `GET …/dataPoints`: one point per source, with `dataSource` and `name`.
    #[serde(rename = "list")]
    List,
    /// `GET …/dataPoints:reconcile`: one merged stream, no `dataSource`.
    #[serde(rename = "reconcile")]
    Reconcile,
    /// `POST …/dataPoints:dailyRollUp`: one row per civil day.
    #[serde(rename = "dailyRollUp")]
    DailyRollUp,
}

impl Method {
    /// The method's name as the table writes it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Reconcile => "reconcile",
            Self::DailyRollUp => "dailyRollUp",
        }
    }
}

/// One component read from a record.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentRule {
    pub code: String,
    /// JSON path in the record (`a.b`, `list[field=VALUE].c`).
    pub path: String,
    /// Sleep: when `path` is absent, the minutes of the session's `stages[]` of these types.
    #[serde(default)]
    pub stage_types: Vec<String>,
    /// Path of a value subtracted from the value (a deviation from a baseline).
    #[serde(default)]
    pub minus: Option<String>,
    /// UCUM unit of the result.
    pub unit: String,
    /// Power of ten applied, decimal-exact (grams → kg: -3).
    #[serde(default)]
    pub shift: i32,
    /// The value is divided by it (seconds → minutes: 60).
    #[serde(default = "one")]
    pub divisor: f64,
    /// The field is a proto3 duration string (`"900s"`).
    #[serde(default)]
    pub duration: bool,
    /// 0 is a value (counts, minutes); default: 0 is no reading.
    #[serde(default)]
    pub allow_zero: bool,
    /// Negative values are values (deviations); default: refused.
    #[serde(default)]
    pub signed: bool,
    /// A missing part is left out; default: the measurement is skipped.
    #[serde(default)]
    pub optional: bool,
    /// The field is an enum: each name's code is the value (unit `1`); another name is an
    /// invalid value.
    #[serde(default)]
    pub codes: BTreeMap<String, i64>,
}

/// The sample series of a record (an ECG's waveform): `sample / scaling` in `unit`, one sample
/// every `1000 / frequency` ms from the record's start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveformRule {
    /// Path of the int32 samples.
    pub samples: String,
    /// Path of the sampling frequency in Hz.
    pub frequency: String,
    /// Path of the samples per `unit` (`millivoltsScalingFactor`).
    pub scaling: String,
    /// UCUM unit of `sample / scaling`.
    pub unit: String,
}

fn one() -> f64 {
    1.0
}

/// One Measurement made of a point.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementRule {
    pub data_type: String,
    /// The default aggregation ([`AGGREGATION_INDIVIDUAL`] or [`AGGREGATION_HOURLY`]); a
    /// patient's policy may override it.
    #[serde(default = "individual")]
    pub aggregation: String,
    /// The value may be absent without being counted.
    #[serde(default)]
    pub optional: bool,
    /// `value` first (unless the measurement is a waveform).
    pub components: Vec<ComponentRule>,
    /// The record's sample series; the measurement lasts as long as its samples.
    #[serde(default)]
    pub waveform: Option<WaveformRule>,
}

fn individual() -> String {
    AGGREGATION_INDIVIDUAL.to_owned()
}

/// One fetch of one Google data type (a fetch category of the adapter).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeRule {
    /// The rule's name in the table (set when loading).
    #[serde(skip)]
    pub name: String,
    /// The kebab-case URL id (default: the rule's name).
    #[serde(default)]
    pub google_type: String,
    /// The camelCase union key holding the record.
    pub json_key: String,
    /// The snake_case prefix of the AIP-160 filter.
    pub filter_name: String,
    pub shape: Shape,
    /// The filter field after the prefix (none for `dailyRollUp`).
    #[serde(default)]
    pub filter_member: Option<String>,
    pub method: Method,
    /// The `.readonly` scope covering the type.
    pub scope: String,
    /// `pageSize` (none: the server's default; always none for `dailyRollUp`).
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Points carry an identifying `name` / `dataPointName`.
    #[serde(default)]
    pub identifiable: bool,
    /// The filter takes a lower bound only (`electrocardiogram`: `>=` only, §3.5).
    #[serde(default)]
    pub lower_bound_only: bool,
    pub measurements: Vec<MeasurementRule>,
}

impl TypeRule {
    /// The ohx data types the rule produces.
    pub fn data_types(&self) -> impl Iterator<Item = &str> {
        self.measurements.iter().map(|m| m.data_type.as_str())
    }

    /// Whether `allows` lets through any of the rule's data types.
    pub fn produces(&self, allows: impl Fn(&str) -> bool) -> bool {
        self.data_types().any(allows)
    }

    /// Whether any of the rule's data types is aggregated per hour under `policy` (its fetch
    /// window is widened to whole hours, [`crate::progress::widen_to_hours`]).
    #[must_use]
    pub fn hourly(&self, policy: &Policy) -> bool {
        self.measurements.iter().any(|m| {
            policy.allows(&m.data_type)
                && policy.aggregation(&m.data_type, &m.aggregation) == AGGREGATION_HOURLY
        })
    }
}

/// Which data sources are Google's own, and who makes their devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    /// `dataSource.platform` → manufacturer of the devices reporting through it.
    #[serde(default)]
    pub first_party: BTreeMap<String, String>,
    /// Device display-name prefix → manufacturer (first-party platforms only).
    #[serde(default)]
    pub model_prefixes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    format: u32,
    #[serde(default)]
    sources: Sources,
    types: BTreeMap<String, TypeRule>,
}

/// How Google Health data types are fetched and what they become.
#[derive(Debug, Clone, PartialEq)]
pub struct DataTypeTable {
    pub sources: Sources,
    /// By rule name (the fetch category): `heart-rate`, `steps`, `steps-daily`, …
    pub types: BTreeMap<String, TypeRule>,
}

/// A data type table that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataTypeTableError {
    #[error("the Google Health data type table is not valid TOML of the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("the Google Health data type table is inconsistent: {0}")]
    Invalid(String),
}

fn invalid(text: String) -> DataTypeTableError {
    DataTypeTableError::Invalid(text)
}

fn is_token(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c))
}

impl DataTypeTable {
    /// The compiled-in table.
    ///
    /// # Errors
    /// When the compiled-in table is inconsistent (a bug caught by its unit test).
    pub fn builtin() -> Result<Self, DataTypeTableError> {
        Self::from_toml(BUILTIN)
    }

    /// A table from TOML text, checked: ids of the right case, a filter member and method
    /// that fit the time shape, page sizes within the API's caps, `.readonly` Google Health
    /// scopes, a `value` first in every measurement, readable paths, units, aggregations, and
    /// every ohx data type made by one rule only.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn from_toml(text: &str) -> Result<Self, DataTypeTableError> {
        let raw: Raw = toml::from_str(text)?;
        if raw.format != 1 {
            return Err(invalid(format!("unknown format {}", raw.format)));
        }
        let mut types = BTreeMap::new();
        let mut made: BTreeMap<String, String> = BTreeMap::new();
        for (name, mut rule) in raw.types {
            rule.name.clone_from(&name);
            if rule.google_type.is_empty() {
                rule.google_type.clone_from(&name);
            }
            check_rule(&rule)?;
            for m in &rule.measurements {
                if let Some(other) = made.insert(m.data_type.clone(), name.clone()) {
                    return Err(invalid(format!(
                        "data type {} is made by {other} and {name}",
                        m.data_type
                    )));
                }
            }
            types.insert(name, rule);
        }
        if types.is_empty() {
            return Err(invalid("no data type".into()));
        }
        Ok(Self {
            sources: raw.sources,
            types,
        })
    }

    /// The rule called `name` (a fetch category).
    #[must_use]
    pub fn rule(&self, name: &str) -> Option<&TypeRule> {
        self.types.get(name)
    }

    /// The rules reading the Google data type `google_type` (a webhook's `dataType`): `steps`
    /// is read by `steps` and `steps-daily`.
    #[must_use]
    pub fn rules_for(&self, google_type: &str) -> Vec<&TypeRule> {
        self.types
            .values()
            .filter(|r| r.google_type == google_type)
            .collect()
    }

    /// The rule making the ohx data type `data_type`.
    #[must_use]
    pub fn rule_for_data_type(&self, data_type: &str) -> Option<&TypeRule> {
        self.types
            .values()
            .find(|r| r.data_types().any(|d| d == data_type))
    }

    /// Rule names whose data types `allows` lets through, in table order.
    pub fn names_allowed(&self, allows: impl Fn(&str) -> bool) -> Vec<&str> {
        self.types
            .iter()
            .filter(|(_, r)| r.produces(&allows))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Every scope the table's data types need, sorted, each once.
    #[must_use]
    pub fn scopes(&self) -> Vec<String> {
        self.scopes_allowed(|_| true)
    }

    /// The scopes of the rules whose data types `allows` lets through, sorted, each once.
    pub fn scopes_allowed(&self, allows: impl Fn(&str) -> bool) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .types
            .values()
            .filter(|r| r.produces(&allows))
            .map(|r| r.scope.as_str())
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }
}

fn check_rule(rule: &TypeRule) -> Result<(), DataTypeTableError> {
    let name = &rule.name;
    if !is_token(name, &['-']) || !is_token(&rule.google_type, &['-']) {
        return Err(invalid(format!(
            "{name}: rule names and google_type are kebab-case"
        )));
    }
    if !is_token(&rule.filter_name, &['_']) {
        return Err(invalid(format!("{name}: filter_name is snake_case")));
    }
    if !rule.json_key.starts_with(|c: char| c.is_ascii_lowercase())
        || !rule.json_key.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(invalid(format!("{name}: json_key is camelCase")));
    }
    let member = rule.filter_member.as_deref();
    let fits = match (rule.method, rule.shape) {
        (Method::DailyRollUp, Shape::DailyRollup) => member.is_none() && rule.page_size.is_none(),
        (Method::DailyRollUp, _) | (_, Shape::DailyRollup) => false,
        (_, Shape::Sample) => member == Some("sample_time.physical_time"),
        (_, Shape::Interval) => member == Some("interval.start_time"),
        (_, Shape::Session) => matches!(member, Some("interval.end_time" | "interval.start_time")),
        (_, Shape::Daily) => member == Some("date"),
    };
    if !fits {
        return Err(invalid(format!(
            "{name}: method {}, shape {:?} and filter_member {member:?} do not fit (dailyRollUp \
             goes with daily_rollup and no filter_member nor page_size)",
            rule.method.as_str(),
            rule.shape
        )));
    }
    if let Some(size) = rule.page_size {
        let cap = if matches!(rule.google_type.as_str(), "sleep" | "exercise") {
            MAX_SESSION_PAGE_SIZE
        } else {
            MAX_PAGE_SIZE
        };
        if size == 0 || size > cap {
            return Err(invalid(format!("{name}: page_size must be 1..={cap}")));
        }
    }
    if !rule.scope.starts_with(SCOPE_PREFIX) || !rule.scope.ends_with(".readonly") {
        return Err(invalid(format!(
            "{name}: scope must be a {SCOPE_PREFIX}….readonly scope"
        )));
    }
    if rule.measurements.is_empty() {
        return Err(invalid(format!("{name} makes no measurement")));
    }
    for m in &rule.measurements {
        check_measurement(rule, m)?;
    }
    Ok(())
}

fn check_measurement(rule: &TypeRule, m: &MeasurementRule) -> Result<(), DataTypeTableError> {
    let at = format!("{}/{}", rule.name, m.data_type);
    if !is_token(&m.data_type, &['_']) {
        return Err(invalid(format!("{at}: data_type is snake_case")));
    }
    if m.aggregation != AGGREGATION_INDIVIDUAL && m.aggregation != AGGREGATION_HOURLY {
        return Err(invalid(format!(
            "{at}: aggregation must be INDIVIDUAL or HOURLY"
        )));
    }
    if m.aggregation == AGGREGATION_HOURLY
        && (!matches!(rule.shape, Shape::Sample | Shape::Interval) || m.components.len() != 1)
    {
        return Err(invalid(format!(
            "{at}: HOURLY needs a sample or interval type and one component"
        )));
    }
    match m.components.first() {
        Some(c) if (c.code == "value" || m.waveform.is_some()) && !c.optional => {}
        _ => {
            return Err(invalid(format!(
                "{at}: the first component must be a required `value` (any required one for \
                 a waveform)"
            )));
        }
    }
    if let Some(w) = &m.waveform
        && ([&w.samples, &w.frequency, &w.scaling]
            .iter()
            .any(|p| parse_path(p).is_none())
            || w.unit.trim().is_empty())
    {
        return Err(invalid(format!("{at}: unreadable waveform paths or unit")));
    }
    let mut codes = BTreeSet::new();
    for c in &m.components {
        if !codes.insert(c.code.as_str()) {
            return Err(invalid(format!("{at}: component {} twice", c.code)));
        }
        if c.unit.trim().is_empty() || c.code.trim().is_empty() {
            return Err(invalid(format!("{at}: empty component code or unit")));
        }
        if parse_path(&c.path).is_none()
            || c.minus.as_deref().is_some_and(|p| parse_path(p).is_none())
        {
            return Err(invalid(format!("{at}/{}: unreadable path", c.code)));
        }
        if !(c.divisor.is_finite() && c.divisor > 0.0 && (-12..=12).contains(&c.shift)) {
            return Err(invalid(format!(
                "{at}/{}: divisor must be positive, shift within ±12",
                c.code
            )));
        }
        if !c.codes.is_empty() && c.unit != "1" {
            return Err(invalid(format!(
                "{at}/{}: a coded component's unit is 1",
                c.code
            )));
        }
        if !c.stage_types.is_empty() && rule.shape != Shape::Session {
            return Err(invalid(format!(
                "{at}/{}: stage_types are for sessions only",
                c.code
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading proto3 JSON
// ---------------------------------------------------------------------------------------------

/// One step of a path: a key, and optionally the selection of an array element by a field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step<'a> {
    key: &'a str,
    select: Option<(&'a str, &'a str)>,
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `a.b[field=VALUE].c`.
fn parse_path(path: &str) -> Option<Vec<Step<'_>>> {
    path.split('.')
        .map(|seg| match seg.split_once('[') {
            None => is_key(seg).then_some(Step {
                key: seg,
                select: None,
            }),
            Some((key, rest)) => {
                let (field, value) = rest.strip_suffix(']')?.split_once('=')?;
                (is_key(key) && is_key(field) && is_key(value)).then_some(Step {
                    key,
                    select: Some((field, value)),
                })
            }
        })
        .collect()
}

/// The value at `path` in `record`; a JSON `null` is absent.
fn lookup<'v>(record: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = record;
    for step in parse_path(path)? {
        cur = cur.get(step.key)?;
        if let Some((field, value)) = step.select {
            cur = cur
                .as_array()?
                .iter()
                .find(|e| e.get(field).and_then(Value::as_str) == Some(value))?;
        }
    }
    (!cur.is_null()).then_some(cur)
}

/// Why a value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    /// The field is absent (or null).
    Absent,
    /// `"NaN"`, `"Infinity"`, `"-Infinity"`: the service could not compute it.
    NotANumber,
    /// Not a number, or out of range for the rule.
    Invalid,
}

impl Miss {
    fn reason(self) -> &'static str {
        match self {
            Self::Absent => "missing_field",
            Self::NotANumber => "not_a_number",
            Self::Invalid => "invalid_value",
        }
    }
}

/// The decimal places a number was written with (`97.50` → 2, `61` → 0, `1e3` → 0).
fn places_of(text: &str) -> i32 {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().unwrap_or(0)),
        None => (text, 0),
    };
    let fraction = mantissa
        .split_once('.')
        .map_or(0, |(_, f)| i32::try_from(f.len()).unwrap_or(0));
    fraction.saturating_sub(exponent).max(0)
}

/// A number: a JSON number, or a string holding one (proto3 int64, `"NaN"`); with the
/// decimal places it was written with. serde_json keeps the text of numbers
/// (`arbitrary_precision`), so `79832` and `97.50` keep their digits.
fn number_text(v: &Value) -> Result<String, Miss> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        Value::Null => return Err(Miss::Absent),
        _ => return Err(Miss::Invalid),
    };
    let lower = text.to_ascii_lowercase();
    if matches!(
        lower.trim_start_matches(['+', '-']),
        "nan" | "infinity" | "inf"
    ) {
        return Err(Miss::NotANumber);
    }
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'));
    if !plain {
        return Err(Miss::Invalid);
    }
    Ok(text)
}

/// `text × 10^shift`, decimal-exact when `text` has no exponent; with its decimal places.
fn shifted(text: &str, shift: i32) -> Result<(f64, i32), Miss> {
    let places = places_of(text);
    let value: f64 = if shift == 0 {
        text.parse().map_err(|_| Miss::Invalid)?
    } else if text.contains(['e', 'E']) {
        text.parse::<f64>().map_err(|_| Miss::Invalid)? * 10f64.powi(shift)
    } else {
        // `{digits}e{shift}` is parsed with one correct rounding (79832e-3 → 79.832).
        format!("{text}e{shift}")
            .parse()
            .map_err(|_| Miss::Invalid)?
    };
    if !value.is_finite() {
        return Err(Miss::Invalid);
    }
    Ok((value, places.saturating_sub(shift).max(0)))
}

/// Parses a proto3 duration (`"-18000s"`, `"1.5s"`, `"0.000001s"`) into seconds and the
/// decimal places of its fraction.
#[must_use]
pub fn parse_duration(text: &str) -> Option<(f64, i32)> {
    let body = text.trim().strip_suffix('s')?;
    let digits = body.strip_prefix(['-', '+']).unwrap_or(body);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let ok = !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.len() <= 9
        && fraction.chars().all(|c| c.is_ascii_digit());
    if !ok {
        return None;
    }
    let value: f64 = body.parse().ok()?;
    value
        .is_finite()
        .then(|| (value, i32::try_from(fraction.len()).unwrap_or(0)))
}

/// A UTC offset given as a proto3 duration, in whole seconds within ±18 h.
#[must_use]
pub fn parse_offset(text: &str) -> Option<i32> {
    let (secs, _) = parse_duration(text)?;
    if secs.fract() != 0.0 || secs.abs() > MAX_OFFSET_SECONDS as f64 {
        return None;
    }
    // Checked above: an integral number of seconds within ±64800.
    Some(secs as i32)
}

/// An RFC 3339 instant (`…Z`, 0/3/6/9 fractional digits) in epoch ms.
#[must_use]
pub fn parse_instant(text: &str) -> Option<i64> {
    text.trim()
        .parse::<Timestamp>()
        .ok()
        .map(Timestamp::as_millisecond)
}

fn int_field(v: &Value, key: &str) -> Option<i64> {
    match v.get(key) {
        None | Some(Value::Null) => Some(0),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    }
}

/// A `google.type.Date` (`{year, month, day}`, all required here).
fn civil_date(v: &Value) -> Option<civil::Date> {
    let part = |k: &str| -> Option<i64> { v.get(k).and(int_field(v, k)) };
    let (y, m, d) = (part("year")?, part("month")?, part("day")?);
    civil::Date::new(
        i16::try_from(y).ok()?,
        i8::try_from(m).ok()?,
        i8::try_from(d).ok()?,
    )
    .ok()
}

/// A `CivilDateTime` (`{date, time?}`; an omitted or empty `time` is midnight, omitted
/// fields are 0).
fn civil_date_time(v: &Value) -> Option<civil::DateTime> {
    let date = civil_date(v.get("date")?)?;
    let time = match v.get("time") {
        None | Some(Value::Null) => civil::Time::midnight(),
        Some(t) => civil::Time::new(
            i8::try_from(int_field(t, "hours")?).ok()?,
            i8::try_from(int_field(t, "minutes")?).ok()?,
            i8::try_from(int_field(t, "seconds")?).ok()?,
            i32::try_from(int_field(t, "nanos")?).ok()?,
        )
        .ok()?,
    };
    Some(date.to_datetime(time))
}

/// The UTC offset of an observation: its `utcOffset` duration; else civil − instant when the
/// civil time is there; else unknown. `Err` when the offset given cannot be read.
fn offset_of(
    offset: Option<&Value>,
    civil: Option<&Value>,
    instant_ms: i64,
) -> Result<Option<i32>, ()> {
    match offset {
        Some(Value::Null) | None => {}
        Some(v) => return v.as_str().and_then(parse_offset).map(Some).ok_or(()),
    }
    let Some(local) = civil.and_then(civil_date_time) else {
        return Ok(None);
    };
    let Ok(as_utc) = local.to_zoned(TimeZone::UTC) else {
        return Ok(None);
    };
    let diff_ms = as_utc.timestamp().as_millisecond() - instant_ms;
    let secs = (diff_ms as f64 / 1000.0).round();
    if secs.abs() > MAX_OFFSET_SECONDS as f64 {
        return Ok(None);
    }
    // Checked above: within ±64800.
    Ok(Some(secs as i32))
}

/// When a point was observed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct When {
    start: i64,
    end: Option<i64>,
    offset: Option<i32>,
    /// The key of a non-identifiable point: epoch ms, or the local date of daily values.
    key: String,
}

/// A local day span `[day, end_day)` in `zone` (else UTC, offset unknown).
fn day_span(
    day: civil::Date,
    end_day: civil::Date,
    zone: Option<&TimeZone>,
) -> Option<(i64, i64, Option<i32>)> {
    let tz = zone.cloned().unwrap_or(TimeZone::UTC);
    let start = day.to_zoned(tz.clone()).ok()?;
    let end = end_day.to_zoned(tz).ok()?;
    Some((
        start.timestamp().as_millisecond(),
        end.timestamp().as_millisecond(),
        zone.map(|_| start.offset().seconds()),
    ))
}

fn when(shape: Shape, point: &Value, record: &Value, zone: Option<&TimeZone>) -> Option<When> {
    match shape {
        Shape::Sample => {
            let t = record.get("sampleTime")?;
            let at = parse_instant(t.get("physicalTime")?.as_str()?)?;
            let offset = offset_of(t.get("utcOffset"), t.get("civilTime"), at).ok()?;
            Some(When {
                start: at,
                end: None,
                offset,
                key: at.to_string(),
            })
        }
        Shape::Interval | Shape::Session => {
            let i = record.get("interval")?;
            let start = parse_instant(i.get("startTime")?.as_str()?)?;
            let end = parse_instant(i.get("endTime")?.as_str()?)?;
            if end < start {
                return None;
            }
            let offset = offset_of(i.get("startUtcOffset"), i.get("civilStartTime"), start).ok()?;
            Some(When {
                start,
                end: Some(end),
                offset,
                key: start.to_string(),
            })
        }
        Shape::Daily => {
            let day = civil_date(record.get("date")?)?;
            let (start, end, offset) = day_span(day, day.tomorrow().ok()?, zone)?;
            Some(When {
                start,
                end: Some(end),
                offset,
                key: day.to_string(),
            })
        }
        Shape::DailyRollup => {
            let day = civil_date(point.get("civilStartTime")?.get("date")?)?;
            let end_day = match point.get("civilEndTime").and_then(|e| e.get("date")) {
                Some(d) => civil_date(d)?,
                None => day.tomorrow().ok()?,
            };
            if end_day <= day {
                return None;
            }
            let (start, end, offset) = day_span(day, end_day, zone)?;
            Some(When {
                start,
                end: Some(end),
                offset,
                key: day.to_string(),
            })
        }
    }
}

/// The id of an identifiable point: the last segment of its `name` / `dataPointName`.
/// `Ok(None)` when it has none; `Err` when the id has characters ohx does not put in ids.
/// The ids of the identifiable points of an answer (what [`crate::Coverage::present`]
/// lists), whether they became measurements or not; a point whose name is unusable is left
/// out (it made no measurement either).
#[must_use]
pub fn point_ids(points: &[Value]) -> std::collections::BTreeSet<String> {
    points
        .iter()
        .filter_map(|p| point_id(p).ok().flatten())
        .collect()
}

fn point_id(point: &Value) -> Result<Option<String>, ()> {
    let name = ["name", "dataPointName"]
        .iter()
        .filter_map(|k| point.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|n| !n.is_empty());
    let Some(name) = name else {
        return Ok(None);
    };
    let id = name.rsplit('/').next().unwrap_or(name);
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
    if ok { Ok(Some(id.to_owned())) } else { Err(()) }
}

/// Lowercase ASCII letters and digits, other runs as one `-`, at most 64 characters.
fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out: String = out.trim_end_matches('-').chars().take(64).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn text_at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// The source of a `list` point, for its key: platform and device (or app).
fn source_tag(point: &Value) -> String {
    let Some(ds) = point.get("dataSource") else {
        return "unknown".into();
    };
    let platform = text_at(ds, &["platform"]).map(slug).unwrap_or_default();
    let what = text_at(ds, &["device", "displayName"])
        .or_else(|| text_at(ds, &["application", "packageName"]))
        .or_else(|| text_at(ds, &["application", "googleWebClientId"]))
        .or_else(|| text_at(ds, &["application", "webClientId"]))
        .map(slug)
        .unwrap_or_default();
    let tag = match (platform.is_empty(), what.is_empty()) {
        (false, false) => format!("{platform}-{what}"),
        (false, true) => platform,
        (true, false) => what,
        (true, true) => String::new(),
    };
    if tag.is_empty() {
        "unknown".into()
    } else {
        tag
    }
}

/// The device and entry method of a point (§3.5 `DataSource`).
fn device_of(point: &Value, sources: &Sources) -> (Option<Device>, &'static str) {
    let Some(ds) = point.get("dataSource") else {
        return (None, "device");
    };
    if text_at(ds, &["recordingMethod"]) == Some("MANUAL") {
        return (None, "manual");
    }
    let Some(display) = text_at(ds, &["device", "displayName"]) else {
        return (None, "device");
    };
    let platform = text_at(ds, &["platform"]);
    let manufacturer = platform
        .and_then(|p| sources.first_party.get(p))
        .map(|default| {
            text_at(ds, &["device", "manufacturer"])
                .map(str::to_owned)
                .or_else(|| {
                    sources
                        .model_prefixes
                        .iter()
                        .find(|(prefix, _)| display.starts_with(prefix.as_str()))
                        .map(|(_, m)| m.clone())
                })
                .unwrap_or_else(|| default.clone())
        });
    let device_id = match platform {
        Some(p) => format!("{p}:{display}"),
        None => display.to_owned(),
    };
    (
        Some(Device {
            device_id,
            model: Some(display.to_owned()),
            model_id: None,
            manufacturer,
        }),
        "device",
    )
}

// ---------------------------------------------------------------------------------------------
// Components
// ---------------------------------------------------------------------------------------------

/// A value read by a component rule at `path`: converted, with its decimal places.
fn read_value(record: &Value, path: &str, rule: &ComponentRule) -> Result<(f64, i32), Miss> {
    let raw = lookup(record, path).ok_or(Miss::Absent)?;
    let (value, places) = if rule.duration {
        let text = raw.as_str().ok_or(Miss::Invalid)?;
        let (secs, places) = parse_duration(text).ok_or(Miss::Invalid)?;
        if rule.shift == 0 {
            (secs, places)
        } else {
            shifted(&secs.to_string(), rule.shift)?
        }
    } else {
        shifted(&number_text(raw)?, rule.shift)?
    };
    Ok(divided(value, places, rule.divisor))
}

/// `value / divisor`: with a divisor, exact up to a tenth (18660 s / 60 = 311 min; 10470 s /
/// 60 = 174.5 min), as the Withings sleep summary.
fn divided(value: f64, places: i32, divisor: f64) -> (f64, i32) {
    if divisor == 1.0 {
        return (value, places);
    }
    let v = value / divisor;
    let places = if (v - v.round()).abs() < 1e-9 { 0 } else { 1 };
    let scale = 10f64.powi(places);
    ((v * scale).round() / scale, places)
}

/// The minutes of a session's `stages[]` of `types`; absent when none of them is there.
fn stage_minutes(record: &Value, types: &[String]) -> Result<(f64, i32), Miss> {
    let stages = record
        .get("stages")
        .and_then(Value::as_array)
        .ok_or(Miss::Absent)?;
    let mut total_ms = 0i64;
    let mut found = false;
    for s in stages {
        let Some(t) = s.get("type").and_then(Value::as_str) else {
            continue;
        };
        if !types.iter().any(|x| x == t) {
            continue;
        }
        let start = s
            .get("startTime")
            .and_then(Value::as_str)
            .and_then(parse_instant);
        let end = s
            .get("endTime")
            .and_then(Value::as_str)
            .and_then(parse_instant);
        match (start, end) {
            (Some(a), Some(b)) if b >= a => total_ms = total_ms.saturating_add(b - a),
            _ => return Err(Miss::Invalid),
        }
        found = true;
    }
    if !found {
        return Err(Miss::Absent);
    }
    Ok(divided(total_ms as f64 / 1000.0, 0, 60.0))
}

fn component(record: &Value, rule: &ComponentRule) -> Result<Component, Miss> {
    if !rule.codes.is_empty() {
        let name = lookup(record, &rule.path).ok_or(Miss::Absent)?;
        let code = name
            .as_str()
            .and_then(|n| rule.codes.get(n))
            .ok_or(Miss::Invalid)?;
        return Ok(Component {
            code: rule.code.clone(),
            value: *code as f64,
            unit: rule.unit.clone(),
            decimals: Some(0),
        });
    }
    let (mut value, mut places) = match read_value(record, &rule.path, rule) {
        Err(Miss::Absent) if !rule.stage_types.is_empty() => {
            stage_minutes(record, &rule.stage_types)?
        }
        other => other?,
    };
    if let Some(minus) = &rule.minus {
        let (b, b_places) = read_value(record, minus, rule)?;
        places = places.max(b_places);
        let scale = 10f64.powi(places);
        value = ((value - b) * scale).round() / scale;
        // -0.0 prints as "-0": a zero deviation is 0.
        if value == 0.0 {
            value = 0.0;
        }
    }
    if !value.is_finite() || (value < 0.0 && !rule.signed) || (value == 0.0 && !rule.allow_zero) {
        return Err(Miss::Invalid);
    }
    Ok(Component {
        code: rule.code.clone(),
        value,
        unit: rule.unit.clone(),
        decimals: Some(places),
    })
}

/// A positive finite number at `path`.
fn positive(record: &Value, path: &str) -> Result<f64, Miss> {
    let text = number_text(lookup(record, path).ok_or(Miss::Absent)?)?;
    text.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or(Miss::Invalid)
}

/// The record's sample series, and how long it lasts in ms (the last sample's end, rounded
/// up): int32 samples (numbers, or strings holding them), scaled by `1 / scaling`.
fn waveform(record: &Value, rule: &WaveformRule) -> Result<(Waveform, i64), Miss> {
    let raw = lookup(record, &rule.samples)
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or(Miss::Absent)?;
    let samples = raw
        .iter()
        .map(|s| number_text(s).ok()?.parse::<i32>().ok())
        .collect::<Option<Vec<i32>>>()
        .ok_or(Miss::Invalid)?;
    let frequency = positive(record, &rule.frequency)?;
    let scaling = positive(record, &rule.scaling)?;
    let length = (samples.len() as f64 * 1000.0 / frequency).ceil();
    if !(length.is_finite() && length < i64::MAX as f64) {
        return Err(Miss::Invalid);
    }
    Ok((
        Waveform {
            unit: rule.unit.clone(),
            origin: 0.0,
            factor: (scaling != 1.0).then(|| 1.0 / scaling),
            interval: 1000.0 / frequency,
            interval_unit: "ms".to_owned(),
            samples,
            code_map: None,
        },
        length as i64,
    ))
}

// ---------------------------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------------------------

/// What a normalization produced and what it skipped, by reason and detail (the Google data
/// type, or the ohx data type a value was for).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalized {
    /// Sorted by `effective_start`, then `measurement_id`.
    pub measurements: Vec<Measurement>,
    pub skipped: BTreeMap<(String, String), u64>,
}

impl Normalized {
    fn skip(&mut self, reason: &str, detail: &str) {
        *self
            .skipped
            .entry((reason.to_owned(), detail.to_owned()))
            .or_default() += 1;
    }
}

/// [`normalize_in`] without the user's time zone: daily values cover the UTC day.
#[must_use]
pub fn normalize(
    data_type: &str,
    points: &[Value],
    ctx: &Context,
    table: &DataTypeTable,
    policy: &Policy,
) -> Normalized {
    normalize_in(data_type, points, ctx, table, policy, None)
}

/// Normalizes the points (or roll-up rows) fetched for the rule `data_type` (a rule name of
/// `table`: `heart-rate`, `steps-daily`, …) for the user of `ctx`: one Measurement per point
/// and measurement rule whose data type `policy` allows; the rest is counted in `skipped`.
/// `zone` is the user's time zone, for the local days of daily values. Points of one id
/// (overlapping pages) are one Measurement: the later `updateTime`, else the later point wins.
#[must_use]
pub fn normalize_in(
    data_type: &str,
    points: &[Value],
    ctx: &Context,
    table: &DataTypeTable,
    policy: &Policy,
    zone: Option<&TimeZone>,
) -> Normalized {
    let mut out = Normalized::default();
    let Some(rule) = table.rule(data_type) else {
        for _ in points {
            out.skip(crate::SKIP_UNMAPPED_TYPE, data_type);
        }
        return out;
    };
    let gtype = rule.google_type.as_str();
    let user = &ctx.provider_user_id;
    let mut by_id: BTreeMap<String, Measurement> = BTreeMap::new();
    for point in points {
        if !point.is_object() {
            out.skip("not_a_point", gtype);
            continue;
        }
        let Some(record) = point.get(&rule.json_key).filter(|r| r.is_object()) else {
            out.skip("missing_record", gtype);
            continue;
        };
        let Some(at) = when(rule.shape, point, record, zone) else {
            out.skip("invalid_time", gtype);
            continue;
        };
        let named = if rule.identifiable {
            match point_id(point) {
                Ok(id) => id,
                Err(()) => {
                    out.skip("invalid_name", gtype);
                    continue;
                }
            }
        } else {
            None
        };
        let key = match (&named, rule.method) {
            (Some(id), _) => id.clone(),
            (None, Method::List) => format!("{}:{}", at.key, source_tag(point)),
            (None, _) => at.key.clone(),
        };
        let (device, entry_method) = device_of(point, &table.sources);
        let modified = ["updateTime", "createTime"].iter().find_map(|k| {
            record
                .get(*k)
                .and_then(Value::as_str)
                .and_then(parse_instant)
        });
        let counted_before = out.skipped.values().sum::<u64>();
        let mut made = 0;
        for m in &rule.measurements {
            if !policy.allows(&m.data_type) {
                out.skip("disabled_data_type", &m.data_type);
                continue;
            }
            let mut components = Vec::with_capacity(m.components.len());
            let mut failed: Option<Miss> = None;
            for (i, c) in m.components.iter().enumerate() {
                match component(record, c) {
                    Ok(v) => components.push(v),
                    Err(Miss::Absent) if i > 0 && c.optional => {}
                    Err(miss) if i > 0 && c.optional => out.skip(miss.reason(), &m.data_type),
                    Err(miss) => {
                        failed = Some(miss);
                        break;
                    }
                }
            }
            match failed {
                Some(Miss::Absent) if m.optional => continue,
                Some(miss) => {
                    out.skip(miss.reason(), &m.data_type);
                    continue;
                }
                None => {}
            }
            let (samples, end) = match m.waveform.as_ref().map(|w| waveform(record, w)) {
                None => (None, at.end),
                Some(Ok((w, length))) => (Some(w), Some(at.start.saturating_add(length))),
                Some(Err(miss)) => {
                    out.skip(miss.reason(), &m.data_type);
                    continue;
                }
            };
            made += 1;
            let measurement = Measurement {
                context: ctx.clone(),
                measurement_id: format!("{NAME}:{user}:{gtype}:{key}:{}", m.data_type),
                series_key: series_key(&ctx.patient_id, &ctx.provider, &m.data_type),
                data_type: m.data_type.clone(),
                aggregation: policy.aggregation(&m.data_type, &m.aggregation).to_owned(),
                effective_start: at.start,
                effective_end: end,
                utc_offset_seconds: at.offset,
                components,
                device: device.clone(),
                entry_method: Some(entry_method.to_owned()),
                provider_group_id: named.clone(),
                provider_modified_at: modified,
                fetched_through: None,
                status: None,
                waveform: samples,
            };
            match by_id.get(&measurement.measurement_id) {
                Some(seen) => {
                    out.skip("duplicate_point", &m.data_type);
                    if seen.provider_modified_at <= measurement.provider_modified_at {
                        by_id.insert(measurement.measurement_id.clone(), measurement);
                    }
                }
                None => {
                    by_id.insert(measurement.measurement_id.clone(), measurement);
                }
            }
        }
        if made == 0 && out.skipped.values().sum::<u64>() == counted_before {
            // Nothing to read in the point (every value optional and absent).
            out.skip("missing_field", gtype);
        }
    }
    out.measurements = by_id.into_values().collect();
    out.measurements.sort_by(|a, b| {
        (a.effective_start, &a.measurement_id).cmp(&(b.effective_start, &b.measurement_id))
    });
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Context {
        Context {
            organization_id: "org".into(),
            ehr_target_id: "t".into(),
            patient_id: "pat".into(),
            patient_reference: "Patient/p".into(),
            provider: NAME.into(),
            link_id: "l".into(),
            provider_user_id: "7583570207748835967".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn table() -> DataTypeTable {
        DataTypeTable::builtin().unwrap()
    }

    /// The `dataPoints` of a response body, parsed from text as the client does.
    fn points_of(body: &str) -> Vec<Value> {
        let v: Value = serde_json::from_str(body).unwrap();
        v.get("dataPoints")
            .or_else(|| v.get("rollupDataPoints"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn run(rule: &str, body: &str) -> Normalized {
        normalize(rule, &points_of(body), &ctx(), &table(), &Policy::default())
    }

    fn ms(text: &str) -> i64 {
        parse_instant(text).unwrap()
    }

    fn only(n: &Normalized, data_type: &str) -> Measurement {
        let found: Vec<&Measurement> = n
            .measurements
            .iter()
            .filter(|m| m.data_type == data_type)
            .collect();
        assert_eq!(found.len(), 1, "{data_type} in {:#?}", n.measurements);
        found[0].clone()
    }

    fn values(m: &Measurement) -> Vec<(&str, f64, &str, Option<i32>)> {
        m.components
            .iter()
            .map(|c| (c.code.as_str(), c.value, c.unit.as_str(), c.decimals))
            .collect()
    }

    fn skips(n: &Normalized) -> Vec<(&str, &str, u64)> {
        n.skipped
            .iter()
            .map(|((r, d), c)| (r.as_str(), d.as_str(), *c))
            .collect()
    }

    // Verified `list` weight response (§3.5, [LIVE-W]); the placeholders `<GOOGLE-USER-ID>`
    // and `<POINT-ID>` of the capture are replaced by ids of the documented forms.
    const WEIGHT: &str = r#"{
      "dataPoints": [
        {
          "name": "users/7583570207748835967/dataTypes/weight/dataPoints/4411927352398848000",
          "dataSource": {"recordingMethod": "MANUAL", "platform": "FITBIT"},
          "weight": {
            "sampleTime": {
              "physicalTime": "2026-09-09T01:24:33.390135Z",
              "utcOffset": "-18000s",
              "civilTime": {
                "date": {"year": 2026, "month": 9, "day": 8},
                "time": {"hours": 20, "minutes": 24, "seconds": 33, "nanos": 390135000}
              }
            },
            "weightGrams": 79832
          }
        }
      ]
    }"#;

    // Verified heart-rate response (§3.5, [LIVE-S]).
    const HEART_RATE: &str = r#"{
      "dataPoints": [
        {
          "dataSource": {
            "recordingMethod": "PASSIVELY_MEASURED",
            "device": {"displayName": "Inspire 3"},
            "platform": "FITBIT"
          },
          "heartRate": {
            "sampleTime": {
              "physicalTime": "2026-08-29T05:29:57Z",
              "utcOffset": "19800s",
              "civilTime": {"date": {"year": 2026, "month": 8, "day": 29}, "time": {"hours": 10, "minutes": 59, "seconds": 57}}
            },
            "beatsPerMinute": "61"
          }
        }
      ]
    }"#;

    // Sleep captured from the API (§3.7, [LIVE-S]): no civil times, CLASSIC, no stagesSummary.
    const SLEEP_CLASSIC: &str = r#"{
      "dataPoints": [{
        "name": "users/7583570207748835967/dataTypes/sleep/dataPoints/1218857650621109392",
        "dataSource": {"recordingMethod": "MANUAL", "platform": "FITBIT"},
        "sleep": {
          "interval": {"startTime": "2026-08-27T17:24:00Z", "startUtcOffset": "19800s",
                       "endTime": "2026-08-28T01:24:00Z", "endUtcOffset": "19800s"},
          "type": "CLASSIC",
          "stages": [{"startTime": "2026-08-27T17:24:00Z", "startUtcOffset": "19800s",
                      "endTime": "2026-08-28T01:24:00Z", "endUtcOffset": "19800s", "type": "ASLEEP"}],
          "metadata": {"processed": true, "manuallyEdited": true, "mainSleep": true},
          "summary": {"minutesInSleepPeriod": "480", "minutesAfterWakeUp": "0", "minutesToFallAsleep": "0",
                      "minutesAsleep": "480", "minutesAwake": "0"}
        }
      }]
    }"#;

    // Reconciled sleep, live-shaped (§3.6): `dataPointName`, no offsets, stagesSummary.
    const SLEEP_RECONCILED: &str = r#"{"dataPoints": [{"dataPointName": "users/me/dataTypes/sleep/dataPoints/night",
      "sleep": {"interval": {"startTime": "2026-07-24T03:00:00Z", "endTime": "2026-07-24T11:00:00Z"},
                "metadata": {"nap": false, "stagesStatus": "SUCCEEDED"},
                "summary": {"minutesAsleep": "430", "minutesAwake": "50",
                            "stagesSummary": [{"type": "DEEP", "minutes": "100"}, {"type": "REM", "minutes": "90"},
                                              {"type": "LIGHT", "minutes": "240"}, {"type": "AWAKE", "minutes": "50"}]}}}],
     "nextPageToken": "page-two"}"#;

    // Reconciled steps (§3.6, illustrative from the schema).
    const STEPS_RECONCILED: &str = r#"{"dataPoints": [{"dataPointName": "", "steps": {"interval": {"startTime": "2026-07-23T08:00:00Z", "endTime": "2026-07-23T08:01:00Z", "startUtcOffset": "7200s", "endUtcOffset": "7200s"}, "count": "125"}}], "nextPageToken": "…"}"#;

    // Daily roll-up rows, live-verified shape (§3.8, [LIVE-R]).
    const STEPS_ROLLUP: &str = r#"{"rollupDataPoints": [
      {"civilStartTime": {"date": {"year": 2026, "month": 8, "day": 13}, "time": {}},
       "civilEndTime":   {"date": {"year": 2026, "month": 8, "day": 14}, "time": {}},
       "steps": {"countSum": "10063"}}
    ]}"#;

    /// An `electrocardiogram` point shaped as the discovery document says (§3.3): the interval
    /// starts and ends at the reading time, `beatsPerMinuteAvg` is an int64 (a string), the
    /// samples int32 (numbers); `samples` samples at 250 Hz.
    fn ecg_point(samples: usize, classification: &str) -> String {
        let waveform: Vec<i64> = (0..samples as i64).map(|i| (i * 7) % 400 - 200).collect();
        json!({"dataPoints": [{
            "name": "users/7583570207748835967/dataTypes/electrocardiogram/dataPoints/ecg-20260723",
            "dataSource": {"recordingMethod": "ACTIVELY_MEASURED", "platform": "FITBIT",
                           "device": {"displayName": "Pixel Watch 3"}},
            "electrocardiogram": {
                "interval": {"startTime": "2026-07-23T08:00:00Z", "endTime": "2026-07-23T08:00:00Z",
                             "startUtcOffset": "7200s", "endUtcOffset": "7200s"},
                "beatsPerMinuteAvg": "71", "leadNumber": 1, "samplingFrequencyHertz": 250,
                "millivoltsScalingFactor": 1000, "waveformSamples": waveform,
                "resultClassification": classification,
                "medicalDeviceInfo": {"deviceModel": "Pixel Watch 3", "firmwareVersion": "1.2"}}}]})
        .to_string()
    }

    #[test]
    fn test_an_electrocardiogram_becomes_an_ecg_waveform_in_millivolts() {
        let n = run("electrocardiogram", &ecg_point(7500, "ATRIAL_FIBRILLATION"));
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let m = only(&n, "ecg");
        assert_eq!(
            m.measurement_id,
            "google-health:7583570207748835967:electrocardiogram:ecg-20260723:ecg"
        );
        assert_eq!(m.effective_start, ms("2026-07-23T08:00:00Z"));
        // 7500 samples at 250 Hz: 30 s, though the interval's end is its start.
        assert_eq!(m.effective_end, Some(ms("2026-07-23T08:00:30Z")));
        assert_eq!(m.utc_offset_seconds, Some(7200));
        assert_eq!(m.components.len(), 2);
        assert_eq!(
            (m.components[0].code.as_str(), m.components[0].value),
            ("rhythm", 2.0)
        );
        assert_eq!(m.components[0].unit, "1");
        assert_eq!(
            (m.components[1].code.as_str(), m.components[1].value),
            ("heart_rate", 71.0)
        );
        assert_eq!(m.components[1].unit, "/min");
        let w = m.waveform.as_ref().unwrap();
        assert_eq!(
            (w.unit.as_str(), w.interval, w.interval_unit.as_str()),
            ("mV", 4.0, "ms")
        );
        assert_eq!(
            w.factor,
            Some(0.001),
            "mV = sample / millivoltsScalingFactor"
        );
        assert_eq!(w.samples.len(), 7500);
        assert_eq!(&w.samples[..3], [-200, -193, -186]);
    }

    #[test]
    fn test_every_ecg_classification_has_a_rhythm_code_and_unusable_recordings_are_counted() {
        for (name, code) in [
            ("NORMAL_SINUS_RHYTHM", 1.0),
            ("ATRIAL_FIBRILLATION", 2.0),
            ("INCONCLUSIVE", 3.0),
            ("INCONCLUSIVE_HIGH_HEART_RATE", 4.0),
            ("INCONCLUSIVE_LOW_HEART_RATE", 5.0),
            ("UNREADABLE", 6.0),
            ("NOT_ANALYZED", 7.0),
        ] {
            let n = run("electrocardiogram", &ecg_point(10, name));
            assert_eq!(only(&n, "ecg").components[0].value, code, "{name}");
        }
        let unspecified = run(
            "electrocardiogram",
            &ecg_point(10, "RESULT_CLASSIFICATION_UNSPECIFIED"),
        );
        assert!(unspecified.measurements.is_empty());
        assert_eq!(
            unspecified.skipped[&("invalid_value".into(), "ecg".into())],
            1
        );
        let broken: [(&str, serde_json::Value); 4] = [
            ("waveformSamples", json!([])),
            ("waveformSamples", json!([1, 2, 3_000_000_000_i64])),
            ("samplingFrequencyHertz", json!(0)),
            ("millivoltsScalingFactor", json!("NaN")),
        ];
        for (field, value) in broken {
            let mut body: serde_json::Value =
                serde_json::from_str(&ecg_point(10, "INCONCLUSIVE")).unwrap();
            body["dataPoints"][0]["electrocardiogram"][field] = value.clone();
            let n = run("electrocardiogram", &body.to_string());
            assert!(n.measurements.is_empty(), "{field} = {value}");
            assert_eq!(
                n.skipped.values().sum::<u64>(),
                1,
                "{field} = {value}: {:?}",
                n.skipped
            );
        }
    }

    #[test]
    fn test_builtin_table_loads_and_names_its_rules() {
        let t = table();
        let names: Vec<&str> = t.types.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "body-fat",
                "core-body-temperature",
                "daily-oxygen-saturation",
                "daily-resting-heart-rate",
                "daily-sleep-temperature-derivations",
                "electrocardiogram",
                "heart-rate",
                "heart-rate-variability",
                "oxygen-saturation",
                "respiratory-rate-sleep-summary",
                "sleep",
                "steps",
                "steps-daily",
                "weight",
            ]
        );
        assert_eq!(t.types["steps-daily"].google_type, "steps");
        assert_eq!(t.types["steps-daily"].method, Method::DailyRollUp);
        assert_eq!(t.types["sleep"].page_size, Some(25));
        assert_eq!(
            t.rules_for("steps")
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["steps", "steps-daily"]
        );
        assert_eq!(
            t.rule_for_data_type("hrv_sdnn").map(|r| r.name.as_str()),
            Some("heart-rate-variability")
        );
        assert_eq!(
            t.scopes(),
            [
                "https://www.googleapis.com/auth/googlehealth.activity_and_fitness.readonly",
                "https://www.googleapis.com/auth/googlehealth.ecg.readonly",
                "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly",
                "https://www.googleapis.com/auth/googlehealth.sleep.readonly",
            ]
        );
        assert_eq!(
            t.scopes_allowed(|d| d == "sleep_duration"),
            ["https://www.googleapis.com/auth/googlehealth.sleep.readonly"]
        );
        assert!(t.types["heart-rate"].hourly(&Policy::default()));
        assert!(!t.types["weight"].hourly(&Policy::default()));
    }

    #[test]
    fn test_verified_weight_becomes_kilograms_manual_without_device() {
        let n = run("weight", WEIGHT);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let w = only(&n, "body_weight");
        assert_eq!(values(&w), [("value", 79.832, "kg", Some(3))]);
        assert_eq!(w.effective_start, ms("2026-09-09T01:24:33.390Z"));
        assert_eq!(w.effective_end, None);
        assert_eq!(w.utc_offset_seconds, Some(-18_000));
        assert_eq!(
            w.measurement_id,
            "google-health:7583570207748835967:weight:4411927352398848000:body_weight"
        );
        assert_eq!(w.series_key, "pat/google-health/body_weight");
        assert_eq!(w.aggregation, AGGREGATION_INDIVIDUAL);
        assert_eq!(w.entry_method.as_deref(), Some("manual"));
        assert_eq!(w.device, None);
        assert_eq!(w.provider_group_id.as_deref(), Some("4411927352398848000"));
    }

    #[test]
    fn test_verified_heart_rate_is_hourly_with_the_fitbit_device() {
        let n = run("heart-rate", HEART_RATE);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let hr = only(&n, "heart_rate");
        assert_eq!(values(&hr), [("value", 61.0, "/min", Some(0))]);
        assert_eq!(hr.aggregation, AGGREGATION_HOURLY);
        assert_eq!(hr.effective_start, ms("2026-08-29T05:29:57Z"));
        assert_eq!(hr.utc_offset_seconds, Some(19_800));
        // reconcile rule: no name, no source in the key
        assert_eq!(
            hr.measurement_id,
            format!(
                "google-health:7583570207748835967:heart-rate:{}:heart_rate",
                ms("2026-08-29T05:29:57Z")
            )
        );
        assert_eq!(hr.provider_group_id, None);
        assert_eq!(
            hr.device,
            Some(Device {
                device_id: "FITBIT:Inspire 3".into(),
                model: Some("Inspire 3".into()),
                model_id: None,
                manufacturer: Some("Fitbit".into()),
            })
        );
        assert_eq!(hr.entry_method.as_deref(), Some("device"));
    }

    #[test]
    fn test_int64_as_number_and_a_policy_aggregation_override() {
        let body = HEART_RATE.replace(r#""beatsPerMinute": "61""#, r#""beatsPerMinute": 61"#);
        let policy = Policy::resolve(
            &crate::policy::PolicyDoc::from_json(
                &json!({"aggregation": {"heart_rate": "INDIVIDUAL"}}),
            )
            .unwrap(),
            &Default::default(),
            Default::default(),
        );
        let n = normalize("heart-rate", &points_of(&body), &ctx(), &table(), &policy);
        let hr = only(&n, "heart_rate");
        assert_eq!(hr.components[0].value, 61.0);
        assert_eq!(hr.aggregation, AGGREGATION_INDIVIDUAL);
    }

    #[test]
    fn test_list_points_of_two_sources_at_one_instant_stay_apart() {
        let mut t = table();
        t.types.get_mut("heart-rate").unwrap().method = Method::List;
        let a: Value = points_of(HEART_RATE).remove(0);
        let mut b = a.clone();
        b["dataSource"] = json!({"platform": "HEALTH_CONNECT",
            "device": {"displayName": "Galaxy Watch6", "manufacturer": "Samsung"},
            "application": {"packageName": "com.sec.android.app.shealth"}});
        let n = normalize("heart-rate", &[a, b], &ctx(), &t, &Policy::default());
        let ids: Vec<&str> = n
            .measurements
            .iter()
            .map(|m| m.measurement_id.as_str())
            .collect();
        let at = ms("2026-08-29T05:29:57Z");
        assert_eq!(
            ids,
            [
                format!(
                    "google-health:7583570207748835967:heart-rate:{at}:fitbit-inspire-3:heart_rate"
                ),
                format!(
                    "google-health:7583570207748835967:heart-rate:{at}:health-connect-galaxy-watch6:heart_rate"
                ),
            ]
        );
        // A third-party source's device is not labelled with a manufacturer.
        let third = &n.measurements[1].device;
        assert_eq!(
            third
                .as_ref()
                .map(|d| (d.device_id.as_str(), d.manufacturer.clone())),
            Some(("HEALTH_CONNECT:Galaxy Watch6", None))
        );
    }

    #[test]
    fn test_pixel_watch_on_the_fitbit_platform_is_google_hardware() {
        let mut p = points_of(HEART_RATE).remove(0);
        p["dataSource"]["device"] = json!({"displayName": "Pixel Watch 3", "formFactor": "WATCH"});
        let n = normalize("heart-rate", &[p], &ctx(), &table(), &Policy::default());
        let d = n.measurements[0].device.clone().unwrap();
        assert_eq!(d.manufacturer.as_deref(), Some("Google"));
        let mut p = points_of(HEART_RATE).remove(0);
        p["dataSource"]["device"] =
            json!({"displayName": "Charge 6", "manufacturer": "Fitbit LLC"});
        let n = normalize("heart-rate", &[p], &ctx(), &table(), &Policy::default());
        assert_eq!(
            n.measurements[0]
                .device
                .clone()
                .unwrap()
                .manufacturer
                .as_deref(),
            Some("Fitbit LLC"),
            "the source's own manufacturer first"
        );
    }

    #[test]
    fn test_verified_classic_sleep_is_minutes_asleep_with_awake_and_no_stages() {
        let n = run("sleep", SLEEP_CLASSIC);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let s = only(&n, "sleep_duration");
        assert_eq!(
            values(&s),
            [
                ("value", 480.0, "min", Some(0)),
                ("awake", 0.0, "min", Some(0))
            ]
        );
        assert_eq!(s.effective_start, ms("2026-08-27T17:24:00Z"));
        assert_eq!(s.effective_end, Some(ms("2026-08-28T01:24:00Z")));
        assert_eq!(s.utc_offset_seconds, Some(19_800));
        assert_eq!(
            s.measurement_id,
            "google-health:7583570207748835967:sleep:1218857650621109392:sleep_duration"
        );
        assert_eq!(s.entry_method.as_deref(), Some("manual"));
        assert_eq!(s.provider_modified_at, None);
    }

    #[test]
    fn test_reconciled_sleep_with_stages_summary_has_the_withings_shape() {
        let n = run("sleep", SLEEP_RECONCILED);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let s = only(&n, "sleep_duration");
        assert_eq!(
            values(&s),
            [
                ("value", 430.0, "min", Some(0)),
                ("deep", 100.0, "min", Some(0)),
                ("light", 240.0, "min", Some(0)),
                ("rem", 90.0, "min", Some(0)),
                ("awake", 50.0, "min", Some(0)),
            ]
        );
        // no offsets, no civil times: unknown offset, never a guess
        assert_eq!(s.utc_offset_seconds, None);
        assert_eq!(
            s.measurement_id,
            "google-health:7583570207748835967:sleep:night:sleep_duration"
        );
        assert_eq!(s.device, None);
        assert_eq!(s.entry_method.as_deref(), Some("device"));
    }

    #[test]
    fn test_sleep_still_processing_is_counted_from_its_stages() {
        let body = r#"{"dataPoints": [{"name": "users/1/dataTypes/sleep/dataPoints/42",
          "sleep": {"interval": {"startTime": "2026-08-27T22:00:00Z", "startUtcOffset": "3600s",
                                 "endTime": "2026-08-28T06:00:00Z", "endUtcOffset": "3600s"},
                    "type": "STAGES",
                    "stages": [
                      {"startTime": "2026-08-27T22:00:00Z", "endTime": "2026-08-27T22:30:00Z", "type": "AWAKE"},
                      {"startTime": "2026-08-27T22:30:00Z", "endTime": "2026-08-28T01:00:00Z", "type": "LIGHT"},
                      {"startTime": "2026-08-28T01:00:00Z", "endTime": "2026-08-28T02:30:30Z", "type": "DEEP"},
                      {"startTime": "2026-08-28T02:30:30Z", "endTime": "2026-08-28T06:00:00Z", "type": "REM"}
                    ],
                    "metadata": {"processed": false},
                    "updateTime": "2026-08-28T06:05:00.123Z"}}]}"#;
        let n = run("sleep", body);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let s = only(&n, "sleep_duration");
        assert_eq!(
            values(&s),
            [
                ("value", 450.0, "min", Some(0)),
                ("deep", 90.5, "min", Some(1)),
                ("light", 150.0, "min", Some(0)),
                ("rem", 209.5, "min", Some(1)),
                ("awake", 30.0, "min", Some(0)),
            ]
        );
        assert_eq!(s.provider_modified_at, Some(ms("2026-08-28T06:05:00.123Z")));
    }

    #[test]
    fn test_reconciled_steps_are_hourly_intervals_without_source() {
        let n = run("steps", STEPS_RECONCILED);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let s = only(&n, "steps");
        assert_eq!(values(&s), [("value", 125.0, "{steps}", Some(0))]);
        assert_eq!(s.aggregation, AGGREGATION_HOURLY);
        assert_eq!(s.effective_start, ms("2026-07-23T08:00:00Z"));
        assert_eq!(s.effective_end, Some(ms("2026-07-23T08:01:00Z")));
        assert_eq!(s.utc_offset_seconds, Some(7200));
        assert_eq!(
            s.measurement_id,
            format!(
                "google-health:7583570207748835967:steps:{}:steps",
                ms("2026-07-23T08:00:00Z")
            )
        );
        // zero steps in an interval is a value
        let zero = STEPS_RECONCILED.replace(r#""count": "125""#, r#""count": "0""#);
        assert_eq!(only(&run("steps", &zero), "steps").components[0].value, 0.0);
    }

    #[test]
    fn test_daily_rollup_row_is_the_local_day_total() {
        let n = run("steps-daily", STEPS_ROLLUP);
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        let d = only(&n, "daily_steps");
        assert_eq!(values(&d), [("value", 10063.0, "/d", Some(0))]);
        // without the user's zone: the UTC day, offset unknown
        assert_eq!(d.effective_start, ms("2026-08-13T00:00:00Z"));
        assert_eq!(d.effective_end, Some(ms("2026-08-14T00:00:00Z")));
        assert_eq!(d.utc_offset_seconds, None);
        assert_eq!(
            d.measurement_id,
            "google-health:7583570207748835967:steps:2026-08-13:daily_steps"
        );
        let ny = TimeZone::get("America/New_York").unwrap();
        let n = normalize_in(
            "steps-daily",
            &points_of(STEPS_ROLLUP),
            &ctx(),
            &table(),
            &Policy::default(),
            Some(&ny),
        );
        let d = only(&n, "daily_steps");
        assert_eq!(d.effective_start, ms("2026-08-13T04:00:00Z"));
        assert_eq!(d.effective_end, Some(ms("2026-08-14T04:00:00Z")));
        assert_eq!(d.utc_offset_seconds, Some(-4 * 3600));
        assert_eq!(
            d.measurement_id, "google-health:7583570207748835967:steps:2026-08-13:daily_steps",
            "the id is the date, whatever the zone"
        );
    }

    #[test]
    fn test_sleep_temperature_nan_baseline_counts_and_keeps_the_skin_temperature() {
        // `"baselineTemperatureCelsius": "NaN"` as measured live (§3.1).
        let body = r#"{"dataPoints": [
          {"dailySleepTemperatureDerivations": {"date": {"year": 2026, "month": 8, "day": 1},
            "nightlyTemperatureCelsius": 34.21, "baselineTemperatureCelsius": "NaN"}},
          {"dailySleepTemperatureDerivations": {"date": {"year": 2026, "month": 8, "day": 2},
            "nightlyTemperatureCelsius": 33.9, "baselineTemperatureCelsius": 34.15,
            "relativeNightlyStddev30dCelsius": 0.21}},
          {"dailySleepTemperatureDerivations": {"date": {"year": 2026, "month": 8, "day": 3},
            "nightlyTemperatureCelsius": 34.2}}
        ]}"#;
        let n = run("daily-sleep-temperature-derivations", body);
        assert_eq!(
            skips(&n),
            [("not_a_number", "skin_temperature_deviation", 1)],
            "the absent baseline of day 3 is not counted, the NaN of day 1 is"
        );
        let skin: Vec<(i64, f64, Option<i32>)> = n
            .measurements
            .iter()
            .filter(|m| m.data_type == "skin_temperature")
            .map(|m| {
                (
                    m.effective_start,
                    m.components[0].value,
                    m.components[0].decimals,
                )
            })
            .collect();
        assert_eq!(
            skin,
            [
                (ms("2026-08-01T00:00:00Z"), 34.21, Some(2)),
                (ms("2026-08-02T00:00:00Z"), 33.9, Some(1)),
                (ms("2026-08-03T00:00:00Z"), 34.2, Some(1)),
            ]
        );
        let dev = only(&n, "skin_temperature_deviation");
        assert_eq!(values(&dev), [("value", -0.25, "K", Some(2))]);
        assert_eq!(dev.effective_start, ms("2026-08-02T00:00:00Z"));
        assert_eq!(
            dev.measurement_id,
            "google-health:7583570207748835967:daily-sleep-temperature-derivations:2026-08-02:skin_temperature_deviation"
        );
        // a nightly value that is itself NaN: both skipped, counted
        let nan = r#"{"dataPoints": [{"dailySleepTemperatureDerivations": {"date": {"year": 2026, "month": 8, "day": 4},
            "nightlyTemperatureCelsius": "NaN", "baselineTemperatureCelsius": "Infinity"}}]}"#;
        let n = run("daily-sleep-temperature-derivations", nan);
        assert!(n.measurements.is_empty());
        assert_eq!(
            skips(&n),
            [
                ("not_a_number", "skin_temperature", 1),
                ("not_a_number", "skin_temperature_deviation", 1)
            ]
        );
    }

    #[test]
    fn test_daily_values_resting_heart_rate_and_spo2() {
        let body = r#"{"dataPoints": [
          {"dailyRestingHeartRate": {"date": {"year": 2026, "month": 8, "day": 13}, "beatsPerMinute": "58",
            "dailyRestingHeartRateMetadata": {"calculationMethod": "WITH_SLEEP"}}}
        ]}"#;
        let r = only(&run("daily-resting-heart-rate", body), "resting_heart_rate");
        assert_eq!(values(&r), [("value", 58.0, "/min", Some(0))]);
        assert_eq!(r.effective_end, Some(r.effective_start + 86_400_000));
        let body = r#"{"dataPoints": [
          {"dailyOxygenSaturation": {"date": {"year": 2026, "month": 8, "day": 13}, "averagePercentage": 95.7,
            "lowerBoundPercentage": 93.1, "upperBoundPercentage": 98.0}}
        ]}"#;
        let o = only(
            &run("daily-oxygen-saturation", body),
            "daily_oxygen_saturation",
        );
        assert_eq!(values(&o), [("value", 95.7, "%", Some(1))]);
        assert_eq!(o.aggregation, AGGREGATION_INDIVIDUAL);
    }

    #[test]
    fn test_hrv_samples_make_two_hourly_series_each_optional() {
        let body = r#"{"dataPoints": [
          {"heartRateVariability": {"sampleTime": {"physicalTime": "2026-08-29T02:00:00.000Z", "utcOffset": "0s"},
            "rootMeanSquareOfSuccessiveDifferencesMilliseconds": 41.5, "standardDeviationMilliseconds": 55.25}},
          {"heartRateVariability": {"sampleTime": {"physicalTime": "2026-08-29T02:05:00.000Z", "utcOffset": "0s"},
            "rootMeanSquareOfSuccessiveDifferencesMilliseconds": 39}},
          {"heartRateVariability": {"sampleTime": {"physicalTime": "2026-08-29T02:10:00.000Z", "utcOffset": "0s"}}}
        ]}"#;
        let n = run("heart-rate-variability", body);
        let got: Vec<(&str, f64)> = n
            .measurements
            .iter()
            .map(|m| (m.data_type.as_str(), m.components[0].value))
            .collect();
        assert_eq!(
            got,
            [
                ("hrv_rmssd", 41.5),
                ("hrv_sdnn", 55.25),
                ("hrv_rmssd", 39.0)
            ]
        );
        assert!(
            n.measurements
                .iter()
                .all(|m| m.aggregation == AGGREGATION_HOURLY)
        );
        assert!(
            n.measurements
                .iter()
                .all(|m| m.utc_offset_seconds == Some(0))
        );
        // a sample with neither value is counted once
        assert_eq!(skips(&n), [("missing_field", "heart-rate-variability", 1)]);
    }

    #[test]
    fn test_spo2_respiratory_body_fat_and_core_temperature() {
        let spo2 = r#"{"dataPoints": [{"oxygenSaturation": {"sampleTime": {"physicalTime": "2026-08-29T02:00:00Z",
            "utcOffset": "3600s"}, "percentage": 96}}]}"#;
        let s = only(&run("oxygen-saturation", spo2), "oxygen_saturation");
        assert_eq!(
            (s.components[0].value, s.aggregation.as_str()),
            (96.0, "HOURLY")
        );
        let rr = r#"{"dataPoints": [{"respiratoryRateSleepSummary": {"sampleTime": {"physicalTime": "2026-08-29T06:00:00Z",
            "utcOffset": "3600s"}, "fullSleepStats": {"breathsPerMinute": 14.6, "standardDeviation": 1.1},
            "deepSleepStats": {"breathsPerMinute": 13.9}}}]}"#;
        let r = only(
            &run("respiratory-rate-sleep-summary", rr),
            "sleep_respiratory_rate",
        );
        assert_eq!(values(&r), [("value", 14.6, "/min", Some(1))]);
        let fat = r#"{"dataPoints": [{"name": "users/1/dataTypes/body-fat/dataPoints/bf-1",
            "dataSource": {"recordingMethod": "ACTIVELY_MEASURED", "platform": "HEALTH_CONNECT",
                           "device": {"displayName": "Body+", "manufacturer": "Withings", "formFactor": "SCALE"}},
            "bodyFat": {"sampleTime": {"physicalTime": "2026-08-29T06:00:00Z", "utcOffset": "3600s"}, "percentage": 21.4}}]}"#;
        let f = only(&run("body-fat", fat), "body_fat_percentage");
        assert_eq!(values(&f), [("value", 21.4, "%", Some(1))]);
        assert_eq!(
            f.device
                .as_ref()
                .map(|d| (d.device_id.as_str(), d.manufacturer.clone())),
            Some(("HEALTH_CONNECT:Body+", None))
        );
        let core = r#"{"dataPoints": [{"name": "users/1/dataTypes/core-body-temperature/dataPoints/t-9",
            "coreBodyTemperature": {"sampleTime": {"physicalTime": "2026-08-29T06:00:00Z", "utcOffset": "3600s"},
                                    "temperatureCelsius": 37.05, "measurementLocation": "MOUTH"}}]}"#;
        let c = only(&run("core-body-temperature", core), "body_temperature");
        assert_eq!(values(&c), [("value", 37.05, "Cel", Some(2))]);
        assert_eq!(c.provider_group_id.as_deref(), Some("t-9"));
    }

    #[test]
    fn test_offsets_come_from_the_duration_else_the_civil_time() {
        // no utcOffset: civil 10:59:57 at 05:29:57Z is +05:30
        let no_offset = HEART_RATE.replace(r#""utcOffset": "19800s","#, "");
        let hr = only(&run("heart-rate", &no_offset), "heart_rate");
        assert_eq!(hr.utc_offset_seconds, Some(19_800));
        // neither: unknown
        let p = json!([{"heartRate": {"sampleTime": {"physicalTime": "2026-08-29T05:29:57Z"}, "beatsPerMinute": "61"}}]);
        let n = normalize(
            "heart-rate",
            p.as_array().unwrap(),
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(n.measurements[0].utc_offset_seconds, None);
        // civil date with an omitted time (midnight), offset derived: -05:00
        let p = json!([{"heartRate": {"sampleTime": {"physicalTime": "2026-08-29T05:00:00Z",
            "civilTime": {"date": {"year": 2026, "month": 8, "day": 29}, "time": {}}}, "beatsPerMinute": "61"}}]);
        let n = normalize(
            "heart-rate",
            p.as_array().unwrap(),
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(n.measurements[0].utc_offset_seconds, Some(-18_000));
    }

    #[test]
    fn test_unreadable_times_values_and_names_are_counted_never_guessed() {
        let p = json!([
            // the docs' own typo `2026-03-0B01:29:00Z`
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-0B01:29:00Z", "utcOffset": "0s"}, "beatsPerMinute": "61"}},
            // a fractional offset
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:29:00Z", "utcOffset": "3.5s"}, "beatsPerMinute": "61"}},
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:30:00Z"}, "beatsPerMinute": "fast"}},
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:31:00Z"}, "beatsPerMinute": "0"}},
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:32:00Z"}, "beatsPerMinute": "-4"}},
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:33:00Z"}}},
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:34:00Z"}, "beatsPerMinute": "NaN"}},
            {"steps": {"count": "3"}},
            "not an object",
            {"heartRate": {"sampleTime": {"physicalTime": "2026-03-08T01:35:00.5Z"}, "beatsPerMinute": "72"}},
        ]);
        let n = normalize(
            "heart-rate",
            p.as_array().unwrap(),
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(
            n.measurements[0].effective_start,
            ms("2026-03-08T01:35:00.500Z")
        );
        assert_eq!(
            skips(&n),
            [
                ("invalid_time", "heart-rate", 2),
                ("invalid_value", "heart_rate", 3),
                ("missing_field", "heart_rate", 1),
                ("missing_record", "heart-rate", 1),
                ("not_a_number", "heart_rate", 1),
                ("not_a_point", "heart-rate", 1),
            ]
        );
        let bad_name = WEIGHT.replace("4411927352398848000", "<POINT-ID>");
        let n = run("weight", &bad_name);
        assert!(n.measurements.is_empty());
        assert_eq!(skips(&n), [("invalid_name", "weight", 1)]);
        // an interval that ends before it starts
        let p = json!([{"steps": {"interval": {"startTime": "2026-07-23T08:01:00Z", "endTime": "2026-07-23T08:00:00Z"}, "count": "1"}}]);
        let n = normalize(
            "steps",
            p.as_array().unwrap(),
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(skips(&n), [("invalid_time", "steps", 1)]);
        // a type the table does not read
        let n = normalize(
            "exercise",
            &points_of(WEIGHT),
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(skips(&n), [("unmapped_type", "exercise", 1)]);
    }

    #[test]
    fn test_empty_pages_make_nothing() {
        for body in [
            "{}",
            r#"{"nextPageToken":"t"}"#,
            r#"{"dataPoints":[],"someFutureField":"x"}"#,
        ] {
            let n = run("steps", body);
            assert_eq!(n, Normalized::default(), "{body}");
        }
    }

    #[test]
    fn test_the_same_point_twice_is_one_measurement_the_later_update_wins() {
        let mut newer = points_of(SLEEP_CLASSIC).remove(0);
        newer["sleep"]["summary"]["minutesAsleep"] = json!("470");
        newer["sleep"]["updateTime"] = json!("2026-08-28T09:00:00Z");
        let older = points_of(SLEEP_CLASSIC).remove(0);
        let n = normalize(
            "sleep",
            &[newer, older],
            &ctx(),
            &table(),
            &Policy::default(),
        );
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(n.measurements[0].components[0].value, 470.0);
        assert_eq!(skips(&n), [("duplicate_point", "sleep_duration", 1)]);
    }

    #[test]
    fn test_policy_disabled_data_type_is_not_produced() {
        let policy = Policy::resolve(
            &crate::policy::PolicyDoc::from_json(&json!({"disabled_data_types": ["hrv_sdnn"]}))
                .unwrap(),
            &Default::default(),
            Default::default(),
        );
        let body = r#"{"dataPoints": [{"heartRateVariability": {"sampleTime": {"physicalTime": "2026-08-29T02:00:00Z"},
            "rootMeanSquareOfSuccessiveDifferencesMilliseconds": 41.5, "standardDeviationMilliseconds": 55.25}}]}"#;
        let n = normalize(
            "heart-rate-variability",
            &points_of(body),
            &ctx(),
            &table(),
            &policy,
        );
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(n.measurements[0].data_type, "hrv_rmssd");
        assert_eq!(skips(&n), [("disabled_data_type", "hrv_sdnn", 1)]);
        let t = table();
        assert!(!t.names_allowed(|d| d != "body_weight").contains(&"weight"));
    }

    #[test]
    fn test_proto3_scalars_parse() {
        assert_eq!(parse_duration("-18000s"), Some((-18000.0, 0)));
        assert_eq!(parse_duration("900s"), Some((900.0, 0)));
        assert_eq!(parse_duration("1.5s"), Some((1.5, 1)));
        assert_eq!(parse_duration("0.000000001s"), Some((1e-9, 9)));
        for bad in ["18000", "s", "1.5", "1e3s", "--1s", "1.0000000001s", "NaNs"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_offset("19800s"), Some(19_800));
        assert_eq!(parse_offset("-18000s"), Some(-18_000));
        assert_eq!(parse_offset("3.5s"), None);
        assert_eq!(parse_offset("90000s"), None);
        let base = ms("2026-09-09T01:24:33Z");
        assert_eq!(parse_instant("2026-09-09T01:24:33.390Z"), Some(base + 390));
        assert_eq!(
            parse_instant("2026-09-09T01:24:33.390135Z"),
            Some(base + 390)
        );
        assert_eq!(
            parse_instant("2026-09-09T01:24:33.390135999Z"),
            Some(base + 390)
        );
        assert_eq!(parse_instant("2026-02-30T00:00:00Z"), None);
        assert_eq!(places_of("97.50"), 2);
        assert_eq!(places_of("61"), 0);
        assert_eq!(places_of("1.25e1"), 1);
        assert_eq!(shifted("79832", -3), Ok((79.832, 3)));
        assert_eq!(shifted("79832.5", -3), Ok((79.8325, 4)));
        assert_eq!(number_text(&json!("NaN")), Err(Miss::NotANumber));
        assert_eq!(number_text(&json!("-Infinity")), Err(Miss::NotANumber));
        assert_eq!(number_text(&json!(true)), Err(Miss::Invalid));
        assert_eq!(number_text(&json!(" 61 ")).as_deref(), Ok("61"));
    }

    #[test]
    fn test_paths_select_array_elements() {
        let v = json!({"summary": {"stagesSummary": [{"type": "DEEP", "minutes": "100"}, {"type": "REM", "minutes": null}]}});
        assert_eq!(
            lookup(&v, "summary.stagesSummary[type=DEEP].minutes"),
            Some(&json!("100"))
        );
        assert_eq!(lookup(&v, "summary.stagesSummary[type=REM].minutes"), None);
        assert_eq!(
            lookup(&v, "summary.stagesSummary[type=LIGHT].minutes"),
            None
        );
        for bad in ["", "a..b", "a[b].c", "a[b=].c", "a.b]", "a-b"] {
            assert!(parse_path(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn test_inconsistent_tables_are_refused() {
        let good = r#"
format = 1
[types.weight]
json_key = "weight"
filter_name = "weight"
shape = "sample"
filter_member = "sample_time.physical_time"
method = "list"
scope = "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly"
[[types.weight.measurements]]
data_type = "body_weight"
components = [{ code = "value", path = "weightGrams", unit = "kg", shift = -3 }]
"#;
        assert!(DataTypeTable::from_toml(good).is_ok());
        for (from, to) in [
            ("format = 1", "format = 2"),
            ("sample_time.physical_time\"", "interval.start_time\""),
            ("method = \"list\"", "method = \"dailyRollUp\""),
            (".readonly\"", "\""),
            ("json_key = \"weight\"", "json_key = \"Weight\""),
            ("filter_name = \"weight\"", "filter_name = \"body-weight\""),
            ("code = \"value\"", "code = \"kg\""),
            ("path = \"weightGrams\"", "path = \"weight.grams[x]\""),
            (
                "data_type = \"body_weight\"",
                "data_type = \"body_weight\"\naggregation = \"DAILY\"",
            ),
            // HOURLY takes one component
            (
                "shift = -3 }]",
                "shift = -3 }, { code = \"x\", path = \"a\", unit = \"1\" }]\naggregation = \"HOURLY\"",
            ),
            ("method = \"list\"", "method = \"list\"\npage_size = 10001"),
            ("unit = \"kg\"", "unit = \" \""),
            ("shift = -3", "divisor = 0"),
            ("shift = -3", "stage_types = [\"DEEP\"]"),
        ] {
            let text = good.replacen(from, to, 1);
            assert_ne!(text, good, "{from}");
            assert!(DataTypeTable::from_toml(&text).is_err(), "accepted: {to}");
        }
        // the same ohx data type from two rules
        let twice = format!(
            "{good}{}",
            good.replace("format = 1", "")
                .replace("types.weight", "types.weight-2")
        );
        assert!(matches!(
            DataTypeTable::from_toml(&twice),
            Err(DataTypeTableError::Invalid(_))
        ));
        assert!(matches!(
            DataTypeTable::from_toml("format = 1\ntypes = 3"),
            Err(DataTypeTableError::Parse(_))
        ));
        let sleep = good
            .replace("types.weight", "types.sleep")
            .replace("method = \"list\"", "method = \"list\"\npage_size = 26");
        assert!(
            DataTypeTable::from_toml(&sleep).is_err(),
            "sleep pages are ≤ 25"
        );
    }
}
