//! What a recording maps to beyond its Observation (research/fhir.md §1.2, ECG): its sample
//! series as a component with `valueSampledData`, the components that become Observations of
//! their own `derivedFrom` it (an ECG's heart rate), and a DiagnosticReport whose `result` is
//! them all and whose `conclusionCode` is the recording's coded classification (an ECG's
//! rhythm). The table says which data type has which (`waveform`, `linked`, `report`).
//!
//! Identities follow the recording's: a linked Observation's identifier value is the
//! recording's with `:{linked data type}` appended; the DiagnosticReport's is the recording's,
//! under `{base}/sid/diagnostic-report`.

use std::fmt::Write as _;

use ohx_common::records::{Component, Measurement, STATUS_ENTERED_IN_ERROR, Waveform};
use serde_json::{Map, Value, json};

use crate::map::{
    MappedResource, MapperSettings, MappingError, codings_json, decimal, find_unit, object,
    reference_to, resource_id,
};
use crate::mapping::{LinkedEntry, Mapping, MeasurementEntry, ReportEntry, WaveformEntry};

/// UCUM unit of a coded component (a classification): `1`.
pub const CODED_UNIT: &str = "1";

/// SampledData.dimensions of a single-lead series.
const DIMENSIONS: u32 = 1;

/// The recording's Observation, as the resources built here point to it.
pub struct Recording<'a> {
    pub id: &'a str,
    /// Its `identifier.value`.
    pub value: &'a str,
    /// Its `effective[x]` member (`effectiveDateTime` or `effectivePeriod`) and value.
    pub effective: (&'a str, &'a Value),
}

/// Appends the record's sample series to the Observation's components as `valueSampledData`.
/// A table entry with a waveform needs a record with one, and the other way round.
pub fn insert_waveform(
    obs: &mut Map<String, Value>,
    m: &Measurement,
    entry: &MeasurementEntry,
) -> Result<(), MappingError> {
    let (spec, waveform) = match (&entry.waveform, &m.waveform) {
        (None, None) => return Ok(()),
        (Some(spec), Some(waveform)) => (spec, waveform),
        _ => return Err(MappingError::InvalidField("waveform")),
    };
    let mut code = Map::new();
    code.insert("coding".to_owned(), codings_json(&spec.code));
    if let Some(text) = &spec.text {
        code.insert("text".to_owned(), json!(text));
    }
    let component = object([
        ("code", Value::Object(code)),
        ("valueSampledData", sampled_data(&m.data_type, waveform, spec)?),
    ]);
    match obs
        .entry("component")
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        Value::Array(components) => components.push(component),
        _ => return Err(MappingError::InvalidField("component")),
    }
    Ok(())
}

/// R5 SampledData of a series: `origin` in the series' unit, `interval` + `intervalUnit`,
/// `factor` when not 1, `dimensions` 1, `codeMap` for coded samples, `data` space-separated.
pub fn sampled_data(
    data_type: &str,
    w: &Waveform,
    spec: &WaveformEntry,
) -> Result<Value, MappingError> {
    let unit = find_unit(&spec.units, &w.unit).ok_or_else(|| MappingError::UnsupportedUnit {
        data_type: data_type.to_owned(),
        component: "waveform".to_owned(),
        unit: w.unit.clone(),
        allowed: spec.units.iter().map(|u| u.code.clone()).collect(),
    })?;
    let non_finite = || MappingError::NonFiniteValue {
        data_type: data_type.to_owned(),
        component: "waveform".to_owned(),
    };
    if !(w.interval > 0.0) || !matches!(w.interval_unit.as_str(), "ms" | "s") {
        return Err(MappingError::InvalidField("waveform.interval"));
    }
    if w.samples.is_empty() {
        return Err(MappingError::InvalidField("waveform.samples"));
    }
    let origin = decimal(w.origin, None).ok_or_else(non_finite)?;
    let interval = decimal(w.interval, Some(spec.interval_decimals)).ok_or_else(non_finite)?;
    let mut out = Map::new();
    out.insert(
        "origin".to_owned(),
        crate::map::quantity(origin, unit),
    );
    out.insert("interval".to_owned(), Value::Number(interval));
    out.insert("intervalUnit".to_owned(), json!(w.interval_unit));
    if let Some(factor) = w.factor.filter(|f| *f != 1.0) {
        if factor == 0.0 {
            return Err(MappingError::InvalidField("waveform.factor"));
        }
        let factor = decimal(factor, None).ok_or_else(non_finite)?;
        out.insert("factor".to_owned(), Value::Number(factor));
    }
    out.insert("dimensions".to_owned(), json!(DIMENSIONS));
    if let Some(code_map) = &w.code_map {
        out.insert("codeMap".to_owned(), json!(code_map));
    }
    out.insert("data".to_owned(), Value::String(data_text(&w.samples)));
    Ok(Value::Object(out))
}

/// The samples as SampledData `data`: decimal integers separated by single spaces.
pub fn data_text(samples: &[i32]) -> String {
    let mut text = String::with_capacity(samples.len() * 5);
    for (i, sample) in samples.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        // Writing into a String cannot fail.
        let _ = write!(text, "{sample}");
    }
    text
}

/// The Observations of the entry's `linked` components and its DiagnosticReport, in that
/// order. A linked component the record lacks gives no Observation, except in a retraction
/// (no components at all), which retracts every linked Observation and the report.
pub fn linked_and_report(
    m: &Measurement,
    entry: &MeasurementEntry,
    table: &Mapping,
    settings: &MapperSettings,
    recording: &Recording<'_>,
    device: Option<&Value>,
) -> Result<Vec<MappedResource>, MappingError> {
    let retracted = m.status.as_deref() == Some(STATUS_ENTERED_IN_ERROR);
    let observation_system = settings.observation_system()?;
    let recording_ref = reference_to("Observation", recording.id, &observation_system, recording.value);
    let mut out = Vec::with_capacity(entry.linked.len() + 1);
    for linked in &entry.linked {
        let component = m.components.iter().find(|c| c.code == linked.source);
        if component.is_none() && !retracted {
            continue;
        }
        out.push(linked_observation(m, linked, component, table, settings, &recording_ref, device)?);
    }
    if let Some(report) = &entry.report {
        let results: Vec<Value> = std::iter::once(recording_ref.clone())
            .chain(out.iter().map(|r| {
                let value = r.json["identifier"][0]["value"].as_str().unwrap_or_default();
                reference_to("Observation", &r.id, &observation_system, value)
            }))
            .collect();
        out.push(diagnostic_report(m, report, settings, recording, results)?);
    }
    Ok(out)
}

/// One linked component as an Observation of its own data type, `derivedFrom` the recording,
/// with the recording's time, device and status.
fn linked_observation(
    m: &Measurement,
    linked: &LinkedEntry,
    component: Option<&Component>,
    table: &Mapping,
    settings: &MapperSettings,
    recording_ref: &Value,
    device: Option<&Value>,
) -> Result<MappedResource, MappingError> {
    let entry = table
        .measurement(&linked.data_type)
        .ok_or_else(|| MappingError::UnknownDataType {
            kind: "measurement",
            data_type: linked.data_type.clone(),
        })?;
    let source = entry.value.as_ref().map(|v| v.source.clone()).unwrap_or_default();
    let part = Measurement {
        context: m.context.clone(),
        measurement_id: format!("{}:{}", m.measurement_id, linked.data_type),
        series_key: m.series_key.clone(),
        data_type: linked.data_type.clone(),
        aggregation: m.aggregation.clone(),
        effective_start: m.effective_start,
        effective_end: m.effective_end,
        utc_offset_seconds: m.utc_offset_seconds,
        components: component
            .map(|c| Component {
                code: source,
                ..c.clone()
            })
            .into_iter()
            .collect(),
        device: None,
        entry_method: m.entry_method.clone(),
        provider_group_id: m.provider_group_id.clone(),
        provider_modified_at: m.provider_modified_at,
        fetched_through: None,
        status: m.status.clone(),
        waveform: None,
    };
    let mut resource = crate::map::map_reading(&part, entry, settings, device)?;
    if let Some(obs) = resource.json.as_object_mut() {
        obs.insert("derivedFrom".to_owned(), json!([recording_ref]));
    }
    Ok(resource)
}

/// The DiagnosticReport of a recording: its code and category, the recording's subject and
/// time, `result` = the recording and its linked Observations, and the coded classification
/// as `conclusionCode`; `entered-in-error` without a conclusion when the record is a
/// retraction.
fn diagnostic_report(
    m: &Measurement,
    report: &ReportEntry,
    settings: &MapperSettings,
    recording: &Recording<'_>,
    results: Vec<Value>,
) -> Result<MappedResource, MappingError> {
    let ctx = &m.context;
    let system = settings.diagnostic_report_system()?;
    let id = resource_id("DiagnosticReport", &system, recording.value);
    let retracted = m.status.as_deref() == Some(STATUS_ENTERED_IN_ERROR);
    let mut dr = Map::new();
    dr.insert("resourceType".to_owned(), json!("DiagnosticReport"));
    dr.insert("id".to_owned(), json!(id));
    dr.insert(
        "meta".to_owned(),
        json!({ "source": settings.source_uri(&ctx.provider)? }),
    );
    dr.insert(
        "identifier".to_owned(),
        json!([{ "system": system, "value": recording.value }]),
    );
    dr.insert(
        "status".to_owned(),
        json!(if retracted { STATUS_ENTERED_IN_ERROR } else { "final" }),
    );
    dr.insert(
        "category".to_owned(),
        Value::Array(vec![object([("coding", codings_json(&report.category))])]),
    );
    dr.insert(
        "code".to_owned(),
        object([("coding", codings_json(&report.code))]),
    );
    dr.insert(
        "subject".to_owned(),
        json!({ "reference": ctx.patient_reference }),
    );
    dr.insert(recording.effective.0.to_owned(), recording.effective.1.clone());
    dr.insert("result".to_owned(), Value::Array(results));
    if let Some(conclusion) = report.conclusion.as_ref().filter(|_| !retracted) {
        let component = m
            .components
            .iter()
            .find(|c| c.code == conclusion.source)
            .ok_or_else(|| MappingError::MissingComponent {
                data_type: m.data_type.clone(),
                component: conclusion.source.clone(),
            })?;
        let unknown = || MappingError::UnmappedCode {
            data_type: m.data_type.clone(),
            component: conclusion.source.clone(),
        };
        if component.unit != CODED_UNIT
            || !component.value.is_finite()
            || component.value.fract() != 0.0
        {
            return Err(unknown());
        }
        let key = format!("{}", component.value as i64);
        let codings = conclusion.codes.get(&key).ok_or_else(unknown)?;
        dr.insert(
            "conclusionCode".to_owned(),
            json!([{ "coding": codings_json(codings) }]),
        );
    }
    Ok(MappedResource {
        resource_type: "DiagnosticReport".to_owned(),
        id,
        json: Value::Object(dr),
    })
}
