//! Webhook notifications: Tink / ECDSA signatures, the verification handshake, deliveries
//! with retries and batching, and the tamper hooks.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer as _;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::state::{SimState, new_key_id, new_signing_key};
use super::{MAX_BATCH, NOTIFICATION_USER_AGENT, VERIFICATION_TIMEOUT, VERIFIER_USER_AGENT};

// ---------------------------------------------------------------------------
// Tink / ECDSA
// ---------------------------------------------------------------------------

/// The serialized `google.crypto.tink.EcdsaPublicKey`, as Google publishes it: version (0)
/// omitted, params `{hash_type: SHA256, curve: NIST_P256, encoding: DER}`, x and y as 33 bytes
/// with a leading zero.
pub(super) fn ecdsa_public_key_proto(key: &SigningKey) -> Vec<u8> {
    let point = key.verifying_key().to_encoded_point(false);
    let mut out = vec![0x12, 0x06, 0x08, 0x03, 0x10, 0x02, 0x18, 0x02];
    for (tag, coord) in [(0x1a_u8, point.x()), (0x22_u8, point.y())] {
        out.push(tag);
        out.push(33);
        out.push(0);
        if let Some(c) = coord {
            out.extend_from_slice(c);
        }
    }
    out
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` from the 64-byte `r ‖ s`.
fn der_signature(rs: &[u8]) -> Vec<u8> {
    fn integer(b: &[u8]) -> Vec<u8> {
        let trimmed: Vec<u8> = {
            let first = b
                .iter()
                .position(|x| *x != 0)
                .unwrap_or(b.len().saturating_sub(1));
            b.get(first..).unwrap_or(b).to_vec()
        };
        let mut body = Vec::with_capacity(trimmed.len() + 1);
        if trimmed.first().is_none_or(|x| *x >= 0x80) {
            body.push(0);
        }
        body.extend_from_slice(&trimmed);
        let mut out = vec![0x02, body.len() as u8];
        out.extend(body);
        out
    }
    let (r, s) = rs.split_at(rs.len() / 2);
    let mut seq = integer(r);
    seq.extend(integer(s));
    let mut out = vec![0x30, seq.len() as u8];
    out.extend(seq);
    out
}

/// `base64(0x01 ‖ key id big-endian ‖ DER ECDSA-P256-SHA256(body))`.
pub(super) fn tink_signature(key: &SigningKey, key_id: u32, body: &[u8]) -> String {
    let sig: p256::ecdsa::Signature = key.sign(body);
    let mut out = vec![0x01];
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend(der_signature(&sig.to_bytes()));
    STANDARD.encode(out)
}

// ---------------------------------------------------------------------------
// Webhook sender
// ---------------------------------------------------------------------------

/// One POST; the HTTP status or the transport error.
async fn post_json(
    st: &SimState,
    url: &str,
    body: Vec<u8>,
    authorization: Option<&str>,
    signature: Option<(&str, &str)>,
    user_agent: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let mut req = st
        .http
        .post(url)
        .timeout(timeout)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, user_agent)
        .body(body);
    if let Some(a) = authorization {
        req = req.header(header::AUTHORIZATION, a);
    }
    if let Some((name, value)) = signature
        && let Ok(name) = HeaderName::from_bytes(name.as_bytes())
    {
        req = req.header(name, value);
    }
    req.send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// The two-step handshake of `subscribers.create`.
pub(super) async fn verify_endpoint(
    st: &SimState,
    endpoint: &str,
    secret: &str,
) -> Result<(), String> {
    let body = json!({ "type": "verification" }).to_string().into_bytes();
    let (header_name, signature) = {
        let mut inner = st.inner.lock().await;
        inner.notify.verifications += 1;
        let sig = inner.config.sign_verification.then(|| inner.sign(&body));
        (inner.config.signature_header.clone(), sig)
    };
    let sig = signature.as_deref().map(|s| (header_name.as_str(), s));
    let first = post_json(
        st,
        endpoint,
        body.clone(),
        Some(secret),
        sig,
        VERIFIER_USER_AGENT,
        VERIFICATION_TIMEOUT,
    )
    .await;
    match first {
        Ok(200 | 201) => {}
        Ok(s) => {
            return Err(format!(
                "the request with the Authorization header got HTTP {s} (expected 200 or 201)"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the request with the Authorization header failed: {e}"
            ));
        }
    }
    let second = post_json(
        st,
        endpoint,
        body,
        None,
        sig,
        VERIFIER_USER_AGENT,
        VERIFICATION_TIMEOUT,
    )
    .await;
    match second {
        Ok(401 | 403) => {}
        Ok(s) => {
            return Err(format!(
                "the request without an Authorization header got HTTP {s} (expected 401 or 403)"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the request without an Authorization header failed: {e}"
            ));
        }
    }
    st.inner.lock().await.notify.verifications_passed += 1;
    Ok(())
}

/// How a test send is spoiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tamper {
    None,
    /// Signed over the original body, sent with `operation` flipped.
    Body,
    /// One bit of the DER signature flipped.
    Signature,
    /// Signed by a key (and key id) that is not in the keyset.
    UnknownKey,
}

fn tamper_body(body: &[u8]) -> Vec<u8> {
    fn flip(v: &mut Value) {
        match v {
            Value::Array(a) => a.iter_mut().for_each(flip),
            Value::Object(m) => {
                if let Some(Value::Object(data)) = m.get_mut("data")
                    && let Some(op) = data.get_mut("operation")
                {
                    let flipped = if op.as_str() == Some("DELETE") {
                        "UPSERT"
                    } else {
                        "DELETE"
                    };
                    *op = json!(flipped);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => {
            flip(&mut v);
            serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
        }
        Err(_) => {
            let mut b = body.to_vec();
            b.push(b' ');
            b
        }
    }
}

/// One delivery attempt to a subscriber (if it still exists), counted in the stats.
pub(super) async fn attempt_once(
    st: &SimState,
    name: &str,
    wake: &Arc<Notify>,
    body: &[u8],
    tamper: Tamper,
) -> Option<Result<u16, String>> {
    let (url, authorization, header_name, signature, sent, timeout) = {
        let inner = st.inner.lock().await;
        let sub = inner
            .subscribers
            .get(name)
            .filter(|s| Arc::ptr_eq(&s.wake, wake))?;
        let signature = match tamper {
            Tamper::None | Tamper::Body => inner.sign(body),
            Tamper::Signature => {
                let mut raw = STANDARD.decode(inner.sign(body)).unwrap_or_default();
                if let Some(last) = raw.last_mut() {
                    *last ^= 0x01;
                }
                STANDARD.encode(raw)
            }
            Tamper::UnknownKey => tink_signature(&new_signing_key(), new_key_id(&inner.keys), body),
        };
        let sent = if tamper == Tamper::Body {
            tamper_body(body)
        } else {
            body.to_vec()
        };
        (
            sub.endpoint_uri.clone(),
            inner.config.send_authorization.then(|| sub.secret.clone()),
            inner.config.signature_header.clone(),
            signature,
            sent,
            Duration::from_millis(inner.config.delivery_timeout_ms),
        )
    };
    let outcome = post_json(
        st,
        &url,
        sent,
        authorization.as_deref(),
        Some((&header_name, &signature)),
        NOTIFICATION_USER_AGENT,
        timeout,
    )
    .await;
    let mut inner = st.inner.lock().await;
    inner.notify.attempts += 1;
    let key = match &outcome {
        Ok(s) => s.to_string(),
        Err(_) => "error".to_owned(),
    };
    *inner.notify.by_status.entry(key).or_default() += 1;
    if outcome == Ok(204) {
        inner.notify.delivered += 1;
    }
    drop(inner);
    tracing::debug!(url, ?outcome, "google-health-sim notification attempt");
    Some(outcome)
}

/// After a 204: counts the notifications and, with `duplicate`, sends the same POST again.
pub(super) async fn after_delivered(
    st: &SimState,
    name: &str,
    wake: &Arc<Notify>,
    body: &[u8],
    items: usize,
) {
    let duplicate = {
        let mut inner = st.inner.lock().await;
        inner.notify.notifications_delivered += items as u64;
        inner.config.duplicate
    };
    if duplicate {
        attempt_once(st, name, wake, body, Tamper::None).await;
    }
}

/// Attempts from `first_attempt` on, with exponential backoff, until a 204 or the last attempt.
pub(super) async fn deliver(
    st: &SimState,
    name: &str,
    wake: &Arc<Notify>,
    body: &[u8],
    items: usize,
    first_attempt: u32,
) -> bool {
    let mut attempt = first_attempt;
    loop {
        let (max_attempts, base_ms) = {
            let inner = st.inner.lock().await;
            (inner.config.max_attempts.max(1), inner.config.retry_base_ms)
        };
        if attempt >= max_attempts {
            st.inner.lock().await.notify.dropped += items as u64;
            return false;
        }
        if attempt > 0 {
            let factor = 1u64 << (attempt - 1).min(20);
            tokio::time::sleep(Duration::from_millis(base_ms.saturating_mul(factor))).await;
        }
        match attempt_once(st, name, wake, body, Tamper::None).await {
            None => return false,
            Some(Ok(204)) => {
                after_delivered(st, name, wake, body, items).await;
                return true;
            }
            Some(_) => attempt += 1,
        }
    }
}

/// Batch body: an array, or the single object in `single_object` mode.
pub(super) fn batch_body(mut items: Vec<Value>, single: bool) -> Vec<u8> {
    let value = if single && items.len() == 1 {
        items.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(items)
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// Sends a subscriber's queued notifications in batches, one batch at a time, until the
/// subscriber is deleted.
pub(super) async fn subscriber_worker(st: Arc<SimState>, name: String, wake: Arc<Notify>) {
    loop {
        let (items, single) = {
            let mut inner = st.inner.lock().await;
            let single = inner.config.single_object;
            let max = if single {
                1
            } else {
                inner.config.max_batch.clamp(1, MAX_BATCH)
            };
            let Some(sub) = inner
                .subscribers
                .get_mut(&name)
                .filter(|s| Arc::ptr_eq(&s.wake, &wake))
            else {
                return;
            };
            let n = sub.pending.len().min(max);
            (sub.pending.drain(..n).collect::<Vec<_>>(), single)
        };
        if items.is_empty() {
            wake.notified().await;
            continue;
        }
        let n = items.len();
        let body = batch_body(items, single);
        deliver(&st, &name, &wake, &body, n, 0).await;
    }
}
