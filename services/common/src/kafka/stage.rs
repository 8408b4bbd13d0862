//! The consumer loop every stage runs ([`run_stage`]).
//!
//! 1. Poll a batch (up to `max_batch` records, waiting at most `linger` for more). Rebalances
//!    are served inside the poll; each record is tagged with its partition's generation, and
//!    records of a partition revoked after they were polled are left to its next owner.
//! 2. Decode; a record that does not decode goes to `ohx.dead-letter.v1` with the reason. A
//!    registry that cannot answer is retried with backoff (its cached errors cleared) for at
//!    most `OHX_REGISTRY_GIVE_UP_MS`, then the record is dead-lettered.
//! 3. Process. A transient failure processes the same batch again after a backoff or the
//!    server's Retry-After; the processor's state is unchanged until step 5.
//! 4. Produce every output, phase by phase, and wait for every acknowledgement.
//! 5. Apply the processor's state change (dropped if a partition of the batch was revoked
//!    meanwhile), then commit, per partition, what the processor allows.
//!
//! While the loop waits (a backoff, a slow produce) it keeps polling with its partitions paused,
//! so it stays in its group however long an outage lasts and serves rebalances as they come.
//! When a partition is revoked, the offsets acknowledged for it are committed synchronously
//! before it is handed over. Commits are asynchronous otherwise, and an offset counts as
//! committed only once the broker confirmed it.

use super::KafkaSettings;
use super::leases::Leases;
use super::processor::{Emitter, Input, OutRecord, Processor, RawInput, StageError};
use super::producer::Producer;
use super::track::{Collected, CommitEntry, Offsets, Ownership, RebalanceEvent, Span, Tp};
use crate::admin::Health;
use crate::codec::Codec;
use crate::telemetry;
use opentelemetry::KeyValue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
    /// How long an undecodable record waits for the schema registry before it is
    /// dead-lettered (`OHX_REGISTRY_GIVE_UP_MS`).
    pub registry_give_up: Duration,
    /// How long the consumer may stay without an assignment before it leaves and rejoins its
    /// group (`OHX_REJOIN_AFTER_MS`).
    pub rejoin_after: Duration,
    /// How long a partition may go without an owner claiming it before a member rejoins its
    /// group to have it assigned again (`OHX_ORPHAN_AFTER_MS`; 0 = never; see `leases`).
    pub orphan_after: Duration,
    /// Longest time the broker may hold a fetch open waiting for records
    /// (`OHX_FETCH_WAIT_MS`, librdkafka's `fetch.wait.max.ms`).
    pub fetch_wait: Duration,
}

/// Default of `OHX_FETCH_WAIT_MS`. Kafka and Redpanda answer a fetch as soon as a record
/// arrives, so a long wait costs no latency there and keeps idle consumers nearly free (each
/// waiting fetch is one request per wait). tansu 0.6 answers only at the end of the wait (or
/// half of it when that is 250 ms or more), so the local stack sets 50 ms.
pub const DEFAULT_FETCH_WAIT_MS: u64 = 500;

impl StageSettings {
    /// Returns settings for `stage` reading `input_topics`, from the environment.
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
            registry_give_up: crate::config::millis("OHX_REGISTRY_GIVE_UP_MS", 300_000)?,
            rejoin_after: crate::config::millis("OHX_REJOIN_AFTER_MS", 20_000)?,
            orphan_after: crate::config::millis("OHX_ORPHAN_AFTER_MS", 45_000)?,
            fetch_wait: crate::config::millis("OHX_FETCH_WAIT_MS", DEFAULT_FETCH_WAIT_MS)?,
        })
    }
}

/// What the librdkafka callbacks hand to the loop.
#[derive(Default)]
struct Shared {
    events: Vec<RebalanceEvent>,
    /// The latest committable offset per owned partition, for the hand-over commit.
    ready: HashMap<Tp, CommitEntry>,
    /// Answers to commits: partition, offset, success.
    answers: Vec<(Tp, i64, bool)>,
}

/// Consumer context: records rebalances and commit answers, commits on hand-over, exports lag
/// and broker reachability.
struct StageContext {
    stage: &'static str,
    group: String,
    shared: Arc<Mutex<Shared>>,
    health: Health,
    leases: Leases,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    match shared.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn commit_list(entries: &[CommitEntry]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for e in entries {
        tpl.add_partition_offset(&e.tp.0, e.tp.1, Offset::Offset(e.offset))?;
        if let (Some(md), Some(mut el)) = (&e.metadata, tpl.find_partition(&e.tp.0, e.tp.1)) {
            el.set_metadata(md);
        }
    }
    Ok(tpl)
}

impl ClientContext for StageContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // Reaching the end of a partition is reported through the consumer, not an error.
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        tracing::error!(stage = self.stage, %error, reason, "librdkafka error");
    }

    fn stats(&self, stats: Statistics) {
        // A consumer with no broker up cannot make progress: unhealthy after the grace.
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        if up {
            self.health.recovered("consume");
        } else {
            self.health.failing("consume", "no broker connection");
        }
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Hand-over: commit what is acknowledged for the partitions about to go, so their next
        // owner starts exactly after it.
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked = tps(tpl);
        let entries: Vec<CommitEntry> = {
            let mut shared = lock(&self.shared);
            revoked
                .iter()
                .filter_map(|tp| shared.ready.remove(tp))
                .collect()
        };
        if entries.is_empty() {
            return;
        }
        match commit_list(&entries).and_then(|l| consumer.commit(&l, CommitMode::Sync)) {
            Ok(()) => tracing::info!(
                stage = self.stage,
                partitions = entries.len(),
                "hand-over commit"
            ),
            Err(error) => tracing::warn!(stage = self.stage, %error, "hand-over commit failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => {
                self.leases.update(&tps(tpl), true);
                RebalanceEvent::Assigned(tps(tpl))
            }
            Rebalance::Revoke(tpl) => {
                self.leases.update(&tps(tpl), false);
                RebalanceEvent::Revoked(tps(tpl))
            }
            Rebalance::Error(error) => {
                tracing::warn!(stage = self.stage, %error, "rebalance error");
                return;
            }
        };
        lock(&self.shared).events.push(event);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let ok = result.is_ok();
        if let Err(error) = &result {
            tracing::warn!(stage = self.stage, %error, "commit failed");
            self.health.failing("commit", &error.to_string());
        } else {
            self.health.recovered("commit");
        }
        let mut shared = lock(&self.shared);
        for e in offsets.elements() {
            if let Offset::Offset(o) = e.offset() {
                let ok = ok && e.error().is_ok();
                shared
                    .answers
                    .push(((e.topic().to_string(), e.partition()), o, ok));
            }
        }
    }
}

/// A polled record before decoding.
struct Raw {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
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
    processor: P,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let leases = Leases::default();
    leases.spawn(
        kafka,
        settings.stage,
        &settings.group_id,
        settings.input_topics.clone(),
        settings.orphan_after,
    )?;
    let context = StageContext {
        stage: settings.stage,
        group: settings.group_id.clone(),
        shared: shared.clone(),
        health: health.clone(),
        leases: leases.clone(),
    };
    let mut config = kafka.client_config();
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "300000")
        .set("statistics.interval.ms", "5000")
        .set(
            "fetch.wait.max.ms",
            settings.fetch_wait.as_millis().max(1).to_string(),
        );
    for (k, v) in &kafka.extra {
        config.set(k, v);
    }
    let consumer: StreamConsumer<StageContext> = config.create_with_context(context)?;
    consumer.subscribe(&settings.input_topics)?;
    tracing::info!(stage = settings.stage, group = %settings.group_id, topics = ?settings.input_topics, "consuming");
    let codec = producer.codec().clone();
    let mut stage = Stage {
        ready_key: settings.group_id.clone(),
        settings,
        consumer,
        shared,
        producer,
        codec,
        health,
        shutdown,
        processor,
        ownership: Ownership::default(),
        offsets: Offsets::default(),
        caught_up: BTreeSet::new(),
        carry: Collected::default(),
        revoked_log: Vec::new(),
        without_assignment_since: Instant::now(),
        stalled_lag: None,
        paused: BTreeSet::new(),
        leases,
        lag_age_at: HashMap::new(),
    };
    stage.health.set_component_ready(&stage.ready_key, false);
    let result = stage.run().await;
    stage.leases.stop().await;
    stage.close().await;
    // Leaving the group (so the others rebalance at once) waits for the broker; a broker that
    // is away must not hold the shutdown: the consumer is closed off the async runtime and
    // waited for at most 5 s.
    let (done, left) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        stage.consumer.unsubscribe();
        drop(stage);
        let _ = done.send(());
    });
    if tokio::time::timeout(Duration::from_secs(5), left)
        .await
        .is_err()
    {
        tracing::warn!("the group was not left in time (broker away?)");
    }
    result
}

struct Stage<P: Processor> {
    settings: StageSettings,
    ready_key: String,
    consumer: StreamConsumer<StageContext>,
    shared: Arc<Mutex<Shared>>,
    producer: Producer,
    codec: Arc<Codec>,
    health: Health,
    shutdown: CancellationToken,
    processor: P,
    ownership: Ownership,
    offsets: Offsets,
    caught_up: BTreeSet<Tp>,
    /// Records polled while waiting, to start the next batch with.
    carry: Collected<Raw>,
    /// Every partition revoked so far, in order (a batch looks at what came after its start).
    revoked_log: Vec<Tp>,
    without_assignment_since: Instant,
    /// The group's lag and committed offsets at the previous stall check.
    stalled_lag: Option<(i64, Vec<i64>)>,
    /// Partitions this loop paused (kept across revokes until resumed).
    paused: BTreeSet<Tp>,
    leases: Leases,
    /// When the age of each partition's records was last exported.
    lag_age_at: HashMap<Tp, Instant>,
}

/// How a wait ended.
enum Waited {
    Elapsed,
    Shutdown,
}

impl<P: Processor> Stage<P> {
    async fn run(&mut self) -> anyhow::Result<()> {
        let stage = self.settings.stage;
        let tick_every = self.settings.tick.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(tick_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let mut raw = std::mem::take(&mut self.carry);
            let mut is_tick = false;
            if raw.is_empty() {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return Ok(()),
                    _ = ticker.tick(), if self.settings.tick.is_some() => { is_tick = true; }
                    _ = housekeeping.tick() => { self.housekeeping(); continue; }
                    m = async { self.consumer.recv().await.map(|m| m.detach()) } => {
                        self.take(m, &mut raw);
                    }
                }
            }
            if !is_tick {
                let deadline = tokio::time::Instant::now() + self.settings.linger;
                while raw.len() < self.settings.max_batch {
                    let polled = tokio::time::timeout_at(deadline, async {
                        self.consumer.recv().await.map(|m| m.detach())
                    })
                    .await;
                    match polled {
                        Ok(m) => self.take(m, &mut raw),
                        Err(_) => break,
                    }
                }
            }
            self.serve_events();
            let dropped = raw.retain_current(&self.ownership);
            if dropped > 0 {
                telemetry::RECORDS_REVOKED.add(dropped as u64, &[KeyValue::new("stage", stage)]);
            }
            if raw.is_empty() && !is_tick {
                continue;
            }
            let started = Instant::now();
            let outcome = if is_tick {
                self.run_tick().await?
            } else {
                self.run_batch(raw).await?
            };
            self.resume_all();
            if matches!(outcome, Waited::Shutdown) {
                return Ok(());
            }
            self.commit_due();
            telemetry::BATCH_SECONDS.record(
                started.elapsed().as_secs_f64(),
                &[KeyValue::new("stage", stage)],
            );
        }
    }

    /// Takes a polled message (or error) after serving the rebalances that came before it.
    fn take(&mut self, polled: KafkaResult<OwnedMessage>, into: &mut Collected<Raw>) {
        self.serve_events();
        match polled {
            Ok(msg) => {
                let tp = (msg.topic().to_string(), msg.partition());
                self.caught_up.remove(&tp);
                telemetry::RECORDS_CONSUMED.add(
                    1,
                    &[
                        KeyValue::new("stage", self.settings.stage),
                        KeyValue::new("topic", tp.0.clone()),
                    ],
                );
                let headers = super::inspect::owned_headers(&msg);
                if let Some(ts) = msg.timestamp().to_millis() {
                    self.export_lag_age(&tp, (chrono::Utc::now().timestamp_millis() - ts).max(0));
                }
                let offset = msg.offset();
                let raw = Raw {
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                };
                into.push(&self.ownership, tp, offset, raw);
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                for t in self.settings.input_topics.clone() {
                    let tp = (t.to_string(), partition);
                    if self.ownership.owns(&tp) {
                        self.lag_age_at.remove(&tp);
                        self.export_lag_age(&tp, 0);
                        self.caught_up.insert(tp);
                    }
                }
            }
            Err(error) => tracing::warn!(stage = self.settings.stage, %error, "consumer error"),
        }
    }

    /// Exports the age of a partition's records, at most once a second per partition.
    fn export_lag_age(&mut self, tp: &Tp, age_ms: i64) {
        if self
            .lag_age_at
            .get(tp)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.lag_age_at.insert(tp.clone(), Instant::now());
        telemetry::CONSUMER_LAG_SECONDS.record(
            age_ms as f64 / 1000.0,
            &[
                KeyValue::new("group", self.settings.group_id.clone()),
                KeyValue::new("topic", tp.0.clone()),
                KeyValue::new("partition", i64::from(tp.1)),
            ],
        );
    }

    /// Applies the rebalances librdkafka served, in order, and tells the processor.
    fn serve_events(&mut self) {
        let (events, answers) = {
            let mut shared = lock(&self.shared);
            (
                std::mem::take(&mut shared.events),
                std::mem::take(&mut shared.answers),
            )
        };
        for (tp, offset, ok) in answers {
            self.offsets.answered(&tp, offset, ok);
        }
        for event in events {
            self.ownership.apply(&event);
            match &event {
                RebalanceEvent::Revoked(revoked) => {
                    telemetry::REBALANCES.add(
                        1,
                        &[
                            KeyValue::new("stage", self.settings.stage),
                            KeyValue::new("kind", "revoked"),
                        ],
                    );
                    self.offsets.forget(revoked);
                    {
                        let mut shared = lock(&self.shared);
                        for tp in revoked {
                            shared.ready.remove(tp);
                        }
                    }
                    for tp in revoked {
                        self.caught_up.remove(tp);
                    }
                    self.revoked_log.extend(revoked.iter().cloned());
                    self.processor.revoked(revoked);
                    tracing::info!(stage = self.settings.stage, partitions = ?revoked, "partitions revoked");
                }
                RebalanceEvent::Assigned(assigned) => {
                    telemetry::REBALANCES.add(
                        1,
                        &[
                            KeyValue::new("stage", self.settings.stage),
                            KeyValue::new("kind", "assigned"),
                        ],
                    );
                    for tp in assigned {
                        self.caught_up.remove(tp);
                    }
                    tracing::info!(stage = self.settings.stage, partitions = ?assigned, "partitions assigned");
                    if !assigned.is_empty() {
                        let with_metadata = self.committed_metadata(assigned);
                        self.processor.assigned(&with_metadata);
                    }
                }
            }
            if !self.ownership.is_member() {
                self.without_assignment_since = Instant::now();
            }
        }
        let member = self.ownership.is_member();
        self.health.set_component_ready(&self.ready_key, member);
        if member {
            self.health.recovered("group");
        }
    }

    /// Periodic checks while idle. A consumer that owns no partition for `rejoin_after` leaves
    /// and rejoins its group when the group looks stuck: it is not a member at all (its join
    /// waits on a dead member), or it is a member with nothing assigned while the group has lag
    /// whose committed offsets did not move (tansu 0.6 can leave partitions without an owner
    /// after evicting a dead member). A rejoin makes the coordinator assign everything again.
    /// The same happens whenever the ownership leases show a partition nobody owns.
    fn housekeeping(&mut self) {
        self.serve_events();
        if self.leases.take_rejoin() {
            self.health
                .failing("group", "a partition of the group has no owner");
            self.rejoin();
            self.stalled_lag = None;
            return;
        }
        if !self.ownership.owned().is_empty() {
            self.stalled_lag = None;
            return;
        }
        if self.ownership.is_member() && self.stalled_lag.is_none() {
            // The first look at the group since this member was left with nothing.
            self.stalled_lag = self.group_lag();
        }
        let waited = self.without_assignment_since.elapsed();
        if waited < self.settings.rejoin_after {
            return;
        }
        self.without_assignment_since = Instant::now();
        if self.ownership.is_member() {
            let now = self.group_lag();
            let stuck = match (&self.stalled_lag, &now) {
                (Some(before), Some(now)) => now.0 > 0 && before.1 == now.1,
                _ => false,
            };
            self.stalled_lag = now;
            if !stuck {
                return;
            }
        }
        self.health
            .failing("group", "no partition assignment while the group has work");
        tracing::warn!(
            stage = self.settings.stage,
            "no assignment, rejoining the group"
        );
        self.rejoin();
        self.stalled_lag = None;
    }

    /// The group's partitions on the input topics with their committed and end offsets, or
    /// `None` when the broker cannot tell.
    fn group_partitions(&self) -> Option<Vec<(Tp, i64, i64)>> {
        let timeout = Duration::from_secs(5);
        let mut tpl = TopicPartitionList::new();
        for topic in &self.settings.input_topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), timeout).ok()?;
            for t in metadata.topics() {
                for p in t.partitions() {
                    tpl.add_partition(topic, p.id());
                }
            }
        }
        let committed = self.consumer.committed_offsets(tpl, timeout).ok()?;
        let mut out = Vec::new();
        for e in committed.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)
                .ok()?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            out.push(((e.topic().to_string(), e.partition()), at, high));
        }
        Some(out)
    }

    /// The group's total lag and its committed offsets.
    fn group_lag(&self) -> Option<(i64, Vec<i64>)> {
        let partitions = self.group_partitions()?;
        let lag = partitions.iter().map(|(_, c, h)| (h - c).max(0)).sum();
        Some((lag, partitions.iter().map(|(_, c, _)| *c).collect()))
    }

    fn rejoin(&mut self) {
        self.consumer.unsubscribe();
        self.serve_events();
        if let Err(error) = self.consumer.subscribe(&self.settings.input_topics) {
            tracing::error!(stage = self.settings.stage, %error, "cannot subscribe again");
        }
    }

    /// Decodes, processes, produces and applies one batch; records revoked meanwhile are
    /// dropped at each step.
    async fn run_batch(&mut self, raw: Collected<Raw>) -> anyhow::Result<Waited> {
        let Some(Decoded {
            mut batch,
            mut generations,
            dead,
            spans,
        }) = self.decode(raw).await?
        else {
            return Ok(Waited::Shutdown);
        };
        let mut out = Emitter::new(self.settings.stage, self.codec.clone());
        let mut attempt = 0u32;
        let change = loop {
            out.clear();
            let result = if batch.is_empty() {
                Ok(None)
            } else {
                self.processor.process(&batch, &mut out).await.map(Some)
            };
            match self.retry_or_fail(result, &mut attempt).await? {
                Step::Done(c) => break c,
                Step::Shutdown => return Ok(Waited::Shutdown),
                Step::Again => {
                    // Partitions revoked during the wait: their records are the next owner's.
                    let keep: Vec<bool> = batch
                        .iter()
                        .zip(&generations)
                        .map(|(i, g)| {
                            self.ownership
                                .is_current(&(i.topic.clone(), i.partition), *g)
                        })
                        .collect();
                    let mut k = keep.iter();
                    batch.retain(|_| k.next().copied().unwrap_or(false));
                    let mut k = keep.iter();
                    generations.retain(|_| k.next().copied().unwrap_or(false));
                }
            }
        };
        // From here on, a revoke of any partition of the batch voids the change.
        let revoked_mark = self.revoked_log.len();
        let partitions: BTreeSet<Tp> = spans
            .iter()
            .filter(|(tp, span)| self.ownership.is_current(tp, span.generation))
            .map(|(tp, _)| tp.clone())
            .collect();
        let mut phases = out.take_phases();
        if !dead.is_empty() {
            match phases.first_mut() {
                Some(first) => {
                    first.splice(0..0, dead);
                }
                None => phases.push(dead),
            }
        }
        if let Waited::Shutdown = self.produce(phases).await {
            return Ok(Waited::Shutdown);
        }
        let applied = match change {
            Some(change) => self.apply(change, &partitions, revoked_mark).await?,
            None => Applied::Yes,
        };
        match applied {
            Applied::Yes => self.offsets.acknowledge(&spans, &self.ownership),
            Applied::Dropped => self.rewind(&spans),
            Applied::Shutdown => return Ok(Waited::Shutdown),
        }
        Ok(Waited::Elapsed)
    }

    /// A batch whose change was dropped is read again, from its first offset, in every
    /// partition this consumer still owns in the same generation (the others are read again
    /// by their new assignment from the committed offset).
    fn rewind(&mut self, spans: &BTreeMap<Tp, Span>) {
        let mut carry = std::mem::take(&mut self.carry);
        for (tp, span) in spans {
            if !self.ownership.is_current(tp, span.generation) {
                continue;
            }
            carry.retain_except(tp);
            if let Err(error) = self.consumer.seek(
                &tp.0,
                tp.1,
                Offset::Offset(span.first),
                Duration::from_secs(10),
            ) {
                // Without the seek the records would be skipped: give the partition up so its
                // next owner reads them from the committed offset.
                tracing::error!(stage = self.settings.stage, %error, topic = %tp.0, partition = tp.1, "cannot rewind, rejoining the group");
                self.consumer.unsubscribe();
                self.serve_events();
                if let Err(error) = self.consumer.subscribe(&self.settings.input_topics) {
                    tracing::error!(stage = self.settings.stage, %error, "cannot subscribe again");
                }
                break;
            }
        }
        self.carry = carry;
        telemetry::RETRIES.add(
            1,
            &[
                KeyValue::new("stage", self.settings.stage),
                KeyValue::new("kind", "rewind"),
            ],
        );
    }

    async fn run_tick(&mut self) -> anyhow::Result<Waited> {
        let revoked_mark = self.revoked_log.len();
        let partitions = self.ownership.owned().clone();
        let mut out = Emitter::new(self.settings.stage, self.codec.clone());
        let mut attempt = 0u32;
        let change = loop {
            out.clear();
            let now = chrono::Utc::now().timestamp_millis();
            let result = self.processor.tick(now, &self.caught_up, &mut out).await;
            match self.retry_or_fail(result, &mut attempt).await? {
                Step::Done(c) => break c,
                Step::Shutdown => return Ok(Waited::Shutdown),
                Step::Again => {}
            }
        };
        if let Waited::Shutdown = self.produce(out.take_phases()).await {
            return Ok(Waited::Shutdown);
        }
        if let Some(change) = change
            && let Applied::Shutdown = self.apply(change, &partitions, revoked_mark).await?
        {
            return Ok(Waited::Shutdown);
        }
        Ok(Waited::Elapsed)
    }

    /// Decodes the current records. Returns the inputs with their generations, the dead letters
    /// of undecodable records, and the next offset per partition; `None` on shutdown.
    async fn decode(&mut self, mut raw: Collected<Raw>) -> anyhow::Result<Option<Decoded<P::In>>> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            raw.retain_current(&self.ownership);
            let give_up = started.elapsed() >= self.settings.registry_give_up;
            let mut inputs = Vec::with_capacity(raw.len());
            let mut generations = Vec::with_capacity(raw.len());
            let mut dead = Emitter::new(self.settings.stage, self.codec.clone());
            let mut registry_down = None;
            for t in raw.items() {
                let (topic, partition) = (&t.tp.0, t.tp.1);
                match self.codec.decode::<P::In>(&t.item.payload).await {
                    Ok(value) => {
                        inputs.push(Input {
                            topic: topic.clone(),
                            partition,
                            offset: t.offset,
                            key: t.item.key.clone(),
                            value,
                            payload: t.item.payload.clone(),
                            headers: t.item.headers.clone(),
                        });
                        generations.push(t.generation);
                    }
                    Err(e) if e.is_transient() && !give_up => {
                        registry_down = Some(e.to_string());
                        break;
                    }
                    Err(e) => {
                        let kind = if e.is_transient() {
                            "schema_registry"
                        } else {
                            "decode"
                        };
                        let raw_input = RawInput {
                            topic,
                            partition,
                            offset: t.offset,
                            key: t.item.key.clone(),
                            payload: Some(t.item.payload.clone()),
                            headers: &t.item.headers,
                        };
                        match dead.dead_letter_raw(raw_input, kind, e.to_string()).await {
                            Ok(()) => {}
                            Err(StageError::Fatal(reason)) => {
                                anyhow::bail!("{}: {reason}", self.settings.stage)
                            }
                            Err(StageError::Transient { reason, .. }) => {
                                registry_down = Some(reason);
                                break;
                            }
                        }
                    }
                }
            }
            let Some(reason) = registry_down else {
                let dead: Vec<OutRecord> = dead.take_phases().into_iter().flatten().collect();
                return Ok(Some(Decoded {
                    batch: inputs,
                    generations,
                    dead,
                    spans: raw.spans(),
                }));
            };
            // The registry could not answer: forget its cached errors and try again later.
            telemetry::RETRIES.add(
                1,
                &[
                    KeyValue::new("stage", self.settings.stage),
                    KeyValue::new("kind", "schema_registry"),
                ],
            );
            let wait = backoff(attempt);
            attempt += 1;
            tracing::warn!(stage = self.settings.stage, reason = %reason, wait_ms = wait.as_millis() as u64, "schema registry unavailable, retrying");
            self.codec.clear_registry_errors();
            if let Waited::Shutdown = self.wait_polling(wait).await {
                return Ok(None);
            }
        }
    }

    /// Turns a processing result into the next step, waiting before a retry.
    async fn retry_or_fail<C>(
        &mut self,
        result: Result<C, StageError>,
        attempt: &mut u32,
    ) -> anyhow::Result<Step<C>> {
        match result {
            Ok(c) => Ok(Step::Done(c)),
            Err(StageError::Fatal(reason)) => {
                self.health.set_component_ready(&self.ready_key, false);
                anyhow::bail!("{}: {reason}", self.settings.stage)
            }
            Err(StageError::Transient {
                kind,
                reason,
                retry_after,
            }) => {
                telemetry::RETRIES.add(
                    1,
                    &[
                        KeyValue::new("stage", self.settings.stage),
                        KeyValue::new("kind", kind),
                    ],
                );
                let wait = retry_after.unwrap_or_else(|| backoff(*attempt));
                *attempt += 1;
                tracing::warn!(stage = self.settings.stage, kind, reason = %reason, wait_ms = wait.as_millis() as u64, "transient failure, retrying");
                Ok(match self.wait_polling(wait).await {
                    Waited::Shutdown => Step::Shutdown,
                    Waited::Elapsed => Step::Again,
                })
            }
        }
    }

    /// Produces the phases in order, each retried until every record is acknowledged.
    async fn produce(&mut self, phases: Vec<Vec<OutRecord>>) -> Waited {
        for records in phases {
            let mut attempt = 0u32;
            loop {
                let sent = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return Waited::Shutdown,
                    r = self.producer.send_all(&records) => r,
                };
                match sent {
                    Ok(()) => break,
                    Err(error) => {
                        telemetry::RETRIES.add(
                            1,
                            &[
                                KeyValue::new("stage", self.settings.stage),
                                KeyValue::new("kind", "produce"),
                            ],
                        );
                        tracing::warn!(stage = self.settings.stage, %error, "produce failed, retrying");
                        attempt += 1;
                        if let Waited::Shutdown = self.wait_polling(backoff(attempt)).await {
                            return Waited::Shutdown;
                        }
                    }
                }
            }
        }
        Waited::Elapsed
    }

    /// Applies a change whose outputs are acknowledged, unless a partition it concerns was
    /// revoked since it was computed: then the change is dropped (its records are read again).
    async fn apply(
        &mut self,
        change: P::Change,
        partitions: &BTreeSet<Tp>,
        revoked_mark: usize,
    ) -> anyhow::Result<Applied> {
        let mut attempt = 0u32;
        loop {
            if self.revoked_log[revoked_mark..]
                .iter()
                .any(|tp| partitions.contains(tp))
            {
                tracing::info!(
                    stage = self.settings.stage,
                    "state change dropped: a partition of the batch was revoked"
                );
                return Ok(Applied::Dropped);
            }
            match self.processor.apply(&change).await {
                Ok(()) => return Ok(Applied::Yes),
                Err(StageError::Fatal(reason)) => {
                    anyhow::bail!("{}: {reason}", self.settings.stage)
                }
                Err(StageError::Transient { kind, reason, .. }) => {
                    tracing::warn!(stage = self.settings.stage, kind, reason = %reason, "post-acknowledge step failed, retrying");
                    attempt += 1;
                    if let Waited::Shutdown = self.wait_polling(backoff(attempt)).await {
                        return Ok(Applied::Shutdown);
                    }
                }
            }
        }
    }

    /// Waits `wait` while serving the group: partitions paused, records polled meanwhile (from
    /// partitions assigned during the wait) kept for the next batch.
    async fn wait_polling(&mut self, wait: Duration) -> Waited {
        self.pause_all();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let polled = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Waited::Shutdown,
                _ = tokio::time::sleep_until(deadline) => return Waited::Elapsed,
                m = async { self.consumer.recv().await.map(|m| m.detach()) } => m,
            };
            let mut carry = std::mem::take(&mut self.carry);
            let was = carry.len();
            self.take(polled, &mut carry);
            if carry.len() > was {
                // A partition assigned during the wait: hold it too.
                self.pause_all();
            }
            self.carry = carry;
        }
    }

    /// Pauses every owned partition not paused yet. librdkafka keeps the application's pause
    /// across a revoke and a later assign, and remembers the position of the last record
    /// returned, so fetching resumes exactly after it.
    fn pause_all(&mut self) {
        let mut tpl = TopicPartitionList::new();
        for tp in self.ownership.owned() {
            if self.paused.insert(tp.clone()) {
                tpl.add_partition(&tp.0, tp.1);
            }
        }
        if tpl.count() > 0
            && let Err(error) = self.consumer.pause(&tpl)
        {
            tracing::warn!(stage = self.settings.stage, %error, "cannot pause");
        }
    }

    /// Resumes exactly the partitions this loop paused (resuming one that is not paused would
    /// make librdkafka drop its prefetched records and fetch them again).
    fn resume_all(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for tp in std::mem::take(&mut self.paused) {
            tpl.add_partition(&tp.0, tp.1);
        }
        if let Err(error) = self.consumer.resume(&tpl) {
            tracing::warn!(stage = self.settings.stage, %error, "cannot resume");
        }
    }

    /// Sends the due commits asynchronously and publishes the committable offsets for the
    /// hand-over commit.
    fn commit_due(&mut self) {
        self.serve_events();
        let processor = &self.processor;
        let due = self
            .offsets
            .due(|tp, next| processor.commit_point(&tp.0, tp.1, next));
        if due.is_empty() {
            return;
        }
        {
            let mut shared = lock(&self.shared);
            for e in &due {
                shared.ready.insert(e.tp.clone(), e.clone());
            }
        }
        match commit_list(&due).and_then(|l| self.consumer.commit(&l, CommitMode::Async)) {
            Ok(()) => self.offsets.sent(&due),
            Err(error) => {
                tracing::warn!(stage = self.settings.stage, %error, "commit failed");
                self.health.failing("commit", &error.to_string());
            }
        }
    }

    /// Reads the metadata committed with the offsets of `partitions`.
    fn committed_metadata(&self, partitions: &[Tp]) -> Vec<(String, i32, Option<String>)> {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        let found = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10));
        partitions
            .iter()
            .map(|(t, p)| {
                let md = match &found {
                    Ok(list) => list
                        .find_partition(t, *p)
                        .map(|e| e.metadata().to_string())
                        .filter(|m| !m.is_empty()),
                    Err(error) => {
                        tracing::warn!(%error, topic = %t, partition = p, "cannot read committed metadata");
                        None
                    }
                };
                (t.clone(), *p, md)
            })
            .collect()
    }

    /// Graceful shutdown: commits what is acknowledged (synchronously) and leaves the group.
    async fn close(&mut self) {
        self.health.set_component_ready(&self.ready_key, false);
        self.serve_events();
        lock(&self.shared).ready.clear();
        let processor = &self.processor;
        let due = self
            .offsets
            .due(|tp, next| processor.commit_point(&tp.0, tp.1, next));
        if !due.is_empty() {
            match commit_list(&due).and_then(|l| self.consumer.commit(&l, CommitMode::Async)) {
                Ok(()) => self.offsets.sent(&due),
                Err(error) => {
                    tracing::warn!(stage = self.settings.stage, %error, "final commit failed")
                }
            }
            // Wait a moment for the answer, polling; a broker that cannot answer does not
            // hold the shutdown (what is not committed is read again by the next owner).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while due
                .iter()
                .any(|e| self.offsets.confirmed(&e.tp) != Some(e.offset))
                && tokio::time::Instant::now() < deadline
            {
                let polled = tokio::time::timeout_at(deadline, async {
                    self.consumer.recv().await.map(|m| m.detach())
                })
                .await;
                if polled.is_err() {
                    break;
                }
                self.serve_events();
            }
        }
        tracing::info!(stage = self.settings.stage, "stopped");
    }
}

/// A batch decoded: inputs with their generations, dead letters of undecodable records, and
/// what it covers per partition.
struct Decoded<T> {
    batch: Vec<Input<T>>,
    generations: Vec<u64>,
    dead: Vec<OutRecord>,
    spans: BTreeMap<Tp, Span>,
}

/// What became of a change.
enum Applied {
    Yes,
    Dropped,
    Shutdown,
}

enum Step<C> {
    Done(C),
    Again,
    Shutdown,
}
