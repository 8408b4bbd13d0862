//! The Google Health API v4 data calls (google-health.md §3): thin HTTP over [`crate::Api`].
//!
//! - [`identity`]: `GET /v4/users/me/identity`, the user's `healthUserId` (ohx's provider user
//!   id) and the legacy Fitbit id.
//! - [`points`]: the points of one rule of the data type table over `[start, end)`:
//!   `list` (`GET …/dataPoints`) or `reconcile` (`GET …/dataPoints:reconcile`) with an AIP-160
//!   [`filter`], following `nextPageToken` until it is missing or empty; or `dailyRollUp`
//!   (`POST …/dataPoints:dailyRollUp`, one row per civil day, never paginated).
//! - [`classify`]: the `google.rpc.Status` error envelope (§5.2) → [`ProviderError`], by
//!   `ErrorInfo.reason` then `error.status`; reasons never quote Google's message (it can quote
//!   the request).
//!
//! Parents are always `users/me` (a numeric user id is refused as a parent, §3.1); URL ids are
//! kebab-case and filter prefixes snake_case, both from the table.

use super::normalize::{Method, Shape, TypeRule};
use crate::oauth::retry_after;
use crate::{Api, ProviderError};
use jiff::Timestamp;
use jiff::civil::Date;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

/// Production API host.
pub const DEFAULT_BASE_URL: &str = "https://health.googleapis.com";
/// The identity call.
pub const PATH_IDENTITY: &str = "/v4/users/me/identity";
/// Pages of one rule in one call of [`points`] before paging is given up as a provider fault.
pub const MAX_PAGES: i32 = 1000;
/// Civil days per `dailyRollUp` request: the smallest range cap of any type (14 days for
/// heart-rate and calories; 90 for the others), so a request is never refused for its length.
pub const ROLLUP_CHUNK_DAYS: i64 = 14;
/// The widest UTC offset (±14 h): the local dates of an instant lie within it.
const MAX_ZONE_MS: i64 = 14 * 3_600_000;
/// Reasons of [`ProviderError::Permanent`] for a missing OAuth scope start so.
pub const SCOPE_MISSING: &str = "scope_missing";
/// The latest instant a filter names (9999-12-31T23:59:59Z).
const MAX_FILTER_MS: i64 = 253_402_300_799_000;

/// Who the token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The Google Health user id (1-63 letters, digits, hyphens; observed: 19 digits). Stable.
    pub health_user_id: String,
    /// The legacy Fitbit user id, to join Fitbit-era records.
    pub legacy_user_id: Option<String>,
}

fn transient(reason: impl Into<String>) -> ProviderError {
    ProviderError::Transient {
        reason: reason.into(),
        retry_after: None,
    }
}

fn decode_error(what: &str) -> ProviderError {
    ProviderError::Permanent {
        kind: "decode",
        reason: format!("google-health {what} could not be decoded"),
    }
}

/// Keeps a code printable and short (letters, digits, `_`): codes reach logs and dead letters.
fn code_text(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

/// What an error envelope says: `error.status` and the `ErrorInfo` reason, when present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Envelope {
    status: String,
    reason: String,
    retry_delay: Option<Duration>,
}

fn envelope(body: &[u8]) -> Envelope {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Envelope::default();
    };
    let Some(error) = v.get("error") else {
        return Envelope::default();
    };
    let details = error
        .get("details")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let typed = |suffix: &str| {
        details.iter().find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    let reason = typed("google.rpc.ErrorInfo")
        .or_else(|| details.iter().find(|d| d.get("reason").is_some()))
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str)
        .map(code_text)
        .unwrap_or_default();
    let retry_delay = typed("google.rpc.RetryInfo")
        .and_then(|d| d.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(super::normalize::parse_duration)
        .filter(|(s, _)| *s >= 0.0)
        .map(|(s, _)| Duration::from_secs_f64(s));
    Envelope {
        status: error
            .get("status")
            .and_then(Value::as_str)
            .map(code_text)
            .unwrap_or_default(),
        reason,
        retry_delay,
    }
}

/// `403 REASON` / `400 STATUS` / `418`: the HTTP status and the most specific code.
fn codes(status: u16, env: &Envelope) -> String {
    match (env.reason.is_empty(), env.status.is_empty()) {
        (false, _) => format!("{status} {}", env.reason),
        (true, false) => format!("{status} {}", env.status),
        (true, true) => status.to_string(),
    }
}

/// Classifies a failed answer (status ≠ 200) by its `google.rpc.Status` envelope (§5.2, §5.3):
///
/// - 401 → [`ProviderError::TokenRejected`] (refresh once, then re-consent);
/// - 403 `MISSING_OAUTH_SCOPE` / `ACCESS_TOKEN_SCOPE_INSUFFICIENT` → `Permanent`, reason
///   starting [`SCOPE_MISSING`] (the user must consent to the scope again);
/// - `ACCOUNT_NOT_LINKED` → [`ProviderError::GrantRevoked`]: the Google account holds no
///   Google Health (Fitbit) data; the link needs re-authorization with the right account;
/// - 429 / `RESOURCE_EXHAUSTED` → `RateLimited`, with `Retry-After` or the `RetryInfo` delay;
/// - 501 / `UNIMPLEMENTED` → `Permanent` (the method does not exist for the type);
/// - other 5xx, 408, `UNAVAILABLE`, `DEADLINE_EXCEEDED` → `Transient`;
/// - anything else → `Permanent` with the reason code (never the message text).
#[must_use]
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> ProviderError {
    classify_with(status, retry_after, body, None)
}

/// [`classify`] for a call reading `google_type` under `scope`: a missing scope names both, so
/// the fetcher can tell the user which consent is missing.
#[must_use]
pub fn classify_data_type(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    google_type: &str,
    scope: &str,
) -> ProviderError {
    classify_with(status, retry_after, body, Some((google_type, scope)))
}

fn classify_with(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    data_type: Option<(&str, &str)>,
) -> ProviderError {
    let env = envelope(body);
    let codes = codes(status, &env);
    if status == 401 {
        return ProviderError::TokenRejected {
            reason: format!("google-health answered {codes}"),
        };
    }
    match env.reason.as_str() {
        "MISSING_OAUTH_SCOPE" | "ACCESS_TOKEN_SCOPE_INSUFFICIENT" => {
            let what = match data_type {
                Some((t, scope)) => format!("data type {t} needs scope {scope}"),
                None => "the request needs a scope".to_owned(),
            };
            return ProviderError::Permanent {
                kind: "provider",
                reason: format!(
                    "{SCOPE_MISSING}: {what} the user has not granted (google-health answered {codes})"
                ),
            };
        }
        "ACCOUNT_NOT_LINKED" => {
            return ProviderError::GrantRevoked {
                reason: format!(
                    "the Google account has no linked Google Health data: the link needs \
                     re-authorization with the account holding the user's Fitbit data \
                     (google-health answered {codes})"
                ),
            };
        }
        _ => {}
    }
    if status == 429 || env.status == "RESOURCE_EXHAUSTED" {
        return ProviderError::RateLimited {
            reason: format!("google-health answered {codes}"),
            retry_after: retry_after.or(env.retry_delay),
        };
    }
    if status == 501 || env.status == "UNIMPLEMENTED" {
        // A method the service does not offer (for this type): asking again changes nothing.
        return ProviderError::Permanent {
            kind: "provider",
            reason: format!("google-health does not implement the request ({codes})"),
        };
    }
    if status >= 500
        || status == 408
        || matches!(env.status.as_str(), "UNAVAILABLE" | "DEADLINE_EXCEEDED")
    {
        return ProviderError::Transient {
            reason: format!("google-health answered {codes}"),
            retry_after: retry_after.or(env.retry_delay),
        };
    }
    ProviderError::Permanent {
        kind: "provider",
        reason: format!("google-health refused the request ({codes})"),
    }
}

/// Sends a request through the rate gate; the body of a 200, else the classified error.
async fn send(
    api: &Api,
    request: reqwest::RequestBuilder,
    data_type: Option<(&str, &str)>,
) -> Result<Vec<u8>, ProviderError> {
    api.gate
        .acquire()
        .await
        .map_err(|_| transient("the rate gate failed"))?;
    let response = request
        .send()
        .await
        .map_err(|_| transient("google-health http request failed"))?;
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let body = response
        .bytes()
        .await
        .map_err(|_| transient("google-health http request failed"))?;
    if status == 200 {
        Ok(body.to_vec())
    } else {
        Err(classify_with(status, wait, &body, data_type))
    }
}

/// `GET /v4/users/me/identity`: the user's Google Health id (any read scope is accepted).
///
/// # Errors
/// As [`classify`]; an answer without a valid `healthUserId` is a `decode` failure.
pub async fn identity(api: &Api, token: &str) -> Result<Identity, ProviderError> {
    let request = api
        .http
        .get(format!("{}{PATH_IDENTITY}", api.base_url))
        .bearer_auth(token);
    let body = send(api, request, None).await?;
    decode_identity(&body)
}

/// Decodes an `Identity` answer.
///
/// # Errors
/// `Permanent` (`decode`) unless `healthUserId` is 1-63 letters, digits and hyphens.
pub fn decode_identity(body: &[u8]) -> Result<Identity, ProviderError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| decode_error("identity"))?;
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let id = text("healthUserId").ok_or_else(|| decode_error("identity"))?;
    if id.len() > 63 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(decode_error("identity"));
    }
    Ok(Identity {
        health_user_id: id,
        legacy_user_id: text("legacyUserId"),
    })
}

/// The path of a rule's collection call: `/v4/users/me/dataTypes/{kebab}/dataPoints`, with
/// `:reconcile` or `:dailyRollUp` for those methods.
#[must_use]
pub fn data_points_path(rule: &TypeRule) -> String {
    let suffix = match rule.method {
        Method::List => "",
        Method::Reconcile => ":reconcile",
        Method::DailyRollUp => ":dailyRollUp",
    };
    format!(
        "/v4/users/me/dataTypes/{}/dataPoints{suffix}",
        rule.google_type
    )
}

/// An instant as the filter literal `YYYY-MM-DDTHH:MM:SSZ` (seconds: `up` rounds a partial
/// second up, so an exclusive end keeps its last millisecond).
fn instant_literal(ms: i64, up: bool) -> String {
    let ms = ms.clamp(0, MAX_FILTER_MS);
    let secs = if up {
        ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
    } else {
        ms.div_euclid(1000)
    };
    Timestamp::from_second(secs.min(MAX_FILTER_MS / 1000))
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The UTC date of an instant (clamped to the years a filter can name).
fn utc_date(ms: i64) -> Date {
    Timestamp::from_millisecond(ms.clamp(0, MAX_FILTER_MS))
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
        .unwrap_or_default()
}

/// The civil dates `[first, end)` holding every local date of `[start_ms, end_ms)` in any
/// zone: the window widened by the widest UTC offset on both sides.
#[must_use]
pub fn local_dates(start_ms: i64, end_ms: i64) -> (Date, Date) {
    let first = utc_date(start_ms.saturating_sub(MAX_ZONE_MS));
    let last = utc_date(
        end_ms
            .saturating_sub(1)
            .max(start_ms)
            .saturating_add(MAX_ZONE_MS),
    );
    (first, last.tomorrow().unwrap_or(last))
}

/// The AIP-160 filter of `rule` over `[start_ms, end_ms)` (§3.5):
/// `{prefix}.{member} >= "…" AND {prefix}.{member} < "…"`, with RFC 3339 `Z` instants for
/// samples, intervals and sessions (sleep on its end time), and the local dates that can hold
/// the window for daily types ([`local_dates`]). Empty for `dailyRollUp` (no filter).
#[must_use]
pub fn filter(rule: &TypeRule, start_ms: i64, end_ms: i64) -> String {
    let Some(member) = rule.filter_member.as_deref() else {
        return String::new();
    };
    let (from, to) = if rule.shape == Shape::Daily {
        let (first, end) = local_dates(start_ms, end_ms);
        (first.to_string(), end.to_string())
    } else {
        (
            instant_literal(start_ms, false),
            instant_literal(end_ms, true),
        )
    };
    let field = format!("{}.{member}", rule.filter_name);
    if rule.lower_bound_only {
        // The rest of the answer is after the window: read, not asked for.
        return format!(r#"{field} >= "{from}""#);
    }
    format!(r#"{field} >= "{from}" AND {field} < "{to}""#)
}

/// One page of a collection call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub items: Vec<Value>,
    /// Missing or empty: the last page.
    pub next_page_token: Option<String>,
}

/// Decodes a page: `dataPoints` (also the preview key `reconciledDataPoints`, whose items
/// may be wrapped as `{"dataPoint": …}`) or, for `dailyRollUp`, `rollupDataPoints`. An empty
/// result is `{}`; unknown fields are ignored.
///
/// # Errors
/// `Permanent` (`decode`) when the answer is not an object or the list is not an array.
pub fn decode_page(body: &[u8], method: Method) -> Result<Page, ProviderError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| decode_error("page"))?;
    let obj = v.as_object().ok_or_else(|| decode_error("page"))?;
    let keys: &[&str] = match method {
        Method::DailyRollUp => &["rollupDataPoints"],
        _ => &["dataPoints", "reconciledDataPoints"],
    };
    let list = keys
        .iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()));
    let items = match list {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|item| match item.get("dataPoint") {
                Some(inner) if item.as_object().is_some_and(|o| o.len() == 1) => inner.clone(),
                _ => item.clone(),
            })
            .collect(),
        Some(_) => return Err(decode_error("page")),
    };
    let next_page_token = obj
        .get("nextPageToken")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    Ok(Page {
        items,
        next_page_token,
    })
}

/// The points of `rule` over `[start_ms, end_ms)` and the HTTP requests made (§3.5-3.8):
/// `list` / `reconcile` with [`filter`] and the rule's `pageSize`, following `nextPageToken`
/// until it is missing or empty; `dailyRollUp` per [`ROLLUP_CHUNK_DAYS`] civil days of
/// [`local_dates`] (`windowSizeDays: 1`, no `pageSize`, no paging).
///
/// # Errors
/// As [`classify`] (a missing scope names the data type); a page token seen before, or more
/// than [`MAX_PAGES`] pages, is a `Permanent` provider fault.
pub async fn points(
    api: &Api,
    token: &str,
    rule: &TypeRule,
    start_ms: i64,
    end_ms: i64,
) -> Result<(Vec<Value>, i32), ProviderError> {
    if end_ms <= start_ms {
        return Ok((Vec::new(), 0));
    }
    if rule.method == Method::DailyRollUp {
        return daily_roll_up(api, token, rule, start_ms, end_ms).await;
    }
    let url = format!("{}{}", api.base_url, data_points_path(rule));
    let filter = filter(rule, start_ms, end_ms);
    let page_size = rule.page_size.map(|n| n.to_string());
    let scope = Some((rule.google_type.as_str(), rule.scope.as_str()));
    let mut items = Vec::new();
    let mut calls = 0;
    let mut seen = HashSet::new();
    let mut page_token: Option<String> = None;
    loop {
        let mut query: Vec<(&str, &str)> = vec![("filter", filter.as_str())];
        if let Some(size) = &page_size {
            query.push(("pageSize", size));
        }
        if let Some(t) = &page_token {
            query.push(("pageToken", t));
        }
        query.push(("prettyPrint", "false"));
        let request = api.http.get(&url).bearer_auth(token).query(&query);
        let body = send(api, request, scope).await?;
        calls += 1;
        let page = decode_page(&body, rule.method)?;
        items.extend(page.items);
        let Some(next) = page.next_page_token else {
            return Ok((items, calls));
        };
        if !seen.insert(next.clone()) {
            return Err(ProviderError::Permanent {
                kind: "provider",
                reason: format!(
                    "google-health paging of {} repeated a page token",
                    rule.google_type
                ),
            });
        }
        if calls >= MAX_PAGES {
            return Err(ProviderError::Permanent {
                kind: "provider",
                reason: format!(
                    "google-health paging of {} did not end after {MAX_PAGES} pages",
                    rule.google_type
                ),
            });
        }
        page_token = Some(next);
    }
}

/// The `DailyRollUpDataPointsRequest` of `[first, end)` civil days.
#[must_use]
pub fn roll_up_body(first: Date, end: Date) -> Value {
    let date = |d: Date| serde_json::json!({"date": {"year": d.year(), "month": d.month(), "day": d.day()}});
    serde_json::json!({
        "range": {"start": date(first), "end": date(end)},
        "windowSizeDays": 1,
    })
}

async fn daily_roll_up(
    api: &Api,
    token: &str,
    rule: &TypeRule,
    start_ms: i64,
    end_ms: i64,
) -> Result<(Vec<Value>, i32), ProviderError> {
    let url = format!("{}{}", api.base_url, data_points_path(rule));
    let scope = Some((rule.google_type.as_str(), rule.scope.as_str()));
    let (mut first, end) = local_dates(start_ms, end_ms);
    let mut items = Vec::new();
    let mut calls = 0;
    while first < end {
        let chunk_end = first
            .checked_add(jiff::Span::new().days(ROLLUP_CHUNK_DAYS))
            .map_or(end, |d| d.min(end));
        let request = api
            .http
            .post(&url)
            .bearer_auth(token)
            .query(&[("prettyPrint", "false")])
            .json(&roll_up_body(first, chunk_end));
        let body = send(api, request, scope).await?;
        calls += 1;
        items.extend(decode_page(&body, Method::DailyRollUp)?.items);
        first = chunk_end;
    }
    Ok((items, calls))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::normalize::DataTypeTable;
    use super::*;
    use axum::Router;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn table() -> DataTypeTable {
        DataTypeTable::builtin().unwrap()
    }

    fn ms(text: &str) -> i64 {
        super::super::normalize::parse_instant(text).unwrap()
    }

    #[test]
    fn test_filters_follow_the_time_shape_of_each_type() {
        let t = table();
        let (a, b) = (ms("2023-11-24T00:00:00Z"), ms("2023-11-25T00:00:00Z"));
        assert_eq!(
            filter(&t.types["steps"], a, b),
            r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" AND steps.interval.start_time < "2023-11-25T00:00:00Z""#
        );
        assert_eq!(
            filter(&t.types["weight"], a, b),
            r#"weight.sample_time.physical_time >= "2023-11-24T00:00:00Z" AND weight.sample_time.physical_time < "2023-11-25T00:00:00Z""#
        );
        assert_eq!(
            filter(&t.types["sleep"], a, b),
            r#"sleep.interval.end_time >= "2023-11-24T00:00:00Z" AND sleep.interval.end_time < "2023-11-25T00:00:00Z""#
        );
        // ECG filters take `>=` only (§3.5).
        assert_eq!(
            filter(&t.types["electrocardiogram"], a, b),
            r#"electrocardiogram.interval.start_time >= "2023-11-24T00:00:00Z""#
        );
        assert_eq!(
            filter(&t.types["heart-rate"], a + 1_500, b + 1),
            r#"heart_rate.sample_time.physical_time >= "2023-11-24T00:00:01Z" AND heart_rate.sample_time.physical_time < "2023-11-25T00:00:01Z""#,
            "whole seconds: the start floored, the exclusive end ceiled"
        );
        // Daily types: the local dates of the window in any zone (±14 h).
        assert_eq!(
            filter(&t.types["daily-resting-heart-rate"], a, b),
            r#"daily_resting_heart_rate.date >= "2023-11-23" AND daily_resting_heart_rate.date < "2023-11-26""#
        );
        assert_eq!(
            filter(
                &t.types["daily-sleep-temperature-derivations"],
                ms("2023-11-24T12:00:00Z"),
                ms("2023-11-24T12:05:00Z")
            ),
            r#"daily_sleep_temperature_derivations.date >= "2023-11-23" AND daily_sleep_temperature_derivations.date < "2023-11-26""#
        );
        assert_eq!(filter(&t.types["steps-daily"], a, b), "");
    }

    #[test]
    fn test_paths_and_roll_up_bodies() {
        let t = table();
        assert_eq!(
            data_points_path(&t.types["weight"]),
            "/v4/users/me/dataTypes/weight/dataPoints"
        );
        assert_eq!(
            data_points_path(&t.types["heart-rate"]),
            "/v4/users/me/dataTypes/heart-rate/dataPoints:reconcile"
        );
        assert_eq!(
            data_points_path(&t.types["steps-daily"]),
            "/v4/users/me/dataTypes/steps/dataPoints:dailyRollUp"
        );
        let body = roll_up_body("2026-07-23".parse().unwrap(), "2026-08-04".parse().unwrap());
        // numbers, no leading zeros (§3.8)
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"range":{"end":{"date":{"day":4,"month":8,"year":2026}},"start":{"date":{"day":23,"month":7,"year":2026}}},"windowSizeDays":1}"#
        );
    }

    #[test]
    fn test_pages_of_every_shape_google_returns() {
        let p = decode_page(b"{}", Method::List).unwrap();
        assert_eq!(p, Page::default());
        let p = decode_page(br#"{"nextPageToken":"t"}"#, Method::List).unwrap();
        assert_eq!(p.next_page_token.as_deref(), Some("t"));
        assert!(p.items.is_empty());
        let p = decode_page(
            br#"{"dataPoints":[],"someFutureField":"x"}"#,
            Method::Reconcile,
        )
        .unwrap();
        assert_eq!(p, Page::default());
        // the codelab's last page carries an empty token
        let p = decode_page(
            br#"{"dataPoints":[{"a":1}],"nextPageToken":""}"#,
            Method::List,
        )
        .unwrap();
        assert_eq!((p.items.len(), p.next_page_token), (1, None));
        // preview reconcile key and wrapped items
        let p = decode_page(
            br#"{"reconciledDataPoints":[{"dataPoint":{"steps":{"count":"1"}}},{"steps":{"count":"2"}}]}"#,
            Method::Reconcile,
        )
        .unwrap();
        assert_eq!(p.items[0]["steps"]["count"], "1");
        assert_eq!(p.items[1]["steps"]["count"], "2");
        let p = decode_page(
            br#"{"rollupDataPoints":[{"steps":{"countSum":"10063"}}]}"#,
            Method::DailyRollUp,
        )
        .unwrap();
        assert_eq!(p.items.len(), 1);
        for bad in [&b"<html>"[..], b"[]", br#"{"dataPoints":{}}"#] {
            assert!(matches!(
                decode_page(bad, Method::List),
                Err(ProviderError::Permanent { kind: "decode", .. })
            ));
        }
    }

    #[test]
    fn test_identity_is_the_health_user_id() {
        let id = decode_identity(
            br#"{"name": "users/me/identity", "legacyUserId": "26FWFL", "healthUserId": "7583570207748835967"}"#,
        )
        .unwrap();
        assert_eq!(
            id,
            Identity {
                health_user_id: "7583570207748835967".into(),
                legacy_user_id: Some("26FWFL".into()),
            }
        );
        let id = decode_identity(br#"{"healthUserId": "2515055256096816351"}"#).unwrap();
        assert_eq!(id.legacy_user_id, None);
        for bad in [
            &br#"{"name":"users/me/identity"}"#[..],
            br#"{"healthUserId":"a b"}"#,
            b"x",
        ] {
            assert!(matches!(
                decode_identity(bad),
                Err(ProviderError::Permanent { kind: "decode", .. })
            ));
        }
    }

    // ---- error envelopes (§5.1-5.3, errors.json) ----

    /// The live 401 of a call without a token ([LIVE-W]).
    const UNAUTHENTICATED: &str = r#"{"error": {"code": 401, "message": "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.", "status": "UNAUTHENTICATED",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING", "domain": "googleapis.com",
                   "metadata": {"service": "health.googleapis.com", "method": "google.devicesandservices.health.v4.DataPointsService.ListDataPoints"}}]}}"#;

    const SCOPE_INSUFFICIENT: &str = r#"{"error": {"code": 403, "message": "Request had insufficient authentication scopes.", "status": "PERMISSION_DENIED",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "domain": "googleapis.com",
                   "metadata": {"service": "health.googleapis.com", "method": "google.devicesandservices.health.v4.DataPointsService.ListDataPoints"}}]}}"#;

    const MISSING_SCOPE: &str = r#"{"error": {"code": 403, "message": "The caller does not have the scope for heart-rate.", "status": "PERMISSION_DENIED",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "MISSING_OAUTH_SCOPE", "domain": "health.googleapis.com"}]}}"#;

    /// §5.2 envelope.
    const NOT_LINKED: &str = r#"{"error": {"code": 400, "message": "The Google account is not linked to a Fitbit account.", "status": "FAILED_PRECONDITION",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCOUNT_NOT_LINKED", "domain": "googleapis.com"}]}}"#;

    /// §5.1 quota error ([AP] fixture).
    const QUOTA: &str = r#"{"error": {"code": 429,
      "message": "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'health.googleapis.com' for consumer 'project_number:123456789'.",
      "status": "RESOURCE_EXHAUSTED",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com"},
                  {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"subject": "project:123456789", "description": "Quota exceeded"}]}]}}"#;

    /// §5.2 wrong data type id ([COMM]).
    const BAD_TYPE: &str = r#"{"error": {"code": 400, "status": "INVALID_ARGUMENT",
      "message": "Invalid data type ID referenced in the parent data type collection: heartRate",
      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_PARENT_DATA_TYPE_COLLECTION",
                   "domain": "health.googleapis.com", "metadata": {"dataType": "heartRate"}},
                  {"@type": "type.googleapis.com/google.rpc.BadRequest",
                   "fieldViolations": [{"field": "parent", "description": "The data type ID 'heartRate' is not supported."}]}]}}"#;

    #[test]
    fn test_401_is_a_rejected_token() {
        let e = classify(401, None, UNAUTHENTICATED.as_bytes());
        assert_eq!(
            e,
            ProviderError::TokenRejected {
                reason: "google-health answered 401 CREDENTIALS_MISSING".into()
            }
        );
        assert!(matches!(
            classify(401, None, b""),
            ProviderError::TokenRejected { .. }
        ));
    }

    #[test]
    fn test_missing_scopes_are_permanent_and_name_the_data_type() {
        for body in [SCOPE_INSUFFICIENT, MISSING_SCOPE] {
            let e = classify_data_type(
                403,
                None,
                body.as_bytes(),
                "heart-rate",
                "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly",
            );
            let ProviderError::Permanent { kind, reason } = &e else {
                panic!("{e:?}");
            };
            assert_eq!(*kind, "provider");
            assert!(reason.starts_with(SCOPE_MISSING), "{reason}");
            assert!(reason.contains("heart-rate"), "{reason}");
            assert!(
                reason.contains("health_metrics_and_measurements"),
                "{reason}"
            );
            assert!(!reason.contains("caller"), "no message text: {reason}");
        }
        let e = classify(403, None, MISSING_SCOPE.as_bytes());
        assert!(e.to_string().starts_with("scope_missing: "), "{e}");
    }

    #[test]
    fn test_account_not_linked_needs_reauthorization() {
        let e = classify(400, None, NOT_LINKED.as_bytes());
        let ProviderError::GrantRevoked { reason } = &e else {
            panic!("{e:?}");
        };
        assert!(reason.contains("re-authorization"), "{reason}");
        assert!(reason.contains("ACCOUNT_NOT_LINKED"), "{reason}");
        assert!(!reason.contains("Fitbit account."), "{reason}");
    }

    #[test]
    fn test_429_is_rate_limited_with_the_header_or_retry_info() {
        let e = classify(429, Some(Duration::from_secs(7)), QUOTA.as_bytes());
        assert_eq!(
            e,
            ProviderError::RateLimited {
                reason: "google-health answered 429 RATE_LIMIT_EXCEEDED".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        assert!(!e.to_string().contains("123456789"));
        let with_info = r#"{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "x",
          "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}"#;
        assert_eq!(
            classify(429, None, with_info.as_bytes()),
            ProviderError::RateLimited {
                reason: "google-health answered 429 RESOURCE_EXHAUSTED".into(),
                retry_after: Some(Duration::from_secs(30)),
            }
        );
        assert!(matches!(
            classify(429, None, b"Too Many Requests"),
            ProviderError::RateLimited {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn test_outages_are_transient() {
        let internal = r#"{"error": {"code": 500, "message": "Internal error.", "status": "INTERNAL",
          "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INTERNAL_ERROR", "domain": "health.googleapis.com"}]}}"#;
        assert_eq!(
            classify(500, None, internal.as_bytes()),
            ProviderError::Transient {
                reason: "google-health answered 500 INTERNAL_ERROR".into(),
                retry_after: None
            }
        );
        let unavailable = r#"{"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}}"#;
        assert!(matches!(
            classify(503, Some(Duration::from_secs(2)), unavailable.as_bytes()),
            ProviderError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        let deadline = r#"{"error": {"code": 504, "status": "DEADLINE_EXCEEDED", "message": "x"}}"#;
        assert!(matches!(
            classify(504, None, deadline.as_bytes()),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            classify(502, None, b"<html>bad gateway</html>"),
            ProviderError::Transient { .. }
        ));
        let unimplemented =
            r#"{"error": {"code": 501, "status": "UNIMPLEMENTED", "message": "x"}}"#;
        assert_eq!(
            classify(501, None, unimplemented.as_bytes()).to_string(),
            "google-health does not implement the request (501 UNIMPLEMENTED)"
        );
    }

    /// The error catalogue (reference/google-health/errors.json, 58 reasons, 2026-08-09).
    const CATALOGUE: [(&str, u16); 58] = [
        ("ACCOUNT_NOT_LINKED", 400),
        ("INVALID_PARENT_DATA_TYPE_COLLECTION_FORMAT", 400),
        ("INVALID_PARENT_DATA_TYPE_COLLECTION", 400),
        ("INVALID_FILTER_FORMAT", 400),
        ("INVALID_DATA_POINT_DATA_SOURCE_FAMILY", 400),
        ("INVALID_DATA_POINT_FILTER", 400),
        ("INVALID_DATA_POINT_FILTER_SYNTAX", 400),
        ("INVALID_DATA_POINT_FILTER_MISSING_TOKEN", 400),
        ("INVALID_DATA_POINT_FILTER_UNEXPECTED_TOKEN", 400),
        ("INVALID_DATA_POINT_FILTER_UNEXPECTED_END_OF_INPUT", 400),
        ("INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE", 400),
        ("INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARABLE", 400),
        ("INVALID_DATA_POINT_FILTER_DATA_TYPE_RESTRICTION", 400),
        ("INVALID_TIME_RANGE_INTERVAL_FORMAT", 400),
        ("INVALID_TIME_RANGE", 400),
        ("INVALID_ROLLUP_QUERY_DURATION", 400),
        ("INVALID_ROLLUP_WINDOW", 400),
        (
            "INVALID_DATA_POINT_FILTER_MIXED_DATA_TYPE_RESTRICTIONS",
            400,
        ),
        ("INVALID_DATA_POINT_FILTER_MIXED_TIME_RESTRICTIONS", 400),
        ("INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER", 400),
        ("INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR", 400),
        ("INVALID_DATA_POINT_FILTER_TIMESTAMP_FORMAT", 400),
        ("INVALID_DATA_POINT_FILTER_CIVIL_DATE_TIME_FORMAT", 400),
        ("INVALID_CIVIL_DATE_TIME", 400),
        ("INVALID_DATA_POINT_FILTER_RESTRICTION_ARGUMENT", 400),
        ("INVALID_DATA_POINT_FILTER_COLLECTION_MISMATCH", 400),
        ("INVALID_DATA_POINT_NAME", 400),
        ("DATA_POINT_NOT_OWNED_BY_CLIENT", 400),
        ("MISSING_DATA_POINT_NAMES", 400),
        ("MISSING_DATA_POINT_FILTER", 400),
        ("DATA_TYPE_MISMATCH", 400),
        ("UPDATE_ONLY_UPSERT_SUPPORTED", 400),
        ("MISSING_DATA_POINT_ID", 400),
        ("MISSING_DATA_POINT_VALUE", 400),
        ("INVALID_PROFILE_DATA", 400),
        ("INVALID_FIELD_MASK_DATA", 400),
        ("INVALID_PAGE_SIZE", 400),
        ("INVALID_PAGE_TOKEN", 400),
        ("MULTIPLE_DATA_TYPES_UNSUPPORTED", 400),
        ("UNSUPPORTED_DATA_TYPE_ACTION", 400),
        ("INVALID_DATA_TYPE", 400),
        ("MISSING_SUBSCRIBER", 400),
        ("INVALID_SUBSCRIBER_NAME", 400),
        ("MISSING_SUBSCRIPTION", 400),
        ("INVALID_SUBSCRIPTION_NAME", 400),
        ("MISSING_DATA_TYPES", 400),
        ("DATA_TYPES_CANNOT_BE_EMPTY", 400),
        ("MISSING_USER", 400),
        ("INVALID_USER_RESOURCE_NAME", 400),
        ("INVALID_DATA_TYPE_FORMAT", 400),
        ("MISSING_OAUTH_SCOPE", 403),
        ("DISALLOWED_OAUTH_SCOPES", 403),
        ("API_PRIVATE_PREVIEW_ACCESS_DENIED", 403),
        ("DATA_ACCESS_DENIED", 403),
        ("RESOURCE_PERMISSION_DENIED", 403),
        ("RESOURCE_NOT_FOUND", 404),
        ("SLEEP_ALREADY_EXISTS", 409),
        ("INTERNAL_ERROR", 500),
    ];

    #[test]
    fn test_other_refusals_are_permanent_with_the_code_not_the_message() {
        let e = classify(400, None, BAD_TYPE.as_bytes());
        assert_eq!(
            e,
            ProviderError::Permanent {
                kind: "provider",
                reason:
                    "google-health refused the request (400 INVALID_PARENT_DATA_TYPE_COLLECTION)"
                        .into()
            }
        );
        // a numeric-id parent: INVALID_ARGUMENT without details (§3.1)
        let bare = r#"{"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}}"#;
        assert_eq!(
            classify(400, None, bare.as_bytes()).to_string(),
            "google-health refused the request (400 INVALID_ARGUMENT)"
        );
        let disallowed = r#"{"error": {"code": 403, "message": "Request contains disallowed OAuth scope(s).", "status": "PERMISSION_DENIED",
          "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "DISALLOWED_OAUTH_SCOPES", "domain": "health.googleapis.com",
                       "metadata": {"disallowed_scopes": "cloud_platform"}}]}}"#;
        assert!(matches!(
            classify(403, None, disallowed.as_bytes()),
            ProviderError::Permanent { kind: "provider", reason } if reason.ends_with("(403 DISALLOWED_OAUTH_SCOPES)")
        ));
        assert_eq!(
            classify(410, None, b"").to_string(),
            "google-health refused the request (410)"
        );
        // every reason of the catalogue
        for (reason, status) in CATALOGUE {
            let body = format!(
                r#"{{"error":{{"code":{status},"message":"m","status":"S","details":[{{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"{reason}"}}]}}}}"#
            );
            let e = classify(status, None, body.as_bytes());
            let ok = match (reason, status) {
                ("ACCOUNT_NOT_LINKED", _) => matches!(e, ProviderError::GrantRevoked { .. }),
                ("MISSING_OAUTH_SCOPE", _) => e.to_string().starts_with(SCOPE_MISSING),
                (_, 500) => matches!(e, ProviderError::Transient { .. }),
                _ => {
                    matches!(&e, ProviderError::Permanent { reason: text, .. } if text.contains(reason))
                }
            };
            assert!(ok, "{reason} {status}: {e:?}");
        }
    }

    // ---- HTTP against a small simulator ----

    /// A request the simulator saw: `{type}/{collection call}`, its query, its body.
    type Seen = (String, HashMap<String, String>, String);

    #[derive(Clone, Default)]
    struct Sim {
        requests: Arc<Mutex<Vec<Seen>>>,
        /// page token → next token (`""`: last page); `start` is the first page.
        tokens: Arc<Mutex<HashMap<String, String>>>,
    }

    async fn data_points(
        State(sim): State<Sim>,
        Path((kind, rest)): Path<(String, String)>,
        Query(q): Query<HashMap<String, String>>,
        headers: HeaderMap,
        body: String,
    ) -> impl IntoResponse {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        sim.requests
            .lock()
            .unwrap()
            .push((format!("{kind}/{rest}"), q.clone(), body));
        if auth != "Bearer tok" {
            return (StatusCode::UNAUTHORIZED, UNAUTHENTICATED.to_owned());
        }
        if kind == "body-fat" {
            return (StatusCode::FORBIDDEN, MISSING_SCOPE.to_owned());
        }
        if rest == "dataPoints:dailyRollUp" {
            return (
                StatusCode::OK,
                r#"{"rollupDataPoints":[{"civilStartTime":{"date":{"year":2026,"month":8,"day":13},"time":{}},"steps":{"countSum":"1"}}]}"#.to_owned(),
            );
        }
        let at = q
            .get("pageToken")
            .cloned()
            .unwrap_or_else(|| "start".into());
        let next = sim
            .tokens
            .lock()
            .unwrap()
            .get(&at)
            .cloned()
            .unwrap_or_default();
        let body = serde_json::json!({
            "dataPoints": [{"heartRate": {"sampleTime": {"physicalTime": "2026-08-29T05:29:57Z"}, "beatsPerMinute": "61"}, "page": at}],
            "nextPageToken": next,
        });
        (StatusCode::OK, body.to_string())
    }

    async fn start(sim: Sim) -> Api {
        let router = Router::new()
            .route(
                "/v4/users/me/identity",
                get(|| async {
                    r#"{"name":"users/me/identity","healthUserId":"7583570207748835967"}"#
                }),
            )
            .route(
                "/v4/users/me/dataTypes/{kind}/{rest}",
                get(data_points).post(data_points),
            )
            .with_state(sim);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Api::new(
            reqwest::Client::new(),
            &format!("http://{addr}/"),
            Arc::new(crate::NoRateGate),
        )
    }

    #[tokio::test]
    async fn test_points_follow_page_tokens_with_the_filter_and_page_size() {
        let sim = Sim::default();
        sim.tokens.lock().unwrap().extend([
            ("start".to_owned(), "p2".to_owned()),
            ("p2".to_owned(), "p3".to_owned()),
            ("p3".to_owned(), String::new()),
        ]);
        let api = start(sim.clone()).await;
        let t = table();
        let rule = &t.types["heart-rate"];
        let (a, b) = (ms("2026-08-29T05:00:00Z"), ms("2026-08-29T06:00:00Z"));
        let (items, calls) = points(&api, "tok", rule, a, b).await.unwrap();
        assert_eq!(calls, 3);
        let pages: Vec<&str> = items.iter().map(|i| i["page"].as_str().unwrap()).collect();
        assert_eq!(pages, ["start", "p2", "p3"]);
        let requests = sim.requests.lock().unwrap().clone();
        assert_eq!(requests[0].0, "heart-rate/dataPoints:reconcile");
        assert_eq!(requests[0].1["filter"], filter(rule, a, b));
        assert_eq!(requests[0].1["pageSize"], "10000");
        assert!(!requests[0].1.contains_key("pageToken"));
        assert_eq!(requests[1].1["pageToken"], "p2");
        // an empty window asks nothing
        assert_eq!(points(&api, "tok", rule, b, a).await.unwrap(), (vec![], 0));
    }

    #[tokio::test]
    async fn test_a_repeated_page_token_is_a_provider_fault() {
        let sim = Sim::default();
        sim.tokens.lock().unwrap().extend([
            ("start".to_owned(), "p2".to_owned()),
            ("p2".to_owned(), "p2".to_owned()),
        ]);
        let api = start(sim.clone()).await;
        let t = table();
        let e = points(&api, "tok", &t.types["weight"], 0, 1_000)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Permanent { kind: "provider", reason } if reason.contains("repeated a page token")),
            "{e:?}"
        );
        assert_eq!(sim.requests.lock().unwrap().len(), 2);
        assert_eq!(sim.requests.lock().unwrap()[0].0, "weight/dataPoints");
    }

    #[tokio::test]
    async fn test_errors_of_calls_are_classified_with_the_data_type() {
        let api = start(Sim::default()).await;
        let t = table();
        let e = points(&api, "tok", &t.types["body-fat"], 0, 1_000)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Permanent { reason, .. } if reason.starts_with("scope_missing: data type body-fat")),
            "{e:?}"
        );
        let e = points(&api, "expired", &t.types["weight"], 0, 1_000)
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::TokenRejected { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn test_daily_roll_up_posts_civil_day_chunks() {
        let sim = Sim::default();
        let api = start(sim.clone()).await;
        let t = table();
        let (items, calls) = points(
            &api,
            "tok",
            &t.types["steps-daily"],
            ms("2026-08-01T00:00:00Z"),
            ms("2026-08-21T00:00:00Z"),
        )
        .await
        .unwrap();
        // 2026-07-31 ..< 2026-08-22: 22 days in chunks of 14
        assert_eq!(calls, 2);
        assert_eq!(items.len(), 2);
        let requests = sim.requests.lock().unwrap().clone();
        assert_eq!(requests[0].0, "steps/dataPoints:dailyRollUp");
        let bodies: Vec<Value> = requests
            .iter()
            .map(|r| serde_json::from_str(&r.2).unwrap())
            .collect();
        assert_eq!(
            bodies[0],
            roll_up_body("2026-07-31".parse().unwrap(), "2026-08-14".parse().unwrap())
        );
        assert_eq!(
            bodies[1],
            roll_up_body("2026-08-14".parse().unwrap(), "2026-08-22".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn test_identity_call() {
        let api = start(Sim::default()).await;
        let id = identity(&api, "tok").await.unwrap();
        assert_eq!(id.health_user_id, "7583570207748835967");
        assert_eq!(id.legacy_user_id, None);
    }
}
