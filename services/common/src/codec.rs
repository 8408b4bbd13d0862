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
//! records written with an older, compatible schema decode too.

use crate::records::Record;
use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use std::collections::HashMap;
use std::sync::Arc;

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
        "hourly_aggregate.avsc",
        include_str!("../../../schemas/hourly_aggregate.avsc"),
    ),
    (
        "fhir_resource.avsc",
        include_str!("../../../schemas/fhir_resource.avsc"),
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
}

/// Encodes and decodes records; build once per process and share.
pub struct Codec {
    /// Reader/writer schemas by file name, with their raw text.
    schemas: HashMap<&'static str, (Schema, &'static str)>,
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
        let mut schemas = HashMap::new();
        let mut by_id = HashMap::new();
        for (file, raw) in SCHEMA_FILES {
            let schema =
                Schema::parse_str(raw).map_err(|e| CodecError::Config(format!("{file}: {e}")))?;
            let id = *ids
                .get(*file)
                .ok_or_else(|| CodecError::Config(format!("{file} has no pinned id")))?;
            by_id.insert(id, schema.clone());
            schemas.insert(*file, (schema, *raw));
        }
        Ok(Self {
            schemas,
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
        });
        Ok(codec)
    }

    fn schema(&self, file: &str) -> Result<&(Schema, &'static str), CodecError> {
        self.schemas
            .get(file)
            .ok_or_else(|| CodecError::UnknownSchema(file.to_string()))
    }

    /// Encodes `value` for `topic` (subject `<topic>-value`).
    // The datum functions are deprecated in favour of bon builders with the same behaviour.
    #[allow(deprecated)]
    pub async fn encode<T: Record>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let (schema, raw) = self.schema(T::SCHEMA_FILE)?;
        match &self.http {
            None => {
                let id = *self
                    .ids
                    .get(T::SCHEMA_FILE)
                    .ok_or_else(|| CodecError::UnknownSchema(T::SCHEMA_FILE.to_string()))?;
                let avro = apache_avro::to_value(value)
                    .and_then(|v| v.resolve(schema))
                    .and_then(|v| apache_avro::to_avro_datum(schema, v))
                    .map_err(|e| CodecError::Avro(e.to_string()))?;
                let mut out = Vec::with_capacity(avro.len() + 5);
                out.push(0u8);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&avro);
                Ok(out)
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
                apache_avro::from_avro_datum(&writer.parsed, &mut body, Some(reader))
            }
        }
        .map_err(|e| CodecError::Avro(e.to_string()))?;
        if !body.is_empty() {
            return Err(CodecError::Avro(format!("{} trailing bytes", body.len())));
        }
        apache_avro::from_value::<T>(&value).map_err(|e| CodecError::Avro(e.to_string()))
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
        }
    }

    #[tokio::test]
    async fn test_every_record_round_trips_in_confluent_format() {
        let codec = Codec::embedded().unwrap();
        let m = Measurement {
            context: ctx(),
            measurement_id: "withings:42:1:bp".into(),
            series_key: series_key("p", "blood_pressure"),
            data_type: "blood_pressure".into(),
            aggregation: AGGREGATION_INDIVIDUAL.into(),
            effective_start: 1_700_000_000_000,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: "systolic".into(),
                value: 121.0,
                unit: "mm[Hg]".into(),
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
        };
        let bytes = codec.encode(topic::MEASUREMENTS, &m).await.unwrap();
        assert_eq!(bytes[0], 0);
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
            2
        );
        assert_eq!(codec.decode::<Measurement>(&bytes).await.unwrap(), m);

        let sr = SyncRequest {
            context: ctx(),
            categories: vec!["heart_rate".into()],
            window_start: Some(1),
            window_end: None,
            provider_event: Some("appli=16".into()),
        };
        let b = codec.encode(topic::SYNC_REQUESTS, &sr).await.unwrap();
        assert_eq!(codec.decode::<SyncRequest>(&b).await.unwrap(), sr);

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
        let b = codec.encode(topic::DEAD_LETTER, &dl).await.unwrap();
        assert_eq!(codec.decode::<DeadLetter>(&b).await.unwrap(), dl);

        let st = DedupState {
            content_hash: "abc".into(),
            revision: 7,
        };
        let b = codec.encode(topic::DEDUP_STATE, &st).await.unwrap();
        assert_eq!(codec.decode::<DedupState>(&b).await.unwrap(), st);
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
