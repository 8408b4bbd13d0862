//! How the publisher authenticates to an EHR target: nothing, a static bearer token, OAuth2
//! client credentials with a client secret (RFC 6749 §4.4, through the `oauth2` crate), or
//! SMART Backend Services (`client-confidential-asymmetric`: the same grant, the client
//! authenticated by a signed assertion, RFC 7523 `private_key_jwt`).
//!
//! Access tokens are cached per target until shortly before they expire ([`renew_at`]), one
//! request at a time per target; a 401 from the FHIR server drops the cached token so the call
//! is retried once with a new one ([`Tokens::invalidate`]). Tokens, secrets and keys are never
//! logged. A token endpoint that refuses the credentials makes the target fail at the target
//! level (`unauthorized`, `forbidden` for a refused scope): its records are held and it is
//! flagged, never dead-lettered.
//!
//! SMART targets find their token endpoint in `{base}/.well-known/smart-configuration` unless
//! one is configured, and ask for SMART v2 scopes unless the server advertises only
//! `permission-v1`.

use crate::classify::{Class, TargetFault, TransportError, classify_transport};
use crate::ehr::CallFailure;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{AuthType, ClientId, RequestTokenError, Scope, TokenResponse, TokenUrl};
use ohx_common::oauth_http::{Http, HttpError};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The resource types the publisher writes, in the order scopes list them.
pub const WRITTEN_TYPES: &[&str] = &[
    "Observation",
    "Device",
    "DeviceAssociation",
    "DiagnosticReport",
];

/// The resource types written to an R4 target (R4 has no DeviceAssociation).
pub const WRITTEN_TYPES_R4: &[&str] = &["Observation", "Device", "DiagnosticReport"];

fn all_written_types() -> &'static [&'static str] {
    WRITTEN_TYPES
}

/// Lifetime of a client assertion (SMART: at most five minutes).
pub const ASSERTION_LIFETIME_S: u64 = 240;

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

static TOKEN_REQUESTS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_ehr_token_requests",
        "Access token requests to EHR targets' token endpoints, by target, signing key id \
         (SMART) and outcome (ok, refused, failed)",
    )
});

/// How the publisher authenticates to a target.
#[derive(Clone)]
pub enum Auth {
    None,
    Bearer(String),
    /// OAuth2 client credentials with a client secret.
    ClientSecret(Arc<ClientSecret>),
    /// SMART Backend Services.
    Smart(Arc<Smart>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "None",
            Auth::Bearer(_) => "Bearer(***)",
            Auth::ClientSecret(_) => "ClientSecret(***)",
            Auth::Smart(_) => "Smart(***)",
        })
    }
}

/// The non-secret settings of an OAuth2 target (`ehr_targets.auth_settings`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub client_id: String,
    /// The token endpoint; SMART targets discover it when it is absent.
    #[serde(default)]
    pub token_url: Option<String>,
    /// Space-separated scopes; absent: [`default_scopes`].
    #[serde(default)]
    pub scope: Option<String>,
    /// Client secrets only: `basic` (HTTP Basic, the default) or `post` (form fields).
    #[serde(default)]
    pub client_auth: Option<String>,
    /// The types [`default_scopes`] names: not a setting, the target's FHIR version decides
    /// ([`WRITTEN_TYPES`], or [`WRITTEN_TYPES_R4`]).
    #[serde(skip, default = "all_written_types")]
    pub written_types: &'static [&'static str],
}

impl Settings {
    /// Reads the settings of an OAuth2 target.
    ///
    /// # Errors
    /// A reason safe for logs when they are not valid settings.
    pub fn from_json(v: &Value) -> Result<Self, &'static str> {
        let s: Self = serde_json::from_value(v.clone())
            .map_err(|_| "auth settings are not {client_id, token_url?, scope?, client_auth?}")?;
        if s.client_id.trim().is_empty() {
            return Err("auth settings have an empty client_id");
        }
        match s.client_auth.as_deref() {
            None | Some("basic" | "post") => Ok(s),
            Some(_) => Err("auth settings: client_auth is neither basic nor post"),
        }
    }
}

/// OAuth2 client credentials with a client secret.
#[derive(Clone)]
pub struct ClientSecret {
    pub settings: Settings,
    pub secret: String,
}

/// SMART Backend Services: the client id, and the key that signs its assertions.
#[derive(Clone)]
pub struct Smart {
    pub settings: Settings,
    pub key: SigningKey,
}

/// The algorithms SMART clients must support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Es384,
    Rs384,
}

impl Alg {
    /// Parses the JOSE name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "ES384" => Some(Self::Es384),
            "RS384" => Some(Self::Rs384),
            _ => None,
        }
    }
}

/// A private key of a target, as PKCS#8 PEM, with its `kid`.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Alg,
    pub pem: String,
}

/// A new key pair: the private key as PKCS#8 PEM, and the public JWK (`kty`, `kid`, `alg`,
/// `use: sig` and the public fields only) to publish in the target's JWKS. ES384 keys are
/// P-384; RS384 keys are 3072-bit RSA with exponent 65537.
///
/// # Errors
/// When the system random source or an encoder fails.
pub fn generate_key(alg: Alg, kid: &str) -> Result<(String, Value), String> {
    use base64::Engine as _;
    use p384::pkcs8::{EncodePrivateKey, LineEnding};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    match alg {
        Alg::Es384 => {
            use p384::elliptic_curve::Generate as _;
            let key = p384::SecretKey::try_generate().map_err(|e| e.to_string())?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| e.to_string())?;
            let point = key.public_key().to_sec1_bytes();
            // Uncompressed SEC 1: 0x04, then x and y of 48 bytes each.
            if point.len() != 97 || point[0] != 4 {
                return Err("unexpected P-384 point encoding".into());
            }
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig",
                "x": b64(&point[1..49]), "y": b64(&point[49..]),
            });
            Ok((pem.to_string(), jwk))
        }
        Alg::Rs384 => {
            use rsa::Generate as _;
            use rsa::traits::PublicKeyParts as _;
            let key = rsa::PrivateKey::try_generate().map_err(|e| e.to_string())?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| e.to_string())?;
            let jwk = serde_json::json!({
                "kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
                "n": b64(&key.n_bytes()), "e": b64(&key.e_bytes()),
            });
            Ok((pem.to_string(), jwk))
        }
    }
}

/// The claims of a client assertion (SMART Backend Services §"Authenticating to the token
/// endpoint").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
}

/// Returns the claims of an assertion made at `now_s` (seconds since the epoch): issued by
/// and about the client, for the token endpoint, expiring within [`ASSERTION_LIFETIME_S`].
pub fn assertion_claims(
    client_id: &str,
    token_url: &str,
    now_s: u64,
    jti: String,
) -> AssertionClaims {
    AssertionClaims {
        iss: client_id.to_owned(),
        sub: client_id.to_owned(),
        aud: token_url.to_owned(),
        exp: now_s + ASSERTION_LIFETIME_S,
        iat: now_s,
        jti,
    }
}

/// Signs `claims` with `key` (header: `alg`, `kid`, `typ: JWT`).
///
/// # Errors
/// When the key cannot be read or used.
pub fn sign(
    key: &SigningKey,
    claims: &AssertionClaims,
) -> Result<String, jsonwebtoken::errors::Error> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let (alg, encoding) = match key.alg {
        Alg::Es384 => (
            Algorithm::ES384,
            EncodingKey::from_ec_pem(key.pem.as_bytes())?,
        ),
        Alg::Rs384 => (
            Algorithm::RS384,
            EncodingKey::from_rsa_pem(key.pem.as_bytes())?,
        ),
    };
    let mut header = Header::new(alg);
    header.kid = Some(key.kid.clone());
    header.typ = Some("JWT".to_owned());
    encode(&header, claims, &encoding)
}

/// The scopes to ask for when the target's settings name none: create, read, update and
/// search on every written type (`.crus`, SMART v2), or the v1 equivalents (`.read`,
/// `.write`) for a server that supports only v1.
pub fn default_scopes(written_types: &[&str], v1_only: bool) -> String {
    let per_type = |t: &&str| {
        if v1_only {
            format!("system/{t}.read system/{t}.write")
        } else {
            format!("system/{t}.crus")
        }
    };
    written_types
        .iter()
        .map(per_type)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a SMART configuration document tells a backend client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub token_endpoint: String,
    /// The server lists `permission-v1` and not `permission-v2`.
    pub v1_only: bool,
}

/// Reads `.well-known/smart-configuration`.
///
/// # Errors
/// A reason when the document has no token endpoint or does not allow a backend client.
pub fn discovery(doc: &Value) -> Result<Discovery, &'static str> {
    let token_endpoint = doc
        .get("token_endpoint")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("smart-configuration has no token_endpoint")?;
    let listed = |field: &str, value: &str| {
        doc.get(field)
            .and_then(Value::as_array)
            .is_none_or(|a| a.iter().any(|v| v.as_str() == Some(value)))
    };
    if !listed("grant_types_supported", "client_credentials") {
        return Err("smart-configuration does not support client_credentials");
    }
    if !listed("token_endpoint_auth_methods_supported", "private_key_jwt") {
        return Err("smart-configuration does not support private_key_jwt");
    }
    let capabilities: Vec<&str> = doc
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Ok(Discovery {
        token_endpoint: token_endpoint.to_owned(),
        v1_only: capabilities.contains(&"permission-v1")
            && !capabilities.contains(&"permission-v2"),
    })
}

/// When a token that lives `lifetime` from `issued` is renewed: a quarter of its life early,
/// at most 30 seconds, so a call never leaves with a token about to expire.
pub fn renew_at(issued: Instant, lifetime: Duration) -> Instant {
    issued + lifetime - (lifetime / 4).min(Duration::from_secs(30))
}

/// A cached access token.
#[derive(Clone)]
struct Cached {
    token: String,
    renew_at: Instant,
}

/// A bearer token for one call.
#[derive(Clone)]
pub struct Bearer {
    pub token: String,
    /// Obtained by this call, or static: a 401 with it is final, not a reason to ask for
    /// another.
    pub fresh: bool,
}

/// The cached token of one target, locked while it is renewed.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Access tokens per target (keyed by target id and configuration fingerprint, so a changed
/// configuration gets a new token), obtained one at a time per target.
#[derive(Clone, Default)]
pub struct Tokens {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(***)")
    }
}

impl Tokens {
    fn slot(&self, key: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(key.to_owned()).or_default())
    }

    /// Returns the bearer token for a call to a target (`None`: the target takes anonymous
    /// calls), from the cache or the token endpoint.
    ///
    /// # Errors
    /// The token endpoint's refusal or failure, classified for the target.
    pub async fn bearer(
        &self,
        http: &reqwest::Client,
        key: &str,
        base_url: &str,
        auth: &Auth,
    ) -> Result<Option<Bearer>, CallFailure> {
        let (settings, assertion_key, secret) = match auth {
            Auth::None => return Ok(None),
            // Static: asking again would give the same token.
            Auth::Bearer(token) => {
                return Ok(Some(Bearer {
                    token: token.clone(),
                    fresh: true,
                }));
            }
            Auth::ClientSecret(c) => (&c.settings, None, Some(c.secret.as_str())),
            Auth::Smart(s) => (&s.settings, Some(&s.key), None),
        };
        let slot = self.slot(key);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(Some(Bearer {
                token: c.token.clone(),
                fresh: false,
            }));
        }
        let issued = Instant::now();
        let answer = request_token(http, base_url, settings, assertion_key, secret).await;
        let target = key.split('/').next().unwrap_or(key).to_owned();
        let kid = assertion_key.map_or(String::new(), |k| k.kid.clone());
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(f) if matches!(f.class, Class::Target(_)) => "refused",
            Err(_) => "failed",
        };
        TOKEN_REQUESTS.add(
            1,
            &[
                KeyValue::new("target", target.clone()),
                KeyValue::new("kid", kid.clone()),
                KeyValue::new("outcome", outcome),
            ],
        );
        let (token, lifetime) = answer.inspect_err(|f| {
            tracing::warn!(target_id = %target, kid, reason = %f.reason, "access token refused or failed");
        })?;
        tracing::info!(
            target_id = %target,
            kid,
            expires_in_s = lifetime.as_secs(),
            "access token obtained"
        );
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: renew_at(issued, lifetime),
        });
        Ok(Some(Bearer { token, fresh: true }))
    }

    /// Drops the cached token of a target if it is still `token` (the server refused it).
    pub async fn invalidate(&self, key: &str, token: &str) {
        let slot = self.slot(key);
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }
}

fn failure(class: Class, reason: impl Into<String>) -> CallFailure {
    CallFailure {
        class,
        status: None,
        reason: reason.into(),
        body: String::new(),
    }
}

fn transport_failure(what: &str, e: &reqwest::Error) -> CallFailure {
    let chain = crate::ehr::error_chain(e);
    failure(
        classify_transport(TransportError {
            timeout: e.is_timeout(),
            connect: e.is_connect(),
            chain: &chain,
        }),
        format!("{what}: request failed: {chain}"),
    )
}

/// Reads the target's SMART configuration.
async fn discover(http: &reqwest::Client, base_url: &str) -> Result<Discovery, CallFailure> {
    let url = format!("{base_url}/.well-known/smart-configuration");
    let resp = http
        .get(&url)
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| transport_failure("smart-configuration", &e))?;
    let status = resp.status();
    if status.as_u16() == 429 || status.is_server_error() {
        return Err(failure(
            Class::Transient { retry_after: None },
            format!("smart-configuration: {status}"),
        ));
    }
    if !status.is_success() {
        return Err(failure(
            Class::Target(TargetFault::NotFound),
            format!("smart-configuration: {status}"),
        ));
    }
    let doc: Value = resp.json().await.map_err(|_| {
        failure(
            Class::Target(TargetFault::Refused),
            "smart-configuration is not JSON",
        )
    })?;
    discovery(&doc).map_err(|reason| failure(Class::Target(TargetFault::Refused), reason))
}

/// Asks the token endpoint for an access token; returns it with its lifetime.
async fn request_token(
    http: &reqwest::Client,
    base_url: &str,
    settings: &Settings,
    key: Option<&SigningKey>,
    secret: Option<&str>,
) -> Result<(String, Duration), CallFailure> {
    let (token_url, v1_only) = match (&settings.token_url, key) {
        (Some(url), _) => (url.clone(), false),
        (None, Some(_)) => {
            let d = discover(http, base_url).await?;
            (d.token_endpoint, d.v1_only)
        }
        (None, None) => {
            return Err(failure(
                Class::Target(TargetFault::Unusable),
                "client credentials without a token_url",
            ));
        }
    };
    let url = TokenUrl::new(token_url.clone()).map_err(|_| {
        failure(
            Class::Target(TargetFault::Unusable),
            "the token endpoint is not a URL",
        )
    })?;
    let mut client = BasicClient::new(ClientId::new(settings.client_id.clone())).set_token_uri(url);
    if let Some(secret) = secret {
        client = client
            .set_client_secret(oauth2::ClientSecret::new(secret.to_owned()))
            .set_auth_type(if settings.client_auth.as_deref() == Some("post") {
                AuthType::RequestBody
            } else {
                AuthType::BasicAuth
            });
    } else {
        client = client.set_auth_type(AuthType::RequestBody);
    }
    let scope = settings
        .scope
        .clone()
        .unwrap_or_else(|| default_scopes(settings.written_types, v1_only));
    let mut request = client.exchange_client_credentials();
    for s in scope.split_whitespace() {
        request = request.add_scope(Scope::new(s.to_owned()));
    }
    let assertion;
    if let Some(key) = key {
        let now = chrono::Utc::now().timestamp().max(0).unsigned_abs();
        let claims = assertion_claims(
            &settings.client_id,
            &token_url,
            now,
            uuid::Uuid::new_v4().to_string(),
        );
        assertion = sign(key, &claims).map_err(|_| {
            failure(
                Class::Target(TargetFault::Unusable),
                "the target's signing key cannot sign",
            )
        })?;
        request = request
            .add_extra_param("client_assertion_type", ASSERTION_TYPE)
            .add_extra_param("client_assertion", assertion.as_str());
    }
    let answer = request
        .request_async(&Http(http))
        .await
        .map_err(|e| classify_token_error(&e))?;
    let lifetime = answer
        .expires_in()
        .unwrap_or(Duration::from_secs(300))
        .max(Duration::from_secs(1));
    Ok((answer.access_token().secret().clone(), lifetime))
}

/// Classifies a token endpoint's failure: refused credentials hold the target
/// (`unauthorized`), a refused scope too (`forbidden`), a limit or outage is transient.
pub fn classify_token_error(
    e: &RequestTokenError<HttpError, oauth2::basic::BasicErrorResponse>,
) -> CallFailure {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let fault = match r.error() {
                BasicErrorResponseType::InvalidScope => TargetFault::Forbidden,
                BasicErrorResponseType::UnsupportedGrantType
                | BasicErrorResponseType::Extension(_) => TargetFault::Refused,
                _ => TargetFault::Unauthorized,
            };
            failure(
                Class::Target(fault),
                format!("token endpoint: {}", r.error().as_ref()),
            )
        }
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) => failure(
            Class::Transient {
                retry_after: *retry_after,
            },
            format!("token endpoint: http status {status}"),
        ),
        RequestTokenError::Request(HttpError::Transport(e)) => {
            transport_failure("token endpoint", e)
        }
        RequestTokenError::Parse(..) | RequestTokenError::Other(_) => failure(
            Class::Target(TargetFault::Refused),
            "token endpoint: the answer could not be decoded",
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_settings_need_a_client_id_and_a_known_client_auth() {
        let s = Settings::from_json(&json!({"client_id": "ohx", "scope": "system/Observation.cu"}))
            .unwrap();
        assert_eq!(s.client_id, "ohx");
        assert_eq!(s.token_url, None);
        assert!(Settings::from_json(&json!({"client_id": " "})).is_err());
        assert!(Settings::from_json(&json!({"client_id": "a", "client_auth": "jwt"})).is_err());
        assert!(Settings::from_json(&json!({"client_id": "a", "secret": "x"})).is_err());
        assert!(Settings::from_json(&json!({})).is_err());
    }

    #[test]
    fn test_assertion_claims_follow_smart_backend_services() {
        let c = assertion_claims("client-1", "https://as/token", 1_000, "j1".into());
        assert_eq!((c.iss.as_str(), c.sub.as_str()), ("client-1", "client-1"));
        assert_eq!(c.aud, "https://as/token");
        assert_eq!(c.iat, 1_000);
        assert!(
            c.exp > c.iat && c.exp - c.iat <= 300,
            "exp at most five minutes ahead"
        );
        assert_eq!(c.jti, "j1");
    }

    #[test]
    fn test_default_scopes_are_v2_unless_the_server_knows_only_v1() {
        assert_eq!(
            default_scopes(WRITTEN_TYPES, false),
            "system/Observation.crus system/Device.crus system/DeviceAssociation.crus \
             system/DiagnosticReport.crus"
        );
        let v1 = default_scopes(WRITTEN_TYPES, true);
        assert!(v1.contains("system/Observation.read system/Observation.write"));
        assert!(!v1.contains(".crus"));
        assert_eq!(
            default_scopes(WRITTEN_TYPES_R4, false),
            "system/Observation.crus system/Device.crus system/DiagnosticReport.crus"
        );
    }

    #[test]
    fn test_discovery_reads_the_token_endpoint_and_scope_version() {
        let doc = json!({
            "token_endpoint": "https://as/token",
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"]
        });
        let d = discovery(&doc).unwrap();
        assert_eq!(d.token_endpoint, "https://as/token");
        assert!(!d.v1_only);
        let mut v1 = doc.clone();
        v1["capabilities"] = json!(["permission-v1"]);
        assert!(discovery(&v1).unwrap().v1_only);
        let mut no_cc = doc.clone();
        no_cc["grant_types_supported"] = json!(["authorization_code"]);
        assert!(discovery(&no_cc).is_err());
        let mut no_jwt = doc.clone();
        no_jwt["token_endpoint_auth_methods_supported"] = json!(["client_secret_basic"]);
        assert!(discovery(&no_jwt).is_err());
        assert!(discovery(&json!({"grant_types_supported": ["client_credentials"]})).is_err());
        // A minimal document (lists absent) is taken at its word.
        assert_eq!(
            discovery(&json!({"token_endpoint": "https://as/t"})).unwrap(),
            Discovery {
                token_endpoint: "https://as/t".into(),
                v1_only: false
            }
        );
    }

    #[test]
    fn test_tokens_are_renewed_before_they_expire() {
        let t0 = Instant::now();
        assert_eq!(
            renew_at(t0, Duration::from_secs(300)),
            t0 + Duration::from_secs(270)
        );
        assert_eq!(
            renew_at(t0, Duration::from_secs(8)),
            t0 + Duration::from_secs(6)
        );
        assert!(renew_at(t0, Duration::from_secs(1)) < t0 + Duration::from_secs(1));
    }

    /// Keys made by [`generate_key`], with the decoding key read from their public JWK (as
    /// an authorization server reads the JWKS). Made once: RSA generation is slow.
    fn keys() -> &'static [(SigningKey, jsonwebtoken::DecodingKey, Value); 4] {
        static KEYS: std::sync::OnceLock<[(SigningKey, jsonwebtoken::DecodingKey, Value); 4]> =
            std::sync::OnceLock::new();
        KEYS.get_or_init(|| {
            let make = |alg, kid: &str| {
                let (pem, jwk) = generate_key(alg, kid).unwrap();
                let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
                let decoding = jsonwebtoken::DecodingKey::from_jwk(&parsed).unwrap();
                let key = SigningKey {
                    kid: kid.into(),
                    alg,
                    pem,
                };
                (key, decoding, jwk)
            };
            [
                make(Alg::Es384, "ec-1"),
                make(Alg::Rs384, "rsa-1"),
                make(Alg::Es384, "ec-2"),
                make(Alg::Rs384, "rsa-2"),
            ]
        })
    }

    #[test]
    fn test_generated_public_jwks_carry_only_public_fields() {
        for (key, _, jwk) in keys() {
            let fields: Vec<&str> = jwk
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let expected: &[&str] = match key.alg {
                Alg::Es384 => &["alg", "crv", "kid", "kty", "use", "x", "y"],
                Alg::Rs384 => &["alg", "e", "kid", "kty", "n", "use"],
            };
            assert_eq!(fields, expected);
            assert_eq!(jwk["kid"], key.kid.as_str());
        }
        let (_, _, rsa) = &keys()[1];
        // 3072-bit modulus: 384 bytes, 512 base64url characters.
        assert_eq!(rsa["n"].as_str().unwrap().len(), 512);
        assert_eq!(rsa["e"], "AQAB");
    }

    #[test]
    fn test_assertions_verify_with_the_public_jwk_and_carry_the_kid() {
        let now = chrono::Utc::now().timestamp().unsigned_abs();
        let keys = keys();
        for (i, (key, public, _)) in keys.iter().enumerate() {
            let claims = assertion_claims("c", "https://as/token", now, format!("jti-{i}"));
            let jwt = sign(key, &claims).unwrap();
            let header = jsonwebtoken::decode_header(&jwt).unwrap();
            assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            let alg = match key.alg {
                Alg::Es384 => jsonwebtoken::Algorithm::ES384,
                Alg::Rs384 => jsonwebtoken::Algorithm::RS384,
            };
            assert_eq!(header.alg, alg);
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["https://as/token"]);
            let decoded = jsonwebtoken::decode::<AssertionClaims>(&jwt, public, &v).unwrap();
            assert_eq!(decoded.claims, claims);
            // The other key of the same kind does not verify it.
            let (_, other_public, _) = &keys[(i + 2) % 4];
            assert!(jsonwebtoken::decode::<AssertionClaims>(&jwt, other_public, &v).is_err());
        }
    }

    #[test]
    fn test_a_key_of_the_wrong_kind_cannot_sign() {
        let mut ec = keys()[0].0.clone();
        ec.pem = keys()[1].0.pem.clone();
        let claims = assertion_claims("c", "https://as/token", 1, "j".into());
        assert!(sign(&ec, &claims).is_err());
    }

    #[test]
    fn test_token_endpoint_refusals_hold_the_target_and_outages_retry() {
        use oauth2::StandardErrorResponse;
        let refused = |kind: BasicErrorResponseType| {
            classify_token_error(&RequestTokenError::ServerResponse(
                StandardErrorResponse::new(kind, Some("secret detail".into()), None),
            ))
        };
        let f = refused(BasicErrorResponseType::InvalidClient);
        assert_eq!(f.class, Class::Target(TargetFault::Unauthorized));
        assert!(
            !f.reason.contains("secret detail"),
            "server text is not logged"
        );
        assert_eq!(
            refused(BasicErrorResponseType::UnauthorizedClient).class,
            Class::Target(TargetFault::Unauthorized)
        );
        assert_eq!(
            refused(BasicErrorResponseType::InvalidScope).class,
            Class::Target(TargetFault::Forbidden)
        );
        let outage = classify_token_error(&RequestTokenError::Request(HttpError::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(3)),
        }));
        assert_eq!(
            outage.class,
            Class::Transient {
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }
}
