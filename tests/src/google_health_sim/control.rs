//! Control API (`/_sim`, listed at [`router`](super::router)) and the keyset endpoint.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use super::catalogue::{DataType, is_known_scope, scope_url};
use super::points::interval_json;
use super::state::{SimState, notification};
use super::time::{local, parse_duration_secs, parse_instant, rfc3339};
use super::webhooks::{Tamper, after_delivered, attempt_once, batch_body, deliver};
use super::{AppSeed, SimConfig, StoreError, UserSeed};
use crate::sim_support::{json_body, sim_error};

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::UnknownUser(_) => sim_error(StatusCode::NOT_FOUND, e.to_string()),
        _ => sim_error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

pub(super) async fn keyset(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(st.keyset().await).into_response()
}

pub(super) async fn sim_apps(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let app: AppSeed = match json_body(&body) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    if app.client_id.is_empty() {
        return sim_error(StatusCode::BAD_REQUEST, "client_id must not be empty");
    }
    let answer = json!({ "client_id": app.client_id, "testing": app.testing });
    st.add_app(app).await;
    axum::Json(answer).into_response()
}

pub(super) async fn sim_users(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let seed: UserSeed = match json_body(&body) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    if seed.health_user_id.is_empty() {
        return sim_error(StatusCode::BAD_REQUEST, "healthUserId must not be empty");
    }
    if let Some(bad) = seed
        .scopes
        .iter()
        .flatten()
        .map(|s| scope_url(s))
        .find(|s| !is_known_scope(s))
    {
        return sim_error(StatusCode::BAD_REQUEST, format!("unknown scope {bad:?}"));
    }
    axum::Json(st.add_user(seed).await).into_response()
}

#[derive(Deserialize)]
struct SeedBody {
    #[serde(rename = "dataType")]
    data_type: String,
    points: Vec<Value>,
}

pub(super) async fn sim_seed(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let b: SeedBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let before: usize = inner.subscribers.values().map(|s| s.pending.len()).sum();
    match inner.upsert_points(&user, &b.data_type, b.points) {
        Ok(n) => {
            let after: usize = inner.subscribers.values().map(|s| s.pending.len()).sum();
            axum::Json(json!({ "stored": n, "notifications": after.saturating_sub(before) }))
                .into_response()
        }
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
struct DeleteBody {
    #[serde(rename = "dataType")]
    data_type: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(rename = "startTimes", default)]
    start_times: Vec<String>,
}

pub(super) async fn sim_delete_points(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let b: DeleteBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    match st
        .delete_points(&user, &b.data_type, &b.names, &b.start_times)
        .await
    {
        Ok(n) => axum::Json(json!({ "deleted": n })).into_response(),
        Err(e) => store_error(&e),
    }
}

pub(super) async fn sim_revoke_tokens(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&user) {
        return store_error(&StoreError::UnknownUser(user));
    }
    let n = inner.revoke_user(&user);
    axum::Json(json!({ "revoked": n })).into_response()
}

pub(super) async fn sim_expire_access(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&user) {
        return store_error(&StoreError::UnknownUser(user));
    }
    let n = inner.expire_access(&user);
    axum::Json(json!({ "expired": n })).into_response()
}

#[derive(Deserialize)]
struct ProjectBody {
    number: String,
    token: String,
}

pub(super) async fn sim_projects(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: ProjectBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if b.number.is_empty() || b.token.is_empty() {
        return sim_error(
            StatusCode::BAD_REQUEST,
            "number and token must not be empty",
        );
    }
    st.add_project(&b.number, &b.token).await;
    axum::Json(json!({ "number": b.number, "token": b.token })).into_response()
}

pub(super) async fn sim_get_config(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(st.config().await).into_response()
}

pub(super) async fn sim_set_config(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let patch: Map<String, Value> = match json_body(&body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let mut current = match serde_json::to_value(&inner.config) {
        Ok(Value::Object(m)) => m,
        _ => return sim_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the config"),
    };
    for (k, v) in patch {
        if !current.contains_key(&k) {
            return sim_error(StatusCode::BAD_REQUEST, format!("unknown config key {k:?}"));
        }
        current.insert(k, v);
    }
    let config: SimConfig = match serde_json::from_value(Value::Object(current)) {
        Ok(c) => c,
        Err(e) => return sim_error(StatusCode::BAD_REQUEST, format!("invalid config: {e}")),
    };
    if HeaderName::from_bytes(config.signature_header.as_bytes()).is_err() {
        return sim_error(
            StatusCode::BAD_REQUEST,
            "signature_header is not a header name",
        );
    }
    inner.config = config.clone();
    axum::Json(config).into_response()
}

#[derive(Deserialize, Default)]
struct RotateBody {
    #[serde(default)]
    drop_old: bool,
}

pub(super) async fn sim_rotate(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: RotateBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let primary = inner.rotate_keys(b.drop_old);
    let ids: Vec<u32> = inner.keys.iter().map(|k| k.id).collect();
    axum::Json(json!({ "primaryKeyId": primary, "keyIds": ids })).into_response()
}

#[derive(Deserialize)]
struct NotifyBody {
    #[serde(rename = "healthUserId")]
    health_user_id: String,
    #[serde(rename = "dataType")]
    data_type: String,
    #[serde(default)]
    operation: Option<String>,
    start: String,
    #[serde(default)]
    end: Option<String>,
    #[serde(rename = "utcOffset", default)]
    utc_offset: Option<String>,
    #[serde(default)]
    tamper: Option<String>,
    #[serde(default)]
    subscriber: Option<String>,
}

pub(super) async fn sim_notify(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: NotifyBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let tamper = match b.tamper.as_deref() {
        None | Some("" | "none") => Tamper::None,
        Some("body") => Tamper::Body,
        Some("signature") => Tamper::Signature,
        Some("unknown_key") => Tamper::UnknownKey,
        Some(other) => {
            return sim_error(
                StatusCode::BAD_REQUEST,
                format!("tamper must be body, signature or unknown_key, not {other:?}"),
            );
        }
    };
    if DataType::by_id(&b.data_type).is_none() {
        return sim_error(
            StatusCode::BAD_REQUEST,
            format!("unknown data type {:?}", b.data_type),
        );
    }
    let (Some(start), Some(end)) = (
        parse_instant(&b.start),
        parse_instant(b.end.as_deref().unwrap_or(&b.start)),
    ) else {
        return sim_error(StatusCode::BAD_REQUEST, "start and end must be RFC 3339");
    };
    let offset = match b.utc_offset.as_deref() {
        None => 0,
        Some(s) => match parse_duration_secs(s) {
            Some(o) => o,
            None => {
                return sim_error(
                    StatusCode::BAD_REQUEST,
                    "utcOffset must look like \"-18000s\"",
                );
            }
        },
    };
    let operation = b.operation.unwrap_or_else(|| "UPSERT".to_owned());
    let interval = interval_json(start, end, local(start, offset), local(end, offset));
    let (targets, single) = {
        let inner = st.inner.lock().await;
        let targets: Vec<(String, Arc<Notify>)> = inner
            .subscriber_order
            .iter()
            .filter_map(|n| inner.subscribers.get(n).map(|s| (n, s)))
            .filter(|(n, s)| {
                s.data_types.contains(&b.data_type)
                    && b.subscriber.as_ref().is_none_or(|want| want == *n)
            })
            .map(|(n, s)| (n.clone(), Arc::clone(&s.wake)))
            .collect();
        (targets, inner.config.single_object)
    };
    if targets.is_empty() {
        return sim_error(
            StatusCode::CONFLICT,
            format!("no subscriber for data type {:?}", b.data_type),
        );
    }
    let mut results = Vec::new();
    for (name, wake) in targets {
        let item = notification(
            &b.health_user_id,
            &b.data_type,
            &operation,
            interval.clone(),
        );
        let body = batch_body(vec![item], single);
        let outcome = attempt_once(&st, &name, &wake, &body, tamper).await;
        let outcome = outcome.unwrap_or_else(|| Err("subscriber deleted".to_owned()));
        if tamper == Tamper::None {
            if outcome == Ok(204) {
                after_delivered(&st, &name, &wake, &body, 1).await;
            } else {
                let st = Arc::clone(&st);
                let (name, wake) = (name.clone(), Arc::clone(&wake));
                tokio::spawn(async move {
                    deliver(&st, &name, &wake, &body, 1, 1).await;
                });
            }
        }
        let mut r = json!({
            "subscriber": name,
            "status": outcome.as_ref().ok(),
            "delivered": outcome == Ok(204),
        });
        if let (Err(e), Value::Object(m)) = (&outcome, &mut r) {
            m.insert("error".into(), json!(e));
        }
        results.push(r);
    }
    let first = results.first().cloned().unwrap_or(Value::Null);
    axum::Json(json!({
        "status": first.get("status").cloned().unwrap_or(Value::Null),
        "delivered": first.get("delivered").cloned().unwrap_or(json!(false)),
        "results": results,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AdvanceBody {
    seconds: i64,
}

pub(super) async fn sim_clock_advance(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: AdvanceBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let now = st.advance_clock(b.seconds).await;
    let time = DateTime::<Utc>::from_timestamp(now, 0).map(rfc3339);
    axum::Json(json!({ "now": now, "time": time })).into_response()
}

pub(super) async fn sim_stats(State(st): State<Arc<SimState>>) -> Response {
    let inner = st.inner.lock().await;
    let users: Map<String, Value> = inner
        .users
        .iter()
        .map(|(id, u)| {
            let s = &u.stats;
            (
                id.clone(),
                json!({
                    "requests": s.requests,
                    "by_data_type": s.by_data_type,
                    "refreshes": s.refreshes,
                    "code_exchanges": s.code_exchanges,
                    "rate_limited": s.rate_limited,
                }),
            )
        })
        .collect();
    let n = &inner.notify;
    let pending: usize = inner.subscribers.values().map(|s| s.pending.len()).sum();
    axum::Json(json!({
        "users": users,
        "notifications": {
            "attempts": n.attempts,
            "delivered": n.delivered,
            "notifications_delivered": n.notifications_delivered,
            "dropped": n.dropped,
            "pending": pending,
            "by_status": n.by_status,
        },
        "verifications": { "attempts": n.verifications, "passed": n.verifications_passed },
        "unauthorized": inner.unauthorized,
    }))
    .into_response()
}
