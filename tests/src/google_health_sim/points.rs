//! Stored points: what the simulator reads from a seeded `DataPoint`, and the intervals
//! of the notifications about them.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::{Value, json};

use super::catalogue::{DataType, Shape};
use super::time::{
    civil_iso, civil_json, json_civil, json_date, local, midnight_utc, parse_duration_secs,
    parse_instant, rfc3339,
};

/// What the simulator reads from a point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Times {
    pub(super) start: DateTime<Utc>,
    pub(super) end: DateTime<Utc>,
    start_offset: i64,
    end_offset: i64,
    pub(super) civil_start: NaiveDateTime,
    pub(super) civil_end: NaiveDateTime,
    pub(super) date: Option<NaiveDate>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PointKey {
    Named(String),
    Start(DateTime<Utc>),
}

#[derive(Clone, Debug)]
pub(super) struct Point {
    pub(super) name: Option<String>,
    pub(super) times: Times,
    /// As seeded.
    pub(super) json: Value,
}

impl Point {
    pub(super) fn key(&self) -> PointKey {
        match &self.name {
            Some(n) => PointKey::Named(n.clone()),
            None => PointKey::Start(self.times.start),
        }
    }

    /// Sort key: start time, then name (both compared descending when listing).
    pub(super) fn order(&self) -> (DateTime<Utc>, &str) {
        (self.times.start, self.name.as_deref().unwrap_or(""))
    }
}

fn point_times(t: &DataType, point: &Value) -> Result<Times, String> {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    if t.shape == Shape::Untimed {
        return Ok(Times {
            start: epoch,
            end: epoch,
            start_offset: 0,
            end_offset: 0,
            civil_start: epoch.naive_utc(),
            civil_end: epoch.naive_utc(),
            date: None,
        });
    }
    let value = point
        .get(t.key)
        .filter(|v| v.is_object())
        .ok_or_else(|| format!("missing object {:?}", t.key))?;
    let offset = |v: Option<&Value>| -> Result<i64, String> {
        match v {
            None => Ok(0),
            Some(Value::String(s)) => {
                parse_duration_secs(s).ok_or_else(|| format!("bad duration {s:?}"))
            }
            Some(other) => Err(format!("bad duration {other}")),
        }
    };
    let instant = |v: Option<&Value>, what: &str| -> Result<DateTime<Utc>, String> {
        v.and_then(Value::as_str)
            .and_then(parse_instant)
            .ok_or_else(|| format!("{what} must be an RFC 3339 string"))
    };
    match t.shape {
        Shape::Sample => {
            let st = value
                .get("sampleTime")
                .ok_or_else(|| format!("missing {}.sampleTime", t.key))?;
            let at = instant(st.get("physicalTime"), "sampleTime.physicalTime")?;
            let off = offset(st.get("utcOffset"))?;
            let civil = st
                .get("civilTime")
                .and_then(json_civil)
                .unwrap_or_else(|| local(at, off));
            Ok(Times {
                start: at,
                end: at,
                start_offset: off,
                end_offset: off,
                civil_start: civil,
                civil_end: civil,
                date: None,
            })
        }
        Shape::Interval | Shape::Session => {
            let iv = value
                .get("interval")
                .ok_or_else(|| format!("missing {}.interval", t.key))?;
            let start = instant(iv.get("startTime"), "interval.startTime")?;
            let end = match iv.get("endTime") {
                None => start,
                some => instant(some, "interval.endTime")?,
            };
            let so = offset(iv.get("startUtcOffset"))?;
            let eo = match iv.get("endUtcOffset") {
                None => so,
                some => offset(some)?,
            };
            Ok(Times {
                start,
                end,
                start_offset: so,
                end_offset: eo,
                civil_start: iv
                    .get("civilStartTime")
                    .and_then(json_civil)
                    .unwrap_or_else(|| local(start, so)),
                civil_end: iv
                    .get("civilEndTime")
                    .and_then(json_civil)
                    .unwrap_or_else(|| local(end, eo)),
                date: None,
            })
        }
        Shape::Daily => {
            let date = value
                .get("date")
                .and_then(json_date)
                .ok_or_else(|| format!("missing or bad {}.date", t.key))?;
            let next = date.succ_opt().unwrap_or(date);
            Ok(Times {
                start: midnight_utc(date),
                end: midnight_utc(next),
                start_offset: 0,
                end_offset: 0,
                civil_start: date.and_time(NaiveTime::MIN),
                civil_end: next.and_time(NaiveTime::MIN),
                date: Some(date),
            })
        }
        Shape::Untimed => Err("untimed".into()),
    }
}

pub(super) fn stored_point(t: &DataType, json: Value) -> Result<Point, String> {
    if !json.is_object() {
        return Err("not a JSON object".into());
    }
    let name = match json.get("name") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("name must be a string".into()),
    };
    if t.shape == Shape::Untimed && name.is_none() {
        return Err(format!("{} points need a name", t.id));
    }
    let times = point_times(t, &json)?;
    Ok(Point { name, times, json })
}

/// The notification interval covering `points` (physical span plus both civil renderings).
pub(super) fn interval_json(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    civil_start: NaiveDateTime,
    civil_end: NaiveDateTime,
) -> Value {
    json!({
        "physicalTimeInterval": { "startTime": rfc3339(start), "endTime": rfc3339(end) },
        "civilDateTimeInterval": {
            "startDateTime": civil_json(civil_start),
            "endDateTime": civil_json(civil_end),
        },
        "civilIso8601TimeInterval": {
            "startTime": civil_iso(civil_start),
            "endTime": civil_iso(civil_end),
        },
    })
}

pub(super) fn span_interval<'a>(times: impl Iterator<Item = &'a Times>) -> Option<Value> {
    let mut first: Option<&Times> = None;
    let mut last: Option<&Times> = None;
    for t in times {
        if first.is_none_or(|f| t.start < f.start) {
            first = Some(t);
        }
        if last.is_none_or(|l| t.end > l.end) {
            last = Some(t);
        }
    }
    let (first, last) = (first?, last?);
    Some(interval_json(
        first.start,
        last.end,
        first.civil_start,
        last.civil_end,
    ))
}
