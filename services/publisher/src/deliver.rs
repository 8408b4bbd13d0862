//! Delivering one target's records: results, dead letters and the breaker's new state.

use crate::breaker::{Breaker, Failure};
use crate::bundle::{self, Item, Resource};
use crate::ehr::{self, ItemResult};
use crate::targets::{Configured, Entry, Target};
use crate::{Change, Publisher, Tracked, classify};
use ohx_common::kafka::{Emitter, Input, StageError};
use ohx_common::records::{FhirResource, PublishResult, content_hash_checked, topic};
use ohx_common::trace;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

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

static TARGET_FAILURES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_publisher_target_failures",
        "Calls to an EHR target that failed for the whole target, by target and kind",
    )
});

/// The records a delivery could not deliver (indices into its input), to hold.
type Undelivered = Vec<usize>;

/// A target's records ready to be sent, or what to hold without a call.
pub(crate) enum Prepared {
    /// Send `items` (made from the records at `sent`).
    Call {
        target: Target,
        items: Vec<Item>,
        sent: Vec<usize>,
        timeout: Option<Duration>,
        prior: Tracked,
    },
    /// No call: hold these records.
    Hold(Undelivered),
}

impl Publisher {
    /// Delivers one target's records (in offset order per partition, at most one per
    /// identity), emitting results and dead letters; records the breaker's new state in
    /// `change`. Returns the records not delivered, to hold.
    pub(crate) async fn deliver(
        &self,
        target_id: &str,
        records: &[&Input<FhirResource>],
        out: &mut Emitter,
        now_ms: i64,
        change: &mut Change,
    ) -> Result<Undelivered, StageError> {
        match self
            .prepare(target_id, records, out, now_ms, change)
            .await?
        {
            Prepared::Hold(undelivered) => Ok(undelivered),
            Prepared::Call {
                target,
                items,
                sent,
                timeout,
                prior,
            } => {
                let run = self.ehr.publish_target(&target, &items, timeout).await;
                self.finish(target_id, records, sent, &prior, run, out, now_ms, change)
                    .await
            }
        }
    }

    /// Makes the items to send for a target's records (dead-lettering those that cannot be
    /// sent); a target whose configuration cannot be used holds them all.
    pub(crate) async fn prepare(
        &self,
        target_id: &str,
        records: &[&Input<FhirResource>],
        out: &mut Emitter,
        now_ms: i64,
        change: &mut Change,
    ) -> Result<Prepared, StageError> {
        let Some(entry) = self.targets.get(target_id) else {
            return Ok(Prepared::Hold((0..records.len()).collect()));
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
                return Ok(Prepared::Hold((0..records.len()).collect()));
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
            return Ok(Prepared::Hold(Vec::new()));
        }
        let timeout = (prior.breaker != Breaker::default()).then_some(self.settings.probe_timeout);
        Ok(Prepared::Call {
            target: target.clone(),
            items,
            sent,
            timeout,
            prior,
        })
    }

    /// Emits what a call did for a target's records (results, dead letters), records the
    /// breaker's new state, and returns the records not delivered, to hold.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn finish(
        &self,
        target_id: &str,
        records: &[&Input<FhirResource>],
        sent: Vec<usize>,
        prior: &Tracked,
        run: ehr::TargetRun,
        out: &mut Emitter,
        now_ms: i64,
        change: &mut Change,
    ) -> Result<Undelivered, StageError> {
        let Some(entry) = self.targets.get(target_id) else {
            return Ok((0..records.len()).collect());
        };
        let now = chrono::Utc::now().timestamp_millis();
        let mut undelivered = Vec::new();
        let mut rejected = 0usize;
        // The traces of what the server confirmed, for the log (a webhook followed to here).
        let mut traces = std::collections::BTreeSet::new();
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
            if outcome != "rejected"
                && let Some(t) = trace::Trace::from_headers(&input.headers)
            {
                traces.insert(t.trace_id());
            }
            out.follow(input);
            out.emit(topic::PUBLISH_RESULTS, &r.identity, &result)
                .await?;
        }
        match &run.failure {
            Some(failure) => {
                self.record_failure(target_id, entry, prior, failure, now_ms, change);
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
        if !traces.is_empty() {
            let trace_ids = traces.into_iter().collect::<Vec<_>>().join(",");
            tracing::info!(target_id, trace_ids, "resources written to the EHR");
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
}

/// Parses and hashes a resource and checks it can be addressed (`Err`: dead letter).
pub fn item_of(r: &FhirResource, mode: bundle::UpsertMode) -> Result<Item, String> {
    // Parsed into its members once (which checks it), then hashed from its text (the mapper's
    // canonical JSON hashes without re-serializing).
    let resource =
        Resource::parse(&r.resource).map_err(|e| format!("resource is not a JSON object: {e}"))?;
    let hash =
        content_hash_checked(&r.resource).map_err(|e| format!("resource is not JSON: {e}"))?;
    let item = Item {
        resource_type: r.resource_type.clone(),
        resource_id: r.resource_id.clone(),
        resource,
        hash,
        revision: r.source_revision,
        bytes: r.resource.len(),
    };
    bundle::upsert_url(&item, mode)?;
    Ok(item)
}

/// Keeps the last record of each identity (offset order), returning the kept indices and the
/// superseded ones.
pub(crate) fn last_per_identity(records: &[&Input<FhirResource>]) -> (Vec<usize>, Vec<usize>) {
    let mut last_of: HashMap<&str, usize> = HashMap::new();
    for (i, input) in records.iter().enumerate() {
        last_of.insert(input.value.identity.as_str(), i);
    }
    (0..records.len()).partition(|i| last_of.get(records[*i].value.identity.as_str()) == Some(i))
}
