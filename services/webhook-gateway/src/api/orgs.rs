//! Organizations and their policies (enabled data types, consent requirement, aggregation per
//! data type). Platform admins create and see every organization; everyone else sees only
//! their own, and its org admins edit its policy.

use super::ApiState;
use super::auth::{Caller, Role};
use super::problem::{ApiError, ApiPath, ApiQuery, JsonBody};
use super::support::{
    Cursor, Page, PageParams, audit, check_name, check_policy, if_match, keyset_page, valid,
    with_etag,
};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use deadpool_postgres::tokio_postgres::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An organization.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    /// What ohx may fetch and how (`ohx_providers::policy::PolicyDoc`).
    #[schema(value_type = Object)]
    pub policy: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The ETag of this revision (also in the `ETag` header).
    pub revision: i64,
}

const COLUMNS: &str = "id, name, policy, created_at, revision";

fn organization(row: &Row) -> (Cursor, Organization) {
    let o = Organization {
        id: row.get(0),
        name: row.get(1),
        policy: row.get(2),
        created_at: row.get(3),
        revision: row.get(4),
    };
    (
        Cursor {
            created_at: o.created_at,
            id: o.id,
        },
        o,
    )
}

/// A new organization.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrganization {
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<serde_json::Value>,
}

/// Changes to an organization (absent fields stay).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrganizationChanges {
    pub name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub policy: Option<serde_json::Value>,
}

/// Whether the caller may see this organization: platform admins see all, others their own.
fn visible(caller: &Caller, org: Uuid) -> Result<(), ApiError> {
    if caller.role == Role::PlatformAdmin || caller.org == Some(org) {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}

/// Lists organizations: every one for a platform admin, else the caller's own.
#[utoipa::path(get, path = "/api/v1/organizations", tag = "organizations",
    params(PageParams),
    responses((status = 200, body = Page<Organization>),
              (status = 401, body = super::problem::ProblemDoc)))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<Organization>>, ApiError> {
    let only = (caller.role != Role::PlatformAdmin)
        .then_some(caller.org)
        .flatten();
    let select = format!("SELECT {COLUMNS} FROM organizations WHERE ($1::uuid IS NULL OR id = $1)");
    let client = state.app.pool.get().await?;
    keyset_page(&client, &select, only, &page, &[], |r| Ok(organization(r)))
        .await
        .map(axum::Json)
}

/// Creates an organization (platform admins).
#[utoipa::path(post, path = "/api/v1/organizations", tag = "organizations",
    request_body = NewOrganization,
    responses((status = 201, body = Organization),
              (status = 403, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewOrganization>,
) -> Result<Response, ApiError> {
    caller.require(Role::PlatformAdmin)?;
    let mut errors = Vec::new();
    check_name("$.name", &body.name, &mut errors);
    check_policy(body.policy.as_ref(), &mut errors);
    valid(errors)?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let id = Uuid::new_v4();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO organizations (id, name, policy) VALUES ($1, $2, $3) \
                 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &body.name.trim(),
                &body.policy.unwrap_or_else(|| serde_json::json!({})),
            ],
        )
        .await?;
    audit(
        &tx,
        &caller,
        Some(id),
        "organization.create",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    let (_, o) = organization(&row);
    Ok(with_etag(StatusCode::CREATED, o.revision, o))
}

/// Reads an organization.
#[utoipa::path(get, path = "/api/v1/organizations/{id}", tag = "organizations",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Organization, headers(("ETag" = String))),
              (status = 404, body = super::problem::ProblemDoc)))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    visible(&caller, id)?;
    let row = state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            &format!("SELECT {COLUMNS} FROM organizations WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    let (_, o) = organization(&row);
    Ok(with_etag(StatusCode::OK, o.revision, o))
}

/// Changes an organization's name or policy (its org admins, platform admins); needs
/// `If-Match`.
#[utoipa::path(patch, path = "/api/v1/organizations/{id}", tag = "organizations",
    params(("id" = Uuid, Path), ("If-Match" = String, Header)),
    request_body = OrganizationChanges,
    responses((status = 200, body = Organization),
              (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 412, body = super::problem::ProblemDoc),
              (status = 428, body = super::problem::ProblemDoc)))]
pub async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<OrganizationChanges>,
) -> Result<Response, ApiError> {
    visible(&caller, id)?;
    caller.require(Role::OrgAdmin)?;
    let expected = if_match(&headers)?;
    let mut errors = Vec::new();
    if let Some(name) = &body.name {
        check_name("$.name", name, &mut errors);
    }
    check_policy(body.policy.as_ref(), &mut errors);
    valid(errors)?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE organizations SET name = COALESCE($2, name), \
                 policy = COALESCE($3, policy), revision = revision + 1 \
                 WHERE id = $1 AND ($4::bigint IS NULL OR revision = $4) RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &body.name.as_deref().map(str::trim),
                &body.policy,
                &expected,
            ],
        )
        .await?;
    let Some(row) = row else {
        let exists = tx
            .query_opt("SELECT 1 FROM organizations WHERE id = $1", &[&id])
            .await?;
        return Err(if exists.is_some() {
            ApiError::PreconditionFailed
        } else {
            ApiError::NotFound
        });
    };
    audit(
        &tx,
        &caller,
        Some(id),
        "organization.update",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    let (_, o) = organization(&row);
    Ok(with_etag(StatusCode::OK, o.revision, o))
}
