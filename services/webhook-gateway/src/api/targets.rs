//! EHR targets: where an organization's FHIR resources are delivered. Secrets (a bearer
//! token or a client secret) are write-only: sealed on the way in, never returned — an
//! answer says only whether one is set.

use super::ApiState;
use super::auth::{Caller, Role};
use super::problem::{ApiError, ApiPath, ApiQuery, FieldError, JsonBody};
use super::support::{
    Cursor, Page, PageParams, audit, check_base_url, check_name, if_match, keyset_page, valid,
    with_etag,
};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use deadpool_postgres::tokio_postgres::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How ohx authenticates to the EHR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    None,
    Bearer,
    ClientCredentials,
    SmartBackend,
}

impl AuthKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Bearer => "bearer",
            Self::ClientCredentials => "client_credentials",
            Self::SmartBackend => "smart_backend",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "bearer" => Self::Bearer,
            "client_credentials" => Self::ClientCredentials,
            "smart_backend" => Self::SmartBackend,
            _ => Self::None,
        }
    }

    /// Whether the kind needs a stored secret (a bearer token, a client secret). SMART
    /// Backend Services signs with the target's keys instead.
    fn needs_secret(self) -> bool {
        matches!(self, Self::Bearer | Self::ClientCredentials)
    }

    fn is_oauth(self) -> bool {
        matches!(self, Self::ClientCredentials | Self::SmartBackend)
    }
}

/// How a client secret is sent to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    Basic,
    Post,
}

/// The authentication of a target as written: `secret` is write-only.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthInput {
    pub kind: AuthKind,
    pub client_id: Option<String>,
    /// The token endpoint (client_credentials; SMART targets discover it when absent).
    pub token_url: Option<String>,
    /// Space-separated scopes (default: what ohx writes, in the server's SMART version).
    pub scope: Option<String>,
    pub client_auth: Option<ClientAuth>,
    /// A bearer token or a client secret. Write-only: never returned.
    #[schema(write_only)]
    pub secret: Option<String>,
}

/// The authentication of a target as read.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuthView {
    pub kind: AuthKind,
    pub client_id: Option<String>,
    pub token_url: Option<String>,
    pub scope: Option<String>,
    pub client_auth: Option<ClientAuth>,
    /// Whether a secret is stored (the secret itself is never returned).
    pub secret_set: bool,
}

/// The FHIR version a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum FhirVersion {
    R4,
    R5,
}

/// How resources are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpsertMode {
    /// `PUT {type}/{id}` with ohx's ids.
    Put,
    /// `PUT {type}?identifier=…`: the server assigns ids.
    Conditional,
}

/// An EHR target.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Target {
    pub id: Uuid,
    pub name: String,
    pub base_url: String,
    pub fhir_version: FhirVersion,
    pub upsert_mode: UpsertMode,
    pub auth: AuthView,
    /// The JWKS the EHR registers for a SMART Backend Services target (on this gateway).
    pub jwks_path: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revision: i64,
}

const COLUMNS: &str = "id, name, base_url, fhir_version, upsert_mode, auth_kind, \
     auth_settings, auth_secret IS NOT NULL, created_at, revision";

fn target(row: &Row) -> (Cursor, Target) {
    let settings: serde_json::Value = row.get(6);
    let text = |k: &str| settings.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let kind = AuthKind::parse(row.get(5));
    let id: Uuid = row.get(0);
    let t = Target {
        id,
        name: row.get(1),
        base_url: row.get(2),
        fhir_version: if row.get::<_, &str>(3) == "R4" {
            FhirVersion::R4
        } else {
            FhirVersion::R5
        },
        upsert_mode: if row.get::<_, &str>(4) == "conditional" {
            UpsertMode::Conditional
        } else {
            UpsertMode::Put
        },
        auth: AuthView {
            kind,
            client_id: text("client_id"),
            token_url: text("token_url"),
            scope: text("scope"),
            client_auth: match text("client_auth").as_deref() {
                Some("post") => Some(ClientAuth::Post),
                Some("basic") => Some(ClientAuth::Basic),
                _ => None,
            },
            secret_set: row.get(7),
        },
        jwks_path: (kind == AuthKind::SmartBackend).then(|| format!("/ehr-targets/{id}/jwks.json")),
        created_at: row.get(8),
        revision: row.get(9),
    };
    (
        Cursor {
            created_at: t.created_at,
            id: t.id,
        },
        t,
    )
}

/// A new EHR target.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTarget {
    pub name: String,
    pub base_url: String,
    #[serde(default = "r5")]
    pub fhir_version: FhirVersion,
    #[serde(default = "put")]
    pub upsert_mode: UpsertMode,
    pub auth: AuthInput,
}

fn r5() -> FhirVersion {
    FhirVersion::R5
}

fn put() -> UpsertMode {
    UpsertMode::Put
}

/// Changes to a target (absent fields stay; `auth` replaces the authentication, keeping
/// the stored secret unless a new one is given).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetChanges {
    pub name: Option<String>,
    pub base_url: Option<String>,
    pub fhir_version: Option<FhirVersion>,
    pub upsert_mode: Option<UpsertMode>,
    pub auth: Option<AuthInput>,
}

/// Checks an authentication (`has_secret`: one is stored already). Pure.
pub fn check_auth(auth: &AuthInput, has_secret: bool, local: bool, errors: &mut Vec<FieldError>) {
    let oauth = auth.kind.is_oauth();
    if auth.kind.needs_secret() && auth.secret.is_none() && !has_secret {
        errors.push(FieldError::new(
            "$.auth.secret",
            format!("required for {} auth", auth.kind.as_str()),
        ));
    }
    if !auth.kind.needs_secret() && auth.secret.is_some() {
        errors.push(FieldError::new(
            "$.auth.secret",
            format!("{} auth takes no secret", auth.kind.as_str()),
        ));
    }
    if let Some(s) = &auth.secret
        && (s.is_empty() || s.len() > 8192 || s.chars().any(char::is_control))
    {
        errors.push(FieldError::new(
            "$.auth.secret",
            "1 to 8192 characters, no control characters",
        ));
    }
    match (&auth.client_id, oauth) {
        (None, true) => errors.push(FieldError::new(
            "$.auth.client_id",
            "required for OAuth2 targets",
        )),
        (Some(id), true) => check_name("$.auth.client_id", id, errors),
        (Some(_), false) => errors.push(FieldError::new(
            "$.auth.client_id",
            "only for OAuth2 targets",
        )),
        (None, false) => {}
    }
    match (&auth.token_url, auth.kind) {
        (None, AuthKind::ClientCredentials) => errors.push(FieldError::new(
            "$.auth.token_url",
            "required for client_credentials targets",
        )),
        (Some(url), k) if k.is_oauth() => check_base_url("$.auth.token_url", url, local, errors),
        (Some(_), _) => errors.push(FieldError::new(
            "$.auth.token_url",
            "only for OAuth2 targets",
        )),
        (None, _) => {}
    }
    if let Some(scope) = &auth.scope {
        if !oauth {
            errors.push(FieldError::new("$.auth.scope", "only for OAuth2 targets"));
        } else if scope.len() > 2000 || !scope.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            errors.push(FieldError::new(
                "$.auth.scope",
                "space-separated scopes of visible ASCII characters",
            ));
        }
    }
    if auth.client_auth.is_some() && auth.kind != AuthKind::ClientCredentials {
        errors.push(FieldError::new(
            "$.auth.client_auth",
            "only for client_credentials targets",
        ));
    }
}

fn settings_json(auth: &AuthInput) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k.into(), v.into());
        }
    };
    put("client_id", auth.client_id.clone());
    put("token_url", auth.token_url.clone());
    put("scope", auth.scope.clone());
    put(
        "client_auth",
        auth.client_auth.map(|c| match c {
            ClientAuth::Basic => "basic".to_owned(),
            ClientAuth::Post => "post".to_owned(),
        }),
    );
    serde_json::Value::Object(m)
}

fn seal(state: &ApiState, target: Uuid, secret: &str) -> Result<String, ApiError> {
    let secrets = state.app.secrets.as_ref().ok_or_else(|| {
        ApiError::Unavailable("secrets cannot be stored: OHX_SECRET_KEYS is not set".into())
    })?;
    secrets
        .seal(
            secret.as_bytes(),
            &format!("ehr_target:{target}:auth_secret"),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn version_text(v: FhirVersion) -> &'static str {
    match v {
        FhirVersion::R4 => ohx_common::records::FHIR_R4,
        FhirVersion::R5 => ohx_common::records::FHIR_R5,
    }
}

fn mode_text(m: UpsertMode) -> &'static str {
    match m {
        UpsertMode::Put => "put",
        UpsertMode::Conditional => "conditional",
    }
}

/// Lists the organization's EHR targets.
#[utoipa::path(get, path = "/api/v1/ehr-targets", tag = "ehr-targets", params(PageParams),
    responses((status = 200, body = Page<Target>)))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<Target>>, ApiError> {
    let org = caller.org()?;
    let select = format!("SELECT {COLUMNS} FROM ehr_targets WHERE organization_id = $1");
    let client = state.app.pool.get().await?;
    keyset_page(&client, &select, Some(org), &page, &[], |r| Ok(target(r)))
        .await
        .map(axum::Json)
}

/// Adds an EHR target (org admins).
#[utoipa::path(post, path = "/api/v1/ehr-targets", tag = "ehr-targets",
    request_body = NewTarget,
    responses((status = 201, body = Target), (status = 403, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewTarget>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    caller.require(Role::OrgAdmin)?;
    let mut errors = Vec::new();
    check_name("$.name", &body.name, &mut errors);
    check_base_url("$.base_url", &body.base_url, state.local, &mut errors);
    check_auth(&body.auth, false, state.local, &mut errors);
    valid(errors)?;
    let id = Uuid::new_v4();
    let secret = body
        .auth
        .secret
        .as_deref()
        .map(|s| seal(&state, id, s))
        .transpose()?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO ehr_targets (id, organization_id, name, base_url, auth_kind, \
                 auth_secret, upsert_mode, auth_settings, fhir_version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &org,
                &body.name.trim(),
                &body.base_url,
                &body.auth.kind.as_str(),
                &secret,
                &mode_text(body.upsert_mode),
                &settings_json(&body.auth),
                &version_text(body.fhir_version),
            ],
        )
        .await?;
    audit(
        &tx,
        &caller,
        Some(org),
        "ehr_target.create",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    let (_, t) = target(&row);
    Ok(with_etag(StatusCode::CREATED, t.revision, t))
}

/// Reads an EHR target.
#[utoipa::path(get, path = "/api/v1/ehr-targets/{id}", tag = "ehr-targets",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Target, headers(("ETag" = String))),
              (status = 404, body = super::problem::ProblemDoc)))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    let row = state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            &format!("SELECT {COLUMNS} FROM ehr_targets WHERE id = $1 AND organization_id = $2"),
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    let (_, t) = target(&row);
    Ok(with_etag(StatusCode::OK, t.revision, t))
}

/// Changes an EHR target (org admins); needs `If-Match`.
#[utoipa::path(patch, path = "/api/v1/ehr-targets/{id}", tag = "ehr-targets",
    params(("id" = Uuid, Path), ("If-Match" = String, Header)),
    request_body = TargetChanges,
    responses((status = 200, body = Target), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 412, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc),
              (status = 428, body = super::problem::ProblemDoc)))]
pub async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TargetChanges>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let current = tx
        .query_opt(
            "SELECT auth_kind, auth_secret IS NOT NULL, revision FROM ehr_targets \
             WHERE id = $1 AND organization_id = $2 FOR UPDATE",
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    caller.require(Role::OrgAdmin)?;
    let expected = if_match(&headers)?;
    if expected.is_some_and(|e| e != current.get::<_, i64>(2)) {
        return Err(ApiError::PreconditionFailed);
    }
    let mut errors = Vec::new();
    if let Some(name) = &body.name {
        check_name("$.name", name, &mut errors);
    }
    if let Some(url) = &body.base_url {
        check_base_url("$.base_url", url, state.local, &mut errors);
    }
    let kind_now = AuthKind::parse(current.get(0));
    if let Some(auth) = &body.auth {
        // A stored secret carries over only to a kind that uses one.
        let keeps = current.get::<_, bool>(1) && auth.kind.needs_secret();
        check_auth(auth, keeps, state.local, &mut errors);
    }
    valid(errors)?;
    let (kind, settings, secret, clear_secret) = match &body.auth {
        None => (kind_now.as_str(), None, None, false),
        Some(a) => (
            a.kind.as_str(),
            Some(settings_json(a)),
            a.secret
                .as_deref()
                .map(|s| seal(&state, id, s))
                .transpose()?,
            !a.kind.needs_secret(),
        ),
    };
    let row = tx
        .query_one(
            &format!(
                "UPDATE ehr_targets SET name = COALESCE($2, name), \
                 base_url = COALESCE($3, base_url), fhir_version = COALESCE($4, fhir_version), \
                 upsert_mode = COALESCE($5, upsert_mode), auth_kind = $6, \
                 auth_settings = COALESCE($7, auth_settings), \
                 auth_secret = CASE WHEN $9 THEN NULL ELSE COALESCE($8, auth_secret) END, \
                 revision = revision + 1 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &body.name.as_deref().map(str::trim),
                &body.base_url,
                &body.fhir_version.map(version_text),
                &body.upsert_mode.map(mode_text),
                &kind,
                &settings,
                &secret,
                &clear_secret,
            ],
        )
        .await?;
    audit(
        &tx,
        &caller,
        Some(org),
        "ehr_target.update",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    let (_, t) = target(&row);
    Ok(with_etag(StatusCode::OK, t.revision, t))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn auth(kind: AuthKind) -> AuthInput {
        AuthInput {
            kind,
            client_id: None,
            token_url: None,
            scope: None,
            client_auth: None,
            secret: None,
        }
    }

    fn fields(a: &AuthInput, has_secret: bool) -> Vec<String> {
        let mut e = Vec::new();
        check_auth(a, has_secret, false, &mut e);
        e.into_iter().map(|f| f.field).collect()
    }

    #[test]
    fn test_a_bearer_target_needs_a_secret_unless_one_is_stored() {
        assert_eq!(fields(&auth(AuthKind::Bearer), false), ["$.auth.secret"]);
        assert!(fields(&auth(AuthKind::Bearer), true).is_empty());
    }

    #[test]
    fn test_client_credentials_need_a_client_id_and_an_https_token_url() {
        let mut a = auth(AuthKind::ClientCredentials);
        a.secret = Some("s".into());
        assert_eq!(fields(&a, false), ["$.auth.client_id", "$.auth.token_url"]);
        a.client_id = Some("ohx".into());
        a.token_url = Some("http://idp.example/token".into());
        assert_eq!(fields(&a, false), ["$.auth.token_url"]);
        a.token_url = Some("https://idp.example/token".into());
        a.client_auth = Some(ClientAuth::Post);
        assert!(fields(&a, false).is_empty());
    }

    #[test]
    fn test_oauth_fields_on_a_plain_target_are_refused() {
        let mut a = auth(AuthKind::None);
        a.client_id = Some("x".into());
        a.scope = Some("system/*.read".into());
        a.secret = Some("s".into());
        a.client_auth = Some(ClientAuth::Basic);
        assert_eq!(
            fields(&a, false),
            [
                "$.auth.secret",
                "$.auth.client_id",
                "$.auth.scope",
                "$.auth.client_auth"
            ]
        );
    }

    #[test]
    fn test_a_smart_target_needs_no_secret_and_may_discover_its_token_url() {
        let mut a = auth(AuthKind::SmartBackend);
        a.client_id = Some("ohx".into());
        assert!(fields(&a, false).is_empty());
    }
}
