//! Kafka helpers for end-to-end tests: raw produce, reading a topic from the beginning, and
//! waiting until consumer groups have committed everything on their input topics.

use anyhow::bail;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
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

/// Returns the partition ids of a topic.
fn partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Sums the high watermarks of a topic (its total number of records ever written).
pub fn high_watermark_sum(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", "ohx.e2e.watermarks")
        .create()?;
    let mut sum = 0;
    for p in partitions(&consumer, topic)? {
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
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", "ohx.e2e.reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for p in partitions(&consumer, topic)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            remaining += high - low;
            ends.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut done = std::collections::HashSet::new();
    while done.len() < ends.len() {
        if std::time::Instant::now() > deadline {
            bail!("timed out reading {topic}");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                ));
                if m.offset() + 1 >= ends[&m.partition()] {
                    done.insert(m.partition());
                }
            }
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Returns the records a group has not committed yet on a topic.
pub fn group_lag(bootstrap: &str, group: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) =
            consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10))?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - at).max(0);
    }
    Ok(lag)
}

/// The consumer groups of the pipeline and their input topics.
pub const GROUPS: &[(&str, &str)] = &[
    ("ohx.fetcher", "ohx.sync-requests.v1"),
    ("ohx.hourly-aggregator", "ohx.measurements.v1"),
    ("ohx.fhir-mapper.measurements", "ohx.measurements.v1"),
    ("ohx.fhir-mapper.aggregates", "ohx.hourly-aggregates.v1"),
    ("ohx.deduplicator", "ohx.fhir-resources.v1"),
    ("ohx.publisher", "ohx.fhir-outbox.v1"),
];

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
