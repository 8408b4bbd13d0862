//! OAuth2 against standard token endpoints (RFC 6749), through the `oauth2` crate: the
//! authorization-code and refresh grants, the `id_token` of OpenID Connect providers, and the
//! classification of every failure into a [`ProviderError`].
//!
//! Requests go through [`ohx_common::oauth_http`], the workspace's adapter of the crate to
//! reqwest 0.13.

use crate::{ProviderError, Tokens};
use base64::Engine as _;
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    ExtraTokenFields, RedirectUrl, RefreshToken, RequestTokenError, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
pub use ohx_common::oauth_http::{Http, HttpError, retry_after, send};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The fields a token response carries beyond RFC 6749: OpenID Connect's `id_token`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdTokenField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenField {}

/// A token response with an optional `id_token`.
pub type TokenAnswer = StandardTokenResponse<IdTokenField, BasicTokenType>;

/// A client with an authorize and a token endpoint.
pub type StandardClient = oauth2::Client<
    BasicErrorResponse,
    TokenAnswer,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A provider's OAuth2 endpoints and how it wants client credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Path of the authorize page on the authorize host.
    pub authorize_path: &'static str,
    /// Path of the token endpoint on the API host.
    pub token_path: &'static str,
    /// Credentials in the form body (`client_id`, `client_secret`) rather than HTTP Basic.
    pub credentials_in_body: bool,
}

/// A client for `app` with the provider's `endpoints` at `api_base` (token) and
/// `authorize_base` (authorize page).
///
/// # Errors
/// A [`ProviderError::Permanent`] when a base URL is not a URL.
pub fn client(
    endpoints: Endpoints,
    authorize_base: &str,
    api_base: &str,
    client_id: &str,
    client_secret: &str,
) -> Result<StandardClient, ProviderError> {
    let url = |base: &str, path: &str| format!("{}{path}", base.trim_end_matches('/'));
    let bad_url = |_| ProviderError::Permanent {
        kind: "provider",
        reason: "the provider's OAuth2 endpoint is not a valid URL".into(),
    };
    let auth_url = AuthUrl::new(url(authorize_base, endpoints.authorize_path)).map_err(bad_url)?;
    let token_url = TokenUrl::new(url(api_base, endpoints.token_path)).map_err(bad_url)?;
    Ok(oauth2::Client::new(ClientId::new(client_id.to_owned()))
        .set_client_secret(ClientSecret::new(client_secret.to_owned()))
        .set_auth_type(if endpoints.credentials_in_body {
            AuthType::RequestBody
        } else {
            AuthType::BasicAuth
        })
        .set_auth_uri(auth_url)
        .set_token_uri(token_url))
}

/// A fresh PKCE pair (RFC 7636, S256): the verifier (kept until the code exchange) and the
/// challenge (sent with the authorize request).
#[must_use]
pub fn pkce_pair() -> (String, String) {
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    (verifier.secret().clone(), challenge.as_str().to_owned())
}

/// Exchanges an authorization code (with the redirect URI it was issued for).
///
/// # Errors
/// The failure, classified by [`classify`].
pub async fn exchange_code(
    client: &StandardClient,
    http: &reqwest::Client,
    provider: &str,
    code: &str,
    redirect_uri: &str,
    code_verifier: Option<&str>,
) -> Result<TokenAnswer, ProviderError> {
    let redirect =
        RedirectUrl::new(redirect_uri.to_owned()).map_err(|_| ProviderError::Permanent {
            kind: "provider",
            reason: "the redirect URI is not a valid URL".into(),
        })?;
    let mut request = client
        .exchange_code(AuthorizationCode::new(code.to_owned()))
        .set_redirect_uri(Cow::Owned(redirect));
    if let Some(v) = code_verifier {
        request = request.set_pkce_verifier(oauth2::PkceCodeVerifier::new(v.to_owned()));
    }
    request
        .request_async(&Http(http))
        .await
        .map_err(|e| classify(provider, &e))
}

/// Refreshes with a refresh token; the new tokens ([`tokens`]).
///
/// # Errors
/// The failure, classified by [`classify`].
pub async fn refresh(
    client: &StandardClient,
    http: &reqwest::Client,
    provider: &str,
    refresh_token: String,
) -> Result<Tokens, ProviderError> {
    let token = RefreshToken::new(refresh_token);
    client
        .exchange_refresh_token(&token)
        .request_async(&Http(http))
        .await
        .map(|answer| tokens(&answer))
        .map_err(|e| classify(provider, &e))
}

/// The tokens of a token response; `expires_in` defaults to one hour when the server omits it.
#[must_use]
pub fn tokens(answer: &TokenAnswer) -> Tokens {
    Tokens {
        access_token: answer.access_token().secret().clone(),
        refresh_token: answer.refresh_token().map(|t| t.secret().clone()),
        expires_in: answer
            .expires_in()
            .map_or(3_600, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        scope: answer
            .scopes()
            .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")),
    }
}

/// The `sub` claim of an `id_token` (a compact JWS).
///
/// The signature is not checked: the token came straight from the provider's token endpoint
/// over TLS in the authorization-code flow, which OpenID Connect Core §3.1.3.7 accepts in place
/// of signature validation.
#[must_use]
pub fn id_token_subject(id_token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Claims {
        sub: Option<serde_json::Value>,
    }
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    match claims.sub? {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Classifies a token-endpoint failure. Reasons carry the OAuth2 error code and HTTP status
/// only, never the server's free text.
#[must_use]
pub fn classify(
    provider: &str,
    e: &RequestTokenError<HttpError, BasicErrorResponse>,
) -> ProviderError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = r.error().as_ref().to_owned();
            match r.error() {
                BasicErrorResponseType::InvalidGrant => ProviderError::GrantRevoked {
                    reason: format!("{provider} token endpoint: {code}"),
                },
                BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => ProviderError::ClientRejected {
                    reason: format!("{provider} token endpoint: {code}"),
                },
                _ => ProviderError::Permanent {
                    kind: "provider",
                    reason: format!("{provider} token endpoint: {code}"),
                },
            }
        }
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) if *status == 429 => ProviderError::RateLimited {
            reason: format!("{provider} token endpoint: http status 429"),
            retry_after: *retry_after,
        },
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) => ProviderError::Transient {
            reason: format!("{provider} token endpoint: http status {status}"),
            retry_after: *retry_after,
        },
        RequestTokenError::Request(HttpError::Transport(_)) => ProviderError::Transient {
            reason: format!("{provider} token endpoint: http request failed"),
            retry_after: None,
        },
        RequestTokenError::Parse(..) | RequestTokenError::Other(_) => ProviderError::Permanent {
            kind: "decode",
            reason: format!("{provider} token endpoint: the answer could not be decoded"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn jws(payload: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", e(r#"{"alg":"RS256"}"#), e(payload))
    }

    #[test]
    fn test_id_token_subject_reads_sub_of_the_payload() {
        assert_eq!(
            id_token_subject(&jws(r#"{"sub":"omron-42","aud":"x"}"#)).as_deref(),
            Some("omron-42")
        );
        assert_eq!(
            id_token_subject(&jws(r#"{"sub":12345}"#)).as_deref(),
            Some("12345")
        );
        assert_eq!(id_token_subject(&jws(r#"{"aud":"x"}"#)), None);
        assert_eq!(id_token_subject(&jws(r#"{"sub":"  "}"#)), None);
        assert_eq!(id_token_subject("not-a-jwt"), None);
        assert_eq!(id_token_subject("a.%%%.c"), None);
    }

    fn server_error(code: &str) -> RequestTokenError<HttpError, BasicErrorResponse> {
        let r: BasicErrorResponse = serde_json::from_str(&format!(
            r#"{{"error":"{code}","error_description":"secret text 120/80"}}"#
        ))
        .unwrap();
        RequestTokenError::ServerResponse(r)
    }

    #[test]
    fn test_classify_maps_oauth2_errors_to_what_the_stages_do() {
        assert!(matches!(
            classify("omron", &server_error("invalid_grant")),
            ProviderError::GrantRevoked { .. }
        ));
        assert!(matches!(
            classify("omron", &server_error("invalid_client")),
            ProviderError::ClientRejected { .. }
        ));
        assert!(matches!(
            classify("omron", &server_error("unauthorized_client")),
            ProviderError::ClientRejected { .. }
        ));
        let e = classify("omron", &server_error("invalid_scope"));
        assert!(matches!(
            e,
            ProviderError::Permanent {
                kind: "provider",
                ..
            }
        ));
        // the server's description never reaches the reason
        assert!(!e.to_string().contains("120/80"), "{e}");
        let limited = RequestTokenError::Request(HttpError::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(
            classify("omron", &limited),
            ProviderError::RateLimited {
                reason: "omron token endpoint: http status 429".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        let down = RequestTokenError::Request(HttpError::Status {
            status: 503,
            retry_after: None,
        });
        assert!(matches!(
            classify("omron", &down),
            ProviderError::Transient { .. }
        ));
        let garbage = RequestTokenError::Other("unexpected content type".into());
        assert!(matches!(
            classify("omron", &garbage),
            ProviderError::Permanent { kind: "decode", .. }
        ));
    }

    #[test]
    fn test_tokens_keep_scope_and_default_lifetime() {
        let answer: TokenAnswer = serde_json::from_str(
            r#"{"access_token":"a","token_type":"Bearer","refresh_token":"r","scope":"bloodpressure openid","id_token":"x.y.z"}"#,
        )
        .unwrap();
        let t = tokens(&answer);
        assert_eq!(t.access_token, "a");
        assert_eq!(t.refresh_token.as_deref(), Some("r"));
        assert_eq!(t.expires_in, 3_600);
        assert_eq!(t.scope.as_deref(), Some("bloodpressure openid"));
        assert_eq!(answer.extra_fields().id_token.as_deref(), Some("x.y.z"));
    }

    #[test]
    fn test_pkce_challenge_is_the_s256_of_the_verifier() {
        use sha2::Digest as _;
        let (verifier, challenge) = pkce_pair();
        assert!((43..=128).contains(&verifier.len()), "{verifier}");
        let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        assert_eq!(challenge, expected);
        assert_ne!(pkce_pair().0, verifier, "fresh each time");
    }

    #[test]
    fn test_retry_after_reads_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
