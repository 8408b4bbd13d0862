//! The fetcher's PostgreSQL side: links and their encrypted tokens, refreshes serialized per
//! link by a row lock, the application-wide rate bucket shared by all replicas, and sync-run
//! bookkeeping (ids, times, counts, statuses; never values).

use crate::withings::{GateFuture, RateGate, TokenSet};
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
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
        StoreError::Db(e.to_string())
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
    pub status: String,
    pub provider_user_id: String,
    pub access_token: String,
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub client_id: String,
    pub client_secret: String,
    pub api_base_url: Option<String>,
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
                "SELECT l.id, l.provider_app_id, l.status, l.provider_user_id, l.access_token, l.token_expires_at, \
                        a.client_id, a.client_secret, a.api_base_url \
                 FROM provider_links l JOIN provider_apps a ON a.id = l.provider_app_id WHERE l.id = $1",
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
        Fut: std::future::Future<Output = Result<TokenSet, E>>,
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
                let refresh = self.secrets.seal(
                    tokens.refresh_token.as_bytes(),
                    &aad(link.id, "refresh_token"),
                )?;
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
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT sync_request_id FROM sync_runs WHERE sync_request_id = ANY($1) AND status = 'ok'",
                &[&ids],
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
                "INSERT INTO sync_runs (sync_request_id, link_id, trigger, window_start, window_end, status, api_calls, measurements, error, finished_at) \
                 SELECT $1, $2, $3, to_timestamp($4::float8 / 1000), to_timestamp($5::float8 / 1000), $6, $7, $8, $9, now() \
                 WHERE EXISTS (SELECT 1 FROM provider_links WHERE id = $2) \
                 ON CONFLICT (sync_request_id) DO UPDATE SET status = EXCLUDED.status, api_calls = sync_runs.api_calls + EXCLUDED.api_calls, \
                   measurements = EXCLUDED.measurements, error = EXCLUDED.error, attempts = sync_runs.attempts + 1, finished_at = now()",
                &[&r.sync_request_id, &r.link_id, &r.trigger, &(r.window.0 as f64), &(r.window.1 as f64), &r.status, &r.api_calls, &r.measurements, &r.error],
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
}

/// A refresh failure that may mean the grant is revoked.
pub trait RefreshFailure {
    /// Returns whether the grant is revoked (re-authorization needed, never retry).
    fn is_revoked(&self) -> bool;
    /// Returns a short reason without secrets.
    fn reason(&self) -> String;
}

impl RefreshFailure for crate::withings::WithingsError {
    /// Only a real invalid grant: an outage (HTTP 5xx, timeouts, a bare 503 status) or the
    /// app's own credentials being rejected (`InvalidClient`) says nothing about the link.
    fn is_revoked(&self) -> bool {
        matches!(self, crate::withings::WithingsError::InvalidGrant { .. })
    }
    fn reason(&self) -> String {
        self.to_string()
    }
}

/// A token bucket in PostgreSQL shared by every fetcher replica (Withings allows 120 requests
/// per minute for the whole application).
#[derive(Clone)]
pub struct PgRateGate {
    pool: Pool,
    name: String,
    capacity: f64,
    refill_per_second: f64,
    calls: opentelemetry::metrics::Counter<u64>,
}

impl std::fmt::Debug for PgRateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRateGate")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl PgRateGate {
    /// Creates a gate named `name` allowing `per_minute` requests per minute.
    pub fn new(
        pool: Pool,
        name: String,
        per_minute: u32,
        calls: opentelemetry::metrics::Counter<u64>,
    ) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self {
            pool,
            name,
            capacity,
            refill_per_second: capacity / 60.0,
            calls,
        }
    }

    /// Takes a token if one is available; otherwise returns how long to wait.
    pub async fn try_take(&self) -> Result<Option<Duration>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO rate_buckets (name, tokens, capacity, refill_per_second) VALUES ($1, $2, $2, $3) ON CONFLICT (name) DO NOTHING",
            &[&self.name, &self.capacity, &self.refill_per_second],
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT LEAST(capacity, tokens + EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 * refill_per_second) FROM rate_buckets WHERE name = $1 FOR UPDATE",
                &[&self.name],
            )
            .await?;
        let available: f64 = row.get(0);
        let (left, wait) = if available >= 1.0 {
            (available - 1.0, None)
        } else {
            (
                available,
                Some(Duration::from_secs_f64(
                    ((1.0 - available) / self.refill_per_second).max(0.01),
                )),
            )
        };
        tx.execute(
            "UPDATE rate_buckets SET tokens = $2, updated_at = clock_timestamp() WHERE name = $1",
            &[&self.name, &left],
        )
        .await?;
        tx.commit().await?;
        Ok(wait)
    }
}

impl RateGate for PgRateGate {
    fn acquire(&self) -> GateFuture<'_> {
        Box::pin(async move {
            loop {
                match self.try_take().await {
                    Ok(None) => {
                        self.calls
                            .add(1, &[opentelemetry::KeyValue::new("provider", "withings")]);
                        return Ok(());
                    }
                    Ok(Some(wait)) => tokio::time::sleep(wait).await,
                    Err(e) => return Err(Box::new(e) as crate::withings::GateError),
                }
            }
        })
    }
}
