//! The configuration REST API (`/api/v1`), used by the configuration UI and by hospitals'
//! integration scripts. Its OpenAPI 3.1 document is generated from the handlers below and
//! served at `/openapi.json`.
//!
//! Conventions: RFC 9457 problem+json on every error, with field-level details; cursor
//! pagination; `ETag`/`If-Match` on updates (a concurrent edit gets 412); `Idempotency-Key`
//! on POSTs that start work; an `x-request-id` on every answer and log line; every write
//! audited. Every query is scoped to the caller's organization: another organization's id
//! answers 404 exactly as an unknown one.

pub mod auth;
pub mod keys;
pub mod links;
pub mod orgs;
pub mod patients;
pub mod problem;
pub mod status;
pub mod support;
pub mod targets;
pub mod throttle;
pub mod ui;

use crate::AppState;
use crate::sources::PeerAddr;
use auth::{Caller, OidcSettings, OidcVerifier};
use axum::Json;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use problem::ApiError;
use std::sync::Arc;
use throttle::Throttle;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Largest request body of the API (configuration documents are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The API's settings (`OHX_API_*`).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub oidc: Option<OidcSettings>,
    /// Requests per minute per caller (`OHX_API_RATE_PER_MINUTE`, default 600).
    pub rate_per_minute: u32,
    /// Requests per minute per source address (`OHX_API_SOURCE_RATE_PER_MINUTE`, 1200).
    pub source_rate_per_minute: u32,
    /// Burst allowed above the steady rate (`OHX_API_BURST`, default 60).
    pub burst: u32,
    /// The local profile (`OHX_LOCAL_PROFILE=true`): EHR targets may use plain HTTP.
    pub local: bool,
    /// How long a topic read may take (`OHX_API_KAFKA_TIMEOUT_MS`, default 10 s).
    pub kafka_timeout: std::time::Duration,
}

impl ApiSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        use ohx_common::config::parse;
        Ok(Self {
            oidc: OidcSettings::from_env().map_err(anyhow::Error::msg)?,
            rate_per_minute: parse("OHX_API_RATE_PER_MINUTE", 600)?,
            source_rate_per_minute: parse("OHX_API_SOURCE_RATE_PER_MINUTE", 1200)?,
            burst: parse("OHX_API_BURST", 60)?,
            local: parse("OHX_LOCAL_PROFILE", false)?,
            kafka_timeout: ohx_common::config::millis("OHX_API_KAFKA_TIMEOUT_MS", 10_000)?,
        })
    }
}

/// State of the API's handlers.
#[derive(Clone)]
pub struct ApiState {
    pub app: AppState,
    pub oidc: Option<Arc<OidcVerifier>>,
    per_caller: Arc<Throttle>,
    per_source: Arc<Throttle>,
    pub local: bool,
    /// Outbound calls: the OIDC issuer, EHR connection tests.
    pub http: reqwest::Client,
    kafka_timeout: std::time::Duration,
    /// Where dead letters are read (`None`: the dead-letter endpoints answer 503).
    pub broker: Option<Broker>,
}

/// The broker and codec the API reads topics with.
#[derive(Clone)]
pub struct Broker {
    pub kafka: ohx_common::kafka::KafkaSettings,
    pub codec: Arc<ohx_common::codec::Codec>,
    /// How long a topic read may take (`OHX_API_KAFKA_TIMEOUT_MS`, default 10 s).
    pub timeout: std::time::Duration,
}

impl ApiState {
    pub fn new(app: AppState, settings: &ApiSettings, http: reqwest::Client) -> Self {
        Self {
            app,
            oidc: settings
                .oidc
                .clone()
                .map(|s| Arc::new(OidcVerifier::new(s, http.clone()))),
            per_caller: Arc::new(Throttle::per_minute(
                settings.rate_per_minute,
                settings.burst,
            )),
            per_source: Arc::new(Throttle::per_minute(
                settings.source_rate_per_minute,
                settings.burst,
            )),
            local: settings.local,
            http,
            broker: None,
            kafka_timeout: settings.kafka_timeout,
        }
    }

    /// Lets the API read topics (dead letters) from this broker.
    #[must_use]
    pub fn with_broker(
        mut self,
        kafka: ohx_common::kafka::KafkaSettings,
        codec: Arc<ohx_common::codec::Codec>,
    ) -> Self {
        self.broker = Some(Broker {
            kafka,
            codec,
            timeout: self.kafka_timeout,
        });
        self
    }
}

/// What the API knows about the request being served: its id and source address (for
/// problem documents, logs and the audit log).
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub request_id: String,
    pub source: Option<std::net::IpAddr>,
}

tokio::task_local! {
    static REQUEST: RequestMeta;
}

/// The request being served (outside a request: none).
pub fn current_request() -> Option<RequestMeta> {
    REQUEST.try_with(Clone::clone).ok()
}

/// A request id from the caller (`x-request-id`, up to 64 of `[A-Za-z0-9._-]`) or a new one.
fn request_id(parts: &axum::http::HeaderMap) -> String {
    parts
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Every API request: a request id, the per-source throttle, one log line, the id on the
/// answer (and in its problem document).
async fn frame(
    State(state): State<ApiState>,
    peer: PeerAddr,
    req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let meta = RequestMeta {
        request_id: request_id(req.headers()),
        source: state.app.sources.client(peer.0, forwarded),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("api", request_id = %meta.request_id);
    let id = meta.request_id.clone();
    let source_key = meta
        .source
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let mut response = REQUEST
        .scope(meta, async move {
            match state.per_source.check(&source_key) {
                Err(retry_after_s) => ApiError::TooManyRequests { retry_after_s }.into_response(),
                Ok(()) => next.run(req).await,
            }
        })
        .instrument(span.clone())
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::info!(
            %method,
            path,
            status = response.status().as_u16(),
            seconds = started.elapsed().as_secs_f64(),
            "API request"
        );
    });
    response
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    /// Authenticates the request and applies the per-caller throttle.
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller =
            auth::authenticate(authorization, state.oidc.as_deref(), &state.app.pool).await?;
        state
            .per_caller
            .check(&caller.actor)
            .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })?;
        Ok(caller)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ohx configuration API",
        description = "Organizations, EHR targets, patients, provider apps and links, consents, \
            sync runs, API keys and the audit log. Errors are RFC 9457 problem documents."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(problem::ProblemDoc, problem::FieldError, auth::Role))
)]
struct ApiDoc;

/// The `bearer` security scheme: an OIDC access token or an API key.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An OIDC access token of the configured issuer, or an API key (ohxk_…)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The API's routes and their OpenAPI document.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(orgs::list, orgs::create))
        .routes(routes!(orgs::get, orgs::update))
        .routes(routes!(targets::list, targets::create))
        .routes(routes!(targets::get, targets::update))
        .routes(routes!(patients::list, patients::create))
        .routes(routes!(patients::get, patients::update))
        .routes(routes!(patients::consents))
        .routes(routes!(patients::set_consent))
        .routes(routes!(links::apps, links::create_app))
        .routes(routes!(links::app_get))
        .routes(routes!(links::list))
        .routes(routes!(links::get))
        .routes(routes!(links::connect))
        .routes(routes!(links::sync))
        .routes(routes!(links::disconnect))
        .routes(routes!(links::runs))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::audit_log))
        .routes(routes!(status::me))
        .routes(routes!(status::target_status))
        .routes(routes!(status::target_test))
        .routes(routes!(status::deliveries))
        .routes(routes!(status::dead_letters))
        .routes(routes!(status::redrive))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// The API's router: `/api/v1/…` and `/openapi.json`.
pub fn router(state: ApiState) -> axum::Router {
    let (api, doc) = routes().split_for_parts();
    let doc = Arc::new(doc);
    api.layer(axum::middleware::from_fn_with_state(state.clone(), frame))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound.into_response() })
}

/// Property test of the request decoders and checks: arbitrary bytes and arbitrary JSON
/// documents built from the fields the API knows (and others), at any depth and of any
/// type, never panic; each is decoded or refused with a problem naming a field.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod decoder_properties {
    use super::problem::{ApiError, decode};
    use rand::Rng;
    use serde_json::{Map, Value, json};

    const KEYS: &[&str] = &[
        "name",
        "base_url",
        "fhir_version",
        "upsert_mode",
        "auth",
        "kind",
        "client_id",
        "token_url",
        "scope",
        "client_auth",
        "secret",
        "ehr_target_id",
        "ehr_patient_reference",
        "policy",
        "granted",
        "provider",
        "client_secret",
        "api_base_url",
        "authorize_base_url",
        "provider_app_id",
        "expires_in",
        "from",
        "to",
        "categories",
        "role",
        "expires_in_days",
        "organization_id",
        "aggregation",
        "x",
    ];

    fn string(rng: &mut impl Rng) -> String {
        const PIECES: &[&str] = &[
            "",
            "https://ehr.example/fhir",
            "http://127.0.0.1:1",
            "Patient/1",
            "bearer",
            "client_credentials",
            "smart_backend",
            "none",
            "R4",
            "R5",
            "put",
            "conditional",
            "viewer",
            "platform_admin",
            "withings",
            "2026-11-30T00:00:00Z",
            "0b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d",
            "'; DROP TABLE x;--",
            "\u{0}",
            "é😀",
            "%00",
            "../..",
            "javascript:alert(1)",
        ];
        let mut s = String::new();
        for _ in 0..rng.random_range(0..3) {
            s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
        s
    }

    fn value(rng: &mut impl Rng, depth: u32) -> Value {
        match rng.random_range(0..if depth == 0 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.random()),
            2 => json!(rng.random::<i64>()),
            3 => json!(rng.random::<f64>() * 1e300),
            4 | 5 => Value::String(string(rng)),
            6 => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| value(rng, depth - 1))
                    .collect(),
            ),
            _ => object(rng, depth - 1),
        }
    }

    fn object(rng: &mut impl Rng, depth: u32) -> Value {
        let mut m = Map::new();
        for _ in 0..rng.random_range(0..8) {
            m.insert(
                KEYS[rng.random_range(0..KEYS.len())].to_owned(),
                value(rng, depth),
            );
        }
        Value::Object(m)
    }

    /// Decodes as `T`; a refusal must name at least one field.
    fn check<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        match decode::<T>(bytes) {
            Ok(t) => Some(t),
            Err(ApiError::Invalid { errors, .. }) => {
                assert!(!errors.is_empty());
                None
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    fn all(bytes: &[u8]) {
        let mut errors = Vec::new();
        if let Some(t) = check::<super::targets::NewTarget>(bytes) {
            super::support::check_name("$.name", &t.name, &mut errors);
            super::support::check_base_url("$.base_url", &t.base_url, false, &mut errors);
            super::targets::check_auth(&t.auth, false, true, &mut errors);
        }
        if let Some(t) = check::<super::targets::TargetChanges>(bytes)
            && let Some(a) = &t.auth
        {
            super::targets::check_auth(a, true, false, &mut errors);
        }
        if let Some(p) = check::<super::patients::NewPatient>(bytes) {
            super::patients::check_reference("r", &p.ehr_patient_reference, &mut errors);
        }
        check::<super::patients::PatientChanges>(bytes);
        check::<super::patients::ConsentInput>(bytes);
        check::<super::orgs::NewOrganization>(bytes);
        check::<super::orgs::OrganizationChanges>(bytes);
        check::<super::links::NewApp>(bytes);
        check::<super::links::ConnectInput>(bytes);
        if let Some(s) = check::<super::links::SyncInput>(bytes) {
            super::links::check_sync(&s, &["body".into()], chrono::Utc::now());
        }
        check::<super::keys::NewKey>(bytes);
    }

    #[test]
    fn test_arbitrary_bytes_never_panic_a_decoder() {
        let mut rng = rand::rng();
        for _ in 0..5_000 {
            let len = rng.random_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            all(&bytes);
        }
    }

    #[test]
    fn test_arbitrary_documents_never_panic_a_decoder_or_a_check() {
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let doc = object(&mut rng, 3);
            all(doc.to_string().as_bytes());
        }
    }

    #[test]
    fn test_deeply_nested_documents_are_refused_not_overflowed() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        all(deep.as_bytes());
        let deep_obj = format!("{}1{}", "{\"name\":".repeat(10_000), "}".repeat(10_000));
        all(deep_obj.as_bytes());
    }
}
