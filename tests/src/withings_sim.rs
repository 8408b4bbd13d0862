//! Withings cloud simulator.
//!
//! An HTTP server that speaks the Withings Health Data API wire format
//! (research: `providers.md` §1, reference: `withings-openapi.yml`), used by
//! the end-to-end tests and the demo. It reproduces the quirks clients must
//! cope with:
//!
//! * RPC style: `POST` with an `application/x-www-form-urlencoded` body and
//!   `action=<verb>`; legacy `GET` with query parameters is accepted too, and
//!   query and body parameters are merged (the body wins).
//! * Every answer is HTTP 200 with `Content-Type: application/json` and the
//!   envelope `{"status":<int>,"body":{...}}`, plus `"error":"<text>"` when
//!   `status != 0`.
//! * Access tokens come from `Authorization: Bearer <token>` or from an
//!   `access_token` parameter.
//! * Refresh-token rotation: every refresh returns a new access *and* refresh
//!   token; the previous refresh token stays usable until one of the access
//!   tokens issued from it is used, or 8 h pass.
//! * Authorization codes live 30 s and are single-use.
//! * `getmeas` pages with integer `more`/`offset`, rejects `meastype=9,10`,
//!   keeps `value`/`unit` exactly as stored (both `unit: 0` and `unit: -2`
//!   encodings coexist).
//! * `getintradayactivity` returns at most the first 24 h of the requested
//!   window, as a sparse object keyed by epoch-second strings.
//! * `notify subscribe` probes the callback with `HEAD` (2 s timeout) first.
//! * An application-wide rate limit answers `status 601`.
//!
//! Status codes chosen (all from the W-OAS `response_status` table):
//!
//! | situation | status | error text |
//! |---|---|---|
//! | missing/unknown/expired/revoked access token | 401 | `XRequestID: Not provided invalid_token: The access token provided is invalid` |
//! | invalid, expired or already used authorization code | 503 | `Invalid Params: invalid code` (verbatim from the field: home-assistant.io #34285) |
//! | unknown, revoked, expired or superseded refresh token | 503 | `Invalid Params: invalid refresh_token` |
//! | wrong `client_id` / `client_secret` | 503 | `Invalid Params: invalid client_id or client_secret` |
//! | `redirect_uri` differs from the one the code was issued for | 503 | `Invalid Params: redirect_uri_mismatch` |
//! | unknown `grant_type`, unknown `action`, malformed parameter (e.g. `meastype=9,10`) | 503 | `Invalid Params: ...` |
//! | callback URL fails the `HEAD` probe (non-2xx, unreachable, > 2 s) | 293 | `The callback URL '<url>' is either unknown or invalid` |
//! | `notify get/revoke/update` of a subscription that does not exist | 343 | `No notification matching the criteria was found` (code inferred; 343 is in the "Invalid params" family) |
//! | rate limit exceeded | 601 | `Too many request` |
//!
//! 503 lies in the documented "Invalid params" range 501..511 and is what
//! clients observe in practice for bad token requests (withings-sync #41,
//! #215, #219), so it is used for every invalid-parameter case.
//!
//! Besides the Withings API, the simulator exposes a JSON test-control API
//! under `/_sim` (see [`router`]), a minimal browser authorize endpoint
//! (`GET /oauth2_user/authorize2`, normally on `account.withings.com`) that
//! redirects straight back with a code, and a simulated clock that tests can
//! move forward (`POST /_sim/clock/advance`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use crate::sim_support::{
    Params, RATE_WINDOW_MS, bearer_token, json_body, outbound_client, parse_form_into, random_hex,
    rate_limit_admit, serve_router, sim_error, unknown_user,
};

/// Lifetime of an access token (W-DOC: 3 h).
pub const ACCESS_TOKEN_LIFETIME_SECS: i64 = 10_800;
/// Lifetime of a refresh token (W-DOC: 1 year).
pub const REFRESH_TOKEN_LIFETIME_SECS: i64 = 365 * 86_400;
/// How long a rotated refresh token stays usable (W-DOC: 8 h).
pub const ROTATED_REFRESH_GRACE_SECS: i64 = 8 * 3_600;
/// Lifetime of an authorization code (W-OAS: 30 s).
pub const AUTHORIZATION_CODE_LIFETIME_SECS: i64 = 30;
/// Scope returned with every token.
pub const TOKEN_SCOPE: &str = "user.info,user.metrics,user.activity";
/// `expires` of every notification profile in `notify list` (max i32).
pub const NOTIFY_EXPIRES: i64 = 2_147_483_647;
/// Timeout of the `HEAD` probe and of notification deliveries.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest window `getintradayactivity` answers for.
pub const INTRADAY_MAX_WINDOW_SECS: i64 = 86_400;

/// `status` for an authentication failure.
pub const STATUS_INVALID_TOKEN: i64 = 401;
/// `status` for invalid parameters (codes, refresh tokens, actions...).
pub const STATUS_INVALID_PARAMS: i64 = 503;
/// `status` when the callback URL fails validation on subscribe.
pub const STATUS_INVALID_CALLBACK: i64 = 293;
/// `status` when no subscription matches on `notify get/revoke/update`.
pub const STATUS_NO_SUCH_NOTIFICATION: i64 = 343;
/// `status` when the application rate limit is exceeded.
pub const STATUS_TOO_MANY_REQUESTS: i64 = 601;

/// Error text of status 401, verbatim from a real response.
pub const INVALID_TOKEN_ERROR: &str =
    "XRequestID: Not provided invalid_token: The access token provided is invalid";
/// Error text of status 601.
pub const TOO_MANY_REQUESTS_ERROR: &str = "Too many request";

/// Notification categories (`appli`) accepted on subscribe.
const KNOWN_APPLIS: &[i64] = &[1, 2, 4, 16, 44, 46, 50, 51, 52, 53, 54, 55, 58];
/// Intraday keys that describe the device rather than a data field.
const INTRADAY_META_KEYS: &[&str] = &["deviceid", "model", "model_id"];
/// Control key of an intraday entry (not Withings): the entry is served stamped with this
/// epoch second instead of the one it is filed under, like a device whose clock is wrong.
pub const INTRADAY_STAMPED_AT: &str = "_stamped_at";

// ---------------------------------------------------------------------------
// Public data types
// ---------------------------------------------------------------------------

/// Simulator settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Measure groups per `getmeas` page.
    pub page_size: usize,
    /// Application-wide requests allowed per 60 s sliding window (all API
    /// calls together: token, data and notify). 0 disables the limit.
    pub rate_limit_per_minute: usize,
    /// Seed the demo user ([`demo_user`]) at start-up.
    pub demo: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            page_size: 100,
            rate_limit_per_minute: 120,
            demo: false,
        }
    }
}

/// One measure inside a measure group, in the Withings wire shape.
/// Real value = `value * 10^unit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// Mantissa.
    pub value: i64,
    /// Measure type (1 weight, 9 diastolic, 10 systolic, 11 pulse...).
    #[serde(rename = "type")]
    pub kind: i64,
    /// Power-of-ten exponent.
    pub unit: i64,
    /// Deprecated, kept for shape fidelity.
    #[serde(default)]
    pub algo: i64,
    /// Deprecated, kept for shape fidelity.
    #[serde(default = "default_fm")]
    pub fm: i64,
    /// Any other field (`position`, `apppfmid`, `appliver`...), kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_fm() -> i64 {
    128
}

fn default_category() -> i64 {
    1
}

/// A measure group (`measuregrps[]` item of `getmeas`), in the Withings wire
/// shape. On input through the control API, `created`/`modified` of 0 mean
/// "now" and a null `hash_deviceid` is copied from `deviceid`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeasureGroup {
    /// Group id; the upsert key.
    pub grpid: i64,
    /// Attribution (0 device, 2 manual...).
    #[serde(default)]
    pub attrib: i64,
    /// Measurement time (epoch s).
    pub date: i64,
    /// Creation time on the server (epoch s).
    #[serde(default)]
    pub created: i64,
    /// Last change (epoch s); what `lastupdate` filters on.
    #[serde(default)]
    pub modified: i64,
    /// 1 real measure, 2 user objective.
    #[serde(default = "default_category")]
    pub category: i64,
    /// Device id: hex string, null for manual entries, int in some flows.
    #[serde(default)]
    pub deviceid: Value,
    /// Hashed device id.
    #[serde(default)]
    pub hash_deviceid: Value,
    /// The measures.
    pub measures: Vec<Measure>,
    /// Device model id (int or null).
    #[serde(default)]
    pub modelid: Value,
    /// Device model name (string or null).
    #[serde(default)]
    pub model: Value,
    /// Always null in practice.
    #[serde(default)]
    pub comment: Value,
    /// Any other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A user to create, with optional data. Also the body of `POST /_sim/users`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserSeed {
    /// Withings user id.
    pub userid: i64,
    /// Client id of the partner application the user authorized.
    pub client_id: String,
    /// Client secret of that application.
    pub client_secret: String,
    /// Initial access token (generated if absent).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Initial refresh token (generated if absent).
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Lifetime of the initial access token in seconds (default 10800).
    #[serde(default)]
    pub expires_in: Option<i64>,
    /// IANA timezone reported by `getmeas` (default `Europe/Berlin`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Measure groups to store.
    #[serde(default)]
    pub measuregrps: Vec<MeasureGroup>,
    /// Intraday entries keyed by epoch second.
    #[serde(default)]
    pub intraday: BTreeMap<i64, Map<String, Value>>,
}

/// Tokens handed out for a newly created user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTokens {
    /// User id.
    pub userid: i64,
    /// Access token.
    pub access_token: String,
    /// Refresh token.
    pub refresh_token: String,
    /// Access token lifetime in seconds.
    pub expires_in: i64,
}

// ---------------------------------------------------------------------------
// Demo data
// ---------------------------------------------------------------------------

/// Demo user id.
pub const DEMO_USERID: i64 = 4242;
/// Demo client id.
pub const DEMO_CLIENT_ID: &str = "demo-client";
/// Demo client secret.
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";
/// Demo access token.
pub const DEMO_ACCESS_TOKEN: &str = "demo-access-token";
/// Demo refresh token.
pub const DEMO_REFRESH_TOKEN: &str = "demo-refresh-token";
/// Device id of the demo ScanWatch (intraday heart rate).
pub const DEMO_SCANWATCH_DEVICEID: &str = "892359876fd8805ac45bab078c4828692f0276b1";
/// Device id of the demo BPM Connect (unit -2 readings).
pub const DEMO_BPM_CONNECT_DEVICEID: &str = "91a7e556c2022ef54dca6e07a853c3193734d148";
/// Device id of the demo BPM Core (unit 0 readings).
pub const DEMO_BPM_CORE_DEVICEID: &str = "c405eb8e0e053f6601e151c7e43c04e29aad6956";
/// Device id of the demo Body+ scale.
pub const DEMO_SCALE_DEVICEID: &str = "3a4c9e1f7b2d8e6a5c0b9f8e7d6c5b4a3f2e1d0c";

fn measure(value: i64, kind: i64, unit: i64, fm: i64) -> Measure {
    Measure {
        value,
        kind,
        unit,
        algo: 0,
        fm,
        extra: Map::new(),
    }
}

fn device_group(
    grpid: i64,
    date: i64,
    deviceid: &str,
    modelid: i64,
    model: &str,
    measures: Vec<Measure>,
) -> MeasureGroup {
    MeasureGroup {
        grpid,
        attrib: 0,
        date,
        created: date + 120,
        modified: date + 120,
        category: 1,
        deviceid: json!(deviceid),
        hash_deviceid: json!(deviceid),
        measures,
        modelid: json!(modelid),
        model: json!(model),
        comment: Value::Null,
        extra: Map::new(),
    }
}

/// The demo user, with data relative to `now`:
///
/// * 3 blood-pressure groups (types 9 diastolic, 10 systolic, 11 pulse), one
///   per day over the last 3 days, mixing the `unit: -2` (BPM Connect,
///   e.g. systolic `12100`/-2) and `unit: 0` (BPM Core, e.g. systolic `118`/0)
///   encodings;
/// * 3 weight groups (type 1): `72450`/-3, `7260`/-2 and `72300`/-3;
/// * intraday `heart_rate` every minute of the last 3 full UTC hours before
///   `now`, from a ScanWatch (model_id 93).
pub fn demo_user(now: DateTime<Utc>) -> UserSeed {
    const DAY: i64 = 86_400;
    let now_s = now.timestamp();
    // Whole minutes keep the demo readable.
    let base = now_s - now_s.rem_euclid(60);

    let bp = vec![
        device_group(
            4_242_000_101,
            base - 3 * DAY + 1_800,
            DEMO_BPM_CONNECT_DEVICEID,
            45,
            "BPM Connect",
            vec![
                measure(8_000, 9, -2, 128),
                measure(12_100, 10, -2, 128),
                measure(6_500, 11, -2, 128),
            ],
        ),
        device_group(
            4_242_000_102,
            base - 2 * DAY + 1_800,
            DEMO_BPM_CORE_DEVICEID,
            44,
            "BPM Core",
            vec![
                measure(78, 9, 0, 3),
                measure(118, 10, 0, 3),
                measure(64, 11, 0, 3),
            ],
        ),
        device_group(
            4_242_000_103,
            base - DAY + 1_800,
            DEMO_BPM_CONNECT_DEVICEID,
            45,
            "BPM Connect",
            vec![
                measure(8_200, 9, -2, 128),
                measure(12_500, 10, -2, 128),
                measure(7_000, 11, -2, 128),
            ],
        ),
    ];
    let weight = vec![
        device_group(
            4_242_000_201,
            base - 3 * DAY + 3_600,
            DEMO_SCALE_DEVICEID,
            5,
            "Body+",
            vec![measure(72_450, 1, -3, 128)],
        ),
        device_group(
            4_242_000_202,
            base - 2 * DAY + 3_600,
            DEMO_SCALE_DEVICEID,
            5,
            "Body+",
            vec![measure(7_260, 1, -2, 128)],
        ),
        device_group(
            4_242_000_203,
            base - DAY + 3_600,
            DEMO_SCALE_DEVICEID,
            5,
            "Body+",
            vec![measure(72_300, 1, -3, 128)],
        ),
    ];

    let hour_start = now_s - now_s.rem_euclid(3_600);
    let mut intraday = BTreeMap::new();
    for (i, ts) in (hour_start - 3 * 3_600..hour_start).step_by(60).enumerate() {
        let i = i64::try_from(i).unwrap_or(0);
        // A gentle deterministic wave between 58 and 84 bpm.
        let heart_rate = 58 + (i * 7) % 19 + (i / 30) % 8;
        let mut entry = Map::new();
        entry.insert("deviceid".into(), json!(DEMO_SCANWATCH_DEVICEID));
        entry.insert("model".into(), json!("ScanWatch"));
        entry.insert("model_id".into(), json!(93));
        entry.insert("heart_rate".into(), json!(heart_rate));
        intraday.insert(ts, entry);
    }

    UserSeed {
        userid: DEMO_USERID,
        client_id: DEMO_CLIENT_ID.into(),
        client_secret: DEMO_CLIENT_SECRET.into(),
        access_token: Some(DEMO_ACCESS_TOKEN.into()),
        refresh_token: Some(DEMO_REFRESH_TOKEN.into()),
        expires_in: Some(ACCESS_TOKEN_LIFETIME_SECS),
        timezone: Some("Europe/Berlin".into()),
        measuregrps: bp.into_iter().chain(weight).collect(),
        intraday,
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct AccessToken {
    userid: i64,
    expires_at: i64,
    used: bool,
    revoked: bool,
}

#[derive(Debug)]
struct RefreshToken {
    userid: i64,
    client_id: String,
    expires_at: i64,
    revoked: bool,
    /// When this token was first exchanged for a new pair.
    rotated_at: Option<i64>,
    /// Access tokens issued from this refresh token.
    successors: Vec<String>,
}

#[derive(Debug)]
struct AuthCode {
    userid: i64,
    client_id: String,
    redirect_uri: Option<String>,
    expires_at: i64,
}

#[derive(Clone, Debug, Serialize)]
struct Subscription {
    appli: i64,
    callbackurl: String,
    comment: String,
}

/// An ECG recording: its `v2/heart list` item and its `v2/heart get` body.
type Recording = (Map<String, Value>, Map<String, Value>);

#[derive(Debug)]
struct User {
    client_id: String,
    timezone: String,
    groups: BTreeMap<i64, MeasureGroup>,
    intraday: BTreeMap<i64, Map<String, Value>>,
    /// Daily activity rows keyed by their `date` (`YYYY-MM-DD`), as `getactivity` answers them.
    activities: BTreeMap<String, Map<String, Value>>,
    /// Sleep summaries keyed by their night `id`, as `v2/sleep getsummary` answers them.
    sleep_summaries: BTreeMap<i64, Map<String, Value>>,
    /// `v2/sleep get` segments (`startdate`, `enddate`, `state`, ...), oldest first.
    sleep_segments: Vec<Map<String, Value>>,
    /// ECG recordings keyed by `ecg.signalid`: the `v2/heart list` item and the `get` body.
    heart: BTreeMap<i64, Recording>,
    /// Devices as `v2/user getdevice` lists them.
    devices: Vec<Value>,
    subscriptions: Vec<Subscription>,
    current_access: Option<String>,
    current_refresh: Option<String>,
    /// Every `getmeas` type and intraday `data_fields` entry this user's data was asked for
    /// (so tests can tell a data type was never fetched).
    requested: BTreeSet<String>,
}

#[derive(Debug)]
struct FailNext {
    status: i64,
    error: String,
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    requests_total: u64,
    /// Requests per `<service>/<action>`, e.g. `measure/getmeas`.
    requests: BTreeMap<String, u64>,
    /// Responses per envelope status.
    statuses: BTreeMap<i64, u64>,
    token_refreshes: u64,
    code_exchanges: u64,
    status_401: u64,
    status_601: u64,
    subscribe_probes_failed: u64,
    notifications_sent: u64,
}

#[derive(Debug, Default)]
struct Inner {
    clock_offset_secs: i64,
    users: BTreeMap<i64, User>,
    clients: HashMap<String, String>,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, RefreshToken>,
    codes: HashMap<String, AuthCode>,
    rate_window: VecDeque<i64>,
    fail_next: VecDeque<FailNext>,
    stats: Stats,
}

/// Shared simulator state; build it with [`SimState::new`] and hand it to
/// [`router`].
#[derive(Debug)]
pub struct SimState {
    config: SimConfig,
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

impl SimState {
    /// Creates an empty simulator (no users, even if `config.demo` is set;
    /// [`serve`] seeds the demo user).
    pub fn new(config: SimConfig) -> anyhow::Result<Arc<Self>> {
        let http = outbound_client(Some(CALLBACK_TIMEOUT), "callback")?;
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

    /// Current simulated time (wall clock plus any `/_sim/clock/advance`).
    pub async fn now(&self) -> DateTime<Utc> {
        self.inner.lock().await.now()
    }

    /// Creates or replaces a user (credentials, tokens, timezone); existing
    /// measure groups, intraday data and subscriptions are kept and the seed's
    /// data merged in. Previous tokens of the user are revoked.
    pub async fn add_user(&self, seed: UserSeed) -> UserTokens {
        self.inner.lock().await.add_user(seed)
    }

    /// Adds or replaces measure groups of a user; `None` if the user is unknown.
    pub async fn upsert_measure_groups(
        &self,
        userid: i64,
        groups: Vec<MeasureGroup>,
    ) -> Option<usize> {
        self.inner.lock().await.upsert_groups(userid, groups)
    }

    /// Merges intraday entries into a user's series; `None` if the user is
    /// unknown.
    pub async fn merge_intraday(
        &self,
        userid: i64,
        series: BTreeMap<i64, Map<String, Value>>,
    ) -> Option<usize> {
        self.inner.lock().await.merge_intraday(userid, series)
    }
}

fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
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
        let userid = seed.userid;
        self.revoke_user_tokens(userid);
        self.clients
            .insert(seed.client_id.clone(), seed.client_secret.clone());
        let expires_in = seed.expires_in.unwrap_or(ACCESS_TOKEN_LIFETIME_SECS);
        let access = seed.access_token.unwrap_or_else(|| random_hex(20));
        let refresh = seed.refresh_token.unwrap_or_else(|| random_hex(20));
        let timezone = seed.timezone.unwrap_or_else(|| "Europe/Berlin".into());
        let user = self.users.entry(userid).or_insert_with(|| User {
            client_id: String::new(),
            timezone: String::new(),
            groups: BTreeMap::new(),
            intraday: BTreeMap::new(),
            activities: BTreeMap::new(),
            sleep_summaries: BTreeMap::new(),
            heart: BTreeMap::new(),
            sleep_segments: Vec::new(),
            devices: Vec::new(),
            subscriptions: Vec::new(),
            current_access: None,
            current_refresh: None,
            requested: BTreeSet::new(),
        });
        user.client_id = seed.client_id.clone();
        user.timezone = timezone;
        user.current_access = Some(access.clone());
        user.current_refresh = Some(refresh.clone());
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                userid,
                expires_at: now + expires_in,
                used: false,
                revoked: false,
            },
        );
        self.refresh_tokens.insert(
            refresh.clone(),
            RefreshToken {
                userid,
                client_id: seed.client_id,
                expires_at: now + REFRESH_TOKEN_LIFETIME_SECS,
                revoked: false,
                rotated_at: None,
                successors: Vec::new(),
            },
        );
        self.upsert_groups(userid, seed.measuregrps);
        self.merge_intraday(userid, seed.intraday);
        UserTokens {
            userid,
            access_token: access,
            refresh_token: refresh,
            expires_in,
        }
    }

    fn revoke_user_tokens(&mut self, userid: i64) {
        for t in self.access_tokens.values_mut() {
            if t.userid == userid {
                t.revoked = true;
            }
        }
        for t in self.refresh_tokens.values_mut() {
            if t.userid == userid {
                t.revoked = true;
            }
        }
        self.codes.retain(|_, c| c.userid != userid);
    }

    fn upsert_groups(&mut self, userid: i64, groups: Vec<MeasureGroup>) -> Option<usize> {
        let now = self.now_s();
        let user = self.users.get_mut(&userid)?;
        let n = groups.len();
        for mut g in groups {
            if g.hash_deviceid.is_null() && !g.deviceid.is_null() {
                g.hash_deviceid = g.deviceid.clone();
            }
            match user.groups.get(&g.grpid) {
                Some(old) => {
                    if g.created == 0 {
                        g.created = old.created;
                    }
                    let wanted = if g.modified == 0 { now } else { g.modified };
                    g.modified = wanted.max(old.modified + 1);
                }
                None => {
                    if g.created == 0 {
                        g.created = now;
                    }
                    if g.modified == 0 {
                        g.modified = g.created;
                    }
                }
            }
            user.groups.insert(g.grpid, g);
        }
        Some(n)
    }

    fn merge_intraday(
        &mut self,
        userid: i64,
        series: BTreeMap<i64, Map<String, Value>>,
    ) -> Option<usize> {
        let user = self.users.get_mut(&userid)?;
        let n = series.len();
        for (ts, fields) in series {
            user.intraday.entry(ts).or_default().extend(fields);
        }
        Some(n)
    }

    fn issue_tokens(&mut self, userid: i64, client_id: &str) -> (String, String) {
        let now = self.now_s();
        let access = random_hex(20);
        let refresh = random_hex(20);
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                userid,
                expires_at: now + ACCESS_TOKEN_LIFETIME_SECS,
                used: false,
                revoked: false,
            },
        );
        self.refresh_tokens.insert(
            refresh.clone(),
            RefreshToken {
                userid,
                client_id: client_id.to_owned(),
                expires_at: now + REFRESH_TOKEN_LIFETIME_SECS,
                revoked: false,
                rotated_at: None,
                successors: Vec::new(),
            },
        );
        if let Some(user) = self.users.get_mut(&userid) {
            user.current_access = Some(access.clone());
            user.current_refresh = Some(refresh.clone());
        }
        (access, refresh)
    }

    fn refresh_token_valid(&self, token: &RefreshToken, now: i64) -> bool {
        if token.revoked || now >= token.expires_at {
            return false;
        }
        match token.rotated_at {
            None => true,
            Some(at) => {
                now < at + ROTATED_REFRESH_GRACE_SECS
                    && !token
                        .successors
                        .iter()
                        .any(|a| self.access_tokens.get(a).is_some_and(|a| a.used))
            }
        }
    }

    fn client_ok(&self, client_id: Option<&str>, client_secret: Option<&str>) -> bool {
        match (client_id, client_secret) {
            (Some(id), Some(secret)) => self.clients.get(id).is_some_and(|s| s == secret),
            _ => false,
        }
    }

    /// Checks the access token, marking it used. `None` means 401.
    fn authenticate(&mut self, token: Option<&str>) -> Option<i64> {
        let now = self.now_s();
        let t = self.access_tokens.get_mut(token?)?;
        if t.revoked || now >= t.expires_at {
            return None;
        }
        t.used = true;
        Some(t.userid)
    }

    /// Sliding 60 s window over admitted requests.
    fn rate_limit_admit(&mut self, limit: usize) -> bool {
        let now_ms = self.now().timestamp_millis();
        rate_limit_admit(&mut self.rate_window, limit, now_ms).is_ok()
    }
}

// ---------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Reply {
    status: i64,
    body: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: 0,
            body,
            error: None,
        }
    }

    fn err(status: i64, error: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({}),
            error: Some(error.into()),
        }
    }

    fn invalid(what: &str) -> Self {
        Self::err(STATUS_INVALID_PARAMS, format!("Invalid Params: {what}"))
    }

    fn unauthorized() -> Self {
        Self::err(STATUS_INVALID_TOKEN, INVALID_TOKEN_ERROR)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        // Always HTTP 200, whatever the envelope status.
        (StatusCode::OK, axum::Json(self)).into_response()
    }
}

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// A non-empty parameter, trimmed (Withings ignores surrounding blanks).
fn param<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Parses an optional integer parameter; `Err` carries the reply.
fn int_param(p: &Params, key: &str) -> Result<Option<i64>, Reply> {
    match param(p, key) {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| Reply::invalid(&format!("invalid {key}"))),
    }
}

/// The Bearer token of the `Authorization` header, else the `access_token` parameter, trimmed
/// (unlike [`crate::sim_support::bearer_or_access_token`]: Withings trims every parameter).
fn access_token<'a>(headers: &'a HeaderMap, params: &'a Params) -> Option<&'a str> {
    bearer_token(headers).or_else(|| param(params, "access_token"))
}

// ---------------------------------------------------------------------------
// Withings API
// ---------------------------------------------------------------------------

/// Builds the router: the Withings API plus the `/_sim` control API.
///
/// Withings routes (POST form or GET query, dispatched on `action`):
/// * `/v2/oauth2`: `requesttoken` (grant types `authorization_code`,
///   `refresh_token`), `revoke`;
/// * `/measure`: `getmeas`;
/// * `/v2/measure`: `getintradayactivity`, `getactivity` (daily rows, boolean `more`);
/// * `/v2/sleep`: `getsummary` (nights, boolean `more`), `get` (the segments overlapping
///   `startdate..enddate`, at most 24 h, with the series `data_fields` names);
/// * `/v2/heart`: `list` (recordings whose `timestamp` lies in `startdate..=enddate`, boolean
///   `more`), `get` (`signalid` → `signal` in µV, `sampling_frequency`, `wearposition`);
/// * `/v2/user`: `getdevice`;
/// * `/notify`: `subscribe`, `list`, `get`, `revoke`, `update`;
/// * `GET /oauth2_user/authorize2`: browser authorize step, redirects to
///   `redirect_uri?code=..&state=..` at once (pick the user with `userid=`,
///   otherwise the lowest userid registered for `client_id`).
///
/// Control routes (JSON, not Withings):
/// * `POST /_sim/users` ([`UserSeed`]) → [`UserTokens`];
/// * `POST /_sim/users/{userid}/measuregrps` `{"measuregrps":[...]}`;
/// * `DELETE /_sim/users/{userid}/measuregrps/{grpid}`: the user deleted the group in the
///   app (Withings keeps no tombstone: the group is simply no longer listed);
/// * `POST /_sim/users/{userid}/intraday` `{"series":{"<epoch>":{...}}}` (an entry with
///   `"_stamped_at": <epoch>` is found at its key but served stamped with that time);
/// * `POST /_sim/users/{userid}/activities` `{"activities":[{"date":"YYYY-MM-DD",...}]}` (a row
///   replaces the one of its date);
/// * `POST /_sim/users/{userid}/sleep-summaries` `{"series":[{"id":N,...}]}` (a night replaces
///   the one with its id);
/// * `POST /_sim/users/{userid}/sleep-segments` `{"series":[{"startdate","enddate","state",...}]}`
///   (added to the user's segments);
/// * `POST /_sim/users/{userid}/heart` `{"series":[{list item..., "signal":[...],
///   "sampling_frequency":N, "wearposition":N}]}` (a recording replaces the one with its
///   `ecg.signalid`);
/// * `POST /_sim/users/{userid}/devices` `{"devices":[...]}` (replaces the list);
/// * `POST /_sim/users/{userid}/expire-access-token`;
/// * `POST /_sim/users/{userid}/revoke`;
/// * `POST /_sim/users/{userid}/authorization-code` `{"redirect_uri"?}` →
///   `{"code","expires_in":30}`;
/// * `POST /_sim/rate-limit/exhaust`;
/// * `POST /_sim/fail-next` `{"count":N,"status":601,"error"?}`;
/// * `POST /_sim/clock/advance` `{"seconds":N}`;
/// * `POST /_sim/notify` `{"userid","appli","startdate","enddate","date"?,"deviceid"?,"action"?}`;
/// * `GET /_sim/stats` (per user: tokens, counts, and `requested`: every `meastype:N` and
///   `field:NAME` a data request asked for).
pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v2/oauth2", get(api).post(api))
        .route("/measure", get(api).post(api))
        .route("/v2/measure", get(api).post(api))
        .route("/v2/sleep", get(api).post(api))
        .route("/v2/heart", get(api).post(api))
        .route("/v2/user", get(api).post(api))
        .route("/notify", get(api).post(api))
        .route("/oauth2_user/authorize2", get(authorize))
        .route("/_sim/users", post(sim_create_user))
        .route("/_sim/users/{userid}/measuregrps", post(sim_measuregrps))
        .route(
            "/_sim/users/{userid}/measuregrps/{grpid}",
            delete(sim_delete_measuregrp),
        )
        .route("/_sim/users/{userid}/intraday", post(sim_intraday))
        .route("/_sim/users/{userid}/activities", post(sim_activities))
        .route(
            "/_sim/users/{userid}/sleep-summaries",
            post(sim_sleep_summaries),
        )
        .route("/_sim/users/{userid}/heart", post(sim_heart))
        .route(
            "/_sim/users/{userid}/sleep-segments",
            post(sim_sleep_segments),
        )
        .route("/_sim/users/{userid}/devices", post(sim_devices))
        .route(
            "/_sim/users/{userid}/expire-access-token",
            post(sim_expire_access_token),
        )
        .route("/_sim/users/{userid}/revoke", post(sim_revoke))
        .route(
            "/_sim/users/{userid}/authorization-code",
            post(sim_authorization_code),
        )
        .route("/_sim/rate-limit/exhaust", post(sim_exhaust))
        .route("/_sim/fail-next", post(sim_fail_next))
        .route("/_sim/clock/advance", post(sim_clock_advance))
        .route("/_sim/notify", post(sim_notify))
        .route("/_sim/stats", get(sim_stats))
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown` resolves. Seeds the
/// demo user when `config.demo` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let demo = config.demo;
    let state = SimState::new(config)?;
    if demo {
        let now = state.now().await;
        state.add_user(demo_user(now)).await;
    }
    serve_with_state(listener, state, shutdown).await
}

/// Like [`serve`], with a state built (and possibly seeded) by the caller.
pub async fn serve_with_state(
    listener: tokio::net::TcpListener,
    state: Arc<SimState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_router("withings-sim", listener, router(state), shutdown).await
}

async fn api(
    State(st): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let service = uri.path().trim_start_matches('/').to_owned();
    let mut params = Params::new();
    if let Some(q) = uri.query() {
        parse_form_into(q, &mut params);
    }
    if method == Method::POST
        && let Ok(text) = std::str::from_utf8(&body)
    {
        parse_form_into(text, &mut params);
    }
    let action = param(&params, "action").unwrap_or("").to_owned();
    let reply = handle_api(&st, &service, &action, &params, &headers).await;
    {
        let mut inner = st.inner.lock().await;
        *inner.stats.statuses.entry(reply.status).or_default() += 1;
        match reply.status {
            STATUS_INVALID_TOKEN => inner.stats.status_401 += 1,
            STATUS_TOO_MANY_REQUESTS => inner.stats.status_601 += 1,
            _ => {}
        }
    }
    tracing::debug!(service = %service, action = %action, status = reply.status, "withings-sim request");
    reply.into_response()
}

/// What to do after the `HEAD` probe of a callback URL succeeded.
enum PendingNotify {
    Subscribe {
        userid: i64,
        sub: Subscription,
    },
    Update {
        userid: i64,
        callbackurl: String,
        appli: i64,
        new: Subscription,
    },
}

async fn handle_api(
    st: &SimState,
    service: &str,
    action: &str,
    params: &Params,
    headers: &HeaderMap,
) -> Reply {
    let (probe_url, pending) = {
        let mut inner = st.inner.lock().await;
        inner.stats.requests_total += 1;
        *inner
            .stats
            .requests
            .entry(format!("{service}/{action}"))
            .or_default() += 1;
        if let Some(f) = inner.fail_next.pop_front() {
            return Reply::err(f.status, f.error);
        }
        if !inner.rate_limit_admit(st.config.rate_limit_per_minute) {
            return Reply::err(STATUS_TOO_MANY_REQUESTS, TOO_MANY_REQUESTS_ERROR);
        }
        if service == "v2/oauth2" {
            return match action {
                "requesttoken" => inner.request_token(params),
                "revoke" => inner.oauth2_revoke(params),
                _ => Reply::invalid("unknown action"),
            };
        }
        let Some(userid) = inner.authenticate(access_token(headers, params)) else {
            return Reply::unauthorized();
        };
        match (service, action) {
            ("measure", "getmeas") => {
                inner.record_requested(userid, params, &["meastype", "meastypes"], "meastype");
                return inner.getmeas(userid, params, st.config.page_size);
            }
            ("v2/user", "getdevice") => {
                return match inner.users.get(&userid) {
                    Some(u) => Reply::ok(json!({ "devices": u.devices })),
                    None => Reply::unauthorized(),
                };
            }
            ("v2/sleep", "getsummary") => {
                inner.record_requested(userid, params, &["data_fields"], "sleep");
                return inner.sleep_summary(userid, params, st.config.page_size);
            }
            ("v2/sleep", "get") => {
                inner.record_requested(userid, params, &[], "sleep-get");
                return inner.sleep_get(userid, params);
            }
            ("v2/heart", "list") => {
                inner.record_requested(userid, params, &[], "heart");
                return inner.heart_list(userid, params, st.config.page_size);
            }
            ("v2/heart", "get") => return inner.heart_get(userid, params),
            ("v2/measure", "getactivity") => {
                inner.record_requested(userid, params, &["data_fields"], "activity");
                return inner.activity(userid, params, st.config.page_size);
            }
            ("v2/measure", "getintradayactivity") => {
                inner.record_requested(userid, params, &["data_fields"], "field");
                return inner.intraday(userid, params);
            }
            ("notify", "list") => return inner.notify_list(userid, params),
            ("notify", "get") => return inner.notify_get(userid, params),
            ("notify", "revoke") => return inner.notify_revoke(userid, params),
            ("notify", "subscribe") => match prepare_subscribe(userid, params) {
                Ok(p) => p,
                Err(r) => return r,
            },
            ("notify", "update") => match inner.prepare_update(userid, params) {
                Ok(Some(p)) => p,
                Ok(None) => return Reply::ok(json!({})),
                Err(r) => return r,
            },
            _ => return Reply::invalid("unknown action"),
        }
    };

    // The lock is released while the callback is probed.
    if !probe_callback(&st.http, &probe_url).await {
        st.inner.lock().await.stats.subscribe_probes_failed += 1;
        return Reply::err(
            STATUS_INVALID_CALLBACK,
            format!("The callback URL '{probe_url}' is either unknown or invalid"),
        );
    }
    let mut inner = st.inner.lock().await;
    match pending {
        PendingNotify::Subscribe { userid, sub } => {
            if let Some(user) = inner.users.get_mut(&userid) {
                match user
                    .subscriptions
                    .iter_mut()
                    .find(|s| s.appli == sub.appli && s.callbackurl == sub.callbackurl)
                {
                    Some(existing) => existing.comment = sub.comment,
                    None => user.subscriptions.push(sub),
                }
            }
            Reply::ok(json!({}))
        }
        PendingNotify::Update {
            userid,
            callbackurl,
            appli,
            new,
        } => {
            let Some(user) = inner.users.get_mut(&userid) else {
                return Reply::unauthorized();
            };
            user.subscriptions
                .retain(|s| !(s.appli == appli && s.callbackurl == callbackurl));
            user.subscriptions
                .retain(|s| !(s.appli == new.appli && s.callbackurl == new.callbackurl));
            user.subscriptions.push(new);
            Reply::ok(json!({}))
        }
    }
}

fn valid_callback_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

/// `HEAD` probe as done by Withings: 2xx within 2 s, redirects not followed.
async fn probe_callback(http: &reqwest::Client, url: &str) -> bool {
    if !valid_callback_url(url) {
        return false;
    }
    match http.head(url).timeout(CALLBACK_TIMEOUT).send().await {
        Ok(r) => r.status().is_success(),
        Err(e) => {
            tracing::debug!(url, error = %e, "callback probe failed");
            false
        }
    }
}

fn appli_param(params: &Params, required: bool) -> Result<Option<i64>, Reply> {
    match int_param(params, "appli")? {
        None if required => Err(Reply::invalid("appli is required")),
        Some(a) if !KNOWN_APPLIS.contains(&a) => Err(Reply::invalid("invalid appli")),
        other => Ok(other),
    }
}

fn prepare_subscribe(userid: i64, params: &Params) -> Result<(String, PendingNotify), Reply> {
    let callbackurl = param(params, "callbackurl")
        .ok_or_else(|| Reply::invalid("callbackurl is required"))?
        .to_owned();
    let appli = appli_param(params, true)?.unwrap_or(1);
    let comment = param(params, "comment").unwrap_or("").to_owned();
    Ok((
        callbackurl.clone(),
        PendingNotify::Subscribe {
            userid,
            sub: Subscription {
                appli,
                callbackurl,
                comment,
            },
        },
    ))
}

fn no_such_notification() -> Reply {
    Reply::err(
        STATUS_NO_SUCH_NOTIFICATION,
        "No notification matching the criteria was found",
    )
}

impl Inner {
    fn request_token(&mut self, params: &Params) -> Reply {
        let client_id = param(params, "client_id");
        let client_secret = param(params, "client_secret");
        let now = self.now_s();
        let (userid, client) = match param(params, "grant_type") {
            Some("authorization_code") => {
                let Some(code) = param(params, "code") else {
                    return Reply::invalid("invalid code");
                };
                if !self.client_ok(client_id, client_secret) {
                    return Reply::invalid("invalid client_id or client_secret");
                }
                // Single use: the code is consumed by any exchange attempt.
                let Some(c) = self.codes.remove(code) else {
                    return Reply::invalid("invalid code");
                };
                if now >= c.expires_at || Some(c.client_id.as_str()) != client_id {
                    return Reply::invalid("invalid code");
                }
                if let Some(expected) = &c.redirect_uri
                    && param(params, "redirect_uri") != Some(expected.as_str())
                {
                    return Reply::invalid("redirect_uri_mismatch");
                }
                self.stats.code_exchanges += 1;
                (c.userid, c.client_id)
            }
            Some("refresh_token") => {
                let Some(token) = param(params, "refresh_token") else {
                    return Reply::invalid("invalid refresh_token");
                };
                if !self.client_ok(client_id, client_secret) {
                    return Reply::invalid("invalid client_id or client_secret");
                }
                let Some(rt) = self.refresh_tokens.get(token) else {
                    return Reply::invalid("invalid refresh_token");
                };
                if !self.refresh_token_valid(rt, now) || Some(rt.client_id.as_str()) != client_id {
                    return Reply::invalid("invalid refresh_token");
                }
                let ids = (rt.userid, rt.client_id.clone());
                self.stats.token_refreshes += 1;
                let token = token.to_owned();
                let (access, refresh) = self.issue_tokens(ids.0, &ids.1);
                if let Some(rt) = self.refresh_tokens.get_mut(&token) {
                    rt.rotated_at.get_or_insert(now);
                    rt.successors.push(access.clone());
                }
                return token_reply(ids.0, access, refresh);
            }
            _ => return Reply::invalid("invalid grant_type"),
        };
        let (access, refresh) = self.issue_tokens(userid, &client);
        token_reply(userid, access, refresh)
    }

    /// `v2/oauth2 action=revoke`: the partner revokes a user's grant.
    fn oauth2_revoke(&mut self, params: &Params) -> Reply {
        if !self.client_ok(param(params, "client_id"), param(params, "client_secret")) {
            return Reply::invalid("invalid client_id or client_secret");
        }
        let userid = match int_param(params, "userid") {
            Ok(Some(u)) => u,
            Ok(None) => return Reply::invalid("userid is required"),
            Err(r) => return r,
        };
        if !self.users.contains_key(&userid) {
            return Reply::invalid("invalid userid");
        }
        self.revoke_user_tokens(userid);
        Reply::ok(json!({}))
    }

    /// Remembers what a data request asked for: `{prefix}:{value}` for every comma-separated
    /// value of the `keys` parameters (e.g. `meastype:9`, `field:steps`).
    fn record_requested(&mut self, userid: i64, params: &Params, keys: &[&str], prefix: &str) {
        let Some(user) = self.users.get_mut(&userid) else {
            return;
        };
        for key in keys {
            if let Some(list) = param(params, key) {
                for v in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    user.requested.insert(format!("{prefix}:{v}"));
                }
            }
        }
    }

    fn getmeas(&self, userid: i64, params: &Params, page_size: usize) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let mut types: Option<Vec<i64>> = None;
        if let Some(s) = param(params, "meastype") {
            // The plural form is required for several types.
            match s.parse::<i64>() {
                Ok(t) => types.get_or_insert_with(Vec::new).push(t),
                Err(_) => return Reply::invalid("invalid meastype"),
            }
        }
        if let Some(s) = param(params, "meastypes") {
            for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match part.parse::<i64>() {
                    Ok(t) => types.get_or_insert_with(Vec::new).push(t),
                    Err(_) => return Reply::invalid("invalid meastypes"),
                }
            }
        }
        let (category, startdate, enddate, lastupdate, offset) = match getmeas_filters(params) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if category.is_some_and(|c| c != 1 && c != 2) {
            return Reply::invalid("invalid category");
        }
        let offset = match usize::try_from(offset.unwrap_or(0)) {
            Ok(o) => o,
            Err(_) => return Reply::invalid("invalid offset"),
        };

        let mut groups: Vec<MeasureGroup> = user
            .groups
            .values()
            .filter(|g| category.is_none_or(|c| g.category == c))
            .filter(|g| startdate.is_none_or(|s| g.date >= s))
            .filter(|g| enddate.is_none_or(|e| g.date <= e))
            .filter(|g| lastupdate.is_none_or(|l| g.modified >= l))
            .filter_map(|g| {
                let Some(types) = &types else {
                    return Some(g.clone());
                };
                let mut g = g.clone();
                g.measures.retain(|m| types.contains(&m.kind));
                (!g.measures.is_empty()).then_some(g)
            })
            .collect();
        // Newest measurement first, as Withings does.
        groups.sort_by(|a, b| b.date.cmp(&a.date).then(b.grpid.cmp(&a.grpid)));

        let page_size = page_size.max(1);
        let total = groups.len();
        let page: Vec<MeasureGroup> = groups.into_iter().skip(offset).take(page_size).collect();
        let next = offset.saturating_add(page.len());
        let more = i64::from(next < total);
        Reply::ok(json!({
            "updatetime": self.now_s(),
            "timezone": user.timezone,
            "measuregrps": page,
            "more": more,
            "offset": next,
        }))
    }

    /// `getactivity`: the daily rows between `startdateymd` and `enddateymd` (inclusive) or
    /// modified since `lastupdate`, oldest first, paged with boolean `more` and `offset`;
    /// `data_fields` keeps only those fields (plus the row's identity fields).
    fn activity(&self, userid: i64, params: &Params, page_size: usize) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let ymd = |key: &str| -> Result<Option<String>, Reply> {
            match param(params, key) {
                None => Ok(None),
                Some(s) if chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() => {
                    Ok(Some(s.to_owned()))
                }
                Some(_) => Err(Reply::invalid(&format!("invalid {key}"))),
            }
        };
        let (start, end) = match (ymd("startdateymd"), ymd("enddateymd")) {
            (Ok(s), Ok(e)) => (s, e),
            (Err(r), _) | (_, Err(r)) => return r,
        };
        let (lastupdate, offset) =
            match (int_param(params, "lastupdate"), int_param(params, "offset")) {
                (Ok(l), Ok(o)) => (l, o.unwrap_or(0)),
                (Err(r), _) | (_, Err(r)) => return r,
            };
        if lastupdate.is_none() && (start.is_none() || end.is_none()) {
            return Reply::invalid("startdateymd and enddateymd, or lastupdate");
        }
        let fields: Option<Vec<&str>> = param(params, "data_fields").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect()
        });
        const IDENTITY: [&str; 8] = [
            "date",
            "timezone",
            "modified",
            "deviceid",
            "hash_deviceid",
            "brand",
            "model",
            "modelid",
        ];
        let rows: Vec<Value> = user
            .activities
            .iter()
            .filter(|(date, _)| start.as_ref().is_none_or(|s| *date >= s))
            .filter(|(date, _)| end.as_ref().is_none_or(|e| *date <= e))
            .filter(|(_, row)| {
                lastupdate
                    .is_none_or(|l| row.get("modified").and_then(Value::as_i64).unwrap_or(0) >= l)
            })
            .map(|(_, row)| {
                let kept = row
                    .iter()
                    .filter(|(k, _)| {
                        IDENTITY.contains(&k.as_str())
                            || fields.as_ref().is_none_or(|f| f.contains(&k.as_str()))
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Map<String, Value>>();
                Value::Object(kept)
            })
            .collect();
        let Ok(offset) = usize::try_from(offset) else {
            return Reply::invalid("invalid offset");
        };
        let page: Vec<Value> = rows
            .iter()
            .skip(offset)
            .take(page_size.max(1))
            .cloned()
            .collect();
        let next = offset + page.len();
        // getactivity's `more` is a boolean (getmeas' is an integer).
        Reply::ok(json!({"activities": page, "more": next < rows.len(), "offset": next}))
    }

    /// `v2/sleep getsummary`: the nights whose `date` (the day they end) lies between
    /// `startdateymd` and `enddateymd`, or modified since `lastupdate`; `data_fields` keeps
    /// only those fields of each night's `data`; paged with boolean `more` and `offset`.
    fn sleep_summary(&self, userid: i64, params: &Params, page_size: usize) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let (start, end) = (param(params, "startdateymd"), param(params, "enddateymd"));
        for d in [start, end].into_iter().flatten() {
            if chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err() {
                return Reply::invalid("invalid startdateymd or enddateymd");
            }
        }
        let (lastupdate, offset) =
            match (int_param(params, "lastupdate"), int_param(params, "offset")) {
                (Ok(l), Ok(o)) => (l, o.unwrap_or(0)),
                (Err(r), _) | (_, Err(r)) => return r,
            };
        if lastupdate.is_none() && (start.is_none() || end.is_none()) {
            return Reply::invalid("startdateymd and enddateymd, or lastupdate");
        }
        let fields: Option<Vec<&str>> = param(params, "data_fields").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect()
        });
        let nights: Vec<Value> = user
            .sleep_summaries
            .values()
            .filter(|n| {
                let date = n.get("date").and_then(Value::as_str).unwrap_or("");
                start.is_none_or(|s| date >= s) && end.is_none_or(|e| date <= e)
            })
            .filter(|n| {
                lastupdate
                    .is_none_or(|l| n.get("modified").and_then(Value::as_i64).unwrap_or(0) >= l)
            })
            .map(|n| {
                let mut n = n.clone();
                if let (Some(fields), Some(Value::Object(data))) = (&fields, n.get_mut("data")) {
                    data.retain(|k, _| fields.contains(&k.as_str()));
                }
                Value::Object(n)
            })
            .collect();
        let Ok(offset) = usize::try_from(offset) else {
            return Reply::invalid("invalid offset");
        };
        let page: Vec<Value> = nights
            .iter()
            .skip(offset)
            .take(page_size.max(1))
            .cloned()
            .collect();
        let next = offset + page.len();
        Reply::ok(json!({"series": page, "more": next < nights.len(), "offset": next}))
    }

    /// `v2/sleep get`: the segments overlapping `startdate..enddate` (both required, at most
    /// 24 h apart).
    fn sleep_get(&self, userid: i64, params: &Params) -> Reply {
        const MAX_RANGE_S: i64 = 24 * 3600;
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let (start, end) = match (int_param(params, "startdate"), int_param(params, "enddate")) {
            (Ok(Some(s)), Ok(Some(e))) => (s, e),
            (Err(r), _) | (_, Err(r)) => return r,
            _ => return Reply::invalid("startdate and enddate are required"),
        };
        if end < start || end - start > MAX_RANGE_S {
            return Reply::invalid("startdate and enddate must be at most 24 h apart");
        }
        // The segment's own fields, and of its series only those `data_fields` names.
        const OWN: [&str; 6] = [
            "startdate",
            "enddate",
            "state",
            "model",
            "model_id",
            "hash_deviceid",
        ];
        let fields: Vec<&str> = param(params, "data_fields")
            .map(|f| f.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let series: Vec<Map<String, Value>> = user
            .sleep_segments
            .iter()
            .filter(|s| {
                let at = |k: &str| s.get(k).and_then(Value::as_i64).unwrap_or(0);
                at("startdate") < end && at("enddate") > start
            })
            .map(|s| {
                let mut s = s.clone();
                s.retain(|k, _| OWN.contains(&k.as_str()) || fields.contains(&k.as_str()));
                s
            })
            .collect();
        Reply::ok(json!({ "series": series }))
    }

    /// `v2/heart list`: the recordings whose `timestamp` lies in `startdate..=enddate` (both
    /// optional), oldest first, paged with boolean `more` and `offset`.
    fn heart_list(&self, userid: i64, params: &Params, page_size: usize) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let (start, end, offset) = match (
            int_param(params, "startdate"),
            int_param(params, "enddate"),
            int_param(params, "offset"),
        ) {
            (Ok(s), Ok(e), Ok(o)) => (s, e, o.unwrap_or(0)),
            (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
        };
        let mut items: Vec<&Map<String, Value>> = user
            .heart
            .values()
            .map(|(item, _)| item)
            .filter(|item| {
                let t = item.get("timestamp").and_then(Value::as_i64).unwrap_or(0);
                start.is_none_or(|s| t >= s) && end.is_none_or(|e| t <= e)
            })
            .collect();
        items.sort_by_key(|item| item.get("timestamp").and_then(Value::as_i64));
        let Ok(offset) = usize::try_from(offset) else {
            return Reply::invalid("invalid offset");
        };
        let page: Vec<&Map<String, Value>> = items
            .iter()
            .skip(offset)
            .take(page_size.max(1))
            .copied()
            .collect();
        let next = offset + page.len();
        Reply::ok(json!({"series": page, "more": next < items.len(), "offset": next}))
    }

    /// `v2/heart get`: the signal of `signalid`.
    fn heart_get(&self, userid: i64, params: &Params) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let signalid = match int_param(params, "signalid") {
            Ok(Some(id)) => id,
            Ok(None) => return Reply::invalid("signalid is required"),
            Err(r) => return r,
        };
        match user.heart.get(&signalid) {
            Some((_, signal)) => Reply::ok(Value::Object(signal.clone())),
            None => Reply::invalid("unknown signalid"),
        }
    }

    fn intraday(&self, userid: i64, params: &Params) -> Reply {
        let Some(user) = self.users.get(&userid) else {
            return Reply::unauthorized();
        };
        let (start, end) = match (int_param(params, "startdate"), int_param(params, "enddate")) {
            (Ok(s), Ok(e)) => (s, e),
            (Err(r), _) | (_, Err(r)) => return r,
        };
        let window = match (start, end) {
            (Some(s), Some(e)) => Some((s, e)),
            (Some(s), None) => Some((s, s + INTRADAY_MAX_WINDOW_SECS - 1)),
            (None, Some(e)) => Some((e - INTRADAY_MAX_WINDOW_SECS + 1, e)),
            // No dates: the most recent data.
            (None, None) => user
                .intraday
                .keys()
                .next_back()
                .map(|last| (last - INTRADAY_MAX_WINDOW_SECS + 1, *last)),
        };
        let fields: Option<Vec<&str>> = param(params, "data_fields").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect()
        });
        let mut series = Map::new();
        if let Some((start, end)) = window {
            // Only the first 24 h of a longer window are returned.
            let end = if end - start > INTRADAY_MAX_WINDOW_SECS {
                start + INTRADAY_MAX_WINDOW_SECS - 1
            } else {
                end
            };
            if start <= end {
                for (ts, entry) in user.intraday.range(start..=end) {
                    let mut out = Map::new();
                    let mut has_data = false;
                    // A device with a wrong clock: the entry is filed (and found) at `ts` but
                    // stamped with another time.
                    let stamped = entry
                        .get(INTRADAY_STAMPED_AT)
                        .and_then(Value::as_i64)
                        .unwrap_or(*ts);
                    for (k, v) in entry {
                        if k == INTRADAY_STAMPED_AT {
                            continue;
                        }
                        if INTRADAY_META_KEYS.contains(&k.as_str()) {
                            out.insert(k.clone(), v.clone());
                        } else if fields.as_ref().is_none_or(|f| f.contains(&k.as_str())) {
                            out.insert(k.clone(), v.clone());
                            has_data = true;
                        }
                    }
                    if has_data {
                        series.insert(stamped.to_string(), Value::Object(out));
                    }
                }
            }
        }
        Reply::ok(json!({ "series": series }))
    }

    fn notify_list(&self, userid: i64, params: &Params) -> Reply {
        let appli = match int_param(params, "appli") {
            Ok(a) => a,
            Err(r) => return r,
        };
        let profiles: Vec<Value> = self
            .users
            .get(&userid)
            .map(|u| u.subscriptions.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|s| appli.is_none_or(|a| s.appli == a))
            .map(|s| {
                json!({
                    "appli": s.appli,
                    "callbackurl": s.callbackurl,
                    "comment": s.comment,
                    "expires": NOTIFY_EXPIRES,
                })
            })
            .collect();
        Reply::ok(json!({ "profiles": profiles }))
    }

    fn notify_get(&self, userid: i64, params: &Params) -> Reply {
        let Some(callbackurl) = param(params, "callbackurl") else {
            return Reply::invalid("callbackurl is required");
        };
        // W-OAS: "If no appli is specified, appli=1 will be considered."
        let appli = match int_param(params, "appli") {
            Ok(a) => a.unwrap_or(1),
            Err(r) => return r,
        };
        self.users
            .get(&userid)
            .and_then(|u| {
                u.subscriptions
                    .iter()
                    .rfind(|s| s.appli == appli && s.callbackurl == callbackurl)
            })
            .map_or_else(no_such_notification, |s| {
                Reply::ok(json!({
                    "appli": s.appli,
                    "callbackurl": s.callbackurl,
                    "comment": s.comment,
                }))
            })
    }

    fn notify_revoke(&mut self, userid: i64, params: &Params) -> Reply {
        let Some(callbackurl) = param(params, "callbackurl").map(str::to_owned) else {
            return Reply::invalid("callbackurl is required");
        };
        let appli = match int_param(params, "appli") {
            Ok(a) => a,
            Err(r) => return r,
        };
        let Some(user) = self.users.get_mut(&userid) else {
            return Reply::unauthorized();
        };
        let before = user.subscriptions.len();
        user.subscriptions
            .retain(|s| !(s.callbackurl == callbackurl && appli.is_none_or(|a| s.appli == a)));
        if user.subscriptions.len() == before {
            return no_such_notification();
        }
        Reply::ok(json!({}))
    }

    /// `Ok(None)`: nothing needs probing and the update is already applied.
    fn prepare_update(
        &mut self,
        userid: i64,
        params: &Params,
    ) -> Result<Option<(String, PendingNotify)>, Reply> {
        let callbackurl = param(params, "callbackurl")
            .ok_or_else(|| Reply::invalid("callbackurl is required"))?
            .to_owned();
        let appli = appli_param(params, true)?.unwrap_or(1);
        let new_appli = match int_param(params, "new_appli")? {
            Some(a) if !KNOWN_APPLIS.contains(&a) => {
                return Err(Reply::invalid("invalid new_appli"));
            }
            other => other,
        };
        let new_callbackurl = param(params, "new_callbackurl").map(str::to_owned);
        let comment = param(params, "comment").map(str::to_owned);
        let user = self
            .users
            .get_mut(&userid)
            .ok_or_else(Reply::unauthorized)?;
        let existing = user
            .subscriptions
            .iter_mut()
            .find(|s| s.appli == appli && s.callbackurl == callbackurl)
            .ok_or_else(no_such_notification)?;
        let new = Subscription {
            appli: new_appli.unwrap_or(existing.appli),
            callbackurl: new_callbackurl
                .clone()
                .unwrap_or_else(|| callbackurl.clone()),
            comment: comment.unwrap_or_else(|| existing.comment.clone()),
        };
        match new_callbackurl {
            Some(url) => Ok(Some((
                url,
                PendingNotify::Update {
                    userid,
                    callbackurl,
                    appli,
                    new,
                },
            ))),
            None => {
                *existing = new;
                Ok(None)
            }
        }
    }
}

type GetmeasFilters = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// `category`, `startdate`, `enddate`, `lastupdate`, `offset`.
fn getmeas_filters(params: &Params) -> Result<GetmeasFilters, Reply> {
    Ok((
        int_param(params, "category")?,
        int_param(params, "startdate")?,
        int_param(params, "enddate")?,
        int_param(params, "lastupdate")?,
        int_param(params, "offset")?,
    ))
}

fn token_reply(userid: i64, access: String, refresh: String) -> Reply {
    Reply::ok(json!({
        "userid": userid,
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": ACCESS_TOKEN_LIFETIME_SECS,
        "scope": TOKEN_SCOPE,
        "csrf_token": random_alnum(32),
        "token_type": "Bearer",
    }))
}

/// Browser authorize step (normally on `account.withings.com`): consents at
/// once and redirects to `redirect_uri?code=..&state=..`.
/// Escapes text for HTML.
fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The consent page: the application asks for access; "Allow" comes back here with the
/// chosen account (`userid`), "Deny" returns `error=access_denied` to the application.
async fn consent_page(st: &SimState, params: &Params) -> Response {
    let client_id = param(params, "client_id").unwrap_or_default();
    let users: Vec<i64> = st
        .inner
        .lock()
        .await
        .users
        .iter()
        .filter(|(_, u)| u.client_id == client_id)
        .map(|(id, _)| *id)
        .collect();
    let hidden: String = params
        .iter()
        .filter(|(k, _)| k.as_str() != "userid")
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                html_escape(k),
                html_escape(v)
            )
        })
        .collect();
    let options: String = users
        .iter()
        .map(|u| format!("<option value=\"{u}\">Withings account {u}</option>"))
        .collect();
    let deny = param(params, "redirect_uri").map(|r| {
        let mut url = reqwest::Url::parse(r).ok()?;
        url.query_pairs_mut().append_pair("error", "access_denied");
        if let Some(state) = param(params, "state") {
            url.query_pairs_mut().append_pair("state", state);
        }
        Some(url.to_string())
    });
    let deny = deny.flatten().map_or_else(String::new, |u| {
        format!("<p><a href=\"{}\">Deny</a></p>", html_escape(&u))
    });
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Withings – Authorize access</title></head><body><main>\
         <h1>Authorize access to your Withings data</h1>\
         <p>An application asks to read your measurements.</p>\
         <form method=\"get\" action=\"/oauth2_user/authorize2\">{hidden}\
         <label for=\"userid\">Account</label> <select id=\"userid\" name=\"userid\">{options}</select>\
         <button type=\"submit\">Allow</button></form>{deny}</main></body></html>"
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

async fn authorize(State(st): State<Arc<SimState>>, uri: Uri, headers: HeaderMap) -> Response {
    let mut params = Params::new();
    if let Some(q) = uri.query() {
        parse_form_into(q, &mut params);
    }
    // A person's browser gets the consent page first (Withings shows its login and consent
    // pages); a client that names the user (`userid`, the tests' shortcut) is redirected
    // straight away.
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if browser && param(&params, "userid").is_none() {
        return consent_page(&st, &params).await;
    }
    let error = |message: &str| {
        (
            StatusCode::OK,
            axum::Json(json!({ "errors": [{ "message": message }] })),
        )
            .into_response()
    };
    let Some(client_id) = param(&params, "client_id") else {
        return error("invalid_client: The client id provided is invalid");
    };
    let Some(redirect_uri) = param(&params, "redirect_uri") else {
        return error(
            "redirect_uri_mismatch: The redirect URI provided is missing or does not match partner callback url",
        );
    };
    if param(&params, "response_type") != Some("code") {
        return error("invalid_request: response_type must be code");
    }
    let Ok(mut target) = reqwest::Url::parse(redirect_uri) else {
        return error(
            "redirect_uri_mismatch: The redirect URI provided is missing or does not match partner callback url",
        );
    };
    let wanted_user = param(&params, "userid").and_then(|u| u.parse::<i64>().ok());
    let mut inner = st.inner.lock().await;
    let userid = inner
        .users
        .iter()
        .filter(|(_, u)| u.client_id == client_id)
        .map(|(id, _)| *id)
        .find(|id| wanted_user.is_none_or(|w| w == *id));
    let Some(userid) = userid else {
        return error("invalid_client: The client id provided is invalid");
    };
    let code = random_hex(20);
    let expires_at = inner.now_s() + AUTHORIZATION_CODE_LIFETIME_SECS;
    inner.codes.insert(
        code.clone(),
        AuthCode {
            userid,
            client_id: client_id.to_owned(),
            redirect_uri: Some(redirect_uri.to_owned()),
            expires_at,
        },
    );
    drop(inner);
    {
        let mut q = target.query_pairs_mut();
        q.append_pair("code", &code);
        if let Some(state) = param(&params, "state") {
            q.append_pair("state", state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

// ---------------------------------------------------------------------------
// Control API
// ---------------------------------------------------------------------------

async fn sim_create_user(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let seed: UserSeed = match json_body(&body) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let tokens = st.add_user(seed).await;
    axum::Json(tokens).into_response()
}

#[derive(Deserialize)]
struct GroupsBody {
    measuregrps: Vec<MeasureGroup>,
}

async fn sim_measuregrps(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: GroupsBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    match st.upsert_measure_groups(userid, b.measuregrps).await {
        Some(n) => axum::Json(json!({ "upserted": n })).into_response(),
        None => unknown_user(userid),
    }
}

async fn sim_delete_measuregrp(
    State(st): State<Arc<SimState>>,
    Path((userid, grpid)): Path<(i64, i64)>,
) -> Response {
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    match user.groups.remove(&grpid) {
        Some(_) => axum::Json(json!({ "deleted": grpid })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": format!("no group {grpid}") })),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct DevicesBody {
    devices: Vec<Value>,
}

async fn sim_devices(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: DevicesBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    let stored = b.devices.len();
    user.devices = b.devices;
    axum::Json(json!({ "stored": stored })).into_response()
}

/// A control body of JSON objects under `series` (nights, sleep segments, ECG recordings).
#[derive(Deserialize)]
struct SeriesBody {
    series: Vec<Map<String, Value>>,
}

/// `POST /_sim/users/{userid}/sleep-summaries`: stores nights by their `id` (a night already
/// there is replaced, as Withings revises a night).
async fn sim_sleep_summaries(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: SeriesBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    let mut stored = 0;
    for night in b.series {
        let Some(id) = night.get("id").and_then(Value::as_i64) else {
            return sim_error(StatusCode::BAD_REQUEST, "every night needs an integer id");
        };
        user.sleep_summaries.insert(id, night);
        stored += 1;
    }
    axum::Json(json!({ "stored": stored })).into_response()
}

/// `POST /_sim/users/{userid}/sleep-segments`: adds `v2/sleep get` segments.
async fn sim_sleep_segments(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: SeriesBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    let stored = b.series.len();
    user.sleep_segments.extend(b.series);
    user.sleep_segments
        .sort_by_key(|s| s.get("startdate").and_then(Value::as_i64));
    axum::Json(json!({ "stored": stored })).into_response()
}

/// `POST /_sim/users/{userid}/heart`: stores ECG recordings by `ecg.signalid`, each split
/// into its `v2/heart list` item and its `get` body (`signal`, `sampling_frequency`,
/// `wearposition`).
async fn sim_heart(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: SeriesBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    let mut stored = 0;
    for mut item in b.series {
        let Some(id) = item
            .get("ecg")
            .and_then(|e| e.get("signalid"))
            .and_then(Value::as_i64)
        else {
            return sim_error(
                StatusCode::BAD_REQUEST,
                "every recording needs ecg.signalid",
            );
        };
        let mut signal = Map::new();
        for key in ["signal", "sampling_frequency", "wearposition"] {
            if let Some(v) = item.remove(key) {
                signal.insert(key.to_owned(), v);
            }
        }
        user.heart.insert(id, (item, signal));
        stored += 1;
    }
    axum::Json(json!({ "stored": stored })).into_response()
}

#[derive(Deserialize)]
struct ActivitiesBody {
    activities: Vec<Map<String, Value>>,
}

/// `POST /_sim/users/{userid}/activities`: stores daily rows by their `date` (a row for a
/// date already there replaces it, as Withings rewrites a day's row during the day).
async fn sim_activities(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: ActivitiesBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(user) = inner.users.get_mut(&userid) else {
        return unknown_user(userid);
    };
    let mut stored = 0;
    for row in b.activities {
        let Some(date) = row.get("date").and_then(Value::as_str).map(str::to_owned) else {
            return sim_error(StatusCode::BAD_REQUEST, "every activity row needs a date");
        };
        user.activities.insert(date, row);
        stored += 1;
    }
    axum::Json(json!({ "stored": stored })).into_response()
}

#[derive(Deserialize)]
struct IntradayBody {
    series: BTreeMap<i64, Map<String, Value>>,
}

async fn sim_intraday(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: IntradayBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    match st.merge_intraday(userid, b.series).await {
        Some(n) => axum::Json(json!({ "merged": n })).into_response(),
        None => unknown_user(userid),
    }
}

async fn sim_expire_access_token(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&userid) {
        return unknown_user(userid);
    }
    let now = inner.now_s();
    let mut expired = 0;
    for t in inner.access_tokens.values_mut() {
        if t.userid == userid && t.expires_at > now {
            t.expires_at = now;
            expired += 1;
        }
    }
    axum::Json(json!({ "expired": expired })).into_response()
}

async fn sim_revoke(State(st): State<Arc<SimState>>, Path(userid): Path<i64>) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&userid) {
        return unknown_user(userid);
    }
    inner.revoke_user_tokens(userid);
    axum::Json(json!({ "revoked": true })).into_response()
}

#[derive(Deserialize, Default)]
struct CodeBody {
    #[serde(default)]
    redirect_uri: Option<String>,
}

async fn sim_authorization_code(
    State(st): State<Arc<SimState>>,
    Path(userid): Path<i64>,
    body: Bytes,
) -> Response {
    let b: CodeBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    let Some(client_id) = inner.users.get(&userid).map(|u| u.client_id.clone()) else {
        return unknown_user(userid);
    };
    let code = random_hex(20);
    let expires_at = inner.now_s() + AUTHORIZATION_CODE_LIFETIME_SECS;
    inner.codes.insert(
        code.clone(),
        AuthCode {
            userid,
            client_id,
            redirect_uri: b.redirect_uri,
            expires_at,
        },
    );
    axum::Json(json!({ "code": code, "expires_in": AUTHORIZATION_CODE_LIFETIME_SECS }))
        .into_response()
}

async fn sim_exhaust(State(st): State<Arc<SimState>>) -> Response {
    let limit = st.config.rate_limit_per_minute;
    let mut inner = st.inner.lock().await;
    let now_ms = inner.now().timestamp_millis();
    inner.rate_window.clear();
    inner.rate_window.extend(std::iter::repeat_n(now_ms, limit));
    axum::Json(json!({
        "limit": limit,
        "window_resets_at": (now_ms + RATE_WINDOW_MS) / 1000,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct FailNextBody {
    #[serde(default = "default_fail_count")]
    count: usize,
    #[serde(default = "default_fail_status")]
    status: i64,
    #[serde(default)]
    error: Option<String>,
}

fn default_fail_count() -> usize {
    1
}

fn default_fail_status() -> i64 {
    STATUS_TOO_MANY_REQUESTS
}

async fn sim_fail_next(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: FailNextBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let error = b.error.unwrap_or_else(|| {
        match b.status {
            STATUS_TOO_MANY_REQUESTS => TOO_MANY_REQUESTS_ERROR,
            STATUS_INVALID_TOKEN => INVALID_TOKEN_ERROR,
            522 => "Timeout",
            _ => "An error occurred",
        }
        .to_owned()
    });
    let mut inner = st.inner.lock().await;
    for _ in 0..b.count {
        inner.fail_next.push_back(FailNext {
            status: b.status,
            error: error.clone(),
        });
    }
    axum::Json(json!({ "queued": inner.fail_next.len() })).into_response()
}

#[derive(Deserialize)]
struct ClockBody {
    seconds: i64,
}

async fn sim_clock_advance(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: ClockBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut inner = st.inner.lock().await;
    inner.clock_offset_secs = inner.clock_offset_secs.saturating_add(b.seconds);
    axum::Json(json!({
        "now": inner.now_s(),
        "offset_seconds": inner.clock_offset_secs,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct NotifyBody {
    userid: i64,
    appli: i64,
    #[serde(default)]
    startdate: Option<i64>,
    #[serde(default)]
    enddate: Option<i64>,
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    deviceid: Option<String>,
    #[serde(default)]
    action: Option<String>,
}

async fn sim_notify(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: NotifyBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let callbacks: Vec<String> = {
        let inner = st.inner.lock().await;
        let Some(user) = inner.users.get(&b.userid) else {
            return unknown_user(b.userid);
        };
        user.subscriptions
            .iter()
            .filter(|s| s.appli == b.appli)
            .map(|s| s.callbackurl.clone())
            .collect()
    };
    // Field order as in the documented example:
    // userid=12345&appli=1&startdate=1530576000&enddate=1530698753
    let mut form: Vec<(&str, String)> = vec![
        ("userid", b.userid.to_string()),
        ("appli", b.appli.to_string()),
    ];
    if let Some(s) = b.startdate {
        form.push(("startdate", s.to_string()));
    }
    if let Some(e) = b.enddate {
        form.push(("enddate", e.to_string()));
    }
    if let Some(d) = b.date {
        form.push(("date", d));
    }
    if let Some(d) = b.deviceid {
        form.push(("deviceid", d));
    }
    if let Some(a) = b.action {
        form.push(("action", a));
    }
    let mut deliveries = Vec::with_capacity(callbacks.len());
    for url in callbacks {
        let result = st
            .http
            .post(&url)
            .form(&form)
            .timeout(CALLBACK_TIMEOUT)
            .send()
            .await;
        deliveries.push(match result {
            Ok(r) => json!({ "callbackurl": url, "status": r.status().as_u16() }),
            Err(e) => json!({ "callbackurl": url, "status": null, "error": e.to_string() }),
        });
    }
    st.inner.lock().await.stats.notifications_sent += deliveries.len() as u64;
    axum::Json(json!({ "deliveries": deliveries })).into_response()
}

async fn sim_stats(State(st): State<Arc<SimState>>) -> Response {
    let inner = st.inner.lock().await;
    let now = inner.now_s();
    let tokens: BTreeMap<String, Value> = inner
        .users
        .iter()
        .map(|(id, u)| {
            let access = u.current_access.as_ref();
            let access_info = access.and_then(|a| inner.access_tokens.get(a));
            let refresh_valid = u
                .current_refresh
                .as_ref()
                .and_then(|r| inner.refresh_tokens.get(r))
                .is_some_and(|r| inner.refresh_token_valid(r, now));
            (
                id.to_string(),
                json!({
                    "access_token": access,
                    "refresh_token": u.current_refresh,
                    "access_token_expires_at": access_info.map(|a| a.expires_at),
                    "access_token_valid": access_info.is_some_and(|a| !a.revoked && now < a.expires_at),
                    "refresh_token_valid": refresh_valid,
                    "subscriptions": u.subscriptions.len(),
                    "measuregrps": u.groups.len(),
                    "intraday_entries": u.intraday.len(),
                    "requested": u.requested,
                }),
            )
        })
        .collect();
    let mut stats = match serde_json::to_value(&inner.stats) {
        Ok(v) => v,
        Err(e) => return sim_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Value::Object(m) = &mut stats {
        m.insert("tokens".into(), json!(tokens));
        m.insert("now".into(), json!(now));
        m.insert(
            "rate_limit".into(),
            json!({
                "limit_per_minute": st.config.rate_limit_per_minute,
                "in_window": inner.rate_window.len(),
            }),
        );
    }
    axum::Json(stats).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sim_support::form_decode;
    use crate::sim_support::testing::{client, spawn_server};
    use tokio::sync::oneshot;

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

    fn config(page_size: usize, rate_limit_per_minute: usize) -> SimConfig {
        SimConfig {
            page_size,
            rate_limit_per_minute,
            demo: false,
        }
    }

    impl Sim {
        /// A Withings call: asserts HTTP 200 + JSON and returns the envelope.
        async fn call(&self, path: &str, token: Option<&str>, form: &[(&str, &str)]) -> Value {
            let mut req = self.http.post(format!("{}{path}", self.base)).form(form);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), reqwest::StatusCode::OK);
            let ct = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(ct.starts_with("application/json"), "content-type {ct}");
            resp.json().await.unwrap()
        }

        async fn sim(&self, path: &str, body: Value) -> Value {
            let resp = self
                .http
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            resp.json().await.unwrap()
        }

        async fn stats(&self) -> Value {
            self.http
                .get(format!("{}/_sim/stats", self.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        }

        async fn user(&self, userid: i64, access: &str, refresh: &str) {
            let r = self
                .sim(
                    "/_sim/users",
                    json!({
                        "userid": userid,
                        "client_id": "cid",
                        "client_secret": "secret",
                        "access_token": access,
                        "refresh_token": refresh,
                    }),
                )
                .await;
            assert_eq!(r["access_token"], access);
        }

        async fn groups(&self, userid: i64, groups: Value) {
            self.sim(
                &format!("/_sim/users/{userid}/measuregrps"),
                json!({ "measuregrps": groups }),
            )
            .await;
        }

        async fn advance(&self, seconds: i64) {
            self.sim("/_sim/clock/advance", json!({ "seconds": seconds }))
                .await;
        }

        async fn getmeas(&self, token: &str, extra: &[(&str, &str)]) -> Value {
            let mut form = vec![("action", "getmeas")];
            form.extend_from_slice(extra);
            self.call("/measure", Some(token), &form).await
        }

        async fn refresh(&self, refresh: &str, secret: &str) -> Value {
            self.call(
                "/v2/oauth2",
                None,
                &[
                    ("action", "requesttoken"),
                    ("grant_type", "refresh_token"),
                    ("client_id", "cid"),
                    ("client_secret", secret),
                    ("refresh_token", refresh),
                ],
            )
            .await
        }
    }

    fn full_group(grpid: i64, date: i64, modified: i64, measures: Value) -> Value {
        json!({
            "grpid": grpid, "attrib": 0, "date": date, "created": modified,
            "modified": modified, "category": 1,
            "deviceid": "91a7e556c2022ef54dca6e07a853c3193734d148",
            "hash_deviceid": "91a7e556c2022ef54dca6e07a853c3193734d148",
            "measures": measures,
            "modelid": 45, "model": "BPM Connect", "comment": null
        })
    }

    fn bp(grpid: i64, date: i64, modified: i64) -> Value {
        full_group(
            grpid,
            date,
            modified,
            json!([
                {"value": 10600, "type": 9, "unit": -2, "algo": 0, "fm": 128},
                {"value": 14300, "type": 10, "unit": -2, "algo": 0, "fm": 128},
                {"value": 8200, "type": 11, "unit": -2, "algo": 0, "fm": 128}
            ]),
        )
    }

    fn weight(grpid: i64, date: i64, modified: i64) -> Value {
        full_group(
            grpid,
            date,
            modified,
            json!([{"value": 118003, "type": 1, "unit": -3, "algo": 0, "fm": 128}]),
        )
    }

    fn grpids(env: &Value) -> Vec<i64> {
        env["body"]["measuregrps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["grpid"].as_i64().unwrap())
            .collect()
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a%20b+c%2Bd%zz%4"), "a b c+d%zz%4");
        let mut p = Params::new();
        parse_form_into("action=getmeas&meastypes=9%2C10&empty=&flag", &mut p);
        assert_eq!(p["action"], "getmeas");
        assert_eq!(p["meastypes"], "9,10");
        assert_eq!(p["empty"], "");
        assert_eq!(p["flag"], "");
    }

    #[tokio::test]
    async fn envelope_on_success_and_on_401() {
        let sim = start(SimConfig::default()).await;
        sim.user(1, "tok-1", "ref-1").await;

        let ok = sim.getmeas("tok-1", &[]).await;
        assert_eq!(ok["status"], 0);
        assert!(ok.get("error").is_none());
        let body = ok["body"].as_object().unwrap();
        assert!(body["updatetime"].is_i64());
        assert_eq!(body["timezone"], "Europe/Berlin");
        assert_eq!(body["measuregrps"], json!([]));
        assert_eq!(body["more"], json!(0));
        assert_eq!(body["offset"], json!(0));

        // Legacy GET with access_token in the query.
        let legacy: Value = sim
            .http
            .get(format!(
                "{}/measure?action=getmeas&access_token=tok-1",
                sim.base
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(legacy["status"], 0);

        let expected_401 = json!({"status": 401, "body": {}, "error": INVALID_TOKEN_ERROR});
        assert_eq!(sim.getmeas("nope", &[]).await, expected_401);
        assert_eq!(
            sim.call("/measure", None, &[("action", "getmeas")]).await,
            expected_401
        );

        // Unknown actions get the invalid-params status.
        let unknown = sim
            .call("/measure", Some("tok-1"), &[("action", "nope")])
            .await;
        assert_eq!(unknown["status"], STATUS_INVALID_PARAMS);
        assert_eq!(unknown["body"], json!({}));
        let unknown = sim.call("/v2/oauth2", None, &[("action", "nope")]).await;
        assert_eq!(unknown["status"], STATUS_INVALID_PARAMS);

        sim.sim("/_sim/users/1/expire-access-token", json!({}))
            .await;
        assert_eq!(sim.getmeas("tok-1", &[]).await, expected_401);

        let stats = sim.stats().await;
        assert_eq!(stats["status_401"], 3);
        assert_eq!(stats["requests"]["measure/getmeas"], 5);
        assert_eq!(stats["tokens"]["1"]["access_token"], "tok-1");
        assert_eq!(stats["tokens"]["1"]["access_token_valid"], false);
    }

    /// The client follows `v2/heart list` over its pages (`more`, `offset`) and reads each
    /// signal: five recordings, two a page, one outside the window.
    #[tokio::test]
    async fn heart_list_pages_are_followed_and_signals_read() {
        use ohx_providers::withings::client::{Window, WithingsClient};
        let sim = start(config(2, 1000)).await;
        sim.user(3, "tok-3", "ref-3").await;
        let series: Vec<Value> = (0..6)
            .map(|i| {
                json!({"deviceid": "sw", "model": 94, "ecg": {"signalid": 100 + i, "afib": 0},
                       "heart_rate": 60 + i, "timestamp": 1_752_500_000 + i * 600,
                       "signal": [i, -i, 2 * i], "sampling_frequency": 300})
            })
            .collect();
        sim.sim("/_sim/users/3/heart", json!({ "series": series }))
            .await;
        let client = WithingsClient::new(client(), sim.base.clone());
        let window = Window {
            start_s: 1_752_500_000,
            end_s: 1_752_500_000 + 4 * 600,
        };
        let listed = client.get_heart_list("tok-3", window).await.unwrap();
        let ids: Vec<&str> = listed
            .iter()
            .filter_map(|r| r.ecg.as_ref().map(|e| e.signalid.as_str()))
            .collect();
        assert_eq!(ids, ["100", "101", "102", "103", "104"]);
        assert_eq!(sim.stats().await["requests"]["v2/heart/list"], 3);
        let signal = client.get_heart_signal("tok-3", "102").await.unwrap();
        assert_eq!(signal.signal, [2, -2, 4]);
        assert_eq!(signal.sampling_frequency, Some(300));
    }

    #[tokio::test]
    async fn value_and_unit_are_kept_as_given() {
        let sim = start(SimConfig::default()).await;
        sim.user(2, "tok", "ref").await;
        let unit_minus_two = bp(100, 1_620_039_631, 1_620_237_692);
        let unit_zero = full_group(
            101,
            1_690_491_576,
            1_690_491_663,
            json!([
                {"value": 89, "type": 9, "unit": 0, "algo": 0, "fm": 3},
                {"value": 109, "type": 10, "unit": 0, "algo": 0, "fm": 3},
                {"value": 88, "type": 11, "unit": 0, "algo": 0, "fm": 3}
            ]),
        );
        let manual = json!({
            "grpid": 102, "attrib": 2, "date": 1_620_237_216, "created": 1_620_237_217,
            "modified": 1_620_237_217, "category": 1, "deviceid": null, "hash_deviceid": null,
            "measures": [{"value": 56300, "type": 1, "unit": -3, "algo": 0, "fm": 128,
                          "apppfmid": 7, "appliver": 5_050_021}],
            "modelid": null, "model": null, "comment": null
        });
        sim.groups(
            2,
            json!([unit_minus_two.clone(), unit_zero.clone(), manual.clone()]),
        )
        .await;

        let env = sim.getmeas("tok", &[]).await;
        let got = env["body"]["measuregrps"].as_array().unwrap();
        // Newest measurement first.
        assert_eq!(grpids(&env), vec![101, 102, 100]);
        assert_eq!(got[0], unit_zero);
        assert_eq!(got[2], unit_minus_two);
        assert_eq!(got[1], manual);
    }

    #[tokio::test]
    async fn paging_with_more_and_offset() {
        let sim = start(config(2, 1000)).await;
        sim.user(3, "tok", "ref").await;
        let groups: Vec<Value> = (0..5)
            .map(|i| {
                weight(
                    200 + i,
                    1_700_000_000 + i * 3_600,
                    1_700_000_000 + i * 3_600,
                )
            })
            .collect();
        sim.groups(3, json!(groups)).await;

        let p1 = sim.getmeas("tok", &[]).await;
        assert_eq!(grpids(&p1), vec![204, 203]);
        assert_eq!(p1["body"]["more"], json!(1));
        assert_eq!(p1["body"]["offset"], json!(2));
        let p2 = sim.getmeas("tok", &[("offset", "2")]).await;
        assert_eq!(grpids(&p2), vec![202, 201]);
        assert_eq!(p2["body"]["more"], json!(1));
        assert_eq!(p2["body"]["offset"], json!(4));
        let p3 = sim.getmeas("tok", &[("offset", "4")]).await;
        assert_eq!(grpids(&p3), vec![200]);
        assert_eq!(p3["body"]["more"], json!(0));
        assert!(p3["body"]["more"].is_i64(), "more must be an integer");
        assert!(p3["body"]["offset"].is_i64(), "offset must be an integer");
    }

    #[tokio::test]
    async fn lastupdate_and_date_filters() {
        let sim = start(SimConfig::default()).await;
        sim.user(4, "tok", "ref").await;
        sim.groups(
            4,
            json!([bp(300, 1_000_000, 1_000_100), bp(301, 2_000_000, 2_000_100)]),
        )
        .await;

        let since = sim.getmeas("tok", &[("lastupdate", "1500000")]).await;
        assert_eq!(grpids(&since), vec![301]);
        let exact = sim.getmeas("tok", &[("lastupdate", "2000100")]).await;
        assert_eq!(grpids(&exact), vec![301]);
        let window = sim
            .getmeas("tok", &[("startdate", "900000"), ("enddate", "1100000")])
            .await;
        assert_eq!(grpids(&window), vec![300]);

        // Replacing a group keeps grpid and bumps modified.
        let mut edited = bp(300, 1_000_000, 0);
        edited["measures"][1]["value"] = json!(15000);
        sim.groups(4, json!([edited])).await;
        let since = sim.getmeas("tok", &[("lastupdate", "1500000")]).await;
        assert_eq!(grpids(&since), vec![301, 300]);
        let g = &since["body"]["measuregrps"][1];
        assert!(g["modified"].as_i64().unwrap() > 2_000_100);
        assert_eq!(g["created"], 1_000_100);
        assert_eq!(g["measures"][1]["value"], 15000);
    }

    #[tokio::test]
    async fn meastype_versus_meastypes() {
        let sim = start(SimConfig::default()).await;
        sim.user(5, "tok", "ref").await;
        sim.groups(
            5,
            json!([
                bp(400, 1_700_000_000, 1_700_000_100),
                weight(401, 1_700_003_600, 1_700_003_700)
            ]),
        )
        .await;

        let rejected = sim.getmeas("tok", &[("meastype", "9,10")]).await;
        assert_eq!(rejected["status"], STATUS_INVALID_PARAMS);
        assert!(
            rejected["error"]
                .as_str()
                .unwrap()
                .starts_with("Invalid Params")
        );

        let single = sim
            .getmeas("tok", &[("meastype", "1"), ("category", "1")])
            .await;
        assert_eq!(grpids(&single), vec![401]);

        let plural = sim.getmeas("tok", &[("meastypes", "9,10")]).await;
        assert_eq!(grpids(&plural), vec![400]);
        let types: Vec<i64> = plural["body"]["measuregrps"][0]["measures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["type"].as_i64().unwrap())
            .collect();
        assert_eq!(types, vec![9, 10]);

        let objectives = sim.getmeas("tok", &[("category", "2")]).await;
        assert_eq!(grpids(&objectives), Vec::<i64>::new());
    }

    #[tokio::test]
    async fn intraday_is_capped_at_24h_and_sparse() {
        let sim = start(SimConfig::default()).await;
        sim.user(6, "tok", "ref").await;
        let start_ts: i64 = 1_712_707_200;
        let mut series = Map::new();
        for i in 0..(48 * 60) {
            let mut e = json!({
                "deviceid": DEMO_SCANWATCH_DEVICEID, "model": "ScanWatch", "model_id": 93,
                "heart_rate": 60 + i % 20
            });
            if i % 10 == 0 {
                e["steps"] = json!(14);
                e["duration"] = json!(60);
            }
            series.insert((start_ts + i * 60).to_string(), e);
        }
        sim.sim("/_sim/users/6/intraday", json!({ "series": series }))
            .await;

        let start_s = start_ts.to_string();
        let end_s = (start_ts + 48 * 3_600).to_string();
        let env = sim
            .call(
                "/v2/measure",
                Some("tok"),
                &[
                    ("action", "getintradayactivity"),
                    ("startdate", &start_s),
                    ("enddate", &end_s),
                ],
            )
            .await;
        assert_eq!(env["status"], 0);
        let got = env["body"]["series"].as_object().unwrap();
        assert_eq!(got.len(), 24 * 60);
        assert!(
            got.keys()
                .all(|k| k.parse::<i64>().unwrap() < start_ts + 86_400)
        );
        let first = &got[&start_s];
        assert_eq!(first["model"], "ScanWatch");
        assert_eq!(first["model_id"], 93);
        assert_eq!(first["deviceid"], DEMO_SCANWATCH_DEVICEID);

        let steps = sim
            .call(
                "/v2/measure",
                Some("tok"),
                &[
                    ("action", "getintradayactivity"),
                    ("startdate", &start_s),
                    ("enddate", &end_s),
                    ("data_fields", "steps"),
                ],
            )
            .await;
        let got = steps["body"]["series"].as_object().unwrap();
        assert_eq!(got.len(), 24 * 6);
        for entry in got.values() {
            let e = entry.as_object().unwrap();
            assert!(e.contains_key("steps"));
            assert!(!e.contains_key("heart_rate"));
            assert!(!e.contains_key("duration"));
            assert!(e.contains_key("deviceid"));
        }
    }

    #[tokio::test]
    async fn intraday_entry_stamped_with_another_time() {
        let sim = start(SimConfig::default()).await;
        sim.user(16, "tok", "ref").await;
        let filed: i64 = 1_712_707_230;
        let stamped = filed + 365 * 86_400;
        sim.sim(
            "/_sim/users/16/intraday",
            json!({ "series": {
                filed.to_string(): {"heart_rate": 77, "_stamped_at": stamped},
                (filed + 60).to_string(): {"heart_rate": 70},
            }}),
        )
        .await;
        let (s, e) = ((filed - 30).to_string(), (filed + 3570).to_string());
        let env = sim
            .call(
                "/v2/measure",
                Some("tok"),
                &[
                    ("action", "getintradayactivity"),
                    ("startdate", &s),
                    ("enddate", &e),
                ],
            )
            .await;
        let got = env["body"]["series"].as_object().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&stamped.to_string()], json!({"heart_rate": 77}));
        assert_eq!(got[&(filed + 60).to_string()]["heart_rate"], 70);
    }

    #[tokio::test]
    async fn refresh_rotation_keeps_old_token_until_new_access_used() {
        let sim = start(SimConfig::default()).await;
        sim.user(7, "a0", "r0").await;

        let first = sim.refresh("r0", "secret").await;
        assert_eq!(first["status"], 0);
        let b = &first["body"];
        assert_eq!(b["userid"], 7);
        assert_eq!(b["expires_in"], 10_800);
        assert_eq!(b["token_type"], "Bearer");
        assert_eq!(b["scope"], TOKEN_SCOPE);
        assert!(b["csrf_token"].is_string());
        let r1 = b["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(b["access_token"], "a0");
        assert_ne!(r1, "r0");

        // The new access token is unused: the old refresh token still works.
        let second = sim.refresh("r0", "secret").await;
        assert_eq!(second["status"], 0);
        let a2 = second["body"]["access_token"].as_str().unwrap().to_owned();
        let r2 = second["body"]["refresh_token"].as_str().unwrap().to_owned();

        assert_eq!(sim.getmeas(&a2, &[]).await["status"], 0);
        let dead = sim.refresh("r0", "secret").await;
        assert_eq!(
            dead,
            json!({"status": 503, "body": {}, "error": "Invalid Params: invalid refresh_token"})
        );

        // Wrong client secret.
        let bad_client = sim.refresh(&r2, "wrong").await;
        assert_eq!(bad_client["status"], STATUS_INVALID_PARAMS);

        // Rotated but unused successor: valid for 8 h only.
        let third = sim.refresh(&r2, "secret").await;
        assert_eq!(third["status"], 0);
        let r3 = third["body"]["refresh_token"].as_str().unwrap().to_owned();
        sim.advance(ROTATED_REFRESH_GRACE_SECS + 1).await;
        assert_eq!(sim.refresh(&r2, "secret").await["status"], 503);
        assert_eq!(sim.refresh(&r3, "secret").await["status"], 0);

        let stats = sim.stats().await;
        assert_eq!(stats["token_refreshes"], 4);
        assert_eq!(stats["statuses"]["503"], 3);
    }

    #[tokio::test]
    async fn revoked_user_cannot_refresh() {
        let sim = start(SimConfig::default()).await;
        sim.user(8, "a0", "r0").await;
        sim.sim("/_sim/users/8/revoke", json!({})).await;
        let r = sim.refresh("r0", "secret").await;
        assert_eq!(r["status"], STATUS_INVALID_PARAMS);
        assert_eq!(r["error"], "Invalid Params: invalid refresh_token");
        assert_eq!(sim.getmeas("a0", &[]).await["status"], 401);
        let stats = sim.stats().await;
        assert_eq!(stats["tokens"]["8"]["refresh_token_valid"], false);
    }

    #[tokio::test]
    async fn authorization_codes_are_short_lived_and_single_use() {
        let sim = start(SimConfig::default()).await;
        sim.user(9, "a0", "r0").await;
        let redirect = "https://app.example/cb";
        let s = &sim;
        let exchange = move |code: String, secret: &'static str, redirect: &'static str| {
            let sim = s;
            async move {
                sim.call(
                    "/v2/oauth2",
                    None,
                    &[
                        ("action", "requesttoken"),
                        ("grant_type", "authorization_code"),
                        ("client_id", "cid"),
                        ("client_secret", secret),
                        ("code", &code),
                        ("redirect_uri", redirect),
                    ],
                )
                .await
            }
        };
        let new_code = move || async move {
            s.sim(
                "/_sim/users/9/authorization-code",
                json!({ "redirect_uri": redirect }),
            )
            .await["code"]
                .as_str()
                .unwrap()
                .to_owned()
        };

        let code = new_code().await;
        let ok = exchange(code.clone(), "secret", redirect).await;
        assert_eq!(ok["status"], 0);
        assert_eq!(ok["body"]["userid"], 9);
        let used = exchange(code, "secret", redirect).await;
        assert_eq!(
            used,
            json!({"status": 503, "body": {}, "error": "Invalid Params: invalid code"})
        );

        let code = new_code().await;
        sim.advance(AUTHORIZATION_CODE_LIFETIME_SECS + 1).await;
        assert_eq!(exchange(code, "secret", redirect).await["status"], 503);

        let code = new_code().await;
        assert_eq!(exchange(code, "wrong", redirect).await["status"], 503);

        let code = new_code().await;
        let mismatch = exchange(code, "secret", "https://evil.example/cb").await;
        assert_eq!(mismatch["error"], "Invalid Params: redirect_uri_mismatch");

        // Browser flow: authorize2 redirects with code and state.
        let resp = sim
            .http
            .get(format!("{}/oauth2_user/authorize2", sim.base))
            .query(&[
                ("response_type", "code"),
                ("client_id", "cid"),
                ("state", "xyz"),
                ("scope", "user.metrics"),
                ("redirect_uri", redirect),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FOUND);
        let location = resp.headers()[reqwest::header::LOCATION].to_str().unwrap();
        let url = reqwest::Url::parse(location).unwrap();
        assert!(location.starts_with(redirect));
        let pairs: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs["state"], "xyz");
        let ok = exchange(pairs["code"].clone(), "secret", redirect).await;
        assert_eq!(ok["status"], 0);
        assert_eq!(sim.stats().await["code_exchanges"], 2);
    }

    #[tokio::test]
    async fn rate_limit_answers_601() {
        let sim = start(config(100, 5)).await;
        sim.user(10, "tok", "ref").await;
        for _ in 0..5 {
            assert_eq!(sim.getmeas("tok", &[]).await["status"], 0);
        }
        let limited = json!({"status": 601, "body": {}, "error": "Too many request"});
        assert_eq!(sim.getmeas("tok", &[]).await, limited);
        // Token calls share the application-wide budget.
        assert_eq!(sim.refresh("ref", "secret").await, limited);
        assert_eq!(sim.stats().await["status_601"], 2);
        sim.advance(61).await;
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 0);

        // Exhaust on demand.
        sim.sim("/_sim/rate-limit/exhaust", json!({})).await;
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 601);
        sim.advance(61).await;
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 0);
    }

    #[tokio::test]
    async fn fail_next_injects_statuses() {
        let sim = start(SimConfig::default()).await;
        sim.user(11, "tok", "ref").await;
        sim.sim("/_sim/fail-next", json!({"count": 2, "status": 601}))
            .await;
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 601);
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 601);
        assert_eq!(sim.getmeas("tok", &[]).await["status"], 0);
        sim.sim("/_sim/fail-next", json!({"status": 522})).await;
        let timeout = sim.getmeas("tok", &[]).await;
        assert_eq!(timeout["status"], 522);
        assert_eq!(timeout["error"], "Timeout");
    }

    type Received = Arc<Mutex<Vec<(String, String)>>>;

    async fn callback_server() -> (String, Received, oneshot::Sender<()>) {
        let received: Received = Arc::default();
        let rec = received.clone();
        let app = Router::new()
            .route(
                "/ok",
                get(|| async { StatusCode::OK }).post(move |headers: HeaderMap, body: Bytes| {
                    let rec = rec.clone();
                    async move {
                        let ct = headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        rec.lock()
                            .await
                            .push((ct, String::from_utf8_lossy(&body).into_owned()));
                        StatusCode::OK
                    }
                }),
            )
            // No GET/HEAD handler: HEAD answers 405 as in open-wearables #1661.
            .route("/post-only", post(|| async { StatusCode::OK }));
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

    #[tokio::test]
    async fn notify_subscribe_probes_with_head_and_delivers_form_posts() {
        let sim = start(SimConfig::default()).await;
        sim.user(12, "tok", "ref").await;
        let (cb_base, received, _stop) = callback_server().await;
        let ok_url = format!("{cb_base}/ok?token=s3cret");

        let sub = sim
            .call(
                "/notify",
                Some("tok"),
                &[
                    ("action", "subscribe"),
                    ("callbackurl", &ok_url),
                    ("appli", "1"),
                    ("comment", "ohx"),
                ],
            )
            .await;
        assert_eq!(sub, json!({"status": 0, "body": {}}));

        // HEAD answers 405 → 293.
        let post_only = format!("{cb_base}/post-only");
        let refused = sim
            .call(
                "/notify",
                Some("tok"),
                &[
                    ("action", "subscribe"),
                    ("callbackurl", &post_only),
                    ("appli", "4"),
                ],
            )
            .await;
        assert_eq!(refused["status"], STATUS_INVALID_CALLBACK);
        assert_eq!(refused["body"], json!({}));
        assert!(refused["error"].as_str().unwrap().contains(&post_only));

        // Unreachable callback → 293.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_url = format!("http://{}/cb", closed.local_addr().unwrap());
        drop(closed);
        let unreachable = sim
            .call(
                "/notify",
                Some("tok"),
                &[
                    ("action", "subscribe"),
                    ("callbackurl", &closed_url),
                    ("appli", "1"),
                ],
            )
            .await;
        assert_eq!(unreachable["status"], 293);

        let list = sim
            .call("/notify", Some("tok"), &[("action", "list")])
            .await;
        assert_eq!(
            list,
            json!({"status": 0, "body": {"profiles": [
                {"appli": 1, "callbackurl": ok_url, "comment": "ohx", "expires": 2_147_483_647}
            ]}})
        );
        let got = sim
            .call(
                "/notify",
                Some("tok"),
                &[("action", "get"), ("callbackurl", &ok_url), ("appli", "1")],
            )
            .await;
        assert_eq!(
            got["body"],
            json!({"appli": 1, "callbackurl": ok_url, "comment": "ohx"})
        );

        let sent = sim
            .sim(
                "/_sim/notify",
                json!({"userid": 12, "appli": 1, "startdate": 1_530_576_000, "enddate": 1_530_698_753}),
            )
            .await;
        assert_eq!(
            sent,
            json!({"deliveries": [{"callbackurl": ok_url, "status": 200}]})
        );
        {
            let rec = received.lock().await;
            assert_eq!(rec.len(), 1);
            assert_eq!(rec[0].0, "application/x-www-form-urlencoded");
            assert_eq!(
                rec[0].1,
                "userid=12&appli=1&startdate=1530576000&enddate=1530698753"
            );
        }
        let none = sim
            .sim("/_sim/notify", json!({"userid": 12, "appli": 4}))
            .await;
        assert_eq!(none, json!({"deliveries": []}));

        let revoke = [
            ("action", "revoke"),
            ("callbackurl", ok_url.as_str()),
            ("appli", "1"),
        ];
        assert_eq!(sim.call("/notify", Some("tok"), &revoke).await["status"], 0);
        let list = sim
            .call("/notify", Some("tok"), &[("action", "list")])
            .await;
        assert_eq!(list["body"], json!({"profiles": []}));
        assert_eq!(
            sim.call("/notify", Some("tok"), &revoke).await["status"],
            STATUS_NO_SUCH_NOTIFICATION
        );
    }

    #[tokio::test]
    async fn demo_user_data_and_demo_server() {
        let now = Utc::now();
        let demo = demo_user(now);
        assert_eq!(demo.userid, DEMO_USERID);
        assert_eq!(demo.measuregrps.len(), 6);
        let bp: Vec<&MeasureGroup> = demo
            .measuregrps
            .iter()
            .filter(|g| g.measures.iter().any(|m| m.kind == 10))
            .collect();
        assert_eq!(bp.len(), 3);
        for g in &bp {
            let mut kinds: Vec<i64> = g.measures.iter().map(|m| m.kind).collect();
            kinds.sort_unstable();
            assert_eq!(kinds, vec![9, 10, 11]);
            assert!(g.date < now.timestamp() && g.date > now.timestamp() - 4 * 86_400);
        }
        assert!(bp.iter().any(|g| g.measures.iter().all(|m| m.unit == 0)));
        assert!(bp.iter().any(|g| g.measures.iter().all(|m| m.unit == -2)));
        let weights: Vec<(i64, i64)> = demo
            .measuregrps
            .iter()
            .flat_map(|g| g.measures.iter())
            .filter(|m| m.kind == 1)
            .map(|m| (m.value, m.unit))
            .collect();
        assert_eq!(weights.len(), 3);
        assert!(weights.contains(&(72_450, -3)));
        assert!(weights.contains(&(7_260, -2)));

        let hour = now.timestamp() - now.timestamp().rem_euclid(3_600);
        assert_eq!(demo.intraday.len(), 180);
        assert_eq!(demo.intraday.keys().next(), Some(&(hour - 3 * 3_600)));
        assert_eq!(demo.intraday.keys().next_back(), Some(&(hour - 60)));
        assert!(demo.intraday.values().all(|e| {
            e["model_id"] == 93
                && e["deviceid"] == DEMO_SCANWATCH_DEVICEID
                && e["heart_rate"].is_i64()
        }));

        let sim = start(SimConfig {
            demo: true,
            ..SimConfig::default()
        })
        .await;
        let env = sim.getmeas(DEMO_ACCESS_TOKEN, &[]).await;
        assert_eq!(grpids(&env).len(), 6);
        let hr = sim
            .call(
                "/v2/measure",
                Some(DEMO_ACCESS_TOKEN),
                &[
                    ("action", "getintradayactivity"),
                    ("data_fields", "heart_rate"),
                ],
            )
            .await;
        assert_eq!(hr["body"]["series"].as_object().unwrap().len(), 180);
        let refreshed = sim
            .call(
                "/v2/oauth2",
                None,
                &[
                    ("action", "requesttoken"),
                    ("grant_type", "refresh_token"),
                    ("client_id", DEMO_CLIENT_ID),
                    ("client_secret", DEMO_CLIENT_SECRET),
                    ("refresh_token", DEMO_REFRESH_TOKEN),
                ],
            )
            .await;
        assert_eq!(refreshed["status"], 0);
        assert_eq!(refreshed["body"]["userid"], DEMO_USERID);
    }
}
