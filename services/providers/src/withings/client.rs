//! Withings Public API client: OAuth2 token calls, `getmeas` with paging and intraday heart
//! rate in ≤ 24 h chunks, plus the tolerant wire types of their answers.
//!
//! Every call is a form-encoded `POST` with `action=…` and (except for the token endpoint) an
//! `Authorization: Bearer …` header. Withings answers HTTP 200 with an envelope
//! `{"status": int, "body": {…}, "error"?: str}` even for failures; [`WithingsError`] types the
//! statuses (see `providers.md` §1.5).
//!
//! # Rate limiting
//!
//! Withings allows 120 requests/minute for the whole application. The client calls
//! [`RateGate::acquire`] right before **every** HTTP request (each page of `getmeas`, each 24 h
//! chunk of intraday data, each token call), so a gate backed by a bucket shared between the
//! fetcher replicas sees exactly one permit per request. The default gate, [`NoRateGate`], lets
//! everything through (tests, simulators). Callers that want full control can instead use the
//! single-request methods ([`WithingsClient::get_measures_page`],
//! [`WithingsClient::get_intraday_heart_rate_chunk`]) and drive paging themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{Api, GateError, NoRateGate, RateGate};

/// Production API host.
pub const DEFAULT_BASE_URL: &str = "https://wbsapi.withings.net";

/// Path of the OAuth2 token endpoint (`action=requesttoken`).
pub const PATH_OAUTH2: &str = "/v2/oauth2";
/// Path of `getmeas` (note: no `v2`).
pub const PATH_MEASURE: &str = "/measure";
/// Path of `getactivity` / `getintradayactivity`.
pub const PATH_MEASURE_V2: &str = "/v2/measure";
/// Path of the notification subscriptions (`subscribe`, `list`, `revoke`).
pub const PATH_NOTIFY: &str = "/notify";
/// Path of the browser's authorize step (on `account.withings.com` in production).
pub const PATH_AUTHORIZE: &str = "/oauth2_user/authorize2";
/// Production host of the authorize step.
pub const DEFAULT_AUTHORIZE_BASE_URL: &str = "https://account.withings.com";
/// Path of `getdevice`.
pub const PATH_USER_V2: &str = "/v2/user";
/// Path of `getsummary` / `get` (sleep).
pub const PATH_SLEEP_V2: &str = "/v2/sleep";
/// Path of the ECG recordings (`list`, `get`).
pub const PATH_HEART_V2: &str = "/v2/heart";

/// Longest range Withings answers in one `getintradayactivity` call (longer ranges are cut to
/// the first 24 h).
pub const INTRADAY_MAX_SPAN_SECONDS: i64 = 24 * 3600;

/// Safety cap on `getmeas` pages per call of [`WithingsClient::get_measures`].
pub const MAX_MEASURE_PAGES: usize = 1000;

/// Measure category: real measures.
pub const CATEGORY_REAL: i32 = 1;
/// Measure category: user objectives.
pub const CATEGORY_OBJECTIVE: i32 = 2;

/// Errors of the Withings client.
#[derive(Debug, thiserror::Error)]
pub enum WithingsError {
    /// The access token is invalid or expired (status 401 and the "authentication failed"
    /// family 100–102, 200): refresh the token and retry once.
    #[error("withings: access token rejected (status {status})")]
    InvalidToken {
        /// The Withings status.
        status: i64,
    },
    /// Application-wide rate limit exceeded (status 601): pause, then retry.
    #[error("withings: rate limited (status 601)")]
    RateLimited,
    /// A transient Withings-side failure (522 timeout, 5xx-family generic errors).
    #[error("withings: transient error (status {status})")]
    Retryable {
        /// The Withings status.
        status: i64,
    },
    /// The token endpoint rejected the code or refresh token: the grant is revoked or expired,
    /// the link needs re-authorization. Never retry.
    #[error("withings: grant rejected (status {status}): {message}")]
    InvalidGrant {
        /// The Withings status.
        status: i64,
        /// The `error` text of the envelope.
        message: String,
    },
    /// The token endpoint rejected the application's own credentials (wrong `client_id` or
    /// `client_secret`, e.g. a rotated secret not yet configured): an app-level configuration
    /// error. No link's grant is at fault, so no link may be marked for re-authorization.
    #[error("withings: client credentials rejected (status {status})")]
    InvalidClient {
        /// The Withings status.
        status: i64,
    },
    /// Any other non-zero status (invalid parameters, unauthorized service, bad state…).
    #[error("withings: api error (status {status}): {message}")]
    Api {
        /// The Withings status.
        status: i64,
        /// The `error` text of the envelope.
        message: String,
    },
    /// Network-level failure (connect, timeout, reading the body).
    #[error("withings: http error: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with a non-2xx HTTP status (Withings itself always answers 200;
    /// this comes from proxies, load balancers or outages).
    #[error("withings: unexpected http status {http_status}")]
    Transport {
        /// The HTTP status code.
        http_status: u16,
        /// `Retry-After` in seconds, if the server sent one.
        retry_after_seconds: Option<u64>,
    },
    /// The answer was not the expected JSON.
    #[error("withings: cannot decode answer: {0}")]
    Decode(String),
    /// The [`RateGate`] failed.
    #[error("withings: rate gate failed: {0}")]
    RateGate(#[source] GateError),
}

impl WithingsError {
    /// Whether retrying the same call later may succeed (rate limits, transient server or
    /// network failures). `InvalidToken` is not retryable as such: refresh the token first.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::RateLimited | Self::Retryable { .. } | Self::RateGate(_) => true,
            Self::Http(e) => !e.is_builder() && !e.is_redirect() && !e.is_decode(),
            Self::Transport { http_status, .. } => {
                *http_status >= 500 || *http_status == 429 || *http_status == 408
            }
            Self::InvalidToken { .. }
            | Self::InvalidGrant { .. }
            | Self::InvalidClient { .. }
            | Self::Api { .. }
            | Self::Decode(_) => false,
        }
    }

    /// Whether this is a rate-limit answer (status 601 or HTTP 429): the caller should pause
    /// the partition rather than retry at once.
    #[must_use]
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Transport {
                    http_status: 429,
                    ..
                }
        )
    }

    /// The server's `Retry-After`, if any.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transport {
                retry_after_seconds: Some(s),
                ..
            } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

/// Which mapping of non-zero statuses applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/v2/oauth2 action=requesttoken`.
    Token,
    /// Data endpoints called with an access token.
    Data,
}

/// "Authentication failed" family of `response_status` (W-OAS).
fn is_auth_failed(status: i64) -> bool {
    matches!(status, 100..=102 | 200 | 401)
}

/// Statuses worth retrying: 522 (timeout) and the generic "an error occurred" codes of the
/// 5xx range (516–521, 525–531, 533). 523/532 are "invalid params" and 524 "bad state".
fn is_transient(status: i64) -> bool {
    matches!(status, 516..=522 | 525..=531 | 533)
}

/// What a failed token call (`requesttoken`) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    /// The refresh token or code is invalid, expired, revoked or already used: the link needs
    /// re-authorization. The only outcome that may mark a link.
    InvalidGrant,
    /// The application's client id or secret is wrong: configuration, not the link's grant.
    InvalidClient,
    /// Rate limit, timeout or a Withings-side error: retry later.
    Transient,
    /// Anything else (malformed parameters, redirect mismatch): not the grant's fault.
    Other,
}

/// Classifies a non-zero status of the token endpoint with its `error` text.
///
/// Withings answers token errors at HTTP 200 with a status and an `Invalid Params: …` text
/// (research/providers.md §1.2 and §1.5; the simulator's table): `503 "Invalid Params: invalid
/// refresh_token"` / `"invalid code"` for a bad grant, `503 "Invalid Params: invalid client_id
/// or client_secret"` for wrong app credentials; the "authentication failed" family (401,
/// 100–102, 200) also means the grant. A bare 503 (no text naming the grant) is not trusted to
/// mean a revoked grant: outages answer with 5xx-range statuses too, and marking every link
/// `reauth_required` on an outage would force every patient to reconnect. HTTP-level 5xx,
/// timeouts and connection errors never reach here (they are `Transport` / `Http`).
pub fn classify_token_status(status: i64, message: &str) -> TokenFailure {
    let m = message.to_ascii_lowercase();
    if status == 601 || is_transient(status) {
        return TokenFailure::Transient;
    }
    if m.contains("client_id") || m.contains("client_secret") || m.contains("invalid_client") {
        return TokenFailure::InvalidClient;
    }
    let names_grant = m.contains("refresh_token")
        || m.contains("invalid_grant")
        || m.contains("invalid code")
        || m.contains("expired code");
    if is_auth_failed(status) || (names_grant && (500..=511).contains(&status)) {
        return TokenFailure::InvalidGrant;
    }
    if (500..600).contains(&status) {
        return TokenFailure::Transient;
    }
    TokenFailure::Other
}

/// Maps a non-zero envelope status to an error.
fn map_status(status: i64, message: String, endpoint: Endpoint) -> WithingsError {
    if status == 601 {
        return WithingsError::RateLimited;
    }
    if is_transient(status) {
        return WithingsError::Retryable { status };
    }
    match endpoint {
        Endpoint::Token => match classify_token_status(status, &message) {
            TokenFailure::InvalidGrant => WithingsError::InvalidGrant { status, message },
            TokenFailure::InvalidClient => WithingsError::InvalidClient { status },
            TokenFailure::Transient => WithingsError::Retryable { status },
            TokenFailure::Other => WithingsError::Api { status, message },
        },
        Endpoint::Data if is_auth_failed(status) => WithingsError::InvalidToken { status },
        Endpoint::Data => WithingsError::Api { status, message },
    }
}

/// The response envelope, decoded leniently.
#[derive(Deserialize)]
struct RawEnvelope {
    #[serde(deserialize_with = "de_i64")]
    status: i64,
    #[serde(default)]
    body: Value,
    #[serde(default)]
    error: Value,
}

/// Parses an envelope; status 0 decodes `body` as `T`, other statuses map to errors.
fn parse_envelope<T: DeserializeOwned>(
    bytes: &[u8],
    endpoint: Endpoint,
) -> Result<T, WithingsError> {
    let env: RawEnvelope = serde_json::from_slice(bytes)
        .map_err(|e| WithingsError::Decode(format!("envelope: {}", describe_json_error(&e))))?;
    if env.status != 0 {
        let message = match env.error {
            Value::Null => String::new(),
            Value::String(s) => s,
            other => other.to_string(),
        };
        return Err(map_status(env.status, message, endpoint));
    }
    serde_json::from_value(env.body)
        .map_err(|e| WithingsError::Decode(format!("body: {}", describe_json_error(&e))))
}

/// Describes a JSON error by its category and position only: serde's message can quote the
/// offending value (a measurement), and this text reaches logs and `sync_runs.error`.
fn describe_json_error(e: &serde_json::Error) -> String {
    let category = match e.classify() {
        serde_json::error::Category::Io => "io error",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "unexpected shape or type",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    if e.line() == 0 {
        category.to_string()
    } else {
        format!("{category} at line {} column {}", e.line(), e.column())
    }
}

/// OAuth2 tokens as returned by `requesttoken`.
///
/// `Debug` redacts the tokens.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct TokenSet {
    /// The Withings user id (an int in the OAS, a string in some answers).
    #[serde(deserialize_with = "de_string")]
    pub userid: String,
    /// Bearer token, valid for `expires_in` seconds (3 h).
    pub access_token: String,
    /// The new refresh token. **Always replace the previous one**: Withings rotates it.
    pub refresh_token: String,
    /// Lifetime of `access_token` in seconds.
    #[serde(deserialize_with = "de_i64")]
    pub expires_in: i64,
    /// Granted scopes, comma-separated.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub scope: Option<String>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("userid", &self.userid)
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

/// A closed measurement-time window in epoch seconds (`startdate`/`enddate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `startdate`, epoch seconds.
    pub start_s: i64,
    /// `enddate`, epoch seconds.
    pub end_s: i64,
}

/// Which measure groups `getmeas` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureSelector {
    /// Groups whose measurement time is in the window.
    Window(Window),
    /// Groups created or updated after this epoch second (`lastupdate`).
    LastUpdate(i64),
}

/// One value of a measure group.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Measure {
    /// Mantissa; the real value is `value × 10^unit`.
    #[serde(deserialize_with = "de_i64")]
    pub value: i64,
    /// Measure type (`meastype`), e.g. 1 weight, 9 diastolic, 10 systolic, 11 heart pulse.
    #[serde(rename = "type", deserialize_with = "de_i32")]
    pub measure_type: i32,
    /// Power-of-ten exponent of `value`.
    #[serde(default, deserialize_with = "de_i32")]
    pub unit: i32,
    /// Body position for segmental measures.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub position: Option<i64>,
}

/// A measure group (`measuregrp_object`): measures taken together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MeasureGroup {
    /// Group id, stable across edits.
    #[serde(deserialize_with = "de_i64")]
    pub grpid: i64,
    /// How the measure was attributed (0/8 device, 1 ambiguous, 2/4 manual, …).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub attrib: Option<i64>,
    /// Measurement time, epoch seconds.
    #[serde(deserialize_with = "de_i64")]
    pub date: i64,
    /// Storage time, epoch seconds.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub created: Option<i64>,
    /// Last update time, epoch seconds.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modified: Option<i64>,
    /// 1 real measures, 2 user objectives.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub category: Option<i64>,
    /// Device id (string, integer or null for manual entries).
    #[serde(default, deserialize_with = "de_opt_string")]
    pub deviceid: Option<String>,
    /// Hashed device id (usually equal to `deviceid`).
    #[serde(default, deserialize_with = "de_opt_string")]
    pub hash_deviceid: Option<String>,
    /// The measures of the group.
    #[serde(default)]
    pub measures: Vec<Measure>,
    /// Device model id as real answers spell it (`modelid`).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modelid: Option<i64>,
    /// Device model id as the OAS spells it (`model_id`).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub model_id: Option<i64>,
    /// Device model name, e.g. `BPM Connect`.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub model: Option<String>,
}

impl MeasureGroup {
    /// The device id: `deviceid`, else `hash_deviceid`, else `None` (manual entry).
    #[must_use]
    pub fn device_id(&self) -> Option<&str> {
        self.deviceid.as_deref().or(self.hash_deviceid.as_deref())
    }

    /// The model id, from `modelid` or `model_id`.
    #[must_use]
    pub fn model_id(&self) -> Option<i64> {
        self.modelid.or(self.model_id)
    }
}

/// One page of `getmeas`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MeasurePage {
    /// Server time of the answer, epoch seconds.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub updatetime: Option<i64>,
    /// The user's IANA time zone.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub timezone: Option<String>,
    /// The groups of this page.
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub measuregrps: Vec<MeasureGroup>,
    /// Whether another page follows (int 0/1 in `getmeas`, bool elsewhere).
    #[serde(default, deserialize_with = "de_bool")]
    pub more: bool,
    /// Offset to send for the next page.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub offset: Option<i64>,
}

/// All pages of a `getmeas` call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeasureResponse {
    /// Server time of the **first** page, epoch seconds: a safe next `lastupdate` cursor
    /// (nothing created while paging is skipped).
    pub updatetime: Option<i64>,
    /// The user's IANA time zone (first page that has one).
    pub timezone: Option<String>,
    /// The groups of all pages, in answer order.
    pub measuregrps: Vec<MeasureGroup>,
}

impl MeasureResponse {
    fn push_page(&mut self, page: MeasurePage) {
        self.updatetime = match (self.updatetime, page.updatetime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.timezone.is_none() {
            self.timezone = page.timezone;
        }
        self.measuregrps.extend(page.measuregrps);
    }
}

/// One entry of the intraday `series`; only the fields ohx uses are kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct IntradayEntry {
    /// Device id (string, integer or null).
    #[serde(default, deserialize_with = "de_opt_string")]
    pub deviceid: Option<String>,
    /// Device model name, e.g. `ScanWatch`.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub model: Option<String>,
    /// Device model id, e.g. 93.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub model_id: Option<i64>,
    /// The entry's numeric data fields (`heart_rate`, `steps`, `spo2_auto`, ...); entries are
    /// sparse, a field is absent where it does not apply.
    #[serde(skip)]
    pub values: BTreeMap<String, f64>,
}

/// Fields of an intraday entry that describe the device, not a measurement.
const INTRADAY_DEVICE_FIELDS: [&str; 4] = ["deviceid", "hash_deviceid", "model", "model_id"];

/// Intraday activity (`getintradayactivity`), merged over all chunks.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct IntradayResponse {
    /// Entries keyed by epoch second.
    #[serde(default, deserialize_with = "de_series")]
    pub series: BTreeMap<i64, IntradayEntry>,
}

/// One day's row of `getactivity`. Withings rewrites a day's row as the day goes on, with a
/// new `modified`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActivityDay {
    /// The local day, `YYYY-MM-DD`.
    pub date: String,
    /// The IANA zone of the day.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub timezone: Option<String>,
    /// Last change of the row (epoch seconds).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modified: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub deviceid: Option<String>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modelid: Option<i64>,
    /// The row's numeric data fields (`steps`, `distance`, `calories`, ...).
    #[serde(skip)]
    pub values: BTreeMap<String, f64>,
}

/// Fields of an activity row that describe it rather than measure the day.
const ACTIVITY_ROW_FIELDS: [&str; 8] = [
    "date",
    "timezone",
    "modified",
    "deviceid",
    "hash_deviceid",
    "brand",
    "model",
    "modelid",
];

/// One device of `v2/user getdevice`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UserDevice {
    /// e.g. `Scale`, `Blood Pressure Monitor`, `Activity Tracker`.
    #[serde(default, rename = "type", deserialize_with = "de_opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub model_id: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub deviceid: Option<String>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub hash_deviceid: Option<String>,
    /// Epoch seconds; null for a device never used.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub last_session_date: Option<i64>,
}

/// The body of `getdevice`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct DeviceList {
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub devices: Vec<UserDevice>,
}

/// One night of `v2/sleep getsummary`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SleepNight {
    /// The night's id (stable across revisions).
    #[serde(deserialize_with = "de_string")]
    pub id: String,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub timezone: Option<String>,
    /// Start and end of the night (epoch seconds).
    #[serde(deserialize_with = "de_i64")]
    pub startdate: i64,
    #[serde(deserialize_with = "de_i64")]
    pub enddate: i64,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modified: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub model_id: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub hash_deviceid: Option<String>,
    /// The numeric fields of `data` (durations in seconds, rates per minute, ...).
    #[serde(default, deserialize_with = "de_numbers")]
    pub data: BTreeMap<String, f64>,
}

/// One segment of `v2/sleep get`: a sleep state from `startdate` to `enddate` (epoch seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SleepSegment {
    #[serde(deserialize_with = "de_i64")]
    pub startdate: i64,
    #[serde(deserialize_with = "de_i64")]
    pub enddate: i64,
    /// 0 awake, 1 light, 2 deep, 3 REM, 4 manual, 5 unspecified, 15 out of bed.
    #[serde(deserialize_with = "de_i64")]
    pub state: i64,
    /// The series asked for (`data_fields`): field → `{epoch: value}`.
    #[serde(flatten)]
    pub series: BTreeMap<String, Value>,
}

/// The body of `v2/sleep get`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct SleepSeries {
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub series: Vec<SleepSegment>,
}

/// One page of `getsummary`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct SleepPage {
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub series: Vec<SleepNight>,
    #[serde(default, deserialize_with = "de_bool")]
    pub more: bool,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub offset: Option<i64>,
}

/// The numeric fields of a JSON object other than `except` (a non-object gives nothing).
fn numeric_fields(v: &Value, except: &[&str]) -> BTreeMap<String, f64> {
    match v {
        Value::Object(fields) => fields
            .iter()
            .filter(|(name, _)| !except.contains(&name.as_str()))
            .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// An object's numeric fields (others, and a null or missing object, give nothing).
fn de_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    Ok(numeric_fields(&Value::deserialize(d)?, &[]))
}

/// A page of a `v2` list answer: its items, `more` and the next `offset`.
trait DatedPage: DeserializeOwned {
    type Item;
    fn into_parts(self) -> (Vec<Self::Item>, bool, Option<i64>);
}

impl DatedPage for ActivityPage {
    type Item = ActivityDay;
    fn into_parts(self) -> (Vec<ActivityDay>, bool, Option<i64>) {
        (self.activities, self.more, self.offset)
    }
}

impl DatedPage for HeartPage {
    type Item = HeartRecording;
    fn into_parts(self) -> (Vec<HeartRecording>, bool, Option<i64>) {
        (self.series, self.more, self.offset)
    }
}

impl DatedPage for SleepPage {
    type Item = SleepNight;
    fn into_parts(self) -> (Vec<SleepNight>, bool, Option<i64>) {
        (self.series, self.more, self.offset)
    }
}

/// The ECG of a `v2/heart list` item: the signal's id and the device's AFib result.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeartEcg {
    #[serde(deserialize_with = "de_string")]
    pub signalid: String,
    /// 0 negative, 1 positive, 2 inconclusive.
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub afib: Option<i64>,
}

/// One recording of `v2/heart list`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeartRecording {
    #[serde(default, deserialize_with = "de_opt_string")]
    pub deviceid: Option<String>,
    /// The device's model number (44 BPM Core, 91 Move ECG, 93/94 ScanWatch).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub model: Option<i64>,
    /// `null` or missing on a recording without an ECG (a stethoscope-only one).
    #[serde(default)]
    pub ecg: Option<HeartEcg>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub heart_rate: Option<i64>,
    /// Start of the recording (epoch seconds).
    #[serde(deserialize_with = "de_i64")]
    pub timestamp: i64,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub modified: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_string")]
    pub timezone: Option<String>,
}

/// One page of `v2/heart list`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct HeartPage {
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub series: Vec<HeartRecording>,
    #[serde(default, deserialize_with = "de_bool")]
    pub more: bool,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub offset: Option<i64>,
}

/// The body of `v2/heart get`: the signal in µV at `sampling_frequency` Hz.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct HeartSignal {
    #[serde(default, deserialize_with = "de_vec_or_empty")]
    pub signal: Vec<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub sampling_frequency: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub wearposition: Option<i64>,
}

/// One page of `getactivity`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct ActivityPage {
    #[serde(default, deserialize_with = "de_activities")]
    pub activities: Vec<ActivityDay>,
    /// A boolean here (getmeas' is an integer); tolerant of both.
    #[serde(default, deserialize_with = "de_bool")]
    pub more: bool,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub offset: Option<i64>,
}

fn de_activities<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ActivityDay>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::Array(rows) => rows
            .into_iter()
            .map(|row| {
                let values = numeric_fields(&row, &ACTIVITY_ROW_FIELDS);
                let mut day: ActivityDay = serde_json::from_value(row).map_err(D::Error::custom)?;
                day.values = values;
                Ok(day)
            })
            .collect(),
        other => Err(D::Error::custom(format!("expected an array, got {other}"))),
    }
}

/// Splits `[start_s, end_s]` into consecutive chunks spanning at most
/// [`INTRADAY_MAX_SPAN_SECONDS`] each (chunk `i` ends where chunk `i+1` starts). An empty or
/// inverted range gives no chunk.
#[must_use]
pub fn intraday_chunks(start_s: i64, end_s: i64) -> Vec<Window> {
    let mut chunks = Vec::new();
    let mut s = start_s;
    while s < end_s {
        let e = s.saturating_add(INTRADAY_MAX_SPAN_SECONDS).min(end_s);
        chunks.push(Window {
            start_s: s,
            end_s: e,
        });
        s = e;
    }
    chunks
}

/// Client of the Withings Public API.
#[derive(Clone)]
pub struct WithingsClient {
    http: reqwest::Client,
    base_url: String,
    gate: Arc<dyn RateGate>,
}

impl fmt::Debug for WithingsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithingsClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl WithingsClient {
    /// A client for `base_url` (e.g. [`DEFAULT_BASE_URL`] or a simulator; a trailing `/` is
    /// ignored) without rate gate. Configure timeouts on `http`.
    #[must_use]
    pub fn new(http: reqwest::Client, base_url: impl Into<String>) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        Self {
            http,
            base_url,
            gate: Arc::new(NoRateGate),
        }
    }

    /// Uses `gate` before every HTTP request.
    #[must_use]
    pub fn with_rate_gate(mut self, gate: Arc<dyn RateGate>) -> Self {
        self.gate = gate;
        self
    }

    /// A client for one application's [`Api`] (its base URL and rate gate).
    #[must_use]
    pub fn from_api(api: &Api) -> Self {
        Self::new(api.http.clone(), api.base_url.clone()).with_rate_gate(api.gate.clone())
    }

    /// The base URL (without trailing `/`).
    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Refreshes tokens (`grant_type=refresh_token`). The answer carries a **new refresh
    /// token** that must replace the old one.
    ///
    /// # Errors
    ///
    /// [`WithingsError::InvalidGrant`] when the refresh token is invalid, expired or revoked
    /// (re-authorization needed); otherwise as described on [`WithingsError`].
    pub async fn refresh_token(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
    ) -> Result<TokenSet, WithingsError> {
        let form = [
            ("action", "requesttoken"),
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("refresh_token", refresh_token),
        ];
        self.post(PATH_OAUTH2, None, &form, Endpoint::Token).await
    }

    /// Exchanges an authorization code (valid 30 s, single use) for tokens
    /// (`grant_type=authorization_code`).
    ///
    /// # Errors
    ///
    /// [`WithingsError::InvalidGrant`] when the code is invalid, expired or already used;
    /// otherwise as described on [`WithingsError`].
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &str,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenSet, WithingsError> {
        let form = [
            ("action", "requesttoken"),
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ];
        self.post(PATH_OAUTH2, None, &form, Endpoint::Token).await
    }

    /// `getmeas` over all pages: follows `more`/`offset` until no page remains (one
    /// [`RateGate`] permit per page). `meastypes` is sent as the plural comma list
    /// (`meastypes=9,10`); an empty slice requests all types.
    ///
    /// # Errors
    ///
    /// The first failing page's error (see [`WithingsError`]); [`WithingsError::Decode`] also
    /// when paging does not advance or exceeds [`MAX_MEASURE_PAGES`].
    pub async fn get_measures(
        &self,
        token: &str,
        meastypes: &[i32],
        category: i32,
        selector: MeasureSelector,
    ) -> Result<MeasureResponse, WithingsError> {
        let mut out = MeasureResponse::default();
        let mut offset: Option<i64> = None;
        for _ in 0..MAX_MEASURE_PAGES {
            let page = self
                .get_measures_page(token, meastypes, category, selector, offset)
                .await?;
            let more = page.more;
            let next = page.offset;
            out.push_page(page);
            if !more {
                return Ok(out);
            }
            match next {
                Some(n) if n > offset.unwrap_or(0) => offset = Some(n),
                _ => {
                    return Err(WithingsError::Decode(format!(
                        "getmeas paging did not advance (more=1, offset {next:?} after {offset:?})"
                    )));
                }
            }
        }
        Err(WithingsError::Decode(format!(
            "getmeas returned more than {MAX_MEASURE_PAGES} pages"
        )))
    }

    /// One page of `getmeas` (one HTTP request).
    ///
    /// # Errors
    ///
    /// See [`WithingsError`]: `InvalidToken` → refresh and retry once; `RateLimited` → pause.
    pub async fn get_measures_page(
        &self,
        token: &str,
        meastypes: &[i32],
        category: i32,
        selector: MeasureSelector,
        offset: Option<i64>,
    ) -> Result<MeasurePage, WithingsError> {
        let mut form: Vec<(&str, String)> = vec![
            ("action", "getmeas".to_owned()),
            ("category", category.to_string()),
        ];
        if !meastypes.is_empty() {
            let list: Vec<String> = meastypes.iter().map(i32::to_string).collect();
            form.push(("meastypes", list.join(",")));
        }
        match selector {
            MeasureSelector::Window(w) => {
                form.push(("startdate", w.start_s.to_string()));
                form.push(("enddate", w.end_s.to_string()));
            }
            MeasureSelector::LastUpdate(t) => form.push(("lastupdate", t.to_string())),
        }
        if let Some(o) = offset {
            form.push(("offset", o.to_string()));
        }
        self.post(PATH_MEASURE, Some(token), &form, Endpoint::Data)
            .await
    }

    /// `getactivity` for the days `start_ymd..=end_ymd` (`YYYY-MM-DD`) and `fields`, over all
    /// pages (one [`RateGate`] permit per page).
    ///
    /// # Errors
    ///
    /// The first failing page's error; [`WithingsError::Decode`] when paging does not
    /// advance or exceeds [`MAX_MEASURE_PAGES`].
    pub async fn get_activity(
        &self,
        token: &str,
        start_ymd: &str,
        end_ymd: &str,
        fields: &[&str],
    ) -> Result<Vec<ActivityDay>, WithingsError> {
        self.get_dated_pages::<ActivityPage>(
            PATH_MEASURE_V2,
            "getactivity",
            token,
            (start_ymd, end_ymd),
            fields,
        )
        .await
    }

    /// One `action` over the dates `start_ymd..=end_ymd` and `fields`, all pages
    /// ([`Self::get_pages`]).
    async fn get_dated_pages<P: DatedPage>(
        &self,
        path: &str,
        action: &str,
        token: &str,
        (start_ymd, end_ymd): (&str, &str),
        fields: &[&str],
    ) -> Result<Vec<P::Item>, WithingsError> {
        let form = vec![
            ("action", action.to_owned()),
            ("startdateymd", start_ymd.to_owned()),
            ("enddateymd", end_ymd.to_owned()),
            ("data_fields", fields.join(",")),
        ];
        self.get_pages::<P>(path, action, token, form).await
    }

    /// A `v2` list call with `form`, following the boolean `more` and `offset` of its answers
    /// over all pages (one [`RateGate`] permit per page).
    async fn get_pages<P: DatedPage>(
        &self,
        path: &str,
        action: &str,
        token: &str,
        form: Vec<(&str, String)>,
    ) -> Result<Vec<P::Item>, WithingsError> {
        let mut out = Vec::new();
        let mut offset: Option<i64> = None;
        for _ in 0..MAX_MEASURE_PAGES {
            let mut form = form.clone();
            if let Some(o) = offset {
                form.push(("offset", o.to_string()));
            }
            let page: P = self.post(path, Some(token), &form, Endpoint::Data).await?;
            let (items, more, next) = page.into_parts();
            out.extend(items);
            if !more {
                return Ok(out);
            }
            match next {
                Some(next) if offset.is_none_or(|o| next > o) => offset = Some(next),
                _ => {
                    return Err(WithingsError::Decode(format!(
                        "{action} paging does not advance"
                    )));
                }
            }
        }
        Err(WithingsError::Decode(format!("{action}: too many pages")))
    }

    /// `v2/heart list`: the ECG recordings made in `window` (epoch seconds), all pages (one
    /// [`RateGate`] permit per page).
    ///
    /// # Errors
    ///
    /// The first failing page's error; [`WithingsError::Decode`] when paging does not advance.
    pub async fn get_heart_list(
        &self,
        token: &str,
        window: Window,
    ) -> Result<Vec<HeartRecording>, WithingsError> {
        let form = vec![
            ("action", "list".to_owned()),
            ("startdate", window.start_s.to_string()),
            ("enddate", window.end_s.to_string()),
        ];
        self.get_pages::<HeartPage>(PATH_HEART_V2, "heart list", token, form)
            .await
    }

    /// `v2/heart get`: the signal of one recording.
    ///
    /// # Errors
    ///
    /// See [`WithingsError`].
    pub async fn get_heart_signal(
        &self,
        token: &str,
        signalid: &str,
    ) -> Result<HeartSignal, WithingsError> {
        let form = [("action", "get"), ("signalid", signalid)];
        self.post(PATH_HEART_V2, Some(token), &form, Endpoint::Data)
            .await
    }

    /// `v2/user getdevice`: the devices of the token's user.
    ///
    /// # Errors
    ///
    /// See [`WithingsError`].
    pub async fn get_devices(&self, token: &str) -> Result<Vec<UserDevice>, WithingsError> {
        let form = [("action", "getdevice")];
        let list: DeviceList = self
            .post(PATH_USER_V2, Some(token), &form, Endpoint::Data)
            .await?;
        Ok(list.devices)
    }

    /// Subscribes the token's user to notifications of category `appli` at `callback_url`
    /// (Withings probes the URL with `HEAD` first and answers status 293 if it fails).
    ///
    /// # Errors
    ///
    /// See [`WithingsError`].
    pub async fn subscribe(
        &self,
        token: &str,
        callback_url: &str,
        appli: i32,
    ) -> Result<(), WithingsError> {
        let form = [
            ("action", "subscribe".to_owned()),
            ("callbackurl", callback_url.to_owned()),
            ("appli", appli.to_string()),
            ("comment", "ohx".to_owned()),
        ];
        let _: Value = self
            .post(PATH_NOTIFY, Some(token), &form, Endpoint::Data)
            .await?;
        Ok(())
    }

    /// Revokes the token's user's subscription to `appli` at `callback_url`.
    ///
    /// # Errors
    ///
    /// See [`WithingsError`] (status 2554: no such subscription).
    pub async fn revoke_subscription(
        &self,
        token: &str,
        callback_url: &str,
        appli: i32,
    ) -> Result<(), WithingsError> {
        let form = [
            ("action", "revoke".to_owned()),
            ("callbackurl", callback_url.to_owned()),
            ("appli", appli.to_string()),
        ];
        let _: Value = self
            .post(PATH_NOTIFY, Some(token), &form, Endpoint::Data)
            .await?;
        Ok(())
    }

    /// `v2/sleep getsummary` for the nights dated `start_ymd..=end_ymd` and `fields`, over
    /// all pages (one [`RateGate`] permit per page).
    ///
    /// # Errors
    ///
    /// The first failing page's error; [`WithingsError::Decode`] when paging does not advance.
    pub async fn get_sleep_summary(
        &self,
        token: &str,
        start_ymd: &str,
        end_ymd: &str,
        fields: &[&str],
    ) -> Result<Vec<SleepNight>, WithingsError> {
        self.get_dated_pages::<SleepPage>(
            PATH_SLEEP_V2,
            "getsummary",
            token,
            (start_ymd, end_ymd),
            fields,
        )
        .await
    }

    /// `v2/sleep get`: the sleep state segments of `window` (epoch seconds; Withings answers
    /// at most 24 h per call), with the series `fields`.
    ///
    /// # Errors
    ///
    /// See [`WithingsError`].
    pub async fn get_sleep_segments(
        &self,
        token: &str,
        window: Window,
        fields: &[&str],
    ) -> Result<Vec<SleepSegment>, WithingsError> {
        let (start, end) = (window.start_s.to_string(), window.end_s.to_string());
        let fields = fields.join(",");
        let mut form = vec![
            ("action", "get"),
            ("startdate", start.as_str()),
            ("enddate", end.as_str()),
        ];
        if !fields.is_empty() {
            form.push(("data_fields", fields.as_str()));
        }
        let series: SleepSeries = self
            .post(PATH_SLEEP_V2, Some(token), &form, Endpoint::Data)
            .await?;
        Ok(series.series)
    }

    /// `getintradayactivity` for `fields` (`data_fields`, e.g. `heart_rate,steps`) over
    /// `[start_s, end_s]`, in chunks of at most 24 h (Withings silently cuts longer ranges),
    /// merged. One [`RateGate`] permit per chunk.
    ///
    /// # Errors
    ///
    /// The first failing chunk's error (see [`WithingsError`]).
    pub async fn get_intraday(
        &self,
        token: &str,
        start_s: i64,
        end_s: i64,
        fields: &[&str],
    ) -> Result<IntradayResponse, WithingsError> {
        let mut out = IntradayResponse::default();
        for w in intraday_chunks(start_s, end_s) {
            let chunk = self
                .get_intraday_chunk(token, w.start_s, w.end_s, fields)
                .await?;
            out.series.extend(chunk.series);
        }
        Ok(out)
    }

    /// One `getintradayactivity` request for `fields`. The caller keeps the range ≤ 24 h.
    ///
    /// # Errors
    ///
    /// See [`WithingsError`].
    pub async fn get_intraday_chunk(
        &self,
        token: &str,
        start_s: i64,
        end_s: i64,
        fields: &[&str],
    ) -> Result<IntradayResponse, WithingsError> {
        let form = [
            ("action", "getintradayactivity".to_owned()),
            ("startdate", start_s.to_string()),
            ("enddate", end_s.to_string()),
            ("data_fields", fields.join(",")),
        ];
        self.post(PATH_MEASURE_V2, Some(token), &form, Endpoint::Data)
            .await
    }

    /// Acquires a permit, sends one form POST and decodes the envelope.
    async fn post<T, V>(
        &self,
        path: &str,
        token: Option<&str>,
        form: &[(&str, V)],
        endpoint: Endpoint,
    ) -> Result<T, WithingsError>
    where
        T: DeserializeOwned,
        V: serde::Serialize,
    {
        self.gate.acquire().await.map_err(WithingsError::RateGate)?;
        let mut req = self
            .http
            .post(format!("{}{path}", self.base_url))
            .form(form);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after_seconds = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            tracing::debug!(
                path,
                http_status = status.as_u16(),
                "withings: non-2xx answer"
            );
            return Err(WithingsError::Transport {
                http_status: status.as_u16(),
                retry_after_seconds,
            });
        }
        let bytes = resp.bytes().await?;
        let result = parse_envelope(&bytes, endpoint);
        if let Err(e) = &result {
            tracing::debug!(path, error = %e, "withings: call failed");
        }
        result
    }
}

// ---- lenient field decoders --------------------------------------------------------------

fn value_to_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Integer, or a string holding one.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_i64(&v).ok_or_else(|| D::Error::custom(format!("expected an integer, got {v}")))
}

/// Like [`de_i64`] but null → `None`.
fn de_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Value::deserialize(d)?;
    match v {
        Value::Null => Ok(None),
        Value::String(ref s) if s.trim().is_empty() => Ok(None),
        ref other => value_to_i64(other)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected an integer, got {other}"))),
    }
}

/// An `i32` integer, or a string holding one.
fn de_i32<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = de_i64(d)?;
    i32::try_from(n).map_err(|_| D::Error::custom(format!("integer {n} out of range")))
}

/// String or integer → `String`.
fn de_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(D::Error::custom(format!(
            "expected a string or an integer, got {other}"
        ))),
    }
}

/// String or integer → `Some(String)`; null or `""` → `None`.
fn de_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        other => Err(D::Error::custom(format!(
            "expected a string or an integer, got {other}"
        ))),
    }
}

/// `true`/`false`, `0`/`1`, or their string forms; null → `false`.
fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(b),
        Value::String(s) => match s.trim() {
            "" | "0" | "false" => Ok(false),
            "1" | "true" => Ok(true),
            other => Err(D::Error::custom(format!(
                "expected a boolean, got {other:?}"
            ))),
        },
        v @ Value::Number(_) => value_to_i64(&v)
            .map(|n| n != 0)
            .ok_or_else(|| D::Error::custom(format!("expected a boolean, got {v}"))),
        other => Err(D::Error::custom(format!("expected a boolean, got {other}"))),
    }
}

/// An array; null or `{}` (PHP's empty array) → empty.
fn de_vec_or_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) if m.is_empty() => Ok(Vec::new()),
        v @ Value::Array(_) => serde_json::from_value(v).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!("expected an array, got {other}"))),
    }
}

/// The intraday `series`: an object keyed by epoch-second strings; null or `[]` (PHP's
/// empty array) → empty.
fn de_series<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i64, IntradayEntry>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(BTreeMap::new()),
        Value::Array(a) if a.is_empty() => Ok(BTreeMap::new()),
        Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let t: i64 = k.trim().parse().map_err(|_| {
                    D::Error::custom(format!("series key {k:?} is not an epoch second"))
                })?;
                let values = numeric_fields(&v, &INTRADAY_DEVICE_FIELDS);
                let mut e: IntradayEntry = serde_json::from_value(v).map_err(D::Error::custom)?;
                e.values = values;
                Ok((t, e))
            })
            .collect(),
        other => Err(D::Error::custom(format!(
            "expected an object keyed by epoch seconds, got {other}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::{Form, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;

    // ---- envelope and status mapping ----

    fn data_err(json: &str) -> WithingsError {
        parse_envelope::<Value>(json.as_bytes(), Endpoint::Data).unwrap_err()
    }

    fn token_err(json: &str) -> WithingsError {
        parse_envelope::<TokenSet>(json.as_bytes(), Endpoint::Token).unwrap_err()
    }

    #[test]
    fn test_envelope_ok_returns_body() {
        let v: Value = parse_envelope(br#"{"status":0,"body":{"a":1}}"#, Endpoint::Data).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn test_envelope_status_as_string_is_accepted() {
        let v: Value = parse_envelope(br#"{"status":"0","body":{}}"#, Endpoint::Data).unwrap();
        assert!(v.is_object());
    }

    #[test]
    fn test_envelope_401_is_invalid_token() {
        let e = data_err(
            r#"{"status":401,"body":{},"error":"XRequestID: Not provided invalid_token: The access token provided is invalid"}"#,
        );
        assert!(matches!(e, WithingsError::InvalidToken { status: 401 }));
        assert!(!e.is_retryable());
    }

    #[test]
    fn test_envelope_auth_failed_family_is_invalid_token() {
        for s in [100, 101, 102, 200] {
            let e = data_err(&format!(r#"{{"status":{s},"body":{{}}}}"#));
            assert!(
                matches!(e, WithingsError::InvalidToken { status } if status == s),
                "{s}: {e:?}"
            );
        }
    }

    #[test]
    fn test_envelope_601_is_rate_limited() {
        let e = data_err(r#"{"status":601,"body":{},"error":"Too many request"}"#);
        assert!(matches!(e, WithingsError::RateLimited));
        assert!(e.is_retryable());
        assert!(e.is_rate_limited());
    }

    #[test]
    fn test_envelope_522_and_5xx_generic_errors_are_retryable() {
        for s in [522, 516, 521, 525, 531, 533] {
            let e = data_err(&format!(r#"{{"status":{s},"body":{{}}}}"#));
            assert!(
                matches!(e, WithingsError::Retryable { status } if status == s),
                "{s}: {e:?}"
            );
            assert!(e.is_retryable());
        }
    }

    #[test]
    fn test_envelope_other_statuses_are_api_errors() {
        for s in [293, 503, 523, 524, 532, 2554, 214] {
            let e = data_err(&format!(r#"{{"status":{s},"body":[],"error":"nope"}}"#));
            match e {
                WithingsError::Api {
                    status,
                    ref message,
                } => {
                    assert_eq!(status, s);
                    assert_eq!(message, "nope");
                }
                other => panic!("{s}: {other:?}"),
            }
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn test_envelope_missing_error_text_gives_empty_message() {
        let e = data_err(r#"{"status":293}"#);
        assert!(matches!(e, WithingsError::Api { status: 293, ref message } if message.is_empty()));
    }

    #[test]
    fn test_decode_errors_never_quote_values() {
        // A measure value of the wrong type: serde's own message would quote it.
        let body = r#"{"status":0,"body":{"measuregrps":[{"grpid":1,"date":1,"measures":[{"value":72.45,"type":1,"unit":-3}]}]}}"#;
        let e = parse_envelope::<MeasurePage>(body.as_bytes(), Endpoint::Data).unwrap_err();
        assert!(matches!(e, WithingsError::Decode(_)), "{e:?}");
        assert!(
            !e.to_string().contains("72.45"),
            "a value leaked into the error: {e}"
        );
        assert!(e.to_string().contains("unexpected shape or type"), "{e}");
    }

    #[test]
    fn test_envelope_bad_json_is_decode_error() {
        let e = data_err("<html>oops</html>");
        assert!(matches!(e, WithingsError::Decode(_)));
        assert!(!e.is_retryable());
        let e = data_err(r#"{"body":{}}"#);
        assert!(matches!(e, WithingsError::Decode(_)));
    }

    #[test]
    fn test_envelope_body_of_wrong_shape_is_decode_error() {
        let e = parse_envelope::<MeasurePage>(
            br#"{"status":0,"body":{"measuregrps":"x"}}"#,
            Endpoint::Data,
        )
        .unwrap_err();
        assert!(matches!(e, WithingsError::Decode(_)));
    }

    #[test]
    fn test_classify_token_status() {
        use TokenFailure::*;
        let cases: &[(i64, &str, TokenFailure)] = &[
            (503, "Invalid Params: invalid refresh_token", InvalidGrant),
            (503, "Invalid Params: invalid code", InvalidGrant),
            (401, "", InvalidGrant),
            (100, "whatever", InvalidGrant),
            (
                503,
                "Invalid Params: invalid client_id or client_secret",
                InvalidClient,
            ),
            (401, "invalid_client", InvalidClient),
            (503, "", Transient),
            (503, "Service Unavailable", Transient),
            (500, "", Transient),
            (522, "", Transient),
            (601, "", Transient),
            (503, "Invalid Params: redirect_uri_mismatch", Transient),
            (293, "invalid refresh_token", Other),
            (2554, "", Other),
        ];
        for (status, msg, want) in cases {
            assert_eq!(
                classify_token_status(*status, msg),
                *want,
                "{status} {msg:?}"
            );
        }
    }

    #[test]
    fn test_token_endpoint_outage_and_client_errors_are_not_invalid_grant() {
        let e = token_err(r#"{"status":503,"body":{}}"#);
        assert!(
            matches!(e, WithingsError::Retryable { status: 503 }),
            "{e:?}"
        );
        let e = token_err(
            r#"{"status":503,"body":{},"error":"Invalid Params: invalid client_id or client_secret"}"#,
        );
        assert!(
            matches!(e, WithingsError::InvalidClient { status: 503 }),
            "{e:?}"
        );
    }

    #[test]
    fn test_token_endpoint_503_and_auth_failures_are_invalid_grant() {
        for s in [503, 401, 100, 101, 102, 200] {
            let e = token_err(&format!(
                r#"{{"status":{s},"body":{{}},"error":"Invalid Params: invalid refresh_token"}}"#
            ));
            match e {
                WithingsError::InvalidGrant {
                    status,
                    ref message,
                } => {
                    assert_eq!(status, s);
                    assert!(message.contains("refresh_token"));
                }
                other => panic!("{s}: {other:?}"),
            }
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn test_token_endpoint_rate_limit_and_timeout_stay_retryable() {
        assert!(matches!(
            token_err(r#"{"status":601,"body":{}}"#),
            WithingsError::RateLimited
        ));
        assert!(matches!(
            token_err(r#"{"status":522,"body":{}}"#),
            WithingsError::Retryable { status: 522 }
        ));
        assert!(matches!(
            token_err(r#"{"status":2554,"body":{}}"#),
            WithingsError::Api { status: 2554, .. }
        ));
    }

    #[test]
    fn test_transport_retryability() {
        let t = |s| WithingsError::Transport {
            http_status: s,
            retry_after_seconds: None,
        };
        assert!(t(500).is_retryable());
        assert!(t(503).is_retryable());
        assert!(t(429).is_retryable());
        assert!(t(429).is_rate_limited());
        assert!(!t(404).is_retryable());
        assert!(!t(400).is_retryable());
        let e = WithingsError::Transport {
            http_status: 429,
            retry_after_seconds: Some(7),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }

    // ---- wire types ----

    #[test]
    fn test_token_set_accepts_int_and_string_userid() {
        let t: TokenSet = parse_envelope(
            br#"{"status":0,"body":{"userid":363,"access_token":"a075","refresh_token":"f631",
                "expires_in":10800,"scope":"user.info,user.metrics","csrf_token":"x","token_type":"Bearer"}}"#,
            Endpoint::Token,
        )
        .unwrap();
        assert_eq!(t.userid, "363");
        assert_eq!(t.access_token, "a075");
        assert_eq!(t.refresh_token, "f631");
        assert_eq!(t.expires_in, 10800);
        assert_eq!(t.scope.as_deref(), Some("user.info,user.metrics"));

        let t: TokenSet = parse_envelope(
            br#"{"status":0,"body":{"userid":"user-id","access_token":"a","refresh_token":"r","expires_in":"10800"}}"#,
            Endpoint::Token,
        )
        .unwrap();
        assert_eq!(t.userid, "user-id");
        assert_eq!(t.expires_in, 10800);
        assert_eq!(t.scope, None);
    }

    #[test]
    fn test_token_set_debug_redacts_tokens() {
        let t = TokenSet {
            userid: "1".into(),
            access_token: "secret-access".into(),
            refresh_token: "secret-refresh".into(),
            expires_in: 1,
            scope: None,
        };
        let s = format!("{t:?}");
        assert!(!s.contains("secret"), "{s}");
    }

    #[test]
    fn test_measure_group_tolerates_deviceid_variants_and_unknown_fields() {
        let page: MeasurePage = serde_json::from_str(
            r#"{"updatetime":1690491663,"timezone":"Europe/Berlin","more":0,"offset":0,"measuregrps":[
              {"grpid":1,"attrib":0,"date":10,"created":11,"modified":12,"category":1,
               "deviceid":"abc","hash_deviceid":"abc","measures":[{"value":89,"type":9,"unit":0,"algo":0,"fm":3,"apppfmid":8,"appliver":1}],
               "modelid":44,"model":"BPM Core","comment":null},
              {"grpid":2,"attrib":2,"date":10,"modified":12,"category":1,"deviceid":null,"hash_deviceid":null,
               "measures":[{"value":118003,"type":1,"unit":-3}],"comment":null,"probability":100},
              {"grpid":3,"attrib":0,"date":10,"modified":12,"category":1,"deviceid":14546187,
               "measures":[],"model_id":6}
            ]}"#,
        )
        .unwrap();
        assert!(!page.more);
        assert_eq!(page.updatetime, Some(1690491663));
        let g = &page.measuregrps;
        assert_eq!(g[0].device_id(), Some("abc"));
        assert_eq!(g[0].model_id(), Some(44));
        assert_eq!(g[0].measures[0].measure_type, 9);
        assert_eq!(g[1].device_id(), None);
        assert_eq!(g[1].created, None);
        assert_eq!(g[2].device_id(), Some("14546187"));
        assert_eq!(g[2].model_id(), Some(6));
    }

    #[test]
    fn test_measure_page_more_accepts_int_bool_and_string() {
        for (raw, want) in [
            ("1", true),
            ("0", false),
            ("true", true),
            ("false", false),
            ("\"1\"", true),
            ("null", false),
        ] {
            let p: MeasurePage = serde_json::from_str(&format!(r#"{{"more":{raw}}}"#)).unwrap();
            assert_eq!(p.more, want, "{raw}");
        }
        let p: MeasurePage = serde_json::from_str("{}").unwrap();
        assert!(!p.more);
        assert!(p.measuregrps.is_empty());
    }

    #[test]
    fn test_intraday_series_keyed_by_epoch_strings_and_sparse() {
        let r: IntradayResponse = parse_envelope(
            br#"{"status":0,"body":{"series":{
              "1712720400":{"deviceid":"8923","model":"ScanWatch","model_id":93,"heart_rate":62},
              "1712720460":{"deviceid":"8923","model":"ScanWatch","model_id":93,"steps":14,"duration":60,"heart_rate":71},
              "1712720520":{"deviceid":null,"steps":3}}}}"#,
            Endpoint::Data,
        )
        .unwrap();
        assert_eq!(r.series.len(), 3);
        assert_eq!(r.series[&1712720400].values.get("heart_rate"), Some(&62.0));
        assert_eq!(r.series[&1712720400].model_id, Some(93));
        let sparse = &r.series[&1712720520];
        assert_eq!(sparse.values.get("heart_rate"), None);
        assert_eq!(sparse.values.get("steps"), Some(&3.0));
        assert_eq!(sparse.deviceid, None);
        // device fields are not data fields
        assert!(!r.series[&1712720460].values.contains_key("model_id"));
        assert_eq!(r.series[&1712720460].values.get("duration"), Some(&60.0));
    }

    #[test]
    fn test_intraday_empty_series_as_array_or_missing() {
        for body in [r#"{"series":[]}"#, "{}", r#"{"series":null}"#] {
            let r: IntradayResponse = serde_json::from_str(body).unwrap();
            assert!(r.series.is_empty(), "{body}");
        }
        assert!(serde_json::from_str::<IntradayResponse>(r#"{"series":{"x":{}}}"#).is_err());
    }

    // ---- chunking ----

    #[test]
    fn test_intraday_chunks_at_most_24h_and_contiguous() {
        let start = 1_700_000_000;
        let end = start + 3 * 86_400 + 5;
        let c = intraday_chunks(start, end);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].start_s, start);
        assert_eq!(c.last().unwrap().end_s, end);
        for w in &c {
            assert!(w.end_s - w.start_s <= INTRADAY_MAX_SPAN_SECONDS);
            assert!(w.end_s > w.start_s);
        }
        for pair in c.windows(2) {
            assert_eq!(pair[0].end_s, pair[1].start_s);
        }
    }

    #[test]
    fn test_intraday_chunks_edges() {
        assert!(intraday_chunks(10, 10).is_empty());
        assert!(intraday_chunks(10, 5).is_empty());
        assert_eq!(
            intraday_chunks(0, 86_400),
            vec![Window {
                start_s: 0,
                end_s: 86_400
            }]
        );
        assert_eq!(intraday_chunks(0, 86_401).len(), 2);
        assert_eq!(intraday_chunks(0, 1).len(), 1);
    }

    // ---- against a local server ----

    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        auth: Option<String>,
        form: HashMap<String, String>,
    }

    #[derive(Clone, Default)]
    struct Sim {
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Sim {
        fn record(&self, path: &str, headers: &HeaderMap, form: HashMap<String, String>) {
            self.seen.lock().unwrap().push(Seen {
                path: path.to_owned(),
                auth: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                form,
            });
        }
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn group(grpid: i64) -> Value {
        serde_json::json!({"grpid": grpid, "attrib": 0, "date": 1_690_000_000 + grpid, "modified": 1_690_000_100,
            "category": 1, "deviceid": "dev", "measures": [{"value": 72450, "type": 1, "unit": -3}],
            "modelid": 5, "model": "Body+", "comment": null})
    }

    async fn measure_handler(
        State(sim): State<Sim>,
        headers: HeaderMap,
        Form(form): Form<HashMap<String, String>>,
    ) -> impl IntoResponse {
        let offset: i64 = form.get("offset").map_or(0, |o| o.parse().unwrap());
        sim.record("/measure", &headers, form);
        // Three pages: grpids 1-2 (more:1, offset 2), 3-4 (more:true, offset 4), 5 (more:0).
        let body = match offset {
            0 => {
                serde_json::json!({"updatetime": 1000, "timezone": "Europe/Berlin", "more": 1, "offset": 2,
                "measuregrps": [group(1), group(2)]})
            }
            2 => {
                serde_json::json!({"updatetime": 1001, "timezone": "Europe/Berlin", "more": true, "offset": 4,
                "measuregrps": [group(3), group(4)]})
            }
            _ => {
                serde_json::json!({"updatetime": 1002, "timezone": "Europe/Berlin", "more": 0, "offset": 0,
                "measuregrps": [group(5)]})
            }
        };
        axum::Json(serde_json::json!({"status": 0, "body": body}))
    }

    async fn intraday_handler(
        State(sim): State<Sim>,
        headers: HeaderMap,
        Form(form): Form<HashMap<String, String>>,
    ) -> impl IntoResponse {
        let start: i64 = form["startdate"].parse().unwrap();
        let end: i64 = form["enddate"].parse().unwrap();
        sim.record("/v2/measure", &headers, form);
        // Like Withings: at most the first 24 h; a sample at both ends of the range (the
        // shared boundary of two chunks appears twice and must merge).
        let end = end.min(start + 86_400);
        let mut series = serde_json::Map::new();
        for t in [start, end] {
            series.insert(
                t.to_string(),
                serde_json::json!({"deviceid": "w", "model": "ScanWatch", "model_id": 93, "heart_rate": 60}),
            );
        }
        axum::Json(serde_json::json!({"status": 0, "body": {"series": series}}))
    }

    async fn oauth_handler(
        State(sim): State<Sim>,
        headers: HeaderMap,
        Form(form): Form<HashMap<String, String>>,
    ) -> impl IntoResponse {
        let ok = form.get("refresh_token").map(String::as_str) == Some("good")
            || form.get("code").map(String::as_str) == Some("code1");
        sim.record("/v2/oauth2", &headers, form);
        if ok {
            axum::Json(
                serde_json::json!({"status": 0, "body": {"userid": 363, "access_token": "new-a",
                "refresh_token": "new-r", "expires_in": 10800, "scope": "user.metrics", "token_type": "Bearer"}}),
            )
        } else {
            axum::Json(serde_json::json!({"status": 503, "body": {},
                "error": "Invalid Params: invalid refresh_token"}))
        }
    }

    async fn start_sim(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        format!("http://{addr}/")
    }

    async fn sim_client() -> (WithingsClient, Sim) {
        let sim = Sim::default();
        let router = Router::new()
            .route("/measure", post(measure_handler))
            .route("/v2/measure", post(intraday_handler))
            .route("/v2/oauth2", post(oauth_handler))
            .route(
                "/down",
                post(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "30")],
                        "busy",
                    )
                }),
            )
            .with_state(sim.clone());
        let base = start_sim(router).await;
        (WithingsClient::new(reqwest::Client::new(), base), sim)
    }

    struct CountingGate(AtomicUsize);

    impl RateGate for CountingGate {
        fn acquire(&self) -> crate::BoxFuture<'_, Result<(), GateError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn test_get_measures_follows_paging_and_sends_meastypes() {
        let (client, sim) = sim_client().await;
        let gate = Arc::new(CountingGate(AtomicUsize::new(0)));
        let client = client.with_rate_gate(gate.clone());
        let r = client
            .get_measures(
                "tok",
                &[9, 10, 11],
                CATEGORY_REAL,
                MeasureSelector::Window(Window {
                    start_s: 100,
                    end_s: 200,
                }),
            )
            .await
            .unwrap();
        let ids: Vec<i64> = r.measuregrps.iter().map(|g| g.grpid).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(r.updatetime, Some(1000));
        assert_eq!(r.timezone.as_deref(), Some("Europe/Berlin"));

        let seen = sim.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(gate.0.load(Ordering::SeqCst), 3, "one permit per request");
        for s in &seen {
            assert_eq!(s.path, "/measure");
            assert_eq!(s.auth.as_deref(), Some("Bearer tok"));
            assert_eq!(s.form["action"], "getmeas");
            assert_eq!(s.form["meastypes"], "9,10,11");
            assert!(!s.form.contains_key("meastype"));
            assert_eq!(s.form["category"], "1");
            assert_eq!(s.form["startdate"], "100");
            assert_eq!(s.form["enddate"], "200");
        }
        assert!(!seen[0].form.contains_key("offset"));
        assert_eq!(seen[1].form["offset"], "2");
        assert_eq!(seen[2].form["offset"], "4");
    }

    #[tokio::test]
    async fn test_get_measures_lastupdate_selector() {
        let (client, sim) = sim_client().await;
        client
            .get_measures(
                "tok",
                &[1],
                CATEGORY_REAL,
                MeasureSelector::LastUpdate(1234),
            )
            .await
            .unwrap();
        let s = &sim.seen()[0];
        assert_eq!(s.form["lastupdate"], "1234");
        assert!(!s.form.contains_key("startdate"));
        assert_eq!(s.form["meastypes"], "1");
    }

    #[tokio::test]
    async fn test_get_measures_paging_that_does_not_advance_is_an_error() {
        let router = Router::new().route(
            "/measure",
            post(|| async {
                axum::Json(serde_json::json!({"status": 0, "body": {"more": 1, "offset": 0, "measuregrps": []}}))
            }),
        );
        let client = WithingsClient::new(reqwest::Client::new(), start_sim(router).await);
        let e = client
            .get_measures("t", &[1], 1, MeasureSelector::LastUpdate(0))
            .await
            .unwrap_err();
        assert!(matches!(e, WithingsError::Decode(_)), "{e:?}");
    }

    #[tokio::test]
    async fn test_get_measures_maps_status_errors() {
        let router = Router::new().route(
            "/measure",
            post(|Form(form): Form<HashMap<String, String>>| async move {
                let status = if form.get("lastupdate").map(String::as_str) == Some("1") {
                    401
                } else {
                    601
                };
                axum::Json(serde_json::json!({"status": status, "body": {}, "error": "x"}))
            }),
        );
        let client = WithingsClient::new(reqwest::Client::new(), start_sim(router).await);
        let e = client
            .get_measures("t", &[1], 1, MeasureSelector::LastUpdate(1))
            .await
            .unwrap_err();
        assert!(matches!(e, WithingsError::InvalidToken { status: 401 }));
        let e = client
            .get_measures("t", &[1], 1, MeasureSelector::LastUpdate(2))
            .await
            .unwrap_err();
        assert!(matches!(e, WithingsError::RateLimited));
    }

    #[tokio::test]
    async fn test_intraday_requests_are_chunked_and_merged() {
        let (client, sim) = sim_client().await;
        let start = 1_712_700_000;
        let end = start + 2 * 86_400 + 600;
        let r = client
            .get_intraday("tok", start, end, &["heart_rate", "steps"])
            .await
            .unwrap();
        let seen = sim.seen();
        assert_eq!(seen.len(), 3);
        for s in &seen {
            assert_eq!(s.path, "/v2/measure");
            assert_eq!(s.form["action"], "getintradayactivity");
            assert_eq!(s.form["data_fields"], "heart_rate,steps");
            assert_eq!(s.auth.as_deref(), Some("Bearer tok"));
            let a: i64 = s.form["startdate"].parse().unwrap();
            let b: i64 = s.form["enddate"].parse().unwrap();
            assert!(b - a <= 86_400);
        }
        // Samples at start, the two inner chunk boundaries (each seen twice) and end.
        let keys: Vec<i64> = r.series.keys().copied().collect();
        assert_eq!(keys, vec![start, start + 86_400, start + 2 * 86_400, end]);
    }

    #[tokio::test]
    async fn test_refresh_token_and_exchange_code() {
        let (client, sim) = sim_client().await;
        let t = client.refresh_token("cid", "sec", "good").await.unwrap();
        assert_eq!(t.userid, "363");
        assert_eq!(t.refresh_token, "new-r");
        let s = &sim.seen()[0];
        assert_eq!(s.path, "/v2/oauth2");
        assert_eq!(s.auth, None);
        assert_eq!(s.form["action"], "requesttoken");
        assert_eq!(s.form["grant_type"], "refresh_token");
        assert_eq!(s.form["client_id"], "cid");
        assert_eq!(s.form["client_secret"], "sec");

        let e = client
            .refresh_token("cid", "sec", "revoked")
            .await
            .unwrap_err();
        assert!(matches!(e, WithingsError::InvalidGrant { status: 503, .. }));
        assert!(!e.is_retryable());

        let t = client
            .exchange_code("cid", "sec", "code1", "https://cb.example/withings")
            .await
            .unwrap();
        assert_eq!(t.access_token, "new-a");
        let s = &sim.seen()[2];
        assert_eq!(s.form["grant_type"], "authorization_code");
        assert_eq!(s.form["code"], "code1");
        assert_eq!(s.form["redirect_uri"], "https://cb.example/withings");
    }

    #[tokio::test]
    async fn test_non_200_http_status_is_transport_error_with_retry_after() {
        let (client, _sim) = sim_client().await;
        let e = client
            .post::<Value, &str>("/down", Some("t"), &[("action", "x")], Endpoint::Data)
            .await
            .unwrap_err();
        match e {
            WithingsError::Transport {
                http_status,
                retry_after_seconds,
            } => {
                assert_eq!(http_status, 503);
                assert_eq!(retry_after_seconds, Some(30));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
    }

    #[tokio::test]
    async fn test_connection_refused_is_retryable_http_error() {
        // Bind then drop a listener to get a port nobody listens on.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = WithingsClient::new(reqwest::Client::new(), format!("http://{addr}"));
        let e = client.refresh_token("a", "b", "c").await.unwrap_err();
        assert!(matches!(e, WithingsError::Http(_)), "{e:?}");
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn test_failing_rate_gate_aborts_before_request() {
        struct Broken;
        impl RateGate for Broken {
            fn acquire(&self) -> crate::BoxFuture<'_, Result<(), GateError>> {
                Box::pin(async { Err("bucket unreachable".into()) })
            }
        }
        let (client, sim) = sim_client().await;
        let client = client.with_rate_gate(Arc::new(Broken));
        let e = client
            .get_measures("t", &[1], 1, MeasureSelector::LastUpdate(0))
            .await
            .unwrap_err();
        assert!(matches!(e, WithingsError::RateGate(_)));
        assert!(sim.seen().is_empty());
    }

    #[test]
    fn test_base_url_trailing_slash_is_trimmed() {
        let c = WithingsClient::new(reqwest::Client::new(), "http://x/");
        assert_eq!(c.base_url(), "http://x");
    }
}
