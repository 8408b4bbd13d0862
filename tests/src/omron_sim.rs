//! Omron Wellness API cloud simulator.
//!
//! An HTTP server that speaks the wire format of the Omron Wellness API ("Omron Partner API for
//! US"; research: `providers.md` §3.1, contract §3.4): an IdentityServer-style OAuth 2.0 /
//! OpenID Connect server plus one data endpoint, and the upload webhook Omron sends to a
//! partner. Used by the end-to-end tests and the demo.
//!
//! # Wire format
//!
//! * `GET /connect/authorize?client_id&response_type=code&redirect_uri&scope&state[&nonce]`,
//!   plus the test-only `user=<omron user id>` saying who logs in (default: the first user
//!   registered with `client_id`). Consents at once: `302 Location:
//!   redirect_uri?code=…&state=…`. The code lives 60 s, is single-use and is bound to
//!   `client_id`, `redirect_uri`, the user and the requested scope. Unknown user: `302`
//!   `redirect_uri?error=access_denied&state=…`; `response_type` other than `code`:
//!   `error=unsupported_response_type`; missing scope: `error=invalid_request`; a scope outside
//!   [`KNOWN_SCOPES`]: `error=invalid_scope`. Unknown `client_id` or a missing/malformed
//!   `redirect_uri`: HTTP 400 `{"error":"invalid_client"|"invalid_request"}` and no redirect
//!   (the redirect URI cannot be trusted).
//! * `POST /connect/token`, `application/x-www-form-urlencoded` (anything else: 400
//!   `invalid_request`). Client authentication by the form fields `client_id` +
//!   `client_secret`, or by HTTP Basic `base64(urlencode(id):urlencode(secret))`
//!   (RFC 6749 §2.3.1; Basic wins when both are sent).
//!   * `grant_type=authorization_code`, `code`, `redirect_uri` (must equal the authorize one);
//!   * `grant_type=refresh_token`, `refresh_token` (`redirect_uri` and `scope` ignored).
//!
//!   Success, HTTP 200: `{"access_token","expires_in":3600,"token_type":"Bearer",
//!   "scope":"<granted scopes, space-separated>","refresh_token","id_token"}`. `id_token` is a
//!   compact JWS `b64url(header).b64url(payload).b64url(signature)` (no padding), header
//!   `{"alg":"RS256","kid":"omron-sim","typ":"JWT"}`, payload `{"iss":"http://<Host>",
//!   "sub":"<omron user id>","aud":"<client_id>","iat","exp"[,"nonce"]}` and 256 random bytes as
//!   signature (clients take the token straight from the token endpoint over TLS and need not
//!   verify it, OIDC Core §3.1.3.7). Errors (RFC 6749 §5.2), HTTP 400
//!   `{"error":"invalid_client"}` (unknown client, wrong secret, no credentials),
//!   `{"error":"unsupported_grant_type"}` (also a missing `grant_type`, as IdentityServer does),
//!   `{"error":"invalid_request"}` (missing `code`, `redirect_uri` or `refresh_token`),
//!   `{"error":"invalid_grant"}` (unknown, used, expired or other-client code;
//!   `redirect_uri` mismatch; unknown, used, revoked or other-client refresh token).
//! * `POST /api/measurement`, `Authorization: Bearer <access token>`, form body `type`
//!   (`bloodpressure|activity|weight|temperature|oxygen`), `since` (`YYYY-MM-DD`, required),
//!   `limit` (1..=500, default 100), `sortOrder` (`asc|desc`, default `asc`),
//!   `includeHourlyActivity` (ignored). Success, HTTP 200:
//!   `{"status":0,"result":{"truncated":<bool>,"nextPaginationKey":null,
//!   "measurementCount":<items in this page>,"<listKey>":[…]}}` with `listKey` one of
//!   `bloodPressure`, `activity`, `weight`, `temperature`, `oxygen`. Bad parameters, HTTP 200:
//!   `{"status":1,"reason":"<text>","errorCode":"INVALID_PARAMETER"}`. Unknown, expired or revoked
//!   token: HTTP 401, `WWW-Authenticate: Bearer error="invalid_token"`, empty body (no token at
//!   all: plain `WWW-Authenticate: Bearer`, as ASP.NET answers). Over the optional per-user rate
//!   limit: HTTP 429 with `Retry-After: <seconds>`, empty body.
//! * Upload notification, sent by the simulator: `POST <notification url>`,
//!   `Content-Type: application/json`, `{"id":"<omron user id>","timestamp":"<…>"}`.
//!
//! # Quirks reproduced
//!
//! * Items are served verbatim as the test stored them (Omron camelCase, e.g.
//!   `{"id":123456789,"dateTime":"2024-03-01T14:05:00","dateTimeLocal":"2024-03-01T06:05:00",
//!   "dateTimeUtcOffset":"-08:00","systolic":128,…}`): same fields, same values (numbers keep
//!   their text through the workspace's `arbitrary_precision`), though not the key order. The
//!   simulator reads only `id`, `dateTime` and `dateTimeLocal`.
//! * Paging by date: a page holds the items whose `dateTimeLocal` calendar date is `>= since`,
//!   ordered by (`dateTime`, `id`), first `limit` of them; `truncated` says more matched. The
//!   client asks again with `since` = the last item's date, so pages overlap (dedupe on `id`),
//!   and when more than `limit` items share one date the same page comes back.
//!   `nextPaginationKey` is always `null`.
//! * Refresh tokens rotate one-time-only (IdentityServer's `OneTimeOnly`): a refresh returns a
//!   new refresh token and the old one is `invalid_grant` at once. Access tokens issued earlier
//!   stay valid until they expire. Refresh tokens themselves never expire here (Omron publishes
//!   no lifetime).
//! * OpenID Connect scopes: a refresh token is issued only when `offline_access` was granted,
//!   an `id_token` only when `openid` was (on code exchange and on refresh). Data scopes
//!   (`bloodpressure`…) are not enforced on `/api/measurement`.
//! * An authorization code is spent by any exchange attempt, even a failed one (IdentityServer
//!   removes it from its store when it reads it).
//! * Only an HTTP **200** acknowledges a notification (OHSU and Stanford answer 200; a 204 counts
//!   as a failure): a failure or a non-200 answer is retried up to 3 more times, 1 s apart, with
//!   a 5 s timeout per attempt. There is no signature and no subscription API: the partner's URL
//!   is allow-listed by hand, here set with `PUT /_sim/notification-url`.
//!
//! The JSON test-control API lives under `/_sim` (see [`router`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use crate::sim_support::{
    Params, basic_credentials, bearer_token, is_form, json_body, outbound_client, param,
    parse_form, random_hex, rate_limit_admit, serve_router, sim_error, sim_health, unknown_user,
};

/// Lifetime of an access token (`expires_in`).
pub const ACCESS_TOKEN_LIFETIME_SECS: i64 = 3_600;
/// Lifetime of an authorization code.
pub const AUTHORIZATION_CODE_LIFETIME_SECS: i64 = 60;
/// Lifetime of an id_token (IdentityServer's default `IdentityTokenLifetime`).
pub const ID_TOKEN_LIFETIME_SECS: i64 = 300;
/// `kid` in the id_token header.
pub const ID_TOKEN_KID: &str = "omron-sim";
/// Scopes the authorize endpoint knows (providers.md §3.1).
pub const KNOWN_SCOPES: &[&str] = &[
    "bloodpressure",
    "activity",
    "weight",
    "temperature",
    "oxygen",
    "openid",
    "offline_access",
];
/// Default `limit` of `/api/measurement`.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` of `/api/measurement`.
pub const MAX_LIMIT: usize = 500;
/// `status` of a data answer with bad parameters.
pub const STATUS_INVALID_PARAMETER: i64 = 1;
/// `errorCode` of a data answer with bad parameters.
pub const ERROR_CODE_INVALID_PARAMETER: &str = "INVALID_PARAMETER";
/// Timeout of one notification delivery attempt.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries after a failed first attempt.
pub const NOTIFY_RETRIES: usize = 3;
/// Pause between notification attempts.
pub const NOTIFY_RETRY_INTERVAL: Duration = Duration::from_secs(1);

const OPENID: &str = "openid";
const OFFLINE_ACCESS: &str = "offline_access";
const INVALID_CLIENT: &str = "invalid_client";
const INVALID_GRANT: &str = "invalid_grant";
const INVALID_REQUEST: &str = "invalid_request";
const UNSUPPORTED_GRANT_TYPE: &str = "unsupported_grant_type";

// ---------------------------------------------------------------------------
// Public data types
// ---------------------------------------------------------------------------

/// Simulator settings.
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    /// `/api/measurement` calls allowed per user per 60 s sliding window; 0 (the default)
    /// disables the limit (Omron publishes none).
    pub rate_limit_per_minute: usize,
}

/// A measurement type: the `type` parameter and the list key of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeasurementType {
    /// `bloodpressure` / `bloodPressure`.
    BloodPressure,
    /// `activity` / `activity`.
    Activity,
    /// `weight` / `weight`.
    Weight,
    /// `temperature` / `temperature`.
    Temperature,
    /// `oxygen` / `oxygen`.
    Oxygen,
}

impl MeasurementType {
    /// Every type.
    pub const ALL: [Self; 5] = [
        Self::BloodPressure,
        Self::Activity,
        Self::Weight,
        Self::Temperature,
        Self::Oxygen,
    ];

    /// The type by its `type` parameter value (exact, lower case).
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.wire_name() == s)
    }

    /// The `type` parameter value.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::BloodPressure => "bloodpressure",
            Self::Activity => "activity",
            Self::Weight => "weight",
            Self::Temperature => "temperature",
            Self::Oxygen => "oxygen",
        }
    }

    /// The key of the item list in `result`.
    pub fn list_key(self) -> &'static str {
        match self {
            Self::BloodPressure => "bloodPressure",
            Self::Activity => "activity",
            Self::Weight => "weight",
            Self::Temperature => "temperature",
            Self::Oxygen => "oxygen",
        }
    }
}

/// A user to create. Also the body of `POST /_sim/users`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserSeed {
    /// Omron user id (the id_token `sub`).
    pub user: String,
    /// Client id of the partner application; registered (or re-registered) with the secret.
    pub client_id: String,
    /// Client secret of that application.
    pub client_secret: String,
    /// Initial access token (generated if absent).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Initial refresh token (generated if absent).
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Lifetime of the initial access token in seconds (default 3600).
    #[serde(default)]
    pub expires_in: Option<i64>,
}

/// Tokens handed out for a newly created user; valid at once, with every scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTokens {
    /// Omron user id.
    pub user: String,
    /// Access token.
    pub access_token: String,
    /// Refresh token.
    pub refresh_token: String,
    /// Access token lifetime in seconds.
    pub expires_in: i64,
}

/// Why items could not be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No such user.
    UnknownUser(String),
    /// An item lacks `id`, `dateTime` or `dateTimeLocal` (nothing was stored).
    InvalidItem(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownUser(u) => write!(f, "unknown user {u}"),
            Self::InvalidItem(why) => write!(f, "invalid item: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct AccessToken {
    user: String,
    expires_at: i64,
    revoked: bool,
}

#[derive(Debug)]
struct RefreshToken {
    user: String,
    client_id: String,
    scope: Vec<String>,
    /// Exchanged once already (one-time-only rotation).
    used: bool,
    revoked: bool,
}

#[derive(Debug)]
struct AuthCode {
    user: String,
    client_id: String,
    redirect_uri: String,
    scope: Vec<String>,
    nonce: Option<String>,
    expires_at: i64,
}

/// An item's `id`: integers sort numerically, before strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ItemId {
    Int(i128),
    Text(String),
}

impl ItemId {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .map(Self::Int),
            Value::String(s) if !s.is_empty() => Some(Self::Text(s.clone())),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct StoredItem {
    id: ItemId,
    date_time: String,
    local_date: NaiveDate,
    /// The item as posted.
    json: Value,
}

#[derive(Debug, Default)]
struct UserStats {
    measurement_requests: u64,
    refreshes: u64,
    code_exchanges: u64,
    rate_limited: u64,
    requested_types: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
struct User {
    client_id: String,
    items: BTreeMap<MeasurementType, BTreeMap<ItemId, StoredItem>>,
    /// Admitted `/api/measurement` calls in the rate-limit window (ms).
    rate_window: VecDeque<i64>,
    stats: UserStats,
}

#[derive(Debug, Default)]
struct Inner {
    clock_offset_secs: i64,
    /// Client id → secret.
    clients: HashMap<String, String>,
    users: BTreeMap<String, User>,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, RefreshToken>,
    codes: HashMap<String, AuthCode>,
    notification_url: Option<String>,
    notify_attempts: u64,
    notify_delivered: u64,
    unauthorized: u64,
}

/// Shared simulator state; build it with [`SimState::new`] and hand it to [`router`].
#[derive(Debug)]
pub struct SimState {
    config: SimConfig,
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

impl SimState {
    /// Creates an empty simulator.
    pub fn new(config: SimConfig) -> anyhow::Result<Arc<Self>> {
        let http = outbound_client(Some(NOTIFY_TIMEOUT), "notification")?;
        Ok(Arc::new(Self {
            config,
            inner: Mutex::new(Inner::default()),
            http,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Creates a user or replaces its credentials and tokens (stored items are kept; earlier
    /// tokens and pending codes of the user are revoked).
    pub async fn add_user(&self, seed: UserSeed) -> UserTokens {
        self.inner.lock().await.add_user(seed)
    }

    /// Stores items of one type for a user, replacing items with the same `id`. All or
    /// nothing: one invalid item stores none. Returns how many items were given.
    pub async fn upsert_measurements(
        &self,
        user: &str,
        kind: MeasurementType,
        items: Vec<Value>,
    ) -> Result<usize, StoreError> {
        self.inner.lock().await.upsert_items(user, kind, items)
    }

    /// Sets (or with `None` clears) the allow-listed notification URL.
    pub async fn set_notification_url(&self, url: Option<String>) {
        self.inner.lock().await.notification_url = url;
    }
}

fn all_scopes() -> Vec<String> {
    KNOWN_SCOPES.iter().map(|s| (*s).to_owned()).collect()
}

/// A successful grant, before it is written as a token response.
struct Issued {
    user: String,
    access_token: String,
    refresh_token: Option<String>,
    scope: Vec<String>,
    nonce: Option<String>,
}

impl Inner {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::seconds(self.clock_offset_secs)
    }

    fn now_s(&self) -> i64 {
        self.now().timestamp()
    }

    fn add_user(&mut self, seed: UserSeed) -> UserTokens {
        let now = self.now_s();
        self.revoke_user_tokens(&seed.user);
        self.clients
            .insert(seed.client_id.clone(), seed.client_secret.clone());
        let expires_in = seed.expires_in.unwrap_or(ACCESS_TOKEN_LIFETIME_SECS);
        let access = seed.access_token.unwrap_or_else(|| random_hex(32));
        let refresh = seed.refresh_token.unwrap_or_else(|| random_hex(32));
        let user = self.users.entry(seed.user.clone()).or_insert_with(|| User {
            client_id: String::new(),
            items: BTreeMap::new(),
            rate_window: VecDeque::new(),
            stats: UserStats::default(),
        });
        user.client_id = seed.client_id.clone();
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                user: seed.user.clone(),
                expires_at: now + expires_in,
                revoked: false,
            },
        );
        self.refresh_tokens.insert(
            refresh.clone(),
            RefreshToken {
                user: seed.user.clone(),
                client_id: seed.client_id,
                scope: all_scopes(),
                used: false,
                revoked: false,
            },
        );
        UserTokens {
            user: seed.user,
            access_token: access,
            refresh_token: refresh,
            expires_in,
        }
    }

    /// Revokes every access and refresh token and drops the pending codes of a user; returns
    /// how many tokens were still live.
    fn revoke_user_tokens(&mut self, user: &str) -> usize {
        let mut n = 0;
        for t in self.access_tokens.values_mut() {
            if t.user == user && !t.revoked {
                t.revoked = true;
                n += 1;
            }
        }
        for t in self.refresh_tokens.values_mut() {
            if t.user == user && !t.revoked && !t.used {
                t.revoked = true;
                n += 1;
            }
        }
        self.codes.retain(|_, c| c.user != user);
        n
    }

    /// Makes every unexpired access token of a user expire now; returns how many.
    fn expire_access(&mut self, user: &str) -> usize {
        let now = self.now_s();
        let mut n = 0;
        for t in self.access_tokens.values_mut() {
            if t.user == user && !t.revoked && t.expires_at > now {
                t.expires_at = now;
                n += 1;
            }
        }
        n
    }

    fn upsert_items(
        &mut self,
        user: &str,
        kind: MeasurementType,
        items: Vec<Value>,
    ) -> Result<usize, StoreError> {
        if !self.users.contains_key(user) {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        let stored = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                stored_item(item).map_err(|why| StoreError::InvalidItem(format!("item {i}: {why}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = stored.len();
        if let Some(u) = self.users.get_mut(user) {
            let of_type = u.items.entry(kind).or_default();
            for item in stored {
                of_type.insert(item.id.clone(), item);
            }
        }
        Ok(n)
    }

    /// The user of a live access token.
    fn access_user(&self, token: &str) -> Option<String> {
        let t = self.access_tokens.get(token)?;
        (!t.revoked && self.now_s() < t.expires_at).then(|| t.user.clone())
    }

    /// Checks the client credentials; returns the client id.
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<String, &'static str> {
        let (id, secret) = client_credentials(headers, params)?;
        match self.clients.get(&id) {
            Some(s) if *s == secret => Ok(id),
            _ => Err(INVALID_CLIENT),
        }
    }

    fn issue(
        &mut self,
        user: &str,
        client_id: &str,
        scope: Vec<String>,
        nonce: Option<String>,
    ) -> Issued {
        let now = self.now_s();
        let access = random_hex(32);
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                user: user.to_owned(),
                expires_at: now + ACCESS_TOKEN_LIFETIME_SECS,
                revoked: false,
            },
        );
        let refresh = scope.iter().any(|s| s == OFFLINE_ACCESS).then(|| {
            let refresh = random_hex(32);
            self.refresh_tokens.insert(
                refresh.clone(),
                RefreshToken {
                    user: user.to_owned(),
                    client_id: client_id.to_owned(),
                    scope: scope.clone(),
                    used: false,
                    revoked: false,
                },
            );
            refresh
        });
        Issued {
            user: user.to_owned(),
            access_token: access,
            refresh_token: refresh,
            scope,
            nonce,
        }
    }

    fn exchange_code(&mut self, client_id: &str, params: &Params) -> Result<Issued, &'static str> {
        let code = param(params, "code").ok_or(INVALID_REQUEST)?;
        let redirect_uri = param(params, "redirect_uri").ok_or(INVALID_REQUEST)?;
        // Spent whatever the outcome.
        let grant = self.codes.remove(code).ok_or(INVALID_GRANT)?;
        if grant.client_id != client_id
            || grant.redirect_uri != redirect_uri
            || self.now_s() >= grant.expires_at
        {
            return Err(INVALID_GRANT);
        }
        let issued = self.issue(&grant.user, client_id, grant.scope, grant.nonce);
        if let Some(u) = self.users.get_mut(&grant.user) {
            u.stats.code_exchanges += 1;
        }
        Ok(issued)
    }

    fn refresh(&mut self, client_id: &str, params: &Params) -> Result<Issued, &'static str> {
        let token = param(params, "refresh_token").ok_or(INVALID_REQUEST)?;
        let old = self.refresh_tokens.get_mut(token).ok_or(INVALID_GRANT)?;
        if old.used || old.revoked || old.client_id != client_id {
            return Err(INVALID_GRANT);
        }
        old.used = true;
        let (user, scope) = (old.user.clone(), old.scope.clone());
        let issued = self.issue(&user, client_id, scope, None);
        if let Some(u) = self.users.get_mut(&user) {
            u.stats.refreshes += 1;
        }
        Ok(issued)
    }
}

/// Validates a posted item and extracts what the simulator reads from it.
fn stored_item(json: Value) -> Result<StoredItem, String> {
    let Value::Object(map) = &json else {
        return Err("not a JSON object".into());
    };
    let id = map
        .get("id")
        .and_then(ItemId::from_value)
        .ok_or("id (an integer or a non-empty string) is required")?;
    let date_time = map
        .get("dateTime")
        .and_then(Value::as_str)
        .ok_or("dateTime (a string) is required")?
        .to_owned();
    let local_date = map
        .get("dateTimeLocal")
        .and_then(Value::as_str)
        .and_then(|s| s.get(..10))
        .and_then(parse_ymd)
        .ok_or("dateTimeLocal (a string starting with YYYY-MM-DD) is required")?;
    Ok(StoredItem {
        id,
        date_time,
        local_date,
        json,
    })
}

/// Parses exactly `YYYY-MM-DD`.
fn parse_ymd(s: &str) -> Option<NaiveDate> {
    let shape_ok = s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    shape_ok
        .then(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .flatten()
}

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// Client id and secret from HTTP Basic (preferred) or from the form body.
fn client_credentials(
    headers: &HeaderMap,
    params: &Params,
) -> Result<(String, String), &'static str> {
    if let Some(credentials) = basic_credentials(headers).map_err(|_| INVALID_CLIENT)? {
        return Ok(credentials);
    }
    match (param(params, "client_id"), param(params, "client_secret")) {
        (Some(id), Some(secret)) => Ok((id.to_owned(), secret.to_owned())),
        _ => Err(INVALID_CLIENT),
    }
}

/// The issuer: the base URL the client reached (IdentityServer derives it from the request
/// when no `IssuerUri` is configured).
fn issuer(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

/// Builds the router: the Omron Wellness API plus the `/_sim` control API.
///
/// Omron routes (see the module doc for the wire format):
/// * `GET /connect/authorize`;
/// * `POST /connect/token`;
/// * `POST /api/measurement`.
///
/// Control routes (JSON bodies, not Omron; errors are `{"error":"<text>"}` with 400 for a bad
/// body and 404 for an unknown user):
/// * `POST /_sim/users` ([`UserSeed`]: `{"user","client_id","client_secret","access_token"?,
///   "refresh_token"?,"expires_in"?}`) → [`UserTokens`] `{"user","access_token",
///   "refresh_token","expires_in"}`; the tokens (generated when not given) are valid at once
///   with every scope;
/// * `POST /_sim/users/{id}/measurements` `{"type":"bloodpressure","items":[…]}` →
///   `{"stored":n}`; each item needs `id`, `dateTime`, `dateTimeLocal` (400 otherwise, nothing
///   stored); an item with the `id` of a stored one of the same type replaces it;
/// * `DELETE /_sim/users/{id}/tokens` → `{"revoked":n}`: every token of the user is revoked
///   (next data call 401, next refresh `invalid_grant`) and pending codes are dropped;
/// * `POST /_sim/users/{id}/expire-access` → `{"expired":n}`: the user's access tokens expire
///   now; refresh still works;
/// * `PUT /_sim/notification-url` `{"url":"http://…"}` (or `{"url":null}` to clear) →
///   `{"url":…}`;
/// * `POST /_sim/users/{id}/notify` `{"timestamp"?}` → `{"delivered":<first attempt got
///   200>,"status":<first HTTP status or null>[,"error":"<transport error>"]}` at once; POSTs
///   `{"id":"{id}","timestamp":<given, or now as YYYY-MM-DDTHH:MM:SSZ>}` to the notification URL
///   and retries in the background (409 when no URL is set; the user need not be registered);
/// * `POST /_sim/clock/advance` `{"seconds":N}` → `{"now":<epoch s>}`: moves the simulated
///   clock (code, token and rate-limit expiry);
/// * `GET /_sim/stats` → `{"users":{"<id>":{"measurement_requests","refreshes",
///   "code_exchanges","rate_limited","requested_types":{"bloodpressure":n,…}}},
///   "notifications":{"attempts","delivered"},"unauthorized":n}`;
/// * `GET /_sim/health` → 200 `{"status":"ok"}`.
pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/connect/authorize", get(authorize))
        .route("/connect/token", post(token))
        .route("/api/measurement", post(measurement))
        .route("/_sim/users", post(sim_create_user))
        .route("/_sim/users/{id}/measurements", post(sim_measurements))
        .route("/_sim/users/{id}/tokens", delete(sim_revoke_tokens))
        .route("/_sim/users/{id}/expire-access", post(sim_expire_access))
        .route("/_sim/users/{id}/notify", post(sim_notify))
        .route("/_sim/notification-url", put(sim_notification_url))
        .route("/_sim/clock/advance", post(sim_clock_advance))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/health", get(sim_health))
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_state(listener, SimState::new(config)?, shutdown).await
}

/// Like [`serve`], with a state built (and possibly seeded) by the caller.
pub async fn serve_with_state(
    listener: tokio::net::TcpListener,
    state: Arc<SimState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_router("omron-sim", listener, router(state), shutdown).await
}

// ---------------------------------------------------------------------------
// OAuth 2.0 / OpenID Connect
// ---------------------------------------------------------------------------

/// An authorize error shown on the server's own page (no redirect).
fn authorize_page_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// `302` to `target` with `pairs` and then `state` appended to its query.
fn redirect_to(mut target: reqwest::Url, pairs: &[(&str, &str)], state: Option<&str>) -> Response {
    {
        let mut q = target.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
        if let Some(state) = state {
            q.append_pair("state", state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

async fn authorize(State(st): State<Arc<SimState>>, uri: Uri) -> Response {
    let params = parse_form(uri.query().unwrap_or(""));
    let mut inner = st.inner.lock().await;
    let Some(client_id) = param(&params, "client_id").filter(|c| inner.clients.contains_key(*c))
    else {
        return authorize_page_error(INVALID_CLIENT, "unknown client_id");
    };
    let Some((redirect_uri, target)) = param(&params, "redirect_uri")
        .and_then(|u| reqwest::Url::parse(u).ok().map(|parsed| (u, parsed)))
    else {
        return authorize_page_error(INVALID_REQUEST, "missing or malformed redirect_uri");
    };
    let state = param(&params, "state");
    let error = |code: &str| redirect_to(target.clone(), &[("error", code)], state);
    if param(&params, "response_type") != Some("code") {
        return error("unsupported_response_type");
    }
    let mut scope: Vec<String> = Vec::new();
    for s in param(&params, "scope").unwrap_or("").split_whitespace() {
        if !KNOWN_SCOPES.contains(&s) {
            return error("invalid_scope");
        }
        if !scope.iter().any(|have| have == s) {
            scope.push(s.to_owned());
        }
    }
    if scope.is_empty() {
        return error(INVALID_REQUEST);
    }
    let user = match param(&params, "user") {
        Some(u) => inner.users.contains_key(u).then(|| u.to_owned()),
        None => inner
            .users
            .iter()
            .find(|(_, u)| u.client_id == client_id)
            .map(|(id, _)| id.clone()),
    };
    let Some(user) = user else {
        return error("access_denied");
    };
    let code = random_hex(32);
    let expires_at = inner.now_s() + AUTHORIZATION_CODE_LIFETIME_SECS;
    inner.codes.insert(
        code.clone(),
        AuthCode {
            user,
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            scope,
            nonce: param(&params, "nonce").map(str::to_owned),
            expires_at,
        },
    );
    redirect_to(target, &[("code", &code)], state)
}

/// A token endpoint answer: JSON, never cached (RFC 6749 §5.1).
fn token_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        axum::Json(body),
    )
        .into_response()
}

fn token_error(error: &str) -> Response {
    token_response(StatusCode::BAD_REQUEST, json!({ "error": error }))
}

fn id_token(issuer: &str, issued: &Issued, client_id: &str, now: i64) -> String {
    let header = json!({ "alg": "RS256", "kid": ID_TOKEN_KID, "typ": "JWT" });
    let mut payload = json!({
        "iss": issuer,
        "sub": issued.user,
        "aud": client_id,
        "iat": now,
        "exp": now + ID_TOKEN_LIFETIME_SECS,
    });
    if let (Some(nonce), Value::Object(map)) = (&issued.nonce, &mut payload) {
        map.insert("nonce".into(), json!(nonce));
    }
    let mut signature = [0u8; 256];
    rand::rng().fill(&mut signature);
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

async fn token(State(st): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_form(&headers) {
        return token_error(INVALID_REQUEST);
    }
    let params = parse_form(&String::from_utf8_lossy(&body));
    let mut inner = st.inner.lock().await;
    let client_id = match inner.authenticate_client(&headers, &params) {
        Ok(id) => id,
        Err(e) => return token_error(e),
    };
    let issued = match param(&params, "grant_type") {
        Some("authorization_code") => inner.exchange_code(&client_id, &params),
        Some("refresh_token") => inner.refresh(&client_id, &params),
        _ => Err(UNSUPPORTED_GRANT_TYPE),
    };
    let issued = match issued {
        Ok(i) => i,
        Err(e) => return token_error(e),
    };
    let now = inner.now_s();
    drop(inner);
    let mut body = Map::new();
    body.insert("access_token".into(), json!(issued.access_token));
    body.insert("expires_in".into(), json!(ACCESS_TOKEN_LIFETIME_SECS));
    body.insert("token_type".into(), json!("Bearer"));
    body.insert("scope".into(), json!(issued.scope.join(" ")));
    if let Some(refresh) = &issued.refresh_token {
        body.insert("refresh_token".into(), json!(refresh));
    }
    if issued.scope.iter().any(|s| s == OPENID) {
        let id_token = id_token(&issuer(&headers), &issued, &client_id, now);
        body.insert("id_token".into(), json!(id_token));
    }
    token_response(StatusCode::OK, Value::Object(body))
}

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

/// HTTP 401 with an empty body; `error` goes into `WWW-Authenticate`.
fn unauthorized(error: Option<&str>) -> Response {
    let challenge = match error {
        Some(e) => format!("Bearer error=\"{e}\""),
        None => "Bearer".to_owned(),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
    )
        .into_response()
}

fn invalid_parameter(reason: impl Into<String>) -> Value {
    json!({
        "status": STATUS_INVALID_PARAMETER,
        "reason": reason.into(),
        "errorCode": ERROR_CODE_INVALID_PARAMETER,
    })
}

struct MeasurementQuery {
    kind: MeasurementType,
    since: NaiveDate,
    limit: usize,
    descending: bool,
}

/// Reads the parameters after `type`; `Err` is the status≠0 answer.
fn parse_query(kind: MeasurementType, params: &Params) -> Result<MeasurementQuery, Value> {
    let since = match param(params, "since") {
        None => return Err(invalid_parameter("since is required (YYYY-MM-DD)")),
        Some(s) => parse_ymd(s)
            .ok_or_else(|| invalid_parameter(format!("since must be YYYY-MM-DD, got {s:?}")))?,
    };
    let limit = match param(params, "limit") {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                invalid_parameter(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}, got {s:?}"
                ))
            })?,
    };
    let descending = match param(params, "sortOrder") {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("asc") => false,
        Some(s) if s.eq_ignore_ascii_case("desc") => true,
        Some(s) => {
            return Err(invalid_parameter(format!(
                "sortOrder must be asc or desc, got {s:?}"
            )));
        }
    };
    Ok(MeasurementQuery {
        kind,
        since,
        limit,
        descending,
    })
}

/// The page a query selects from a user's items.
fn select(user: &User, q: &MeasurementQuery) -> Value {
    let mut matched: Vec<&StoredItem> = user
        .items
        .get(&q.kind)
        .into_iter()
        .flat_map(BTreeMap::values)
        .filter(|item| item.local_date >= q.since)
        .collect();
    matched.sort_by(|a, b| (&a.date_time, &a.id).cmp(&(&b.date_time, &b.id)));
    if q.descending {
        matched.reverse();
    }
    let truncated = matched.len() > q.limit;
    let page: Vec<Value> = matched
        .into_iter()
        .take(q.limit)
        .map(|item| item.json.clone())
        .collect();
    let mut result = Map::new();
    result.insert("truncated".into(), json!(truncated));
    result.insert("nextPaginationKey".into(), Value::Null);
    result.insert("measurementCount".into(), json!(page.len()));
    result.insert(q.kind.list_key().into(), Value::Array(page));
    json!({ "status": 0, "result": result })
}

async fn measurement(State(st): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(token) = bearer_token(&headers) else {
        st.inner.lock().await.unauthorized += 1;
        return unauthorized(None);
    };
    let params = parse_form(&String::from_utf8_lossy(&body));
    let mut inner = st.inner.lock().await;
    let now_ms = inner.now().timestamp_millis();
    let Some(user_id) = inner.access_user(token) else {
        inner.unauthorized += 1;
        return unauthorized(Some("invalid_token"));
    };
    let Some(user) = inner.users.get_mut(&user_id) else {
        return unauthorized(Some("invalid_token"));
    };
    user.stats.measurement_requests += 1;
    if let Err(retry_after) = rate_limit_admit(
        &mut user.rate_window,
        st.config.rate_limit_per_minute,
        now_ms,
    ) {
        user.stats.rate_limited += 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.to_string())],
        )
            .into_response();
    }
    let kind = match param(&params, "type") {
        None => return axum::Json(invalid_parameter("type is required")).into_response(),
        Some(t) => match MeasurementType::from_wire(t) {
            Some(kind) => kind,
            None => {
                let reason = format!(
                    "unknown type {t:?} (expected bloodpressure, activity, weight, temperature or oxygen)"
                );
                return axum::Json(invalid_parameter(reason)).into_response();
            }
        },
    };
    *user
        .stats
        .requested_types
        .entry(kind.wire_name())
        .or_default() += 1;
    let answer = match parse_query(kind, &params) {
        Ok(q) => select(user, &q),
        Err(error) => error,
    };
    axum::Json(answer).into_response()
}

// ---------------------------------------------------------------------------
// Control API
// ---------------------------------------------------------------------------

async fn sim_create_user(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let seed: UserSeed = match json_body(&body) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    if seed.user.is_empty() || seed.client_id.is_empty() {
        return sim_error(
            StatusCode::BAD_REQUEST,
            "user and client_id must not be empty",
        );
    }
    axum::Json(st.add_user(seed).await).into_response()
}

#[derive(Deserialize)]
struct MeasurementsBody {
    #[serde(rename = "type")]
    kind: String,
    items: Vec<Value>,
}

async fn sim_measurements(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let b: MeasurementsBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let Some(kind) = MeasurementType::from_wire(&b.kind) else {
        return sim_error(
            StatusCode::BAD_REQUEST,
            format!("unknown type {:?}", b.kind),
        );
    };
    match st.upsert_measurements(&user, kind, b.items).await {
        Ok(n) => axum::Json(json!({ "stored": n })).into_response(),
        Err(StoreError::UnknownUser(u)) => unknown_user(&u),
        Err(e @ StoreError::InvalidItem(_)) => sim_error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn sim_revoke_tokens(State(st): State<Arc<SimState>>, Path(user): Path<String>) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&user) {
        return unknown_user(&user);
    }
    let n = inner.revoke_user_tokens(&user);
    axum::Json(json!({ "revoked": n })).into_response()
}

async fn sim_expire_access(State(st): State<Arc<SimState>>, Path(user): Path<String>) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&user) {
        return unknown_user(&user);
    }
    let n = inner.expire_access(&user);
    axum::Json(json!({ "expired": n })).into_response()
}

#[derive(Deserialize)]
struct NotificationUrlBody {
    url: Option<String>,
}

async fn sim_notification_url(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: NotificationUrlBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if let Some(url) = &b.url {
        let ok = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return sim_error(
                StatusCode::BAD_REQUEST,
                format!("not an http(s) URL: {url:?}"),
            );
        }
    }
    st.set_notification_url(b.url.clone()).await;
    axum::Json(json!({ "url": b.url })).into_response()
}

#[derive(Deserialize)]
struct NotifyBody {
    #[serde(default)]
    timestamp: Option<String>,
}

/// One delivery attempt, counted in the stats; the HTTP status or the transport error.
async fn deliver(st: &SimState, url: &str, payload: &Value) -> Result<u16, String> {
    let outcome = st
        .http
        .post(url)
        .json(payload)
        .timeout(NOTIFY_TIMEOUT)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    let mut inner = st.inner.lock().await;
    inner.notify_attempts += 1;
    if outcome == Ok(200) {
        inner.notify_delivered += 1;
    }
    drop(inner);
    tracing::debug!(url, ?outcome, "omron-sim notification attempt");
    outcome
}

async fn sim_notify(
    State(st): State<Arc<SimState>>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let b: NotifyBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let (url, now) = {
        let inner = st.inner.lock().await;
        (inner.notification_url.clone(), inner.now())
    };
    let Some(url) = url else {
        return sim_error(StatusCode::CONFLICT, "no notification URL set");
    };
    let timestamp = b
        .timestamp
        .unwrap_or_else(|| now.format("%Y-%m-%dT%H:%M:%SZ").to_string());
    let payload = json!({ "id": user, "timestamp": timestamp });
    let first = deliver(&st, &url, &payload).await;
    if first != Ok(200) {
        let st = Arc::clone(&st);
        tokio::spawn(async move {
            for _ in 0..NOTIFY_RETRIES {
                tokio::time::sleep(NOTIFY_RETRY_INTERVAL).await;
                if deliver(&st, &url, &payload).await == Ok(200) {
                    break;
                }
            }
        });
    }
    let mut answer = json!({ "delivered": first == Ok(200), "status": first.as_ref().ok() });
    if let (Err(e), Value::Object(map)) = (&first, &mut answer) {
        map.insert("error".into(), json!(e));
    }
    axum::Json(answer).into_response()
}

#[derive(Deserialize)]
struct AdvanceBody {
    seconds: i64,
}

async fn sim_clock_advance(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: AdvanceBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    inner.clock_offset_secs = inner.clock_offset_secs.saturating_add(b.seconds);
    axum::Json(json!({ "now": inner.now_s() })).into_response()
}

async fn sim_stats(State(st): State<Arc<SimState>>) -> Response {
    let inner = st.inner.lock().await;
    let users: Map<String, Value> = inner
        .users
        .iter()
        .map(|(id, u)| {
            let s = &u.stats;
            (
                id.clone(),
                json!({
                    "measurement_requests": s.measurement_requests,
                    "refreshes": s.refreshes,
                    "code_exchanges": s.code_exchanges,
                    "rate_limited": s.rate_limited,
                    "requested_types": s.requested_types,
                }),
            )
        })
        .collect();
    axum::Json(json!({
        "users": users,
        "notifications": {
            "attempts": inner.notify_attempts,
            "delivered": inner.notify_delivered,
        },
        "unauthorized": inner.unauthorized,
    }))
    .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sim_support::testing::{client, spawn_server};
    use base64::engine::general_purpose::STANDARD;
    use tokio::sync::oneshot;

    const REDIRECT: &str = "https://app.example/cb";
    const FULL_SCOPE: &str =
        "bloodpressure activity weight temperature oxygen openid offline_access";

    struct Sim {
        base: String,
        http: reqwest::Client,
        _stop: oneshot::Sender<()>,
    }

    async fn start(config: SimConfig) -> Sim {
        let (base, stop) = spawn_server(|listener, stop| serve(listener, config, stop)).await;
        Sim {
            base,
            http: client(),
            _stop: stop,
        }
    }

    /// Percent-encodes everything but RFC 3986 unreserved characters.
    fn urlencode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    fn basic(id: &str, secret: &str) -> String {
        let pair = format!("{}:{}", urlencode(id), urlencode(secret));
        format!("Basic {}", STANDARD.encode(pair))
    }

    fn b64_json(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn bp(id: i64, date_time: &str, local: &str, systolic: i64) -> Value {
        json!({
            "id": id, "dateTime": date_time, "dateTimeLocal": local,
            "dateTimeUtcOffset": "-08:00", "systolic": systolic, "diastolic": 82,
            "bloodPressureUnits": "mmHg", "pulse": 67, "pulseUnits": "bpm",
            "irregularHB": 0, "deviceType": "HEM-7600T",
        })
    }

    fn ids(answer: &Value, key: &str) -> Vec<i64> {
        answer["result"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_i64().unwrap())
            .collect()
    }

    impl Sim {
        async fn control(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
            let resp = self
                .http
                .request(method, format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            resp.json().await.unwrap()
        }

        async fn sim(&self, path: &str, body: Value) -> Value {
            self.control(reqwest::Method::POST, path, body).await
        }

        async fn stats(&self) -> Value {
            self.control(reqwest::Method::GET, "/_sim/stats", Value::Null)
                .await
        }

        /// Registers `user` with client `cid`/`secret` and the given tokens.
        async fn user(&self, user: &str, access: &str, refresh: &str) {
            let r = self
                .sim(
                    "/_sim/users",
                    json!({
                        "user": user, "client_id": "cid", "client_secret": "secret",
                        "access_token": access, "refresh_token": refresh,
                    }),
                )
                .await;
            assert_eq!(r["access_token"], access);
        }

        async fn store(&self, user: &str, kind: &str, items: Value) {
            let r = self
                .sim(
                    &format!("/_sim/users/{user}/measurements"),
                    json!({ "type": kind, "items": items }),
                )
                .await;
            assert_eq!(r["stored"], items.as_array().unwrap().len());
        }

        /// `GET /connect/authorize`; returns the query pairs of the redirect.
        async fn authorize(&self, user: &str, scope: &str) -> HashMap<String, String> {
            let resp = self
                .http
                .get(format!("{}/connect/authorize", self.base))
                .query(&[
                    ("client_id", "cid"),
                    ("response_type", "code"),
                    ("redirect_uri", REDIRECT),
                    ("scope", scope),
                    ("state", "st-1"),
                    ("user", user),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), reqwest::StatusCode::FOUND);
            let location = resp.headers()[header::LOCATION].to_str().unwrap();
            assert!(location.starts_with(REDIRECT), "{location}");
            let url = reqwest::Url::parse(location).unwrap();
            url.query_pairs().into_owned().collect()
        }

        /// `POST /connect/token`; returns the HTTP status and the JSON body.
        async fn token(
            &self,
            authorization: Option<&str>,
            form: &[(&str, &str)],
        ) -> (StatusCode, Value) {
            let mut req = self
                .http
                .post(format!("{}/connect/token", self.base))
                .form(form);
            if let Some(a) = authorization {
                req = req.header(header::AUTHORIZATION, a);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json().await.unwrap())
        }

        async fn exchange(&self, code: &str, redirect: &str) -> (StatusCode, Value) {
            self.token(
                None,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", "cid"),
                    ("client_secret", "secret"),
                    ("code", code),
                    ("redirect_uri", redirect),
                ],
            )
            .await
        }

        async fn refresh(&self, refresh: &str) -> (StatusCode, Value) {
            self.token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", "cid"),
                    ("client_secret", "secret"),
                    ("refresh_token", refresh),
                    ("redirect_uri", REDIRECT),
                ],
            )
            .await
        }

        async fn measurement_raw(&self, token: &str, form: &[(&str, &str)]) -> reqwest::Response {
            self.http
                .post(format!("{}/api/measurement", self.base))
                .bearer_auth(token)
                .form(form)
                .send()
                .await
                .unwrap()
        }

        /// A data call that must answer HTTP 200 JSON.
        async fn measurement(&self, token: &str, form: &[(&str, &str)]) -> Value {
            let resp = self.measurement_raw(token, form).await;
            assert_eq!(resp.status(), reqwest::StatusCode::OK);
            resp.json().await.unwrap()
        }
    }

    #[test]
    fn form_decoding_and_dates() {
        let p = parse_form("a=1+2&b=%7Bx%7D&c&d=%zz&a=3");
        assert_eq!(p["a"], "3");
        assert_eq!(p["b"], "{x}");
        assert_eq!(p["c"], "");
        assert_eq!(p["d"], "%zz");
        assert_eq!(parse_ymd("2024-03-01"), NaiveDate::from_ymd_opt(2024, 3, 1));
        for bad in ["2024-3-01", "+2024-03-1", "2024-02-30", "2024-03-01T00"] {
            assert_eq!(parse_ymd(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn code_flow_issues_tokens_and_an_id_token_naming_the_user() {
        let sim = start(SimConfig::default()).await;
        sim.user("omron-u1", "a0", "r0").await;

        let redirect = sim.authorize("omron-u1", FULL_SCOPE).await;
        assert_eq!(redirect["state"], "st-1");
        let code = redirect["code"].clone();
        let (status, tokens) = sim.exchange(&code, REDIRECT).await;
        assert_eq!(status, StatusCode::OK, "{tokens}");
        assert_eq!(tokens["token_type"], "Bearer");
        assert_eq!(tokens["expires_in"], 3_600);
        assert_eq!(tokens["scope"], FULL_SCOPE);
        assert!(tokens["refresh_token"].as_str().is_some_and(|r| r != "r0"));

        let id_token = tokens["id_token"].as_str().unwrap();
        let parts: Vec<&str> = id_token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(!id_token.contains('='));
        assert_eq!(
            b64_json(parts[0]),
            json!({"alg": "RS256", "kid": "omron-sim", "typ": "JWT"})
        );
        let claims = b64_json(parts[1]);
        assert_eq!(claims["sub"], "omron-u1");
        assert_eq!(claims["aud"], "cid");
        assert_eq!(claims["iss"], sim.base);
        assert!(claims["exp"].as_i64().unwrap() > claims["iat"].as_i64().unwrap());
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 256);

        // The access token works.
        let access = tokens["access_token"].as_str().unwrap();
        let data = sim
            .measurement(
                access,
                &[("type", "bloodpressure"), ("since", "2024-01-01")],
            )
            .await;
        assert_eq!(data["status"], 0);

        // Single use.
        assert_eq!(
            sim.exchange(&code, REDIRECT).await,
            (StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}))
        );

        // A redirect_uri mismatch fails and spends the code.
        let code = sim.authorize("omron-u1", FULL_SCOPE).await["code"].clone();
        let (status, err) = sim.exchange(&code, "https://evil.example/cb").await;
        assert_eq!(
            (status, &err["error"]),
            (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
        );
        assert_eq!(
            sim.exchange(&code, REDIRECT).await.1["error"],
            "invalid_grant"
        );

        // Codes live 60 s.
        let code = sim.authorize("omron-u1", FULL_SCOPE).await["code"].clone();
        sim.sim("/_sim/clock/advance", json!({"seconds": 61})).await;
        assert_eq!(
            sim.exchange(&code, REDIRECT).await.1["error"],
            "invalid_grant"
        );

        // Wrong secret.
        let code = sim.authorize("omron-u1", FULL_SCOPE).await["code"].clone();
        let (status, err) = sim
            .token(
                None,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", "cid"),
                    ("client_secret", "nope"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                ],
            )
            .await;
        assert_eq!(
            (status, err),
            (StatusCode::BAD_REQUEST, json!({"error": "invalid_client"}))
        );

        // Without offline_access no refresh token, without openid no id_token.
        let code = sim.authorize("omron-u1", "bloodpressure openid").await["code"].clone();
        let (_, tokens) = sim.exchange(&code, REDIRECT).await;
        assert!(tokens.get("refresh_token").is_none() && tokens.get("id_token").is_some());
        let code = sim.authorize("omron-u1", "weight offline_access").await["code"].clone();
        let (_, tokens) = sim.exchange(&code, REDIRECT).await;
        assert!(tokens.get("refresh_token").is_some() && tokens.get("id_token").is_none());
        assert_eq!(tokens["scope"], "weight offline_access");

        // Unknown user: access_denied with the state.
        let denied = sim.authorize("nobody", FULL_SCOPE).await;
        assert_eq!(
            denied.get("error").map(String::as_str),
            Some("access_denied")
        );
        assert_eq!(denied["state"], "st-1");
        assert!(!denied.contains_key("code"));

        // Unknown client: no redirect.
        let resp = sim
            .http
            .get(format!("{}/connect/authorize", sim.base))
            .query(&[
                ("client_id", "other"),
                ("response_type", "code"),
                ("redirect_uri", REDIRECT),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
        assert!(resp.headers().get(header::LOCATION).is_none());

        assert_eq!(sim.stats().await["users"]["omron-u1"]["code_exchanges"], 3);
    }

    #[tokio::test]
    async fn refresh_tokens_rotate_one_time_only() {
        let sim = start(SimConfig::default()).await;
        sim.user("u2", "a0", "r0").await;

        let (status, first) = sim.refresh("r0").await;
        assert_eq!(status, StatusCode::OK, "{first}");
        let r1 = first["refresh_token"].as_str().unwrap().to_owned();
        let a1 = first["access_token"].as_str().unwrap().to_owned();
        assert_ne!(r1, "r0");
        assert_ne!(a1, "a0");
        assert_eq!(
            b64_json(
                first["id_token"]
                    .as_str()
                    .unwrap()
                    .split('.')
                    .nth(1)
                    .unwrap()
            )["sub"],
            "u2"
        );

        // The used token is dead at once; its successor works once.
        assert_eq!(
            sim.refresh("r0").await,
            (StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}))
        );
        let (status, second) = sim.refresh(&r1).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sim.refresh(&r1).await.1["error"], "invalid_grant");
        let r2 = second["refresh_token"].as_str().unwrap().to_owned();

        // Earlier access tokens stay valid until they expire.
        assert_eq!(
            sim.measurement(&a1, &[("type", "weight"), ("since", "2024-01-01")])
                .await["status"],
            0
        );

        // Other errors.
        let (_, e) = sim
            .token(
                None,
                &[
                    ("grant_type", "password"),
                    ("client_id", "cid"),
                    ("client_secret", "secret"),
                ],
            )
            .await;
        assert_eq!(e, json!({"error": "unsupported_grant_type"}));
        let (_, e) = sim
            .token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", "cid"),
                    ("client_secret", "secret"),
                ],
            )
            .await;
        assert_eq!(e, json!({"error": "invalid_request"}));
        assert_eq!(
            sim.refresh("never-issued").await.1["error"],
            "invalid_grant"
        );

        // Revocation kills the live refresh token.
        let revoked = sim
            .control(
                reqwest::Method::DELETE,
                "/_sim/users/u2/tokens",
                Value::Null,
            )
            .await;
        assert!(revoked["revoked"].as_u64().unwrap() >= 1);
        assert_eq!(sim.refresh(&r2).await.1["error"], "invalid_grant");

        assert_eq!(sim.stats().await["users"]["u2"]["refreshes"], 2);
    }

    #[tokio::test]
    async fn both_client_authentication_styles() {
        let sim = start(SimConfig::default()).await;
        // Characters that must be form-encoded inside Basic credentials.
        let (id, secret) = ("app:1 ü", "s3cr+t/=%");
        let tokens = sim
            .sim(
                "/_sim/users",
                json!({"user": "u3", "client_id": id, "client_secret": secret, "refresh_token": "r0"}),
            )
            .await;
        assert_eq!(tokens["refresh_token"], "r0");
        assert_eq!(tokens["expires_in"], 3_600);

        let refresh_form =
            |token: &'static str| [("grant_type", "refresh_token"), ("refresh_token", token)];

        // Basic, wrong secret, then right.
        let (status, e) = sim
            .token(Some(&basic(id, "wrong")), &refresh_form("r0"))
            .await;
        assert_eq!(
            (status, e),
            (StatusCode::BAD_REQUEST, json!({"error": "invalid_client"}))
        );
        // No credentials at all.
        let (_, e) = sim.token(None, &refresh_form("r0")).await;
        assert_eq!(e, json!({"error": "invalid_client"}));
        let (status, ok) = sim
            .token(Some(&basic(id, secret)), &refresh_form("r0"))
            .await;
        assert_eq!(status, StatusCode::OK, "{ok}");
        let r1 = ok["refresh_token"].as_str().unwrap().to_owned();

        // Form fields.
        let (status, ok) = sim
            .token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &r1),
                    ("client_id", id),
                    ("client_secret", secret),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{ok}");

        // A refresh token of one client is no good to another.
        sim.user("u3b", "a-b", "r-b").await;
        let (_, e) = sim
            .token(Some(&basic(id, secret)), &refresh_form("r-b"))
            .await;
        assert_eq!(e, json!({"error": "invalid_grant"}));
    }

    #[tokio::test]
    async fn paging_by_date_overlaps_and_serves_items_verbatim() {
        let sim = start(SimConfig::default()).await;
        sim.user("u4", "tok", "ref").await;
        let a = bp(101, "2024-03-01T14:05:00", "2024-03-01T06:05:00", 128);
        let b = bp(102, "2024-03-02T15:00:00", "2024-03-02T07:00:00", 131);
        let c = bp(103, "2024-03-03T04:00:00", "2024-03-02T20:00:00", 125);
        sim.store("u4", "bloodpressure", json!([c, a, b])).await;

        let page1 = sim
            .measurement(
                "tok",
                &[
                    ("type", "bloodpressure"),
                    ("since", "2024-03-01"),
                    ("limit", "2"),
                ],
            )
            .await;
        assert_eq!(page1["status"], 0);
        let result = &page1["result"];
        assert_eq!(result["truncated"], true);
        assert_eq!(result["nextPaginationKey"], Value::Null);
        assert_eq!(result["measurementCount"], 2);
        assert_eq!(result["bloodPressure"], json!([a, b]));

        // The client re-asks from the last item's date: 102 comes again.
        let page2 = sim
            .measurement(
                "tok",
                &[
                    ("type", "bloodpressure"),
                    ("since", "2024-03-02"),
                    ("limit", "2"),
                    ("includeHourlyActivity", "false"),
                ],
            )
            .await;
        assert_eq!(ids(&page2, "bloodPressure"), vec![102, 103]);
        assert_eq!(page2["result"]["truncated"], false);

        // Descending, default limit.
        let desc = sim
            .measurement(
                "tok",
                &[
                    ("type", "bloodpressure"),
                    ("since", "2024-03-01"),
                    ("sortOrder", "desc"),
                ],
            )
            .await;
        assert_eq!(ids(&desc, "bloodPressure"), vec![103, 102, 101]);
        assert_eq!(desc["result"]["measurementCount"], 3);

        // More than `limit` items on one date: the same page comes back.
        let same = sim
            .measurement(
                "tok",
                &[
                    ("type", "bloodpressure"),
                    ("since", "2024-03-02"),
                    ("limit", "1"),
                ],
            )
            .await;
        assert_eq!(ids(&same, "bloodPressure"), vec![102]);
        assert_eq!(same["result"]["truncated"], true);

        // An edit replaces the item with its id.
        let b2 = bp(102, "2024-03-02T15:00:00", "2024-03-02T07:00:00", 140);
        sim.store("u4", "bloodpressure", json!([b2])).await;
        let edited = sim
            .measurement("tok", &[("type", "bloodpressure"), ("since", "2024-03-02")])
            .await;
        assert_eq!(edited["result"]["bloodPressure"], json!([b2, c]));

        // Nothing after; other types have their own list key.
        let none = sim
            .measurement("tok", &[("type", "bloodpressure"), ("since", "2024-03-04")])
            .await;
        assert_eq!(none["result"]["measurementCount"], 0);
        assert_eq!(none["result"]["bloodPressure"], json!([]));
        let w = json!({"id": 7, "dateTime": "2024-03-01T08:00:00", "dateTimeLocal": "2024-03-01T09:00:00",
            "dateTimeUtcOffset": "+01:00", "weight": 72.4, "weightUnits": "kg", "bodyFatPercentage": 21.3,
            "bmi": 23.1, "deviceType": "HBF-702T"});
        sim.store("u4", "weight", json!([w])).await;
        let weight = sim
            .measurement("tok", &[("type", "weight"), ("since", "2024-01-01")])
            .await;
        assert_eq!(weight["result"]["weight"], json!([w]));
        assert!(weight["result"].get("bloodPressure").is_none());

        // An item without dateTimeLocal is refused, and nothing of its batch stored.
        let resp = sim
            .http
            .post(format!("{}/_sim/users/u4/measurements", sim.base))
            .json(&json!({"type": "weight", "items": [
                {"id": 8, "dateTime": "2024-03-05T08:00:00", "dateTimeLocal": "2024-03-05T09:00:00"},
                {"id": 9, "dateTime": "2024-03-05T08:00:00"},
            ]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
        let weight = sim
            .measurement("tok", &[("type", "weight"), ("since", "2024-01-01")])
            .await;
        assert_eq!(ids(&weight, "weight"), vec![7]);

        let stats = sim.stats().await;
        assert_eq!(
            stats["users"]["u4"]["requested_types"],
            json!({"bloodpressure": 6, "weight": 2})
        );
        assert_eq!(stats["users"]["u4"]["measurement_requests"], 8);
    }

    #[tokio::test]
    async fn bad_tokens_answer_401_with_www_authenticate() {
        let sim = start(SimConfig::default()).await;
        sim.user("u5", "tok", "ref").await;
        let form = [("type", "bloodpressure"), ("since", "2024-03-01")];

        let resp = sim.measurement_raw("unknown", &form).await;
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert!(resp.bytes().await.unwrap().is_empty());

        // Expired access token: 401, refresh still works.
        assert_eq!(sim.measurement("tok", &form).await["status"], 0);
        let expired = sim.sim("/_sim/users/u5/expire-access", json!({})).await;
        assert_eq!(expired["expired"], 1);
        let resp = sim.measurement_raw("tok", &form).await;
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let (status, tokens) = sim.refresh("ref").await;
        assert_eq!(status, StatusCode::OK);
        let fresh = tokens["access_token"].as_str().unwrap().to_owned();
        assert_eq!(sim.measurement(&fresh, &form).await["status"], 0);

        // Revoked: 401 for the fresh token too.
        sim.control(
            reqwest::Method::DELETE,
            "/_sim/users/u5/tokens",
            Value::Null,
        )
        .await;
        let resp = sim.measurement_raw(&fresh, &form).await;
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);

        // No token at all.
        let resp = sim
            .http
            .post(format!("{}/api/measurement", sim.base))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(sim.stats().await["unauthorized"], 4);
    }

    #[tokio::test]
    async fn bad_parameters_answer_a_nonzero_status() {
        let sim = start(SimConfig::default()).await;
        sim.user("u6", "tok", "ref").await;
        let cases: &[&[(&str, &str)]] = &[
            &[("type", "bloodglucose"), ("since", "2024-03-01")],
            &[("since", "2024-03-01")],
            &[("type", "weight")],
            &[("type", "weight"), ("since", "2024-3-1")],
            &[("type", "weight"), ("since", "1709251200")],
            &[("type", "weight"), ("since", "2024-03-01"), ("limit", "0")],
            &[
                ("type", "weight"),
                ("since", "2024-03-01"),
                ("limit", "501"),
            ],
            &[
                ("type", "weight"),
                ("since", "2024-03-01"),
                ("limit", "ten"),
            ],
            &[
                ("type", "weight"),
                ("since", "2024-03-01"),
                ("sortOrder", "newest"),
            ],
        ];
        for form in cases {
            let answer = sim.measurement("tok", form).await;
            assert_ne!(answer["status"], 0, "{form:?}: {answer}");
            assert_eq!(answer["errorCode"], "INVALID_PARAMETER", "{form:?}");
            assert!(answer["reason"].as_str().is_some_and(|r| !r.is_empty()));
            assert!(answer.get("result").is_none());
        }
        let ok = sim
            .measurement(
                "tok",
                &[
                    ("type", "weight"),
                    ("since", "2024-03-01"),
                    ("limit", "500"),
                ],
            )
            .await;
        assert_eq!(ok["status"], 0);
    }

    #[tokio::test]
    async fn per_user_rate_limit_answers_429() {
        let sim = start(SimConfig {
            rate_limit_per_minute: 2,
        })
        .await;
        sim.user("u7", "tok", "ref").await;
        sim.user("u7b", "tok-b", "ref-b").await;
        let form = [("type", "activity"), ("since", "2024-03-01")];
        assert_eq!(sim.measurement("tok", &form).await["status"], 0);
        assert_eq!(sim.measurement("tok", &form).await["status"], 0);
        let resp = sim.measurement_raw("tok", &form).await;
        assert_eq!(resp.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
        let retry: i64 = resp.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        // Another user has their own budget.
        assert_eq!(sim.measurement("tok-b", &form).await["status"], 0);
        sim.sim("/_sim/clock/advance", json!({"seconds": 61})).await;
        assert_eq!(sim.measurement("tok", &form).await["status"], 0);
        assert_eq!(sim.stats().await["users"]["u7"]["rate_limited"], 1);
    }

    type Received = Arc<Mutex<Vec<(String, Value)>>>;

    /// A notification receiver: `/ok` answers 200, `/flaky` 503 on the first request and then
    /// 200, `/down` always 503.
    async fn receiver() -> (String, Received, oneshot::Sender<()>) {
        let received: Received = Arc::default();
        let record = |answers: fn(usize) -> StatusCode, received: Received| {
            let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            post(move |headers: HeaderMap, body: Bytes| {
                let received = received.clone();
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let ct = headers[header::CONTENT_TYPE].to_str().unwrap().to_owned();
                    let json = serde_json::from_slice(&body).unwrap();
                    received.lock().await.push((ct, json));
                    answers(n)
                }
            })
        };
        let app = Router::new()
            .route("/ok", record(|_| StatusCode::OK, received.clone()))
            .route(
                "/flaky",
                record(
                    |n| match n {
                        0 => StatusCode::SERVICE_UNAVAILABLE,
                        _ => StatusCode::OK,
                    },
                    received.clone(),
                ),
            )
            .route(
                "/down",
                record(|_| StatusCode::SERVICE_UNAVAILABLE, received.clone()),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        (format!("http://{addr}"), received, tx)
    }

    async fn wait_for(received: &Received, n: usize) {
        for _ in 0..100 {
            if received.lock().await.len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} deliveries, got {}",
            received.lock().await.len()
        );
    }

    #[tokio::test]
    async fn notify_posts_json_and_retries_until_a_200() {
        let sim = start(SimConfig::default()).await;
        let (base, received, _stop) = receiver().await;

        // No URL allow-listed yet.
        let resp = sim
            .http
            .post(format!("{}/_sim/users/u8/notify", sim.base))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::CONFLICT);

        let set = sim
            .control(
                reqwest::Method::PUT,
                "/_sim/notification-url",
                json!({"url": format!("{base}/ok")}),
            )
            .await;
        assert_eq!(set["url"], format!("{base}/ok"));
        let sent = sim
            .sim(
                "/_sim/users/u8/notify",
                json!({"timestamp": "2024-03-01T12:00:00Z"}),
            )
            .await;
        assert_eq!(sent, json!({"delivered": true, "status": 200}));
        {
            let got = received.lock().await;
            assert_eq!(got.len(), 1);
            assert!(got[0].0.starts_with("application/json"), "{}", got[0].0);
            assert_eq!(
                got[0].1,
                json!({"id": "u8", "timestamp": "2024-03-01T12:00:00Z"})
            );
        }
        // Without a timestamp: now, in whole seconds UTC.
        sim.sim("/_sim/users/u8/notify", json!({})).await;
        let stamp = received.lock().await[1].1["timestamp"]
            .as_str()
            .unwrap()
            .to_owned();
        let at = chrono::NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%dT%H:%M:%SZ").unwrap();
        assert!(
            (Utc::now().naive_utc() - at).num_seconds().abs() < 5,
            "{stamp}"
        );

        // 503 first: the control call reports it, the retry delivers.
        sim.control(
            reqwest::Method::PUT,
            "/_sim/notification-url",
            json!({"url": format!("{base}/flaky")}),
        )
        .await;
        let sent = sim
            .sim("/_sim/users/u8/notify", json!({"timestamp": "t-flaky"}))
            .await;
        assert_eq!(sent, json!({"delivered": false, "status": 503}));
        wait_for(&received, 4).await;
        assert_eq!(
            received.lock().await[3].1,
            json!({"id": "u8", "timestamp": "t-flaky"})
        );
        let notifications = sim.stats().await["notifications"].clone();
        assert_eq!(notifications, json!({"attempts": 4, "delivered": 3}));

        // Always 503: 1 + 3 attempts, then it gives up.
        sim.control(
            reqwest::Method::PUT,
            "/_sim/notification-url",
            json!({"url": format!("{base}/down")}),
        )
        .await;
        sim.sim("/_sim/users/u8/notify", json!({"timestamp": "t-down"}))
            .await;
        wait_for(&received, 8).await;
        tokio::time::sleep(NOTIFY_RETRY_INTERVAL + Duration::from_millis(500)).await;
        assert_eq!(received.lock().await.len(), 8);
        let notifications = sim.stats().await["notifications"].clone();
        assert_eq!(notifications, json!({"attempts": 8, "delivered": 3}));
    }

    #[tokio::test]
    async fn notify_reports_an_unreachable_url() {
        let sim = start(SimConfig::default()).await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/cb", closed.local_addr().unwrap());
        drop(closed);
        sim.control(
            reqwest::Method::PUT,
            "/_sim/notification-url",
            json!({ "url": url }),
        )
        .await;
        let sent = sim.sim("/_sim/users/u9/notify", json!({})).await;
        assert_eq!(sent["delivered"], false);
        assert_eq!(sent["status"], Value::Null);
        assert!(sent["error"].is_string());
        let health = sim
            .http
            .get(format!("{}/_sim/health", sim.base))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), reqwest::StatusCode::OK);
    }
}
