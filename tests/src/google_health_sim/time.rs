//! Time: RFC 3339 instants, `google-duration`s, civil date-times and their JSON forms.

use chrono::{
    DateTime, Datelike as _, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeDelta,
    Timelike as _, Utc,
};
use serde_json::{Map, Value, json};

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as Google writes `google-datetime`.
pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub(super) fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A `google-duration` (`"-18000s"`, `"3.5s"`) in whole seconds.
pub(super) fn parse_duration_secs(s: &str) -> Option<i64> {
    let n = s.strip_suffix('s')?;
    let whole = n.split('.').next()?;
    if whole.is_empty() || whole == "-" {
        return n.parse::<f64>().ok().map(|f| f.trunc() as i64);
    }
    whole.parse().ok()
}

pub(super) fn json_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn json_date(v: &Value) -> Option<NaiveDate> {
    let y = i32::try_from(json_i64(v.get("year"))?).ok()?;
    let m = u32::try_from(json_i64(v.get("month"))?).ok()?;
    let d = u32::try_from(json_i64(v.get("day"))?).ok()?;
    NaiveDate::from_ymd_opt(y, m, d)
}

/// A `CivilDateTime` (`{"date":{…},"time":{…}}`, zero fields omitted).
pub(super) fn json_civil(v: &Value) -> Option<NaiveDateTime> {
    let date = json_date(v.get("date")?)?;
    let field = |t: Option<&Value>, k: &str| {
        t.and_then(|t| json_i64(t.get(k)))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    let t = v.get("time");
    let time = NaiveTime::from_hms_nano_opt(
        field(t, "hours"),
        field(t, "minutes"),
        field(t, "seconds"),
        field(t, "nanos"),
    )?;
    Some(date.and_time(time))
}

pub(super) fn local(t: DateTime<Utc>, offset_secs: i64) -> NaiveDateTime {
    (t + TimeDelta::seconds(offset_secs)).naive_utc()
}

pub(super) fn date_json(d: NaiveDate) -> Value {
    json!({ "year": d.year(), "month": d.month(), "day": d.day() })
}

/// A `CivilDateTime` as Google writes it: zero time fields omitted (`"time": {}` at midnight).
pub(super) fn civil_json(t: NaiveDateTime) -> Value {
    let mut time = Map::new();
    for (k, v) in [
        ("hours", t.hour()),
        ("minutes", t.minute()),
        ("seconds", t.second()),
        ("nanos", t.nanosecond()),
    ] {
        if v != 0 {
            time.insert(k.into(), json!(v));
        }
    }
    json!({ "date": date_json(t.date()), "time": time })
}

pub(super) fn civil_iso(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
}

pub(super) fn midnight_utc(d: NaiveDate) -> DateTime<Utc> {
    d.and_time(NaiveTime::MIN).and_utc()
}

/// Parses a civil filter literal `YYYY-MM-DD[THH:mm:ss[.f]]`; `Err(true)` when well-formed but
/// out of range.
pub(super) fn parse_civil_literal(s: &str) -> Result<NaiveDateTime, bool> {
    let well_formed = |s: &str| {
        let b = s.as_bytes();
        b.len() >= 10
            && b.iter().take(10).enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            })
    };
    if !well_formed(s) {
        return Err(false);
    }
    let (date_s, time_s) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    if date_s.len() != 10 {
        return Err(false);
    }
    let date = NaiveDate::parse_from_str(date_s, "%Y-%m-%d").map_err(|_| true)?;
    let time = match time_s {
        None => NaiveTime::MIN,
        Some(t) => {
            let tb = t.as_bytes();
            let shape = tb.len() >= 8
                && tb.iter().take(8).enumerate().all(|(i, c)| match i {
                    2 | 5 => *c == b':',
                    _ => c.is_ascii_digit(),
                });
            if !shape {
                return Err(false);
            }
            NaiveTime::parse_from_str(t, "%H:%M:%S%.f").map_err(|_| true)?
        }
    };
    Ok(date.and_time(time))
}
