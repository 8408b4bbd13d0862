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
use crate::mapping::{Coding, LinkedEntry, Mapping, MeasurementEntry, ReportEntry, WaveformEntry};
use std::collections::BTreeMap;

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
        (
            "valueSampledData",
            sampled_data(&m.data_type, waveform, spec)?,
        ),
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
    if !w.interval.is_finite()
        || w.interval <= 0.0
        || !matches!(w.interval_unit.as_str(), "ms" | "s")
    {
        return Err(MappingError::InvalidField("waveform.interval"));
    }
    if w.samples.is_empty() {
        return Err(MappingError::InvalidField("waveform.samples"));
    }
    if spec.coded != w.code_map.is_some() {
        return Err(MappingError::InvalidField("waveform.code_map"));
    }
    let origin = decimal(w.origin, None).ok_or_else(non_finite)?;
    let interval = decimal(w.interval, Some(spec.interval_decimals)).ok_or_else(non_finite)?;
    let mut out = Map::new();
    out.insert("origin".to_owned(), crate::map::quantity(origin, unit));
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

/// A coded component (an integer with unit [`CODED_UNIT`]) as the CodeableConcept of its
/// value in `codes`; any other value or unit is [`MappingError::UnmappedCode`].
pub(crate) fn coded_value(
    data_type: &str,
    component: &Component,
    codes: &BTreeMap<String, Vec<Coding>>,
) -> Result<Value, MappingError> {
    let unknown = || MappingError::UnmappedCode {
        data_type: data_type.to_owned(),
        component: component.code.clone(),
    };
    if component.unit != CODED_UNIT
        || !component.value.is_finite()
        || component.value.fract() != 0.0
    {
        return Err(unknown());
    }
    let key = format!("{}", component.value as i64);
    let codings = codes.get(&key).ok_or_else(unknown)?;
    Ok(json!({ "coding": codings_json(codings) }))
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
    let recording_ref = reference_to(
        "Observation",
        recording.id,
        &observation_system,
        recording.value,
    );
    let mut out = Vec::with_capacity(entry.linked.len() + 1);
    for linked in &entry.linked {
        let component = m.components.iter().find(|c| c.code == linked.source);
        if component.is_none() && !retracted {
            continue;
        }
        out.push(linked_observation(
            m,
            linked,
            component,
            table,
            settings,
            &recording_ref,
            device,
        )?);
    }
    if let Some(report) = &entry.report {
        let results: Vec<Value> = std::iter::once(recording_ref.clone())
            .chain(out.iter().map(|r| {
                let value = r.json["identifier"][0]["value"]
                    .as_str()
                    .unwrap_or_default();
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
    let entry =
        table
            .measurement(&linked.data_type)
            .ok_or_else(|| MappingError::UnknownDataType {
                kind: "measurement",
                data_type: linked.data_type.clone(),
            })?;
    let source = entry
        .value
        .as_ref()
        .map(|v| v.source.clone())
        .unwrap_or_default();
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
        json!(if retracted {
            STATUS_ENTERED_IN_ERROR
        } else {
            "final"
        }),
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
    dr.insert(
        recording.effective.0.to_owned(),
        recording.effective.1.clone(),
    );
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
        let concept = coded_value(&m.data_type, component, &conclusion.codes)?;
        dr.insert("conclusionCode".to_owned(), Value::Array(vec![concept]));
    }
    Ok(MappedResource {
        resource_type: "DiagnosticReport".to_owned(),
        id,
        json: Value::Object(dr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{MappedResource, map_measurement};
    use crate::r4::R4Rules;
    use crate::validate::{FhirValidator, FhirVersion, shared_test_validator};
    use ohx_common::records::{AGGREGATION_INDIVIDUAL, Context, Device};

    const START_MS: i64 = 1_752_509_738_000;

    fn ctx() -> Context {
        Context {
            organization_id: "org-1".to_owned(),
            ehr_target_id: "ehr-1".to_owned(),
            patient_id: "p-1".to_owned(),
            patient_reference: "Patient/123".to_owned(),
            provider: "withings".to_owned(),
            link_id: "link-1".to_owned(),
            provider_user_id: "u12345".to_owned(),
            sync_request_id: "sync-1".to_owned(),
            trigger: "WEBHOOK".to_owned(),
            received_at: START_MS,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn part(code: &str, value: f64, unit: &str) -> Component {
        Component {
            code: code.to_owned(),
            value,
            unit: unit.to_owned(),
            decimals: None,
        }
    }

    /// A 30 s ScanWatch recording at 300 Hz, in µV, with its rhythm code and heart rate.
    fn ecg(rhythm: f64) -> Measurement {
        let samples: Vec<i32> = (0..9000).map(|i| (i % 97) * 13 - 600).collect();
        Measurement {
            context: ctx(),
            measurement_id: "withings:u12345:ecg:557124430".to_owned(),
            series_key: "p-1/withings/ecg".to_owned(),
            data_type: "ecg".to_owned(),
            aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
            effective_start: START_MS,
            effective_end: Some(START_MS + 30_000),
            utc_offset_seconds: Some(7200),
            components: vec![
                part("rhythm", rhythm, "1"),
                part("heart_rate", 71.0, "/min"),
            ],
            device: Some(Device {
                device_id: "dev-sw".to_owned(),
                model: Some("ScanWatch".to_owned()),
                model_id: Some("94".to_owned()),
                manufacturer: Some("Withings".to_owned()),
            }),
            entry_method: Some("device".to_owned()),
            provider_group_id: Some("557124430".to_owned()),
            provider_modified_at: Some(START_MS + 40_000),
            fetched_through: None,
            status: None,
            waveform: Some(Waveform {
                unit: "uV".to_owned(),
                origin: 0.0,
                factor: None,
                interval: 1000.0 / 300.0,
                interval_unit: "ms".to_owned(),
                samples,
                code_map: None,
            }),
        }
    }

    fn map(m: &Measurement) -> Result<Vec<MappedResource>, MappingError> {
        let table = Mapping::default_table().unwrap();
        map_measurement(
            m,
            &table,
            &MapperSettings::new("https://ohx.example/fhir").unwrap(),
        )
    }

    fn kinds(resources: &[MappedResource]) -> Vec<&str> {
        resources.iter().map(|r| r.resource_type.as_str()).collect()
    }

    #[test]
    fn test_an_ecg_maps_to_its_study_heart_rate_and_report_valid_in_r5_and_r4() {
        let m = ecg(2.0);
        let all = map(&m).unwrap();
        assert_eq!(
            kinds(&all),
            [
                "Device",
                "DeviceAssociation",
                "Observation",
                "Observation",
                "DiagnosticReport"
            ]
        );
        let (study, rate, report) = (&all[2].json, &all[3].json, &all[4].json);

        assert_eq!(study["code"]["coding"][0]["code"], "11524-6");
        assert_eq!(study["category"][0]["coding"][0]["code"], "procedure");
        let period =
            json!({"start": "2025-07-14T18:15:38+02:00", "end": "2025-07-14T18:16:08+02:00"});
        assert_eq!(study["effectivePeriod"], period);
        assert_eq!(
            study["device"]["reference"],
            format!("Device/{}", all[0].id)
        );
        let lead = &study["component"][0];
        assert_eq!(lead["code"]["coding"][0]["code"], "131329");
        let sampled = &lead["valueSampledData"];
        assert_eq!(
            sampled["origin"],
            json!({"value": 0, "unit": "µV", "system": "http://unitsofmeasure.org", "code": "uV"})
        );
        assert_eq!(sampled["interval"].to_string(), "3.333333");
        assert_eq!(sampled["intervalUnit"], "ms");
        assert_eq!(sampled["dimensions"], 1);
        assert!(sampled.get("factor").is_none(), "factor 1 is left out");
        let data: Vec<i32> = sampled["data"]
            .as_str()
            .unwrap()
            .split(' ')
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            data,
            m.waveform.as_ref().unwrap().samples,
            "every sample, in order"
        );
        assert!(study.get("valueQuantity").is_none());

        assert_eq!(rate["code"]["coding"][0]["code"], "8867-4");
        assert_eq!(rate["code"]["coding"][1]["code"], "147842");
        assert_eq!(rate["valueQuantity"]["value"], 71);
        assert_eq!(rate["valueQuantity"]["code"], "/min");
        assert_eq!(rate["effectivePeriod"], period);
        assert_eq!(rate["device"], study["device"]);
        assert_eq!(
            rate["derivedFrom"][0]["reference"],
            format!("Observation/{}", all[2].id)
        );
        assert_eq!(
            rate["identifier"][0]["value"],
            format!(
                "{}:ecg_heart_rate",
                study["identifier"][0]["value"].as_str().unwrap()
            )
        );
        assert_ne!(all[3].id, all[2].id);

        assert_eq!(report["status"], "final");
        assert_eq!(report["code"]["coding"][0]["code"], "11524-6");
        assert_eq!(report["category"][0]["coding"][0]["code"], "EC");
        assert_eq!(report["subject"]["reference"], "Patient/123");
        assert_eq!(report["effectivePeriod"], period);
        let results: Vec<&str> = report["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reference"].as_str().unwrap())
            .collect();
        assert_eq!(
            results,
            [
                format!("Observation/{}", all[2].id),
                format!("Observation/{}", all[3].id)
            ]
        );
        assert_eq!(
            report["result"][1]["identifier"]["value"],
            rate["identifier"][0]["value"]
        );
        assert_eq!(
            report["conclusionCode"][0]["coding"][0],
            json!({"system": "http://snomed.info/sct", "code": "164889003",
                   "display": "Electrocardiographic atrial fibrillation"})
        );

        for resource in &all {
            if let Err(e) = shared_test_validator().validate_all(&resource.json) {
                panic!("{} invalid in R5: {e}", resource.resource_type);
            }
        }
        let r4 = R4Rules::default_rules().unwrap().convert(all).unwrap();
        assert_eq!(
            kinds(&r4),
            ["Device", "Observation", "Observation", "DiagnosticReport"]
        );
        let sampled = &r4[1].json["component"][0]["valueSampledData"];
        assert_eq!(sampled["period"].to_string(), "3.333333");
        assert!(sampled.get("interval").is_none() && sampled.get("intervalUnit").is_none());
        let validator = FhirValidator::new(FhirVersion::R4).unwrap();
        for resource in &r4 {
            if let Err(e) = validator.validate_all(&resource.json) {
                panic!(
                    "{} invalid in R4: {e}\n{:#}",
                    resource.resource_type, resource.json
                );
            }
        }
    }

    #[test]
    fn test_every_rhythm_code_has_a_conclusion_and_any_other_is_refused() {
        let mut seen = Vec::new();
        for rhythm in 1..=7 {
            let all = map(&ecg(f64::from(rhythm))).unwrap();
            let coding = all[4].json["conclusionCode"][0]["coding"][0].clone();
            assert!(coding["code"].is_string(), "{rhythm}");
            assert!(!seen.contains(&coding), "{rhythm} shares a code");
            seen.push(coding);
        }
        assert_eq!(seen[0]["code"], "64730000");
        for bad in [0.0, 8.0, 2.5, f64::NAN] {
            assert!(
                matches!(map(&ecg(bad)), Err(MappingError::UnmappedCode { .. })),
                "{bad}"
            );
        }
        let mut percent = ecg(1.0);
        percent.components[0].unit = "%".to_owned();
        assert!(matches!(
            map(&percent),
            Err(MappingError::UnmappedCode { .. })
        ));
        let mut without = ecg(1.0);
        without.components.remove(0);
        assert!(matches!(
            map(&without),
            Err(MappingError::MissingComponent { .. })
        ));
    }

    #[test]
    fn test_an_ecg_without_heart_rate_has_no_heart_rate_observation() {
        let mut m = ecg(1.0);
        m.components.pop();
        let all = map(&m).unwrap();
        assert_eq!(
            kinds(&all),
            [
                "Device",
                "DeviceAssociation",
                "Observation",
                "DiagnosticReport"
            ]
        );
        assert_eq!(all[3].json["result"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn test_a_waveform_must_match_the_table_and_be_usable() {
        let mut none = ecg(1.0);
        none.waveform = None;
        assert!(matches!(
            map(&none),
            Err(MappingError::InvalidField("waveform"))
        ));

        let mut weight = ecg(1.0);
        weight.data_type = "body_weight".to_owned();
        weight.components = vec![part("value", 70.0, "kg")];
        assert!(matches!(
            map(&weight),
            Err(MappingError::InvalidField("waveform"))
        ));

        type Breaking = fn(&mut Waveform);
        let broken: [(Breaking, &str); 5] = [
            (|w| w.unit = "mm[Hg]".to_owned(), "unit"),
            (|w| w.interval = 0.0, "interval"),
            (|w| w.interval_unit = "min".to_owned(), "interval unit"),
            (|w| w.samples.clear(), "samples"),
            (|w| w.factor = Some(0.0), "factor"),
        ];
        for (breaking, what) in broken {
            let mut m = ecg(1.0);
            breaking(m.waveform.as_mut().unwrap());
            assert!(map(&m).is_err(), "{what}");
        }
        let mut scaled = ecg(1.0);
        if let Some(w) = scaled.waveform.as_mut() {
            w.unit = "mV".to_owned();
            w.factor = Some(0.001);
            w.interval = 2.0;
        }
        let all = map(&scaled).unwrap();
        let sampled = &all[2].json["component"][0]["valueSampledData"];
        assert_eq!(sampled["factor"].to_string(), "0.001");
        assert_eq!(sampled["interval"], 2);
        assert_eq!(sampled["origin"]["code"], "mV");
    }

    #[test]
    fn test_an_ecg_retraction_retracts_its_heart_rate_and_report_under_their_ids() {
        let reading = map(&ecg(2.0)).unwrap();
        let mut gone = ecg(2.0);
        gone.status = Some(STATUS_ENTERED_IN_ERROR.to_owned());
        gone.components.clear();
        gone.device = None;
        gone.waveform = None;
        let retracted = map(&gone).unwrap();
        assert_eq!(
            kinds(&retracted),
            ["Observation", "Observation", "DiagnosticReport"]
        );
        for (r, was) in retracted.iter().zip(&reading[2..]) {
            assert_eq!(r.id, was.id);
            assert_eq!(r.json["status"], "entered-in-error");
        }
        assert!(retracted[2].json.get("conclusionCode").is_none());
        assert_eq!(retracted[2].json["result"], reading[4].json["result"]);
        for resource in &retracted {
            shared_test_validator()
                .validate_all(&resource.json)
                .unwrap();
        }
    }

    /// A night's hypnogram as the fetcher emits it: stage codes every 30 s, with their
    /// ConceptMap.
    fn hypnogram() -> Measurement {
        let mut m = ecg(1.0);
        m.measurement_id = "withings:u12345:hypnogram:2081804182".to_owned();
        m.data_type = "sleep_hypnogram".to_owned();
        m.components.clear();
        m.effective_end = Some(START_MS + 600_000);
        m.waveform = Some(Waveform {
            unit: "1".to_owned(),
            origin: 0.0,
            factor: None,
            interval: 30.0,
            interval_unit: "s".to_owned(),
            samples: vec![1, 1, 2, 2, 3, 4, 0, 5, 4, 4],
            code_map: Some("https://ohx.example/fhir/ConceptMap/sleep-stage".to_owned()),
        });
        m
    }

    #[test]
    fn test_a_hypnogram_is_coded_sampled_data_with_its_code_map_in_r5_and_r4() {
        let all = map(&hypnogram()).unwrap();
        assert_eq!(kinds(&all), ["Device", "DeviceAssociation", "Observation"]);
        let obs = &all[2].json;
        assert_eq!(obs["code"]["coding"][0]["code"], "sleep-hypnogram");
        assert_eq!(obs["category"][0]["coding"][0]["code"], "activity");
        let sampled = &obs["component"][0]["valueSampledData"];
        assert_eq!(
            sampled,
            &json!({"origin": {"value": 0, "unit": "stage", "system": "http://unitsofmeasure.org", "code": "1"},
                    "interval": 30, "intervalUnit": "s", "dimensions": 1,
                    "codeMap": "https://ohx.example/fhir/ConceptMap/sleep-stage",
                    "data": "1 1 2 2 3 4 0 5 4 4"})
        );
        shared_test_validator().validate_all(obs).unwrap();
        let r4 = R4Rules::default_rules().unwrap().convert(all).unwrap();
        let sampled = &r4[1].json["component"][0]["valueSampledData"];
        assert_eq!(sampled["period"], 30000, "R4: the interval in ms");
        assert_eq!(
            sampled["extension"][0]["url"],
            "http://hl7.org/fhir/5.0/StructureDefinition/extension-SampledData.codeMap"
        );
        FhirValidator::new(FhirVersion::R4)
            .unwrap()
            .validate_all(&r4[1].json)
            .unwrap();
        // Codes without their ConceptMap, or an ECG with one, mean nothing: refused.
        let mut uncoded = hypnogram();
        uncoded.waveform.as_mut().unwrap().code_map = None;
        assert!(matches!(
            map(&uncoded),
            Err(MappingError::InvalidField("waveform.code_map"))
        ));
        let mut coded_ecg = ecg(1.0);
        coded_ecg.waveform.as_mut().unwrap().code_map = Some("https://x/cm".to_owned());
        assert!(map(&coded_ecg).is_err());
    }

    #[test]
    fn test_an_afib_result_is_a_coded_value_for_each_of_its_codes_and_refused_otherwise() {
        let result = |value: f64, unit: &str| {
            let mut m = ecg(1.0);
            m.data_type = "afib_result".to_owned();
            m.measurement_id = "withings:u12345:98765:130".to_owned();
            m.effective_end = None;
            m.waveform = None;
            m.components = vec![part("value", value, unit)];
            map(&m)
        };
        let validator = FhirValidator::new(FhirVersion::R4).unwrap();
        let mut seen = Vec::new();
        for code in 0..=13 {
            let all = result(f64::from(code), "1").unwrap();
            let obs = &all[2].json;
            let concept = &obs["valueCodeableConcept"];
            assert!(obs.get("valueQuantity").is_none());
            assert_eq!(
                concept["coding"][0]["system"],
                "https://ohx.example/fhir/CodeSystem/withings-afib-result"
            );
            assert!(!seen.contains(concept), "{code} shares a concept");
            seen.push(concept.clone());
            shared_test_validator().validate_all(obs).unwrap();
            let r4 = R4Rules::default_rules().unwrap().convert(all).unwrap();
            validator.validate_all(&r4[1].json).unwrap();
        }
        for positive in [1, 11, 12] {
            assert_eq!(
                seen[positive]["coding"][1]["code"], "164889003",
                "{positive}"
            );
        }
        assert_eq!(seen[0]["coding"].as_array().unwrap().len(), 1);
        for (value, unit) in [(14.0, "1"), (1.5, "1"), (-1.0, "1"), (1.0, "%")] {
            assert!(
                matches!(result(value, unit), Err(MappingError::UnmappedCode { .. })),
                "{value} {unit}"
            );
        }
    }

    #[test]
    fn test_data_text_is_the_samples_space_separated() {
        assert_eq!(data_text(&[-20, 0, 20, i32::MIN]), "-20 0 20 -2147483648");
        assert_eq!(data_text(&[7]), "7");
    }
}
