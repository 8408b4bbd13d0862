//! Key rotation of the sealed secrets in the configuration database (`ohx rotate-key`):
//! every sealed column is re-sealed under the active key, row by row, while the services keep
//! running. Each row is swapped only if it still holds what was read (a fetcher refreshing a
//! token meanwhile wins, and the row is read again), so a rotation never reverts a secret.
//!
//! The procedure: give every service the new key next to the old one
//! (`OHX_SECRET_KEYS=old:…,new:…`, still `OHX_SECRET_ACTIVE_KEY=old`) and restart them; run
//! `OHX_SECRET_ACTIVE_KEY=new ohx rotate-key`; make `new` active in the services; once no row
//! names `old` (`ohx rotate-key` reports 0 left), drop `old`.

use crate::crypto::{CryptoError, SecretBox};
use deadpool_postgres::{GenericClient, Pool};

/// One sealed column: its table, the SQL expression of a row's key, and the associated data
/// it is sealed with (`{}` stands for the key).
#[derive(Debug, Clone, Copy)]
pub struct SealedColumn {
    pub table: &'static str,
    pub column: &'static str,
    pub key: &'static str,
    pub aad: &'static str,
}

/// Every sealed column of the schema.
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        table: "ehr_targets",
        column: "auth_secret",
        key: "id::text",
        aad: "ehr_target:{}:auth_secret",
    },
    SealedColumn {
        table: "ehr_target_keys",
        column: "private_key",
        key: "ehr_target_id::text || ':' || kid",
        aad: "ehr_target_key:{}",
    },
    SealedColumn {
        table: "provider_apps",
        column: "client_secret",
        key: "id::text",
        aad: "provider_app:{}:client_secret",
    },
    SealedColumn {
        table: "provider_apps",
        column: "webhook_token_sealed",
        key: "id::text",
        aad: "provider_app:{}:webhook_token",
    },
    SealedColumn {
        table: "provider_links",
        column: "access_token",
        key: "id::text",
        aad: "provider_link:{}:access_token",
    },
    SealedColumn {
        table: "provider_links",
        column: "refresh_token",
        key: "id::text",
        aad: "provider_link:{}:refresh_token",
    },
    SealedColumn {
        table: "oauth_states",
        column: "code_verifier",
        key: "state_sha256",
        aad: "oauth_state:{}:code_verifier",
    },
];

/// Why a rotation stopped.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("database: {0}")]
    Db(String),
    #[error("{table}.{column} of {key}: {source}")]
    Secret {
        table: &'static str,
        column: &'static str,
        key: String,
        source: CryptoError,
    },
}

impl From<deadpool_postgres::tokio_postgres::Error> for RotateError {
    fn from(e: deadpool_postgres::tokio_postgres::Error) -> Self {
        Self::Db(crate::db::error_text(&e))
    }
}

impl From<deadpool_postgres::PoolError> for RotateError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(e.to_string())
    }
}

/// What a rotation did, per `table.column`: rows re-sealed, and rows still under another
/// key afterwards (0 when done).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rotation {
    pub resealed: std::collections::BTreeMap<String, u64>,
    pub left: std::collections::BTreeMap<String, u64>,
}

/// The outcome of swapping one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// Re-sealed under the active key.
    Resealed,
    /// Already under the active key, gone, or changed since it was read.
    Changed,
}

/// Re-seals one row's value `sealed` (as read) under the active key, only if the row still
/// holds it.
pub async fn reseal_row(
    client: &impl GenericClient,
    secrets: &SecretBox,
    col: &SealedColumn,
    key: &str,
    sealed: &str,
) -> Result<Swap, RotateError> {
    if sealed.split_once(':').map(|(kid, _)| kid) == Some(secrets.active_key_id()) {
        return Ok(Swap::Changed);
    }
    let aad = col.aad.replace("{}", key);
    let secret_error = |source| RotateError::Secret {
        table: col.table,
        column: col.column,
        key: key.to_owned(),
        source,
    };
    let plain = secrets.open(sealed, &aad).map_err(secret_error)?;
    let resealed = secrets.seal(&plain, &aad).map_err(secret_error)?;
    let n = client
        .execute(
            &format!(
                "UPDATE {} SET {} = $1 WHERE {} = $2 AND {} = $3",
                col.table, col.column, col.key, col.column
            ),
            &[&resealed, &key, &sealed],
        )
        .await?;
    Ok(if n == 1 {
        Swap::Resealed
    } else {
        Swap::Changed
    })
}

/// Rows of a column sealed under another key than the active one: (key, sealed).
async fn stale_rows(
    client: &impl GenericClient,
    col: &SealedColumn,
    active: &str,
) -> Result<Vec<(String, String)>, RotateError> {
    let rows = client
        .query(
            &format!(
                "SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL \
                 AND split_part({column}, ':', 1) <> $1",
                key = col.key,
                column = col.column,
                table = col.table
            ),
            &[&active],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Re-seals every sealed column under the active key. A row changed while it was being
/// re-sealed is read again (three passes at most); what is left is reported.
pub async fn rotate(pool: &Pool, secrets: &SecretBox) -> Result<Rotation, RotateError> {
    let client = pool.get().await?;
    let active = secrets.active_key_id();
    let mut report = Rotation::default();
    for col in SEALED_COLUMNS {
        let name = format!("{}.{}", col.table, col.column);
        let mut done = 0;
        for _pass in 0..3 {
            let rows = stale_rows(&client, col, active).await?;
            if rows.is_empty() {
                break;
            }
            for (key, sealed) in rows {
                if reseal_row(&client, secrets, col, &key, &sealed).await? == Swap::Resealed {
                    done += 1;
                }
            }
        }
        let left = u64::try_from(stale_rows(&client, col, active).await?.len()).unwrap_or(0);
        report.resealed.insert(name.clone(), done);
        report.left.insert(name, left);
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HxwdHh8QERITFBUWFxgZGhscHR4fAAECAwQFBgcICQo=";

    /// A database of the test's own: a rotation reports on every row of it.
    async fn pool(name: &str) -> Pool {
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let url = url.as_str();
        if crate::db::create_database(url).await.is_err() {
            crate::db::create_database(url).await.unwrap();
        }
        let pool = crate::db::pool(url, 2).unwrap();
        crate::db::migrate(&pool).await.unwrap();
        pool
    }

    /// An organization with a bearer target and a Withings app, all sealed under `k1`.
    async fn seed(pool: &Pool, old: &SecretBox) -> (uuid::Uuid, uuid::Uuid) {
        let (org, target, app) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let c = pool.get().await.unwrap();
        c.execute(
            "INSERT INTO organizations (id, name) VALUES ($1, 'rotate')",
            &[&org],
        )
        .await
        .unwrap();
        let token = old
            .seal(b"bearer-1", &format!("ehr_target:{target}:auth_secret"))
            .unwrap();
        c.execute(
            "INSERT INTO ehr_targets (id, organization_id, name, base_url, auth_kind, auth_secret) \
             VALUES ($1, $2, 't', 'https://e', 'bearer', $3)",
            &[&target, &org, &token],
        )
        .await
        .unwrap();
        let secret = old
            .seal(b"app-secret", &format!("provider_app:{app}:client_secret"))
            .unwrap();
        let hook = old
            .seal(b"hook", &format!("provider_app:{app}:webhook_token"))
            .unwrap();
        c.execute(
            "INSERT INTO provider_apps (id, organization_id, provider, client_id, client_secret, \
             webhook_token_sha256, webhook_token_sealed) VALUES ($1, $2, 'withings', 'c', $3, $4, $5)",
            &[&app, &org, &secret, &app.to_string(), &hook],
        )
        .await
        .unwrap();
        (target, app)
    }

    #[tokio::test]
    async fn test_rotation_reseals_every_column_under_the_active_key_and_keeps_the_plaintext() {
        let pool = pool("ohx_rotate_test").await;
        let old = SecretBox::from_spec(K1, None).unwrap();
        let (target, app) = seed(&pool, &old).await;
        let both = SecretBox::from_spec(&format!("{K1},{K2}"), Some("k2")).unwrap();
        let report = rotate(&pool, &both).await.unwrap();
        assert!(report.left.values().all(|n| *n == 0), "{report:?}");
        assert!(
            report.resealed["ehr_targets.auth_secret"] >= 1,
            "{report:?}"
        );
        let c = pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT t.auth_secret, a.client_secret, a.webhook_token_sealed FROM ehr_targets t, \
                 provider_apps a WHERE t.id = $1 AND a.id = $2",
                &[&target, &app],
            )
            .await
            .unwrap();
        let (t, s, h): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        for v in [&t, &s, &h] {
            assert!(v.starts_with("k2:"), "{v}");
        }
        // Only the new key is needed now.
        let new_only = SecretBox::from_spec(K2, None).unwrap();
        assert_eq!(
            new_only
                .open_string(&t, &format!("ehr_target:{target}:auth_secret"))
                .unwrap(),
            "bearer-1"
        );
        assert_eq!(
            new_only
                .open_string(&s, &format!("provider_app:{app}:client_secret"))
                .unwrap(),
            "app-secret"
        );
        // A second run has nothing left to do for these rows.
        let again = rotate(&pool, &both).await.unwrap();
        assert!(again.left.values().all(|n| *n == 0), "{again:?}");
    }

    /// A secret written after it was read (a token refresh) is never overwritten with the
    /// re-sealed old value.
    #[tokio::test]
    async fn test_a_row_changed_since_it_was_read_is_not_reverted() {
        let pool = pool("ohx_rotate_cas_test").await;
        let old = SecretBox::from_spec(K1, None).unwrap();
        let (target, _) = seed(&pool, &old).await;
        let c = pool.get().await.unwrap();
        let read: String = c
            .query_one(
                "SELECT auth_secret FROM ehr_targets WHERE id = $1",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        let newer = old
            .seal(b"bearer-2", &format!("ehr_target:{target}:auth_secret"))
            .unwrap();
        c.execute(
            "UPDATE ehr_targets SET auth_secret = $2 WHERE id = $1",
            &[&target, &newer],
        )
        .await
        .unwrap();
        let both = SecretBox::from_spec(&format!("{K1},{K2}"), Some("k2")).unwrap();
        let swap = reseal_row(&c, &both, &SEALED_COLUMNS[0], &target.to_string(), &read)
            .await
            .unwrap();
        assert_eq!(swap, Swap::Changed);
        let now: String = c
            .query_one(
                "SELECT auth_secret FROM ehr_targets WHERE id = $1",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            both.open_string(&now, &format!("ehr_target:{target}:auth_secret"))
                .unwrap(),
            "bearer-2"
        );
    }
}
