//! EHR targets as the publisher uses them, loaded from PostgreSQL and reloaded after a TTL (and
//! before probing a target whose credentials were refused), so a fixed target recovers without
//! a restart.

use crate::bundle::UpsertMode;
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::StageError;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// How the publisher authenticates to a target.
#[derive(Clone)]
pub enum Auth {
    None,
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// An EHR target as the publisher uses it.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub auth: Auth,
    pub mode: UpsertMode,
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
            "SELECT id, base_url, auth_kind, auth_secret, upsert_mode FROM ehr_targets",
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
        let fp = fingerprint(&[&base_url, &kind, secret.as_deref().unwrap_or(""), &mode]);
        let auth = match (kind.as_str(), secret) {
            ("none", _) => Ok(Auth::None),
            ("bearer", Some(sealed)) => match secrets {
                None => {
                    tracing::error!(target_id = %id, "bearer target but OHX_SECRET_KEYS is not set");
                    Err("bearer credentials but no secret keys configured")
                }
                Some(secrets) => {
                    match secrets.open_string(&sealed, &format!("ehr_target:{id}:auth_secret")) {
                        Ok(token) => Ok(Auth::Bearer(token)),
                        Err(error) => {
                            tracing::error!(target_id = %id, %error, "cannot open target credentials");
                            Err("target credentials cannot be opened")
                        }
                    }
                }
            },
            ("bearer", None) => {
                tracing::error!(target_id = %id, "bearer target without a secret");
                Err("bearer target without a secret")
            }
            (other, _) => {
                tracing::error!(target_id = %id, auth_kind = other, "auth kind not supported by this publisher version");
                Err("auth kind not supported by this publisher version")
            }
        };
        let mode = if mode == "conditional" {
            UpsertMode::Conditional
        } else {
            UpsertMode::Put
        };
        let target = match auth {
            Ok(auth) => Configured::Usable(Target {
                base_url: base_url.trim_end_matches('/').to_string(),
                auth,
                mode,
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
mod tests {
    use super::*;

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
