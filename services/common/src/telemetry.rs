//! JSON logs and OpenTelemetry metrics exported in the Prometheus text format.
//!
//! Metric names share the prefix `ohx_`; labels come from small bounded sets and never carry
//! patient, resource or measurement ids.

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};
use std::sync::{LazyLock, OnceLock};

static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// Initializes JSON logging (level from `OHX_LOG`, default `info`) and the metrics pipeline.
/// Call once at start-up, before any instrument is used.
pub fn init(service: &'static str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OHX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .flatten_event(true)
        .try_init();
    init_metrics(service)?;
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    Ok(())
}

/// Installs the OpenTelemetry meter provider backed by a Prometheus registry.
pub fn init_metrics(service: &'static str) -> anyhow::Result<()> {
    if REGISTRY.get().is_some() {
        return Ok(());
    }
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_meter_provider(provider);
    let _ = REGISTRY.set(registry);
    Ok(())
}

/// Returns the current metrics in the Prometheus text format.
pub fn render() -> String {
    let Some(registry) = REGISTRY.get() else {
        return String::new();
    };
    let mut buf = Vec::new();
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(%error, "metrics encoding failed");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Returns the meter all ohx instruments are created on.
pub fn meter() -> Meter {
    opentelemetry::global::meter("ohx")
}

/// Creates a counter with the given name and description.
pub fn new_counter(name: &'static str, description: &'static str) -> Counter<u64> {
    meter()
        .u64_counter(name)
        .with_description(description)
        .build()
}

/// Records consumed by a stage, by stage and topic.
pub static RECORDS_CONSUMED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_records_consumed",
        "Records consumed, by stage and topic",
    )
});
/// Records produced by a stage, by stage and topic.
pub static RECORDS_PRODUCED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_records_produced",
        "Records produced and acknowledged, by stage and topic",
    )
});
/// Dead letters, by stage and kind.
pub static DEAD_LETTERS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_dead_letters",
        "Records sent to the dead-letter topic, by stage and kind",
    )
});
/// Transient failures that made a stage retry, by stage and kind.
pub static RETRIES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_stage_retries",
        "Transient failures retried, by stage and kind",
    )
});
/// Producers replaced because their idempotent state broke (fatal error, timeout).
pub static PRODUCER_REPLACEMENTS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_producer_replacements",
        "Producers replaced after a fatal error or an acknowledgement timeout",
    )
});
/// Rebalances seen by a stage's consumer, by stage and kind (assigned, revoked).
pub static REBALANCES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_rebalances",
        "Partition assignments and revocations, by stage and kind",
    )
});
/// Records polled but dropped because their partition was revoked before they were processed.
pub static RECORDS_REVOKED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    new_counter(
        "ohx_records_revoked",
        "Polled records left to the partition's next owner (revoked before processing), by stage",
    )
});
/// Consumer lag per group, topic and partition (from librdkafka statistics).
pub static CONSUMER_LAG: LazyLock<Gauge<i64>> = LazyLock::new(|| {
    meter()
        .i64_gauge("ohx_consumer_lag")
        .with_description("Consumer lag in records, by group, topic and partition")
        .build()
});
/// Age of the records a consumer is reaching (now minus the timestamp of the last record it
/// polled, 0 once it reached the partition's end), by group, topic and partition: how far behind
/// in time a stage is, to compare with the 24 h retention. Exported as is (no unit suffix).
pub static CONSUMER_LAG_SECONDS: LazyLock<Gauge<f64>> = LazyLock::new(|| {
    meter()
        .f64_gauge("ohx_consumer_lag_seconds")
        .with_description(
            "Age in seconds of the records the consumer reaches, by group, topic and partition",
        )
        .build()
});
/// Time to process and acknowledge one batch, by stage.
pub static BATCH_SECONDS: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("ohx_batch_duration")
        .with_unit("s")
        .with_description("Time to process a batch and have its outputs acknowledged, by stage")
        .build()
});

/// Creates a histogram in seconds with buckets suited to end-to-end latencies.
pub fn new_seconds_histogram(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
        ])
        .build()
}

/// Initializes logging for command-line tools: plain text on stderr, `warn` unless `OHX_LOG`.
pub fn init_cli() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OHX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}
