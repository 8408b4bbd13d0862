//! Subscriber API (`/v4/projects/{number}/subscribers`): create (with the verification
//! handshake), list, delete.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use super::catalogue::{DataType, Rpc};
use super::data::{authenticate_user, unimplemented_rpc};
use super::errors::{
    bare_error, envelope, error_info, health_error, scope_insufficient, unauthenticated,
};
use super::state::{SimState, Subscriber};
use super::time::rfc3339;
use super::webhooks::{subscriber_worker, verify_endpoint};
use super::{
    MSG_INVALID_ARGUMENT, MSG_PERMISSION_DENIED, SUBSCRIBER_DEFAULT_PAGE, SUBSCRIBER_MAX_PAGE,
    TYPE_EMPTY, TYPE_SUBSCRIBER,
};
use crate::sim_support::{Params, bearer_or_access_token, param};

fn valid_subscriber_id(id: &str) -> bool {
    let b = id.as_bytes();
    (4..=36).contains(&b.len())
        && b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn operation(response: Value) -> Value {
    json!({
        "name": format!("operations/{}", uuid::Uuid::new_v4()),
        "done": true,
        "response": response,
    })
}

pub(super) async fn project_call(
    st: &Arc<SimState>,
    rpc: Rpc,
    project: &str,
    sub_id: Option<&str>,
    query: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let token = bearer_or_access_token(headers, query).map(str::to_owned);
    {
        let mut inner = st.inner.lock().await;
        let Some(token) = token else {
            inner.unauthorized += 1;
            return unauthenticated("CREDENTIALS_MISSING", rpc);
        };
        match inner.project_tokens.get(&token) {
            Some(owner) => {
                if project.is_empty() || !project.bytes().all(|b| b.is_ascii_digit()) {
                    return bare_error(403, MSG_PERMISSION_DENIED);
                }
                if owner != project {
                    let permission = match rpc {
                        Rpc::CreateSubscriber => "health.subscribers.create",
                        Rpc::ListSubscribers => "health.subscribers.list",
                        Rpc::DeleteSubscriber => "health.subscribers.delete",
                        _ => "health.subscribers.update",
                    };
                    return envelope(
                        403,
                        "PERMISSION_DENIED",
                        &format!(
                            "Permission '{permission}' denied on resource 'projects/{project}' (or it may not exist)."
                        ),
                        vec![error_info(
                            "IAM_PERMISSION_DENIED",
                            "iam.googleapis.com",
                            json!({ "permission": permission, "resource": format!("projects/{project}") }),
                        )],
                    );
                }
            }
            None => {
                if inner.access_tokens.contains_key(&token) {
                    if authenticate_user(&mut inner, Some(token), rpc).is_err() {
                        return unauthenticated("ACCESS_TOKEN_EXPIRED", rpc);
                    }
                    return scope_insufficient(rpc);
                }
                inner.unauthorized += 1;
                return unauthenticated("ACCESS_TOKEN_TYPE_UNSUPPORTED", rpc);
            }
        }
    }
    match (rpc, sub_id) {
        (Rpc::CreateSubscriber, _) => create_subscriber(st, project, query, body).await,
        (Rpc::ListSubscribers, _) => list_subscribers(st, project, query).await,
        (Rpc::DeleteSubscriber, Some(id)) => delete_subscriber(st, project, id).await,
        _ => unimplemented_rpc(),
    }
}

fn invalid_argument(message: &str) -> Response {
    bare_error(400, message)
}

async fn create_subscriber(
    st: &Arc<SimState>,
    project: &str,
    query: &Params,
    body: &Bytes,
) -> Response {
    let id = match param(query, "subscriberId") {
        Some(id) if valid_subscriber_id(id) => id.to_owned(),
        Some(id) => {
            return health_error(
                400,
                "INVALID_SUBSCRIBER_NAME",
                &format!(
                    "Invalid subscriber ID '{id}': it must be 4-36 characters matching [a-z]([a-z0-9-]{{2,34}}[a-z0-9])."
                ),
                json!({}),
            );
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let payload: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return invalid_argument(
                "Invalid JSON payload received. Expected a CreateSubscriberPayload object.",
            );
        }
    };
    let Some(endpoint) = payload
        .get("endpointUri")
        .and_then(Value::as_str)
        .filter(|u| {
            reqwest::Url::parse(u)
                .is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some())
        })
        .map(str::to_owned)
    else {
        return invalid_argument("endpointUri is required and must be a valid HTTPS URL.");
    };
    let Some(secret) = payload
        .pointer("/endpointAuthorization/secret")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
    else {
        return invalid_argument("endpointAuthorization.secret is required.");
    };
    let mut configs = Vec::new();
    let mut data_types = BTreeSet::new();
    let given = match payload.get("subscriberConfigs") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return invalid_argument("subscriberConfigs must be a list."),
    };
    for c in given {
        let types: Vec<String> = match c.get("dataTypes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if types.is_empty() {
            return health_error(
                400,
                "DATA_TYPES_CANNOT_BE_EMPTY",
                "subscriberConfigs.dataTypes cannot be empty.",
                json!({}),
            );
        }
        for ty in &types {
            match DataType::by_id(ty) {
                None => return invalid_argument(MSG_INVALID_ARGUMENT),
                Some(d) if !d.webhook => {
                    return health_error(
                        400,
                        "INVALID_DATA_TYPE",
                        &format!("Data type '{ty}' does not support notifications."),
                        json!({ "dataType": ty }),
                    );
                }
                Some(_) => {
                    data_types.insert(ty.clone());
                }
            }
        }
        let policy = c
            .get("subscriptionCreatePolicy")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !matches!(policy, "AUTOMATIC" | "MANUAL") {
            return invalid_argument(
                "subscriptionCreatePolicy is required and must be AUTOMATIC or MANUAL.",
            );
        }
        configs.push(json!({ "dataTypes": types, "subscriptionCreatePolicy": policy }));
    }
    let name = format!("projects/{project}/subscribers/{id}");
    if st.inner.lock().await.subscribers.contains_key(&name) {
        return envelope(
            409,
            "ALREADY_EXISTS",
            &format!("Subscriber {name} already exists."),
            vec![],
        );
    }
    if let Err(why) = verify_endpoint(st, &endpoint, &secret).await {
        return envelope(
            400,
            "FAILED_PRECONDITION",
            &format!("Endpoint verification failed for {endpoint}: {why}"),
            vec![],
        );
    }
    let wake = Arc::new(Notify::new());
    let (sub_json, bare) = {
        let mut inner = st.inner.lock().await;
        let created = rfc3339(inner.now());
        let sub = Subscriber {
            project: project.to_owned(),
            id,
            endpoint_uri: endpoint,
            secret,
            configs,
            data_types,
            create_time: created,
            pending: VecDeque::new(),
            wake: Arc::clone(&wake),
        };
        let json = sub.to_json();
        inner.subscribers.insert(name.clone(), sub);
        inner.subscriber_order.retain(|n| *n != name);
        inner.subscriber_order.push(name.clone());
        (json, inner.config.bare_subscriber)
    };
    tokio::spawn(subscriber_worker(Arc::clone(st), name, wake));
    if bare {
        return axum::Json(sub_json).into_response();
    }
    let mut response = json!({ "@type": TYPE_SUBSCRIBER });
    if let (Value::Object(m), Value::Object(s)) = (&mut response, sub_json) {
        m.extend(s);
    }
    axum::Json(operation(response)).into_response()
}

async fn list_subscribers(st: &Arc<SimState>, project: &str, query: &Params) -> Response {
    let inner = st.inner.lock().await;
    let all: Vec<&Subscriber> = inner
        .subscriber_order
        .iter()
        .filter_map(|n| inner.subscribers.get(n))
        .filter(|s| s.project == project)
        .collect();
    let size = param(query, "pageSize")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(SUBSCRIBER_DEFAULT_PAGE)
        .min(SUBSCRIBER_MAX_PAGE);
    let offset = match param(query, "pageToken") {
        None => 0,
        Some(tok) => match URL_SAFE_NO_PAD
            .decode(tok)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("subscribers:").and_then(|n| n.parse().ok()))
        {
            Some(n) => n,
            None => return invalid_argument("Invalid page token."),
        },
    };
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(size)
        .map(|s| s.to_json())
        .collect();
    let mut out = Map::new();
    if !page.is_empty() {
        out.insert("subscribers".into(), Value::Array(page));
    }
    if !all.is_empty() {
        out.insert("totalSize".into(), json!(all.len()));
    }
    if offset + size < all.len() {
        out.insert(
            "nextPageToken".into(),
            json!(URL_SAFE_NO_PAD.encode(format!("subscribers:{}", offset + size))),
        );
    }
    axum::Json(Value::Object(out)).into_response()
}

async fn delete_subscriber(st: &Arc<SimState>, project: &str, id: &str) -> Response {
    let name = format!("projects/{project}/subscribers/{id}");
    let mut inner = st.inner.lock().await;
    let Some(sub) = inner.subscribers.remove(&name) else {
        return health_error(
            404,
            "RESOURCE_NOT_FOUND",
            &format!("Subscriber {name} not found."),
            json!({}),
        );
    };
    inner.subscriber_order.retain(|n| *n != name);
    sub.wake.notify_one();
    axum::Json(operation(json!({ "@type": TYPE_EMPTY }))).into_response()
}
