//! hourly-aggregator binary: wiring only.

use hourly_aggregator::stage::Aggregator;
use hourly_aggregator::window::{DEFAULT_MAX_FUTURE_SKEW_MS, HOUR_MS, WindowConfig};
use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;

/// The highest accepted `OHX_MAX_FUTURE_SKEW_MS`.
const MAX_FUTURE_SKEW_LIMIT_MS: i64 = 18 * HOUR_MS;

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
        idle_grace_ms: ohx_common::config::parse("OHX_IDLE_GRACE_MS", 300_000u32)?.into(),
        max_future_skew_ms: ohx_common::config::parse(
            "OHX_MAX_FUTURE_SKEW_MS",
            DEFAULT_MAX_FUTURE_SKEW_MS,
        )?,
    };
    // A window of a future hour holds the commit point until that hour has passed: keep the
    // records it needs well inside the input's 24 h retention.
    anyhow::ensure!(
        (0..=MAX_FUTURE_SKEW_LIMIT_MS).contains(&config.max_future_skew_ms),
        "OHX_MAX_FUTURE_SKEW_MS must be within 0..={MAX_FUTURE_SKEW_LIMIT_MS} (18 h): a window \
         of a future hour holds the commit point until the hour has passed, and the input keeps \
         records for 24 h"
    );
    rt.run_stage(settings, Aggregator::new(config)).await
}
