//! Patients (as their EHR knows them), their policy overrides and their consents per data
//! type.

use super::ApiState;
use super::auth::{Caller, Role};
use super::problem::{ApiError, ApiPath, ApiQuery, FieldError, JsonBody};
use super::support::{
    Cursor, Page, PageParams, audit, check_policy, if_match, keyset_page, valid, with_etag,
};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use deadpool_postgres::GenericClient;
use deadpool_postgres::tokio_postgres::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A patient.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Patient {
    pub id: Uuid,
    /// The EHR target the patient's data goes to.
    pub ehr_target_id: Uuid,
    /// The patient as that EHR knows them, e.g. `Patient/123`.
    pub ehr_patient_reference: String,
    /// Overrides of the organization's policy.
    #[schema(value_type = Object)]
    pub policy: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revision: i64,
}

const COLUMNS: &str = "id, ehr_target_id, ehr_patient_reference, policy, created_at, revision";

fn patient(row: &Row) -> (Cursor, Patient) {
    let p = Patient {
        id: row.get(0),
        ehr_target_id: row.get(1),
        ehr_patient_reference: row.get(2),
        policy: row.get(3),
        created_at: row.get(4),
        revision: row.get(5),
    };
    (
        Cursor {
            created_at: p.created_at,
            id: p.id,
        },
        p,
    )
}

/// A new patient.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPatient {
    pub ehr_target_id: Uuid,
    pub ehr_patient_reference: String,
    #[schema(value_type = Option<Object>)]
    pub policy: Option<serde_json::Value>,
}

/// Changes to a patient (absent fields stay).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientChanges {
    pub ehr_patient_reference: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub policy: Option<serde_json::Value>,
}

/// Checks a FHIR reference to a Patient: `Patient/{id}` with a FHIR id (1–64 of
/// `[A-Za-z0-9.-]`). Pure.
pub fn check_reference(field: &str, value: &str, errors: &mut Vec<FieldError>) {
    let ok = value.strip_prefix("Patient/").is_some_and(|id| {
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    });
    if !ok {
        errors.push(FieldError::new(
            field,
            "a FHIR reference Patient/{id} (id: 1 to 64 of A-Z a-z 0-9 - .)",
        ));
    }
}

/// The id of a patient of the organization, or 404.
pub async fn owned(client: &impl GenericClient, org: Uuid, id: Uuid) -> Result<(), ApiError> {
    client
        .query_opt(
            "SELECT 1 FROM patients WHERE id = $1 AND organization_id = $2",
            &[&id, &org],
        )
        .await?
        .map(|_| ())
        .ok_or(ApiError::NotFound)
}

/// Maps a unique violation (the EHR already knows this reference here) to a 409.
fn conflict(e: deadpool_postgres::tokio_postgres::Error) -> ApiError {
    if e.code() == Some(&deadpool_postgres::tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        ApiError::Conflict("the EHR target already has a patient with this reference".into())
    } else {
        e.into()
    }
}

/// Lists the organization's patients.
#[utoipa::path(get, path = "/api/v1/patients", tag = "patients", params(PageParams),
    responses((status = 200, body = Page<Patient>)))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<Patient>>, ApiError> {
    let org = caller.org()?;
    let select = format!("SELECT {COLUMNS} FROM patients WHERE organization_id = $1");
    let client = state.app.pool.get().await?;
    keyset_page(&client, &select, Some(org), &page, &[], |r| Ok(patient(r)))
        .await
        .map(axum::Json)
}

/// Adds a patient (org admins).
#[utoipa::path(post, path = "/api/v1/patients", tag = "patients", request_body = NewPatient,
    responses((status = 201, body = Patient), (status = 403, body = super::problem::ProblemDoc),
              (status = 409, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewPatient>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    caller.require(Role::OrgAdmin)?;
    let mut errors = Vec::new();
    check_reference(
        "$.ehr_patient_reference",
        &body.ehr_patient_reference,
        &mut errors,
    );
    check_policy(body.policy.as_ref(), &mut errors);
    valid(errors)?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    let target = tx
        .query_opt(
            "SELECT 1 FROM ehr_targets WHERE id = $1 AND organization_id = $2",
            &[&body.ehr_target_id, &org],
        )
        .await?;
    if target.is_none() {
        return Err(ApiError::field(
            "$.ehr_target_id",
            "no EHR target with this id in the organization",
        ));
    }
    let id = Uuid::new_v4();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO patients (id, organization_id, ehr_target_id, \
                 ehr_patient_reference, policy) VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &org,
                &body.ehr_target_id,
                &body.ehr_patient_reference,
                &body.policy.unwrap_or_else(|| serde_json::json!({})),
            ],
        )
        .await
        .map_err(conflict)?;
    audit(&tx, &caller, Some(org), "patient.create", &id.to_string()).await?;
    tx.commit().await?;
    let (_, p) = patient(&row);
    Ok(with_etag(StatusCode::CREATED, p.revision, p))
}

/// Reads a patient.
#[utoipa::path(get, path = "/api/v1/patients/{id}", tag = "patients",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Patient, headers(("ETag" = String))),
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
            &format!("SELECT {COLUMNS} FROM patients WHERE id = $1 AND organization_id = $2"),
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    let (_, p) = patient(&row);
    Ok(with_etag(StatusCode::OK, p.revision, p))
}

/// Changes a patient's EHR reference or policy (org admins); needs `If-Match`.
#[utoipa::path(patch, path = "/api/v1/patients/{id}", tag = "patients",
    params(("id" = Uuid, Path), ("If-Match" = String, Header)),
    request_body = PatientChanges,
    responses((status = 200, body = Patient), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 412, body = super::problem::ProblemDoc),
              (status = 428, body = super::problem::ProblemDoc)))]
pub async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PatientChanges>,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    owned(&tx, org, id).await?;
    caller.require(Role::OrgAdmin)?;
    let expected = if_match(&headers)?;
    let mut errors = Vec::new();
    if let Some(r) = &body.ehr_patient_reference {
        check_reference("$.ehr_patient_reference", r, &mut errors);
    }
    check_policy(body.policy.as_ref(), &mut errors);
    valid(errors)?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE patients SET ehr_patient_reference = COALESCE($2, ehr_patient_reference), \
                 policy = COALESCE($3, policy), revision = revision + 1 \
                 WHERE id = $1 AND ($4::bigint IS NULL OR revision = $4) RETURNING {COLUMNS}"
            ),
            &[&id, &body.ehr_patient_reference, &body.policy, &expected],
        )
        .await
        .map_err(conflict)?
        .ok_or(ApiError::PreconditionFailed)?;
    audit(&tx, &caller, Some(org), "patient.update", &id.to_string()).await?;
    tx.commit().await?;
    let (_, p) = patient(&row);
    Ok(with_etag(StatusCode::OK, p.revision, p))
}

/// A patient's consent to one data type.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Consent {
    pub data_type: String,
    /// `false`: refused or revoked.
    pub granted: bool,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A consent to record.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentInput {
    pub granted: bool,
}

/// A patient's consents.
#[utoipa::path(get, path = "/api/v1/patients/{id}/consents", tag = "patients",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<Consent>),
              (status = 404, body = super::problem::ProblemDoc)))]
pub async fn consents(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<Vec<Consent>>, ApiError> {
    let org = caller.org()?;
    let client = state.app.pool.get().await?;
    owned(&client, org, id).await?;
    let rows = client
        .query(
            "SELECT data_type, granted, updated_at FROM consents WHERE patient_id = $1 \
             ORDER BY data_type",
            &[&id],
        )
        .await?;
    Ok(axum::Json(
        rows.iter()
            .map(|r| Consent {
                data_type: r.get(0),
                granted: r.get(1),
                updated_at: r.get(2),
            })
            .collect(),
    ))
}

/// Records a patient's consent to a data type, or its refusal (operators).
#[utoipa::path(put, path = "/api/v1/patients/{id}/consents/{data_type}", tag = "patients",
    params(("id" = Uuid, Path), ("data_type" = String, Path)),
    request_body = ConsentInput,
    responses((status = 200, body = Consent), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 422, body = super::problem::ProblemDoc)))]
pub async fn set_consent(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((id, data_type)): ApiPath<(Uuid, String)>,
    JsonBody(body): JsonBody<ConsentInput>,
) -> Result<axum::Json<Consent>, ApiError> {
    let org = caller.org()?;
    let mut client = state.app.pool.get().await?;
    let tx = client.transaction().await?;
    owned(&tx, org, id).await?;
    caller.require(Role::Operator)?;
    if data_type.is_empty()
        || data_type.len() > 64
        || !data_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ApiError::field(
            "data_type",
            "a data type name: 1 to 64 of a-z 0-9 _",
        ));
    }
    let row = tx
        .query_one(
            "INSERT INTO consents (patient_id, data_type, granted) VALUES ($1, $2, $3) \
             ON CONFLICT (patient_id, data_type) DO UPDATE SET granted = EXCLUDED.granted, \
             updated_at = now() RETURNING data_type, granted, updated_at",
            &[&id, &data_type, &body.granted],
        )
        .await?;
    let action = if body.granted {
        "consent.grant"
    } else {
        "consent.refuse"
    };
    audit(
        &tx,
        &caller,
        Some(org),
        action,
        &format!("{id}/{data_type}"),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(Consent {
        data_type: row.get(0),
        granted: row.get(1),
        updated_at: row.get(2),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_patient_references_must_be_patient_slash_a_fhir_id() {
        let check = |r: &str| {
            let mut e = Vec::new();
            check_reference("r", r, &mut e);
            e.is_empty()
        };
        assert!(check("Patient/123"));
        assert!(check("Patient/a-b.C"));
        for bad in [
            "123",
            "Patient/",
            "Observation/1",
            "Patient/1'; DROP TABLE patients;--",
            "Patient/1/_history/2",
            &format!("Patient/{}", "x".repeat(65)),
        ] {
            assert!(!check(bad), "{bad}");
        }
    }
}
