//! Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the Avro
//! binary body. Schema ids come from a registry:
//!
//! * `embedded` (default): ids pinned in `schemas/registry.toml`, no server; for single-node use
//!   and tests.
//! * `http://…`: any Confluent-compatible registry (Redpanda, Confluent, Karapace, Apicurio),
//!   through `schema_registry_converter`; subjects follow the TopicNameStrategy (`<topic>-value`)
//!   and schemas are registered on first use.
//!
//! Records are always read with the schema compiled into this binary (the reader schema), so
//! records written with an older, compatible schema decode too. Records written with the
//! binary's own schema (nearly all) are serialized and deserialized straight between the Rust
//! value and Avro binary by `serde_avro_fast`, in one walk, without the intermediate `Value`
//! tree or per-field name lookups; only an older writer schema goes through apache-avro's
//! schema resolution.

use crate::records::Record;
use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// The `.avsc` files of `schemas/`, compiled in.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "sync_request.avsc",
        include_str!("../../../schemas/sync_request.avsc"),
    ),
    (
        "measurement.avsc",
        include_str!("../../../schemas/measurement.avsc"),
    ),
    (
        "measurement_v2.avsc",
        include_str!("../../../schemas/measurement_v2.avsc"),
    ),
    (
        "hourly_aggregate.avsc",
        include_str!("../../../schemas/hourly_aggregate.avsc"),
    ),
    (
        "fhir_resource.avsc",
        include_str!("../../../schemas/fhir_resource.avsc"),
    ),
    (
        "sync_request_v2.avsc",
        include_str!("../../../schemas/sync_request_v2.avsc"),
    ),
    (
        "measurement_v3.avsc",
        include_str!("../../../schemas/measurement_v3.avsc"),
    ),
    (
        "hourly_aggregate_v2.avsc",
        include_str!("../../../schemas/hourly_aggregate_v2.avsc"),
    ),
    (
        "fhir_resource_v2.avsc",
        include_str!("../../../schemas/fhir_resource_v2.avsc"),
    ),
    (
        "sync_request_v3.avsc",
        include_str!("../../../schemas/sync_request_v3.avsc"),
    ),
    (
        "measurement_v4.avsc",
        include_str!("../../../schemas/measurement_v4.avsc"),
    ),
    (
        "hourly_aggregate_v3.avsc",
        include_str!("../../../schemas/hourly_aggregate_v3.avsc"),
    ),
    (
        "fhir_resource_v3.avsc",
        include_str!("../../../schemas/fhir_resource_v3.avsc"),
    ),
    (
        "measurement_v5.avsc",
        include_str!("../../../schemas/measurement_v5.avsc"),
    ),
    (
        "measurement_v6.avsc",
        include_str!("../../../schemas/measurement_v6.avsc"),
    ),
    (
        "dedup_state.avsc",
        include_str!("../../../schemas/dedup_state.avsc"),
    ),
    (
        "publish_result.avsc",
        include_str!("../../../schemas/publish_result.avsc"),
    ),
    (
        "dead_letter.avsc",
        include_str!("../../../schemas/dead_letter.avsc"),
    ),
];

/// The pinned ids of the embedded registry.
pub const REGISTRY_TOML: &str = include_str!("../../../schemas/registry.toml");

/// A record that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("schema {0} is unknown")]
    UnknownSchema(String),
    #[error("schema id {0} is unknown")]
    UnknownSchemaId(u32),
    #[error("not in the Confluent wire format (magic byte and schema id missing)")]
    NotConfluent,
    #[error("avro: {0}")]
    Avro(String),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("invalid schema configuration: {0}")]
    Config(String),
}

impl CodecError {
    /// Returns whether retrying could help (registry unreachable), as opposed to bad bytes.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }
}

struct Http {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Whether a registry id's schema is this binary's schema for the record (fast path).
    own: RwLock<HashMap<u32, bool>>,
}

/// Schemas by file name, with their raw text.
type Schemas = HashMap<&'static str, (Schema, &'static str)>;

/// The binary's schemas, parsed once per process.
fn parsed() -> &'static Result<Schemas, String> {
    static PARSED: OnceLock<Result<Schemas, String>> = OnceLock::new();
    PARSED.get_or_init(|| {
        SCHEMA_FILES
            .iter()
            .map(|(file, raw)| {
                Schema::parse_str(raw)
                    .map(|schema| (*file, (schema, *raw)))
                    .map_err(|e| format!("{file}: {e}"))
            })
            .collect()
    })
}

/// A schema compiled once per process for `serde_avro_fast`, which serializes and deserializes
/// a value directly, in one walk.
struct Compiled {
    schema: serde_avro_fast::Schema,
}

fn compiled() -> &'static Result<HashMap<&'static str, Compiled>, String> {
    static COMPILED: OnceLock<Result<HashMap<&'static str, Compiled>, String>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let parsed = parsed().as_ref().map_err(Clone::clone)?;
        parsed
            .iter()
            .map(|(file, (_, raw))| {
                let schema = raw
                    .parse::<serde_avro_fast::Schema>()
                    .map_err(|e| format!("{file}: {e}"))?;
                Ok((*file, Compiled { schema }))
            })
            .collect()
    })
}

/// Encodes and decodes records; build once per process and share.
pub struct Codec {
    /// Reader/writer schemas by file name, with their raw text.
    schemas: &'static Schemas,
    compiled: &'static HashMap<&'static str, Compiled>,
    /// Embedded mode: ids by file name, and schemas by id.
    ids: HashMap<String, u32>,
    by_id: HashMap<u32, Schema>,
    http: Option<Http>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field(
                "mode",
                &if self.http.is_some() {
                    "http"
                } else {
                    "embedded"
                },
            )
            .finish()
    }
}

impl Codec {
    /// Builds the codec from `OHX_SCHEMA_REGISTRY`: `embedded` (default) or a registry URL.
    pub fn from_env() -> Result<Arc<Self>, CodecError> {
        let mode = crate::config::string("OHX_SCHEMA_REGISTRY", "embedded");
        Ok(Arc::new(if mode == "embedded" {
            Self::embedded()?
        } else {
            Self::http(&mode)?
        }))
    }

    /// Returns a codec with ids pinned in `schemas/registry.toml`.
    pub fn embedded() -> Result<Self, CodecError> {
        let ids: HashMap<String, u32> =
            toml::from_str(REGISTRY_TOML).map_err(|e| CodecError::Config(e.to_string()))?;
        let schemas = parsed()
            .as_ref()
            .map_err(|e| CodecError::Config(e.clone()))?;
        let compiled = compiled()
            .as_ref()
            .map_err(|e| CodecError::Config(e.clone()))?;
        let mut by_id = HashMap::new();
        for (file, (schema, _)) in schemas {
            let id = *ids
                .get(*file)
                .ok_or_else(|| CodecError::Config(format!("{file} has no pinned id")))?;
            by_id.insert(id, schema.clone());
        }
        Ok(Self {
            schemas,
            compiled,
            ids,
            by_id,
            http: None,
        })
    }

    /// Returns a codec that uses a Confluent-compatible registry at `url`.
    pub fn http(url: &str) -> Result<Self, CodecError> {
        let mut codec = Self::embedded()?;
        codec.ids.clear();
        codec.by_id.clear();
        let settings = SrSettings::new(url.to_string());
        codec.http = Some(Http {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            own: RwLock::new(HashMap::new()),
        });
        Ok(codec)
    }

    fn schema(&self, file: &str) -> Result<&(Schema, &'static str), CodecError> {
        self.schemas
            .get(file)
            .ok_or_else(|| CodecError::UnknownSchema(file.to_string()))
    }

    fn compiled(&self, file: &str) -> Result<&Compiled, CodecError> {
        self.compiled
            .get(file)
            .ok_or_else(|| CodecError::UnknownSchema(file.to_string()))
    }

    /// Encodes `value` for `topic` (subject `<topic>-value`).
    pub async fn encode<T: Record>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let (_, raw) = self.schema(T::SCHEMA_FILE)?;
        match &self.http {
            None => {
                let id = *self
                    .ids
                    .get(T::SCHEMA_FILE)
                    .ok_or_else(|| CodecError::UnknownSchema(T::SCHEMA_FILE.to_string()))?;
                let mut out = Vec::with_capacity(256);
                out.push(0u8);
                out.extend_from_slice(&id.to_be_bytes());
                let schema = &self.compiled(T::SCHEMA_FILE)?.schema;
                serde_avro_fast::to_datum(
                    value,
                    out,
                    &mut serde_avro_fast::ser::SerializerConfig::new(schema),
                )
                .map_err(|e| CodecError::Avro(e.to_string()))
            }
            Some(http) => {
                let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
                    topic.to_string(),
                    false,
                    SuppliedSchema::new(None, SchemaType::Avro, (*raw).to_string()),
                );
                http.encoder
                    .encode_struct(value, &strategy)
                    .await
                    .map_err(|e| CodecError::Registry(e.to_string()))
            }
        }
    }

    /// Forgets the registry answers the client cached as errors (a registry answers 404 for a
    /// moment while it re-reads its schemas after a restart): call before retrying.
    pub fn clear_registry_errors(&self) {
        if let Some(http) = &self.http {
            http.encoder.remove_errors_from_cache();
            http.decoder.remove_errors_from_cache();
        }
    }

    /// Decodes a record of type `T` written with any schema known to the registry.
    #[allow(deprecated)]
    pub async fn decode<T: Record>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(CodecError::NotConfluent);
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let (reader, _) = self.schema(T::SCHEMA_FILE)?;
        let mut body = &bytes[5..];
        let value = match &self.http {
            None if self.ids.get(T::SCHEMA_FILE) == Some(&id) => {
                return self.decode_own::<T>(body);
            }
            None => {
                let writer = self.by_id.get(&id).ok_or(CodecError::UnknownSchemaId(id))?;
                apache_avro::from_avro_datum(writer, &mut body, Some(reader))
            }
            Some(http) => {
                let writer = http
                    .decoder
                    .get_schema(id)
                    .await
                    .map_err(|e| CodecError::Registry(e.to_string()))?;
                let known = http.own.read().ok().and_then(|own| own.get(&id).copied());
                let own = known.unwrap_or_else(|| {
                    let same = writer.parsed.canonical_form() == reader.canonical_form();
                    if let Ok(mut own) = http.own.write() {
                        own.insert(id, same);
                    }
                    same
                });
                if own {
                    return self.decode_own::<T>(body);
                }
                apache_avro::from_avro_datum(&writer.parsed, &mut body, Some(reader))
            }
        }
        .map_err(|e| CodecError::Avro(e.to_string()))?;
        if !body.is_empty() {
            return Err(CodecError::Avro(format!("{} trailing bytes", body.len())));
        }
        apache_avro::from_value::<T>(&value).map_err(|e| CodecError::Avro(e.to_string()))
    }

    /// Deserializes a body written with this binary's own schema of `T`.
    fn decode_own<T: Record>(&self, body: &[u8]) -> Result<T, CodecError> {
        let schema = &self.compiled(T::SCHEMA_FILE)?.schema;
        // Read from the slice as a reader, which hands back what is left after the record.
        let mut state = serde_avro_fast::de::DeserializerState::from_reader(body, schema);
        let value =
            T::deserialize(state.deserializer()).map_err(|e| CodecError::Avro(e.to_string()))?;
        let rest = state.into_reader().into_inner();
        if !rest.is_empty() {
            return Err(CodecError::Avro(format!("{} trailing bytes", rest.len())));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::*;

    fn ctx() -> Context {
        Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "42".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 1_700_000_000_000,
            fhir_version: crate::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    /// Encodes `value` as before the direct path (through a resolved `Value` tree).
    #[allow(deprecated)]
    fn through_value<T: Record>(value: &T) -> Vec<u8> {
        let codec = Codec::embedded().unwrap();
        let (schema, _) = codec.schema(T::SCHEMA_FILE).unwrap();
        let v = apache_avro::to_value(value)
            .unwrap()
            .resolve(schema)
            .unwrap();
        apache_avro::to_avro_datum(schema, v).unwrap()
    }

    /// The direct path writes exactly the bytes of the `Value` path, and reads them back.
    async fn round_trip<T: Record + PartialEq + std::fmt::Debug>(
        codec: &Codec,
        topic: &str,
        v: &T,
    ) {
        let bytes = codec.encode(topic, v).await.unwrap();
        assert_eq!(bytes[0], 0);
        assert_eq!(&bytes[5..], through_value(v).as_slice());
        assert_eq!(&codec.decode::<T>(&bytes).await.unwrap(), v);
    }

    #[tokio::test]
    async fn test_every_record_round_trips_in_confluent_format() {
        let codec = Codec::embedded().unwrap();
        let m = Measurement {
            context: ctx(),
            measurement_id: "withings:42:1:bp".into(),
            series_key: series_key("p", "withings", "blood_pressure"),
            data_type: "blood_pressure".into(),
            aggregation: AGGREGATION_INDIVIDUAL.into(),
            effective_start: 1_700_000_000_000,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: "systolic".into(),
                value: 121.0,
                unit: "mm[Hg]".into(),
                decimals: None,
            }],
            device: Some(Device {
                device_id: "d".into(),
                model: Some("BPM Core".into()),
                model_id: None,
                manufacturer: None,
            }),
            entry_method: Some("device".into()),
            provider_group_id: Some("1".into()),
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        };
        let bytes = codec.encode(topic::MEASUREMENTS, &m).await.unwrap();
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
            18
        );
        round_trip(&codec, topic::MEASUREMENTS, &m).await;
        let mut to_two_targets = m.clone();
        to_two_targets.context.deliveries = vec![
            Delivery {
                ehr_target_id: "t".into(),
                patient_reference: "Patient/1".into(),
                fhir_version: crate::records::FHIR_R5.into(),
            },
            Delivery {
                ehr_target_id: "t2".into(),
                patient_reference: "Patient/abc".into(),
                fhir_version: crate::records::FHIR_R4.into(),
            },
        ];
        round_trip(&codec, topic::MEASUREMENTS, &to_two_targets).await;
        let without_options = Measurement {
            device: None,
            entry_method: None,
            provider_group_id: None,
            utc_offset_seconds: None,
            fetched_through: Some(5),
            status: None,
            provider_modified_at: Some(6),
            components: vec![],
            ..m
        };
        round_trip(&codec, topic::MEASUREMENTS, &without_options).await;
        let retraction = Measurement {
            status: Some(crate::records::STATUS_ENTERED_IN_ERROR.into()),
            ..without_options
        };
        round_trip(&codec, topic::MEASUREMENTS, &retraction).await;
        let ecg = Measurement {
            status: None,
            waveform: Some(crate::records::Waveform {
                unit: "uV".into(),
                origin: 0.0,
                factor: None,
                interval: 1000.0 / 300.0,
                interval_unit: "ms".into(),
                samples: vec![-20, 0, 20, i32::MAX, i32::MIN],
                code_map: None,
            }),
            ..retraction.clone()
        };
        round_trip(&codec, topic::MEASUREMENTS, &ecg).await;
        let hypnogram = Measurement {
            waveform: ecg.waveform.clone().map(|w| crate::records::Waveform {
                factor: Some(0.5),
                code_map: Some("https://ohx.example/fhir/ConceptMap/x".into()),
                ..w
            }),
            ..ecg.clone()
        };
        round_trip(&codec, topic::MEASUREMENTS, &hypnogram).await;

        let sr = SyncRequest {
            context: ctx(),
            categories: vec!["heart_rate".into()],
            window_start: Some(1),
            window_end: None,
            provider_event: Some("appli=16".into()),
        };
        round_trip(&codec, topic::SYNC_REQUESTS, &sr).await;

        let dl = DeadLetter {
            stage: "fhir-mapper".into(),
            reason: "r".into(),
            error_kind: "decode".into(),
            topic: "x".into(),
            partition: 1,
            offset: 7,
            key: Some(b"k".to_vec()),
            payload: Some(vec![0, 1, 2, 255]),
            headers: vec![Header {
                key: "h".into(),
                value: None,
            }],
            failed_at: 5,
        };
        round_trip(&codec, topic::DEAD_LETTER, &dl).await;

        let st = DedupState {
            content_hash: "abc".into(),
            revision: 7,
        };
        round_trip(&codec, topic::DEDUP_STATE, &st).await;

        let agg = HourlyAggregate {
            context: ctx(),
            aggregate_id: "a".into(),
            series_key: series_key("p", "withings", "heart_rate"),
            data_type: "heart_rate".into(),
            unit: "/min".into(),
            hour_start: 0,
            hour_end: 3_600_000,
            count: 3,
            min: 50.5,
            max: 90.0,
            mean: 70.25,
            sum: 210.75,
            first_sample_at: 1,
            last_sample_at: 2,
            utc_offset_seconds: Some(-18_000),
            device: None,
            revision: 9,
            amends: true,
        };
        round_trip(&codec, topic::HOURLY_AGGREGATES, &agg).await;

        let res = FhirResource {
            context: ctx(),
            identity: "t/Observation/x".into(),
            resource_type: "Observation".into(),
            resource_id: "x".into(),
            resource: r#"{"resourceType":"Observation","value":"ü"}"#.into(),
            source_ids: vec!["m1".into(), "m2".into()],
            source_revision: -1,
        };
        round_trip(&codec, topic::FHIR_RESOURCES, &res).await;

        let pr = PublishResult {
            identity: "t/Observation/x".into(),
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            link_id: "l".into(),
            sync_request_id: "s".into(),
            resource_type: "Observation".into(),
            resource_id: "x".into(),
            outcome: "created".into(),
            http_status: 201,
            version_id: Some("1".into()),
            received_at: 1,
            confirmed_at: 2,
        };
        round_trip(&codec, topic::PUBLISH_RESULTS, &pr).await;
    }

    #[test]
    #[allow(deprecated)]
    fn test_dedup_state_written_without_revision_reads_as_revision_zero() {
        // The changelog is compacted: entries written before `revision` existed stay readable.
        let old = Schema::parse_str(
            r#"{"type":"record","name":"DedupState","namespace":"ohx.v1",
                "fields":[{"name":"content_hash","type":"string"}]}"#,
        )
        .unwrap();
        let (new, _) = Codec::embedded()
            .unwrap()
            .schema(DedupState::SCHEMA_FILE)
            .unwrap()
            .clone();
        let mut record = apache_avro::types::Record::new(&old).unwrap();
        record.put("content_hash", "abc");
        let body = apache_avro::to_avro_datum(&old, record).unwrap();
        let value = apache_avro::from_avro_datum(&old, &mut body.as_slice(), Some(&new)).unwrap();
        let st: DedupState = apache_avro::from_value(&value).unwrap();
        assert_eq!(
            st,
            DedupState {
                content_hash: "abc".into(),
                revision: 0
            }
        );
    }

    /// Records written before contexts carried their deliveries (schema ids 1, 8 and 4) are
    /// still read, as going to their own target alone.
    #[tokio::test]
    #[allow(deprecated)]
    async fn test_records_of_the_schemas_before_deliveries_read_with_none() {
        async fn written_with<T: Record + PartialEq + std::fmt::Debug>(
            codec: &Codec,
            file: &str,
            id: u8,
            v: &T,
        ) {
            let (old, _) = codec.schema(file).unwrap().clone();
            let value = apache_avro::to_value(v).unwrap().resolve(&old).unwrap();
            let mut bytes = vec![0, 0, 0, 0, id];
            bytes.extend(apache_avro::to_avro_datum(&old, value).unwrap());
            assert_eq!(&codec.decode::<T>(&bytes).await.unwrap(), v, "{file}");
        }
        let codec = Codec::embedded().unwrap();
        let sr = SyncRequest {
            context: ctx(),
            categories: vec!["heart_rate".into()],
            window_start: Some(1),
            window_end: None,
            provider_event: None,
        };
        written_with(&codec, "sync_request.avsc", 1, &sr).await;
        let m = Measurement {
            context: ctx(),
            measurement_id: "m".into(),
            series_key: series_key("p", "withings", "body_weight"),
            data_type: "body_weight".into(),
            aggregation: AGGREGATION_INDIVIDUAL.into(),
            effective_start: 5,
            effective_end: None,
            utc_offset_seconds: None,
            components: vec![],
            device: None,
            entry_method: None,
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        };
        written_with(&codec, "measurement_v2.avsc", 8, &m).await;
        let r = FhirResource {
            context: ctx(),
            identity: "t/Observation/x".into(),
            resource_type: "Observation".into(),
            resource_id: "x".into(),
            resource: "{}".into(),
            source_ids: vec!["m".into()],
            source_revision: 3,
        };
        written_with(&codec, "fhir_resource.avsc", 4, &r).await;

        // Schemas with deliveries but before targets declared a FHIR version (ids 9, 10, 12):
        // the context and every delivery read as R5.
        let two_targets = Context {
            deliveries: vec![
                Delivery {
                    ehr_target_id: "t".into(),
                    patient_reference: "Patient/1".into(),
                    fhir_version: crate::records::FHIR_R5.into(),
                },
                Delivery {
                    ehr_target_id: "t2".into(),
                    patient_reference: "Patient/abc".into(),
                    fhir_version: crate::records::FHIR_R5.into(),
                },
            ],
            ..ctx()
        };
        let sr = SyncRequest {
            context: two_targets.clone(),
            ..sr
        };
        written_with(&codec, "sync_request_v2.avsc", 9, &sr).await;
        let m = Measurement {
            context: two_targets.clone(),
            ..m
        };
        written_with(&codec, "measurement_v3.avsc", 10, &m).await;
        // Before retractions (id 14): a reading.
        written_with(&codec, "measurement_v4.avsc", 14, &m).await;
        // Before waveforms (id 17): a reading or a retraction, no samples.
        written_with(&codec, "measurement_v5.avsc", 17, &m).await;
        let r = FhirResource {
            context: two_targets.clone(),
            ..r
        };
        written_with(&codec, "fhir_resource_v2.avsc", 12, &r).await;
    }

    /// Measurements written before components carried their decimal places (schema id 2) are
    /// still read, as "no reported places".
    #[tokio::test]
    #[allow(deprecated)]
    async fn test_measurement_of_the_first_schema_reads_without_decimals() {
        let codec = Codec::embedded().unwrap();
        let (old, _) = codec.schema("measurement.avsc").unwrap().clone();
        let mut m: Measurement = serde_json::from_value(serde_json::json!({
            "context": {"organization_id": "o", "ehr_target_id": "t", "patient_id": "p",
                "patient_reference": "Patient/1", "provider": "withings", "link_id": "l",
                "provider_user_id": "u", "sync_request_id": "s", "trigger": "WEBHOOK", "received_at": 1},
            "measurement_id": "m", "series_key": "p/withings/body_weight", "data_type": "body_weight",
            "aggregation": "INDIVIDUAL", "effective_start": 5, "effective_end": null,
            "utc_offset_seconds": null,
            "components": [{"code": "value", "value": 50.0, "unit": "kg", "decimals": 4}],
            "device": null, "entry_method": null, "provider_group_id": null,
            "provider_modified_at": null, "fetched_through": null
        }))
        .unwrap();
        let value = apache_avro::to_value(&m).unwrap().resolve(&old).unwrap();
        let mut bytes = vec![0, 0, 0, 0, 2];
        bytes.extend(apache_avro::to_avro_datum(&old, value).unwrap());
        let back: Measurement = codec.decode(&bytes).await.unwrap();
        m.components[0].decimals = None;
        assert_eq!(back, m);
    }

    #[tokio::test]
    async fn test_garbage_and_unknown_ids_are_errors() {
        let codec = Codec::embedded().unwrap();
        assert!(matches!(
            codec.decode::<DedupState>(b"hello").await,
            Err(CodecError::NotConfluent)
        ));
        assert!(matches!(
            codec.decode::<DedupState>(&[0, 0, 0, 0, 99, 2]).await,
            Err(CodecError::UnknownSchemaId(99))
        ));
        // a valid header with a truncated body
        assert!(matches!(
            codec.decode::<Measurement>(&[0, 0, 0, 0, 2, 10]).await,
            Err(CodecError::Avro(_))
        ));
    }
}
