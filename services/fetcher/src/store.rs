//! The fetcher's PostgreSQL side: links and their encrypted tokens, refreshes serialized per
//! link by a row lock, and sync-run
//! bookkeeping (ids, times, counts, statuses; never values).

use crate::ledger::{LedgerChange, LedgerRow};
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_providers::policy::{POLICY_COLUMNS, Policy, PolicyError};
use ohx_providers::{ProviderError, Tokens};
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
        StoreError::Db(ohx_common::db::error_text(&e))
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
    /// The user's timezone as the provider last reported it (`provider_links.timezone`).
    pub timezone: Option<String>,
    /// Where the patient's data goes, as of this load ([`ohx_common::db::patient_targets`]).
    pub targets: ohx_common::db::PatientTargets,
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
                        {POLICY_COLUMNS}, l.scopes, l.timezone, l.patient_id \
                 FROM provider_links l JOIN provider_apps a ON a.id = l.provider_app_id \
                 JOIN organizations o ON o.id = l.organization_id JOIN patients p ON p.id = l.patient_id \
                 WHERE l.id = $1"),
                &[&id],
            )
            .await?
            .ok_or_else(|| StoreError::UnknownLink(id.to_string()))?;
        let patient_id: Uuid = row.get(16);
        let targets = ohx_common::db::patient_targets(&client, &patient_id)
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
            timezone: row.get(15),
            targets,
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

    /// The ledger rows of `link` of the given data types whose time is in `[start, end)`.
    pub async fn ledger_rows(
        &self,
        link: Uuid,
        data_types: &[&str],
        (start, end): (i64, i64),
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT measurement_id, data_type, source_id, effective_start_ms, effective_end_ms, \
                 utc_offset_seconds, revision FROM measurement_ledger WHERE link_id = $1 \
                 AND data_type = ANY($2) AND effective_start_ms >= $3 AND effective_start_ms < $4",
                &[&link, &data_types, &start, &end],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LedgerRow {
                measurement_id: r.get(0),
                data_type: r.get(1),
                source_id: r.get(2),
                effective_start: r.get(3),
                effective_end: r.get(4),
                utc_offset_seconds: r.get(5),
                revision: r.get(6),
            })
            .collect())
    }

    /// Records the outcome of sync requests, advances the links' cursors and updates their
    /// ledgers, in one transaction (after the measurements are acknowledged by the broker).
    /// Ledger rows dated before `horizon_ms` are pruned from the links whose ledger changed.
    pub async fn record_runs(
        &self,
        runs: &[SyncRun],
        ledgers: &[(Uuid, LedgerChange)],
        horizon_ms: i64,
    ) -> Result<(), StoreError> {
        if runs.is_empty() && ledgers.is_empty() {
            return Ok(());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for (link, change) in ledgers {
            for row in &change.record {
                // A deleted link's rows cannot reference it.
                tx.execute(
                    "INSERT INTO measurement_ledger (link_id, measurement_id, data_type, source_id, effective_start_ms, effective_end_ms, utc_offset_seconds, revision) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM provider_links WHERE id = $1) \
                     ON CONFLICT (link_id, measurement_id) DO UPDATE SET data_type = EXCLUDED.data_type, source_id = EXCLUDED.source_id, \
                       effective_start_ms = EXCLUDED.effective_start_ms, effective_end_ms = EXCLUDED.effective_end_ms, \
                       utc_offset_seconds = EXCLUDED.utc_offset_seconds, revision = EXCLUDED.revision",
                    &[link, &row.measurement_id, &row.data_type, &row.source_id, &row.effective_start, &row.effective_end, &row.utc_offset_seconds, &row.revision],
                )
                .await?;
            }
            tx.execute(
                "DELETE FROM measurement_ledger WHERE link_id = $1 AND (measurement_id = ANY($2) OR effective_start_ms < $3)",
                &[link, &change.forget, &horizon_ms],
            )
            .await?;
        }
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
                     timezone = COALESCE($3, timezone), updated_at = now() WHERE id = $1",
                    &[&r.link_id, &r.window.1, &r.timezone],
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
    /// The user's timezone the fetch's answers reported, remembered on the link when `ok`.
    pub timezone: Option<String>,
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
