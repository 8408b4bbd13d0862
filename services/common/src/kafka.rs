//! The one consumer/producer runtime every stage uses.
//!
//! A stage is a [`Processor`] over one record type. [`run_stage`] owns the Kafka loop:
//!
//! 1. poll a batch (up to `max_batch` records, waiting at most `linger` for more);
//! 2. decode each record; a record that does not decode goes to `ohx.dead-letter.v1` with the
//!    reason and its original bytes;
//! 3. hand the batch to the processor, which emits outputs and dead letters; a *transient*
//!    failure (EHR down, provider rate limit) retries the batch with backoff and never advances;
//! 4. produce every output (idempotent producer, `acks=all`) and wait until all are acknowledged;
//! 5. only then commit, per partition, the offset the processor allows (the next offset, or for
//!    the hourly-aggregator the lowest offset still held by an open window).
//!
//! Batches run one at a time, so when librdkafka serves a rebalance (inside `recv`) no batch is
//! in flight: nothing processed can be committed by a consumer that no longer owns the
//! partition, and the processor is told which partitions were revoked before its next batch.

use crate::admin::Health;
use crate::codec::{Codec, CodecError};
use crate::records::{DeadLetter, Header, Record, topic};
use crate::telemetry;
use opentelemetry::KeyValue;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Broker connection settings shared by producers, consumers and the admin client.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `OHX_KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`.
    pub bootstrap: String,
    /// `OHX_KAFKA_PROPERTIES`: extra librdkafka properties `k=v,k=v`, applied last.
    pub extra: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Reads the settings from the environment.
    pub fn from_env() -> Self {
        let extra = crate::config::string("OHX_KAFKA_PROPERTIES", "")
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Self {
            bootstrap: crate::config::string("OHX_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            extra,
        }
    }

    /// Returns a client configuration with the bootstrap servers and the extra properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config.set("broker.address.family", "v4");
        for (k, v) in &self.extra {
            config.set(k, v);
        }
        config
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

/// A produce that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("encoding failed: {0}")]
    Codec(#[from] CodecError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// The idempotent producer (acks=all) shared by a service.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    codec: Arc<Codec>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl Producer {
    /// Creates the producer: idempotent, `acks=all`, murmur2 partitioning (Java-compatible, so
    /// topics with the same key and partition count are co-partitioned).
    pub fn new(settings: &KafkaSettings, codec: Arc<Codec>) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.bootstrap)
            .set("broker.address.family", "v4")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "30000");
        for (k, v) in &settings.extra {
            config.set(k, v);
        }
        Ok(Self {
            inner: config.create()?,
            codec,
        })
    }

    /// Returns the codec the producer encodes with.
    pub fn codec(&self) -> &Arc<Codec> {
        &self.codec
    }

    /// Encodes and produces one record, returning once the broker acknowledged it.
    pub async fn send_record<T: Record>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
    ) -> Result<(), ProduceError> {
        let payload = self.codec.encode(topic, value).await?;
        let record = OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            payload,
            headers: vec![],
        };
        self.send_all(std::slice::from_ref(&record)).await
    }

    /// Produces all records (in order per partition) and waits until every one is acknowledged.
    pub async fn send_all(&self, records: &[OutRecord]) -> Result<(), ProduceError> {
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(KHeader {
                    key: k,
                    value: Some(v),
                });
            }
            let mut fr = FutureRecord::to(&r.topic)
                .payload(&r.payload)
                .headers(headers);
            if let Some(k) = &r.key {
                fr = fr.key(k);
            }
            if let Some(p) = r.partition {
                fr = fr.partition(p);
            }
            // A full local queue drains in the background: wait, then retry the same record.
            loop {
                match self.inner.send_result(fr) {
                    Ok(delivery) => {
                        pending.push((r.topic.as_str(), delivery));
                        break;
                    }
                    Err((
                        KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        fr = back;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        for (topic, f) in pending {
            match f.await {
                Ok(Ok(_)) => {
                    telemetry::RECORDS_PRODUCED.add(1, &[KeyValue::new("topic", topic.to_string())])
                }
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => return Err(KafkaError::Canceled.into()),
            }
        }
        Ok(())
    }

    /// Waits until queued records are delivered (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.inner.flush(timeout) {
            tracing::warn!(%error, "producer flush incomplete");
        }
    }
}

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
    /// Retrying later can succeed (a server is down, a rate limit): the batch is retried and no
    /// offset advances. `retry_after` pauses the stage for that long instead of backing off.
    #[error("transient ({kind}): {reason}")]
    Transient {
        kind: &'static str,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The stage cannot go on (misconfiguration); it stops with an error.
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

/// Collects the outputs and dead letters of a batch.
pub struct Emitter {
    stage: &'static str,
    codec: Arc<Codec>,
    records: Vec<OutRecord>,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("records", &self.records.len())
            .finish()
    }
}

impl Emitter {
    /// Returns an empty emitter for `stage`.
    pub fn new(stage: &'static str, codec: Arc<Codec>) -> Self {
        Self {
            stage,
            codec,
            records: Vec::new(),
        }
    }

    /// Encodes and queues an output record.
    pub async fn emit<T: Record>(
        &mut self,
        topic: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StageError> {
        let payload = self.codec.encode(topic, value).await.map_err(|e| match e {
            CodecError::Registry(r) => StageError::transient("schema_registry", r),
            // apache-avro's message can dump the record: name the schema only.
            _ => StageError::Fatal(format!(
                "cannot encode a record as {} (a bug: the record does not fit its schema)",
                T::SCHEMA_FILE
            )),
        })?;
        self.records.push(OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            payload,
            headers: vec![],
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
            &input.topic,
            input.partition,
            input.offset,
            input.key.clone(),
            Some(input.payload.clone()),
            &input.headers,
            kind,
            reason.into(),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn dead_letter_raw(
        &mut self,
        source_topic: &str,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: &[(String, Vec<u8>)],
        kind: &'static str,
        reason: String,
    ) -> Result<(), StageError> {
        // The reason can quote the record (a server's diagnostics, a decoder's message): it
        // travels in the dead letter, which expires with the topic, not in the log.
        tracing::warn!(
            stage = self.stage,
            topic = source_topic,
            partition,
            offset,
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
            topic: source_topic.to_string(),
            partition,
            offset,
            key: key.clone(),
            payload,
            headers: headers
                .iter()
                .map(|(k, v)| Header {
                    key: k.clone(),
                    value: Some(v.clone()),
                })
                .collect(),
            failed_at: chrono::Utc::now().timestamp_millis(),
        };
        let bytes = self
            .codec
            .encode(topic::DEAD_LETTER, &dl)
            .await
            .map_err(|e| match e {
                CodecError::Registry(r) => StageError::transient("schema_registry", r),
                _ => StageError::Fatal(
                    "cannot encode a dead letter (a bug: it does not fit its schema)".to_string(),
                ),
            })?;
        self.records.push(OutRecord {
            topic: topic::DEAD_LETTER.to_string(),
            partition: None,
            key,
            payload: bytes,
            headers: vec![],
        });
        Ok(())
    }

    /// Returns the queued records.
    pub fn records(&self) -> &[OutRecord] {
        &self.records
    }

    fn clear(&mut self) {
        self.records.clear();
    }
}

/// A stage's logic over one input record type. Implementations keep I/O-free cores and do
/// their own I/O (provider API, EHR, database) here; Kafka is the runtime's.
pub trait Processor: Send + 'static {
    /// The input record type.
    type In: Record + Clone;

    /// Processes a batch (records of one or more partitions, in offset order per partition).
    /// Outputs and dead letters go to `out`. On `Err(Transient)` the batch is retried as a whole,
    /// so processing must be idempotent.
    fn process(
        &mut self,
        batch: &[Input<Self::In>],
        out: &mut Emitter,
    ) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Runs every `tick` (if the stage has one). `caught_up` holds the partitions that reached
    /// their end since their last record.
    fn tick(
        &mut self,
        _now_ms: i64,
        _caught_up: &BTreeSet<(String, i32)>,
        _out: &mut Emitter,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Called once the batch's (or tick's) outputs are acknowledged, before offsets are committed.
    fn acked(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
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

/// How a stage consumes.
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// Stage name, used in metrics, logs and dead letters.
    pub stage: &'static str,
    /// Consumer group id.
    pub group_id: String,
    pub input_topics: Vec<&'static str>,
    /// Most records per batch (`OHX_MAX_BATCH`).
    pub max_batch: usize,
    /// How long to wait for more records once one arrived (`OHX_LINGER_MS`).
    pub linger: Duration,
    /// Interval of [`Processor::tick`], if the stage uses it.
    pub tick: Option<Duration>,
}

impl StageSettings {
    /// Returns settings for `stage` reading `input_topics`, with `OHX_GROUP_ID`, `OHX_MAX_BATCH`
    /// and `OHX_LINGER_MS` from the environment.
    pub fn from_env(
        stage: &'static str,
        input_topics: Vec<&'static str>,
    ) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            stage,
            group_id: crate::config::string("OHX_GROUP_ID", &format!("ohx.{stage}")),
            input_topics,
            max_batch: crate::config::parse("OHX_MAX_BATCH", 500usize)?.max(1),
            linger: crate::config::millis("OHX_LINGER_MS", 5)?,
            tick: None,
        })
    }
}

#[derive(Default)]
struct RebalanceLog {
    revoked: Vec<(String, i32)>,
    assigned: Vec<(String, i32)>,
}

/// Consumer context: records rebalances for the loop and exports consumer lag.
struct StageContext {
    group: String,
    log: Arc<Mutex<RebalanceLog>>,
}

impl ClientContext for StageContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // Reaching the end of a partition is reported through the consumer, not an error.
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        tracing::error!(%error, reason, "librdkafka error");
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    telemetry::CONSUMER_LAG.record(
                        p.consumer_lag,
                        &[
                            KeyValue::new("group", self.group.clone()),
                            KeyValue::new("topic", topic.clone()),
                            KeyValue::new("partition", i64::from(partition)),
                        ],
                    );
                }
            }
        }
    }
}

impl ConsumerContext for StageContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Ok(mut log) = self.log.lock() else { return };
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements() {
                    log.assigned.push((e.topic().to_string(), e.partition()));
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    log.revoked.push((e.topic().to_string(), e.partition()));
                }
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200u64.saturating_mul(1u64 << attempt.min(8)));
    let capped = base.min(Duration::from_secs(30));
    let jitter = rand::random_range(0..=capped.as_millis() as u64 / 4);
    capped + Duration::from_millis(jitter)
}

/// Runs `processor` as a consumer-group member until `shutdown` is cancelled.
pub async fn run_stage<P: Processor>(
    settings: StageSettings,
    kafka: &KafkaSettings,
    producer: Producer,
    mut processor: P,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let log = Arc::new(Mutex::new(RebalanceLog::default()));
    let context = StageContext {
        group: settings.group_id.clone(),
        log: log.clone(),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("broker.address.family", "v4")
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "300000")
        .set("statistics.interval.ms", "5000")
        // Each hop otherwise waits up to 500 ms for a fetch to fill; the pipeline has four.
        .set("fetch.wait.max.ms", "50");
    for (k, v) in &kafka.extra {
        config.set(k, v);
    }
    let consumer: StreamConsumer<StageContext> = config.create_with_context(context)?;
    consumer.subscribe(&settings.input_topics)?;
    let codec = producer.codec().clone();
    health.set_ready(true);
    tracing::info!(stage = settings.stage, group = %settings.group_id, topics = ?settings.input_topics, "consuming");

    let stage = settings.stage;
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let mut committed: HashMap<(String, i32), i64> = HashMap::new();
    let mut caught_up: BTreeSet<(String, i32)> = BTreeSet::new();
    let mut ticker = tokio::time::interval(settings.tick.unwrap_or(Duration::from_secs(3600)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;

    'outer: loop {
        let mut out = Emitter::new(stage, codec.clone());
        let mut batch: Vec<Input<P::In>> = Vec::new();
        // Next offsets of this batch; they join `positions` only once its outputs are
        // acknowledged, so a shutdown in the middle of a retry never commits them.
        let mut batch_positions: HashMap<(String, i32), i64> = HashMap::new();
        let is_tick;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break 'outer,
            _ = ticker.tick(), if settings.tick.is_some() => { is_tick = true; }
            first = consumer.recv() => {
                is_tick = false;
                let mut next = Some(first);
                let deadline = tokio::time::Instant::now() + settings.linger;
                while let Some(polled) = next.take() {
                    match polled {
                        Ok(msg) => {
                            let tp = (msg.topic().to_string(), msg.partition());
                            caught_up.remove(&tp);
                            batch_positions.insert(tp, msg.offset() + 1);
                            telemetry::RECORDS_CONSUMED.add(1, &[KeyValue::new("stage", stage), KeyValue::new("topic", msg.topic().to_string())]);
                            let payload = msg.payload().map(<[u8]>::to_vec).unwrap_or_default();
                            let headers: Vec<(String, Vec<u8>)> = msg.headers().map(|h| h.iter().map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()).unwrap_or_default();
                            let key = msg.key().map(<[u8]>::to_vec);
                            match codec.decode::<P::In>(&payload).await {
                                Ok(value) => batch.push(Input { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset(), key, value, payload, headers }),
                                Err(e) if e.is_transient() => {
                                    // Registry unreachable: do not advance; retry this record later.
                                    tracing::warn!(stage, error = %e, "schema registry unavailable");
                                    telemetry::RETRIES.add(1, &[KeyValue::new("stage", stage), KeyValue::new("kind", "schema_registry")]);
                                    batch_positions.insert((msg.topic().to_string(), msg.partition()), msg.offset());
                                    consumer.seek(msg.topic(), msg.partition(), Offset::Offset(msg.offset()), Duration::from_secs(5))?;
                                    break;
                                }
                                Err(e) => {
                                    out.dead_letter_raw(msg.topic(), msg.partition(), msg.offset(), key, Some(payload), &headers, "decode", e.to_string()).await?;
                                }
                            }
                        }
                        Err(KafkaError::PartitionEOF(partition)) => {
                            for t in &settings.input_topics {
                                caught_up.insert(((*t).to_string(), partition));
                            }
                        }
                        Err(error) => {
                            tracing::warn!(stage, %error, "consumer error");
                        }
                    }
                    if batch.len() + out.records().len() >= settings.max_batch {
                        break;
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    next = tokio::time::timeout(deadline - now, consumer.recv()).await.ok();
                }
            }
        }

        // Rebalances were served inside recv(): forget revoked partitions before processing.
        {
            let (revoked, assigned) = match log.lock() {
                Ok(mut l) => (
                    std::mem::take(&mut l.revoked),
                    std::mem::take(&mut l.assigned),
                ),
                Err(_) => (vec![], vec![]),
            };
            if !revoked.is_empty() {
                for tp in &revoked {
                    positions.remove(tp);
                    batch_positions.remove(tp);
                    committed.remove(tp);
                    caught_up.remove(tp);
                }
                batch.retain(|i| !revoked.contains(&(i.topic.clone(), i.partition)));
                processor.revoked(&revoked);
                tracing::info!(stage, partitions = ?revoked, "partitions revoked");
            }
            for tp in &assigned {
                caught_up.remove(tp);
            }
            if !assigned.is_empty() {
                tracing::info!(stage, partitions = ?assigned, "partitions assigned");
                let with_metadata = committed_metadata(&consumer, &assigned);
                processor.assigned(&with_metadata);
            }
        }

        if batch.is_empty() && out.records().is_empty() && !is_tick {
            continue;
        }
        let started = Instant::now();

        // Process (or tick), retrying transient failures without advancing.
        let mut attempt = 0u32;
        let dead_letters = std::mem::take(&mut out.records);
        loop {
            out.clear();
            let result = if is_tick {
                processor
                    .tick(chrono::Utc::now().timestamp_millis(), &caught_up, &mut out)
                    .await
            } else if batch.is_empty() {
                Ok(())
            } else {
                processor.process(&batch, &mut out).await
            };
            match result {
                Ok(()) => break,
                Err(StageError::Transient {
                    kind,
                    reason,
                    retry_after,
                }) => {
                    telemetry::RETRIES.add(
                        1,
                        &[KeyValue::new("stage", stage), KeyValue::new("kind", kind)],
                    );
                    let wait = retry_after.unwrap_or_else(|| backoff(attempt));
                    tracing::warn!(stage, kind, reason = %reason, wait_ms = wait.as_millis() as u64, "transient failure, retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(StageError::Fatal(reason)) => {
                    health.set_ready(false);
                    anyhow::bail!("{stage}: {reason}");
                }
            }
        }
        let mut records = dead_letters;
        records.append(&mut out.records);

        // Produce and wait for every acknowledgement.
        let mut attempt = 0u32;
        while !records.is_empty() {
            match producer.send_all(&records).await {
                Ok(()) => break,
                Err(error) => {
                    telemetry::RETRIES.add(
                        1,
                        &[
                            KeyValue::new("stage", stage),
                            KeyValue::new("kind", "produce"),
                        ],
                    );
                    tracing::warn!(stage, %error, "produce failed, retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                }
            }
        }
        let mut attempt = 0u32;
        loop {
            match processor.acked().await {
                Ok(()) => break,
                Err(StageError::Fatal(reason)) => anyhow::bail!("{stage}: {reason}"),
                Err(StageError::Transient { kind, reason, .. }) => {
                    tracing::warn!(stage, kind, reason = %reason, "post-acknowledge step failed, retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                }
            }
        }

        // Everything of this batch is acknowledged: commit what the processor allows.
        positions.extend(batch_positions);
        let tpl = commit_list(&processor, &positions, &mut committed)?;
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::warn!(stage, %error, "commit failed");
        }
        telemetry::BATCH_SECONDS.record(
            started.elapsed().as_secs_f64(),
            &[KeyValue::new("stage", stage)],
        );
    }

    // Graceful shutdown: everything processed is acknowledged; commit synchronously.
    health.set_ready(false);
    let tpl = commit_list(&processor, &positions, &mut committed)?;
    if tpl.count() > 0
        && let Err(error) = consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(stage, %error, "final commit failed");
    }
    producer.flush(Duration::from_secs(10));
    consumer.unsubscribe();
    tracing::info!(stage, "stopped");
    Ok(())
}

/// Reads the metadata committed with the offsets of `partitions`.
fn committed_metadata<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    partitions: &[(String, i32)],
) -> Vec<(String, i32, Option<String>)> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in partitions {
        tpl.add_partition(t, *p);
    }
    let found = consumer.committed_offsets(tpl, Duration::from_secs(10));
    partitions
        .iter()
        .map(|(t, p)| {
            let md = match &found {
                Ok(list) => list.find_partition(t, *p).map(|e| e.metadata().to_string()).filter(|m| !m.is_empty()),
                Err(error) => {
                    tracing::warn!(%error, topic = %t, partition = p, "cannot read committed metadata");
                    None
                }
            };
            (t.clone(), *p, md)
        })
        .collect()
}

fn commit_list<P: Processor>(
    processor: &P,
    positions: &HashMap<(String, i32), i64>,
    committed: &mut HashMap<(String, i32), i64>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), next) in positions {
        let (allowed, metadata) = processor.commit_point(t, *p, *next);
        let allowed = allowed.min(*next);
        let prev = committed.get(&(t.clone(), *p)).copied().unwrap_or(-1);
        if allowed > prev {
            tpl.add_partition_offset(t, *p, Offset::Offset(allowed))?;
            if let (Some(md), Some(mut e)) = (metadata, tpl.find_partition(t, *p)) {
                e.set_metadata(md);
            }
            committed.insert((t.clone(), *p), allowed);
        }
    }
    Ok(tpl)
}
