//! Forwards a FHIR resource only when its identity is new or it carries newer content.
//!
//! State is identity → (source revision, content hash) (SHA-256 over canonical JSON without
//! `meta`), in memory per input partition, restored when a partition is first seen from the
//! compacted changelog `ohx.dedup-state.v1` (co-partitioned with `ohx.fhir-resources.v1`: the
//! same partition number holds the same identities). Ordering makes it safe: the outbox record
//! is acknowledged first, then the changelog record, then the input offset is committed. A crash
//! in between re-forwards a resource (the publisher then finds it unchanged on the server); it
//! never loses one.
//!
//! # The forwarding rule ([`decide`])
//! The source revision orders the contents of one identity (the provider's modification time,
//! the hourly aggregate's revision). A replay re-emits every content an identity ever had, in
//! its original order; forwarding only what is newer than the last forwarded content keeps a
//! replay of "v1 then v2" from reverting the EHR to v1 in between:
//! * identity never forwarded → forward;
//! * higher revision → forward if the content differs (same content: nothing to send, but the
//!   revision is remembered so older content stays refused);
//! * lower revision → refused (`stale`), whatever the content;
//! * equal revision, same content → unchanged;
//! * equal revision, different content → forward. Sources that carry a revision never produce
//!   two contents for one revision, except when the mapping itself changed (a new mapping file
//!   re-maps the same source revision), which must reach the EHR. Sources without a revision
//!   (0) cannot be ordered at all: for them the last content seen wins, as before revisions
//!   existed, and a replay of their edits re-sends the edits in order (the publisher's
//!   revision check cannot help either; such sources should get a revision).

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
        "Resources seen by the deduplicator, by type and outcome (forwarded, unchanged, stale)",
    )
});

/// What was last forwarded for an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Source revision of the content (0: unknown).
    pub revision: i64,
    /// Content hash.
    pub hash: String,
}

/// The decision for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it on and remember (revision, hash).
    Forward,
    /// The same content is already forwarded: nothing to send. `remember` when the revision is
    /// newer than the one remembered (so content older than it is refused from now on).
    Unchanged { remember: bool },
    /// Older than what was forwarded: never sent.
    Stale,
}

impl Decision {
    /// Whether the content's (revision, hash) becomes the identity's last known one.
    pub fn remembers(self) -> bool {
        matches!(
            self,
            Decision::Forward | Decision::Unchanged { remember: true }
        )
    }
}

/// Decides whether to forward content (`revision`, `hash`) given what was last forwarded for
/// its identity (pure; the state changes only once the output is acknowledged). See the module
/// documentation for the rule.
pub fn decide(last: Option<&Seen>, revision: i64, hash: &str) -> Decision {
    let Some(last) = last else {
        return Decision::Forward;
    };
    if revision < last.revision {
        return Decision::Stale;
    }
    if last.hash == hash {
        return Decision::Unchanged {
            remember: revision > last.revision,
        };
    }
    Decision::Forward
}

/// What a batch remembers: partition, identity, (revision, hash) (applied once acknowledged).
pub type Forwarded = Vec<(i32, String, Seen)>;

/// Identity → last forwarded content, per input partition.
pub type States = HashMap<i32, HashMap<String, Seen>>;

/// Decides the resources of one batch in order, each decision seeing the batch's earlier ones
/// (the state itself changes only once the batch's outputs are acknowledged).
#[derive(Debug)]
pub struct BatchDecider<'s> {
    state: &'s States,
    seen: HashMap<(i32, String), Seen>,
    remembered: Forwarded,
}

impl<'s> BatchDecider<'s> {
    /// Starts a batch over `state`.
    pub fn new(state: &'s States) -> Self {
        Self {
            state,
            seen: HashMap::new(),
            remembered: Vec::new(),
        }
    }

    /// Decides one resource of the batch.
    pub fn decide(
        &mut self,
        partition: i32,
        identity: &str,
        revision: i64,
        hash: &str,
    ) -> Decision {
        let key = (partition, identity.to_string());
        let last = self
            .seen
            .get(&key)
            .or_else(|| self.state.get(&partition).and_then(|s| s.get(identity)));
        let decision = decide(last, revision, hash);
        if decision.remembers() {
            let s = Seen {
                revision,
                hash: hash.to_string(),
            };
            self.seen.insert(key, s.clone());
            self.remembered.push((partition, identity.to_string(), s));
        }
        decision
    }

    /// What the batch remembers, in order (the changelog records and the state change).
    pub fn into_remembered(self) -> Forwarded {
        self.remembered
    }
}

/// The deduplicator stage.
pub struct Deduplicator {
    kafka: KafkaSettings,
    codec: Arc<Codec>,
    /// identity → last forwarded (revision, hash), per input partition.
    states: States,
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
    async fn restore(&self, partition: i32) -> Result<HashMap<String, Seen>, StageError> {
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
                        state.insert(
                            identity,
                            Seen {
                                revision: s.revision,
                                hash: s.content_hash,
                            },
                        );
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
        let mut decider = BatchDecider::new(&self.states);
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
            let outcome =
                match decider.decide(input.partition, &r.identity, r.source_revision, &hash) {
                    Decision::Stale => "stale",
                    Decision::Unchanged { .. } => "unchanged",
                    Decision::Forward => {
                        out.follow(input);
                        out.emit(topic::FHIR_OUTBOX, &r.identity, r).await?;
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
        let remembered = decider.into_remembered();
        // The changelog only after the outbox is acknowledged: a crash in between re-forwards
        // (the publisher finds the resource unchanged); it never records an unsent resource.
        out.barrier();
        out.follow_trace(None);
        for (partition, identity, s) in &remembered {
            out.emit_to(
                topic::DEDUP_STATE,
                Some(*partition),
                identity,
                &DedupState {
                    content_hash: s.hash.clone(),
                    revision: s.revision,
                },
            )
            .await?;
        }
        Ok(remembered)
    }

    async fn apply(&mut self, forwarded: &Forwarded) -> Result<(), StageError> {
        for (partition, identity, s) in forwarded {
            // A partition revoked meanwhile is rebuilt from the changelog by its next owner.
            if let Some(state) = self.states.get_mut(partition) {
                state.insert(identity.clone(), s.clone());
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

    fn seen(revision: i64, hash: &str) -> Seen {
        Seen {
            revision,
            hash: hash.into(),
        }
    }

    #[test]
    fn test_decide_new_identity_is_forwarded_whatever_its_revision() {
        assert_eq!(decide(None, 0, "h1"), Decision::Forward);
        assert_eq!(decide(None, 42, "h1"), Decision::Forward);
        assert_eq!(decide(None, -1, "h1"), Decision::Forward);
    }

    #[test]
    fn test_decide_same_content_same_revision_is_unchanged() {
        let last = seen(5, "h1");
        assert_eq!(
            decide(Some(&last), 5, "h1"),
            Decision::Unchanged { remember: false }
        );
        let unknown = seen(0, "h1");
        assert_eq!(
            decide(Some(&unknown), 0, "h1"),
            Decision::Unchanged { remember: false }
        );
    }

    #[test]
    fn test_decide_same_content_newer_revision_is_unchanged_but_remembered() {
        assert_eq!(
            decide(Some(&seen(5, "h1")), 9, "h1"),
            Decision::Unchanged { remember: true }
        );
    }

    #[test]
    fn test_decide_changed_content_with_newer_revision_is_forwarded() {
        assert_eq!(decide(Some(&seen(5, "h1")), 6, "h2"), Decision::Forward);
        // A source that gained a revision (0 = unknown before) moves forward too.
        assert_eq!(decide(Some(&seen(0, "h1")), 6, "h2"), Decision::Forward);
    }

    #[test]
    fn test_decide_older_revision_is_refused_changed_or_not() {
        assert_eq!(decide(Some(&seen(6, "h2")), 5, "h1"), Decision::Stale);
        assert_eq!(decide(Some(&seen(6, "h2")), 5, "h2"), Decision::Stale);
        assert_eq!(decide(Some(&seen(6, "h2")), 0, "h3"), Decision::Stale);
    }

    #[test]
    fn test_decide_equal_revision_with_different_content_is_forwarded() {
        // Revision 0 (unknown): the last content seen wins.
        assert_eq!(decide(Some(&seen(0, "h1")), 0, "h2"), Decision::Forward);
        // A known revision re-mapped differently (a mapping change) reaches the EHR.
        assert_eq!(decide(Some(&seen(7, "h1")), 7, "h2"), Decision::Forward);
    }

    /// Runs the batch logic of `process` over (revision, hash) contents of one identity in
    /// partition 0, from `state`; returns the decisions and what the state becomes once applied.
    fn run(state: Option<Seen>, contents: &[(i64, &str)]) -> (Vec<Decision>, Option<Seen>) {
        let mut states = States::new();
        if let Some(s) = state {
            states.entry(0).or_default().insert("id".into(), s);
        }
        let mut decider = BatchDecider::new(&states);
        let decisions = contents
            .iter()
            .map(|(rev, hash)| decider.decide(0, "id", *rev, hash))
            .collect();
        let last = decider.into_remembered().pop().map(|(_, _, s)| s);
        let last = last.or_else(|| states.get(&0).and_then(|s| s.get("id")).cloned());
        (decisions, last)
    }

    #[test]
    fn test_batch_decisions_are_per_partition_and_identity() {
        let mut states = States::new();
        states
            .entry(0)
            .or_default()
            .insert("a".into(), seen(5, "h5"));
        let mut d = BatchDecider::new(&states);
        assert_eq!(d.decide(0, "a", 4, "h4"), Decision::Stale);
        // Another identity, and the same identity in another partition, start fresh.
        assert_eq!(d.decide(0, "b", 4, "h4"), Decision::Forward);
        assert_eq!(d.decide(1, "a", 4, "h4"), Decision::Forward);
        assert_eq!(
            d.decide(0, "a", 6, "h5"),
            Decision::Unchanged { remember: true }
        );
        assert_eq!(d.decide(0, "a", 5, "h6"), Decision::Stale);
        let remembered = d.into_remembered();
        assert_eq!(
            remembered,
            vec![
                (0, "b".to_string(), seen(4, "h4")),
                (1, "a".to_string(), seen(4, "h4")),
                (0, "a".to_string(), seen(6, "h5")),
            ]
        );
        // The state itself is untouched until apply.
        assert_eq!(states[&0]["a"], seen(5, "h5"));
    }

    #[test]
    fn test_batch_v1_v2_v1_forwards_v1_and_v2_then_refuses_the_old_v1() {
        let (d, last) = run(None, &[(1, "v1"), (2, "v2"), (1, "v1")]);
        assert_eq!(
            d,
            vec![Decision::Forward, Decision::Forward, Decision::Stale]
        );
        assert_eq!(last, Some(seen(2, "v2")));
    }

    #[test]
    fn test_replay_after_an_edit_forwards_nothing() {
        // The state after "v1 then v2"; a replay of the topic re-emits v1 then v2.
        let (d, last) = run(Some(seen(2, "v2")), &[(1, "v1"), (2, "v2")]);
        assert_eq!(
            d,
            vec![Decision::Stale, Decision::Unchanged { remember: false }]
        );
        assert_eq!(last, Some(seen(2, "v2")));
    }

    #[test]
    fn test_batch_without_revisions_is_last_writer_wins() {
        let (d, last) = run(None, &[(0, "v1"), (0, "v2"), (0, "v1")]);
        assert_eq!(d, vec![Decision::Forward; 3]);
        assert_eq!(last, Some(seen(0, "v1")));
    }
}
