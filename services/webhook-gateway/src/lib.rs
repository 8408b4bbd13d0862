//! Receives provider webhooks and emits sync requests once the broker has them.
//!
//! Withings notifications are unsigned form posts (`userid`, `appli`, `startdate`, `enddate`);
//! they are authenticated by a per-app secret token in the callback URL
//! (`/webhooks/withings?token=…`, stored as its SHA-256). A notification is answered 2xx only
//! after its SyncRequest is acknowledged by the broker (acks=all), 503 otherwise so that
//! Withings retries. Withings expects an answer within 2 s.

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use deadpool_postgres::Pool;
use ohx_common::admin::Problem;
use ohx_common::kafka::Producer;
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
    pub producer: Producer,
    /// How long to wait for the broker's acknowledgement before answering 503.
    pub ack_timeout: Duration,
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

fn unavailable(detail: impl Into<String>) -> Response {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
        .detail(detail)
        .into_response()
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
    let client = match state.pool.get().await {
        Ok(c) => c,
        Err(error) => {
            count("unavailable");
            tracing::error!(%error, "database unavailable");
            return unavailable("configuration database unavailable");
        }
    };
    let app = match client
        .query_opt("SELECT id FROM provider_apps WHERE provider = 'withings' AND webhook_token_sha256 = $1", &[&token_hash(&token)])
        .await
    {
        Ok(Some(row)) => row.get::<_, uuid::Uuid>(0),
        Ok(None) => {
            count("unauthorized");
            return Problem::new(StatusCode::UNAUTHORIZED, "Unknown webhook token").into_response();
        }
        Err(error) => {
            count("unavailable");
            tracing::error!(%error, "app lookup failed");
            return unavailable("configuration database unavailable");
        }
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
    if let Some(window) = notified.window
        && let Err(detail) = validate_window(window, received_at, state.max_window)
    {
        count("bad_request");
        tracing::info!(appli = notified.appli, "notification window refused");
        return Problem::new(StatusCode::BAD_REQUEST, "Notification window refused")
            .detail(detail)
            .into_response();
    }
    if notified.categories.is_empty() {
        count("ignored_category");
        tracing::info!(appli = notified.appli, "notification category not synced");
        return StatusCode::NO_CONTENT.into_response();
    }
    let rows = match client
        .query(
            "SELECT l.id, l.organization_id, l.patient_id, p.ehr_target_id, p.ehr_patient_reference, l.status \
             FROM provider_links l JOIN patients p ON p.id = l.patient_id \
             WHERE l.provider_app_id = $1 AND l.provider_user_id = $2",
            &[&app, &notified.userid],
        )
        .await
    {
        Ok(rows) => rows,
        Err(error) => {
            count("unavailable");
            tracing::error!(%error, "link lookup failed");
            return unavailable("configuration database unavailable");
        }
    };
    drop(client);
    if rows.is_empty() {
        count("unknown_user");
        tracing::info!("notification for an unknown user");
        return StatusCode::NO_CONTENT.into_response();
    }
    let mut sent = 0usize;
    for row in rows {
        let link_id: uuid::Uuid = row.get(0);
        let status: String = row.get(5);
        if status != "active" {
            count("link_inactive");
            tracing::info!(link_id = %link_id, status, "notification for an inactive link");
            continue;
        }
        let request = SyncRequest {
            context: Context {
                organization_id: row.get::<_, uuid::Uuid>(1).to_string(),
                ehr_target_id: row.get::<_, uuid::Uuid>(3).to_string(),
                patient_id: row.get::<_, uuid::Uuid>(2).to_string(),
                patient_reference: row.get(4),
                provider: "withings".into(),
                link_id: link_id.to_string(),
                provider_user_id: notified.userid.clone(),
                sync_request_id: uuid::Uuid::new_v4().to_string(),
                trigger: "WEBHOOK".into(),
                received_at,
            },
            categories: notified.categories.clone(),
            window_start: notified.window.map(|w| w.0),
            window_end: notified.window.map(|w| w.1),
            provider_event: Some(format!("appli={}", notified.appli)),
        };
        let send =
            state
                .producer
                .send_record(topic::SYNC_REQUESTS, &request.context.link_id, &request);
        match tokio::time::timeout(state.ack_timeout, send).await {
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
                count("unavailable");
                tracing::error!(%error, "broker did not acknowledge the sync request");
                return unavailable("the sync request could not be stored; retry");
            }
            Err(_) => {
                count("unavailable");
                tracing::error!("broker acknowledgement timed out");
                return unavailable("the sync request could not be stored in time; retry");
            }
        }
    }
    count(if sent > 0 { "accepted" } else { "ignored" });
    StatusCode::OK.into_response()
}

#[cfg(test)]
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

    #[test]
    fn test_token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
