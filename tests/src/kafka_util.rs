//! Kafka helpers for end-to-end tests: raw produce, reading a topic from the beginning, and
//! waiting until consumer groups have committed everything on their input topics.

use anyhow::bail;
use ohx_common::kafka::{KafkaSettings, inspect};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4");
    c
}

/// Produces raw bytes (e.g. garbage, to test dead-lettering) and waits for the ack.
pub async fn produce_raw(
    bootstrap: &str,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let producer: FutureProducer = config(bootstrap)
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()?;
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// Sums the high watermarks of a topic (its total number of records ever written).
pub fn high_watermark_sum(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", "ohx.e2e.watermarks")
        .create()?;
    let mut sum = 0;
    for p in inspect::partitions(&consumer, topic)? {
        sum += consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))?
            .1;
    }
    Ok(sum)
}

/// A record read back: key and payload.
pub type Raw = (Option<Vec<u8>>, Vec<u8>);

/// Reads every record of a topic, returning (key, payload) pairs.
pub fn read_all(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<Raw>> {
    Ok(
        inspect::read_topic(&settings(bootstrap), topic, Duration::from_secs(30))?
            .into_iter()
            .map(|r| (r.key, r.payload))
            .collect(),
    )
}

/// Returns the records a group has not committed yet on a topic.
pub fn group_lag(bootstrap: &str, group: &str, topic: &str) -> anyhow::Result<i64> {
    Ok(inspect::group_offsets(&settings(bootstrap), group, topic)?
        .iter()
        .map(inspect::PartitionOffsets::lag)
        .sum())
}

fn settings(bootstrap: &str) -> KafkaSettings {
    KafkaSettings {
        bootstrap: bootstrap.to_string(),
        extra: vec![],
    }
}

/// The consumer groups of the pipeline and their input topics.
pub const GROUPS: &[(&str, &str)] = inspect::PIPELINE_GROUPS;

/// Waits until every pipeline group has committed all of its input, twice in a row.
pub async fn wait_settled(bootstrap: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet = 0;
    loop {
        let mut total = 0;
        let mut detail = Vec::new();
        for (g, t) in GROUPS {
            let lag = group_lag(bootstrap, g, t)?;
            total += lag;
            if lag > 0 {
                detail.push(format!("{g}={lag}"));
            }
        }
        if total == 0 {
            quiet += 1;
            if quiet >= 2 {
                return Ok(());
            }
        } else {
            quiet = 0;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "pipeline not settled after {timeout:?}: {}",
                detail.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
