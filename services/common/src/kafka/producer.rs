//! The idempotent producer shared by a service, replaced when its idempotent state breaks.
//!
//! librdkafka's own message timeout is off (`message.timeout.ms=0`): when a message times out,
//! an idempotent librdkafka producer bumps its epoch (KIP-360) and tansu 0.6's storage cannot
//! take that (its producer table then fails a check on the next produce and the broker stops
//! serving). Instead [`Producer::send_all`] waits at most `OHX_PRODUCE_TIMEOUT_MS`, and on that
//! deadline — or on any error that leaves the idempotent state unusable — the producer is
//! dropped and a new one (a new producer id) takes its place. The records are then the
//! caller's to send again: nothing was committed for them.

use super::KafkaSettings;
use super::processor::OutRecord;
use crate::admin::Health;
use crate::codec::{Codec, CodecError};
use crate::records::Record;
use crate::telemetry;
use opentelemetry::KeyValue;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A produce that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("encoding failed: {0}")]
    Codec(#[from] CodecError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("not acknowledged within {0:?}")]
    Timeout(Duration),
}

/// Whether an error leaves an idempotent producer unable to go on.
pub fn breaks_idempotence(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::MessageTimedOut
                | C::Fatal
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::DuplicateSequenceNumber
                | C::ProducerFenced
                | C::PurgeQueue
                | C::PurgeInflight
        )
    )
}

struct Shared {
    settings: KafkaSettings,
    timeout: Duration,
    current: RwLock<(u64, FutureProducer)>,
    health: Health,
}

/// The idempotent producer (acks=all) shared by a service.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
    codec: Arc<Codec>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

/// How long a producer waits to batch records (`linger.ms`). 5 ms, not 2: at 2 ms librdkafka's
/// broker thread woke so often that it took 70 % of the gateway's CPU (perf, 64 webhooks in
/// flight); at 5 ms the gateway used 48 µs of CPU per webhook instead of 159 µs, for about
/// 2 ms more latency.
pub const LINGER_MS: u32 = 5;

fn create(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", LINGER_MS.to_string())
        .set("partitioner", "murmur2_random")
        // Never time out inside librdkafka: see the module documentation.
        .set("message.timeout.ms", "0");
    for (k, v) in &settings.extra {
        config.set(k, v);
    }
    config.create()
}

impl Producer {
    /// Creates the producer: idempotent, `acks=all`, murmur2 partitioning (Java-compatible, so
    /// topics with the same key and partition count are co-partitioned). `timeout` bounds how
    /// long [`Producer::send_all`] waits for acknowledgements; failures are reported to `health`.
    pub fn new(
        settings: &KafkaSettings,
        codec: Arc<Codec>,
        timeout: Duration,
        health: Health,
    ) -> Result<Self, KafkaError> {
        let inner = create(settings)?;
        Ok(Self {
            shared: Arc::new(Shared {
                settings: settings.clone(),
                timeout,
                current: RwLock::new((0, inner)),
                health,
            }),
            codec,
        })
    }

    /// Returns the codec the producer encodes with.
    pub fn codec(&self) -> &Arc<Codec> {
        &self.codec
    }

    fn current(&self) -> (u64, FutureProducer) {
        match self.shared.current.read() {
            Ok(guard) => (guard.0, guard.1.clone()),
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                (guard.0, guard.1.clone())
            }
        }
    }

    /// Replaces the producer of `generation` with a new one (once, however many callers saw
    /// it fail). The old one is dropped off the async runtime: dropping purges and flushes.
    fn replace(&self, generation: u64, why: &str) {
        let mut guard = match self.shared.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.0 != generation {
            return;
        }
        match create(&self.shared.settings) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *guard, (generation + 1, fresh));
                drop(guard);
                tracing::warn!(why, generation = generation + 1, "producer replaced");
                telemetry::PRODUCER_REPLACEMENTS.add(1, &[]);
                std::thread::spawn(move || drop(old));
            }
            Err(error) => tracing::error!(%error, "cannot create a new producer"),
        }
    }

    /// Encodes and produces one record, returning once the broker acknowledged it. The record
    /// enters the pipeline from outside a stage (a command, a test): it starts a trace.
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
            headers: vec![crate::trace::Trace::root().header()],
        };
        self.send_all(std::slice::from_ref(&record)).await
    }

    /// Produces all records (in order per partition) and waits until every one is
    /// acknowledged, at most the producer timeout. Cancel-safe: dropping the future leaves the
    /// records queued, and the caller treats them as not acknowledged.
    pub async fn send_all(&self, records: &[OutRecord]) -> Result<(), ProduceError> {
        let (generation, producer) = self.current();
        let result = tokio::time::timeout(self.shared.timeout, send(&producer, records)).await;
        let result = match result {
            Ok(r) => r.map_err(ProduceError::from),
            Err(_) => Err(ProduceError::Timeout(self.shared.timeout)),
        };
        match &result {
            Ok(()) => self.shared.health.recovered("produce"),
            Err(error) => {
                self.shared.health.failing("produce", &error.to_string());
                let broken = match error {
                    ProduceError::Kafka(e) => breaks_idempotence(e),
                    ProduceError::Timeout(_) => true,
                    ProduceError::Codec(_) => false,
                };
                if broken || producer.client().fatal_error().is_some() {
                    self.replace(generation, &error.to_string());
                }
            }
        }
        result
    }

    /// Reports a send that the caller gave up on (it stopped waiting before the timeout).
    /// A producer whose idempotent state is broken is replaced here too, since the caller's
    /// shorter deadline keeps [`Self::send_all`] from ever seeing the error.
    pub fn note_unacknowledged(&self, reason: &str) {
        self.shared.health.failing("produce", reason);
        let (generation, producer) = self.current();
        if producer.client().fatal_error().is_some() {
            self.replace(generation, reason);
        }
    }

    /// Waits until queued records are delivered (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.current().1.flush(timeout) {
            tracing::warn!(%error, "producer flush incomplete");
        }
    }
}

async fn send(producer: &FutureProducer, records: &[OutRecord]) -> Result<(), KafkaError> {
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
            match producer.send_result(fr) {
                Ok(delivery) => {
                    pending.push((r.topic.as_str(), delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for (topic, f) in pending {
        match f.await {
            Ok(Ok(_)) => {
                telemetry::RECORDS_PRODUCED.add(1, &[KeyValue::new("topic", topic.to_string())])
            }
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_errors_that_break_idempotence_are_recognised() {
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(breaks_idempotence(&timed_out));
        let epoch = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidProducerEpoch);
        assert!(breaks_idempotence(&epoch));
        let transport = KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!breaks_idempotence(&transport));
        let full = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert!(!breaks_idempotence(&full));
    }
}
