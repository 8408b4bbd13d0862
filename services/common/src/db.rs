//! The configuration database: pool, embedded migrations.
//!
//! PostgreSQL holds configuration, encrypted credentials and bookkeeping (ids, times, counts,
//! statuses) — never measurement values.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// Migrations in order; each runs once, recorded in `ohx_migrations`.
pub const MIGRATIONS: &[(&str, &str)] =
    &[("0001_init", include_str!("../migrations/0001_init.sql"))];

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

/// Returns a pool for `url` (e.g. `postgres://postgres@127.0.0.1:5432/ohx`).
pub fn pool(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Url(e.to_string()))?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Returns a pool from `OHX_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/ohx`).
pub fn pool_from_env() -> Result<Pool, DbError> {
    let url = crate::config::string("OHX_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ohx");
    let size = crate::config::parse("OHX_DATABASE_POOL_SIZE", 8usize)
        .map_err(|e| DbError::Url(e.to_string()))?;
    pool(&url, size)
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
