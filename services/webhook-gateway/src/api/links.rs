//! Provider apps (an organization's credentials at a provider), provider links (a patient's
//! connected account): the connect flow, manual syncs, disconnecting, and the sync runs the
//! fetcher recorded (statuses and counts, never values).

use super::ApiState;
use super::auth::{Caller, Role};
use super::patients::owned;
use super::problem::{ApiError, ApiPath, ApiQuery, FieldError, JsonBody};
use super::support::{
    Cursor, Page, PageParams, audit, check_base_url, check_name, idempotent, keyset_page, valid,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use deadpool_postgres::tokio_postgres::Row;
use ohx_common::records::{Context, SyncRequest, topic};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A provider app.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct App {
    pub id: Uuid,
    pub provider: String,
    pub client_id: String,
    /// The webhook path without its secret token (the token is shown once, at creation).
    pub webhook_path: String,
    pub api_base_url: Option<String>,
    pub authorize_base_url: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A provider app as created: with its webhook URL, token included, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedApp {
    #[serde(flatten)]
    pub app: App,
    /// The callback URL to register at the provider (when the gateway knows its public
    /// URL), with its secret token. Shown once.
    pub webhook_url: Option<String>,
    /// The secret token of the webhook URL. Shown once.
    pub webhook_token: String,
}

const APP_COLUMNS: &str = "id, provider, client_id, api_base_url, authorize_base_url, created_at";

fn app(row: &Row) -> (Cursor, App) {
    let provider: String = row.get(1);
    let a = App {
        id: row.get(0),
        webhook_path: format!("/webhooks/{provider}?token=…"),
        provider,
        client_id: row.get(2),
        api_base_url: row.get(3),
        authorize_base_url: row.get(4),
        created_at: row.get(5),
    };
    (
        Cursor {
            created_at: a.created_at,
            id: a.id,
        },
        a,
    )
}

/// A new provider app.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApp {
    /// `withings`, `google-health`, `omron` or `beurer`.
    pub provider: String,
    pub client_id: String,
    /// Write-only: sealed, never returned.
    #[schema(write_only)]
    pub client_secret: String,
    /// The provider's API (a regional cloud, a simulator); default: the provider's.
    pub api_base_url: Option<String>,
    /// The host of the provider's authorize page; default: the provider's.
    pub authorize_base_url: Option<String>,
}

/// Lists the organization's provider apps.
#[utoipa::path(get, path = "/api/v1/provider-apps", tag = "provider-apps", params(PageParams),
    responses((status = 200, body = Page<App>)))]
pub async fn apps(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<App>>, ApiError> {
    let org = caller.org()?;
    let select = format!("SELECT {APP_COLUMNS} FROM provider_apps WHERE organization_id = $1");
    let client = state.app.pool.get().await?;
    keyset_page(&client, &select, Some(org), &page, &[], |r| Ok(app(r)))
        .await
        .map(axum::Json)
}

/// Reads a provider app.
#[utoipa::path(get, path = "/api/v1/provider-apps/{id}", tag = "provider-apps",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = App), (status = 404, body = super::problem::ProblemDoc)))]
pub async fn app_get(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<App>, ApiError> {
    let org = caller.org()?;
    let row = state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            &format!(
                "SELECT {APP_COLUMNS} FROM provider_apps WHERE id = $1 AND organization_id = $2"
            ),
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(app(&row).1))
}

/// Adds a provider app (org admins). The answer carries the webhook URL with its secret
/// token, this once.
#[utoipa::path(post, path = "/api/v1/provider-apps", tag = "provider-apps",
    request_body = NewApp,
    responses((status = 201, body = CreatedApp), (status = 403, body = super::problem::ProblemDoc),
              (status = 409, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn create_app(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewApp>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    caller.require(Role::OrgAdmin)?;
    let mut errors = Vec::new();
    if state.app.providers.get(&body.provider).is_none() {
        errors.push(FieldError::new(
            "$.provider",
            format!("one of {:?}", state.app.providers.names()),
        ));
    }
    check_name("$.client_id", &body.client_id, &mut errors);
    if body.client_secret.is_empty() || body.client_secret.len() > 8192 {
        errors.push(FieldError::new("$.client_secret", "1 to 8192 characters"));
    }
    for (field, url) in [
        ("$.api_base_url", &body.api_base_url),
        ("$.authorize_base_url", &body.authorize_base_url),
    ] {
        if let Some(u) = url {
            check_base_url(field, u, state.local, &mut errors);
        }
    }
    valid(errors)?;
    let secrets = state.app.secrets.as_ref().ok_or_else(|| {
        ApiError::Unavailable("secrets cannot be stored: OHX_SECRET_KEYS is not set".into())
    })?;
    let id = Uuid::new_v4();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let seal = |text: &str, what: &str| {
        secrets
            .seal(text.as_bytes(), &format!("provider_app:{id}:{what}"))
            .map_err(|e| ApiError::Internal(e.to_string()))
    };
    let sealed_secret = seal(&body.client_secret, "client_secret")?;
    let sealed_token = seal(&token, "webhook_token")?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO provider_apps (id, organization_id, provider, client_id, \
                 client_secret, webhook_token_sha256, api_base_url, webhook_token_sealed, \
                 authorize_base_url) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 RETURNING {APP_COLUMNS}"
            ),
            &[
                &id,
                &org,
                &body.provider,
                &body.client_id,
                &sealed_secret,
                &crate::token_hash(&token),
                &body.api_base_url,
                &sealed_token,
                &body.authorize_base_url,
            ],
        )
        .await
        .map_err(|e| {
            if e.code()
                == Some(&deadpool_postgres::tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            {
                ApiError::Conflict("the organization already has an app of this provider".into())
            } else {
                e.into()
            }
        })?;
    audit(
        &tx,
        &caller,
        Some(org),
        "provider_app.create",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    let created = CreatedApp {
        webhook_url: state.app.connect.as_ref().map(|c| {
            format!(
                "{}/webhooks/{}?token={token}",
                c.public_url.trim_end_matches('/'),
                body.provider
            )
        }),
        webhook_token: token,
        app: app(&row).1,
    };
    Ok((StatusCode::CREATED, axum::Json(created)).into_response())
}

/// Link statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkStatus {
    Active,
    ReauthRequired,
    Disabled,
    Unlinked,
}

impl LinkStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::ReauthRequired => "reauth_required",
            Self::Disabled => "disabled",
            Self::Unlinked => "unlinked",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "active" => Self::Active,
            "reauth_required" => Self::ReauthRequired,
            "unlinked" => Self::Unlinked,
            _ => Self::Disabled,
        }
    }
}

/// A patient's connected provider account.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Link {
    pub id: Uuid,
    pub patient_id: Uuid,
    pub provider_app_id: Uuid,
    pub provider: String,
    pub status: LinkStatus,
    pub status_reason: Option<String>,
    pub last_synced_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

const LINK_COLUMNS: &str = "id, patient_id, provider_app_id, provider, status, status_reason, \
     last_synced_at, created_at, updated_at";

fn link(row: &Row) -> (Cursor, Link) {
    let l = Link {
        id: row.get(0),
        patient_id: row.get(1),
        provider_app_id: row.get(2),
        provider: row.get(3),
        status: LinkStatus::parse(row.get(4)),
        status_reason: row.get(5),
        last_synced_at: row.get(6),
        created_at: row.get(7),
        updated_at: row.get(8),
    };
    (
        Cursor {
            created_at: l.created_at,
            id: l.id,
        },
        l,
    )
}

/// Filters of the link list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LinkFilter {
    pub status: Option<LinkStatus>,
    pub patient_id: Option<Uuid>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// Lists the organization's links, by status or patient.
#[utoipa::path(get, path = "/api/v1/links", tag = "links", params(LinkFilter),
    responses((status = 200, body = Page<Link>)))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<LinkFilter>,
) -> Result<axum::Json<Page<Link>>, ApiError> {
    let org = caller.org()?;
    let page = PageParams {
        cursor: filter.cursor,
        limit: filter.limit,
    };
    let select = format!(
        "SELECT {LINK_COLUMNS} FROM provider_links WHERE organization_id = $1 \
         AND ($5::text IS NULL OR status = $5) AND ($6::uuid IS NULL OR patient_id = $6)"
    );
    let status = filter.status.map(LinkStatus::as_str);
    let client = state.app.pool.get().await?;
    keyset_page(
        &client,
        &select,
        Some(org),
        &page,
        &[&status, &filter.patient_id],
        |r| Ok(link(r)),
    )
    .await
    .map(axum::Json)
}

async fn owned_link(state: &ApiState, org: Uuid, id: Uuid) -> Result<Row, ApiError> {
    state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            &format!(
                "SELECT {LINK_COLUMNS} FROM provider_links WHERE id = $1 AND organization_id = $2"
            ),
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)
}

/// Reads a link.
#[utoipa::path(get, path = "/api/v1/links/{id}", tag = "links", params(("id" = Uuid, Path)),
    responses((status = 200, body = Link), (status = 404, body = super::problem::ProblemDoc)))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<Link>, ApiError> {
    let org = caller.org()?;
    Ok(axum::Json(link(&owned_link(&state, org, id).await?).1))
}

/// Starting a connection.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectInput {
    pub provider_app_id: Uuid,
    /// Seconds the patient has to authorize (60–3600, default 900).
    pub expires_in: Option<u32>,
}

/// Where to send the patient.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectStarted {
    /// The provider's consent page; the provider returns the patient to the gateway, which
    /// finishes the link.
    pub authorize_url: String,
    pub expires_in: u32,
}

/// Starts connecting a patient to a provider account (operators): returns the provider's
/// authorize URL for the patient's browser. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/api/v1/patients/{id}/connect", tag = "links",
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = ConnectInput,
    responses((status = 201, body = ConnectStarted),
              (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc),
              (status = 503, body = super::problem::ProblemDoc)))]
pub async fn connect(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(patient): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    owned(&state.app.pool.get().await?, org, patient).await?;
    caller.require(Role::Operator)?;
    let input: ConnectInput = super::problem::decode(&body)?;
    let expires_in = input.expires_in.unwrap_or(900);
    if !(60..=3600).contains(&expires_in) {
        return Err(ApiError::field(
            "$.expires_in",
            "between 60 and 3600 seconds",
        ));
    }
    let connect = state.app.connect.clone().ok_or_else(|| {
        ApiError::Unavailable("the connect flow needs OHX_PUBLIC_URL on the gateway".into())
    })?;
    let request = [patient.as_bytes().as_slice(), &body].concat();
    idempotent(&state.app.pool, &caller, &headers, &request, || async {
        let url = fetcher::links::start_connect(
            &state.app.pool,
            &connect.secrets,
            &state.app.providers,
            &connect.public_url,
            fetcher::links::ConnectRequest {
                org: Some(org),
                patient,
                app: input.provider_app_id,
                expires_in_s: expires_in,
            },
        )
        .await
        .map_err(|e| ApiError::Internal(format!("{e:#}")))?
        .ok_or_else(|| {
            ApiError::field(
                "$.provider_app_id",
                "no provider app with this id in the organization",
            )
        })?;
        audit(
            &state.app.pool.get().await?,
            &caller,
            Some(org),
            "link.connect_start",
            &format!("{patient}/{}", input.provider_app_id),
        )
        .await?;
        let started = ConnectStarted {
            authorize_url: url,
            expires_in,
        };
        Ok((
            StatusCode::CREATED,
            serde_json::to_value(started).map_err(|e| ApiError::Internal(e.to_string()))?,
        ))
    })
    .await
}

/// A manual sync of a time range.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncInput {
    /// Start of the range (inclusive).
    pub from: chrono::DateTime<chrono::Utc>,
    /// End of the range (exclusive); at most 10 minutes ahead of now.
    pub to: chrono::DateTime<chrono::Utc>,
    /// Data categories of the link's provider; empty or absent: all of them.
    #[serde(default)]
    pub categories: Vec<String>,
}

/// A sync request handed to the fetcher.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncStarted {
    /// The id of the run (see `GET /api/v1/sync-runs?link_id=`).
    pub sync_request_id: String,
}

/// Longest range of a manual sync.
pub const MAX_SYNC_DAYS: i64 = 90;

/// Checks a manual sync's range and categories against the provider's. Pure.
pub fn check_sync(
    input: &SyncInput,
    categories: &[String],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if input.to <= input.from {
        errors.push(FieldError::new("$.to", "must be after from"));
    } else if input.to - input.from > chrono::Duration::days(MAX_SYNC_DAYS) {
        errors.push(FieldError::new(
            "$.to",
            format!("a range of at most {MAX_SYNC_DAYS} days"),
        ));
    }
    if input.to > now + chrono::Duration::milliseconds(crate::MAX_FUTURE_SKEW_MS) {
        errors.push(FieldError::new("$.to", "must not be in the future"));
    }
    for (i, c) in input.categories.iter().enumerate() {
        if !categories.contains(c) {
            errors.push(FieldError::new(
                format!("$.categories[{i}]"),
                format!("one of {categories:?}"),
            ));
        }
    }
    errors
}

/// Fetches a link's data for a time range (operators): the sync request is answered only
/// once the broker has it. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/api/v1/links/{id}/sync", tag = "links",
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = SyncInput,
    responses((status = 202, body = SyncStarted),
              (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 409, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc),
              (status = 503, body = super::problem::ProblemDoc)))]
pub async fn sync(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    let row = state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            "SELECT l.patient_id, p.ehr_target_id, p.ehr_patient_reference, l.provider, \
             l.provider_user_id, l.status FROM provider_links l \
             JOIN patients p ON p.id = l.patient_id WHERE l.id = $1 AND l.organization_id = $2",
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    caller.require(Role::Operator)?;
    let input: SyncInput = super::problem::decode(&body)?;
    let provider: String = row.get(3);
    let categories = state
        .app
        .providers
        .get(&provider)
        .map(|p| p.categories())
        .unwrap_or_default();
    valid(check_sync(&input, &categories, chrono::Utc::now()))?;
    if row.get::<_, &str>(5) != "active" {
        return Err(ApiError::Conflict(format!(
            "the link is {}: only an active link syncs",
            row.get::<_, &str>(5)
        )));
    }
    let request = [id.as_bytes().as_slice(), &body].concat();
    idempotent(&state.app.pool, &caller, &headers, &request, || async {
        let now = chrono::Utc::now().timestamp_millis();
        let sync_request_id = Uuid::new_v4().to_string();
        let request = SyncRequest {
            context: Context {
                organization_id: org.to_string(),
                ehr_target_id: row.get::<_, Uuid>(1).to_string(),
                patient_id: row.get::<_, Uuid>(0).to_string(),
                patient_reference: row.get(2),
                provider: provider.clone(),
                link_id: id.to_string(),
                provider_user_id: row.get(4),
                sync_request_id: sync_request_id.clone(),
                trigger: "MANUAL".into(),
                received_at: now,
                fhir_version: ohx_common::records::FHIR_R5.into(),
                deliveries: Vec::new(),
            },
            categories: input.categories.clone(),
            window_start: Some(input.from.timestamp_millis()),
            window_end: Some(input.to.timestamp_millis()),
            provider_event: None,
        };
        tokio::time::timeout(
            state.app.ack_timeout,
            state.app.producer.send_record(
                topic::SYNC_REQUESTS,
                &request.context.link_id,
                &request,
            ),
        )
        .await
        .map_err(|_| ApiError::Unavailable("the broker did not acknowledge in time".into()))?
        .map_err(|e| ApiError::Unavailable(format!("the broker refused the request: {e}")))?;
        audit(
            &state.app.pool.get().await?,
            &caller,
            Some(org),
            "link.sync",
            &format!("{id}/{sync_request_id}"),
        )
        .await?;
        Ok((
            StatusCode::ACCEPTED,
            serde_json::json!({ "sync_request_id": sync_request_id }),
        ))
    })
    .await
}

/// The outcome of a disconnect.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Disconnected {
    pub link: Link,
    /// Provider subscriptions revoked.
    pub subscriptions_revoked: usize,
}

/// Disconnects a link (operators): its provider subscriptions are revoked and it syncs no
/// more until the patient connects again.
#[utoipa::path(post, path = "/api/v1/links/{id}/disconnect", tag = "links",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Disconnected),
              (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 502, body = super::problem::ProblemDoc)))]
pub async fn disconnect(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<Disconnected>, ApiError> {
    let org = caller.org()?;
    owned_link(&state, org, id).await?;
    caller.require(Role::Operator)?;
    let connect = state.app.connect.clone().ok_or_else(|| {
        ApiError::Unavailable("disconnecting needs OHX_PUBLIC_URL on the gateway".into())
    })?;
    let store = fetcher::store::Store::new(state.app.pool.clone(), connect.secrets.clone());
    let revoked = fetcher::links::disconnect(
        &store,
        &connect.secrets,
        &state.app.providers,
        &connect.http,
        &connect.public_url,
        id,
    )
    .await
    .map_err(|e| ApiError::BadGateway(format!("the provider refused: {e:#}")))?;
    audit(
        &state.app.pool.get().await?,
        &caller,
        Some(org),
        "link.disconnect",
        &id.to_string(),
    )
    .await?;
    Ok(axum::Json(Disconnected {
        link: link(&owned_link(&state, org, id).await?).1,
        subscriptions_revoked: revoked,
    }))
}

/// A sync run as the fetcher recorded it: ids, window, status, counts. Never values.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SyncRun {
    pub sync_request_id: String,
    pub link_id: Uuid,
    pub trigger: String,
    pub window_start: Option<chrono::DateTime<chrono::Utc>>,
    pub window_end: Option<chrono::DateTime<chrono::Utc>>,
    pub status: String,
    pub api_calls: i32,
    pub measurements: i32,
    pub attempts: i32,
    /// What was received and not turned into measurements, counted by reason.
    #[schema(value_type = Object)]
    pub skipped: serde_json::Value,
    pub error: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Filters of the sync-run list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    pub link_id: Option<Uuid>,
    pub status: Option<String>,
    /// Page size (1–200, default 50); runs come newest first.
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Lists the organization's sync runs, newest first.
#[utoipa::path(get, path = "/api/v1/sync-runs", tag = "links", params(RunFilter),
    responses((status = 200, body = Page<SyncRun>)))]
pub async fn runs(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<RunFilter>,
) -> Result<axum::Json<Page<SyncRun>>, ApiError> {
    let org = caller.org()?;
    let (limit, cursor) = PageParams {
        cursor: filter.cursor,
        limit: filter.limit,
    }
    .checked()?;
    // Runs are keyed by text ids: the cursor's id part is the run's UUID when it is one,
    // and pages go by (started_at DESC, sync_request_id DESC).
    let rows = state
        .app
        .pool
        .get()
        .await?
        .query(
            "SELECT r.sync_request_id, r.link_id, r.trigger, r.window_start, r.window_end, \
             r.status, r.api_calls, r.measurements, r.attempts, r.skipped, r.error, \
             r.started_at, r.finished_at FROM sync_runs r \
             JOIN provider_links l ON l.id = r.link_id WHERE l.organization_id = $1 \
             AND ($2::uuid IS NULL OR r.link_id = $2) AND ($3::text IS NULL OR r.status = $3) \
             AND ($4::timestamptz IS NULL OR (r.started_at, r.sync_request_id) < ($4, $5)) \
             ORDER BY r.started_at DESC, r.sync_request_id DESC LIMIT $6",
            &[
                &org,
                &filter.link_id,
                &filter.status,
                &cursor.map(|c| c.created_at),
                &cursor.map(|c| c.id.to_string()).unwrap_or_default(),
                &(limit + 1),
            ],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            let run = SyncRun {
                sync_request_id: r.get(0),
                link_id: r.get(1),
                trigger: r.get(2),
                window_start: r.get(3),
                window_end: r.get(4),
                status: r.get(5),
                api_calls: r.get(6),
                measurements: r.get(7),
                attempts: r.get(8),
                skipped: r.get(9),
                error: r.get(10),
                started_at: r.get(11),
                finished_at: r.get(12),
            };
            (
                Cursor {
                    created_at: run.started_at,
                    id: Uuid::parse_str(&run.sync_request_id).unwrap_or_default(),
                },
                run,
            )
        })
        .collect();
    Ok(axum::Json(Page::of(items, limit)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn input(from_h: i64, to_h: i64, categories: &[&str]) -> SyncInput {
        let base = chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        SyncInput {
            from: base + chrono::Duration::hours(from_h),
            to: base + chrono::Duration::hours(to_h),
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn fields(i: &SyncInput) -> Vec<String> {
        let now = chrono::Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap();
        check_sync(i, &["body".into(), "ecg".into()], now)
            .into_iter()
            .map(|f| f.field)
            .collect()
    }

    #[test]
    fn test_a_sync_range_must_be_ordered_bounded_and_not_in_the_future() {
        assert!(fields(&input(0, 24, &["body"])).is_empty());
        assert_eq!(fields(&input(24, 0, &[])), ["$.to"]);
        assert_eq!(fields(&input(0, 24 * 91, &[])), ["$.to", "$.to"]);
        assert_eq!(fields(&input(24 * 28, 24 * 30, &[])), ["$.to"]);
    }

    #[test]
    fn test_unknown_categories_are_named_by_index() {
        assert_eq!(
            fields(&input(0, 1, &["body", "sleep", "ecg"])),
            ["$.categories[1]"]
        );
    }
}
