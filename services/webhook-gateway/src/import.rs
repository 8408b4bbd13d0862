//! Imports of files from providers without an API: Beurer's HealthManager Pro CSV export
//! (`POST /imports/beurer?token=…&user=…&time_zone=…`, the body the file as exported).
//!
//! The import is authenticated like a webhook, by the secret token of the organization's Beurer
//! app; `user` names the Beurer account of a link (the patient), `time_zone` the patient's IANA
//! zone, which turns the export's naive local times into instants. The file is parsed by
//! [`ohx_providers::beurer::parse_export`], and its Measurements travel the same topic as every
//! provider's (`ohx.measurements.v1`), so mapping, deduplication and publishing are the same.
//!
//! Per row the answer says `imported`, `unchanged` (a row this link imported before: a keyed
//! digest of its content identity is in `import_rows`, and nothing is sent again) or
//! `rejected` with the
//! reason. A malformed file is refused whole (400 problem+json naming the line); a bad row
//! never rejects the others. The rows' identities are recorded only after the broker
//! acknowledged their Measurements: a failure in between sends them again on the next import,
//! which the deduplicator absorbs.

use crate::{
    AppState, Unavailable, count, db_step, lookup_app, lookup_links, token_hash, unavailable,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ohx_common::admin::Problem;
use ohx_common::crypto::SecretBox;
use ohx_common::db::PatientTargets;
use ohx_common::kafka::OutRecord;
use ohx_common::records::{Context, topic};
use ohx_providers::beurer::{self, ParsedExport};
use ohx_providers::policy::{POLICY_COLUMNS, Policy};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::sync::LazyLock;
use uuid::Uuid;

static IMPORT_ROWS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_import_rows",
        "Rows of imported files, by provider and outcome (imported, unchanged, rejected)",
    )
});

/// Default largest import body (`OHX_MAX_IMPORT_BYTES`): about 150,000 rows of an export.
pub const DEFAULT_MAX_IMPORT_BYTES: usize = 10 * 1024 * 1024;

/// The query of an import.
#[derive(Debug, Deserialize)]
pub struct ImportQuery {
    token: Option<String>,
    user: Option<String>,
    time_zone: Option<String>,
}

fn policy_sql() -> String {
    format!(
        "SELECT {POLICY_COLUMNS} FROM patients p JOIN organizations o ON o.id = p.organization_id \
         WHERE p.id = $1"
    )
}

const KNOWN_ROWS: &str =
    "SELECT row_digest FROM import_rows WHERE link_id = $1 AND row_digest = ANY($2::text[])";

const RECORD_ROWS: &str = "INSERT INTO import_rows (link_id, row_digest) \
     SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING";

/// The digest a row is recorded by (see migration 0010).
fn row_digest(secrets: &SecretBox, link_id: &Uuid, row_id: &str) -> String {
    secrets.digest("import_row", format!("{link_id}:{row_id}").as_bytes())
}

fn bad_request(title: &str, detail: impl Into<String>) -> Response {
    count(beurer::NAME, "bad_request");
    Problem::new(StatusCode::BAD_REQUEST, title)
        .detail(detail)
        .into_response()
}

/// The import's id: a UUID (version 8, from SHA-256) of the link and the file, so the same
/// file imported again for the same link has the same id.
fn import_id(link_id: &Uuid, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(link_id.as_bytes());
    h.update(body);
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes).to_string()
}

/// The per-row report of one link's import, in file order.
fn report(parsed: &ParsedExport, known: &BTreeSet<String>) -> (Vec<serde_json::Value>, [usize; 3]) {
    let mut lines: Vec<(usize, serde_json::Value)> = Vec::new();
    let mut counts = [0usize; 3];
    for row in &parsed.imported {
        let outcome = if known.contains(&row.row_id) {
            counts[1] += 1;
            "unchanged"
        } else {
            counts[0] += 1;
            "imported"
        };
        lines.push((
            row.line,
            json!({"line": row.line, "outcome": outcome, "row_id": row.row_id}),
        ));
    }
    for row in &parsed.rejected {
        counts[2] += 1;
        lines.push((
            row.line,
            json!({"line": row.line, "outcome": "rejected", "reason": row.reason}),
        ));
    }
    lines.sort_by_key(|(line, _)| *line);
    (lines.into_iter().map(|(_, v)| v).collect(), counts)
}

/// `POST /imports/beurer`.
pub async fn beurer(
    State(state): State<AppState>,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Response {
    let provider = beurer::NAME;
    let received_at = chrono::Utc::now().timestamp_millis();
    let Some(token) = q.token.filter(|t| !t.is_empty()) else {
        count(provider, "unauthorized");
        return Problem::new(StatusCode::UNAUTHORIZED, "Missing import token")
            .detail("the import URL must carry ?token=")
            .into_response();
    };
    let app = match lookup_app(&state, provider, &token_hash(&token)).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            count(provider, "unauthorized");
            return Problem::new(StatusCode::UNAUTHORIZED, "Unknown import token").into_response();
        }
        Err(response) => return response,
    };
    let Some(user) = q
        .user
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
    else {
        return bad_request(
            "Missing user",
            "user= names the Beurer account of the patient",
        );
    };
    let Some(zone) = q
        .time_zone
        .map(|z| z.trim().to_owned())
        .filter(|z| !z.is_empty())
    else {
        return bad_request(
            "Missing time zone",
            "time_zone= is the patient's IANA time zone (e.g. Europe/Berlin): the export has local times only",
        );
    };
    let links: Vec<_> = match lookup_links(&state, provider, app, &user).await {
        Ok(rows) => rows.into_iter().filter(|r| r.status == "active").collect(),
        Err(response) => return response,
    };
    if links.is_empty() {
        count(provider, "unknown_user");
        return Problem::new(StatusCode::NOT_FOUND, "No active link")
            .detail("no active link of this app has that Beurer account")
            .into_response();
    }
    let mut reports = Vec::new();
    for link in links {
        let targets = match targets_of(&state, &link.patient_id).await {
            Ok(t) => t,
            Err(response) => return response,
        };
        let ctx = Context {
            organization_id: link.organization_id.to_string(),
            ehr_target_id: link.ehr_target_id.to_string(),
            patient_id: link.patient_id.to_string(),
            patient_reference: link.patient_reference.clone(),
            provider: provider.into(),
            link_id: link.link_id.to_string(),
            provider_user_id: user.clone(),
            sync_request_id: import_id(&link.link_id, &body),
            trigger: "IMPORT".into(),
            received_at,
            fhir_version: targets.fhir_version,
            deliveries: targets.deliveries,
        };
        let mut parsed = match beurer::parse_export(&body, &ctx, &zone) {
            Ok(p) => p,
            Err(e) => return bad_request("Malformed export", e.to_string()),
        };
        match import_link(&state, &link.link_id, &link.patient_id, &mut parsed).await {
            Ok(r) => reports.push(r),
            Err(response) => return response,
        }
    }
    count(provider, "accepted");
    (StatusCode::OK, Json(json!({ "links": reports }))).into_response()
}

/// The EHR targets the patient's rows go to ([`ohx_common::db::patient_targets`]).
async fn targets_of(state: &AppState, patient_id: &Uuid) -> Result<PatientTargets, Response> {
    let provider = beurer::NAME;
    let db = db_step(provider, state.db_timeout, "connect", state.pool.get()).await?;
    db_step(
        provider,
        state.db_timeout,
        "deliveries",
        ohx_common::db::patient_targets(&db, patient_id),
    )
    .await?
    .ok_or_else(|| {
        Problem::new(StatusCode::NOT_FOUND, "No patient")
            .detail("the link's patient was deleted meanwhile")
            .into_response()
    })
}

/// Sends the new rows of one link's import and records them; returns the link's report.
async fn import_link(
    state: &AppState,
    link_id: &Uuid,
    patient_id: &Uuid,
    parsed: &mut ParsedExport,
) -> Result<serde_json::Value, Response> {
    let provider = beurer::NAME;
    let db = db_step(provider, state.db_timeout, "connect", state.pool.get()).await?;
    let row = db_step(provider, state.db_timeout, "policy", async {
        db.query_one(&policy_sql(), &[patient_id]).await
    })
    .await?;
    let policy = match Policy::from_stored(row.get(0), row.get(1), row.get(2)) {
        Ok(p) => p,
        Err(e) => {
            return Err(
                Problem::new(StatusCode::CONFLICT, "Patient policy is invalid")
                    .detail(e.to_string())
                    .into_response(),
            );
        }
    };
    let Some(secrets) = &state.secrets else {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Imports are not configured",
        )
        .detail("the gateway needs OHX_SECRET_KEYS to record imported rows")
        .into_response());
    };
    let digests: Vec<String> = parsed
        .imported
        .iter()
        .map(|r| row_digest(secrets, link_id, &r.row_id))
        .collect();
    let known_digests: BTreeSet<String> =
        db_step(provider, state.db_timeout, "known rows", async {
            db.query(KNOWN_ROWS, &[link_id, &digests]).await
        })
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: BTreeSet<String> = parsed
        .imported
        .iter()
        .zip(&digests)
        .filter(|(_, d)| known_digests.contains(*d))
        .map(|(r, _)| r.row_id.clone())
        .collect();
    // One trace per import: its measurements can be followed to the EHR together.
    let trace = ohx_common::trace::Trace::root();
    let mut records = Vec::new();
    let mut disabled = 0usize;
    let mut fresh = Vec::new();
    for row in &parsed.imported {
        if known.contains(&row.row_id) {
            continue;
        }
        fresh.push(row_digest(secrets, link_id, &row.row_id));
        for m in &row.measurements {
            if !policy.allows(&m.data_type) {
                disabled += 1;
                continue;
            }
            let payload = match state.producer.codec().encode(topic::MEASUREMENTS, m).await {
                Ok(p) => p,
                Err(error) => {
                    tracing::error!(%error, link_id = %link_id, "cannot encode an imported measurement");
                    return Err(match crate::encode_failure(&error) {
                        Some(what) => {
                            unavailable(provider, what, "the schema registry failed; retry")
                        }
                        None => Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Cannot encode a measurement",
                        )
                        .into_response(),
                    });
                }
            };
            records.push(OutRecord {
                topic: topic::MEASUREMENTS.to_string(),
                partition: None,
                key: Some(m.series_key.as_bytes().to_vec()),
                payload,
                headers: vec![trace.child().header()],
            });
        }
    }
    if let Err(error) = state.producer.send_all(&records).await {
        tracing::error!(%error, link_id = %link_id, records = records.len(), "broker did not store the import");
        return Err(unavailable(
            provider,
            Unavailable::Broker,
            "the broker did not store the imported measurements; retry the import",
        ));
    }
    db_step(provider, state.db_timeout, "record rows", async {
        db.execute(RECORD_ROWS, &[link_id, &fresh]).await
    })
    .await?;
    let (lines, [imported, unchanged, rejected]) = report(parsed, &known);
    for (outcome, n) in [
        ("imported", imported),
        ("unchanged", unchanged),
        ("rejected", rejected),
    ] {
        IMPORT_ROWS.add(
            n as u64,
            &[
                KeyValue::new("provider", provider),
                KeyValue::new("outcome", outcome),
            ],
        );
    }
    tracing::info!(link_id = %link_id, imported, unchanged, rejected, measurements = records.len(), trace_id = %trace.trace_id(), "import stored");
    let import_id = parsed
        .imported
        .first()
        .and_then(|r| r.measurements.first())
        .map(|m| m.context.sync_request_id.clone());
    Ok(json!({
        "link_id": link_id,
        "import_id": import_id,
        "tables": parsed.tables,
        "rows": {"imported": imported, "unchanged": unchanged, "rejected": rejected},
        "measurements": records.len(),
        "disabled_by_policy": disabled,
        "lines": lines,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ohx_providers::beurer::{ImportedRow, RejectedRow};

    #[test]
    fn test_import_id_is_the_same_for_the_same_file_and_link() {
        let link = Uuid::from_u128(7);
        assert_eq!(import_id(&link, b"a;b"), import_id(&link, b"a;b"));
        assert_ne!(import_id(&link, b"a;b"), import_id(&link, b"a;c"));
        assert_ne!(
            import_id(&link, b"a;b"),
            import_id(&Uuid::from_u128(8), b"a;b")
        );
        assert_eq!(&import_id(&link, b"x")[14..15], "8", "a version 8 UUID");
    }

    #[test]
    fn test_report_lists_rows_in_file_order_with_outcomes() {
        let parsed = ParsedExport {
            tables: vec!["weight/en".into()],
            imported: vec![
                ImportedRow {
                    line: 9,
                    row_id: "r9".into(),
                    measurements: vec![],
                },
                ImportedRow {
                    line: 12,
                    row_id: "r12".into(),
                    measurements: vec![],
                },
            ],
            rejected: vec![RejectedRow {
                line: 10,
                reason: "column kg: not a number".into(),
            }],
        };
        let known: BTreeSet<String> = ["r12".to_owned()].into();
        let (lines, counts) = report(&parsed, &known);
        assert_eq!(counts, [1, 1, 1]);
        let outcomes: Vec<(u64, &str)> = lines
            .iter()
            .map(|l| (l["line"].as_u64().unwrap(), l["outcome"].as_str().unwrap()))
            .collect();
        assert_eq!(
            outcomes,
            [(9, "imported"), (10, "rejected"), (12, "unchanged")]
        );
        assert_eq!(lines[1]["reason"], "column kg: not a number");
    }
}
