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

use crate::window::{PartitionWindows, WindowConfig, WindowError, hour_start};
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{AGGREGATION_HOURLY, HourlyAggregate, Measurement, topic};
use ohx_common::trace::Trace;
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
    Aggregate(Box<HourlyAggregate>),
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
    /// Per window (series key, hour start), the trace of the last sample that entered it: the
    /// aggregate carries it. A log aid, not state that decides outputs: forgetting it (at the
    /// bound) only leaves an aggregate without a `traceparent`.
    traces: HashMap<(String, i64), Trace>,
}

/// How many aggregates' traces are remembered before they are forgotten all at once.
const MAX_TRACES: usize = 100_000;

impl Aggregator {
    /// Creates the stage.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            partitions: HashMap::new(),
            late_seen: HashMap::new(),
            traces: HashMap::new(),
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
            outputs.extend(
                outcome
                    .closed
                    .into_iter()
                    .map(|a| Output::Aggregate(Box::new(a))),
            );
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

    /// Remembers, per window, the trace of the batch's last hourly sample for it (one header
    /// parsed per window and batch, not per sample).
    fn note_traces(&mut self, batch: &[Input<Measurement>]) {
        let mut seen: BTreeSet<(&str, i64)> = BTreeSet::new();
        for input in batch.iter().rev() {
            let m = &input.value;
            let window = (m.series_key.as_str(), hour_start(m.effective_start));
            if m.aggregation != AGGREGATION_HOURLY || !seen.insert(window) {
                continue;
            }
            if let Some(t) = Trace::from_headers(&input.headers) {
                if self.traces.len() >= MAX_TRACES {
                    self.traces.clear();
                }
                self.traces.insert((window.0.to_string(), window.1), t);
            }
        }
    }

    async fn emit(&self, out: &mut Emitter, a: &HourlyAggregate) -> Result<(), StageError> {
        let window = (a.series_key.clone(), a.hour_start);
        out.follow_trace(self.traces.get(&window).cloned());
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
        self.note_traces(batch);
        let (outputs, change) = self.process_batch(batch, now);
        for output in outputs {
            match output {
                Output::Aggregate(a) => self.emit(out, &a).await?,
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
            self.emit(out, a).await?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::window::{HOUR_MS, aggregate_id, hour_start};
    use ohx_common::codec::Codec;
    use ohx_common::records::{Component, Context, DeadLetter};
    use std::sync::Arc;

    const STAGE: &str = "hourly-aggregator";
    const HR: &str = "p1/heart_rate";
    const MIN: i64 = 60_000;

    /// The start of the hour 12 hours before now, so every sample is in the past.
    fn base() -> i64 {
        hour_start(chrono::Utc::now().timestamp_millis()) - 12 * HOUR_MS
    }

    fn input(offset: i64, id: &str, ts: i64, fetched_through: Option<i64>) -> Input<Measurement> {
        let value = Measurement {
            context: Context {
                organization_id: "org-1".to_owned(),
                ehr_target_id: "ehr-1".to_owned(),
                patient_id: "p1".to_owned(),
                patient_reference: "Patient/1".to_owned(),
                provider: "withings".to_owned(),
                link_id: "link-1".to_owned(),
                provider_user_id: "u1".to_owned(),
                sync_request_id: "sync-1".to_owned(),
                trigger: "WEBHOOK".to_owned(),
                received_at: ts,
                fhir_version: ohx_common::records::FHIR_R5.into(),
                deliveries: Vec::new(),
            },
            measurement_id: id.to_owned(),
            series_key: HR.to_owned(),
            data_type: "heart_rate".to_owned(),
            aggregation: AGGREGATION_HOURLY.to_owned(),
            effective_start: ts,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: "value".to_owned(),
                value: 70.0,
                unit: "/min".to_owned(),
                decimals: None,
            }],
            device: None,
            entry_method: Some("device".to_owned()),
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through,
            status: None,
            waveform: None,
        };
        Input {
            topic: topic::MEASUREMENTS.to_owned(),
            partition: 0,
            offset,
            key: Some(HR.as_bytes().to_vec()),
            value,
            payload: vec![1, 2, 3],
            headers: Vec::new(),
        }
    }

    fn stage() -> Aggregator {
        let mut stage = Aggregator::new(WindowConfig::default());
        stage.assigned(&[(topic::MEASUREMENTS.to_owned(), 0, None)]);
        stage
    }

    fn emitter() -> (Emitter, Arc<Codec>) {
        let codec = Arc::new(Codec::embedded().unwrap());
        (Emitter::new(STAGE, Arc::clone(&codec)), codec)
    }

    /// Returns the aggregates queued in `out`.
    async fn aggregates(out: &Emitter, codec: &Codec) -> Vec<HourlyAggregate> {
        let mut found = Vec::new();
        for record in out.records() {
            if record.topic == topic::HOURLY_AGGREGATES {
                found.push(codec.decode(&record.payload).await.unwrap());
            }
        }
        found
    }

    fn commit(stage: &Aggregator, next: i64) -> i64 {
        stage.commit_point(topic::MEASUREMENTS, 0, next).0
    }

    #[tokio::test]
    async fn test_batch_processed_again_without_apply_emits_the_same_aggregate() {
        let (h, mut stage) = (base(), stage());
        let (mut out, codec) = emitter();
        let first = [
            input(0, "a", h + 10 * MIN, None),
            input(1, "b", h + 50 * MIN, None),
        ];
        let change = stage.process(&first, &mut out).await.unwrap();
        assert!(out.is_empty());
        stage.apply(&change).await.unwrap();
        assert_eq!(commit(&stage, 2), 0);

        // The fetch ends: its last record of the series carries the progress to the hour's end.
        let batch = [
            input(2, "c", h + 55 * MIN, Some(h + HOUR_MS)),
            input(3, "d", h + HOUR_MS + 5 * MIN, None),
        ];
        let (mut out, _) = emitter();
        let change = stage.process(&batch, &mut out).await.unwrap();
        let emitted = aggregates(&out, &codec).await;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].aggregate_id, aggregate_id(HR, h));
        assert_eq!((emitted[0].count, emitted[0].revision), (3, 2));
        // Produce failed: not applied. The hour is still open, nothing beyond it committed.
        let windows = stage.windows(0).unwrap();
        assert_eq!((windows.open_windows(), windows.held_samples()), (1, 2));
        assert_eq!(commit(&stage, 4), 0);
        drop(change);

        // Processed again: the same aggregate, byte for byte.
        let (mut again, _) = emitter();
        let change = stage.process(&batch, &mut again).await.unwrap();
        assert_eq!(aggregates(&again, &codec).await, emitted);
        let bytes =
            |out: &Emitter| -> Vec<Vec<u8>> { out.records().map(|r| r.payload.clone()).collect() };
        assert_eq!(bytes(&again), bytes(&out));

        // Acknowledged and applied: the hour is gone, the commit moves to the next hour.
        stage.apply(&change).await.unwrap();
        stage.apply(&change).await.unwrap();
        let windows = stage.windows(0).unwrap();
        assert_eq!((windows.open_windows(), windows.held_samples()), (1, 1));
        assert_eq!(commit(&stage, 4), 3);
    }

    #[tokio::test]
    async fn test_an_aggregate_carries_the_trace_of_the_last_sample_of_its_hour() {
        let (h, mut stage) = (base(), stage());
        let traced = |offset, id, ts, through, trace: &str| {
            let mut i = input(offset, id, ts, through);
            i.headers = vec![(
                ohx_common::trace::HEADER.to_owned(),
                trace.as_bytes().to_vec(),
            )];
            i
        };
        let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let last = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let next_hour = "00-11111111111111111111111111111111-2222222222222222-01";
        let batch = [
            traced(0, "a", h + 10 * MIN, None, first),
            traced(1, "b", h + 50 * MIN, Some(h + HOUR_MS), last),
            traced(2, "c", h + HOUR_MS + 5 * MIN, None, next_hour),
        ];
        let (mut out, codec) = emitter();
        stage.process(&batch, &mut out).await.unwrap();
        assert_eq!(aggregates(&out, &codec).await.len(), 1);
        let record = out.records().next().unwrap();
        let carried = Trace::from_headers(&record.headers).unwrap();
        assert_eq!(carried.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(carried, Trace::parse(last).unwrap(), "a span of its own");
    }

    #[tokio::test]
    async fn test_tick_processed_again_without_apply_emits_the_same_aggregate() {
        let (h, mut stage) = (base(), stage());
        let (mut out, codec) = emitter();
        let change = stage
            .process(&[input(0, "a", h + 10 * MIN, None)], &mut out)
            .await
            .unwrap();
        stage.apply(&change).await.unwrap();
        let none = BTreeSet::new();
        let caught_up = BTreeSet::from([(topic::MEASUREMENTS.to_owned(), 0)]);
        let change = stage.tick(h + 11 * MIN, &none, &mut out).await.unwrap();
        stage.apply(&change.unwrap()).await.unwrap();

        let idle = h + HOUR_MS + 5 * MIN;
        let mut emitted = Vec::new();
        for _ in 0..2 {
            let (mut out, _) = emitter();
            let change = stage.tick(idle, &caught_up, &mut out).await.unwrap();
            assert!(change.is_some());
            emitted.push(aggregates(&out, &codec).await);
            // Not applied: the window is still open and held.
            assert_eq!(stage.windows(0).unwrap().open_windows(), 1);
            assert_eq!(commit(&stage, 1), 0);
        }
        assert_eq!(emitted[0].len(), 1);
        assert_eq!(emitted[0], emitted[1]);

        let (mut out, _) = emitter();
        let change = stage.tick(idle, &caught_up, &mut out).await.unwrap();
        stage.apply(&change.unwrap()).await.unwrap();
        assert_eq!(stage.windows(0).unwrap().open_windows(), 0);
        assert_eq!(commit(&stage, 1), 1);
    }

    #[tokio::test]
    async fn test_future_dated_sample_is_dead_lettered_as_future_timestamp() {
        let mut stage = stage();
        let (mut out, codec) = emitter();
        let now = chrono::Utc::now().timestamp_millis();
        let future = now + 7 * HOUR_MS;
        let batch = [input(0, "a", future, Some(future))];
        let change = stage.process(&batch, &mut out).await.unwrap();
        let records: Vec<_> = out.records().collect();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].topic, topic::DEAD_LETTER);
        let letter: DeadLetter = codec.decode(&records[0].payload).await.unwrap();
        assert_eq!(letter.error_kind, "future_timestamp");
        assert!(letter.reason.contains("21600000 ms"), "{}", letter.reason);
        assert!(!letter.reason.contains(&future.to_string()));
        stage.apply(&change).await.unwrap();
        let windows = stage.windows(0).unwrap();
        assert_eq!(windows.open_windows(), 0);
        assert_eq!(windows.stats().ignored_progress, 1);
        assert_eq!(commit(&stage, 1), 1);
    }
}
