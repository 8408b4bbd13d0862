//! The fetcher stage: sync requests in, Measurements out.
//!
//! Requests of one batch for the same link are coalesced (categories and windows merged), so a
//! burst of webhooks costs one fetch. For each link: load it, make sure the access token is
//! fresh (refresh under a row lock; a revoked grant marks the link `reauth_required` with no
//! retry loop), call the API through the shared rate bucket, normalize, emit. Rate limits
//! (Withings 601) and transient failures pause and retry the batch; nothing is committed until
//! the measurements are acknowledged, and only then are sync runs and cursors recorded.

use crate::normalize::{
    self, DATA_TYPE_BLOOD_PRESSURE, DATA_TYPE_BODY_WEIGHT, DATA_TYPE_HEART_RATE,
};
use crate::store::{Link, PgRateGate, Refreshed, Store, StoreError, SyncRun};
use crate::withings::{CATEGORY_REAL, MeasureSelector, Window, WithingsClient, WithingsError};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{AGGREGATION_HOURLY, Measurement, SyncRequest, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use uuid::Uuid;

static MEASUREMENTS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_measurements",
        "Measurements produced, by provider and data type",
    )
});
static API_CALLS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_provider_api_calls",
        "Provider API requests sent, by provider",
    )
});
static RATE_LIMITED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_rate_limit_hits",
        "Provider rate-limit answers, by provider",
    )
});
static REFRESHES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_token_refreshes",
        "Token refreshes, by provider and outcome",
    )
});
static SYNCS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_sync_runs",
        "Sync requests handled, by provider, trigger and status",
    )
});

/// Settings of the fetcher.
#[derive(Debug, Clone)]
pub struct FetcherSettings {
    /// Default API base URL when the app has none.
    pub withings_base_url: String,
    /// Requests per minute allowed for one Withings application (all replicas together).
    pub withings_rate_per_minute: u32,
    /// How long to pause after a provider rate-limit answer.
    pub rate_limit_pause: Duration,
    /// How windows are chosen per trigger, and bounded.
    pub strategy: Strategy,
    pub http_timeout: Duration,
}

/// One merged fetch for a link.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// data category → window (epoch ms, end exclusive).
    pub windows: BTreeMap<String, (i64, i64)>,
}

const DAY_MS: i64 = 86_400_000;

/// Default of [`Strategy::max_days`].
pub const DEFAULT_MAX_FETCH_WINDOW_DAYS: i64 = 31;

/// How the window of a request that names none is chosen, per trigger, and how every window is
/// bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    /// WEBHOOK, MANUAL and unknown triggers without a window, and INCREMENTAL for a link never
    /// synced: this many days back (`OHX_DEFAULT_SYNC_DAYS`).
    pub default_days: i64,
    /// INITIAL: the backfill after a link is connected (`OHX_INITIAL_SYNC_DAYS`, 30).
    pub initial_days: i64,
    /// NIGHTLY reconciliation: providers deliver late (Withings retries for hours, Google up
    /// to a week), so this many days back (`OHX_NIGHTLY_SYNC_DAYS`, 7).
    pub nightly_days: i64,
    /// INCREMENTAL: from the link's cursor (the end of its last successful window) minus this
    /// overlap, so data stored late just before the cursor is fetched again
    /// (`OHX_INCREMENTAL_OVERLAP_MS`, 1 h).
    pub incremental_overlap_ms: i64,
    /// Longest window fetched for one request (days, `OHX_MAX_FETCH_WINDOW_DAYS`): a defence
    /// behind the gateway's own bound, whatever produced the request; it bounds INITIAL too.
    pub max_days: i64,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            default_days: 7,
            initial_days: 30,
            nightly_days: 7,
            incremental_overlap_ms: 3_600_000,
            max_days: DEFAULT_MAX_FETCH_WINDOW_DAYS,
        }
    }
}

impl Strategy {
    /// The start of the window of a request with `trigger` that names none (it ends now).
    /// `cursor_ms` is the link's cursor, the end of its last successful window.
    pub fn default_start(&self, trigger: &str, now_ms: i64, cursor_ms: Option<i64>) -> i64 {
        let days_back = |d: i64| now_ms.saturating_sub(d.saturating_mul(DAY_MS));
        match trigger {
            "INITIAL" => days_back(self.initial_days),
            "NIGHTLY" => days_back(self.nightly_days),
            "INCREMENTAL" => match cursor_ms {
                Some(c) => c.saturating_sub(self.incremental_overlap_ms),
                None => days_back(self.default_days),
            },
            _ => days_back(self.default_days),
        }
    }
}

/// Clamps a requested window (epoch ms, end exclusive) so that it ends no later than now and
/// spans at most `max_days`, keeping its most recent part (data not yet notified is never
/// claimed, and a `startdate=0` request costs a bounded number of provider calls).
pub fn clamp_window(start: i64, end: i64, now_ms: i64, max_days: i64) -> (i64, i64) {
    let end = end.min(now_ms);
    let start = start.max(end.saturating_sub(max_days.max(1).saturating_mul(DAY_MS)));
    (start.min(end), end)
}

/// Merges the requests of one link: per category, the union of the windows, each clamped by
/// [`clamp_window`]. A request without a window gets its trigger's ([`Strategy`]).
pub fn plan(
    requests: &[&SyncRequest],
    now_ms: i64,
    strategy: &Strategy,
    cursor_ms: Option<i64>,
) -> Plan {
    let mut windows: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in requests {
        let start = r
            .window_start
            .unwrap_or_else(|| strategy.default_start(&r.context.trigger, now_ms, cursor_ms));
        let end = r.window_end.unwrap_or(now_ms).max(start);
        let (start, end) = clamp_window(start, end, now_ms, strategy.max_days);
        for c in &r.categories {
            windows
                .entry(c.clone())
                .and_modify(|w| {
                    w.0 = w.0.min(start);
                    w.1 = w.1.max(end);
                })
                .or_insert((start, end));
        }
    }
    Plan { windows }
}

/// Returns the getmeas types for the non-hourly categories of a plan.
pub fn meastypes(categories: &BTreeSet<&str>) -> Vec<i32> {
    let mut t = Vec::new();
    if categories.contains(DATA_TYPE_BODY_WEIGHT) {
        t.push(normalize::MEASTYPE_WEIGHT);
    }
    if categories.contains(DATA_TYPE_BLOOD_PRESSURE) {
        t.extend([
            normalize::MEASTYPE_DIASTOLIC,
            normalize::MEASTYPE_SYSTOLIC,
            normalize::MEASTYPE_HEART_PULSE,
        ]);
    }
    t
}

/// The fetch progress of an hourly series: the widened window's end, but never past the start
/// of the hour now in progress (an unfinished or future hour is not fetched yet, whatever the
/// request said).
pub fn hourly_progress_end(widened_end_ms: i64, now_ms: i64) -> i64 {
    widened_end_ms.min(now_ms - now_ms.rem_euclid(normalize::HOUR_MS))
}

/// Orders one fetch's measurements by series and event time, and sets `fetched_through` on
/// the last measurement of each series to the end of the window fetched for it
/// (`progress_end`, by the measurement's source). The series is counted per aggregation
/// policy: a blood-pressure cuff's pulse (INDIVIDUAL) shares the `heart_rate` series key with
/// intraday heart rate (HOURLY), but the aggregator only reads HOURLY measurements, so each
/// policy's last measurement carries the progress of its own source window. A series without
/// any measurement in the fetch carries no progress (there is no record to carry it); the
/// aggregator closes its hours on wall-clock grace instead.
pub fn mark_progress(out: &mut [Measurement], progress_end: impl Fn(&Measurement) -> Option<i64>) {
    out.sort_by(|a, b| {
        (&a.series_key, a.effective_start, &a.measurement_id).cmp(&(
            &b.series_key,
            b.effective_start,
            &b.measurement_id,
        ))
    });
    let mut last: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, m) in out.iter().enumerate() {
        last.insert((m.series_key.as_str(), m.aggregation.as_str()), i);
    }
    let mut idx: Vec<usize> = last.into_values().collect();
    idx.sort_unstable();
    for i in idx {
        out[i].fetched_through = progress_end(&out[i]);
    }
}

/// The requests of a batch worth fetching: without those whose sync request id already has a
/// successful run (`done`) and without repeats of an id earlier in the batch (a provider's
/// retry of a webhook carries the same id). Returns them with the number of each left out.
pub fn select_requests<'a>(
    batch: &'a [Input<SyncRequest>],
    done: &HashSet<String>,
) -> (Vec<&'a Input<SyncRequest>>, usize, usize) {
    let mut seen = HashSet::new();
    let (mut already_done, mut repeated) = (0, 0);
    let mut keep = Vec::new();
    for input in batch {
        let id = input.value.context.sync_request_id.as_str();
        if done.contains(id) {
            already_done += 1;
        } else if !seen.insert(id) {
            repeated += 1;
        } else {
            keep.push(input);
        }
    }
    (keep, already_done, repeated)
}

/// Remembers what was fetched for each link of the batch being processed, so that when the
/// batch is processed again after a transient failure (a provider rate limit on the third
/// link), the links already fetched are not fetched again: the retry calls the provider only
/// for what is left. Entries live until the batch's change is applied, or until a different
/// batch arrives (the runtime moved on, e.g. after a rebalance).
///
/// This does not bend the runtime's contract: the memo decides no output that a fresh fetch
/// could not have produced, it only spares the provider calls (and the shared 120/min budget).
#[derive(Debug)]
pub struct BatchMemo<K, V> {
    batch: Vec<(String, i32, i64)>,
    entries: BTreeMap<K, V>,
}

impl<K: Ord, V> Default for BatchMemo<K, V> {
    fn default() -> Self {
        Self {
            batch: Vec::new(),
            entries: BTreeMap::new(),
        }
    }
}

impl<K: Ord, V> BatchMemo<K, V> {
    /// Starts processing a batch (its records' topic, partition and offset): keeps the
    /// entries if it is the batch they were made for, else forgets them. Returns how many
    /// entries are kept.
    pub fn begin(&mut self, batch: Vec<(String, i32, i64)>) -> usize {
        if self.batch != batch {
            self.entries.clear();
            self.batch = batch;
        }
        self.entries.len()
    }

    /// Returns the entry for `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// Remembers `value` for `key` in the current batch.
    pub fn insert(&mut self, key: K, value: V) {
        self.entries.insert(key, value);
    }

    /// Forgets everything (the batch is done).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.batch.clear();
    }
}

/// The memo key of one link's fetch in a batch: the link and its requests' ids.
type MemoKey = (String, Vec<String>);

/// Why a link's fetch stopped.
#[derive(Debug, Clone)]
enum LinkOutcome {
    Done(Vec<Measurement>, i32),
    Reauth(String),
    /// The link is deleted, disabled or awaits re-authorization. Not an error of the request:
    /// a patient who disconnects (or a revoked grant) makes every later notification land
    /// here, and dead-lettering them would bury real failures. The run is recorded as
    /// `skipped` with the reason, and the request is committed.
    Inactive(String),
    /// The provider refused the request permanently, or its answer cannot be decoded: the
    /// requests are dead-lettered (retrying gives the same answer) and the run is `failed`.
    Failed {
        kind: &'static str,
        reason: String,
    },
}

impl LinkOutcome {
    fn failed(e: &WithingsError) -> Self {
        let (kind, reason) = permanent_failure(e);
        LinkOutcome::Failed { kind, reason }
    }
}

/// What getting an access token gave.
enum TokenOutcome {
    Token(String),
    /// The grant is revoked: the link is `reauth_required`.
    Revoked,
    /// The token endpoint refused permanently (neither the grant nor the client, e.g. a
    /// malformed answer): the requests are dead-lettered like any permanent provider error.
    Refused(WithingsError),
}

/// Classifies a permanent provider failure as a dead-letter kind and a reason made of
/// categories and codes only: the provider's own message or a decoder's text could quote
/// payload values, and the reason reaches the dead-letter topic, logs and `sync_runs`.
pub fn permanent_failure(e: &WithingsError) -> (&'static str, String) {
    match e {
        WithingsError::Decode(_) => ("decode", "withings answer could not be decoded".into()),
        WithingsError::Api { status, .. } => (
            "provider",
            format!("withings refused the request (status {status})"),
        ),
        WithingsError::InvalidGrant { status, .. } => (
            "provider",
            format!("withings rejected the grant (status {status})"),
        ),
        WithingsError::InvalidClient { status } => (
            "provider",
            format!("withings rejected the client credentials (status {status})"),
        ),
        WithingsError::InvalidToken { status } => (
            "provider",
            format!("withings rejected the access token (status {status})"),
        ),
        WithingsError::Transport { http_status, .. } => (
            "provider",
            format!("withings answered http status {http_status}"),
        ),
        WithingsError::Http(_) => ("provider", "withings http request failed".into()),
        WithingsError::RateLimited
        | WithingsError::Retryable { .. }
        | WithingsError::RateGate(_) => ("provider", "withings transient failure".into()),
    }
}

fn store_err(e: StoreError) -> StageError {
    match e {
        StoreError::Secret(e) => StageError::Fatal(format!(
            "cannot open a stored secret (wrong OHX_SECRET_KEYS?): {e}"
        )),
        other => StageError::transient("database", other),
    }
}

fn api_err(e: WithingsError, pause: Duration) -> Result<StageError, WithingsError> {
    if e.is_rate_limited() {
        RATE_LIMITED.add(1, &[KeyValue::new("provider", "withings")]);
        return Ok(StageError::Transient {
            kind: "rate_limited",
            reason: e.to_string(),
            retry_after: Some(e.retry_after().unwrap_or(pause)),
        });
    }
    if e.is_retryable() {
        return Ok(StageError::Transient {
            kind: "provider",
            reason: e.to_string(),
            retry_after: e.retry_after(),
        });
    }
    Err(e)
}

/// The fetcher stage.
pub struct Fetcher {
    store: Store,
    settings: FetcherSettings,
    http: reqwest::Client,
    clients: HashMap<Uuid, WithingsClient>,
    /// Links already fetched in the current batch (see [`BatchMemo`]).
    memo: BatchMemo<MemoKey, (Plan, LinkOutcome)>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// Creates the stage.
    pub fn new(store: Store, settings: FetcherSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.http_timeout)
            .build()?;
        Ok(Self {
            store,
            settings,
            http,
            clients: HashMap::new(),
            memo: BatchMemo::default(),
        })
    }

    fn client(&mut self, link: &Link) -> WithingsClient {
        let base = link
            .api_base_url
            .clone()
            .unwrap_or_else(|| self.settings.withings_base_url.clone());
        let (pool, per_minute) = (
            self.store.pool.clone(),
            self.settings.withings_rate_per_minute,
        );
        self.clients
            .entry(link.app_id)
            .or_insert_with(|| {
                let gate = PgRateGate::new(
                    pool,
                    format!("withings:{}", link.client_id),
                    per_minute,
                    API_CALLS.clone(),
                );
                WithingsClient::new(self.http.clone(), base).with_rate_gate(Arc::new(gate))
            })
            .clone()
    }

    /// Returns a usable access token, refreshing it if expired or rejected.
    async fn token(
        &self,
        client: &WithingsClient,
        link: &Link,
        failed: Option<&str>,
    ) -> Result<TokenOutcome, StageError> {
        let fresh = link
            .token_expires_at
            .is_some_and(|e| e > chrono::Utc::now() + chrono::Duration::seconds(60));
        if failed.is_none() && fresh && !link.access_token.is_empty() {
            return Ok(TokenOutcome::Token(link.access_token.clone()));
        }
        let (id, secret) = (link.client_id.clone(), link.client_secret.clone());
        let result = self
            .store
            .refresh(link, failed, |refresh_token| async move {
                client.refresh_token(&id, &secret, &refresh_token).await
            })
            .await
            .map_err(store_err)?;
        match result {
            Ok(Refreshed::Token(t)) => {
                REFRESHES.add(
                    1,
                    &[
                        KeyValue::new("provider", "withings"),
                        KeyValue::new("outcome", "refreshed"),
                    ],
                );
                Ok(TokenOutcome::Token(t))
            }
            Ok(Refreshed::Revoked) => {
                REFRESHES.add(
                    1,
                    &[
                        KeyValue::new("provider", "withings"),
                        KeyValue::new("outcome", "revoked"),
                    ],
                );
                Ok(TokenOutcome::Revoked)
            }
            Err(WithingsError::InvalidClient { status }) => {
                // The app's client id/secret is wrong (e.g. a rotated secret): every link of
                // the app would fail the same way, and none of them is at fault.
                tracing::error!(
                    app_id = %link.app_id,
                    link_id = %link.id,
                    status,
                    "withings rejected the application's client credentials: fix the provider app's client id/secret; links are not marked"
                );
                Err(StageError::Transient {
                    kind: "provider_config",
                    reason: format!(
                        "withings rejected the client credentials of app {} (status {status})",
                        link.app_id
                    ),
                    retry_after: Some(self.settings.rate_limit_pause),
                })
            }
            Err(e) => match api_err(e, self.settings.rate_limit_pause) {
                Ok(transient) => Err(transient),
                // A malformed answer or a refusal that names neither the grant nor the
                // client: retrying the batch gives the same answer.
                Err(permanent) => Ok(TokenOutcome::Refused(permanent)),
            },
        }
    }

    /// Loads the link, plans its requests (INCREMENTAL reads the link's cursor) and fetches.
    async fn plan_and_fetch(
        &mut self,
        link_id: Uuid,
        requests: &[&SyncRequest],
        now_ms: i64,
    ) -> Result<(Plan, LinkOutcome), StageError> {
        let strategy = &self.settings.strategy;
        let link = match self.store.load_link(link_id).await {
            Ok(l) => l,
            Err(StoreError::UnknownLink(id)) => {
                let plan = plan(requests, now_ms, strategy, None);
                return Ok((
                    plan,
                    LinkOutcome::Inactive(format!("link {id} was deleted")),
                ));
            }
            Err(e) => return Err(store_err(e)),
        };
        let plan = plan(requests, now_ms, strategy, link.cursor_ms);
        if link.status != "active" {
            let reason = format!("link is {}", link.status);
            return Ok((plan, LinkOutcome::Inactive(reason)));
        }
        let outcome = self.fetch_link(link, &plan, requests[0]).await?;
        Ok((plan, outcome))
    }

    /// Fetches everything a plan asks for, refreshing the token once on rejection.
    async fn fetch_link(
        &mut self,
        mut link: Link,
        plan: &Plan,
        request: &SyncRequest,
    ) -> Result<LinkOutcome, StageError> {
        let client = self.client(&link);
        let mut token = match self.token(&client, &link, None).await? {
            TokenOutcome::Token(t) => t,
            TokenOutcome::Revoked => {
                return Ok(LinkOutcome::Reauth("refresh token rejected".into()));
            }
            TokenOutcome::Refused(e) => return Ok(LinkOutcome::failed(&e)),
        };
        let mut refreshed = false;
        loop {
            match self.fetch_with(&client, &token, plan, request).await {
                Ok((m, calls)) => return Ok(LinkOutcome::Done(m, calls)),
                Err(WithingsError::InvalidToken { .. }) if !refreshed => {
                    refreshed = true;
                    link.access_token = token.clone();
                    match self.token(&client, &link, Some(&token)).await? {
                        TokenOutcome::Token(t) => token = t,
                        TokenOutcome::Revoked => {
                            return Ok(LinkOutcome::Reauth("refresh token rejected".into()));
                        }
                        TokenOutcome::Refused(e) => return Ok(LinkOutcome::failed(&e)),
                    }
                }
                Err(WithingsError::InvalidToken { status }) => {
                    self.store
                        .mark_reauth(
                            link.id,
                            &format!("fresh access token rejected (status {status})"),
                        )
                        .await
                        .map_err(store_err)?;
                    return Ok(LinkOutcome::Reauth(format!(
                        "fresh access token rejected (status {status})"
                    )));
                }
                Err(e) => {
                    return match api_err(e, self.settings.rate_limit_pause) {
                        Ok(transient) => Err(transient),
                        Err(permanent) => Ok(LinkOutcome::failed(&permanent)),
                    };
                }
            }
        }
    }

    async fn fetch_with(
        &self,
        client: &WithingsClient,
        token: &str,
        plan: &Plan,
        request: &SyncRequest,
    ) -> Result<(Vec<Measurement>, i32), WithingsError> {
        let mut out = Vec::new();
        let mut calls = 0;
        let mut timezone: Option<String> = None;
        let now = chrono::Utc::now().timestamp_millis();
        let (mut spot_end, mut hourly_end) = (None, None);
        // Spot measures (getmeas): one call (with paging) over the union of their windows.
        let spot: BTreeSet<&str> = plan
            .windows
            .keys()
            .map(String::as_str)
            .filter(|c| *c != DATA_TYPE_HEART_RATE)
            .collect();
        let types = meastypes(&spot);
        if !types.is_empty() {
            let start = spot
                .iter()
                .filter_map(|c| plan.windows.get(*c))
                .map(|w| w.0)
                .min()
                .unwrap_or(0);
            let end = spot
                .iter()
                .filter_map(|c| plan.windows.get(*c))
                .map(|w| w.1)
                .max()
                .unwrap_or(0);
            let window = Window {
                start_s: start.div_euclid(1000),
                end_s: (end + 999).div_euclid(1000),
            };
            let resp = client
                .get_measures(
                    token,
                    &types,
                    CATEGORY_REAL,
                    MeasureSelector::Window(window),
                )
                .await?;
            calls += 1;
            spot_end = Some(end.min(now));
            timezone = resp.timezone.clone();
            let n = normalize::normalize_measures(&resp, &request.context, None);
            out.extend(n.measurements.into_iter().filter(|m| {
                spot.contains(m.data_type.as_str())
                    || m.data_type == DATA_TYPE_HEART_RATE
                        && spot.contains(DATA_TYPE_BLOOD_PRESSURE)
            }));
        }
        // Intraday heart rate: whole UTC hours, so any re-fetch of an hour carries all of it.
        let mut ahead = Vec::new();
        if let Some(&(start, end)) = plan.windows.get(DATA_TYPE_HEART_RATE) {
            let (hs, he) = normalize::widen_to_hours(start, end);
            // Withings' enddate is inclusive: stop one second before the next hour.
            let resp = client
                .get_intraday_heart_rate(token, hs / 1000, he / 1000 - 1)
                .await?;
            calls += 1;
            hourly_end = Some(hourly_progress_end(he, now));
            let n = normalize::normalize_intraday_heart_rate(
                &resp,
                &request.context,
                timezone.as_deref(),
                None,
            );
            // A sample dated after the fetched window (a device clock ahead) is not dropped:
            // it goes on, after the progress marks, for the aggregator to dead-letter.
            for m in n.measurements {
                if m.effective_start >= hs && m.effective_start < he {
                    out.push(m);
                } else if m.effective_start >= he {
                    ahead.push(m);
                }
            }
        }
        mark_progress(&mut out, |m| {
            if m.aggregation == AGGREGATION_HOURLY {
                hourly_end
            } else {
                spot_end
            }
        });
        out.append(&mut ahead);
        Ok((out, calls))
    }
}

impl Processor for Fetcher {
    type In = SyncRequest;
    type Change = Vec<SyncRun>;

    async fn process(
        &mut self,
        batch: &[Input<SyncRequest>],
        out: &mut Emitter,
    ) -> Result<Vec<SyncRun>, StageError> {
        let mut runs = Vec::new();
        let now = chrono::Utc::now().timestamp_millis();
        let resumed = self.memo.begin(
            batch
                .iter()
                .map(|i| (i.topic.clone(), i.partition, i.offset))
                .collect(),
        );
        if resumed > 0 {
            tracing::info!(
                requests = batch.len(),
                links_done = resumed,
                "batch retried: links already fetched are not fetched again"
            );
        }
        // Duplicates (a webhook retried by the provider after a 503, a request replayed) cost
        // one lookup for the whole batch instead of a fetch each.
        // Per id, the latest time a notification for it was received.
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        for i in batch {
            let e = latest
                .entry(i.value.context.sync_request_id.clone())
                .or_insert(i.value.context.received_at);
            *e = (*e).max(i.value.context.received_at);
        }
        let requests: Vec<(String, i64)> = latest.into_iter().collect();
        let done = self
            .store
            .completed_runs(&requests)
            .await
            .map_err(store_err)?;
        let (selected, already_done, repeated) = select_requests(batch, &done);
        if already_done + repeated > 0 {
            tracing::info!(
                requests = batch.len(),
                already_done,
                repeated,
                "duplicate sync requests skipped"
            );
        }
        // Coalesce by link, keeping the first request's context for the measurements.
        let mut by_link: BTreeMap<String, Vec<&Input<SyncRequest>>> = BTreeMap::new();
        for input in selected {
            by_link
                .entry(input.value.context.link_id.clone())
                .or_default()
                .push(input);
        }
        for (link_str, inputs) in by_link {
            let Ok(link_id) = Uuid::parse_str(&link_str) else {
                for i in inputs {
                    out.dead_letter(i, "invalid", format!("link id {link_str} is not a uuid"))
                        .await?;
                }
                continue;
            };
            let requests: Vec<&SyncRequest> = inputs.iter().map(|i| &i.value).collect();
            let key: MemoKey = (
                link_str.clone(),
                requests
                    .iter()
                    .map(|r| r.context.sync_request_id.clone())
                    .collect(),
            );
            let (plan, outcome) = match self.memo.get(&key) {
                Some(done) => done.clone(),
                None => {
                    let done = self.plan_and_fetch(link_id, &requests, now).await?;
                    self.memo.insert(key, done.clone());
                    done
                }
            };
            let (status, error, count, calls) = match outcome {
                LinkOutcome::Done(measurements, calls) => {
                    let count = measurements.len() as i32;
                    for m in &measurements {
                        MEASUREMENTS.add(
                            1,
                            &[
                                KeyValue::new("provider", "withings"),
                                KeyValue::new("type", m.data_type.clone()),
                            ],
                        );
                        out.emit(topic::MEASUREMENTS, &m.series_key, m).await?;
                    }
                    tracing::info!(link_id = %link_id, requests = requests.len(), measurements = count, api_calls = calls, "fetched");
                    ("ok", None, count, calls)
                }
                LinkOutcome::Reauth(reason) => {
                    tracing::warn!(link_id = %link_id, reason = %reason, "link needs re-authorization");
                    ("reauth_required", Some(reason), 0, 0)
                }
                LinkOutcome::Inactive(reason) => {
                    tracing::info!(link_id = %link_id, reason = %reason, "sync skipped");
                    ("skipped", Some(reason), 0, 0)
                }
                LinkOutcome::Failed { kind, reason } => {
                    tracing::warn!(link_id = %link_id, requests = inputs.len(), kind, reason = %reason, "permanent provider failure: dead-lettering the requests");
                    for i in &inputs {
                        out.dead_letter(i, kind, reason.clone()).await?;
                    }
                    ("failed", Some(reason), 0, 0)
                }
            };
            for r in &requests {
                SYNCS.add(
                    1,
                    &[
                        KeyValue::new("provider", "withings"),
                        KeyValue::new("trigger", r.context.trigger.clone()),
                        KeyValue::new("status", status),
                    ],
                );
                let w = plan
                    .windows
                    .values()
                    .fold((i64::MAX, i64::MIN), |a, w| (a.0.min(w.0), a.1.max(w.1)));
                runs.push(SyncRun {
                    sync_request_id: r.context.sync_request_id.clone(),
                    link_id,
                    trigger: r.context.trigger.clone(),
                    window: if w.0 <= w.1 { w } else { (now, now) },
                    status: status.to_string(),
                    api_calls: calls,
                    measurements: count,
                    error: error.clone(),
                    fetch_started_at: now,
                });
            }
        }
        Ok(runs)
    }

    async fn apply(&mut self, runs: &Vec<SyncRun>) -> Result<(), StageError> {
        // The batch's outputs are acknowledged: its memo is no longer needed.
        self.memo.clear();
        self.store
            .record_runs(runs)
            .await
            .map_err(|e| StageError::transient("database", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ohx_common::records::Context;

    fn req(cats: &[&str], s: Option<i64>, e: Option<i64>) -> SyncRequest {
        SyncRequest {
            context: Context {
                organization_id: "o".into(),
                ehr_target_id: "t".into(),
                patient_id: "p".into(),
                patient_reference: "Patient/1".into(),
                provider: "withings".into(),
                link_id: "l".into(),
                provider_user_id: "1".into(),
                sync_request_id: "s".into(),
                trigger: "WEBHOOK".into(),
                received_at: 0,
            },
            categories: cats.iter().map(|c| c.to_string()).collect(),
            window_start: s,
            window_end: e,
            provider_event: None,
        }
    }

    #[test]
    fn test_plan_merges_windows_per_category() {
        let a = req(&["blood_pressure"], Some(100), Some(200));
        let b = req(&["blood_pressure", "heart_rate"], Some(50), Some(150));
        let p = plan(&[&a, &b], 1_000, &Strategy::default(), None);
        assert_eq!(p.windows["blood_pressure"], (50, 200));
        assert_eq!(p.windows["heart_rate"], (50, 150));
        let c = req(&["body_weight"], None, None);
        let p = plan(&[&c], 10 * 86_400_000, &Strategy::default(), None);
        assert_eq!(p.windows["body_weight"], (3 * 86_400_000, 10 * 86_400_000));
    }

    #[test]
    fn test_permanent_failure_reasons_are_categories_without_provider_text() {
        let secret = "SECRET-VALUE 123.4 kg";
        let (kind, reason) = permanent_failure(&WithingsError::Api {
            status: 2554,
            message: secret.into(),
        });
        assert_eq!(kind, "provider");
        assert!(reason.contains("2554"), "{reason}");
        assert!(!reason.contains(secret), "{reason}");
        let (kind, reason) = permanent_failure(&WithingsError::Decode(secret.into()));
        assert_eq!(kind, "decode");
        assert!(!reason.contains(secret), "{reason}");
        let (kind, reason) = permanent_failure(&WithingsError::Transport {
            http_status: 404,
            retry_after_seconds: None,
        });
        assert_eq!(kind, "provider");
        assert!(reason.contains("404"), "{reason}");
    }

    #[test]
    fn test_clamp_window_bounds_length_and_now() {
        let day = 86_400_000;
        let now = 100 * day;
        assert_eq!(clamp_window(0, now, now, 31), (69 * day, now));
        assert_eq!(clamp_window(90 * day, 200 * day, now, 31), (90 * day, now));
        assert_eq!(clamp_window(99 * day, now, now, 31), (99 * day, now));
        // entirely in the future: empty at now
        assert_eq!(clamp_window(now + day, now + 2 * day, now, 31), (now, now));
        let p = plan(
            &[&req(&["heart_rate"], Some(0), Some(now))],
            now,
            &Strategy::default(),
            None,
        );
        assert_eq!(p.windows["heart_rate"], (69 * day, now));
    }

    fn meas(series: &str, aggregation: &str, t: i64) -> Measurement {
        Measurement {
            context: req(&[], None, None).context,
            measurement_id: format!("{series}-{aggregation}-{t}"),
            series_key: series.into(),
            data_type: series.rsplit('/').next().unwrap_or_default().into(),
            aggregation: aggregation.into(),
            effective_start: t,
            effective_end: None,
            utc_offset_seconds: None,
            components: vec![],
            device: None,
            entry_method: None,
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
        }
    }

    #[test]
    fn test_hourly_progress_end_never_claims_the_current_hour() {
        let h = normalize::HOUR_MS;
        // widened end in the past: kept
        assert_eq!(hourly_progress_end(10 * h, 12 * h + 5), 10 * h);
        // widened end past now: the start of the hour in progress
        assert_eq!(hourly_progress_end(13 * h, 12 * h + 5), 12 * h);
        assert_eq!(hourly_progress_end(40 * h, 12 * h), 12 * h);
    }

    #[test]
    fn test_mark_progress_sets_last_of_each_series_in_event_order() {
        use ohx_common::records::AGGREGATION_INDIVIDUAL as IND;
        let h = normalize::HOUR_MS;
        let mut out = vec![
            meas("p/blood_pressure", IND, 50),
            meas("p/heart_rate", IND, 300),
            meas("p/heart_rate", AGGREGATION_HOURLY, 200),
            meas("p/blood_pressure", IND, 10),
            meas("p/heart_rate", AGGREGATION_HOURLY, 100),
            meas("p/body_weight", IND, 5),
        ];
        mark_progress(&mut out, |m| {
            Some(if m.aggregation == AGGREGATION_HOURLY {
                3 * h
            } else {
                1_000
            })
        });
        // each series in event-time order
        for w in out.windows(2) {
            if w[0].series_key == w[1].series_key {
                assert!(w[0].effective_start <= w[1].effective_start);
            }
        }
        let marked: Vec<(&str, &str, i64, i64)> = out
            .iter()
            .filter_map(|m| {
                m.fetched_through.map(|f| {
                    (
                        m.series_key.as_str(),
                        m.aggregation.as_str(),
                        m.effective_start,
                        f,
                    )
                })
            })
            .collect();
        assert_eq!(
            marked,
            vec![
                ("p/blood_pressure", IND, 50, 1_000),
                ("p/body_weight", IND, 5, 1_000),
                ("p/heart_rate", AGGREGATION_HOURLY, 200, 3 * h),
                ("p/heart_rate", IND, 300, 1_000),
            ]
        );
    }

    fn input(id: &str, offset: i64) -> Input<SyncRequest> {
        let mut r = req(&["blood_pressure"], Some(0), Some(1));
        r.context.sync_request_id = id.into();
        Input {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            value: r,
            payload: vec![],
            headers: vec![],
        }
    }

    #[test]
    fn test_select_requests_skips_done_and_coalesces_repeats() {
        let batch = vec![
            input("a", 0),
            input("b", 1),
            input("a", 2),
            input("c", 3),
            input("b", 4),
        ];
        let done = HashSet::from(["c".to_string()]);
        let (keep, already_done, repeated) = select_requests(&batch, &done);
        let offsets: Vec<i64> = keep.iter().map(|i| i.offset).collect();
        assert_eq!(offsets, vec![0, 1]);
        assert_eq!((already_done, repeated), (1, 2));
    }

    #[test]
    fn test_batch_memo_survives_a_retry_of_the_same_batch_only() {
        let b1 = vec![("t".to_string(), 0, 10), ("t".to_string(), 0, 11)];
        let b2 = vec![("t".to_string(), 0, 12)];
        let mut memo: BatchMemo<String, i32> = BatchMemo::default();
        assert_eq!(memo.begin(b1.clone()), 0);
        memo.insert("link-a".into(), 1);
        // the same batch again (a retry after a rate limit): link-a is kept
        assert_eq!(memo.begin(b1.clone()), 1);
        assert_eq!(memo.get(&"link-a".to_string()), Some(&1));
        assert_eq!(memo.get(&"link-b".to_string()), None);
        // another batch: forgotten
        assert_eq!(memo.begin(b2), 0);
        assert_eq!(memo.get(&"link-a".to_string()), None);
        // applied: forgotten even if the same batch came again
        memo.begin(b1.clone());
        memo.insert("link-a".into(), 1);
        memo.clear();
        assert_eq!(memo.begin(b1), 0);
    }

    #[test]
    fn test_plan_per_trigger() {
        let day = DAY_MS;
        let now = 100 * day;
        let s = Strategy::default();
        let with = |trigger: &str| {
            let mut r = req(&["body_weight"], None, None);
            r.context.trigger = trigger.into();
            r
        };
        let w = |trigger: &str, cursor: Option<i64>| {
            plan(&[&with(trigger)], now, &s, cursor).windows["body_weight"]
        };
        assert_eq!(w("INITIAL", None), (70 * day, now));
        assert_eq!(w("NIGHTLY", Some(99 * day)), (93 * day, now));
        // INCREMENTAL: from the cursor minus the overlap, to now
        assert_eq!(
            w("INCREMENTAL", Some(99 * day)),
            (99 * day - 3_600_000, now)
        );
        // never synced: the default window
        assert_eq!(w("INCREMENTAL", None), (93 * day, now));
        // a cursor long ago: bounded by the maximum window
        assert_eq!(w("INCREMENTAL", Some(day)), (69 * day, now));
        // a cursor in the future (clock skew): an empty window at now, not a negative one
        assert_eq!(w("INCREMENTAL", Some(now + day)), (now, now));
        assert_eq!(w("WEBHOOK", None), (93 * day, now));
        // an explicit window wins over the trigger's
        let mut r = with("NIGHTLY");
        r.window_start = Some(98 * day);
        assert_eq!(
            plan(&[&r], now, &s, None).windows["body_weight"],
            (98 * day, now)
        );
        // the maximum also bounds INITIAL
        let short = Strategy {
            max_days: 10,
            ..Strategy::default()
        };
        assert_eq!(
            plan(&[&with("INITIAL")], now, &short, None).windows["body_weight"],
            (90 * day, now)
        );
    }

    #[test]
    fn test_meastypes_per_category() {
        assert_eq!(meastypes(&BTreeSet::from(["body_weight"])), vec![1]);
        assert_eq!(
            meastypes(&BTreeSet::from(["blood_pressure"])),
            vec![9, 10, 11]
        );
        assert!(meastypes(&BTreeSet::from(["heart_rate"])).is_empty());
    }
}
