//! Sends FHIR resources to EHR targets as transaction Bundles of idempotent upserts.
//!
//! Per batch and target: one `batch` read of the resources' current state ([`read`]: in put
//! mode one search per resource type), one `transaction` of `PUT` upserts for what must be
//! written, and a `PublishResult` (no values) per resource; a
//! batch larger than `OHX_PUBLISH_BATCH_SIZE` goes out as several such read+transaction pairs at
//! once (at most `OHX_PUBLISH_CONCURRENCY`). A batch keeps one record per identity, so two
//! versions of a resource are never in flight together, and the next batch starts only once
//! every transaction of this one is answered.
//! Resources are tagged with their content hash and source revision; what the server already
//! holds unchanged is skipped (replays create no versions) and what it holds with a newer source
//! revision is never overwritten ([`decision`]).
//!
//! Failures are classified ([`classify`]): a resource rejected for its content goes to the
//! dead-letter topic with the server's OperationOutcome; a target-level failure (credentials,
//! URL, TLS, FHIR version) or a transient one (429, 5xx, timeouts) affects **that target only**
//! (a 429 or 503 is first tried again within the batch, see [`ehr::busy_retry_wait`]):
//! its records are held in memory while other targets keep flowing ([`ledger`]), its circuit
//! breaker ([`breaker`]) decides when the stage's tick probes it again, and commits never pass a
//! held record. Held records live in memory only: after a restart they are re-read from the
//! topic (from the oldest held offset, which is where the commit stopped), and a target down for
//! longer than the topic's 24 h retention loses the records retention deletes (see [`ledger`]).
//! Target configuration is reloaded after a TTL and before probing a target that failed at the
//! target level, so a fixed target recovers without a restart.
//!
//! Known cost: calls are made from the stage's loop. The targets of a batch are called
//! concurrently, but the batch (and the tick's probes, one target after the other) waits for
//! the slowest: a target that stops answering delays the others by its request timeout the
//! first time and by the (shorter) probe timeout at each probe, spaced by its breaker's growing
//! cool-down.

pub mod auth;
pub mod breaker;
pub mod bundle;
pub mod classify;
pub mod decision;
mod deliver;
pub mod ehr;
pub mod ledger;
pub mod read;
pub mod resource;
pub mod status;
pub mod targets;

#[cfg(test)]
mod stage_tests;

use breaker::{Breaker, BreakerSettings};
use deadpool_postgres::Pool;
pub use deliver::item_of;
use deliver::last_per_identity;
use ehr::Ehr;
use ledger::{Held, Ledger, LedgerChange, Tp};
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::FhirResource;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Gauge;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use targets::Entry;

static BREAKER_STATE: LazyLock<Gauge<i64>> = LazyLock::new(|| {
    ohx_common::telemetry::meter()
        .i64_gauge("ohx_circuit_breaker_state")
        .with_description("Circuit breaker per EHR target: 0 closed, 1 half-open, 2 open")
        .build()
});
static HELD_RECORDS: LazyLock<Gauge<i64>> = LazyLock::new(|| {
    ohx_common::telemetry::meter()
        .i64_gauge("ohx_publisher_held_records")
        .with_description("Records held in memory for an EHR target that cannot take them now")
        .build()
});

/// A target's breaker with the configuration fingerprint it last failed with.
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    pub breaker: Breaker,
    pub fingerprint: String,
}

/// What a batch or tick changes, applied once its outputs are acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub ledger: LedgerChange,
    pub breakers: Vec<(String, Tracked)>,
    /// Reload the targets' configuration before the next call (a target-level failure).
    pub reload_targets: bool,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.ledger.is_empty() && self.breakers.is_empty() && !self.reload_targets
    }

    fn breaker(&self, target: &str) -> Option<&Tracked> {
        self.breakers
            .iter()
            .rev()
            .find(|(t, _)| t == target)
            .map(|(_, b)| b)
    }
}

/// A target's records and the indices of those to hold.
type ToHold<'a> = (&'a str, &'a [&'a Input<FhirResource>], Vec<usize>);

/// Tunables of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub request_timeout: Duration,
    /// Request timeout while a target is failing (its calls stall the stage while they wait).
    pub probe_timeout: Duration,
    /// How long a loaded target configuration is used before it is read again.
    pub targets_ttl: Duration,
    pub breaker: BreakerSettings,
    /// Held records sent per transaction by the tick.
    pub chunk: usize,
    /// Most resource text per transaction.
    pub transaction_bytes: usize,
    /// Chunks per target per tick.
    pub chunks_per_tick: usize,
    /// Held records (all targets) above which each tick logs a warning.
    pub held_warn: usize,
    /// This replica's name in `ehr_target_status`.
    pub instance: String,
}

/// Default most resource text per transaction (`OHX_PUBLISH_MAX_TRANSACTION_BYTES`): 4 MiB,
/// below the request limits FHIR servers commonly set.
pub const DEFAULT_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
            targets_ttl: Duration::from_secs(60),
            breaker: BreakerSettings::default(),
            chunk: 100,
            transaction_bytes: DEFAULT_TRANSACTION_BYTES,
            chunks_per_tick: 10,
            held_warn: 50_000,
            instance: "publisher".into(),
        }
    }
}

/// The publisher stage.
pub struct Publisher {
    ehr: Ehr,
    pool: Pool,
    secrets: Option<SecretBox>,
    settings: PublisherSettings,
    targets: HashMap<String, Entry>,
    targets_loaded: Option<Instant>,
    /// Read the configuration again before the next call (a target failed at target level).
    reload_soon: bool,
    ledger: Ledger,
    breakers: HashMap<String, Tracked>,
    status: status::StatusWriter,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("targets", &self.targets.len())
            .finish()
    }
}

impl Publisher {
    /// Creates the stage. `secrets` opens target credentials (needed only for bearer targets).
    pub fn new(
        pool: Pool,
        secrets: Option<SecretBox>,
        settings: PublisherSettings,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            ehr: Ehr::new(settings.request_timeout)?
                .with_transaction_size(settings.chunk)
                .with_transaction_bytes(settings.transaction_bytes),
            status: status::StatusWriter::new(settings.instance.clone()),
            pool,
            secrets,
            settings,
            targets: HashMap::new(),
            targets_loaded: None,
            reload_soon: false,
            ledger: Ledger::default(),
            breakers: HashMap::new(),
        })
    }

    async fn load_targets(&mut self) -> Result<(), StageError> {
        self.targets = targets::load(&self.pool, self.secrets.as_ref()).await?;
        self.targets_loaded = Some(Instant::now());
        self.reload_soon = false;
        Ok(())
    }

    fn targets_stale(&self) -> bool {
        self.reload_soon
            || self
                .targets_loaded
                .is_none_or(|t| t.elapsed() > self.settings.targets_ttl)
    }

    fn apply_change(&mut self, change: &Change) {
        let skipped = self.ledger.apply(&change.ledger);
        if skipped > 0 {
            tracing::info!(
                partitions = skipped,
                "held records of revoked partitions left to their next owner"
            );
        }
        for (target, tracked) in &change.breakers {
            self.breakers.insert(target.clone(), tracked.clone());
        }
        if change.reload_targets {
            self.reload_soon = true;
        }
        self.export_gauges(chrono::Utc::now().timestamp_millis());
    }

    fn export_gauges(&self, now_ms: i64) {
        let closed = Tracked::default();
        for target in self.targets.keys().chain(self.breakers.keys()) {
            let t = self.breakers.get(target).unwrap_or(&closed);
            BREAKER_STATE.record(
                t.breaker.state(now_ms) as i64,
                &[KeyValue::new("target", target.clone())],
            );
        }
        for (target, n) in self.ledger.counts() {
            HELD_RECORDS.record(
                i64::try_from(*n).unwrap_or(i64::MAX),
                &[KeyValue::new("target", target.clone())],
            );
        }
    }

    /// Every known target's status as this replica sees it now.
    fn statuses(&self) -> HashMap<String, status::Status> {
        let closed = Tracked::default();
        self.targets
            .keys()
            .chain(self.breakers.keys())
            .map(|t| {
                let tracked = self.breakers.get(t).unwrap_or(&closed);
                (
                    t.clone(),
                    status::status_of(tracked, self.ledger.held_count(t)),
                )
            })
            .collect()
    }

    fn tracked(&self, change: &Change, target: &str) -> Tracked {
        change
            .breaker(target)
            .or_else(|| self.breakers.get(target))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether a target may be called now: its breaker allows it, or its configuration changed
    /// since it failed (probe the fix at once).
    fn may_call(&self, target_id: &str, now_ms: i64) -> bool {
        let Some(t) = self.breakers.get(target_id) else {
            return true;
        };
        t.breaker.allows(now_ms)
            || self
                .targets
                .get(target_id)
                .is_some_and(|e| !t.fingerprint.is_empty() && e.fingerprint != t.fingerprint)
    }

    fn warn_if_many_held(&self) {
        let total: usize = self.ledger.counts().values().sum();
        if total >= self.settings.held_warn {
            let per_target: BTreeMap<&String, &usize> = self
                .ledger
                .counts()
                .iter()
                .filter(|(_, n)| **n > 0)
                .collect();
            tracing::warn!(total, targets = ?per_target, "many records held in memory for unavailable EHR targets");
        }
    }
}

impl Processor for Publisher {
    type In = FhirResource;
    type Change = Change;

    async fn process(
        &mut self,
        batch: &[Input<FhirResource>],
        out: &mut Emitter,
    ) -> Result<Change, StageError> {
        let unknown = batch
            .iter()
            .any(|i| !self.targets.contains_key(&i.value.context.ehr_target_id));
        if unknown || self.targets_loaded.is_none() {
            self.load_targets().await?;
        } else if self.targets_stale()
            && let Err(error) = self.load_targets().await
        {
            // Keep delivering with the last configuration; a new target waits for the database.
            tracing::warn!(%error, "cannot reload EHR targets; using the last configuration");
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut change = Change::default();
        // The change applies only to the partitions not revoked since (see [`ledger`]).
        for input in batch {
            let tp: Tp = (input.topic.clone(), input.partition);
            change.ledger.touch(&tp, self.ledger.epoch(&tp));
        }
        // Within a batch only the last record of an identity matters.
        let all: Vec<&Input<FhirResource>> = batch.iter().collect();
        let (kept, _superseded) = last_per_identity(&all);
        let mut by_target: BTreeMap<&str, Vec<&Input<FhirResource>>> = BTreeMap::new();
        for i in kept {
            let input = all[i];
            let target_id = input.value.context.ehr_target_id.as_str();
            if !self.targets.contains_key(target_id) {
                out.dead_letter(
                    input,
                    "unknown_target",
                    format!("EHR target {target_id} is not configured"),
                )
                .await?;
                continue;
            }
            by_target.entry(target_id).or_default().push(input);
        }
        // Targets are called concurrently; their results are emitted one target after another.
        let mut undelivered: Vec<ToHold<'_>> = Vec::new();
        let mut pending = Vec::new();
        let mut calls = tokio::task::JoinSet::new();
        for (target_id, records) in &by_target {
            // A target with held records keeps its order: new records queue behind them.
            if self.ledger.held_count(target_id) > 0 || !self.may_call(target_id, now) {
                undelivered.push((target_id, records, (0..records.len()).collect()));
                continue;
            }
            match self
                .prepare(target_id, records, out, now, &mut change)
                .await?
            {
                deliver::Prepared::Hold(u) => undelivered.push((target_id, records, u)),
                deliver::Prepared::Call {
                    target,
                    items,
                    sent,
                    timeout,
                    prior,
                } => {
                    let ehr = self.ehr.clone();
                    let index = pending.len();
                    calls.spawn(async move {
                        (index, ehr.publish_target(&target, &items, timeout).await)
                    });
                    pending.push((*target_id, records.as_slice(), sent, prior));
                }
            }
        }
        let mut runs: Vec<Option<ehr::TargetRun>> = vec![None; pending.len()];
        while let Some(joined) = calls.join_next().await {
            let (index, run) =
                joined.map_err(|e| StageError::Fatal(format!("a publishing task failed: {e}")))?;
            if let Some(slot) = runs.get_mut(index) {
                *slot = Some(run);
            }
        }
        for ((target_id, records, sent, prior), run) in pending.into_iter().zip(runs) {
            let Some(run) = run else {
                return Err(StageError::Fatal("a publishing task gave no result".into()));
            };
            let u = self
                .finish(target_id, records, sent, &prior, run, out, now, &mut change)
                .await?;
            undelivered.push((target_id, records, u));
        }
        for (target_id, records, indices) in undelivered {
            for i in indices {
                change.ledger.hold.push(Held {
                    target: target_id.to_string(),
                    input: Arc::new(records[i].clone()),
                });
            }
        }
        if !change.ledger.hold.is_empty() {
            tracing::info!(
                records = change.ledger.hold.len(),
                "records held for unavailable EHR targets"
            );
        }
        Ok(change)
    }

    async fn tick(
        &mut self,
        now_ms: i64,
        _caught_up: &BTreeSet<(String, i32)>,
        out: &mut Emitter,
    ) -> Result<Option<Change>, StageError> {
        let mut change = Change::default();
        let mut held_targets = self.ledger.targets();
        held_targets.sort();
        if held_targets.is_empty() {
            self.export_gauges(now_ms);
            return Ok(None);
        }
        if self.targets_stale() {
            // A database outage must not stop the delivery of held records: keep the last
            // configuration and try again next tick.
            if let Err(error) = self.load_targets().await {
                tracing::warn!(%error, "cannot reload EHR targets; using the last configuration");
            }
        }
        for target_id in held_targets {
            let held: Vec<Held> = self
                .ledger
                .held_for(&target_id)
                .into_iter()
                .cloned()
                .collect();
            if !self.targets.contains_key(&target_id) && self.targets_loaded.is_some() {
                // The target was removed from the configuration: nowhere to send them.
                for h in &held {
                    let tp = h.tp();
                    change.ledger.touch(&tp, self.ledger.epoch(&tp));
                    out.dead_letter(
                        &*h.input,
                        "unknown_target",
                        format!("EHR target {target_id} is not configured"),
                    )
                    .await?;
                    change.ledger.release.push((tp, h.input.offset));
                }
                continue;
            }
            for chunk in held
                .chunks(self.settings.chunk.max(1))
                .take(self.settings.chunks_per_tick.max(1))
            {
                let tracked = self.tracked(&change, &target_id);
                let allowed = if change.breaker(&target_id).is_some() {
                    tracked.breaker.allows(now_ms)
                } else {
                    self.may_call(&target_id, now_ms)
                };
                if !allowed {
                    break;
                }
                let records: Vec<&Input<FhirResource>> = chunk.iter().map(|h| &*h.input).collect();
                let (kept, superseded) = last_per_identity(&records);
                for h in chunk {
                    let tp = h.tp();
                    change.ledger.touch(&tp, self.ledger.epoch(&tp));
                }
                for i in superseded {
                    change
                        .ledger
                        .release
                        .push((chunk[i].tp(), chunk[i].input.offset));
                }
                let kept_records: Vec<&Input<FhirResource>> =
                    kept.iter().map(|i| records[*i]).collect();
                let undelivered = self
                    .deliver(&target_id, &kept_records, out, now_ms, &mut change)
                    .await?;
                let undelivered: BTreeSet<usize> = undelivered.into_iter().collect();
                for (k, i) in kept.iter().enumerate() {
                    if !undelivered.contains(&k) {
                        change
                            .ledger
                            .release
                            .push((chunk[*i].tp(), chunk[*i].input.offset));
                    }
                }
                // Records still held with the target answering (waiting for a resource they
                // reference, which may be in a later chunk) do not stop the later chunks; a
                // failing target does, through its breaker, checked above. Two versions of a
                // resource cannot reorder on the server: older content is never written over
                // newer (`decision`).
            }
        }
        self.warn_if_many_held();
        self.export_gauges(now_ms);
        if change.is_empty() {
            return Ok(None);
        }
        Ok(Some(change))
    }

    async fn apply(&mut self, change: &Change) -> Result<(), StageError> {
        self.apply_change(change);
        let current = self.statuses();
        self.status.write(&self.pool, &current).await;
        Ok(())
    }

    fn commit_point(&self, topic: &str, partition: i32, next_offset: i64) -> (i64, Option<String>) {
        let tp: Tp = (topic.to_string(), partition);
        (self.ledger.commit_point(&tp, next_offset), None)
    }

    fn revoked(&mut self, partitions: &[(String, i32)]) {
        for tp in partitions {
            self.ledger.revoked(tp);
        }
        self.export_gauges(chrono::Utc::now().timestamp_millis());
    }
}
