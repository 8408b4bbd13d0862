//! Pure normalization of Withings answers into ohx [`Measurement`]s.
//!
//! No I/O: input is a decoded answer of [`crate::withings`], the record [`Context`] (filled by
//! the caller; `context.provider_user_id` must be the Withings `userid`, it is part of every
//! `measurement_id`) and the user's fallback UTC offset.
//!
//! Mapping (`providers.md` §1.4, §1.6): `getmeas` types as the measure table says
//! ([`super::measures`], `measures.toml`): data type, component, UCUM unit and decimal
//! places; a panel (blood pressure) joins its types of one group. Measurement ids are
//! `withings:{userid}:{grpid}:{type}` (a panel: `…:{panel id}`, e.g. `…:bp`), and for intraday
//! heart rate (HOURLY) `withings:{userid}:hr:{epoch}:{deviceid|none}`.
//!
//! `attrib` decides who measured: 1 (the device is not sure the reading is this user's) is
//! held back and counted, never put into this patient's chart; 2 and 4 (typed in by the user)
//! are `manual`, without a device; everything else is a device reading.
//!
//! # Time zones
//!
//! `utc_offset_seconds` is the offset of the answer's IANA `timezone` at the sample's instant,
//! computed with `jiff` and its embedded tz database (see `Cargo.toml` for why), so results do
//! not depend on the host's `/usr/share/zoneinfo`. Without a usable time zone name the caller's
//! fallback offset is used. The UTC instant (`effective_start`) never depends on the zone.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use ohx_common::records::{
    AGGREGATION_HOURLY, AGGREGATION_INDIVIDUAL, Component, Context, DATA_TYPE_DEVICE, Device,
    Measurement, Waveform, series_key,
};

use super::client::{
    ActivityDay, CATEGORY_OBJECTIVE, HeartRecording, HeartSignal, IntradayResponse, Measure,
    MeasureGroup, MeasureResponse, SleepNight, SleepSegment, UserDevice,
};
use super::measures::{DailyRule, HeartRule, HypnogramRule, IntradayRule, MeasureTable, SleepRule};
use crate::policy::Policy;

/// `measurement_id` prefix and manufacturer name.
pub const PROVIDER_WITHINGS: &str = "withings";
const MANUFACTURER_WITHINGS: &str = "Withings";

/// Data type of heart rate (spot and intraday).
pub const DATA_TYPE_HEART_RATE: &str = "heart_rate";
/// UCUM unit of heart rate.
pub const UNIT_PER_MINUTE: &str = "/min";
/// Component code of scalar values.
pub const COMPONENT_VALUE: &str = "value";

/// `attrib`: the device is not sure the reading is this user's.
pub const ATTRIB_AMBIGUOUS: i64 = 1;

/// What a normalization produced, and what it left out (for metrics).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Normalized {
    /// Measurements sorted by `effective_start`, then `measurement_id`.
    pub measurements: Vec<Measurement>,
    /// Counts of what was skipped.
    pub stats: NormalizeStats,
}

/// Counters of a normalization.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalizeStats {
    /// Measure groups read (all categories).
    pub groups: u64,
    /// Groups of category 2 (user objectives), skipped.
    pub objective_groups_skipped: u64,
    /// Measures dropped because a newer copy of the same (`grpid`, type) was present.
    pub duplicate_measures_dropped: u64,
    /// Measures of types not mapped by ohx, per Withings type.
    pub skipped_types: BTreeMap<i32, u64>,
    /// Groups with only some types of a panel, per data type (nothing emitted for it).
    pub incomplete: BTreeMap<String, u64>,
    /// Groups held back because the device was not sure they are this user's (`attrib` 1).
    pub ambiguous_groups: u64,
    /// Measures of one body segment or placement (with a `position`), skipped.
    pub segmental_measures: u64,
    /// Values of a data type the policy does not allow (never asked for; counted if sent).
    pub disabled: u64,
    /// Values that decode to a non-finite or non-positive number (skipped).
    pub invalid_values: u64,
    /// Intraday entries with none of the fields asked for (skipped).
    pub entries_without_value: u64,
    /// ECG recordings whose signal is missing or unusable (no samples, no sampling
    /// frequency, a sample out of range) or whose AFib result the table does not know.
    pub unusable_recordings: u64,
    /// A time zone name that is not in the tz database (the fallback offset was used).
    pub unknown_timezone: Option<String>,
}

impl NormalizeStats {
    /// Total measures skipped for their type.
    #[must_use]
    pub fn skipped_types_total(&self) -> u64 {
        self.skipped_types.values().sum()
    }
}

/// Decodes a Withings value: `value × 10^unit`.
///
/// The exact decimal `{value}e{unit}` is parsed by the standard library, which rounds
/// correctly, so the result is the `f64` nearest to the true decimal (`12100, -2` → exactly
/// `121.0`; `72450, -3` → the same `f64` as the literal `72.45`). Multiplying by
/// `10f64.powi(unit)` would add a second rounding error. `None` if the result is not finite.
#[must_use]
pub fn decode_value(value: i64, unit: i32) -> Option<f64> {
    format!("{value}e{unit}")
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

/// Maps a measure group's `attrib` to `entry_method`: 0, 8 → `device`; 1 → `device-ambiguous`
/// (held back by [`normalize_measures`]); 2, 4 → `manual`; any other code → `device`; missing →
/// `None`.
#[must_use]
pub fn entry_method(attrib: Option<i64>) -> Option<&'static str> {
    attrib.map(|a| match a {
        1 => "device-ambiguous",
        2 | 4 => "manual",
        _ => "device",
    })
}

/// The UTC offset in seconds of IANA zone `timezone` at `epoch_s`; `None` if the zone is
/// unknown or the instant out of range.
#[must_use]
pub fn utc_offset_at(timezone: &str, epoch_s: i64) -> Option<i32> {
    let tz = TimeZone::get(timezone).ok()?;
    offset_in(&tz, epoch_s)
}

fn offset_in(tz: &TimeZone, epoch_s: i64) -> Option<i32> {
    let ts = Timestamp::from_second(epoch_s).ok()?;
    Some(tz.to_offset(ts).seconds())
}

/// Resolves offsets: the named zone if known, else the fallback.
struct OffsetResolver {
    tz: Option<TimeZone>,
    fallback: Option<i32>,
}

impl OffsetResolver {
    fn new(timezone: Option<&str>, fallback: Option<i32>, stats: &mut NormalizeStats) -> Self {
        let tz = timezone
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .and_then(|name| match TimeZone::get(name) {
                Ok(tz) => Some(tz),
                Err(_) => {
                    stats.unknown_timezone = Some(name.to_owned());
                    None
                }
            });
        Self { tz, fallback }
    }

    fn offset_at(&self, epoch_s: i64) -> Option<i32> {
        self.tz
            .as_ref()
            .and_then(|tz| offset_in(tz, epoch_s))
            .or(self.fallback)
    }
}

/// Builds the device of a sample. Third-party sources synced into Withings (model ids
/// 1051–1099: HealthKit, Google Fit, Health Connect, Samsung, Huawei…) get no manufacturer,
/// since the device is not a Withings one.
fn device(device_id: Option<&str>, model: Option<&str>, model_id: Option<i64>) -> Option<Device> {
    let device_id = device_id?;
    let third_party = model_id.is_some_and(|m| (1051..=1099).contains(&m));
    Some(Device {
        device_id: device_id.to_owned(),
        model: model.map(str::to_owned),
        model_id: model_id.map(|m| m.to_string()),
        manufacturer: (!third_party).then(|| MANUFACTURER_WITHINGS.to_owned()),
    })
}

/// The decimal places of `value × 10^exponent`: `-exponent`, at least 0.
#[must_use]
pub fn decimals_of(exponent: i32) -> i32 {
    exponent.saturating_neg().max(0)
}

/// A measure's component if its value is usable (finite and positive), counting it
/// otherwise. The value is `value × 10^(unit + shift)` with the decimal places reported.
fn usable(
    m: &Measure,
    (code, unit, shift, zero_is_value): (&str, &str, i32, bool),
    stats: &mut NormalizeStats,
) -> Option<Component> {
    let exponent = m.unit.saturating_add(shift);
    let v = decode_value(m.value, exponent).filter(|v| *v > 0.0 || (zero_is_value && *v == 0.0));
    if v.is_none() {
        stats.invalid_values += 1;
    }
    Some(Component {
        code: code.to_owned(),
        value: v?,
        unit: unit.to_owned(),
        decimals: Some(decimals_of(exponent)),
    })
}

/// Which copy of a duplicated (`grpid`, type) wins: latest `modified`, then the lower
/// `attrib` (0 before 8, which mean the same), then the first in answer order.
fn is_newer(candidate: &MeasureGroup, current: &MeasureGroup) -> bool {
    let rank = |g: &MeasureGroup| {
        (
            g.modified.unwrap_or(i64::MIN),
            std::cmp::Reverse(g.attrib.unwrap_or(i64::MAX)),
        )
    };
    rank(candidate) > rank(current)
}

/// The copy of a measure chosen by deduplication, with its group.
type Chosen<'a> = (&'a MeasureGroup, &'a Measure);

/// Normalizes a `getmeas` answer as `table` says; everything else is counted in
/// [`NormalizeStats`]. `utc_offset_seconds` comes from `resp.timezone` at each group's `date`,
/// else `fallback_utc_offset_seconds`. The measures of one group share its time and device.
#[must_use]
pub fn normalize_measures(
    resp: &MeasureResponse,
    ctx: &Context,
    table: &MeasureTable,
    policy: &Policy,
    fallback_utc_offset_seconds: Option<i32>,
) -> Normalized {
    let mut stats = NormalizeStats::default();
    let offsets = OffsetResolver::new(
        resp.timezone.as_deref(),
        fallback_utc_offset_seconds,
        &mut stats,
    );

    // Dedupe by (grpid, type, position), keeping the newest copy.
    let mut by_group: BTreeMap<i64, BTreeMap<(i32, Option<i64>), Chosen<'_>>> = BTreeMap::new();
    for g in &resp.measuregrps {
        stats.groups += 1;
        if g.category == Some(i64::from(CATEGORY_OBJECTIVE)) {
            stats.objective_groups_skipped += 1;
            continue;
        }
        let slots = by_group.entry(g.grpid).or_default();
        for m in &g.measures {
            match slots.entry((m.measure_type, m.position)) {
                Entry::Vacant(slot) => {
                    slot.insert((g, m));
                }
                Entry::Occupied(mut slot) => {
                    stats.duplicate_measures_dropped += 1;
                    if is_newer(g, slot.get().0) {
                        slot.insert((g, m));
                    }
                }
            }
        }
    }

    let mut out = Vec::new();
    let user = &ctx.provider_user_id;
    for (grpid, slots) in by_group {
        // The group's own attributes come from its newest copy.
        let Some(meta) = slots
            .values()
            .map(|(g, _)| *g)
            .reduce(|a, b| if is_newer(b, a) { b } else { a })
        else {
            continue;
        };
        if meta.attrib == Some(ATTRIB_AMBIGUOUS) && !policy.accepts_ambiguous() {
            stats.ambiguous_groups += 1;
            continue;
        }
        // Panels: data type → component → chosen measure.
        let mut panels: BTreeMap<&str, BTreeMap<&str, (Chosen<'_>, i32, &str)>> = BTreeMap::new();
        for ((measure_type, position), (g, m)) in &slots {
            // A measure with a `position` is of one body segment or placement (segmental body
            // composition), not of the whole body: it is never the whole-body data type.
            if position.is_some() {
                stats.segmental_measures += 1;
                continue;
            }
            let Some(rule) = table.rule(*measure_type) else {
                *stats.skipped_types.entry(*measure_type).or_default() += 1;
                continue;
            };
            if !policy.allows(&rule.data_type) {
                stats.disabled += 1;
                continue;
            }
            if table.panel(&rule.data_type).is_some() {
                panels.entry(rule.data_type.as_str()).or_default().insert(
                    rule.component.as_str(),
                    ((g, m), rule.shift, rule.unit.as_str()),
                );
                continue;
            }
            let read = (
                rule.component.as_str(),
                rule.unit.as_str(),
                rule.shift,
                rule.zero_is_value,
            );
            let Some(c) = usable(m, read, &mut stats) else {
                continue;
            };
            out.push(group_measurement(
                ctx,
                meta,
                &offsets,
                (
                    &rule.data_type,
                    policy.aggregation(&rule.data_type, AGGREGATION_INDIVIDUAL),
                ),
                &format!("{PROVIDER_WITHINGS}:{user}:{grpid}:{measure_type}"),
                vec![c],
            ));
        }
        for (data_type, found) in panels {
            let Some(panel) = table.panel(data_type) else {
                continue;
            };
            if panel
                .components
                .iter()
                .any(|c| !found.contains_key(c.as_str()))
            {
                *stats.incomplete.entry(data_type.to_owned()).or_default() += 1;
                continue;
            }
            let components: Option<Vec<Component>> = panel
                .components
                .iter()
                .filter_map(|c| found.get(c.as_str()).map(|f| (c, f)))
                .map(|(c, ((_, m), shift, unit))| usable(m, (c, unit, *shift, false), &mut stats))
                .collect();
            let Some(components) = components else {
                continue;
            };
            out.push(group_measurement(
                ctx,
                meta,
                &offsets,
                (
                    data_type,
                    policy.aggregation(data_type, AGGREGATION_INDIVIDUAL),
                ),
                &format!("{PROVIDER_WITHINGS}:{user}:{grpid}:{}", panel.id),
                components,
            ));
        }
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

/// Normalizes intraday series: for every rule of `rules` (the plan's intraday categories),
/// one HOURLY Measurement per epoch key that has its field. The intraday answer has no time
/// zone: pass the user's IANA `timezone` if known (e.g. from the last `getmeas` answer), else
/// only the fallback offset is used.
#[must_use]
pub fn normalize_intraday(
    resp: &IntradayResponse,
    ctx: &Context,
    rules: &[&IntradayRule],
    policy: &Policy,
    timezone: Option<&str>,
    fallback_utc_offset_seconds: Option<i32>,
) -> Normalized {
    let mut stats = NormalizeStats::default();
    let offsets = OffsetResolver::new(timezone, fallback_utc_offset_seconds, &mut stats);
    let mut out = Vec::with_capacity(resp.series.len() * rules.len());
    let user = &ctx.provider_user_id;
    for (&epoch, entry) in &resp.series {
        let mut found = false;
        for rule in rules {
            let Some(&v) = entry.values.get(&rule.field) else {
                continue;
            };
            found = true;
            let usable = v.is_finite() && (v > 0.0 || rule.zero_is_value && v == 0.0);
            if !usable {
                stats.invalid_values += 1;
                continue;
            }
            let device_part = entry.deviceid.as_deref().unwrap_or("none");
            out.push(Measurement {
                context: ctx.clone(),
                measurement_id: format!(
                    "{PROVIDER_WITHINGS}:{user}:{}:{epoch}:{device_part}",
                    rule.id
                ),
                series_key: series_key(&ctx.patient_id, &ctx.provider, &rule.data_type),
                data_type: rule.data_type.clone(),
                aggregation: policy
                    .aggregation(&rule.data_type, AGGREGATION_HOURLY)
                    .to_owned(),
                effective_start: epoch.saturating_mul(1000),
                effective_end: None,
                utc_offset_seconds: offsets.offset_at(epoch),
                components: vec![component(COMPONENT_VALUE, v, &rule.unit)],
                device: device(
                    entry.deviceid.as_deref(),
                    entry.model.as_deref(),
                    entry.model_id,
                ),
                entry_method: Some("device".to_owned()),
                provider_group_id: None,
                provider_modified_at: None,
                fetched_through: None,
                status: None,
                waveform: None,
            });
        }
        if !found {
            stats.entries_without_value += 1;
        }
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

/// Normalizes `getdevice`: one device registration (data type [`DATA_TYPE_DEVICE`], no
/// components) per device with an id; its time is the device's last session, if any.
#[must_use]
pub fn normalize_devices(devices: &[UserDevice], ctx: &Context) -> Normalized {
    let mut stats = NormalizeStats::default();
    let mut out = Vec::new();
    let user = &ctx.provider_user_id;
    for d in devices {
        let Some(id) = d
            .deviceid
            .as_deref()
            .or(d.hash_deviceid.as_deref())
            .filter(|id| !id.trim().is_empty())
        else {
            stats.invalid_values += 1;
            continue;
        };
        out.push(Measurement {
            context: ctx.clone(),
            measurement_id: format!("{PROVIDER_WITHINGS}:{user}:device:{id}"),
            series_key: series_key(&ctx.patient_id, &ctx.provider, DATA_TYPE_DEVICE),
            data_type: DATA_TYPE_DEVICE.to_owned(),
            aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
            effective_start: d.last_session_date.unwrap_or(0).saturating_mul(1000),
            effective_end: None,
            utc_offset_seconds: None,
            components: Vec::new(),
            device: device(Some(id), d.model.as_deref(), d.model_id),
            entry_method: Some("device".to_owned()),
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        });
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

/// The local day `date` (`YYYY-MM-DD`) in zone `timezone` (else the fallback offset, else
/// UTC) as epoch ms `[start, end)` with the offset at its start. `None` for a malformed date.
#[must_use]
pub fn local_day(
    date: &str,
    timezone: Option<&str>,
    fallback_utc_offset_seconds: Option<i32>,
) -> Option<(i64, i64, Option<i32>)> {
    let day: jiff::civil::Date = date.trim().parse().ok()?;
    let next = day.tomorrow().ok()?;
    let tz = timezone
        .and_then(|name| TimeZone::get(name.trim()).ok())
        .or_else(|| {
            fallback_utc_offset_seconds
                .and_then(|s| jiff::tz::Offset::from_seconds(s).ok())
                .map(TimeZone::fixed)
        })
        .unwrap_or(TimeZone::UTC);
    let start = day.to_zoned(tz.clone()).ok()?;
    let end = next.to_zoned(tz).ok()?;
    Some((
        start.timestamp().as_millisecond(),
        end.timestamp().as_millisecond(),
        Some(start.offset().seconds()),
    ))
}

/// Normalizes `getactivity` rows: for every rule, one Measurement per day that has its field,
/// covering the local day (`effective_start`..`effective_end`), revised by the row's
/// `modified` (a later row of the same day is a new version of the same measurement).
#[must_use]
pub fn normalize_activity(
    days: &[ActivityDay],
    ctx: &Context,
    rules: &[&DailyRule],
    policy: &Policy,
    fallback_utc_offset_seconds: Option<i32>,
) -> Normalized {
    let mut stats = NormalizeStats::default();
    let mut out = Vec::new();
    let user = &ctx.provider_user_id;
    for day in days {
        let Some((start, end, offset)) = local_day(
            &day.date,
            day.timezone.as_deref(),
            fallback_utc_offset_seconds,
        ) else {
            stats.invalid_values += 1;
            continue;
        };
        let mut found = false;
        for rule in rules {
            let Some(&v) = day.values.get(&rule.field) else {
                continue;
            };
            found = true;
            if !(v.is_finite() && v >= 0.0) {
                stats.invalid_values += 1;
                continue;
            }
            out.push(Measurement {
                context: ctx.clone(),
                measurement_id: format!(
                    "{PROVIDER_WITHINGS}:{user}:{}:{}",
                    rule.id,
                    day.date.trim()
                ),
                series_key: series_key(&ctx.patient_id, &ctx.provider, &rule.data_type),
                data_type: rule.data_type.clone(),
                aggregation: policy
                    .aggregation(&rule.data_type, AGGREGATION_INDIVIDUAL)
                    .to_owned(),
                effective_start: start,
                effective_end: Some(end),
                utc_offset_seconds: offset,
                components: vec![Component {
                    code: COMPONENT_VALUE.to_owned(),
                    value: v,
                    unit: rule.unit.clone(),
                    decimals: Some(0),
                }],
                device: device(day.deviceid.as_deref(), day.model.as_deref(), day.modelid),
                entry_method: Some("device".to_owned()),
                provider_group_id: None,
                provider_modified_at: day.modified.map(|m| m.saturating_mul(1000)),
                fetched_through: None,
                status: None,
                waveform: None,
            });
        }
        if !found {
            stats.entries_without_value += 1;
        }
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

/// A value divided by `divisor`, with the decimal places that keep it exact up to a tenth
/// (18660 s / 60 = 311 min; 10470 s / 60 = 174.5 min).
fn divided(value: f64, divisor: f64) -> (f64, i32) {
    let v = value / divisor;
    let places = if (v - v.round()).abs() < 1e-9 { 0 } else { 1 };
    let scale = 10f64.powi(places);
    ((v * scale).round() / scale, places)
}

/// Normalizes `v2/sleep getsummary` nights: for every data type of `rules` (allowed by the
/// policy), one Measurement per night that has its value, from the night's start to its end,
/// revised by the night's `modified`.
#[must_use]
pub fn normalize_sleep(
    nights: &[SleepNight],
    ctx: &Context,
    rules: &BTreeMap<String, SleepRule>,
    policy: &Policy,
    fallback_utc_offset_seconds: Option<i32>,
) -> Normalized {
    let mut stats = NormalizeStats::default();
    let mut out = Vec::new();
    for night in nights {
        if night.enddate < night.startdate {
            stats.invalid_values += 1;
            continue;
        }
        let offsets = OffsetResolver::new(
            night.timezone.as_deref(),
            fallback_utc_offset_seconds,
            &mut stats,
        );
        for (data_type, rule) in rules {
            if !policy.allows(data_type) {
                continue;
            }
            let mut components = Vec::with_capacity(rule.parts.len());
            for part in &rule.parts {
                let Some(&raw) = night.data.get(&part.field) else {
                    continue;
                };
                if !(raw.is_finite() && raw >= 0.0) {
                    stats.invalid_values += 1;
                    continue;
                }
                let (value, places) = divided(raw, part.divisor);
                components.push(Component {
                    code: part.component.clone(),
                    value,
                    unit: part.unit.clone(),
                    decimals: Some(places),
                });
            }
            // The first part is the value: without it, no measurement of this data type.
            if components.first().is_none_or(|c| c.code != COMPONENT_VALUE) {
                continue;
            }
            let mut m = night_measurement(night, ctx, &offsets, data_type, &rule.id);
            m.aggregation = policy
                .aggregation(data_type, AGGREGATION_INDIVIDUAL)
                .to_owned();
            m.components = components;
            out.push(m);
        }
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

/// A measurement of a night (`withings:{userid}:{id}:{night id}`, INDIVIDUAL, over the
/// night, with the night's device), without values: the caller adds them.
fn night_measurement(
    night: &SleepNight,
    ctx: &Context,
    offsets: &OffsetResolver,
    data_type: &str,
    id: &str,
) -> Measurement {
    let user = &ctx.provider_user_id;
    Measurement {
        context: ctx.clone(),
        measurement_id: format!("{PROVIDER_WITHINGS}:{user}:{id}:{}", night.id),
        series_key: series_key(&ctx.patient_id, &ctx.provider, data_type),
        data_type: data_type.to_owned(),
        aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
        effective_start: night.startdate.saturating_mul(1000),
        effective_end: Some(night.enddate.saturating_mul(1000)),
        utc_offset_seconds: offsets.offset_at(night.startdate),
        components: Vec::new(),
        device: night
            .hash_deviceid
            .as_deref()
            .and_then(|d| device(Some(d), None, night.model_id)),
        entry_method: Some("device".to_owned()),
        provider_group_id: Some(night.id.clone()),
        provider_modified_at: night.modified.map(|m| m.saturating_mul(1000)),
        fetched_through: None,
        status: None,
        waveform: None,
    }
}

/// The longest hypnogram read (Withings answers at most 24 h of `v2/sleep get` per call).
const MAX_NIGHT_SECONDS: i64 = 24 * 3600;

/// A night's hypnogram: the stage at the start of every `rule.epoch_seconds` from the night's
/// start to its end (the last epoch may run past the end), as the rule's sample codes; time no
/// segment covers is `rule.unknown`. `None` (counted as an invalid value) for a night that
/// ends before it starts or lasts over 24 h, and for a night without any segment.
#[must_use]
pub fn hypnogram(
    night: &SleepNight,
    segments: &[SleepSegment],
    ctx: &Context,
    rule: &HypnogramRule,
    fallback_utc_offset_seconds: Option<i32>,
    stats: &mut NormalizeStats,
) -> Option<Measurement> {
    let length = night.enddate - night.startdate;
    if length <= 0 || length > MAX_NIGHT_SECONDS || segments.is_empty() {
        stats.invalid_values += 1;
        return None;
    }
    let epoch = i64::from(rule.epoch_seconds);
    let mut sorted: Vec<&SleepSegment> = segments.iter().collect();
    sorted.sort_by_key(|s| s.startdate);
    let mut samples = Vec::with_capacity(usize::try_from(length / epoch + 1).unwrap_or(0));
    let mut next = 0;
    let mut t = night.startdate;
    while t < night.enddate {
        while next < sorted.len() && sorted[next].enddate <= t {
            next += 1;
        }
        let code = sorted[next..]
            .iter()
            .take_while(|s| s.startdate <= t)
            .find(|s| s.enddate > t)
            .map_or(rule.unknown, |s| rule.code_of(s.state));
        samples.push(code);
        t += epoch;
    }
    let offsets = OffsetResolver::new(
        night.timezone.as_deref(),
        fallback_utc_offset_seconds,
        stats,
    );
    let mut m = night_measurement(night, ctx, &offsets, &rule.data_type, &rule.id);
    m.waveform = Some(Waveform {
        unit: UNIT_CODE.to_owned(),
        origin: 0.0,
        factor: None,
        interval: f64::from(rule.epoch_seconds),
        interval_unit: "s".to_owned(),
        samples,
        code_map: Some(rule.code_map.clone()),
    });
    Some(m)
}

/// The night's averages of the `v2/sleep get` series of `rule.averages` the policy allows:
/// the mean of the series' values (finite and positive, dated within the night) with one
/// decimal, one Measurement per data type over the night; a series without values gives
/// none.
#[must_use]
pub fn night_averages(
    night: &SleepNight,
    segments: &[SleepSegment],
    ctx: &Context,
    rule: &HypnogramRule,
    policy: &Policy,
    fallback_utc_offset_seconds: Option<i32>,
    stats: &mut NormalizeStats,
) -> Vec<Measurement> {
    let mut out = Vec::new();
    let offsets = OffsetResolver::new(
        night.timezone.as_deref(),
        fallback_utc_offset_seconds,
        stats,
    );
    for (data_type, average) in &rule.averages {
        if !policy.allows(data_type) {
            continue;
        }
        let mut seen = BTreeMap::new();
        for segment in segments {
            let Some(serde_json::Value::Object(values)) = segment.series.get(&average.field) else {
                continue;
            };
            for (epoch, value) in values {
                let (Ok(epoch), Some(value)) = (epoch.parse::<i64>(), value.as_f64()) else {
                    stats.invalid_values += 1;
                    continue;
                };
                if epoch < night.startdate || epoch >= night.enddate {
                    continue;
                }
                if !(value.is_finite() && value > 0.0) {
                    stats.invalid_values += 1;
                    continue;
                }
                // One value per epoch, however the segments overlap.
                seen.insert(epoch, value);
            }
        }
        if seen.is_empty() {
            continue;
        }
        let mean = seen.values().sum::<f64>() / seen.len() as f64;
        let mut m = night_measurement(night, ctx, &offsets, data_type, &average.id);
        m.components = vec![Component {
            code: COMPONENT_VALUE.to_owned(),
            value: (mean * 10.0).round() / 10.0,
            unit: average.unit.clone(),
            decimals: Some(1),
        }];
        out.push(m);
    }
    out
}

/// Component code of an ECG's rhythm classification (the mapping table's rhythm code).
pub const COMPONENT_RHYTHM: &str = "rhythm";
/// Component code of an ECG's average heart rate.
pub const COMPONENT_HEART_RATE: &str = "heart_rate";
/// UCUM unit of a code.
const UNIT_CODE: &str = "1";

/// ECG recordings of `v2/heart list`, each with its `v2/heart get` signal, as `ecg`
/// Measurements: the signal as a waveform in µV at 1000 / `sampling_frequency` ms, from the
/// recording's `timestamp` to the end of its last sample; the AFib result as the table's
/// rhythm code; the average heart rate where given; the recording's device. A recording
/// without ECG (stethoscope only) gives nothing; one whose signal or AFib result is unusable
/// is counted in [`NormalizeStats::unusable_recordings`].
#[must_use]
pub fn normalize_ecg(
    recordings: &[(HeartRecording, HeartSignal)],
    ctx: &Context,
    rule: &HeartRule,
    policy: &Policy,
    fallback_utc_offset_seconds: Option<i32>,
) -> Normalized {
    let mut stats = NormalizeStats::default();
    let mut out = Vec::new();
    let user = &ctx.provider_user_id;
    for (recording, signal) in recordings {
        let Some(ecg) = &recording.ecg else {
            continue;
        };
        if !policy.allows(&rule.data_type) {
            stats.disabled += 1;
            continue;
        }
        let rhythm = ecg.afib.and_then(|a| rule.rhythm_of(a));
        let frequency = signal.sampling_frequency.filter(|f| *f > 0);
        let samples: Option<Vec<i32>> = signal
            .signal
            .iter()
            .map(|s| i32::try_from(*s).ok())
            .collect();
        let (Some(rhythm), Some(frequency), Some(samples)) = (rhythm, frequency, samples) else {
            stats.unusable_recordings += 1;
            continue;
        };
        if samples.is_empty() {
            stats.unusable_recordings += 1;
            continue;
        }
        let start = recording.timestamp.saturating_mul(1000);
        // Sample count × 1000 / Hz, in whole milliseconds (rounded up: the end covers the
        // last sample).
        let length = (i64::try_from(samples.len())
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
            .saturating_add(frequency - 1))
            / frequency;
        let mut components = vec![component(COMPONENT_RHYTHM, rhythm as f64, UNIT_CODE)];
        if let Some(rate) = recording.heart_rate.filter(|r| *r > 0) {
            components.push(component(
                COMPONENT_HEART_RATE,
                rate as f64,
                UNIT_PER_MINUTE,
            ));
        }
        let offsets = OffsetResolver::new(
            recording.timezone.as_deref(),
            fallback_utc_offset_seconds,
            &mut stats,
        );
        out.push(Measurement {
            context: ctx.clone(),
            measurement_id: format!("{PROVIDER_WITHINGS}:{user}:{}:{}", rule.id, ecg.signalid),
            series_key: series_key(&ctx.patient_id, &ctx.provider, &rule.data_type),
            data_type: rule.data_type.clone(),
            aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
            effective_start: start,
            effective_end: Some(start.saturating_add(length)),
            utc_offset_seconds: offsets.offset_at(recording.timestamp),
            components,
            device: device(
                recording.deviceid.as_deref(),
                recording.model.and_then(|m| rule.model_name(m)),
                recording.model,
            ),
            entry_method: Some("device".to_owned()),
            provider_group_id: Some(ecg.signalid.clone()),
            provider_modified_at: recording.modified.map(|m| m.saturating_mul(1000)),
            fetched_through: None,
            status: None,
            waveform: Some(Waveform {
                unit: rule.unit.clone(),
                origin: 0.0,
                factor: None,
                interval: 1000.0 / frequency as f64,
                interval_unit: "ms".to_owned(),
                samples,
                code_map: None,
            }),
        });
    }
    sort(&mut out);
    Normalized {
        measurements: out,
        stats,
    }
}

fn component(code: &str, value: f64, unit: &str) -> Component {
    Component {
        code: code.to_owned(),
        value,
        unit: unit.to_owned(),
        decimals: None,
    }
}

/// A Measurement of a measure group, with its data type and aggregation.
fn group_measurement(
    ctx: &Context,
    g: &MeasureGroup,
    offsets: &OffsetResolver,
    (data_type, aggregation): (&str, &str),
    measurement_id: &str,
    components: Vec<Component>,
) -> Measurement {
    let method = entry_method(g.attrib);
    // A value typed in by the user was measured by no device.
    let device = match method {
        Some("manual") => None,
        _ => device(g.device_id(), g.model.as_deref(), g.model_id()),
    };
    Measurement {
        context: ctx.clone(),
        measurement_id: measurement_id.to_owned(),
        series_key: series_key(&ctx.patient_id, &ctx.provider, data_type),
        data_type: data_type.to_owned(),
        aggregation: aggregation.to_owned(),
        effective_start: g.date.saturating_mul(1000),
        effective_end: None,
        utc_offset_seconds: offsets.offset_at(g.date),
        components,
        device,
        entry_method: method.map(str::to_owned),
        provider_group_id: Some(g.grpid.to_string()),
        provider_modified_at: g.modified.map(|m| m.saturating_mul(1000)),
        fetched_through: None,
        status: None,
        waveform: None,
    }
}

fn sort(out: &mut [Measurement]) {
    out.sort_by(|a, b| {
        (a.effective_start, &a.measurement_id).cmp(&(b.effective_start, &b.measurement_id))
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::withings::client::MeasurePage;

    fn norm(resp: &MeasureResponse, ctx: &Context, fallback: Option<i32>) -> Normalized {
        normalize_measures(
            resp,
            ctx,
            &MeasureTable::builtin().unwrap(),
            &Policy::default(),
            fallback,
        )
    }

    fn ctx() -> Context {
        Context {
            organization_id: "org".into(),
            ehr_target_id: "ehr".into(),
            patient_id: "p1".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: "link".into(),
            provider_user_id: "363".into(),
            sync_request_id: "sr".into(),
            trigger: "WEBHOOK".into(),
            received_at: 1,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    /// Parses a `getmeas` body the way the client does (one page).
    fn resp(body: &str) -> MeasureResponse {
        let page: MeasurePage = serde_json::from_str(body).unwrap();
        MeasureResponse {
            updatetime: page.updatetime,
            timezone: page.timezone,
            measuregrps: page.measuregrps,
        }
    }

    fn find<'a>(n: &'a Normalized, id: &str) -> &'a Measurement {
        n.measurements
            .iter()
            .find(|m| m.measurement_id == id)
            .unwrap_or_else(|| panic!("no {id} in {:#?}", n.measurements))
    }

    fn values(m: &Measurement) -> Vec<(&str, f64, &str)> {
        m.components
            .iter()
            .map(|c| (c.code.as_str(), c.value, c.unit.as_str()))
            .collect()
    }

    const BPM_CONNECT: &str = r#"{"measuregrps":[{
        "grpid": 2726388728, "attrib": 17, "date": 1620039631, "created": 1620237692,
        "modified": 1620237692, "category": 1,
        "deviceid": "91a7e556c2022ef54dca6e07a853c3193734d148",
        "hash_deviceid": "91a7e556c2022ef54dca6e07a853c3193734d148",
        "measures": [
          {"value": 10600, "type": 9,  "unit": -2, "algo": 0, "fm": 128},
          {"value": 14300, "type": 10, "unit": -2, "algo": 0, "fm": 128},
          {"value": 8200,  "type": 11, "unit": -2, "algo": 0, "fm": 128}
        ],
        "modelid": 45, "model": "BPM Connect", "comment": null}]}"#;

    const BPM_CORE: &str = r#"{"updatetime":1690491663,"timezone":"Europe/Berlin","measuregrps":[
        {"grpid":4716596696,"attrib":0,"date":1690491576,"created":1690491663,"modified":1690491663,"category":1,
         "deviceid":"c405eb8e0e053f6601e151c7e43c04e29aad6956","hash_deviceid":"c405eb8e0e053f6601e151c7e43c04e29aad6956",
         "measures":[{"value":89,"type":9,"unit":0,"algo":0,"fm":3},{"value":109,"type":10,"unit":0,"algo":0,"fm":3},
                     {"value":88,"type":11,"unit":0,"algo":0,"fm":3}],
         "modelid":44,"model":"BPM Core","comment":null}]}"#;

    // ---- value decoding ----

    #[test]
    fn test_decode_value_units() {
        assert_eq!(decode_value(89, 0), Some(89.0));
        assert_eq!(decode_value(12100, -2), Some(121.0));
        assert_eq!(decode_value(72450, -3), Some(72.45));
        assert_eq!(decode_value(118003, -3), Some(118.003));
        assert_eq!(decode_value(20, -1), Some(2.0));
        assert_eq!(decode_value(5, 2), Some(500.0));
        assert_eq!(decode_value(-5, -1), Some(-0.5));
        assert_eq!(decode_value(0, -3), Some(0.0));
        assert_eq!(decode_value(1, -400), Some(0.0));
        assert_eq!(decode_value(1, 400), None);
    }

    #[test]
    fn test_decode_value_has_no_float_drift() {
        // Every value with up to 3 decimals decodes to the literal's f64.
        for mantissa in (0..200_000_i64).step_by(7) {
            let want: f64 = format!("{}.{:03}", mantissa / 1000, mantissa % 1000)
                .parse()
                .unwrap();
            assert_eq!(decode_value(mantissa, -3), Some(want), "{mantissa}");
        }
    }

    // ---- real examples ----

    #[test]
    fn test_bpm_connect_unit_minus_2_example() {
        let n = norm(&resp(BPM_CONNECT), &ctx(), Some(3600));
        assert_eq!(n.measurements.len(), 2);
        let bp = find(&n, "withings:363:2726388728:bp");
        assert_eq!(
            values(bp),
            vec![
                ("systolic", 143.0, "mm[Hg]"),
                ("diastolic", 106.0, "mm[Hg]")
            ]
        );
        assert_eq!(bp.data_type, "blood_pressure");
        assert_eq!(bp.aggregation, AGGREGATION_INDIVIDUAL);
        assert_eq!(bp.series_key, "p1/withings/blood_pressure");
        assert_eq!(bp.effective_start, 1_620_039_631_000);
        assert_eq!(bp.effective_end, None);
        assert_eq!(bp.provider_group_id.as_deref(), Some("2726388728"));
        assert_eq!(bp.provider_modified_at, Some(1_620_237_692_000));
        assert_eq!(bp.entry_method.as_deref(), Some("device")); // attrib 17
        // No timezone in this answer: the fallback offset.
        assert_eq!(bp.utc_offset_seconds, Some(3600));
        assert_eq!(
            bp.device,
            Some(Device {
                device_id: "91a7e556c2022ef54dca6e07a853c3193734d148".into(),
                model: Some("BPM Connect".into()),
                model_id: Some("45".into()),
                manufacturer: Some("Withings".into()),
            })
        );
        assert_eq!(bp.context, ctx());

        let hr = find(&n, "withings:363:2726388728:11");
        assert_eq!(values(hr), vec![("value", 82.0, "/min")]);
        assert_eq!(hr.data_type, "heart_rate");
        assert_eq!(hr.aggregation, AGGREGATION_INDIVIDUAL);
        assert_eq!(hr.series_key, "p1/withings/heart_rate");
        assert_eq!(
            n.stats,
            NormalizeStats {
                groups: 1,
                ..NormalizeStats::default()
            }
        );
    }

    #[test]
    fn test_bpm_core_unit_0_example_with_timezone() {
        let n = norm(&resp(BPM_CORE), &ctx(), Some(0));
        let bp = find(&n, "withings:363:4716596696:bp");
        assert_eq!(
            values(bp),
            vec![("systolic", 109.0, "mm[Hg]"), ("diastolic", 89.0, "mm[Hg]")]
        );
        // July in Europe/Berlin: CEST.
        assert_eq!(bp.utc_offset_seconds, Some(7200));
        assert_eq!(bp.effective_start, 1_690_491_576_000);
        let hr = find(&n, "withings:363:4716596696:11");
        assert_eq!(values(hr), vec![("value", 88.0, "/min")]);
        assert_eq!(hr.device.as_ref().unwrap().model_id.as_deref(), Some("44"));
    }

    #[test]
    fn test_weight_unit_minus_3() {
        let n = norm(
            &resp(
                r#"{"timezone":"Europe/Berlin","measuregrps":[{"grpid":77,"attrib":0,"date":1700000000,"modified":1700000001,
                "category":1,"deviceid":"scale","measures":[{"value":118003,"type":1,"unit":-3}],"modelid":5,"model":"Body+"}]}"#,
            ),
            &ctx(),
            None,
        );
        assert_eq!(n.measurements.len(), 1);
        let w = find(&n, "withings:363:77:1");
        assert_eq!(values(w), vec![("value", 118.003, "kg")]);
        assert_eq!(w.data_type, "body_weight");
        assert_eq!(w.series_key, "p1/withings/body_weight");
        assert_eq!(w.aggregation, AGGREGATION_INDIVIDUAL);
        // November in Europe/Berlin: CET.
        assert_eq!(w.utc_offset_seconds, Some(3600));
    }

    #[test]
    fn test_same_type_with_different_units() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":1,"date":10,"measures":[{"value":12100,"type":10,"unit":-2},{"value":80,"type":9,"unit":0}]},
                {"grpid":2,"date":20,"measures":[{"value":121,"type":10,"unit":0},{"value":8000,"type":9,"unit":-2}]}]}"#,
            ),
            &ctx(),
            None,
        );
        let a = find(&n, "withings:363:1:bp");
        let b = find(&n, "withings:363:2:bp");
        assert_eq!(values(a), values(b));
        assert_eq!(values(a)[0].1, 121.0);
        assert_eq!(values(a)[1].1, 80.0);
    }

    // ---- devices and entry methods ----

    #[test]
    fn test_deviceid_null_int_and_string() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":1,"attrib":2,"date":10,"deviceid":null,"hash_deviceid":null,"measures":[{"value":80,"type":1,"unit":0}],"comment":null},
                {"grpid":2,"attrib":0,"date":20,"deviceid":14546187,"measures":[{"value":80,"type":1,"unit":0}],"probability":100},
                {"grpid":3,"attrib":8,"date":30,"deviceid":"abc","model":"Body+","modelid":5,"measures":[{"value":80,"type":1,"unit":0,"apppfmid":9}]}]}"#,
            ),
            &ctx(),
            None,
        );
        let manual = find(&n, "withings:363:1:1");
        assert_eq!(manual.device, None);
        assert_eq!(manual.entry_method.as_deref(), Some("manual"));
        let int_id = find(&n, "withings:363:2:1");
        assert_eq!(int_id.device.as_ref().unwrap().device_id, "14546187");
        assert_eq!(int_id.device.as_ref().unwrap().model, None);
        let s = find(&n, "withings:363:3:1");
        assert_eq!(s.device.as_ref().unwrap().device_id, "abc");
        assert_eq!(s.entry_method.as_deref(), Some("device"));
    }

    #[test]
    fn test_entry_method_mapping() {
        assert_eq!(entry_method(Some(0)), Some("device"));
        assert_eq!(entry_method(Some(8)), Some("device"));
        assert_eq!(entry_method(Some(1)), Some("device-ambiguous"));
        assert_eq!(entry_method(Some(2)), Some("manual"));
        assert_eq!(entry_method(Some(4)), Some("manual"));
        assert_eq!(entry_method(Some(5)), Some("device"));
        assert_eq!(entry_method(Some(17)), Some("device"));
        assert_eq!(entry_method(None), None);
    }

    #[test]
    fn test_third_party_model_has_no_withings_manufacturer() {
        let d = device(Some("x"), Some("Google Health Connect"), Some(1060)).unwrap();
        assert_eq!(d.manufacturer, None);
        let d = device(Some("x"), Some("ScanWatch"), Some(93)).unwrap();
        assert_eq!(d.manufacturer.as_deref(), Some("Withings"));
        assert_eq!(device(None, Some("ScanWatch"), Some(93)), None);
    }

    // ---- duplicates, splits, skips ----

    #[test]
    fn test_duplicate_grpid_keeps_latest_modified() {
        // The same group twice (attrib 0 and 8), the second edited later.
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":5,"attrib":0,"date":100,"modified":200,"deviceid":"d","measures":[
                    {"value":14300,"type":10,"unit":-2},{"value":9000,"type":9,"unit":-2},{"value":70,"type":11,"unit":0}]},
                {"grpid":5,"attrib":8,"date":100,"modified":300,"deviceid":"d","measures":[
                    {"value":140,"type":10,"unit":0},{"value":91,"type":9,"unit":0},{"value":71,"type":11,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        assert_eq!(n.measurements.len(), 2);
        let bp = find(&n, "withings:363:5:bp");
        assert_eq!(values(bp)[0].1, 140.0);
        assert_eq!(values(bp)[1].1, 91.0);
        assert_eq!(bp.provider_modified_at, Some(300_000));
        assert_eq!(bp.entry_method.as_deref(), Some("device"));
        assert_eq!(values(find(&n, "withings:363:5:11"))[0].1, 71.0);
        assert_eq!(n.stats.duplicate_measures_dropped, 3);
    }

    #[test]
    fn test_duplicate_grpid_same_modified_prefers_attrib_0_regardless_of_order() {
        let a = r#"{"grpid":5,"attrib":8,"date":100,"modified":200,"measures":[{"value":80,"type":1,"unit":0}]}"#;
        let b = r#"{"grpid":5,"attrib":0,"date":100,"modified":200,"measures":[{"value":81,"type":1,"unit":0}]}"#;
        let n1 = norm(
            &resp(&format!(r#"{{"measuregrps":[{a},{b}]}}"#)),
            &ctx(),
            None,
        );
        let n2 = norm(
            &resp(&format!(r#"{{"measuregrps":[{b},{a}]}}"#)),
            &ctx(),
            None,
        );
        assert_eq!(n1, n2);
        assert_eq!(values(&n1.measurements[0])[0].1, 81.0);
    }

    #[test]
    fn test_ids_deterministic_and_order_independent() {
        let body = r#"{"timezone":"America/New_York","measuregrps":[
            {"grpid":2,"attrib":0,"date":200,"modified":1,"deviceid":"d","measures":[{"value":80,"type":1,"unit":0}]},
            {"grpid":1,"attrib":0,"date":100,"modified":1,"deviceid":"d","measures":[{"value":120,"type":10,"unit":0},{"value":80,"type":9,"unit":0}]}]}"#;
        let r = resp(body);
        let a = norm(&r, &ctx(), None);
        let b = norm(&r, &ctx(), None);
        assert_eq!(a, b);
        let mut reversed = r.clone();
        reversed.measuregrps.reverse();
        assert_eq!(norm(&reversed, &ctx(), None), a);
        let ids: Vec<&str> = a
            .measurements
            .iter()
            .map(|m| m.measurement_id.as_str())
            .collect();
        assert_eq!(ids, vec!["withings:363:1:bp", "withings:363:2:1"]);
        // 1970-01-01 in New York: EST.
        assert_eq!(a.measurements[0].utc_offset_seconds, Some(-18000));
    }

    #[test]
    fn test_bp_with_only_one_side_is_incomplete() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":1,"date":10,"measures":[{"value":120,"type":10,"unit":0},{"value":60,"type":11,"unit":0}]},
                {"grpid":2,"date":20,"measures":[{"value":80,"type":9,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        assert_eq!(n.stats.incomplete.get("blood_pressure"), Some(&2));
        let ids: Vec<&str> = n
            .measurements
            .iter()
            .map(|m| m.measurement_id.as_str())
            .collect();
        assert_eq!(ids, vec!["withings:363:1:11"]);
    }

    #[test]
    fn test_bp_merges_sides_from_duplicate_groups() {
        // Systolic only in one copy, diastolic only in the other: one BP from both.
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":9,"attrib":0,"date":10,"modified":5,"measures":[{"value":120,"type":10,"unit":0}]},
                {"grpid":9,"attrib":8,"date":10,"modified":6,"measures":[{"value":80,"type":9,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        assert!(n.stats.incomplete.is_empty());
        let bp = find(&n, "withings:363:9:bp");
        assert_eq!(
            values(bp),
            vec![("systolic", 120.0, "mm[Hg]"), ("diastolic", 80.0, "mm[Hg]")]
        );
        assert_eq!(bp.provider_modified_at, Some(6000));
    }

    #[test]
    fn test_systolic_component_comes_first() {
        let n = norm(&resp(BPM_CORE), &ctx(), None);
        let bp = find(&n, "withings:363:4716596696:bp");
        assert_eq!(bp.components[0].code, "systolic");
        assert_eq!(bp.components[1].code, "diastolic");
    }

    #[test]
    fn test_objectives_and_unknown_types_are_skipped_and_counted() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":1,"date":10,"category":2,"measures":[{"value":70,"type":1,"unit":0}]},
                {"grpid":2,"date":10,"category":1,"measures":[{"value":70,"type":1,"unit":0},{"value":900,"type":170,"unit":-2},
                    {"value":1650,"type":226,"unit":0},{"value":950,"type":170,"unit":-2,"position":12},
                    {"value":2100,"type":6,"unit":-2,"position":12}]}]}"#,
            ),
            &ctx(),
            None,
        );
        assert_eq!(n.measurements.len(), 1);
        assert_eq!(n.measurements[0].measurement_id, "withings:363:2:1");
        assert_eq!(n.stats.groups, 2);
        assert_eq!(n.stats.objective_groups_skipped, 1);
        // visceral fat (170) and BMR (226) have no ohx data type
        assert_eq!(n.stats.skipped_types, BTreeMap::from([(170, 1), (226, 1)]));
        assert_eq!(n.stats.skipped_types_total(), 2);
        // a torso fat ratio is not the body's
        assert_eq!(n.stats.segmental_measures, 2);
        assert_eq!(n.stats.duplicate_measures_dropped, 0);
    }

    #[test]
    fn test_non_positive_values_are_invalid() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":1,"date":10,"measures":[{"value":0,"type":1,"unit":0}]},
                {"grpid":2,"date":10,"measures":[{"value":120,"type":10,"unit":0},{"value":-1,"type":9,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        assert!(n.measurements.is_empty());
        assert_eq!(n.stats.invalid_values, 2);
    }

    #[test]
    fn test_empty_answer() {
        let n = norm(&MeasureResponse::default(), &ctx(), None);
        assert_eq!(n, Normalized::default());
    }

    // ---- time zones ----

    #[test]
    fn test_utc_offset_follows_dst() {
        // 2024-01-15 and 2024-07-15, 12:00 UTC.
        assert_eq!(utc_offset_at("Europe/Berlin", 1_705_320_000), Some(3600));
        assert_eq!(utc_offset_at("Europe/Berlin", 1_721_044_800), Some(7200));
        assert_eq!(
            utc_offset_at("America/New_York", 1_721_044_800),
            Some(-14400)
        );
        assert_eq!(utc_offset_at("Asia/Kolkata", 1_721_044_800), Some(19800));
        assert_eq!(utc_offset_at("UTC", 0), Some(0));
        assert_eq!(utc_offset_at("Mars/Olympus", 0), None);
    }

    #[test]
    fn test_dst_transition_instant() {
        // 2024-03-31 01:00:00 UTC: Europe/Berlin switches from +1 to +2.
        assert_eq!(utc_offset_at("Europe/Berlin", 1_711_846_799), Some(3600));
        assert_eq!(utc_offset_at("Europe/Berlin", 1_711_846_800), Some(7200));
    }

    #[test]
    fn test_unknown_timezone_uses_fallback_and_is_reported() {
        let mut r = resp(BPM_CORE);
        r.timezone = Some("Not/AZone".into());
        let n = norm(&r, &ctx(), Some(-3600));
        assert!(
            n.measurements
                .iter()
                .all(|m| m.utc_offset_seconds == Some(-3600))
        );
        assert_eq!(n.stats.unknown_timezone.as_deref(), Some("Not/AZone"));
        // The UTC instant is unaffected.
        assert_eq!(n.measurements[0].effective_start, 1_690_491_576_000);
        let n = norm(&r, &ctx(), None);
        assert!(
            n.measurements
                .iter()
                .all(|m| m.utc_offset_seconds.is_none())
        );
    }

    // ---- intraday ----

    fn intraday(body: &str) -> IntradayResponse {
        serde_json::from_str(body).unwrap()
    }

    fn hr_only(
        r: &IntradayResponse,
        ctx: &Context,
        tz: Option<&str>,
        fallback: Option<i32>,
    ) -> Normalized {
        let table = MeasureTable::builtin().unwrap();
        normalize_intraday(
            r,
            ctx,
            &[table.intraday("heart_rate").unwrap()],
            &Policy::default(),
            tz,
            fallback,
        )
    }

    #[test]
    fn test_intraday_steps_and_spo2_from_one_answer() {
        let table = MeasureTable::builtin().unwrap();
        let rules: Vec<&IntradayRule> = ["heart_rate", "steps", "spo2"]
            .iter()
            .map(|c| table.intraday(c).unwrap())
            .collect();
        let r = intraday(
            r#"{"series":{
              "1712720400":{"deviceid":"w","model":"ScanWatch","model_id":93,"heart_rate":62,"steps":0},
              "1712720460":{"deviceid":"w","model":"ScanWatch","model_id":93,"steps":14,"duration":60,"spo2_auto":97},
              "1712720520":{"deviceid":"w","duration":60}}}"#,
        );
        let n = normalize_intraday(&r, &ctx(), &rules, &Policy::default(), Some("UTC"), None);
        // 0 steps is a value (a still minute), never a gap
        let still = find(&n, "withings:363:steps:1712720400:w");
        assert_eq!(
            (still.data_type.as_str(), values(still)),
            ("steps", vec![("value", 0.0, "{steps}")])
        );
        assert_eq!(still.series_key, "p1/withings/steps");
        assert_eq!(still.aggregation, AGGREGATION_HOURLY);
        let walk = find(&n, "withings:363:steps:1712720460:w");
        assert_eq!(values(walk), vec![("value", 14.0, "{steps}")]);
        let spo2 = find(&n, "withings:363:spo2:1712720460:w");
        assert_eq!(
            (spo2.data_type.as_str(), values(spo2)),
            ("oxygen_saturation", vec![("value", 97.0, "%")])
        );
        assert_eq!(n.measurements.len(), 4);
        // an entry with none of the fields asked for (duration only)
        assert_eq!(n.stats.entries_without_value, 1);
        // a zero heart rate is no reading
        let r = intraday(r#"{"series":{"1712720400":{"deviceid":"w","heart_rate":0}}}"#);
        let n = normalize_intraday(&r, &ctx(), &rules, &Policy::default(), None, None);
        assert!(n.measurements.is_empty());
        assert_eq!(n.stats.invalid_values, 1);
    }

    #[test]
    fn test_intraday_heart_rate_mapping() {
        let r = intraday(
            r#"{"series":{
              "1712720400":{"deviceid":"8923","model":"ScanWatch","model_id":93,"heart_rate":62},
              "1712720460":{"deviceid":"8923","model":"ScanWatch","model_id":93,"steps":14,"duration":60,"heart_rate":71},
              "1712720520":{"deviceid":"8923","model":"ScanWatch","model_id":93,"steps":3},
              "1712720580":{"deviceid":null,"heart_rate":64.5},
              "1712720640":{"deviceid":"8923","heart_rate":0}}}"#,
        );
        let n = hr_only(&r, &ctx(), Some("Europe/Paris"), Some(0));
        assert_eq!(n.measurements.len(), 3);
        assert_eq!(n.stats.entries_without_value, 1);
        assert_eq!(n.stats.invalid_values, 1);

        let m = find(&n, "withings:363:hr:1712720400:8923");
        assert_eq!(m.data_type, "heart_rate");
        assert_eq!(m.aggregation, AGGREGATION_HOURLY);
        assert_eq!(m.series_key, "p1/withings/heart_rate");
        assert_eq!(m.effective_start, 1_712_720_400_000);
        assert_eq!(m.effective_end, None);
        assert_eq!(m.utc_offset_seconds, Some(7200));
        assert_eq!(values(m), vec![("value", 62.0, "/min")]);
        assert_eq!(
            m.device,
            Some(Device {
                device_id: "8923".into(),
                model: Some("ScanWatch".into()),
                model_id: Some("93".into()),
                manufacturer: Some("Withings".into()),
            })
        );
        assert_eq!(m.entry_method.as_deref(), Some("device"));
        assert_eq!(m.provider_group_id, None);
        assert_eq!(m.provider_modified_at, None);

        let none = find(&n, "withings:363:hr:1712720580:none");
        assert_eq!(none.device, None);
        assert_eq!(values(none)[0].1, 64.5);

        let starts: Vec<i64> = n.measurements.iter().map(|m| m.effective_start).collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn test_intraday_without_timezone_uses_fallback() {
        let r = intraday(r#"{"series":{"1712720400":{"deviceid":"d","heart_rate":62}}}"#);
        let n = hr_only(&r, &ctx(), None, Some(-25200));
        assert_eq!(n.measurements[0].utc_offset_seconds, Some(-25200));
        let n = hr_only(&r, &ctx(), None, None);
        assert_eq!(n.measurements[0].utc_offset_seconds, None);
    }

    #[test]
    fn test_intraday_ids_are_deterministic() {
        let r = intraday(
            r#"{"series":{"1712720460":{"deviceid":"d","heart_rate":71},"1712720400":{"deviceid":"d","heart_rate":62}}}"#,
        );
        let a = hr_only(&r, &ctx(), Some("UTC"), None);
        let b = hr_only(&r, &ctx(), Some("UTC"), None);
        assert_eq!(a, b);
        let ids: Vec<&str> = a
            .measurements
            .iter()
            .map(|m| m.measurement_id.as_str())
            .collect();
        assert_eq!(
            ids,
            vec![
                "withings:363:hr:1712720400:d",
                "withings:363:hr:1712720460:d"
            ]
        );
    }

    /// A Body Cardio weigh-in: every body-composition type of one group, shaped as `getmeas`
    /// answers it (mixed `unit` exponents, the scale's pulse in the same group).
    const BODY_CARDIO: &str = r#"{"timezone":"Europe/Paris","measuregrps":[{
        "grpid": 5100, "attrib": 0, "date": 1700000000, "created": 1700000060, "modified": 1700000060,
        "category": 1, "deviceid": "scale-1", "hash_deviceid": "scale-1", "modelid": 6, "model": "Body Cardio",
        "measures": [
            {"value": 500000, "type": 1, "unit": -4},
            {"value": 180, "type": 4, "unit": -2},
            {"value": 41250, "type": 5, "unit": -3},
            {"value": 1750, "type": 6, "unit": -2},
            {"value": 8750, "type": 8, "unit": -3},
            {"value": 3910, "type": 76, "unit": -2},
            {"value": 2805, "type": 77, "unit": -2},
            {"value": 205, "type": 88, "unit": -2},
            {"value": 712, "type": 91, "unit": -2},
            {"value": 64, "type": 11, "unit": 0}
        ]}]}"#;

    fn decimals(m: &Measurement) -> Vec<Option<i32>> {
        m.components.iter().map(|c| c.decimals).collect()
    }

    #[test]
    fn test_body_composition_of_one_weigh_in_shares_time_and_device() {
        let n = norm(&resp(BODY_CARDIO), &ctx(), None);
        let expect: [(&str, &str, f64, &str, i32); 10] = [
            ("1", "body_weight", 50.0, "kg", 4),
            ("4", "body_height", 180.0, "cm", 0),
            ("5", "fat_free_mass", 41.25, "kg", 3),
            ("6", "body_fat_percentage", 17.5, "%", 2),
            ("8", "fat_mass", 8.75, "kg", 3),
            ("76", "muscle_mass", 39.1, "kg", 2),
            ("77", "body_water_mass", 28.05, "kg", 2),
            ("88", "bone_mass", 2.05, "kg", 2),
            ("91", "pulse_wave_velocity", 7.12, "m/s", 2),
            ("11", "heart_rate", 64.0, "/min", 0),
        ];
        assert_eq!(n.measurements.len(), expect.len());
        for (ty, data_type, value, unit, places) in expect {
            let m = find(&n, &format!("withings:363:5100:{ty}"));
            assert_eq!(m.data_type, data_type, "type {ty}");
            assert_eq!(m.series_key, format!("p1/withings/{data_type}"));
            assert_eq!(values(m), vec![("value", value, unit)], "type {ty}");
            assert_eq!(decimals(m), vec![Some(places)], "type {ty}");
            assert_eq!(m.effective_start, 1_700_000_000_000);
            assert_eq!(m.utc_offset_seconds, Some(3600));
            assert_eq!(
                m.device.as_ref().map(|d| d.device_id.as_str()),
                Some("scale-1")
            );
            assert_eq!(m.entry_method.as_deref(), Some("device"));
        }
        assert_eq!(n.stats.skipped_types_total(), 0);
    }

    #[test]
    fn test_temperatures_and_spo2_units() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[
                {"grpid":7,"date":10,"attrib":0,"measures":[{"value":3680,"type":71,"unit":-2},{"value":3325,"type":73,"unit":-2},{"value":369,"type":12,"unit":-1}]},
                {"grpid":8,"date":20,"attrib":0,"measures":[{"value":97,"type":54,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        let body = find(&n, "withings:363:7:71");
        assert_eq!(
            (body.data_type.as_str(), values(body)),
            ("body_temperature", vec![("value", 36.8, "Cel")])
        );
        let skin = find(&n, "withings:363:7:73");
        assert_eq!(
            (skin.data_type.as_str(), values(skin)),
            ("skin_temperature", vec![("value", 33.25, "Cel")])
        );
        let temp = find(&n, "withings:363:7:12");
        assert_eq!(
            (temp.data_type.as_str(), decimals(temp)),
            ("body_temperature", vec![Some(1)])
        );
        let spo2 = find(&n, "withings:363:8:54");
        assert_eq!(
            (spo2.data_type.as_str(), values(spo2)),
            ("oxygen_saturation", vec![("value", 97.0, "%")])
        );
    }

    #[test]
    fn test_ecg_intervals_in_milliseconds() {
        let n = norm(
            &resp(
                r#"{"measuregrps":[{"grpid":9,"date":10,"attrib":0,"measures":[
                {"value":96,"type":135,"unit":0},{"value":162,"type":136,"unit":0},
                {"value":388,"type":137,"unit":0},{"value":412,"type":138,"unit":0}]}]}"#,
            ),
            &ctx(),
            None,
        );
        for (ty, data_type, v) in [
            (135, "qrs_duration", 96.0),
            (136, "pr_interval", 162.0),
            (137, "qt_interval", 388.0),
            (138, "qtc_interval", 412.0),
        ] {
            let m = find(&n, &format!("withings:363:9:{ty}"));
            assert_eq!(
                (m.data_type.as_str(), values(m)),
                (data_type, vec![("value", v, "ms")])
            );
        }
    }

    #[test]
    fn test_ambiguous_reading_is_held_back_and_counted() {
        let body = BODY_CARDIO.replace(r#""attrib": 0"#, r#""attrib": 1"#);
        let n = norm(&resp(&body), &ctx(), None);
        assert!(n.measurements.is_empty(), "{:#?}", n.measurements);
        assert_eq!(n.stats.ambiguous_groups, 1);
    }

    #[test]
    fn test_policy_accepts_ambiguous_drops_disabled_and_sets_aggregation() {
        use crate::policy::PolicyDoc;
        let doc: PolicyDoc = serde_json::from_value(serde_json::json!({
            "ambiguous_readings": "accept",
            "disabled_data_types": ["fat_mass"],
            "aggregation": {"body_weight": "HOURLY"}
        }))
        .unwrap();
        let policy = Policy::resolve(&doc, &PolicyDoc::default(), BTreeMap::new());
        let body = BODY_CARDIO.replace(r#""attrib": 0"#, r#""attrib": 1"#);
        let table = MeasureTable::builtin().unwrap();
        let n = normalize_measures(&resp(&body), &ctx(), &table, &policy, None);
        assert_eq!(n.stats.ambiguous_groups, 0);
        assert_eq!(n.stats.disabled, 1);
        assert!(n.measurements.iter().all(|m| m.data_type != "fat_mass"));
        let w = find(&n, "withings:363:5100:1");
        assert_eq!(w.aggregation, AGGREGATION_HOURLY);
        assert_eq!(w.entry_method.as_deref(), Some("device-ambiguous"));
        assert_eq!(
            find(&n, "withings:363:5100:6").aggregation,
            AGGREGATION_INDIVIDUAL
        );
    }

    #[test]
    fn test_manual_entries_are_patient_reported_without_device() {
        for attrib in [2, 4] {
            let body = BODY_CARDIO.replace(r#""attrib": 0"#, &format!(r#""attrib": {attrib}"#));
            let n = norm(&resp(&body), &ctx(), None);
            let w = find(&n, "withings:363:5100:1");
            assert_eq!(w.entry_method.as_deref(), Some("manual"), "attrib {attrib}");
            assert_eq!(w.device, None, "attrib {attrib}");
        }
    }

    #[test]
    fn test_decimals_follow_the_reported_exponent_and_shift() {
        assert_eq!(decimals_of(-4), 4);
        assert_eq!(decimals_of(0), 0);
        assert_eq!(decimals_of(2), 0);
        // height 1.805 m (unit -3) is 180.5 cm: one place after the shift of 2
        let n = norm(
            &resp(
                r#"{"measuregrps":[{"grpid":3,"date":10,"attrib":0,"measures":[{"value":1805,"type":4,"unit":-3}]}]}"#,
            ),
            &ctx(),
            None,
        );
        let h = find(&n, "withings:363:3:4");
        assert_eq!(values(h), vec![("value", 180.5, "cm")]);
        assert_eq!(decimals(h), vec![Some(1)]);
    }

    // ---- daily activity ----

    fn days(body: &str) -> Vec<ActivityDay> {
        let page: crate::withings::client::ActivityPage = serde_json::from_str(body).unwrap();
        page.activities
    }

    #[test]
    fn test_local_day_follows_the_zone_and_its_dst() {
        // 2026-03-29: Europe/Paris springs forward, a 23-hour day starting at +01:00.
        let (s, e, off) = local_day("2026-03-29", Some("Europe/Paris"), None).unwrap();
        assert_eq!(off, Some(3600));
        assert_eq!(e - s, 23 * crate::progress::HOUR_MS);
        assert_eq!(s, 1_774_738_800_000); // 2026-03-28T23:00:00Z
        // no zone: the fallback offset, else UTC
        let (s, e, off) = local_day("2026-03-29", None, Some(-18_000)).unwrap();
        assert_eq!((e - s, off), (24 * crate::progress::HOUR_MS, Some(-18_000)));
        assert_eq!(local_day("2026-03-29", None, None).unwrap().2, Some(0));
        assert!(local_day("29/03/2026", None, None).is_none());
    }

    #[test]
    fn test_daily_steps_one_per_day_revised_by_modified() {
        let table = MeasureTable::builtin().unwrap();
        let rule = table.daily("daily_steps").unwrap();
        let d = days(
            r#"{"activities":[
              {"steps":1209,"distance":1028.559,"calories":85.497,"deviceid":null,"timezone":"Europe/Amsterdam",
               "date":"2023-10-20","modified":1697884856,"brand":18,"modelid":1055,"model":"GoogleFit tracker","is_tracker":false},
              {"steps":0,"deviceid":"w1","timezone":"Europe/Amsterdam","date":"2023-10-21","modified":1697900000,"brand":1,"modelid":93,"model":"ScanWatch"},
              {"distance":12.0,"timezone":"Europe/Amsterdam","date":"2023-10-22","modified":1697990000}],
             "more":false,"offset":3}"#,
        );
        let n = normalize_activity(&d, &ctx(), &[rule], &Policy::default(), None);
        assert_eq!(n.measurements.len(), 2);
        assert_eq!(n.stats.entries_without_value, 1);
        let day = find(&n, "withings:363:day-steps:2023-10-20");
        assert_eq!(day.data_type, "daily_steps");
        assert_eq!(day.aggregation, AGGREGATION_INDIVIDUAL);
        assert_eq!(values(day), vec![("value", 1209.0, "/d")]);
        assert_eq!(day.effective_start, 1_697_752_800_000); // 2023-10-19T22:00:00Z (+02:00)
        assert_eq!(day.effective_end, Some(1_697_839_200_000));
        assert_eq!(day.utc_offset_seconds, Some(7200));
        assert_eq!(day.provider_modified_at, Some(1_697_884_856_000));
        assert_eq!(day.device, None, "an external source without device id");
        let still = find(&n, "withings:363:day-steps:2023-10-21");
        assert_eq!(
            values(still)[0].1,
            0.0,
            "a day without steps is a day of 0 steps"
        );
        // the same day rewritten later: the same id, a later revision
        let later = days(
            r#"{"activities":[{"steps":5400,"timezone":"Europe/Amsterdam","date":"2023-10-20","modified":1697999999}]}"#,
        );
        let m = normalize_activity(&later, &ctx(), &[rule], &Policy::default(), None);
        let revised = find(&m, "withings:363:day-steps:2023-10-20");
        assert!(revised.provider_modified_at > day.provider_modified_at);
        assert_eq!(values(revised)[0].1, 5400.0);
    }

    // ---- sleep ----

    #[test]
    fn test_sleep_summary_night_with_stages_in_minutes() {
        let table = MeasureTable::builtin().unwrap();
        let rules = table.sleep("sleep").unwrap();
        let page: crate::withings::client::SleepPage = serde_json::from_str(
            r#"{"series":[{"id":2081804182,"timezone":"Europe/Paris","model":32,"model_id":63,
             "hash_deviceid":"201d0b9a0556d6b755166b2cf8d22d3bdf0487ee",
             "startdate":1618691453,"enddate":1618713173,"date":"2021-04-18",
             "data":{"wakeupduration":3060,"wakeupcount":1,"durationtosleep":540,"remsleepduration":2400,
               "durationtowakeup":1140,"total_sleep_time":18660,"sleep_efficiency":0.86,"sleep_latency":540,
               "wakeup_latency":1140,"waso":1380,"nb_rem_episodes":1,"out_of_bed_count":0,
               "lightsleepduration":10470,"deepsleepduration":5820,"hr_average":103,"hr_min":70,"hr_max":120,
               "rr_average":14,"rr_min":10,"rr_max":20,"breathing_disturbances_intensity":9,"snoring":1080,
               "snoringepisodecount":18,"sleep_score":37,"apnea_hypopnea_index":9},
             "created":1620237476,"modified":1620237476},
             {"id":2081804183,"startdate":1618780000,"enddate":1618790000,"data":{"hr_average":61}}],
             "more":false,"offset":0}"#,
        )
        .unwrap();
        let n = normalize_sleep(&page.series, &ctx(), rules, &Policy::default(), None);
        let night = find(&n, "withings:363:sleep:2081804182");
        assert_eq!(night.data_type, "sleep_duration");
        assert_eq!(
            values(night),
            vec![
                ("value", 311.0, "min"),
                ("deep", 97.0, "min"),
                ("light", 174.5, "min"),
                ("rem", 40.0, "min"),
                ("awake", 51.0, "min"),
            ]
        );
        assert_eq!(
            decimals(night),
            vec![Some(0), Some(0), Some(1), Some(0), Some(0)]
        );
        assert_eq!(night.effective_start, 1_618_691_453_000);
        assert_eq!(night.effective_end, Some(1_618_713_173_000));
        assert_eq!(night.utc_offset_seconds, Some(7200));
        assert_eq!(night.provider_modified_at, Some(1_620_237_476_000));
        let hr = find(&n, "withings:363:sleep-hr:2081804182");
        assert_eq!(values(hr), vec![("value", 103.0, "/min")]);
        let rr = find(&n, "withings:363:sleep-rr:2081804182");
        assert_eq!(values(rr), vec![("value", 14.0, "/min")]);
        // a night with only its heart rate: no sleep duration without the total
        assert!(
            n.measurements
                .iter()
                .all(|m| m.measurement_id != "withings:363:sleep:2081804183")
        );
        find(&n, "withings:363:sleep-hr:2081804183");
        assert_eq!(n.measurements.len(), 4);
    }

    // ---- devices ----

    #[test]
    fn test_devices_become_registrations_without_components() {
        let list: crate::withings::client::DeviceList = serde_json::from_str(
            r#"{"devices":[
              {"type":"Scale","battery":"high","model":"Body+","model_id":5,"timezone":"Europe/Amsterdam",
               "first_session_date":null,"last_session_date":1693867179,"deviceid":"d5","hash_deviceid":"d5"},
              {"type":"Activity Tracker","battery":"unknown","model":"ScanWatch","model_id":93,
               "first_session_date":null,"last_session_date":null,"deviceid":null,"hash_deviceid":"w93"},
              {"type":"Scale","model":"?","deviceid":null,"hash_deviceid":null}]}"#,
        )
        .unwrap();
        let n = normalize_devices(&list.devices, &ctx());
        assert_eq!(n.measurements.len(), 2);
        assert_eq!(n.stats.invalid_values, 1, "a device without any id");
        let scale = find(&n, "withings:363:device:d5");
        assert_eq!(scale.data_type, DATA_TYPE_DEVICE);
        assert!(scale.components.is_empty());
        assert_eq!(scale.effective_start, 1_693_867_179_000);
        let d = scale.device.as_ref().unwrap();
        assert_eq!(
            (d.model.as_deref(), d.model_id.as_deref()),
            (Some("Body+"), Some("5"))
        );
        assert_eq!(d.manufacturer.as_deref(), Some("Withings"));
        let watch = find(&n, "withings:363:device:w93");
        assert_eq!(watch.device.as_ref().unwrap().device_id, "w93");
    }

    /// `v2/heart list` as research/providers.md §1.4.5 quotes a real answer, with a second
    /// recording from a BPM Core and a stethoscope-only one.
    const HEART_LIST: &str = r#"{"series":[
        {"deviceid":"sw-1","model":94,"ecg":{"signalid":557124430,"afib":0},
         "heart_rate":71,"timestamp":1752509738,"modified":1752509778},
        {"deviceid":"core-1","model":44,"ecg":{"signalid":"557124431","afib":1},
         "bloodpressure":{"diastole":80,"systole":120},
         "heart_rate":96,"timestamp":1752513338,"modified":1752513400},
        {"deviceid":"core-1","model":44,"stetho":{"signalid":99,"vhd":0},
         "timestamp":1752516938,"modified":1752516999}],
      "more":false,"offset":0}"#;

    fn heart_recordings() -> Vec<(HeartRecording, HeartSignal)> {
        let page: crate::withings::client::HeartPage = serde_json::from_str(HEART_LIST).unwrap();
        let watch: Vec<i64> = (0..9000).map(|i| (i % 50) * 8 - 200).collect();
        let core: Vec<i64> = (0..10_000).map(|i| 300 - (i % 30) * 20).collect();
        let signals = [
            serde_json::json!({"signal": watch, "sampling_frequency": 300, "wearposition": 3}),
            serde_json::json!({"signal": core, "sampling_frequency": "500", "wearposition": 0}),
            serde_json::json!({}),
        ];
        page.series
            .into_iter()
            .zip(signals)
            .map(|(r, s)| (r, serde_json::from_value(s).unwrap()))
            .collect()
    }

    fn heart_rule() -> HeartRule {
        toml::from_str::<toml::Table>(include_str!("measures.toml")).unwrap()["heart"]
            .clone()
            .try_into()
            .unwrap()
    }

    #[test]
    fn test_ecg_recordings_become_waveform_measurements_with_rhythm_and_heart_rate() {
        let recordings = heart_recordings();
        let mut zoned = recordings.clone();
        zoned[0].0.timezone = Some("Europe/Paris".into());
        let n = normalize_ecg(&zoned, &ctx(), &heart_rule(), &Policy::default(), None);
        assert_eq!(
            n.measurements.len(),
            2,
            "the stethoscope-only recording gives nothing"
        );
        assert_eq!(n.stats.unusable_recordings, 0);

        let watch = find(&n, "withings:363:ecg:557124430");
        assert_eq!(watch.data_type, "ecg");
        assert_eq!(watch.series_key, "p1/withings/ecg");
        assert_eq!(watch.effective_start, 1_752_509_738_000);
        // 9000 samples at 300 Hz: 30 s.
        assert_eq!(watch.effective_end, Some(1_752_509_768_000));
        assert_eq!(watch.utc_offset_seconds, Some(7200));
        assert_eq!(watch.provider_modified_at, Some(1_752_509_778_000));
        assert_eq!(watch.provider_group_id.as_deref(), Some("557124430"));
        assert_eq!(
            watch.components,
            [
                component(COMPONENT_RHYTHM, 1.0, "1"),
                component(COMPONENT_HEART_RATE, 71.0, "/min")
            ]
        );
        let device = watch.device.as_ref().unwrap();
        assert_eq!(device.device_id, "sw-1");
        assert_eq!(device.model.as_deref(), Some("ScanWatch"));
        assert_eq!(device.model_id.as_deref(), Some("94"));
        let w = watch.waveform.as_ref().unwrap();
        assert_eq!((w.unit.as_str(), w.interval_unit.as_str()), ("uV", "ms"));
        assert!((w.interval - 1000.0 / 300.0).abs() < 1e-12);
        let sent: Vec<i32> = recordings[0].1.signal.iter().map(|s| *s as i32).collect();
        assert_eq!(w.samples, sent);

        let core = find(&n, "withings:363:ecg:557124431");
        assert_eq!(core.components[0], component(COMPONENT_RHYTHM, 2.0, "1"));
        // 10000 samples at 500 Hz: 20 s.
        assert_eq!(core.effective_end, Some(1_752_513_358_000));
        assert_eq!(core.waveform.as_ref().unwrap().interval, 2.0);
        assert_eq!(core.utc_offset_seconds, None, "no zone, no fallback");
        assert_eq!(
            core.device.as_ref().unwrap().model.as_deref(),
            Some("BPM Core")
        );
    }

    #[test]
    fn test_unusable_ecg_recordings_are_counted_not_emitted() {
        let rule = heart_rule();
        type Breaking = fn(&mut (HeartRecording, HeartSignal));
        let breaks: [(Breaking, &str); 5] = [
            (|r| r.1.signal.clear(), "no samples"),
            (|r| r.1.sampling_frequency = None, "no frequency"),
            (|r| r.1.sampling_frequency = Some(0), "zero frequency"),
            (
                |r| r.1.signal[3] = i64::from(i32::MAX) + 1,
                "sample out of range",
            ),
            (
                |r| r.0.ecg.as_mut().unwrap().afib = Some(7),
                "unknown AFib result",
            ),
        ];
        for (breaking, what) in breaks {
            let mut recordings = heart_recordings();
            breaking(&mut recordings[0]);
            let n = normalize_ecg(&recordings, &ctx(), &rule, &Policy::default(), None);
            assert_eq!(n.stats.unusable_recordings, 1, "{what}");
            assert_eq!(
                n.measurements.len(),
                1,
                "{what}: the other recording still goes"
            );
        }
        use crate::policy::PolicyDoc;
        let doc: PolicyDoc =
            serde_json::from_value(serde_json::json!({"disabled_data_types": ["ecg"]})).unwrap();
        let policy = Policy::resolve(&doc, &PolicyDoc::default(), BTreeMap::new());
        let n = normalize_ecg(&heart_recordings(), &ctx(), &rule, &policy, None);
        assert!(n.measurements.is_empty());
        assert_eq!(n.stats.disabled, 2);
    }

    fn hypnogram_rule() -> HypnogramRule {
        MeasureTable::builtin()
            .unwrap()
            .hypnogram("sleep")
            .unwrap()
            .clone()
    }

    /// A 10-minute night: `v2/sleep get` segments shaped as aiowithings' `sleep.json` fixture
    /// (`startdate`, `enddate`, `state`, plus fields ohx does not read), out of order, with a
    /// gap, a manual state and an out-of-bed one.
    fn night_and_segments() -> (SleepNight, Vec<SleepSegment>) {
        let start = 1_618_691_453;
        let night: SleepNight = serde_json::from_value(serde_json::json!({
            "id": 2_081_804_182_i64, "timezone": "Europe/Paris", "model_id": 63,
            "hash_deviceid": "201d0b9a", "startdate": start, "enddate": start + 600,
            "modified": start + 700, "data": {}}))
        .unwrap();
        let segment = |from: i64, to: i64, state: i64| {
            serde_json::from_value::<SleepSegment>(serde_json::json!({
                "startdate": start + from, "enddate": start + to, "state": state,
                "model": "Aura Sensor V2", "model_id": 63,
                "hr": {(start + from).to_string(): 70}, "hash_deviceid": "201d0b9a"}))
            .unwrap()
        };
        let segments = vec![
            segment(120, 240, 1), // light
            segment(0, 120, 0),   // awake
            segment(240, 300, 2), // deep
            segment(300, 330, 3), // REM
            // 330..390: no segment
            segment(390, 450, 15), // out of bed
            segment(450, 480, 4),  // manual
            segment(480, 610, 3),  // REM, past the night's end
        ];
        (night, segments)
    }

    #[test]
    fn test_a_hypnogram_samples_the_stage_every_epoch_as_codes() {
        let (night, segments) = night_and_segments();
        let mut stats = NormalizeStats::default();
        let m = hypnogram(
            &night,
            &segments,
            &ctx(),
            &hypnogram_rule(),
            None,
            &mut stats,
        )
        .unwrap();
        assert_eq!(stats, NormalizeStats::default());
        assert_eq!(m.measurement_id, "withings:363:hypnogram:2081804182");
        assert_eq!(m.data_type, "sleep_hypnogram");
        assert_eq!(m.effective_start, 1_618_691_453_000);
        assert_eq!(m.effective_end, Some(1_618_692_053_000));
        assert_eq!(m.utc_offset_seconds, Some(7200));
        assert!(m.components.is_empty());
        let w = m.waveform.unwrap();
        assert_eq!(
            (w.interval, w.interval_unit.as_str(), w.unit.as_str()),
            (30.0, "s", "1")
        );
        assert_eq!(
            w.code_map.as_deref(),
            Some("https://ohx.example/fhir/ConceptMap/sleep-stage")
        );
        // 20 epochs of 30 s: awake ×4, light ×4, deep ×2, REM ×1, gap ×2, out of bed ×2,
        // manual ×1, REM ×4.
        assert_eq!(
            w.samples,
            [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 0, 0, 5, 5, 0, 4, 4, 4, 4]
        );
    }

    #[test]
    fn test_a_hypnogram_of_an_unusable_night_is_counted_not_emitted() {
        let rule = hypnogram_rule();
        let (night, segments) = night_and_segments();
        let mut stats = NormalizeStats::default();
        assert!(hypnogram(&night, &[], &ctx(), &rule, None, &mut stats).is_none());
        let mut backwards = night.clone();
        backwards.enddate = backwards.startdate;
        assert!(hypnogram(&backwards, &segments, &ctx(), &rule, None, &mut stats).is_none());
        let mut too_long = night;
        too_long.enddate = too_long.startdate + 24 * 3600 + 1;
        assert!(hypnogram(&too_long, &segments, &ctx(), &rule, None, &mut stats).is_none());
        assert_eq!(stats.invalid_values, 3);
    }

    #[test]
    fn test_the_nights_hrv_is_the_average_of_its_epochs_within_the_night() {
        let (night, mut segments) = night_and_segments();
        let s = night.startdate;
        segments[0].series.insert(
            "sdnn_1".into(),
            serde_json::json!({(s + 130).to_string(): 40, (s + 190).to_string(): 51,
                               (s + 200).to_string(): 0}),
        );
        segments[2].series.insert(
            "sdnn_1".into(),
            serde_json::json!({(s + 250).to_string(): 42.5, (s + 900).to_string(): 999}),
        );
        segments[2].series.insert(
            "rmssd".into(),
            serde_json::json!({(s + 250).to_string(): "n/a"}),
        );
        let mut stats = NormalizeStats::default();
        let rule = hypnogram_rule();
        let n = night_averages(
            &night,
            &segments,
            &ctx(),
            &rule,
            &Policy::default(),
            None,
            &mut stats,
        );
        assert_eq!(n.len(), 1, "RMSSD has no usable value: no measurement");
        let m = &n[0];
        assert_eq!(m.measurement_id, "withings:363:sleep-sdnn:2081804182");
        assert_eq!(m.data_type, "sleep_hrv_sdnn");
        // (40 + 51 + 42.5) / 3, one decimal; the epoch after the night and the 0 are left out.
        assert_eq!(values(m), vec![("value", 44.5, "ms")]);
        assert_eq!(
            (m.effective_start, m.effective_end),
            (s * 1000, Some((s + 600) * 1000))
        );
        assert_eq!(stats.invalid_values, 2, "the 0 and the text");
        use crate::policy::PolicyDoc;
        let doc: PolicyDoc =
            serde_json::from_value(serde_json::json!({"disabled_data_types": ["sleep_hrv_sdnn"]}))
                .unwrap();
        let policy = Policy::resolve(&doc, &PolicyDoc::default(), BTreeMap::new());
        let n = night_averages(&night, &segments, &ctx(), &rule, &policy, None, &mut stats);
        assert!(n.is_empty());
    }

    #[test]
    fn test_an_afib_result_of_zero_is_a_reading_not_a_gap() {
        let body = r#"{"updatetime":1752509800,"timezone":"Europe/Paris","measuregrps":[
            {"grpid":98765,"attrib":0,"date":1752509738,"created":1752509790,"modified":1752509790,
             "category":1,"deviceid":"core-1","model":"BPM Core","modelid":44,
             "measures":[{"value":0,"type":130,"unit":0,"algo":0,"fm":3},
                         {"value":96,"type":135,"unit":0,"algo":0,"fm":3}]}]}"#;
        let n = norm(&resp(body), &ctx(), None);
        assert_eq!(n.stats.invalid_values, 0);
        let afib = find(&n, "withings:363:98765:130");
        assert_eq!(afib.data_type, "afib_result");
        assert_eq!(values(afib), vec![("value", 0.0, "1")]);
        assert_eq!(
            values(find(&n, "withings:363:98765:135")),
            vec![("value", 96.0, "ms")]
        );
        // A QRS duration of 0 is still no reading.
        let zero_qrs = body.replace(r#""value":96"#, r#""value":0"#);
        let n = norm(&resp(&zero_qrs), &ctx(), None);
        assert_eq!(n.stats.invalid_values, 1);
        assert_eq!(n.measurements.len(), 1);
    }
}
