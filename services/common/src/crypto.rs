//! AES-256-GCM encryption of secrets at rest (provider tokens, client secrets, EHR credentials).
//!
//! Keys are given by the operator as `OHX_SECRET_KEYS="kid1:<base64 32 bytes>,kid0:<...>"` with
//! `OHX_SECRET_ACTIVE_KEY=kid1`. New secrets are sealed with the active key; older key ids stay
//! readable, so keys can rotate. A sealed value is `<kid>:<base64(nonce || ciphertext)>`, bound
//! to its row by associated data (e.g. `provider_link:<id>:access_token`).

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::HashMap;

/// A secret that cannot be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("invalid key specification: {0}")]
    InvalidKeys(String),
    #[error("unknown key id {0}")]
    UnknownKey(String),
    #[error("malformed sealed value")]
    Malformed,
    #[error("decryption failed (wrong key or tampered value)")]
    Decrypt,
}

/// Seals and opens secrets with AES-256-GCM under operator-supplied keys.
#[derive(Clone)]
pub struct SecretBox {
    keys: HashMap<String, Aes256Gcm>,
    active: String,
    /// Key of [`SecretBox::digest`]: derived from the active key, never used to encrypt.
    digest_key: [u8; 32],
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("active", &self.active)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key` (at most one SHA-256 block of key is used as
/// is; a longer key is hashed first).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

impl SecretBox {
    /// Reads `OHX_SECRET_KEYS` and `OHX_SECRET_ACTIVE_KEY` (default: the first key listed).
    pub fn from_env() -> Result<Self, CryptoError> {
        let spec = std::env::var("OHX_SECRET_KEYS")
            .map_err(|_| CryptoError::InvalidKeys("OHX_SECRET_KEYS is not set".into()))?;
        let active = std::env::var("OHX_SECRET_ACTIVE_KEY").ok();
        Self::from_spec(&spec, active.as_deref())
    }

    /// Parses `kid:base64key[,kid:base64key...]`.
    pub fn from_spec(spec: &str, active: Option<&str>) -> Result<Self, CryptoError> {
        let mut keys = HashMap::new();
        let mut raws = HashMap::new();
        let mut first = None;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kid, b64) = part
                .split_once(':')
                .ok_or_else(|| CryptoError::InvalidKeys("expected kid:base64key".into()))?;
            let raw = STANDARD
                .decode(b64)
                .map_err(|_| CryptoError::InvalidKeys(format!("key {kid} is not base64")))?;
            let cipher = Aes256Gcm::new_from_slice(&raw)
                .map_err(|_| CryptoError::InvalidKeys(format!("key {kid} must be 32 bytes")))?;
            first.get_or_insert_with(|| kid.to_string());
            keys.insert(kid.to_string(), cipher);
            raws.insert(kid.to_string(), raw);
        }
        let active = match active {
            Some(a) => a.to_string(),
            None => first.ok_or_else(|| CryptoError::InvalidKeys("no keys given".into()))?,
        };
        let Some(raw) = raws.get(&active) else {
            return Err(CryptoError::UnknownKey(active));
        };
        let digest_key = hmac_sha256(raw, b"ohx digest key");
        Ok(Self {
            keys,
            active,
            digest_key,
        })
    }

    /// A keyed digest of `data` for `context` (HMAC-SHA256 under a key derived from the
    /// active key), hex: bookkeeping that must match equal inputs without being reversible by
    /// enumerating them (a hash of a reading's content is guessable; this is not, without the
    /// key). Rotating the active key changes every digest.
    #[must_use]
    pub fn digest(&self, context: &str, data: &[u8]) -> String {
        let mut msg = Vec::with_capacity(context.len() + 1 + data.len());
        msg.extend_from_slice(context.as_bytes());
        msg.push(0x1f);
        msg.extend_from_slice(data);
        hex::encode(hmac_sha256(&self.digest_key, &msg))
    }

    /// Returns the active key id.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Encrypts `plaintext` with the active key, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Result<String, CryptoError> {
        let cipher = self
            .keys
            .get(&self.active)
            .ok_or_else(|| CryptoError::UnknownKey(self.active.clone()))?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let mut buf = nonce.to_vec();
        buf.extend_from_slice(&ct);
        Ok(format!("{}:{}", self.active, STANDARD.encode(buf)))
    }

    /// Decrypts a value made by [`SecretBox::seal`] with the same `aad`.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, CryptoError> {
        let (kid, b64) = sealed.split_once(':').ok_or(CryptoError::Malformed)?;
        let cipher = self
            .keys
            .get(kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_string()))?;
        let raw = STANDARD.decode(b64).map_err(|_| CryptoError::Malformed)?;
        if raw.len() < 12 + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = raw.split_at(12);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)
    }

    /// Decrypts a UTF-8 secret.
    pub fn open_string(&self, sealed: &str, aad: &str) -> Result<String, CryptoError> {
        String::from_utf8(self.open(sealed, aad)?).map_err(|_| CryptoError::Malformed)
    }
}

/// API keys of the REST API (machines' credentials, org-scoped): `ohxk_` and 43 random
/// characters; only their SHA-256 is stored.
/// The prefix of every API key: tells keys and JWTs apart, and makes a leaked key easy to
/// find with secret scanners.
pub const API_KEY_PREFIX: &str = "ohxk_";

/// A new API key: the key (shown once), its SHA-256 (stored) and its display prefix.
pub fn new_api_key() -> (String, String, String) {
    let bytes: [u8; 32] = rand::random();
    let key = format!(
        "{API_KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let prefix = key[..API_KEY_PREFIX.len() + 8].to_owned();
    (key.clone(), key_hash(&key), prefix)
}

/// The stored form of an API key.
pub fn key_hash(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HxoZGBcWFRQTEhEQDw4NDAsKCQgHBgUEAwIBAB8eHRw=";

    #[test]
    fn test_hmac_sha256_matches_rfc_4231() {
        // Test case 2: key "Jefe".
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn test_digest_is_stable_per_key_and_context() {
        let a = SecretBox::from_spec(K1, None).unwrap();
        let b = SecretBox::from_spec(&format!("{K2},{K1}"), Some("k1")).unwrap();
        let other = SecretBox::from_spec(K2, None).unwrap();
        assert_eq!(a.digest("import_row", b"r1"), b.digest("import_row", b"r1"));
        assert_ne!(a.digest("import_row", b"r1"), a.digest("import_row", b"r2"));
        assert_ne!(a.digest("import_row", b"r1"), a.digest("other", b"r1"));
        assert_ne!(
            a.digest("import_row", b"r1"),
            other.digest("import_row", b"r1")
        );
        assert_eq!(a.digest("c", b"x").len(), 64);
    }

    #[test]
    fn test_seal_open_round_trip_and_aad_binding() {
        let b = SecretBox::from_spec(K1, None).unwrap();
        let sealed = b
            .seal(b"refresh-token", "provider_link:1:refresh_token")
            .unwrap();
        assert!(sealed.starts_with("k1:"));
        assert!(!sealed.contains("refresh-token"));
        assert_eq!(
            b.open_string(&sealed, "provider_link:1:refresh_token")
                .unwrap(),
            "refresh-token"
        );
        assert!(matches!(
            b.open(&sealed, "provider_link:2:refresh_token"),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn test_rotation_keeps_old_keys_readable() {
        let old = SecretBox::from_spec(K1, None).unwrap();
        let sealed = old.seal(b"x", "a").unwrap();
        let rotated = SecretBox::from_spec(&format!("{K2},{K1}"), Some("k2")).unwrap();
        assert_eq!(rotated.open(&sealed, "a").unwrap(), b"x");
        assert!(rotated.seal(b"y", "a").unwrap().starts_with("k2:"));
    }

    #[test]
    fn test_bad_specs_and_tampering_are_errors() {
        assert!(SecretBox::from_spec("k:short", None).is_err());
        assert!(SecretBox::from_spec(K1, Some("nope")).is_err());
        let b = SecretBox::from_spec(K1, None).unwrap();
        let mut sealed = b.seal(b"x", "a").unwrap();
        sealed.pop();
        sealed.push('A');
        assert!(b.open(&sealed, "a").is_err());
    }
}
