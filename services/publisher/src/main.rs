//! publisher binary: wiring only.

use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;
use publisher::PublisherSettings;
use publisher::breaker::BreakerSettings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start(
        "publisher",
        9105,
        &[
            topic::FHIR_OUTBOX,
            topic::PUBLISH_RESULTS,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let mut settings = StageSettings::from_env("publisher", vec![topic::FHIR_OUTBOX])?;
    // A batch holds up to OHX_PUBLISH_CONCURRENCY transactions per target, sent concurrently.
    let transaction_size = ohx_common::config::parse("OHX_PUBLISH_BATCH_SIZE", 100usize)?.max(1);
    let concurrency = ohx_common::config::parse("OHX_PUBLISH_CONCURRENCY", 4usize)?.max(1);
    settings.max_batch = transaction_size.saturating_mul(concurrency);
    settings.linger = ohx_common::config::millis("OHX_PUBLISH_LINGER_MS", 20)?;
    // Retries the records held for targets that were down, when their breaker allows.
    settings.tick = Some(ohx_common::config::millis("OHX_PUBLISH_TICK_MS", 1_000)?);
    let pool = ohx_common::db::pool_from_env()?;
    let secrets = match std::env::var("OHX_SECRET_KEYS") {
        Ok(_) => Some(ohx_common::crypto::SecretBox::from_env()?),
        Err(_) => None,
    };
    let millis = |name, default| -> anyhow::Result<i64> {
        Ok(
            i64::try_from(ohx_common::config::millis(name, default)?.as_millis())
                .unwrap_or(i64::MAX),
        )
    };
    let publisher_settings = PublisherSettings {
        request_timeout: ohx_common::config::millis("OHX_EHR_TIMEOUT_MS", 30_000)?,
        probe_timeout: ohx_common::config::millis("OHX_EHR_PROBE_TIMEOUT_MS", 5_000)?,
        targets_ttl: ohx_common::config::millis("OHX_TARGETS_TTL_MS", 60_000)?,
        breaker: BreakerSettings {
            threshold: ohx_common::config::parse("OHX_BREAKER_THRESHOLD", 3u32)?.max(1),
            retry_base_ms: millis("OHX_BREAKER_RETRY_BASE_MS", 1_000)?,
            base_ms: millis("OHX_BREAKER_COOLDOWN_MS", 5_000)?,
            max_ms: millis("OHX_BREAKER_MAX_COOLDOWN_MS", 300_000)?,
        },
        chunk: transaction_size,
        transaction_bytes: ohx_common::config::parse(
            "OHX_PUBLISH_MAX_TRANSACTION_BYTES",
            publisher::DEFAULT_TRANSACTION_BYTES,
        )?
        .max(1),
        chunks_per_tick: ohx_common::config::parse("OHX_PUBLISH_CHUNKS_PER_TICK", 10usize)?.max(1),
        held_warn: ohx_common::config::parse("OHX_PUBLISH_HELD_WARN", 50_000usize)?,
        instance: ohx_common::config::instance_name(),
    };
    let processor = publisher::Publisher::new(pool, secrets, publisher_settings)?;
    rt.run_stage(settings, processor).await
}
