//! fetcher binary: wiring only.

use fetcher::stage::{Fetcher, FetcherSettings, Strategy};
use fetcher::store::Store;
use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;
use ohx_providers::{ProviderSettings, Registry};
use std::collections::BTreeMap;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start(
        "fetcher",
        9101,
        &[
            topic::SYNC_REQUESTS,
            topic::MEASUREMENTS,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let mut stage = StageSettings::from_env("fetcher", vec![topic::SYNC_REQUESTS])?;
    stage.max_batch = ohx_common::config::parse("OHX_FETCH_BATCH", 20usize)?.max(1);
    let providers = Registry::standard(ProviderSettings::from_env()?)?;
    let mut base_urls = BTreeMap::new();
    for (name, var) in [
        (ohx_providers::withings::NAME, "OHX_WITHINGS_API_URL"),
        (ohx_providers::omron::NAME, "OHX_OMRON_API_URL"),
    ] {
        if let Ok(url) = std::env::var(var) {
            base_urls.insert(name.to_owned(), url);
        }
    }
    let settings = FetcherSettings {
        base_urls,
        rate_limit_pause: ohx_common::config::millis("OHX_RATE_LIMIT_PAUSE_MS", 60_000)?,
        strategy: Strategy {
            default_days: ohx_common::config::parse("OHX_DEFAULT_SYNC_DAYS", 7i64)?,
            initial_days: ohx_common::config::parse("OHX_INITIAL_SYNC_DAYS", 30i64)?,
            nightly_days: ohx_common::config::parse("OHX_NIGHTLY_SYNC_DAYS", 7i64)?,
            incremental_overlap_ms: ohx_common::config::parse(
                "OHX_INCREMENTAL_OVERLAP_MS",
                3_600_000i64,
            )?
            .max(0),
            max_days: ohx_common::config::parse(
                "OHX_MAX_FETCH_WINDOW_DAYS",
                fetcher::stage::DEFAULT_MAX_FETCH_WINDOW_DAYS,
            )?
            .max(1),
        },
        http_timeout: ohx_common::config::millis("OHX_PROVIDER_TIMEOUT_MS", 30_000)?,
    };
    let store = Store::new(
        ohx_common::db::pool_from_env()?,
        ohx_common::crypto::SecretBox::from_env()?,
    );
    rt.run_stage(stage, Fetcher::new(store, providers, settings)?)
        .await
}
