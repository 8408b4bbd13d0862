//! Data API (`/v4/users/…`): routing of `/v4`, user authentication, the per-user rate
//! limit, identity, and list / get / reconcile with their paging.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::catalogue::{
    DataType, OP_DAILY_ROLLUP, OP_GET, OP_LIST, OP_RECONCILE, Rpc, reads_family,
};
use super::errors::{
    bare_error, envelope, error_info, filter_error, health_error, scope_insufficient,
    unauthenticated,
};
use super::filter::{compile_filter, eval, parse_filter};
use super::points::Point;
use super::rollup::daily_roll_up;
use super::state::{Inner, SimState, User};
use super::subscribers::project_call;
use super::time::parse_instant;
use super::{
    CLOUD_PLATFORM_SCOPE, DOMAIN_GOOGLEAPIS, DOMAIN_HEALTH, MSG_INVALID_ARGUMENT,
    MSG_PERMISSION_DENIED, SCOPE_PREFIX, SERVICE, SimConfig, TYPE_BAD_REQUEST, TYPE_QUOTA_FAILURE,
};
use crate::sim_support::{
    Params, bearer_or_access_token, param, parse_form, percent_decode, rate_limit_admit,
};

fn rate_limited(user: &str, limit: usize, retry_after: Option<i64>) -> Response {
    let message = format!(
        "Quota exceeded for quota metric 'Read requests per user' and limit 'Read requests per minute per user' of service '{SERVICE}' for consumer 'user:{user}'."
    );
    let mut resp = envelope(
        429,
        "RESOURCE_EXHAUSTED",
        &message,
        vec![
            error_info(
                "RATE_LIMIT_EXCEEDED",
                DOMAIN_GOOGLEAPIS,
                json!({
                    "service": SERVICE,
                    "quota_metric": "health.googleapis.com/user_requests",
                    "quota_limit": "RequestsPerMinutePerUser",
                    "quota_limit_value": limit.to_string(),
                    "quota_location": "global",
                    "consumer": format!("user:{user}"),
                }),
            ),
            json!({
                "@type": TYPE_QUOTA_FAILURE,
                "violations": [{ "subject": format!("user:{user}"), "description": "Quota exceeded" }],
            }),
        ],
    );
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn not_found() -> Response {
    bare_error(404, "Method not found.")
}

pub(super) fn unimplemented_rpc() -> Response {
    bare_error(
        501,
        "This method is not implemented by the Google Health simulator.",
    )
}

/// Which data-point call a `/v4/users/{u}/dataTypes/…` path is.
fn data_point_rpc(method: &Method, verb: Option<&str>, point: Option<&str>) -> Option<Rpc> {
    Some(match (point, verb) {
        (Some(id), None) if id.contains(':') => {
            Rpc::Unimplemented("DataPointsService.ExportExerciseTcx")
        }
        (Some(_), None) if *method == Method::GET => Rpc::Get,
        (Some(_), None) if *method == Method::PATCH => {
            Rpc::Unimplemented("DataPointsService.UpdateDataPoint")
        }
        (None, None) if *method == Method::GET => Rpc::List,
        (None, None) if *method == Method::POST => {
            Rpc::Unimplemented("DataPointsService.CreateDataPoint")
        }
        (None, Some("reconcile")) if *method == Method::GET => Rpc::Reconcile,
        (None, Some("rollUp")) if *method == Method::POST => {
            Rpc::Unimplemented("DataPointsService.RollUpDataPoints")
        }
        (None, Some("dailyRollUp")) if *method == Method::POST => Rpc::DailyRollUp,
        (None, Some("batchDelete")) if *method == Method::POST => {
            Rpc::Unimplemented("DataPointsService.BatchDeleteDataPoints")
        }
        _ => return None,
    })
}

pub(super) async fn v4(
    State(st): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = uri.path().strip_prefix("/v4/").unwrap_or("");
    let path = raw.replace("%3A", ":").replace("%3a", ":");
    let segs: Vec<String> = path.split('/').map(|s| percent_decode(s, false)).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = parse_form(uri.query().unwrap_or(""));
    match segs.as_slice() {
        ["users", user, "identity"] if method == Method::GET => {
            user_call(
                &st,
                Rpc::Identity,
                user,
                None,
                None,
                &query,
                &headers,
                &body,
            )
            .await
        }
        ["users", user, "dataTypes", t, last] => {
            let (coll, verb) = match last.split_once(':') {
                Some((c, v)) => (c, Some(v)),
                None => (*last, None),
            };
            match data_point_rpc(&method, verb, None) {
                Some(rpc) if coll == "dataPoints" => {
                    user_call(&st, rpc, user, Some(t), None, &query, &headers, &body).await
                }
                _ => not_found(),
            }
        }
        ["users", user, "dataTypes", t, "dataPoints", id] => {
            match data_point_rpc(&method, None, Some(id)) {
                Some(rpc) => {
                    user_call(&st, rpc, user, Some(t), Some(id), &query, &headers, &body).await
                }
                None => not_found(),
            }
        }
        ["projects", project, "subscribers"] => {
            let rpc = match method {
                Method::POST => Rpc::CreateSubscriber,
                Method::GET => Rpc::ListSubscribers,
                _ => return not_found(),
            };
            project_call(&st, rpc, project, None, &query, &headers, &body).await
        }
        ["projects", project, "subscribers", id] => {
            let rpc = match method {
                Method::DELETE => Rpc::DeleteSubscriber,
                Method::PATCH => Rpc::Unimplemented("DataSubscriptionService.UpdateSubscriber"),
                _ => return not_found(),
            };
            project_call(&st, rpc, project, Some(id), &query, &headers, &body).await
        }
        _ => not_found(),
    }
}

/// Authenticates a user call; `Ok` is (user id, granted scopes).
pub(super) fn authenticate_user(
    inner: &mut Inner,
    token: Option<String>,
    rpc: Rpc,
) -> Result<(String, Vec<String>), Box<Response>> {
    let Some(token) = token else {
        inner.unauthorized += 1;
        return Err(Box::new(unauthenticated("CREDENTIALS_MISSING", rpc)));
    };
    if inner.project_tokens.contains_key(&token) {
        return Err(Box::new(disallowed_scopes()));
    }
    let now = inner.now_s();
    let found = inner
        .access_tokens
        .get(&token)
        .and_then(|a| inner.grants.get(a.grant).map(|g| (a.expires_at, g)));
    match found {
        Some((_, g)) if g.revoked => {
            inner.unauthorized += 1;
            Err(Box::new(unauthenticated(
                "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                rpc,
            )))
        }
        Some((expires_at, _)) if now >= expires_at => {
            inner.unauthorized += 1;
            Err(Box::new(unauthenticated("ACCESS_TOKEN_EXPIRED", rpc)))
        }
        Some((_, g)) => Ok((g.user.clone(), g.scopes.clone())),
        None => {
            inner.unauthorized += 1;
            Err(Box::new(unauthenticated(
                "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                rpc,
            )))
        }
    }
}

fn disallowed_scopes() -> Response {
    health_error(
        403,
        "DISALLOWED_OAUTH_SCOPES",
        "Request contains disallowed OAuth scope(s).",
        json!({ "disallowed_scopes": "cloud_platform" }),
    )
}

#[allow(clippy::too_many_arguments)]
async fn user_call(
    st: &Arc<SimState>,
    rpc: Rpc,
    user_seg: &str,
    data_type: Option<&str>,
    point_id: Option<&str>,
    query: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let token = bearer_or_access_token(headers, query).map(str::to_owned);
    let mut inner = st.inner.lock().await;
    let (user_id, scopes) = match authenticate_user(&mut inner, token, rpc) {
        Ok(u) => u,
        Err(resp) => return *resp,
    };
    let now_ms = inner.now().timestamp_millis();
    let config = inner.config.clone();
    let limit = config.rate_limit_per_user;
    let send_retry_after = config.retry_after;
    let Some(user) = inner.users.get_mut(&user_id) else {
        return unauthenticated("ACCESS_TOKEN_TYPE_UNSUPPORTED", rpc);
    };
    user.stats.requests += 1;
    if let Err(secs) = rate_limit_admit(&mut user.rate_window, limit, now_ms) {
        user.stats.rate_limited += 1;
        return rate_limited(&user_id, limit, send_retry_after.then_some(secs));
    }
    if !rpc.accepts(&scopes) {
        return scope_insufficient(rpc);
    }
    if scopes.iter().any(|s| s == CLOUD_PLATFORM_SCOPE) {
        return disallowed_scopes();
    }
    let me_only = matches!(rpc, Rpc::List | Rpc::Reconcile | Rpc::DailyRollUp)
        || matches!(rpc, Rpc::Unimplemented(n) if n.contains("RollUp") || n.contains("BatchDelete"));
    if me_only && user_seg != "me" {
        return bare_error(400, MSG_INVALID_ARGUMENT);
    }
    if user_seg != "me" && user_seg != user_id {
        return bare_error(403, MSG_PERMISSION_DENIED);
    }
    let not_linked = || {
        health_error(
            400,
            "ACCOUNT_NOT_LINKED",
            "The Google account is not linked to a Fitbit account.",
            json!({}),
        )
    };
    let Some(type_id) = data_type else {
        // Identity.
        if !user.linked {
            return not_linked();
        }
        let mut identity = json!({ "name": "users/me/identity", "healthUserId": user_id });
        if let (Value::Object(m), Some(legacy)) = (&mut identity, &user.legacy_id) {
            m.insert("legacyUserId".into(), json!(legacy));
        }
        return axum::Json(identity).into_response();
    };
    let Some(t) = DataType::by_id(type_id) else {
        return envelope(
            400,
            "INVALID_ARGUMENT",
            &format!(
                "Invalid data type ID referenced in the parent data type collection: {type_id}"
            ),
            vec![
                error_info(
                    "INVALID_PARENT_DATA_TYPE_COLLECTION",
                    DOMAIN_HEALTH,
                    json!({ "dataType": type_id }),
                ),
                json!({
                    "@type": TYPE_BAD_REQUEST,
                    "fieldViolations": [{
                        "field": "parent",
                        "description": format!("The data type ID '{type_id}' is not supported."),
                    }],
                }),
            ],
        );
    };
    let (op, op_name) = match rpc {
        Rpc::List => (OP_LIST, "list"),
        Rpc::Reconcile => (OP_RECONCILE, "reconcile"),
        Rpc::Get => (OP_GET, "get"),
        Rpc::DailyRollUp => (OP_DAILY_ROLLUP, "dailyRollUp"),
        _ => return unimplemented_rpc(),
    };
    if !t.supports(op) {
        return health_error(
            400,
            "UNSUPPORTED_DATA_TYPE_ACTION",
            &format!(
                "The data type '{}' does not support the {op_name} action.",
                t.id
            ),
            json!({ "dataType": t.id }),
        );
    }
    if !reads_family(&scopes, t.family) {
        return health_error(
            403,
            "MISSING_OAUTH_SCOPE",
            &format!(
                "The request is missing an OAuth scope that grants access to data type '{}' ({SCOPE_PREFIX}{}.readonly).",
                t.id, t.family
            ),
            json!({ "dataType": t.id }),
        );
    }
    if !user.linked {
        return not_linked();
    }
    *user.stats.by_data_type.entry(t.id.to_owned()).or_default() += 1;
    let user = &*user;
    match (rpc, point_id) {
        (Rpc::DailyRollUp, _) => daily_roll_up(user, t, body),
        (Rpc::Get, Some(id)) => {
            let suffix = format!("/dataPoints/{id}");
            let found = user
                .points
                .get(t.id)
                .into_iter()
                .flat_map(BTreeMap::values)
                .find(|p| p.name.as_ref().is_some_and(|n| n.ends_with(&suffix)));
            match found {
                Some(p) => axum::Json(p.json.clone()).into_response(),
                None => health_error(
                    404,
                    "RESOURCE_NOT_FOUND",
                    &format!(
                        "Data point users/me/dataTypes/{}/dataPoints/{id} not found.",
                        t.id
                    ),
                    json!({}),
                ),
            }
        }
        _ => query_points(user, t, rpc, query, &config),
    }
}

/// Platforms and form factors of the source families.
pub(super) fn in_family(point: &Value, family: &str) -> bool {
    let platform = point
        .pointer("/dataSource/platform")
        .and_then(Value::as_str)
        .unwrap_or("");
    let form = point
        .pointer("/dataSource/device/formFactor")
        .and_then(Value::as_str)
        .unwrap_or("");
    match family {
        "google-wearables" => {
            platform == "FITBIT"
                || matches!(form, "FITNESS_BAND" | "WATCH" | "RING" | "CHEST_STRAP")
        }
        "google-sources" => matches!(platform, "FITBIT" | "FIT" | "NEST"),
        _ => true,
    }
}

/// The family of a `dataSourceFamily` (`users/{u}/dataSourceFamilies/{family}`; absent:
/// `all-sources`), else 400 `INVALID_DATA_POINT_DATA_SOURCE_FAMILY`.
pub(super) fn source_family(value: Option<&str>) -> Result<String, Box<Response>> {
    let Some(f) = value else {
        return Ok("all-sources".to_owned());
    };
    let parts: Vec<&str> = f.split('/').collect();
    match parts.as_slice() {
        ["users", _, "dataSourceFamilies", fam]
            if matches!(*fam, "all-sources" | "google-wearables" | "google-sources") =>
        {
            Ok((*fam).to_owned())
        }
        _ => Err(Box::new(health_error(
            400,
            "INVALID_DATA_POINT_DATA_SOURCE_FAMILY",
            &format!("Invalid data source family: {f}"),
            json!({}),
        ))),
    }
}

fn page_token(rpc: Rpc, t: &DataType, filter: &str, family: &str, last: &Point) -> String {
    let body = json!({
        "m": if rpc == Rpc::Reconcile { "r" } else { "l" },
        "t": t.id,
        "f": filter,
        "s": family,
        "k": [last.times.start.to_rfc3339_opts(SecondsFormat::Nanos, true), last.name.clone().unwrap_or_default()],
    });
    URL_SAFE_NO_PAD.encode(body.to_string())
}

/// The cursor of a page token, if it belongs to this query.
fn read_page_token(
    token: &str,
    rpc: Rpc,
    t: &DataType,
    filter: &str,
    family: &str,
) -> Option<(DateTime<Utc>, String)> {
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    let m = if rpc == Rpc::Reconcile { "r" } else { "l" };
    let matches = v.get("m")?.as_str()? == m
        && v.get("t")?.as_str()? == t.id
        && v.get("f")?.as_str()? == filter
        && v.get("s")?.as_str()? == family;
    if !matches {
        return None;
    }
    let start = parse_instant(v.pointer("/k/0")?.as_str()?)?;
    let name = v.pointer("/k/1")?.as_str()?.to_owned();
    Some((start, name))
}

fn query_points(
    user: &User,
    t: &DataType,
    rpc: Rpc,
    query: &Params,
    config: &SimConfig,
) -> Response {
    let filter = query.get("filter").cloned().unwrap_or_default();
    let cond = match parse_filter(&filter) {
        Ok(None) => None,
        Ok(Some(e)) => match compile_filter(t, &e) {
            Ok(c) => Some(c),
            Err(e) => return filter_error(&e),
        },
        Err(e) => return filter_error(&e),
    };
    let family = if rpc == Rpc::Reconcile {
        match source_family(param(query, "dataSourceFamily")) {
            Ok(f) => f,
            Err(resp) => return *resp,
        }
    } else {
        "all-sources".to_owned()
    };
    let (default_size, max_size) = t.page_limits();
    let size = match query.get("pageSize").map(String::as_str) {
        None | Some("") => default_size,
        Some(s) => match s.parse::<i64>() {
            Err(_) => {
                return envelope(
                    400,
                    "INVALID_ARGUMENT",
                    &format!("Invalid value at 'page_size' (TYPE_INT32), \"{s}\""),
                    vec![json!({
                        "@type": TYPE_BAD_REQUEST,
                        "fieldViolations": [{
                            "field": "page_size",
                            "description": format!("Invalid value at 'page_size' (TYPE_INT32), \"{s}\""),
                        }],
                    })],
                );
            }
            Ok(n) if n < 0 => {
                return health_error(
                    400,
                    "INVALID_PAGE_SIZE",
                    &format!("Invalid page size {n}: must not be negative."),
                    json!({}),
                );
            }
            Ok(0) => default_size,
            Ok(n) => usize::try_from(n).unwrap_or(max_size).min(max_size),
        },
    };
    let cursor = match param(query, "pageToken") {
        None => None,
        Some(tok) => match read_page_token(tok, rpc, t, &filter, &family) {
            Some(c) => Some(c),
            None => {
                return health_error(400, "INVALID_PAGE_TOKEN", "Invalid page token.", json!({}));
            }
        },
    };
    let mut matched: Vec<&Point> = user
        .points
        .get(t.id)
        .into_iter()
        .flat_map(BTreeMap::values)
        .filter(|p| cond.as_ref().is_none_or(|c| eval(c, &p.times)))
        .filter(|p| in_family(&p.json, &family))
        .filter(|p| match &cursor {
            None => true,
            Some((start, _)) if config.drop_ties => p.times.start < *start,
            Some((start, name)) => p.order() < (*start, name.as_str()),
        })
        .collect();
    matched.sort_by(|a, b| b.order().cmp(&a.order()));
    let more = matched.len() > size;
    matched.truncate(size);
    let mut out = Map::new();
    if !matched.is_empty() {
        let points: Vec<Value> = matched
            .iter()
            .map(|p| {
                if rpc == Rpc::Reconcile {
                    reconciled(t, p)
                } else {
                    p.json.clone()
                }
            })
            .collect();
        out.insert("dataPoints".into(), Value::Array(points));
    }
    match matched.last() {
        Some(last) if more => {
            out.insert(
                "nextPageToken".into(),
                json!(page_token(rpc, t, &filter, &family, last)),
            );
        }
        _ if config.empty_next_page_token => {
            out.insert("nextPageToken".into(), json!(""));
        }
        _ => {}
    }
    axum::Json(Value::Object(out)).into_response()
}

/// A `ReconciledDataPoint`: the union member, `dataPointName` for named points, no `dataSource`.
fn reconciled(t: &DataType, p: &Point) -> Value {
    let mut out = Map::new();
    if let Some(n) = &p.name {
        out.insert("dataPointName".into(), json!(n));
    }
    if let Some(v) = p.json.get(t.key) {
        out.insert(t.key.into(), v.clone());
    }
    Value::Object(out)
}
