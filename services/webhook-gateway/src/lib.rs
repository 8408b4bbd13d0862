//! Receives provider webhooks and emits sync requests once the broker has them.
//!
//! One route serves every provider: `/webhooks/{provider}?token=…`. The per-app secret token
//! in the callback URL (stored as its SHA-256) authenticates the notification and names the
//! provider app; the provider's adapter ([`ohx_providers::Provider::parse_webhook`]) says what
//! the body asks for. A notification is answered 2xx only after its SyncRequests are
//! acknowledged by the broker (acks=all), 503 otherwise so that the provider retries (Withings
//! expects an answer within 2 s).

pub mod api;
pub mod connect;
pub mod delivery;
pub mod import;
pub mod jwks;
pub mod lookup;
pub mod signature;
pub mod sources;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use lookup::{LinkRow, LookupCache};
use ohx_common::admin::Problem;
use ohx_common::codec::CodecError;
use ohx_common::kafka::{OutRecord, Producer};
use ohx_common::records::{Context, SyncRequest, topic};
use ohx_common::trace::{self, Trace};
use ohx_providers::{Notice, NoticeKind, Registry, WebhookSecret};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;
use std::time::Duration;

static WEBHOOKS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_webhooks",
        "Provider webhooks received, by provider and outcome",
    )
});
static SYNC_REQUESTS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_sync_requests",
        "Sync requests emitted, by provider and trigger",
    )
});

/// Shared state of the gateway's handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The providers whose webhooks are accepted.
    pub providers: Registry,
    pub pool: Pool,
    /// Cached lookups, dropped on every configuration change (see [`lookup`]).
    pub lookups: LookupCache,
    pub producer: Producer,
    /// How long to wait for the broker's acknowledgement before answering 503.
    pub ack_timeout: Duration,
    /// Bound of each configuration-database step of a webhook (`OHX_DATABASE_TIMEOUT_MS`).
    pub db_timeout: Duration,
    /// Longest notified window accepted (`OHX_MAX_WEBHOOK_WINDOW_DAYS`, default
    /// [`DEFAULT_MAX_WEBHOOK_WINDOW_DAYS`]).
    pub max_window: Duration,
    /// The connect flow's callback (`None` without `OHX_PUBLIC_URL`: the route answers 404).
    pub connect: Option<connect::ConnectSettings>,
    /// Signature checks of the providers that sign their notifications, by provider name
    /// (built by [`signature_checks`]).
    pub signatures: std::collections::BTreeMap<&'static str, std::sync::Arc<signature::Signatures>>,
    /// Source-address allow-lists (`OHX_WEBHOOK_ALLOWED_SOURCES`, `OHX_TRUSTED_PROXIES`).
    pub sources: std::sync::Arc<sources::SourceRules>,
    /// Keys of the keyed digests imported rows are recorded by (`OHX_SECRET_KEYS`; imports
    /// answer 503 without them).
    pub secrets: Option<ohx_common::crypto::SecretBox>,
    /// Largest import body (`OHX_MAX_IMPORT_BYTES`, default
    /// [`import::DEFAULT_MAX_IMPORT_BYTES`]); a larger one is answered 413.
    pub max_import_bytes: usize,
}

/// Default longest window of a notification, in days. Withings notifies the window of the data
/// that changed (minutes to hours; days after a device was offline). A window from
/// `startdate=0` would cost ~20,000 provider calls and exhaust the application-wide budget of
/// 120 requests/min for hours, so longer windows are refused (400): a long backfill is an
/// INITIAL or MANUAL sync, not a webhook.
pub const DEFAULT_MAX_WEBHOOK_WINDOW_DAYS: u64 = 31;

/// How far into the future a notified window may end (device and provider clocks drift).
pub const MAX_FUTURE_SKEW_MS: i64 = 10 * 60 * 1000;

/// Checks a notified window (epoch ms, end exclusive) against the maximum length and the
/// allowed clock skew into the future.
pub fn validate_window(
    window: (i64, i64),
    now_ms: i64,
    max_window: Duration,
) -> Result<(), String> {
    let (start, end) = window;
    let max_ms = i64::try_from(max_window.as_millis()).unwrap_or(i64::MAX);
    if end.saturating_sub(start) > max_ms {
        return Err(format!(
            "the window from startdate to enddate is longer than the maximum of {} days",
            max_window.as_secs() / 86_400
        ));
    }
    if end > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
        return Err(format!(
            "enddate is more than {} minutes in the future",
            MAX_FUTURE_SKEW_MS / 60_000
        ));
    }
    Ok(())
}

/// The signature checks of every provider of `providers` that signs its notifications, with
/// the keyset URL from the provider's environment variable when set.
pub fn signature_checks(
    providers: &Registry,
    http: &reqwest::Client,
) -> std::collections::BTreeMap<&'static str, std::sync::Arc<signature::Signatures>> {
    providers
        .names()
        .into_iter()
        .filter_map(|n| providers.get(n))
        .filter_map(|p| {
            let scheme = p.signed_webhooks()?;
            let url = std::env::var(scheme.keyset_url_env)
                .ok()
                .filter(|u| !u.trim().is_empty())
                .unwrap_or_else(|| scheme.keyset_url.to_owned());
            Some((
                p.name(),
                std::sync::Arc::new(signature::Signatures::new(scheme, url, http.clone())),
            ))
        })
        .collect()
}

/// Returns the webhook routes. `HEAD` and `GET` answer 200 for a known provider: Withings
/// probes a callback URL with `HEAD` before it accepts a subscription.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/webhooks/{provider}", post(webhook).head(probe).get(probe))
        .route("/oauth/{provider}/callback", get(connect::callback))
        .route("/ehr-targets/{id}/jwks.json", get(jwks::jwks))
        .route(
            "/imports/beurer",
            post(import::beurer).layer(DefaultBodyLimit::max(state.max_import_bytes)),
        )
        .with_state(state)
}

async fn probe(State(state): State<AppState>, Path(provider): Path<String>) -> Response {
    match state.providers.get(&provider) {
        Some(_) => StatusCode::OK.into_response(),
        None => unknown_provider(&provider),
    }
}

pub(crate) fn unknown_provider(provider: &str) -> Response {
    Problem::new(StatusCode::NOT_FOUND, "Unknown provider")
        .detail(format!("ohx has no provider called {provider:?}"))
        .into_response()
}

/// Returns the deterministic sync request id of a notification for a link: a UUID (version 8,
/// from SHA-256) of the provider, the link, the user id, `appli` and the notified window.
///
/// Why deterministic: a webhook answered 503 (or answered after Withings' 2 s deadline) is
/// retried by Withings, though its SyncRequest was usually stored anyway. Every retry carries
/// the same fields, so it gets the same id, and the fetcher skips a request whose id already
/// has a successful run (one indexed lookup per batch) and coalesces same-id requests of a
/// batch: a duplicate costs one database lookup instead of a full fetch. The link id (not in
/// the notification) keeps apart two organizations' links of the same Withings user, whose
/// runs would otherwise share one `sync_runs` row. A later notification of the very same
/// window (an edit inside it) is skipped too; NIGHTLY reconciliation fetches such late edits.
pub fn sync_request_id(
    provider: &str,
    link_id: &str,
    userid: &str,
    event: &str,
    window: Option<(i64, i64)>,
) -> String {
    let (start, end) = window.map_or((String::new(), String::new()), |(s, e)| {
        (s.to_string(), e.to_string())
    });
    let digest = Sha256::digest(
        [provider, link_id, userid, event, &start, &end]
            .join("\u{1f}")
            .as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// Returns the hex SHA-256 of a webhook token (how tokens are stored).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

pub(crate) fn count(provider: &str, outcome: &'static str) {
    WEBHOOKS.add(
        1,
        &[
            KeyValue::new("provider", provider.to_owned()),
            KeyValue::new("outcome", outcome),
        ],
    );
}

/// What kept a notification from being stored. Answered 503 so that Withings retries; the
/// problem names the dependency, for the operator reading the provider's delivery log.
///
/// What a 503 means: "not known to be stored, send it again". Withings will retry. The
/// request may have been stored after all (the broker acknowledged after the deadline): the
/// retry then produces a request with the same [`sync_request_id`], and the duplicate costs
/// the fetcher one database lookup, not a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The configuration database (down, unreachable, too slow: see `OHX_DATABASE_TIMEOUT_MS`).
    Database,
    /// The schema registry could not give the SyncRequest schema's id.
    SchemaRegistry,
    /// The broker did not acknowledge the sync request in time.
    Broker,
    /// The provider's signing keys could not be fetched.
    Keyset,
}

impl Unavailable {
    /// The problem's title.
    pub fn title(self) -> &'static str {
        match self {
            Unavailable::Database => "Configuration database unavailable",
            Unavailable::SchemaRegistry => "Schema registry unavailable",
            Unavailable::Broker => "Broker unavailable",
            Unavailable::Keyset => "Provider signing keys unavailable",
        }
    }

    /// The label of `ohx_webhooks{outcome}`.
    pub fn outcome(self) -> &'static str {
        match self {
            Unavailable::Database => "unavailable_database",
            Unavailable::SchemaRegistry => "unavailable_schema_registry",
            Unavailable::Broker => "unavailable_broker",
            Unavailable::Keyset => "unavailable_keyset",
        }
    }
}

/// Returns the 503 problem+json naming what failed.
pub fn unavailable(provider: &str, what: Unavailable, detail: impl Into<String>) -> Response {
    count(provider, what.outcome());
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, what.title())
        .detail(detail)
        .into_response()
}

/// Classifies an encoding failure: the registry is a dependency that can come back (503);
/// anything else is a record that does not fit its schema, a bug (`None`).
pub fn encode_failure(e: &CodecError) -> Option<Unavailable> {
    match e {
        CodecError::Registry(_) => Some(Unavailable::SchemaRegistry),
        _ => None,
    }
}

/// Runs a database step under the pool's timeout (a connection taken from the pool can still
/// hang on a query if the server stalls).
pub(crate) async fn db_step<T, E: std::fmt::Display>(
    provider: &str,
    timeout: Duration,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Response> {
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(error)) => {
            tracing::error!(%error, step = what, "configuration database failed");
            Err(unavailable(
                provider,
                Unavailable::Database,
                "the configuration database failed; retry",
            ))
        }
        Err(_) => {
            tracing::error!(
                step = what,
                timeout_ms = timeout.as_millis() as u64,
                "configuration database timed out"
            );
            Err(unavailable(
                provider,
                Unavailable::Database,
                "the configuration database did not answer in time; retry",
            ))
        }
    }
}

/// The app a webhook token belongs to.
const APP_LOOKUP: &str =
    "SELECT id FROM provider_apps WHERE provider = $1 AND webhook_token_sha256 = $2";

/// Ends the links of a provider user under an app (the provider reported an unlink).
const UNLINK: &str = "UPDATE provider_links SET status = 'unlinked', \
     status_reason = 'the provider reported the link ended', updated_at = now() \
     WHERE provider_app_id = $1 AND provider_user_id = $2 AND status <> 'unlinked'";

/// The links (with patient and target) of a provider user under an app.
const LINK_LOOKUP: &str = "SELECT l.id, l.organization_id, l.patient_id, p.ehr_target_id, \
     p.ehr_patient_reference, l.status \
     FROM provider_links l JOIN patients p ON p.id = l.patient_id \
     WHERE l.provider_app_id = $1 AND l.provider_user_id = $2";

/// The app a webhook token (by its hash) belongs to, from the cache or the database.
pub(crate) async fn lookup_app(
    state: &AppState,
    provider: &str,
    hash: &str,
) -> Result<Option<uuid::Uuid>, Response> {
    // Cached by provider and token hash: a token of one provider's app says nothing of
    // another provider's route.
    let key = format!("{provider}/{hash}");
    if let Some(app) = state.lookups.lock().app(&key) {
        return Ok(app);
    }
    let epoch = state.lookups.lock().begin();
    let client = db_step(provider, state.db_timeout, "connect", state.pool.get()).await?;
    // Statements are prepared once per pooled connection (deadpool's statement cache).
    let row = db_step(provider, state.db_timeout, "app lookup", async {
        let statement = client.prepare_cached(APP_LOOKUP).await?;
        client.query_opt(&statement, &[&provider, &hash]).await
    })
    .await?;
    let app = row.map(|r| r.get::<_, uuid::Uuid>(0));
    state.lookups.lock().store_app(epoch, &key, app);
    Ok(app)
}

/// Marks the links of a provider user under an app `unlinked`; returns how many changed.
async fn unlink(
    state: &AppState,
    provider: &str,
    app: uuid::Uuid,
    user: &str,
) -> Result<u64, Response> {
    let client = db_step(provider, state.db_timeout, "connect", state.pool.get()).await?;
    db_step(provider, state.db_timeout, "unlink", async {
        let statement = client.prepare_cached(UNLINK).await?;
        client.execute(&statement, &[&app, &user]).await
    })
    .await
}

/// The links of a provider user under an app, from the cache or the database.
pub(crate) async fn lookup_links(
    state: &AppState,
    provider: &str,
    app: uuid::Uuid,
    user: &str,
) -> Result<Vec<LinkRow>, Response> {
    if let Some(rows) = state.lookups.lock().links(app, user) {
        return Ok(rows);
    }
    let epoch = state.lookups.lock().begin();
    let client = db_step(provider, state.db_timeout, "connect", state.pool.get()).await?;
    let rows = db_step(provider, state.db_timeout, "link lookup", async {
        let statement = client.prepare_cached(LINK_LOOKUP).await?;
        client.query(&statement, &[&app, &user]).await
    })
    .await?;
    let rows: Vec<LinkRow> = rows
        .iter()
        .map(|r| LinkRow {
            link_id: r.get(0),
            organization_id: r.get(1),
            patient_id: r.get(2),
            ehr_target_id: r.get(3),
            patient_reference: r.get(4),
            status: r.get(5),
        })
        .collect();
    state.lookups.lock().store_links(epoch, app, user, &rows);
    Ok(rows)
}

async fn webhook(
    State(state): State<AppState>,
    sources::PeerAddr(peer): sources::PeerAddr,
    Path(provider): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = chrono::Utc::now().timestamp_millis();
    let Some(adapter) = state.providers.get(&provider).cloned() else {
        return unknown_provider(&provider);
    };
    // The webhook's trace: the caller's W3C `traceparent` if it sent a valid one, else new.
    let trace = headers
        .get(trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Trace::parse)
        .unwrap_or_else(Trace::root);
    let provider = adapter.name();
    let client = state.sources.client(
        peer,
        headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
    );
    if !state.sources.allows(provider, client) {
        count(provider, "forbidden_source");
        tracing::info!(client = ?client, "webhook from an address outside the provider's allow-list");
        return Problem::new(StatusCode::FORBIDDEN, "Source address not allowed")
            .detail("this provider's webhooks are accepted from its listed addresses only")
            .into_response();
    }
    let secret = match adapter.webhook_secret() {
        WebhookSecret::Query => query.token,
        WebhookSecret::AuthorizationHeader => headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let Some(token) = secret.filter(|t| !t.is_empty()) else {
        count(provider, "unauthorized");
        return Problem::new(StatusCode::UNAUTHORIZED, "Missing webhook secret")
            .detail(match adapter.webhook_secret() {
                WebhookSecret::Query => "the callback URL must carry ?token=",
                WebhookSecret::AuthorizationHeader => {
                    "the Authorization header must carry the subscriber's secret"
                }
            })
            .into_response();
    };
    let app = match lookup_app(&state, provider, &token_hash(&token)).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            count(provider, "unauthorized");
            return Problem::new(StatusCode::UNAUTHORIZED, "Unknown webhook token").into_response();
        }
        Err(response) => return response,
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let notices = match adapter.parse_webhook(content_type, &body) {
        Ok(n) => n,
        Err(bad) => {
            count(provider, "bad_request");
            return Problem::new(StatusCode::BAD_REQUEST, "Malformed notification")
                .detail(bad.0)
                .into_response();
        }
    };
    // The provider checking its endpoint: authenticated above; probes are not signed.
    if notices.iter().any(|n| n.kind == NoticeKind::Verification) {
        count(provider, "verification");
        tracing::info!("webhook verification probe answered");
        return StatusCode::OK.into_response();
    }
    if let Some(check) = state.signatures.get(provider) {
        match check.check(&headers, &body).await {
            Ok(()) => {}
            Err(signature::Refused::KeysetUnavailable) => {
                return unavailable(
                    provider,
                    Unavailable::Keyset,
                    "the provider's signing keys could not be fetched; retry",
                );
            }
            Err(refused) => {
                count(provider, "bad_signature");
                let detail = match refused {
                    signature::Refused::Missing => {
                        "the notification carries no signature".to_owned()
                    }
                    signature::Refused::Invalid(why) => why,
                    signature::Refused::KeysetUnavailable => String::new(),
                };
                tracing::info!(detail, "notification signature refused");
                return Problem::new(StatusCode::UNAUTHORIZED, "Invalid signature")
                    .detail(detail)
                    .into_response();
            }
        }
    } else if adapter.signed_webhooks().is_some() {
        // A provider that signs, with no check configured: refuse rather than trust.
        count(provider, "bad_signature");
        return Problem::new(StatusCode::UNAUTHORIZED, "Signature not checked")
            .detail("this gateway has no keyset for the provider")
            .into_response();
    }
    // Windows are checked before anything is stored: a batch is taken whole or refused whole.
    for notice in &notices {
        if let Some(window) = notice.window
            && notice.kind == NoticeKind::Data
            && let Err(detail) = validate_window(window, received_at, state.max_window)
        {
            count(provider, "bad_request");
            tracing::info!(event = %notice.event, "notification window refused");
            return Problem::new(StatusCode::BAD_REQUEST, "Notification window refused")
                .detail(detail)
                .into_response();
        }
    }
    let mut sent = 0usize;
    let mut handled = 0usize;
    for notice in &notices {
        match notice.kind {
            NoticeKind::Data => {}
            NoticeKind::Unlinked => {
                let changed = match unlink(&state, provider, app, &notice.provider_user_id).await {
                    Ok(n) => n,
                    Err(response) => return response,
                };
                count(provider, "unlinked");
                tracing::info!(app_id = %app, links = changed, event = %notice.event, "links ended by the provider");
                handled += 1;
                continue;
            }
            NoticeKind::EventOnly => {
                count(provider, "event_only");
                tracing::info!(event = %notice.event, "event notification: nothing to fetch");
                continue;
            }
            NoticeKind::NotSubscribed => {
                count(provider, "ignored_category");
                tracing::info!(event = %notice.event, "notification category not synced");
                continue;
            }
            // Answered before the loop.
            NoticeKind::Verification => continue,
        }
        match emit_requests(&state, provider, app, notice, received_at, &trace).await {
            Ok(n) => sent += n,
            Err(response) => return response,
        }
    }
    if sent > 0 {
        count(provider, "accepted");
    }
    let status = adapter.webhook_ack_status(sent > 0 || handled > 0);
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::OK)
        .into_response()
}

/// Emits one SyncRequest per active link of the notice's user; returns how many. Each is
/// acknowledged by the broker before the next is sent.
async fn emit_requests(
    state: &AppState,
    provider: &'static str,
    app: uuid::Uuid,
    notice: &Notice,
    received_at: i64,
    trace: &Trace,
) -> Result<usize, Response> {
    let rows = lookup_links(state, provider, app, &notice.provider_user_id).await?;
    if rows.is_empty() {
        count(provider, "unknown_user");
        tracing::info!("notification for an unknown user");
        return Ok(0);
    }
    let mut sent = 0usize;
    for row in rows {
        let link_id = row.link_id;
        let status = row.status;
        if status != "active" {
            count(provider, "link_inactive");
            tracing::info!(link_id = %link_id, status, "notification for an inactive link");
            continue;
        }
        let request = SyncRequest {
            context: Context {
                organization_id: row.organization_id.to_string(),
                ehr_target_id: row.ehr_target_id.to_string(),
                patient_id: row.patient_id.to_string(),
                patient_reference: row.patient_reference,
                provider: provider.into(),
                link_id: link_id.to_string(),
                provider_user_id: notice.provider_user_id.clone(),
                sync_request_id: sync_request_id(
                    provider,
                    &link_id.to_string(),
                    &notice.provider_user_id,
                    &notice.event,
                    notice.window,
                ),
                trigger: "WEBHOOK".into(),
                received_at,
                fhir_version: ohx_common::records::FHIR_R5.into(),
                deliveries: Vec::new(),
            },
            categories: notice.categories.clone(),
            window_start: notice.window.map(|w| w.0),
            window_end: notice.window.map(|w| w.1),
            provider_event: Some(notice.event.clone()),
        };
        // Encode first (the schema registry may be asked for the id), then produce, both
        // within the one acknowledgement deadline, so that a 503 names what failed.
        let deadline = tokio::time::Instant::now() + state.ack_timeout;
        let encoded = tokio::time::timeout_at(
            deadline,
            state
                .producer
                .codec()
                .encode(topic::SYNC_REQUESTS, &request),
        )
        .await;
        let payload = match encoded {
            Ok(Ok(p)) => p,
            Ok(Err(error)) => {
                return Err(match encode_failure(&error) {
                    Some(what) => {
                        tracing::error!(%error, link_id = %link_id, "schema registry failed");
                        unavailable(provider, what, "the schema registry failed; retry")
                    }
                    None => {
                        count(provider, "error");
                        tracing::error!(%error, link_id = %link_id, "cannot encode the sync request");
                        Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Cannot encode the sync request",
                        )
                        .into_response()
                    }
                });
            }
            Err(_) => {
                tracing::error!(link_id = %link_id, "schema registry timed out");
                return Err(unavailable(
                    provider,
                    Unavailable::SchemaRegistry,
                    "the schema registry did not answer in time; retry",
                ));
            }
        };
        let record = OutRecord {
            topic: topic::SYNC_REQUESTS.to_string(),
            partition: None,
            key: Some(request.context.link_id.as_bytes().to_vec()),
            payload,
            headers: vec![trace.child().header()],
        };
        let send = state.producer.send_all(std::slice::from_ref(&record));
        match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(())) => {
                sent += 1;
                SYNC_REQUESTS.add(
                    1,
                    &[
                        KeyValue::new("provider", provider),
                        KeyValue::new("trigger", "WEBHOOK"),
                    ],
                );
                tracing::info!(link_id = %link_id, sync_request_id = %request.context.sync_request_id, event = %notice.event, trace_id = %trace.trace_id(), "sync request emitted");
            }
            Ok(Err(error)) => {
                tracing::error!(%error, link_id = %link_id, "broker did not acknowledge the sync request");
                return Err(unavailable(
                    provider,
                    Unavailable::Broker,
                    "the broker did not store the sync request; retry",
                ));
            }
            Err(_) => {
                tracing::error!(link_id = %link_id, "broker acknowledgement timed out");
                // The send was cut short before the producer's own deadline: tell health.
                state.producer.note_unacknowledged(
                    "the broker did not acknowledge within the webhook deadline",
                );
                return Err(unavailable(
                    provider,
                    Unavailable::Broker,
                    "the broker did not store the sync request in time; retry",
                ));
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_window_bounds_length_and_future() {
        let day = 86_400_000;
        let max = Duration::from_secs(31 * 86_400);
        let now = 1_800_000_000_000;
        assert!(validate_window((now - day, now), now, max).is_ok());
        assert!(validate_window((now - 31 * day, now), now, max).is_ok());
        assert!(validate_window((now - 31 * day - 1, now), now, max).is_err());
        // startdate=0 (the whole history).
        assert!(validate_window((0, now), now, max).is_err());
        // a small skew into the future is tolerated, more is not
        assert!(validate_window((now - day, now + MAX_FUTURE_SKEW_MS), now, max).is_ok());
        assert!(validate_window((now - day, now + MAX_FUTURE_SKEW_MS + 1), now, max).is_err());
        // the maximum is configurable
        assert!(validate_window((now - 2 * day, now), now, Duration::from_secs(86_400)).is_err());
    }

    use ohx_common::codec::Codec;
    use ohx_common::kafka::KafkaSettings;
    use std::sync::Arc;

    fn state(pool: Pool, codec: Codec) -> AppState {
        let producer = Producer::new(
            &KafkaSettings {
                bootstrap: "127.0.0.1:1".into(),
                extra: vec![],
            },
            Arc::new(codec),
            Duration::from_millis(300),
            ohx_common::admin::Health::new(),
        )
        .unwrap();
        AppState {
            providers: Registry::standard(Default::default()).unwrap(),
            pool,
            lookups: LookupCache::default(),
            producer,
            ack_timeout: Duration::from_millis(600),
            db_timeout: Duration::from_millis(300),
            max_window: Duration::from_secs(31 * 86_400),
            connect: None,
            signatures: Default::default(),
            sources: Default::default(),
            secrets: None,
            max_import_bytes: import::DEFAULT_MAX_IMPORT_BYTES,
        }
    }

    async fn call(state: AppState, token: &str, userid: &str) -> (StatusCode, serde_json::Value) {
        let now = chrono::Utc::now().timestamp();
        call_window(state, token, userid, now - 3600, now).await
    }

    async fn call_window(
        state: AppState,
        token: &str,
        userid: &str,
        start: i64,
        end: i64,
    ) -> (StatusCode, serde_json::Value) {
        post(
            state,
            "withings",
            token,
            format!("userid={userid}&appli=4&startdate={start}&enddate={end}"),
        )
        .await
    }

    /// Posts a form body to `/webhooks/{provider}?token=`; returns the status and, for an
    /// error, the problem (asserted to be problem+json).
    async fn post(
        state: AppState,
        provider: &str,
        token: &str,
        body: String,
    ) -> (StatusCode, serde_json::Value) {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let response = webhook(
            State(state),
            sources::PeerAddr(Some([127, 0, 0, 1].into())),
            Path(provider.into()),
            Query(TokenQuery {
                token: Some(token.into()),
            }),
            headers,
            Bytes::from(body),
        )
        .await;
        let status = response.status();
        let ct = response
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        if status.is_success() {
            return (status, serde_json::Value::Null);
        }
        assert!(ct.starts_with("application/problem+json"), "{ct}");
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// A provider with an allow-list: a webhook from another address is 403 before anything
    /// is looked up (the pool here points nowhere); the allowed address gets past the check.
    #[tokio::test]
    async fn test_source_outside_the_allow_list_is_forbidden() {
        let pool = ohx_common::db::pool_with_timeout(
            "postgres://postgres@127.0.0.1:1/ohx",
            1,
            Duration::from_millis(200),
        )
        .unwrap();
        let mut st = state(pool, Codec::embedded().unwrap());
        st.sources = Arc::new(sources::SourceRules::parse("withings=192.0.2.0/24", "").unwrap());
        let now = chrono::Utc::now().timestamp();
        let form = format!("userid=1&appli=4&startdate={}&enddate={now}", now - 60);
        let send = |st: AppState, peer: [u8; 4]| {
            let form = form.clone();
            async move {
                let mut headers = HeaderMap::new();
                headers.insert(
                    axum::http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded".parse().unwrap(),
                );
                webhook(
                    State(st),
                    sources::PeerAddr(Some(peer.into())),
                    Path("withings".into()),
                    Query(TokenQuery {
                        token: Some("t".into()),
                    }),
                    headers,
                    Bytes::from(form),
                )
                .await
                .status()
            }
        };
        assert_eq!(
            send(st.clone(), [198, 51, 100, 1]).await,
            StatusCode::FORBIDDEN
        );
        // Allowed: it reaches the (unreachable) database.
        assert_eq!(
            send(st, [192, 0, 2, 10]).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// A database that accepts connections and never answers: 503 naming the database, well
    /// inside Withings' 2 s deadline.
    #[tokio::test]
    async fn test_hung_database_answers_503_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let pool = ohx_common::db::pool_with_timeout(
            &format!("postgres://postgres@{addr}/ohx"),
            2,
            Duration::from_millis(300),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let (status, problem) = call(state(pool, Codec::embedded().unwrap()), "t", "1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem["title"], "Configuration database unavailable");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }

    /// Seeds a database on the local PostgreSQL with one active link for a fresh user id.
    const TEST_DB: &str = "postgres://postgres@127.0.0.1:5432/ohx_gateway_test";

    async fn seeded_pool() -> (Pool, String, String) {
        seeded_pool_in(TEST_DB).await
    }

    /// A test that listens for notifications gets a database of its own: NOTIFY is per
    /// database, and the other tests' inserts notify.
    async fn seeded_pool_in(url: &str) -> (Pool, String, String) {
        // Tests run in parallel: the loser of a race to create the database finds it there.
        if ohx_common::db::create_database(url).await.is_err() {
            ohx_common::db::create_database(url).await.unwrap();
        }
        let pool = ohx_common::db::pool(url, 2).unwrap();
        ohx_common::db::migrate(&pool).await.unwrap();
        let c = pool.get().await.unwrap();
        let (org, target, patient, app, link) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let userid = (uuid::Uuid::new_v4().as_u128() % 1_000_000_000).to_string();
        let token = uuid::Uuid::new_v4().to_string();
        c.execute(
            "INSERT INTO organizations (id, name) VALUES ($1, 'gw test')",
            &[&org],
        )
        .await
        .unwrap();
        c.execute("INSERT INTO ehr_targets (id, organization_id, name, base_url) VALUES ($1, $2, 't', 'http://127.0.0.1:1')", &[&target, &org]).await.unwrap();
        c.execute("INSERT INTO patients (id, organization_id, ehr_target_id, ehr_patient_reference) VALUES ($1, $2, $3, $4)", &[&patient, &org, &target, &format!("Patient/{patient}")]).await.unwrap();
        c.execute("INSERT INTO provider_apps (id, organization_id, provider, client_id, client_secret, webhook_token_sha256) VALUES ($1, $2, 'withings', 'cid', 'sealed', $3)", &[&app, &org, &token_hash(&token)]).await.unwrap();
        c.execute("INSERT INTO provider_links (id, organization_id, patient_id, provider_app_id, provider, provider_user_id) VALUES ($1, $2, $3, $4, 'withings', $5)", &[&link, &org, &patient, &app, &userid]).await.unwrap();
        drop(c);
        (pool, token, userid)
    }

    /// The schema registry down: 503 naming it. The broker down: 503 naming it. (Needs the
    /// local PostgreSQL, as the other database tests.)
    #[tokio::test]
    async fn test_registry_and_broker_failures_are_named() {
        let (pool, token, userid) = seeded_pool().await;
        let (status, problem) = call(
            state(pool.clone(), Codec::http("http://127.0.0.1:1").unwrap()),
            &token,
            &userid,
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        assert_eq!(problem["title"], "Schema registry unavailable");
        let (status, problem) =
            call(state(pool, Codec::embedded().unwrap()), &token, &userid).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        assert_eq!(problem["title"], "Broker unavailable");
    }

    /// The gateway's deadline (shorter than the producer's own) gives up on the broker: the
    /// service reports producing as failing, so `/healthz` turns 503 after the grace.
    #[tokio::test]
    async fn test_a_webhook_given_up_on_reports_producing_as_failing() {
        let (pool, token, userid) = seeded_pool().await;
        let health = ohx_common::admin::Health::with_grace(Duration::ZERO);
        let producer = Producer::new(
            &KafkaSettings {
                bootstrap: "127.0.0.1:1".into(),
                extra: vec![],
            },
            Arc::new(Codec::embedded().unwrap()),
            Duration::from_secs(30),
            health.clone(),
        )
        .unwrap();
        assert!(health.unhealthy().is_empty());
        let st = AppState {
            producer,
            ..state(pool, Codec::embedded().unwrap())
        };
        let (status, problem) = call(st, &token, &userid).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        let unhealthy = health.unhealthy();
        assert!(
            unhealthy.iter().any(|p| p.starts_with("produce failing")),
            "{unhealthy:?}"
        );
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cached lookups follow the database: a change of the link empties the cache at once, a
    /// change the fetcher makes all the time (last sync) does not, and while the listener is
    /// down nothing is served from the cache.
    #[tokio::test]
    async fn test_cached_lookups_follow_changes_in_the_database() {
        let url = "postgres://postgres@127.0.0.1:5432/ohx_gateway_lookup_test";
        let (pool, token, userid) = seeded_pool_in(url).await;
        let st = state(pool.clone(), Codec::embedded().unwrap());
        let listener = st
            .lookups
            .spawn_listener(url.into(), ohx_common::db::CONFIG_CHANGED_CHANNEL);
        wait_until("the listener is up", || st.lookups.is_live()).await;
        let app = lookup_app(&st, "withings", &token_hash(&token))
            .await
            .unwrap()
            .unwrap();
        let rows = lookup_links(&st, "withings", app, &userid).await.unwrap();
        assert_eq!(rows[0].status, "active");
        assert!(st.lookups.lock().links(app, &userid).is_some(), "cached");

        let c = pool.get().await.unwrap();
        let epoch = st.lookups.epoch();
        c.execute(
            "UPDATE provider_links SET status = 'disabled' WHERE provider_user_id = $1",
            &[&userid],
        )
        .await
        .unwrap();
        wait_until("the change is heard", || st.lookups.epoch() > epoch).await;
        let rows = lookup_links(&st, "withings", app, &userid).await.unwrap();
        assert_eq!(rows[0].status, "disabled");

        // The fetcher's bookkeeping does not notify: a NOTIFY sent after it is the next
        // change heard (notifications arrive in commit order).
        let epoch = st.lookups.epoch();
        c.execute(
            "UPDATE provider_links SET last_synced_at = now(), cursors = '{}' WHERE provider_user_id = $1",
            &[&userid],
        )
        .await
        .unwrap();
        c.batch_execute("NOTIFY ohx_config_changed, 'marker'")
            .await
            .unwrap();
        wait_until("the marker is heard", || {
            st.lookups.last_heard().as_deref() == Some("marker")
        })
        .await;
        assert_eq!(st.lookups.epoch(), epoch + 1, "only the marker was heard");

        // The listener's connection is cut: nothing is served from the cache until it is back.
        lookup_links(&st, "withings", app, &userid).await.unwrap();
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'ohx_gateway_lookup_test' AND query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap();
        wait_until("the listener is seen down", || !st.lookups.is_live()).await;
        assert!(st.lookups.lock().links(app, &userid).is_none());
        wait_until("the listener is back", || st.lookups.is_live()).await;
        assert!(
            st.lookups.lock().links(app, &userid).is_none(),
            "starts empty"
        );
        listener.abort();
    }

    /// `startdate=0`: 400 problem+json, nothing produced (the producer points nowhere, so a
    /// produce attempt would answer 503).
    #[tokio::test]
    async fn test_unbounded_window_is_refused_with_400() {
        let (pool, token, userid) = seeded_pool().await;
        let now = chrono::Utc::now().timestamp();
        let (status, problem) = call_window(
            state(pool.clone(), Codec::embedded().unwrap()),
            &token,
            &userid,
            0,
            now,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
        assert_eq!(problem["title"], "Notification window refused");
        let (status, problem) = call_window(
            state(pool, Codec::embedded().unwrap()),
            &token,
            &userid,
            now,
            now + 86_400,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    }

    /// Withings' `appli=46` with `action=unlink` ends the user's links without emitting
    /// anything (the producer's broker is unreachable: an emit would answer 503).
    #[tokio::test]
    async fn test_unlink_notification_marks_the_link_unlinked() {
        let (pool, token, userid) = seeded_pool().await;
        let st = state(pool.clone(), Codec::embedded().unwrap());
        let (status, problem) = post(
            st,
            "withings",
            &token,
            format!("userid={userid}&appli=46&action=unlink"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{problem}");
        let c = pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT status FROM provider_links WHERE provider_user_id = $1",
                &[&userid],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "unlinked");
    }

    /// Event-only and unsubscribed categories are acknowledged and fetch nothing (an emit
    /// would answer 503: the producer's broker is unreachable).
    #[tokio::test]
    async fn test_event_only_and_unsubscribed_categories_emit_nothing() {
        let (pool, token, userid) = seeded_pool().await;
        for appli in ["50", "51", "52", "55", "99"] {
            let st = state(pool.clone(), Codec::embedded().unwrap());
            let (status, problem) = post(
                st,
                "withings",
                &token,
                format!("userid={userid}&appli={appli}"),
            )
            .await;
            assert!(status.is_success(), "appli {appli}: {status} {problem}");
        }
        let c = pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT status FROM provider_links WHERE provider_user_id = $1",
                &[&userid],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "active");
    }

    /// A provider ohx does not know is 404 problem+json, before any token lookup.
    #[tokio::test]
    async fn test_unknown_provider_is_404() {
        let (pool, token, userid) = seeded_pool().await;
        let st = state(pool, Codec::embedded().unwrap());
        let (status, problem) = post(
            st,
            "fitbit-legacy",
            &token,
            format!("userid={userid}&appli=4&startdate=1&enddate=2"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(problem["title"], "Unknown provider");
    }

    /// The connect callback refuses a state it does not know and one that has expired, before
    /// any provider call (the app's API is unreachable here), and names why.
    #[tokio::test]
    async fn test_connect_callback_refuses_unknown_and_expired_states() {
        let (pool, _token, userid) = seeded_pool().await;
        let c = pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT l.organization_id, l.patient_id, l.provider_app_id FROM provider_links l WHERE l.provider_user_id = $1",
                &[&userid],
            )
            .await
            .unwrap();
        let (org, patient, app): (uuid::Uuid, uuid::Uuid, uuid::Uuid) =
            (row.get(0), row.get(1), row.get(2));
        let expired = format!("expired-{userid}");
        c.execute(
            "INSERT INTO oauth_states (state_sha256, organization_id, patient_id, provider_app_id, redirect_uri, expires_at) \
             VALUES ($1, $2, $3, $4, 'http://127.0.0.1:1/cb', now() - interval '1 second')",
            &[&token_hash(&expired), &org, &patient, &app],
        )
        .await
        .unwrap();
        let mut st = state(pool.clone(), Codec::embedded().unwrap());
        st.connect = Some(connect::ConnectSettings {
            secrets: ohx_common::crypto::SecretBox::from_spec(
                "k:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                None,
            )
            .unwrap(),
            http: reqwest::Client::new(),
            public_url: "http://127.0.0.1:1".into(),
        });
        for state_value in ["never-issued", expired.as_str()] {
            let response = connect::callback(
                State(st.clone()),
                Path("withings".into()),
                Query(
                    serde_json::from_value(serde_json::json!({"code": "c", "state": state_value}))
                        .unwrap(),
                ),
                HeaderMap::new(),
            )
            .await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{state_value}");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                problem["title"], "Unknown, used or expired state",
                "{state_value}"
            );
        }
        // The patient declined at the provider: 400, with the provider's code only.
        let declined = || {
            Query(
                serde_json::from_value(serde_json::json!({"error": "access_denied <b>"})).unwrap(),
            )
        };
        // The patient's browser gets a page saying so, same status.
        let mut html = HeaderMap::new();
        html.insert(
            axum::http::header::ACCEPT,
            "text/html,application/xhtml+xml".parse().unwrap(),
        );
        let page =
            connect::callback(State(st.clone()), Path("withings".into()), declined(), html).await;
        assert_eq!(page.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            page.headers()[axum::http::header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let text = String::from_utf8(
            axum::body::to_bytes(page.into_body(), 1 << 16)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(
            text.contains("<h1>The authorization was not granted</h1>"),
            "{text}"
        );
        assert!(text.contains("href=\"/ui/\""), "{text}");
        let response = connect::callback(
            State(st),
            Path("withings".into()),
            declined(),
            HeaderMap::new(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["detail"], "the provider answered access_deniedb");
    }

    #[test]
    fn test_encode_failure_names_the_registry_only() {
        assert_eq!(
            encode_failure(&CodecError::Registry("down".into())),
            Some(Unavailable::SchemaRegistry)
        );
        assert_eq!(encode_failure(&CodecError::Avro("bad".into())), None);
    }

    #[test]
    fn test_sync_request_id_is_deterministic_per_notification() {
        let w = Some((1_000, 2_000));
        let a = sync_request_id("withings", "l1", "42", "appli=4", w);
        assert_eq!(a, sync_request_id("withings", "l1", "42", "appli=4", w));
        assert!(uuid::Uuid::parse_str(&a).is_ok());
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 8);
        for other in [
            sync_request_id("withings", "l2", "42", "appli=4", w),
            sync_request_id("withings", "l1", "43", "appli=4", w),
            sync_request_id("withings", "l1", "42", "appli=1", w),
            sync_request_id("withings", "l1", "42", "appli=4", Some((1_000, 2_001))),
            sync_request_id("withings", "l1", "42", "appli=4", Some((999, 2_000))),
            sync_request_id("omron", "l1", "42", "appli=4", w),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn test_token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
