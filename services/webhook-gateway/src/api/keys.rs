//! API keys (org-scoped machine credentials: shown once, stored hashed, expiring, revocable)
//! and the audit log.

use super::ApiState;
use super::auth::{Caller, Role, new_api_key};
use super::problem::{ApiError, ApiPath, ApiQuery, FieldError, JsonBody};
use super::support::{Cursor, Page, PageParams, audit, check_name, keyset_page, valid};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use deadpool_postgres::tokio_postgres::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest life of an API key, in days.
pub const MAX_KEY_DAYS: u32 = 365;

/// An API key (never the key itself after creation).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// The key's first characters, to recognize it.
    pub prefix: String,
    pub created_by: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A key as created: the key itself, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub api_key: ApiKey,
    /// Send as `Authorization: Bearer <key>`. Shown once: only its hash is kept.
    pub key: String,
}

const COLUMNS: &str =
    "id, name, role, prefix, created_by, created_at, expires_at, revoked_at, last_used_at";

fn api_key(row: &Row) -> Result<(Cursor, ApiKey), ApiError> {
    let role: String = row.get(2);
    let k = ApiKey {
        id: row.get(0),
        name: row.get(1),
        role: Role::parse(&role)
            .ok_or_else(|| ApiError::Internal(format!("stored API key role {role:?}")))?,
        prefix: row.get(3),
        created_by: row.get(4),
        created_at: row.get(5),
        expires_at: row.get(6),
        revoked_at: row.get(7),
        last_used_at: row.get(8),
    };
    Ok((
        Cursor {
            created_at: k.created_at,
            id: k.id,
        },
        k,
    ))
}

/// A new API key.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    /// `org_admin`, `operator` or `viewer`.
    pub role: Role,
    /// Days until it expires (1–365, default 90).
    pub expires_in_days: Option<u32>,
    /// The organization (platform admins only; others: their own).
    pub organization_id: Option<Uuid>,
}

/// Lists the organization's API keys (org admins).
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "api-keys", params(PageParams),
    responses((status = 200, body = Page<ApiKey>), (status = 403, body = super::problem::ProblemDoc)))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<ApiKey>>, ApiError> {
    let org = caller.org()?;
    caller.require(Role::OrgAdmin)?;
    let select = format!("SELECT {COLUMNS} FROM api_keys WHERE organization_id = $1");
    let client = state.app.pool.get().await?;
    keyset_page(&client, &select, Some(org), &page, &[], api_key)
        .await
        .map(axum::Json)
}

/// Creates an API key (org admins for their organization; platform admins for any). The
/// answer carries the key, this once.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "api-keys", request_body = NewKey,
    responses((status = 201, body = CreatedKey), (status = 403, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<Response, ApiError> {
    caller.require(Role::OrgAdmin)?;
    let org = match (caller.role, body.organization_id) {
        (Role::PlatformAdmin, Some(o)) => o,
        (_, None) => caller.org()?,
        (_, Some(o)) if Some(o) == caller.org => o,
        (_, Some(_)) => {
            return Err(ApiError::field(
                "$.organization_id",
                "only platform admins name another organization",
            ));
        }
    };
    let mut errors = Vec::new();
    check_name("$.name", &body.name, &mut errors);
    if body.role == Role::PlatformAdmin {
        errors.push(FieldError::new(
            "$.role",
            "API keys belong to an organization: org_admin, operator or viewer",
        ));
    }
    let days = body.expires_in_days.unwrap_or(90);
    if !(1..=MAX_KEY_DAYS).contains(&days) {
        errors.push(FieldError::new(
            "$.expires_in_days",
            format!("between 1 and {MAX_KEY_DAYS}"),
        ));
    }
    valid(errors)?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    if tx
        .query_opt("SELECT 1 FROM organizations WHERE id = $1", &[&org])
        .await?
        .is_none()
    {
        return Err(ApiError::field("$.organization_id", "no such organization"));
    }
    let (key, hash, prefix) = new_api_key();
    let id = Uuid::new_v4();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO api_keys (id, organization_id, name, role, key_sha256, prefix, \
                 created_by, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(days => $8)) \
                 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &org,
                &body.name.trim(),
                &body.role.as_str(),
                &hash,
                &prefix,
                &caller.actor,
                &i32::try_from(days).unwrap_or(90),
            ],
        )
        .await?;
    audit(&tx, &caller, Some(org), "api_key.create", &id.to_string()).await?;
    tx.commit().await?;
    let (_, api_key) = api_key(&row)?;
    Ok((StatusCode::CREATED, axum::Json(CreatedKey { api_key, key })).into_response())
}

/// Revokes an API key (org admins): it is refused from now on.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = ApiKey), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc)))]
pub async fn revoke(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<ApiKey>, ApiError> {
    let org = caller.org()?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    tx.query_opt(
        "SELECT 1 FROM api_keys WHERE id = $1 AND organization_id = $2",
        &[&id, &org],
    )
    .await?
    .ok_or(ApiError::NotFound)?;
    caller.require(Role::OrgAdmin)?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 \
                 RETURNING {COLUMNS}"
            ),
            &[&id],
        )
        .await?;
    audit(&tx, &caller, Some(org), "api_key.revoke", &id.to_string()).await?;
    tx.commit().await?;
    Ok(axum::Json(api_key(&row)?.1))
}

/// One audited write.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub source: Option<String>,
    pub request_id: Option<String>,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Page parameters of the audit log (newest first).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Entries older than this id (the `next_cursor` of the previous page).
    pub cursor: Option<String>,
    pub limit: Option<u32>,
    pub action: Option<String>,
}

/// The organization's audit log, newest first (org admins).
#[utoipa::path(get, path = "/api/v1/audit-log", tag = "audit", params(AuditParams),
    responses((status = 200, body = Page<AuditEntry>),
              (status = 403, body = super::problem::ProblemDoc)))]
pub async fn audit_log(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<axum::Json<Page<AuditEntry>>, ApiError> {
    let org = caller.org()?;
    caller.require(Role::OrgAdmin)?;
    let limit = i64::from(params.limit.unwrap_or(50));
    if !(1..=i64::from(super::support::MAX_LIMIT)).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 200"));
    }
    let before: Option<i64> = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::field("cursor", "not a cursor of this list"))
        })
        .transpose()?;
    let rows = state
        .app
        .pool
        .get()
        .await?
        .query(
            "SELECT id, actor, action, subject, source, request_id, at FROM audit_log \
             WHERE organization_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             AND ($3::text IS NULL OR action = $3) ORDER BY id DESC LIMIT $4",
            &[&org, &before, &params.action, &(limit + 1)],
        )
        .await?;
    let items: Vec<AuditEntry> = rows
        .iter()
        .map(|r| AuditEntry {
            id: r.get(0),
            actor: r.get(1),
            action: r.get(2),
            subject: r.get(3),
            source: r.get(4),
            request_id: r.get(5),
            at: r.get(6),
        })
        .collect();
    Ok(axum::Json(Page::trimmed(items, limit, |e| {
        e.id.to_string()
    })))
}
