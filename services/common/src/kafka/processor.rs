//! What a stage implements ([`Processor`]) and what it gets: decoded inputs ([`Input`]) and an
//! [`Emitter`] that collects outputs and dead letters.

use crate::codec::{Codec, CodecError};
use crate::records::{DeadLetter, Header, Record, topic};
use crate::telemetry;
use crate::trace::Trace;
use opentelemetry::KeyValue;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A decoded input record.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: T,
    /// The original bytes, kept for dead letters.
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A failure of a processor.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Retrying later can succeed (a server is down, a rate limit): the batch is processed
    /// again, against the same state, and no offset advances. `retry_after` waits that long
    /// instead of backing off.
    #[error("transient ({kind}): {reason}")]
    Transient {
        kind: &'static str,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The stage cannot go on (misconfiguration, a bug); it stops with an error.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl StageError {
    /// Returns a transient error without a server-given pause.
    pub fn transient(kind: &'static str, reason: impl std::fmt::Display) -> Self {
        StageError::Transient {
            kind,
            reason: reason.to_string(),
            retry_after: None,
        }
    }
}

/// A record ready to be produced.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    /// Explicit partition (co-partitioned changelogs); `None` = by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Collects the outputs and dead letters of a batch, in phases: the records of a phase are
/// produced only once every record of the phases before it is acknowledged.
pub struct Emitter {
    stage: &'static str,
    codec: Arc<Codec>,
    phases: Vec<Vec<OutRecord>>,
    /// The trace the next outputs belong to (see [`Emitter::follow`]).
    trace: Option<Trace>,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("records", &self.len())
            .finish()
    }
}

impl Emitter {
    /// Returns an empty emitter for `stage`.
    pub fn new(stage: &'static str, codec: Arc<Codec>) -> Self {
        Self {
            stage,
            codec,
            phases: vec![Vec::new()],
            trace: None,
        }
    }

    /// Makes the outputs queued from now on part of `input`'s trace (W3C `traceparent`), each
    /// with a span of its own. A processor calls it before emitting what an input produced.
    pub fn follow<T>(&mut self, input: &Input<T>) {
        self.trace = Trace::from_headers(&input.headers);
    }

    /// Makes the outputs queued from now on part of `trace` (`None`: no trace header).
    pub fn follow_trace(&mut self, trace: Option<Trace>) {
        self.trace = trace;
    }

    fn current(&mut self) -> &mut Vec<OutRecord> {
        if self.phases.is_empty() {
            self.phases.push(Vec::new());
        }
        let last = self.phases.len() - 1;
        &mut self.phases[last]
    }

    /// Starts a new phase: what is queued from now on is produced only after everything
    /// queued before is acknowledged (the deduplicator's changelog after its outbox).
    pub fn barrier(&mut self) {
        if self.phases.last().is_some_and(|p| !p.is_empty()) {
            self.phases.push(Vec::new());
        }
    }

    /// Encodes and queues an output record.
    pub async fn emit<T: Record>(
        &mut self,
        topic: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StageError> {
        self.emit_to(topic, None, key, value).await
    }

    /// Encodes and queues an output record for an explicit partition (`None` = by key).
    pub async fn emit_to<T: Record>(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: &T,
    ) -> Result<(), StageError> {
        let payload = encode(&self.codec, topic, value, T::SCHEMA_FILE).await?;
        let headers = self.trace.iter().map(|t| t.child().header()).collect();
        self.current().push(OutRecord {
            topic: topic.to_string(),
            partition,
            key: Some(key.as_bytes().to_vec()),
            payload,
            headers,
        });
        Ok(())
    }

    /// Queues a dead letter for `input` with its original bytes.
    pub async fn dead_letter<T>(
        &mut self,
        input: &Input<T>,
        kind: &'static str,
        reason: impl Into<String>,
    ) -> Result<(), StageError> {
        self.dead_letter_raw(
            RawInput {
                topic: &input.topic,
                partition: input.partition,
                offset: input.offset,
                key: input.key.clone(),
                payload: Some(input.payload.clone()),
                headers: &input.headers,
            },
            kind,
            reason.into(),
        )
        .await
    }

    /// Queues a dead letter for a record that never decoded.
    pub(crate) async fn dead_letter_raw(
        &mut self,
        input: RawInput<'_>,
        kind: &'static str,
        reason: String,
    ) -> Result<(), StageError> {
        // The reason can quote the record (a server's diagnostics, a decoder's message): it
        // travels in the dead letter, which expires with the topic, not in the log.
        tracing::warn!(
            stage = self.stage,
            topic = input.topic,
            partition = input.partition,
            offset = input.offset,
            kind,
            "dead letter"
        );
        telemetry::DEAD_LETTERS.add(
            1,
            &[
                KeyValue::new("stage", self.stage),
                KeyValue::new("kind", kind),
            ],
        );
        let dl = DeadLetter {
            stage: self.stage.to_string(),
            reason,
            error_kind: kind.to_string(),
            topic: input.topic.to_string(),
            partition: input.partition,
            offset: input.offset,
            key: input.key.clone(),
            payload: input.payload,
            headers: input
                .headers
                .iter()
                .map(|(k, v)| Header {
                    key: k.clone(),
                    value: Some(v.clone()),
                })
                .collect(),
            failed_at: chrono::Utc::now().timestamp_millis(),
        };
        let payload = encode(
            &self.codec,
            topic::DEAD_LETTER,
            &dl,
            DeadLetter::SCHEMA_FILE,
        )
        .await?;
        self.current().push(OutRecord {
            topic: topic::DEAD_LETTER.to_string(),
            partition: None,
            key: input.key,
            payload,
            headers: vec![],
        });
        Ok(())
    }

    /// Every queued record, phase after phase.
    pub fn records(&self) -> impl Iterator<Item = &OutRecord> {
        self.phases.iter().flatten()
    }

    /// The queued records by phase.
    pub fn phases(&self) -> &[Vec<OutRecord>] {
        &self.phases
    }

    /// How many records are queued.
    pub fn len(&self) -> usize {
        self.phases.iter().map(Vec::len).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn clear(&mut self) {
        self.phases = vec![Vec::new()];
        self.trace = None;
    }

    pub(crate) fn take_phases(&mut self) -> Vec<Vec<OutRecord>> {
        let phases = std::mem::take(&mut self.phases);
        self.phases = vec![Vec::new()];
        self.trace = None;
        phases.into_iter().filter(|p| !p.is_empty()).collect()
    }
}

/// A record as polled, for a dead letter.
#[derive(Debug)]
pub(crate) struct RawInput<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: &'a [(String, Vec<u8>)],
}

async fn encode<T: Record>(
    codec: &Codec,
    topic: &str,
    value: &T,
    schema_file: &'static str,
) -> Result<Vec<u8>, StageError> {
    codec.encode(topic, value).await.map_err(|e| match e {
        CodecError::Registry(r) => StageError::transient("schema_registry", r),
        // apache-avro's message can dump the record: name the schema only.
        _ => StageError::Fatal(format!(
            "cannot encode a record as {schema_file} (a bug: the record does not fit its schema)"
        )),
    })
}

/// A stage's logic over one input record type. Implementations keep I/O-free cores and do
/// their own I/O (provider API, EHR, database) here; Kafka is the runtime's.
///
/// # The contract that keeps retries and rebalances safe
/// State that decides outputs changes only once those outputs are acknowledged:
/// [`Processor::process`] and [`Processor::tick`] must not change it, and return the change
/// instead; the runtime hands it to [`Processor::apply`] after every output of the batch (or
/// tick) is acknowledged. So a batch processed again after a transient failure, or after its
/// outputs could not be produced, sees the state it saw the first time. If a partition of the
/// batch is revoked before the acknowledgement, the change is dropped instead of applied:
/// dropping a change must be safe (the work is done again, and its outputs are identical).
pub trait Processor: Send + 'static {
    /// The input record type.
    type In: Record + Clone;
    /// A state change that takes effect once the outputs are acknowledged (`()` if none).
    type Change: Send + Sync + 'static;

    /// Processes a batch (records of one or more partitions, in offset order per partition).
    /// Outputs and dead letters go to `out`.
    fn process(
        &mut self,
        batch: &[Input<Self::In>],
        out: &mut Emitter,
    ) -> impl Future<Output = Result<Self::Change, StageError>> + Send;

    /// Runs every `tick` (if the stage has one). `caught_up` holds the partitions that reached
    /// their end since their last record.
    fn tick(
        &mut self,
        _now_ms: i64,
        _caught_up: &BTreeSet<(String, i32)>,
        _out: &mut Emitter,
    ) -> impl Future<Output = Result<Option<Self::Change>, StageError>> + Send {
        async { Ok(None) }
    }

    /// Applies a change once its outputs are acknowledged, before offsets are committed. A
    /// transient error calls `apply` again with the same change (the outputs stay
    /// acknowledged), so applying must be idempotent.
    fn apply(
        &mut self,
        _change: &Self::Change,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Returns the offset that may be committed for a partition whose next unread offset is
    /// `next_offset`, with metadata to store beside it (given back by [`Processor::assigned`]).
    /// The default commits everything processed, without metadata.
    fn commit_point(
        &self,
        _topic: &str,
        _partition: i32,
        next_offset: i64,
    ) -> (i64, Option<String>) {
        (next_offset, None)
    }

    /// Tells the processor that it now owns these partitions, with the metadata committed with
    /// their offsets (if any), before any of their records is processed.
    fn assigned(&mut self, _partitions: &[(String, i32, Option<String>)]) {}

    /// Tells the processor that it no longer owns these partitions (drop their state).
    fn revoked(&mut self, _partitions: &[(String, i32)]) {}
}
