//! The event-time window state machine of the hourly-aggregator: one [`PartitionWindows`] per
//! input partition, fed with measurements and wall-clock ticks, returning the
//! [`HourlyAggregate`]s to produce and the offset that is safe to commit. Pure: no I/O, no
//! clock, no Kafka.
//!
//! # Windows
//! Tumbling one-hour UTC windows per series key; a sample belongs to the hour of its
//! `effective_start` ([`hour_start`]). A window holds its samples by `measurement_id`: a
//! sample whose id it already holds replaces the held one (a redelivery, or a re-fetch with a
//! corrected value), and a sample whose id is held by another open window of its series (the
//! provider corrected its time) is moved. The window's unit is the unit of its first sample;
//! a sample with another unit is rejected.
//!
//! # Watermark
//! The partition's watermark is the highest `effective_start` accepted so far minus
//! [`WindowConfig::allowed_lateness_ms`]; it never goes back and ticks do not move it.
//! A sample is *late* when its hour ended at or before the watermark on arrival.
//!
//! # Closing rules
//! A window opened by a sample that is not late is a *regular* window. It closes
//! 1. when the watermark reaches its end (`hour_end <= watermark`), checked after every sample;
//! 2. on an idle tick (see below).
//!
//! A window opened by a late sample is a *revision* window: its hour was already emitted (or
//! never seen). The watermark is already past its end, so it does not close on it; the fetcher
//! re-fetches whole UTC hours and produces a series' samples in time order, so the whole hour
//! arrives before the series' next hour. It closes
//! 1. when a sample of the same series with `effective_start >= hour_end` is accepted;
//! 2. on an idle tick (see below).
//!
//! Idle tick: [`PartitionWindows::on_tick`] with `caught_up` (the caller has seen the end of
//! the partition since its last record) closes every window, regular or revision, with
//! `now >= max(hour_end, heard) + idle_grace`, where `heard` is the time of the first tick
//! after the window's latest sample. The second term keeps a window open while a fetch is
//! still delivering its hour (between two producer batches the consumer may briefly be caught
//! up); for a regular window it only matters when samples arrive after the hour ended.
//!
//! Every closed window emits one aggregate with the deterministic id [`aggregate_id`]; a
//! revision emits the same id again with the statistics of the re-fetched hour. Statistics are
//! computed over the samples sorted by (`effective_start`, `measurement_id`), so they do not
//! depend on arrival order. Aggregates closed by one call are returned sorted by (hour,
//! series key). Closed windows are dropped.
//!
//! # Restart safety
//! No state store: the input topic is the state. [`PartitionWindows::commit_point`] returns
//! the lowest offset still held by an open window, lowered to the first offset of an already
//! emitted window whose records lie on both sides of it (so a restart never rebuilds a part of
//! an emitted hour), or `next_offset` when nothing is held; and the highest event time seen
//! before that offset. A restarted stage reads from that offset into
//! [`PartitionWindows::resume`] with that event time, and then emits exactly the aggregates
//! the crashed one would have emitted (those already emitted are dropped by the
//! deduplicator). Store the event time in the offset commit's metadata
//! ([`CommitPoint::metadata`]), as Kafka Streams does with its partition time; without it the
//! rebuilt state starts with no watermark, which gives the same aggregates only while no
//! other series' newer records are interleaved into a replayed re-fetch. Idle closes depend on
//! the wall clock and are not replayed exactly; they rely on the whole-hour re-fetch rule.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat};
use ohx_common::records::{AGGREGATION_HOURLY, Context, Device, HourlyAggregate, Measurement};

/// One hour in milliseconds, the window length.
pub const HOUR_MS: i64 = 3_600_000;

/// The component code of the value aggregated by this stage.
pub const VALUE_COMPONENT: &str = "value";

/// The lowest supported `effective_start`: 0000-01-01T00:00:00Z (RFC 3339 has 4-digit years).
pub const MIN_EFFECTIVE_START: i64 = -62_167_219_200_000;

/// The highest supported `effective_start`: 9999-12-31T23:59:59.999Z.
pub const MAX_EFFECTIVE_START: i64 = 253_402_300_799_999;

/// Prefix of [`CommitPoint::metadata`], versioned so the format can change.
const METADATA_PREFIX: &str = "ohx-hourly-window/v1 max_event_time=";

/// Returns the start of the UTC hour containing `ts_ms` (epoch milliseconds), i.e.
/// `ts - ts.rem_euclid(HOUR_MS)`, saturating at `i64::MIN`.
pub fn hour_start(ts_ms: i64) -> i64 {
    ts_ms.saturating_sub(ts_ms.rem_euclid(HOUR_MS))
}

/// Returns the deterministic id of a series' aggregate for one hour:
/// `{series_key}/PT1H/{hour start as RFC 3339 UTC, seconds precision, Z}`, e.g.
/// `p1/heart_rate/PT1H/2026-03-01T10:00:00Z`. Outside chrono's range (never reached for
/// accepted samples) the hour start is written as epoch milliseconds.
pub fn aggregate_id(series_key: &str, hour_start_ms: i64) -> String {
    match DateTime::from_timestamp_millis(hour_start_ms) {
        Some(start) => format!(
            "{series_key}/PT1H/{}",
            start.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        None => format!("{series_key}/PT1H/{hour_start_ms}"),
    }
}

/// Tuning of the windows of one partition. Both durations are milliseconds and non-negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowConfig {
    /// How far the watermark trails the highest event time seen, e.g. 10 minutes.
    pub allowed_lateness_ms: i64,
    /// How long after its hour ended, and after its latest sample, an idle window waits on a
    /// caught-up partition before it closes, e.g. 5 minutes.
    pub idle_grace_ms: i64,
}

impl Default for WindowConfig {
    /// Returns 10 minutes of allowed lateness and 5 minutes of idle grace.
    fn default() -> Self {
        Self {
            allowed_lateness_ms: 10 * 60_000,
            idle_grace_ms: 5 * 60_000,
        }
    }
}

/// Why a measurement cannot be aggregated; the caller sends it to the dead-letter topic. No
/// window changes when an error is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The measurement's aggregation policy is not [`AGGREGATION_HOURLY`].
    #[error("aggregation is {0:?}, not HOURLY")]
    NotHourly(String),
    /// The measurement has no [`VALUE_COMPONENT`] component.
    #[error("measurement has no `value` component")]
    MissingValue,
    /// The measurement has more than one [`VALUE_COMPONENT`] component.
    #[error("measurement has {0} `value` components")]
    AmbiguousValue(usize),
    /// The value is NaN or infinite.
    #[error("value is not a finite number")]
    NonFiniteValue,
    /// The unit differs from the unit of the samples already held for that series and hour.
    #[error("unit {unit:?} differs from the unit {window_unit:?} of the series' hour")]
    UnitMismatch {
        /// The measurement's unit.
        unit: String,
        /// The unit of the window.
        window_unit: String,
    },
    /// `effective_start` lies outside [`MIN_EFFECTIVE_START`]..=[`MAX_EFFECTIVE_START`].
    #[error("effective_start {0} is outside the supported time range")]
    TimestampOutOfRange(i64),
}

impl WindowError {
    /// Returns a short fixed label of the error, for metric labels and dead-letter reasons.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotHourly(_) => "not_hourly",
            Self::MissingValue => "missing_value",
            Self::AmbiguousValue(_) => "ambiguous_value",
            Self::NonFiniteValue => "non_finite_value",
            Self::UnitMismatch { .. } => "unit_mismatch",
            Self::TimestampOutOfRange(_) => "timestamp_out_of_range",
        }
    }
}

/// Counters of one partition's windows, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Windows currently open (regular and revision).
    pub open_windows: usize,
    /// Revision windows currently open.
    pub revision_windows: usize,
    /// Samples currently held by open windows.
    pub held_samples: usize,
    /// Accepted samples whose hour had ended at or before the watermark on arrival, since
    /// creation.
    pub late_samples: u64,
    /// Accepted samples with the id and content of a held one (redeliveries, counted once),
    /// since creation.
    pub duplicate_samples: u64,
    /// Accepted samples that replaced a held one with the same id but other content (value,
    /// time, device or UTC offset), since creation.
    pub replaced_samples: u64,
    /// Aggregates emitted, since creation.
    pub emitted_aggregates: u64,
}

/// Where a restarted stage resumes a partition: the offset to commit, and the highest event
/// time seen before it, to pass to [`PartitionWindows::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPoint {
    /// The offset to commit (the next offset to read after a restart).
    pub offset: i64,
    /// The highest `effective_start` accepted before `offset`; `None` if none.
    pub max_event_time: Option<i64>,
}

impl CommitPoint {
    /// Returns the string to store as the metadata of the offset commit, e.g.
    /// `ohx-hourly-window/v1 max_event_time=1772323200000`.
    pub fn metadata(&self) -> String {
        match self.max_event_time {
            Some(time) => format!("{METADATA_PREFIX}{time}"),
            None => format!("{METADATA_PREFIX}none"),
        }
    }

    /// Returns the max event time stored by [`CommitPoint::metadata`]; `None` when it stored
    /// none, or the metadata is absent, foreign or unreadable (resume without a watermark).
    pub fn max_event_time_from_metadata(metadata: &str) -> Option<i64> {
        metadata.strip_prefix(METADATA_PREFIX)?.parse().ok()
    }
}

/// What an accepted sample did to the samples held for its hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SampleEffect {
    Added,
    Replaced,
    Duplicate,
}

/// Regular windows close on the watermark, revision windows on their series' next hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowKind {
    Regular,
    Revision,
}

/// What a window keeps of one sample.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    effective_start: i64,
    value: f64,
    utc_offset_seconds: Option<i32>,
    /// Shared with the window's other samples from the same device.
    device: Option<Arc<Device>>,
}

/// The samples of one series in one hour, not yet emitted.
#[derive(Debug)]
struct Window {
    kind: WindowKind,
    data_type: String,
    unit: String,
    /// Context of the most recently received sample.
    context: Context,
    /// Lowest and highest offset of any record that changed this window; the window holds all
    /// offsets in between for the commit rule.
    first_offset: i64,
    last_offset: i64,
    /// The partition's max event time before `first_offset` was processed.
    max_event_time_before: Option<i64>,
    samples: HashMap<String, Sample>,
    /// The distinct devices of the samples.
    devices: Vec<Arc<Device>>,
    /// Received a sample since the last tick.
    touched: bool,
    /// Time of the first tick after the latest sample.
    heard_at: i64,
}

impl Window {
    /// Returns an empty window opened by the record at `offset`.
    fn new(kind: WindowKind, m: &Measurement, unit: &str, offset: i64, max: Option<i64>) -> Self {
        Self {
            kind,
            data_type: m.data_type.clone(),
            unit: unit.to_owned(),
            context: m.context.clone(),
            first_offset: offset,
            last_offset: offset,
            max_event_time_before: max,
            samples: HashMap::new(),
            devices: Vec::new(),
            touched: true,
            heard_at: i64::MIN,
        }
    }

    /// Notes that the record at `offset` changed this window.
    fn touch(&mut self, offset: i64) {
        self.first_offset = self.first_offset.min(offset);
        self.last_offset = self.last_offset.max(offset);
        self.touched = true;
    }

    /// Returns the window's shared copy of `device`.
    fn intern(&mut self, device: Option<&Device>) -> Option<Arc<Device>> {
        let device = device?;
        if let Some(known) = self.devices.iter().find(|known| known.as_ref() == device) {
            return Some(Arc::clone(known));
        }
        let shared = Arc::new(device.clone());
        self.devices.push(Arc::clone(&shared));
        Some(shared)
    }

    /// Adds or replaces the sample of `m` (already validated) and returns what it did.
    fn apply(&mut self, m: &Measurement, value: f64, offset: i64) -> SampleEffect {
        let sample = Sample {
            effective_start: m.effective_start,
            value,
            utc_offset_seconds: m.utc_offset_seconds,
            device: self.intern(m.device.as_ref()),
        };
        self.touch(offset);
        if self.context != m.context {
            self.context = m.context.clone();
        }
        if self.data_type != m.data_type {
            self.data_type = m.data_type.clone();
        }
        match self.samples.get_mut(&m.measurement_id) {
            Some(held) if *held == sample => SampleEffect::Duplicate,
            Some(held) => {
                *held = sample;
                SampleEffect::Replaced
            }
            None => {
                self.samples.insert(m.measurement_id.clone(), sample);
                SampleEffect::Added
            }
        }
    }

    /// Returns the aggregate of the held samples, `None` if there are none.
    fn aggregate(&self, series_key: &str, hour_start: i64) -> Option<HourlyAggregate> {
        let mut sorted: Vec<(&String, &Sample)> = self.samples.iter().collect();
        sorted.sort_by(|(a_id, a), (b_id, b)| {
            a.effective_start
                .cmp(&b.effective_start)
                .then_with(|| a_id.cmp(b_id))
        });
        let (_, first) = sorted.first()?;
        let (_, last) = sorted.last()?;
        let (mut min, mut max, mut sum) = (first.value, first.value, 0.0);
        for (_, sample) in &sorted {
            // Fixed order: floating-point sums depend on it.
            sum += sample.value;
            if sample.value < min {
                min = sample.value;
            }
            if sample.value > max {
                max = sample.value;
            }
        }
        Some(HourlyAggregate {
            context: self.context.clone(),
            aggregate_id: aggregate_id(series_key, hour_start),
            series_key: series_key.to_owned(),
            data_type: self.data_type.clone(),
            unit: self.unit.clone(),
            hour_start,
            hour_end: hour_start + HOUR_MS,
            count: i64::try_from(sorted.len()).unwrap_or(i64::MAX),
            min,
            max,
            mean: sum / sorted.len() as f64,
            sum,
            first_sample_at: first.effective_start,
            last_sample_at: last.effective_start,
            utc_offset_seconds: last.utc_offset_seconds,
            device: last.device.as_deref().cloned(),
            revision: self.last_offset,
            amends: self.kind == WindowKind::Revision,
        })
    }
}

/// Offsets and watermark of an emitted window, kept while a commit could split it.
#[derive(Debug, Clone, Copy)]
struct ClosedRange {
    first_offset: i64,
    last_offset: i64,
    max_event_time_before: Option<i64>,
}

/// The open hourly windows of one input partition (see the module documentation for the
/// rules). Create one per assigned partition; drop it when the partition is revoked.
#[derive(Debug)]
pub struct PartitionWindows {
    config: WindowConfig,
    /// Regular windows by hour start, then series key.
    regular: BTreeMap<i64, BTreeMap<String, Window>>,
    /// Revision windows by series key, then hour start.
    revisions: BTreeMap<String, BTreeMap<i64, Window>>,
    /// Emitted windows that may still straddle the commit point.
    closed: Vec<ClosedRange>,
    max_event_time: Option<i64>,
    /// One past the highest offset passed to `on_sample`.
    next_offset: Option<i64>,
    held_samples: usize,
    late_samples: u64,
    duplicate_samples: u64,
    replaced_samples: u64,
    emitted_aggregates: u64,
}

impl PartitionWindows {
    /// Returns the state of a partition read from its committed offset without a stored
    /// event time (first start, or metadata missing).
    pub fn new(config: WindowConfig) -> Self {
        Self::resume(config, None)
    }

    /// Returns the state of a partition read from a [`CommitPoint`]'s offset, with the
    /// watermark restored from its `max_event_time`.
    pub fn resume(config: WindowConfig, max_event_time: Option<i64>) -> Self {
        Self {
            config,
            regular: BTreeMap::new(),
            revisions: BTreeMap::new(),
            closed: Vec::new(),
            max_event_time,
            next_offset: None,
            held_samples: 0,
            late_samples: 0,
            duplicate_samples: 0,
            replaced_samples: 0,
            emitted_aggregates: 0,
        }
    }

    /// Adds the measurement read at `offset` (offsets increase) to its window and returns
    /// the aggregates of the windows that closed, sorted by (hour, series key): revision
    /// windows of its series whose hour ended at or before its `effective_start`, and regular
    /// windows reached by the watermark. Late samples, duplicates and replacements are
    /// counted in [`PartitionWindows::stats`]. Returns an error, changing no window, for a measurement this stage cannot
    /// aggregate (the offset still counts as processed).
    pub fn on_sample(
        &mut self,
        offset: i64,
        m: &Measurement,
    ) -> Result<Vec<HourlyAggregate>, WindowError> {
        let after = offset.saturating_add(1);
        self.next_offset = Some(self.next_offset.map_or(after, |next| next.max(after)));
        let (value, unit) = validate(m)?;
        let ts = m.effective_start;
        let start = hour_start(ts);
        let existing = self.window(&m.series_key, start);
        if let Some(window) = existing
            && window.unit != unit
        {
            return Err(WindowError::UnitMismatch {
                unit: unit.to_owned(),
                window_unit: window.unit.clone(),
            });
        }
        let late = self.watermark().is_some_and(|w| start + HOUR_MS <= w);
        let kind = match existing {
            Some(window) => window.kind,
            None if late => WindowKind::Revision,
            None => WindowKind::Regular,
        };

        let moved = self.remove_from_other_hours(&m.series_key, &m.measurement_id, start, offset);
        let max_before = self.max_event_time;
        let open = || Window::new(kind, m, unit, offset, max_before);
        let window = match kind {
            WindowKind::Regular => self
                .regular
                .entry(start)
                .or_default()
                .entry(m.series_key.clone())
                .or_insert_with(open),
            WindowKind::Revision => self
                .revisions
                .entry(m.series_key.clone())
                .or_default()
                .entry(start)
                .or_insert_with(open),
        };
        let mut effect = window.apply(m, value, offset);
        if effect == SampleEffect::Added {
            self.held_samples += 1;
        }
        if moved {
            self.held_samples = self.held_samples.saturating_sub(1);
            effect = SampleEffect::Replaced;
        }
        match effect {
            SampleEffect::Added => {}
            SampleEffect::Replaced => self.replaced_samples += 1,
            SampleEffect::Duplicate => self.duplicate_samples += 1,
        }
        if late {
            self.late_samples += 1;
        }
        self.max_event_time = Some(self.max_event_time.map_or(ts, |max| max.max(ts)));

        let mut due = Vec::new();
        if let Some(hours) = self.revisions.get_mut(&m.series_key) {
            // Keeps the hours that end after `ts`, i.e. start after `ts - HOUR_MS`.
            let open = hours.split_off(&(ts - HOUR_MS + 1));
            let ended = std::mem::replace(hours, open);
            if hours.is_empty() {
                self.revisions.remove(&m.series_key);
            }
            due.extend(
                ended
                    .into_iter()
                    .map(|(hour, w)| (hour, m.series_key.clone(), w)),
            );
        }
        if let Some(watermark) = self.watermark() {
            while let Some(entry) = self.regular.first_entry() {
                if *entry.key() + HOUR_MS > watermark {
                    break;
                }
                let (hour, windows) = entry.remove_entry();
                due.extend(windows.into_iter().map(|(key, w)| (hour, key, w)));
            }
        }
        Ok(self.emit(due))
    }

    /// Notes the wall-clock time `now_ms` and, if the partition is `caught_up` (end of
    /// partition seen since the last record), returns the aggregates of the windows with
    /// `now >= max(hour_end, heard) + idle_grace`, `heard` being the time of the first tick
    /// after the window's latest sample. Call it at a fixed interval shorter than the grace.
    pub fn on_tick(&mut self, now_ms: i64, caught_up: bool) -> Vec<HourlyAggregate> {
        let windows = self.regular.values_mut().flat_map(BTreeMap::values_mut);
        let revisions = self.revisions.values_mut().flat_map(BTreeMap::values_mut);
        for window in windows.chain(revisions) {
            if window.touched {
                window.touched = false;
                window.heard_at = now_ms;
            }
        }
        if !caught_up {
            return Vec::new();
        }
        let threshold = now_ms.saturating_sub(self.config.idle_grace_ms);
        let is_due = |hour: i64, w: &Window| hour + HOUR_MS <= threshold && w.heard_at <= threshold;
        let mut due = Vec::new();
        let ended: Vec<i64> = self
            .regular
            .range(..=threshold.saturating_sub(HOUR_MS))
            .map(|(hour, _)| *hour)
            .collect();
        for hour in ended {
            if let Some(windows) = self.regular.get_mut(&hour) {
                take_due(
                    windows,
                    |_, w| is_due(hour, w),
                    |key, w| due.push((hour, key, w)),
                );
                if windows.is_empty() {
                    self.regular.remove(&hour);
                }
            }
        }
        self.revisions.retain(|key, hours| {
            take_due(
                hours,
                |hour, w| is_due(*hour, w),
                |hour, w| {
                    due.push((hour, key.clone(), w));
                },
            );
            !hours.is_empty()
        });
        self.emit(due)
    }

    /// Returns the offset that is safe to commit: the lowest offset held by an open window
    /// (lowered as described in [`PartitionWindows::commit_point`]), or `next_offset` when
    /// no window is open.
    pub fn commit_offset(&self, next_offset: i64) -> i64 {
        self.commit_point(next_offset).offset
    }

    /// Returns where a restart must resume: the lowest first offset of an open window,
    /// lowered to the first offset of any emitted window whose offsets straddle it, or
    /// `next_offset` when none; with the max event time seen before that offset.
    ///
    /// `next_offset` is one past the last offset passed to [`PartitionWindows::on_sample`]
    /// (or skipped by the caller). Commit the result only once every aggregate returned so
    /// far has been acknowledged by the broker.
    pub fn commit_point(&self, next_offset: i64) -> CommitPoint {
        let mut point = CommitPoint {
            offset: next_offset,
            max_event_time: self.max_event_time,
        };
        for window in self.open() {
            if window.first_offset < point.offset {
                point = CommitPoint {
                    offset: window.first_offset,
                    max_event_time: window.max_event_time_before,
                };
            }
        }
        // Terminates: the offset strictly decreases on every pass that changes it.
        loop {
            let mut lowered = false;
            for range in &self.closed {
                if range.first_offset < point.offset && point.offset <= range.last_offset {
                    point = CommitPoint {
                        offset: range.first_offset,
                        max_event_time: range.max_event_time_before,
                    };
                    lowered = true;
                }
            }
            if !lowered {
                return point;
            }
        }
    }

    /// Returns the watermark: the highest event time accepted minus the allowed lateness;
    /// `None` before the first sample (and without a resumed event time).
    pub fn watermark(&self) -> Option<i64> {
        self.max_event_time
            .map(|max| max.saturating_sub(self.config.allowed_lateness_ms))
    }

    /// Returns the highest `effective_start` accepted so far (or resumed from).
    pub fn max_event_time(&self) -> Option<i64> {
        self.max_event_time
    }

    /// Returns the number of open windows (regular and revision).
    pub fn open_windows(&self) -> usize {
        self.regular.values().map(BTreeMap::len).sum::<usize>() + self.revision_windows()
    }

    /// Returns the number of samples held by open windows.
    pub fn held_samples(&self) -> usize {
        self.held_samples
    }

    /// Returns the number of late samples accepted since creation.
    pub fn late_samples(&self) -> u64 {
        self.late_samples
    }

    /// Returns all counters at once.
    pub fn stats(&self) -> WindowStats {
        WindowStats {
            open_windows: self.open_windows(),
            revision_windows: self.revision_windows(),
            held_samples: self.held_samples,
            late_samples: self.late_samples,
            duplicate_samples: self.duplicate_samples,
            replaced_samples: self.replaced_samples,
            emitted_aggregates: self.emitted_aggregates,
        }
    }

    fn revision_windows(&self) -> usize {
        self.revisions.values().map(BTreeMap::len).sum()
    }

    /// Returns all open windows.
    fn open(&self) -> impl Iterator<Item = &Window> {
        let regular = self.regular.values().flat_map(BTreeMap::values);
        regular.chain(self.revisions.values().flat_map(BTreeMap::values))
    }

    /// Returns the open window of a series and hour. At most one exists: a regular window
    /// ends after the watermark, a revision window at or before it.
    fn window(&self, series_key: &str, hour: i64) -> Option<&Window> {
        let regular = self.regular.get(&hour).and_then(|w| w.get(series_key));
        regular.or_else(|| self.revisions.get(series_key)?.get(&hour))
    }

    /// Removes the sample `id` from the series' open windows of other hours than `hour`
    /// (its time was corrected) and returns whether it held one. A window left empty is
    /// dropped without emitting.
    fn remove_from_other_hours(
        &mut self,
        series_key: &str,
        id: &str,
        hour: i64,
        offset: i64,
    ) -> bool {
        let mut removed = false;
        let mut emptied = Vec::new();
        for (other, windows) in self.regular.iter_mut().filter(|(h, _)| **h != hour) {
            if let Some(window) = windows.get_mut(series_key)
                && window.samples.remove(id).is_some()
            {
                window.touch(offset);
                removed = true;
                if window.samples.is_empty() {
                    emptied.push(*other);
                }
            }
        }
        for other in emptied {
            if let Some(windows) = self.regular.get_mut(&other) {
                windows.remove(series_key);
                if windows.is_empty() {
                    self.regular.remove(&other);
                }
            }
        }
        if let Some(hours) = self.revisions.get_mut(series_key) {
            for (_, window) in hours.iter_mut().filter(|(h, _)| **h != hour) {
                if window.samples.remove(id).is_some() {
                    window.touch(offset);
                    removed = true;
                }
            }
            hours.retain(|_, window| !window.samples.is_empty());
            if hours.is_empty() {
                self.revisions.remove(series_key);
            }
        }
        removed
    }

    /// Returns the aggregates of closed windows sorted by (hour, series key) and forgets them
    /// except for their offsets.
    fn emit(&mut self, mut due: Vec<(i64, String, Window)>) -> Vec<HourlyAggregate> {
        if due.is_empty() {
            return Vec::new();
        }
        due.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut out = Vec::with_capacity(due.len());
        for (hour, series_key, window) in due {
            self.held_samples = self.held_samples.saturating_sub(window.samples.len());
            self.closed.push(ClosedRange {
                first_offset: window.first_offset,
                last_offset: window.last_offset,
                max_event_time_before: window.max_event_time_before,
            });
            out.extend(window.aggregate(&series_key, hour));
        }
        self.emitted_aggregates += out.len() as u64;
        self.prune_closed();
        out
    }

    /// Forgets emitted windows that lie entirely below the commit point; the commit point
    /// never goes back, so they can no longer straddle it.
    fn prune_closed(&mut self) {
        match self.next_offset {
            Some(next) => {
                let floor = self.commit_point(next).offset;
                self.closed.retain(|range| range.last_offset >= floor);
            }
            None => self.closed.clear(),
        }
    }
}

/// Moves the entries of `map` for which `is_due` holds to `take`.
fn take_due<K: Ord + Clone>(
    map: &mut BTreeMap<K, Window>,
    is_due: impl Fn(&K, &Window) -> bool,
    mut take: impl FnMut(K, Window),
) {
    let keys: Vec<K> = map
        .iter()
        .filter(|(key, window)| is_due(key, window))
        .map(|(key, _)| key.clone())
        .collect();
    for key in keys {
        if let Some(window) = map.remove(&key) {
            take(key, window);
        }
    }
}

/// Returns the value and unit of a measurement this stage can aggregate.
fn validate(m: &Measurement) -> Result<(f64, &str), WindowError> {
    if m.aggregation != AGGREGATION_HOURLY {
        return Err(WindowError::NotHourly(m.aggregation.clone()));
    }
    let mut values = m.components.iter().filter(|c| c.code == VALUE_COMPONENT);
    let component = values.next().ok_or(WindowError::MissingValue)?;
    let more = values.count();
    if more > 0 {
        return Err(WindowError::AmbiguousValue(more + 1));
    }
    if !component.value.is_finite() {
        return Err(WindowError::NonFiniteValue);
    }
    if !(MIN_EFFECTIVE_START..=MAX_EFFECTIVE_START).contains(&m.effective_start) {
        return Err(WindowError::TimestampOutOfRange(m.effective_start));
    }
    Ok((component.value, &component.unit))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use ohx_common::records::{AGGREGATION_INDIVIDUAL, Component};

    use super::*;

    /// 2026-03-01T00:00:00Z.
    const T0: i64 = 1_772_323_200_000;
    const MIN: i64 = 60_000;
    const SEC: i64 = 1_000;
    const HR: &str = "p1/heart_rate";
    const HR2: &str = "p2/heart_rate";
    const STEPS: &str = "p1/steps";

    /// Returns 2026-03-01 at `hour`:`minute` UTC.
    fn at(hour: i64, minute: i64) -> i64 {
        T0 + hour * HOUR_MS + minute * MIN
    }

    fn config() -> WindowConfig {
        WindowConfig {
            allowed_lateness_ms: 10 * MIN,
            idle_grace_ms: 5 * MIN,
        }
    }

    fn context(sync_request_id: &str) -> Context {
        Context {
            organization_id: "org-1".to_owned(),
            ehr_target_id: "ehr-1".to_owned(),
            patient_id: "p1".to_owned(),
            patient_reference: "Patient/1".to_owned(),
            provider: "withings".to_owned(),
            link_id: "link-1".to_owned(),
            provider_user_id: "u1".to_owned(),
            sync_request_id: sync_request_id.to_owned(),
            trigger: "WEBHOOK".to_owned(),
            received_at: T0,
        }
    }

    fn device(device_id: &str) -> Device {
        Device {
            device_id: device_id.to_owned(),
            model: Some("ScanWatch".to_owned()),
            model_id: None,
            manufacturer: Some("Withings".to_owned()),
        }
    }

    fn measurement(series_key: &str, id: &str, ts: i64, value: f64) -> Measurement {
        Measurement {
            context: context("sync-1"),
            measurement_id: id.to_owned(),
            series_key: series_key.to_owned(),
            data_type: series_key.rsplit('/').next().unwrap().to_owned(),
            aggregation: AGGREGATION_HOURLY.to_owned(),
            effective_start: ts,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: VALUE_COMPONENT.to_owned(),
                value,
                unit: "/min".to_owned(),
            }],
            device: Some(device("d1")),
            entry_method: Some("device".to_owned()),
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
        }
    }

    /// What one sample did.
    struct SampleOutcome {
        closed: Vec<HourlyAggregate>,
        late: bool,
        effect: SampleEffect,
    }

    /// One partition with consecutive offsets from 100.
    struct Partition {
        windows: PartitionWindows,
        next_offset: i64,
    }

    impl Partition {
        fn new() -> Self {
            Self {
                windows: PartitionWindows::new(config()),
                next_offset: 100,
            }
        }

        /// Sends a sample and reports what it did, from the counters.
        fn send(&mut self, m: &Measurement) -> SampleOutcome {
            let offset = self.next_offset;
            self.next_offset += 1;
            let before = self.windows.stats();
            let closed = self.windows.on_sample(offset, m).expect("accepted");
            let after = self.windows.stats();
            let effect = if after.replaced_samples > before.replaced_samples {
                SampleEffect::Replaced
            } else if after.duplicate_samples > before.duplicate_samples {
                SampleEffect::Duplicate
            } else {
                SampleEffect::Added
            };
            SampleOutcome {
                closed,
                late: after.late_samples > before.late_samples,
                effect,
            }
        }

        /// Sends a sample and returns the aggregates it closed.
        fn value(
            &mut self,
            series_key: &str,
            id: &str,
            ts: i64,
            value: f64,
        ) -> Vec<HourlyAggregate> {
            self.send(&measurement(series_key, id, ts, value)).closed
        }

        fn tick(&mut self, now: i64, caught_up: bool) -> Vec<HourlyAggregate> {
            self.windows.on_tick(now, caught_up)
        }
    }

    fn ids(aggregates: &[HourlyAggregate]) -> Vec<&str> {
        aggregates.iter().map(|a| a.aggregate_id.as_str()).collect()
    }

    #[test]
    fn test_hour_start_floors_to_the_utc_hour() {
        assert_eq!(hour_start(at(10, 0)), at(10, 0));
        assert_eq!(hour_start(at(10, 30)), at(10, 0));
        assert_eq!(hour_start(at(11, 0) - 1), at(10, 0));
        assert_eq!(hour_start(at(11, 0)), at(11, 0));
        assert_eq!(hour_start(0), 0);
        assert_eq!(hour_start(i64::MIN), i64::MIN);
    }

    #[test]
    fn test_aggregate_id_is_series_and_rfc3339_hour() {
        assert_eq!(
            aggregate_id(HR, at(10, 0)),
            "p1/heart_rate/PT1H/2026-03-01T10:00:00Z"
        );
        assert_eq!(aggregate_id("s", 0), "s/PT1H/1970-01-01T00:00:00Z");
        assert_eq!(
            aggregate_id("s", MIN_EFFECTIVE_START),
            "s/PT1H/0000-01-01T00:00:00Z"
        );
        assert_eq!(
            aggregate_id("s", hour_start(MAX_EFFECTIVE_START)),
            "s/PT1H/9999-12-31T23:00:00Z"
        );
        assert_eq!(aggregate_id("s", i64::MAX), format!("s/PT1H/{}", i64::MAX));
    }

    #[test]
    fn test_sample_at_exact_hour_start_belongs_to_the_new_hour() {
        let mut p = Partition::new();
        p.value(HR, "a", at(11, 0) - 1, 1.0);
        p.value(HR, "b", at(11, 0), 2.0);
        assert_eq!(p.windows.open_windows(), 2);
        let closed = p.value(HR, "c", at(11, 20), 3.0);
        assert_eq!(ids(&closed), ["p1/heart_rate/PT1H/2026-03-01T10:00:00Z"]);
        assert_eq!(closed[0].count, 1);
        assert_eq!(closed[0].last_sample_at, at(11, 0) - 1);
        let closed = p.value(HR, "d", at(12, 10), 4.0);
        assert_eq!(ids(&closed), ["p1/heart_rate/PT1H/2026-03-01T11:00:00Z"]);
        assert_eq!((closed[0].count, closed[0].sum), (2, 5.0));
        assert_eq!(closed[0].first_sample_at, at(11, 0));
    }

    #[test]
    fn test_window_closes_when_watermark_reaches_its_end() {
        let mut p = Partition::new();
        assert!(p.value(HR, "a", at(10, 5), 60.0).is_empty());
        assert!(p.value(HR, "b", at(10, 30), 80.0).is_empty());
        // Watermark 10:59:59.999: one millisecond short of the end.
        assert!(p.value(HR, "c", at(11, 10) - 1, 70.0).is_empty());
        assert_eq!(p.windows.watermark(), Some(at(11, 0) - 1));
        let closed = p.value(HR, "d", at(11, 10), 75.0);
        assert_eq!(p.windows.watermark(), Some(at(11, 0)));
        assert_eq!(closed.len(), 1);
        let aggregate = &closed[0];
        assert_eq!(aggregate.aggregate_id, aggregate_id(HR, at(10, 0)));
        assert_eq!(
            (aggregate.hour_start, aggregate.hour_end),
            (at(10, 0), at(11, 0))
        );
        assert_eq!(
            (aggregate.count, aggregate.sum, aggregate.mean),
            (2, 140.0, 70.0)
        );
        assert_eq!(p.windows.open_windows(), 1);
        assert_eq!(p.windows.held_samples(), 2);
    }

    #[test]
    fn test_allowed_lateness_keeps_window_open_for_out_of_order_samples() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 50), 1.0);
        assert!(p.value(HR, "b", at(11, 5), 2.0).is_empty());
        let outcome = p.send(&measurement(HR, "c", at(10, 58), 3.0));
        assert!(!outcome.late);
        assert!(outcome.closed.is_empty());
        let closed = p.value(HR, "d", at(11, 10), 4.0);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].count, closed[0].sum), (2, 4.0));
        assert_eq!(closed[0].last_sample_at, at(10, 58));
        assert_eq!(p.windows.late_samples(), 0);
    }

    #[test]
    fn test_aggregate_statistics_follow_event_time_not_arrival() {
        let mut p = Partition::new();
        let mut latest = measurement(HR, "c", at(10, 40), 3.0);
        latest.utc_offset_seconds = Some(7200);
        latest.device = Some(device("d2"));
        p.send(&latest);
        p.value(HR, "a", at(10, 10), 1.0);
        let mut received_last = measurement(HR, "b", at(10, 25), 2.0);
        received_last.context = context("sync-3");
        p.send(&received_last);
        let closed = p.value(HR2, "x", at(11, 10), 9.0);
        assert_eq!(closed.len(), 1);
        let a = &closed[0];
        assert_eq!(a.series_key, HR);
        assert_eq!(a.data_type, "heart_rate");
        assert_eq!(a.unit, "/min");
        assert_eq!(
            (a.count, a.min, a.max, a.sum, a.mean),
            (3, 1.0, 3.0, 6.0, 2.0)
        );
        assert_eq!(
            (a.first_sample_at, a.last_sample_at),
            (at(10, 10), at(10, 40))
        );
        // Offset and device of the last sample by event time.
        assert_eq!(a.utc_offset_seconds, Some(7200));
        assert_eq!(a.device, Some(device("d2")));
        // Context of the most recently received sample.
        assert_eq!(a.context, context("sync-3"));
    }

    #[test]
    fn test_duplicate_measurement_id_counts_once() {
        let mut p = Partition::new();
        assert_eq!(
            p.send(&measurement(HR, "a", at(10, 10), 70.0)).effect,
            SampleEffect::Added
        );
        let outcome = p.send(&measurement(HR, "a", at(10, 10), 70.0));
        assert_eq!(outcome.effect, SampleEffect::Duplicate);
        assert_eq!(p.windows.held_samples(), 1);
        let closed = p.value(HR, "b", at(11, 10), 1.0);
        assert_eq!((closed[0].count, closed[0].sum), (1, 70.0));
        assert_eq!(p.windows.stats().duplicate_samples, 1);
    }

    #[test]
    fn test_refetched_sample_with_new_value_replaces_the_held_one() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 10), 70.0);
        p.value(HR, "b", at(10, 20), 80.0);
        let outcome = p.send(&measurement(HR, "a", at(10, 10), 75.0));
        assert_eq!(outcome.effect, SampleEffect::Replaced);
        assert_eq!(p.windows.held_samples(), 2);
        let closed = p.value(HR, "c", at(11, 10), 1.0);
        let a = &closed[0];
        assert_eq!((a.count, a.sum, a.min, a.max), (2, 155.0, 75.0, 80.0));
        assert_eq!(p.windows.stats().replaced_samples, 1);
    }

    #[test]
    fn test_sample_with_corrected_time_moves_to_its_new_hour() {
        let mut p = Partition::new();
        p.value(HR, "x", at(10, 55), 1.0);
        p.value(HR, "y", at(10, 50), 2.0);
        let outcome = p.send(&measurement(HR, "x", at(11, 2), 1.0));
        assert_eq!(outcome.effect, SampleEffect::Replaced);
        assert_eq!(p.windows.held_samples(), 2);
        let closed = p.value(HR, "z", at(11, 15), 3.0);
        assert_eq!((closed[0].count, closed[0].sum), (1, 2.0));

        // Moving the only sample of an hour drops that window without emitting.
        p.value(HR, "q", at(12, 2), 4.0);
        assert_eq!(p.windows.open_windows(), 2);
        let outcome = p.send(&measurement(HR, "q", at(11, 50), 4.0));
        assert!(outcome.closed.is_empty());
        assert_eq!(p.windows.open_windows(), 1);
        let closed = p.value(HR2, "w", at(12, 10), 0.0);
        assert_eq!(ids(&closed), [aggregate_id(HR, at(11, 0))]);
        assert_eq!((closed[0].count, closed[0].sum), (3, 8.0));
        assert_eq!(p.windows.open_windows(), 1);
    }

    #[test]
    fn test_invalid_measurements_are_rejected_without_changing_windows() {
        let mut p = Partition::new();
        let mut individual = measurement(HR, "a", at(10, 0), 1.0);
        individual.aggregation = AGGREGATION_INDIVIDUAL.to_owned();
        let mut no_value = measurement(HR, "a", at(10, 0), 1.0);
        no_value.components[0].code = "systolic".to_owned();
        let mut two_values = measurement(HR, "a", at(10, 0), 1.0);
        two_values.components.push(two_values.components[0].clone());
        let nan = measurement(HR, "a", at(10, 0), f64::NAN);
        let infinite = measurement(HR, "a", at(10, 0), f64::INFINITY);
        let too_late = measurement(HR, "a", MAX_EFFECTIVE_START + 1, 1.0);
        let too_early = measurement(HR, "a", MIN_EFFECTIVE_START - 1, 1.0);
        let cases = [
            (
                individual,
                WindowError::NotHourly("INDIVIDUAL".to_owned()),
                "not_hourly",
            ),
            (no_value, WindowError::MissingValue, "missing_value"),
            (
                two_values,
                WindowError::AmbiguousValue(2),
                "ambiguous_value",
            ),
            (nan, WindowError::NonFiniteValue, "non_finite_value"),
            (infinite, WindowError::NonFiniteValue, "non_finite_value"),
            (
                too_late,
                WindowError::TimestampOutOfRange(MAX_EFFECTIVE_START + 1),
                "timestamp_out_of_range",
            ),
            (
                too_early,
                WindowError::TimestampOutOfRange(MIN_EFFECTIVE_START - 1),
                "timestamp_out_of_range",
            ),
        ];
        for (offset, (m, error, label)) in (0..).zip(cases) {
            assert_eq!(p.windows.on_sample(offset, &m), Err(error.clone()));
            assert_eq!(error.label(), label);
        }
        assert_eq!(p.windows.open_windows(), 0);
        assert_eq!(p.windows.watermark(), None);
        assert_eq!(p.windows.commit_offset(7), 7);

        // The unit is fixed by the hour's first sample; other hours may differ.
        p.value(HR, "a", at(10, 0), 1.0);
        let mut other_unit = measurement(HR, "b", at(10, 5), 5.0);
        other_unit.components[0].unit = "mmol/L".to_owned();
        let error = p.windows.on_sample(200, &other_unit).unwrap_err();
        assert_eq!(
            error,
            WindowError::UnitMismatch {
                unit: "mmol/L".to_owned(),
                window_unit: "/min".to_owned()
            }
        );
        assert_eq!(error.label(), "unit_mismatch");
        assert_eq!(p.windows.held_samples(), 1);
        assert_eq!(p.windows.max_event_time(), Some(at(10, 0)));
        other_unit.effective_start = at(11, 5);
        assert!(p.windows.on_sample(201, &other_unit).is_ok());
    }

    #[test]
    fn test_idle_close_requires_caught_up() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 30), 1.0);
        assert!(p.tick(at(10, 31), true).is_empty());
        assert!(p.tick(at(13, 0), false).is_empty());
        assert_eq!(p.windows.open_windows(), 1);
        let closed = p.tick(at(13, 0), true);
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert_eq!(p.windows.open_windows(), 0);
    }

    #[test]
    fn test_idle_close_waits_for_grace_after_hour_end() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 30), 1.0);
        p.tick(at(10, 31), false);
        assert!(p.tick(at(11, 5) - 1, true).is_empty());
        let closed = p.tick(at(11, 5), true);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 1);
    }

    #[test]
    fn test_idle_close_waits_for_grace_after_latest_sample() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 30), 1.0);
        p.tick(at(10, 31), true);
        // A sample of the ended hour arrives at 11:03, within allowed lateness.
        p.value(HR, "b", at(10, 58), 2.0);
        assert!(p.tick(at(11, 3), true).is_empty());
        assert!(p.tick(at(11, 8) - 1, true).is_empty());
        let closed = p.tick(at(11, 8), true);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 2);
    }

    /// Emits hour 10 of HR with samples a (10:10, 60) and b (10:50, 70), leaving hour 11 open
    /// with c (11:15, 80).
    fn partition_with_emitted_hour() -> Partition {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 10), 60.0);
        p.value(HR, "b", at(10, 50), 70.0);
        let closed = p.value(HR, "c", at(11, 15), 80.0);
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert_eq!((closed[0].count, closed[0].sum), (2, 130.0));
        p
    }

    #[test]
    fn test_revision_window_collects_the_whole_refetched_hour_and_reuses_the_id() {
        let mut p = partition_with_emitted_hour();
        // The fetcher re-fetches hour 10 (with one new sample) and the hour after it.
        for (id, minute, value) in [("a", 10, 60.0), ("m", 30, 65.0), ("b", 50, 70.0)] {
            let outcome = p.send(&measurement(HR, id, at(10, minute), value));
            assert!(outcome.late);
            assert!(
                outcome.closed.is_empty(),
                "closed on a sample of its own hour"
            );
        }
        assert_eq!(p.windows.stats().revision_windows, 1);
        let outcome = p.send(&measurement(HR, "c", at(11, 15), 80.0));
        assert!(!outcome.late);
        assert_eq!(outcome.effect, SampleEffect::Duplicate);
        assert_eq!(ids(&outcome.closed), [aggregate_id(HR, at(10, 0))]);
        let revision = &outcome.closed[0];
        assert_eq!(
            (revision.count, revision.sum, revision.mean),
            (3, 195.0, 65.0)
        );
        assert_eq!(
            (revision.hour_start, revision.hour_end),
            (at(10, 0), at(11, 0))
        );
        assert_eq!(p.windows.stats().revision_windows, 0);
        assert_eq!(p.windows.late_samples(), 3);
    }

    #[test]
    fn test_revision_window_ignores_watermark_and_other_series() {
        let mut p = partition_with_emitted_hour();
        p.value(HR, "a", at(10, 10), 60.0);
        // Another series moves the watermark far past hour 10 and closes HR's hour 11.
        let closed = p.value(HR2, "x", at(12, 30), 1.0);
        assert_eq!(ids(&closed), [aggregate_id(HR, at(11, 0))]);
        assert_eq!(p.windows.stats().revision_windows, 1);
        // A sample of HR still in hour 10 joins the revision.
        assert!(p.value(HR, "b", at(10, 59), 70.0).is_empty());
        let closed = p.value(HR, "d", at(11, 0), 1.0);
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert_eq!((closed[0].count, closed[0].sum), (2, 130.0));
        assert_eq!(closed[0].last_sample_at, at(10, 59));
    }

    #[test]
    fn test_revision_window_closes_on_caught_up_tick_after_quiet_grace() {
        let mut p = partition_with_emitted_hour();
        p.value(HR, "a", at(10, 10), 61.0);
        let now = at(15, 0);
        assert!(
            p.tick(now, true).is_empty(),
            "closed while the fetch may still deliver"
        );
        assert!(p.tick(now + 5 * MIN - 1, true).is_empty());
        assert!(p.tick(now + 5 * MIN, false).is_empty());
        let closed = p.tick(now + 5 * MIN, true);
        // Both the revision and the regular hour 11 are idle.
        assert_eq!(
            ids(&closed),
            [aggregate_id(HR, at(10, 0)), aggregate_id(HR, at(11, 0))]
        );
        assert_eq!((closed[0].count, closed[0].sum), (1, 61.0));
        assert_eq!(p.windows.open_windows(), 0);
    }

    #[test]
    fn test_late_samples_are_counted() {
        let mut p = partition_with_emitted_hour();
        assert_eq!(p.windows.late_samples(), 0);
        assert!(p.send(&measurement(HR, "a", at(10, 10), 60.0)).late);
        assert!(p.send(&measurement(HR, "a", at(10, 10), 60.0)).late);
        assert!(p.send(&measurement(HR2, "y", at(9, 0), 1.0)).late);
        assert!(!p.send(&measurement(HR, "e", at(11, 20), 1.0)).late);
        assert_eq!(p.windows.late_samples(), 3);
        assert_eq!(p.windows.stats().late_samples, 3);
        // HR's revision closed on its sample of hour 11; HR2's hour 9 is still open.
        assert_eq!(p.windows.stats().revision_windows, 1);
    }

    #[test]
    fn test_commit_offset_is_lowest_offset_held_by_an_open_window() {
        let mut w = PartitionWindows::new(config());
        w.on_sample(100, &measurement(HR, "a", at(10, 10), 1.0))
            .unwrap();
        w.on_sample(101, &measurement(HR2, "b", at(10, 20), 1.0))
            .unwrap();
        w.on_sample(102, &measurement(HR, "c", at(11, 1), 1.0))
            .unwrap();
        assert_eq!(w.commit_offset(103), 100);
        assert_eq!(w.commit_point(103).max_event_time, None);
        let closed = w
            .on_sample(103, &measurement(HR2, "d", at(11, 12), 1.0))
            .unwrap();
        assert_eq!(closed.len(), 2);
        assert_eq!(
            w.commit_point(104),
            CommitPoint {
                offset: 102,
                max_event_time: Some(at(10, 20))
            }
        );
        w.on_tick(at(11, 30), false);
        assert_eq!(w.on_tick(at(12, 5), true).len(), 2);
        assert_eq!(
            w.commit_point(104),
            CommitPoint {
                offset: 104,
                max_event_time: Some(at(11, 12))
            }
        );
    }

    #[test]
    fn test_commit_offset_is_next_offset_when_no_window_is_open() {
        let mut w = PartitionWindows::new(config());
        assert_eq!(w.commit_offset(42), 42);
        w.on_sample(42, &measurement(HR, "a", at(10, 10), 1.0))
            .unwrap();
        assert_eq!(w.commit_offset(43), 42);
        w.on_tick(at(10, 11), false);
        assert_eq!(w.on_tick(at(11, 5), true).len(), 1);
        assert_eq!(w.commit_offset(43), 43);
        assert_eq!(w.commit_offset(50), 50);
    }

    #[test]
    fn test_commit_offset_covers_an_emitted_window_straddling_an_open_one() {
        let mut w = PartitionWindows::new(config());
        w.on_sample(0, &measurement(HR, "a", at(10, 59), 1.0))
            .unwrap();
        w.on_sample(1, &measurement(HR, "b", at(11, 1), 2.0))
            .unwrap();
        w.on_sample(2, &measurement(HR, "c", at(10, 58), 3.0))
            .unwrap();
        let closed = w
            .on_sample(3, &measurement(HR, "d", at(11, 12), 4.0))
            .unwrap();
        assert_eq!((closed[0].count, closed[0].sum), (2, 4.0));
        // Hour 11 holds offset 1, but hour 10 (offsets 0 and 2) was emitted: committing 1
        // would make a restart rebuild hour 10 from offset 2 alone.
        assert_eq!(w.commit_offset(4), 0);
        let mut from_one = PartitionWindows::resume(config(), Some(at(10, 59)));
        for (offset, id, ts, value) in [(1, "b", at(11, 1), 2.0), (2, "c", at(10, 58), 3.0)] {
            from_one
                .on_sample(offset, &measurement(HR, id, ts, value))
                .unwrap();
        }
        let partial = from_one
            .on_sample(3, &measurement(HR, "d", at(11, 12), 4.0))
            .unwrap();
        assert_ne!(partial, closed);

        w.on_sample(4, &measurement(HR, "e", at(12, 11), 5.0))
            .unwrap();
        assert_eq!(w.commit_offset(5), 4);
    }

    #[test]
    fn test_commit_point_metadata_round_trips_and_resume_restores_watermark() {
        let point = CommitPoint {
            offset: 7,
            max_event_time: Some(at(10, 30)),
        };
        let metadata = point.metadata();
        assert_eq!(
            metadata,
            format!("ohx-hourly-window/v1 max_event_time={}", at(10, 30))
        );
        assert_eq!(
            CommitPoint::max_event_time_from_metadata(&metadata),
            Some(at(10, 30))
        );
        let none = CommitPoint {
            offset: 7,
            max_event_time: None,
        };
        assert_eq!(
            CommitPoint::max_event_time_from_metadata(&none.metadata()),
            None
        );
        assert_eq!(CommitPoint::max_event_time_from_metadata(""), None);
        assert_eq!(CommitPoint::max_event_time_from_metadata("other=5"), None);

        let mut w = PartitionWindows::resume(config(), Some(at(11, 30)));
        assert_eq!(w.watermark(), Some(at(11, 20)));
        w.on_sample(7, &measurement(HR, "a", at(10, 40), 1.0))
            .unwrap();
        assert_eq!(w.late_samples(), 1);
        w.on_sample(8, &measurement(HR, "b", at(11, 5), 1.0))
            .unwrap();
        assert_eq!(w.late_samples(), 1);
    }

    #[test]
    fn test_watermark_is_monotonic_and_trails_max_event_time() {
        let mut p = Partition::new();
        assert_eq!(p.windows.watermark(), None);
        p.value(HR, "a", at(10, 30), 1.0);
        assert_eq!(p.windows.watermark(), Some(at(10, 20)));
        p.value(HR, "b", at(10, 5), 1.0);
        assert_eq!(p.windows.watermark(), Some(at(10, 20)));
        p.tick(at(18, 0), true);
        assert_eq!(p.windows.watermark(), Some(at(10, 20)));
        p.value(HR2, "c", at(10, 45), 1.0);
        assert_eq!(p.windows.watermark(), Some(at(10, 35)));
        assert_eq!(p.windows.max_event_time(), Some(at(10, 45)));
    }

    #[test]
    fn test_multiple_series_interleaved_in_one_partition() {
        let mut p = Partition::new();
        for minute in (0..60).step_by(10) {
            p.value(
                HR,
                &format!("hr-{minute}"),
                at(10, minute),
                60.0 + minute as f64,
            );
            p.value(STEPS, &format!("st-{minute}"), at(10, minute + 1), 10.0);
            p.value(HR2, &format!("h2-{minute}"), at(10, minute + 2), 90.0);
        }
        p.value(HR2, "h2-late", at(11, 1), 91.0);
        assert_eq!(p.windows.open_windows(), 4);
        assert_eq!(p.windows.held_samples(), 19);
        // One series' data moves the partition watermark for all of them.
        let closed = p.value(HR2, "h2-next", at(11, 10), 92.0);
        assert_eq!(
            ids(&closed),
            [
                aggregate_id(HR, at(10, 0)),
                aggregate_id(STEPS, at(10, 0)),
                aggregate_id(HR2, at(10, 0)),
            ]
        );
        let stats: Vec<(&str, i64, f64)> = closed
            .iter()
            .map(|a| (a.series_key.as_str(), a.count, a.sum))
            .collect();
        assert_eq!(stats, [(HR, 6, 510.0), (STEPS, 6, 60.0), (HR2, 6, 540.0)]);
        assert_eq!(closed[1].data_type, "steps");
        assert_eq!(p.windows.open_windows(), 1);
    }

    #[test]
    fn test_aggregates_closed_together_are_sorted_by_hour_then_series() {
        let mut p = Partition::new();
        p.value(STEPS, "s10", at(10, 10), 1.0);
        p.value(HR2, "b11", at(11, 5), 1.0);
        p.value(HR, "a10", at(10, 58), 1.0);
        p.value(HR, "a11", at(11, 6), 1.0);
        let closed = p.value(STEPS, "s12", at(12, 30), 1.0);
        assert_eq!(
            ids(&closed),
            [
                aggregate_id(HR, at(10, 0)),
                aggregate_id(STEPS, at(10, 0)),
                aggregate_id(HR, at(11, 0)),
                aggregate_id(HR2, at(11, 0)),
            ]
        );
    }

    #[test]
    fn test_closed_windows_are_dropped() {
        let mut p = Partition::new();
        for minute in 0..30 {
            p.value(HR, &format!("a{minute}"), at(10, minute), 1.0);
            p.value(HR2, &format!("b{minute}"), at(10, minute), 1.0);
        }
        assert_eq!(
            (p.windows.open_windows(), p.windows.held_samples()),
            (2, 60)
        );
        assert_eq!(p.value(HR, "next", at(11, 10), 1.0).len(), 2);
        assert_eq!((p.windows.open_windows(), p.windows.held_samples()), (1, 1));
        p.tick(at(11, 11), false);
        assert_eq!(p.tick(at(12, 5), true).len(), 1);
        assert_eq!(
            p.windows.stats(),
            WindowStats {
                emitted_aggregates: 3,
                ..WindowStats::default()
            }
        );
    }

    /// A deterministic pseudo-random generator (PCG-style LCG) for shuffles and sequences.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                items.swap(i, j);
            }
        }
    }

    #[test]
    fn test_statistics_do_not_depend_on_arrival_order_or_batch_split() {
        // Values whose floating-point sum depends on the order of addition, three samples
        // (from different devices) per timestamp, so ties are broken by measurement id.
        let values = [
            1e16, 1.0, -1e16, 1.0, 0.1, 0.2, 0.3, 1e-3, 7.0, -2.5, 1e16, 3.0,
        ];
        let samples: Vec<Measurement> = (0..values.len())
            .map(|i| {
                let ts = at(10, 5 * (i / 3) as i64);
                let mut m = measurement(HR, &format!("m{i:02}"), ts, values[i]);
                m.device = Some(device(&format!("d{i}")));
                m
            })
            .collect();
        let closer = measurement(HR2, "closer", at(12, 0), 0.0);
        let aggregate_of = |order: &[usize], rng: &mut Lcg, by_tick: bool| {
            let mut w = PartitionWindows::new(config());
            let mut offset = 0;
            for &i in order {
                w.on_sample(offset, &samples[i]).unwrap();
                offset += 1;
                if rng.below(3) == 0 {
                    // A batch boundary: the poll loop ticks between batches.
                    w.on_tick(at(10, 30), false);
                }
            }
            let closed = if by_tick {
                w.on_tick(at(11, 0), false);
                w.on_tick(at(11, 5), true)
            } else {
                w.on_sample(offset, &closer).unwrap()
            };
            assert_eq!(closed.len(), 1);
            closed[0].clone()
        };
        let mut rng = Lcg(7);
        let in_order: Vec<usize> = (0..values.len()).collect();
        let reference = aggregate_of(&in_order, &mut rng, false);
        assert_eq!(reference.count, values.len() as i64);
        // Index order is (effective_start, measurement_id) order.
        assert_eq!(
            reference.sum.to_bits(),
            values.iter().sum::<f64>().to_bits()
        );
        assert_eq!(reference.device, Some(device("d11")));
        assert_eq!(reference, aggregate_of(&in_order, &mut rng, true));
        let mut order_sensitive = 0;
        for _ in 0..50 {
            let mut order = in_order.clone();
            rng.shuffle(&mut order);
            let naive: f64 = order.iter().map(|&i| values[i]).sum();
            if naive.to_bits() != reference.sum.to_bits() {
                order_sensitive += 1;
            }
            let by_tick = rng.below(2) == 0;
            assert_eq!(
                aggregate_of(&order, &mut rng, by_tick),
                reference,
                "order {order:?}"
            );
        }
        assert!(
            order_sensitive > 0,
            "the values do not exercise summation order"
        );
    }

    #[derive(Debug, Clone)]
    enum Event {
        Sample(i64, Box<Measurement>),
        Tick(i64, bool),
    }

    /// Runs `events` and returns the emitted aggregates tagged with their event's index.
    fn run(
        windows: &mut PartitionWindows,
        events: &[Event],
        first_index: usize,
    ) -> Vec<(usize, HourlyAggregate)> {
        let mut out = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let closed = match event {
                Event::Sample(offset, m) => windows.on_sample(*offset, m).unwrap_or_default(),
                Event::Tick(now, caught_up) => windows.on_tick(*now, *caught_up),
            };
            out.extend(closed.into_iter().map(|a| (first_index + i, a)));
        }
        out
    }

    /// Returns the aggregates by id, the last emitted winning (what the EHR ends up with).
    fn last_wins<'a>(
        emitted: impl IntoIterator<Item = &'a (usize, HourlyAggregate)>,
    ) -> BTreeMap<String, HourlyAggregate> {
        emitted
            .into_iter()
            .map(|(_, a)| (a.aggregate_id.clone(), a.clone()))
            .collect()
    }

    /// Crashes after every prefix of `events`, restarts a fresh state at the commit point
    /// (resumed with its event time if `resume`), replays and compares with a straight run.
    /// With `resume` the replay must emit exactly what the straight run emitted after the
    /// crash; without, the final aggregate of every id must match. Returns how many crash
    /// points committed below the next offset (windows held).
    fn assert_restart_equivalent(events: &[Event], resume: bool) -> usize {
        let straight = run(&mut PartitionWindows::new(config()), events, 0);
        let offset_of = |e: &Event| match e {
            Event::Sample(offset, _) => Some(*offset),
            Event::Tick(..) => None,
        };
        let first_offset = events.iter().find_map(offset_of).unwrap();
        let mut held = 0;
        for crash in 0..=events.len() {
            let mut before_crash = PartitionWindows::new(config());
            let emitted = run(&mut before_crash, &events[..crash], 0);
            let next = events[..crash]
                .iter()
                .filter_map(offset_of)
                .max()
                .map_or(first_offset, |last| last + 1);
            let point = before_crash.commit_point(next);
            assert_eq!(before_crash.commit_offset(next), point.offset);
            assert!(point.offset <= next);
            if point.offset < next {
                held += 1;
            }
            // Re-read from the committed offset; ticks after the last record before it too.
            let start = events
                .iter()
                .rposition(|e| offset_of(e).is_some_and(|o| o < point.offset))
                .map_or(0, |i| i + 1);
            let mut restarted = if resume {
                PartitionWindows::resume(config(), point.max_event_time)
            } else {
                PartitionWindows::new(config())
            };
            let replayed = run(&mut restarted, &events[start..], start);
            assert_eq!(
                last_wins(emitted.iter().chain(&replayed)),
                last_wins(&straight),
                "crash after {crash} events, restart at offset {}",
                point.offset
            );
            if resume {
                let after = |out: &[(usize, HourlyAggregate)]| -> Vec<(usize, HourlyAggregate)> {
                    out.iter().filter(|(i, _)| *i >= crash).cloned().collect()
                };
                assert_eq!(
                    after(&replayed),
                    after(&straight),
                    "crash after {crash} events"
                );
                for item in replayed.iter().filter(|(i, _)| *i < crash) {
                    assert!(
                        straight.contains(item),
                        "crash after {crash}: extra {item:?}"
                    );
                }
            }
        }
        held
    }

    /// Live data of three series over five hours, in time order, with a redelivery, a
    /// whole-hour re-fetch of hours 10 and 11 of HR (with a corrected and a new sample) in
    /// the middle of hour 12, ticks, and a final idle close.
    fn in_order_events() -> Vec<Event> {
        let mut live: Vec<Measurement> = Vec::new();
        for (series, step, base) in [(HR, 7, 60.0), (HR2, 11, 80.0), (STEPS, 15, 0.0)] {
            let mut minute = 0;
            while minute < 5 * 60 {
                let value = base + (minute % 13) as f64;
                live.push(measurement(
                    series,
                    &format!("{series}-{minute}"),
                    at(10, minute),
                    value,
                ));
                minute += step;
            }
        }
        live.sort_by_key(|m| (m.effective_start, m.measurement_id.clone()));
        let mut events = Vec::new();
        let mut offset = 1_000;
        let mut push = |events: &mut Vec<Event>, m: Measurement| {
            events.push(Event::Sample(offset, Box::new(m)));
            offset += 1;
        };
        for m in &live {
            let ts = m.effective_start;
            push(&mut events, m.clone());
            if ts.rem_euclid(20 * MIN) == 0 {
                events.push(Event::Tick(ts + 30 * SEC, false));
            }
            if ts == at(11, 3) {
                // A redelivery.
                push(&mut events, m.clone());
            }
            if ts == at(12, 34) && m.series_key == HR {
                let mut refetch: Vec<Measurement> = live
                    .iter()
                    .filter(|r| r.series_key == HR && r.effective_start <= ts)
                    .cloned()
                    .collect();
                refetch[2].components[0].value += 5.0;
                refetch.push(measurement(HR, "hr-new", at(11, 30), 99.0));
                refetch.sort_by_key(|m| (m.effective_start, m.measurement_id.clone()));
                for mut r in refetch {
                    r.context = context("sync-refetch");
                    push(&mut events, r);
                }
            }
        }
        events.push(Event::Tick(at(15, 1), false));
        events.push(Event::Tick(at(15, 10), true));
        events
    }

    #[test]
    fn test_restart_from_commit_offset_reproduces_aggregates_of_an_in_order_stream() {
        let events = in_order_events();
        let straight = run(&mut PartitionWindows::new(config()), &events, 0);
        // 3 series x 5 hours, plus the revisions of hours 10 and 11 of HR.
        assert_eq!(last_wins(&straight).len(), 15);
        assert_eq!(straight.len(), 17);
        assert!(assert_restart_equivalent(&events, false) > events.len() / 2);
    }

    #[test]
    fn test_restart_from_commit_point_reproduces_exact_emissions() {
        let events = in_order_events();
        assert!(assert_restart_equivalent(&events, true) > events.len() / 2);
    }

    /// HR's hours 10 and 11, HR2's hour 13 closed idle, then a re-fetch of HR's hours 10
    /// and 11 interleaved with HR2's live data of hour 14.
    fn interleaved_refetch_events() -> Vec<Event> {
        let mut events = Vec::new();
        let mut offset = 0;
        let mut push = |events: &mut Vec<Event>, series: &str, id: &str, ts: i64, value: f64| {
            events.push(Event::Sample(
                offset,
                Box::new(measurement(series, id, ts, value)),
            ));
            offset += 1;
        };
        for minute in (0..120).step_by(10) {
            push(
                &mut events,
                HR,
                &format!("hr-{minute}"),
                at(10, minute),
                60.0,
            );
        }
        push(&mut events, HR2, "live-0", at(13, 0), 80.0);
        events.push(Event::Tick(at(13, 1), true));
        events.push(Event::Tick(at(14, 6), true));
        for minute in (0..130).step_by(10) {
            push(
                &mut events,
                HR,
                &format!("hr-{minute}"),
                at(10, minute),
                61.0,
            );
            push(
                &mut events,
                HR2,
                &format!("live-{minute}"),
                at(14, 6) + minute * SEC,
                80.0,
            );
        }
        events.push(Event::Tick(at(14, 10), true));
        events.push(Event::Tick(at(15, 20), true));
        events
    }

    #[test]
    fn test_restart_from_commit_point_survives_refetch_interleaved_with_newer_data() {
        let events = interleaved_refetch_events();
        let straight = run(&mut PartitionWindows::new(config()), &events, 0);
        let hour_10 = &last_wins(&straight)[&aggregate_id(HR, at(10, 0))];
        assert_eq!((hour_10.count, hour_10.sum), (6, 366.0));
        assert!(assert_restart_equivalent(&events, true) > 0);
    }

    #[test]
    fn test_restart_without_event_time_splits_refetch_interleaved_with_newer_data() {
        // Why the commit point carries the event time: restarted at the re-fetch without it,
        // hour 10 is first a regular window, closed early by HR2's newer data.
        let events = interleaved_refetch_events();
        let straight = last_wins(&run(&mut PartitionWindows::new(config()), &events, 0));
        let refetch_start = events
            .iter()
            .rposition(|e| matches!(e, Event::Tick(now, _) if *now == at(14, 6)))
            .unwrap()
            + 1;
        let mut prefix = PartitionWindows::new(config());
        run(&mut prefix, &events[..refetch_start], 0);
        let Some(Event::Sample(first_refetched, _)) = events.get(refetch_start) else {
            panic!("no sample after the tick");
        };
        let point = prefix.commit_point(*first_refetched);
        assert_eq!(point.offset, *first_refetched);
        let replay = |mut windows: PartitionWindows| {
            last_wins(&run(&mut windows, &events[refetch_start..], refetch_start))
        };
        let id = aggregate_id(HR, at(10, 0));
        let resumed = replay(PartitionWindows::resume(config(), point.max_event_time));
        assert_eq!(resumed[&id], straight[&id]);
        let fresh = replay(PartitionWindows::new(config()));
        assert!(fresh[&id].count < straight[&id].count);
    }

    /// Returns a random sequence: live samples with jitter beyond the allowed lateness,
    /// redeliveries, corrected values and times, whole-hour re-fetches, invalid records and
    /// ticks.
    fn random_events(seed: u64, len: usize) -> Vec<Event> {
        let mut rng = Lcg(seed);
        let series = [HR, HR2, STEPS];
        let mut latest: BTreeMap<String, Measurement> = BTreeMap::new();
        let mut events = Vec::new();
        let mut offset = 500;
        let mut clock = at(10, 0);
        let mut sample = |events: &mut Vec<Event>, mut m: Measurement| {
            m.context = context(&format!("sync-{offset}"));
            events.push(Event::Sample(offset, Box::new(m)));
            offset += 1;
        };
        while events.len() < len {
            clock += rng.below(4) as i64 * MIN + rng.below(60) as i64 * SEC;
            let known: Vec<Measurement> = latest.values().cloned().collect();
            let pick = |rng: &mut Lcg| known[rng.below(known.len() as u64) as usize].clone();
            let roll = rng.below(100);
            if roll < 50 || known.is_empty() {
                let key = series[rng.below(3) as usize];
                let ts = clock - rng.below(15 * 60) as i64 * SEC;
                let value = rng.below(200) as f64 + rng.below(10) as f64 / 10.0;
                let m = measurement(key, &format!("{key}-{}", events.len()), ts, value);
                latest.insert(m.measurement_id.clone(), m.clone());
                sample(&mut events, m);
            } else if roll < 60 {
                sample(&mut events, pick(&mut rng));
            } else if roll < 66 {
                let mut m = pick(&mut rng);
                m.components[0].value += 1.0;
                latest.insert(m.measurement_id.clone(), m.clone());
                sample(&mut events, m);
            } else if roll < 70 {
                let mut m = pick(&mut rng);
                m.effective_start += rng.below(40) as i64 * MIN - 20 * MIN;
                latest.insert(m.measurement_id.clone(), m.clone());
                sample(&mut events, m);
            } else if roll < 80 {
                // Re-fetch a whole hour of one series, then its next sample.
                let chosen = pick(&mut rng);
                let hour = hour_start(chosen.effective_start);
                let mut refetch: Vec<Measurement> = known
                    .iter()
                    .filter(|m| m.series_key == chosen.series_key)
                    .filter(|m| m.effective_start >= hour)
                    .cloned()
                    .collect();
                refetch.sort_by_key(|m| (m.effective_start, m.measurement_id.clone()));
                for m in refetch {
                    sample(&mut events, m);
                }
            } else if roll < 83 {
                let mut m = pick(&mut rng);
                m.components[0].value = f64::NAN;
                sample(&mut events, m);
            } else {
                events.push(Event::Tick(
                    clock + rng.below(20) as i64 * MIN,
                    rng.below(2) == 0,
                ));
            }
        }
        events
    }

    #[test]
    fn test_restart_from_commit_point_reproduces_exact_emissions_of_random_streams() {
        let mut held = 0;
        let mut late = 0;
        let mut emitted = 0;
        for seed in 1..=12 {
            let events = random_events(seed, 150);
            let mut straight = PartitionWindows::new(config());
            emitted += run(&mut straight, &events, 0).len();
            late += straight.late_samples();
            held += assert_restart_equivalent(&events, true);
        }
        // The sequences exercise what they are meant to.
        assert!(held > 1_000, "held {held}");
        assert!(late > 50, "late {late}");
        assert!(emitted > 100, "emitted {emitted}");
    }
}
