//! Tink public keysets and ECDSA P-256 signatures, as Google Health signs webhook
//! notifications (`google-health.md` §4.5).
//!
//! - The keyset is Tink's JSON public keyset: `{"primaryKeyId", "key": [{"keyData": {"typeUrl":
//!   "type.googleapis.com/google.crypto.tink.EcdsaPublicKey", "value": base64(EcdsaPublicKey
//!   protobuf), "keyMaterialType": "ASYMMETRIC_PUBLIC"}, "status", "keyId",
//!   "outputPrefixType": "TINK"}]}`. `EcdsaPublicKey` is read by hand (four fields: version,
//!   params {hash, curve, encoding}, x, y): a protobuf runtime for one message is not worth
//!   its weight. x and y may carry a leading `0x00` (33 bytes): the documented trap.
//! - A signature is base64(`0x01` ‖ key id, 4 bytes big-endian ‖ ECDSA-P256-SHA256 signature,
//!   DER or IEEE P1363 as the key's params say) over the raw request body.

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;
use std::collections::BTreeMap;

const TYPE_URL: &str = "type.googleapis.com/google.crypto.tink.EcdsaPublicKey";
/// Tink `HashType.SHA256`.
const HASH_SHA256: u64 = 3;
/// Tink `EllipticCurveType.NIST_P256`.
const CURVE_NIST_P256: u64 = 2;
/// Tink `EcdsaSignatureEncoding.IEEE_P1363` (`DER` is 2).
const ENCODING_IEEE_P1363: u64 = 1;
/// First byte of a `TINK`-prefixed output.
const TINK_START_BYTE: u8 = 0x01;

/// A keyset that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Tink keyset: {0}")]
pub struct KeysetError(pub String);

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature is not a Tink signature")]
    Malformed,
    /// The key id is not in the keyset (fetch the keyset again: keys rotate every 30 days).
    #[error("the signature names key {0}, which the keyset does not hold")]
    UnknownKey(u32),
    #[error("the signature does not match the body")]
    Mismatch,
}

/// An ECDSA key of the keyset.
#[derive(Debug, Clone)]
struct Key {
    verifying: VerifyingKey,
    p1363: bool,
}

/// The enabled ECDSA P-256 keys of a Tink public keyset, by key id.
#[derive(Debug, Clone, Default)]
pub struct Keyset {
    keys: BTreeMap<u32, Key>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeysetJson {
    #[serde(default)]
    key: Vec<KeyJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyJson {
    key_data: KeyDataJson,
    status: String,
    key_id: u32,
    output_prefix_type: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyDataJson {
    type_url: String,
    value: String,
}

/// Reads a protobuf varint at `*at`.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A protobuf field's value: a varint, or the bytes of a length-delimited field.
type FieldValue<'a> = Result<u64, &'a [u8]>;

/// The fields of a protobuf message: (field number, value).
fn fields(bytes: &[u8]) -> Option<Vec<(u64, FieldValue<'_>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let tag = varint(bytes, &mut at)?;
        match tag & 7 {
            0 => out.push((tag >> 3, Ok(varint(bytes, &mut at)?))),
            2 => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                let end = at.checked_add(len)?;
                out.push((tag >> 3, Err(bytes.get(at..end)?)));
                at = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A coordinate as 32 bytes: a leading `0x00` (33 bytes) removed, a short one left-padded.
fn coordinate(raw: &[u8]) -> Option<[u8; 32]> {
    let trimmed: &[u8] = {
        let mut r = raw;
        while r.len() > 32 && r.first() == Some(&0) {
            r = &r[1..];
        }
        r
    };
    if trimmed.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - trimmed.len()..].copy_from_slice(trimmed);
    Some(out)
}

/// Parses a serialized `EcdsaPublicKey`.
fn ecdsa_public_key(bytes: &[u8]) -> Result<Key, KeysetError> {
    let bad = |what: &str| KeysetError(format!("EcdsaPublicKey: {what}"));
    let fields = fields(bytes).ok_or_else(|| bad("not a protobuf message"))?;
    let get = |n: u64| fields.iter().find(|(f, _)| *f == n).map(|(_, v)| *v);
    let params = match get(2) {
        Some(Err(p)) => fields_of_params(p).ok_or_else(|| bad("params"))?,
        _ => return Err(bad("no params")),
    };
    if params.0 != HASH_SHA256 || params.1 != CURVE_NIST_P256 {
        return Err(bad("not ECDSA P-256 with SHA-256"));
    }
    let (Some(Err(x)), Some(Err(y))) = (get(3), get(4)) else {
        return Err(bad("no coordinates"));
    };
    let (x, y) = (
        coordinate(x).ok_or_else(|| bad("x"))?,
        coordinate(y).ok_or_else(|| bad("y"))?,
    );
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    let verifying =
        VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| bad("not a point of P-256"))?;
    Ok(Key {
        verifying,
        p1363: params.2 == ENCODING_IEEE_P1363,
    })
}

/// (hash type, curve, encoding) of `EcdsaParams`.
fn fields_of_params(bytes: &[u8]) -> Option<(u64, u64, u64)> {
    let f = fields(bytes)?;
    let get = |n: u64| {
        f.iter()
            .find(|(k, _)| *k == n)
            .and_then(|(_, v)| v.ok())
            .unwrap_or(0)
    };
    Some((get(1), get(2), get(3)))
}

impl Keyset {
    /// The enabled ECDSA keys with the `TINK` prefix of a JSON keyset; other keys are left
    /// out.
    ///
    /// # Errors
    /// When the JSON is not a keyset or holds no usable key.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeysetError> {
        let json: KeysetJson =
            serde_json::from_slice(bytes).map_err(|e| KeysetError(format!("not JSON: {e}")))?;
        let mut keys = BTreeMap::new();
        for k in json.key {
            if k.status != "ENABLED"
                || k.output_prefix_type != "TINK"
                || k.key_data.type_url != TYPE_URL
            {
                continue;
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k.key_data.value.trim())
                .map_err(|_| KeysetError(format!("key {}: value is not base64", k.key_id)))?;
            keys.insert(k.key_id, ecdsa_public_key(&raw)?);
        }
        if keys.is_empty() {
            return Err(KeysetError("no enabled ECDSA P-256 key".into()));
        }
        Ok(Self { keys })
    }

    /// Whether the keyset holds `key_id`.
    #[must_use]
    pub fn has(&self, key_id: u32) -> bool {
        self.keys.contains_key(&key_id)
    }

    /// Verifies a signature header's value over `body`.
    ///
    /// # Errors
    /// [`SignatureError::UnknownKey`] when the key id is not held (refetch the keyset), else
    /// why it does not verify.
    pub fn verify(&self, body: &[u8], signature: &str) -> Result<(), SignatureError> {
        let key_id = signature_key_id(signature)?;
        let raw = decode_signature(signature)?;
        let key = self
            .keys
            .get(&key_id)
            .ok_or(SignatureError::UnknownKey(key_id))?;
        let sig = raw.get(5..).ok_or(SignatureError::Malformed)?;
        let sig = if key.p1363 {
            Signature::from_slice(sig)
        } else {
            Signature::from_der(sig)
        }
        .map_err(|_| SignatureError::Mismatch)?;
        key.verifying
            .verify(body, &sig)
            .map_err(|_| SignatureError::Mismatch)
    }
}

fn decode_signature(signature: &str) -> Result<Vec<u8>, SignatureError> {
    let text = signature.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
        .map_err(|_| SignatureError::Malformed)?;
    if raw.len() < 6 || raw[0] != TINK_START_BYTE {
        return Err(SignatureError::Malformed);
    }
    Ok(raw)
}

/// The key id a signature names.
///
/// # Errors
/// When the value is not a `TINK`-prefixed signature.
pub fn signature_key_id(signature: &str) -> Result<u32, SignatureError> {
    let raw = decode_signature(signature)?;
    Ok(u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;

    /// A serialized EcdsaPublicKey (x and y 33 bytes with a leading zero, as Google writes).
    fn key_bytes(signing: &SigningKey, encoding: u64) -> Vec<u8> {
        let point = signing.verifying_key().to_encoded_point(false);
        let coord = |tag: u8, v: &[u8]| {
            let mut out = vec![tag, 33, 0];
            out.extend_from_slice(v);
            out
        };
        let mut out = vec![
            0x08,
            0x00,
            0x12,
            0x06,
            0x08,
            3,
            0x10,
            2,
            0x18,
            encoding as u8,
        ];
        out.extend(coord(0x1a, point.x().unwrap()));
        out.extend(coord(0x22, point.y().unwrap()));
        out
    }

    fn keyset(keys: &[(u32, &SigningKey, &str)]) -> Vec<u8> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let key: Vec<serde_json::Value> = keys
            .iter()
            .map(|(id, k, status)| {
                serde_json::json!({"keyData": {"typeUrl": TYPE_URL, "value": b64(&key_bytes(k, 2)),
                    "keyMaterialType": "ASYMMETRIC_PUBLIC"}, "status": status, "keyId": id,
                    "outputPrefixType": "TINK"})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"primaryKeyId": keys[0].0, "key": key})).unwrap()
    }

    fn signing(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32].into()).unwrap()
    }

    fn sign(k: &SigningKey, id: u32, body: &[u8]) -> String {
        let sig: Signature = k.sign(body);
        let mut raw = vec![TINK_START_BYTE];
        raw.extend_from_slice(&id.to_be_bytes());
        raw.extend_from_slice(sig.to_der().as_bytes());
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    #[test]
    fn test_the_published_google_key_parses() {
        // The real key material quoted in google-health.md §4.5 (33-byte coordinates).
        let json = br#"{"primaryKeyId": 987654321,
         "key": [{"keyData": {"typeUrl": "type.googleapis.com/google.crypto.tink.EcdsaPublicKey",
                              "value": "EgYIAxACGAIaIQBDWg3kaiabjtrVXbSSbcn6e3QqiCLD+B4GuhC/Z1C6miIhACarm0VQv9WjNZG/AB0itXCIGFW5ddInmBFUjK/8w0v3",
                              "keyMaterialType": "ASYMMETRIC_PUBLIC"},
                  "status": "ENABLED", "keyId": 987654321, "outputPrefixType": "TINK"}]}"#;
        let k = Keyset::from_json(json).unwrap();
        assert!(k.has(987_654_321));
        assert!(!k.has(1));
    }

    #[test]
    fn test_a_signature_over_the_raw_body_verifies_and_a_tampered_one_does_not() {
        let key = signing(7);
        let set = Keyset::from_json(&keyset(&[(42, &key, "ENABLED")])).unwrap();
        let body = br#"[{"data":{"version":"1","healthUserId":"u1","operation":"UPSERT","dataType":"steps"}}]"#;
        let sig = sign(&key, 42, body);
        assert_eq!(set.verify(body, &sig), Ok(()));
        let mut tampered = body.to_vec();
        tampered[20] ^= 1;
        assert_eq!(set.verify(&tampered, &sig), Err(SignatureError::Mismatch));
        // signed by another key under the same id
        let forged = sign(&signing(8), 42, body);
        assert_eq!(set.verify(body, &forged), Err(SignatureError::Mismatch));
        // a key id the keyset does not hold: refetch
        assert_eq!(
            set.verify(body, &sign(&key, 43, body)),
            Err(SignatureError::UnknownKey(43))
        );
        assert_eq!(
            set.verify(body, "not base64!"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(set.verify(body, "AAAAAAAA"), Err(SignatureError::Malformed));
    }

    #[test]
    fn test_disabled_and_foreign_keys_are_left_out() {
        let a = signing(1);
        let b = signing(2);
        let set = Keyset::from_json(&keyset(&[(1, &a, "ENABLED"), (2, &b, "DISABLED")])).unwrap();
        assert!(set.has(1));
        assert!(!set.has(2));
        assert!(Keyset::from_json(&keyset(&[(2, &b, "DISABLED")])).is_err());
        assert!(Keyset::from_json(b"{}").is_err());
        assert!(Keyset::from_json(b"[").is_err());
    }

    #[test]
    fn test_coordinates_lose_the_leading_zero_and_short_ones_are_padded() {
        let mut v = vec![0u8];
        v.extend([0xab; 32]);
        assert_eq!(coordinate(&v), Some([0xab; 32]));
        assert_eq!(
            coordinate(&[1, 2]).map(|c| (c[29], c[30], c[31])),
            Some((0, 1, 2))
        );
        assert_eq!(coordinate(&[1; 33]), None);
    }

    #[test]
    fn test_p1363_encoded_keys_verify_fixed_size_signatures() {
        let key = signing(9);
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let json = serde_json::json!({"primaryKeyId": 5, "key": [{"keyData": {"typeUrl": TYPE_URL,
            "value": b64(&key_bytes(&key, ENCODING_IEEE_P1363)), "keyMaterialType": "ASYMMETRIC_PUBLIC"},
            "status": "ENABLED", "keyId": 5, "outputPrefixType": "TINK"}]});
        let set = Keyset::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
        let sig: Signature = key.sign(b"body");
        let mut raw = vec![TINK_START_BYTE, 0, 0, 0, 5];
        raw.extend_from_slice(&sig.to_bytes());
        assert_eq!(set.verify(b"body", &b64(&raw)), Ok(()));
    }
}
