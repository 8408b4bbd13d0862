//! Errors of the REST API as RFC 9457 problem documents (`application/problem+json`), with
//! field-level details for bad input, and the JSON body extractor that produces them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One invalid field of a request: its JSON path (`$.base_url`) or the header or query
/// parameter it came from, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProblemDoc {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request id (also in the `x-request-id` header and the gateway's logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The fields at fault, for a 400 or 422.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// What a handler or an extractor of the API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Unknown here, or another organization's: never told apart.
    #[error("not found")]
    NotFound,
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// A request that cannot be routed to a resource (a malformed id in the path).
    #[error("{}", .0.message)]
    BadRequest(FieldError),
    #[error("{0}")]
    Conflict(String),
    #[error("the resource changed since it was read: read it again and retry with its ETag")]
    PreconditionFailed,
    #[error("updates need If-Match with the resource's ETag")]
    PreconditionRequired,
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests")]
    TooManyRequests { retry_after_s: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadGateway(String),
    /// Logged with its cause; the caller gets only the request id.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 422 naming one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::fields(vec![FieldError::new(field, message)])
    }

    /// A 422 naming every field at fault.
    pub fn fields(errors: Vec<FieldError>) -> Self {
        Self::Invalid {
            detail: "the request has invalid fields".into(),
            errors,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document (the request id is added by the API's middleware).
    pub fn problem(&self) -> ProblemDoc {
        let status = self.status();
        let (detail, errors) = match self {
            Self::Invalid { detail, errors } => (Some(detail.clone()), errors.clone()),
            Self::BadRequest(e) => (Some("the request is malformed".into()), vec![e.clone()]),
            // The cause of an internal error stays in the log.
            Self::Internal(_) => (None, Vec::new()),
            other => (Some(other.to_string()), Vec::new()),
        };
        ProblemDoc {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail,
            request_id: None,
            errors,
        }
    }
}

impl From<deadpool_postgres::tokio_postgres::Error> for ApiError {
    fn from(e: deadpool_postgres::tokio_postgres::Error) -> Self {
        Self::Internal(ohx_common::db::error_text(&e))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Unavailable(format!("configuration database unavailable: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(cause = %cause, "API request failed");
        }
        let mut doc = self.problem();
        doc.request_id = super::current_request().map(|m| m.request_id);
        let mut response = (self.status(), Json(doc)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Self::TooManyRequests { retry_after_s } = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
        }
        response
    }
}

/// A path parameter, its rejection a problem document (`/patients/not-an-id` is 400).
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        Self::BadRequest(FieldError::new("path", e.body_text()))
    }
}

/// Query parameters, their rejection a problem document naming the parameter.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::fields(vec![FieldError::new("query", e.body_text())])
    }
}

/// A JSON request body: `application/json`, within the API's body limit, decoded into `T`
/// (whose unknown fields are refused) with the path of the field at fault in the error.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Decodes a JSON document into `T`, naming the field at fault. Never panics, whatever the
/// bytes (a property test feeds it arbitrary input).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "$".to_owned()
        } else {
            format!("$.{path}")
        };
        let inner = e.into_inner();
        let (detail, field) = if inner.is_syntax() || inner.is_eof() {
            ("the body is not valid JSON", "$".to_owned())
        } else {
            ("the body does not match the expected shape", field)
        };
        ApiError::Invalid {
            detail: detail.into(),
            errors: vec![FieldError::new(field, inner.to_string())],
        }
    })?;
    de.end().map_err(|e| ApiError::Invalid {
        detail: "the body is not valid JSON".into(),
        errors: vec![FieldError::new("$", e.to_string())],
    })?;
    Ok(value)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(super::MAX_BODY_BYTES)
            } else {
                ApiError::Invalid {
                    detail: "the body could not be read".into(),
                    errors: vec![FieldError::new("$", e.body_text())],
                }
            }
        })?;
        decode(&bytes).map(Self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        name: String,
        count: Option<u32>,
        nested: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        url: String,
    }

    fn error_of(body: &str) -> (String, Vec<FieldError>) {
        match decode::<Shape>(body.as_bytes()) {
            Err(ApiError::Invalid { detail, errors }) => (detail, errors),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn test_decode_names_the_field_of_a_wrong_type() {
        let (_, errors) = error_of(r#"{"name": "a", "count": "three"}"#);
        assert_eq!(errors[0].field, "$.count");
        assert!(errors[0].message.contains("invalid type"), "{errors:?}");
    }

    #[test]
    fn test_decode_names_the_path_of_a_nested_unknown_field() {
        let (_, errors) = error_of(r#"{"name": "a", "nested": {"url": "x", "extra": 1}}"#);
        assert_eq!(errors[0].field, "$.nested.extra");
        assert!(
            errors[0].message.contains("unknown field `extra`"),
            "{errors:?}"
        );
    }

    #[test]
    fn test_decode_reports_malformed_json_as_such() {
        let (detail, _) = error_of(r#"{"name": "a""#);
        assert_eq!(detail, "the body is not valid JSON");
        let (detail, _) = error_of(r#"{"name": "a"} trailing"#);
        assert_eq!(detail, "the body is not valid JSON");
    }

    #[test]
    fn test_decode_reports_a_missing_field() {
        let (_, errors) = error_of(r#"{}"#);
        assert!(
            errors[0].message.contains("missing field `name`"),
            "{errors:?}"
        );
    }

    #[test]
    fn test_internal_errors_hide_their_cause() {
        let doc = ApiError::Internal("password=hunter2 in a connection string".into()).problem();
        assert_eq!(doc.status, 500);
        assert!(doc.detail.is_none());
    }
}
