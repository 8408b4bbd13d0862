//! The Kafka side of the hourly-aggregator: one [`PartitionWindows`] per input partition.
//!
//! Offsets: per partition, only up to the lowest offset still held by an open window is
//! committed, with the highest event time seen before it as commit metadata; after a crash or
//! rebalance the stage resumes with that event time, re-reads from the committed offset and
//! rebuilds its windows. Re-emitted aggregates are identical and the deduplicator drops them.

use crate::window::{CommitPoint, PartitionWindows, WindowConfig};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{AGGREGATION_HOURLY, HourlyAggregate, Measurement, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge};
use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

static AGGREGATES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_aggregates_emitted",
        "Hourly aggregates emitted, by data type",
    )
});
static LATE: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_late_samples",
        "Samples that arrived for an already-emitted hour",
    )
});
static OPEN_WINDOWS: LazyLock<Gauge<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::meter()
        .u64_gauge("ohx_open_windows")
        .with_description("Open hourly windows, by partition")
        .build()
});

/// The hourly-aggregator stage.
#[derive(Debug)]
pub struct Aggregator {
    config: WindowConfig,
    partitions: HashMap<i32, PartitionWindows>,
    late_seen: HashMap<i32, u64>,
}

impl Aggregator {
    /// Creates the stage.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            partitions: HashMap::new(),
            late_seen: HashMap::new(),
        }
    }

    async fn emit_all(
        out: &mut Emitter,
        aggregates: Vec<HourlyAggregate>,
    ) -> Result<(), StageError> {
        for a in aggregates {
            AGGREGATES.add(1, &[KeyValue::new("type", a.data_type.clone())]);
            tracing::debug!(aggregate_id = %a.aggregate_id, count = a.count, "aggregate emitted");
            out.emit(topic::HOURLY_AGGREGATES, &a.aggregate_id, &a)
                .await?;
        }
        Ok(())
    }

    fn observe(&mut self, partition: i32) {
        if let Some(w) = self.partitions.get(&partition) {
            OPEN_WINDOWS.record(
                w.open_windows() as u64,
                &[KeyValue::new("partition", i64::from(partition))],
            );
            let late = w.late_samples();
            let prev = self.late_seen.insert(partition, late).unwrap_or(0);
            if late > prev {
                LATE.add(late - prev, &[]);
            }
        }
    }
}

impl Processor for Aggregator {
    type In = Measurement;
    type Change = ();

    async fn process(
        &mut self,
        batch: &[Input<Measurement>],
        out: &mut Emitter,
    ) -> Result<(), StageError> {
        let mut touched = BTreeSet::new();
        for input in batch {
            // Only HOURLY series are aggregated; the fhir-mapper maps the rest directly.
            if input.value.aggregation != AGGREGATION_HOURLY {
                continue;
            }
            let config = self.config.clone();
            let windows = self
                .partitions
                .entry(input.partition)
                .or_insert_with(|| PartitionWindows::new(config));
            match windows.on_sample(input.offset, &input.value) {
                Ok(closed) => Self::emit_all(out, closed).await?,
                Err(e) => out.dead_letter(input, "invalid", e.to_string()).await?,
            }
            touched.insert(input.partition);
        }
        for p in touched {
            self.observe(p);
        }
        Ok(())
    }

    async fn tick(
        &mut self,
        now_ms: i64,
        caught_up: &BTreeSet<(String, i32)>,
        out: &mut Emitter,
    ) -> Result<Option<()>, StageError> {
        let mut closed = Vec::new();
        for (p, windows) in &mut self.partitions {
            let up = caught_up.contains(&(topic::MEASUREMENTS.to_string(), *p));
            closed.extend(windows.on_tick(now_ms, up));
        }
        Self::emit_all(out, closed).await?;
        let parts: Vec<i32> = self.partitions.keys().copied().collect();
        for p in parts {
            self.observe(p);
        }
        Ok(None)
    }

    fn commit_point(
        &self,
        _topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> (i64, Option<String>) {
        match self.partitions.get(&partition) {
            Some(w) => {
                let point = w.commit_point(next_offset);
                (point.offset, Some(point.metadata()))
            }
            None => (next_offset, None),
        }
    }

    fn assigned(&mut self, partitions: &[(String, i32, Option<String>)]) {
        // Resume with the event time seen before the committed offset, so windows rebuilt
        // from there close exactly as they did before the restart.
        for (_, p, metadata) in partitions {
            let max_event_time = metadata
                .as_deref()
                .and_then(CommitPoint::max_event_time_from_metadata);
            self.partitions.insert(
                *p,
                PartitionWindows::resume(self.config.clone(), max_event_time),
            );
        }
    }

    fn revoked(&mut self, partitions: &[(String, i32)]) {
        // The new owner rebuilds these windows from the committed offset.
        for (_, p) in partitions {
            self.partitions.remove(p);
            self.late_seen.remove(p);
        }
    }
}
