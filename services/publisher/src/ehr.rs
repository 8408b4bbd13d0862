//! Calls to one EHR target: read the current state, write a transaction of upserts, isolate a
//! rejected resource. Every failure is classified ([`crate::classify`]).

use crate::auth::{Tokens, WRITTEN_TYPES};
use crate::breaker::Failure;
use crate::bundle::{self, Item, OwnRef, RefKey};
use crate::classify::{self, Class, Scope, TargetFault, TransportError};
use crate::decision::{PublishDecision, publish_decision};
use crate::read;
use crate::targets::Target;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static PUBLISH_LATENCY: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_seconds_histogram(
        "ohx_publish_latency",
        "Duration of one transaction against an EHR target",
    )
});

static BUSY_RETRIED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_publisher_busy_retries",
        "Chunks tried again within the batch after the EHR answered 429 or 503",
    )
});

static UNRESOLVED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_publisher_unresolved_references",
        "Resources held because a resource they reference is not on the EHR yet, by type",
    )
});

static READS_ONE_BY_ONE: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_publisher_search_reads_unsettled",
        "Chunks whose state the search by id did not settle (a further page, an error), read one resource at a time",
    )
});

/// Retries of a chunk the server answered "busy" (429 or 503) within the batch, before the
/// target is held for its breaker: a server under load (hfs on SQLite answers 503 "database
/// table is locked" now and then) otherwise stalls the target for the breaker's retry delay.
pub const BUSY_RETRIES: u32 = 3;
/// The wait before the first such retry, doubled each time.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(50);
/// The longest Retry-After waited for within the batch; a longer one holds the target.
pub const BUSY_MAX_WAIT: Duration = Duration::from_secs(1);

/// How long to wait before retrying a chunk that failed with `failure` after `attempt` busy
/// retries; `None` when it is not retried within the batch (not a busy answer, retries used
/// up, or a Retry-After beyond [`BUSY_MAX_WAIT`]). A chunk is retried whole (read, decide,
/// write), so a retry is as idempotent as the first try.
pub fn busy_retry_wait(failure: Option<&CallFailure>, attempt: u32) -> Option<Duration> {
    let failure = failure?;
    let Class::Transient { retry_after } = failure.class else {
        return None;
    };
    if attempt >= BUSY_RETRIES || !matches!(failure.status, Some(429 | 503)) {
        return None;
    }
    let backoff = BUSY_BACKOFF.saturating_mul(1 << attempt);
    match retry_after {
        Some(wait) if wait > BUSY_MAX_WAIT => None,
        Some(wait) => Some(wait.max(backoff)),
        None => Some(backoff),
    }
}

/// A failed call: its class and a reason safe for logs (status and issue codes, no
/// diagnostics), plus the body for a dead letter.
#[derive(Debug, Clone)]
pub struct CallFailure {
    pub class: Class,
    pub status: Option<u16>,
    pub reason: String,
    pub body: String,
}

impl CallFailure {
    fn transient(reason: impl Into<String>) -> Self {
        Self {
            class: Class::Transient { retry_after: None },
            status: None,
            reason: reason.into(),
            body: String::new(),
        }
    }

    /// The failure as the breaker sees it (a resource-level class here means the target
    /// refused a call that carried no single resource's fault).
    pub fn as_failure(&self) -> Failure {
        match self.class {
            Class::Transient { retry_after } => Failure::Transient { retry_after },
            Class::Target(f) => Failure::Target(f),
            Class::Resource | Class::Isolate => Failure::Target(TargetFault::Refused),
        }
    }
}

/// What happened to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult {
    /// `created`, `updated`, `unchanged` or `stale`, with the HTTP status and version.
    Done {
        outcome: &'static str,
        status: i32,
        version: Option<String>,
    },
    /// Rejected for its content: status and the OperationOutcome summary (for the dead letter).
    Rejected { status: u16, outcome: String },
}

/// The result of publishing items to a target: a result per item (`None`: not done, to hold)
/// and the failure that stopped the run, if any.
#[derive(Debug, Clone)]
pub struct TargetRun {
    pub results: Vec<Option<ItemResult>>,
    pub failure: Option<CallFailure>,
}

/// The HTTP side of the publisher.
#[derive(Debug, Clone)]
pub struct Ehr {
    http: reqwest::Client,
    /// Access tokens of the targets that use OAuth2.
    tokens: Tokens,
    /// Most upserts per transaction: a target's records beyond it go in further transactions,
    /// sent concurrently.
    transaction_size: usize,
    /// Most resource text per transaction (one larger resource goes alone).
    transaction_bytes: usize,
}

pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        s.push_str(": ");
        s.push_str(&err.to_string());
        source = err.source();
    }
    s
}

fn written(status: i32) -> &'static str {
    if status == 201 { "created" } else { "updated" }
}

impl Ehr {
    /// Creates the client with a timeout per request.
    pub fn new(request_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .build()?;
        Ok(Self {
            http,
            tokens: Tokens::default(),
            transaction_size: usize::MAX,
            transaction_bytes: usize::MAX,
        })
    }

    /// Sets the most resource text per transaction.
    pub fn with_transaction_bytes(mut self, bytes: usize) -> Self {
        self.transaction_bytes = bytes.max(1);
        self
    }

    /// Sets the most upserts per transaction.
    pub fn with_transaction_size(mut self, size: usize) -> Self {
        self.transaction_size = size.max(1);
        self
    }

    /// Posts a Bundle to the target with its credentials. A 401 answered to a cached access
    /// token drops it, and the call is made once more with a new one.
    async fn post_bundle<B: serde::Serialize + ?Sized>(
        &self,
        target: &Target,
        bundle: &B,
        scope: Scope,
        timeout: Option<Duration>,
    ) -> Result<Value, CallFailure> {
        let bearer = self
            .tokens
            .bearer(&self.http, &target.key, &target.base_url, &target.auth)
            .await?;
        let first = self
            .post_bundle_with(
                target,
                bearer.as_ref().map(|b| b.token.as_str()),
                bundle,
                scope,
                timeout,
            )
            .await;
        match (first, bearer) {
            (Err(f), Some(b)) if f.status == Some(401) && !b.fresh => {
                self.tokens.invalidate(&target.key, &b.token).await;
                let renewed = self
                    .tokens
                    .bearer(&self.http, &target.key, &target.base_url, &target.auth)
                    .await?;
                self.post_bundle_with(
                    target,
                    renewed.as_ref().map(|b| b.token.as_str()),
                    bundle,
                    scope,
                    timeout,
                )
                .await
            }
            (result, _) => result,
        }
    }

    async fn post_bundle_with<B: serde::Serialize + ?Sized>(
        &self,
        target: &Target,
        token: Option<&str>,
        bundle: &B,
        scope: Scope,
        timeout: Option<Duration>,
    ) -> Result<Value, CallFailure> {
        // R5 is what a plain `application/fhir+json` means to the R5 servers ohx was built on;
        // an R4 target is told the version (FHIR R4 §3.1.0.1.5), as a multi-version server
        // needs it.
        let version = classify::mime_fhir_version(&target.fhir_version);
        let mime = if target.fhir_version == ohx_common::records::FHIR_R4 {
            format!("application/fhir+json; fhirVersion={version}")
        } else {
            "application/fhir+json".to_owned()
        };
        let mut req = self
            .http
            .post(&target.base_url)
            .header("Content-Type", &mime)
            .header("Accept", &mime)
            .json(bundle);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| {
            let chain = error_chain(&e);
            CallFailure {
                class: classify::classify_transport(TransportError {
                    timeout: e.is_timeout(),
                    connect: e.is_connect(),
                    chain: &chain,
                }),
                status: None,
                reason: format!("request failed: {chain}"),
                body: String::new(),
            }
        })?;
        let status = resp.status();
        let now = chrono::Utc::now().timestamp_millis();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| classify::parse_retry_after(v, now));
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .text()
            .await
            .map_err(|e| CallFailure::transient(format!("reading response failed: {e}")))?;
        if classify::wrong_fhir_version(content_type.as_deref(), version) {
            return Err(CallFailure {
                class: Class::Target(TargetFault::FhirVersion),
                status: Some(status.as_u16()),
                reason: format!(
                    "{status}: not a FHIR {} endpoint (content type)",
                    target.fhir_version
                ),
                body,
            });
        }
        if status.is_success() {
            return serde_json::from_str(&body)
                .map_err(|e| CallFailure::transient(format!("unreadable response: {e}")));
        }
        Err(CallFailure {
            class: classify::classify_status(status.as_u16(), scope, &body, retry_after),
            status: Some(status.as_u16()),
            reason: format!("{status}: {}", bundle::outcome_codes(&body)),
            body,
        })
    }

    /// Sends one transaction of upserts; returns the outcome per item.
    async fn transaction(
        &self,
        target: &Target,
        items: &[&Item],
        known: &HashMap<RefKey, String>,
        timeout: Option<Duration>,
    ) -> Result<Vec<ItemResult>, CallFailure> {
        let tx =
            bundle::transaction_bundle(items, target.mode, known).map_err(|e| CallFailure {
                class: Class::Resource,
                status: None,
                reason: e.clone(),
                body: e,
            })?;
        let started = Instant::now();
        let resp = self
            .post_bundle(
                target,
                &tx,
                Scope::Transaction {
                    entries: items.len(),
                },
                timeout,
            )
            .await?;
        PUBLISH_LATENCY.record(started.elapsed().as_secs_f64(), &[]);
        let outcomes =
            bundle::transaction_outcomes(&resp, items.len()).map_err(CallFailure::transient)?;
        Ok(outcomes
            .into_iter()
            .map(|o| ItemResult::Done {
                outcome: written(o.http_status),
                status: o.http_status,
                version: o.version_id,
            })
            .collect())
    }

    /// Publishes items to a target: reads what the server holds, decides per item
    /// ([`publish_decision`]), writes one transaction and, if the server rejects it for
    /// content, isolates the rejected resources one by one. `timeout` overrides the client's
    /// request timeout (a shorter one while a target is failing: its calls stall the stage).
    /// Publishes items to a target, at most `transaction_size` items and `transaction_bytes`
    /// of resource text per transaction ([`bundle::transaction_ranges`]), the transactions
    /// concurrently (each item is a different resource: the caller keeps one record per
    /// identity, so no two versions of a resource are ever in flight together).
    pub async fn publish_target(
        &self,
        target: &Target,
        items: &[Item],
        timeout: Option<Duration>,
    ) -> TargetRun {
        let ranges =
            bundle::transaction_ranges(items, self.transaction_size, self.transaction_bytes);
        if ranges.len() <= 1 {
            return self.publish_chunk_retried(target, items, timeout).await;
        }
        let runs = futures_util::future::join_all(
            ranges
                .into_iter()
                .map(|range| self.publish_chunk_retried(target, &items[range], timeout)),
        )
        .await;
        merge_runs(runs)
    }

    /// [`Ehr::publish_chunk`], its items not yet done tried again while the server answers
    /// busy ([`busy_retry_wait`]).
    async fn publish_chunk_retried(
        &self,
        target: &Target,
        items: &[Item],
        timeout: Option<Duration>,
    ) -> TargetRun {
        let mut run = self.publish_chunk(target, items, timeout).await;
        let mut attempt = 0;
        while let Some(wait) = busy_retry_wait(run.failure.as_ref(), attempt) {
            attempt += 1;
            BUSY_RETRIED.add(1, &[]);
            tokio::time::sleep(wait).await;
            let pending: Vec<usize> = (0..items.len())
                .filter(|i| run.results[*i].is_none())
                .collect();
            let retried: Vec<Item> = pending.iter().map(|i| items[*i].clone()).collect();
            let again = self.publish_chunk(target, &retried, timeout).await;
            for (i, result) in pending.into_iter().zip(again.results) {
                run.results[i] = result;
            }
            run.failure = again.failure;
        }
        run
    }

    /// What the server holds of `items`, then of `outside`: in put mode by one search per
    /// resource type ([`read::search_bundle`]); where that cannot settle them (conditional
    /// mode, or an answer that does not: see [`read::states_from_search`]), by one read per
    /// resource.
    async fn read_states(
        &self,
        target: &Target,
        items: &[Item],
        outside: &[OwnRef],
        timeout: Option<Duration>,
    ) -> Result<Vec<Result<Option<read::ServerState>, String>>, CallFailure> {
        if target.mode == bundle::UpsertMode::Put {
            let keys: Vec<RefKey> = items
                .iter()
                .map(|i| (i.resource_type.clone(), i.resource_id.clone()))
                .chain(outside.iter().map(OwnRef::key))
                .collect();
            if let Some(search) = read::search_bundle(&keys) {
                let resp = self
                    .post_bundle(target, &search, Scope::Read, timeout)
                    .await?;
                if let Some(states) = read::states_from_search(&resp, &keys) {
                    return Ok(states.into_iter().map(Ok).collect());
                }
                READS_ONE_BY_ONE.add(1, &[]);
            }
        }
        let refs: Vec<&Item> = items.iter().collect();
        let read =
            read::read_bundle(&refs, outside, target.mode).map_err(CallFailure::transient)?;
        let resp = self
            .post_bundle(target, &read, Scope::Read, timeout)
            .await?;
        Ok(read::current_states(&resp, items.len() + outside.len()))
    }

    /// Publishes items in one `batch` read and one `transaction`.
    async fn publish_chunk(
        &self,
        target: &Target,
        items: &[Item],
        timeout: Option<Duration>,
    ) -> TargetRun {
        let mut results: Vec<Option<ItemResult>> = vec![None; items.len()];
        let stop = |results, failure| TargetRun {
            results,
            failure: Some(failure),
        };
        // 1. What does the server hold, of the items and of the resources ohx writes that
        //    they reference but that are not among them?
        let in_chunk: HashSet<RefKey> = items
            .iter()
            .map(|i| (i.resource_type.clone(), i.resource_id.clone()))
            .collect();
        let item_refs: Vec<Vec<OwnRef>> = items
            .iter()
            .map(|i| bundle::resource_references(&i.resource, WRITTEN_TYPES))
            .collect();
        let outside: Vec<OwnRef> = item_refs
            .iter()
            .flatten()
            .filter(|r| !in_chunk.contains(&r.key()))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut states = match self.read_states(target, items, &outside, timeout).await {
            Ok(s) => s,
            Err(f) => return stop(results, f),
        };
        let outside_states = states.split_off(items.len());
        // The server's references of what it holds; what it lacks.
        let mut known: HashMap<RefKey, String> = HashMap::new();
        let mut missing: HashSet<RefKey> = HashSet::new();
        for (r, state) in outside.iter().zip(outside_states) {
            match state {
                Ok(Some(s)) => {
                    if let Some(reference) = s.reference {
                        known.insert(r.key(), reference);
                    }
                }
                Ok(None) => {
                    missing.insert(r.key());
                }
                Err(reason) => return stop(results, CallFailure::transient(reason)),
            }
        }
        let mut todo = Vec::new();
        for (i, (item, state)) in items.iter().zip(states).enumerate() {
            let state = match state {
                Ok(s) => s,
                // Without knowing what the server holds nothing is written (it could be newer).
                Err(reason) => return stop(results, CallFailure::transient(reason)),
            };
            if let Some(reference) = state.as_ref().and_then(|s| s.reference.clone()) {
                known.insert(
                    (item.resource_type.clone(), item.resource_id.clone()),
                    reference,
                );
            }
            let server = state
                .as_ref()
                .map(|s| (s.revision, s.hash.as_deref().unwrap_or("")));
            match publish_decision(server, (item.revision, &item.hash)) {
                // A resource it references is neither written with it nor on the server yet
                // (it travels on another partition): held, tried again once it may be.
                PublishDecision::Put if item_refs[i].iter().any(|r| missing.contains(&r.key())) => {
                    UNRESOLVED.add(1, &[KeyValue::new("type", item.resource_type.clone())]);
                }
                PublishDecision::Put => todo.push(i),
                PublishDecision::Unchanged => {
                    results[i] = Some(ItemResult::Done {
                        outcome: "unchanged",
                        status: 200,
                        version: None,
                    })
                }
                PublishDecision::Stale => {
                    results[i] = Some(ItemResult::Done {
                        outcome: "stale",
                        status: 200,
                        version: None,
                    })
                }
            }
        }
        if todo.is_empty() {
            return TargetRun {
                results,
                failure: None,
            };
        }
        // 2. One transaction of upserts.
        let refs: Vec<&Item> = todo.iter().map(|i| &items[*i]).collect();
        let failure = match self.transaction(target, &refs, &known, timeout).await {
            Ok(done) => {
                for (i, r) in todo.iter().zip(done) {
                    results[*i] = Some(r);
                }
                return TargetRun {
                    results,
                    failure: None,
                };
            }
            Err(f) => f,
        };
        match failure.class {
            Class::Isolate => {}
            Class::Resource => {
                for i in &todo {
                    results[*i] = Some(ItemResult::Rejected {
                        status: failure.status.unwrap_or(422),
                        outcome: bundle::outcome_summary(&failure.body),
                    });
                }
                return TargetRun {
                    results,
                    failure: None,
                };
            }
            Class::Target(_) | Class::Transient { .. } => return stop(results, failure),
        }
        // 3. Isolate: one transaction per resource.
        tracing::warn!(reason = %failure.reason, resources = todo.len(), "transaction rejected; retrying resources one by one");
        let mut refusals = Vec::with_capacity(todo.len());
        // Referenced resources first, so that what references them finds them written.
        let referenced: HashSet<RefKey> = item_refs.iter().flatten().map(OwnRef::key).collect();
        todo.sort_by_key(|i| {
            !referenced.contains(&(
                items[*i].resource_type.clone(),
                items[*i].resource_id.clone(),
            ))
        });
        for i in &todo {
            match self
                .transaction(target, &[&items[*i]], &known, timeout)
                .await
            {
                Ok(mut done) => {
                    results[*i] = done.pop();
                    refusals.push(None);
                }
                Err(f) if f.class == Class::Resource => {
                    let status = f.status.unwrap_or(422);
                    results[*i] = Some(ItemResult::Rejected {
                        status,
                        outcome: bundle::outcome_summary(&f.body),
                    });
                    refusals.push(Some(status));
                }
                Err(f) => return stop(results, f),
            }
        }
        if classify::isolation_blames_target(&refusals) {
            for i in &todo {
                results[*i] = None;
            }
            return stop(
                results,
                CallFailure {
                    class: Class::Target(TargetFault::Refused),
                    status: failure.status,
                    reason: format!("every resource refused one by one ({})", failure.reason),
                    body: failure.body,
                },
            );
        }
        TargetRun {
            results,
            failure: None,
        }
    }
}

/// One run from the runs of consecutive chunks: their results in order, and the failure that
/// matters most for the target (a target-level one, else a transient one with the longest
/// Retry-After).
pub fn merge_runs(runs: Vec<TargetRun>) -> TargetRun {
    let mut results = Vec::new();
    let mut failure: Option<CallFailure> = None;
    for run in runs {
        results.extend(run.results);
        if let Some(f) = run.failure {
            failure = Some(match failure {
                None => f,
                Some(kept) => graver(kept, f),
            });
        }
    }
    TargetRun { results, failure }
}

fn graver(a: CallFailure, b: CallFailure) -> CallFailure {
    let rank = |f: &CallFailure| match f.class {
        Class::Target(_) => 3,
        Class::Transient { retry_after } => 1 + u8::from(retry_after.is_some()),
        Class::Resource | Class::Isolate => 0,
    };
    match (rank(&a), rank(&b)) {
        (ra, rb) if rb > ra => b,
        (ra, rb) if ra > rb => a,
        _ => match (&a.class, &b.class) {
            (
                Class::Transient {
                    retry_after: Some(x),
                },
                Class::Transient {
                    retry_after: Some(y),
                },
            ) if y > x => b,
            _ => a,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: Option<u16>, retry_after: Option<Duration>) -> CallFailure {
        CallFailure {
            class: Class::Transient { retry_after },
            status,
            reason: String::new(),
            body: String::new(),
        }
    }

    #[test]
    fn test_busy_answers_are_retried_with_a_doubling_backoff_then_left_to_the_breaker() {
        for status in [429, 503] {
            let f = failure(Some(status), None);
            let waits: Vec<_> = (0..=BUSY_RETRIES)
                .map(|a| busy_retry_wait(Some(&f), a))
                .collect();
            assert_eq!(
                waits,
                [
                    Some(Duration::from_millis(50)),
                    Some(Duration::from_millis(100)),
                    Some(Duration::from_millis(200)),
                    None
                ]
            );
        }
    }

    #[test]
    fn test_a_short_retry_after_is_honoured_and_a_long_one_holds_the_target() {
        let short = failure(Some(503), Some(Duration::from_millis(700)));
        assert_eq!(
            busy_retry_wait(Some(&short), 0),
            Some(Duration::from_millis(700))
        );
        let tiny = failure(Some(429), Some(Duration::ZERO));
        assert_eq!(
            busy_retry_wait(Some(&tiny), 1),
            Some(Duration::from_millis(100))
        );
        let long = failure(Some(429), Some(Duration::from_secs(2)));
        assert_eq!(busy_retry_wait(Some(&long), 0), None);
    }

    #[test]
    fn test_other_failures_are_not_retried_in_the_batch() {
        assert_eq!(busy_retry_wait(None, 0), None);
        for status in [None, Some(500), Some(502), Some(504), Some(408)] {
            assert_eq!(busy_retry_wait(Some(&failure(status, None)), 0), None);
        }
        let refused = CallFailure {
            class: Class::Target(TargetFault::Unauthorized),
            ..failure(Some(503), None)
        };
        assert_eq!(busy_retry_wait(Some(&refused), 0), None);
        let content = CallFailure {
            class: Class::Resource,
            ..failure(Some(503), None)
        };
        assert_eq!(busy_retry_wait(Some(&content), 0), None);
    }
}
