//! EHR targets as the publisher uses them, loaded from PostgreSQL and reloaded after a TTL (and
//! before probing a target whose credentials were refused), so a fixed target recovers without
//! a restart.

pub use crate::auth::Auth;
use crate::auth::{Alg, ClientSecret, Settings, SigningKey, Smart, WRITTEN_TYPES_R4};
use crate::bundle::UpsertMode;
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::StageError;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// An EHR target as the publisher uses it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Target id and configuration fingerprint: what its access tokens are cached under.
    pub key: String,
    pub base_url: String,
    pub auth: Auth,
    pub mode: UpsertMode,
    /// The FHIR version it speaks (`ehr_targets.fhir_version`: R4 or R5).
    pub fhir_version: String,
}

/// A configured target: usable, or configured in a way this publisher cannot use (its records
/// are held and the target flagged, as for any target-level failure, until it is fixed).
#[derive(Debug, Clone)]
pub enum Configured {
    Usable(Target),
    Unusable(&'static str),
}

/// A configured target with a fingerprint of its configuration (changes when an operator fixes
/// it, so its breaker may probe at once).
#[derive(Debug, Clone)]
pub struct Entry {
    pub target: Configured,
    pub fingerprint: String,
}

fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..8])
}

/// Opens a sealed secret of a target.
fn open(
    secrets: Option<&SecretBox>,
    id: &uuid::Uuid,
    sealed: &str,
    aad: &str,
) -> Result<String, &'static str> {
    let Some(secrets) = secrets else {
        tracing::error!(target_id = %id, "target credentials but OHX_SECRET_KEYS is not set");
        return Err("target credentials but no secret keys configured");
    };
    secrets.open_string(sealed, aad).map_err(|error| {
        tracing::error!(target_id = %id, %error, "cannot open target credentials");
        "target credentials cannot be opened"
    })
}

/// A target's signing key: the newest active one not retired.
struct KeyRow {
    kid: String,
    alg: String,
    sealed: String,
}

/// The settings of an OAuth2 target, its default scopes naming the types its FHIR version has.
fn oauth_settings(
    settings: &serde_json::Value,
    fhir_version: &str,
) -> Result<Settings, &'static str> {
    let mut settings = Settings::from_json(settings)?;
    if fhir_version == ohx_common::records::FHIR_R4 {
        settings.written_types = WRITTEN_TYPES_R4;
    }
    Ok(settings)
}

/// How the target authenticates, from its row and its signing key.
fn auth(
    id: &uuid::Uuid,
    kind: &str,
    secret: Option<&str>,
    settings: &serde_json::Value,
    fhir_version: &str,
    key: Option<&KeyRow>,
    secrets: Option<&SecretBox>,
) -> Result<Auth, &'static str> {
    let secret_aad = format!("ehr_target:{id}:auth_secret");
    match (kind, secret) {
        ("none", _) => Ok(Auth::None),
        ("bearer", Some(sealed)) => Ok(Auth::Bearer(open(secrets, id, sealed, &secret_aad)?)),
        ("bearer", None) => Err("bearer target without a secret"),
        ("client_credentials", Some(sealed)) => {
            let settings = oauth_settings(settings, fhir_version)?;
            if settings.token_url.is_none() {
                return Err("client credentials without a token_url");
            }
            Ok(Auth::ClientSecret(Arc::new(ClientSecret {
                settings,
                secret: open(secrets, id, sealed, &secret_aad)?,
            })))
        }
        ("client_credentials", None) => Err("client credentials without a client secret"),
        ("smart_backend", _) => {
            let settings = oauth_settings(settings, fhir_version)?;
            let key = key.ok_or("SMART backend target without a signing key")?;
            let alg = Alg::parse(&key.alg).ok_or("signing key of an unknown algorithm")?;
            let aad = format!("ehr_target_key:{id}:{}", key.kid);
            Ok(Auth::Smart(Arc::new(Smart {
                settings,
                key: SigningKey {
                    kid: key.kid.clone(),
                    alg,
                    pem: open(secrets, id, &key.sealed, &aad)?,
                },
            })))
        }
        _ => Err("auth kind not supported by this publisher version"),
    }
}

/// Loads every target.
pub async fn load(
    pool: &Pool,
    secrets: Option<&SecretBox>,
) -> Result<HashMap<String, Entry>, StageError> {
    let client = pool
        .get()
        .await
        .map_err(|e| StageError::transient("database", e))?;
    let rows = client
        .query(
            "SELECT t.id, t.base_url, t.auth_kind, t.auth_secret, t.upsert_mode, t.auth_settings,
                    k.kid, k.alg, k.private_key, t.fhir_version
             FROM ehr_targets t
             LEFT JOIN LATERAL (
                 SELECT kid, alg, private_key FROM ehr_target_keys
                 WHERE ehr_target_id = t.id AND retired_at IS NULL AND activates_at <= now()
                 ORDER BY activates_at DESC, created_at DESC, kid DESC LIMIT 1) k ON true",
            &[],
        )
        .await
        .map_err(|e| StageError::transient("database", e))?;
    let mut targets = HashMap::new();
    for row in rows {
        let id: uuid::Uuid = row.get(0);
        let base_url: String = row.get(1);
        let kind: String = row.get(2);
        let secret: Option<String> = row.get(3);
        let mode: String = row.get(4);
        let settings: serde_json::Value = row.get(5);
        let key = row.get::<_, Option<String>>(6).map(|kid| KeyRow {
            kid,
            alg: row.get(7),
            sealed: row.get(8),
        });
        let fhir_version: String = row.get(9);
        let fp = fingerprint(&[
            &base_url,
            &kind,
            secret.as_deref().unwrap_or(""),
            &mode,
            &settings.to_string(),
            key.as_ref().map_or("", |k| k.sealed.as_str()),
            &fhir_version,
        ]);
        let auth = auth(
            &id,
            &kind,
            secret.as_deref(),
            &settings,
            &fhir_version,
            key.as_ref(),
            secrets,
        );
        if let Err(reason) = auth {
            tracing::error!(target_id = %id, auth_kind = %kind, reason, "target cannot be used");
        }
        let mode = if mode == "conditional" {
            UpsertMode::Conditional
        } else {
            UpsertMode::Put
        };
        let target = match auth {
            Ok(auth) => Configured::Usable(Target {
                key: format!("{id}/{fp}"),
                base_url: base_url.trim_end_matches('/').to_string(),
                auth,
                mode,
                fhir_version,
            }),
            Err(reason) => Configured::Unusable(reason),
        };
        targets.insert(
            id.to_string(),
            Entry {
                target,
                fingerprint: fp,
            },
        );
    }
    Ok(targets)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ohx_common::records::{FHIR_R4, FHIR_R5 as R5};
    use serde_json::json;

    const KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn secrets() -> SecretBox {
        SecretBox::from_spec(KEYS, None).unwrap()
    }

    #[test]
    fn test_client_credentials_need_a_secret_a_client_id_and_a_token_url() {
        let id = uuid::Uuid::new_v4();
        let b = secrets();
        let sealed = b
            .seal(b"s3cret", &format!("ehr_target:{id}:auth_secret"))
            .unwrap();
        let settings = json!({"client_id": "ohx", "token_url": "https://as/token"});
        match auth(
            &id,
            "client_credentials",
            Some(&sealed),
            &settings,
            R5,
            None,
            Some(&b),
        ) {
            Ok(Auth::ClientSecret(c)) => {
                assert_eq!(c.secret, "s3cret");
                assert_eq!(c.settings.client_id, "ohx");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            auth(
                &id,
                "client_credentials",
                None,
                &settings,
                R5,
                None,
                Some(&b)
            )
            .unwrap_err(),
            "client credentials without a client secret"
        );
        let no_url = json!({"client_id": "ohx"});
        assert!(
            auth(
                &id,
                "client_credentials",
                Some(&sealed),
                &no_url,
                R5,
                None,
                Some(&b)
            )
            .is_err()
        );
        // A secret sealed for another target does not open.
        let other = uuid::Uuid::new_v4();
        assert!(
            auth(
                &other,
                "client_credentials",
                Some(&sealed),
                &settings,
                R5,
                None,
                Some(&b)
            )
            .is_err()
        );
        assert!(
            auth(
                &id,
                "client_credentials",
                Some(&sealed),
                &settings,
                R5,
                None,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn test_smart_targets_need_an_active_key_of_a_known_algorithm() {
        let id = uuid::Uuid::new_v4();
        let b = secrets();
        let settings = json!({"client_id": "ohx"});
        let key = |kid: &str, alg: &str| KeyRow {
            kid: kid.into(),
            alg: alg.into(),
            sealed: b
                .seal(b"-----PEM-----", &format!("ehr_target_key:{id}:{kid}"))
                .unwrap(),
        };
        match auth(
            &id,
            "smart_backend",
            None,
            &settings,
            R5,
            Some(&key("k1", "ES384")),
            Some(&b),
        ) {
            Ok(Auth::Smart(s)) => {
                assert_eq!((s.key.kid.as_str(), s.key.alg), ("k1", Alg::Es384));
                assert_eq!(s.key.pem, "-----PEM-----");
                assert_eq!(s.settings.token_url, None, "discovered");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            auth(&id, "smart_backend", None, &settings, R5, None, Some(&b)).unwrap_err(),
            "SMART backend target without a signing key"
        );
        assert!(
            auth(
                &id,
                "smart_backend",
                None,
                &settings,
                R5,
                Some(&key("k2", "HS256")),
                Some(&b)
            )
            .is_err()
        );
        // The key is bound to its kid: a row whose kid was changed does not open.
        let mut moved = key("k3", "RS384");
        moved.kid = "k4".into();
        assert!(
            auth(
                &id,
                "smart_backend",
                None,
                &settings,
                R5,
                Some(&moved),
                Some(&b)
            )
            .is_err()
        );
        assert!(
            auth(
                &id,
                "smart_backend",
                None,
                &json!({}),
                R5,
                Some(&key("k5", "ES384")),
                Some(&b)
            )
            .is_err()
        );
    }

    #[test]
    fn test_an_r4_targets_default_scopes_leave_out_device_association() {
        let id = uuid::Uuid::new_v4();
        let b = secrets();
        let sealed = b
            .seal(b"s3cret", &format!("ehr_target:{id}:auth_secret"))
            .unwrap();
        let settings = json!({"client_id": "ohx", "token_url": "https://as/token"});
        let types = |version| match auth(
            &id,
            "client_credentials",
            Some(&sealed),
            &settings,
            version,
            None,
            Some(&b),
        ) {
            Ok(Auth::ClientSecret(c)) => c.settings.written_types,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            types(FHIR_R4),
            ["Observation", "Device", "DiagnosticReport"]
        );
        assert_eq!(
            types(R5),
            [
                "Observation",
                "Device",
                "DeviceAssociation",
                "DiagnosticReport"
            ]
        );
    }

    #[test]
    fn test_unknown_auth_kinds_are_unusable() {
        let id = uuid::Uuid::new_v4();
        assert!(auth(&id, "kerberos", None, &json!({}), R5, None, None).is_err());
        assert!(matches!(
            auth(&id, "none", None, &json!({}), R5, None, None),
            Ok(Auth::None)
        ));
    }

    #[test]
    fn test_fingerprint_changes_with_any_part() {
        let a = fingerprint(&["https://ehr/fhir", "bearer", "s1", "put"]);
        assert_eq!(a, fingerprint(&["https://ehr/fhir", "bearer", "s1", "put"]));
        assert_ne!(a, fingerprint(&["https://ehr/fhir", "bearer", "s2", "put"]));
        assert_ne!(
            a,
            fingerprint(&["https://ehr/fhir/", "bearer", "s1", "put"])
        );
        // Parts are delimited: moving a character between parts changes it.
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
