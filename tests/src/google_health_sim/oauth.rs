//! OAuth 2.0 (Google Identity): `GET /o/oauth2/v2/auth`, `POST /token`, `POST /revoke`,
//! and the SHA-256 behind PKCE `S256`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::catalogue::{is_known_scope, scope_url};
use super::state::{AuthCode, Inner, SimState, random_token};
use super::{
    ACCESS_TOKEN_LIFETIME_SECS, AUTHORIZATION_CODE_LIFETIME_SECS, EXPIRED_OR_REVOKED,
    INVALID_CLIENT, INVALID_GRANT, INVALID_REQUEST, TESTING_REFRESH_LIFETIME_SECS,
};
use crate::sim_support::{Params, basic_credentials, is_form, param, parse_form};

/// An error on Google's own page (no redirect).
fn oauth_page_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

fn redirect_to(mut target: reqwest::Url, state: Option<&str>, pairs: &[(&str, &str)]) -> Response {
    {
        let mut q = target.query_pairs_mut();
        if let Some(state) = state {
            q.append_pair("state", state);
        }
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

pub(super) async fn authorize(State(st): State<Arc<SimState>>, uri: Uri) -> Response {
    let params = parse_form(uri.query().unwrap_or(""));
    let mut inner = st.inner.lock().await;
    let Some(client_id) = param(&params, "client_id").filter(|c| inner.apps.contains_key(*c))
    else {
        return oauth_page_error(
            StatusCode::UNAUTHORIZED,
            INVALID_CLIENT,
            "The OAuth client was not found.",
        );
    };
    let Some((redirect_uri, target)) = param(&params, "redirect_uri").and_then(|u| {
        reqwest::Url::parse(u)
            .ok()
            .filter(|p| matches!(p.scheme(), "http" | "https"))
            .map(|parsed| (u, parsed))
    }) else {
        return oauth_page_error(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            "Missing or invalid parameter: redirect_uri",
        );
    };
    let state = param(&params, "state");
    if param(&params, "response_type") != Some("code") {
        return oauth_page_error(
            StatusCode::BAD_REQUEST,
            "unsupported_response_type",
            "Invalid response_type: only code is supported.",
        );
    }
    let mut requested: Vec<String> = Vec::new();
    for s in param(&params, "scope").unwrap_or("").split_whitespace() {
        if !is_known_scope(s) {
            return oauth_page_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                &format!("Some requested scopes were invalid. {{invalid=[{s}]}}"),
            );
        }
        if !requested.iter().any(|have| have == s) {
            requested.push(s.to_owned());
        }
    }
    if requested.is_empty() {
        return oauth_page_error(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            "Missing required parameter: scope",
        );
    }
    let challenge = match (
        param(&params, "code_challenge"),
        param(&params, "code_challenge_method"),
    ) {
        (None, _) => None,
        (Some(c), Some("S256")) => Some(c.to_owned()),
        (Some(_), _) => {
            return oauth_page_error(
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                "code_challenge_method must be S256",
            );
        }
    };
    let user = match param(&params, "user") {
        Some(u) => inner.users.contains_key(u).then(|| u.to_owned()),
        None => {
            let mut registered: Vec<&String> = inner
                .grants
                .iter()
                .filter(|g| g.client_id == client_id)
                .map(|g| &g.user)
                .collect();
            registered.sort();
            registered.first().map(|u| (*u).clone())
        }
    };
    let Some(user) = user else {
        return redirect_to(target, state, &[("error", "access_denied")]);
    };
    let mut granted: Vec<String> = match param(&params, "grant") {
        None => requested,
        Some(g) => {
            let ticked: Vec<String> = g.split_whitespace().map(scope_url).collect();
            requested
                .into_iter()
                .filter(|s| ticked.contains(s))
                .collect()
        }
    };
    if granted.is_empty() {
        return redirect_to(target, state, &[("error", "access_denied")]);
    }
    let consent_key = (user.clone(), client_id.to_owned());
    if param(&params, "include_granted_scopes") == Some("true")
        && let Some(c) = inner.consents.get(&consent_key)
    {
        for s in &c.scopes {
            if !granted.contains(s) {
                granted.push(s.clone());
            }
        }
    }
    let code = random_token("4/0A", 48);
    let expires_at = inner.now_s() + AUTHORIZATION_CODE_LIFETIME_SECS;
    let prompt = param(&params, "prompt").unwrap_or("");
    inner.codes.insert(
        code.clone(),
        AuthCode {
            user,
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            scopes: granted.clone(),
            challenge,
            offline: param(&params, "access_type") == Some("offline"),
            force_consent: prompt.split_whitespace().any(|p| p == "consent"),
            expires_at,
        },
    );
    let scope = granted.join(" ");
    redirect_to(target, state, &[("code", &code), ("scope", &scope)])
}

/// A token endpoint answer: JSON, never cached.
fn token_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (
                header::CACHE_CONTROL,
                "no-cache, no-store, max-age=0, must-revalidate",
            ),
            (header::PRAGMA, "no-cache"),
        ],
        axum::Json(body),
    )
        .into_response()
}

/// An RFC 6749 §5.2 error.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn oauth_err(error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        status: if error == INVALID_CLIENT {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        },
        error,
        description: description.into(),
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        token_response(
            self.status,
            json!({ "error": self.error, "error_description": self.description }),
        )
    }
}

/// Client id and secret from HTTP Basic (preferred) or from the form.
fn client_credentials(
    headers: &HeaderMap,
    params: &Params,
) -> Result<(String, Option<String>), OAuthError> {
    if let Some((id, secret)) =
        basic_credentials(headers).map_err(|_| oauth_err(INVALID_CLIENT, "Unauthorized"))?
    {
        return Ok((id, Some(secret)));
    }
    match param(params, "client_id") {
        Some(id) => Ok((id.to_owned(), params.get("client_secret").cloned())),
        None => Err(oauth_err(
            INVALID_REQUEST,
            "Could not determine client ID from request.",
        )),
    }
}

impl Inner {
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<String, OAuthError> {
        let (id, secret) = client_credentials(headers, params)?;
        let Some(app) = self.apps.get(&id) else {
            return Err(oauth_err(INVALID_CLIENT, "The OAuth client was not found."));
        };
        let given = secret.unwrap_or_default();
        if given != app.secret {
            return Err(oauth_err(INVALID_CLIENT, "Unauthorized"));
        }
        Ok(id)
    }

    fn exchange_code(&mut self, client_id: &str, params: &Params) -> Result<Value, OAuthError> {
        let code = param(params, "code")
            .ok_or_else(|| oauth_err(INVALID_REQUEST, "Missing required parameter: code"))?;
        let redirect_uri = param(params, "redirect_uri").ok_or_else(|| {
            oauth_err(INVALID_REQUEST, "Missing required parameter: redirect_uri")
        })?;
        // Spent whatever the outcome.
        let grant = self
            .codes
            .remove(code)
            .ok_or_else(|| oauth_err(INVALID_GRANT, "Bad Request"))?;
        if grant.client_id != client_id || self.now_s() >= grant.expires_at {
            return Err(oauth_err(INVALID_GRANT, "Bad Request"));
        }
        if grant.redirect_uri != redirect_uri {
            return Err(oauth_err("redirect_uri_mismatch", "Bad Request"));
        }
        if let Some(challenge) = &grant.challenge {
            let Some(verifier) = param(params, "code_verifier") else {
                return Err(oauth_err(INVALID_GRANT, "Missing code verifier."));
            };
            if URL_SAFE_NO_PAD.encode(sha256(verifier.as_bytes())) != *challenge {
                return Err(oauth_err(INVALID_GRANT, "Invalid code verifier."));
            }
        }
        let consent = self
            .consents
            .entry((grant.user.clone(), client_id.to_owned()))
            .or_default();
        let with_refresh = grant.offline && (!consent.refresh_issued || grant.force_consent);
        consent.refresh_issued |= with_refresh;
        consent.scopes.extend(grant.scopes.iter().cloned());
        let id = self.new_grant(
            &grant.user,
            client_id,
            grant.scopes.clone(),
            with_refresh,
            None,
        );
        let access = self.issue_access(id);
        if let Some(u) = self.users.get_mut(&grant.user) {
            u.stats.code_exchanges += 1;
        }
        let mut body = json!({
            "access_token": access,
            "expires_in": ACCESS_TOKEN_LIFETIME_SECS,
            "scope": grant.scopes.join(" "),
            "token_type": "Bearer",
        });
        if let (Value::Object(m), Some(g)) = (&mut body, self.grants.get(id)) {
            if let Some(r) = &g.refresh_token {
                m.insert("refresh_token".into(), json!(r));
            }
            if g.refresh_expires_at.is_some() {
                m.insert(
                    "refresh_token_expires_in".into(),
                    json!(TESTING_REFRESH_LIFETIME_SECS),
                );
            }
        }
        Ok(body)
    }

    fn refresh(&mut self, client_id: &str, params: &Params) -> Result<Value, OAuthError> {
        let token = param(params, "refresh_token").ok_or_else(|| {
            oauth_err(INVALID_REQUEST, "Missing required parameter: refresh_token")
        })?;
        let now = self.now_s();
        let id = *self
            .refresh_tokens
            .get(token)
            .ok_or_else(|| oauth_err(INVALID_GRANT, "Bad Request"))?;
        let g = self
            .grants
            .get(id)
            .ok_or_else(|| oauth_err(INVALID_GRANT, "Bad Request"))?;
        if g.client_id != client_id {
            return Err(oauth_err("unauthorized_client", "Unauthorized"));
        }
        if g.revoked || g.refresh_expires_at.is_some_and(|at| now >= at) {
            return Err(oauth_err(INVALID_GRANT, EXPIRED_OR_REVOKED));
        }
        let (user, scope, left) = (
            g.user.clone(),
            g.scopes.join(" "),
            g.refresh_expires_at.map(|at| at - now),
        );
        let access = self.issue_access(id);
        if let Some(u) = self.users.get_mut(&user) {
            u.stats.refreshes += 1;
        }
        let mut body = json!({
            "access_token": access,
            "expires_in": ACCESS_TOKEN_LIFETIME_SECS,
            "scope": scope,
            "token_type": "Bearer",
        });
        if let (Value::Object(m), Some(left)) = (&mut body, left) {
            m.insert("refresh_token_expires_in".into(), json!(left));
        }
        Ok(body)
    }
}

pub(super) async fn token(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return oauth_err(
            INVALID_REQUEST,
            "Content-Type must be application/x-www-form-urlencoded",
        )
        .into_response();
    }
    let params = parse_form(&String::from_utf8_lossy(&body));
    let mut inner = st.inner.lock().await;
    let client_id = match inner.authenticate_client(&headers, &params) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let answer = match param(&params, "grant_type") {
        Some("authorization_code") => inner.exchange_code(&client_id, &params),
        Some("refresh_token") => inner.refresh(&client_id, &params),
        Some(other) => Err(oauth_err(
            "unsupported_grant_type",
            format!("Invalid grant_type: {other}"),
        )),
        None => Err(oauth_err("unsupported_grant_type", "Invalid grant_type: ")),
    };
    match answer {
        Ok(body) => token_response(StatusCode::OK, body),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn revoke(
    State(st): State<Arc<SimState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params = parse_form(uri.query().unwrap_or(""));
    if is_form(&headers) {
        params.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let Some(token) = param(&params, "token") else {
        return oauth_err(INVALID_REQUEST, "Missing required parameter: token").into_response();
    };
    let mut inner = st.inner.lock().await;
    let now = inner.now_s();
    let grant = match inner.access_tokens.get(token) {
        Some(a) if a.expires_at > now => Some(a.grant),
        _ => inner.refresh_tokens.get(token).copied(),
    };
    let live = grant.and_then(|id| inner.grants.get(id).filter(|g| !g.revoked).map(|_| id));
    let Some(id) = live else {
        return oauth_err("invalid_token", "Token expired or revoked").into_response();
    };
    let mut key = None;
    if let Some(g) = inner.grants.get_mut(id) {
        g.revoked = true;
        key = Some((g.user.clone(), g.client_id.clone()));
    }
    if let Some(key) = key {
        inner.consents.remove(&key);
    }
    token_response(StatusCode::OK, json!({}))
}

/// SHA-256 (FIPS 180-4), for PKCE S256.
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            if let (Some(slot), Ok(bytes)) = (w.get_mut(i), <[u8; 4]>::try_from(word)) {
                *slot = u32::from_be_bytes(bytes);
            }
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (slot, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *slot = slot.wrapping_add(v);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}
