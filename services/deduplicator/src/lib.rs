//! Forwards a FHIR resource only when its identity is new or its content changed.
//!
//! State is identity → content hash (SHA-256 over canonical JSON without `meta`), in memory per
//! input partition, restored when a partition is first seen from the compacted changelog
//! `ohx.dedup-state.v1` (co-partitioned with `ohx.fhir-resources.v1`: the same partition number
//! holds the same identities). Ordering makes it safe: the outbox record is acknowledged first,
//! then the changelog record, then the input offset is committed. A crash in between re-forwards
//! a resource (the publisher then finds it unchanged on the server); it never loses one.

use ohx_common::codec::Codec;
use ohx_common::kafka::{Emitter, Input, KafkaSettings, Processor, Producer, StageError};
use ohx_common::records::{DedupState, FhirResource, content_hash, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

static RESOURCES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_resources_deduplicated",
        "Resources seen by the deduplicator, by type and outcome (forwarded, unchanged)",
    )
});

/// The decision for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward { hash: String },
    Unchanged,
}

/// Decides whether to forward a resource with content `hash`, given the last hash forwarded
/// for its identity (pure; the state changes only once the output is acknowledged).
pub fn decide(last: Option<&str>, hash: String) -> Decision {
    match last {
        Some(h) if h == hash => Decision::Unchanged,
        _ => Decision::Forward { hash },
    }
}

/// What a batch forwarded: partition, identity, hash (applied once acknowledged).
pub type Forwarded = Vec<(i32, String, String)>;

/// The deduplicator stage.
pub struct Deduplicator {
    kafka: KafkaSettings,
    codec: Arc<Codec>,
    /// identity → hash, per input partition.
    states: HashMap<i32, HashMap<String, String>>,
    restore_timeout: Duration,
}

impl std::fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicator")
            .field("partitions", &self.states.len())
            .finish()
    }
}

impl Deduplicator {
    /// Creates the stage.
    pub fn new(kafka: KafkaSettings, producer: Producer, restore_timeout: Duration) -> Self {
        let codec = producer.codec().clone();
        Self {
            kafka,
            codec,
            states: HashMap::new(),
            restore_timeout,
        }
    }

    /// Reads one changelog partition from the beginning to its end.
    async fn restore(&self, partition: i32) -> Result<HashMap<String, String>, StageError> {
        let transient = |e: KafkaError| StageError::transient("changelog_restore", e);
        let consumer: StreamConsumer = self
            .kafka
            .client_config()
            .set("group.id", "ohx.deduplicator.restore")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(transient)?;
        let (low, high) = consumer
            .fetch_watermarks(topic::DEDUP_STATE, partition, Duration::from_secs(10))
            .map_err(transient)?;
        let mut state = HashMap::new();
        if high <= low {
            return Ok(state);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic::DEDUP_STATE, partition, Offset::Beginning)
            .map_err(transient)?;
        consumer.assign(&tpl).map_err(transient)?;
        let deadline = tokio::time::Instant::now() + self.restore_timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, consumer.recv())
                .await
                .map_err(|_| {
                    StageError::transient("changelog_restore", "timed out reading the changelog")
                })?
                .map_err(transient)?;
            if let (Some(key), Some(payload)) = (msg.key(), msg.payload()) {
                let identity = String::from_utf8_lossy(key).into_owned();
                match self.codec.decode::<DedupState>(payload).await {
                    Ok(s) => {
                        state.insert(identity, s.content_hash);
                    }
                    Err(e) if e.is_transient() => {
                        return Err(StageError::transient("schema_registry", e));
                    }
                    Err(error) => {
                        tracing::warn!(%error, partition, offset = msg.offset(), "skipping undecodable changelog record")
                    }
                }
            } else if let Some(key) = msg.key() {
                // A tombstone forgets the identity.
                state.remove(String::from_utf8_lossy(key).as_ref());
            }
            if msg.offset() + 1 >= high {
                break;
            }
        }
        tracing::info!(partition, identities = state.len(), "dedup state restored");
        Ok(state)
    }
}

impl Processor for Deduplicator {
    type In = FhirResource;
    type Change = Forwarded;

    async fn process(
        &mut self,
        batch: &[Input<FhirResource>],
        out: &mut Emitter,
    ) -> Result<Forwarded, StageError> {
        for input in batch {
            if !self.states.contains_key(&input.partition) {
                let restored = self.restore(input.partition).await?;
                self.states.insert(input.partition, restored);
            }
        }
        // Decisions within the batch see the batch's own earlier forwards.
        let mut seen: HashMap<(i32, &str), String> = HashMap::new();
        let mut forwarded = Vec::new();
        for input in batch {
            let r = &input.value;
            let hash = match content_hash(&r.resource) {
                Ok(h) => h,
                Err(e) => {
                    out.dead_letter(input, "invalid", format!("resource is not JSON: {e}"))
                        .await?;
                    continue;
                }
            };
            let last = seen
                .get(&(input.partition, r.identity.as_str()))
                .map(String::as_str)
                .or_else(|| {
                    self.states
                        .get(&input.partition)
                        .and_then(|s| s.get(&r.identity))
                        .map(String::as_str)
                });
            let outcome = match decide(last, hash) {
                Decision::Unchanged => "unchanged",
                Decision::Forward { hash } => {
                    out.emit(topic::FHIR_OUTBOX, &r.identity, r).await?;
                    seen.insert((input.partition, r.identity.as_str()), hash.clone());
                    forwarded.push((input.partition, r.identity.clone(), hash));
                    "forwarded"
                }
            };
            RESOURCES.add(
                1,
                &[
                    KeyValue::new("type", r.resource_type.clone()),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
        // The changelog only after the outbox is acknowledged: a crash in between re-forwards
        // (the publisher finds the resource unchanged); it never records an unsent resource.
        out.barrier();
        for (partition, identity, hash) in &forwarded {
            out.emit_to(
                topic::DEDUP_STATE,
                Some(*partition),
                identity,
                &DedupState {
                    content_hash: hash.clone(),
                },
            )
            .await?;
        }
        Ok(forwarded)
    }

    async fn apply(&mut self, forwarded: &Forwarded) -> Result<(), StageError> {
        for (partition, identity, hash) in forwarded {
            // A partition revoked meanwhile is rebuilt from the changelog by its next owner.
            if let Some(state) = self.states.get_mut(partition) {
                state.insert(identity.clone(), hash.clone());
            }
        }
        Ok(())
    }

    fn revoked(&mut self, partitions: &[(String, i32)]) {
        for (_, p) in partitions {
            self.states.remove(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hash_ignores_meta_and_key_order() {
        let a =
            r#"{"resourceType":"Observation","id":"x","meta":{"versionId":"1"},"status":"final"}"#;
        let b = r#"{"status":"final","id":"x","resourceType":"Observation","meta":{"versionId":"7","tag":[]}}"#;
        assert_eq!(content_hash(a).unwrap(), content_hash(b).unwrap());
        let c = r#"{"resourceType":"Observation","id":"x","status":"amended"}"#;
        assert_ne!(content_hash(a).unwrap(), content_hash(c).unwrap());
        assert!(content_hash("not json").is_err());
    }

    #[test]
    fn test_decide_forwards_new_and_changed_only() {
        assert_eq!(
            decide(None, "h1".into()),
            Decision::Forward { hash: "h1".into() }
        );
        assert_eq!(decide(Some("h1"), "h1".into()), Decision::Unchanged);
        assert_eq!(
            decide(Some("h1"), "h2".into()),
            Decision::Forward { hash: "h2".into() }
        );
    }
}
