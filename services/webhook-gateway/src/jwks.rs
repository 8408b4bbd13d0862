//! `GET /ehr-targets/{id}/jwks.json`: the public keys of a SMART Backend Services target, the
//! JWKS URL an EHR registers for ohx. Every key not retired is listed, including keys not yet
//! signing, so an EHR that caches the set (for up to [`MAX_AGE_S`]) knows a new key before
//! ohx signs with it.

use crate::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ohx_common::admin::Problem;
use serde_json::{Value, json};

/// How long an EHR may cache the key set (`Cache-Control: max-age`). Add a key with an
/// activation delay longer than this before retiring the old one.
pub const MAX_AGE_S: u32 = 300;

fn unknown_target() -> Response {
    Problem::new(StatusCode::NOT_FOUND, "Unknown target")
        .detail("no SMART Backend Services target has this id")
        .into_response()
}

/// Serves a target's JWKS.
pub async fn jwks(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return unknown_target();
    };
    let query = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .query(
                "SELECT k.public_jwk FROM ehr_targets t
                 LEFT JOIN ehr_target_keys k ON k.ehr_target_id = t.id AND k.retired_at IS NULL
                 WHERE t.id = $1 AND t.auth_kind = 'smart_backend'
                 ORDER BY k.created_at, k.kid",
                &[&id],
            )
            .await
            .map_err(|e| ohx_common::db::error_text(&e))
    };
    let rows = match tokio::time::timeout(state.db_timeout, query).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            tracing::error!(%error, step = "jwks", "configuration database failed");
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Configuration database unavailable",
            )
            .into_response();
        }
        Err(_) => {
            tracing::error!(step = "jwks", "configuration database timed out");
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Configuration database unavailable",
            )
            .into_response();
        }
    };
    if rows.is_empty() {
        return unknown_target();
    }
    let keys: Vec<Value> = rows
        .iter()
        .filter_map(|r| r.get::<_, Option<Value>>(0))
        .collect();
    (
        [(
            header::CACHE_CONTROL,
            format!("public, max-age={MAX_AGE_S}"),
        )],
        Json(json!({ "keys": keys })),
    )
        .into_response()
}
