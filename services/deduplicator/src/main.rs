//! deduplicator binary: wiring only.

use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start(
        "deduplicator",
        9104,
        &[
            topic::FHIR_RESOURCES,
            topic::FHIR_OUTBOX,
            topic::DEDUP_STATE,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let settings = StageSettings::from_env("deduplicator", vec![topic::FHIR_RESOURCES])?;
    let restore_timeout = ohx_common::config::millis("OHX_RESTORE_TIMEOUT_MS", 120_000)?;
    let processor =
        deduplicator::Deduplicator::new(rt.kafka.clone(), rt.producer.clone(), restore_timeout);
    rt.run_stage(settings, processor).await
}
