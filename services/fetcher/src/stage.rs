//! The fetcher stage: sync requests in, Measurements out.
//!
//! Requests of one batch for the same link are coalesced (categories and windows merged), so a
//! burst of webhooks costs one fetch. For each link: load it, make sure the access token is
//! fresh (refresh under a row lock; a revoked grant marks the link `reauth_required` with no
//! retry loop), let the link's provider adapter fetch and normalize through the shared rate
//! bucket, emit. Rate limits and transient failures pause and retry the batch; nothing is
//! committed until the measurements are acknowledged, and only then are sync runs and cursors
//! recorded. The stage never names a provider: what differs between providers is behind
//! [`ohx_providers::Provider`].

use crate::ledger::{self, LedgerChange};
use crate::store::{Link, Refreshed, Store, StoreError, SyncRun};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::ratelimit::PgRateGate;
use ohx_common::records::{Context, Measurement, SyncRequest, topic};
use ohx_common::trace;
use ohx_providers::{Api, AppCredentials, Fetched, Plan, Provider, ProviderError, Registry};
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
static UNMAPPED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_measurements_unmapped",
        "Provider measures of a type ohx does not map, by provider and provider type",
    )
});
static SKIPPED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_measurements_skipped",
        "Provider data not turned into measurements, by provider, reason and provider type",
    )
});
static RETRACTED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_measurements_retracted",
        "Readings the provider deleted, retracted (entered-in-error), by provider and data type",
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
    /// API base URL per provider when the app has none (`OHX_WITHINGS_API_URL`, ...); a
    /// provider without an entry uses its production URL.
    pub base_urls: BTreeMap<String, String>,
    /// How long to pause after a provider rate-limit answer.
    pub rate_limit_pause: Duration,
    /// How windows are chosen per trigger, and bounded.
    pub strategy: Strategy,
    pub http_timeout: Duration,
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
/// [`clamp_window`]. A request without a window gets its trigger's ([`Strategy`]); a request
/// that names no category asks for every category of its provider (`all`).
pub fn plan(
    requests: &[&SyncRequest],
    now_ms: i64,
    strategy: &Strategy,
    cursor_ms: Option<i64>,
    all: &[String],
) -> Plan {
    let mut windows: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in requests {
        let start = r
            .window_start
            .unwrap_or_else(|| strategy.default_start(&r.context.trigger, now_ms, cursor_ms));
        let end = r.window_end.unwrap_or(now_ms).max(start);
        let (start, end) = clamp_window(start, end, now_ms, strategy.max_days);
        let categories = if r.categories.is_empty() {
            all
        } else {
            &r.categories
        };
        for c in categories {
            windows
                .entry(c.clone())
                .and_modify(|w| {
                    w.0 = w.0.min(start);
                    w.1 = w.1.max(end);
                })
                .or_insert((start, end));
        }
    }
    Plan {
        windows,
        policy: Default::default(),
        granted_scopes: None,
        timezone: None,
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
    /// What the fetch produced, and the context its records carry (where the patient's data
    /// goes as of this fetch).
    Done(Fetched, Box<Context>),
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
    /// The outcome of a failure that retrying cannot fix.
    fn failed(e: ProviderError) -> Self {
        let (kind, reason) = match e {
            ProviderError::Permanent { kind, reason } => (kind, reason),
            other => ("provider", other.to_string()),
        };
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
    Refused(ProviderError),
}

fn store_err(e: StoreError) -> StageError {
    match e {
        StoreError::Secret(e) => StageError::Fatal(format!(
            "cannot open a stored secret (wrong OHX_SECRET_KEYS?): {e}"
        )),
        other => StageError::transient("database", other),
    }
}

/// A rate limit or transient failure as the stage error that pauses and retries the batch;
/// any other failure is given back.
fn api_err(
    provider: &'static str,
    e: ProviderError,
    pause: Duration,
) -> Result<StageError, ProviderError> {
    match e {
        ProviderError::RateLimited {
            reason,
            retry_after,
        } => {
            RATE_LIMITED.add(1, &[KeyValue::new("provider", provider)]);
            Ok(StageError::Transient {
                kind: "rate_limited",
                reason: format!("{provider}: {reason}"),
                retry_after: Some(retry_after.unwrap_or(pause)),
            })
        }
        ProviderError::Transient {
            reason,
            retry_after,
        } => Ok(StageError::Transient {
            kind: "provider",
            reason: format!("{provider}: {reason}"),
            retry_after,
        }),
        other => Err(other),
    }
}

/// The fetcher stage.
pub struct Fetcher {
    store: Store,
    settings: FetcherSettings,
    providers: Registry,
    http: reqwest::Client,
    /// Per app (and per user where the provider's budget is per user): the API behind its
    /// shared rate bucket.
    apis: HashMap<(Uuid, String), Api>,
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
    pub fn new(
        store: Store,
        providers: Registry,
        settings: FetcherSettings,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.http_timeout)
            .build()?;
        Ok(Self {
            store,
            settings,
            providers,
            http,
            apis: HashMap::new(),
            memo: BatchMemo::default(),
        })
    }

    /// The API of the link's app, behind the bucket its provider's rate policy names.
    fn api(&mut self, provider: &dyn Provider, link: &Link) -> Api {
        let (bucket, per_minute) =
            provider
                .rate_policy()
                .bucket(provider.name(), &link.client_id, &link.provider_user_id);
        let base = link
            .api_base_url
            .clone()
            .or_else(|| self.settings.base_urls.get(provider.name()).cloned())
            .unwrap_or_else(|| provider.default_base_url().to_owned());
        let (pool, http) = (self.store.pool.clone(), self.http.clone());
        self.apis
            .entry((link.app_id, bucket.clone()))
            .or_insert_with(|| {
                let gate = PgRateGate::new(pool, bucket, per_minute, API_CALLS.clone());
                Api::new(http, &base, Arc::new(gate))
            })
            .clone()
    }

    /// Returns a usable access token, refreshing it if expired or rejected.
    async fn token(
        &self,
        provider: &dyn Provider,
        api: &Api,
        link: &Link,
        failed: Option<&str>,
    ) -> Result<TokenOutcome, StageError> {
        let fresh = link
            .token_expires_at
            .is_some_and(|e| e > chrono::Utc::now() + chrono::Duration::seconds(60));
        if failed.is_none() && fresh && !link.access_token.is_empty() {
            return Ok(TokenOutcome::Token(link.access_token.clone()));
        }
        let app = AppCredentials {
            client_id: link.client_id.clone(),
            client_secret: link.client_secret.clone(),
        };
        let app = &app;
        let result = self
            .store
            .refresh(link, failed, |refresh_token| async move {
                provider.refresh(api, app, refresh_token).await
            })
            .await
            .map_err(store_err)?;
        let name = provider.name();
        match result {
            Ok(Refreshed::Token(t)) => {
                REFRESHES.add(
                    1,
                    &[
                        KeyValue::new("provider", name),
                        KeyValue::new("outcome", "refreshed"),
                    ],
                );
                Ok(TokenOutcome::Token(t))
            }
            Ok(Refreshed::Revoked) => {
                REFRESHES.add(
                    1,
                    &[
                        KeyValue::new("provider", name),
                        KeyValue::new("outcome", "revoked"),
                    ],
                );
                Ok(TokenOutcome::Revoked)
            }
            Err(ProviderError::ClientRejected { reason }) => {
                // The app's client id/secret is wrong (e.g. a rotated secret): every link of
                // the app would fail the same way, and none of them is at fault.
                tracing::error!(
                    app_id = %link.app_id,
                    link_id = %link.id,
                    provider = name,
                    reason = %reason,
                    "the provider rejected the application's client credentials: fix the provider app's client id/secret; links are not marked"
                );
                Err(StageError::Transient {
                    kind: "provider_config",
                    reason: format!(
                        "{name} rejected the client credentials of app {} ({reason})",
                        link.app_id
                    ),
                    retry_after: Some(self.settings.rate_limit_pause),
                })
            }
            Err(e) => match api_err(name, e, self.settings.rate_limit_pause) {
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
                let plan = plan(requests, now_ms, strategy, None, &[]);
                return Ok((
                    plan,
                    LinkOutcome::Inactive(format!("link {id} was deleted")),
                ));
            }
            Err(e) => return Err(store_err(e)),
        };
        let provider = self.providers.get(&link.provider).cloned();
        let all = provider
            .as_ref()
            .map(|p| p.categories())
            .unwrap_or_default();
        let mut plan = plan(requests, now_ms, strategy, link.cursor_ms, &all);
        if link.status != "active" {
            let reason = format!("link is {}", link.status);
            return Ok((plan, LinkOutcome::Inactive(reason)));
        }
        plan.timezone.clone_from(&link.timezone);
        plan.granted_scopes = link
            .scopes
            .as_deref()
            .map(|s| s.split_whitespace().map(str::to_owned).collect());
        match &link.policy {
            Ok(policy) => plan.policy = policy.clone(),
            Err(e) => {
                return Ok((
                    plan,
                    LinkOutcome::Failed {
                        kind: "config",
                        reason: e.to_string(),
                    },
                ));
            }
        }
        let Some(provider) = provider else {
            let reason = format!("provider {} is not known to this fetcher", link.provider);
            return Ok((
                plan,
                LinkOutcome::Failed {
                    kind: "provider",
                    reason,
                },
            ));
        };
        let outcome = self
            .fetch_link(provider.as_ref(), link, &plan, requests[0], now_ms)
            .await?;
        Ok((plan, outcome))
    }

    /// Fetches everything a plan asks for, refreshing the token once on rejection.
    async fn fetch_link(
        &mut self,
        provider: &dyn Provider,
        mut link: Link,
        plan: &Plan,
        request: &SyncRequest,
        now_ms: i64,
    ) -> Result<LinkOutcome, StageError> {
        let api = self.api(provider, &link);
        // The measurements go to every target the patient has now, in the FHIR version each
        // target speaks now.
        let mut context = request.context.clone();
        context.fhir_version.clone_from(&link.targets.fhir_version);
        context.deliveries.clone_from(&link.targets.deliveries);
        let mut token = match self.token(provider, &api, &link, None).await? {
            TokenOutcome::Token(t) => t,
            TokenOutcome::Revoked => {
                return Ok(LinkOutcome::Reauth("refresh token rejected".into()));
            }
            TokenOutcome::Refused(e) => return Ok(LinkOutcome::failed(e)),
        };
        let mut refreshed = false;
        loop {
            match provider.fetch(&api, &token, plan, &context, now_ms).await {
                Ok(fetched) => return Ok(LinkOutcome::Done(fetched, Box::new(context))),
                Err(ProviderError::TokenRejected { .. }) if !refreshed => {
                    refreshed = true;
                    link.access_token = token.clone();
                    match self.token(provider, &api, &link, Some(&token)).await? {
                        TokenOutcome::Token(t) => token = t,
                        TokenOutcome::Revoked => {
                            return Ok(LinkOutcome::Reauth("refresh token rejected".into()));
                        }
                        TokenOutcome::Refused(e) => return Ok(LinkOutcome::failed(e)),
                    }
                }
                Err(ProviderError::TokenRejected { reason }) => {
                    let reason = format!("fresh access token rejected ({reason})");
                    self.store
                        .mark_reauth(link.id, &reason)
                        .await
                        .map_err(store_err)?;
                    return Ok(LinkOutcome::Reauth(reason));
                }
                Err(e) => {
                    return match api_err(provider.name(), e, self.settings.rate_limit_pause) {
                        Ok(transient) => Err(transient),
                        Err(permanent) => Ok(LinkOutcome::failed(permanent)),
                    };
                }
            }
        }
    }
}

/// What a batch records once its outputs are acknowledged: its sync runs, and the ledgers of
/// the links it fetched.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub runs: Vec<SyncRun>,
    pub ledgers: Vec<(Uuid, LedgerChange)>,
}

impl Fetcher {
    /// The retractions of the readings `fetched` shows deleted at the source (ledger rows of a
    /// covered data type and window whose provider record is no longer listed), and what the
    /// link's ledger gets once they and the fetch's readings are acknowledged.
    async fn deletions(
        &self,
        link_id: Uuid,
        fetched: &Fetched,
        context: &Context,
        now: i64,
    ) -> Result<(Vec<Measurement>, LedgerChange), StageError> {
        if fetched.coverage.is_empty() {
            return Ok((Vec::new(), LedgerChange::default()));
        }
        let data_types: BTreeSet<&str> = fetched
            .coverage
            .iter()
            .flat_map(|c| c.data_types.iter().map(String::as_str))
            .collect();
        let window = fetched.coverage.iter().fold((i64::MAX, i64::MIN), |a, c| {
            (a.0.min(c.window.0), a.1.max(c.window.1))
        });
        let data_types: Vec<&str> = data_types.into_iter().collect();
        let recorded = self
            .store
            .ledger_rows(link_id, &data_types, window)
            .await
            .map_err(store_err)?;
        let gone = ledger::deleted(&recorded, &fetched.coverage, &fetched.measurements);
        let retractions = gone
            .iter()
            .map(|row| ledger::retraction(row, context, now))
            .collect();
        let change = LedgerChange {
            record: ledger::recordable(&fetched.measurements, &fetched.coverage),
            forget: gone.iter().map(|row| row.measurement_id.clone()).collect(),
        };
        Ok((retractions, change))
    }
}

impl Processor for Fetcher {
    type In = SyncRequest;
    type Change = Recorded;

    async fn process(
        &mut self,
        batch: &[Input<SyncRequest>],
        out: &mut Emitter,
    ) -> Result<Recorded, StageError> {
        let mut runs = Vec::new();
        let mut ledgers = Vec::new();
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
            // The measurements carry the trace of the first request, whose context they keep.
            out.follow(inputs[0]);
            let trace_id = trace::trace_id_of(&inputs[0].headers);
            let provider_name = requests[0].context.provider.clone();
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
            let mut skipped = serde_json::Map::new();
            let mut timezone = None;
            let (status, error, count, calls) = match outcome {
                LinkOutcome::Done(fetched, context) => {
                    timezone.clone_from(&fetched.timezone);
                    let count = fetched.measurements.len() as i32;
                    for m in &fetched.measurements {
                        MEASUREMENTS.add(
                            1,
                            &[
                                KeyValue::new("provider", m.context.provider.clone()),
                                KeyValue::new("type", m.data_type.clone()),
                            ],
                        );
                        out.emit(topic::MEASUREMENTS, &m.series_key, m).await?;
                    }
                    // Readings deleted at the source: retracted after the fetch's readings,
                    // each on its own series.
                    let (retractions, ledger) =
                        self.deletions(link_id, &fetched, &context, now).await?;
                    for r in &retractions {
                        RETRACTED.add(
                            1,
                            &[
                                KeyValue::new("provider", r.context.provider.clone()),
                                KeyValue::new("type", r.data_type.clone()),
                            ],
                        );
                        out.emit(topic::MEASUREMENTS, &r.series_key, r).await?;
                    }
                    if !retractions.is_empty() {
                        tracing::info!(link_id = %link_id, trace_id, retracted = retractions.len(), "readings deleted at the source retracted");
                    }
                    if !ledger.is_empty() {
                        ledgers.push((link_id, ledger));
                    }
                    for ((reason, detail), n) in &fetched.skipped {
                        SKIPPED.add(
                            *n,
                            &[
                                KeyValue::new("provider", provider_name.clone()),
                                KeyValue::new("reason", reason.clone()),
                                KeyValue::new("type", detail.clone()),
                            ],
                        );
                        if reason == ohx_providers::SKIP_UNMAPPED_TYPE {
                            UNMAPPED.add(
                                *n,
                                &[
                                    KeyValue::new("provider", provider_name.clone()),
                                    KeyValue::new("type", detail.clone()),
                                ],
                            );
                        }
                        let key = if detail.is_empty() {
                            reason.clone()
                        } else {
                            format!("{reason}:{detail}")
                        };
                        skipped.insert(key, (*n).into());
                    }
                    tracing::info!(link_id = %link_id, trace_id, requests = requests.len(), measurements = count, skipped = fetched.skipped_total(), api_calls = fetched.api_calls, "fetched");
                    ("ok", None, count, fetched.api_calls)
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
                        KeyValue::new("provider", provider_name.clone()),
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
                    skipped: skipped.clone(),
                    timezone: timezone.clone(),
                });
            }
        }
        Ok(Recorded { runs, ledgers })
    }

    async fn apply(&mut self, recorded: &Recorded) -> Result<(), StageError> {
        // The batch's outputs are acknowledged: its memo is no longer needed.
        self.memo.clear();
        let horizon = chrono::Utc::now().timestamp_millis()
            - self.settings.strategy.max_days.saturating_mul(DAY_MS);
        self.store
            .record_runs(&recorded.runs, &recorded.ledgers, horizon)
            .await
            .map_err(|e| StageError::transient("database", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                fhir_version: ohx_common::records::FHIR_R5.into(),
                deliveries: Vec::new(),
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
        let p = plan(&[&a, &b], 1_000, &Strategy::default(), None, &[]);
        assert_eq!(p.windows["blood_pressure"], (50, 200));
        assert_eq!(p.windows["heart_rate"], (50, 150));
        let c = req(&["body"], None, None);
        let p = plan(&[&c], 10 * 86_400_000, &Strategy::default(), None, &[]);
        assert_eq!(p.windows["body"], (3 * 86_400_000, 10 * 86_400_000));
    }

    #[test]
    fn test_a_request_without_categories_asks_for_all_of_its_provider() {
        let all = vec!["a".to_owned(), "b".to_owned()];
        let p = plan(
            &[&req(&[], Some(10), Some(20))],
            100,
            &Strategy::default(),
            None,
            &all,
        );
        assert_eq!(p.windows.len(), 2);
        assert_eq!((p.windows["a"], p.windows["b"]), ((10, 20), (10, 20)));
        // a request that names categories gets those only
        let p = plan(
            &[&req(&["b"], Some(10), Some(20))],
            100,
            &Strategy::default(),
            None,
            &all,
        );
        assert_eq!(p.windows.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn test_failed_outcome_keeps_the_adapter_reason() {
        let LinkOutcome::Failed { kind, reason } = LinkOutcome::failed(ProviderError::Permanent {
            kind: "decode",
            reason: "withings answer could not be decoded".into(),
        }) else {
            panic!("a permanent error is a failure");
        };
        assert_eq!(
            (kind, reason.as_str()),
            ("decode", "withings answer could not be decoded")
        );
        let LinkOutcome::Failed { kind, .. } =
            LinkOutcome::failed(ProviderError::GrantRevoked { reason: "x".into() })
        else {
            panic!("a refused token call is a failure");
        };
        assert_eq!(kind, "provider");
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
            &[],
        );
        assert_eq!(p.windows["heart_rate"], (69 * day, now));
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
            let mut r = req(&["body"], None, None);
            r.context.trigger = trigger.into();
            r
        };
        let w = |trigger: &str, cursor: Option<i64>| {
            plan(&[&with(trigger)], now, &s, cursor, &[]).windows["body"]
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
            plan(&[&r], now, &s, None, &[]).windows["body"],
            (98 * day, now)
        );
        // the maximum also bounds INITIAL
        let short = Strategy {
            max_days: 10,
            ..Strategy::default()
        };
        assert_eq!(
            plan(&[&with("INITIAL")], now, &short, None, &[]).windows["body"],
            (90 * day, now)
        );
    }
}
