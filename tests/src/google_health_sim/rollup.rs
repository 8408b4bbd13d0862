//! `dailyRollUp`: the request body, the windows and the roll-up values.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};
use serde_json::{Map, Value, json};

use super::TYPE_BAD_REQUEST;
use super::catalogue::DataType;
use super::data::{in_family, source_family, unimplemented_rpc};
use super::errors::{envelope, health_error};
use super::points::Point;
use super::state::User;
use super::time::{civil_iso, civil_json, json_i64};

/// Longest roll-up range of a type, in days (§3.8: 14 for four types, 90 for the others).
pub(super) fn rollup_cap_days(t: &DataType) -> i64 {
    if matches!(
        t.id,
        "calories-in-heart-rate-zone" | "heart-rate" | "active-minutes" | "total-calories"
    ) {
        14
    } else {
        90
    }
}

/// How the points of a type fold into its `…RollupValue` (Discovery `DailyRollupDataPoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RollupKind {
    /// Sum of an int64 member field, written as an int64 string.
    Sum {
        field: &'static str,
        out: &'static str,
    },
    /// `kcalSum`: sum of the double `kcal`.
    KcalSum,
    /// Average (and optionally minimum and maximum) of a numeric member field, as doubles.
    Stats {
        field: &'static str,
        avg: &'static str,
        min: Option<&'static str>,
        max: Option<&'static str>,
    },
    /// `durationSum`: the summed interval durations.
    DurationSum,
    /// `sumIn{FatBurn,Cardio,Peak}HeartZone` from `activeZoneMinutes` by `heartRateZone`.
    ZoneMinutes,
    /// `activeMinutesRollupByActivityLevel[{activityLevel, activeMinutesSum}]`.
    ActiveMinutes,
    /// `timeInHeartRateZones[{heartRateZone, duration}]` from the intervals by zone.
    TimeInZones,
}

/// The roll-up of a type, when the simulator computes one (`calories-in-heart-rate-zone`,
/// `total-calories`, `hydration-log`, `nutrition-log` and `basal-energy-burned` have none: 501).
pub(super) fn rollup_kind(t: &DataType) -> Option<RollupKind> {
    let stats = |field, avg, min, max| RollupKind::Stats {
        field,
        avg,
        min,
        max,
    };
    let sum = |field, out| RollupKind::Sum { field, out };
    Some(match t.id {
        "steps" | "floors" => sum("count", "countSum"),
        "distance" => sum("millimeters", "millimetersSum"),
        "altitude" => sum("gainMillimeters", "gainMillimetersSum"),
        "swim-lengths-data" => sum("strokeCount", "strokeCountSum"),
        "active-energy-burned" => RollupKind::KcalSum,
        "heart-rate" => stats(
            "beatsPerMinute",
            "beatsPerMinuteAvg",
            Some("beatsPerMinuteMin"),
            Some("beatsPerMinuteMax"),
        ),
        "weight" => stats("weightGrams", "weightGramsAvg", None, None),
        "body-fat" => stats("percentage", "bodyFatPercentageAvg", None, None),
        "blood-glucose" => stats(
            "bloodGlucoseMilligramsPerDeciliter",
            "bloodGlucoseMilligramsPerDeciliterAvg",
            None,
            None,
        ),
        "core-body-temperature" => stats(
            "temperatureCelsius",
            "temperatureCelsiusAvg",
            Some("temperatureCelsiusMin"),
            Some("temperatureCelsiusMax"),
        ),
        "run-vo2-max" => stats("runVo2Max", "rateAvg", Some("rateMin"), Some("rateMax")),
        "sedentary-period" => RollupKind::DurationSum,
        "active-zone-minutes" => RollupKind::ZoneMinutes,
        "active-minutes" => RollupKind::ActiveMinutes,
        "time-in-heart-rate-zone" => RollupKind::TimeInZones,
        _ => return None,
    })
}

fn json_f64(v: Option<&Value>) -> Option<f64> {
    let f = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

/// A double as Google's JSON writes it: integral values without a fraction (`69`, not `69.0`).
pub(super) fn double_json(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        json!(f as i64)
    } else {
        json!(f)
    }
}

/// A `google-duration` (`"3600s"`, `"1.5s"`; 0, 3, 6 or 9 fractional digits).
pub(super) fn duration_json(d: TimeDelta) -> String {
    let secs = d.num_seconds();
    let nanos = d.subsec_nanos().unsigned_abs();
    if nanos == 0 {
        return format!("{secs}s");
    }
    let mut frac = format!("{nanos:09}");
    while frac.len() > 3 && frac.ends_with("000") {
        frac.truncate(frac.len() - 3);
    }
    format!("{secs}.{frac}s")
}

/// The positive length of a point's interval.
fn span_of(p: &Point) -> TimeDelta {
    (p.times.end - p.times.start).max(TimeDelta::zero())
}

impl RollupKind {
    /// The `…RollupValue` of `points` (proto3 JSON: zero fields omitted).
    fn value(self, t: &DataType, points: &[&Point]) -> Value {
        let member = |p: &Point, k: &str| p.json.get(t.key).and_then(|m| m.get(k)).cloned();
        let mut out = Map::new();
        match self {
            Self::Sum { field, out: name } => {
                let total = points.iter().fold(0_i64, |acc, p| {
                    acc.saturating_add(json_i64(member(p, field).as_ref()).unwrap_or(0))
                });
                if total != 0 {
                    out.insert(name.into(), json!(total.to_string()));
                }
            }
            Self::KcalSum => {
                let total: f64 = points
                    .iter()
                    .filter_map(|p| json_f64(member(p, "kcal").as_ref()))
                    .sum();
                if total != 0.0 {
                    out.insert("kcalSum".into(), double_json(total));
                }
            }
            Self::Stats {
                field,
                avg,
                min,
                max,
            } => {
                let values: Vec<f64> = points
                    .iter()
                    .filter_map(|p| json_f64(member(p, field).as_ref()))
                    .collect();
                if !values.is_empty() {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    for (name, v) in [(Some(avg), mean), (min, lo), (max, hi)] {
                        if let Some(name) = name
                            && v != 0.0
                        {
                            out.insert(name.into(), double_json(v));
                        }
                    }
                }
            }
            Self::DurationSum => {
                let total = points
                    .iter()
                    .fold(TimeDelta::zero(), |acc, p| acc + span_of(p));
                if !total.is_zero() {
                    out.insert("durationSum".into(), json!(duration_json(total)));
                }
            }
            Self::ZoneMinutes => {
                let mut sums = [0_i64; 3];
                for p in points {
                    let zone = member(p, "heartRateZone");
                    let slot = match zone.as_ref().and_then(Value::as_str) {
                        Some("FAT_BURN") => 0,
                        Some("CARDIO") => 1,
                        Some("PEAK") => 2,
                        _ => continue,
                    };
                    let minutes = json_i64(member(p, "activeZoneMinutes").as_ref()).unwrap_or(0);
                    sums[slot] = sums[slot].saturating_add(minutes);
                }
                let names = [
                    "sumInFatBurnHeartZone",
                    "sumInCardioHeartZone",
                    "sumInPeakHeartZone",
                ];
                for (name, sum) in names.into_iter().zip(sums) {
                    if sum != 0 {
                        out.insert(name.into(), json!(sum.to_string()));
                    }
                }
            }
            Self::ActiveMinutes => {
                let levels = ["LIGHT", "MODERATE", "VIGOROUS"];
                let mut sums = [0_i64; 3];
                for p in points {
                    let by_level = member(p, "activeMinutesByActivityLevel");
                    for entry in by_level.iter().filter_map(Value::as_array).flatten() {
                        let level = entry.get("activityLevel").and_then(Value::as_str);
                        if let Some(i) = levels.iter().position(|l| Some(*l) == level) {
                            let minutes = json_i64(entry.get("activeMinutes")).unwrap_or(0);
                            sums[i] = sums[i].saturating_add(minutes);
                        }
                    }
                }
                let rows: Vec<Value> = levels
                    .into_iter()
                    .zip(sums)
                    .filter(|(_, sum)| *sum != 0)
                    .map(|(level, sum)| {
                        json!({ "activityLevel": level, "activeMinutesSum": sum.to_string() })
                    })
                    .collect();
                if !rows.is_empty() {
                    out.insert("activeMinutesRollupByActivityLevel".into(), json!(rows));
                }
            }
            Self::TimeInZones => {
                let zones = ["LIGHT", "MODERATE", "VIGOROUS", "PEAK"];
                let mut sums = [TimeDelta::zero(); 4];
                for p in points {
                    let zone = member(p, "heartRateZoneType");
                    let level = zone.as_ref().and_then(Value::as_str);
                    if let Some(i) = zones.iter().position(|z| Some(*z) == level) {
                        sums[i] += span_of(p);
                    }
                }
                let rows: Vec<Value> = zones
                    .into_iter()
                    .zip(sums)
                    .filter(|(_, d)| !d.is_zero())
                    .map(|(zone, d)| json!({ "heartRateZone": zone, "duration": duration_json(d) }))
                    .collect();
                if !rows.is_empty() {
                    out.insert("timeInHeartRateZones".into(), json!(rows));
                }
            }
        }
        Value::Object(out)
    }
}

/// A parsed `DailyRollUpDataPointsRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DailyRollUpRequest {
    start: NaiveDate,
    end: NaiveDate,
    window_days: i64,
    family: String,
}

/// 400 for a body the JSON ↔ proto transcoder refuses (Google's front end: a `BadRequest`
/// detail, no `ErrorInfo`).
fn bad_payload(field: Option<&str>, description: &str) -> Box<Response> {
    let mut violation = json!({ "description": description });
    if let (Some(f), Value::Object(m)) = (field, &mut violation) {
        m.insert("field".into(), json!(f));
    }
    Box::new(envelope(
        400,
        "INVALID_ARGUMENT",
        description,
        vec![json!({ "@type": TYPE_BAD_REQUEST, "fieldViolations": [violation] })],
    ))
}

fn rollup_error(reason: &str, message: &str) -> Box<Response> {
    Box::new(health_error(400, reason, message, json!({})))
}

/// `windowSizeDays` → `window_size_days`.
pub(super) fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The members of a request message: refuses a non-object and unknown names (proto3 JSON takes
/// the lowerCamel or the original snake_case name); `get` looks a field up under either.
struct Message<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Message<'a> {
    fn new(v: &'a Value, path: &str, fields: &[&str]) -> Result<Self, Box<Response>> {
        let Value::Object(map) = v else {
            let at = if path.is_empty() { "" } else { path };
            return Err(bad_payload(
                (!at.is_empty()).then_some(at),
                &format!("Invalid JSON payload received. Expected an object for '{at}', got {v}."),
            ));
        };
        for key in map.keys() {
            if !fields.iter().any(|f| key == f || *key == snake_case(f)) {
                let name = if path.is_empty() {
                    format!("\"{key}\"")
                } else {
                    format!("\"{key}\" at '{path}'")
                };
                return Err(bad_payload(
                    (!path.is_empty()).then_some(path),
                    &format!(
                        "Invalid JSON payload received. Unknown name {name}: Cannot find field."
                    ),
                ));
            }
        }
        Ok(Self {
            map,
            path: path.to_owned(),
        })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map
            .get(name)
            .or_else(|| self.map.get(&snake_case(name)))
            .filter(|v| !v.is_null())
    }

    fn child_path(&self, name: &str) -> String {
        let snake = snake_case(name);
        if self.path.is_empty() {
            snake
        } else {
            format!("{}.{snake}", self.path)
        }
    }

    /// An `int32` field (a JSON number or a decimal string); absent: 0.
    fn int32(&self, name: &str) -> Result<i64, Box<Response>> {
        let Some(v) = self.get(name) else {
            return Ok(0);
        };
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse::<i64>().ok(),
            _ => None,
        };
        match n.filter(|n| i32::try_from(*n).is_ok()) {
            Some(n) => Ok(n),
            None => {
                let path = self.child_path(name);
                Err(bad_payload(
                    Some(&path),
                    &format!("Invalid value at '{path}' (TYPE_INT32), {v}"),
                ))
            }
        }
    }

    /// A `string` field; absent: `""`.
    fn string(&self, name: &str) -> Result<&'a str, Box<Response>> {
        match self.get(name) {
            None => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(v) => {
                let path = self.child_path(name);
                Err(bad_payload(
                    Some(&path),
                    &format!("Invalid value at '{path}' (TYPE_STRING), {v}"),
                ))
            }
        }
    }
}

/// A `CivilDateTime` bound of the range; `None` when absent.
fn civil_bound(range: &Message<'_>, name: &str) -> Result<Option<NaiveDateTime>, Box<Response>> {
    let Some(v) = range.get(name) else {
        return Ok(None);
    };
    let path = range.child_path(name);
    let bound = Message::new(v, &path, &["date", "time"])?;
    let invalid = |what: &str| {
        rollup_error(
            "INVALID_CIVIL_DATE_TIME",
            &format!("Invalid civil date time at '{path}': {what}."),
        )
    };
    let Some(date_v) = bound.get("date") else {
        return Err(invalid("a date is required"));
    };
    let date = Message::new(date_v, &bound.child_path("date"), &["year", "month", "day"])?;
    let (y, m, d) = (
        date.int32("year")?,
        date.int32("month")?,
        date.int32("day")?,
    );
    let date = (1..=9999)
        .contains(&y)
        .then(|| {
            NaiveDate::from_ymd_opt(
                i32::try_from(y).ok()?,
                u32::try_from(m).ok()?,
                u32::try_from(d).ok()?,
            )
        })
        .flatten()
        .ok_or_else(|| invalid(&format!("{y:04}-{m:02}-{d:02} is not a calendar date")))?;
    let time = match bound.get("time") {
        None => NaiveTime::MIN,
        Some(time_v) => {
            let fields = ["hours", "minutes", "seconds", "nanos"];
            let time = Message::new(time_v, &bound.child_path("time"), &fields)?;
            let mut parts = [0_u32; 4];
            for (slot, name) in parts.iter_mut().zip(fields) {
                *slot = u32::try_from(time.int32(name)?).map_err(|_| invalid("bad time of day"))?;
            }
            NaiveTime::from_hms_nano_opt(parts[0], parts[1], parts[2], parts[3])
                .filter(|_| parts[3] < 1_000_000_000)
                .ok_or_else(|| invalid("bad time of day"))?
        }
    };
    Ok(Some(date.and_time(time)))
}

/// Parses and checks a `DailyRollUpDataPointsRequest` (§3.8): `windowSizeDays` (default 1),
/// `pageSize` bounds the query (more than ⌊cap/window⌋ → `INVALID_ROLLUP_QUERY_DURATION`, fewer
/// than ⌈days/window⌉ → `INVALID_DATA_POINT_NAME`), `pageToken` accepted and ignored,
/// `dataSourceFamily`, and the closed-open civil `range` of whole days.
fn parse_daily_roll_up(t: &DataType, body: &Bytes) -> Result<DailyRollUpRequest, Box<Response>> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| bad_payload(None, &format!("Invalid JSON payload received. {e}.")))?
    };
    if !value.is_object() {
        return Err(bad_payload(
            None,
            "Invalid JSON payload received. Root element must be a message.",
        ));
    }
    let fields = [
        "range",
        "windowSizeDays",
        "pageSize",
        "pageToken",
        "dataSourceFamily",
    ];
    let req = Message::new(&value, "", &fields)?;
    let window_days = match req.int32("windowSizeDays")? {
        0 => 1,
        n if n < 0 => {
            return Err(rollup_error(
                "INVALID_ROLLUP_WINDOW",
                &format!("Invalid roll-up window: windowSizeDays must be positive, got {n}."),
            ));
        }
        n => n,
    };
    let cap = rollup_cap_days(t);
    let max_windows = cap / window_days;
    let duration_error = |windows: i64| {
        rollup_error(
            "INVALID_ROLLUP_QUERY_DURATION",
            &format!(
                "The roll-up query asks for {windows} windows of {window_days} day(s); at most {max_windows} fit the {cap}-day limit of data type '{}'.",
                t.id
            ),
        )
    };
    let page_size = match req.int32("pageSize")? {
        n if n < 0 => {
            return Err(rollup_error(
                "INVALID_PAGE_SIZE",
                &format!("Invalid page size {n}: must not be negative."),
            ));
        }
        0 => None,
        n if n > max_windows => return Err(duration_error(n)),
        n => Some(n),
    };
    req.string("pageToken")?;
    let family = match req.string("dataSourceFamily")? {
        "" => None,
        f => Some(f),
    };
    let family = source_family(family)?;
    let Some(range_v) = req.get("range") else {
        return Err(rollup_error(
            "INVALID_TIME_RANGE_INTERVAL_FORMAT",
            "The range is required: {\"start\": CivilDateTime, \"end\": CivilDateTime}.",
        ));
    };
    let range = Message::new(range_v, "range", &["start", "end"])?;
    let (Some(start), Some(end)) = (civil_bound(&range, "start")?, civil_bound(&range, "end")?)
    else {
        return Err(rollup_error(
            "INVALID_TIME_RANGE_INTERVAL_FORMAT",
            "The range needs both a start and an end.",
        ));
    };
    if end <= start {
        return Err(rollup_error(
            "INVALID_TIME_RANGE",
            &format!(
                "Invalid time range: the end {} is not after the start {}.",
                civil_iso(end),
                civil_iso(start)
            ),
        ));
    }
    if start.time() != NaiveTime::MIN || end.time() != NaiveTime::MIN {
        return Err(rollup_error(
            "INVALID_ROLLUP_WINDOW",
            "The range must be aligned with the aggregation window: whole civil days (no time of day).",
        ));
    }
    let (start, end) = (start.date(), end.date());
    let days = (end - start).num_days();
    let windows = (days + window_days - 1) / window_days;
    if windows > max_windows {
        return Err(duration_error(windows));
    }
    if let Some(size) = page_size
        && size < windows
    {
        return Err(rollup_error(
            "INVALID_DATA_POINT_NAME",
            &format!("Page size {size} is smaller than the {windows} windows of the range."),
        ));
    }
    Ok(DailyRollUpRequest {
        start,
        end,
        window_days,
        family,
    })
}

/// `dailyRollUp`: the user's points of `t` whose civil start falls in the range, bucketed into
/// windows of `windowSizeDays` civil days from the range start (the last one cut at the range
/// end), one row per window with data, ascending; `{}` when none; never a `nextPageToken`.
pub(super) fn daily_roll_up(user: &User, t: &DataType, body: &Bytes) -> Response {
    let Some(kind) = rollup_kind(t) else {
        return unimplemented_rpc();
    };
    let req = match parse_daily_roll_up(t, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let mut windows: BTreeMap<i64, Vec<&Point>> = BTreeMap::new();
    for p in user.points.get(t.id).into_iter().flat_map(BTreeMap::values) {
        let day = p.times.civil_start.date();
        if day < req.start || day >= req.end || !in_family(&p.json, &req.family) {
            continue;
        }
        let index = (day - req.start).num_days() / req.window_days;
        windows.entry(index).or_default().push(p);
    }
    let day = |n: i64| {
        req.start
            .checked_add_signed(TimeDelta::days(n))
            .unwrap_or(req.end)
            .min(req.end)
    };
    let rows: Vec<Value> = windows
        .into_iter()
        .map(|(index, points)| {
            let from = day(index * req.window_days);
            let to = day((index + 1) * req.window_days);
            let mut row = Map::new();
            row.insert(
                "civilStartTime".into(),
                civil_json(from.and_time(NaiveTime::MIN)),
            );
            row.insert(
                "civilEndTime".into(),
                civil_json(to.and_time(NaiveTime::MIN)),
            );
            row.insert(t.key.into(), kind.value(t, &points));
            Value::Object(row)
        })
        .collect();
    if rows.is_empty() {
        return axum::Json(json!({})).into_response();
    }
    axum::Json(json!({ "rollupDataPoints": rows })).into_response()
}
