//! hourly-aggregator binary: wiring only.

use hourly_aggregator::stage::Aggregator;
use hourly_aggregator::window::WindowConfig;
use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start(
        "hourly-aggregator",
        9102,
        &[
            topic::MEASUREMENTS,
            topic::HOURLY_AGGREGATES,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let mut settings = StageSettings::from_env("hourly-aggregator", vec![topic::MEASUREMENTS])?;
    settings.tick = Some(ohx_common::config::millis("OHX_TICK_MS", 5_000)?);
    let config = WindowConfig {
        allowed_lateness_ms: ohx_common::config::parse("OHX_ALLOWED_LATENESS_MS", 600_000i64)?,
        idle_grace_ms: ohx_common::config::parse("OHX_IDLE_GRACE_MS", 300_000i64)?,
    };
    rt.run_stage(settings, Aggregator::new(config)).await
}
