//! publisher binary: wiring only.

use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;

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
    settings.max_batch = ohx_common::config::parse("OHX_PUBLISH_BATCH_SIZE", 100usize)?.max(1);
    settings.linger = ohx_common::config::millis("OHX_PUBLISH_LINGER_MS", 20)?;
    let pool = ohx_common::db::pool_from_env()?;
    let secrets = match std::env::var("OHX_SECRET_KEYS") {
        Ok(_) => Some(ohx_common::crypto::SecretBox::from_env()?),
        Err(_) => None,
    };
    let timeout = ohx_common::config::millis("OHX_EHR_TIMEOUT_MS", 30_000)?;
    let processor = publisher::Publisher::new(pool, secrets, timeout)?;
    rt.run_stage(settings, processor).await
}
