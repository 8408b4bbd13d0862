//! Signed notifications: the provider's public keyset, fetched from its published URL, cached,
//! and fetched again when a signature names a key id the cache does not hold (keys rotate).
//!
//! A refetch for an unknown key id happens at most once per [`REFETCH_AFTER`]: a forged
//! signature naming random key ids cannot turn the gateway into a request amplifier against
//! the provider's key server. The keyset is also refreshed after [`KEYSET_TTL`].

use ohx_providers::SignedWebhooks;
use ohx_providers::google_health::tink::{Keyset, SignatureError, signature_key_id};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a fetched keyset is used before it is fetched again.
pub const KEYSET_TTL: Duration = Duration::from_secs(6 * 3600);
/// Least time between two fetches of the keyset.
pub const REFETCH_AFTER: Duration = Duration::from_secs(60);

/// Why a notification's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No signature header.
    Missing,
    /// The signature is malformed, names a key the provider does not publish, or does not
    /// match the body.
    Invalid(String),
    /// The keyset could not be fetched (answered 503: the provider retries).
    KeysetUnavailable,
}

#[derive(Debug, Default)]
struct Cached {
    keyset: Option<Keyset>,
    fetched_at: Option<Instant>,
}

/// The signature checks of one provider.
#[derive(Debug)]
pub struct Signatures {
    scheme: SignedWebhooks,
    url: String,
    http: reqwest::Client,
    cached: Mutex<Cached>,
}

impl Signatures {
    /// Checks for `scheme`, with the keyset at `url`.
    pub fn new(scheme: SignedWebhooks, url: String, http: reqwest::Client) -> Self {
        Self {
            scheme,
            url,
            http,
            cached: Mutex::new(Cached::default()),
        }
    }

    async fn fetch(&self) -> Option<Keyset> {
        let response = self.http.get(&self.url).send().await.ok()?;
        if !response.status().is_success() {
            tracing::warn!(status = response.status().as_u16(), "keyset fetch refused");
            return None;
        }
        let body = response.bytes().await.ok()?;
        match Keyset::from_json(&body) {
            Ok(k) => Some(k),
            Err(error) => {
                tracing::warn!(%error, "keyset unusable");
                None
            }
        }
    }

    /// The keyset to check `key_id` with: the cached one, or a fresh one when it is stale or
    /// lacks the key (at most once per [`REFETCH_AFTER`]).
    async fn keyset_for(&self, key_id: u32) -> Result<Keyset, Refused> {
        let mut cached = self.cached.lock().await;
        let stale = cached.fetched_at.is_none_or(|t| t.elapsed() > KEYSET_TTL);
        let lacks = cached.keyset.as_ref().is_none_or(|k| !k.has(key_id));
        let may_fetch = cached
            .fetched_at
            .is_none_or(|t| t.elapsed() > REFETCH_AFTER);
        if (stale || lacks) && may_fetch {
            if let Some(fresh) = self.fetch().await {
                tracing::info!(key_id, "keyset fetched");
                cached.keyset = Some(fresh);
            }
            // Counted as an attempt even when it failed, so an outage is not hammered.
            cached.fetched_at = Some(Instant::now());
        }
        cached.keyset.clone().ok_or(Refused::KeysetUnavailable)
    }

    /// Checks the signature of `body` in `headers`.
    ///
    /// # Errors
    /// Why it was not accepted.
    pub async fn check(&self, headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), Refused> {
        let signature = self
            .scheme
            .headers
            .iter()
            .find_map(|h| headers.get(*h))
            .and_then(|v| v.to_str().ok())
            .ok_or(Refused::Missing)?;
        let key_id = signature_key_id(signature).map_err(|e| Refused::Invalid(e.to_string()))?;
        let keyset = self.keyset_for(key_id).await?;
        keyset.verify(body, signature).map_err(|e| match e {
            SignatureError::UnknownKey(id) => {
                Refused::Invalid(format!("key {id} is not in the provider's keyset"))
            }
            other => Refused::Invalid(other.to_string()),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::extract::State;
    use base64::Engine as _;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SCHEME: SignedWebhooks = SignedWebhooks {
        headers: &["google-health-api-signature", "x-healthapi-signature"],
        keyset_url: "unused",
        keyset_url_env: "UNUSED",
    };

    /// A key server: serves a keyset of the current keys, counts its fetches.
    #[derive(Clone, Default)]
    struct KeyServer {
        keys: Arc<std::sync::Mutex<Vec<(u32, SigningKey)>>>,
        fetches: Arc<AtomicUsize>,
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn keyset_json(keys: &[(u32, SigningKey)]) -> serde_json::Value {
        let key: Vec<serde_json::Value> = keys
            .iter()
            .map(|(id, k)| {
                let p = k.verifying_key().to_encoded_point(false);
                let mut v = vec![0x08, 0x00, 0x12, 0x06, 0x08, 3, 0x10, 2, 0x18, 2, 0x1a, 32];
                v.extend_from_slice(p.x().unwrap());
                v.extend_from_slice(&[0x22, 32]);
                v.extend_from_slice(p.y().unwrap());
                serde_json::json!({"keyData": {"typeUrl": "type.googleapis.com/google.crypto.tink.EcdsaPublicKey",
                    "value": b64(&v), "keyMaterialType": "ASYMMETRIC_PUBLIC"}, "status": "ENABLED",
                    "keyId": id, "outputPrefixType": "TINK"})
            })
            .collect();
        serde_json::json!({"primaryKeyId": keys.first().map_or(0, |k| k.0), "key": key})
    }

    async fn serve(server: KeyServer) -> String {
        async fn keyset(State(s): State<KeyServer>) -> axum::Json<serde_json::Value> {
            s.fetches.fetch_add(1, Ordering::SeqCst);
            let keys = s.keys.lock().unwrap().clone();
            axum::Json(keyset_json(&keys))
        }
        let app = axum::Router::new()
            .route("/keyset.json", axum::routing::get(keyset))
            .with_state(server);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/keyset.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn signed(key: &SigningKey, id: u32, body: &[u8]) -> axum::http::HeaderMap {
        let sig: Signature = key.sign(body);
        let mut raw = vec![1u8];
        raw.extend_from_slice(&id.to_be_bytes());
        raw.extend_from_slice(sig.to_der().as_bytes());
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-healthapi-signature", b64(&raw).parse().unwrap());
        h
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32].into()).unwrap()
    }

    #[tokio::test]
    async fn test_rotation_is_followed_and_unknown_ids_refetch_at_most_once_a_minute() {
        let server = KeyServer::default();
        server.keys.lock().unwrap().push((1, key(1)));
        let url = serve(server.clone()).await;
        let check = Signatures::new(SCHEME, url, reqwest::Client::new());
        let body = br#"[{"data":{}}]"#;
        assert_eq!(check.check(&signed(&key(1), 1, body), body).await, Ok(()));
        assert_eq!(check.check(&signed(&key(1), 1, body), body).await, Ok(()));
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1, "cached");
        // A tampered body, a missing header.
        assert!(matches!(
            check.check(&signed(&key(1), 1, body), b"[{}]").await,
            Err(Refused::Invalid(_))
        ));
        assert_eq!(
            check.check(&axum::http::HeaderMap::new(), body).await,
            Err(Refused::Missing)
        );
        // A forged key id: within a minute of the last fetch, no refetch (no amplification).
        assert!(matches!(
            check.check(&signed(&key(9), 9, body), body).await,
            Err(Refused::Invalid(_))
        ));
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1);
        // Google rotates: once the last fetch is a minute old, the new key id is fetched.
        server.keys.lock().unwrap().insert(0, (2, key(2)));
        check.cached.lock().await.fetched_at =
            Some(Instant::now() - REFETCH_AFTER - Duration::from_secs(1));
        assert_eq!(check.check(&signed(&key(2), 2, body), body).await, Ok(()));
        assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn test_no_keyset_at_all_is_unavailable_not_accepted() {
        let check = Signatures::new(
            SCHEME,
            "http://127.0.0.1:9/keyset.json".into(),
            reqwest::Client::new(),
        );
        let body = b"[]";
        assert_eq!(
            check.check(&signed(&key(1), 1, body), body).await,
            Err(Refused::KeysetUnavailable)
        );
    }
}
