//! The Omron Wellness API's data call (providers.md §3.1): `POST /api/measurement` with a
//! form (`type`, `since`, `limit`, `sortOrder`), answered `{status, result: {<list>: [...],
//! truncated}}`, or `{status ≠ 0, reason, errorCode}`.
//!
//! Paging is by date: while `truncated`, ask again with `since` = the last item's local date.
//! The pages overlap on that date (the normalizer dedupes on `id`); a date holding more items
//! than one page makes no progress, so the page is doubled up to [`MAX_LIMIT`] instead.

use crate::oauth::retry_after;
use crate::{Api, ProviderError};
use serde::Deserialize;
use serde_json::Value;

/// Production API host (token endpoint and data).
pub const DEFAULT_BASE_URL: &str = "https://prd-oauth.ohiomron.com";
/// Production host of the authorize page.
pub const DEFAULT_AUTHORIZE_BASE_URL: &str = "https://prd-oauth-website.ohiomron.com";
/// The data call.
pub const PATH_MEASUREMENT: &str = "/api/measurement";
/// Items asked for per page.
pub const PAGE_LIMIT: u32 = 100;
/// The largest page asked for when one date holds more items than a page.
pub const MAX_LIMIT: u32 = 500;
/// Pages of one type in one fetch before it is given up as a provider fault.
pub const MAX_PAGES: i32 = 200;

/// One answer of `/api/measurement`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub items: Vec<Value>,
    pub truncated: bool,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    status: Option<i64>,
    #[serde(rename = "errorCode")]
    error_code: Option<Value>,
    result: Option<Value>,
}

fn transient(reason: String, retry_after: Option<std::time::Duration>) -> ProviderError {
    ProviderError::Transient {
        reason,
        retry_after,
    }
}

/// Keeps a provider error code printable and short (it reaches logs and dead letters).
fn code_text(code: Option<&Value>) -> String {
    let raw = match code {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(48)
        .collect()
}

/// Decodes an answer of `/api/measurement` (HTTP 200) for the list `list_key`.
///
/// # Errors
/// `Permanent` for `status ≠ 0` (with Omron's `errorCode`, never its `reason` text) and for an
/// answer that is not the envelope.
pub fn decode_page(body: &[u8], list_key: &str) -> Result<Page, ProviderError> {
    let decode = || ProviderError::Permanent {
        kind: "decode",
        reason: "omron answer could not be decoded".into(),
    };
    let env: Envelope = serde_json::from_slice(body).map_err(|_| decode())?;
    match env.status {
        Some(0) => {}
        Some(status) => {
            return Err(ProviderError::Permanent {
                kind: "provider",
                reason: format!(
                    "omron refused the request (status {status}, errorCode {})",
                    code_text(env.error_code.as_ref())
                ),
            });
        }
        None => return Err(decode()),
    }
    let result = env.result.ok_or_else(decode)?;
    let items = match result.get(list_key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(decode()),
    };
    let truncated = match result.get("truncated") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        Some(_) => return Err(decode()),
    };
    Ok(Page { items, truncated })
}

/// One call of `/api/measurement`.
///
/// # Errors
/// 401 → `TokenRejected`; 429 → `RateLimited`; 5xx and network → `Transient`; other statuses and
/// `status ≠ 0` → `Permanent`.
pub async fn measurements(
    api: &Api,
    token: &str,
    omron_type: &str,
    list_key: &str,
    since: &str,
    limit: u32,
) -> Result<Page, ProviderError> {
    api.gate
        .acquire()
        .await
        .map_err(|_| transient("the rate gate failed".into(), None))?;
    let limit = limit.to_string();
    let response = api
        .http
        .post(format!("{}{PATH_MEASUREMENT}", api.base_url))
        .bearer_auth(token)
        .form(&[
            ("type", omron_type),
            ("since", since),
            ("limit", limit.as_str()),
            ("sortOrder", "asc"),
        ])
        .send()
        .await
        .map_err(|_| transient("omron http request failed".into(), None))?;
    let status = response.status();
    let wait = retry_after(response.headers());
    match status.as_u16() {
        200 => {}
        401 => {
            return Err(ProviderError::TokenRejected {
                reason: "omron answered http status 401".into(),
            });
        }
        429 => {
            return Err(ProviderError::RateLimited {
                reason: "omron answered http status 429".into(),
                retry_after: wait,
            });
        }
        s if status.is_server_error() || s == 408 => {
            return Err(transient(format!("omron answered http status {s}"), wait));
        }
        s => {
            return Err(ProviderError::Permanent {
                kind: "provider",
                reason: format!("omron answered http status {s}"),
            });
        }
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| transient("omron http request failed".into(), None))?;
    decode_page(&body, list_key)
}

/// The local date (`YYYY-MM-DD`) of an item, from `dateTimeLocal`.
fn local_date(item: &Value) -> Option<&str> {
    let text = item.get("dateTimeLocal")?.as_str()?.trim();
    let date = text.get(..10)?;
    date.parse::<jiff::civil::Date>().ok().map(|_| date)
}

/// Every item of `omron_type` since the date `since`, following `truncated`; returns the items
/// (overlapping pages included) and the calls made.
///
/// # Errors
/// A failed call, or paging that cannot advance past one date even with [`MAX_LIMIT`] items.
pub async fn all_since(
    api: &Api,
    token: &str,
    omron_type: &str,
    list_key: &str,
    since: &str,
) -> Result<(Vec<Value>, i32), ProviderError> {
    let mut since = since.to_owned();
    let mut limit = PAGE_LIMIT;
    let mut items = Vec::new();
    let mut calls = 0;
    loop {
        let page = measurements(api, token, omron_type, list_key, &since, limit).await?;
        calls += 1;
        let last = page.items.last().and_then(local_date).map(str::to_owned);
        let got = page.items.len();
        items.extend(page.items);
        if !page.truncated || got == 0 {
            return Ok((items, calls));
        }
        match last {
            Some(date) if date > since => since = date,
            _ if limit < MAX_LIMIT => limit = (limit * 2).min(MAX_LIMIT),
            _ => {
                return Err(ProviderError::Permanent {
                    kind: "provider",
                    reason: format!(
                        "omron paging cannot advance: more than {MAX_LIMIT} {omron_type} items on one date"
                    ),
                });
            }
        }
        if calls >= MAX_PAGES {
            return Err(ProviderError::Permanent {
                kind: "provider",
                reason: format!("omron paging of {omron_type} did not end after {MAX_PAGES} pages"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decode_page_reads_the_documented_envelope() {
        let body = br#"{"status":0,"result":{"truncated":false,"nextPaginationKey":null,"measurementCount":1,
            "bloodPressure":[{"id":123456789,"dateTime":"2024-03-01T14:05:00","systolic":128}]}}"#;
        let page = decode_page(body, "bloodPressure").unwrap();
        assert_eq!(page.items.len(), 1);
        assert!(!page.truncated);
        // a type with no items omits its list
        let empty = decode_page(
            br#"{"status":0,"result":{"truncated":false,"measurementCount":0}}"#,
            "weight",
        )
        .unwrap();
        assert_eq!(empty, Page::default());
        let more = decode_page(
            br#"{"status":0,"result":{"truncated":true,"activity":[]}}"#,
            "activity",
        )
        .unwrap();
        assert!(more.truncated);
    }

    #[test]
    fn test_status_not_zero_is_permanent_with_the_code_not_the_text() {
        let e = decode_page(
            br#"{"status":1,"reason":"systolic 128 out of range","errorCode":"INVALID_PARAMETER"}"#,
            "bloodPressure",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ProviderError::Permanent {
                    kind: "provider",
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("INVALID_PARAMETER"), "{text}");
        assert!(!text.contains("128"), "{text}");
    }

    #[test]
    fn test_answers_that_are_not_the_envelope_are_decode_failures() {
        for body in [
            &b"<html>"[..],
            br#"{"result":{}}"#,
            br#"{"status":0}"#,
            br#"{"status":0,"result":{"weight":{}}}"#,
        ] {
            assert!(matches!(
                decode_page(body, "weight"),
                Err(ProviderError::Permanent { kind: "decode", .. })
            ));
        }
    }

    #[test]
    fn test_local_date_of_an_item() {
        let item = serde_json::json!({"dateTimeLocal": "2024-03-01T06:05:00"});
        assert_eq!(local_date(&item), Some("2024-03-01"));
        assert_eq!(
            local_date(&serde_json::json!({"dateTimeLocal": "03/01/2024"})),
            None
        );
        assert_eq!(local_date(&serde_json::json!({})), None);
    }
}
