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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{
    DateTime, Datelike as _, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeDelta,
    Timelike as _, Utc,
};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer as _;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, Notify};

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
/// Rate-limit window.
const RATE_WINDOW_MS: i64 = 60_000;
const DEFAULT_PAGE_SIZE: usize = 1_440;
const MAX_PAGE_SIZE: usize = 10_000;
const SESSION_PAGE_SIZE: usize = 25;
const SUBSCRIBER_DEFAULT_PAGE: usize = 50;
const SUBSCRIBER_MAX_PAGE: usize = 1_000;

// ---------------------------------------------------------------------------
// Data type catalogue
// ---------------------------------------------------------------------------

/// The time shape of a data type's points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `sampleTime{physicalTime, utcOffset, civilTime}`.
    Sample,
    /// `interval{startTime, startUtcOffset, endTime, endUtcOffset, civilStartTime, civilEndTime}`.
    Interval,
    /// A session `interval` (same fields).
    Session,
    /// `date{year, month, day}`.
    Daily,
    /// No time (food, roll-up-only types).
    Untimed,
}

const OP_LIST: u8 = 1;
const OP_GET: u8 = 2;
const OP_RECONCILE: u8 = 4;
const OP_ROLLUP: u8 = 8;
const OP_DAILY_ROLLUP: u8 = 16;
const OP_WRITE: u8 = 32;
const L_RC: u8 = OP_LIST | OP_RECONCILE;
const L_RC_RU: u8 = OP_LIST | OP_RECONCILE | OP_ROLLUP | OP_DAILY_ROLLUP;

/// A data type of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataType {
    /// Kebab-case id used in URLs and notifications (`heart-rate`).
    pub id: &'static str,
    /// camelCase union key in a DataPoint (`heartRate`).
    pub key: &'static str,
    /// Time shape.
    pub shape: Shape,
    ops: u8,
    /// Scope family that grants reading it.
    pub family: &'static str,
    /// Whether subscribers may name it (Google sends no webhooks for ECG, IRN, total-calories).
    pub webhook: bool,
}

const ACT: &str = "activity_and_fitness";
const HM: &str = "health_metrics_and_measurements";

const fn dt(
    id: &'static str,
    key: &'static str,
    shape: Shape,
    ops: u8,
    family: &'static str,
) -> DataType {
    DataType {
        id,
        key,
        shape,
        ops,
        family,
        webhook: true,
    }
}

const fn no_webhook(mut t: DataType) -> DataType {
    t.webhook = false;
    t
}

/// Data types: ids and operations from `data-types.json`, shapes from the Discovery document,
/// scope families from the Scopes page.
pub const DATA_TYPES: &[DataType] = &[
    dt(
        "active-energy-burned",
        "activeEnergyBurned",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "active-minutes",
        "activeMinutes",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "active-zone-minutes",
        "activeZoneMinutes",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "activity-level",
        "activityLevel",
        Shape::Interval,
        L_RC,
        ACT,
    ),
    dt("altitude", "altitude", Shape::Interval, L_RC_RU, ACT),
    dt(
        "basal-energy-burned",
        "basalEnergyBurned",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "blood-glucose",
        "bloodGlucose",
        Shape::Sample,
        L_RC_RU | OP_GET,
        HM,
    ),
    dt(
        "body-fat",
        "bodyFat",
        Shape::Sample,
        L_RC_RU | OP_GET | OP_WRITE,
        HM,
    ),
    dt(
        "calories-in-heart-rate-zone",
        "caloriesInHeartRateZone",
        Shape::Untimed,
        OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    ),
    dt(
        "core-body-temperature",
        "coreBodyTemperature",
        Shape::Sample,
        L_RC_RU | OP_GET,
        HM,
    ),
    dt(
        "daily-heart-rate-variability",
        "dailyHeartRateVariability",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-heart-rate-zones",
        "dailyHeartRateZones",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-oxygen-saturation",
        "dailyOxygenSaturation",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-respiratory-rate",
        "dailyRespiratoryRate",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-resting-heart-rate",
        "dailyRestingHeartRate",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-sleep-temperature-derivations",
        "dailySleepTemperatureDerivations",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt("daily-vo2-max", "dailyVo2Max", Shape::Daily, L_RC, ACT),
    dt("distance", "distance", Shape::Interval, L_RC_RU, ACT),
    no_webhook(dt(
        "electrocardiogram",
        "electrocardiogram",
        Shape::Session,
        OP_LIST,
        "ecg",
    )),
    dt(
        "exercise",
        "exercise",
        Shape::Session,
        L_RC | OP_GET | OP_WRITE,
        ACT,
    ),
    dt(
        "floors",
        "floors",
        Shape::Interval,
        OP_RECONCILE | OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    ),
    dt(
        "food",
        "food",
        Shape::Untimed,
        OP_LIST | OP_GET,
        "nutrition",
    ),
    dt(
        "food-measurement-unit",
        "foodMeasurementUnit",
        Shape::Untimed,
        OP_LIST | OP_GET,
        "nutrition",
    ),
    dt("heart-rate", "heartRate", Shape::Sample, L_RC_RU, HM),
    dt(
        "heart-rate-variability",
        "heartRateVariability",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt(
        "height",
        "height",
        Shape::Sample,
        L_RC | OP_GET | OP_WRITE,
        HM,
    ),
    dt(
        "hydration-log",
        "hydrationLog",
        Shape::Session,
        L_RC_RU | OP_GET | OP_WRITE,
        "nutrition",
    ),
    no_webhook(dt(
        "irregular-rhythm-notification",
        "irregularRhythmNotification",
        Shape::Session,
        OP_LIST,
        "irn",
    )),
    dt(
        "menstrual-period",
        "menstrualPeriod",
        Shape::Interval,
        OP_WRITE,
        "reproductive_health",
    ),
    dt("moods", "moods", Shape::Sample, OP_WRITE, "mindfulness"),
    dt(
        "nutrition-log",
        "nutritionLog",
        Shape::Session,
        L_RC_RU | OP_GET | OP_WRITE,
        "nutrition",
    ),
    dt(
        "ovulation-test",
        "ovulationTest",
        Shape::Sample,
        OP_WRITE,
        "reproductive_health",
    ),
    dt(
        "oxygen-saturation",
        "oxygenSaturation",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt(
        "respiratory-rate-sleep-summary",
        "respiratoryRateSleepSummary",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt("run-vo2-max", "runVo2Max", Shape::Sample, L_RC_RU, ACT),
    dt(
        "sedentary-period",
        "sedentaryPeriod",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "sleep",
        "sleep",
        Shape::Session,
        L_RC | OP_GET | OP_WRITE,
        "sleep",
    ),
    dt("steps", "steps", Shape::Interval, L_RC_RU, ACT),
    dt(
        "swim-lengths-data",
        "swimLengthsData",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "symptoms",
        "symptoms",
        Shape::Sample,
        OP_WRITE,
        "logged_symptoms",
    ),
    dt(
        "time-in-heart-rate-zone",
        "timeInHeartRateZone",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    no_webhook(dt(
        "total-calories",
        "totalCalories",
        Shape::Untimed,
        OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    )),
    dt("vo2-max", "vo2Max", Shape::Sample, L_RC, ACT),
    dt(
        "weight",
        "weight",
        Shape::Sample,
        L_RC_RU | OP_GET | OP_WRITE,
        HM,
    ),
];

impl DataType {
    /// The type by its kebab-case id (exact).
    pub fn by_id(id: &str) -> Option<&'static Self> {
        DATA_TYPES.iter().find(|t| t.id == id)
    }

    /// The snake_case name used in filters (`heart_rate`).
    pub fn filter_name(&self) -> String {
        self.id.replace('-', "_")
    }

    fn supports(&self, op: u8) -> bool {
        self.ops & op != 0
    }

    fn page_limits(&self) -> (usize, usize) {
        if matches!(self.id, "sleep" | "exercise") {
            (SESSION_PAGE_SIZE, SESSION_PAGE_SIZE)
        } else {
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        }
    }
}

/// Full URL of a scope from its short form (`sleep.readonly`); full URLs and the OpenID scopes
/// pass unchanged.
pub fn scope_url(s: &str) -> String {
    let known_short = SCOPE_FAMILIES.iter().any(|f| {
        s == *f
            || s.strip_prefix(f)
                .is_some_and(|r| r == ".readonly" || r == ".writeonly")
    });
    if known_short {
        format!("{SCOPE_PREFIX}{s}")
    } else if s == "cloud-platform" {
        CLOUD_PLATFORM_SCOPE.to_owned()
    } else {
        s.to_owned()
    }
}

fn is_known_scope(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix(SCOPE_PREFIX) {
        let family = rest
            .strip_suffix(".readonly")
            .or_else(|| rest.strip_suffix(".writeonly"))
            .unwrap_or(rest);
        return SCOPE_FAMILIES.contains(&family);
    }
    matches!(
        s,
        CLOUD_PLATFORM_SCOPE
            | "openid"
            | "email"
            | "profile"
            | "https://www.googleapis.com/auth/userinfo.email"
            | "https://www.googleapis.com/auth/userinfo.profile"
    )
}

/// Whether `scopes` allow reading data of `family` (`.readonly` or the legacy suffix-less scope).
fn reads_family(scopes: &[String], family: &str) -> bool {
    scopes.iter().any(|s| {
        s.strip_prefix(SCOPE_PREFIX)
            .is_some_and(|r| r == family || r.strip_suffix(".readonly") == Some(family))
    })
}

fn writes_family(scopes: &[String], family: &str) -> bool {
    scopes.iter().any(|s| {
        s.strip_prefix(SCOPE_PREFIX)
            .is_some_and(|r| r == family || r.strip_suffix(".writeonly") == Some(family))
    })
}

/// An RPC of the API: its name (for error metadata) and the scopes any one of which it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    List,
    Reconcile,
    Get,
    DailyRollUp,
    Unimplemented(&'static str),
    Identity,
    CreateSubscriber,
    ListSubscribers,
    DeleteSubscriber,
}

impl Rpc {
    fn name(self) -> String {
        let short = match self {
            Self::List => "DataPointsService.ListDataPoints",
            Self::Reconcile => "DataPointsService.ReconcileDataPoints",
            Self::Get => "DataPointsService.GetDataPoint",
            Self::DailyRollUp => "DataPointsService.DailyRollUpDataPoints",
            Self::Unimplemented(n) => n,
            Self::Identity => "HealthProfileService.GetIdentity",
            Self::CreateSubscriber => "DataSubscriptionService.CreateSubscriber",
            Self::ListSubscribers => "DataSubscriptionService.ListSubscribers",
            Self::DeleteSubscriber => "DataSubscriptionService.DeleteSubscriber",
        };
        format!("{RPC_PREFIX}{short}")
    }

    /// Method-level scope check (Google's front end): any one read scope of these families
    /// (for reconcile also a write scope of the write families).
    fn accepts(self, scopes: &[String]) -> bool {
        let read: &[&str] = match self {
            Self::List => &[ACT, "ecg", HM, "irn", "location", "nutrition", "sleep"],
            Self::Reconcile | Self::Get | Self::DailyRollUp | Self::Unimplemented(_) => {
                &[ACT, HM, "location", "nutrition", "sleep"]
            }
            Self::Identity => &[
                ACT,
                "ecg",
                HM,
                "irn",
                "nutrition",
                "profile",
                "settings",
                "sleep",
            ],
            Self::CreateSubscriber | Self::ListSubscribers | Self::DeleteSubscriber => &[],
        };
        let write: &[&str] = match self {
            Self::Reconcile | Self::Unimplemented(_) => &[
                ACT,
                HM,
                "location",
                "logged_symptoms",
                "mindfulness",
                "nutrition",
                "reproductive_health",
                "sleep",
            ],
            _ => &[],
        };
        read.iter().any(|f| reads_family(scopes, f))
            || write.iter().any(|f| writes_family(scopes, f))
    }
}

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
// Time
// ---------------------------------------------------------------------------

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as Google writes `google-datetime`.
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A `google-duration` (`"-18000s"`, `"3.5s"`) in whole seconds.
fn parse_duration_secs(s: &str) -> Option<i64> {
    let n = s.strip_suffix('s')?;
    let whole = n.split('.').next()?;
    if whole.is_empty() || whole == "-" {
        return n.parse::<f64>().ok().map(|f| f.trunc() as i64);
    }
    whole.parse().ok()
}

fn json_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn json_date(v: &Value) -> Option<NaiveDate> {
    let y = i32::try_from(json_i64(v.get("year"))?).ok()?;
    let m = u32::try_from(json_i64(v.get("month"))?).ok()?;
    let d = u32::try_from(json_i64(v.get("day"))?).ok()?;
    NaiveDate::from_ymd_opt(y, m, d)
}

/// A `CivilDateTime` (`{"date":{…},"time":{…}}`, zero fields omitted).
fn json_civil(v: &Value) -> Option<NaiveDateTime> {
    let date = json_date(v.get("date")?)?;
    let field = |t: Option<&Value>, k: &str| {
        t.and_then(|t| json_i64(t.get(k)))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    let t = v.get("time");
    let time = NaiveTime::from_hms_nano_opt(
        field(t, "hours"),
        field(t, "minutes"),
        field(t, "seconds"),
        field(t, "nanos"),
    )?;
    Some(date.and_time(time))
}

fn local(t: DateTime<Utc>, offset_secs: i64) -> NaiveDateTime {
    (t + TimeDelta::seconds(offset_secs)).naive_utc()
}

fn date_json(d: NaiveDate) -> Value {
    json!({ "year": d.year(), "month": d.month(), "day": d.day() })
}

/// A `CivilDateTime` as Google writes it: zero time fields omitted (`"time": {}` at midnight).
fn civil_json(t: NaiveDateTime) -> Value {
    let mut time = Map::new();
    for (k, v) in [
        ("hours", t.hour()),
        ("minutes", t.minute()),
        ("seconds", t.second()),
        ("nanos", t.nanosecond()),
    ] {
        if v != 0 {
            time.insert(k.into(), json!(v));
        }
    }
    json!({ "date": date_json(t.date()), "time": time })
}

fn civil_iso(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
}

fn midnight_utc(d: NaiveDate) -> DateTime<Utc> {
    d.and_time(NaiveTime::MIN).and_utc()
}

/// Parses a civil filter literal `YYYY-MM-DD[THH:mm:ss[.f]]`; `Err(true)` when well-formed but
/// out of range.
fn parse_civil_literal(s: &str) -> Result<NaiveDateTime, bool> {
    let well_formed = |s: &str| {
        let b = s.as_bytes();
        b.len() >= 10
            && b.iter().take(10).enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            })
    };
    if !well_formed(s) {
        return Err(false);
    }
    let (date_s, time_s) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    if date_s.len() != 10 {
        return Err(false);
    }
    let date = NaiveDate::parse_from_str(date_s, "%Y-%m-%d").map_err(|_| true)?;
    let time = match time_s {
        None => NaiveTime::MIN,
        Some(t) => {
            let tb = t.as_bytes();
            let shape = tb.len() >= 8
                && tb.iter().take(8).enumerate().all(|(i, c)| match i {
                    2 | 5 => *c == b':',
                    _ => c.is_ascii_digit(),
                });
            if !shape {
                return Err(false);
            }
            NaiveTime::parse_from_str(t, "%H:%M:%S%.f").map_err(|_| true)?
        }
    };
    Ok(date.and_time(time))
}

// ---------------------------------------------------------------------------
// Stored points
// ---------------------------------------------------------------------------

/// What the simulator reads from a point.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Times {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    start_offset: i64,
    end_offset: i64,
    civil_start: NaiveDateTime,
    civil_end: NaiveDateTime,
    date: Option<NaiveDate>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PointKey {
    Named(String),
    Start(DateTime<Utc>),
}

#[derive(Clone, Debug)]
struct Point {
    name: Option<String>,
    times: Times,
    /// As seeded.
    json: Value,
}

impl Point {
    fn key(&self) -> PointKey {
        match &self.name {
            Some(n) => PointKey::Named(n.clone()),
            None => PointKey::Start(self.times.start),
        }
    }

    /// Sort key: start time, then name (both compared descending when listing).
    fn order(&self) -> (DateTime<Utc>, &str) {
        (self.times.start, self.name.as_deref().unwrap_or(""))
    }
}

fn point_times(t: &DataType, point: &Value) -> Result<Times, String> {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    if t.shape == Shape::Untimed {
        return Ok(Times {
            start: epoch,
            end: epoch,
            start_offset: 0,
            end_offset: 0,
            civil_start: epoch.naive_utc(),
            civil_end: epoch.naive_utc(),
            date: None,
        });
    }
    let value = point
        .get(t.key)
        .filter(|v| v.is_object())
        .ok_or_else(|| format!("missing object {:?}", t.key))?;
    let offset = |v: Option<&Value>| -> Result<i64, String> {
        match v {
            None => Ok(0),
            Some(Value::String(s)) => {
                parse_duration_secs(s).ok_or_else(|| format!("bad duration {s:?}"))
            }
            Some(other) => Err(format!("bad duration {other}")),
        }
    };
    let instant = |v: Option<&Value>, what: &str| -> Result<DateTime<Utc>, String> {
        v.and_then(Value::as_str)
            .and_then(parse_instant)
            .ok_or_else(|| format!("{what} must be an RFC 3339 string"))
    };
    match t.shape {
        Shape::Sample => {
            let st = value
                .get("sampleTime")
                .ok_or_else(|| format!("missing {}.sampleTime", t.key))?;
            let at = instant(st.get("physicalTime"), "sampleTime.physicalTime")?;
            let off = offset(st.get("utcOffset"))?;
            let civil = st
                .get("civilTime")
                .and_then(json_civil)
                .unwrap_or_else(|| local(at, off));
            Ok(Times {
                start: at,
                end: at,
                start_offset: off,
                end_offset: off,
                civil_start: civil,
                civil_end: civil,
                date: None,
            })
        }
        Shape::Interval | Shape::Session => {
            let iv = value
                .get("interval")
                .ok_or_else(|| format!("missing {}.interval", t.key))?;
            let start = instant(iv.get("startTime"), "interval.startTime")?;
            let end = match iv.get("endTime") {
                None => start,
                some => instant(some, "interval.endTime")?,
            };
            let so = offset(iv.get("startUtcOffset"))?;
            let eo = match iv.get("endUtcOffset") {
                None => so,
                some => offset(some)?,
            };
            Ok(Times {
                start,
                end,
                start_offset: so,
                end_offset: eo,
                civil_start: iv
                    .get("civilStartTime")
                    .and_then(json_civil)
                    .unwrap_or_else(|| local(start, so)),
                civil_end: iv
                    .get("civilEndTime")
                    .and_then(json_civil)
                    .unwrap_or_else(|| local(end, eo)),
                date: None,
            })
        }
        Shape::Daily => {
            let date = value
                .get("date")
                .and_then(json_date)
                .ok_or_else(|| format!("missing or bad {}.date", t.key))?;
            let next = date.succ_opt().unwrap_or(date);
            Ok(Times {
                start: midnight_utc(date),
                end: midnight_utc(next),
                start_offset: 0,
                end_offset: 0,
                civil_start: date.and_time(NaiveTime::MIN),
                civil_end: next.and_time(NaiveTime::MIN),
                date: Some(date),
            })
        }
        Shape::Untimed => Err("untimed".into()),
    }
}

fn stored_point(t: &DataType, json: Value) -> Result<Point, String> {
    if !json.is_object() {
        return Err("not a JSON object".into());
    }
    let name = match json.get("name") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("name must be a string".into()),
    };
    if t.shape == Shape::Untimed && name.is_none() {
        return Err(format!("{} points need a name", t.id));
    }
    let times = point_times(t, &json)?;
    Ok(Point { name, times, json })
}

/// The notification interval covering `points` (physical span plus both civil renderings).
fn interval_json(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    civil_start: NaiveDateTime,
    civil_end: NaiveDateTime,
) -> Value {
    json!({
        "physicalTimeInterval": { "startTime": rfc3339(start), "endTime": rfc3339(end) },
        "civilDateTimeInterval": {
            "startDateTime": civil_json(civil_start),
            "endDateTime": civil_json(civil_end),
        },
        "civilIso8601TimeInterval": {
            "startTime": civil_iso(civil_start),
            "endTime": civil_iso(civil_end),
        },
    })
}

fn span_interval<'a>(times: impl Iterator<Item = &'a Times>) -> Option<Value> {
    let mut first: Option<&Times> = None;
    let mut last: Option<&Times> = None;
    for t in times {
        if first.is_none_or(|f| t.start < f.start) {
            first = Some(t);
        }
        if last.is_none_or(|l| t.end > l.end) {
            last = Some(t);
        }
    }
    let (first, last) = (first?, last?);
    Some(interval_json(
        first.start,
        last.end,
        first.civil_start,
        last.civil_end,
    ))
}

// ---------------------------------------------------------------------------
// Filters (AIP-160 subset)
// ---------------------------------------------------------------------------

/// A filter error: catalogue reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FilterError {
    reason: &'static str,
    message: String,
}

fn ferr(reason: &'static str, message: impl Into<String>) -> FilterError {
    FilterError {
        reason,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    Op(&'static str),
    LParen,
    RParen,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                out.push(Tok::RParen);
            }
            '"' | '\'' => {
                let quote = c;
                chars.next();
                let mut lit = String::new();
                let mut closed = false;
                while let Some(ch) = chars.next() {
                    match ch {
                        '\\' => {
                            if let Some(esc) = chars.next() {
                                lit.push(esc);
                            }
                        }
                        ch if ch == quote => {
                            closed = true;
                            break;
                        }
                        ch => lit.push(ch),
                    }
                }
                if !closed {
                    return Err(ferr(
                        "INVALID_DATA_POINT_FILTER_SYNTAX",
                        "Invalid filter syntax: unterminated string literal.",
                    ));
                }
                out.push(Tok::Str(lit));
            }
            '>' | '<' | '=' | '!' | ':' => {
                chars.next();
                let two = chars.peek() == Some(&'=');
                let op = match (c, two) {
                    ('>', true) => ">=",
                    ('<', true) => "<=",
                    ('!', true) => "!=",
                    ('>', false) => ">",
                    ('<', false) => "<",
                    ('=', _) => "=",
                    (':', _) => ":",
                    _ => {
                        return Err(ferr(
                            "INVALID_DATA_POINT_FILTER_SYNTAX",
                            format!("Invalid filter syntax at {c:?}."),
                        ));
                    }
                };
                if two && c != '=' {
                    chars.next();
                }
                out.push(Tok::Op(op));
            }
            c if c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '+') => {
                // A bare timestamp keeps its colons (and is then refused as unquoted).
                let numeric = c.is_ascii_digit();
                let mut w = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_alphanumeric()
                        || matches!(ch, '_' | '.' | '-' | '+')
                        || (numeric && ch == ':')
                    {
                        w.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(w));
            }
            other => {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_SYNTAX",
                    format!("Invalid filter syntax: unexpected character {other:?}."),
                ));
            }
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Cmp {
        member: String,
        op: &'static str,
        value: Tok,
    },
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eoi() -> FilterError {
        ferr(
            "INVALID_DATA_POINT_FILTER_UNEXPECTED_END_OF_INPUT",
            "Invalid filter: unexpected end of input.",
        )
    }

    fn unexpected(t: &Tok) -> FilterError {
        ferr(
            "INVALID_DATA_POINT_FILTER_UNEXPECTED_TOKEN",
            format!("Invalid filter: unexpected token {t:?}."),
        )
    }

    fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
        matches!(t, Some(Tok::Word(w)) if w == kw)
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.and_expr()?];
        while Self::is_kw(self.peek(), "OR") {
            self.pos += 1;
            terms.push(self.and_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.term()?];
        while Self::is_kw(self.peek(), "AND") {
            self.pos += 1;
            terms.push(self.term()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        match self.next() {
            None => Err(Self::eoi()),
            Some(Tok::LParen) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    None => Err(ferr(
                        "INVALID_DATA_POINT_FILTER_MISSING_TOKEN",
                        "Invalid filter: missing ')'.",
                    )),
                    Some(t) => Err(Self::unexpected(&t)),
                }
            }
            Some(Tok::Word(w)) if w == "NOT" => Err(ferr(
                "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE",
                "Invalid filter: NOT is not supported.",
            )),
            Some(Tok::Word(member)) if !matches!(member.as_str(), "AND" | "OR") => {
                let op = match self.next() {
                    None => return Err(Self::eoi()),
                    Some(Tok::Op(op)) => op,
                    Some(t) => return Err(Self::unexpected(&t)),
                };
                match self.next() {
                    None => Err(Self::eoi()),
                    Some(v @ (Tok::Str(_) | Tok::Word(_))) => Ok(Expr::Cmp {
                        member,
                        op,
                        value: v,
                    }),
                    Some(t) => Err(Self::unexpected(&t)),
                }
            }
            Some(t) => Err(Self::unexpected(&t)),
        }
    }
}

fn parse_filter(s: &str) -> Result<Option<Expr>, FilterError> {
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { toks, pos: 0 };
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        return Err(Parser::unexpected(t));
    }
    Ok(Some(e))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    PhysStart,
    PhysEnd,
    CivilStart,
    CivilEnd,
    Date,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Bound {
    Instant(DateTime<Utc>),
    Civil(NaiveDateTime),
    Date(NaiveDate),
}

/// A compiled filter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    /// `field >= bound` when `ge`, else `field < bound`.
    Test {
        field: Field,
        ge: bool,
        bound: Bound,
    },
}

/// Members a data type's filter accepts, with the comparators allowed on them.
fn members(t: &DataType) -> Vec<(&'static str, Field, &'static [&'static str])> {
    const GE_LT: &[&str] = &[">=", "<"];
    match (t.shape, t.id) {
        (Shape::Interval, _) => vec![
            ("interval.start_time", Field::PhysStart, GE_LT),
            ("interval.civil_start_time", Field::CivilStart, GE_LT),
        ],
        (Shape::Sample, _) => vec![
            ("sample_time.physical_time", Field::PhysStart, GE_LT),
            ("sample_time.civil_time", Field::CivilStart, GE_LT),
        ],
        (Shape::Daily, _) => vec![("date", Field::Date, GE_LT)],
        (Shape::Session, "sleep") => vec![
            ("interval.end_time", Field::PhysEnd, GE_LT),
            ("interval.civil_end_time", Field::CivilEnd, GE_LT),
        ],
        (Shape::Session, "electrocardiogram") => {
            vec![("interval.start_time", Field::PhysStart, &[">="])]
        }
        (Shape::Session, _) => vec![("interval.civil_start_time", Field::CivilStart, GE_LT)],
        (Shape::Untimed, _) => vec![],
    }
}

fn compile_filter(t: &DataType, e: &Expr) -> Result<Cond, FilterError> {
    // Whole-expression checks first: one data type, OR only for sleep, no mixed time kinds.
    fn walk<'a>(e: &'a Expr, cmps: &mut Vec<(&'a str, &'static str, &'a Tok)>, has_or: &mut bool) {
        match e {
            Expr::And(v) => v.iter().for_each(|x| walk(x, cmps, has_or)),
            Expr::Or(v) => {
                *has_or = true;
                v.iter().for_each(|x| walk(x, cmps, has_or));
            }
            Expr::Cmp { member, op, value } => cmps.push((member, op, value)),
        }
    }
    let mut cmps = Vec::new();
    let mut has_or = false;
    walk(e, &mut cmps, &mut has_or);
    let own = t.filter_name();
    let prefixes: BTreeSet<&str> = cmps
        .iter()
        .map(|(m, _, _)| m.split('.').next().unwrap_or(""))
        .collect();
    if prefixes.len() > 1 {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_MIXED_DATA_TYPE_RESTRICTIONS",
            "Invalid filter: restrictions on more than one data type.",
        ));
    }
    if let Some(p) = prefixes.iter().next()
        && *p != own
    {
        let known = DATA_TYPES.iter().any(|d| d.filter_name() == *p);
        return Err(if known {
            ferr(
                "INVALID_DATA_POINT_FILTER_COLLECTION_MISMATCH",
                format!(
                    "Invalid filter: data type '{p}' does not match the collection '{}'.",
                    t.id
                ),
            )
        } else {
            ferr(
                "INVALID_DATA_POINT_FILTER_DATA_TYPE_RESTRICTION",
                format!("Invalid filter: unknown data type '{p}'."),
            )
        });
    }
    if has_or && t.id != "sleep" {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE",
            "Invalid filter: OR is only supported for sleep.",
        ));
    }
    let allowed = members(t);
    let mut kinds = BTreeSet::new();
    for (member, _, _) in &cmps {
        let rest = member
            .strip_prefix(own.as_str())
            .and_then(|r| r.strip_prefix('.'));
        let Some((_, field, _)) = allowed.iter().find(|(m, _, _)| Some(*m) == rest) else {
            return Err(ferr(
                "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER",
                format!(
                    "Invalid filter: '{member}' is not a supported filter field for '{}'.",
                    t.id
                ),
            ));
        };
        kinds.insert(matches!(field, Field::PhysStart | Field::PhysEnd));
    }
    if kinds.len() > 1 {
        return Err(ferr(
            "INVALID_DATA_POINT_FILTER_MIXED_TIME_RESTRICTIONS",
            "Invalid filter: physical and civil time restrictions cannot be mixed.",
        ));
    }
    compile_expr(&own, &allowed, e)
}

fn compile_expr(
    own: &str,
    allowed: &[(&'static str, Field, &'static [&'static str])],
    e: &Expr,
) -> Result<Cond, FilterError> {
    match e {
        Expr::And(v) => Ok(Cond::And(
            v.iter()
                .map(|x| compile_expr(own, allowed, x))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Or(v) => Ok(Cond::Or(
            v.iter()
                .map(|x| compile_expr(own, allowed, x))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Cmp { member, op, value } => {
            let rest = member.strip_prefix(own).and_then(|r| r.strip_prefix('.'));
            let Some((_, field, ops)) = allowed.iter().find(|(m, _, _)| Some(*m) == rest) else {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER",
                    format!("Invalid filter: unsupported field '{member}'."),
                ));
            };
            if !ops.contains(op) {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR",
                    format!(
                        "Invalid filter: comparator '{op}' is not supported for '{member}' (supported: {}).",
                        ops.join(", ")
                    ),
                ));
            }
            let Tok::Str(lit) = value else {
                return Err(ferr(
                    "INVALID_DATA_POINT_FILTER_RESTRICTION_ARGUMENT",
                    format!("Invalid filter: the value of '{member}' must be a quoted string."),
                ));
            };
            let bound = match field {
                Field::PhysStart | Field::PhysEnd => {
                    Bound::Instant(parse_instant(lit).ok_or_else(|| {
                        ferr(
                            "INVALID_DATA_POINT_FILTER_TIMESTAMP_FORMAT",
                            format!("Invalid filter: '{lit}' is not an RFC 3339 timestamp."),
                        )
                    })?)
                }
                Field::CivilStart | Field::CivilEnd => Bound::Civil(
                    parse_civil_literal(lit)
                        .map_err(|out_of_range| civil_error(lit, out_of_range))?,
                ),
                Field::Date => {
                    let parsed = if lit.len() == 10 {
                        parse_civil_literal(lit)
                    } else {
                        Err(false)
                    };
                    Bound::Date(
                        parsed
                            .map_err(|out_of_range| civil_error(lit, out_of_range))?
                            .date(),
                    )
                }
            };
            Ok(Cond::Test {
                field: *field,
                ge: *op == ">=",
                bound,
            })
        }
    }
}

fn civil_error(lit: &str, out_of_range: bool) -> FilterError {
    if out_of_range {
        ferr(
            "INVALID_CIVIL_DATE_TIME",
            format!("Invalid filter: '{lit}' is not a valid civil date time."),
        )
    } else {
        ferr(
            "INVALID_DATA_POINT_FILTER_CIVIL_DATE_TIME_FORMAT",
            format!("Invalid filter: '{lit}' is not in the format YYYY-MM-DD[THH:mm:ss]."),
        )
    }
}

fn eval(c: &Cond, t: &Times) -> bool {
    match c {
        Cond::And(v) => v.iter().all(|x| eval(x, t)),
        Cond::Or(v) => v.iter().any(|x| eval(x, t)),
        Cond::Test { field, ge, bound } => {
            let ord = match (field, bound) {
                (Field::PhysStart, Bound::Instant(b)) => t.start.cmp(b),
                (Field::PhysEnd, Bound::Instant(b)) => t.end.cmp(b),
                (Field::CivilStart, Bound::Civil(b)) => t.civil_start.cmp(b),
                (Field::CivilEnd, Bound::Civil(b)) => t.civil_end.cmp(b),
                (Field::Date, Bound::Date(b)) => t.date.unwrap_or(t.civil_start.date()).cmp(b),
                _ => return false,
            };
            if *ge { ord.is_ge() } else { ord.is_lt() }
        }
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct App {
    secret: String,
    testing: bool,
}

#[derive(Debug)]
struct Grant {
    user: String,
    client_id: String,
    scopes: Vec<String>,
    revoked: bool,
    refresh_token: Option<String>,
    /// Testing mode: the refresh token dies at this epoch second.
    refresh_expires_at: Option<i64>,
}

#[derive(Debug)]
struct AccessToken {
    grant: usize,
    expires_at: i64,
}

#[derive(Debug)]
struct AuthCode {
    user: String,
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    challenge: Option<String>,
    offline: bool,
    force_consent: bool,
    expires_at: i64,
}

#[derive(Debug, Default)]
struct Consent {
    scopes: BTreeSet<String>,
    refresh_issued: bool,
}

#[derive(Debug, Default)]
struct UserStats {
    requests: u64,
    by_data_type: BTreeMap<String, u64>,
    refreshes: u64,
    code_exchanges: u64,
    rate_limited: u64,
}

#[derive(Debug)]
struct User {
    legacy_id: Option<String>,
    linked: bool,
    /// Data type id → points by key.
    points: BTreeMap<&'static str, BTreeMap<PointKey, Point>>,
    rate_window: VecDeque<i64>,
    stats: UserStats,
}

#[derive(Debug)]
struct Subscriber {
    project: String,
    id: String,
    endpoint_uri: String,
    secret: String,
    configs: Vec<Value>,
    data_types: BTreeSet<String>,
    create_time: String,
    /// Queued `{"data":…}` notifications.
    pending: VecDeque<Value>,
    wake: Arc<Notify>,
}

impl Subscriber {
    fn name(&self) -> String {
        format!("projects/{}/subscribers/{}", self.project, self.id)
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name(),
            "endpointUri": self.endpoint_uri,
            "subscriberConfigs": self.configs,
            "endpointAuthorization": { "secretSet": true },
            "state": "ACTIVE",
            "createTime": self.create_time,
            "updateTime": self.create_time,
        })
    }
}

struct Key {
    id: u32,
    key: SigningKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct NotifyStats {
    attempts: u64,
    delivered: u64,
    notifications_delivered: u64,
    dropped: u64,
    by_status: BTreeMap<String, u64>,
    verifications: u64,
    verifications_passed: u64,
}

#[derive(Debug)]
struct Inner {
    config: SimConfig,
    clock_offset_secs: i64,
    apps: HashMap<String, App>,
    users: BTreeMap<String, User>,
    grants: Vec<Grant>,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, usize>,
    codes: HashMap<String, AuthCode>,
    consents: HashMap<(String, String), Consent>,
    /// Service-account token → project number.
    project_tokens: HashMap<String, String>,
    projects: BTreeSet<String>,
    /// Subscriber name → subscriber (creation order kept by `subscriber_order`).
    subscribers: HashMap<String, Subscriber>,
    subscriber_order: Vec<String>,
    keys: Vec<Key>,
    primary_key: u32,
    notify: NotifyStats,
    unauthorized: u64,
}

/// Shared simulator state; build it with [`SimState::new`] and hand it to [`router`].
#[derive(Debug)]
pub struct SimState {
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rand::rng().fill(&mut buf[..]);
    buf
}

fn random_token(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(buf.as_mut_slice());
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(buf))
}

/// A fresh P-256 signing key from 32 random bytes (retrying on the negligible invalid scalar).
fn new_signing_key() -> SigningKey {
    loop {
        let bytes = random_bytes::<32>();
        if let Ok(k) = SigningKey::from_bytes(&bytes.into()) {
            return k;
        }
    }
}

fn new_key_id(taken: &[Key]) -> u32 {
    loop {
        let id = rand::rng().random_range(1..=i32::MAX as u32);
        if !taken.iter().any(|k| k.id == id) {
            return id;
        }
    }
}

impl SimState {
    /// Creates an empty simulator with one signing key.
    pub fn new(config: SimConfig) -> anyhow::Result<Arc<Self>> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the notification HTTP client")?;
        let key = Key {
            id: new_key_id(&[]),
            key: new_signing_key(),
        };
        let primary = key.id;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                config,
                clock_offset_secs: 0,
                apps: HashMap::new(),
                users: BTreeMap::new(),
                grants: Vec::new(),
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                codes: HashMap::new(),
                consents: HashMap::new(),
                project_tokens: HashMap::new(),
                projects: BTreeSet::new(),
                subscribers: HashMap::new(),
                subscriber_order: Vec::new(),
                keys: vec![key],
                primary_key: primary,
                notify: NotifyStats::default(),
                unauthorized: 0,
            }),
            http,
        }))
    }

    /// The current configuration.
    pub async fn config(&self) -> SimConfig {
        self.inner.lock().await.config.clone()
    }

    /// Replaces the configuration.
    pub async fn set_config(&self, config: SimConfig) {
        self.inner.lock().await.config = config;
    }

    /// Registers (or updates) an OAuth client.
    pub async fn add_app(&self, app: AppSeed) {
        self.inner.lock().await.add_app(app);
    }

    /// Creates a user or updates it (stored points are kept); with a client id, registers the
    /// app and mints tokens valid at once.
    pub async fn add_user(&self, seed: UserSeed) -> UserTokens {
        self.inner.lock().await.add_user(seed)
    }

    /// Registers a project number and a service-account token for it.
    pub async fn add_project(&self, number: &str, token: &str) {
        let mut inner = self.inner.lock().await;
        inner.projects.insert(number.to_owned());
        inner
            .project_tokens
            .insert(token.to_owned(), number.to_owned());
    }

    /// Stores points (verbatim) and queues an UPSERT notification; all or nothing. Returns how
    /// many points were given.
    pub async fn upsert_points(
        &self,
        user: &str,
        data_type: &str,
        points: Vec<Value>,
    ) -> Result<usize, StoreError> {
        self.inner
            .lock()
            .await
            .upsert_points(user, data_type, points)
    }

    /// Removes points by name or start time and queues a DELETE notification; returns how many
    /// were removed.
    pub async fn delete_points(
        &self,
        user: &str,
        data_type: &str,
        names: &[String],
        start_times: &[String],
    ) -> Result<usize, StoreError> {
        self.inner
            .lock()
            .await
            .delete_points(user, data_type, names, start_times)
    }

    /// Moves the simulated clock; returns the new epoch second.
    pub async fn advance_clock(&self, seconds: i64) -> i64 {
        let mut inner = self.inner.lock().await;
        inner.clock_offset_secs = inner.clock_offset_secs.saturating_add(seconds);
        inner.now_s()
    }

    /// Adds a new primary signing key; with `drop_old` the older keys leave the keyset.
    pub async fn rotate_keys(&self, drop_old: bool) -> u32 {
        self.inner.lock().await.rotate_keys(drop_old)
    }

    /// The served Tink keyset.
    pub async fn keyset(&self) -> Value {
        self.inner.lock().await.keyset()
    }
}

impl Inner {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::seconds(self.clock_offset_secs)
    }

    fn now_s(&self) -> i64 {
        self.now().timestamp()
    }

    fn add_app(&mut self, app: AppSeed) {
        self.apps.insert(
            app.client_id,
            App {
                secret: app.client_secret,
                testing: app.testing,
            },
        );
    }

    fn add_user(&mut self, seed: UserSeed) -> UserTokens {
        let id = seed.health_user_id.clone();
        let user = self.users.entry(id.clone()).or_insert_with(|| User {
            legacy_id: None,
            linked: true,
            points: BTreeMap::new(),
            rate_window: VecDeque::new(),
            stats: UserStats::default(),
        });
        user.legacy_id = seed.legacy_user_id.clone();
        user.linked = seed.linked.unwrap_or(true);
        let Some(client_id) = seed.client_id.filter(|c| !c.is_empty()) else {
            return UserTokens {
                health_user_id: id,
                access_token: None,
                refresh_token: None,
                expires_in: None,
                scope: None,
            };
        };
        let testing = seed
            .testing
            .or_else(|| self.apps.get(&client_id).map(|a| a.testing))
            .unwrap_or(false);
        let secret = seed
            .client_secret
            .or_else(|| self.apps.get(&client_id).map(|a| a.secret.clone()))
            .unwrap_or_default();
        self.add_app(AppSeed {
            client_id: client_id.clone(),
            client_secret: secret,
            testing,
        });
        let scopes: Vec<String> = match seed.scopes {
            Some(s) => s.iter().map(|s| scope_url(s)).collect(),
            None => DEFAULT_READ_FAMILIES
                .iter()
                .map(|f| format!("{SCOPE_PREFIX}{f}.readonly"))
                .collect(),
        };
        let expires_in = seed.expires_in.unwrap_or(ACCESS_TOKEN_LIFETIME_SECS);
        let grant = self.new_grant(&id, &client_id, scopes.clone(), true, seed.refresh_token);
        let access = seed
            .access_token
            .unwrap_or_else(|| random_token("ya29.", 48));
        let now = self.now_s();
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                grant,
                expires_at: now + expires_in,
            },
        );
        UserTokens {
            health_user_id: id,
            access_token: Some(access),
            refresh_token: self.grants.get(grant).and_then(|g| g.refresh_token.clone()),
            expires_in: Some(expires_in),
            scope: Some(scopes.join(" ")),
        }
    }

    /// A new grant; with `refresh`, a refresh token (given or generated) bound to it.
    fn new_grant(
        &mut self,
        user: &str,
        client_id: &str,
        scopes: Vec<String>,
        refresh: bool,
        refresh_token: Option<String>,
    ) -> usize {
        let id = self.grants.len();
        let testing = self.apps.get(client_id).is_some_and(|a| a.testing);
        let refresh_token =
            refresh.then(|| refresh_token.unwrap_or_else(|| random_token("1//0", 64)));
        if let Some(r) = &refresh_token {
            self.refresh_tokens.insert(r.clone(), id);
        }
        let now = self.now_s();
        self.grants.push(Grant {
            user: user.to_owned(),
            client_id: client_id.to_owned(),
            scopes,
            revoked: false,
            refresh_expires_at: (refresh_token.is_some() && testing)
                .then_some(now + TESTING_REFRESH_LIFETIME_SECS),
            refresh_token,
        });
        id
    }

    fn issue_access(&mut self, grant: usize) -> String {
        let token = random_token("ya29.", 48);
        let expires_at = self.now_s() + ACCESS_TOKEN_LIFETIME_SECS;
        self.access_tokens
            .insert(token.clone(), AccessToken { grant, expires_at });
        token
    }

    /// Revokes every grant of a user; returns how many were live.
    fn revoke_user(&mut self, user: &str) -> usize {
        let mut n = 0;
        for g in self
            .grants
            .iter_mut()
            .filter(|g| g.user == user && !g.revoked)
        {
            g.revoked = true;
            n += 1;
        }
        self.consents.retain(|(u, _), _| u != user);
        self.codes.retain(|_, c| c.user != user);
        n
    }

    fn expire_access(&mut self, user: &str) -> usize {
        let now = self.now_s();
        let mut n = 0;
        for t in self.access_tokens.values_mut() {
            let mine = self
                .grants
                .get(t.grant)
                .is_some_and(|g| g.user == user && !g.revoked);
            if mine && t.expires_at > now {
                t.expires_at = now;
                n += 1;
            }
        }
        n
    }

    fn upsert_points(
        &mut self,
        user: &str,
        data_type: &str,
        points: Vec<Value>,
    ) -> Result<usize, StoreError> {
        let t = DataType::by_id(data_type)
            .ok_or_else(|| StoreError::UnknownDataType(data_type.to_owned()))?;
        if !self.users.contains_key(user) {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        let stored = points
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                stored_point(t, p)
                    .map_err(|why| StoreError::InvalidPoint(format!("point {i}: {why}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = stored.len();
        let interval = span_interval(stored.iter().map(|p| &p.times));
        if let Some(u) = self.users.get_mut(user) {
            let of_type = u.points.entry(t.id).or_default();
            for p in stored {
                of_type.insert(p.key(), p);
            }
        }
        if let Some(interval) = interval {
            self.queue_notification(user, t.id, "UPSERT", interval);
        }
        Ok(n)
    }

    fn delete_points(
        &mut self,
        user: &str,
        data_type: &str,
        names: &[String],
        start_times: &[String],
    ) -> Result<usize, StoreError> {
        let t = DataType::by_id(data_type)
            .ok_or_else(|| StoreError::UnknownDataType(data_type.to_owned()))?;
        let starts = start_times
            .iter()
            .map(|s| {
                parse_instant(s)
                    .or_else(|| {
                        NaiveDate::parse_from_str(s, "%Y-%m-%d")
                            .ok()
                            .map(midnight_utc)
                    })
                    .ok_or_else(|| StoreError::InvalidPoint(format!("bad start time {s:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let u = self
            .users
            .get_mut(user)
            .ok_or_else(|| StoreError::UnknownUser(user.to_owned()))?;
        let of_type = u.points.entry(t.id).or_default();
        let mut removed = Vec::new();
        of_type.retain(|_, p| {
            let hit = p.name.as_ref().is_some_and(|n| names.contains(n))
                || starts.contains(&p.times.start);
            if hit {
                removed.push(p.times.clone());
            }
            !hit
        });
        let n = removed.len();
        if let Some(interval) = span_interval(removed.iter()) {
            self.queue_notification(user, t.id, "DELETE", interval);
        }
        Ok(n)
    }

    /// Queues one notification for every subscriber of the data type; returns how many.
    fn queue_notification(
        &mut self,
        user: &str,
        data_type: &str,
        operation: &str,
        interval: Value,
    ) -> usize {
        let mut n = 0;
        for sub in self
            .subscribers
            .values_mut()
            .filter(|s| s.data_types.contains(data_type))
        {
            sub.pending
                .push_back(notification(user, data_type, operation, interval.clone()));
            sub.wake.notify_one();
            n += 1;
        }
        n
    }

    fn rotate_keys(&mut self, drop_old: bool) -> u32 {
        let id = new_key_id(&self.keys);
        if drop_old {
            self.keys.clear();
        }
        self.keys.push(Key {
            id,
            key: new_signing_key(),
        });
        self.primary_key = id;
        id
    }

    fn keyset(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| {
                json!({
                    "keyData": {
                        "typeUrl": ECDSA_PUBLIC_KEY_TYPE_URL,
                        "value": STANDARD.encode(ecdsa_public_key_proto(&k.key)),
                        "keyMaterialType": "ASYMMETRIC_PUBLIC",
                    },
                    "status": "ENABLED",
                    "keyId": k.id,
                    "outputPrefixType": "TINK",
                })
            })
            .collect();
        json!({ "primaryKeyId": self.primary_key, "key": keys })
    }

    /// Tink signature of `body` with the primary key.
    fn sign(&self, body: &[u8]) -> String {
        match self.keys.iter().find(|k| k.id == self.primary_key) {
            Some(k) => tink_signature(&k.key, k.id, body),
            None => String::new(),
        }
    }
}

/// One notification, as Google sends it for an AUTOMATIC subscriber.
fn notification(user: &str, data_type: &str, operation: &str, interval: Value) -> Value {
    json!({
        "data": {
            "version": "1",
            "clientProvidedSubscriptionName": uuid::Uuid::new_v4().to_string(),
            "healthUserId": user,
            "operation": operation,
            "dataType": data_type,
            "intervals": [interval],
        }
    })
}

// ---------------------------------------------------------------------------
// Tink / ECDSA
// ---------------------------------------------------------------------------

/// The serialized `google.crypto.tink.EcdsaPublicKey`, as Google publishes it: version (0)
/// omitted, params `{hash_type: SHA256, curve: NIST_P256, encoding: DER}`, x and y as 33 bytes
/// with a leading zero.
fn ecdsa_public_key_proto(key: &SigningKey) -> Vec<u8> {
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
fn tink_signature(key: &SigningKey, key_id: u32, body: &[u8]) -> String {
    let sig: p256::ecdsa::Signature = key.sign(body);
    let mut out = vec![0x01];
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend(der_signature(&sig.to_bytes()));
    STANDARD.encode(out)
}

/// SHA-256 (FIPS 180-4), for PKCE S256.
fn sha256(data: &[u8]) -> [u8; 32] {
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

/// Sliding 60 s window; `Err` carries the `Retry-After` seconds.
fn rate_limit_admit(window: &mut VecDeque<i64>, limit: usize, now_ms: i64) -> Result<(), i64> {
    if limit == 0 {
        return Ok(());
    }
    while window
        .front()
        .is_some_and(|t| *t <= now_ms - RATE_WINDOW_MS)
    {
        window.pop_front();
    }
    if window.len() >= limit {
        let wait_ms = window
            .front()
            .map_or(RATE_WINDOW_MS, |oldest| oldest + RATE_WINDOW_MS - now_ms);
        return Err(((wait_ms + 999) / 1_000).max(1));
    }
    window.push_back(now_ms);
    Ok(())
}

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

type Params = HashMap<String, String>;

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding; `+` is a space when `plus` is set (form encoding).
fn percent_decode(s: &str, plus: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| {
                let hi = bytes.get(i + 1).copied().and_then(hex_val)?;
                let lo = bytes.get(i + 2).copied().and_then(hex_val)?;
                Some(hi * 16 + lo)
            })
            .flatten();
        match (b, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', None) if plus => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a form body or a query string; a repeated key keeps its last value.
fn parse_form(s: &str) -> Params {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

fn param<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.get(key).map(String::as_str).filter(|s| !s.is_empty())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

// ---------------------------------------------------------------------------
// Error envelopes
// ---------------------------------------------------------------------------

fn grpc_status(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ALREADY_EXISTS",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        _ => "INTERNAL",
    }
}

fn error_info(reason: &str, domain: &str, metadata: Value) -> Value {
    let mut info = json!({ "@type": TYPE_ERROR_INFO, "reason": reason, "domain": domain });
    if let (Value::Object(m), Value::Object(meta)) = (&mut info, metadata)
        && !meta.is_empty()
    {
        m.insert("metadata".into(), Value::Object(meta));
    }
    info
}

/// A `google.rpc.Status` error answer; `details` omitted when empty.
fn envelope(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if let Value::Object(m) = &mut error
        && !details.is_empty()
    {
        m.insert("details".into(), Value::Array(details));
    }
    let http = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (http, axum::Json(json!({ "error": error }))).into_response()
}

/// A Health-service error with one `ErrorInfo` (domain `health.googleapis.com`).
fn health_error(code: u16, reason: &str, message: &str, metadata: Value) -> Response {
    let status = match reason {
        "ACCOUNT_NOT_LINKED" => "FAILED_PRECONDITION",
        _ => grpc_status(code),
    };
    envelope(
        code,
        status,
        message,
        vec![error_info(reason, DOMAIN_HEALTH, metadata)],
    )
}

/// A Google front-end error with one `ErrorInfo` (domain `googleapis.com`, metadata service and
/// method).
fn frontend_error(code: u16, reason: &str, message: &str, rpc: Rpc) -> Response {
    envelope(
        code,
        grpc_status(code),
        message,
        vec![error_info(
            reason,
            DOMAIN_GOOGLEAPIS,
            json!({ "service": SERVICE, "method": rpc.name() }),
        )],
    )
}

fn bare_error(code: u16, message: &str) -> Response {
    envelope(code, grpc_status(code), message, vec![])
}

fn unauthenticated(reason: &str, rpc: Rpc) -> Response {
    let (message, challenge) = if reason == "CREDENTIALS_MISSING" {
        (
            MSG_MISSING_CREDENTIALS,
            "Bearer realm=\"https://accounts.google.com/\"",
        )
    } else {
        (
            MSG_INVALID_CREDENTIALS,
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
        )
    };
    let mut resp = frontend_error(401, reason, message, rpc);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

fn scope_insufficient(rpc: Rpc) -> Response {
    frontend_error(
        403,
        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
        "Request had insufficient authentication scopes.",
        rpc,
    )
}

fn filter_error(e: &FilterError) -> Response {
    health_error(400, e.reason, &e.message, json!({}))
}

// ---------------------------------------------------------------------------
// OAuth 2.0
// ---------------------------------------------------------------------------

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

async fn authorize(State(st): State<Arc<SimState>>, uri: Uri) -> Response {
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
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let bad = || oauth_err(INVALID_CLIENT, "Unauthorized");
        let value = value.to_str().map_err(|_| bad())?.trim();
        if let Some((scheme, encoded)) = value.split_once(' ')
            && scheme.eq_ignore_ascii_case("basic")
        {
            let raw = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
            let text = String::from_utf8(raw).map_err(|_| bad())?;
            let (id, secret) = text.split_once(':').ok_or_else(bad)?;
            return Ok((percent_decode(id, true), Some(percent_decode(secret, true))));
        }
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

async fn token(State(st): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
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

async fn revoke(
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

// ---------------------------------------------------------------------------
// Data API
// ---------------------------------------------------------------------------

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

fn unimplemented_rpc() -> Response {
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

async fn v4(
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
fn authenticate_user(
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
    let token = bearer_token(headers).or_else(|| param(query, "access_token").map(str::to_owned));
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
fn in_family(point: &Value, family: &str) -> bool {
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
fn source_family(value: Option<&str>) -> Result<String, Box<Response>> {
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

// ---------------------------------------------------------------------------
// dailyRollUp
// ---------------------------------------------------------------------------

/// Longest roll-up range of a type, in days (§3.8: 14 for four types, 90 for the others).
fn rollup_cap_days(t: &DataType) -> i64 {
    if matches!(
        t.id,
        "calories-in-heart-rate-zone" | "heart-rate" | "active-minutes" | "total-calories"
    ) {
        14
    } else {
        90
    }
}

/// How the points of a type fold into its `…RollupValue` (Discovery `DailyRollupDataPoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RollupKind {
    /// Sum of an int64 member field, written as an int64 string.
    Sum {
        field: &'static str,
        out: &'static str,
    },
    /// `kcalSum`: sum of the double `kcal`.
    KcalSum,
    /// Average (and optionally minimum and maximum) of a numeric member field, as doubles.
    Stats {
        field: &'static str,
        avg: &'static str,
        min: Option<&'static str>,
        max: Option<&'static str>,
    },
    /// `durationSum`: the summed interval durations.
    DurationSum,
    /// `sumIn{FatBurn,Cardio,Peak}HeartZone` from `activeZoneMinutes` by `heartRateZone`.
    ZoneMinutes,
    /// `activeMinutesRollupByActivityLevel[{activityLevel, activeMinutesSum}]`.
    ActiveMinutes,
    /// `timeInHeartRateZones[{heartRateZone, duration}]` from the intervals by zone.
    TimeInZones,
}

/// The roll-up of a type, when the simulator computes one (`calories-in-heart-rate-zone`,
/// `total-calories`, `hydration-log`, `nutrition-log` and `basal-energy-burned` have none: 501).
fn rollup_kind(t: &DataType) -> Option<RollupKind> {
    let stats = |field, avg, min, max| RollupKind::Stats {
        field,
        avg,
        min,
        max,
    };
    let sum = |field, out| RollupKind::Sum { field, out };
    Some(match t.id {
        "steps" | "floors" => sum("count", "countSum"),
        "distance" => sum("millimeters", "millimetersSum"),
        "altitude" => sum("gainMillimeters", "gainMillimetersSum"),
        "swim-lengths-data" => sum("strokeCount", "strokeCountSum"),
        "active-energy-burned" => RollupKind::KcalSum,
        "heart-rate" => stats(
            "beatsPerMinute",
            "beatsPerMinuteAvg",
            Some("beatsPerMinuteMin"),
            Some("beatsPerMinuteMax"),
        ),
        "weight" => stats("weightGrams", "weightGramsAvg", None, None),
        "body-fat" => stats("percentage", "bodyFatPercentageAvg", None, None),
        "blood-glucose" => stats(
            "bloodGlucoseMilligramsPerDeciliter",
            "bloodGlucoseMilligramsPerDeciliterAvg",
            None,
            None,
        ),
        "core-body-temperature" => stats(
            "temperatureCelsius",
            "temperatureCelsiusAvg",
            Some("temperatureCelsiusMin"),
            Some("temperatureCelsiusMax"),
        ),
        "run-vo2-max" => stats("runVo2Max", "rateAvg", Some("rateMin"), Some("rateMax")),
        "sedentary-period" => RollupKind::DurationSum,
        "active-zone-minutes" => RollupKind::ZoneMinutes,
        "active-minutes" => RollupKind::ActiveMinutes,
        "time-in-heart-rate-zone" => RollupKind::TimeInZones,
        _ => return None,
    })
}

fn json_f64(v: Option<&Value>) -> Option<f64> {
    let f = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

/// A double as Google's JSON writes it: integral values without a fraction (`69`, not `69.0`).
fn double_json(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        json!(f as i64)
    } else {
        json!(f)
    }
}

/// A `google-duration` (`"3600s"`, `"1.5s"`; 0, 3, 6 or 9 fractional digits).
fn duration_json(d: TimeDelta) -> String {
    let secs = d.num_seconds();
    let nanos = d.subsec_nanos().unsigned_abs();
    if nanos == 0 {
        return format!("{secs}s");
    }
    let mut frac = format!("{nanos:09}");
    while frac.len() > 3 && frac.ends_with("000") {
        frac.truncate(frac.len() - 3);
    }
    format!("{secs}.{frac}s")
}

/// The positive length of a point's interval.
fn span_of(p: &Point) -> TimeDelta {
    (p.times.end - p.times.start).max(TimeDelta::zero())
}

impl RollupKind {
    /// The `…RollupValue` of `points` (proto3 JSON: zero fields omitted).
    fn value(self, t: &DataType, points: &[&Point]) -> Value {
        let member = |p: &Point, k: &str| p.json.get(t.key).and_then(|m| m.get(k)).cloned();
        let mut out = Map::new();
        match self {
            Self::Sum { field, out: name } => {
                let total = points.iter().fold(0_i64, |acc, p| {
                    acc.saturating_add(json_i64(member(p, field).as_ref()).unwrap_or(0))
                });
                if total != 0 {
                    out.insert(name.into(), json!(total.to_string()));
                }
            }
            Self::KcalSum => {
                let total: f64 = points
                    .iter()
                    .filter_map(|p| json_f64(member(p, "kcal").as_ref()))
                    .sum();
                if total != 0.0 {
                    out.insert("kcalSum".into(), double_json(total));
                }
            }
            Self::Stats {
                field,
                avg,
                min,
                max,
            } => {
                let values: Vec<f64> = points
                    .iter()
                    .filter_map(|p| json_f64(member(p, field).as_ref()))
                    .collect();
                if !values.is_empty() {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    for (name, v) in [(Some(avg), mean), (min, lo), (max, hi)] {
                        if let Some(name) = name
                            && v != 0.0
                        {
                            out.insert(name.into(), double_json(v));
                        }
                    }
                }
            }
            Self::DurationSum => {
                let total = points
                    .iter()
                    .fold(TimeDelta::zero(), |acc, p| acc + span_of(p));
                if !total.is_zero() {
                    out.insert("durationSum".into(), json!(duration_json(total)));
                }
            }
            Self::ZoneMinutes => {
                let mut sums = [0_i64; 3];
                for p in points {
                    let zone = member(p, "heartRateZone");
                    let slot = match zone.as_ref().and_then(Value::as_str) {
                        Some("FAT_BURN") => 0,
                        Some("CARDIO") => 1,
                        Some("PEAK") => 2,
                        _ => continue,
                    };
                    let minutes = json_i64(member(p, "activeZoneMinutes").as_ref()).unwrap_or(0);
                    sums[slot] = sums[slot].saturating_add(minutes);
                }
                let names = [
                    "sumInFatBurnHeartZone",
                    "sumInCardioHeartZone",
                    "sumInPeakHeartZone",
                ];
                for (name, sum) in names.into_iter().zip(sums) {
                    if sum != 0 {
                        out.insert(name.into(), json!(sum.to_string()));
                    }
                }
            }
            Self::ActiveMinutes => {
                let levels = ["LIGHT", "MODERATE", "VIGOROUS"];
                let mut sums = [0_i64; 3];
                for p in points {
                    let by_level = member(p, "activeMinutesByActivityLevel");
                    for entry in by_level.iter().filter_map(Value::as_array).flatten() {
                        let level = entry.get("activityLevel").and_then(Value::as_str);
                        if let Some(i) = levels.iter().position(|l| Some(*l) == level) {
                            let minutes = json_i64(entry.get("activeMinutes")).unwrap_or(0);
                            sums[i] = sums[i].saturating_add(minutes);
                        }
                    }
                }
                let rows: Vec<Value> = levels
                    .into_iter()
                    .zip(sums)
                    .filter(|(_, sum)| *sum != 0)
                    .map(|(level, sum)| {
                        json!({ "activityLevel": level, "activeMinutesSum": sum.to_string() })
                    })
                    .collect();
                if !rows.is_empty() {
                    out.insert("activeMinutesRollupByActivityLevel".into(), json!(rows));
                }
            }
            Self::TimeInZones => {
                let zones = ["LIGHT", "MODERATE", "VIGOROUS", "PEAK"];
                let mut sums = [TimeDelta::zero(); 4];
                for p in points {
                    let zone = member(p, "heartRateZoneType");
                    let level = zone.as_ref().and_then(Value::as_str);
                    if let Some(i) = zones.iter().position(|z| Some(*z) == level) {
                        sums[i] += span_of(p);
                    }
                }
                let rows: Vec<Value> = zones
                    .into_iter()
                    .zip(sums)
                    .filter(|(_, d)| !d.is_zero())
                    .map(|(zone, d)| json!({ "heartRateZone": zone, "duration": duration_json(d) }))
                    .collect();
                if !rows.is_empty() {
                    out.insert("timeInHeartRateZones".into(), json!(rows));
                }
            }
        }
        Value::Object(out)
    }
}

/// A parsed `DailyRollUpDataPointsRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DailyRollUpRequest {
    start: NaiveDate,
    end: NaiveDate,
    window_days: i64,
    family: String,
}

/// 400 for a body the JSON ↔ proto transcoder refuses (Google's front end: a `BadRequest`
/// detail, no `ErrorInfo`).
fn bad_payload(field: Option<&str>, description: &str) -> Box<Response> {
    let mut violation = json!({ "description": description });
    if let (Some(f), Value::Object(m)) = (field, &mut violation) {
        m.insert("field".into(), json!(f));
    }
    Box::new(envelope(
        400,
        "INVALID_ARGUMENT",
        description,
        vec![json!({ "@type": TYPE_BAD_REQUEST, "fieldViolations": [violation] })],
    ))
}

fn rollup_error(reason: &str, message: &str) -> Box<Response> {
    Box::new(health_error(400, reason, message, json!({})))
}

/// `windowSizeDays` → `window_size_days`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The members of a request message: refuses a non-object and unknown names (proto3 JSON takes
/// the lowerCamel or the original snake_case name); `get` looks a field up under either.
struct Message<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Message<'a> {
    fn new(v: &'a Value, path: &str, fields: &[&str]) -> Result<Self, Box<Response>> {
        let Value::Object(map) = v else {
            let at = if path.is_empty() { "" } else { path };
            return Err(bad_payload(
                (!at.is_empty()).then_some(at),
                &format!("Invalid JSON payload received. Expected an object for '{at}', got {v}."),
            ));
        };
        for key in map.keys() {
            if !fields.iter().any(|f| key == f || *key == snake_case(f)) {
                let name = if path.is_empty() {
                    format!("\"{key}\"")
                } else {
                    format!("\"{key}\" at '{path}'")
                };
                return Err(bad_payload(
                    (!path.is_empty()).then_some(path),
                    &format!(
                        "Invalid JSON payload received. Unknown name {name}: Cannot find field."
                    ),
                ));
            }
        }
        Ok(Self {
            map,
            path: path.to_owned(),
        })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map
            .get(name)
            .or_else(|| self.map.get(&snake_case(name)))
            .filter(|v| !v.is_null())
    }

    fn child_path(&self, name: &str) -> String {
        let snake = snake_case(name);
        if self.path.is_empty() {
            snake
        } else {
            format!("{}.{snake}", self.path)
        }
    }

    /// An `int32` field (a JSON number or a decimal string); absent: 0.
    fn int32(&self, name: &str) -> Result<i64, Box<Response>> {
        let Some(v) = self.get(name) else {
            return Ok(0);
        };
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse::<i64>().ok(),
            _ => None,
        };
        match n.filter(|n| i32::try_from(*n).is_ok()) {
            Some(n) => Ok(n),
            None => {
                let path = self.child_path(name);
                Err(bad_payload(
                    Some(&path),
                    &format!("Invalid value at '{path}' (TYPE_INT32), {v}"),
                ))
            }
        }
    }

    /// A `string` field; absent: `""`.
    fn string(&self, name: &str) -> Result<&'a str, Box<Response>> {
        match self.get(name) {
            None => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(v) => {
                let path = self.child_path(name);
                Err(bad_payload(
                    Some(&path),
                    &format!("Invalid value at '{path}' (TYPE_STRING), {v}"),
                ))
            }
        }
    }
}

/// A `CivilDateTime` bound of the range; `None` when absent.
fn civil_bound(range: &Message<'_>, name: &str) -> Result<Option<NaiveDateTime>, Box<Response>> {
    let Some(v) = range.get(name) else {
        return Ok(None);
    };
    let path = range.child_path(name);
    let bound = Message::new(v, &path, &["date", "time"])?;
    let invalid = |what: &str| {
        rollup_error(
            "INVALID_CIVIL_DATE_TIME",
            &format!("Invalid civil date time at '{path}': {what}."),
        )
    };
    let Some(date_v) = bound.get("date") else {
        return Err(invalid("a date is required"));
    };
    let date = Message::new(date_v, &bound.child_path("date"), &["year", "month", "day"])?;
    let (y, m, d) = (
        date.int32("year")?,
        date.int32("month")?,
        date.int32("day")?,
    );
    let date = (1..=9999)
        .contains(&y)
        .then(|| {
            NaiveDate::from_ymd_opt(
                i32::try_from(y).ok()?,
                u32::try_from(m).ok()?,
                u32::try_from(d).ok()?,
            )
        })
        .flatten()
        .ok_or_else(|| invalid(&format!("{y:04}-{m:02}-{d:02} is not a calendar date")))?;
    let time = match bound.get("time") {
        None => NaiveTime::MIN,
        Some(time_v) => {
            let fields = ["hours", "minutes", "seconds", "nanos"];
            let time = Message::new(time_v, &bound.child_path("time"), &fields)?;
            let mut parts = [0_u32; 4];
            for (slot, name) in parts.iter_mut().zip(fields) {
                *slot = u32::try_from(time.int32(name)?).map_err(|_| invalid("bad time of day"))?;
            }
            NaiveTime::from_hms_nano_opt(parts[0], parts[1], parts[2], parts[3])
                .filter(|_| parts[3] < 1_000_000_000)
                .ok_or_else(|| invalid("bad time of day"))?
        }
    };
    Ok(Some(date.and_time(time)))
}

/// Parses and checks a `DailyRollUpDataPointsRequest` (§3.8): `windowSizeDays` (default 1),
/// `pageSize` bounds the query (more than ⌊cap/window⌋ → `INVALID_ROLLUP_QUERY_DURATION`, fewer
/// than ⌈days/window⌉ → `INVALID_DATA_POINT_NAME`), `pageToken` accepted and ignored,
/// `dataSourceFamily`, and the closed-open civil `range` of whole days.
fn parse_daily_roll_up(t: &DataType, body: &Bytes) -> Result<DailyRollUpRequest, Box<Response>> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| bad_payload(None, &format!("Invalid JSON payload received. {e}.")))?
    };
    if !value.is_object() {
        return Err(bad_payload(
            None,
            "Invalid JSON payload received. Root element must be a message.",
        ));
    }
    let fields = [
        "range",
        "windowSizeDays",
        "pageSize",
        "pageToken",
        "dataSourceFamily",
    ];
    let req = Message::new(&value, "", &fields)?;
    let window_days = match req.int32("windowSizeDays")? {
        0 => 1,
        n if n < 0 => {
            return Err(rollup_error(
                "INVALID_ROLLUP_WINDOW",
                &format!("Invalid roll-up window: windowSizeDays must be positive, got {n}."),
            ));
        }
        n => n,
    };
    let cap = rollup_cap_days(t);
    let max_windows = cap / window_days;
    let duration_error = |windows: i64| {
        rollup_error(
            "INVALID_ROLLUP_QUERY_DURATION",
            &format!(
                "The roll-up query asks for {windows} windows of {window_days} day(s); at most {max_windows} fit the {cap}-day limit of data type '{}'.",
                t.id
            ),
        )
    };
    let page_size = match req.int32("pageSize")? {
        n if n < 0 => {
            return Err(rollup_error(
                "INVALID_PAGE_SIZE",
                &format!("Invalid page size {n}: must not be negative."),
            ));
        }
        0 => None,
        n if n > max_windows => return Err(duration_error(n)),
        n => Some(n),
    };
    req.string("pageToken")?;
    let family = match req.string("dataSourceFamily")? {
        "" => None,
        f => Some(f),
    };
    let family = source_family(family)?;
    let Some(range_v) = req.get("range") else {
        return Err(rollup_error(
            "INVALID_TIME_RANGE_INTERVAL_FORMAT",
            "The range is required: {\"start\": CivilDateTime, \"end\": CivilDateTime}.",
        ));
    };
    let range = Message::new(range_v, "range", &["start", "end"])?;
    let (Some(start), Some(end)) = (civil_bound(&range, "start")?, civil_bound(&range, "end")?)
    else {
        return Err(rollup_error(
            "INVALID_TIME_RANGE_INTERVAL_FORMAT",
            "The range needs both a start and an end.",
        ));
    };
    if end <= start {
        return Err(rollup_error(
            "INVALID_TIME_RANGE",
            &format!(
                "Invalid time range: the end {} is not after the start {}.",
                civil_iso(end),
                civil_iso(start)
            ),
        ));
    }
    if start.time() != NaiveTime::MIN || end.time() != NaiveTime::MIN {
        return Err(rollup_error(
            "INVALID_ROLLUP_WINDOW",
            "The range must be aligned with the aggregation window: whole civil days (no time of day).",
        ));
    }
    let (start, end) = (start.date(), end.date());
    let days = (end - start).num_days();
    let windows = (days + window_days - 1) / window_days;
    if windows > max_windows {
        return Err(duration_error(windows));
    }
    if let Some(size) = page_size
        && size < windows
    {
        return Err(rollup_error(
            "INVALID_DATA_POINT_NAME",
            &format!("Page size {size} is smaller than the {windows} windows of the range."),
        ));
    }
    Ok(DailyRollUpRequest {
        start,
        end,
        window_days,
        family,
    })
}

/// `dailyRollUp`: the user's points of `t` whose civil start falls in the range, bucketed into
/// windows of `windowSizeDays` civil days from the range start (the last one cut at the range
/// end), one row per window with data, ascending; `{}` when none; never a `nextPageToken`.
fn daily_roll_up(user: &User, t: &DataType, body: &Bytes) -> Response {
    let Some(kind) = rollup_kind(t) else {
        return unimplemented_rpc();
    };
    let req = match parse_daily_roll_up(t, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let mut windows: BTreeMap<i64, Vec<&Point>> = BTreeMap::new();
    for p in user.points.get(t.id).into_iter().flat_map(BTreeMap::values) {
        let day = p.times.civil_start.date();
        if day < req.start || day >= req.end || !in_family(&p.json, &req.family) {
            continue;
        }
        let index = (day - req.start).num_days() / req.window_days;
        windows.entry(index).or_default().push(p);
    }
    let day = |n: i64| {
        req.start
            .checked_add_signed(TimeDelta::days(n))
            .unwrap_or(req.end)
            .min(req.end)
    };
    let rows: Vec<Value> = windows
        .into_iter()
        .map(|(index, points)| {
            let from = day(index * req.window_days);
            let to = day((index + 1) * req.window_days);
            let mut row = Map::new();
            row.insert(
                "civilStartTime".into(),
                civil_json(from.and_time(NaiveTime::MIN)),
            );
            row.insert(
                "civilEndTime".into(),
                civil_json(to.and_time(NaiveTime::MIN)),
            );
            row.insert(t.key.into(), kind.value(t, &points));
            Value::Object(row)
        })
        .collect();
    if rows.is_empty() {
        return axum::Json(json!({})).into_response();
    }
    axum::Json(json!({ "rollupDataPoints": rows })).into_response()
}

// ---------------------------------------------------------------------------
// Subscriber API
// ---------------------------------------------------------------------------

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

async fn project_call(
    st: &Arc<SimState>,
    rpc: Rpc,
    project: &str,
    sub_id: Option<&str>,
    query: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let token = bearer_token(headers).or_else(|| param(query, "access_token").map(str::to_owned));
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
async fn verify_endpoint(st: &SimState, endpoint: &str, secret: &str) -> Result<(), String> {
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
enum Tamper {
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
async fn attempt_once(
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
async fn after_delivered(st: &SimState, name: &str, wake: &Arc<Notify>, body: &[u8], items: usize) {
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
async fn deliver(
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
fn batch_body(mut items: Vec<Value>, single: bool) -> Vec<u8> {
    let value = if single && items.len() == 1 {
        items.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(items)
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// Sends a subscriber's queued notifications in batches, one batch at a time, until the
/// subscriber is deleted.
async fn subscriber_worker(st: Arc<SimState>, name: String, wake: Arc<Notify>) {
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

// ---------------------------------------------------------------------------
// Control API
// ---------------------------------------------------------------------------

fn sim_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// A control request with an unreadable body (HTTP 400).
struct BadBody(String);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        sim_error(StatusCode::BAD_REQUEST, self.0)
    }
}

/// Parses a JSON control body; an empty body means `{}`.
fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, BadBody> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text).map_err(|e| BadBody(format!("invalid JSON body: {e}")))
}

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::UnknownUser(_) => sim_error(StatusCode::NOT_FOUND, e.to_string()),
        _ => sim_error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn keyset(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(st.keyset().await).into_response()
}

async fn sim_apps(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_users(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_seed(
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

async fn sim_delete_points(
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

async fn sim_revoke_tokens(State(st): State<Arc<SimState>>, Path(user): Path<String>) -> Response {
    let mut inner = st.inner.lock().await;
    if !inner.users.contains_key(&user) {
        return store_error(&StoreError::UnknownUser(user));
    }
    let n = inner.revoke_user(&user);
    axum::Json(json!({ "revoked": n })).into_response()
}

async fn sim_expire_access(State(st): State<Arc<SimState>>, Path(user): Path<String>) -> Response {
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

async fn sim_projects(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_get_config(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(st.config().await).into_response()
}

async fn sim_set_config(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_rotate(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_notify(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
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

async fn sim_clock_advance(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let b: AdvanceBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let now = st.advance_clock(b.seconds).await;
    let time = DateTime::<Utc>::from_timestamp(now, 0).map(rfc3339);
    axum::Json(json!({ "now": now, "time": time })).into_response()
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

async fn sim_health() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

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
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("google-health-sim server")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use p256::EncodedPoint;
    use p256::ecdsa::signature::Verifier as _;
    use p256::ecdsa::{Signature, VerifyingKey};
    use tokio::sync::oneshot;

    const REDIRECT: &str = "https://app.example/cb";
    const ACTIVITY: &str =
        "https://www.googleapis.com/auth/googlehealth.activity_and_fitness.readonly";
    const METRICS: &str =
        "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly";
    const PROFILE: &str = "https://www.googleapis.com/auth/googlehealth.profile.readonly";
    /// RFC 7636 appendix B.
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    const UID: &str = "7583570207748835967";

    struct Sim {
        base: String,
        http: reqwest::Client,
        _stop: oneshot::Sender<()>,
    }

    async fn start(config: SimConfig) -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let state = SimState::new(config).unwrap();
        tokio::spawn(async move {
            serve_with_state(listener, state, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Sim {
            base: format!("http://{addr}"),
            http,
            _stop: tx,
        }
    }

    fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    async fn body_of(resp: reqwest::Response) -> (u16, HeaderMap, Value) {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, headers, value)
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
            let (status, _, v) = body_of(resp).await;
            assert!(status < 300, "{path}: {status} {v}");
            v
        }

        async fn sim(&self, path: &str, body: Value) -> Value {
            self.control(reqwest::Method::POST, path, body).await
        }

        async fn stats(&self) -> Value {
            self.control(reqwest::Method::GET, "/_sim/stats", json!({}))
                .await
        }

        /// Creates a user with tokens for client `app`; returns the access token.
        async fn user(&self, id: &str, scopes: Option<Vec<&str>>) -> String {
            let mut body = json!({
                "healthUserId": id, "legacyUserId": "26FWFL",
                "client_id": "app", "client_secret": "secret",
            });
            if let Some(s) = scopes {
                body["scopes"] = json!(s);
            }
            let v = self.sim("/_sim/users", body).await;
            v["access_token"].as_str().unwrap().to_owned()
        }

        async fn seed(&self, user: &str, data_type: &str, points: Value) -> Value {
            self.sim(
                &format!("/_sim/users/{user}/dataPoints"),
                json!({ "dataType": data_type, "points": points }),
            )
            .await
        }

        async fn get(
            &self,
            path: &str,
            token: Option<&str>,
            query: &[(&str, &str)],
        ) -> (u16, HeaderMap, Value) {
            let mut req = self.http.get(format!("{}{path}", self.base)).query(query);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            body_of(req.send().await.unwrap()).await
        }

        async fn list(&self, token: &str, data_type: &str, query: &[(&str, &str)]) -> (u16, Value) {
            let (s, _, v) = self
                .get(
                    &format!("/v4/users/me/dataTypes/{data_type}/dataPoints"),
                    Some(token),
                    query,
                )
                .await;
            (s, v)
        }

        /// Runs the authorize endpoint; returns the redirect's query parameters.
        async fn authorize(&self, params: &[(&str, &str)]) -> HashMap<String, String> {
            let resp = self
                .http
                .get(format!("{}/o/oauth2/v2/auth", self.base))
                .query(params)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), reqwest::StatusCode::FOUND);
            let location = resp.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(location.starts_with(REDIRECT), "{location}");
            let url = reqwest::Url::parse(&location).unwrap();
            url.query_pairs().into_owned().collect()
        }

        /// Code exchange for client `web` / `s3` (form authentication).
        async fn exchange(&self, code: &str, verifier: Option<&str>) -> (u16, Value) {
            let mut form = vec![
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("client_id", "web"),
                ("client_secret", "s3"),
            ];
            if let Some(v) = verifier {
                form.push(("code_verifier", v));
            }
            self.token(&form, None).await
        }

        async fn token(&self, form: &[(&str, &str)], auth: Option<&str>) -> (u16, Value) {
            let mut req = self.http.post(format!("{}/token", self.base)).form(form);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let (s, _, v) = body_of(req.send().await.unwrap()).await;
            (s, v)
        }
    }

    fn reason(v: &Value) -> &str {
        v["error"]["details"][0]["reason"].as_str().unwrap_or("")
    }

    fn steps(start: &str, end: &str, count: &str) -> Value {
        json!({
            "dataSource": { "recordingMethod": "PASSIVELY_MEASURED", "platform": "FITBIT",
                            "device": { "displayName": "Inspire 3", "formFactor": "FITNESS_BAND" } },
            "steps": {
                "interval": { "startTime": start, "startUtcOffset": "7200s",
                              "endTime": end, "endUtcOffset": "7200s" },
                "count": count,
            }
        })
    }

    fn heart_rate(at: &str, bpm: &str) -> Value {
        json!({
            "dataSource": { "recordingMethod": "PASSIVELY_MEASURED",
                            "device": { "displayName": "Inspire 3" }, "platform": "FITBIT" },
            "heartRate": {
                "sampleTime": { "physicalTime": at, "utcOffset": "19800s" },
                "beatsPerMinute": bpm,
            }
        })
    }

    // -- pure helpers -------------------------------------------------------------------------

    #[test]
    fn sha256_and_pkce_vectors() {
        let hex = |b: [u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            URL_SAFE_NO_PAD.encode(sha256(VERIFIER.as_bytes())),
            CHALLENGE
        );
    }

    #[test]
    fn filters_compile_per_time_shape() {
        let reason_of = |t: &str, f: &str| {
            let t = DataType::by_id(t).unwrap();
            match parse_filter(f) {
                Err(e) => e.reason,
                Ok(None) => "EMPTY",
                Ok(Some(e)) => match compile_filter(t, &e) {
                    Ok(_) => "OK",
                    Err(e) => e.reason,
                },
            }
        };
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" AND steps.interval.start_time < "2023-11-25T00:00:00Z""#
            ),
            "OK"
        );
        assert_eq!(
            reason_of(
                "weight",
                r#"weight.sample_time.civil_time >= "2024-08-14T12:34:56""#
            ),
            "OK"
        );
        assert_eq!(
            reason_of(
                "daily-heart-rate-variability",
                r#"daily_heart_rate_variability.date < "2024-08-15""#
            ),
            "OK"
        );
        assert_eq!(
            reason_of(
                "sleep",
                r#"(sleep.interval.end_time >= "2023-11-24T00:00:00Z" AND sleep.interval.end_time < "2023-11-25T00:00:00Z") OR sleep.interval.end_time >= "2024-01-01T00:00:00Z""#
            ),
            "OK"
        );
        assert_eq!(reason_of("steps", "   "), "EMPTY");
        // Sleep filters on the end time only; exercise on the civil start only.
        assert_eq!(
            reason_of(
                "sleep",
                r#"sleep.interval.start_time >= "2023-11-24T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER"
        );
        assert_eq!(
            reason_of(
                "exercise",
                r#"exercise.interval.start_time >= "2023-11-24T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER"
        );
        assert_eq!(
            reason_of(
                "electrocardiogram",
                r#"electrocardiogram.interval.start_time < "2024-08-14T12:34:56Z""#
            ),
            "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.start_time > "2023-11-24T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" OR steps.interval.start_time < "2023-11-25T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"heart_rate.sample_time.physical_time >= "2023-11-24T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_COLLECTION_MISMATCH"
        );
        assert_eq!(
            reason_of(
                "heart-rate",
                r#"heartRate.sample_time.physical_time >= "2023-11-24T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_DATA_TYPE_RESTRICTION"
        );
        assert_eq!(
            reason_of("steps", r#"steps.interval.start_time >= "2023-11-24""#),
            "INVALID_DATA_POINT_FILTER_TIMESTAMP_FORMAT"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.civil_start_time >= "2023/11/24""#
            ),
            "INVALID_DATA_POINT_FILTER_CIVIL_DATE_TIME_FORMAT"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.civil_start_time >= "2023-02-30""#
            ),
            "INVALID_CIVIL_DATE_TIME"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.civil_start_time >= "2023-11-24" AND steps.interval.start_time < "2023-11-25T00:00:00Z""#
            ),
            "INVALID_DATA_POINT_FILTER_MIXED_TIME_RESTRICTIONS"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.start_time >= 2023-11-24T00:00:00Z"#
            ),
            "INVALID_DATA_POINT_FILTER_RESTRICTION_ARGUMENT"
        );
        assert_eq!(
            reason_of(
                "steps",
                r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" AND"#
            ),
            "INVALID_DATA_POINT_FILTER_UNEXPECTED_END_OF_INPUT"
        );
        assert_eq!(
            reason_of("steps", r#"steps.interval.start_time >= "2023"#),
            "INVALID_DATA_POINT_FILTER_SYNTAX"
        );
    }

    #[test]
    fn civil_times_and_intervals_render_like_google() {
        let at = parse_instant("2026-09-09T01:24:33.390135Z").unwrap();
        assert_eq!(rfc3339(at), "2026-09-09T01:24:33.390135Z");
        let civil = local(at, -18000);
        assert_eq!(
            civil_json(civil),
            json!({"date":{"year":2026,"month":9,"day":8},
                   "time":{"hours":20,"minutes":24,"seconds":33,"nanos":390135000}})
        );
        let midnight = NaiveDate::from_ymd_opt(2026, 8, 13)
            .unwrap()
            .and_time(NaiveTime::MIN);
        assert_eq!(
            civil_json(midnight),
            json!({"date":{"year":2026,"month":8,"day":13},"time":{}})
        );
        let start = parse_instant("2026-03-08T01:29:00Z").unwrap();
        let end = parse_instant("2026-03-08T01:34:00Z").unwrap();
        let iv = interval_json(start, end, local(start, -28800), local(end, -28800));
        assert_eq!(
            iv,
            json!({
                "physicalTimeInterval": {"startTime":"2026-03-08T01:29:00Z","endTime":"2026-03-08T01:34:00Z"},
                "civilDateTimeInterval": {
                    "startDateTime": {"date":{"year":2026,"month":3,"day":7},"time":{"hours":17,"minutes":29}},
                    "endDateTime": {"date":{"year":2026,"month":3,"day":7},"time":{"hours":17,"minutes":34}},
                },
                "civilIso8601TimeInterval": {"startTime":"2026-03-07T17:29:00","endTime":"2026-03-07T17:34:00"},
            })
        );
    }

    // -- OAuth -------------------------------------------------------------------------------

    fn auth_params<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut p = vec![
            ("client_id", "web"),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
            ("state", "st-1"),
            ("user", UID),
        ];
        p.extend_from_slice(extra);
        p
    }

    #[tokio::test]
    async fn pkce_code_flow_granular_consent_and_scope_errors() {
        let sim = start(SimConfig::default()).await;
        sim.sim(
            "/_sim/apps",
            json!({ "client_id": "web", "client_secret": "s3" }),
        )
        .await;
        sim.sim("/_sim/users", json!({ "healthUserId": UID })).await;
        let both = format!("{ACTIVITY} {METRICS}");
        let pkce = [
            ("scope", both.as_str()),
            ("grant", ACTIVITY),
            ("access_type", "offline"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ];

        // Granular consent: only the activity scope is ticked.
        let q = sim.authorize(&auth_params(&pkce)).await;
        assert_eq!(q["state"], "st-1");
        assert_eq!(q["scope"], ACTIVITY);
        assert!(q["code"].starts_with("4/0A"));

        // Wrong verifier: invalid_grant, and the code is spent.
        let (status, err) = sim
            .exchange(
                &q["code"],
                Some("not-the-verifier-but-long-enough-to-pass-43-chars"),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            err,
            json!({ "error": "invalid_grant", "error_description": "Invalid code verifier." })
        );
        let (status, err) = sim.exchange(&q["code"], Some(VERIFIER)).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (400, Some("invalid_grant"))
        );

        // Missing verifier.
        let q = sim.authorize(&auth_params(&pkce)).await;
        let (status, err) = sim
            .token(
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &q["code"]),
                    ("redirect_uri", REDIRECT),
                    ("client_id", "web"),
                    ("client_secret", "s3"),
                ],
                None,
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(err["error_description"], "Missing code verifier.");

        // Right verifier, HTTP Basic client authentication.
        let q = sim.authorize(&auth_params(&pkce)).await;
        let (status, tokens) = sim
            .token(
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &q["code"]),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", VERIFIER),
                ],
                Some(&basic("web", "s3")),
            )
            .await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["token_type"], "Bearer");
        assert_eq!(tokens["expires_in"], 3599);
        assert_eq!(tokens["scope"], ACTIVITY);
        assert!(
            tokens["access_token"]
                .as_str()
                .unwrap()
                .starts_with("ya29.")
        );
        assert!(
            tokens["refresh_token"]
                .as_str()
                .unwrap()
                .starts_with("1//0")
        );
        assert!(tokens.get("refresh_token_expires_in").is_none());
        let access = tokens["access_token"].as_str().unwrap();

        // The granted scope covers steps, not heart rate.
        let (status, _) = sim.list(access, "steps", &[]).await;
        assert_eq!(status, 200);
        let (status, err) = sim.list(access, "heart-rate", &[]).await;
        assert_eq!(status, 403);
        assert_eq!(err["error"]["code"], 403);
        assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(
            err["error"]["details"][0],
            json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "MISSING_OAUTH_SCOPE",
                "domain": "health.googleapis.com",
                "metadata": { "dataType": "heart-rate" },
            })
        );

        // Consent already given: no new refresh token unless prompt=consent.
        let plain = [("scope", ACTIVITY), ("access_type", "offline")];
        let q = sim.authorize(&auth_params(&plain)).await;
        let (status, again) = sim.exchange(&q["code"], None).await;
        assert_eq!(status, 200);
        assert!(again.get("refresh_token").is_none(), "{again}");
        let forced = [
            ("scope", ACTIVITY),
            ("access_type", "offline"),
            ("prompt", "consent"),
        ];
        let q = sim.authorize(&auth_params(&forced)).await;
        let (_, again) = sim.exchange(&q["code"], None).await;
        assert!(again.get("refresh_token").is_some(), "{again}");
        // include_granted_scopes adds what was granted before.
        let incr = [("scope", METRICS), ("include_granted_scopes", "true")];
        let q = sim.authorize(&auth_params(&incr)).await;
        assert_eq!(q["scope"], format!("{METRICS} {ACTIVITY}"));

        // Client errors.
        let q = sim.authorize(&auth_params(&plain)).await;
        let (status, err) = sim
            .token(
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &q["code"]),
                    ("redirect_uri", REDIRECT),
                    ("client_id", "web"),
                    ("client_secret", "wrong"),
                ],
                None,
            )
            .await;
        assert_eq!(status, 401);
        assert_eq!(err["error"], "invalid_client");
        let resp = sim
            .http
            .get(format!("{}/o/oauth2/v2/auth", sim.base))
            .query(&auth_params(&[
                ("scope", ACTIVITY),
                ("code_challenge", CHALLENGE),
                ("code_challenge_method", "plain"),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let q = sim
            .authorize(&[
                ("client_id", "web"),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
                ("scope", ACTIVITY),
                ("user", "nobody"),
            ])
            .await;
        assert_eq!(q["error"], "access_denied");

        // A token with no data scope at all fails at the front end; cloud-platform is refused.
        let profile_only = sim.user("u-profile", Some(vec![PROFILE])).await;
        let (status, err) = sim.list(&profile_only, "steps", &[]).await;
        assert_eq!(
            (status, reason(&err)),
            (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
        );
        assert_eq!(err["error"]["details"][0]["domain"], "googleapis.com");
        let mixed = sim
            .user(
                "u-mixed",
                Some(vec!["activity_and_fitness.readonly", "cloud-platform"]),
            )
            .await;
        let (status, err) = sim.list(&mixed, "steps", &[]).await;
        assert_eq!((status, reason(&err)), (403, "DISALLOWED_OAUTH_SCOPES"));

        // Only successful exchanges count.
        assert_eq!(sim.stats().await["users"][UID]["code_exchanges"], 3);
    }

    #[tokio::test]
    async fn refresh_is_not_rotated_and_testing_tokens_die_after_seven_days() {
        let sim = start(SimConfig::default()).await;
        sim.sim(
            "/_sim/apps",
            json!({ "client_id": "web", "client_secret": "s3", "testing": true }),
        )
        .await;
        sim.sim(
            "/_sim/apps",
            json!({ "client_id": "prod", "client_secret": "p", "testing": false }),
        )
        .await;
        sim.sim("/_sim/users", json!({ "healthUserId": UID })).await;
        let code_flow = |client: &'static str, secret: &'static str| {
            let sim = &sim;
            async move {
                let q = sim
                    .authorize(&[
                        ("client_id", client),
                        ("redirect_uri", REDIRECT),
                        ("response_type", "code"),
                        ("scope", ACTIVITY),
                        ("access_type", "offline"),
                        ("user", UID),
                    ])
                    .await;
                let (status, tokens) = sim
                    .token(
                        &[
                            ("grant_type", "authorization_code"),
                            ("code", &q["code"]),
                            ("redirect_uri", REDIRECT),
                            ("client_id", client),
                            ("client_secret", secret),
                        ],
                        None,
                    )
                    .await;
                assert_eq!(status, 200, "{tokens}");
                tokens
            }
        };
        let testing = code_flow("web", "s3").await;
        assert_eq!(testing["refresh_token_expires_in"], 604_799);
        let prod = code_flow("prod", "p").await;
        assert!(prod.get("refresh_token_expires_in").is_none());
        let refresh = |client: &'static str, secret: &'static str, token: String| {
            let sim = &sim;
            async move {
                sim.token(
                    &[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", &token),
                        ("client_id", client),
                        ("client_secret", secret),
                    ],
                    None,
                )
                .await
            }
        };
        let rt = testing["refresh_token"].as_str().unwrap().to_owned();

        // No rotation: the same refresh token works again and again.
        for _ in 0..2 {
            let (status, r) = refresh("web", "s3", rt.clone()).await;
            assert_eq!(status, 200, "{r}");
            assert!(r.get("refresh_token").is_none());
            assert_eq!(r["expires_in"], 3599);
            assert_eq!(r["scope"], ACTIVITY);
            assert_ne!(r["access_token"], testing["access_token"]);
        }
        // Another client cannot use it.
        let (status, r) = refresh("prod", "p", rt.clone()).await;
        assert_eq!(
            (status, r["error"].as_str()),
            (400, Some("unauthorized_client"))
        );

        // The access token dies after an hour.
        let access = testing["access_token"].as_str().unwrap();
        sim.sim("/_sim/clock/advance", json!({ "seconds": 3_600 }))
            .await;
        let (status, err) = sim.list(access, "steps", &[]).await;
        assert_eq!((status, reason(&err)), (401, "ACCESS_TOKEN_EXPIRED"));

        // Six days on it still refreshes; past seven days it is expired.
        sim.sim(
            "/_sim/clock/advance",
            json!({ "seconds": 6 * 86_400 - 3_600 }),
        )
        .await;
        let (status, r) = refresh("web", "s3", rt.clone()).await;
        assert_eq!(status, 200, "{r}");
        let left = r["refresh_token_expires_in"].as_i64().unwrap();
        assert!((86_390..=86_399).contains(&left), "{left}");
        sim.sim("/_sim/clock/advance", json!({ "seconds": 86_400 }))
            .await;
        let (status, r) = refresh("web", "s3", rt).await;
        assert_eq!(status, 400);
        assert_eq!(
            r,
            json!({ "error": "invalid_grant", "error_description": "Token has been expired or revoked." })
        );
        // The production client's refresh token does not expire.
        let (status, _) = refresh(
            "prod",
            "p",
            prod["refresh_token"].as_str().unwrap().to_owned(),
        )
        .await;
        assert_eq!(status, 200);

        // Revocation kills the grant: refresh and its access tokens.
        let resp = sim
            .http
            .post(format!("{}/revoke", sim.base))
            .form(&[("token", prod["refresh_token"].as_str().unwrap())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let (status, r) = refresh(
            "prod",
            "p",
            prod["refresh_token"].as_str().unwrap().to_owned(),
        )
        .await;
        assert_eq!(
            (status, r["error_description"].as_str()),
            (400, Some(EXPIRED_OR_REVOKED))
        );
        let stats = sim.stats().await;
        assert_eq!(stats["users"][UID]["refreshes"], 4);
        assert_eq!(stats["users"][UID]["code_exchanges"], 2);
    }

    #[tokio::test]
    async fn identity_and_unlinked_accounts() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;
        let (status, _, v) = sim.get("/v4/users/me/identity", Some(&token), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(
            v,
            json!({ "name": "users/me/identity", "healthUserId": UID, "legacyUserId": "26FWFL" })
        );
        // Own numeric id accepted for identity; another id is refused.
        let (status, _, _) = sim
            .get(&format!("/v4/users/{UID}/identity"), Some(&token), &[])
            .await;
        assert_eq!(status, 200);
        let (status, _, v) = sim.get("/v4/users/123/identity", Some(&token), &[]).await;
        assert_eq!(
            (status, v["error"]["status"].as_str()),
            (403, Some("PERMISSION_DENIED"))
        );

        let v = sim
            .sim(
                "/_sim/users",
                json!({ "healthUserId": "u-new", "client_id": "app", "client_secret": "secret" }),
            )
            .await;
        let (_, _, identity) = sim
            .get("/v4/users/me/identity", v["access_token"].as_str(), &[])
            .await;
        assert_eq!(
            identity,
            json!({ "name": "users/me/identity", "healthUserId": "u-new" })
        );

        let v = sim
            .sim(
                "/_sim/users",
                json!({ "healthUserId": "u-nolink", "linked": false,
                        "client_id": "app", "client_secret": "secret" }),
            )
            .await;
        let token = v["access_token"].as_str().unwrap();
        for path in [
            "/v4/users/me/identity",
            "/v4/users/me/dataTypes/steps/dataPoints",
        ] {
            let (status, _, err) = sim.get(path, Some(token), &[]).await;
            assert_eq!(status, 400, "{path}");
            assert_eq!(
                err,
                json!({ "error": {
                    "code": 400,
                    "message": "The Google account is not linked to a Fitbit account.",
                    "status": "FAILED_PRECONDITION",
                    "details": [{
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "ACCOUNT_NOT_LINKED",
                        "domain": "health.googleapis.com",
                    }],
                }})
            );
        }
    }

    // -- data ---------------------------------------------------------------------------------

    #[tokio::test]
    async fn list_filters_pages_and_keeps_the_wire_format() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;

        // Empty: exactly {}.
        let resp = sim
            .http
            .get(format!(
                "{}/v4/users/me/dataTypes/steps/dataPoints",
                sim.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.text().await.unwrap(), "{}");

        let points: Vec<Value> = (0..5)
            .map(|i| {
                steps(
                    &format!("2026-07-23T08:0{i}:00Z"),
                    &format!("2026-07-23T08:0{}:00Z", i + 1),
                    &format!("{}", 100 + i),
                )
            })
            .collect();
        let v = sim.seed(UID, "steps", json!(points)).await;
        assert_eq!(v, json!({ "stored": 5, "notifications": 0 }));

        // Descending by start time, served verbatim (int64 as strings).
        let (status, all) = sim.list(&token, "steps", &[]).await;
        assert_eq!(status, 200);
        let counts: Vec<&str> = all["dataPoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["steps"]["count"].as_str().unwrap())
            .collect();
        assert_eq!(counts, ["104", "103", "102", "101", "100"]);
        assert_eq!(all["dataPoints"][0], points[4]);
        assert!(all.get("nextPageToken").is_none());

        // Filter [08:01, 08:04) and pages of 2 with the token round trip.
        let filter = r#"steps.interval.start_time >= "2026-07-23T08:01:00Z" AND steps.interval.start_time < "2026-07-23T08:04:00Z""#;
        let (_, p1) = sim
            .list(&token, "steps", &[("filter", filter), ("pageSize", "2")])
            .await;
        let counts = |v: &Value| -> Vec<String> {
            v["dataPoints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| p["steps"]["count"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(counts(&p1), ["103", "102"]);
        let tok = p1["nextPageToken"].as_str().unwrap().to_owned();
        // A point inserted before the cursor does not shift the next page.
        sim.seed(
            UID,
            "steps",
            json!([steps("2026-07-23T08:03:30Z", "2026-07-23T08:03:40Z", "7")]),
        )
        .await;
        let (_, p2) = sim
            .list(
                &token,
                "steps",
                &[("filter", filter), ("pageSize", "2"), ("pageToken", &tok)],
            )
            .await;
        assert_eq!(counts(&p2), ["101"]);
        assert!(p2.get("nextPageToken").is_none());
        // The token belongs to its query.
        let (status, err) = sim
            .list(&token, "steps", &[("pageSize", "2"), ("pageToken", &tok)])
            .await;
        assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_TOKEN"));
        let (status, err) = sim
            .list(
                &token,
                "steps",
                &[("filter", filter), ("pageToken", "garbage")],
            )
            .await;
        assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_TOKEN"));
        // Civil filter: 08:00Z at +02:00 is 10:00 local.
        let (_, civil) = sim
            .list(
                &token,
                "steps",
                &[(
                    "filter",
                    r#"steps.interval.civil_start_time >= "2026-07-23T10:03:00""#,
                )],
            )
            .await;
        assert_eq!(counts(&civil), ["104", "7", "103"]);
        // Replacement: same start, unnamed → replaced.
        sim.seed(
            UID,
            "steps",
            json!([steps("2026-07-23T08:04:00Z", "2026-07-23T08:05:00Z", "999")]),
        )
        .await;
        let (_, civil) = sim
            .list(
                &token,
                "steps",
                &[(
                    "filter",
                    r#"steps.interval.civil_start_time >= "2026-07-23T10:04:00""#,
                )],
            )
            .await;
        assert_eq!(counts(&civil), ["999"]);
        // Deletion by start time.
        let v = sim
            .control(
                reqwest::Method::DELETE,
                &format!("/_sim/users/{UID}/dataPoints"),
                json!({ "dataType": "steps", "startTimes": ["2026-07-23T08:03:30Z"] }),
            )
            .await;
        assert_eq!(v["deleted"], 1);

        // Errors: bad filter, numeric parent, camelCase type, unsupported action, page size.
        let (status, err) = sim
            .list(
                &token,
                "steps",
                &[(
                    "filter",
                    r#"steps.interval.start_time > "2026-07-23T08:01:00Z""#,
                )],
            )
            .await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR")
        );
        assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
        let (status, _, err) = sim
            .get(
                &format!("/v4/users/{UID}/dataTypes/steps/dataPoints"),
                Some(&token),
                &[],
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            err,
            json!({ "error": { "code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT" } })
        );
        let (status, err) = sim.list(&token, "heartRate", &[]).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_PARENT_DATA_TYPE_COLLECTION")
        );
        assert_eq!(
            err["error"]["message"],
            "Invalid data type ID referenced in the parent data type collection: heartRate"
        );
        assert_eq!(
            err["error"]["details"][1]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        let (status, err) = sim.list(&token, "floors", &[]).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "UNSUPPORTED_DATA_TYPE_ACTION")
        );
        let (status, err) = sim.list(&token, "steps", &[("pageSize", "-1")]).await;
        assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_SIZE"));

        // Sample, daily and session types; NaN strings and civil times survive verbatim.
        sim.seed(
            UID,
            "heart-rate",
            json!([
                heart_rate("2026-08-29T05:29:57Z", "61"),
                heart_rate("2026-08-29T05:30:57Z", "64")
            ]),
        )
        .await;
        let (_, hr) = sim
            .list(
                &token,
                "heart-rate",
                &[(
                    "filter",
                    r#"heart_rate.sample_time.physical_time < "2026-08-29T05:30:00Z""#,
                )],
            )
            .await;
        assert_eq!(hr["dataPoints"].as_array().unwrap().len(), 1);
        assert_eq!(hr["dataPoints"][0]["heartRate"]["beatsPerMinute"], "61");
        let temp = json!({
            "dataSource": { "platform": "FITBIT" },
            "dailySleepTemperatureDerivations": {
                "date": { "year": 2026, "month": 8, "day": 14 },
                "nightlyTemperatureCelsius": 34.1,
                "baselineTemperatureCelsius": "NaN",
            }
        });
        sim.seed(UID, "daily-sleep-temperature-derivations", json!([temp]))
            .await;
        let (_, d) = sim
            .list(
                &token,
                "daily-sleep-temperature-derivations",
                &[("filter", r#"daily_sleep_temperature_derivations.date >= "2026-08-14" AND daily_sleep_temperature_derivations.date < "2026-08-15""#)],
            )
            .await;
        assert_eq!(d["dataPoints"][0], temp);
        let night = |id: &str, start: &str, end: &str| {
            json!({
                "name": format!("users/{UID}/dataTypes/sleep/dataPoints/{id}"),
                "dataSource": { "recordingMethod": "MANUAL", "platform": "FITBIT" },
                "sleep": {
                    "interval": { "startTime": start, "startUtcOffset": "19800s",
                                  "endTime": end, "endUtcOffset": "19800s" },
                    "type": "STAGES",
                    "stages": [{ "startTime": start, "startUtcOffset": "19800s",
                                 "endTime": end, "endUtcOffset": "19800s", "type": "LIGHT" }],
                    "metadata": { "processed": true, "mainSleep": true },
                    "summary": { "minutesAsleep": "480", "minutesAwake": "0" },
                }
            })
        };
        sim.seed(
            UID,
            "sleep",
            json!([
                night(
                    "1218857650621109392",
                    "2026-08-27T17:24:00Z",
                    "2026-08-28T01:24:00Z"
                ),
                night(
                    "1218857650621109393",
                    "2026-08-28T17:24:00Z",
                    "2026-08-29T01:24:00Z"
                ),
            ]),
        )
        .await;
        let (_, s) = sim
            .list(&token, "sleep", &[("filter", r#"sleep.interval.end_time >= "2026-08-28T00:00:00Z" AND sleep.interval.end_time < "2026-08-29T00:00:00Z""#)])
            .await;
        assert_eq!(s["dataPoints"].as_array().unwrap().len(), 1);
        assert_eq!(
            s["dataPoints"][0]["name"],
            format!("users/{UID}/dataTypes/sleep/dataPoints/1218857650621109392")
        );
        // A named point replaces the stored one with the same name; get finds it.
        let mut edited = night(
            "1218857650621109392",
            "2026-08-27T17:30:00Z",
            "2026-08-28T01:24:00Z",
        );
        edited["sleep"]["metadata"]["manuallyEdited"] = json!(true);
        sim.seed(UID, "sleep", json!([edited.clone()])).await;
        let (_, s) = sim.list(&token, "sleep", &[("pageSize", "100")]).await;
        assert_eq!(s["dataPoints"].as_array().unwrap().len(), 2);
        let (status, _, got) = sim
            .get(
                "/v4/users/me/dataTypes/sleep/dataPoints/1218857650621109392",
                Some(&token),
                &[],
            )
            .await;
        assert_eq!((status, got), (200, edited));
        let (status, _, err) = sim
            .get(
                "/v4/users/me/dataTypes/sleep/dataPoints/nope",
                Some(&token),
                &[],
            )
            .await;
        assert_eq!((status, reason(&err)), (404, "RESOURCE_NOT_FOUND"));

        let stats = sim.stats().await;
        // Calls rejected before the data type was resolved and checked do not count.
        assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 10);
    }

    /// `POST …/{data_type}/dataPoints:dailyRollUp` with `body`; the status and the raw body.
    async fn roll_up_raw(sim: &Sim, token: Option<&str>, path: &str, body: &str) -> (u16, String) {
        let mut req = sim
            .http
            .post(format!("{}{path}", sim.base))
            .header(header::CONTENT_TYPE, "application/json")
            .query(&[("prettyPrint", "false")])
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn roll_up(sim: &Sim, token: &str, data_type: &str, body: Value) -> (u16, Value) {
        let path = format!("/v4/users/me/dataTypes/{data_type}/dataPoints:dailyRollUp");
        let (status, text) = roll_up_raw(sim, Some(token), &path, &body.to_string()).await;
        (status, serde_json::from_str(&text).unwrap())
    }

    /// A `DailyRollUpDataPointsRequest` of `[from, to)` (`YYYY-MM-DD`).
    fn roll_up_body(from: &str, to: &str, window: Option<i64>) -> Value {
        let date = |s: &str| {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
            json!({ "date": date_json(d) })
        };
        let mut body = json!({ "range": { "start": date(from), "end": date(to) } });
        if let Some(w) = window {
            body["windowSizeDays"] = json!(w);
        }
        body
    }

    /// Civil-day row bounds as Google writes them.
    fn day_bounds(from: (i32, u32, u32), to: (i32, u32, u32)) -> (Value, Value) {
        let civil = |(y, m, d): (i32, u32, u32)| json!({ "date": { "year": y, "month": m, "day": d }, "time": {} });
        (civil(from), civil(to))
    }

    fn steps_at(start: &str, offset: &str, count: &str) -> Value {
        let end = (parse_instant(start).unwrap() + TimeDelta::minutes(1))
            .to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut p = steps(start, &end, count);
        p["steps"]["interval"]["startUtcOffset"] = json!(offset);
        p["steps"]["interval"]["endUtcOffset"] = json!(offset);
        p
    }

    #[test]
    fn roll_up_values_render_like_google() {
        assert_eq!(double_json(69.0), json!(69));
        assert_eq!(double_json(62.5), json!(62.5));
        assert_eq!(duration_json(TimeDelta::seconds(3600)), "3600s");
        assert_eq!(duration_json(TimeDelta::milliseconds(1500)), "1.500s");
        assert_eq!(
            duration_json(TimeDelta::nanoseconds(1_000_001)),
            "0.001000001s"
        );
        assert_eq!(snake_case("windowSizeDays"), "window_size_days");
        let steps_t = DataType::by_id("steps").unwrap();
        let hr = DataType::by_id("heart-rate").unwrap();
        assert_eq!((rollup_cap_days(steps_t), rollup_cap_days(hr)), (90, 14));
        // Every type the simulator rolls up supports dailyRollUp and has a row key of its own.
        for t in DATA_TYPES {
            if rollup_kind(t).is_some() {
                assert!(t.supports(OP_DAILY_ROLLUP), "{}", t.id);
            }
        }
        assert_eq!(
            rollup_kind(DataType::by_id("total-calories").unwrap()),
            None
        );
    }

    #[tokio::test]
    async fn daily_roll_up_sums_steps_per_civil_day() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;
        let est = "-18000s";
        // An explicit civil start wins over instant + offset (02:00Z at +00:00 would be the 26th).
        let mut civil = steps_at("2026-07-26T02:00:00Z", "0s", "9");
        civil["steps"]["interval"]["civilStartTime"] =
            json!({ "date": { "year": 2026, "month": 7, "day": 25 }, "time": { "hours": 21 } });
        let mut phone = steps_at("2026-07-23T14:00:00Z", est, "5");
        phone["dataSource"] =
            json!({ "platform": "HEALTH_CONNECT", "device": { "formFactor": "PHONE" } });
        sim.seed(
            UID,
            "steps",
            json!([
                // Civil 2026-07-21 19:00: before the range.
                steps_at("2026-07-22T00:00:00Z", est, "100000"),
                // Civil 2026-07-22 18:30 and 22:00 (the second after UTC midnight).
                steps_at("2026-07-22T23:30:00Z", est, "100"),
                steps_at("2026-07-23T03:00:00Z", est, "50"),
                // Civil 2026-07-23 00:30 and 11:00.
                steps_at("2026-07-23T05:30:00Z", est, "7"),
                steps_at("2026-07-23T16:00:00Z", est, "1000"),
                phone,
                // Nothing on the 24th. Civil 2026-07-25 07:00.
                steps_at("2026-07-25T12:00:00Z", est, "42"),
                civil,
                // Civil 2026-07-26 23:00, the last day of the range.
                steps_at("2026-07-27T04:00:00Z", est, "3"),
                // Civil 2026-07-27 01:00: the range end is exclusive.
                steps_at("2026-07-27T06:00:00Z", est, "100000"),
            ]),
        )
        .await;

        let row = |from, to, count: &str| {
            let (s, e) = day_bounds(from, to);
            json!({ "civilStartTime": s, "civilEndTime": e, "steps": { "countSum": count } })
        };
        let daily = json!({ "rollupDataPoints": [
            row((2026, 7, 22), (2026, 7, 23), "150"),
            row((2026, 7, 23), (2026, 7, 24), "1012"),
            row((2026, 7, 25), (2026, 7, 26), "51"),
            row((2026, 7, 26), (2026, 7, 27), "3"),
        ]});
        let (status, v) = roll_up(
            &sim,
            &token,
            "steps",
            roll_up_body("2026-07-22", "2026-07-27", Some(1)),
        )
        .await;
        assert_eq!((status, &v), (200, &daily));
        // windowSizeDays defaults to 1; snake_case names are accepted; no page token, ever.
        let (status, v) = roll_up(
            &sim,
            &token,
            "steps",
            roll_up_body("2026-07-22", "2026-07-27", None),
        )
        .await;
        assert_eq!((status, &v), (200, &daily));
        let mut snake = roll_up_body("2026-07-22", "2026-07-27", None);
        snake["window_size_days"] = json!("1");
        snake["page_size"] = json!(5);
        let (status, v) = roll_up(&sim, &token, "steps", snake).await;
        assert_eq!((status, &v), (200, &daily));
        sim.sim("/_sim/config", json!({ "empty_next_page_token": true }))
            .await;
        let path = "/v4/users/me/dataTypes/steps/dataPoints:dailyRollUp";
        let body = roll_up_body("2026-07-22", "2026-07-27", Some(1)).to_string();
        let (status, text) = roll_up_raw(&sim, Some(&token), path, &body).await;
        assert_eq!(status, 200);
        assert!(!text.contains("nextPageToken"), "{text}");
        // No data in the range: exactly {}.
        let body = roll_up_body("2026-08-01", "2026-08-03", Some(1)).to_string();
        assert_eq!(
            roll_up_raw(&sim, Some(&token), path, &body).await,
            (200, "{}".to_owned())
        );

        // Windows of 2 days from the range start; the last one is cut at the range end.
        let (_, v) = roll_up(
            &sim,
            &token,
            "steps",
            roll_up_body("2026-07-22", "2026-07-27", Some(2)),
        )
        .await;
        assert_eq!(
            v,
            json!({ "rollupDataPoints": [
                row((2026, 7, 22), (2026, 7, 24), "1162"),
                row((2026, 7, 24), (2026, 7, 26), "51"),
                row((2026, 7, 26), (2026, 7, 27), "3"),
            ]})
        );

        // Source families.
        let mut wear = roll_up_body("2026-07-23", "2026-07-24", None);
        wear["dataSourceFamily"] = json!("users/me/dataSourceFamilies/google-wearables");
        let (_, v) = roll_up(&sim, &token, "steps", wear).await;
        assert_eq!(
            v,
            json!({ "rollupDataPoints": [row((2026, 7, 23), (2026, 7, 24), "1007")] })
        );

        // Averages and extremes of samples (+05:30: 20:00Z is the next civil day).
        sim.seed(
            UID,
            "heart-rate",
            json!([
                heart_rate("2026-08-29T05:29:57Z", "61"),
                heart_rate("2026-08-29T05:30:57Z", "64"),
                heart_rate("2026-08-29T20:00:00Z", "70"),
            ]),
        )
        .await;
        let (status, v) = roll_up(
            &sim,
            &token,
            "heart-rate",
            roll_up_body("2026-08-29", "2026-09-12", None),
        )
        .await;
        let (s29, e29) = day_bounds((2026, 8, 29), (2026, 8, 30));
        let (s30, e30) = day_bounds((2026, 8, 30), (2026, 8, 31));
        assert_eq!(status, 200);
        assert_eq!(
            v,
            json!({ "rollupDataPoints": [
                { "civilStartTime": s29, "civilEndTime": e29, "heartRate":
                    { "beatsPerMinuteAvg": 62.5, "beatsPerMinuteMin": 61, "beatsPerMinuteMax": 64 } },
                { "civilStartTime": s30, "civilEndTime": e30, "heartRate":
                    { "beatsPerMinuteAvg": 70, "beatsPerMinuteMin": 70, "beatsPerMinuteMax": 70 } },
            ]})
        );

        // Grouped values: active minutes by level, time in zone as summed interval lengths.
        let interval = |start: &str, end: &str| json!({ "startTime": start, "endTime": end, "startUtcOffset": "0s", "endUtcOffset": "0s" });
        sim.seed(
            UID,
            "active-minutes",
            json!([
                { "activeMinutes": { "interval": interval("2026-08-01T10:00:00Z", "2026-08-01T11:00:00Z"),
                  "activeMinutesByActivityLevel": [
                      { "activityLevel": "VIGOROUS", "activeMinutes": "5" },
                      { "activityLevel": "LIGHT", "activeMinutes": "20" } ] } },
                { "activeMinutes": { "interval": interval("2026-08-01T12:00:00Z", "2026-08-01T13:00:00Z"),
                  "activeMinutesByActivityLevel": [
                      { "activityLevel": "LIGHT", "activeMinutes": "10" } ] } },
            ]),
        )
        .await;
        sim.seed(
            UID,
            "time-in-heart-rate-zone",
            json!([
                { "timeInHeartRateZone": { "interval": interval("2026-08-01T10:00:00Z", "2026-08-01T10:30:00Z"),
                  "heartRateZoneType": "PEAK" } },
                { "timeInHeartRateZone": { "interval": interval("2026-08-01T11:00:00Z", "2026-08-01T11:00:01.5Z"),
                  "heartRateZoneType": "PEAK" } },
                { "timeInHeartRateZone": { "interval": interval("2026-08-01T12:00:00Z", "2026-08-01T12:01:00Z"),
                  "heartRateZoneType": "LIGHT" } },
            ]),
        )
        .await;
        let (_, v) = roll_up(
            &sim,
            &token,
            "active-minutes",
            roll_up_body("2026-08-01", "2026-08-02", None),
        )
        .await;
        assert_eq!(
            v["rollupDataPoints"][0]["activeMinutes"],
            json!({ "activeMinutesRollupByActivityLevel": [
                { "activityLevel": "LIGHT", "activeMinutesSum": "30" },
                { "activityLevel": "VIGOROUS", "activeMinutesSum": "5" },
            ]})
        );
        let (_, v) = roll_up(
            &sim,
            &token,
            "time-in-heart-rate-zone",
            roll_up_body("2026-08-01", "2026-08-02", None),
        )
        .await;
        assert_eq!(
            v["rollupDataPoints"][0]["timeInHeartRateZone"],
            json!({ "timeInHeartRateZones": [
                { "heartRateZone": "LIGHT", "duration": "60s" },
                { "heartRateZone": "PEAK", "duration": "1801.500s" },
            ]})
        );
        let stats = sim.stats().await;
        assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 7);
    }

    #[tokio::test]
    async fn daily_roll_up_caps_scopes_and_errors() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;
        let call = |t: &'static str, body: Value| {
            let (sim, token) = (&sim, token.clone());
            async move { roll_up(sim, &token, t, body).await }
        };

        // Range caps: 90 days (steps), 14 days (heart-rate), counted in whole windows.
        let (status, v) = call("steps", roll_up_body("2026-01-01", "2026-04-01", None)).await;
        assert_eq!((status, v), (200, json!({})), "90 days");
        let (status, err) = call("steps", roll_up_body("2026-01-01", "2026-04-02", None)).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_ROLLUP_QUERY_DURATION")
        );
        assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(
            err["error"]["details"][0]["domain"],
            "health.googleapis.com"
        );
        let (status, _) = call("heart-rate", roll_up_body("2026-01-01", "2026-01-15", None)).await;
        assert_eq!(status, 200, "14 days");
        let (status, err) =
            call("heart-rate", roll_up_body("2026-01-01", "2026-01-16", None)).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_ROLLUP_QUERY_DURATION")
        );
        // Weekly windows: ⌊90/7⌋ = 12 windows; 84 days fit, 85 need a 13th.
        let (status, _) = call("steps", roll_up_body("2026-01-01", "2026-03-26", Some(7))).await;
        assert_eq!(status, 200);
        let (status, err) = call("steps", roll_up_body("2026-01-01", "2026-03-27", Some(7))).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_ROLLUP_QUERY_DURATION")
        );
        // pageSize bounds the query: above the ceiling, or below the windows of the range.
        let with_page = |from, to, window, size: i64| {
            let mut b = roll_up_body(from, to, Some(window));
            b["pageSize"] = json!(size);
            b
        };
        let (status, err) = call("steps", with_page("2026-01-01", "2026-01-02", 7, 13)).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_ROLLUP_QUERY_DURATION")
        );
        let (status, err) = call("steps", with_page("2026-01-01", "2026-01-21", 7, 2)).await;
        assert_eq!((status, reason(&err)), (400, "INVALID_DATA_POINT_NAME"));
        let (status, _) = call("steps", with_page("2026-01-01", "2026-01-21", 7, 3)).await;
        assert_eq!(status, 200);
        let (status, err) = call("steps", with_page("2026-01-01", "2026-01-02", 1, -1)).await;
        assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_SIZE"));

        // The body.
        let day = roll_up_body("2026-01-01", "2026-01-02", None);
        let mut cases: Vec<(Value, &str)> = Vec::new();
        cases.push((json!({}), "INVALID_TIME_RANGE_INTERVAL_FORMAT"));
        cases.push((
            json!({ "range": { "start": day["range"]["start"] } }),
            "INVALID_TIME_RANGE_INTERVAL_FORMAT",
        ));
        cases.push((
            roll_up_body("2026-01-02", "2026-01-02", None),
            "INVALID_TIME_RANGE",
        ));
        let mut bad_date = day.clone();
        bad_date["range"]["end"]["date"]["month"] = json!(13);
        cases.push((bad_date, "INVALID_CIVIL_DATE_TIME"));
        let mut no_date = day.clone();
        no_date["range"]["end"] = json!({ "time": {} });
        cases.push((no_date, "INVALID_CIVIL_DATE_TIME"));
        let mut misaligned = day.clone();
        misaligned["range"]["start"]["time"] = json!({ "hours": 5 });
        cases.push((misaligned, "INVALID_ROLLUP_WINDOW"));
        cases.push((
            roll_up_body("2026-01-01", "2026-01-02", Some(-1)),
            "INVALID_ROLLUP_WINDOW",
        ));
        let mut family = day.clone();
        family["dataSourceFamily"] = json!("phones");
        cases.push((family, "INVALID_DATA_POINT_DATA_SOURCE_FAMILY"));
        for (body, want) in cases {
            let (status, err) = call("steps", body.clone()).await;
            assert_eq!((status, reason(&err)), (400, want), "{body}");
        }
        // Bodies the transcoder refuses: a BadRequest detail and no ErrorInfo.
        let path = "/v4/users/me/dataTypes/steps/dataPoints:dailyRollUp";
        let mut unknown = day.clone();
        unknown["windowSize"] = json!("86400s");
        let mut wrong_type = day.clone();
        wrong_type["windowSizeDays"] = json!("one");
        for body in [
            "{\"range\":".to_owned(),
            "[]".to_owned(),
            unknown.to_string(),
            wrong_type.to_string(),
        ] {
            let (status, text) = roll_up_raw(&sim, Some(&token), path, &body).await;
            let err: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(status, 400, "{body}");
            assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
            assert_eq!(
                err["error"]["details"][0]["@type"], "type.googleapis.com/google.rpc.BadRequest",
                "{body}"
            );
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Invalid"),
                "{err}"
            );
        }

        // Checks before the body, in the order of the other data methods.
        let (status, text) = roll_up_raw(&sim, None, path, &day.to_string()).await;
        assert_eq!(status, 401, "{text}");
        let profile_only = sim.user("u-profile", Some(vec![PROFILE])).await;
        let (status, err) = roll_up(&sim, &profile_only, "steps", day.clone()).await;
        assert_eq!(
            (status, reason(&err)),
            (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
        );
        assert_eq!(
            err["error"]["details"][0]["metadata"]["method"],
            "google.devicesandservices.health.v4.DataPointsService.DailyRollUpDataPoints"
        );
        // A write scope is not a roll-up scope.
        let write_only = sim
            .user("u-write", Some(vec!["activity_and_fitness.writeonly"]))
            .await;
        let (status, err) = roll_up(&sim, &write_only, "steps", day.clone()).await;
        assert_eq!(
            (status, reason(&err)),
            (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
        );
        let metrics_only = sim.user("u-metrics", Some(vec![METRICS])).await;
        let (status, err) = roll_up(&sim, &metrics_only, "steps", day.clone()).await;
        assert_eq!((status, reason(&err)), (403, "MISSING_OAUTH_SCOPE"));
        assert_eq!(err["error"]["details"][0]["metadata"]["dataType"], "steps");
        let (status, _) = roll_up(&sim, &metrics_only, "heart-rate", day.clone()).await;
        assert_eq!(status, 200);
        let mixed = sim
            .user(
                "u-mixed",
                Some(vec!["activity_and_fitness.readonly", "cloud-platform"]),
            )
            .await;
        let (status, err) = roll_up(&sim, &mixed, "steps", day.clone()).await;
        assert_eq!((status, reason(&err)), (403, "DISALLOWED_OAUTH_SCOPES"));
        let numeric = format!("/v4/users/{UID}/dataTypes/steps/dataPoints:dailyRollUp");
        let (status, text) = roll_up_raw(&sim, Some(&token), &numeric, &day.to_string()).await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&text).unwrap()),
            (
                400,
                json!({ "error": { "code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT" } })
            )
        );
        let (status, err) = call("heartRate", day.clone()).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_PARENT_DATA_TYPE_COLLECTION")
        );
        let (status, err) = call("activity-level", day.clone()).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "UNSUPPORTED_DATA_TYPE_ACTION")
        );
        assert_eq!(
            err["error"]["message"],
            "The data type 'activity-level' does not support the dailyRollUp action."
        );
        // A type check comes before the body: an unsupported type with a bad body is still 400
        // UNSUPPORTED_DATA_TYPE_ACTION.
        let (status, err) = call("sleep", json!({})).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "UNSUPPORTED_DATA_TYPE_ACTION")
        );
        // Roll-up-only types the simulator cannot compute.
        let (status, err) = call("total-calories", day.clone()).await;
        assert_eq!(
            (status, err["error"]["status"].as_str()),
            (501, Some("UNIMPLEMENTED"))
        );
        let v = sim
            .sim(
                "/_sim/users",
                json!({ "healthUserId": "u-nolink", "linked": false,
                        "client_id": "app", "client_secret": "secret" }),
            )
            .await;
        let unlinked = v["access_token"].as_str().unwrap();
        let (status, err) = roll_up(&sim, unlinked, "steps", day.clone()).await;
        assert_eq!((status, reason(&err)), (400, "ACCOUNT_NOT_LINKED"));
        // rollUp stays unimplemented.
        let (status, _) = roll_up_raw(
            &sim,
            Some(&token),
            "/v4/users/me/dataTypes/steps/dataPoints:rollUp",
            "{}",
        )
        .await;
        assert_eq!(status, 501);
    }

    #[tokio::test]
    async fn reconcile_strips_sources_and_honours_families() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;
        let mut phone = steps("2026-07-23T09:00:00Z", "2026-07-23T09:01:00Z", "40");
        phone["dataSource"] =
            json!({ "platform": "HEALTH_CONNECT", "device": { "formFactor": "PHONE" } });
        let weight = json!({
            "name": format!("users/{UID}/dataTypes/weight/dataPoints/w1"),
            "dataSource": { "recordingMethod": "MANUAL", "platform": "FITBIT" },
            "weight": {
                "sampleTime": {
                    "physicalTime": "2026-09-09T01:24:33.390135Z", "utcOffset": "-18000s",
                    "civilTime": { "date": { "year": 2026, "month": 9, "day": 8 },
                                   "time": { "hours": 20, "minutes": 24, "seconds": 33, "nanos": 390135000 } }
                },
                "weightGrams": 79832
            }
        });
        sim.seed(
            UID,
            "steps",
            json!([
                steps("2026-07-23T08:00:00Z", "2026-07-23T08:01:00Z", "125"),
                phone
            ]),
        )
        .await;
        sim.seed(UID, "weight", json!([weight])).await;
        let reconcile = |t: &'static str, q: Vec<(&'static str, &'static str)>| {
            let (sim, token) = (&sim, token.clone());
            async move {
                let (s, _, v) = sim
                    .get(
                        &format!("/v4/users/me/dataTypes/{t}/dataPoints:reconcile"),
                        Some(&token),
                        &q,
                    )
                    .await;
                (s, v)
            }
        };
        let (status, all) = reconcile("steps", vec![]).await;
        assert_eq!(status, 200);
        assert_eq!(
            all,
            json!({ "dataPoints": [
                { "steps": { "interval": { "startTime": "2026-07-23T09:00:00Z", "startUtcOffset": "7200s",
                    "endTime": "2026-07-23T09:01:00Z", "endUtcOffset": "7200s" }, "count": "40" } },
                { "steps": { "interval": { "startTime": "2026-07-23T08:00:00Z", "startUtcOffset": "7200s",
                    "endTime": "2026-07-23T08:01:00Z", "endUtcOffset": "7200s" }, "count": "125" } },
            ]})
        );
        let (_, wear) = reconcile(
            "steps",
            vec![(
                "dataSourceFamily",
                "users/me/dataSourceFamilies/google-wearables",
            )],
        )
        .await;
        assert_eq!(wear["dataPoints"].as_array().unwrap().len(), 1);
        assert_eq!(wear["dataPoints"][0]["steps"]["count"], "125");
        let (status, err) = reconcile("steps", vec![("dataSourceFamily", "phones")]).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "INVALID_DATA_POINT_DATA_SOURCE_FAMILY")
        );
        let (_, w) = reconcile("weight", vec![]).await;
        assert_eq!(
            w["dataPoints"][0]["dataPointName"],
            format!("users/{UID}/dataTypes/weight/dataPoints/w1")
        );
        assert!(w["dataPoints"][0].get("dataSource").is_none());
        assert!(w["dataPoints"][0].get("name").is_none());
        assert_eq!(w["dataPoints"][0]["weight"]["weightGrams"], 79832);
        let (status, err) = reconcile("electrocardiogram", vec![]).await;
        assert_eq!(
            (status, reason(&err)),
            (400, "UNSUPPORTED_DATA_TYPE_ACTION")
        );
        let (status, _) = reconcile("heartRate", vec![]).await;
        assert_eq!(status, 400);
        let (_, empty) = reconcile("sleep", vec![]).await;
        assert_eq!(empty, json!({}));
    }

    #[tokio::test]
    async fn unauthenticated_envelopes() {
        let sim = start(SimConfig::default()).await;
        let token = sim.user(UID, None).await;
        let expect = |reason: &str, message: &str| {
            json!({ "error": {
                "code": 401,
                "message": message,
                "status": "UNAUTHENTICATED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "googleapis.com",
                    "metadata": {
                        "service": "health.googleapis.com",
                        "method": "google.devicesandservices.health.v4.DataPointsService.ListDataPoints",
                    },
                }],
            }})
        };
        let (status, headers, v) = sim
            .get("/v4/users/me/dataTypes/steps/dataPoints", None, &[])
            .await;
        assert_eq!(status, 401);
        assert_eq!(v, expect("CREDENTIALS_MISSING", MSG_MISSING_CREDENTIALS));
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        let (status, v) = sim.list("ya29.unknown", "steps", &[]).await;
        assert_eq!(status, 401);
        assert_eq!(
            v,
            expect("ACCESS_TOKEN_TYPE_UNSUPPORTED", MSG_INVALID_CREDENTIALS)
        );
        // Valid, then revoked by the control API.
        let (status, _) = sim.list(&token, "steps", &[]).await;
        assert_eq!(status, 200);
        let v = sim
            .control(
                reqwest::Method::DELETE,
                &format!("/_sim/users/{UID}/tokens"),
                json!({}),
            )
            .await;
        assert_eq!(v["revoked"], 1);
        let (status, v) = sim.list(&token, "steps", &[]).await;
        assert_eq!((status, reason(&v)), (401, "ACCESS_TOKEN_TYPE_UNSUPPORTED"));
        // Expired via the control API.
        let token = sim.user(UID, None).await;
        sim.sim(&format!("/_sim/users/{UID}/expire-access"), json!({}))
            .await;
        let (status, v) = sim.list(&token, "steps", &[]).await;
        assert_eq!(status, 401);
        assert_eq!(v, expect("ACCESS_TOKEN_EXPIRED", MSG_INVALID_CREDENTIALS));
        assert_eq!(sim.stats().await["unauthorized"], 4);
    }

    #[tokio::test]
    async fn per_user_rate_limit_answers_429() {
        let sim = start(SimConfig {
            rate_limit_per_user: 3,
            ..SimConfig::default()
        })
        .await;
        let a = sim.user(UID, None).await;
        let b = sim.user("other", None).await;
        for _ in 0..3 {
            assert_eq!(sim.list(&a, "steps", &[]).await.0, 200);
        }
        let (status, headers, v) = sim
            .get("/v4/users/me/dataTypes/steps/dataPoints", Some(&a), &[])
            .await;
        assert_eq!(status, 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(reason(&v), "RATE_LIMIT_EXCEEDED");
        let retry: i64 = headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        // Per user: the other user is not limited.
        assert_eq!(sim.list(&b, "steps", &[]).await.0, 200);
        // Without Retry-After when switched off.
        sim.sim("/_sim/config", json!({ "retry_after": false }))
            .await;
        let (status, headers, _) = sim.get("/v4/users/me/identity", Some(&a), &[]).await;
        assert_eq!(status, 429);
        assert!(!headers.contains_key(header::RETRY_AFTER));
        // The window slides with the simulated clock.
        sim.sim("/_sim/clock/advance", json!({ "seconds": 61 }))
            .await;
        assert_eq!(sim.list(&a, "steps", &[]).await.0, 200);
        let stats = sim.stats().await;
        assert_eq!(stats["users"][UID]["rate_limited"], 2);
        assert_eq!(stats["users"][UID]["requests"], 6);
        assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 4);
    }

    // -- webhooks -----------------------------------------------------------------------------

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum RxMode {
        /// Checks `Authorization` (201 / 401 on probes), then scripted statuses, then the
        /// signature when keys are loaded, else 204.
        Checks,
        /// Answers 200 to everything (never rejects a probe without credentials).
        AlwaysOk,
        /// Answers 204 to everything (a probe wants 200/201).
        Always204,
    }

    #[derive(Clone)]
    struct Rx {
        mode: RxMode,
        secret: String,
        log: Arc<std::sync::Mutex<Vec<(HeaderMap, Bytes)>>>,
        script: Arc<std::sync::Mutex<VecDeque<u16>>>,
        keys: Arc<std::sync::Mutex<Vec<(u32, VerifyingKey)>>>,
    }

    impl Rx {
        fn count(&self) -> usize {
            self.log.lock().unwrap().len()
        }

        fn get(&self, i: usize) -> (HeaderMap, Bytes) {
            self.log.lock().unwrap()[i].clone()
        }

        fn notifications(&self) -> Vec<(HeaderMap, Bytes)> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, b)| !is_probe(b))
                .cloned()
                .collect()
        }

        async fn wait_notifications(&self, n: usize) -> Vec<(HeaderMap, Bytes)> {
            for _ in 0..200 {
                let got = self.notifications();
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!(
                "expected {n} notifications, got {}",
                self.notifications().len()
            );
        }
    }

    fn is_probe(body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body).is_ok_and(|v| v == json!({ "type": "verification" }))
    }

    fn signature_of(headers: &HeaderMap) -> Option<String> {
        [SIGNATURE_HEADER, LEGACY_SIGNATURE_HEADER]
            .iter()
            .find_map(|h| headers.get(*h))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    async fn rx_handler(State(rx): State<Rx>, headers: HeaderMap, body: Bytes) -> StatusCode {
        rx.log.lock().unwrap().push((headers.clone(), body.clone()));
        let code = match rx.mode {
            RxMode::AlwaysOk => 200,
            RxMode::Always204 => 204,
            RxMode::Checks => {
                let auth_ok = headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|v| v.as_bytes() == rx.secret.as_bytes());
                let keys = rx.keys.lock().unwrap().clone();
                if is_probe(&body) {
                    if auth_ok { 201 } else { 401 }
                } else if !auth_ok {
                    401
                } else if let Some(code) = rx.script.lock().unwrap().pop_front() {
                    code
                } else if !keys.is_empty() {
                    match signature_of(&headers).map(|s| verify_tink(&keys, &s, &body)) {
                        Some(Ok(_)) => 204,
                        _ => 401,
                    }
                } else {
                    204
                }
            }
        };
        StatusCode::from_u16(code).unwrap()
    }

    async fn receiver(mode: RxMode) -> (String, Rx, oneshot::Sender<()>) {
        let rx = Rx {
            mode,
            secret: "Bearer hook-secret".to_owned(),
            log: Arc::default(),
            script: Arc::default(),
            keys: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", post(rx_handler))
            .with_state(rx.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.await;
                })
                .await
                .unwrap();
        });
        (format!("http://{addr}/hook"), rx, tx)
    }

    /// Protobuf fields of a message: (field number, bytes) for length-delimited fields and
    /// (field number, varint as big-endian bytes) for varints.
    fn proto_fields(mut b: &[u8]) -> Vec<(u64, Vec<u8>)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let (byte, rest) = b.split_first().unwrap();
                *b = rest;
                v |= u64::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    return v;
                }
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let tag = varint(&mut b);
            match tag & 7 {
                0 => {
                    let v = varint(&mut b);
                    out.push((tag >> 3, v.to_be_bytes().to_vec()));
                }
                2 => {
                    let len = usize::try_from(varint(&mut b)).unwrap();
                    let (field, rest) = b.split_at(len);
                    out.push((tag >> 3, field.to_vec()));
                    b = rest;
                }
                other => panic!("unexpected wire type {other}"),
            }
        }
        out
    }

    /// The verifying keys of a Tink keyset, parsed from the `EcdsaPublicKey` protobufs.
    fn parse_keyset(keyset: &Value) -> Vec<(u32, VerifyingKey)> {
        keyset["key"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                assert_eq!(k["status"], "ENABLED");
                assert_eq!(k["outputPrefixType"], "TINK");
                assert_eq!(k["keyData"]["typeUrl"], ECDSA_PUBLIC_KEY_TYPE_URL);
                assert_eq!(k["keyData"]["keyMaterialType"], "ASYMMETRIC_PUBLIC");
                let raw = STANDARD
                    .decode(k["keyData"]["value"].as_str().unwrap())
                    .unwrap();
                let fields = proto_fields(&raw);
                let field = |n: u64| fields.iter().find(|(f, _)| *f == n).map(|(_, v)| v.clone());
                // Params: SHA256 (3), NIST_P256 (2), DER (2).
                let params = proto_fields(&field(2).unwrap());
                let p = |n: u64| {
                    params
                        .iter()
                        .find(|(f, _)| *f == n)
                        .unwrap()
                        .1
                        .last()
                        .copied()
                };
                assert_eq!((p(1), p(2), p(3)), (Some(3), Some(2), Some(2)));
                let coord = |n: u64| {
                    let c = field(n).unwrap();
                    // The documented trap: 33 bytes with a leading zero.
                    assert_eq!((c.len(), c[0]), (33, 0));
                    p256::FieldBytes::clone_from_slice(&c[1..])
                };
                let point = EncodedPoint::from_affine_coordinates(&coord(3), &coord(4), false);
                let id = u32::try_from(k["keyId"].as_u64().unwrap()).unwrap();
                (id, VerifyingKey::from_encoded_point(&point).unwrap())
            })
            .collect()
    }

    /// Verifies a Tink signature header over `body`; returns the key id used.
    fn verify_tink(keys: &[(u32, VerifyingKey)], sig: &str, body: &[u8]) -> Result<u32, String> {
        let raw = STANDARD.decode(sig).map_err(|e| e.to_string())?;
        if raw.first() != Some(&1) || raw.len() < 8 {
            return Err("not a TINK-prefixed signature".into());
        }
        let id = u32::from_be_bytes(raw[1..5].try_into().unwrap());
        let der = &raw[5..];
        // SEQUENCE { INTEGER r, INTEGER s }.
        if der[0] != 0x30 || usize::from(der[1]) != der.len() - 2 {
            return Err("bad DER".into());
        }
        let mut rest = &der[2..];
        let mut rs = Vec::new();
        for _ in 0..2 {
            let len = usize::from(rest[1]);
            let int = &rest[2..2 + len];
            let int = &int[int.iter().position(|b| *b != 0).unwrap_or(int.len())..];
            let mut padded = vec![0u8; 32 - int.len()];
            padded.extend_from_slice(int);
            rs.extend(padded);
            rest = &rest[2 + len..];
        }
        let signature = Signature::from_slice(&rs).map_err(|e| e.to_string())?;
        let (_, key) = keys
            .iter()
            .find(|(k, _)| *k == id)
            .ok_or_else(|| format!("unknown key id {id}"))?;
        key.verify(body, &signature).map_err(|e| e.to_string())?;
        Ok(id)
    }

    impl Sim {
        async fn keys(&self) -> (Value, Vec<(u32, VerifyingKey)>) {
            let (status, _, keyset) = self.get(KEYSET_PATH, None, &[]).await;
            assert_eq!(status, 200);
            let keys = parse_keyset(&keyset);
            (keyset, keys)
        }

        async fn create_subscriber(&self, id: &str, url: &str, types: &[&str]) -> (u16, Value) {
            let resp = self
                .http
                .post(format!("{}/v4/projects/123456/subscribers", self.base))
                .query(&[("subscriberId", id)])
                .bearer_auth("sa-token")
                .json(&json!({
                    "endpointUri": url,
                    "subscriberConfigs": [{ "dataTypes": types, "subscriptionCreatePolicy": "AUTOMATIC" }],
                    "endpointAuthorization": { "secret": "Bearer hook-secret" },
                }))
                .send()
                .await
                .unwrap();
            let (s, _, v) = body_of(resp).await;
            (s, v)
        }
    }

    #[tokio::test]
    async fn subscriber_creation_runs_the_verification_handshake() {
        let sim = start(SimConfig::default()).await;
        sim.sim(
            "/_sim/projects",
            json!({ "number": "123456", "token": "sa-token" }),
        )
        .await;
        let (url, rx, _stop) = receiver(RxMode::Checks).await;
        let (status, op) = sim
            .create_subscriber("ohx-hook", &url, &["steps", "sleep"])
            .await;
        assert_eq!(status, 200, "{op}");
        assert_eq!(op["done"], true);
        assert!(op["name"].as_str().unwrap().starts_with("operations/"));
        let sub = &op["response"];
        assert_eq!(sub["@type"], TYPE_SUBSCRIBER);
        assert_eq!(sub["name"], "projects/123456/subscribers/ohx-hook");
        assert_eq!(sub["endpointUri"], url.as_str());
        assert_eq!(sub["endpointAuthorization"], json!({ "secretSet": true }));
        assert_eq!(sub["state"], "ACTIVE");
        assert!(sub.get("createTime").is_some());
        // Two probes: with the secret, then without.
        assert_eq!(rx.count(), 2);
        let (h1, b1) = rx.get(0);
        let (h2, b2) = rx.get(1);
        assert!(is_probe(&b1) && is_probe(&b2));
        assert_eq!(h1[header::AUTHORIZATION], "Bearer hook-secret");
        assert!(!h2.contains_key(header::AUTHORIZATION));
        assert_eq!(h1[header::USER_AGENT], VERIFIER_USER_AGENT);
        assert_eq!(h1[header::CONTENT_TYPE], "application/json");

        // Receivers that fail either step.
        for mode in [RxMode::AlwaysOk, RxMode::Always204] {
            let (bad_url, bad_rx, _stop) = receiver(mode).await;
            let (status, err) = sim
                .create_subscriber("bad-hook", &bad_url, &["steps"])
                .await;
            assert_eq!(status, 400, "{err}");
            assert_eq!(err["error"]["status"], "FAILED_PRECONDITION");
            let expected_probes = if mode == RxMode::AlwaysOk { 2 } else { 1 };
            assert_eq!(bad_rx.count(), expected_probes);
        }
        // Duplicate id, bad id, bad data types.
        let (status, err) = sim.create_subscriber("ohx-hook", &url, &["steps"]).await;
        assert_eq!(
            (status, err["error"]["status"].as_str()),
            (409, Some("ALREADY_EXISTS"))
        );
        let (status, err) = sim.create_subscriber("Bad_Id", &url, &["steps"]).await;
        assert_eq!((status, reason(&err)), (400, "INVALID_SUBSCRIBER_NAME"));
        let (status, err) = sim
            .create_subscriber("camel-hook", &url, &["heartRate"])
            .await;
        assert_eq!(status, 400);
        assert!(err["error"].get("details").is_none());
        let (status, err) = sim
            .create_subscriber("ecg-hook", &url, &["electrocardiogram"])
            .await;
        assert_eq!((status, reason(&err)), (400, "INVALID_DATA_TYPE"));

        // Authorization of the project API.
        let user_token = sim.user(UID, None).await;
        let list = |token: Option<String>, project: &'static str| {
            let sim = &sim;
            async move {
                let mut req = sim
                    .http
                    .get(format!("{}/v4/projects/{project}/subscribers", sim.base));
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let (s, _, v) = body_of(req.send().await.unwrap()).await;
                (s, v)
            }
        };
        assert_eq!(list(None, "123456").await.0, 401);
        let (status, err) = list(Some(user_token), "123456").await;
        assert_eq!(
            (status, reason(&err)),
            (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
        );
        let (status, err) = list(Some("sa-token".into()), "my-project-id").await;
        assert_eq!(status, 403);
        assert!(err["error"].get("details").is_none());
        let (status, err) = list(Some("sa-token".into()), "999").await;
        assert_eq!((status, reason(&err)), (403, "IAM_PERMISSION_DENIED"));

        // List and delete.
        let (status, listed) = list(Some("sa-token".into()), "123456").await;
        assert_eq!(status, 200);
        assert_eq!(listed["totalSize"], 1);
        assert_eq!(
            listed["subscribers"][0]["name"],
            "projects/123456/subscribers/ohx-hook"
        );
        let resp = sim
            .http
            .delete(format!(
                "{}/v4/projects/123456/subscribers/ohx-hook",
                sim.base
            ))
            .bearer_auth("sa-token")
            .send()
            .await
            .unwrap();
        let (status, _, op) = body_of(resp).await;
        assert_eq!(status, 200);
        assert_eq!(
            op["response"]["@type"],
            "type.googleapis.com/google.protobuf.Empty"
        );
        let (_, listed) = list(Some("sa-token".into()), "123456").await;
        assert_eq!(listed, json!({}));
        let stats = sim.stats().await;
        assert_eq!(
            stats["verifications"],
            json!({ "attempts": 3, "passed": 1 })
        );
    }

    #[tokio::test]
    async fn signed_deliveries_verify_against_the_served_keyset_and_keys_rotate() {
        let sim = start(SimConfig::default()).await;
        sim.sim(
            "/_sim/projects",
            json!({ "number": "123456", "token": "sa-token" }),
        )
        .await;
        let token = sim.user(UID, None).await;
        let (url, rx, _stop) = receiver(RxMode::Checks).await;
        let (keyset, keys) = sim.keys().await;
        assert_eq!(keys.len(), 1);
        assert_eq!(keyset["primaryKeyId"], keys[0].0);
        *rx.keys.lock().unwrap() = keys.clone();
        let (status, _) = sim.create_subscriber("ohx-hook", &url, &["steps"]).await;
        assert_eq!(status, 200);

        // Seeding steps queues an UPSERT notification spanning the points.
        let v = sim
            .seed(
                UID,
                "steps",
                json!([
                    steps("2026-03-08T01:29:00Z", "2026-03-08T01:30:00Z", "12"),
                    steps("2026-03-08T01:33:00Z", "2026-03-08T01:34:00Z", "30"),
                ]),
            )
            .await;
        assert_eq!(v["notifications"], 1);
        // Heart rate has no subscriber: nothing queued.
        let v = sim
            .seed(
                UID,
                "heart-rate",
                json!([heart_rate("2026-03-08T01:29:00Z", "61")]),
            )
            .await;
        assert_eq!(v["notifications"], 0);
        let got = rx.wait_notifications(1).await;
        let (headers, body) = &got[0];
        assert_eq!(headers[header::AUTHORIZATION], "Bearer hook-secret");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers[header::USER_AGENT], NOTIFICATION_USER_AGENT);
        let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
        assert_eq!(verify_tink(&keys, sig, body), Ok(keys[0].0));
        let mut spoiled = body.to_vec();
        spoiled.push(b' ');
        assert!(verify_tink(&keys, sig, &spoiled).is_err());
        let v: Value = serde_json::from_slice(body).unwrap();
        let items = v.as_array().expect("a batch array");
        assert_eq!(items.len(), 1);
        let data = &items[0]["data"];
        assert_eq!(data["version"], "1");
        assert_eq!(data["healthUserId"], UID);
        assert_eq!(data["operation"], "UPSERT");
        assert_eq!(data["dataType"], "steps");
        assert!(
            uuid::Uuid::parse_str(data["clientProvidedSubscriptionName"].as_str().unwrap()).is_ok()
        );
        assert_eq!(
            data["intervals"][0],
            json!({
                "physicalTimeInterval": { "startTime": "2026-03-08T01:29:00Z", "endTime": "2026-03-08T01:34:00Z" },
                "civilDateTimeInterval": {
                    "startDateTime": { "date": { "year": 2026, "month": 3, "day": 8 }, "time": { "hours": 3, "minutes": 29 } },
                    "endDateTime": { "date": { "year": 2026, "month": 3, "day": 8 }, "time": { "hours": 3, "minutes": 34 } },
                },
                "civilIso8601TimeInterval": { "startTime": "2026-03-08T03:29:00", "endTime": "2026-03-08T03:34:00" },
            })
        );
        // The client re-reads the interval.
        let (_, page) = sim.list(&token, "steps", &[]).await;
        assert_eq!(page["dataPoints"].as_array().unwrap().len(), 2);

        // Deletion → DELETE notification.
        sim.control(
            reqwest::Method::DELETE,
            &format!("/_sim/users/{UID}/dataPoints"),
            json!({ "dataType": "steps", "startTimes": ["2026-03-08T01:33:00Z"] }),
        )
        .await;
        let got = rx.wait_notifications(2).await;
        let v: Value = serde_json::from_slice(&got[1].1).unwrap();
        assert_eq!(v[0]["data"]["operation"], "DELETE");
        assert_eq!(
            v[0]["data"]["intervals"][0]["physicalTimeInterval"]["startTime"],
            "2026-03-08T01:33:00Z"
        );

        // Rotation: the new primary signs, the old key stays in the keyset.
        let r = sim.sim("/_sim/keys/rotate", json!({})).await;
        let (keyset, keys2) = sim.keys().await;
        assert_eq!(keys2.len(), 2);
        assert_eq!(keyset["primaryKeyId"], r["primaryKeyId"]);
        assert_ne!(r["primaryKeyId"], keys[0].0);
        *rx.keys.lock().unwrap() = keys2.clone();
        // Single-object bodies and the older header spelling.
        sim.sim(
            "/_sim/config",
            json!({ "single_object": true, "signature_header": LEGACY_SIGNATURE_HEADER }),
        )
        .await;
        let n = sim
            .sim(
                "/_sim/notify",
                json!({ "healthUserId": UID, "dataType": "steps", "start": "2026-03-08T01:29:00Z",
                        "end": "2026-03-08T01:34:00Z", "utcOffset": "-28800s" }),
            )
            .await;
        assert_eq!(
            (n["status"].as_u64(), n["delivered"].as_bool()),
            (Some(204), Some(true))
        );
        let got = rx.wait_notifications(3).await;
        let (headers, body) = &got[2];
        assert!(!headers.contains_key(SIGNATURE_HEADER));
        let sig = headers[LEGACY_SIGNATURE_HEADER].to_str().unwrap();
        assert_eq!(
            verify_tink(&keys2, sig, body).unwrap(),
            r["primaryKeyId"].as_u64().unwrap() as u32
        );
        // The old key alone cannot verify it.
        assert!(verify_tink(&keys, sig, body).is_err());
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            v["data"]["intervals"][0]["civilIso8601TimeInterval"]["startTime"],
            "2026-03-07T17:29:00"
        );
        // drop_old: only the new key remains.
        sim.sim("/_sim/keys/rotate", json!({ "drop_old": true }))
            .await;
        let (_, keys3) = sim.keys().await;
        assert_eq!(keys3.len(), 1);
        assert!(keys2.iter().all(|(id, _)| *id != keys3[0].0));

        let stats = sim.stats().await;
        assert_eq!(stats["notifications"]["delivered"], 3);
        assert_eq!(stats["notifications"]["notifications_delivered"], 3);
        assert_eq!(stats["notifications"]["by_status"]["204"], 3);
    }

    #[tokio::test]
    async fn tamper_hook_retries_duplicates_and_batches() {
        let sim = start(SimConfig {
            retry_base_ms: 20,
            ..SimConfig::default()
        })
        .await;
        sim.sim(
            "/_sim/projects",
            json!({ "number": "123456", "token": "sa-token" }),
        )
        .await;
        sim.user(UID, None).await;
        let (url, rx, _stop) = receiver(RxMode::Checks).await;
        let (_, keys) = sim.keys().await;
        *rx.keys.lock().unwrap() = keys;
        let (status, _) = sim.create_subscriber("ohx-hook", &url, &["weight"]).await;
        assert_eq!(status, 200);
        let notify = |tamper: Option<&'static str>| {
            let sim = &sim;
            async move {
                let mut body = json!({ "healthUserId": UID, "dataType": "weight",
                                       "start": "2026-09-09T01:24:33.390135Z" });
                if let Some(t) = tamper {
                    body["tamper"] = json!(t);
                }
                sim.sim("/_sim/notify", body).await
            }
        };
        // A verifying receiver rejects every tampered send; an honest one passes.
        for t in ["body", "signature", "unknown_key"] {
            let v = notify(Some(t)).await;
            assert_eq!(v["status"], 401, "{t}: {v}");
            assert_eq!(v["delivered"], false);
        }
        let v = notify(None).await;
        assert_eq!(v["status"], 204);
        let got = rx.wait_notifications(4).await;
        // The tampered body differs from what was signed: operation flipped.
        let tampered: Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(tampered[0]["data"]["operation"], "DELETE");

        // Retries with backoff until a 204.
        rx.script.lock().unwrap().extend([500, 503]);
        let v = notify(None).await;
        assert_eq!(v["status"], 500);
        rx.wait_notifications(7).await;
        // Duplicates: every delivered POST is sent twice.
        sim.sim("/_sim/config", json!({ "duplicate": true })).await;
        sim.seed(
            UID,
            "weight",
            json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/w1"),
                     "weight": { "sampleTime": { "physicalTime": "2026-09-09T01:24:33Z" }, "weightGrams": 80000.0 } }]),
        )
        .await;
        let got = rx.wait_notifications(9).await;
        assert_eq!(got[7].1, got[8].1);
        sim.sim("/_sim/config", json!({ "duplicate": false })).await;
        // A receiver that never answers 204: 5 attempts, then dropped.
        rx.script.lock().unwrap().extend([500; 5]);
        sim.seed(
            UID,
            "weight",
            json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/w2"),
                     "weight": { "sampleTime": { "physicalTime": "2026-09-10T01:24:33Z" }, "weightGrams": 80100.0 } }]),
        )
        .await;
        rx.wait_notifications(14).await;
        for _ in 0..100 {
            if sim.stats().await["notifications"]["dropped"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stats = sim.stats().await;
        assert_eq!(stats["notifications"]["dropped"], 1);
        assert_eq!(stats["notifications"]["by_status"]["500"], 6);
        assert_eq!(stats["notifications"]["by_status"]["503"], 1);
        assert_eq!(stats["notifications"]["by_status"]["401"], 3);
        // Batching: notifications queued while a POST waits for its retry go out together.
        sim.sim("/_sim/config", json!({ "retry_base_ms": 400 }))
            .await;
        rx.script.lock().unwrap().push_back(500);
        let weight_point = |id: &str, at: &str| {
            json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/{id}"),
                     "weight": { "sampleTime": { "physicalTime": at }, "weightGrams": 80000.0 } }])
        };
        sim.seed(UID, "weight", weight_point("a", "2026-09-11T05:00:00Z"))
            .await;
        rx.wait_notifications(15).await;
        for (i, at) in [
            "2026-09-12T05:00:00Z",
            "2026-09-13T05:00:00Z",
            "2026-09-14T05:00:00Z",
        ]
        .iter()
        .enumerate()
        {
            sim.seed(UID, "weight", weight_point(&format!("b{i}"), at))
                .await;
        }
        let got = rx.wait_notifications(17).await;
        let sizes: Vec<usize> = got[14..]
            .iter()
            .map(|(_, b)| {
                serde_json::from_slice::<Value>(b)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(sizes, [1, 1, 3]);
        // The unknown subscriber data type is a control error.
        let resp = sim
            .http
            .post(format!("{}/_sim/notify", sim.base))
            .json(&json!({ "healthUserId": UID, "dataType": "steps", "start": "2026-09-09T01:24:33Z" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409);
    }
}
