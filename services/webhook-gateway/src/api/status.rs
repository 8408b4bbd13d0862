//! What is flowing and what is failing: the caller itself, each EHR target's breaker as the
//! publishers report it and a connection test, the delivery status per patient and target
//! (from the publish results), and the dead letters with their re-drive. Ids, counts,
//! statuses and reasons' summaries; never a value or a payload.

use super::ApiState;
use super::auth::{Caller, Role};
use super::problem::{ApiError, ApiPath, ApiQuery};
use super::support::{audit, idempotent};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use ohx_common::kafka::dlq;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The caller as the API sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    pub actor: String,
    pub role: Role,
    pub organization_id: Option<Uuid>,
}

/// Who am I: the actor, role and organization of the credential.
#[utoipa::path(get, path = "/api/v1/me", tag = "status",
    responses((status = 200, body = Me), (status = 401, body = super::problem::ProblemDoc)))]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        actor: caller.actor,
        role: caller.role,
        organization_id: caller.org,
    })
}

async fn owned_target(state: &ApiState, org: Uuid, id: Uuid) -> Result<(String, String), ApiError> {
    let row = state
        .app
        .pool
        .get()
        .await?
        .query_opt(
            "SELECT base_url, fhir_version FROM ehr_targets WHERE id = $1 AND organization_id = $2",
            &[&id, &org],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((row.get(0), row.get(1)))
}

/// A target's delivery as the publisher replicas report it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TargetStatus {
    /// `closed`, `half_open`, `open`, or `unknown` (no publisher reported yet).
    pub breaker: String,
    /// Target-level faults flagged (`unauthorized`, `not_found`, `fhir_version`, …).
    pub faults: Vec<String>,
    /// Records held until the target recovers.
    pub held: i64,
    /// Per publisher replica.
    #[schema(value_type = Vec<Object>)]
    pub instances: Vec<serde_json::Value>,
}

/// The circuit breaker, faults and held records of an EHR target.
#[utoipa::path(get, path = "/api/v1/ehr-targets/{id}/status", tag = "ehr-targets",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = TargetStatus), (status = 404, body = super::problem::ProblemDoc)))]
pub async fn target_status(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<TargetStatus>, ApiError> {
    let org = caller.org()?;
    owned_target(&state, org, id).await?;
    let rows = ohx_common::target_status::rows(&state.app.pool.get().await?, id).await?;
    let s = ohx_common::target_status::summarize(&rows, chrono::Utc::now().timestamp_millis());
    Ok(Json(TargetStatus {
        breaker: s["state"].as_str().unwrap_or("unknown").to_owned(),
        faults: s["faults"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        held: s["held"].as_i64().unwrap_or(0),
        instances: s["instances"].as_array().cloned().unwrap_or_default(),
    }))
}

/// The outcome of a connection test.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectionTest {
    /// The server answered its CapabilityStatement in the target's FHIR version.
    pub ok: bool,
    /// The HTTP status of `GET {base}/metadata` (absent: no answer).
    pub http_status: Option<u16>,
    /// The FHIR version the server declares.
    pub fhir_version: Option<String>,
    pub detail: String,
}

/// The FHIR release (R4, R5) of a `fhirVersion` such as `4.0.1`. Pure.
pub fn release_of(fhir_version: &str) -> Option<&'static str> {
    match fhir_version.split('.').next() {
        Some("4") => Some(ohx_common::records::FHIR_R4),
        Some("5") => Some(ohx_common::records::FHIR_R5),
        _ => None,
    }
}

/// Tests the connection to an EHR target (operators): reads its CapabilityStatement and
/// checks the FHIR version it declares. Authorization is not tested here (the publisher's
/// status shows an `unauthorized` fault).
#[utoipa::path(post, path = "/api/v1/ehr-targets/{id}/test", tag = "ehr-targets",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = ConnectionTest), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc)))]
pub async fn target_test(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ConnectionTest>, ApiError> {
    let org = caller.org()?;
    let (base, version) = owned_target(&state, org, id).await?;
    caller.require(Role::Operator)?;
    let url = format!("{}/metadata", base.trim_end_matches('/'));
    let answer = state
        .http
        .get(&url)
        .header("accept", "application/fhir+json")
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    let result = match answer {
        Err(e) => ConnectionTest {
            ok: false,
            http_status: None,
            fhir_version: None,
            detail: format!("no answer from {url}: {}", reqwest_cause(&e)),
        },
        Ok(r) => {
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let declared = body["fhirVersion"].as_str().map(str::to_owned);
            let release = declared.as_deref().and_then(release_of);
            let ok = (200..300).contains(&status) && release == Some(version.as_str());
            let detail = match (status, &declared) {
                (200..=299, Some(v)) if ok => format!("FHIR {v}, as configured ({version})"),
                (200..=299, Some(v)) => {
                    format!("the server speaks FHIR {v}, the target is set to {version}")
                }
                (200..=299, None) => "the answer is not a CapabilityStatement".to_owned(),
                _ => format!("GET /metadata answered {status}"),
            };
            ConnectionTest {
                ok,
                http_status: Some(status),
                fhir_version: declared,
                detail,
            }
        }
    };
    Ok(Json(result))
}

/// Why a request got no answer, without the URL's query (which could carry a secret).
fn reqwest_cause(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or unreachable"
    } else {
        "request failed"
    }
}

/// The delivery of one patient's data to one EHR target.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    pub patient_id: Uuid,
    pub ehr_target_id: Uuid,
    /// Resources the EHR holds (created, updated, unchanged, or newer there).
    pub delivered: i64,
    /// Resources the EHR rejected.
    pub failed: i64,
    pub last_delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_failed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The HTTP status of the latest rejection.
    pub last_failure_status: Option<i32>,
}

/// Filters of the delivery status.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryFilter {
    pub patient_id: Option<Uuid>,
    pub ehr_target_id: Option<Uuid>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

fn pair_cursor(text: &str) -> Result<(Uuid, Uuid), ApiError> {
    let bad = || ApiError::field("cursor", "not a cursor of this list");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (a, b) = raw.split_once('.').ok_or_else(bad)?;
    Ok((
        Uuid::parse_str(a).map_err(|_| bad())?,
        Uuid::parse_str(b).map_err(|_| bad())?,
    ))
}

/// Delivery status per patient and EHR target, from the publishers' results (kept 30 days).
#[utoipa::path(get, path = "/api/v1/delivery-status", tag = "status", params(DeliveryFilter),
    responses((status = 200, body = super::support::Page<Delivery>)))]
pub async fn deliveries(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<DeliveryFilter>,
) -> Result<Json<super::support::Page<Delivery>>, ApiError> {
    let org = caller.org()?;
    let limit = i64::from(filter.limit.unwrap_or(50));
    if !(1..=i64::from(super::support::MAX_LIMIT)).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 200"));
    }
    let after = filter.cursor.as_deref().map(pair_cursor).transpose()?;
    let rows = state
        .app
        .pool
        .get()
        .await?
        .query(
            "SELECT patient_id, ehr_target_id, \
             count(*) FILTER (WHERE outcome <> 'rejected'), \
             count(*) FILTER (WHERE outcome = 'rejected'), \
             max(confirmed_at) FILTER (WHERE outcome <> 'rejected'), \
             max(confirmed_at) FILTER (WHERE outcome = 'rejected'), \
             (array_agg(http_status ORDER BY confirmed_at DESC) FILTER (WHERE outcome = 'rejected'))[1] \
             FROM delivery_results WHERE organization_id = $1 \
             AND ($2::uuid IS NULL OR patient_id = $2) AND ($3::uuid IS NULL OR ehr_target_id = $3) \
             AND ($4::uuid IS NULL OR (patient_id, ehr_target_id) > ($4, $5)) \
             GROUP BY patient_id, ehr_target_id ORDER BY patient_id, ehr_target_id LIMIT $6",
            &[
                &org,
                &filter.patient_id,
                &filter.ehr_target_id,
                &after.map(|a| a.0),
                &after.map_or(Uuid::nil(), |a| a.1),
                &(limit + 1),
            ],
        )
        .await?;
    let items: Vec<Delivery> = rows
        .iter()
        .map(|r| Delivery {
            patient_id: r.get(0),
            ehr_target_id: r.get(1),
            delivered: r.get(2),
            failed: r.get(3),
            last_delivered_at: r.get(4),
            last_failed_at: r.get(5),
            last_failure_status: r.get(6),
        })
        .collect();
    Ok(Json(super::support::Page::trimmed(items, limit, |d| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}.{}", d.patient_id, d.ehr_target_id))
    })))
}

/// A dead letter, without its payload.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    /// `partition:offset` in the dead-letter topic.
    pub id: String,
    pub stage: String,
    pub kind: String,
    /// What failed, without the detail (which can quote values).
    pub reason: String,
    pub topic: String,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
    pub patient_id: Option<String>,
    /// Whether it can be re-driven (it kept its record).
    pub redrivable: bool,
}

/// Filters of the dead letters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterFilter {
    pub stage: Option<String>,
    pub kind: Option<String>,
    /// The `next_cursor` of the previous page (the id of its last dead letter).
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// The organization's dead letters with their owner: read from the topic, each attributed by
/// the record it holds (one that never decoded belongs to no organization).
async fn organization_letters(
    state: &ApiState,
    org: Uuid,
) -> Result<Vec<((i32, i64), ohx_common::records::DeadLetter, String)>, ApiError> {
    let broker = state
        .broker
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("dead letters need the broker".into()))?;
    let letters = dlq::read(&broker.kafka, &broker.codec, broker.timeout)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the dead-letter topic cannot be read: {e}")))?;
    let mut out = Vec::new();
    for (id, dl) in letters {
        if let Some((owner, patient)) = dlq::owner(&broker.codec, &dl).await
            && owner == org.to_string()
        {
            out.push((id, dl, patient));
        }
    }
    Ok(out)
}

fn view(id: (i32, i64), dl: &ohx_common::records::DeadLetter, patient: String) -> DeadLetterView {
    DeadLetterView {
        id: format!("{}:{}", id.0, id.1),
        stage: dl.stage.clone(),
        kind: dl.error_kind.clone(),
        reason: dlq::summary(&dl.reason).to_owned(),
        topic: dl.topic.clone(),
        failed_at: chrono::DateTime::from_timestamp_millis(dl.failed_at),
        patient_id: Some(patient),
        redrivable: dl.payload.is_some(),
    }
}

/// The organization's dead letters (topic retention: 24 hours), oldest first per partition.
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "status", params(DeadLetterFilter),
    responses((status = 200, body = super::support::Page<DeadLetterView>),
              (status = 503, body = super::problem::ProblemDoc)))]
pub async fn dead_letters(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<DeadLetterFilter>,
) -> Result<Json<super::support::Page<DeadLetterView>>, ApiError> {
    let org = caller.org()?;
    let limit = usize::try_from(filter.limit.unwrap_or(50)).unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 200"));
    }
    let after = filter
        .cursor
        .as_deref()
        .map(|c| {
            dlq::parse_ids(c)
                .ok()
                .and_then(|ids| ids.first().copied())
                .ok_or_else(|| ApiError::field("cursor", "not a cursor of this list"))
        })
        .transpose()?;
    let items: Vec<DeadLetterView> = organization_letters(&state, org)
        .await?
        .into_iter()
        .filter(|(id, dl, _)| {
            filter.stage.as_ref().is_none_or(|s| *s == dl.stage)
                && filter.kind.as_ref().is_none_or(|k| *k == dl.error_kind)
                && after.is_none_or(|a| *id > a)
        })
        .map(|(id, dl, patient)| view(id, &dl, patient))
        .take(limit + 1)
        .collect();
    Ok(Json(super::support::Page::trimmed(
        items,
        i64::try_from(limit).unwrap_or(i64::MAX),
        |d| d.id.clone(),
    )))
}

/// The outcome of a re-drive.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Redriven {
    pub id: String,
    /// The topic the record went back to.
    pub topic: String,
}

/// Sends a dead letter's record back to the topic it came from (operators), once what made
/// it fail is fixed; answered once the broker has it. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/redrive", tag = "status",
    params(("id" = String, Path, description = "partition:offset"),
           ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 202, body = Redriven), (status = 403, body = super::problem::ProblemDoc),
              (status = 404, body = super::problem::ProblemDoc),
              (status = 409, body = super::problem::ProblemDoc),
              (status = 503, body = super::problem::ProblemDoc)))]
pub async fn redrive(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let org = caller.org()?;
    let wanted = dlq::parse_ids(&id)
        .ok()
        .and_then(|ids| (ids.len() == 1).then(|| ids[0]))
        .ok_or(ApiError::NotFound)?;
    let (dl_id, dl) = organization_letters(&state, org)
        .await?
        .into_iter()
        .find(|(i, _, _)| *i == wanted)
        .map(|(i, dl, _)| (i, dl))
        .ok_or(ApiError::NotFound)?;
    caller.require(Role::Operator)?;
    let request = format!("redrive {id}");
    idempotent(
        &state.app.pool,
        &caller,
        &headers,
        request.as_bytes(),
        || async {
            let record = dlq::redrive_record(dl_id, &dl).ok_or_else(|| {
                ApiError::Conflict("the dead letter kept no record to send".into())
            })?;
            state
                .app
                .producer
                .send_all(std::slice::from_ref(&record))
                .await
                .map_err(|e| {
                    ApiError::Unavailable(format!("the broker did not take the record: {e}"))
                })?;
            audit(
                &state.app.pool.get().await?,
                &caller,
                Some(org),
                "dead_letter.redrive",
                &id,
            )
            .await?;
            Ok((
                StatusCode::ACCEPTED,
                serde_json::json!({"id": id, "topic": record.topic}),
            ))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fhir_versions_map_to_their_release() {
        assert_eq!(release_of("4.0.1"), Some("R4"));
        assert_eq!(release_of("5.0.0"), Some("R5"));
        assert_eq!(release_of("3.0.2"), None);
        assert_eq!(release_of(""), None);
    }
}
