//! Sends FHIR resources to EHR targets as transaction Bundles of idempotent upserts.
//!
//! Per batch and target: one `batch` read of the resources' current state, one `transaction`
//! of `PUT` upserts for what must be written, and a `PublishResult` (no values) per resource.
//! Resources are tagged with their content hash and source revision; what the server already
//! holds unchanged is skipped (replays create no versions) and what it holds with a newer source
//! revision is never overwritten ([`decision`]).
//!
//! Failures are classified ([`classify`]): a resource rejected for its content goes to the
//! dead-letter topic with the server's OperationOutcome; a target-level failure (credentials,
//! URL, TLS, FHIR version) or a transient one (429, 5xx, timeouts) affects **that target only**:
//! its records are held in memory while other targets keep flowing ([`ledger`]), its circuit
//! breaker ([`breaker`]) decides when the stage's tick probes it again, and commits never pass a
//! held record. Target configuration is reloaded after a TTL and before probing a target that
//! failed at the target level, so a fixed target recovers without a restart.

pub mod breaker;
pub mod bundle;
pub mod classify;
pub mod decision;
pub mod ehr;
pub mod ledger;
pub mod targets;

#[cfg(test)]
mod stage_tests;

use breaker::{Breaker, BreakerSettings, Failure};
use bundle::Item;
use deadpool_postgres::Pool;
use ehr::{Ehr, ItemResult};
use ledger::{Held, Ledger, LedgerChange, Tp};
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{FhirResource, PublishResult, content_hash_of, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use targets::{Configured, Entry};

static PUBLISHED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_resources_published",
        "Resources sent to EHR targets, by type and outcome (created, updated, unchanged, stale, rejected)",
    )
});
static E2E_LATENCY: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_seconds_histogram(
        "ohx_end_to_end_latency",
        "Originating event received to EHR confirmed, by resource type",
    )
});
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
static TARGET_FAILURES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_publisher_target_failures",
        "Calls to an EHR target that failed for the whole target, by target and kind",
    )
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
    /// Chunks per target per tick.
    pub chunks_per_tick: usize,
    /// Held records (all targets) above which each tick logs a warning.
    pub held_warn: usize,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
            targets_ttl: Duration::from_secs(60),
            breaker: BreakerSettings::default(),
            chunk: 100,
            chunks_per_tick: 10,
            held_warn: 50_000,
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
    /// The last change handed to the runtime and not applied yet (see [`ledger`]).
    unconfirmed: Option<Change>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("targets", &self.targets.len())
            .finish()
    }
}

/// The records a delivery could not deliver (indices into its input), to hold.
type Undelivered = Vec<usize>;

impl Publisher {
    /// Creates the stage. `secrets` opens target credentials (needed only for bearer targets).
    pub fn new(
        pool: Pool,
        secrets: Option<SecretBox>,
        settings: PublisherSettings,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            ehr: Ehr::new(settings.request_timeout)?,
            pool,
            secrets,
            settings,
            targets: HashMap::new(),
            targets_loaded: None,
            reload_soon: false,
            ledger: Ledger::default(),
            breakers: HashMap::new(),
            unconfirmed: None,
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

    /// Applies the part of a change the runtime dropped (a partition of its batch was revoked
    /// before the acknowledgement) that concerns partitions still owned: the runtime commits
    /// their offsets anyway, so their held records must not be forgotten.
    fn salvage(&mut self) {
        if let Some(change) = self.unconfirmed.take() {
            tracing::info!(
                held = change.ledger.hold.len(),
                "applying a state change the runtime dropped, for the partitions still owned"
            );
            self.apply_change(&change);
        }
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
        for (target, t) in &self.breakers {
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

    fn tracked(&self, change: &Change, target: &str) -> Tracked {
        change
            .breaker(target)
            .or_else(|| self.breakers.get(target))
            .cloned()
            .unwrap_or_default()
    }

    /// Delivers one target's records (in offset order per partition, at most one per
    /// identity), emitting results and dead letters; records the breaker's new state in
    /// `change`. Returns the records not delivered, to hold.
    async fn deliver(
        &self,
        target_id: &str,
        records: &[&Input<FhirResource>],
        out: &mut Emitter,
        now_ms: i64,
        change: &mut Change,
    ) -> Result<Undelivered, StageError> {
        let Some(entry) = self.targets.get(target_id) else {
            return Ok((0..records.len()).collect());
        };
        let prior = self.tracked(change, target_id);
        let target = match &entry.target {
            Configured::Usable(t) => t,
            Configured::Unusable(reason) => {
                let failure = ehr::CallFailure {
                    class: classify::Class::Target(classify::TargetFault::Unusable),
                    status: None,
                    reason: (*reason).to_string(),
                    body: String::new(),
                };
                self.record_failure(target_id, entry, &prior, &failure, now_ms, change);
                return Ok((0..records.len()).collect());
            }
        };
        let mut items = Vec::with_capacity(records.len());
        let mut sent = Vec::with_capacity(records.len());
        for (i, input) in records.iter().enumerate() {
            match item_of(&input.value, target.mode) {
                Ok(item) => {
                    items.push(item);
                    sent.push(i);
                }
                Err(reason) => out.dead_letter(*input, "invalid", reason).await?,
            }
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let timeout = (prior.breaker != Breaker::default()).then_some(self.settings.probe_timeout);
        let run = self.ehr.publish_target(target, &items, timeout).await;
        let now = chrono::Utc::now().timestamp_millis();
        let mut undelivered = Vec::new();
        let mut rejected = 0usize;
        for (i, result) in sent.into_iter().zip(run.results) {
            let input = records[i];
            let r = &input.value;
            let (outcome, status, version) = match result {
                None => {
                    undelivered.push(i);
                    continue;
                }
                Some(ItemResult::Done {
                    outcome,
                    status,
                    version,
                }) => (outcome, status, version),
                Some(ItemResult::Rejected { status, outcome }) => {
                    rejected += 1;
                    out.dead_letter(input, "rejected", format!("{status}: {outcome}"))
                        .await?;
                    ("rejected", i32::from(status), None)
                }
            };
            PUBLISHED.add(
                1,
                &[
                    KeyValue::new("type", r.resource_type.clone()),
                    KeyValue::new("outcome", outcome),
                ],
            );
            if matches!(outcome, "created" | "updated") {
                let latency = (now - r.context.received_at).max(0) as f64 / 1000.0;
                E2E_LATENCY.record(latency, &[KeyValue::new("type", r.resource_type.clone())]);
            }
            let result = PublishResult {
                identity: r.identity.clone(),
                organization_id: r.context.organization_id.clone(),
                ehr_target_id: r.context.ehr_target_id.clone(),
                patient_id: r.context.patient_id.clone(),
                link_id: r.context.link_id.clone(),
                sync_request_id: r.context.sync_request_id.clone(),
                resource_type: r.resource_type.clone(),
                resource_id: r.resource_id.clone(),
                outcome: outcome.to_string(),
                http_status: status,
                version_id: version,
                received_at: r.context.received_at,
                confirmed_at: now,
            };
            out.emit(topic::PUBLISH_RESULTS, &r.identity, &result)
                .await?;
        }
        match &run.failure {
            Some(failure) => {
                self.record_failure(target_id, entry, &prior, failure, now_ms, change);
            }
            None => {
                if prior.breaker != Breaker::default() {
                    tracing::info!(target_id, "EHR target recovered");
                }
                change.breakers.push((
                    target_id.to_string(),
                    Tracked {
                        breaker: prior.breaker.on_success(),
                        fingerprint: entry.fingerprint.clone(),
                    },
                ));
            }
        }
        if rejected > 0 {
            tracing::warn!(target_id, rejected, "resources rejected for their content");
        }
        Ok(undelivered)
    }

    fn record_failure(
        &self,
        target_id: &str,
        entry: &Entry,
        prior: &Tracked,
        failure: &ehr::CallFailure,
        now_ms: i64,
        change: &mut Change,
    ) {
        let f = failure.as_failure();
        let breaker =
            prior
                .breaker
                .on_failure(now_ms, f, &self.settings.breaker, rand::random::<f64>());
        let kind = match f {
            Failure::Transient { .. } => "transient",
            Failure::Target(fault) => fault.as_str(),
        };
        TARGET_FAILURES.add(
            1,
            &[
                KeyValue::new("target", target_id.to_string()),
                KeyValue::new("kind", kind),
            ],
        );
        // The reason holds statuses and issue codes only (no diagnostics, no values).
        tracing::warn!(
            target_id,
            kind,
            reason = %failure.reason,
            state = breaker.state(now_ms) as i64,
            retry_in_ms = (breaker.not_before_ms() - now_ms).max(0),
            "EHR target failed; its records are held"
        );
        if matches!(f, Failure::Target(_)) {
            change.reload_targets = true;
        }
        change.breakers.push((
            target_id.to_string(),
            Tracked {
                breaker,
                fingerprint: entry.fingerprint.clone(),
            },
        ));
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

/// Parses and hashes a resource and checks it can be addressed (`Err`: dead letter).
fn item_of(r: &FhirResource, mode: bundle::UpsertMode) -> Result<Item, String> {
    let parsed: Value =
        serde_json::from_str(&r.resource).map_err(|e| format!("resource is not JSON: {e}"))?;
    let hash = content_hash_of(&parsed).map_err(|e| format!("resource cannot be hashed: {e}"))?;
    let item = Item {
        resource_type: r.resource_type.clone(),
        resource_id: r.resource_id.clone(),
        resource: parsed,
        hash,
        revision: r.source_revision,
    };
    bundle::upsert_url(&item, mode)?;
    Ok(item)
}

/// Keeps the last record of each identity (offset order), returning the kept indices and the
/// superseded ones.
fn last_per_identity(records: &[&Input<FhirResource>]) -> (Vec<usize>, Vec<usize>) {
    let mut last_of: HashMap<&str, usize> = HashMap::new();
    for (i, input) in records.iter().enumerate() {
        last_of.insert(input.value.identity.as_str(), i);
    }
    (0..records.len()).partition(|i| last_of.get(records[*i].value.identity.as_str()) == Some(i))
}

impl Processor for Publisher {
    type In = FhirResource;
    type Change = Change;

    async fn process(
        &mut self,
        batch: &[Input<FhirResource>],
        out: &mut Emitter,
    ) -> Result<Change, StageError> {
        self.salvage();
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
        // Every record of the batch is accounted for once this change applies.
        for input in batch {
            let tp: Tp = (input.topic.clone(), input.partition);
            change.ledger.touch(&tp, self.ledger.epoch(&tp));
            change.ledger.covered.push((tp, input.offset + 1));
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
        for (target_id, records) in by_target {
            // A target with held records keeps its order: new records queue behind them.
            let undelivered =
                if self.ledger.held_count(target_id) > 0 || !self.may_call(target_id, now) {
                    (0..records.len()).collect()
                } else {
                    self.deliver(target_id, &records, out, now, &mut change)
                        .await?
                };
            for i in undelivered {
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
        self.unconfirmed = Some(change.clone());
        Ok(change)
    }

    async fn tick(
        &mut self,
        now_ms: i64,
        _caught_up: &BTreeSet<(String, i32)>,
        out: &mut Emitter,
    ) -> Result<Option<Change>, StageError> {
        self.salvage();
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
                if !undelivered.is_empty() {
                    break;
                }
            }
        }
        self.warn_if_many_held();
        self.export_gauges(now_ms);
        if change.is_empty() {
            return Ok(None);
        }
        self.unconfirmed = Some(change.clone());
        Ok(Some(change))
    }

    async fn apply(&mut self, change: &Change) -> Result<(), StageError> {
        self.apply_change(change);
        self.unconfirmed = None;
        Ok(())
    }

    fn commit_point(&self, topic: &str, partition: i32, next_offset: i64) -> (i64, Option<String>) {
        let tp: Tp = (topic.to_string(), partition);
        let mut allowed = self.ledger.commit_point(&tp, next_offset);
        if let Some(pending) = &self.unconfirmed {
            allowed = allowed.min(pending.ledger.commit_limit(&tp));
        }
        (allowed, None)
    }

    fn revoked(&mut self, partitions: &[(String, i32)]) {
        for tp in partitions {
            self.ledger.revoked(tp);
        }
        self.export_gauges(chrono::Utc::now().timestamp_millis());
    }
}
