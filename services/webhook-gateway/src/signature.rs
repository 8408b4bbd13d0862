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
