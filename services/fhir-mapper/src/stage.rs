//! The Kafka side of the fhir-mapper: maps INDIVIDUAL measurements and hourly aggregates to
//! FHIR R5 resources (rewritten as R4 for a target that speaks R4, see `r4`), validates each
//! against the JSON schema and profile rules of the target's version, and produces them keyed
//! by identity. A record that cannot be mapped, or whose resource is invalid, goes to the
//! dead-letter topic with the reason; the stage keeps going. A Device or DeviceAssociation the
//! broker already acknowledged with the same content is not emitted again (see `devices`).
//!
//! A patient with several EHR targets ([`Context::deliveries`]) gets every record mapped once
//! per target, each addressed to that target (its identity, its patient reference); should
//! one target's mapping fail, the record is dead-lettered with the target named, and a
//! re-drive repeats the targets already emitted, which the deduplicator finds unchanged.

use crate::devices::{
    BatchDevices, Built, DeviceInputs, Devices, content_hash, repeats_per_measurement,
};
use crate::map::{
    DeviceResources, MappedResource, MapperSettings, MappingError, canonical_json,
    map_aggregate_with, map_measurement_with,
};
use crate::mapping::Mapping;
use crate::r4::R4Rules;
use crate::validate::{FhirValidator, FhirVersion, SchemaError};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{
    AGGREGATION_HOURLY, Context, FhirResource, HourlyAggregate, Measurement, resource_identity,
    topic,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

static MAPPED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_resources_mapped",
        "FHIR resources mapped, by type and outcome (valid, invalid)",
    )
});

/// What both mapper loops share: the code table, settings, the R4 rules and a schema
/// validator per FHIR version.
#[derive(Debug)]
pub struct MapperCore {
    pub table: Mapping,
    pub settings: MapperSettings,
    pub r4_rules: R4Rules,
    /// R5.
    pub validator: FhirValidator,
    pub r4_validator: FhirValidator,
}

/// One input mapped for one target: what it came from and what it maps to (or why not).
struct Mapped<'a, T> {
    input: &'a Input<T>,
    context: &'a Context,
    source_id: &'a str,
    source_revision: i64,
    resources: Result<Vec<MappedResource>, MappingError>,
}

impl MapperCore {
    /// Compiles the validators of both versions, side by side (seconds: once, at start-up).
    pub fn new(
        table: Mapping,
        settings: MapperSettings,
        r4_rules: R4Rules,
    ) -> Result<Self, SchemaError> {
        let (validator, r4_validator) = std::thread::scope(|s| {
            let r4 = s.spawn(|| FhirValidator::new(FhirVersion::R4));
            let r5 = FhirValidator::new(FhirVersion::R5);
            let r4 = r4
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (r5, r4)
        });
        Ok(Self {
            table,
            settings,
            r4_rules,
            validator: validator?,
            r4_validator: r4_validator?,
        })
    }

    /// The resources in the target's FHIR version, with the validator of that version; the
    /// reason when they cannot be written in it.
    fn in_version(
        &self,
        resources: Vec<MappedResource>,
        version: &str,
    ) -> Result<(Vec<MappedResource>, &FhirValidator), String> {
        match FhirVersion::from_context(version) {
            Some(FhirVersion::R5) => Ok((resources, &self.validator)),
            Some(FhirVersion::R4) => match self.r4_rules.convert(resources) {
                Ok(r4) => Ok((r4, &self.r4_validator)),
                Err(e) => Err(format!("cannot be written as FHIR R4: {e}")),
            },
            None => Err(format!(
                "the target's FHIR version {version:?} is not R4 or R5"
            )),
        }
    }

    /// Validates and emits mapped resources, leaving out devices already acknowledged with the
    /// same content; a mapping error or an invalid resource dead-letters the input, naming the
    /// target (`ok` false). Returns every device resource built, emitted or not.
    async fn emit<T>(
        &self,
        mapped: Mapped<'_, T>,
        known: &Devices,
        batch: &mut BatchDevices,
        out: &mut Emitter,
    ) -> Result<Emitted, StageError> {
        let Mapped {
            input,
            context,
            source_id,
            source_revision,
            resources,
        } = mapped;
        let converted = match resources {
            Ok(r) => self.in_version(r, &context.fhir_version),
            Err(e) => Err(e.to_string()),
        };
        let (mut resources, validator) = match converted {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("{e}{}", for_target(context));
                out.dead_letter(input, "mapping", reason).await?;
                return Ok(Emitted::default());
            }
        };
        let mut devices = Vec::new();
        let mut built = Vec::new();
        resources.retain(|r| {
            if !repeats_per_measurement(&r.resource_type) {
                return true;
            }
            let identity = resource_identity(&context.ehr_target_id, &r.resource_type, &r.id);
            let hash = content_hash(&r.json);
            let wanted = batch.wanted(known, &identity, hash);
            built.push((identity.clone(), hash));
            if wanted {
                devices.push((identity, hash));
            }
            wanted
        });
        // Validate all first: a record either produces all its resources or none.
        for r in &resources {
            if let Err(e) = validator.validate_all(&r.json) {
                MAPPED.add(
                    1,
                    &[
                        KeyValue::new("type", r.resource_type.clone()),
                        KeyValue::new("outcome", "invalid"),
                    ],
                );
                out.dead_letter(
                    input,
                    "validation",
                    format!(
                        "{} {} is not valid FHIR {}{}: {e}",
                        r.resource_type,
                        r.id,
                        validator.version(),
                        for_target(context)
                    ),
                )
                .await?;
                return Ok(Emitted { ok: false, built });
            }
        }
        out.follow(input);
        for r in resources {
            MAPPED.add(
                1,
                &[
                    KeyValue::new("type", r.resource_type.clone()),
                    KeyValue::new("outcome", "valid"),
                ],
            );
            let identity = resource_identity(&context.ehr_target_id, &r.resource_type, &r.id);
            let record = FhirResource {
                context: context.clone(),
                identity: identity.clone(),
                resource_type: r.resource_type,
                resource_id: r.id,
                resource: canonical_json(&r.json),
                source_ids: vec![source_id.to_string()],
                source_revision,
            };
            out.emit(topic::FHIR_RESOURCES, &identity, &record).await?;
        }
        batch.emitted(devices);
        Ok(Emitted { ok: true, built })
    }

    /// Maps a record of `inputs` once for a target and emits it ([`MapperCore::emit`]): without
    /// its device resources when `memo` knows they would all be dropped, else with them, and
    /// `memo` learns what they were. Returns whether the record was emitted.
    async fn map_and_emit<'a, T: 'a>(
        &self,
        map: impl FnOnce(DeviceResources) -> Mapped<'a, T>,
        inputs: Option<DeviceInputs<'_>>,
        state: (&Devices, &mut Built),
        batch: &mut BatchDevices,
        out: &mut Emitter,
    ) -> Result<bool, StageError> {
        let (known, memo) = state;
        let devices = if memo.all_dropped(inputs.as_ref(), known, batch) {
            DeviceResources::Omit
        } else {
            DeviceResources::Build
        };
        let emitted = self.emit(map(devices), known, batch, out).await?;
        if let Some(inputs) = inputs
            && devices == DeviceResources::Build
            && !emitted.built.is_empty()
        {
            memo.remember(&inputs, emitted.built);
        }
        Ok(emitted.ok)
    }
}

/// What [`MapperCore::emit`] did: whether the record was emitted, and the device resources
/// (identity, content hash) its mapping built.
#[derive(Debug, Default)]
struct Emitted {
    ok: bool,
    built: Vec<(String, u64)>,
}

/// A record once per delivery of its patient ([`Context::per_delivery`]): itself when it goes
/// to its own target alone, otherwise a copy addressed to each target.
fn per_delivery<'a, T: Clone>(
    value: &'a T,
    context: &Context,
    readdress: fn(&mut T, Context),
) -> Vec<Cow<'a, T>> {
    if context.single_delivery() {
        return vec![Cow::Borrowed(value)];
    }
    context
        .per_delivery()
        .into_iter()
        .map(|c| {
            let mut v = value.clone();
            readdress(&mut v, c);
            Cow::Owned(v)
        })
        .collect()
}

/// ` for EHR target …`, naming the target in a dead letter's reason.
fn for_target(context: &Context) -> String {
    format!(" for EHR target {}", context.ehr_target_id)
}

/// Maps measurements that are not aggregated hourly.
#[derive(Debug, Clone)]
pub struct MeasurementMapper {
    core: Arc<MapperCore>,
    devices: Devices,
    built: Built,
}

impl MeasurementMapper {
    pub fn new(core: Arc<MapperCore>) -> Self {
        Self {
            core,
            devices: Devices::default(),
            built: Built::default(),
        }
    }
}

impl Processor for MeasurementMapper {
    type In = Measurement;
    /// The device contents emitted, learnt once acknowledged.
    type Change = Vec<(String, u64)>;

    async fn process(
        &mut self,
        batch: &[Input<Measurement>],
        out: &mut Emitter,
    ) -> Result<Self::Change, StageError> {
        let mut devices = BatchDevices::default();
        for input in batch {
            let m = &input.value;
            if m.aggregation == AGGREGATION_HOURLY {
                continue; // the hourly-aggregator's output is mapped instead
            }
            for m in per_delivery(m, &m.context, |m, c| m.context = c) {
                let core = &self.core;
                let map = |d| Mapped {
                    input,
                    context: &m.context,
                    source_id: &m.measurement_id,
                    source_revision: m.provider_modified_at.unwrap_or(0),
                    resources: map_measurement_with(&m, &core.table, &core.settings, d),
                };
                let inputs = DeviceInputs::of(&m.context, m.device.as_ref());
                let state = (&self.devices, &mut self.built);
                if !core
                    .map_and_emit(map, inputs, state, &mut devices, out)
                    .await?
                {
                    break;
                }
            }
        }
        Ok(devices.into_change())
    }

    async fn apply(&mut self, change: &Self::Change) -> Result<(), StageError> {
        self.devices.remember(change);
        Ok(())
    }
}

/// Maps hourly aggregates.
#[derive(Debug, Clone)]
pub struct AggregateMapper {
    core: Arc<MapperCore>,
    devices: Devices,
    built: Built,
}

impl AggregateMapper {
    pub fn new(core: Arc<MapperCore>) -> Self {
        Self {
            core,
            devices: Devices::default(),
            built: Built::default(),
        }
    }
}

impl Processor for AggregateMapper {
    type In = HourlyAggregate;
    /// The device contents emitted, learnt once acknowledged.
    type Change = Vec<(String, u64)>;

    async fn process(
        &mut self,
        batch: &[Input<HourlyAggregate>],
        out: &mut Emitter,
    ) -> Result<Self::Change, StageError> {
        let mut devices = BatchDevices::default();
        for input in batch {
            let a = &input.value;
            for a in per_delivery(a, &a.context, |a, c| a.context = c) {
                let core = &self.core;
                let map = |d| Mapped {
                    input,
                    context: &a.context,
                    source_id: &a.aggregate_id,
                    source_revision: a.revision,
                    resources: map_aggregate_with(&a, &core.table, &core.settings, d),
                };
                let inputs = DeviceInputs::of(&a.context, a.device.as_ref());
                let state = (&self.devices, &mut self.built);
                if !core
                    .map_and_emit(map, inputs, state, &mut devices, out)
                    .await?
                {
                    break;
                }
            }
        }
        Ok(devices.into_change())
    }

    async fn apply(&mut self, change: &Self::Change) -> Result<(), StageError> {
        self.devices.remember(change);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ohx_common::codec::Codec;
    use ohx_common::records::{AGGREGATION_INDIVIDUAL, Component, Delivery, Device};

    fn core() -> Arc<MapperCore> {
        static CORE: std::sync::OnceLock<Arc<MapperCore>> = std::sync::OnceLock::new();
        CORE.get_or_init(|| {
            Arc::new(
                MapperCore::new(
                    Mapping::default_table().unwrap(),
                    MapperSettings::new("https://ohx.example/fhir").unwrap(),
                    R4Rules::default_rules().unwrap(),
                )
                .unwrap(),
            )
        })
        .clone()
    }

    /// A weight from scale `device` (model `model`), measured at minute `n`.
    fn weight(n: i64, device: &str, model: &str) -> Input<Measurement> {
        let context = Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "42".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 1_790_000_000_000,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        };
        let value = Measurement {
            context,
            measurement_id: format!("withings:42:{n}:1"),
            series_key: "p/body_weight".into(),
            data_type: "body_weight".into(),
            aggregation: AGGREGATION_INDIVIDUAL.into(),
            effective_start: 1_790_000_000_000 + n * 60_000,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: "value".into(),
                value: 80.0 + n as f64 / 10.0,
                unit: "kg".into(),
                decimals: None,
            }],
            device: Some(Device {
                device_id: device.into(),
                model: Some(model.into()),
                model_id: Some("6".into()),
                manufacturer: None,
            }),
            entry_method: Some("device".into()),
            provider_group_id: Some(n.to_string()),
            provider_modified_at: Some(1_790_000_000_000),
            fetched_through: None,
            status: None,
            waveform: None,
        };
        Input {
            topic: topic::MEASUREMENTS.into(),
            partition: 0,
            offset: n,
            key: None,
            value,
            payload: vec![],
            headers: vec![],
        }
    }

    async fn types(
        mapper: &mut MeasurementMapper,
        batch: &[Input<Measurement>],
    ) -> (Vec<String>, Vec<(String, u64)>) {
        let mut out = Emitter::new("fhir-mapper", Arc::new(Codec::embedded().unwrap()));
        let change = mapper.process(batch, &mut out).await.unwrap();
        let codec = Codec::embedded().unwrap();
        let mut types = Vec::new();
        for r in out.records() {
            let res: FhirResource = codec.decode(&r.payload).await.unwrap();
            types.push(res.resource_type);
        }
        (types, change)
    }

    #[tokio::test]
    async fn test_a_device_is_emitted_once_per_content_and_only_learnt_through_apply() {
        let mut mapper = MeasurementMapper::new(core());
        // Two weigh-ins of one scale in one batch: its Device and DeviceAssociation once.
        let (first, change) = types(
            &mut mapper,
            &[weight(0, "scale", "Body+"), weight(1, "scale", "Body+")],
        )
        .await;
        assert_eq!(
            first,
            ["Device", "DeviceAssociation", "Observation", "Observation"]
        );
        // Not acknowledged (no apply): a retry of the batch emits them again.
        let (retried, _) = types(&mut mapper, &[weight(0, "scale", "Body+")]).await;
        assert_eq!(retried, ["Device", "DeviceAssociation", "Observation"]);
        // Acknowledged: later weigh-ins emit their Observation only.
        mapper.apply(&change).await.unwrap();
        let (later, nothing_new) = types(&mut mapper, &[weight(2, "scale", "Body+")]).await;
        assert_eq!(later, ["Observation"]);
        assert!(nothing_new.is_empty());
        // A changed device (new model name) is emitted again, the association is not.
        let (renamed, _) = types(&mut mapper, &[weight(3, "scale", "Body Smart")]).await;
        assert_eq!(renamed, ["Device", "Observation"]);
        // Another scale is another device.
        let (other, _) = types(&mut mapper, &[weight(4, "scale-2", "Body+")]).await;
        assert_eq!(other, ["Device", "DeviceAssociation", "Observation"]);
    }

    /// Once its device resources are acknowledged, a weigh-in is mapped without building them,
    /// and its Observation is byte for byte the one mapped with them (device reference
    /// included).
    #[tokio::test]
    async fn test_an_observation_mapped_without_its_device_resources_is_the_same() {
        let mut mapper = MeasurementMapper::new(core());
        let (_, change) = types(&mut mapper, &[weight(0, "scale", "Body+")]).await;
        mapper.apply(&change).await.unwrap();
        let later = weight(1, "scale", "Body+");
        let out = emitted(&mut mapper, std::slice::from_ref(&later)).await;
        let codec = Codec::embedded().unwrap();
        let records: Vec<&ohx_common::kafka::OutRecord> = out.records().collect();
        assert_eq!(records.len(), 1);
        let observation: FhirResource = codec.decode(&records[0].payload).await.unwrap();
        let core = core();
        let full = crate::map::map_measurement(&later.value, &core.table, &core.settings).unwrap();
        assert_eq!(full.len(), 3, "built with its Device and DeviceAssociation");
        assert_eq!(observation.resource, full[2].canonical_json());
        assert!(observation.resource.contains("\"device\""));
    }

    /// `input` addressed to its own target and to `t2` as `reference`.
    fn with_second_target(mut input: Input<Measurement>, reference: &str) -> Input<Measurement> {
        let c = &mut input.value.context;
        c.deliveries = vec![
            Delivery {
                ehr_target_id: c.ehr_target_id.clone(),
                patient_reference: c.patient_reference.clone(),
                fhir_version: ohx_common::records::FHIR_R5.into(),
            },
            Delivery {
                ehr_target_id: "t2".into(),
                patient_reference: reference.into(),
                fhir_version: ohx_common::records::FHIR_R5.into(),
            },
        ];
        input
    }

    async fn emitted(mapper: &mut MeasurementMapper, batch: &[Input<Measurement>]) -> Emitter {
        let mut out = Emitter::new("fhir-mapper", Arc::new(Codec::embedded().unwrap()));
        mapper.process(batch, &mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn test_a_patient_with_two_targets_gets_every_resource_once_per_target() {
        let mut mapper = MeasurementMapper::new(core());
        let input = with_second_target(weight(0, "scale", "Body+"), "Patient/abc");
        let out = emitted(&mut mapper, &[input]).await;
        let codec = Codec::embedded().unwrap();
        let mut per_target: std::collections::BTreeMap<String, Vec<FhirResource>> =
            Default::default();
        for r in out.records() {
            assert_eq!(r.topic, topic::FHIR_RESOURCES);
            let res: FhirResource = codec.decode(&r.payload).await.unwrap();
            assert_eq!(r.key.as_deref(), Some(res.identity.as_bytes()));
            per_target
                .entry(res.context.ehr_target_id.clone())
                .or_default()
                .push(res);
        }
        assert_eq!(per_target.keys().collect::<Vec<_>>(), ["t", "t2"]);
        let (own, second) = (&per_target["t"], &per_target["t2"]);
        let kinds = |v: &[FhirResource]| -> Vec<String> {
            v.iter().map(|r| r.resource_type.clone()).collect()
        };
        assert_eq!(kinds(own), ["Device", "DeviceAssociation", "Observation"]);
        assert_eq!(kinds(second), kinds(own));
        for (a, b) in own.iter().zip(second) {
            // Same resource id, its own identity and context per target.
            assert_eq!(a.resource_id, b.resource_id);
            assert_eq!(
                a.identity,
                format!("t/{}/{}", a.resource_type, a.resource_id)
            );
            assert_eq!(
                b.identity,
                format!("t2/{}/{}", b.resource_type, b.resource_id)
            );
            assert!(a.context.deliveries.is_empty() && b.context.deliveries.is_empty());
            assert_eq!(b.context.patient_reference, "Patient/abc");
        }
        // The Observation's subject is each EHR's patient; the rest is the same.
        let obs =
            |r: &FhirResource| -> serde_json::Value { serde_json::from_str(&r.resource).unwrap() };
        let (mut a, mut b) = (obs(&own[2]), obs(&second[2]));
        assert_eq!(a["subject"]["reference"], "Patient/1");
        assert_eq!(b["subject"]["reference"], "Patient/abc");
        a["subject"] = serde_json::Value::Null;
        b["subject"] = serde_json::Value::Null;
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn test_a_target_that_cannot_be_mapped_dead_letters_the_record_naming_it() {
        let mut mapper = MeasurementMapper::new(core());
        // The second target's patient reference is empty: that mapping fails.
        let input = with_second_target(weight(0, "scale", "Body+"), "");
        let out = emitted(&mut mapper, &[input]).await;
        let codec = Codec::embedded().unwrap();
        let mut delivered = Vec::new();
        let mut dead = Vec::new();
        for r in out.records() {
            if r.topic == topic::DEAD_LETTER {
                let dl: ohx_common::records::DeadLetter = codec.decode(&r.payload).await.unwrap();
                dead.push(dl);
            } else {
                let res: FhirResource = codec.decode(&r.payload).await.unwrap();
                delivered.push(res.identity);
            }
        }
        assert_eq!(dead.len(), 1, "one dead letter for the record");
        assert_eq!(dead[0].error_kind, "mapping");
        assert!(
            dead[0].reason.ends_with("for EHR target t2"),
            "{}",
            dead[0].reason
        );
        assert!(
            delivered.iter().all(|i| i.starts_with("t/")),
            "{delivered:?}"
        );
        assert_eq!(delivered.len(), 3);
    }

    async fn resources_by_target(
        out: &Emitter,
    ) -> std::collections::BTreeMap<String, Vec<(String, serde_json::Value)>> {
        let codec = Codec::embedded().unwrap();
        let mut per_target: std::collections::BTreeMap<_, Vec<_>> = Default::default();
        for r in out.records() {
            assert_eq!(r.topic, topic::FHIR_RESOURCES);
            let res: FhirResource = codec.decode(&r.payload).await.unwrap();
            let json: serde_json::Value = serde_json::from_str(&res.resource).unwrap();
            per_target
                .entry(res.context.ehr_target_id.clone())
                .or_default()
                .push((res.resource_type, json));
        }
        per_target
    }

    #[tokio::test]
    async fn test_an_r4_target_gets_r4_resources_and_an_r5_target_r5_from_one_record() {
        let mut mapper = MeasurementMapper::new(core());
        let mut input = with_second_target(weight(0, "scale", "Body+"), "Patient/abc");
        input.value.context.deliveries[1].fhir_version = ohx_common::records::FHIR_R4.into();
        let out = emitted(&mut mapper, &[input]).await;
        let per_target = resources_by_target(&out).await;
        let kinds =
            |t: &str| -> Vec<&str> { per_target[t].iter().map(|(k, _)| k.as_str()).collect() };
        assert_eq!(kinds("t"), ["Device", "DeviceAssociation", "Observation"]);
        assert_eq!(
            kinds("t2"),
            ["Device", "Observation"],
            "R4 has no DeviceAssociation"
        );
        let (r5_device, r4_device) = (&per_target["t"][0].1, &per_target["t2"][0].1);
        assert!(r5_device.get("name").is_some() && r5_device.get("patient").is_none());
        assert_eq!(r4_device["patient"]["reference"], "Patient/abc");
        assert_eq!(
            r4_device["deviceName"][0]["name"],
            r5_device["name"][0]["value"]
        );
        assert_eq!(
            r4_device["id"], r5_device["id"],
            "one identity in both versions"
        );
        assert_eq!(per_target["t2"][1].1["subject"]["reference"], "Patient/abc");
    }

    #[tokio::test]
    async fn test_a_record_for_an_r4_target_alone_is_written_as_r4() {
        let mut mapper = MeasurementMapper::new(core());
        let mut input = weight(0, "scale", "Body+");
        input.value.context.fhir_version = ohx_common::records::FHIR_R4.into();
        let out = emitted(&mut mapper, &[input]).await;
        let per_target = resources_by_target(&out).await;
        let kinds: Vec<&str> = per_target["t"].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["Device", "Observation"]);
        assert_eq!(per_target["t"][0].1["patient"]["reference"], "Patient/1");
    }

    #[tokio::test]
    async fn test_an_unknown_fhir_version_dead_letters_the_record_naming_it() {
        let mut mapper = MeasurementMapper::new(core());
        let mut input = weight(0, "scale", "Body+");
        input.value.context.fhir_version = "STU3".into();
        let out = emitted(&mut mapper, &[input]).await;
        let codec = Codec::embedded().unwrap();
        let records: Vec<_> = out.records().collect();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].topic, topic::DEAD_LETTER);
        let dl: ohx_common::records::DeadLetter = codec.decode(&records[0].payload).await.unwrap();
        assert_eq!(dl.error_kind, "mapping");
        assert!(
            dl.reason.contains("\"STU3\" is not R4 or R5"),
            "{}",
            dl.reason
        );
    }
}
