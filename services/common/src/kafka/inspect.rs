//! Looking at topics and groups from outside the pipeline (the `ohx` command, tests): every
//! record of a topic up to its current end, and a group's committed offsets against the log.
//! Blocking calls; run them off an async runtime's workers.

use super::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A failure to read from the broker.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("timed out reading {0}")]
    Timeout(String),
}

/// A record as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp (ms since the epoch), if it has one.
    pub timestamp_ms: Option<i64>,
}

/// One partition of a group's input: committed offset (the log start when nothing is
/// committed) and the log's start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: i32,
    pub committed: i64,
    pub low: i64,
    pub high: i64,
}

impl PartitionOffsets {
    /// Records not committed yet.
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.max(self.low)).max(0)
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The pipeline's consumer groups (their default ids) and their input topics.
pub const PIPELINE_GROUPS: &[(&str, &str)] = &[
    ("ohx.fetcher", "ohx.sync-requests.v1"),
    ("ohx.hourly-aggregator", "ohx.measurements.v1"),
    ("ohx.fhir-mapper.measurements", "ohx.measurements.v1"),
    ("ohx.fhir-mapper.aggregates", "ohx.hourly-aggregates.v1"),
    ("ohx.deduplicator", "ohx.fhir-resources.v1"),
    ("ohx.publisher", "ohx.fhir-outbox.v1"),
];

fn consumer(kafka: &KafkaSettings, group: &str) -> Result<BaseConsumer, KafkaError> {
    kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
}

/// A message's headers as owned pairs (a header without a value has an empty one).
pub fn owned_headers(m: &impl Message) -> Vec<(String, Vec<u8>)> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|x| {
                    (
                        x.key.to_string(),
                        x.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The partition ids of a topic.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), CALL_TIMEOUT)?;
    Ok(md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Every record of `topic` from its start up to its end when called, within `timeout`.
pub fn read_topic(
    kafka: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Stored>, InspectError> {
    // Assigned, never subscribed: the group id is only a name, nothing is committed.
    let consumer = consumer(kafka, "ohx.inspect")?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in partitions(&consumer, topic)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, CALL_TIMEOUT)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut done = HashSet::new();
    while done.len() < ends.len() {
        if Instant::now() > deadline {
            return Err(InspectError::Timeout(topic.to_string()));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = owned_headers(&m);
                out.push(Stored {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    done.insert(m.partition());
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

/// A group's committed offsets on `topic` with the log's bounds, per partition.
pub fn group_offsets(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, InspectError> {
    let consumer = consumer(kafka, group)?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, CALL_TIMEOUT)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), CALL_TIMEOUT)?;
        let committed = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        out.push(PartitionOffsets {
            partition: e.partition(),
            committed,
            low,
            high,
        });
    }
    out.sort_by_key(|p| p.partition);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lag_counts_from_the_log_start_when_the_commit_is_older() {
        let p = |committed, low, high| PartitionOffsets {
            partition: 0,
            committed,
            low,
            high,
        };
        assert_eq!(p(5, 0, 9).lag(), 4);
        // Retention deleted records before the commit: they are not lag, they are gone.
        assert_eq!(p(5, 7, 9).lag(), 2);
        assert_eq!(p(9, 0, 9).lag(), 0);
    }
}
