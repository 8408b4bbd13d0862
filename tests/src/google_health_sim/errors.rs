//! Error envelopes (`google.rpc.Status`) of the Google endpoints.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::catalogue::Rpc;
use super::filter::FilterError;
use super::{
    DOMAIN_GOOGLEAPIS, DOMAIN_HEALTH, MSG_INVALID_CREDENTIALS, MSG_MISSING_CREDENTIALS, SERVICE,
    TYPE_ERROR_INFO,
};

fn grpc_status(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ALREADY_EXISTS",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        _ => "INTERNAL",
    }
}

pub(super) fn error_info(reason: &str, domain: &str, metadata: Value) -> Value {
    let mut info = json!({ "@type": TYPE_ERROR_INFO, "reason": reason, "domain": domain });
    if let (Value::Object(m), Value::Object(meta)) = (&mut info, metadata)
        && !meta.is_empty()
    {
        m.insert("metadata".into(), Value::Object(meta));
    }
    info
}

/// A `google.rpc.Status` error answer; `details` omitted when empty.
pub(super) fn envelope(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if let Value::Object(m) = &mut error
        && !details.is_empty()
    {
        m.insert("details".into(), Value::Array(details));
    }
    let http = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (http, axum::Json(json!({ "error": error }))).into_response()
}

/// A Health-service error with one `ErrorInfo` (domain `health.googleapis.com`).
pub(super) fn health_error(code: u16, reason: &str, message: &str, metadata: Value) -> Response {
    let status = match reason {
        "ACCOUNT_NOT_LINKED" => "FAILED_PRECONDITION",
        _ => grpc_status(code),
    };
    envelope(
        code,
        status,
        message,
        vec![error_info(reason, DOMAIN_HEALTH, metadata)],
    )
}

/// A Google front-end error with one `ErrorInfo` (domain `googleapis.com`, metadata service and
/// method).
fn frontend_error(code: u16, reason: &str, message: &str, rpc: Rpc) -> Response {
    envelope(
        code,
        grpc_status(code),
        message,
        vec![error_info(
            reason,
            DOMAIN_GOOGLEAPIS,
            json!({ "service": SERVICE, "method": rpc.name() }),
        )],
    )
}

pub(super) fn bare_error(code: u16, message: &str) -> Response {
    envelope(code, grpc_status(code), message, vec![])
}

pub(super) fn unauthenticated(reason: &str, rpc: Rpc) -> Response {
    let (message, challenge) = if reason == "CREDENTIALS_MISSING" {
        (
            MSG_MISSING_CREDENTIALS,
            "Bearer realm=\"https://accounts.google.com/\"",
        )
    } else {
        (
            MSG_INVALID_CREDENTIALS,
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
        )
    };
    let mut resp = frontend_error(401, reason, message, rpc);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

pub(super) fn scope_insufficient(rpc: Rpc) -> Response {
    frontend_error(
        403,
        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
        "Request had insufficient authentication scopes.",
        rpc,
    )
}

pub(super) fn filter_error(e: &FilterError) -> Response {
    health_error(400, e.reason, &e.message, json!({}))
}
