//! The configuration database: pool, embedded migrations.
//!
//! PostgreSQL holds configuration, encrypted credentials and bookkeeping (ids, times, counts,
//! statuses) — never measurement values.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Migrations in order; each runs once, recorded in `ohx_migrations`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../migrations/0001_init.sql")),
    (
        "0002_gcra_rate_limits",
        include_str!("../migrations/0002_gcra_rate_limits.sql"),
    ),
    (
        "0003_sync_run_fetch_start",
        include_str!("../migrations/0003_sync_run_fetch_start.sql"),
    ),
    (
        "0004_config_change_notify",
        include_str!("../migrations/0004_config_change_notify.sql"),
    ),
    (
        "0005_provider_seam",
        include_str!("../migrations/0005_provider_seam.sql"),
    ),
    (
        "0006_policies",
        include_str!("../migrations/0006_policies.sql"),
    ),
    (
        "0007_connect_flow",
        include_str!("../migrations/0007_connect_flow.sql"),
    ),
    (
        "0008_imports",
        include_str!("../migrations/0008_imports.sql"),
    ),
    ("0009_pkce", include_str!("../migrations/0009_pkce.sql")),
    (
        "0010_import_row_digests",
        include_str!("../migrations/0010_import_row_digests.sql"),
    ),
    (
        "0011_target_status",
        include_str!("../migrations/0011_target_status.sql"),
    ),
    (
        "0012_ehr_target_keys",
        include_str!("../migrations/0012_ehr_target_keys.sql"),
    ),
    (
        "0013_link_timezone",
        include_str!("../migrations/0013_link_timezone.sql"),
    ),
    (
        "0014_patient_deliveries",
        include_str!("../migrations/0014_patient_deliveries.sql"),
    ),
    (
        "0015_target_fhir_version",
        include_str!("../migrations/0015_target_fhir_version.sql"),
    ),
    (
        "0016_rest_api",
        include_str!("../migrations/0016_rest_api.sql"),
    ),
    (
        "0017_delivery_results",
        include_str!("../migrations/0017_delivery_results.sql"),
    ),
    (
        "0018_measurement_ledger",
        include_str!("../migrations/0018_measurement_ledger.sql"),
    ),
];

/// Where a patient's data goes, as the records' [`crate::records::Context`] carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientTargets {
    /// The FHIR version of the patient's own target (`Context::fhir_version`).
    pub fhir_version: String,
    /// Every EHR target of the patient (`Context::deliveries`): the own target first, then
    /// those of `patient_deliveries` by target id; empty when the patient has only its own.
    pub deliveries: Vec<crate::records::Delivery>,
}

/// The EHR targets of a patient, each with the FHIR version it speaks. One query; `None` for
/// an unknown patient.
pub async fn patient_targets(
    client: &tokio_postgres::Client,
    patient_id: &uuid::Uuid,
) -> Result<Option<PatientTargets>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT p.ehr_target_id::text, p.ehr_patient_reference, t.fhir_version, 0 AS rank \
             FROM patients p JOIN ehr_targets t ON t.id = p.ehr_target_id WHERE p.id = $1 \
             UNION ALL \
             SELECT d.ehr_target_id::text, d.ehr_patient_reference, t.fhir_version, 1 \
             FROM patient_deliveries d JOIN ehr_targets t ON t.id = d.ehr_target_id \
             WHERE d.patient_id = $1 \
             ORDER BY 4, 1",
            &[patient_id],
        )
        .await?;
    let mut deliveries: Vec<crate::records::Delivery> = rows
        .iter()
        .map(|r| crate::records::Delivery {
            ehr_target_id: r.get(0),
            patient_reference: r.get(1),
            fhir_version: r.get(2),
        })
        .collect();
    let Some(own) = deliveries.first() else {
        return Ok(None);
    };
    let fhir_version = own.fhir_version.clone();
    if deliveries.len() == 1 {
        deliveries.clear();
    }
    Ok(Some(PatientTargets {
        fhir_version,
        deliveries,
    }))
}

/// A database error as text for logs and errors: the server's message and SQLSTATE ("db
/// error" alone says nothing), never its detail, which can quote row values.
#[must_use]
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The channel on which PostgreSQL announces changes of what webhooks look up (migration 0004).
pub const CONFIG_CHANGED_CHANNEL: &str = "ohx_config_changed";

/// A database error.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("pool: {0}")]
    Pool(String),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e.to_string())
    }
}

/// Default of `OHX_DATABASE_TIMEOUT_MS`.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;

/// Returns a pool for `url` (e.g. `postgres://postgres@127.0.0.1:5432/ohx`) whose
/// [`DEFAULT_TIMEOUT_MS`] bounds waiting for a connection, opening one and recycling one.
pub fn pool(url: &str, max_size: usize) -> Result<Pool, DbError> {
    pool_with_timeout(url, max_size, Duration::from_millis(DEFAULT_TIMEOUT_MS))
}

/// Returns a pool for `url` whose `timeout` bounds waiting for a free connection, opening a
/// new one (connect and authenticate, also set as the connect timeout) and recycling one. With
/// the database down or unreachable, `get()` fails within about `timeout` instead of hanging
/// (a webhook must still be answered, 503, inside the provider's deadline). The timeouts need
/// a runtime: the pool uses Tokio's.
pub fn pool_with_timeout(url: &str, max_size: usize, timeout: Duration) -> Result<Pool, DbError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Url(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// `OHX_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/ohx`).
pub fn url_from_env() -> String {
    crate::config::string("OHX_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ohx")
}

/// Returns a pool from `OHX_DATABASE_URL` (see [`url_from_env`]).
pub fn pool_from_env() -> Result<Pool, DbError> {
    let url = url_from_env();
    let size = crate::config::parse("OHX_DATABASE_POOL_SIZE", 8usize)
        .map_err(|e| DbError::Url(e.to_string()))?;
    let timeout = crate::config::millis("OHX_DATABASE_TIMEOUT_MS", DEFAULT_TIMEOUT_MS)
        .map_err(|e| DbError::Url(e.to_string()))?;
    pool_with_timeout(&url, size, timeout.max(Duration::from_millis(1)))
}

/// Creates the database named in `url` if it does not exist (connecting to `postgres`).
pub async fn create_database(url: &str) -> Result<(), DbError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Url(e.to_string()))?;
    let name = config
        .get_dbname()
        .ok_or_else(|| DbError::Url("no database name".into()))?
        .to_string();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::Url(format!(
            "database name {name:?} must be [A-Za-z0-9_]"
        )));
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(NoTls).await?;
    tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?;
    if exists.is_none() {
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
    }
    Ok(())
}

/// Applies pending migrations under an advisory lock (safe with concurrent starters).
pub async fn migrate(pool: &Pool) -> Result<Vec<&'static str>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(7402001); CREATE TABLE IF NOT EXISTS ohx_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())").await?;
    let mut applied = Vec::new();
    for (name, sql) in MIGRATIONS {
        let done = tx
            .query_opt("SELECT 1 FROM ohx_migrations WHERE name = $1", &[name])
            .await?;
        if done.is_none() {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO ohx_migrations (name) VALUES ($1)", &[name])
                .await?;
            applied.push(*name);
        }
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A server that accepts connections and never answers (a hung or unreachable database):
    /// the pool gives up within its timeout instead of hanging.
    #[tokio::test]
    async fn test_get_fails_within_the_timeout_when_the_database_hangs() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let pool = pool_with_timeout(
            &format!("postgres://postgres@{addr}/ohx"),
            2,
            Duration::from_millis(300),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), pool.get()).await;
        assert!(matches!(result, Ok(Err(_))), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }
}
