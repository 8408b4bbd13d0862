//! The Kafka side of the hourly-aggregator: one [`PartitionWindows`] per input partition.
//!
//! State changes only with acknowledged outputs: a batch (or tick) is processed on clones of
//! the partitions' windows (cheap, copy on write), and the clones are the [`Change`] that
//! [`Processor::apply`] installs once every aggregate and dead letter is acknowledged. A batch
//! processed again after a transient error or a failed produce therefore sees the state it
//! saw the first time and emits the same aggregates; a dropped change is simply redone.
//!
//! Offsets: per partition, only up to the lowest offset still held by an open window is
//! committed (no metadata: the rules need none). After a crash or rebalance the stage re-reads
//! from the committed offset and rebuilds its windows; re-emitted aggregates are identical and
//! the deduplicator drops them.

use crate::window::{PartitionWindows, WindowConfig, WindowError};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{AGGREGATION_HOURLY, HourlyAggregate, Measurement, topic};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

static AGGREGATES: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_aggregates_emitted",
        "Hourly aggregates emitted (acknowledged), by data type",
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

/// What processing produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An aggregate to produce.
    Aggregate(HourlyAggregate),
    /// The input at this index of the batch cannot be aggregated: dead-letter it.
    Rejected(usize, WindowError),
}

/// The state change of a batch or tick: the next windows of every partition it concerns.
#[derive(Debug, Clone, Default)]
pub struct Change {
    partitions: BTreeMap<i32, PartitionWindows>,
    /// Aggregates emitted by data type, counted once acknowledged.
    emitted: BTreeMap<String, u64>,
}

impl Change {
    fn count(&mut self, aggregates: &[HourlyAggregate]) {
        for a in aggregates {
            *self.emitted.entry(a.data_type.clone()).or_default() += 1;
        }
    }
}

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

    /// Returns a copy (copy on write) of a partition's windows to work on.
    fn working_copy(&self, partition: i32) -> PartitionWindows {
        self.partitions
            .get(&partition)
            .cloned()
            .unwrap_or_else(|| PartitionWindows::new(self.config.clone()))
    }

    /// Processes a batch at wall-clock time `now_ms` without changing the stage: returns the
    /// outputs and the change to [`Aggregator::apply_change`] once they are acknowledged.
    pub fn process_batch(
        &self,
        batch: &[Input<Measurement>],
        now_ms: i64,
    ) -> (Vec<Output>, Change) {
        let mut change = Change::default();
        let mut outputs = Vec::new();
        for (index, input) in batch.iter().enumerate() {
            // Only HOURLY series are aggregated; the fhir-mapper maps the rest directly.
            if input.value.aggregation != AGGREGATION_HOURLY {
                continue;
            }
            let windows = change
                .partitions
                .entry(input.partition)
                .or_insert_with(|| self.working_copy(input.partition));
            let outcome = windows.on_sample(input.offset, &input.value, now_ms);
            if let Some(error) = outcome.rejected {
                outputs.push(Output::Rejected(index, error));
            }
            change.count(&outcome.closed);
            outputs.extend(outcome.closed.into_iter().map(Output::Aggregate));
        }
        (outputs, change)
    }

    /// Runs the idle rule at `now_ms` without changing the stage; `caught_up` tells whether a
    /// partition reached its end since its last record. Returns the aggregates and the change.
    pub fn tick_windows(
        &self,
        now_ms: i64,
        caught_up: impl Fn(i32) -> bool,
    ) -> (Vec<HourlyAggregate>, Change) {
        let mut change = Change::default();
        let mut closed = Vec::new();
        for &partition in self.partitions.keys() {
            let mut windows = self.working_copy(partition);
            closed.extend(windows.on_tick(now_ms, caught_up(partition)));
            change.partitions.insert(partition, windows);
        }
        change.count(&closed);
        (closed, change)
    }

    /// Installs a change whose outputs are acknowledged. Idempotent.
    pub fn apply_change(&mut self, change: &Change) {
        for (partition, windows) in &change.partitions {
            self.partitions.insert(*partition, windows.clone());
            self.observe(*partition);
        }
        for (data_type, count) in &change.emitted {
            AGGREGATES.add(*count, &[KeyValue::new("type", data_type.clone())]);
        }
    }

    /// Returns the windows of a partition, if it is assigned.
    pub fn windows(&self, partition: i32) -> Option<&PartitionWindows> {
        self.partitions.get(&partition)
    }

    async fn emit(out: &mut Emitter, a: &HourlyAggregate) -> Result<(), StageError> {
        tracing::debug!(
            aggregate_id = %a.aggregate_id,
            count = a.count,
            revision = a.revision,
            amends = a.amends,
            "aggregate emitted"
        );
        out.emit(topic::HOURLY_AGGREGATES, &a.aggregate_id, a).await
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
    type Change = Change;

    async fn process(
        &mut self,
        batch: &[Input<Measurement>],
        out: &mut Emitter,
    ) -> Result<Change, StageError> {
        let now = chrono::Utc::now().timestamp_millis();
        let (outputs, change) = self.process_batch(batch, now);
        for output in outputs {
            match output {
                Output::Aggregate(a) => Self::emit(out, &a).await?,
                Output::Rejected(index, error) => {
                    let Some(input) = batch.get(index) else {
                        return Err(StageError::Fatal(format!(
                            "rejected input {index} is not in the batch"
                        )));
                    };
                    let kind = match error {
                        WindowError::FutureTimestamp { .. } => error.label(),
                        _ => "invalid",
                    };
                    out.dead_letter(input, kind, error.to_string()).await?;
                }
            }
        }
        Ok(change)
    }

    async fn tick(
        &mut self,
        now_ms: i64,
        caught_up: &BTreeSet<(String, i32)>,
        out: &mut Emitter,
    ) -> Result<Option<Change>, StageError> {
        let (closed, change) = self.tick_windows(now_ms, |p| {
            caught_up.contains(&(topic::MEASUREMENTS.to_string(), p))
        });
        for a in &closed {
            Self::emit(out, a).await?;
        }
        Ok(Some(change))
    }

    async fn apply(&mut self, change: &Change) -> Result<(), StageError> {
        self.apply_change(change);
        Ok(())
    }

    fn commit_point(
        &self,
        _topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> (i64, Option<String>) {
        match self.partitions.get(&partition) {
            Some(w) => (w.commit_offset(next_offset), None),
            None => (next_offset, None),
        }
    }

    fn assigned(&mut self, partitions: &[(String, i32, Option<String>)]) {
        // Windows are rebuilt from the committed offset; commit metadata is not needed.
        for (_, p, _) in partitions {
            self.partitions
                .insert(*p, PartitionWindows::new(self.config.clone()));
            self.late_seen.remove(p);
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
