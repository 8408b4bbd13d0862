//! Google Health API (v4) cloud simulator.
//!
//! An HTTP server that speaks the wire format of the Google Health API `v4` (research:
//! `google-health.md`; the successor of the Fitbit Web API): Google's OAuth 2.0 endpoints, the
//! data-point reads, `users.getIdentity`, the project-level subscriber API, the signed webhook
//! notifications it sends, and the Tink public keyset that verifies them. Everything is served on
//! one address. Used by the end-to-end tests and the demo.
//!
//! # OAuth 2.0 (Google Identity)
//!
//! * `GET /o/oauth2/v2/auth?client_id&redirect_uri&response_type=code&scope[&state]
//!   [&access_type=offline][&prompt=consent][&include_granted_scopes=true]
//!   [&code_challenge&code_challenge_method=S256]`, plus two test-only parameters: `user=<healthUserId>`
//!   (who logs in; default: the first user, by id, holding a grant of this `client_id`)
//!   and `grant=<space-separated scopes>` (granular consent: the user ticks only these; default
//!   all requested). Consents at once: `302 Location: redirect_uri?state=…&code=…&scope=<granted,
//!   space-separated>`. The code (`4/0A…`) lives 600 s, is single-use and is bound to the client,
//!   the redirect URI, the user, the granted scopes and the PKCE challenge. Errors shown on
//!   Google's own page (no redirect, JSON here): unknown `client_id` 401
//!   `{"error":"invalid_client","error_description":"The OAuth client was not found."}`; missing or
//!   non-http(s) `redirect_uri`, `response_type` other than `code`, a missing scope, a
//!   `code_challenge` whose method is not `S256`: 400 `{"error":"invalid_request",…}` (or
//!   `unsupported_response_type`); an unknown scope: 400 `{"error":"invalid_scope",…}`. Unknown user
//!   or an empty grant: `302 redirect_uri?error=access_denied&state=…`.
//!   Known scopes: `https://www.googleapis.com/auth/googlehealth.<family>[.readonly|.writeonly]`
//!   (families [`SCOPE_FAMILIES`]; the suffix-less spelling is the pre-mid-2026 read+write one and is
//!   accepted as a read scope), `https://www.googleapis.com/auth/cloud-platform`, `openid`,
//!   `email`, `profile`, `https://www.googleapis.com/auth/userinfo.email|userinfo.profile`.
//! * `POST /token`, `application/x-www-form-urlencoded`. Client authentication by form
//!   `client_id` + `client_secret` or HTTP Basic (Basic wins). A public client (registered with an
//!   empty secret) sends only `client_id`.
//!   * `grant_type=authorization_code&code&redirect_uri[&code_verifier]` → 200
//!     `{"access_token":"ya29.…","expires_in":3599,"refresh_token":"1//0…","scope":"<granted>",
//!     "token_type":"Bearer"[,"refresh_token_expires_in":604799]}`. `refresh_token` only with
//!     `access_type=offline` and either the first consent of this user for this client or
//!     `prompt=consent`; `refresh_token_expires_in` only for a client in testing mode.
//!   * `grant_type=refresh_token&refresh_token` → 200 `{"access_token","expires_in":3599,"scope",
//!     "token_type":"Bearer"[,"refresh_token_expires_in":<seconds left>]}`: **no** new refresh
//!     token; the old one keeps working (no rotation). In testing mode it dies 604799 s after it
//!     was issued (simulated clock).
//!   * Errors: 400 `{"error":"invalid_grant","error_description":"Token has been expired or
//!     revoked."}` (expired/revoked refresh token), `{"error":"invalid_grant","error_description":
//!     "Bad Request"}` (unknown/used/expired code, unknown refresh token), `…"Missing code
//!     verifier."` / `…"Invalid code verifier."` (PKCE), `{"error":"redirect_uri_mismatch",…}`,
//!     `{"error":"unauthorized_client",…}` (refresh token of another client),
//!     `{"error":"invalid_request",…}` (missing parameter, not a form, no client id),
//!     `{"error":"unsupported_grant_type",…}`; 401 `{"error":"invalid_client","error_description":
//!     "The OAuth client was not found."|"Unauthorized"}` (unknown client | wrong secret).
//! * `POST /revoke?token=…` (or form `token=`): an access or refresh token; revokes the whole
//!   grant (its refresh token and every access token from it) and forgets the consent. 200 `{}`;
//!   unknown token 400 `{"error":"invalid_token","error_description":"Token expired or revoked"}`.
//!
//! # Data API (`/v4/users/…`, `Authorization: Bearer <access token>` or `?access_token=`)
//!
//! * `GET /v4/users/me/identity` → `{"name":"users/me/identity","healthUserId":"…"
//!   [,"legacyUserId":"…"]}`.
//! * `GET /v4/users/me/dataTypes/{kebab}/dataPoints?filter&pageSize&pageToken` →
//!   `{"dataPoints":[DataPoint…],"nextPageToken":"…"}`; points served verbatim as seeded, ordered
//!   by start time descending (ties: by `name` descending); `nextPageToken` omitted on the last page
//!   (or `""` with the `empty_next_page_token` quirk); an empty page is exactly `{}`. `pageSize`
//!   default 1440, max 10000 (sleep and exercise: 25 and 25), larger values truncated, negative
//!   400 `INVALID_PAGE_SIZE`. Page tokens are opaque, bound to the method, data type, filter and
//!   source family (else 400 `INVALID_PAGE_TOKEN`) and resume after the last point returned (key
//!   set, so inserting points between pages does not shift them).
//! * `GET …/dataPoints:reconcile?filter&pageSize&pageToken&dataSourceFamily` → `{"dataPoints":
//!   [ReconciledDataPoint…],"nextPageToken"}`: each point without `dataSource`, `name` renamed
//!   `dataPointName` (omitted when the point has no name). `dataSourceFamily` =
//!   `users/me/dataSourceFamilies/all-sources` (default) | `google-wearables` (`dataSource.platform`
//!   `FITBIT` or a wearable `device.formFactor`) | `google-sources` (`platform` `FITBIT`, `FIT` or
//!   `NEST`); else 400 `INVALID_DATA_POINT_DATA_SOURCE_FAMILY`.
//! * `GET …/dataPoints/{id}` (types with `get`) → the stored point whose `name` ends in
//!   `/dataPoints/{id}`, else 404 `RESOURCE_NOT_FOUND`.
//! * `POST …/dataPoints:dailyRollUp` (types with `dailyRollUp`) `{"range":{"start":{"date":
//!   {"year","month","day"}[,"time":{}]},"end":{…}}[,"windowSizeDays":1][,"dataSourceFamily"]
//!   [,"pageSize"][,"pageToken"]}` (lowerCamel or snake_case names; `range` closed-open, whole
//!   civil days) → `{"rollupDataPoints":[{"civilStartTime":{"date":{…},"time":{}},
//!   "civilEndTime":{…},"<key>":<RollupValue>}…]}`, one row per window of `windowSizeDays`
//!   (default 1) civil days counted from the range start (the last one cut at the range end),
//!   ascending; a point counts in the window holding its civil start date (its `civilStartTime` /
//!   `civilTime`, else instant + offset) and is in `dataSourceFamily` (as for reconcile);
//!   windows without points are omitted, no row is exactly `{}`, and there is never a
//!   `nextPageToken` (`pageToken` is ignored). Values (proto3 JSON, zero fields omitted):
//!   `steps`/`floors` `{"countSum":"<int64>"}`, `distance` `millimetersSum`, `altitude`
//!   `gainMillimetersSum`, `swim-lengths-data` `strokeCountSum`, `active-zone-minutes`
//!   `sumIn{FatBurn,Cardio,Peak}HeartZone` (int64 strings); `active-energy-burned` `kcalSum`;
//!   `heart-rate` `beatsPerMinuteAvg/Min/Max`, `core-body-temperature` `temperatureCelsiusAvg/
//!   Min/Max`, `run-vo2-max` `rateAvg/Min/Max`, `weight` `weightGramsAvg`, `body-fat`
//!   `bodyFatPercentageAvg`, `blood-glucose` `bloodGlucoseMilligramsPerDeciliterAvg` (doubles,
//!   integral ones without a fraction); `sedentary-period` `durationSum`; `active-minutes`
//!   `activeMinutesRollupByActivityLevel[{activityLevel,activeMinutesSum}]`;
//!   `time-in-heart-rate-zone` `timeInHeartRateZones[{heartRateZone,duration}]` (summed interval
//!   lengths). Other `dailyRollUp` types (`total-calories`, `calories-in-heart-rate-zone`,
//!   `hydration-log`, `nutrition-log`, `basal-energy-burned`): 501 `UNIMPLEMENTED`. Errors (400):
//!   a body the transcoder refuses (not JSON, unknown field, wrong type) `INVALID_ARGUMENT`
//!   "Invalid JSON payload received. …" with only a `BadRequest` detail; `windowSizeDays` < 0, or a
//!   range bound with a time of day, `INVALID_ROLLUP_WINDOW`; `pageSize` < 0
//!   `INVALID_PAGE_SIZE`; more windows (⌈days/window⌉, or an explicit `pageSize`) than
//!   ⌊cap/window⌋ `INVALID_ROLLUP_QUERY_DURATION` (cap 14 days for `heart-rate`,
//!   `active-minutes`, `total-calories`, `calories-in-heart-rate-zone`; 90 otherwise); `pageSize`
//!   below ⌈days/window⌉ `INVALID_DATA_POINT_NAME` (as measured); a bad `dataSourceFamily`
//!   `INVALID_DATA_POINT_DATA_SOURCE_FAMILY`; no range or bound
//!   `INVALID_TIME_RANGE_INTERVAL_FORMAT`; an impossible date or time `INVALID_CIVIL_DATE_TIME`;
//!   end not after start `INVALID_TIME_RANGE`. Method scopes: any `.readonly` of
//!   `activity_and_fitness`, `health_metrics_and_measurements`, `location`, `nutrition`, `sleep`
//!   (no write scope). The body is read after every check below, in the order listed there.
//! * `POST …:rollUp|:batchDelete`, `POST …/dataPoints`, `PATCH …/dataPoints/{id}`: 501
//!   `UNIMPLEMENTED` (not simulated).
//! * Filters (AIP-160 subset; members `{filter_name}.{member}`, quoted literals): interval types
//!   `interval.start_time` (RFC 3339) / `interval.civil_start_time` (`YYYY-MM-DD[THH:mm:ss]`);
//!   sample types `sample_time.physical_time` / `sample_time.civil_time`; daily types `date`
//!   (`YYYY-MM-DD`); sessions `interval.civil_start_time` only, except `sleep`
//!   (`interval.end_time` / `interval.civil_end_time`, and `OR` allowed) and `electrocardiogram`
//!   (`interval.start_time` with `>=` only). Comparators `>=` and `<`, joined by `AND`;
//!   parentheses allowed. Civil times absent from a point are derived from instant + offset.
//!   Errors: 400 `INVALID_ARGUMENT` with the catalogue reasons `INVALID_DATA_POINT_FILTER_*`.
//! * Checks, in order: 401 `UNAUTHENTICATED` (`CREDENTIALS_MISSING` without a token,
//!   `ACCESS_TOKEN_EXPIRED` for an expired one, `ACCESS_TOKEN_TYPE_UNSUPPORTED` for an unknown or
//!   revoked one); 429 `RESOURCE_EXHAUSTED` (per-user limit, `Retry-After: <s>` unless switched
//!   off); 403 `ACCESS_TOKEN_SCOPE_INSUFFICIENT` (none of the method's scopes); 403
//!   `DISALLOWED_OAUTH_SCOPES` (token carries `cloud-platform`); 400 bare `INVALID_ARGUMENT`
//!   ("Request contains an invalid argument.", no details) for a user segment other than `me` on
//!   list/reconcile/dailyRollUp (get/identity also accept the caller's own id; another id is
//!   403 bare `PERMISSION_DENIED`); 400 `INVALID_PARENT_DATA_TYPE_COLLECTION` (unknown or
//!   camelCase type, with a `google.rpc.BadRequest` detail); 400 `UNSUPPORTED_DATA_TYPE_ACTION`;
//!   403 `MISSING_OAUTH_SCOPE` (a method scope, but not the data type's family); 400
//!   `FAILED_PRECONDITION` `ACCOUNT_NOT_LINKED`; then parameters (or the `dailyRollUp` body).
//! * Error envelope (`google.rpc.Status`): `{"error":{"code":403,"message":"…","status":
//!   "PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":
//!   "MISSING_OAUTH_SCOPE","domain":"health.googleapis.com","metadata":{"dataType":"heart-rate"}}]}}`.
//!   Health-service reasons use domain `health.googleapis.com`; Google front-end reasons (401s,
//!   `ACCESS_TOKEN_SCOPE_INSUFFICIENT`, `RATE_LIMIT_EXCEEDED`) use `googleapis.com` (401/403 with
//!   metadata `{"service":"health.googleapis.com","method":"<rpc>"}`); `IAM_PERMISSION_DENIED`
//!   uses `iam.googleapis.com`. A 429 also carries a `google.rpc.QuotaFailure` detail. A
//!   project's service-account token used on `/v4/users` is 403 `DISALLOWED_OAUTH_SCOPES`.
//!
//! # Subscribers (`/v4/projects/{number}/subscribers`, service-account Bearer token)
//!
//! * `POST …/subscribers[?subscriberId=…]` `{"endpointUri","subscriberConfigs":[{"dataTypes":[…],
//!   "subscriptionCreatePolicy":"AUTOMATIC"|"MANUAL"}],"endpointAuthorization":{"secret":"Bearer …"}}`
//!   runs the verification handshake (POST `{"type":"verification"}`, `Content-Type:
//!   application/json`, `User-Agent: Google-Health-API-Webhooks-Verifier`: first with
//!   `Authorization: <secret>`, expecting 200 or 201; then without it, expecting 401 or 403; else 400
//!   `FAILED_PRECONDITION`) and answers `{"name":"operations/<uuid>","done":true,"response":{"@type":
//!   "type.googleapis.com/google.devicesandservices.health.v4.Subscriber",<Subscriber>}}` (a bare
//!   Subscriber with the `bare_subscriber` quirk). Subscriber: `{"name":"projects/{n}/subscribers/{id}",
//!   "endpointUri","subscriberConfigs","endpointAuthorization":{"secretSet":true},"state":"ACTIVE",
//!   "createTime","updateTime"}`.
//! * `GET …/subscribers[?pageSize&pageToken]` → `{"subscribers":[…],"totalSize":n[,"nextPageToken"]}`
//!   (`{}` when none). `DELETE …/subscribers/{id}` → `{"name":"operations/<uuid>","done":true,
//!   "response":{"@type":"type.googleapis.com/google.protobuf.Empty"}}`; 404 `NOT_FOUND` if unknown.
//! * Auth: no/unknown token 401; a user token 403 `ACCESS_TOKEN_SCOPE_INSUFFICIENT`; a
//!   non-numeric project 403 bare `PERMISSION_DENIED`; another project's token 403
//!   `IAM_PERMISSION_DENIED`.
//!
//! # Webhook notifications (sent by the simulator)
//!
//! `POST <endpointUri>`, `Content-Type: application/json`, `User-Agent: Google-Health-API-Webhooks`,
//! `Authorization: <secret>`, `GOOGLE-HEALTH-API-SIGNATURE: <sig>` (or `X-HEALTHAPI-SIGNATURE`),
//! body a JSON array of up to 99 `{"data":{"version":"1","clientProvidedSubscriptionName":"<uuid v4,
//! new for each notification>","healthUserId","operation":"UPSERT"|"DELETE","dataType":"<kebab>",
//! "intervals":[{"physicalTimeInterval":{"startTime","endTime"},"civilDateTimeInterval":
//! {"startDateTime":{"date":{…},"time":{…}},"endDateTime":{…}},"civilIso8601TimeInterval":
//! {"startTime":"YYYY-MM-DDTHH:MM:SS[.f]","endTime":…}}]}}` (a single object per POST with the
//! `single_object` quirk). `sig` = standard base64 (padded) of `0x01 ‖ keyId (u32 big-endian) ‖
//! DER ECDSA-P256-SHA256(raw body bytes)`. Only HTTP 204 acknowledges; anything else (or a timeout)
//! is retried after 1 s, 2 s, 4 s, 8 s (`retry_base_ms` × 2ⁿ), 5 attempts in all, then dropped.
//!
//! `GET /googlehealthapi/webhooks/webhooks_public_keyset.json` → Tink JSON keyset `{"primaryKeyId":
//! id,"key":[{"keyData":{"typeUrl":"type.googleapis.com/google.crypto.tink.EcdsaPublicKey","value":
//! "<base64 EcdsaPublicKey>","keyMaterialType":"ASYMMETRIC_PUBLIC"},"status":"ENABLED","keyId":id,
//! "outputPrefixType":"TINK"}]}`. `EcdsaPublicKey` protobuf as Google publishes it: field 1
//! (version 0) omitted as proto3 does; field 2 params `{hash_type=3 SHA256, curve=2 NIST_P256,
//! encoding=2 DER}` (`12 06 08 03 10 02 18 02`); field 3 x and field 4 y, each 33 bytes with a
//! leading `0x00`.
//!
//! The JSON test-control API lives under `/_sim` (see [`router`]).

mod catalogue;
mod control;
mod data;
mod errors;
mod filter;
mod oauth;
mod points;
mod rollup;
mod state;
mod subscribers;
mod time;
mod webhooks;

pub use catalogue::{DATA_TYPES, DataType, Shape, scope_url};
pub use state::SimState;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get, post};
use serde::{Deserialize, Serialize};

use control::{
    keyset, sim_apps, sim_clock_advance, sim_delete_points, sim_expire_access, sim_get_config,
    sim_notify, sim_projects, sim_revoke_tokens, sim_rotate, sim_seed, sim_set_config, sim_stats,
    sim_users,
};
use data::v4;
use oauth::{authorize, revoke, token};

use crate::sim_support::{serve_router, sim_health};

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// `expires_in` of an access token (it is valid for exactly this long).
pub const ACCESS_TOKEN_LIFETIME_SECS: i64 = 3_599;
/// `refresh_token_expires_in` of a refresh token issued to a client in testing mode; it dies
/// this many seconds after issuance (simulated clock).
pub const TESTING_REFRESH_LIFETIME_SECS: i64 = 604_799;
/// Lifetime of an authorization code.
pub const AUTHORIZATION_CODE_LIFETIME_SECS: i64 = 600;
/// Prefix of every Google Health scope.
pub const SCOPE_PREFIX: &str = "https://www.googleapis.com/auth/googlehealth.";
/// The project-level scope (subscriber management only).
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Scope families (`googlehealth.<family>[.readonly|.writeonly]`).
pub const SCOPE_FAMILIES: &[&str] = &[
    "activity_and_fitness",
    "health_metrics_and_measurements",
    "sleep",
    "ecg",
    "irn",
    "location",
    "nutrition",
    "profile",
    "settings",
    "logged_symptoms",
    "mindfulness",
    "reproductive_health",
];
/// Families whose `.readonly` scope a user seeded by `/_sim/users` gets by default.
pub const DEFAULT_READ_FAMILIES: &[&str] = &[
    "activity_and_fitness",
    "health_metrics_and_measurements",
    "sleep",
    "ecg",
    "irn",
    "location",
    "nutrition",
    "profile",
    "settings",
];
/// Default signature header.
pub const SIGNATURE_HEADER: &str = "GOOGLE-HEALTH-API-SIGNATURE";
/// The older signature header spelling.
pub const LEGACY_SIGNATURE_HEADER: &str = "X-HEALTHAPI-SIGNATURE";
/// Path of the Tink public keyset.
pub const KEYSET_PATH: &str = "/googlehealthapi/webhooks/webhooks_public_keyset.json";
/// `typeUrl` of the keys in the keyset.
pub const ECDSA_PUBLIC_KEY_TYPE_URL: &str = "type.googleapis.com/google.crypto.tink.EcdsaPublicKey";
/// Most notifications in one POST.
pub const MAX_BATCH: usize = 99;
/// User-Agent of notifications.
pub const NOTIFICATION_USER_AGENT: &str = "Google-Health-API-Webhooks";
/// User-Agent of the verification probes.
pub const VERIFIER_USER_AGENT: &str = "Google-Health-API-Webhooks-Verifier";
/// Timeout of one verification probe.
pub const VERIFICATION_TIMEOUT: Duration = Duration::from_secs(10);

const DOMAIN_HEALTH: &str = "health.googleapis.com";
const DOMAIN_GOOGLEAPIS: &str = "googleapis.com";
const SERVICE: &str = "health.googleapis.com";
const RPC_PREFIX: &str = "google.devicesandservices.health.v4.";
const TYPE_ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const TYPE_BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";
const TYPE_QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";
const TYPE_SUBSCRIBER: &str = "type.googleapis.com/google.devicesandservices.health.v4.Subscriber";
const TYPE_EMPTY: &str = "type.googleapis.com/google.protobuf.Empty";
const MSG_INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const MSG_MISSING_CREDENTIALS: &str = "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const MSG_INVALID_ARGUMENT: &str = "Request contains an invalid argument.";
const MSG_PERMISSION_DENIED: &str = "The caller does not have permission";
const INVALID_GRANT: &str = "invalid_grant";
const INVALID_REQUEST: &str = "invalid_request";
const INVALID_CLIENT: &str = "invalid_client";
const EXPIRED_OR_REVOKED: &str = "Token has been expired or revoked.";
const DEFAULT_PAGE_SIZE: usize = 1_440;
const MAX_PAGE_SIZE: usize = 10_000;
const SESSION_PAGE_SIZE: usize = 25;
const SUBSCRIBER_DEFAULT_PAGE: usize = 50;
const SUBSCRIBER_MAX_PAGE: usize = 1_000;

// ---------------------------------------------------------------------------
// Public configuration and seeds
// ---------------------------------------------------------------------------

/// Simulator settings; all of them can be changed at run time with `POST /_sim/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// `/v4/users/…` calls allowed per user per 60 s sliding window (simulated clock); 0 = off.
    pub rate_limit_per_user: usize,
    /// Send `Retry-After` with a 429.
    pub retry_after: bool,
    /// Send each notification as a single JSON object instead of a batch array.
    pub single_object: bool,
    /// Name of the signature header.
    pub signature_header: String,
    /// Send every delivered notification POST a second time.
    pub duplicate: bool,
    /// Send `Authorization: <secret>` with notifications (one community report says it is missing).
    pub send_authorization: bool,
    /// Sign the verification probes too.
    pub sign_verification: bool,
    /// First retry delay in ms; doubles with each attempt.
    pub retry_base_ms: u64,
    /// Delivery attempts per notification POST (first one included).
    pub max_attempts: u32,
    /// Timeout of one notification attempt in ms.
    pub delivery_timeout_ms: u64,
    /// Most notifications per POST (1..=99).
    pub max_batch: usize,
    /// Answer subscriber creation with a bare `Subscriber` instead of an `Operation`.
    pub bare_subscriber: bool,
    /// Reproduce the live pagination defect: a page starts strictly before the start time of the
    /// previous page's last point, dropping points that share it.
    pub drop_ties: bool,
    /// Send `"nextPageToken": ""` on the last page instead of omitting it.
    pub empty_next_page_token: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            rate_limit_per_user: 300,
            retry_after: true,
            single_object: false,
            signature_header: SIGNATURE_HEADER.to_owned(),
            duplicate: false,
            send_authorization: true,
            sign_verification: false,
            retry_base_ms: 1_000,
            max_attempts: 5,
            delivery_timeout_ms: 10_000,
            max_batch: MAX_BATCH,
            bare_subscriber: false,
            drop_ties: false,
            empty_next_page_token: false,
        }
    }
}

/// An OAuth client. Also the body of `POST /_sim/apps`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppSeed {
    /// Client id.
    pub client_id: String,
    /// Client secret; empty for a public (PKCE-only) client.
    #[serde(default)]
    pub client_secret: String,
    /// Consent screen in "Testing": refresh tokens die after 7 days.
    #[serde(default)]
    pub testing: bool,
}

/// A user to create. Also the body of `POST /_sim/users`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserSeed {
    /// Google Health user id.
    #[serde(rename = "healthUserId")]
    pub health_user_id: String,
    /// Legacy Fitbit user id (omitted from the identity when absent).
    #[serde(rename = "legacyUserId", default)]
    pub legacy_user_id: Option<String>,
    /// `false`: every data call answers 400 `ACCOUNT_NOT_LINKED` (default true).
    #[serde(default)]
    pub linked: Option<bool>,
    /// With a client id, the app is registered (or updated) and tokens are minted.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Secret of that app.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Testing mode of that app.
    #[serde(default)]
    pub testing: Option<bool>,
    /// Granted scopes (full URLs or short `family.readonly` forms); default every `.readonly`
    /// data scope of [`DEFAULT_READ_FAMILIES`].
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Initial access token (generated if absent).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Initial refresh token (generated if absent).
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Lifetime of the initial access token in seconds (default 3599).
    #[serde(default)]
    pub expires_in: Option<i64>,
}

/// Answer of `POST /_sim/users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTokens {
    /// Google Health user id.
    #[serde(rename = "healthUserId")]
    pub health_user_id: String,
    /// Access token (absent without a client id).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub access_token: Option<String>,
    /// Refresh token (absent without a client id).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refresh_token: Option<String>,
    /// Access token lifetime in seconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_in: Option<i64>,
    /// Granted scopes, space-separated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scope: Option<String>,
}

/// Why points could not be stored or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No such user.
    UnknownUser(String),
    /// Not a data type of the catalogue.
    UnknownDataType(String),
    /// A point lacks its union key or time (nothing was stored).
    InvalidPoint(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownUser(u) => write!(f, "unknown user {u}"),
            Self::UnknownDataType(t) => write!(f, "unknown data type {t:?}"),
            Self::InvalidPoint(why) => write!(f, "invalid point: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

/// Builds the router: the Google endpoints (see the module doc) plus the `/_sim` control API.
///
/// Control routes (JSON bodies, not Google; errors are `{"error":"<text>"}` with 400 for a bad
/// body, 404 for an unknown user, 409 when nothing can be notified):
/// * `POST /_sim/apps` `{"client_id","client_secret"?,"testing"?}` → `{"client_id","testing"}`:
///   registers or updates an OAuth client (`testing`: refresh tokens die after 7 days);
/// * `POST /_sim/users` `{"healthUserId","legacyUserId"?,"linked"?(true),"client_id"?,
///   "client_secret"?,"testing"?,"scopes"?[…],"access_token"?,"refresh_token"?,"expires_in"?}` →
///   `{"healthUserId"[,"access_token","refresh_token","expires_in","scope"]}`: creates or updates
///   the user (points kept); with `client_id` also registers the app and mints a grant (default
///   scopes: every `.readonly` data scope; short forms like `"sleep.readonly"` accepted);
/// * `POST /_sim/users/{id}/dataPoints` `{"dataType":"steps","points":[<DataPoint>…]}` →
///   `{"stored":n,"notifications":k}`: stores the points verbatim (all or nothing; each needs its
///   union member and time, and a name for untimed types); a point replaces the stored one with
///   the same `name`, or, unnamed, the one with the same start time; queues one UPSERT
///   notification spanning them for each subscriber of the type;
/// * `DELETE /_sim/users/{id}/dataPoints` `{"dataType","names"?:[…],"startTimes"?:[RFC 3339 or
///   YYYY-MM-DD]}` → `{"deleted":n}`; queues a DELETE notification when something was removed;
/// * `DELETE /_sim/users/{id}/tokens` → `{"revoked":n}` (every grant of the user);
/// * `POST /_sim/users/{id}/expire-access` → `{"expired":n}` (refresh still works);
/// * `POST /_sim/projects` `{"number":"123456","token":"sa-token"}`: the token is a service-account
///   token of that project;
/// * `GET /_sim/config`, `POST /_sim/config` (partial [`SimConfig`], unknown keys 400) → the config;
/// * `POST /_sim/keys/rotate` `{"drop_old"?:false}` → `{"primaryKeyId","keyIds":[…]}`;
/// * `POST /_sim/notify` `{"healthUserId","dataType","operation"?("UPSERT"),"start","end"?,
///   "utcOffset"?("0s"),"tamper"?("body"|"signature"|"unknown_key"),"subscriber"?}` →
///   `{"status":<first HTTP status or null>,"delivered":bool,"results":[{"subscriber","status",
///   "delivered"[,"error"]}]}`: sends one notification at once to every subscriber of the type (or
///   the named one); untampered failures are retried in the background, tampered sends are not;
/// * `POST /_sim/clock/advance` `{"seconds":N}` → `{"now":<epoch s>,"time":"…Z"}`;
/// * `GET /_sim/stats` → `{"users":{id:{"requests","by_data_type","refreshes","code_exchanges",
///   "rate_limited"}},"notifications":{"attempts","delivered","notifications_delivered",
///   "dropped","pending","by_status":{"204":n,…,"error":n}},"verifications":{"attempts",
///   "passed"},"unauthorized"}`;
/// * `GET /_sim/health` → `{"status":"ok"}`.
pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/o/oauth2/v2/auth", get(authorize))
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route(KEYSET_PATH, get(keyset))
        .route("/v4/{*rest}", any(v4))
        .route("/_sim/apps", post(sim_apps))
        .route("/_sim/users", post(sim_users))
        .route(
            "/_sim/users/{id}/dataPoints",
            post(sim_seed).delete(sim_delete_points),
        )
        .route(
            "/_sim/users/{id}/tokens",
            axum::routing::delete(sim_revoke_tokens),
        )
        .route("/_sim/users/{id}/expire-access", post(sim_expire_access))
        .route("/_sim/projects", post(sim_projects))
        .route("/_sim/config", get(sim_get_config).post(sim_set_config))
        .route("/_sim/keys/rotate", post(sim_rotate))
        .route("/_sim/notify", post(sim_notify))
        .route("/_sim/clock/advance", post(sim_clock_advance))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/health", get(sim_health))
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown` completes.
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
    serve_router("google-health-sim", listener, router(state), shutdown).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
