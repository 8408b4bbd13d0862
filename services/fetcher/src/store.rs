//! The fetcher's PostgreSQL side: links and their encrypted tokens, refreshes serialized per
//! link by a row lock, the application-wide rate bucket shared by all replicas, and sync-run
//! bookkeeping (ids, times, counts, statuses; never values).

use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_providers::policy::{POLICY_COLUMNS, Policy, PolicyError};
use ohx_providers::{BoxFuture, GateError, ProviderError, RateGate, Tokens};
use std::time::Duration;
use uuid::Uuid;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("secret: {0}")]
    Secret(#[from] ohx_common::crypto::CryptoError),
    #[error("link {0} does not exist")]
    UnknownLink(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's message and code ("db error" alone says nothing); its detail, which
        // can quote row values, is left out.
        match e.as_db_error() {
            Some(db) => StoreError::Db(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Db(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// A provider link with what the fetcher needs, secrets opened.
#[derive(Clone)]
pub struct Link {
    pub id: Uuid,
    pub app_id: Uuid,
    /// The provider's name (`provider_links.provider`).
    pub provider: String,
    pub status: String,
    pub provider_user_id: String,
    pub access_token: String,
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub client_id: String,
    pub client_secret: String,
    pub api_base_url: Option<String>,
    /// The link's cursor: the end of its last successful window (epoch ms), if any.
    pub cursor_ms: Option<i64>,
    /// The patient's policy (organization's, patient's overrides, consents); an error if a
    /// stored document is invalid (the link's requests are dead-lettered with it).
    pub policy: Result<Policy, PolicyError>,
    /// The scopes the user granted (`provider_links.scopes`, space-separated), if recorded.
    pub scopes: Option<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn aad(link: Uuid, field: &str) -> String {
    format!("provider_link:{link}:{field}")
}

/// What a refresh under the row lock found.
pub enum Refreshed {
    /// A valid access token (possibly refreshed by another replica meanwhile).
    Token(String),
    /// The grant is revoked; the link is now `reauth_required`.
    Revoked,
}

/// Link and token storage.
#[derive(Clone)]
pub struct Store {
    pub pool: Pool,
    secrets: SecretBox,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Creates the store.
    pub fn new(pool: Pool, secrets: SecretBox) -> Self {
        Self { pool, secrets }
    }

    /// Loads a link with its app, decrypting the access token and the client secret.
    pub async fn load_link(&self, id: Uuid) -> Result<Link, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!("SELECT l.id, l.provider_app_id, l.status, l.provider_user_id, l.access_token, l.token_expires_at, \
                        a.client_id, a.client_secret, a.api_base_url, (l.cursors->>'last_window_end_ms')::bigint, l.provider, \
                        {POLICY_COLUMNS}, l.scopes \
                 FROM provider_links l JOIN provider_apps a ON a.id = l.provider_app_id \
                 JOIN organizations o ON o.id = l.organization_id JOIN patients p ON p.id = l.patient_id \
                 WHERE l.id = $1"),
                &[&id],
            )
            .await?
            .ok_or_else(|| StoreError::UnknownLink(id.to_string()))?;
        let app_id: Uuid = row.get(1);
        let sealed_access: Option<String> = row.get(4);
        let access_token = match sealed_access {
            Some(s) => self.secrets.open_string(&s, &aad(id, "access_token"))?,
            None => String::new(),
        };
        let sealed_secret: String = row.get(7);
        Ok(Link {
            id,
            app_id,
            status: row.get(2),
            provider_user_id: row.get(3),
            access_token,
            token_expires_at: row.get(5),
            client_id: row.get(6),
            client_secret: self.secrets.open_string(
                &sealed_secret,
                &format!("provider_app:{app_id}:client_secret"),
            )?,
            api_base_url: row.get(8),
            cursor_ms: row.get(9),
            provider: row.get(10),
            policy: Policy::from_stored(row.get(11), row.get(12), row.get(13)),
            scopes: row.get(14),
        })
    }

    /// Refreshes the link's tokens under a row lock, so concurrent replicas never use a rotated
    /// refresh token twice. `failed_access` is the token the provider just rejected (None for a
    /// refresh because of expiry). `refresh` performs the provider call.
    pub async fn refresh<F, Fut, E>(
        &self,
        link: &Link,
        failed_access: Option<&str>,
        refresh: F,
    ) -> Result<Result<Refreshed, E>, StoreError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<Tokens, E>>,
        E: RefreshFailure,
    {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one("SELECT access_token, refresh_token, token_expires_at, status FROM provider_links WHERE id = $1 FOR UPDATE", &[&link.id])
            .await?;
        let status: String = row.get(3);
        if status != "active" {
            return Ok(Ok(Refreshed::Revoked));
        }
        let current_access = match row.get::<_, Option<String>>(0) {
            Some(s) => self
                .secrets
                .open_string(&s, &aad(link.id, "access_token"))?,
            None => String::new(),
        };
        let expires: Option<chrono::DateTime<chrono::Utc>> = row.get(2);
        let fresh = expires.is_some_and(|e| e > chrono::Utc::now() + chrono::Duration::seconds(60));
        // Another replica refreshed while we waited for the lock.
        let refreshed_elsewhere = match failed_access {
            Some(failed) => current_access != failed && !current_access.is_empty(),
            None => fresh,
        };
        if refreshed_elsewhere {
            return Ok(Ok(Refreshed::Token(current_access)));
        }
        let sealed_refresh: Option<String> = row.get(1);
        let Some(sealed_refresh) = sealed_refresh else {
            tx.execute("UPDATE provider_links SET status = 'reauth_required', status_reason = 'no refresh token', updated_at = now() WHERE id = $1", &[&link.id]).await?;
            tx.commit().await?;
            return Ok(Ok(Refreshed::Revoked));
        };
        let refresh_token = self
            .secrets
            .open_string(&sealed_refresh, &aad(link.id, "refresh_token"))?;
        match refresh(refresh_token).await {
            Ok(tokens) => {
                let access = self.secrets.seal(
                    tokens.access_token.as_bytes(),
                    &aad(link.id, "access_token"),
                )?;
                // A provider that does not rotate refresh tokens keeps the stored one.
                let refresh = match &tokens.refresh_token {
                    Some(t) => self
                        .secrets
                        .seal(t.as_bytes(), &aad(link.id, "refresh_token"))?,
                    None => sealed_refresh.clone(),
                };
                tx.execute(
                    "UPDATE provider_links SET access_token = $2, refresh_token = $3, token_expires_at = now() + make_interval(secs => $4), \
                     scopes = COALESCE($5, scopes), updated_at = now() WHERE id = $1",
                    &[&link.id, &access, &refresh, &(tokens.expires_in as f64), &tokens.scope],
                )
                .await?;
                tx.commit().await?;
                Ok(Ok(Refreshed::Token(tokens.access_token)))
            }
            Err(e) if e.is_revoked() => {
                tx.execute(
                    "UPDATE provider_links SET status = 'reauth_required', status_reason = $2, updated_at = now() WHERE id = $1",
                    &[&link.id, &e.reason()],
                )
                .await?;
                tx.commit().await?;
                Ok(Ok(Refreshed::Revoked))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Marks a link `reauth_required` (e.g. a fresh token is rejected too).
    pub async fn mark_reauth(&self, link: Uuid, reason: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute("UPDATE provider_links SET status = 'reauth_required', status_reason = $2, updated_at = now() WHERE id = $1", &[&link, &reason])
            .await?;
        Ok(())
    }

    /// Returns which of `ids` already have a successful run (one lookup on the primary key).
    pub async fn completed_runs(
        &self,
        requests: &[(String, i64)],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if requests.is_empty() {
            return Ok(Default::default());
        }
        let ids: Vec<&str> = requests.iter().map(|(id, _)| id.as_str()).collect();
        let received: Vec<f64> = requests.iter().map(|(_, at)| *at as f64).collect();
        let client = self.pool.get().await?;
        // Done only if that run's fetch began after the notification was received: a later
        // notification with the same window (an edit) is fetched again.
        let rows = client
            .query(
                "SELECT r.sync_request_id FROM sync_runs r \
                 JOIN unnest($1::text[], $2::float8[]) AS q(id, received_ms) ON r.sync_request_id = q.id \
                 WHERE r.status = 'ok' AND r.fetch_started_at >= to_timestamp(q.received_ms / 1000)",
                &[&ids, &received],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records the outcome of sync requests and advances the links' cursors (after the
    /// measurements are acknowledged by the broker).
    pub async fn record_runs(&self, runs: &[SyncRun]) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for r in runs {
            tx.execute(
                // A deleted link's run cannot reference it: it is only logged, not recorded.
                "INSERT INTO sync_runs (sync_request_id, link_id, trigger, window_start, window_end, status, api_calls, measurements, error, finished_at, fetch_started_at, skipped) \
                 SELECT $1, $2, $3, to_timestamp($4::float8 / 1000), to_timestamp($5::float8 / 1000), $6, $7, $8, $9, now(), to_timestamp($10::float8 / 1000), $11 \
                 WHERE EXISTS (SELECT 1 FROM provider_links WHERE id = $2) \
                 ON CONFLICT (sync_request_id) DO UPDATE SET status = EXCLUDED.status, api_calls = sync_runs.api_calls + EXCLUDED.api_calls, \
                   measurements = EXCLUDED.measurements, error = EXCLUDED.error, attempts = sync_runs.attempts + 1, finished_at = now(), \
                   fetch_started_at = EXCLUDED.fetch_started_at, skipped = EXCLUDED.skipped",
                &[&r.sync_request_id, &r.link_id, &r.trigger, &(r.window.0 as f64), &(r.window.1 as f64), &r.status, &r.api_calls, &r.measurements, &r.error, &(r.fetch_started_at as f64), &serde_json::Value::Object(r.skipped.clone())],
            )
            .await?;
            if r.status == "ok" {
                tx.execute(
                    "UPDATE provider_links SET last_synced_at = now(), \
                     cursors = cursors || jsonb_build_object('last_window_end_ms', GREATEST(COALESCE((cursors->>'last_window_end_ms')::bigint, 0), $2::bigint)), \
                     updated_at = now() WHERE id = $1",
                    &[&r.link_id, &r.window.1],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The outcome of one sync request, for `sync_runs`.
#[derive(Debug, Clone)]
pub struct SyncRun {
    pub sync_request_id: String,
    pub link_id: Uuid,
    pub trigger: String,
    pub window: (i64, i64),
    /// `ok` | `reauth_required` | `skipped` (link inactive or deleted) | `failed` (dead-lettered).
    pub status: String,
    pub api_calls: i32,
    pub measurements: i32,
    pub error: Option<String>,
    /// When the fetch began (epoch ms): notifications received before it are covered by it.
    pub fetch_started_at: i64,
    /// What the provider answered and was not turned into measurements: count by
    /// `reason` or `reason:provider type` (`sync_runs.skipped`).
    pub skipped: serde_json::Map<String, serde_json::Value>,
}

/// A refresh failure that may mean the grant is revoked.
pub trait RefreshFailure {
    /// Returns whether the grant is revoked (re-authorization needed, never retry).
    fn is_revoked(&self) -> bool;
    /// Returns a short reason without secrets.
    fn reason(&self) -> String;
}

impl RefreshFailure for ProviderError {
    /// Only a real invalid grant: an outage (HTTP 5xx, timeouts, a bare 503 status) or the
    /// app's own credentials being rejected (`ClientRejected`) says nothing about the link.
    fn is_revoked(&self) -> bool {
        matches!(self, ProviderError::GrantRevoked { .. })
    }
    fn reason(&self) -> String {
        self.to_string()
    }
}

/// The Generic Cell Rate Algorithm over one limit: each conforming request moves the
/// theoretical arrival time (TAT) one emission interval later; a request conforms when the
/// TAT is at most `tolerance` ahead of now. Times are integer microseconds.
///
/// # Why the tolerance is zero
/// Take any `n + 1` conforming requests at `t_1 ≤ … ≤ t_{n+1}`. Each moves the TAT by `T`, and
/// TAT never falls below an allowed request's time, so before the last one TAT ≥ `t_1 + n·T`,
/// and it conforms only if `t_{n+1} ≥ TAT − τ ≥ t_1 + n·T − τ`. With `T = window / limit` and
/// `n = limit`: `t_{limit+1} − t_1 ≥ window − τ`. So `limit + 1` requests never fit in a
/// half-open window `[s, s + window)` exactly when `τ = 0`; any positive tolerance (a burst)
/// lets an idle limit admit `limit + 1` within one window (the old token bucket admitted up to
/// `2 × limit`). `T` is rounded up to whole microseconds so that `limit · T ≥ window`. The
/// price is pacing: requests leave one every `T` (500 ms at 120/min), never in bursts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`, in microseconds.
    pub emission_interval_us: i64,
    /// `τ`, in microseconds.
    pub tolerance_us: i64,
}

impl Gcra {
    /// At most `limit` requests in any `window`: `T = ⌈window / limit⌉`, `τ = 0`.
    pub fn per_window(limit: u32, window: Duration) -> Self {
        let window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        let limit = i64::from(limit.max(1));
        Self {
            emission_interval_us: (window_us + limit - 1) / limit,
            tolerance_us: 0,
        }
    }

    /// Decides a request at `now_us` against the stored TAT (`None`: never used). Returns the
    /// new TAT to store if the request conforms, else how long to wait (µs) before it would.
    pub fn check(&self, tat_us: Option<i64>, now_us: i64) -> Result<i64, i64> {
        let tat = tat_us.unwrap_or(now_us).max(now_us);
        let ahead = tat - now_us;
        if ahead > self.tolerance_us {
            Err(ahead - self.tolerance_us)
        } else {
            Ok(tat + self.emission_interval_us)
        }
    }
}

/// A GCRA limit in PostgreSQL shared by every fetcher replica (Withings allows 120 requests per
/// minute for the whole application): one row per limit in `rate_limits`, decided by one
/// atomic upsert against the database's clock (replicas' clocks need not agree).
#[derive(Clone)]
pub struct PgRateGate {
    pool: Pool,
    name: String,
    gcra: Gcra,
    calls: opentelemetry::metrics::Counter<u64>,
}

impl std::fmt::Debug for PgRateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRateGate")
            .field("name", &self.name)
            .field("gcra", &self.gcra)
            .finish()
    }
}

/// What one attempt on the shared limit decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Conforming: sent at this database time (epoch µs).
    Allowed { at_us: i64 },
    /// Not yet: try again after this long.
    Wait(Duration),
}

impl PgRateGate {
    /// Creates a gate named `name` allowing `per_minute` requests in any 60 s.
    pub fn new(
        pool: Pool,
        name: String,
        per_minute: u32,
        calls: opentelemetry::metrics::Counter<u64>,
    ) -> Self {
        Self::per_window(pool, name, per_minute, Duration::from_secs(60), calls)
    }

    /// Creates a gate allowing `limit` requests in any `window`.
    pub fn per_window(
        pool: Pool,
        name: String,
        limit: u32,
        window: Duration,
        calls: opentelemetry::metrics::Counter<u64>,
    ) -> Self {
        Self {
            pool,
            name,
            gcra: Gcra::per_window(limit, window),
            calls,
        }
    }

    /// Takes a permit if the limit allows one now ([`Gcra::check`] in one atomic statement:
    /// the upsert's `WHERE` is evaluated on the locked, latest row).
    pub async fn try_take(&self) -> Result<Take, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "WITH clock AS (SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint AS now_us), \
                 taken AS ( \
                   INSERT INTO rate_limits AS r (name, tat_us, updated_at) \
                   SELECT $1, clock.now_us + $2, clock_timestamp() FROM clock \
                   ON CONFLICT (name) DO UPDATE \
                     SET tat_us = GREATEST(r.tat_us, (SELECT now_us FROM clock)) + $2, updated_at = clock_timestamp() \
                     WHERE GREATEST(r.tat_us, (SELECT now_us FROM clock)) - (SELECT now_us FROM clock) <= $3 \
                   RETURNING r.tat_us) \
                 SELECT (SELECT now_us FROM clock), (SELECT tat_us FROM taken), \
                        (SELECT tat_us FROM rate_limits WHERE name = $1)",
                &[
                    &self.name,
                    &self.gcra.emission_interval_us,
                    &self.gcra.tolerance_us,
                ],
            )
            .await?;
        let now_us: i64 = row.get(0);
        let taken: Option<i64> = row.get(1);
        if taken.is_some() {
            return Ok(Take::Allowed { at_us: now_us });
        }
        // Denied: the TAT read from the statement's snapshot may be older than the row that
        // denied us; the wait is a hint, and the next attempt decides again.
        let tat: Option<i64> = row.get(2);
        let wait_us = match self.gcra.check(tat, now_us) {
            Err(w) => w,
            Ok(_) => 1_000,
        };
        Ok(Take::Wait(Duration::from_micros(
            u64::try_from(wait_us.max(1_000)).unwrap_or(1_000),
        )))
    }
}

impl RateGate for PgRateGate {
    fn acquire(&self) -> BoxFuture<'_, Result<(), GateError>> {
        Box::pin(async move {
            loop {
                match self.try_take().await {
                    Ok(Take::Allowed { .. }) => {
                        // Bucket names start with the provider (`RatePolicy::bucket`).
                        let provider = self.name.split(':').next().unwrap_or_default();
                        self.calls.add(
                            1,
                            &[opentelemetry::KeyValue::new(
                                "provider",
                                provider.to_owned(),
                            )],
                        );
                        return Ok(());
                    }
                    Ok(Take::Wait(wait)) => tokio::time::sleep(wait).await,
                    Err(e) => return Err(Box::new(e) as GateError),
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MINUTE_US: i64 = 60_000_000;

    /// The largest number of times in any half-open window `[t, t + window)` (sorted times).
    fn max_in_window(times: &[i64], window: i64) -> usize {
        let (mut best, mut lo) = (0, 0);
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    /// Hammers a limit for five simulated minutes: 8 clients, each retrying after the wait it
    /// was told (plus jitter) or right after a success, and one greedy client that asks every
    /// millisecond. Returns the allowed times.
    fn hammer(gcra: Gcra, minutes: i64) -> Vec<i64> {
        let mut tat: Option<i64> = None;
        let mut allowed = Vec::new();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: i64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            i64::try_from((seed >> 33) % u64::try_from(bound).unwrap()).unwrap()
        };
        let mut clients: Vec<i64> = (0..8).map(|_| next(1_000_000)).collect();
        let end = minutes * MINUTE_US;
        let mut greedy = 0;
        loop {
            // the earliest next attempt among the clients and the greedy one
            let (i, &t) = clients.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            let (who, now) = if greedy < t {
                (None, greedy)
            } else {
                (Some(i), t)
            };
            if now >= end {
                break;
            }
            let decision = gcra.check(tat, now);
            if let Ok(new_tat) = decision {
                tat = Some(new_tat);
                allowed.push(now);
            }
            match who {
                None => greedy += 1_000,
                Some(i) => {
                    clients[i] = now
                        + match decision {
                            Ok(_) => next(50_000),
                            Err(wait) => wait + next(3_000),
                        }
                }
            }
        }
        allowed
    }

    #[test]
    fn test_gcra_never_admits_more_than_the_limit_in_any_60s() {
        let gcra = Gcra::per_window(120, Duration::from_secs(60));
        assert_eq!(gcra.emission_interval_us, 500_000);
        assert_eq!(gcra.tolerance_us, 0);
        let allowed = hammer(gcra, 5);
        assert_eq!(max_in_window(&allowed, MINUTE_US), 120);
        // and it does not starve: the whole budget is used
        assert!(allowed.len() >= 5 * 120 - 1, "{}", allowed.len());
        // a limit that does not divide the window
        let gcra = Gcra::per_window(7, Duration::from_secs(60));
        assert!(max_in_window(&hammer(gcra, 5), MINUTE_US) <= 7);
    }

    #[test]
    fn test_gcra_with_a_burst_tolerance_would_exceed_the_limit() {
        // Why the tolerance is zero: one interval of tolerance already admits 121.
        let gcra = Gcra {
            emission_interval_us: 500_000,
            tolerance_us: 500_000,
        };
        assert!(max_in_window(&hammer(gcra, 5), MINUTE_US) > 120);
    }

    #[test]
    fn test_gcra_check_waits_until_the_tat() {
        let gcra = Gcra::per_window(120, Duration::from_secs(60));
        assert_eq!(gcra.check(None, 1_000), Ok(501_000));
        assert_eq!(gcra.check(Some(501_000), 1_000), Err(500_000));
        assert_eq!(gcra.check(Some(501_000), 501_000), Ok(1_001_000));
        // an idle limit does not bank credit
        assert_eq!(gcra.check(Some(0), 10_000_000), Ok(10_500_000));
    }

    /// The SQL makes the same decisions against the shared row, under concurrency (needs the
    /// local PostgreSQL): 4 tasks hammer a limit of 5 per second for 3 s.
    #[tokio::test]
    async fn test_pg_gate_holds_the_limit_under_concurrency() {
        let url = "postgres://postgres@127.0.0.1:5432/ohx_fetcher_test";
        ohx_common::db::create_database(url).await.unwrap();
        let pool = ohx_common::db::pool(url, 8).unwrap();
        ohx_common::db::migrate(&pool).await.unwrap();
        let counter = opentelemetry::global::meter("test")
            .u64_counter("calls")
            .build();
        let gate = PgRateGate::per_window(
            pool,
            format!("test:{}", Uuid::new_v4()),
            5,
            Duration::from_secs(1),
            counter,
        );
        let stop = std::time::Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let mut at = Vec::new();
                while std::time::Instant::now() < stop {
                    match gate.try_take().await.unwrap() {
                        Take::Allowed { at_us } => at.push(at_us),
                        Take::Wait(w) => tokio::time::sleep(w.min(Duration::from_millis(50))).await,
                    }
                }
                at
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert!(all.len() >= 12, "{}", all.len());
        assert!(max_in_window(&all, 1_000_000) <= 5, "{all:?}");
    }
}
