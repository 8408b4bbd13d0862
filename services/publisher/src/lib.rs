//! Sends FHIR resources to EHR targets as transaction Bundles of idempotent upserts.
//!
//! Per batch and target: one `batch` read of the resources' current state (skipping those the
//! server already holds with the same content hash, so replays create no versions), one
//! `transaction` of `PUT` upserts, and a `PublishResult` (no values) per resource. 429/5xx and
//! network errors are transient: the batch is retried with backoff (Retry-After honoured) and no
//! offset advances. A rejected transaction (4xx) is retried resource by resource to isolate the
//! invalid one, which goes to the dead-letter topic with the server's OperationOutcome.

pub mod bundle;

use bundle::{Item, UpsertMode};
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{FhirResource, PublishResult, content_hash_of, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static PUBLISHED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_resources_published",
        "Resources sent to EHR targets, by type and outcome (created, updated, unchanged, rejected)",
    )
});
static E2E_LATENCY: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_seconds_histogram(
        "ohx_end_to_end_latency",
        "Originating event received to EHR confirmed, by resource type",
    )
});
static PUBLISH_LATENCY: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_seconds_histogram(
        "ohx_publish_latency",
        "Duration of one transaction against an EHR target",
    )
});

/// How the publisher authenticates to a target.
#[derive(Clone)]
pub enum Auth {
    None,
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// An EHR target as the publisher uses it.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub auth: Auth,
    pub mode: UpsertMode,
}

/// A failed call to an EHR.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("rejected with {status}: {body}")]
    Rejected { status: u16, body: String },
}

impl From<CallError> for StageError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Transient {
                reason,
                retry_after,
            } => StageError::Transient {
                kind: "ehr",
                reason,
                retry_after,
            },
            CallError::Rejected { status, body } => {
                StageError::transient("ehr", format!("unexpected rejection {status}: {body}"))
            }
        }
    }
}

/// What the server did with one resource: (outcome, HTTP status, version), or why it rejected it.
type ItemResult = Result<(String, i32, Option<String>), String>;

/// The publisher stage.
pub struct Publisher {
    http: reqwest::Client,
    pool: Pool,
    secrets: Option<SecretBox>,
    targets: HashMap<String, Target>,
    targets_loaded: Option<Instant>,
    targets_ttl: Duration,
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
        request_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .build()?;
        Ok(Self {
            http,
            pool,
            secrets,
            targets: HashMap::new(),
            targets_loaded: None,
            targets_ttl: Duration::from_secs(60),
        })
    }

    async fn load_targets(&mut self) -> Result<(), StageError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| StageError::transient("database", e))?;
        let rows = client
            .query(
                "SELECT id, base_url, auth_kind, auth_secret, upsert_mode FROM ehr_targets",
                &[],
            )
            .await
            .map_err(|e| StageError::transient("database", e))?;
        let mut targets = HashMap::new();
        for row in rows {
            let id: uuid::Uuid = row.get(0);
            let kind: String = row.get(2);
            let secret: Option<String> = row.get(3);
            let auth = match (kind.as_str(), secret) {
                ("none", _) => Auth::None,
                ("bearer", Some(sealed)) => {
                    let Some(secrets) = &self.secrets else {
                        tracing::error!(target_id = %id, "bearer target but OHX_SECRET_KEYS is not set");
                        continue;
                    };
                    match secrets.open_string(&sealed, &format!("ehr_target:{id}:auth_secret")) {
                        Ok(token) => Auth::Bearer(token),
                        Err(error) => {
                            tracing::error!(target_id = %id, %error, "cannot open target credentials");
                            continue;
                        }
                    }
                }
                (other, _) => {
                    tracing::error!(target_id = %id, auth_kind = other, "auth kind not supported by this publisher version");
                    continue;
                }
            };
            let mode: String = row.get(4);
            let mode = if mode == "conditional" {
                UpsertMode::Conditional
            } else {
                UpsertMode::Put
            };
            let base_url: String = row.get(1);
            targets.insert(
                id.to_string(),
                Target {
                    base_url: base_url.trim_end_matches('/').to_string(),
                    auth,
                    mode,
                },
            );
        }
        self.targets = targets;
        self.targets_loaded = Some(Instant::now());
        Ok(())
    }

    async fn post_bundle(&self, target: &Target, bundle: &Value) -> Result<Value, CallError> {
        let mut req = self
            .http
            .post(&target.base_url)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json")
            .json(bundle);
        if let Auth::Bearer(token) = &target.auth {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| CallError::Transient {
            reason: format!("request failed: {e}"),
            retry_after: None,
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.text().await.map_err(|e| CallError::Transient {
            reason: format!("reading response failed: {e}"),
            retry_after: None,
        })?;
        if status.is_success() {
            serde_json::from_str(&body).map_err(|e| CallError::Transient {
                reason: format!("unreadable response: {e}"),
                retry_after: None,
            })
        } else if status.as_u16() == 429
            || status.is_server_error()
            || status.as_u16() == 401
            || status.as_u16() == 408
        {
            Err(CallError::Transient {
                reason: format!("{status}: {}", bundle::outcome_codes(&body)),
                retry_after,
            })
        } else {
            Err(CallError::Rejected {
                status: status.as_u16(),
                body,
            })
        }
    }

    /// Publishes one target's items; returns (item index, outcome, status, version) per item or
    /// a rejection reason.
    async fn publish_target(
        &self,
        target: &Target,
        items: &[Item],
    ) -> Result<Vec<ItemResult>, StageError> {
        let mut results: Vec<Option<ItemResult>> = vec![None; items.len()];
        // 1. What does the server already hold?
        let refs: Vec<&Item> = items.iter().collect();
        let read = bundle::read_bundle(&refs, target.mode).map_err(StageError::Fatal)?;
        let current = match self.post_bundle(target, &read).await {
            Ok(resp) => bundle::current_hashes(&resp, items.len()),
            Err(CallError::Rejected { status, body }) => {
                tracing::warn!(status, issues = %bundle::outcome_codes(&body), "read batch rejected; publishing without the unchanged check");
                vec![None; items.len()]
            }
            Err(e) => return Err(e.into()),
        };
        let mut todo = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if current[i].as_deref() == Some(item.hash.as_str()) {
                results[i] = Some(Ok(("unchanged".into(), 200, None)));
            } else {
                todo.push(i);
            }
        }
        if !todo.is_empty() {
            // 2. One transaction of upserts.
            let refs: Vec<&Item> = todo.iter().map(|i| &items[*i]).collect();
            let tx = bundle::transaction_bundle(&refs, target.mode).map_err(StageError::Fatal)?;
            let started = Instant::now();
            match self.post_bundle(target, &tx).await {
                Ok(resp) => {
                    PUBLISH_LATENCY.record(started.elapsed().as_secs_f64(), &[]);
                    let outcomes = bundle::transaction_outcomes(&resp, todo.len())
                        .map_err(|e| StageError::transient("ehr", e))?;
                    for (i, o) in todo.iter().zip(outcomes) {
                        let kind = if o.http_status == 201 {
                            "created"
                        } else {
                            "updated"
                        };
                        results[*i] = Some(Ok((kind.into(), o.http_status, o.version_id)));
                    }
                }
                Err(CallError::Rejected { status, body }) => {
                    // 3. Isolate the rejected resource(s): one transaction per resource.
                    tracing::warn!(status, issues = %bundle::outcome_codes(&body), "transaction rejected; retrying resources one by one");
                    for i in &todo {
                        let one = bundle::transaction_bundle(&[&items[*i]], target.mode)
                            .map_err(StageError::Fatal)?;
                        match self.post_bundle(target, &one).await {
                            Ok(resp) => {
                                let o = bundle::transaction_outcomes(&resp, 1)
                                    .map_err(|e| StageError::transient("ehr", e))?;
                                let o = &o[0];
                                let kind = if o.http_status == 201 {
                                    "created"
                                } else {
                                    "updated"
                                };
                                results[*i] =
                                    Some(Ok((kind.into(), o.http_status, o.version_id.clone())));
                            }
                            Err(CallError::Rejected { status, body }) => {
                                results[*i] = Some(Err(format!(
                                    "{status}: {}",
                                    bundle::outcome_summary(&body)
                                )));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("no outcome".into())))
            .collect())
    }
}

impl Processor for Publisher {
    type In = FhirResource;
    type Change = ();

    async fn process(
        &mut self,
        batch: &[Input<FhirResource>],
        out: &mut Emitter,
    ) -> Result<(), StageError> {
        let stale = self
            .targets_loaded
            .is_none_or(|t| t.elapsed() > self.targets_ttl);
        let unknown = batch
            .iter()
            .any(|i| !self.targets.contains_key(&i.value.context.ehr_target_id));
        if stale || unknown {
            self.load_targets().await?;
        }
        // Group by target; within a batch keep only the last record of an identity.
        let mut last_of: HashMap<&str, usize> = HashMap::new();
        for (i, input) in batch.iter().enumerate() {
            last_of.insert(input.value.identity.as_str(), i);
        }
        let mut by_target: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, input) in batch.iter().enumerate() {
            if last_of.get(input.value.identity.as_str()) != Some(&i) {
                continue;
            }
            let r = &input.value;
            if !self.targets.contains_key(&r.context.ehr_target_id) {
                out.dead_letter(
                    input,
                    "unknown_target",
                    format!(
                        "EHR target {} is not configured or not usable",
                        r.context.ehr_target_id
                    ),
                )
                .await?;
                continue;
            }
            by_target
                .entry(r.context.ehr_target_id.clone())
                .or_default()
                .push(i);
        }
        for (target_id, indices) in by_target {
            let Some(target) = self.targets.get(&target_id).cloned() else {
                continue;
            };
            let mut items = Vec::new();
            let mut inputs = Vec::new();
            for i in indices {
                let input = &batch[i];
                let r = &input.value;
                let parsed: Value = match serde_json::from_str(&r.resource) {
                    Ok(v) => v,
                    Err(e) => {
                        out.dead_letter(input, "invalid", format!("resource is not JSON: {e}"))
                            .await?;
                        continue;
                    }
                };
                let hash = match content_hash_of(&parsed) {
                    Ok(h) => h,
                    Err(e) => {
                        out.dead_letter(
                            input,
                            "invalid",
                            format!("resource cannot be hashed: {e}"),
                        )
                        .await?;
                        continue;
                    }
                };
                items.push(Item {
                    resource_type: r.resource_type.clone(),
                    resource_id: r.resource_id.clone(),
                    resource: parsed,
                    hash,
                });
                inputs.push(input);
            }
            if items.is_empty() {
                continue;
            }
            let results = self.publish_target(&target, &items).await?;
            let now = chrono::Utc::now().timestamp_millis();
            for (input, result) in inputs.into_iter().zip(results) {
                let r = &input.value;
                let (outcome, status, version) = match result {
                    Ok(ok) => ok,
                    Err(reason) => {
                        out.dead_letter(input, "rejected", reason).await?;
                        ("rejected".to_string(), 422, None)
                    }
                };
                PUBLISHED.add(
                    1,
                    &[
                        KeyValue::new("type", r.resource_type.clone()),
                        KeyValue::new("outcome", outcome.clone()),
                    ],
                );
                if outcome != "rejected" && outcome != "unchanged" {
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
                    outcome,
                    http_status: status,
                    version_id: version,
                    received_at: r.context.received_at,
                    confirmed_at: now,
                };
                out.emit(topic::PUBLISH_RESULTS, &r.identity, &result)
                    .await?;
            }
        }
        Ok(())
    }
}
