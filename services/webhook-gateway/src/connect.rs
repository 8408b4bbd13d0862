//! The end of the connect flow: the provider redirects the patient's browser to
//! `/oauth/{provider}/callback?code=…&state=…`. The state (from `ohx connect`, single use,
//! expiring, bound to an organization, a patient and a provider app) is consumed atomically;
//! the code is exchanged for tokens, which are stored sealed on the link; the link is
//! subscribed to every notification it needs; and an INITIAL sync request (the backfill,
//! `OHX_INITIAL_SYNC_DAYS` back, paced by the fetcher within the application's budget) is
//! stored in the broker before the patient sees "connected".

use crate::{AppState, Unavailable, db_step, token_hash, unavailable};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ohx_common::admin::Problem;
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::OutRecord;
use ohx_common::ratelimit::PgRateGate;
use ohx_common::records::{Context, SyncRequest, topic};
use ohx_providers::{Api, AppCredentials, NoRateGate, ProviderError};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::LazyLock;
use uuid::Uuid;

static PROVIDER_CALLS: LazyLock<opentelemetry::metrics::Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_provider_api_calls",
        "Provider API requests sent, by provider",
    )
});

/// What the callback needs beyond the webhook path.
#[derive(Clone)]
pub struct ConnectSettings {
    /// Opens the app's client secret and webhook token, seals the link's tokens.
    pub secrets: SecretBox,
    pub http: reqwest::Client,
    /// The gateway's public base URL (`OHX_PUBLIC_URL`): subscriptions point at
    /// `{public_url}/webhooks/{provider}?token=…`.
    pub public_url: String,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

/// The callback's query.
#[derive(Debug, Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    /// Set when the patient declined (OAuth2 error response).
    error: Option<String>,
}

const CONSUME_STATE: &str = "UPDATE oauth_states SET used_at = now() \
     WHERE state_sha256 = $1 AND used_at IS NULL AND expires_at > now() \
     RETURNING organization_id, patient_id, provider_app_id, redirect_uri, code_verifier";

const APP: &str = "SELECT provider, client_id, client_secret, api_base_url, webhook_token_sealed \
     FROM provider_apps WHERE id = $1";

const EXISTING_LINK: &str =
    "SELECT id FROM provider_links WHERE provider_app_id = $1 AND provider_user_id = $2";

const UPSERT_LINK: &str = "INSERT INTO provider_links (id, organization_id, patient_id, \
     provider_app_id, provider, provider_user_id, access_token, refresh_token, token_expires_at, \
     scopes, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
     now() + make_interval(secs => $9), $10, 'active') \
     ON CONFLICT (provider_app_id, provider_user_id) DO UPDATE SET organization_id = EXCLUDED.organization_id, \
     patient_id = EXCLUDED.patient_id, access_token = EXCLUDED.access_token, \
     refresh_token = EXCLUDED.refresh_token, token_expires_at = EXCLUDED.token_expires_at, \
     scopes = EXCLUDED.scopes, status = 'active', status_reason = NULL, updated_at = now() \
     WHERE provider_links.patient_id = EXCLUDED.patient_id \
     OR provider_links.status IN ('disabled', 'unlinked')";

const LINK_CONTEXT: &str =
    "SELECT p.ehr_target_id, p.ehr_patient_reference FROM patients p WHERE p.id = $1";

fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    Problem::new(status, title).detail(detail).into_response()
}

fn provider_failure(step: &str, e: &ProviderError) -> Response {
    let status = match e {
        ProviderError::GrantRevoked { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    problem(
        status,
        "The provider refused the connection",
        format!("{step}: {e}"),
    )
}

/// `GET /oauth/{provider}/callback`. The patient's browser (`Accept: text/html`) gets a
/// page saying how it went, with a link back to the configuration UI; other clients get
/// JSON (problem+json on failure).
pub async fn callback(
    state: State<AppState>,
    provider: Path<String>,
    q: Query<Callback>,
    headers: axum::http::HeaderMap,
) -> Response {
    let answer = finish(state, provider, q).await;
    let browser = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if browser {
        as_page(answer).await
    } else {
        answer
    }
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The callback's JSON answer as a page for the patient's browser, same status.
async fn as_page(answer: Response) -> Response {
    let status = answer.status();
    let body = axum::body::to_bytes(answer.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |k: &str| doc[k].as_str().map(escape).unwrap_or_default();
    let (title, message) = if status.is_success() {
        (
            format!("Connected to {}", text("provider")),
            "Your account is connected: your measurements will reach your care team. You can close this window.".to_owned(),
        )
    } else {
        (text("title"), text("detail"))
    };
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head>\
         <body><main><h1>{title}</h1><p>{message}</p>\
         <p><a href=\"/ui/\">Back to ohx</a></p></main></body></html>"
    );
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// The callback's work: consume the state, exchange the code, subscribe, store the link,
/// emit the INITIAL sync request.
async fn finish(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<Callback>,
) -> Response {
    let Some(adapter) = state.providers.get(&provider).cloned() else {
        return crate::unknown_provider(&provider);
    };
    let provider = adapter.name();
    let Some(settings) = state.connect.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "Connecting is not configured",
            "the gateway has no OHX_PUBLIC_URL",
        );
    };
    if let Some(error) = q.error {
        // The provider's error code only (e.g. access_denied), never free text.
        let code: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return problem(
            StatusCode::BAD_REQUEST,
            "The authorization was not granted",
            format!("the provider answered {code}"),
        );
    }
    let (Some(code), Some(oauth_state)) = (q.code, q.state) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Malformed callback",
            "code and state are required",
        );
    };
    let db = match db_step(provider, state.db_timeout, "connect", state.pool.get()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let hash = token_hash(&oauth_state);
    let consumed = match db_step(provider, state.db_timeout, "consume state", async {
        db.query_opt(CONSUME_STATE, &[&hash]).await
    })
    .await
    {
        Ok(Some(row)) => row,
        Ok(None) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Unknown, used or expired state",
                "start the connection again",
            );
        }
        Err(r) => return r,
    };
    let (org, patient, app_id, redirect_uri): (Uuid, Uuid, Uuid, String) = (
        consumed.get(0),
        consumed.get(1),
        consumed.get(2),
        consumed.get(3),
    );
    let sealed_verifier: Option<String> = consumed.get(4);
    let app = match db_step(provider, state.db_timeout, "app", async {
        db.query_one(APP, &[&app_id]).await
    })
    .await
    {
        Ok(row) => row,
        Err(r) => return r,
    };
    let app_provider: String = app.get(0);
    if app_provider != provider {
        return problem(
            StatusCode::BAD_REQUEST,
            "Callback of another provider",
            format!("the state belongs to a {app_provider} app"),
        );
    }
    let secrets = &settings.secrets;
    let opened = secrets
        .open_string(
            &app.get::<_, String>(2),
            &format!("provider_app:{app_id}:client_secret"),
        )
        .and_then(|secret| {
            let token = app
                .get::<_, Option<String>>(4)
                .map(|t| secrets.open_string(&t, &format!("provider_app:{app_id}:webhook_token")))
                .transpose()?;
            Ok((secret, token))
        });
    let (client_secret, webhook_token) = match opened {
        Ok((s, Some(t))) => (s, t),
        Ok((_, None)) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The provider app cannot be subscribed to",
                "the app has no stored webhook token (created before migration 0007): recreate it",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, app_id = %app_id, "cannot open the app's secrets");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot open the app's secrets",
                "check OHX_SECRET_KEYS",
            );
        }
    };
    let credentials = AppCredentials {
        client_id: app.get(1),
        client_secret,
    };
    let credentials_client_id = credentials.client_id.clone();
    let base = app
        .get::<_, Option<String>>(3)
        .unwrap_or_else(|| adapter.default_base_url().to_owned());
    // The provider's budget is shared with the fetchers (one GCRA row in PostgreSQL per
    // bucket): a burst of connections cannot push the application over its limit. A per-user
    // budget is taken from the user's bucket once the user is known (the exchange names them).
    let gate = |user: &str| -> Arc<dyn ohx_providers::RateGate> {
        let (bucket, per_minute) =
            adapter
                .rate_policy()
                .bucket(provider, &credentials_client_id, user);
        Arc::new(PgRateGate::new(
            state.pool.clone(),
            bucket,
            per_minute,
            PROVIDER_CALLS.clone(),
        ))
    };
    let per_user = matches!(
        adapter.rate_policy(),
        ohx_providers::RatePolicy::PerUser { .. }
    );
    let api = Api::new(
        settings.http.clone(),
        &base,
        if per_user {
            Arc::new(NoRateGate)
        } else {
            gate("")
        },
    );
    let code_verifier = match sealed_verifier
        .map(|v| secrets.open_string(&v, &format!("oauth_state:{hash}:code_verifier")))
        .transpose()
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, app_id = %app_id, "cannot open the PKCE verifier");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot open the PKCE verifier",
                "check OHX_SECRET_KEYS",
            );
        }
    };
    let connected = match adapter
        .exchange_code(
            &api,
            &credentials,
            &code,
            &redirect_uri,
            code_verifier.as_deref(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return provider_failure("code exchange", &e),
    };
    let user = connected.provider_user_id.clone();
    let link_id: Uuid = match db_step(provider, state.db_timeout, "link lookup", async {
        db.query_opt(EXISTING_LINK, &[&app_id, &user]).await
    })
    .await
    {
        Ok(row) => row.map_or_else(Uuid::new_v4, |r| r.get(0)),
        Err(r) => return r,
    };
    let tokens = &connected.tokens;
    let sealed = secrets
        .seal(
            tokens.access_token.as_bytes(),
            &format!("provider_link:{link_id}:access_token"),
        )
        .and_then(|a| {
            let r = tokens
                .refresh_token
                .as_ref()
                .map(|r| {
                    secrets.seal(
                        r.as_bytes(),
                        &format!("provider_link:{link_id}:refresh_token"),
                    )
                })
                .transpose()?;
            Ok((a, r))
        });
    let Ok((access, refresh)) = sealed else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Cannot seal the tokens",
            "check OHX_SECRET_KEYS",
        );
    };
    let stored = db_step(provider, state.db_timeout, "store link", async {
        db.execute(
            UPSERT_LINK,
            &[
                &link_id,
                &org,
                &patient,
                &app_id,
                &provider,
                &user,
                &access,
                &refresh,
                &(tokens.expires_in as f64),
                &tokens.scope,
            ],
        )
        .await
    })
    .await;
    match stored {
        Err(r) => return r,
        // The account is linked to another patient and that link is live: moving it would
        // send this account's data to a different chart. The other link must be
        // disconnected first (the upsert's WHERE refuses it atomically).
        Ok(0) => {
            tracing::warn!(link_id = %link_id, "the provider account is linked to another patient");
            return problem(
                StatusCode::CONFLICT,
                "This account is already connected to another patient",
                "disconnect the other patient's link first, then connect again",
            );
        }
        Ok(_) => {}
    }
    let callback_url = format!(
        "{}/webhooks/{provider}?token={webhook_token}",
        settings.public_url.trim_end_matches('/')
    );
    let api = if per_user {
        Api::new(settings.http.clone(), &base, gate(&user))
    } else {
        api
    };
    let subscriptions = match adapter
        .subscribe(&api, &tokens.access_token, &callback_url)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(link_id = %link_id, error = %e, "subscriptions failed: the link is stored, nightly reconciliation keeps it in sync");
            return provider_failure("subscriptions", &e);
        }
    };
    let target = match db_step(provider, state.db_timeout, "patient", async {
        db.query_one(LINK_CONTEXT, &[&patient]).await
    })
    .await
    {
        Ok(row) => row,
        Err(r) => return r,
    };
    let received_at = chrono::Utc::now().timestamp_millis();
    // One INITIAL request per connection: its id comes from the (single-use) state.
    let request_id = crate::sync_request_id(
        provider,
        &link_id.to_string(),
        &user,
        &format!("connect:{hash}"),
        None,
    );
    let request = SyncRequest {
        context: Context {
            organization_id: org.to_string(),
            ehr_target_id: target.get::<_, Uuid>(0).to_string(),
            patient_id: patient.to_string(),
            patient_reference: target.get(1),
            provider: provider.to_owned(),
            link_id: link_id.to_string(),
            provider_user_id: user.clone(),
            sync_request_id: request_id.clone(),
            trigger: "INITIAL".into(),
            received_at,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        },
        categories: Vec::new(),
        window_start: None,
        window_end: None,
        provider_event: Some("connect".into()),
    };
    let payload = match state
        .producer
        .codec()
        .encode(topic::SYNC_REQUESTS, &request)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the initial sync request");
            return unavailable(
                provider,
                Unavailable::SchemaRegistry,
                "the initial sync request could not be encoded; retry the connection",
            );
        }
    };
    // The initial backfill starts a trace of its own.
    let trace = ohx_common::trace::Trace::root();
    let record = OutRecord {
        topic: topic::SYNC_REQUESTS.to_string(),
        partition: None,
        key: Some(link_id.to_string().into_bytes()),
        payload,
        headers: vec![trace.header()],
    };
    if let Err(e) = state.producer.send_all(std::slice::from_ref(&record)).await {
        tracing::error!(error = %e, link_id = %link_id, "broker did not store the initial sync request");
        return unavailable(
            provider,
            Unavailable::Broker,
            "the initial sync request was not stored; the link is connected, run `ohx sync --trigger INITIAL`",
        );
    }
    tracing::info!(link_id = %link_id, subscriptions, trace_id = %trace.trace_id(), "link connected");
    (
        StatusCode::OK,
        Json(json!({
            "status": "connected",
            "link_id": link_id,
            "provider": provider,
            "subscriptions": subscriptions,
            "initial_sync_request_id": request_id,
        })),
    )
        .into_response()
}
