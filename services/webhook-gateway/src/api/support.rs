//! What every resource of the API shares: cursor pages, ETags, the audit log, idempotent
//! POSTs and input checks.

use super::auth::Caller;
use super::problem::{ApiError, FieldError};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Default and largest page size.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;

/// Page parameters of a list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Items per page (1–200, default 50).
    pub limit: Option<u32>,
}

/// Where a page starts: after the row with this creation time and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        ))
    }

    pub fn decode(text: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::field("cursor", "not a cursor of this list");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (micros, id) = raw.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            created_at: DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?)
                .ok_or_else(bad)?,
            id: Uuid::parse_str(id).map_err(|_| bad())?,
        })
    }
}

impl PageParams {
    /// The checked limit and start.
    pub fn checked(&self) -> Result<(i64, Option<Cursor>), ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::field(
                "limit",
                format!("between 1 and {MAX_LIMIT}"),
            ));
        }
        let cursor = self.cursor.as_deref().map(Cursor::decode).transpose()?;
        Ok((i64::from(limit), cursor))
    }
}

/// A page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` rows (the extra row says there is a next page).
    pub fn of(rows: Vec<(Cursor, T)>, limit: i64) -> Self {
        let page = Page::trimmed(rows, limit, |(c, _)| c.encode());
        Page {
            items: page.items.into_iter().map(|(_, t)| t).collect(),
            next_cursor: page.next_cursor,
        }
    }

    /// A page from up to `limit + 1` items: the extra one is dropped and says there is a next
    /// page, which starts after `cursor` of the last item kept.
    pub fn trimmed(mut items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if more { items.last().map(cursor) } else { None };
        Self { items, next_cursor }
    }
}

/// One page of rows ordered by `(created_at, id)`. `select` is the query up to and including
/// its `WHERE` conditions, which use `$1` (the organization, or `NULL` for all) and `$5`… for
/// `extra`; the page's start (`$2`, `$3`) and size (`$4`) are added here.
pub async fn keyset_page<T>(
    client: &impl GenericClient,
    select: &str,
    org: Option<Uuid>,
    page: &PageParams,
    extra: &[&(dyn deadpool_postgres::tokio_postgres::types::ToSql + Sync)],
    row: impl Fn(&deadpool_postgres::tokio_postgres::Row) -> Result<(Cursor, T), ApiError>,
) -> Result<Page<T>, ApiError> {
    let (limit, cursor) = page.checked()?;
    let (after, after_id) = (
        cursor.map(|c| c.created_at),
        cursor.map_or(Uuid::nil(), |c| c.id),
    );
    let size = limit + 1;
    let mut params: Vec<&(dyn deadpool_postgres::tokio_postgres::types::ToSql + Sync)> =
        vec![&org, &after, &after_id, &size];
    params.extend_from_slice(extra);
    let rows = client
        .query(
            &format!(
                "{select} AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3)) \
                 ORDER BY created_at, id LIMIT $4"
            ),
            &params,
        )
        .await?;
    let items = rows.iter().map(row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::of(items, limit))
}

/// The ETag of a row revision.
pub fn etag(revision: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// A JSON answer with the row's ETag.
pub fn with_etag<T: Serialize>(status: StatusCode, revision: i64, body: T) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::ETAG, etag(revision));
    response
}

/// The revision `If-Match` names (428 without one; `*` matches any revision).
pub fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let value = headers
        .get(header::IF_MATCH)
        .ok_or(ApiError::PreconditionRequired)?
        .to_str()
        .map_err(|_| ApiError::field("If-Match", "not an ETag"))?
        .trim();
    if value == "*" {
        return Ok(None);
    }
    value
        .trim_start_matches("W/")
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| ApiError::field("If-Match", "not an ETag of this API"))
}

/// Records a write in the audit log: who, what, on what, when, from where, under which
/// request. Never a secret or a health value: `subject` is an id.
pub async fn audit(
    client: &impl GenericClient,
    caller: &Caller,
    org: Option<Uuid>,
    action: &str,
    subject: &str,
) -> Result<(), ApiError> {
    let meta = super::current_request();
    client
        .execute(
            "INSERT INTO audit_log (organization_id, actor, action, subject, source, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &org,
                &caller.actor,
                &action,
                &subject,
                &meta.as_ref().and_then(|m| m.source).map(|s| s.to_string()),
                &meta.map(|m| m.request_id),
            ],
        )
        .await?;
    Ok(())
}

/// The `Idempotency-Key` of a request, if any (1–255 visible ASCII characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || ApiError::field("Idempotency-Key", "1 to 255 visible ASCII characters");
    let text = v.to_str().map_err(|_| bad())?;
    if text.is_empty() || text.len() > 255 || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(text.to_owned()))
}

/// A stored answer to replay, or `None` when the work is to be done. A key reused with
/// another request is refused (422).
pub async fn replay(
    client: &impl GenericClient,
    caller: &Caller,
    key: &str,
    request: &[u8],
) -> Result<Option<Response>, ApiError> {
    let digest = hex::encode(Sha256::digest(request));
    let row = client
        .query_opt(
            "SELECT request_sha256, status, body FROM idempotency_keys \
             WHERE caller = $1 AND key = $2 AND created_at > now() - interval '24 hours'",
            &[&caller.actor, &key],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: String = row.get(0);
    if stored != digest {
        return Err(ApiError::field(
            "Idempotency-Key",
            "already used for a different request",
        ));
    }
    let status = StatusCode::from_u16(u16::try_from(row.get::<_, i32>(1)).unwrap_or(200))
        .unwrap_or(StatusCode::OK);
    let body: serde_json::Value = row.get(2);
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("idempotency-replayed", HeaderValue::from_static("true"));
    Ok(Some(response))
}

/// Keeps an answer for replay (24 hours).
pub async fn remember(
    client: &impl GenericClient,
    caller: &Caller,
    key: &str,
    request: &[u8],
    status: StatusCode,
    body: &serde_json::Value,
) -> Result<(), ApiError> {
    let digest = hex::encode(Sha256::digest(request));
    client
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'",
            &[],
        )
        .await?;
    client
        .execute(
            "INSERT INTO idempotency_keys (caller, key, request_sha256, status, body) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                &caller.actor,
                &key,
                &digest,
                &i32::from(status.as_u16()),
                body,
            ],
        )
        .await?;
    Ok(())
}

/// Checks a free-text name: 1–200 characters, no control characters.
pub fn check_name(field: &str, value: &str, errors: &mut Vec<FieldError>) {
    if value.trim().is_empty() || value.chars().count() > 200 || value.chars().any(char::is_control)
    {
        errors.push(FieldError::new(
            field,
            "1 to 200 characters, no control characters",
        ));
    }
}

/// Checks a base URL: absolute, HTTPS (plain HTTP only in the local profile), no
/// credentials, query or fragment.
pub fn check_base_url(field: &str, value: &str, local: bool, errors: &mut Vec<FieldError>) {
    let url = match reqwest::Url::parse(value) {
        Ok(u) => u,
        Err(e) => {
            errors.push(FieldError::new(field, format!("not an absolute URL: {e}")));
            return;
        }
    };
    let message = match url.scheme() {
        "https" => None,
        "http" if local => None,
        "http" => Some("must be https (plain http only in the local profile)"),
        _ => Some("must be an https URL"),
    }
    .or_else(|| url.host_str().is_none().then_some("must name a host"))
    .or_else(|| {
        (!url.username().is_empty() || url.password().is_some())
            .then_some("must not carry credentials")
    })
    .or_else(|| {
        (url.query().is_some() || url.fragment().is_some())
            .then_some("must not have a query or a fragment")
    });
    if let Some(m) = message {
        errors.push(FieldError::new(field, m));
    }
}

/// Checks a policy document (`ohx_providers::policy::PolicyDoc`), if one is given.
pub fn check_policy(policy: Option<&serde_json::Value>, errors: &mut Vec<FieldError>) {
    if let Some(p) = policy
        && let Err(e) = ohx_providers::policy::PolicyDoc::from_json(p)
    {
        errors.push(FieldError::new("$.policy", e.to_string()));
    }
}

/// Runs a POST that starts work under its `Idempotency-Key` (if any): a retry with the same
/// key and request gets the stored answer, else `work` runs and its answer is stored.
pub async fn idempotent<F, Fut>(
    pool: &deadpool_postgres::Pool,
    caller: &Caller,
    headers: &HeaderMap,
    request: &[u8],
    work: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let key = idempotency_key(headers)?;
    if let Some(k) = &key
        && let Some(stored) = replay(&pool.get().await?, caller, k, request).await?
    {
        return Ok(stored);
    }
    let (status, body) = work().await?;
    if let Some(k) = &key {
        remember(&pool.get().await?, caller, k, request, status, &body).await?;
    }
    Ok((status, axum::Json(body)).into_response())
}

/// Fails with every field error gathered, if any.
pub fn valid(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::fields(errors))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn test_a_cursor_round_trips_and_garbage_is_a_field_error() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!", "MTIz", "YWJjLmRlZg"] {
            assert!(
                matches!(Cursor::decode(bad), Err(ApiError::Invalid { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_a_page_has_a_next_cursor_only_when_a_row_is_left() {
        let rows = |n: usize| {
            (0..n)
                .map(|i| {
                    (
                        Cursor {
                            created_at: DateTime::from_timestamp_micros(i as i64).unwrap(),
                            id: Uuid::nil(),
                        },
                        i,
                    )
                })
                .collect::<Vec<_>>()
        };
        let full = Page::of(rows(3), 2);
        assert_eq!(full.items, vec![0, 1]);
        assert_eq!(
            Cursor::decode(full.next_cursor.as_deref().unwrap())
                .unwrap()
                .created_at
                .timestamp_micros(),
            1
        );
        let last = Page::of(rows(2), 2);
        assert_eq!(last.items, vec![0, 1]);
        assert!(last.next_cursor.is_none());
    }

    #[test]
    fn test_limits_outside_the_range_are_refused() {
        for limit in [0, MAX_LIMIT + 1] {
            let p = PageParams {
                cursor: None,
                limit: Some(limit),
            };
            assert!(p.checked().is_err(), "{limit}");
        }
        assert_eq!(PageParams::default().checked().unwrap().0, 50);
    }

    #[test]
    fn test_if_match_parses_strong_weak_and_star_and_needs_a_header() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
            if_match(&m)
        };
        assert_eq!(h("\"7\"").unwrap(), Some(7));
        assert_eq!(h("W/\"7\"").unwrap(), Some(7));
        assert_eq!(h("*").unwrap(), None);
        assert!(matches!(h("7"), Err(ApiError::Invalid { .. })));
        assert!(matches!(
            if_match(&HeaderMap::new()),
            Err(ApiError::PreconditionRequired)
        ));
    }

    #[test]
    fn test_base_urls_must_be_https_outside_the_local_profile() {
        let check = |url: &str, local: bool| {
            let mut e = Vec::new();
            check_base_url("base_url", url, local, &mut e);
            e
        };
        assert!(check("https://ehr.example/fhir", false).is_empty());
        assert!(check("http://127.0.0.1:8080/fhir", true).is_empty());
        assert_eq!(check("http://ehr.example/fhir", false).len(), 1);
        for bad in [
            "ehr.example/fhir",
            "ftp://ehr.example",
            "https://u:p@ehr.example/fhir",
            "https://ehr.example/fhir?x=1",
            "https://ehr.example/fhir'; DROP TABLE patients;--#",
            "javascript:alert(1)",
        ] {
            assert_eq!(check(bad, true).len(), 1, "{bad}");
        }
    }

    #[test]
    fn test_names_refuse_empty_long_and_control_characters() {
        let check = |n: &str| {
            let mut e = Vec::new();
            check_name("name", n, &mut e);
            e.len()
        };
        assert_eq!(check("St. Mary's O'Brien; DROP TABLE x"), 0);
        assert_eq!(check("  "), 1);
        assert_eq!(check(&"x".repeat(201)), 1);
        assert_eq!(check("a\u{0}b"), 1);
    }
}
