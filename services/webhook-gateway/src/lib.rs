//! Receives provider webhooks and emits sync requests once the broker has them.
//!
//! Withings notifications are unsigned form posts (`userid`, `appli`, `startdate`, `enddate`);
//! they are authenticated by a per-app secret token in the callback URL
//! (`/webhooks/withings?token=…`, stored as its SHA-256). A notification is answered 2xx only
//! after its SyncRequest is acknowledged by the broker (acks=all), 503 otherwise so that
//! Withings retries. Withings expects an answer within 2 s.

pub mod lookup;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use deadpool_postgres::Pool;
use lookup::{LinkRow, LookupCache};
use ohx_common::admin::Problem;
use ohx_common::codec::CodecError;
use ohx_common::kafka::{OutRecord, Producer};
use ohx_common::records::{Context, SyncRequest, topic};
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

/// Returns the webhook routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/webhooks/withings",
            post(withings_webhook)
                .head(|| async { StatusCode::OK })
                .get(|| async { StatusCode::OK }),
        )
        .with_state(state)
}

/// The form fields of a Withings data notification.
#[derive(Debug, Clone, Deserialize)]
pub struct WithingsNotification {
    pub userid: String,
    pub appli: String,
    pub startdate: Option<String>,
    pub enddate: Option<String>,
    pub date: Option<String>,
    pub deviceid: Option<String>,
    pub action: Option<String>,
}

/// What a notification asks for, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Notified {
    pub userid: String,
    pub appli: i32,
    /// Data categories to fetch (empty: nothing to fetch for this category).
    pub categories: Vec<String>,
    /// Window in epoch ms, end exclusive.
    pub window: Option<(i64, i64)>,
}

/// Validates a notification and maps its `appli` to data categories.
pub fn interpret(n: &WithingsNotification) -> Result<Notified, String> {
    let userid = n.userid.trim();
    if userid.is_empty() || !userid.chars().all(|c| c.is_ascii_digit()) {
        return Err("userid must be a Withings user id (digits)".into());
    }
    let appli: i32 = n
        .appli
        .trim()
        .parse()
        .map_err(|_| "appli must be an integer".to_string())?;
    let categories: Vec<String> = match appli {
        1 => vec!["body_weight".into()],
        4 => vec!["blood_pressure".into()],
        16 => vec!["heart_rate".into()],
        _ => vec![],
    };
    let parse_ts = |name: &str, v: &Option<String>| -> Result<Option<i64>, String> {
        match v.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("{name} must be epoch seconds")),
        }
    };
    let start = parse_ts("startdate", &n.startdate)?;
    let end = parse_ts("enddate", &n.enddate)?;
    let window = match (start, end) {
        (Some(s), Some(e)) if s <= e && s >= 0 => Some((s * 1000, (e + 1) * 1000)),
        (Some(_), Some(_)) => return Err("startdate must not be after enddate".into()),
        (None, None) => None,
        _ => return Err("startdate and enddate come together".into()),
    };
    if !categories.is_empty() && window.is_none() {
        return Err("startdate and enddate are required for data notifications".into());
    }
    Ok(Notified {
        userid: userid.to_string(),
        appli,
        categories,
        window,
    })
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
    appli: i32,
    window: Option<(i64, i64)>,
) -> String {
    let (start, end) = window.map_or((String::new(), String::new()), |(s, e)| {
        (s.to_string(), e.to_string())
    });
    let digest = Sha256::digest(
        [provider, link_id, userid, &appli.to_string(), &start, &end]
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

fn count(outcome: &'static str) {
    WEBHOOKS.add(
        1,
        &[
            KeyValue::new("provider", "withings"),
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
}

impl Unavailable {
    /// The problem's title.
    pub fn title(self) -> &'static str {
        match self {
            Unavailable::Database => "Configuration database unavailable",
            Unavailable::SchemaRegistry => "Schema registry unavailable",
            Unavailable::Broker => "Broker unavailable",
        }
    }

    /// The label of `ohx_webhooks{outcome}`.
    pub fn outcome(self) -> &'static str {
        match self {
            Unavailable::Database => "unavailable_database",
            Unavailable::SchemaRegistry => "unavailable_schema_registry",
            Unavailable::Broker => "unavailable_broker",
        }
    }
}

/// Returns the 503 problem+json naming what failed.
pub fn unavailable(what: Unavailable, detail: impl Into<String>) -> Response {
    count(what.outcome());
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
async fn db_step<T, E: std::fmt::Display>(
    timeout: Duration,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Response> {
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(error)) => {
            tracing::error!(%error, step = what, "configuration database failed");
            Err(unavailable(
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
                Unavailable::Database,
                "the configuration database did not answer in time; retry",
            ))
        }
    }
}

/// The app a webhook token belongs to.
const APP_LOOKUP: &str =
    "SELECT id FROM provider_apps WHERE provider = 'withings' AND webhook_token_sha256 = $1";

/// The links (with patient and target) of a provider user under an app.
const LINK_LOOKUP: &str = "SELECT l.id, l.organization_id, l.patient_id, p.ehr_target_id, \
     p.ehr_patient_reference, l.status \
     FROM provider_links l JOIN patients p ON p.id = l.patient_id \
     WHERE l.provider_app_id = $1 AND l.provider_user_id = $2";

/// The app a webhook token (by its hash) belongs to, from the cache or the database.
async fn lookup_app(state: &AppState, hash: &str) -> Result<Option<uuid::Uuid>, Response> {
    if let Some(app) = state.lookups.lock().app(hash) {
        return Ok(app);
    }
    let epoch = state.lookups.lock().begin();
    let client = db_step(state.db_timeout, "connect", state.pool.get()).await?;
    // Statements are prepared once per pooled connection (deadpool's statement cache).
    let row = db_step(state.db_timeout, "app lookup", async {
        let statement = client.prepare_cached(APP_LOOKUP).await?;
        client.query_opt(&statement, &[&hash]).await
    })
    .await?;
    let app = row.map(|r| r.get::<_, uuid::Uuid>(0));
    state.lookups.lock().store_app(epoch, hash, app);
    Ok(app)
}

/// The links of a provider user under an app, from the cache or the database.
async fn lookup_links(
    state: &AppState,
    app: uuid::Uuid,
    user: &str,
) -> Result<Vec<LinkRow>, Response> {
    if let Some(rows) = state.lookups.lock().links(app, user) {
        return Ok(rows);
    }
    let epoch = state.lookups.lock().begin();
    let client = db_step(state.db_timeout, "connect", state.pool.get()).await?;
    let rows = db_step(state.db_timeout, "link lookup", async {
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

async fn withings_webhook(
    State(state): State<AppState>,
    Query(query): Query<TokenQuery>,
    form: Result<Form<WithingsNotification>, FormRejection>,
) -> Response {
    let received_at = chrono::Utc::now().timestamp_millis();
    let Some(token) = query.token.filter(|t| !t.is_empty()) else {
        count("unauthorized");
        return Problem::new(StatusCode::UNAUTHORIZED, "Missing webhook token")
            .detail("the callback URL must carry ?token=")
            .into_response();
    };
    let app = match lookup_app(&state, &token_hash(&token)).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            count("unauthorized");
            return Problem::new(StatusCode::UNAUTHORIZED, "Unknown webhook token").into_response();
        }
        Err(response) => return response,
    };
    let Form(notification) = match form {
        Ok(f) => f,
        Err(rejection) => {
            count("bad_request");
            return Problem::new(StatusCode::BAD_REQUEST, "Malformed notification")
                .detail(rejection.body_text())
                .into_response();
        }
    };
    let notified = match interpret(&notification) {
        Ok(n) => n,
        Err(detail) => {
            count("bad_request");
            return Problem::new(StatusCode::BAD_REQUEST, "Malformed notification")
                .detail(detail)
                .into_response();
        }
    };
    if notified.categories.is_empty() {
        count("ignored_category");
        tracing::info!(appli = notified.appli, "notification category not synced");
        return StatusCode::NO_CONTENT.into_response();
    }
    if let Some(window) = notified.window
        && let Err(detail) = validate_window(window, received_at, state.max_window)
    {
        count("bad_request");
        tracing::info!(appli = notified.appli, "notification window refused");
        return Problem::new(StatusCode::BAD_REQUEST, "Notification window refused")
            .detail(detail)
            .into_response();
    }
    let rows = match lookup_links(&state, app, &notified.userid).await {
        Ok(rows) => rows,
        Err(response) => return response,
    };
    if rows.is_empty() {
        count("unknown_user");
        tracing::info!("notification for an unknown user");
        return StatusCode::NO_CONTENT.into_response();
    }
    let mut sent = 0usize;
    for row in rows {
        let link_id = row.link_id;
        let status = row.status;
        if status != "active" {
            count("link_inactive");
            tracing::info!(link_id = %link_id, status, "notification for an inactive link");
            continue;
        }
        let request = SyncRequest {
            context: Context {
                organization_id: row.organization_id.to_string(),
                ehr_target_id: row.ehr_target_id.to_string(),
                patient_id: row.patient_id.to_string(),
                patient_reference: row.patient_reference,
                provider: "withings".into(),
                link_id: link_id.to_string(),
                provider_user_id: notified.userid.clone(),
                sync_request_id: sync_request_id(
                    "withings",
                    &link_id.to_string(),
                    &notified.userid,
                    notified.appli,
                    notified.window,
                ),
                trigger: "WEBHOOK".into(),
                received_at,
            },
            categories: notified.categories.clone(),
            window_start: notified.window.map(|w| w.0),
            window_end: notified.window.map(|w| w.1),
            provider_event: Some(format!("appli={}", notified.appli)),
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
                return match encode_failure(&error) {
                    Some(what) => {
                        tracing::error!(%error, link_id = %link_id, "schema registry failed");
                        unavailable(what, "the schema registry failed; retry")
                    }
                    None => {
                        count("error");
                        tracing::error!(%error, link_id = %link_id, "cannot encode the sync request");
                        Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Cannot encode the sync request",
                        )
                        .into_response()
                    }
                };
            }
            Err(_) => {
                tracing::error!(link_id = %link_id, "schema registry timed out");
                return unavailable(
                    Unavailable::SchemaRegistry,
                    "the schema registry did not answer in time; retry",
                );
            }
        };
        let record = OutRecord {
            topic: topic::SYNC_REQUESTS.to_string(),
            partition: None,
            key: Some(request.context.link_id.as_bytes().to_vec()),
            payload,
            headers: vec![],
        };
        let send = state.producer.send_all(std::slice::from_ref(&record));
        match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(())) => {
                sent += 1;
                SYNC_REQUESTS.add(
                    1,
                    &[
                        KeyValue::new("provider", "withings"),
                        KeyValue::new("trigger", "WEBHOOK"),
                    ],
                );
                tracing::info!(link_id = %link_id, sync_request_id = %request.context.sync_request_id, appli = notified.appli, "sync request emitted");
            }
            Ok(Err(error)) => {
                tracing::error!(%error, link_id = %link_id, "broker did not acknowledge the sync request");
                return unavailable(
                    Unavailable::Broker,
                    "the broker did not store the sync request; retry",
                );
            }
            Err(_) => {
                tracing::error!(link_id = %link_id, "broker acknowledgement timed out");
                // The send was cut short before the producer's own deadline: tell health.
                state.producer.note_unacknowledged(
                    "the broker did not acknowledge within the webhook deadline",
                );
                return unavailable(
                    Unavailable::Broker,
                    "the broker did not store the sync request in time; retry",
                );
            }
        }
    }
    count(if sent > 0 { "accepted" } else { "ignored" });
    StatusCode::OK.into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn n(userid: &str, appli: &str, s: Option<&str>, e: Option<&str>) -> WithingsNotification {
        WithingsNotification {
            userid: userid.into(),
            appli: appli.into(),
            startdate: s.map(Into::into),
            enddate: e.map(Into::into),
            date: None,
            deviceid: None,
            action: None,
        }
    }

    #[test]
    fn test_interpret_maps_appli_to_categories_and_window() {
        let x = interpret(&n("12345", "4", Some("1530576000"), Some("1530698753"))).unwrap();
        assert_eq!(x.categories, vec!["blood_pressure"]);
        assert_eq!(x.window, Some((1_530_576_000_000, 1_530_698_754_000)));
        assert_eq!(
            interpret(&n("1", "1", Some("0"), Some("0")))
                .unwrap()
                .categories,
            vec!["body_weight"]
        );
        assert_eq!(
            interpret(&n("1", "16", Some("0"), Some("10")))
                .unwrap()
                .categories,
            vec!["heart_rate"]
        );
        assert!(
            interpret(&n("1", "44", None, None))
                .unwrap()
                .categories
                .is_empty()
        );
    }

    #[test]
    fn test_interpret_rejects_malformed_fields() {
        assert!(interpret(&n("", "4", Some("1"), Some("2"))).is_err());
        assert!(interpret(&n("abc", "4", Some("1"), Some("2"))).is_err());
        assert!(interpret(&n("1", "four", Some("1"), Some("2"))).is_err());
        assert!(interpret(&n("1", "4", Some("x"), Some("2"))).is_err());
        assert!(interpret(&n("1", "4", Some("5"), Some("2"))).is_err());
        assert!(interpret(&n("1", "4", Some("5"), None)).is_err());
        assert!(interpret(&n("1", "4", None, None)).is_err());
    }

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
            pool,
            lookups: LookupCache::default(),
            producer,
            ack_timeout: Duration::from_millis(600),
            db_timeout: Duration::from_millis(300),
            max_window: Duration::from_secs(31 * 86_400),
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
        let response = withings_webhook(
            State(state),
            Query(TokenQuery {
                token: Some(token.into()),
            }),
            Ok(Form(n(
                userid,
                "4",
                Some(&start.to_string()),
                Some(&end.to_string()),
            ))),
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
    async fn seeded_pool() -> (Pool, String, String) {
        let url = "postgres://postgres@127.0.0.1:5432/ohx_gateway_test";
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
        let (pool, token, userid) = seeded_pool().await;
        let st = state(pool.clone(), Codec::embedded().unwrap());
        let listener = st.lookups.spawn_listener(
            "postgres://postgres@127.0.0.1:5432/ohx_gateway_test".into(),
            ohx_common::db::CONFIG_CHANGED_CHANNEL,
        );
        wait_until("the listener is up", || st.lookups.is_live()).await;
        let app = lookup_app(&st, &token_hash(&token)).await.unwrap().unwrap();
        let rows = lookup_links(&st, app, &userid).await.unwrap();
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
        let rows = lookup_links(&st, app, &userid).await.unwrap();
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
        lookup_links(&st, app, &userid).await.unwrap();
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'ohx_gateway_test' AND query LIKE 'LISTEN%'",
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
        let a = sync_request_id("withings", "l1", "42", 4, w);
        assert_eq!(a, sync_request_id("withings", "l1", "42", 4, w));
        assert!(uuid::Uuid::parse_str(&a).is_ok());
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 8);
        for other in [
            sync_request_id("withings", "l2", "42", 4, w),
            sync_request_id("withings", "l1", "43", 4, w),
            sync_request_id("withings", "l1", "42", 1, w),
            sync_request_id("withings", "l1", "42", 4, Some((1_000, 2_001))),
            sync_request_id("withings", "l1", "42", 4, Some((999, 2_000))),
            sync_request_id("omron", "l1", "42", 4, w),
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
