//! Pure mapping from ohx records to FHIR R5 resources (as `serde_json::Value`).
//!
//! Every function here is deterministic: the same record and table always give byte-identical
//! canonical JSON ([`canonical_json`]), because the deduplicator hashes it. Nothing about the
//! processing (times, sync request ids, triggers) goes into a resource.
//!
//! Identifiers (`{base}` = [`MapperSettings::identifier_base`] without a trailing `/`):
//!
//! | resource | `identifier.system` | `identifier.value` |
//! |---|---|---|
//! | Observation (measurement) | `{base}/sid/observation` | `{provider}-{provider_user_id}-{native id}` (see [`measurement_identifier_value`]) |
//! | Observation (aggregate) | `{base}/sid/observation` | `{provider}-{provider_user_id}-{data_type}-PT1H-{hour start, RFC 3339 UTC}` |
//! | Device | `{base}/sid/device` | `{provider}-{device_id}` |
//! | DeviceAssociation | `{base}/sid/device-association` | `{provider}-{provider_user_id}-{device_id}` |
//!
//! The logical id is [`resource_id`] of (resource type, system, value).

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use ohx_common::records::{
    AGGREGATION_HOURLY, AGGREGATION_INDIVIDUAL, Component, Context, DATA_TYPE_DEVICE, Device,
    HourlyAggregate, Measurement, STATUS_ENTERED_IN_ERROR,
};
use serde_json::{Map, Number, Value, json};
use sha2::{Digest, Sha256};

use crate::mapping::{Coding, Mapping, MeasurementEntry, Statistic, StatisticEntry, Unit};
use crate::report::{Recording, insert_waveform, linked_and_report};

/// UCUM, the system of every `Quantity.code` written here.
pub const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";

/// `Measurement.entry_method` of a value the user typed in.
pub const ENTRY_MANUAL: &str = "manual";

/// `dataAbsentReason` of a retracted Observation's value and components: the value was an
/// error (`http://terminology.hl7.org/CodeSystem/data-absent-reason`, code `error`).
const ABSENT_ERROR_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";

/// Prefix of every logical id made by [`resource_id`].
pub const ID_PREFIX: &str = "ohx-";

/// Number of hex digits of the SHA-256 kept in a logical id.
pub const ID_HASH_HEX_LEN: usize = 32;

/// One UTC hour in milliseconds.
const HOUR_MS: i64 = 3_600_000;

/// Largest offset FHIR's dateTime pattern accepts (±14:00).
const MAX_OFFSET_SECONDS: i32 = 14 * 3600;

/// Settings of a mapper deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapperSettings {
    /// Base URI of ohx's identifier namespaces, e.g. `https://ohx.example/fhir`; identifier
    /// systems are `{base}/sid/...` and `meta.source` is `{base}/source/{provider}`.
    pub identifier_base: String,
}

impl MapperSettings {
    /// Settings with a checked identifier base (see [`MapperSettings::base`]).
    pub fn new(identifier_base: impl Into<String>) -> Result<Self, MappingError> {
        let settings = Self {
            identifier_base: identifier_base.into(),
        };
        settings.base()?;
        Ok(settings)
    }

    /// The identifier base without trailing `/`; it must be an `http(s)` URI without
    /// whitespace, query, fragment or `|` (the FHIR token separator).
    pub fn base(&self) -> Result<&str, MappingError> {
        let base = self.identifier_base.trim_end_matches('/');
        let rest = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"));
        match rest {
            Some(host)
                if !host.is_empty()
                    && !base.contains(|c: char| c.is_whitespace() || "?#|".contains(c)) =>
            {
                Ok(base)
            }
            _ => Err(MappingError::InvalidSettings(
                "identifier_base must be an http(s) URI without whitespace, '?', '#' or '|'"
                    .to_owned(),
            )),
        }
    }

    /// `identifier.system` of Observations: `{base}/sid/observation`.
    pub fn observation_system(&self) -> Result<String, MappingError> {
        Ok(format!("{}/sid/observation", self.base()?))
    }

    /// `identifier.system` of Devices: `{base}/sid/device`.
    pub fn device_system(&self) -> Result<String, MappingError> {
        Ok(format!("{}/sid/device", self.base()?))
    }

    /// `identifier.system` of DeviceAssociations: `{base}/sid/device-association`.
    pub fn device_association_system(&self) -> Result<String, MappingError> {
        Ok(format!("{}/sid/device-association", self.base()?))
    }

    /// `identifier.system` of DiagnosticReports: `{base}/sid/diagnostic-report`.
    pub fn diagnostic_report_system(&self) -> Result<String, MappingError> {
        Ok(format!("{}/sid/diagnostic-report", self.base()?))
    }

    /// `meta.source` of resources from a provider: `{base}/source/{provider}`.
    pub fn source_uri(&self, provider: &str) -> Result<String, MappingError> {
        Ok(format!("{}/source/{provider}", self.base()?))
    }
}

/// Why a record could not be mapped; the caller dead-letters the record with this reason.
///
/// Messages name data types, components, units and fields, never measured values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The table has no entry for the data type.
    #[error("no {kind} mapping for data type `{data_type}`")]
    UnknownDataType {
        /// `measurement` or `aggregate`.
        kind: &'static str,
        /// The record's data type.
        data_type: String,
    },
    /// The table has no entry for the provider.
    #[error("no mapping for provider `{0}`")]
    UnknownProvider(String),
    /// The Measurement's aggregation policy is neither INDIVIDUAL nor HOURLY.
    #[error("unknown aggregation policy `{0}`")]
    UnknownAggregation(String),
    /// A component the table requires is absent.
    #[error("data type `{data_type}`: component `{component}` is missing")]
    MissingComponent {
        /// The record's data type.
        data_type: String,
        /// The missing component code.
        component: String,
    },
    /// The record has a component the table does not map (it would be lost).
    #[error("data type `{data_type}`: component `{component}` is not in the mapping table")]
    UnexpectedComponent {
        /// The record's data type.
        data_type: String,
        /// The unmapped component code.
        component: String,
    },
    /// A component code appears more than once.
    #[error("data type `{data_type}`: component `{component}` appears more than once")]
    DuplicateComponent {
        /// The record's data type.
        data_type: String,
        /// The repeated component code.
        component: String,
    },
    /// The unit is not one the table allows for this value.
    #[error("data type `{data_type}`, `{component}`: unit `{unit}` is not one of {allowed:?}")]
    UnsupportedUnit {
        /// The record's data type.
        data_type: String,
        /// The component or statistic.
        component: String,
        /// The record's unit.
        unit: String,
        /// The units the table allows.
        allowed: Vec<String>,
    },
    /// A value is NaN or infinite.
    #[error("data type `{data_type}`, `{component}`: value is not a finite number")]
    NonFiniteValue {
        /// The record's data type.
        data_type: String,
        /// The component or statistic.
        component: String,
    },
    /// A time is out of FHIR's range or inconsistent.
    #[error("invalid time: {0}")]
    InvalidTime(String),
    /// The aggregate is not a statistic of exactly one UTC hour or has a count outside 1..=2^31-1.
    #[error("invalid hourly aggregate: {0}")]
    InvalidAggregate(String),
    /// A required text field of the record is empty or malformed.
    #[error("field `{0}` is empty or contains whitespace")]
    InvalidField(&'static str),
    /// A coded component has a value the table gives no code for.
    #[error("{data_type}: component `{component}` has a value the table has no code for")]
    UnmappedCode {
        data_type: String,
        component: String,
    },
    /// The mapper settings are unusable.
    #[error("invalid mapper settings: {0}")]
    InvalidSettings(String),
}

/// A mapped FHIR resource.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedResource {
    /// `Observation`, `Device` or `DeviceAssociation`.
    pub resource_type: String,
    /// The logical id (also in `json.id`).
    pub id: String,
    /// The resource.
    pub json: Value,
}

impl MappedResource {
    /// The resource as canonical JSON (see [`canonical_json`]).
    pub fn canonical_json(&self) -> String {
        canonical_json(&self.json)
    }
}

/// Serializes JSON compactly with the keys of every object sorted (by UTF-8 bytes), independent
/// of serde_json's `preserve_order` feature; numbers and string escapes as serde_json writes them.
/// Objects whose keys already come sorted (serde_json's default map) are not sorted again, and
/// keys and scalars are written straight into the output.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(1024);
    write_canonical(value, &mut out);
    // serde_json writes UTF-8 only.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            if map.keys().is_sorted() {
                write_entries(map.iter(), out);
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                write_entries(entries.into_iter(), out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        // With `arbitrary_precision` a number is the text it was written with: copy it as is.
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Null => out.extend_from_slice(b"null"),
        Value::String(text) => write_string(text, out),
    }
}

/// A JSON string as serde_json writes it: as is between quotes unless it has a byte serde_json
/// escapes (control characters, `"` and `\\`), then through serde_json.
fn write_string(text: &str, out: &mut Vec<u8>) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

fn write_entries<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(key, out);
        out.push(b':');
        write_canonical(value, out);
    }
}

/// The logical id of a resource: `ohx-` followed by the first 32 lowercase hex digits of
/// SHA-256 over `{resource_type}|{system}|{value}` (36 characters, matching FHIR's id pattern
/// `[A-Za-z0-9\-\.]{1,64}`; the prefix keeps ids from being all digits).
pub fn resource_id(resource_type: &str, system: &str, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(resource_type)
        .chain_update("|")
        .chain_update(system)
        .chain_update("|")
        .chain_update(value)
        .finalize();
    let mut id = String::with_capacity(ID_PREFIX.len() + ID_HASH_HEX_LEN);
    id.push_str(ID_PREFIX);
    id.push_str(&hex::encode(&digest[..ID_HASH_HEX_LEN / 2]));
    id
}

/// `identifier.value` of the Observation of a Measurement:
/// `{provider}-{provider_user_id}-{native id}`, where the native id is the measurement id
/// without a leading `{provider}` and then `{provider_user_id}` (each followed by `:` or `-`),
/// so neither is repeated: the fetcher's `withings:u12345:987654322:bp` gives
/// `withings-u12345-987654322:bp`.
pub fn measurement_identifier_value(m: &Measurement) -> Result<String, MappingError> {
    let ctx = &m.context;
    require_token("context.provider", &ctx.provider)?;
    require_token("context.provider_user_id", &ctx.provider_user_id)?;
    require_text("measurement_id", &m.measurement_id)?;
    let after_provider = strip_id_part(&m.measurement_id, &ctx.provider);
    let native = strip_id_part(after_provider, &ctx.provider_user_id);
    Ok(format!(
        "{}-{}-{native}",
        ctx.provider, ctx.provider_user_id
    ))
}

/// `id` without a leading `{part}:` or `{part}-`, unless nothing would remain.
fn strip_id_part<'a>(id: &'a str, part: &str) -> &'a str {
    id.strip_prefix(part)
        .and_then(|rest| rest.strip_prefix(':').or_else(|| rest.strip_prefix('-')))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(id)
}

/// `identifier.value` of the Observation of an HourlyAggregate:
/// `{provider}-{provider_user_id}-{data_type}-PT1H-{hour start, e.g. 2025-06-01T10:00:00Z}`.
pub fn aggregate_identifier_value(a: &HourlyAggregate) -> Result<String, MappingError> {
    let ctx = &a.context;
    require_token("context.provider", &ctx.provider)?;
    require_token("context.provider_user_id", &ctx.provider_user_id)?;
    require_token("data_type", &a.data_type)?;
    Ok(format!(
        "{}-{}-{}-PT1H-{}",
        ctx.provider,
        ctx.provider_user_id,
        a.data_type,
        utc_date_time(a.hour_start)?
    ))
}

/// Whether a record's Device and DeviceAssociation are built. `Omit` leaves them out (the
/// Observation still references the Device), for a mapper that knows it would drop them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceResources {
    Build,
    Omit,
}

/// Maps a Measurement to its resources: `[Device, DeviceAssociation, Observation]` when it has a
/// device, else `[Observation]`.
///
/// Measurements with aggregation `HOURLY` belong to the hourly-aggregator: they map to no
/// resource (`Ok` with an empty list), their hour's [`map_aggregate`] carries them.
pub fn map_measurement(
    m: &Measurement,
    table: &Mapping,
    settings: &MapperSettings,
) -> Result<Vec<MappedResource>, MappingError> {
    map_measurement_with(m, table, settings, DeviceResources::Build)
}

/// [`map_measurement`], the device resources built or left out as `devices` says (a record of
/// data type `device` has nothing else, so they are always built).
pub fn map_measurement_with(
    m: &Measurement,
    table: &Mapping,
    settings: &MapperSettings,
    devices: DeviceResources,
) -> Result<Vec<MappedResource>, MappingError> {
    match m.aggregation.as_str() {
        AGGREGATION_INDIVIDUAL => {}
        AGGREGATION_HOURLY => return Ok(Vec::new()),
        other => return Err(MappingError::UnknownAggregation(other.to_owned())),
    }
    let ctx = &m.context;
    if m.data_type == DATA_TYPE_DEVICE {
        if let Some(c) = m.components.first() {
            return Err(MappingError::UnexpectedComponent {
                data_type: m.data_type.clone(),
                component: c.code.clone(),
            });
        }
        if m.device.is_none() {
            return Err(MappingError::InvalidField("device"));
        }
        if m.status.is_some() {
            // A device registration is never retracted.
            return Err(MappingError::InvalidField("status"));
        }
        return Ok(map_device(
            ctx,
            m.device.as_ref(),
            table,
            settings,
            DeviceResources::Build,
        )?
        .0);
    }
    let entry = table
        .measurement(&m.data_type)
        .ok_or_else(|| MappingError::UnknownDataType {
            kind: "measurement",
            data_type: m.data_type.clone(),
        })?;
    let retraction = m.status.is_some();
    let (mut resources, device_reference) = if retraction {
        (Vec::new(), None)
    } else {
        map_device(ctx, m.device.as_ref(), table, settings, devices)?
    };
    let recording = map_reading(m, entry, settings, device_reference.as_ref())?;
    let extra = if entry.linked.is_empty() && entry.report.is_none() {
        Vec::new()
    } else {
        let effective = ["effectivePeriod", "effectiveDateTime"]
            .into_iter()
            .find_map(|key| Some((key, recording.json.get(key)?)))
            .ok_or(MappingError::InvalidField("effective_start"))?;
        let value = recording.json["identifier"][0]["value"]
            .as_str()
            .unwrap_or_default();
        let recorded = Recording {
            id: &recording.id,
            value,
            effective,
        };
        linked_and_report(
            m,
            entry,
            table,
            settings,
            &recorded,
            device_reference.as_ref(),
        )?
    };
    resources.push(recording);
    resources.extend(extra);
    Ok(resources)
}

/// The Observation of one reading (or its retraction, see [`map_retraction`]), pointing at
/// `device`.
pub(crate) fn map_reading(
    m: &Measurement,
    entry: &MeasurementEntry,
    settings: &MapperSettings,
    device: Option<&Value>,
) -> Result<MappedResource, MappingError> {
    match m.status.as_deref() {
        None => {}
        Some(STATUS_ENTERED_IN_ERROR) => return map_retraction(m, entry, settings),
        Some(_) => return Err(MappingError::InvalidField("status")),
    }
    let (id, mut obs) = measurement_observation(m, entry, settings)?;
    if let Some(reference) = device {
        obs.insert("device".to_owned(), reference.clone());
    }
    if m.entry_method.as_deref() == Some(ENTRY_MANUAL) {
        // Typed in by the patient: patient-reported, the patient is the performer.
        obs.insert(
            "performer".to_owned(),
            json!([{ "reference": m.context.patient_reference }]),
        );
    }
    insert_measurement_values(&mut obs, m, entry)?;
    insert_waveform(&mut obs, m, entry)?;
    Ok(MappedResource {
        resource_type: "Observation".to_owned(),
        id,
        json: Value::Object(obs),
    })
}

/// A reference to a resource ohx writes: `Type/id` with the resource's identifier, so a
/// publisher writing to a server that assigns its own ids can resolve it.
pub(crate) fn reference_to(resource_type: &str, id: &str, system: &str, value: &str) -> Value {
    json!({
        "reference": format!("{resource_type}/{id}"),
        "identifier": { "system": system, "value": value },
    })
}

/// The id and the Observation of a Measurement before its values: identity, head (profile,
/// status `final`, category, code, subject) and effective time.
fn measurement_observation(
    m: &Measurement,
    entry: &MeasurementEntry,
    settings: &MapperSettings,
) -> Result<(String, Map<String, Value>), MappingError> {
    let system = settings.observation_system()?;
    let value = measurement_identifier_value(m)?;
    let id = resource_id("Observation", &system, &value);
    let mut obs = observation_skeleton(ObservationHead {
        id: &id,
        ctx: &m.context,
        settings,
        profile: entry.profile.as_deref(),
        identifier: (&system, &value),
        category: &entry.category,
        code: &entry.code,
        text: entry.text.as_deref(),
    })?;
    insert_effective(&mut obs, m)?;
    Ok((id, obs))
}

/// The Observation of a reading the provider deleted: the same id and identifier as the
/// reading's, `status` `entered-in-error`, its code, category, profile and time, and no value:
/// `dataAbsentReason` `error` where the value was, and on each required component (so a panel
/// still has the components its profile requires). No device, no performer: the record
/// carries none. The EHR keeps the reading's values in the resource's history.
fn map_retraction(
    m: &Measurement,
    entry: &MeasurementEntry,
    settings: &MapperSettings,
) -> Result<MappedResource, MappingError> {
    if let Some(c) = m.components.first() {
        return Err(MappingError::UnexpectedComponent {
            data_type: m.data_type.clone(),
            component: c.code.clone(),
        });
    }
    if m.device.is_some() {
        return Err(MappingError::InvalidField("device"));
    }
    let (id, mut obs) = measurement_observation(m, entry, settings)?;
    obs.insert("status".to_owned(), json!(STATUS_ENTERED_IN_ERROR));
    let absent = json!({ "coding": [{ "system": ABSENT_ERROR_SYSTEM, "code": "error" }] });
    let components: Vec<Value> = entry
        .components
        .iter()
        .filter(|spec| !spec.optional)
        .map(|spec| {
            let mut code = Map::new();
            code.insert("coding".to_owned(), codings_json(&spec.code));
            if let Some(text) = &spec.text {
                code.insert("text".to_owned(), json!(text));
            }
            object([
                ("code", Value::Object(code)),
                ("dataAbsentReason", absent.clone()),
            ])
        })
        .collect();
    if entry.value.is_some() || components.is_empty() {
        obs.insert("dataAbsentReason".to_owned(), absent);
    }
    if !components.is_empty() {
        obs.insert("component".to_owned(), Value::Array(components));
    }
    Ok(MappedResource {
        resource_type: "Observation".to_owned(),
        id,
        json: Value::Object(obs),
    })
}

/// Maps an HourlyAggregate to its resources: `[Device, DeviceAssociation, Observation]` when it
/// has a device, else `[Observation]`. The Observation has `effectivePeriod` = the UTC hour,
/// no value, and one `component` per statistic of the table (`count` as `valueInteger`). Its
/// `status` is `amended` when the aggregate revises an hour already emitted (`amends`), else
/// `final`; the id is the same either way.
pub fn map_aggregate(
    a: &HourlyAggregate,
    table: &Mapping,
    settings: &MapperSettings,
) -> Result<Vec<MappedResource>, MappingError> {
    map_aggregate_with(a, table, settings, DeviceResources::Build)
}

/// [`map_aggregate`], the device resources built or left out as `devices` says.
pub fn map_aggregate_with(
    a: &HourlyAggregate,
    table: &Mapping,
    settings: &MapperSettings,
    devices: DeviceResources,
) -> Result<Vec<MappedResource>, MappingError> {
    let entry = table
        .aggregate(&a.data_type)
        .ok_or_else(|| MappingError::UnknownDataType {
            kind: "aggregate",
            data_type: a.data_type.clone(),
        })?;
    if a.hour_start.rem_euclid(HOUR_MS) != 0 || a.hour_end != a.hour_start.saturating_add(HOUR_MS) {
        return Err(MappingError::InvalidAggregate(
            "hour_start/hour_end are not one whole UTC hour".to_owned(),
        ));
    }
    let ctx = &a.context;
    let (mut resources, device_reference) =
        map_device(ctx, a.device.as_ref(), table, settings, devices)?;

    let system = settings.observation_system()?;
    let value = aggregate_identifier_value(a)?;
    let id = resource_id("Observation", &system, &value);
    let mut obs = observation_skeleton(ObservationHead {
        id: &id,
        ctx,
        settings,
        profile: entry.profile.as_deref(),
        identifier: (&system, &value),
        category: &entry.category,
        code: &entry.code,
        text: entry.text.as_deref(),
    })?;
    if a.amends {
        // A revision of an hour already emitted under the same id (R5 `ObservationStatus`).
        obs.insert("status".to_owned(), json!("amended"));
    }
    obs.insert(
        "effectivePeriod".to_owned(),
        json!({ "start": utc_date_time(a.hour_start)?, "end": utc_date_time(a.hour_end)? }),
    );
    if let Some(reference) = device_reference {
        obs.insert("device".to_owned(), reference);
    }
    let unit = find_unit(&entry.units, &a.unit).ok_or_else(|| MappingError::UnsupportedUnit {
        data_type: a.data_type.clone(),
        component: "aggregate".to_owned(),
        unit: a.unit.clone(),
        allowed: entry.units.iter().map(|u| u.code.clone()).collect(),
    })?;
    if let Some(value) = &entry.value {
        let number =
            decimal(statistic_of(a, value.statistic), value.decimals).ok_or_else(|| {
                MappingError::NonFiniteValue {
                    data_type: a.data_type.clone(),
                    component: format!("{:?}", value.statistic).to_lowercase(),
                }
            })?;
        obs.insert("valueQuantity".to_owned(), quantity(number, unit));
    }
    if !entry.statistics.is_empty() {
        let components = entry
            .statistics
            .iter()
            .map(|statistic| statistic_component(a, statistic, unit))
            .collect::<Result<Vec<_>, _>>()?;
        obs.insert("component".to_owned(), Value::Array(components));
    }
    resources.push(MappedResource {
        resource_type: "Observation".to_owned(),
        id,
        json: Value::Object(obs),
    });
    Ok(resources)
}

/// The head of an Observation common to measurements and aggregates.
struct ObservationHead<'a> {
    id: &'a str,
    ctx: &'a Context,
    settings: &'a MapperSettings,
    profile: Option<&'a str>,
    identifier: (&'a str, &'a str),
    category: &'a [Coding],
    code: &'a [Coding],
    text: Option<&'a str>,
}

fn observation_skeleton(head: ObservationHead<'_>) -> Result<Map<String, Value>, MappingError> {
    let ctx = head.ctx;
    require_token("context.patient_reference", &ctx.patient_reference)?;
    let mut meta = Map::new();
    if let Some(profile) = head.profile {
        meta.insert("profile".to_owned(), json!([profile]));
    }
    meta.insert(
        "source".to_owned(),
        Value::String(head.settings.source_uri(&ctx.provider)?),
    );
    let mut code = Map::new();
    code.insert("coding".to_owned(), codings_json(head.code));
    if let Some(text) = head.text {
        code.insert("text".to_owned(), Value::String(text.to_owned()));
    }
    let mut obs = Map::new();
    obs.insert("resourceType".to_owned(), json!("Observation"));
    obs.insert("id".to_owned(), json!(head.id));
    obs.insert("meta".to_owned(), Value::Object(meta));
    obs.insert(
        "identifier".to_owned(),
        json!([{ "system": head.identifier.0, "value": head.identifier.1 }]),
    );
    obs.insert("status".to_owned(), json!("final"));
    obs.insert(
        "category".to_owned(),
        Value::Array(vec![object([("coding", codings_json(head.category))])]),
    );
    obs.insert("code".to_owned(), Value::Object(code));
    obs.insert(
        "subject".to_owned(),
        json!({ "reference": ctx.patient_reference }),
    );
    Ok(obs)
}

/// Builds the Device and DeviceAssociation of a record's device (unless `build` is `Omit`);
/// returns them with the Reference the Observation points to (`Device/{id}` and the Device's
/// identifier). The record's fields are checked either way.
fn map_device(
    ctx: &Context,
    device: Option<&Device>,
    table: &Mapping,
    settings: &MapperSettings,
    build: DeviceResources,
) -> Result<(Vec<MappedResource>, Option<Value>), MappingError> {
    let provider = table
        .provider(&ctx.provider)
        .ok_or_else(|| MappingError::UnknownProvider(ctx.provider.clone()))?;
    require_token("context.provider_user_id", &ctx.provider_user_id)?;
    let Some(device) = device else {
        return Ok((Vec::new(), None));
    };
    require_text("device.device_id", &device.device_id)?;
    require_token("context.patient_reference", &ctx.patient_reference)?;
    let source = settings.source_uri(&ctx.provider)?;

    let device_system = settings.device_system()?;
    let device_value = format!("{}-{}", ctx.provider, device.device_id);
    let device_id = resource_id("Device", &device_system, &device_value);
    // The reference names the Device's identifier too, so a publisher writing to a server that
    // assigns its own ids can point it at the server's Device (see the publisher's `refs`).
    let device_reference = json!({
        "reference": format!("Device/{device_id}"),
        "identifier": { "system": device_system, "value": device_value },
    });
    if build == DeviceResources::Omit {
        return Ok((Vec::new(), Some(device_reference)));
    }
    let manufacturer = non_empty(device.manufacturer.as_deref())
        .or_else(|| non_empty(provider.manufacturer.as_deref()));
    let model = non_empty(device.model.as_deref());

    let mut dev = Map::new();
    dev.insert("resourceType".to_owned(), json!("Device"));
    dev.insert("id".to_owned(), json!(device_id));
    dev.insert("meta".to_owned(), json!({ "source": source }));
    dev.insert(
        "identifier".to_owned(),
        json!([{ "system": device_system, "value": device_value }]),
    );
    if let Some(status) = &table.device.status {
        dev.insert("status".to_owned(), json!(status));
    }
    if let Some(manufacturer) = manufacturer {
        dev.insert("manufacturer".to_owned(), json!(manufacturer));
    }
    if let Some(model) = model {
        let display_name = match manufacturer {
            Some(manufacturer) if !model.starts_with(manufacturer) => {
                format!("{manufacturer} {model}")
            }
            _ => model.to_owned(),
        };
        dev.insert("displayName".to_owned(), json!(display_name));
        dev.insert(
            "name".to_owned(),
            json!([{ "value": model, "type": table.device.name_type }]),
        );
    }
    if let Some(model_number) = non_empty(device.model_id.as_deref()) {
        dev.insert("modelNumber".to_owned(), json!(model_number));
    }

    let association_system = settings.device_association_system()?;
    let association_value = format!(
        "{}-{}-{}",
        ctx.provider, ctx.provider_user_id, device.device_id
    );
    let association_id = resource_id("DeviceAssociation", &association_system, &association_value);
    let association = json!({
        "resourceType": "DeviceAssociation",
        "id": association_id,
        "meta": { "source": source },
        "identifier": [{ "system": association_system, "value": association_value }],
        "device": device_reference,
        "status": { "coding": codings_json(std::slice::from_ref(&table.device.association_status)) },
        "subject": { "reference": ctx.patient_reference },
    });

    Ok((
        vec![
            MappedResource {
                resource_type: "Device".to_owned(),
                id: device_id,
                json: Value::Object(dev),
            },
            MappedResource {
                resource_type: "DeviceAssociation".to_owned(),
                id: association_id,
                json: association,
            },
        ],
        Some(device_reference),
    ))
}

/// `effectiveDateTime` (or `effectivePeriod` when the record has a later end), rendered in the
/// sample's UTC offset when it is known.
fn insert_effective(obs: &mut Map<String, Value>, m: &Measurement) -> Result<(), MappingError> {
    let start = local_date_time(m.effective_start, m.utc_offset_seconds)?;
    match m.effective_end {
        Some(end) if end < m.effective_start => {
            return Err(MappingError::InvalidTime(
                "effective_end is before effective_start".to_owned(),
            ));
        }
        Some(end) if end.div_euclid(1000) > m.effective_start.div_euclid(1000) => {
            let end = local_date_time(end, m.utc_offset_seconds)?;
            obs.insert(
                "effectivePeriod".to_owned(),
                json!({ "start": start, "end": end }),
            );
        }
        _ => {
            obs.insert("effectiveDateTime".to_owned(), Value::String(start));
        }
    }
    Ok(())
}

/// `valueQuantity` or `component` of a Measurement, checked against the table: every mapped
/// component present once, no unmapped component, units allowed, values finite.
fn insert_measurement_values(
    obs: &mut Map<String, Value>,
    m: &Measurement,
    entry: &MeasurementEntry,
) -> Result<(), MappingError> {
    for (i, component) in m.components.iter().enumerate() {
        if !entry.reads(&component.code) {
            return Err(MappingError::UnexpectedComponent {
                data_type: m.data_type.clone(),
                component: component.code.clone(),
            });
        }
        if m.components[..i].iter().any(|c| c.code == component.code) {
            return Err(MappingError::DuplicateComponent {
                data_type: m.data_type.clone(),
                component: component.code.clone(),
            });
        }
    }
    let find = |source: &str| {
        m.components
            .iter()
            .find(|c| c.code == source)
            .ok_or_else(|| MappingError::MissingComponent {
                data_type: m.data_type.clone(),
                component: source.to_owned(),
            })
    };
    if let Some(value) = &entry.value {
        let component = find(&value.source)?;
        if value.codes.is_empty() {
            let quantity =
                component_quantity(&m.data_type, component, &value.units, value.decimals)?;
            obs.insert("valueQuantity".to_owned(), quantity);
        } else {
            let concept = crate::report::coded_value(&m.data_type, component, &value.codes)?;
            obs.insert("valueCodeableConcept".to_owned(), concept);
        }
    }
    if entry.components.is_empty() {
        return Ok(());
    }
    let mut out = Vec::with_capacity(entry.components.len());
    for spec in &entry.components {
        let component = match find(&spec.source) {
            Ok(c) => c,
            Err(_) if spec.optional => continue,
            Err(e) => return Err(e),
        };
        let mut code = Map::new();
        code.insert("coding".to_owned(), codings_json(&spec.code));
        if let Some(text) = &spec.text {
            code.insert("text".to_owned(), json!(text));
        }
        if spec.boolean {
            let flag = flag_value(&m.data_type, component, &spec.units)?;
            out.push(object([
                ("code", Value::Object(code)),
                ("valueBoolean", Value::Bool(flag)),
            ]));
            continue;
        }
        let quantity = component_quantity(&m.data_type, component, &spec.units, spec.decimals)?;
        out.push(object([
            ("code", Value::Object(code)),
            ("valueQuantity", quantity),
        ]));
    }
    obs.insert("component".to_owned(), Value::Array(out));
    Ok(())
}

/// A flag component's value: its unit must be allowed and its value finite; 0 is `false`.
fn flag_value(
    data_type: &str,
    component: &Component,
    units: &[Unit],
) -> Result<bool, MappingError> {
    if find_unit(units, &component.unit).is_none() {
        return Err(MappingError::UnsupportedUnit {
            data_type: data_type.to_owned(),
            component: component.code.clone(),
            unit: component.unit.clone(),
            allowed: units.iter().map(|u| u.code.clone()).collect(),
        });
    }
    if !component.value.is_finite() {
        return Err(MappingError::NonFiniteValue {
            data_type: data_type.to_owned(),
            component: component.code.clone(),
        });
    }
    Ok(component.value != 0.0)
}

fn component_quantity(
    data_type: &str,
    component: &Component,
    units: &[Unit],
    decimals: Option<u32>,
) -> Result<Value, MappingError> {
    let unit = find_unit(units, &component.unit).ok_or_else(|| MappingError::UnsupportedUnit {
        data_type: data_type.to_owned(),
        component: component.code.clone(),
        unit: component.unit.clone(),
        allowed: units.iter().map(|u| u.code.clone()).collect(),
    })?;
    // The table's rounding wins; else the places the device reported.
    let number = match (decimals, component.decimals) {
        (None, Some(places)) => reported_decimal(component.value, places),
        _ => decimal(component.value, decimals),
    }
    .ok_or_else(|| MappingError::NonFiniteValue {
        data_type: data_type.to_owned(),
        component: component.code.clone(),
    })?;
    Ok(quantity(number, unit))
}

fn statistic_component(
    a: &HourlyAggregate,
    statistic: &StatisticEntry,
    unit: &Unit,
) -> Result<Value, MappingError> {
    let code = object([(
        "coding",
        codings_json(std::slice::from_ref(&statistic.code)),
    )]);
    let value = match statistic.statistic {
        Statistic::Count => {
            let count = i32::try_from(a.count)
                .ok()
                .filter(|c| *c >= 1)
                .ok_or_else(|| {
                    MappingError::InvalidAggregate("count is not in 1..=2147483647".to_owned())
                })?;
            return Ok(object([
                ("code", code),
                ("valueInteger", Value::from(count)),
            ]));
        }
        other => statistic_of(a, other),
    };
    let number =
        decimal(value, statistic.decimals).ok_or_else(|| MappingError::NonFiniteValue {
            data_type: a.data_type.clone(),
            component: format!("{:?}", statistic.statistic).to_lowercase(),
        })?;
    Ok(object([
        ("code", code),
        ("valueQuantity", quantity(number, unit)),
    ]))
}

/// The value of a statistic of an hour (`count` as a number).
fn statistic_of(a: &HourlyAggregate, statistic: Statistic) -> f64 {
    match statistic {
        Statistic::Mean => a.mean,
        Statistic::Min => a.min,
        Statistic::Max => a.max,
        Statistic::Sum => a.sum,
        Statistic::Count => a.count as f64,
    }
}

pub(crate) fn quantity(value: Number, unit: &Unit) -> Value {
    object([
        ("value", Value::Number(value)),
        ("unit", Value::String(unit.display.clone())),
        ("system", Value::String(UCUM_SYSTEM.to_owned())),
        ("code", Value::String(unit.code.clone())),
    ])
}

/// A JSON object of these members, moved in (`json!` would copy a `Value` member through its
/// serializer).
pub(crate) fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect(),
    )
}

pub(crate) fn find_unit<'a>(units: &'a [Unit], code: &str) -> Option<&'a Unit> {
    units.iter().find(|u| u.code == code)
}

/// A FHIR decimal: rounded to `decimals` if given; integral values are written without a
/// fraction (`121`, not `121.0`); `None` for NaN and infinities.
pub(crate) fn decimal(value: f64, decimals: Option<u32>) -> Option<Number> {
    // 2^53: every integer below it is exact in f64.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if !value.is_finite() {
        return None;
    }
    let value = match decimals {
        Some(d) => {
            let scale = 10f64.powi(i32::try_from(d).ok()?);
            (value * scale).round() / scale
        }
        None => value,
    };
    if value.fract() == 0.0 && value.abs() < EXACT {
        // Integral and below 2^53 by the check above, so the cast is exact.
        return Some(Number::from(value as i64));
    }
    Number::from_f64(value)
}

/// A FHIR decimal with exactly `places` decimal places (`50.0000`): FHIR decimals carry their
/// precision in their text, and a device that reported four places measured to four places.
/// `None` for NaN and infinities; places are bounded to 0..=12.
fn reported_decimal(value: f64, places: i32) -> Option<Number> {
    if !value.is_finite() {
        return None;
    }
    let places = usize::try_from(places.clamp(0, 12)).ok()?;
    format!("{value:.places$}").parse().ok()
}

pub(crate) fn codings_json(codings: &[Coding]) -> Value {
    Value::Array(
        codings
            .iter()
            .map(|c| {
                let mut coding = Map::new();
                coding.insert("system".to_owned(), json!(c.system));
                coding.insert("code".to_owned(), json!(c.code));
                if let Some(display) = &c.display {
                    coding.insert("display".to_owned(), json!(display));
                }
                Value::Object(coding)
            })
            .collect(),
    )
}

/// An instant as FHIR dateTime in UTC with seconds precision: `2025-06-01T10:00:00Z`.
fn utc_date_time(epoch_ms: i64) -> Result<String, MappingError> {
    Ok(instant(epoch_ms)?.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// An instant as FHIR dateTime with seconds precision, in the given UTC offset
/// (`2026-11-20T08:15:00+01:00`) or in UTC (`...Z`) when the offset is unknown or not
/// representable in FHIR (not whole minutes, or beyond ±14:00).
fn local_date_time(epoch_ms: i64, offset_seconds: Option<i32>) -> Result<String, MappingError> {
    let utc = instant(epoch_ms)?;
    let offset = offset_seconds
        .filter(|s| s.rem_euclid(60) == 0 && s.abs() <= MAX_OFFSET_SECONDS)
        .and_then(FixedOffset::east_opt);
    Ok(match offset {
        Some(offset) => utc
            .with_timezone(&offset)
            .to_rfc3339_opts(SecondsFormat::Secs, false),
        None => utc.to_rfc3339_opts(SecondsFormat::Secs, true),
    })
}

/// Epoch milliseconds truncated to the second; years 1..=9999 only (FHIR's dateTime range).
fn instant(epoch_ms: i64) -> Result<DateTime<Utc>, MappingError> {
    // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, with a day of margin for offsets.
    const MIN_SECONDS: i64 = -62_135_596_800 + 86_400;
    const MAX_SECONDS: i64 = 253_402_300_799 - 86_400;
    let seconds = epoch_ms.div_euclid(1000);
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
        return Err(MappingError::InvalidTime(
            "time outside the years 0001..9999".to_owned(),
        ));
    }
    DateTime::from_timestamp(seconds, 0)
        .ok_or_else(|| MappingError::InvalidTime("time not representable".to_owned()))
}

fn non_empty(text: Option<&str>) -> Option<&str> {
    text.map(str::trim).filter(|t| !t.is_empty())
}

fn require_text(field: &'static str, text: &str) -> Result<(), MappingError> {
    if text.trim().is_empty() {
        return Err(MappingError::InvalidField(field));
    }
    Ok(())
}

fn require_token(field: &'static str, text: &str) -> Result<(), MappingError> {
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(MappingError::InvalidField(field));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::mapping::DEFAULT_TABLE_TOML;
    use crate::validate::{FhirValidator, shared_test_validator};

    const BASE: &str = "https://ohx.example/fhir";

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn ctx() -> Context {
        Context {
            organization_id: "org-1".to_owned(),
            ehr_target_id: "ehr-1".to_owned(),
            patient_id: "3f0c6f7e-5d7a-4a52-9d0e-0a8b1f0c2d11".to_owned(),
            patient_reference: "Patient/123".to_owned(),
            provider: "withings".to_owned(),
            link_id: "link-1".to_owned(),
            provider_user_id: "u12345".to_owned(),
            sync_request_id: "sync-1".to_owned(),
            trigger: "WEBHOOK".to_owned(),
            received_at: ms("2026-11-20T07:20:00Z"),
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn settings() -> MapperSettings {
        MapperSettings::new(BASE).unwrap()
    }

    fn table() -> Mapping {
        Mapping::default_table().unwrap()
    }

    fn bpm_connect() -> Device {
        Device {
            device_id: "a1b2c3d4e5".to_owned(),
            model: Some("BPM Connect".to_owned()),
            model_id: Some("44".to_owned()),
            manufacturer: Some("Withings".to_owned()),
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

    fn measurement(data_type: &str, id: &str, components: Vec<Component>) -> Measurement {
        Measurement {
            context: ctx(),
            measurement_id: id.to_owned(),
            series_key: format!("3f0c6f7e-5d7a-4a52-9d0e-0a8b1f0c2d11/{data_type}"),
            data_type: data_type.to_owned(),
            aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
            effective_start: ms("2026-11-20T07:15:00.750Z"),
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components,
            device: Some(bpm_connect()),
            entry_method: Some("device".to_owned()),
            provider_group_id: Some("987654322".to_owned()),
            provider_modified_at: Some(ms("2026-11-20T07:16:00Z")),
            fetched_through: None,
            status: None,
            waveform: None,
        }
    }

    fn bp() -> Measurement {
        measurement(
            "blood_pressure",
            "withings-987654322-bp",
            vec![
                component("systolic", 121.0, "mm[Hg]"),
                component("diastolic", 78.0, "mm[Hg]"),
            ],
        )
    }

    fn pulse() -> Measurement {
        measurement(
            "heart_rate",
            "withings-987654322-11",
            vec![component("value", 64.0, "/min")],
        )
    }

    fn weight() -> Measurement {
        let mut m = measurement(
            "body_weight",
            "withings-987654400-1",
            vec![component("value", 72.45, "kg")],
        );
        m.device = Some(Device {
            device_id: "f00dfeed".to_owned(),
            model: Some("Body+".to_owned()),
            model_id: None,
            manufacturer: Some("Withings".to_owned()),
        });
        m
    }

    fn hourly_hr() -> HourlyAggregate {
        HourlyAggregate {
            context: ctx(),
            aggregate_id: "3f0c6f7e-5d7a-4a52-9d0e-0a8b1f0c2d11/heart_rate/2025-06-01T10"
                .to_owned(),
            series_key: "3f0c6f7e-5d7a-4a52-9d0e-0a8b1f0c2d11/heart_rate".to_owned(),
            data_type: "heart_rate".to_owned(),
            unit: "/min".to_owned(),
            hour_start: ms("2025-06-01T10:00:00Z"),
            hour_end: ms("2025-06-01T11:00:00Z"),
            count: 57,
            min: 58.0,
            max: 112.0,
            mean: 71.428_571_428_571_43,
            sum: 4071.0,
            first_sample_at: ms("2025-06-01T10:00:30Z"),
            last_sample_at: ms("2025-06-01T10:59:10Z"),
            utc_offset_seconds: Some(7200),
            device: Some(Device {
                device_id: "scanwatch-001".to_owned(),
                model: Some("ScanWatch 2".to_owned()),
                model_id: Some("HWA10".to_owned()),
                manufacturer: None,
            }),
            revision: 0,
            amends: false,
        }
    }

    fn map(m: &Measurement) -> Vec<MappedResource> {
        map_measurement(m, &table(), &settings()).unwrap()
    }

    fn only<'a>(resources: &'a [MappedResource], resource_type: &str) -> &'a Value {
        let found: Vec<_> = resources
            .iter()
            .filter(|r| r.resource_type == resource_type)
            .collect();
        assert_eq!(found.len(), 1, "{resource_type}");
        &found[0].json
    }

    fn code_of(obs: &Value) -> &str {
        obs["code"]["coding"][0]["code"]
            .as_str()
            .unwrap_or_default()
    }

    fn observation(m: &Measurement) -> Value {
        only(&map(m), "Observation").clone()
    }

    /// One measurement of each single-value data type Withings' `getmeas` brings, with the
    /// unit and decimal places the fetcher gives it, and the codes the table must give it.
    fn withings_measures() -> Vec<(Measurement, &'static str, &'static str)> {
        let local = "https://ohx.example/fhir/CodeSystem/measurement-type";
        let loinc = "http://loinc.org";
        [
            ("body_height", 180.5, "cm", 1, loinc, "8302-2"),
            ("body_fat_percentage", 17.5, "%", 2, loinc, "41982-0"),
            ("fat_mass", 8.75, "kg", 3, loinc, "73708-0"),
            ("fat_free_mass", 41.25, "kg", 3, local, "fat-free-mass"),
            ("muscle_mass", 39.1, "kg", 2, loinc, "73964-9"),
            ("body_water_mass", 28.05, "kg", 2, loinc, "101683-1"),
            ("bone_mass", 2.05, "kg", 2, local, "bone-mass"),
            (
                "pulse_wave_velocity",
                7.12,
                "m/s",
                2,
                local,
                "pulse-wave-velocity",
            ),
            ("body_temperature", 36.8, "Cel", 2, loinc, "8310-5"),
            (
                "skin_temperature",
                33.25,
                "Cel",
                2,
                local,
                "skin-temperature",
            ),
            ("oxygen_saturation", 97.0, "%", 0, loinc, "2708-6"),
            ("qrs_duration", 96.0, "ms", 0, loinc, "8633-0"),
            ("pr_interval", 162.0, "ms", 0, loinc, "8625-6"),
            ("qt_interval", 388.0, "ms", 0, loinc, "8634-8"),
            ("qtc_interval", 412.0, "ms", 0, loinc, "8636-3"),
        ]
        .into_iter()
        .map(|(data_type, value, unit, places, system, code)| {
            let mut c = component("value", value, unit);
            c.decimals = Some(places);
            let m = measurement(data_type, &format!("withings-5100-{data_type}"), vec![c]);
            (m, system, code)
        })
        .collect()
    }

    #[test]
    fn test_withings_measures_map_to_their_codes_and_validate() {
        let validator = shared_test_validator();
        for (m, system, code) in withings_measures() {
            let obs = observation(&m);
            assert_eq!(
                obs["code"]["coding"][0]["system"], system,
                "{}",
                m.data_type
            );
            assert_eq!(obs["code"]["coding"][0]["code"], code, "{}", m.data_type);
            assert_eq!(
                obs["valueQuantity"]["code"],
                m.components[0].unit.as_str(),
                "{}",
                m.data_type
            );
            if let Err(error) = validator.validate_all(&obs) {
                panic!("{} invalid: {error}\n{obs:#}", m.data_type);
            }
        }
    }

    #[test]
    fn test_decimals_keep_the_precision_the_device_reported() {
        let mut w = weight();
        w.components[0].value = 50.0;
        w.components[0].decimals = Some(4);
        let obs = observation(&w);
        let text = canonical_json(&obs);
        assert!(text.contains(r#""value":50.0000"#), "{text}");
        // through a parse and a write (the publisher adds its tags that way)
        let again: Value = serde_json::from_str(&text).unwrap();
        assert!(canonical_json(&again).contains(r#""value":50.0000"#));
        // without reported places, as before
        w.components[0].decimals = None;
        assert!(canonical_json(&observation(&w)).contains(r#""value":50}"#));
    }

    #[test]
    fn test_hourly_steps_are_the_sum_as_value_and_spo2_hours_are_statistics() {
        let validator = shared_test_validator();
        let mut steps = hourly_hr();
        steps.data_type = "steps".into();
        steps.unit = "{steps}".into();
        steps.count = 60;
        steps.sum = 1234.0;
        steps.mean = 20.566;
        let resources = map_aggregate(&steps, &table(), &settings()).unwrap();
        let obs = only(&resources, "Observation");
        assert_eq!(code_of(obs), "55423-8");
        assert_eq!(obs["category"][0]["coding"][0]["code"], "activity");
        assert_eq!(obs["valueQuantity"]["value"], 1234);
        assert_eq!(obs["valueQuantity"]["code"], "{steps}");
        assert!(
            obs.get("component").is_none(),
            "a sum, not statistics: {obs}"
        );
        validator.validate_all(obs).unwrap();

        let mut spo2 = hourly_hr();
        spo2.data_type = "oxygen_saturation".into();
        spo2.unit = "%".into();
        (spo2.min, spo2.max, spo2.mean) = (93.0, 99.0, 96.25);
        let resources = map_aggregate(&spo2, &table(), &settings()).unwrap();
        let obs = only(&resources, "Observation");
        assert!(obs.get("valueQuantity").is_none());
        assert_eq!(obs["component"].as_array().map(Vec::len), Some(4));
        validator.validate_all(obs).unwrap();

        for (data_type, code) in [("hrv_sdnn", "80404-7"), ("hrv_rmssd", "hrv-rmssd")] {
            let mut hrv = hourly_hr();
            hrv.data_type = data_type.into();
            hrv.unit = "ms".into();
            let resources = map_aggregate(&hrv, &table(), &settings()).unwrap();
            let obs = only(&resources, "Observation");
            assert_eq!(code_of(obs), code);
            validator.validate_all(obs).unwrap();
        }
    }

    #[test]
    fn test_daily_steps_cover_the_local_day() {
        let mut c = component("value", 8412.0, "/d");
        c.decimals = Some(0);
        let mut day = measurement("daily_steps", "withings-1-day-steps-2026-11-20", vec![c]);
        day.effective_start = ms("2026-11-19T23:00:00Z");
        day.effective_end = Some(ms("2026-11-20T23:00:00Z"));
        let obs = observation(&day);
        assert_eq!(code_of(&obs), "41950-7");
        assert_eq!(obs["category"][0]["coding"][0]["code"], "activity");
        assert_eq!(obs["effectivePeriod"]["start"], "2026-11-20T00:00:00+01:00");
        assert_eq!(obs["effectivePeriod"]["end"], "2026-11-21T00:00:00+01:00");
        assert_eq!(obs["valueQuantity"]["value"], 8412);
        shared_test_validator().validate_all(&obs).unwrap();
    }

    #[test]
    fn test_a_night_is_its_total_with_the_stages_it_has() {
        let part = |code: &str, v: f64| {
            let mut c = component(code, v, "min");
            c.decimals = Some(0);
            c
        };
        let mut night = measurement(
            "sleep_duration",
            "withings-1-sleep-2081804182",
            vec![
                part("value", 311.0),
                part("deep", 97.0),
                part("light", 174.0),
                part("rem", 40.0),
            ],
        );
        night.effective_start = ms("2021-04-17T20:30:53Z");
        night.effective_end = Some(ms("2021-04-18T02:32:53Z"));
        let obs = observation(&night);
        assert_eq!(code_of(&obs), "93832-4");
        assert_eq!(obs["valueQuantity"]["value"], 311);
        let codes: Vec<&str> = obs["component"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"]["coding"][0]["code"].as_str().unwrap())
            .collect();
        // the night had no awake time: that optional component is left out
        assert_eq!(codes, ["93831-6", "93830-8", "93829-0"]);
        shared_test_validator().validate_all(&obs).unwrap();
        for (data_type, unit) in [
            ("sleep_heart_rate", "/min"),
            ("sleep_respiratory_rate", "/min"),
        ] {
            let mut m = measurement(
                data_type,
                "withings-1-x-1",
                vec![component("value", 14.0, unit)],
            );
            m.effective_end = Some(m.effective_start + 6 * 3_600_000);
            let obs = observation(&m);
            shared_test_validator().validate_all(&obs).unwrap();
        }
    }

    #[test]
    fn test_a_device_registration_maps_to_device_and_association_only() {
        let mut d = measurement(DATA_TYPE_DEVICE, "withings-1-device-a1b2c3d4e5", vec![]);
        d.device = Some(bpm_connect());
        let resources = map(&d);
        let types: Vec<&str> = resources.iter().map(|r| r.resource_type.as_str()).collect();
        assert_eq!(types, ["Device", "DeviceAssociation"]);
        // the same resources a measurement of that device makes
        let with_bp = map(&bp());
        assert_eq!(
            resources[0].id,
            only(&with_bp, "Device")["id"].as_str().unwrap()
        );
        assert_eq!(
            resources[1].id,
            only(&with_bp, "DeviceAssociation")["id"].as_str().unwrap()
        );
        d.device = None;
        assert!(map_measurement(&d, &table(), &settings()).is_err());
        d.device = Some(bpm_connect());
        d.components = vec![component("value", 1.0, "kg")];
        assert!(map_measurement(&d, &table(), &settings()).is_err());
    }

    #[test]
    fn test_manual_entry_is_patient_reported_without_device() {
        let mut w = weight();
        w.entry_method = Some("manual".into());
        w.device = None;
        let resources = map(&w);
        assert_eq!(resources.len(), 1, "no Device for a typed-in value");
        let obs = &resources[0].json;
        assert_eq!(
            obs["performer"][0]["reference"],
            w.context.patient_reference.as_str()
        );
        assert!(obs.get("device").is_none());
        // a device reading names no performer
        assert!(observation(&weight()).get("performer").is_none());
    }

    /// Every resource of every data type, with and without a device.
    fn every_data_type_mapped() -> Vec<MappedResource> {
        let mut all = Vec::new();
        for m in [bp(), pulse(), weight()] {
            all.extend(map(&m));
            let mut without_device = m.clone();
            without_device.device = None;
            without_device.utc_offset_seconds = None;
            all.extend(map(&without_device));
        }
        all.extend(map_aggregate(&hourly_hr(), &table(), &settings()).unwrap());
        assert_eq!(all.len(), 3 * 4 + 3);
        // A blood pressure with the irregular-heartbeat flag, and the percentages and BMI of
        // Omron and Beurer scales.
        let mut flagged = bp();
        flagged.measurement_id = "omron:u:bloodpressure:1:blood_pressure".into();
        flagged
            .components
            .push(component("irregular_heartbeat", 1.0, "1"));
        all.extend(
            map(&flagged)
                .into_iter()
                .filter(|r| r.resource_type == "Observation"),
        );
        for (data_type, value, unit) in [
            ("body_mass_index", 23.1, "kg/m2"),
            ("body_water_percentage", 57.8, "%"),
            ("muscle_percentage", 43.7, "%"),
            ("bone_mass", 6.2, "[lb_av]"),
            ("resting_heart_rate", 58.0, "/min"),
            ("daily_oxygen_saturation", 95.4, "%"),
            ("skin_temperature_deviation", -0.4, "K"),
        ] {
            let m = measurement(
                data_type,
                &format!("beurer-{data_type}"),
                vec![component("value", value, unit)],
            );
            all.extend(
                map(&m)
                    .into_iter()
                    .filter(|r| r.resource_type == "Observation"),
            );
        }
        all
    }

    /// Each resource valid, and all of them in one transaction Bundle, as the publisher sends
    /// them.
    fn assert_all_valid(all: &[MappedResource], validator: &FhirValidator) {
        for resource in all {
            assert_eq!(
                resource.json["resourceType"],
                resource.resource_type.as_str()
            );
            assert_eq!(resource.json["id"], resource.id.as_str());
            if let Err(error) = validator.validate_all(&resource.json) {
                panic!(
                    "{} invalid: {error}\n{:#}",
                    resource.resource_type, resource.json
                );
            }
        }
        let entries: Vec<Value> = all
            .iter()
            .map(|r| {
                json!({
                    "fullUrl": format!("{BASE}/{}/{}", r.resource_type, r.id),
                    "resource": r.json,
                    "request": { "method": "PUT", "url": format!("{}/{}", r.resource_type, r.id) }
                })
            })
            .collect();
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
        validator.validate(&bundle).unwrap();
    }

    #[test]
    fn test_every_mapped_resource_of_every_data_type_validates() {
        assert_all_valid(&every_data_type_mapped(), shared_test_validator());
    }

    #[test]
    fn test_every_data_type_written_as_r4_validates_against_r4() {
        let r4 = crate::r4::R4Rules::default_rules()
            .unwrap()
            .convert(every_data_type_mapped())
            .unwrap();
        assert!(r4.iter().all(|r| r.resource_type != "DeviceAssociation"));
        assert!(r4.iter().any(|r| r.resource_type == "Device"));
        let validator = FhirValidator::new(crate::validate::FhirVersion::R4).unwrap();
        assert_all_valid(&r4, &validator);
    }

    /// A reading's retraction: the record the fetcher emits when the provider deleted it.
    fn retraction_of(m: &Measurement) -> Measurement {
        let mut r = m.clone();
        r.components.clear();
        r.device = None;
        r.entry_method = None;
        r.status = Some(STATUS_ENTERED_IN_ERROR.to_owned());
        r.provider_modified_at = Some(ms("2026-11-21T09:00:00Z"));
        r
    }

    #[test]
    fn test_a_retracted_reading_keeps_its_identity_and_has_no_value() {
        let reading = observation(&bp());
        let retracted = map(&retraction_of(&bp()));
        assert_eq!(retracted.len(), 1, "no device resources: {retracted:?}");
        let obs = &retracted[0].json;
        for same in ["id", "identifier", "code", "category", "subject", "meta"] {
            assert_eq!(obs[same], reading[same], "{same}");
        }
        assert_eq!(obs["effectiveDateTime"], reading["effectiveDateTime"]);
        assert_eq!(obs["status"], "entered-in-error");
        let absent = json!({ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
            "code": "error" }] });
        // The panel keeps the components its profile requires, each without a value.
        let components = obs["component"].as_array().unwrap();
        assert_eq!(components.len(), 2, "{obs:#}");
        for (c, was) in components
            .iter()
            .zip(reading["component"].as_array().unwrap())
        {
            assert_eq!(c["code"], was["code"]);
            assert_eq!(c["dataAbsentReason"], absent);
            assert!(c.get("valueQuantity").is_none(), "{c}");
        }
        assert!(obs.get("device").is_none() && obs.get("valueQuantity").is_none());
        // A single-value reading: the value's place says why it is absent.
        let retracted = map(&retraction_of(&weight()));
        assert_eq!(retracted[0].json["dataAbsentReason"], absent);
        assert_eq!(retracted[0].id, observation(&weight())["id"]);
    }

    #[test]
    fn test_retractions_of_every_data_type_validate_in_r5_and_r4() {
        let table = table();
        let mut all = Vec::new();
        for data_type in table.measurements.keys() {
            let mut m = retraction_of(&measurement(
                data_type,
                &format!("withings-7-{data_type}"),
                vec![],
            ));
            if data_type == "sleep_duration" {
                m.effective_end = Some(m.effective_start + 8 * HOUR_MS);
            }
            all.extend(map_measurement(&m, &table, &settings()).unwrap());
        }
        // Each with its linked Observations and report (an ECG's heart rate and study).
        let parts: usize = table
            .measurements
            .values()
            .map(|e| 1 + e.linked.len() + usize::from(e.report.is_some()))
            .sum();
        assert_eq!(all.len(), parts);
        assert!(all.iter().all(|r| r.json["status"] == "entered-in-error"));
        assert_all_valid(&all, shared_test_validator());
        let r4 = crate::r4::R4Rules::default_rules()
            .unwrap()
            .convert(all)
            .unwrap();
        let validator = FhirValidator::new(crate::validate::FhirVersion::R4).unwrap();
        assert_all_valid(&r4, &validator);
    }

    #[test]
    fn test_a_retraction_with_values_or_an_unknown_status_is_refused() {
        let mut with_value = retraction_of(&bp());
        with_value.components = bp().components;
        assert!(matches!(
            map_measurement(&with_value, &table(), &settings()),
            Err(MappingError::UnexpectedComponent { .. })
        ));
        let mut with_device = retraction_of(&bp());
        with_device.device = Some(bpm_connect());
        assert!(matches!(
            map_measurement(&with_device, &table(), &settings()),
            Err(MappingError::InvalidField("device"))
        ));
        let mut unknown = bp();
        unknown.status = Some("deleted".to_owned());
        assert!(matches!(
            map_measurement(&unknown, &table(), &settings()),
            Err(MappingError::InvalidField("status"))
        ));
    }

    #[test]
    fn test_bp_maps_to_panel_with_loinc_mdc_components_and_units() {
        let obs = observation(&bp());
        assert_eq!(
            obs["meta"]["profile"],
            json!(["http://hl7.org/fhir/StructureDefinition/bp"])
        );
        assert_eq!(
            obs["meta"]["source"],
            "https://ohx.example/fhir/source/withings"
        );
        assert_eq!(obs["status"], "final");
        assert_eq!(
            obs["category"],
            json!([{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs", "display": "Vital Signs" }] }])
        );
        assert_eq!(
            obs["code"]["coding"],
            json!([
                { "system": "http://loinc.org", "code": "85354-9",
                  "display": "Blood pressure panel with all children optional" },
                { "system": "urn:iso:std:iso:11073:10101", "code": "150020",
                  "display": "MDC_PRESS_BLD_NONINV" }
            ])
        );
        assert!(obs.get("valueQuantity").is_none());
        assert_eq!(obs["subject"], json!({ "reference": "Patient/123" }));
        assert_eq!(
            obs["component"],
            json!([
                { "code": { "coding": [
                    { "system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure" },
                    { "system": "urn:iso:std:iso:11073:10101", "code": "150021", "display": "MDC_PRESS_BLD_NONINV_SYS" }
                  ] },
                  "valueQuantity": { "value": 121, "unit": "mmHg",
                                     "system": "http://unitsofmeasure.org", "code": "mm[Hg]" } },
                { "code": { "coding": [
                    { "system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure" },
                    { "system": "urn:iso:std:iso:11073:10101", "code": "150022", "display": "MDC_PRESS_BLD_NONINV_DIA" }
                  ] },
                  "valueQuantity": { "value": 78, "unit": "mmHg",
                                     "system": "http://unitsofmeasure.org", "code": "mm[Hg]" } }
            ])
        );
        // Component order follows the table, not the record.
        let mut swapped = bp();
        swapped.components.reverse();
        assert_eq!(observation(&swapped), obs);
    }

    #[test]
    fn test_irregular_heartbeat_flag_is_a_boolean_component_after_the_pressures() {
        let mut flagged = bp();
        flagged
            .components
            .push(component("irregular_heartbeat", 1.0, "1"));
        let obs = observation(&flagged);
        let c = &obs["component"];
        assert_eq!(c.as_array().unwrap().len(), 3);
        assert_eq!(c[2]["valueBoolean"], true);
        assert!(c[2].get("valueQuantity").is_none());
        assert_eq!(
            c[2]["code"]["coding"][0]["system"],
            "https://ohx.example/fhir/CodeSystem/measurement-type"
        );
        assert_eq!(c[2]["code"]["coding"][0]["code"], "irregular-heartbeat");
        flagged.components[2].value = 0.0;
        assert_eq!(observation(&flagged)["component"][2]["valueBoolean"], false);
        // without the flag the panel has the two pressures only
        assert_eq!(observation(&bp())["component"].as_array().unwrap().len(), 2);
        // a flag in a unit the table does not allow is a mapping error
        flagged.components[2].unit = "%".into();
        assert!(matches!(
            map_measurement(&flagged, &table(), &settings()),
            Err(MappingError::UnsupportedUnit { .. })
        ));
    }

    #[test]
    fn test_body_mass_index_uses_the_bmi_profile_and_kg_per_m2() {
        let obs = observation(&measurement(
            "body_mass_index",
            "omron:u:weight:1:body_mass_index",
            vec![component("value", 23.1, "kg/m2")],
        ));
        assert_eq!(
            obs["meta"]["profile"][0],
            "http://hl7.org/fhir/StructureDefinition/bmi"
        );
        assert_eq!(obs["code"]["coding"][0]["code"], "39156-5");
        assert_eq!(obs["valueQuantity"]["code"], "kg/m2");
        assert_eq!(obs["valueQuantity"]["value"], 23.1);
    }

    #[test]
    fn test_heart_rate_spot_uses_cuff_pulse_code_and_per_minute() {
        let obs = observation(&pulse());
        assert_eq!(
            obs["meta"]["profile"][0],
            "http://hl7.org/fhir/StructureDefinition/heartrate"
        );
        assert_eq!(obs["code"]["coding"][0]["code"], "8867-4");
        assert_eq!(obs["code"]["coding"][1]["code"], "149546");
        assert_eq!(obs["code"]["coding"][1]["display"], "MDC_PULS_RATE_NON_INV");
        assert_eq!(
            obs["valueQuantity"],
            json!({ "value": 64, "unit": "beats/minute",
                    "system": "http://unitsofmeasure.org", "code": "/min" })
        );
        assert!(obs.get("component").is_none());
    }

    #[test]
    fn test_weight_value_and_unit() {
        let obs = observation(&weight());
        assert_eq!(obs["code"]["coding"][0]["code"], "29463-7");
        assert_eq!(obs["code"]["coding"][1]["code"], "188736");
        assert_eq!(
            obs["valueQuantity"],
            json!({ "value": 72.45, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg" })
        );
        assert!(obs.get("component").is_none());
        let mut pounds = weight();
        pounds.components = vec![component("value", 159.7, "[lb_av]")];
        let obs = observation(&pounds);
        assert_eq!(obs["valueQuantity"]["code"], "[lb_av]");
        assert_eq!(obs["valueQuantity"]["unit"], "lb");
        assert_eq!(obs["valueQuantity"]["value"], 159.7);
    }

    #[test]
    fn test_unit_not_in_table_is_error() {
        let mut stones = weight();
        stones.components = vec![component("value", 11.4, "[stone_av]")];
        let error = map_measurement(&stones, &table(), &settings()).unwrap_err();
        assert!(
            matches!(&error, MappingError::UnsupportedUnit { unit, .. } if unit == "[stone_av]"),
            "{error}"
        );
        let mut bp = bp();
        bp.components[0].unit = "mmHg".to_owned();
        assert!(matches!(
            map_measurement(&bp, &table(), &settings()),
            Err(MappingError::UnsupportedUnit { .. })
        ));
    }

    #[test]
    fn test_effective_date_time_rendered_in_sample_offset() {
        let mut m = bp();
        // 07:15:00.750Z in +01:00, milliseconds dropped.
        assert_eq!(
            observation(&m)["effectiveDateTime"],
            "2026-11-20T08:15:00+01:00"
        );
        m.utc_offset_seconds = Some(-(5 * 3600 + 30 * 60));
        assert_eq!(
            observation(&m)["effectiveDateTime"],
            "2026-11-20T01:45:00-05:30"
        );
        m.utc_offset_seconds = Some(14 * 3600);
        assert_eq!(
            observation(&m)["effectiveDateTime"],
            "2026-11-20T21:15:00+14:00"
        );
        m.utc_offset_seconds = Some(0);
        assert_eq!(
            observation(&m)["effectiveDateTime"],
            "2026-11-20T07:15:00+00:00"
        );
        m.utc_offset_seconds = None;
        assert_eq!(observation(&m)["effectiveDateTime"], "2026-11-20T07:15:00Z");
        // Offsets FHIR cannot write (seconds, beyond 14 h) fall back to UTC: same instant.
        m.utc_offset_seconds = Some(3601);
        assert_eq!(observation(&m)["effectiveDateTime"], "2026-11-20T07:15:00Z");
        m.utc_offset_seconds = Some(15 * 3600);
        assert_eq!(observation(&m)["effectiveDateTime"], "2026-11-20T07:15:00Z");
        // Before the epoch: floor, not truncation toward zero.
        m.effective_start = -1;
        assert_eq!(observation(&m)["effectiveDateTime"], "1969-12-31T23:59:59Z");
    }

    #[test]
    fn test_effective_period_when_the_record_has_a_later_end() {
        let mut m = weight();
        m.effective_end = Some(m.effective_start + 30_000);
        let obs = observation(&m);
        assert!(obs.get("effectiveDateTime").is_none());
        assert_eq!(
            obs["effectivePeriod"],
            json!({ "start": "2026-11-20T08:15:00+01:00", "end": "2026-11-20T08:15:30+01:00" })
        );
        m.effective_end = Some(m.effective_start);
        assert!(observation(&m).get("effectiveDateTime").is_some());
        m.effective_end = Some(m.effective_start - 1000);
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::InvalidTime(_))
        ));
        m.effective_end = None;
        m.effective_start = i64::MAX;
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::InvalidTime(_))
        ));
    }

    #[test]
    fn test_same_input_gives_identical_json_and_ids() {
        for m in [bp(), pulse(), weight()] {
            let first = map(&m);
            let second = map(&m.clone());
            assert_eq!(first.len(), second.len());
            for (a, b) in first.iter().zip(&second) {
                assert_eq!(a.id, b.id);
                assert_eq!(a.canonical_json(), b.canonical_json());
            }
        }
        let table = table();
        let a = map_aggregate(&hourly_hr(), &table, &settings()).unwrap();
        let b = map_aggregate(&hourly_hr(), &table, &settings()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.iter()
                .map(MappedResource::canonical_json)
                .collect::<Vec<_>>(),
            b.iter()
                .map(MappedResource::canonical_json)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn test_processing_context_does_not_change_resources() {
        let original = map(&bp());
        let mut replayed = bp();
        replayed.context.sync_request_id = "sync-999".to_owned();
        replayed.context.trigger = "NIGHTLY".to_owned();
        replayed.context.received_at += 86_400_000;
        replayed.context.link_id = "link-2".to_owned();
        replayed.provider_modified_at = None;
        replayed.entry_method = None;
        let replayed = map(&replayed);
        assert_eq!(
            original
                .iter()
                .map(MappedResource::canonical_json)
                .collect::<Vec<_>>(),
            replayed
                .iter()
                .map(MappedResource::canonical_json)
                .collect::<Vec<_>>()
        );
        let mut aggregate = hourly_hr();
        aggregate.context.sync_request_id = "sync-2".to_owned();
        aggregate.first_sample_at += 1000;
        aggregate.utc_offset_seconds = None;
        assert_eq!(
            map_aggregate(&aggregate, &table(), &settings()).unwrap(),
            map_aggregate(&hourly_hr(), &table(), &settings()).unwrap()
        );
    }

    #[test]
    fn test_different_measurement_gives_different_id() {
        let a = observation(&bp());
        let mut other = bp();
        other.measurement_id = "withings-987654323-bp".to_owned();
        let b = observation(&other);
        assert_ne!(a["id"], b["id"]);
        assert_ne!(a["identifier"], b["identifier"]);
        // The same provider id of another provider user is another Observation too.
        let mut other_user = bp();
        other_user.context.provider_user_id = "u99999".to_owned();
        assert_ne!(observation(&other_user)["id"], a["id"]);
        // A corrected value keeps the identity (an update of the same resource).
        let mut corrected = bp();
        corrected.components[0].value = 122.0;
        let c = observation(&corrected);
        assert_eq!(c["id"], a["id"]);
        assert_ne!(canonical_json(&c), canonical_json(&a));
        // Another hour is another aggregate.
        let mut next_hour = hourly_hr();
        next_hour.hour_start += HOUR_MS;
        next_hour.hour_end += HOUR_MS;
        let table = table();
        let ids = |a: &HourlyAggregate| {
            map_aggregate(a, &table, &settings())
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        let (this, next) = (ids(&hourly_hr()), ids(&next_hour));
        assert_eq!(this[..2], next[..2], "same Device and DeviceAssociation");
        assert_ne!(this[2], next[2]);
    }

    #[test]
    fn test_observation_identifier_and_id_formats() {
        let obs = observation(&bp());
        let system = "https://ohx.example/fhir/sid/observation";
        // The provider prefix of the measurement id is not repeated.
        let value = "withings-u12345-987654322-bp";
        assert_eq!(
            obs["identifier"],
            json!([{ "system": system, "value": value }])
        );
        assert_eq!(
            obs["id"],
            resource_id("Observation", system, value).as_str()
        );
        let mut m = bp();
        m.measurement_id = "grp-987654322-meastype-10".to_owned();
        assert_eq!(
            observation(&m)["identifier"][0]["value"],
            "withings-u12345-grp-987654322-meastype-10"
        );
        // The fetcher's format: provider and user are not repeated.
        m.measurement_id = "withings:u12345:987654322:bp".to_owned();
        assert_eq!(
            observation(&m)["identifier"][0]["value"],
            "withings-u12345-987654322:bp"
        );
        // Only whole leading parts are dropped, and never everything.
        m.measurement_id = "withingsx:1".to_owned();
        assert_eq!(
            observation(&m)["identifier"][0]["value"],
            "withings-u12345-withingsx:1"
        );
        m.measurement_id = "withings:".to_owned();
        assert_eq!(
            observation(&m)["identifier"][0]["value"],
            "withings-u12345-withings:"
        );
        // A trailing slash of the base changes nothing.
        let slash = MapperSettings::new("https://ohx.example/fhir/").unwrap();
        assert_eq!(
            map_measurement(&bp(), &table(), &slash).unwrap(),
            map(&bp())
        );
    }

    #[test]
    fn test_aggregate_matches_research_hr_hourly_example() {
        // research/examples/hr-hourly.json, with this deployment's base, patient and device.
        let example = json!({
          "resourceType": "Observation",
          "meta": {
            "profile": ["http://hl7.org/fhir/StructureDefinition/heartrate"],
            "source": "https://ohx.example/fhir/source/withings"
          },
          "identifier": [{
            "system": "https://ohx.example/fhir/sid/observation",
            "value": "withings-u12345-heart_rate-PT1H-2025-06-01T10:00:00Z"
          }],
          "status": "final",
          "category": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs"}]
          }],
          "code": {
            "coding": [
              {"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"},
              {"system": "urn:iso:std:iso:11073:10101", "code": "149530", "display": "MDC_PULS_OXIM_PULS_RATE"}
            ],
            "text": "Heart rate, hourly statistics"
          },
          "subject": {"reference": "Patient/123"},
          "effectivePeriod": {"start": "2025-06-01T10:00:00Z", "end": "2025-06-01T11:00:00Z"},
          "component": [
            {"code": {"coding": [{"system": "http://hl7.org/fhir/observation-statistics", "code": "average", "display": "Average"}]},
             "valueQuantity": {"value": 71.4, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}},
            {"code": {"coding": [{"system": "http://hl7.org/fhir/observation-statistics", "code": "minimum", "display": "Minimum"}]},
             "valueQuantity": {"value": 58, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}},
            {"code": {"coding": [{"system": "http://hl7.org/fhir/observation-statistics", "code": "maximum", "display": "Maximum"}]},
             "valueQuantity": {"value": 112, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}},
            {"code": {"coding": [{"system": "http://hl7.org/fhir/observation-statistics", "code": "count", "display": "Count"}]},
             "valueInteger": 57}
          ]
        });
        let resources = map_aggregate(&hourly_hr(), &table(), &settings()).unwrap();
        let mut obs = only(&resources, "Observation").clone();
        let device = only(&resources, "Device");
        assert_eq!(
            obs["device"]["reference"],
            format!("Device/{}", device["id"].as_str().unwrap()).as_str()
        );
        let object = obs.as_object_mut().unwrap();
        object.remove("device");
        let id = object.remove("id").unwrap();
        assert_eq!(
            id,
            resource_id(
                "Observation",
                "https://ohx.example/fhir/sid/observation",
                "withings-u12345-heart_rate-PT1H-2025-06-01T10:00:00Z"
            )
            .as_str()
        );
        assert_eq!(obs, example);
        assert!(obs.get("valueQuantity").is_none());
    }

    #[test]
    fn test_amending_aggregate_maps_to_amended_observation_with_the_same_id() {
        let first = map_aggregate(&hourly_hr(), &table(), &settings()).unwrap();
        let mut revised = hourly_hr();
        revised.amends = true;
        revised.revision = 42;
        let amended = map_aggregate(&revised, &table(), &settings()).unwrap();
        let (first, amended) = (only(&first, "Observation"), only(&amended, "Observation"));
        assert_eq!(first["status"], "final");
        assert_eq!(amended["status"], "amended");
        assert_eq!(amended["id"], first["id"]);
        assert_eq!(amended["identifier"], first["identifier"]);
        let mut without_status = amended.clone();
        without_status["status"] = json!("final");
        assert_eq!(&without_status, first);
        shared_test_validator().validate_all(amended).unwrap();
    }

    #[test]
    fn test_aggregate_rejects_non_hours_bad_counts_and_units() {
        let table = table();
        let check = |a: &HourlyAggregate| map_aggregate(a, &table, &settings());
        let mut a = hourly_hr();
        a.hour_start += 60_000;
        assert!(matches!(check(&a), Err(MappingError::InvalidAggregate(_))));
        let mut a = hourly_hr();
        a.hour_end += 1;
        assert!(matches!(check(&a), Err(MappingError::InvalidAggregate(_))));
        for count in [0, -1, i64::from(i32::MAX) + 1] {
            let mut a = hourly_hr();
            a.count = count;
            assert!(
                matches!(check(&a), Err(MappingError::InvalidAggregate(_))),
                "{count}"
            );
        }
        let mut a = hourly_hr();
        a.unit = "{beats}/min".to_owned();
        assert!(matches!(
            check(&a),
            Err(MappingError::UnsupportedUnit { .. })
        ));
        let mut a = hourly_hr();
        a.mean = f64::NAN;
        assert!(matches!(
            check(&a),
            Err(MappingError::NonFiniteValue { .. })
        ));
        let mut a = hourly_hr();
        a.count = 1;
        a.min = 64.0;
        a.max = 64.0;
        a.mean = 64.0;
        let resources = check(&a).unwrap();
        let obs = only(&resources, "Observation");
        assert_eq!(obs["component"][3]["valueInteger"], 1);
        assert_eq!(obs["component"][0]["valueQuantity"]["value"], 64);
    }

    #[test]
    fn test_device_and_association_shapes_and_references() {
        let resources = map(&bp());
        let types: Vec<&str> = resources.iter().map(|r| r.resource_type.as_str()).collect();
        assert_eq!(types, ["Device", "DeviceAssociation", "Observation"]);
        let device_system = "https://ohx.example/fhir/sid/device";
        let device_id = resource_id("Device", device_system, "withings-a1b2c3d4e5");
        assert_eq!(
            resources[0].json,
            json!({
                "resourceType": "Device",
                "id": device_id,
                "meta": { "source": "https://ohx.example/fhir/source/withings" },
                "identifier": [{ "system": device_system, "value": "withings-a1b2c3d4e5" }],
                "status": "active",
                "displayName": "Withings BPM Connect",
                "manufacturer": "Withings",
                "name": [{ "value": "BPM Connect", "type": "user-friendly-name" }],
                "modelNumber": "44"
            })
        );
        // References to the Device name its identifier as well.
        let device_reference = json!({
            "reference": format!("Device/{device_id}"),
            "identifier": { "system": device_system, "value": "withings-a1b2c3d4e5" },
        });
        let association_system = "https://ohx.example/fhir/sid/device-association";
        let association_value = "withings-u12345-a1b2c3d4e5";
        assert_eq!(
            resources[1].json,
            json!({
                "resourceType": "DeviceAssociation",
                "id": resource_id("DeviceAssociation", association_system, association_value),
                "meta": { "source": "https://ohx.example/fhir/source/withings" },
                "identifier": [{ "system": association_system, "value": association_value }],
                "device": device_reference.clone(),
                "status": { "coding": [{
                    "system": "http://hl7.org/fhir/deviceassociation-status",
                    "code": "attached", "display": "Attached" }] },
                "subject": { "reference": "Patient/123" }
            })
        );
        assert_eq!(resources[2].json["device"], device_reference);
        // The same device seen in another measurement is the same Device, byte for byte.
        let from_pulse = map(&pulse());
        assert_eq!(
            from_pulse[0].canonical_json(),
            resources[0].canonical_json()
        );
        assert_eq!(
            from_pulse[1].canonical_json(),
            resources[1].canonical_json()
        );
    }

    #[test]
    fn test_device_fields_come_from_record_then_table() {
        let mut m = pulse();
        m.context.provider = "google-health".to_owned();
        m.device = Some(Device {
            device_id: "8a7b".to_owned(),
            model: Some("Fitbit Charge 6".to_owned()),
            model_id: None,
            manufacturer: Some("Fitbit".to_owned()),
        });
        let resources = map(&m);
        let device = only(&resources, "Device");
        assert_eq!(device["manufacturer"], "Fitbit");
        assert_eq!(device["displayName"], "Fitbit Charge 6");
        assert!(device.get("modelNumber").is_none());
        assert_eq!(device["identifier"][0]["value"], "google-health-8a7b");
        m.device = Some(Device {
            device_id: "8a7b".to_owned(),
            model: None,
            model_id: None,
            manufacturer: None,
        });
        let resources = map(&m);
        let device = only(&resources, "Device");
        // Google Health has no table default: a device of unknown make has no manufacturer.
        assert!(device.get("manufacturer").is_none());
        assert!(device.get("name").is_none());
        assert!(device.get("displayName").is_none());
        shared_test_validator().validate_all(device).unwrap();
        // A third-party source synced into Withings (the fetcher leaves the manufacturer out).
        m.context.provider = "withings".to_owned();
        m.device = Some(Device {
            device_id: "hk-1".to_owned(),
            model: Some("HealthKit".to_owned()),
            model_id: Some("1052".to_owned()),
            manufacturer: None,
        });
        let resources = map(&m);
        let device = only(&resources, "Device");
        assert!(device.get("manufacturer").is_none());
        assert_eq!(device["displayName"], "HealthKit");
        // Omron's table default applies when the record names no manufacturer.
        m.context.provider = "omron".to_owned();
        m.device = Some(Device {
            device_id: "bp-7".to_owned(),
            model: Some("M7 Intelli IT".to_owned()),
            model_id: None,
            manufacturer: None,
        });
        let resources = map(&m);
        let device = only(&resources, "Device");
        assert_eq!(device["manufacturer"], "OMRON Healthcare");
        assert_eq!(device["displayName"], "OMRON Healthcare M7 Intelli IT");
        assert_eq!(
            only(&resources, "Observation")["meta"]["source"],
            "https://ohx.example/fhir/source/omron"
        );
    }

    #[test]
    fn test_no_device_maps_observation_only() {
        let mut m = weight();
        m.device = None;
        let resources = map(&m);
        assert_eq!(resources.len(), 1);
        assert!(resources[0].json.get("device").is_none());
    }

    #[test]
    fn test_unknown_data_type_provider_or_aggregation_is_error() {
        let mut m = pulse();
        m.data_type = "respiratory_rate".to_owned();
        let error = map_measurement(&m, &table(), &settings()).unwrap_err();
        assert_eq!(
            error,
            MappingError::UnknownDataType {
                kind: "measurement",
                data_type: "respiratory_rate".to_owned()
            }
        );
        let mut a = hourly_hr();
        a.data_type = "respiratory_rate".to_owned();
        assert!(matches!(
            map_aggregate(&a, &table(), &settings()),
            Err(MappingError::UnknownDataType {
                kind: "aggregate",
                ..
            })
        ));
        // A spot type that has no aggregate entry.
        a.data_type = "blood_pressure".to_owned();
        assert!(map_aggregate(&a, &table(), &settings()).is_err());
        let mut m = pulse();
        m.context.provider = "acme".to_owned();
        assert_eq!(
            map_measurement(&m, &table(), &settings()).unwrap_err(),
            MappingError::UnknownProvider("acme".to_owned())
        );
        let mut m = pulse();
        m.aggregation = "DAILY".to_owned();
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::UnknownAggregation(_))
        ));
    }

    #[test]
    fn test_hourly_measurement_maps_to_nothing() {
        let mut m = pulse();
        m.aggregation = AGGREGATION_HOURLY.to_owned();
        assert!(map(&m).is_empty());
    }

    #[test]
    fn test_missing_unexpected_or_duplicate_components_are_errors() {
        let mut m = bp();
        m.components.pop();
        assert_eq!(
            map_measurement(&m, &table(), &settings()).unwrap_err(),
            MappingError::MissingComponent {
                data_type: "blood_pressure".to_owned(),
                component: "diastolic".to_owned()
            }
        );
        let mut m = bp();
        m.components.push(component("mean", 92.0, "mm[Hg]"));
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::UnexpectedComponent { .. })
        ));
        let mut m = bp();
        m.components.push(component("systolic", 122.0, "mm[Hg]"));
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::DuplicateComponent { .. })
        ));
        let mut m = pulse();
        m.components.clear();
        assert!(matches!(
            map_measurement(&m, &table(), &settings()),
            Err(MappingError::MissingComponent { .. })
        ));
    }

    #[test]
    fn test_non_finite_values_and_empty_fields_are_errors() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut m = weight();
            m.components[0].value = value;
            let error = map_measurement(&m, &table(), &settings()).unwrap_err();
            assert!(matches!(error, MappingError::NonFiniteValue { .. }));
        }
        let mut m = weight();
        m.context.patient_reference = String::new();
        assert_eq!(
            map_measurement(&m, &table(), &settings()).unwrap_err(),
            MappingError::InvalidField("context.patient_reference")
        );
        let mut m = weight();
        m.measurement_id = " ".to_owned();
        assert!(map_measurement(&m, &table(), &settings()).is_err());
        let mut m = weight();
        m.device = Some(Device {
            device_id: String::new(),
            model: None,
            model_id: None,
            manufacturer: None,
        });
        assert_eq!(
            map_measurement(&m, &table(), &settings()).unwrap_err(),
            MappingError::InvalidField("device.device_id")
        );
    }

    #[test]
    fn test_mapping_table_overridable_from_toml_string() {
        // A deployment that codes the cuff pulse differently and reports no profile for it.
        let text = DEFAULT_TABLE_TOML
            .replace(
                "code = \"149546\", display = \"MDC_PULS_RATE_NON_INV\"",
                "code = \"149514\", display = \"MDC_PULS_RATE\"",
            )
            .replace(
                "[measurements.heart_rate]\nprofile = \"http://hl7.org/fhir/StructureDefinition/heartrate\"\n",
                "[measurements.heart_rate]\n",
            )
            .replace(
                "[providers.withings]\n",
                "[providers.withings]\nmanufacturer = \"Withings SA\"\n",
            );
        let custom = Mapping::from_toml_str(&text).unwrap();
        assert_ne!(custom, table());
        let mut m = pulse();
        if let Some(device) = m.device.as_mut() {
            device.manufacturer = None;
        }
        let resources = map_measurement(&m, &custom, &settings()).unwrap();
        let obs = only(&resources, "Observation");
        assert_eq!(obs["code"]["coding"][1]["code"], "149514");
        assert!(obs["meta"].get("profile").is_none());
        assert_eq!(only(&resources, "Device")["manufacturer"], "Withings SA");
        // A table with new data types maps them without code changes.
        let text = format!(
            "{DEFAULT_TABLE_TOML}\n[measurements.respiratory_rate]\n\
             profile = \"http://hl7.org/fhir/StructureDefinition/resprate\"\n\
             category = [{{ system = \"http://terminology.hl7.org/CodeSystem/observation-category\", code = \"vital-signs\" }}]\n\
             code = [{{ system = \"http://loinc.org\", code = \"9279-1\", display = \"Respiratory rate\" }}]\n\
             value = {{ source = \"value\", units = [{{ code = \"/min\", display = \"breaths/minute\" }}] }}\n"
        );
        let extended = Mapping::from_toml_str(&text).unwrap();
        let m = measurement(
            "respiratory_rate",
            "withings-1-rr",
            vec![component("value", 14.5, "/min")],
        );
        let resources = map_measurement(&m, &extended, &settings()).unwrap();
        let obs = only(&resources, "Observation");
        assert_eq!(obs["valueQuantity"]["value"], 14.5);
        shared_test_validator().validate_all(obs).unwrap();
    }

    #[test]
    fn test_resource_id_format_and_inputs() {
        let id = resource_id(
            "Observation",
            "https://ohx.example/fhir/sid/observation",
            "x",
        );
        assert_eq!(id.len(), ID_PREFIX.len() + ID_HASH_HEX_LEN);
        assert!(id.starts_with(ID_PREFIX));
        assert!(
            id[ID_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        // Known value: sha256("Observation|https://ohx.example/fhir/sid/observation|x").
        let digest = hex::encode(Sha256::digest(
            b"Observation|https://ohx.example/fhir/sid/observation|x",
        ));
        assert_eq!(id, format!("ohx-{}", &digest[..32]));
        assert_ne!(
            id,
            resource_id("Device", "https://ohx.example/fhir/sid/observation", "x")
        );
        assert_ne!(
            id,
            resource_id("Observation", "https://ohx.example/fhir/sid/device", "x")
        );
        assert_ne!(
            id,
            resource_id(
                "Observation",
                "https://ohx.example/fhir/sid/observation",
                "y"
            )
        );
    }

    #[test]
    fn test_canonical_json_sorts_keys_recursively() {
        let value = json!({ "b": [{ "z": 1, "a": "é\"" }], "a": { "d": null, "c": 1.5 } });
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":1.5,"d":null},"b":[{"a":"é\"","z":1}]}"#
        );
        let parsed: Value = serde_json::from_str(&canonical_json(&value)).unwrap();
        assert_eq!(parsed, value);
        // Keys and strings are escaped as serde_json escapes them.
        let escaped = json!({ "k\n\u{1}": "\t\u{7f}\u{2028}", "": -0.5e-7 });
        assert_eq!(
            canonical_json(&escaped),
            format!(
                "{{{}:{},{}:{}}}",
                json!(""),
                json!(-0.5e-7),
                json!("k\n\u{1}"),
                json!("\t\u{7f}\u{2028}")
            )
        );
        let strings = json!(["plain", "back\\slash", "quote\"", "\u{1f}", "\u{20}", "€/"]);
        assert_eq!(
            canonical_json(&strings),
            serde_json::to_string(&strings).unwrap()
        );
        // Numbers keep the text they were written with; literals as serde_json writes them.
        let text =
            r#"{"a":50.0000,"b":true,"c":false,"d":null,"e":-1e-7,"f":123456789012345678901234}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(canonical_json(&v), text);
        assert_eq!(canonical_json(&v), serde_json::to_string(&v).unwrap());
    }

    #[test]
    fn test_decimals_are_written_compactly_and_rounded_when_asked() {
        assert_eq!(decimal(121.0, None), Some(Number::from(121)));
        assert_eq!(decimal(-0.0, None), Some(Number::from(0)));
        assert_eq!(
            decimal(72.45, None).map(|n| n.to_string()),
            Some("72.45".to_owned())
        );
        assert_eq!(
            decimal(71.428_571_428_571_43, Some(1)).map(|n| n.to_string()),
            Some("71.4".to_owned())
        );
        assert_eq!(decimal(71.96, Some(1)), Some(Number::from(72)));
        assert_eq!(decimal(f64::NAN, None), None);
        assert_eq!(decimal(1e300, None).and_then(|n| n.as_f64()), Some(1e300));
    }

    #[test]
    fn test_settings_reject_unusable_bases() {
        for base in [
            "",
            "ohx.example/fhir",
            "ftp://ohx.example",
            "https://",
            "https://a b",
            "https://x/?q",
            "https://x|y",
        ] {
            assert!(MapperSettings::new(base).is_err(), "{base}");
        }
        let unchecked = MapperSettings {
            identifier_base: "not a uri".to_owned(),
        };
        assert!(matches!(
            map_measurement(&bp(), &table(), &unchecked),
            Err(MappingError::InvalidSettings(_))
        ));
        let settings = MapperSettings::new("http://localhost:8080/fhir/").unwrap();
        assert_eq!(settings.base().unwrap(), "http://localhost:8080/fhir");
        assert_eq!(
            settings.source_uri("omron").unwrap(),
            "http://localhost:8080/fhir/source/omron"
        );
    }
}
