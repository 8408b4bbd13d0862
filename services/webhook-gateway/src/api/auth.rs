//! Who calls the REST API, and what they may do.
//!
//! Two credentials, both as `Authorization: Bearer …`:
//! - **OIDC access tokens** (JWT) of the configured issuer, checked against its JWKS (fetched
//!   through discovery, re-fetched once when a token names an unknown key: rotation), its
//!   issuer, the API's audience and expiry. The role comes from a configurable claim, the
//!   organization from another.
//! - **API keys** (`ohxk_…`) for machines: org-scoped, stored as SHA-256, with an expiry,
//!   revocable.
//!
//! Roles, from most to least: platform admin (organizations), org admin (everything in the
//! organization), operator (links, syncs, re-drive), viewer (read).

use super::problem::ApiError;
use deadpool_postgres::Pool;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::RwLock;
use uuid::Uuid;

/// What a caller may do. Ordered: a role may do everything the roles after it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    PlatformAdmin,
    OrgAdmin,
    Operator,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::PlatformAdmin,
        Role::OrgAdmin,
        Role::Operator,
        Role::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::OrgAdmin => "org_admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Whether this role includes `needed` (an org admin may do what an operator may).
    pub fn includes(self, needed: Role) -> bool {
        self <= needed
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `oidc:{sub}` or `key:{prefix}`: what the audit log records.
    pub actor: String,
    /// The caller's organization (`None`: a platform admin without one).
    pub org: Option<Uuid>,
    pub role: Role,
}

impl Caller {
    /// The caller's organization, for the org-scoped resources. A platform admin without
    /// one manages organizations only.
    pub fn org(&self) -> Result<Uuid, ApiError> {
        self.org.ok_or_else(|| {
            ApiError::Forbidden(
                "this resource belongs to an organization: sign in with an organization role"
                    .into(),
            )
        })
    }

    /// Refuses a caller whose role does not include `needed` (403: the caller may see the
    /// resource, not change it).
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role.includes(needed) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs the {} role or higher",
                needed.as_str()
            )))
        }
    }
}

pub use ohx_common::crypto::{API_KEY_PREFIX, key_hash, new_api_key};

/// OIDC settings (`OHX_API_OIDC_*`).
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The issuer (`iss`); its discovery document names the JWKS.
    pub issuer: String,
    /// The audience access tokens must be for (`aud`).
    pub audience: String,
    /// Claim holding the role(s): a string or an array; a dotted path reaches into objects
    /// (`realm_access.roles`).
    pub roles_claim: String,
    /// Claim holding the organization id.
    pub org_claim: String,
    /// Prefix of role values in the claim (`ohx:` makes `ohx:operator` the operator role).
    pub role_prefix: String,
    /// Least time between two JWKS fetches caused by unknown key ids
    /// (`OHX_API_OIDC_JWKS_REFETCH_MS`, default 30 s): a flood of tokens with made-up `kid`s
    /// must not become a flood of fetches.
    pub jwks_refetch: Duration,
}

impl OidcSettings {
    /// Settings from `OHX_API_OIDC_ISSUER` (unset: OIDC is off), `OHX_API_OIDC_AUDIENCE`,
    /// `OHX_API_OIDC_ROLES_CLAIM` (default `ohx_roles`), `OHX_API_OIDC_ORG_CLAIM` (default
    /// `ohx_org`) and `OHX_API_OIDC_ROLE_PREFIX` (default empty).
    pub fn from_env() -> Result<Option<Self>, String> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(issuer) = var("OHX_API_OIDC_ISSUER") else {
            return Ok(None);
        };
        let audience = var("OHX_API_OIDC_AUDIENCE")
            .ok_or("OHX_API_OIDC_AUDIENCE is required with OHX_API_OIDC_ISSUER")?;
        Ok(Some(Self {
            issuer,
            audience,
            roles_claim: var("OHX_API_OIDC_ROLES_CLAIM").unwrap_or_else(|| "ohx_roles".into()),
            org_claim: var("OHX_API_OIDC_ORG_CLAIM").unwrap_or_else(|| "ohx_org".into()),
            role_prefix: var("OHX_API_OIDC_ROLE_PREFIX").unwrap_or_default(),
            jwks_refetch: ohx_common::config::millis("OHX_API_OIDC_JWKS_REFETCH_MS", 30_000)
                .map_err(|e| e.to_string())?,
        }))
    }
}

/// Signature algorithms accepted on access tokens (never `none`, never HMAC: the API holds
/// no shared secret with the issuer).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_S: u64 = 30;

/// Checks access tokens of one OIDC issuer.
#[derive(Debug)]
pub struct OidcVerifier {
    settings: OidcSettings,
    http: reqwest::Client,
    /// The JWKS and when it was fetched.
    keys: RwLock<Option<(JwkSet, Instant)>>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl OidcVerifier {
    pub fn new(settings: OidcSettings, http: reqwest::Client) -> Self {
        Self {
            settings,
            http,
            keys: RwLock::new(None),
        }
    }

    async fn fetch_keys(&self) -> Result<JwkSet, ApiError> {
        let unavailable = |e: String| ApiError::Unavailable(format!("OIDC issuer: {e}"));
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if discovery.issuer != self.settings.issuer {
            return Err(unavailable(format!(
                "discovery names issuer {:?}, not the configured one",
                discovery.issuer
            )));
        }
        self.http
            .get(&discovery.jwks_uri)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))
    }

    /// The key for `kid`, fetching the JWKS when there is none yet or when `kid` is unknown
    /// (at most once per [`OidcSettings::jwks_refetch`]).
    async fn key(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        {
            let cached = self.keys.read().await;
            if let Some((set, fetched)) = cached.as_ref() {
                if let Some(jwk) = set.find(kid) {
                    return DecodingKey::from_jwk(jwk)
                        .map_err(|e| ApiError::Unauthorized(format!("unusable key {kid}: {e}")));
                }
                if fetched.elapsed() < self.settings.jwks_refetch {
                    return Err(ApiError::Unauthorized(format!(
                        "the token is signed with an unknown key {kid:?}"
                    )));
                }
            }
        }
        let mut cached = self.keys.write().await;
        // Another request may have fetched meanwhile.
        let fresh = cached
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < self.settings.jwks_refetch);
        if !fresh {
            let set = self.fetch_keys().await?;
            *cached = Some((set, Instant::now()));
        }
        let Some((set, _)) = cached.as_ref() else {
            return Err(ApiError::Unavailable("OIDC issuer: no keys".into()));
        };
        let jwk = set.find(kid).ok_or_else(|| {
            ApiError::Unauthorized(format!("the token is signed with an unknown key {kid:?}"))
        })?;
        DecodingKey::from_jwk(jwk)
            .map_err(|e| ApiError::Unauthorized(format!("unusable key {kid}: {e}")))
    }

    /// Checks a token and returns its caller.
    pub async fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| ApiError::Unauthorized(format!("not a JWT: {e}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(ApiError::Unauthorized(format!(
                "tokens signed with {:?} are not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| ApiError::Unauthorized("the token names no key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_S;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        caller_from_claims(&self.settings, &data.claims)
    }
}

/// The value at a dotted path of a JSON object (`realm_access.roles`).
fn claim<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// The caller a token's claims describe: the highest role named in the roles claim (a
/// string or an array of strings, with the configured prefix) and the organization claim.
pub fn caller_from_claims(
    settings: &OidcSettings,
    claims: &serde_json::Value,
) -> Result<Caller, ApiError> {
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .ok_or_else(|| ApiError::Unauthorized("the token has no subject".into()))?;
    let names: Vec<&str> = match claim(claims, &settings.roles_claim) {
        Some(serde_json::Value::String(s)) => s.split_whitespace().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    let role = names
        .iter()
        .filter_map(|n| n.strip_prefix(settings.role_prefix.as_str()))
        .filter_map(Role::parse)
        .min()
        .ok_or_else(|| ApiError::Forbidden("the token grants no ohx role".into()))?;
    let org = match claim(claims, &settings.org_claim) {
        Some(serde_json::Value::String(s)) => Some(Uuid::parse_str(s).map_err(|_| {
            ApiError::Unauthorized("the token's organization claim is not an id".into())
        })?),
        None | Some(serde_json::Value::Null) => None,
        Some(_) => {
            return Err(ApiError::Unauthorized(
                "the token's organization claim is not a string".into(),
            ));
        }
    };
    if org.is_none() && role != Role::PlatformAdmin {
        return Err(ApiError::Forbidden(
            "the token names no organization for its role".into(),
        ));
    }
    Ok(Caller {
        actor: format!("oidc:{sub}"),
        org,
        role,
    })
}

const API_KEY_CALLER: &str = "UPDATE api_keys SET last_used_at = now() \
     WHERE key_sha256 = $1 AND revoked_at IS NULL AND expires_at > now() \
     RETURNING organization_id, role, prefix";

/// Authenticates the bearer credential of a request.
pub async fn authenticate(
    authorization: Option<&str>,
    oidc: Option<&OidcVerifier>,
    pool: &Pool,
) -> Result<Caller, ApiError> {
    let token = authorization
        .and_then(|h| {
            let (scheme, rest) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <token>".into()))?;
    if token.starts_with(API_KEY_PREFIX) {
        let row = pool
            .get()
            .await?
            .query_opt(API_KEY_CALLER, &[&key_hash(token)])
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown, expired or revoked API key".into()))?;
        let role: String = row.get(1);
        let role = Role::parse(&role)
            .ok_or_else(|| ApiError::Internal(format!("stored API key role {role:?}")))?;
        let prefix: String = row.get(2);
        return Ok(Caller {
            actor: format!("key:{prefix}"),
            org: Some(row.get(0)),
            role,
        });
    }
    match oidc {
        Some(v) => v.verify(token).await,
        None => Err(ApiError::Unauthorized(
            "only API keys are accepted (no OIDC issuer is configured)".into(),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> OidcSettings {
        OidcSettings {
            issuer: "http://idp".into(),
            audience: "ohx".into(),
            roles_claim: "realm_access.roles".into(),
            org_claim: "ohx_org".into(),
            role_prefix: "ohx:".into(),
            jwks_refetch: Duration::from_secs(30),
        }
    }

    const ORG: &str = "0b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d";

    #[test]
    fn test_roles_order_from_platform_admin_down_to_viewer() {
        assert!(Role::PlatformAdmin.includes(Role::OrgAdmin));
        assert!(Role::OrgAdmin.includes(Role::Operator));
        assert!(Role::Operator.includes(Role::Viewer));
        assert!(!Role::Viewer.includes(Role::Operator));
        assert!(!Role::Operator.includes(Role::OrgAdmin));
        assert!(!Role::OrgAdmin.includes(Role::PlatformAdmin));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn test_claims_give_the_highest_prefixed_role_at_a_dotted_path() {
        let c = caller_from_claims(
            &settings(),
            &json!({"sub": "u1", "ohx_org": ORG,
                    "realm_access": {"roles": ["ohx:viewer", "operator", "ohx:operator"]}}),
        )
        .unwrap();
        assert_eq!(c.role, Role::Operator);
        assert_eq!(c.org, Some(Uuid::parse_str(ORG).unwrap()));
        assert_eq!(c.actor, "oidc:u1");
    }

    #[test]
    fn test_claims_without_an_ohx_role_are_refused() {
        let e = caller_from_claims(
            &settings(),
            &json!({"sub": "u1", "ohx_org": ORG, "realm_access": {"roles": ["org_admin"]}}),
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Forbidden(_)), "{e:?}");
    }

    #[test]
    fn test_an_org_role_needs_an_organization_and_a_platform_admin_does_not() {
        let no_org = |role: &str| {
            caller_from_claims(
                &settings(),
                &json!({"sub": "u1", "realm_access": {"roles": [role]}}),
            )
        };
        assert!(matches!(
            no_org("ohx:org_admin"),
            Err(ApiError::Forbidden(_))
        ));
        assert_eq!(no_org("ohx:platform_admin").unwrap().org, None);
    }

    #[test]
    fn test_a_malformed_organization_claim_is_refused() {
        let e = caller_from_claims(
            &settings(),
            &json!({"sub": "u1", "ohx_org": "acme", "realm_access": {"roles": "ohx:viewer"}}),
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Unauthorized(_)), "{e:?}");
    }

    #[test]
    fn test_api_keys_are_prefixed_unique_and_stored_as_their_hash() {
        let (a, hash_a, prefix_a) = new_api_key();
        let (b, _, _) = new_api_key();
        assert!(a.starts_with(API_KEY_PREFIX));
        assert_ne!(a, b);
        assert_eq!(hash_a, key_hash(&a));
        assert!(!hash_a.contains(&a[API_KEY_PREFIX.len()..]));
        assert!(a.starts_with(&prefix_a) && prefix_a.len() < a.len() / 2);
    }
}
