//! Omron measurement items → Measurements (pure): the field table ([`FieldTable`], from
//! `fields.toml`) says which item fields hold which component in which unit.
//!
//! Time: Omron gives `dateTime` (UTC), `dateTimeLocal` and `dateTimeUtcOffset` (`-08:00`). The
//! instant is the local time minus the offset (research §3.4), and the offset is kept; an item
//! without a usable offset falls back to `dateTime` as UTC, with no offset.
//!
//! Identity: an item's `id` (dedupe on `(omron user, type, id)`, §3.4), so the overlap of
//! Omron's date-based paging and re-fetches of a window produce the same ids again. A daily
//! type (activity) is identified by its local date instead: Omron revises a day's totals as the
//! device syncs, and a day must stay one Observation.

use crate::policy::Policy;
use ohx_common::records::{
    AGGREGATION_INDIVIDUAL, Component, Context, Device, Measurement, series_key,
};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The provider's name (also the `measurement_id` prefix).
pub const NAME: &str = "omron";

/// The compiled-in table.
const BUILTIN: &str = include_str!("fields.toml");

/// How Omron's measurement types become Measurements.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTable {
    /// By Omron `type` (`bloodpressure`, `activity`, ...).
    pub types: BTreeMap<String, TypeRule>,
}

/// One Omron `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeRule {
    /// The list in `result` holding the items (`bloodPressure`, ...).
    pub list_key: String,
    /// The OAuth2 scope that grants the type.
    pub scope: String,
    /// Items are daily totals, identified by their local date.
    #[serde(default)]
    pub daily: bool,
    pub measurements: Vec<MeasurementRule>,
}

/// One Measurement made of an item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementRule {
    pub data_type: String,
    pub components: Vec<ComponentRule>,
}

/// One component read from an item field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentRule {
    pub code: String,
    pub field: String,
    /// UCUM unit when the item names none.
    pub unit: String,
    /// The item field naming the unit.
    #[serde(default)]
    pub unit_field: Option<String>,
    /// Omron unit text → UCUM code.
    #[serde(default)]
    pub units: BTreeMap<String, String>,
    #[serde(default)]
    pub optional: bool,
    /// A yes/no flag, written 0 or 1.
    #[serde(default)]
    pub flag: bool,
}

/// A field table that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FieldTableError {
    #[error("the Omron field table is not valid TOML of the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("the Omron field table is inconsistent: {0}")]
    Invalid(String),
}

impl FieldTable {
    /// The compiled-in table.
    ///
    /// # Errors
    /// When the compiled-in table is inconsistent (a bug caught by its unit test).
    pub fn builtin() -> Result<Self, FieldTableError> {
        Self::from_toml(BUILTIN)
    }

    /// A table from TOML text, checked.
    ///
    /// # Errors
    /// When the text is not a valid table.
    pub fn from_toml(text: &str) -> Result<Self, FieldTableError> {
        let table: Self = toml::from_str(text)?;
        for (name, rule) in &table.types {
            if rule.measurements.is_empty() {
                return Err(FieldTableError::Invalid(format!(
                    "type {name} makes no measurement"
                )));
            }
            for m in &rule.measurements {
                if m.components.iter().all(|c| c.optional) {
                    return Err(FieldTableError::Invalid(format!(
                        "{name}/{} needs a required component",
                        m.data_type
                    )));
                }
            }
        }
        Ok(table)
    }

    /// The Omron types whose data types `allows` lets through, in table order.
    pub fn types_allowed(&self, allows: impl Fn(&str) -> bool) -> Vec<&str> {
        self.types
            .iter()
            .filter(|(_, r)| r.measurements.iter().any(|m| allows(&m.data_type)))
            .map(|(t, _)| t.as_str())
            .collect()
    }
}

/// What a normalization produced and what it skipped, by reason and detail.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalized {
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

/// An item's instant: epoch ms, the local date and the UTC offset in seconds when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemTime {
    pub epoch_ms: i64,
    pub local_date: jiff::civil::Date,
    pub utc_offset_seconds: Option<i32>,
}

/// Parses `+HH:MM`, `-HH:MM`, `+HHMM`, `+HH` or `Z` into seconds east of UTC.
#[must_use]
pub fn parse_offset(text: &str) -> Option<i32> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (
            digits[..2].parse::<i32>().ok()?,
            digits[2..].parse::<i32>().ok()?,
        ),
        _ => return None,
    };
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

fn civil(text: &str) -> Option<jiff::civil::DateTime> {
    let t = text.trim();
    // Omron writes `2024-03-01T06:05:00`; a space separator or missing seconds are accepted.
    t.replacen(' ', "T", 1)
        .parse()
        .ok()
        .or_else(|| format!("{t}:00").replacen(' ', "T", 1).parse().ok())
}

/// The instant of an item: `dateTimeLocal` minus `dateTimeUtcOffset`, else `dateTime` as UTC.
#[must_use]
pub fn item_time(item: &Value) -> Option<ItemTime> {
    let text = |k: &str| item.get(k).and_then(Value::as_str);
    let local = text("dateTimeLocal").and_then(civil);
    let offset = text("dateTimeUtcOffset").and_then(parse_offset);
    if let (Some(local), Some(offset)) = (local, offset) {
        let tz = jiff::tz::TimeZone::fixed(jiff::tz::Offset::from_seconds(offset).ok()?);
        let zoned = local.to_zoned(tz).ok()?;
        return Some(ItemTime {
            epoch_ms: zoned.timestamp().as_millisecond(),
            local_date: local.date(),
            utc_offset_seconds: Some(offset),
        });
    }
    let utc = text("dateTime").and_then(civil)?;
    let zoned = utc.to_zoned(jiff::tz::TimeZone::UTC).ok()?;
    Some(ItemTime {
        epoch_ms: zoned.timestamp().as_millisecond(),
        local_date: local.map_or(utc.date(), |l| l.date()),
        utc_offset_seconds: None,
    })
}

/// An item's `id` (a number or a string).
fn item_id(item: &Value) -> Option<String> {
    match item.get("id")? {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// A number field (a JSON number or a numeric string) and the decimal places it was written
/// with.
fn number(v: &Value) -> Option<(f64, i32)> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    let value: f64 = text.parse().ok()?;
    if !value.is_finite() || text.contains(['e', 'E']) {
        return value.is_finite().then_some((value, 0));
    }
    let places = text.split_once('.').map_or(0, |(_, f)| f.len());
    Some((value, i32::try_from(places).unwrap_or(0)))
}

/// A yes/no flag: 0/1, true/false, or their strings.
fn flag(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Number(n) => n.as_f64().map(|x| if x == 0.0 { 0.0 } else { 1.0 }),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "false" | "no" => Some(0.0),
            "1" | "true" | "yes" => Some(1.0),
            _ => None,
        },
        _ => None,
    }
}

/// Why a component could not be read.
enum Miss {
    /// The field is absent or null.
    Absent,
    /// The field or its unit cannot be read.
    Invalid(&'static str),
}

fn component(item: &Value, rule: &ComponentRule) -> Result<Component, Miss> {
    let raw = item
        .get(&rule.field)
        .filter(|v| !v.is_null())
        .ok_or(Miss::Absent)?;
    let unit = match rule
        .unit_field
        .as_deref()
        .and_then(|f| item.get(f))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        Some(text) => rule
            .units
            .get(text)
            .cloned()
            .ok_or(Miss::Invalid("unknown_unit"))?,
        None => rule.unit.clone(),
    };
    let (value, decimals) = if rule.flag {
        (flag(raw).ok_or(Miss::Invalid("invalid_value"))?, 0)
    } else {
        let (v, d) = number(raw).ok_or(Miss::Invalid("invalid_value"))?;
        if v < 0.0 {
            return Err(Miss::Invalid("invalid_value"));
        }
        (v, d)
    };
    Ok(Component {
        code: rule.code.clone(),
        value,
        unit,
        decimals: Some(decimals),
    })
}

/// The device of an item: Omron names the model (`deviceType`) and no serial, so the model is
/// the device's id (two monitors of one model are one Device).
fn device(item: &Value) -> Option<Device> {
    let model = item.get("deviceType")?.as_str()?.trim();
    (!model.is_empty()).then(|| Device {
        device_id: model.to_owned(),
        model: Some(model.to_owned()),
        model_id: None,
        manufacturer: None,
    })
}

/// Normalizes the items of one Omron `omron_type` for the user of `ctx`: one Measurement per
/// item and rule whose data type `policy` allows; the rest is counted in `skipped`. Items are
/// deduplicated on `id` (daily types: on the local date, the latest item winning).
#[must_use]
pub fn normalize(
    omron_type: &str,
    rule: &TypeRule,
    items: &[Value],
    ctx: &Context,
    policy: &Policy,
) -> Normalized {
    let mut out = Normalized::default();
    // key → (instant, measurements of the item); a later item of a key replaces an earlier.
    let mut by_key: BTreeMap<String, (i64, Vec<Measurement>)> = BTreeMap::new();
    let user = &ctx.provider_user_id;
    for item in items {
        let Some(id) = item_id(item) else {
            out.skip("missing_id", omron_type);
            continue;
        };
        let Some(time) = item_time(item) else {
            out.skip("invalid_time", omron_type);
            continue;
        };
        let (key, start, end) = if rule.daily {
            let day = time.local_date;
            let span = day
                .tomorrow()
                .ok()
                .zip(
                    time.utc_offset_seconds
                        .map_or(Some(jiff::tz::TimeZone::UTC), |s| {
                            jiff::tz::Offset::from_seconds(s)
                                .ok()
                                .map(jiff::tz::TimeZone::fixed)
                        }),
                )
                .and_then(|(next, tz)| {
                    let a = day.to_zoned(tz.clone()).ok()?;
                    let b = next.to_zoned(tz).ok()?;
                    Some((
                        a.timestamp().as_millisecond(),
                        b.timestamp().as_millisecond(),
                    ))
                });
            let Some((start, end)) = span else {
                out.skip("invalid_time", omron_type);
                continue;
            };
            (day.to_string(), start, Some(end))
        } else {
            (id.clone(), time.epoch_ms, None)
        };
        let mut made = Vec::new();
        for m in &rule.measurements {
            if !policy.allows(&m.data_type) {
                out.skip("disabled_data_type", &m.data_type);
                continue;
            }
            let mut components = Vec::new();
            let mut failed = None;
            for c in &m.components {
                match component(item, c) {
                    Ok(v) => components.push(v),
                    Err(Miss::Absent) if c.optional => {}
                    Err(Miss::Absent) => {
                        failed = Some("missing_field");
                        break;
                    }
                    Err(Miss::Invalid(why)) => {
                        failed = Some(why);
                        break;
                    }
                }
            }
            if let Some(why) = failed {
                out.skip(why, &m.data_type);
                continue;
            }
            made.push(Measurement {
                context: ctx.clone(),
                measurement_id: format!("{NAME}:{user}:{omron_type}:{key}:{}", m.data_type),
                series_key: series_key(&ctx.patient_id, &ctx.provider, &m.data_type),
                data_type: m.data_type.clone(),
                aggregation: policy
                    .aggregation(&m.data_type, AGGREGATION_INDIVIDUAL)
                    .to_owned(),
                effective_start: start,
                effective_end: end,
                utc_offset_seconds: time.utc_offset_seconds,
                components,
                device: device(item),
                entry_method: Some("device".to_owned()),
                provider_group_id: Some(id.clone()),
                provider_modified_at: None,
                fetched_through: None,
                status: None,
                waveform: None,
            });
        }
        match by_key.get(&key) {
            Some((seen, _)) if *seen > time.epoch_ms => out.skip("duplicate_item", omron_type),
            Some(_) => {
                out.skip("duplicate_item", omron_type);
                by_key.insert(key, (time.epoch_ms, made));
            }
            None => {
                by_key.insert(key, (time.epoch_ms, made));
            }
        }
    }
    out.measurements = by_key.into_values().flat_map(|(_, m)| m).collect();
    out.measurements.sort_by(|a, b| {
        (a.effective_start, &a.measurement_id).cmp(&(b.effective_start, &b.measurement_id))
    });
    out
}

#[cfg(test)]
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
            link_id: "link".into(),
            provider_user_id: "omr-1".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn table() -> FieldTable {
        FieldTable::builtin().unwrap()
    }

    fn run(t: &str, items: Value) -> Normalized {
        let table = table();
        let items = items.as_array().unwrap().clone();
        normalize(t, &table.types[t], &items, &ctx(), &Policy::default())
    }

    /// The documented blood-pressure item (providers.md §3.1), verbatim.
    fn documented_bp() -> Value {
        json!({"id":123456789,"dateTime":"2024-03-01T14:05:00","dateTimeLocal":"2024-03-01T06:05:00",
               "dateTimeUtcOffset":"-08:00","systolic":128,"diastolic":82,"bloodPressureUnits":"mmHg",
               "pulse":67,"pulseUnits":"bpm","deviceType":"HEM-7600T"})
    }

    #[test]
    fn test_builtin_table_covers_the_five_types() {
        let t = table();
        let names: Vec<&str> = t.types.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "activity",
                "bloodpressure",
                "oxygen",
                "temperature",
                "weight"
            ]
        );
        assert_eq!(t.types["bloodpressure"].list_key, "bloodPressure");
    }

    #[test]
    fn test_documented_blood_pressure_item_becomes_panel_and_pulse() {
        let n = run("bloodpressure", json!([documented_bp()]));
        assert!(n.skipped.is_empty(), "{:?}", n.skipped);
        assert_eq!(n.measurements.len(), 2);
        let bp = n
            .measurements
            .iter()
            .find(|m| m.data_type == "blood_pressure")
            .unwrap();
        // 06:05 at -08:00 is 14:05 UTC
        assert_eq!(bp.effective_start, 1_709_301_900_000);
        assert_eq!(bp.utc_offset_seconds, Some(-8 * 3600));
        assert_eq!(
            bp.measurement_id,
            "omron:omr-1:bloodpressure:123456789:blood_pressure"
        );
        assert_eq!(bp.series_key, "pat/omron/blood_pressure");
        let codes: Vec<(&str, f64, &str)> = bp
            .components
            .iter()
            .map(|c| (c.code.as_str(), c.value, c.unit.as_str()))
            .collect();
        assert_eq!(
            codes,
            [("systolic", 128.0, "mm[Hg]"), ("diastolic", 82.0, "mm[Hg]")]
        );
        assert_eq!(
            bp.device.as_ref().unwrap().model.as_deref(),
            Some("HEM-7600T")
        );
        assert_eq!(bp.provider_group_id.as_deref(), Some("123456789"));
        let hr = n
            .measurements
            .iter()
            .find(|m| m.data_type == "heart_rate")
            .unwrap();
        assert_eq!(
            (hr.components[0].value, hr.components[0].unit.as_str()),
            (67.0, "/min")
        );
        assert_eq!(hr.effective_start, bp.effective_start);
    }

    #[test]
    fn test_irregular_heartbeat_flag_is_a_component_when_present() {
        let mut item = documented_bp();
        item["irregularHB"] = json!(1);
        let n = run("bloodpressure", json!([item]));
        let bp = n
            .measurements
            .iter()
            .find(|m| m.data_type == "blood_pressure")
            .unwrap();
        let flag = bp
            .components
            .iter()
            .find(|c| c.code == "irregular_heartbeat")
            .unwrap();
        assert_eq!((flag.value, flag.unit.as_str()), (1.0, "1"));
        let mut item = documented_bp();
        item["irregularHB"] = json!("0");
        let n = run("bloodpressure", json!([item]));
        let bp = n
            .measurements
            .iter()
            .find(|m| m.data_type == "blood_pressure")
            .unwrap();
        assert_eq!(bp.components.len(), 3);
        assert_eq!(bp.components[2].value, 0.0);
    }

    #[test]
    fn test_duplicate_ids_of_overlapping_pages_make_one_measurement() {
        let n = run("bloodpressure", json!([documented_bp(), documented_bp()]));
        assert_eq!(n.measurements.len(), 2, "one panel and one pulse");
        assert_eq!(
            n.skipped[&("duplicate_item".into(), "bloodpressure".into())],
            1
        );
    }

    #[test]
    fn test_missing_pulse_skips_only_the_heart_rate() {
        let mut item = documented_bp();
        item.as_object_mut().unwrap().remove("pulse");
        let n = run("bloodpressure", json!([item]));
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(n.measurements[0].data_type, "blood_pressure");
        assert_eq!(n.skipped[&("missing_field".into(), "heart_rate".into())], 1);
    }

    #[test]
    fn test_unknown_unit_and_bad_values_are_counted_not_guessed() {
        let mut kpa = documented_bp();
        kpa["bloodPressureUnits"] = json!("cmH2O");
        let mut text = documented_bp();
        text["id"] = json!(2);
        text["systolic"] = json!("high");
        let n = run("bloodpressure", json!([kpa, text]));
        assert!(n.measurements.iter().all(|m| m.data_type == "heart_rate"));
        assert_eq!(
            n.skipped[&("unknown_unit".into(), "blood_pressure".into())],
            1
        );
        assert_eq!(
            n.skipped[&("invalid_value".into(), "blood_pressure".into())],
            1
        );
    }

    #[test]
    fn test_offset_missing_falls_back_to_utc_date_time() {
        let mut item = documented_bp();
        item.as_object_mut().unwrap().remove("dateTimeUtcOffset");
        let n = run("bloodpressure", json!([item]));
        assert_eq!(n.measurements[0].effective_start, 1_709_301_900_000);
        assert_eq!(n.measurements[0].utc_offset_seconds, None);
        let n = run(
            "bloodpressure",
            json!([{"id": 5, "systolic": 1, "diastolic": 1}]),
        );
        assert_eq!(
            n.skipped[&("invalid_time".into(), "bloodpressure".into())],
            1
        );
        let n = run(
            "bloodpressure",
            json!([{"dateTime": "2024-03-01T14:05:00"}]),
        );
        assert_eq!(n.skipped[&("missing_id".into(), "bloodpressure".into())], 1);
    }

    #[test]
    fn test_offsets_parse_in_every_spelling() {
        assert_eq!(parse_offset("-08:00"), Some(-28_800));
        assert_eq!(parse_offset("+05:30"), Some(19_800));
        assert_eq!(parse_offset("+0100"), Some(3_600));
        assert_eq!(parse_offset("+09"), Some(32_400));
        assert_eq!(parse_offset("Z"), Some(0));
        assert_eq!(parse_offset("08:00"), None);
        assert_eq!(parse_offset("+15:00"), None);
        assert_eq!(parse_offset("+ab:cd"), None);
    }

    #[test]
    fn test_activity_is_one_daily_total_per_local_day_latest_item_wins() {
        let day = |id: i64, time: &str, steps: i64| {
            json!({"id": id, "dateTime": format!("2024-03-01T{time}"), "dateTimeLocal": format!("2024-03-01T{time}"),
                   "dateTimeUtcOffset": "+01:00", "steps": steps, "aerobicSteps": 100, "calories": 300,
                   "caloriesUnits": "kcal", "distance": 3.2, "distanceUnits": "km", "deviceType": "HJ-325T"})
        };
        let n = run(
            "activity",
            json!([day(7, "20:00:00", 8000), day(8, "12:00:00", 4000)]),
        );
        assert_eq!(n.measurements.len(), 1);
        let m = &n.measurements[0];
        assert_eq!(
            m.measurement_id,
            "omron:omr-1:activity:2024-03-01:daily_steps"
        );
        assert_eq!(m.components[0].value, 8000.0, "the later item of the day");
        assert_eq!(
            (m.components[0].unit.as_str(), m.components[0].decimals),
            ("/d", Some(0))
        );
        // the local day 2024-03-01 at +01:00
        assert_eq!(m.effective_start, 1_709_247_600_000);
        assert_eq!(m.effective_end, Some(1_709_247_600_000 + 86_400_000));
    }

    #[test]
    fn test_weight_temperature_oxygen_units_and_decimals_as_written() {
        // Parsed from text, as the client does: the number keeps the digits it was sent with.
        let items: Value = serde_json::from_str(
            r#"[{"id": "w1", "dateTime": "2024-03-01T07:00:00", "dateTimeLocal": "2024-03-01T08:00:00",
                 "dateTimeUtcOffset": "+01:00", "weight": 160.40, "weightUnits": "lbs",
                 "bodyFatPercentage": "21.3", "bmi": 23.1, "deviceType": "HBF-702T"}]"#,
        )
        .unwrap();
        let w = run("weight", items);
        let kinds: Vec<(&str, f64, &str, Option<i32>)> = w
            .measurements
            .iter()
            .map(|m| {
                (
                    m.data_type.as_str(),
                    m.components[0].value,
                    m.components[0].unit.as_str(),
                    m.components[0].decimals,
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("body_fat_percentage", 21.3, "%", Some(1)),
                ("body_mass_index", 23.1, "kg/m2", Some(1)),
                ("body_weight", 160.4, "[lb_av]", Some(2)),
            ]
        );
        let t = run(
            "temperature",
            json!([{"id": 9, "dateTime": "2024-03-01T07:00:00", "dateTimeLocal": "2024-03-01T08:00:00",
                    "dateTimeUtcOffset": "+01:00", "temperature": 98.6, "temperatureUnits": "F"}]),
        );
        assert_eq!(t.measurements[0].components[0].unit, "[degF]");
        assert_eq!(t.measurements[0].device, None);
        let o = run(
            "oxygen",
            json!([{"id": 3, "dateTime": "2024-03-01T07:00:00", "dateTimeLocal": "2024-03-01T08:00:00",
                    "dateTimeUtcOffset": "+01:00", "oxygenSaturation": 97, "oxygenSaturationUnits": "%",
                    "pulse": 64, "pulseUnits": "bpm"}]),
        );
        let types: Vec<&str> = o
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(types, ["heart_rate", "oxygen_saturation"]);
        assert_ne!(
            o.measurements[0].measurement_id,
            run("bloodpressure", json!([documented_bp()])).measurements[1].measurement_id
        );
    }

    #[test]
    fn test_policy_disabled_data_type_is_not_produced() {
        let policy = Policy::resolve(
            &crate::policy::PolicyDoc::from_json(&json!({"disabled_data_types": ["heart_rate"]}))
                .unwrap(),
            &Default::default(),
            Default::default(),
        );
        let table = table();
        let n = normalize(
            "bloodpressure",
            &table.types["bloodpressure"],
            &[documented_bp()],
            &ctx(),
            &policy,
        );
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(n.measurements[0].data_type, "blood_pressure");
        assert_eq!(
            table.types_allowed(|d| d != "daily_steps"),
            ["bloodpressure", "oxygen", "temperature", "weight"]
        );
    }

    #[test]
    fn test_table_without_a_required_component_is_refused() {
        let text = r#"
[types.x]
list_key = "x"
scope = "x"
[[types.x.measurements]]
data_type = "d"
components = [{ code = "value", field = "v", unit = "1", optional = true }]
"#;
        assert!(matches!(
            FieldTable::from_toml(text),
            Err(FieldTableError::Invalid(_))
        ));
        assert!(matches!(
            FieldTable::from_toml("types = 1"),
            Err(FieldTableError::Parse(_))
        ));
    }
}
