//! Ownership leases: partitions nobody owns are noticed and reassigned.
//!
//! Every member claims the partitions it owns every few seconds by committing the current time
//! (ms since the epoch) as their "offset" in a side group, `<group>.owners`, that nobody joins
//! (a plain offset commit, which Kafka, Redpanda and tansu accept from a non-member). Every
//! member also reads those claims for all partitions of its input topics; a partition whose
//! claim lapsed ([`super::track::lapsed`]) has no live owner, and the member asks its loop to
//! leave and rejoin the group, which makes the coordinator assign every partition again.
//!
//! Kafka and Redpanda never leave a partition without an owner while the group has members.
//! tansu 0.6 does: when it evicts a member that died without leaving, the survivors rejoin with
//! an unchanged generation and get their old assignments back, so the dead member's partitions
//! stay unowned until some member joins or leaves. The leases cost one small commit and one
//! offset fetch per member per interval, on a thread of their own, never on the stage's loop.
//!
//! A member that stops gracefully releases its claims (claim time 0), so `ohx replay` can tell
//! a stopped group (no claim younger than `OHX_ORPHAN_AFTER_MS`) from one with live members.

use super::KafkaSettings;
use super::inspect::InspectError;
use super::track::{Tp, lapsed};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Handle shared by the stage's loop, its consumer callbacks and the lease thread.
#[derive(Clone, Default)]
pub(super) struct Leases {
    /// The partitions this member owns now (kept by the rebalance callbacks).
    owned: Arc<Mutex<BTreeSet<Tp>>>,
    /// When this member's assignment last changed (ms since the epoch): a rebalance is under
    /// way, and the partitions' new owners get the whole grace to claim them.
    changed_ms: Arc<AtomicI64>,
    /// Set by the lease thread when a partition has no owner; taken by the loop.
    rejoin: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Told by the thread once it released its claims and ended.
    ended: Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The side group holding the claims of `group`'s members.
pub(super) fn lease_group(group: &str) -> String {
    format!("{group}.owners")
}

impl Leases {
    fn owned(&self) -> BTreeSet<Tp> {
        match self.owned.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records partitions assigned to (`true`) or revoked from (`false`) this member.
    pub(super) fn update(&self, tps: &[Tp], assigned: bool) {
        self.changed_ms.store(now_ms(), Ordering::SeqCst);
        let mut owned = match self.owned.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for tp in tps {
            if assigned {
                owned.insert(tp.clone());
            } else {
                owned.remove(tp);
            }
        }
    }

    /// Whether the lease thread found a partition without an owner since the last call.
    pub(super) fn take_rejoin(&self) -> bool {
        self.rejoin.swap(false, Ordering::SeqCst)
    }

    /// Stops the lease thread, which releases this member's claims; waits at most 3 s for it
    /// (a broker that is away cannot hold the shutdown; the claims then lapse by themselves).
    pub(super) async fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let ended = match self.ended.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(ended) = ended {
            let _ = tokio::time::timeout(Duration::from_secs(3), ended).await;
        }
    }

    /// Starts the lease thread: claims every `lapse_after / 6` (at least 1 s) and flags a
    /// rejoin when a partition of `topics` went unclaimed for `lapse_after`. A zero
    /// `lapse_after` starts nothing.
    pub(super) fn spawn(
        &self,
        kafka: &KafkaSettings,
        stage: &'static str,
        group: &str,
        topics: Vec<&'static str>,
        lapse_after: Duration,
    ) -> anyhow::Result<()> {
        if lapse_after.is_zero() {
            return Ok(());
        }
        let mut config = kafka.client_config();
        config
            .set("group.id", lease_group(group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer: BaseConsumer = config.create()?;
        let every = (lapse_after / 6).max(Duration::from_secs(1));
        let this = self.clone();
        let (ended, on_end) = tokio::sync::oneshot::channel();
        if let Ok(mut g) = self.ended.lock() {
            *g = Some(on_end);
        }
        std::thread::Builder::new()
            .name(format!("{stage}-leases"))
            .spawn(move || {
                this.run(&consumer, stage, topics, every, lapse_after);
                this.release(&consumer, stage);
                let _ = ended.send(());
            })?;
        Ok(())
    }

    /// Releases the claims of the partitions this member still owns (claim time 0).
    fn release(&self, consumer: &BaseConsumer, stage: &'static str) {
        let owned = self.owned();
        if owned.is_empty() {
            return;
        }
        let mut released = TopicPartitionList::new();
        for (topic, partition) in &owned {
            let _ = released.add_partition_offset(topic, *partition, Offset::Offset(0));
        }
        if let Err(error) = consumer.commit(&released, CommitMode::Sync) {
            tracing::debug!(stage, %error, "ownership release failed");
        }
    }

    fn run(
        &self,
        consumer: &BaseConsumer,
        stage: &'static str,
        topics: Vec<&'static str>,
        every: Duration,
        lapse_after: Duration,
    ) {
        let timeout = Duration::from_secs(5);
        let after_ms = lapse_after.as_millis() as i64;
        let mut since = now_ms();
        loop {
            let mut slept = Duration::ZERO;
            while slept < every {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let step = Duration::from_millis(200);
                std::thread::sleep(step);
                slept += step;
            }
            let owned = self.owned();
            let now = now_ms();
            if !owned.is_empty() {
                let mut claims = TopicPartitionList::new();
                for (topic, partition) in &owned {
                    // Only fails for a negative offset; the clock is past 1970.
                    let _ = claims.add_partition_offset(topic, *partition, Offset::Offset(now));
                }
                if let Err(error) = consumer.commit(&claims, CommitMode::Sync) {
                    tracing::debug!(stage, %error, "ownership claim failed");
                }
            }
            let Some(leases) = read_leases(consumer, &topics, timeout) else {
                continue;
            };
            // A partition released by a member that left gracefully has no claim until its new
            // owner's first one: count from this member's last rebalance, not from before it.
            since = since.max(self.changed_ms.load(Ordering::SeqCst));
            let unowned = lapsed(now, since, &leases, &owned, after_ms);
            if !unowned.is_empty() {
                tracing::warn!(stage, partitions = ?unowned, "partitions nobody has claimed for a while: rejoining the group");
                self.rejoin.store(true, Ordering::SeqCst);
                since = now;
            }
        }
    }
}

/// Every partition of `topics` with its last claim, or `None` when the broker cannot tell.
fn read_leases(
    consumer: &BaseConsumer,
    topics: &[&str],
    timeout: Duration,
) -> Option<Vec<(Tp, Option<i64>)>> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    Some(
        committed
            .elements()
            .iter()
            .map(|e| {
                let claimed = match e.offset() {
                    Offset::Offset(at) => Some(at),
                    _ => None,
                };
                ((e.topic().to_string(), e.partition()), claimed)
            })
            .collect(),
    )
}

/// The claims on `topic`'s partitions held in `group`'s side group (see the module).
pub fn read_claims(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
) -> Result<Vec<(Tp, Option<i64>)>, InspectError> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", lease_group(group))
        .set("enable.auto.commit", "false")
        .create()?;
    read_leases(&consumer, &[topic], Duration::from_secs(10))
        .ok_or_else(|| InspectError::Timeout(lease_group(group)))
}

/// The partitions claimed less than `fresh_ms` before `now_ms` (a released claim is 0), with
/// the claim's age: the group has live members on them.
pub fn live(claims: &[(Tp, Option<i64>)], now_ms: i64, fresh_ms: i64) -> Vec<(Tp, i64)> {
    claims
        .iter()
        .filter_map(|(tp, claimed)| {
            let at = (*claimed)?;
            let age = now_ms.saturating_sub(at);
            (at > 0 && age < fresh_ms).then(|| (tp.clone(), age))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_fresh_unreleased_claims_are_live() {
        let tp = |p| ("in".to_string(), p);
        let claims = vec![
            (tp(0), Some(95_000)),
            (tp(1), Some(0)),
            (tp(2), None),
            (tp(3), Some(40_000)),
        ];
        assert_eq!(live(&claims, 100_000, 45_000), vec![(tp(0), 5_000)]);
        assert_eq!(live(&claims, 100_000, 61_000).len(), 2);
    }
}
