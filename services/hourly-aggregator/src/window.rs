//! The event-time window state machine of the hourly-aggregator: one [`PartitionWindows`] per
//! input partition, fed with measurements and wall-clock ticks, returning the
//! [`HourlyAggregate`]s to produce and the offset that is safe to commit. Pure: no I/O, no
//! Kafka, no clock (the caller passes `now`).
//!
//! # Windows
//! Tumbling one-hour UTC windows per series key; a sample belongs to the hour of its
//! `effective_start` ([`hour_start`]). A window holds its samples by `measurement_id`: a
//! sample whose id it already holds replaces the held one (a redelivery, or a re-fetch with a
//! corrected value), and a sample whose id is held by another open window of its series (the
//! provider corrected its time) is moved. The window's unit is the unit of its first sample;
//! a sample with another unit is rejected, and so is a sample dated more than
//! [`WindowConfig::max_future_skew_ms`] after `now` (a device clock error): it opens no
//! window and closes none.
//!
//! # Closing rules
//! When an hour closes is decided per series, never by another series' data:
//! 1. **Fetch progress.** The fetcher sets `fetched_through = t` on the last record of each
//!    series in one fetch: the provider's data of that series before `t` has been fetched.
//!    After that record's sample is added, every open window of its series with
//!    `hour_end <= t` closes. The progress counts even when the record's sample is rejected
//!    (it is the fetcher's, not the device's), unless `t` itself lies beyond
//!    `now + max_future_skew_ms` (then it is ignored and counted).
//! 2. **Idle.** [`PartitionWindows::on_tick`] with `caught_up` (the caller has seen the end
//!    of the partition since its last record) closes every window with
//!    `now >= max(hour_end, heard) + idle_grace`, where `heard` is the time of the first tick
//!    after the window's latest sample: for series that go quiet, or whose records carry no
//!    progress. The `heard` term keeps a window open while a fetch is still being delivered.
//!
//! A closed window emits one aggregate with the deterministic id [`aggregate_id`]. Its
//! statistics are computed over the samples sorted by (`effective_start`, `measurement_id`),
//! so they do not depend on arrival order; its `revision` is the highest offset of a record
//! that changed the window. Aggregates closed by one call are sorted by (hour, series key).
//! The window is dropped and its hour remembered as emitted (for [`AMENDS_MEMORY_MS`]), with
//! a fingerprint of its aggregate's content: a later sample of that hour (a re-fetch; the
//! fetcher re-fetches whole hours) opens a new window, closed by the same rules, whose
//! aggregate has the same id and a higher `revision` (its records come later in the
//! partition). It has `amends = true` when its content differs from the hour's last
//! emission; a re-fetch that changed nothing (a redelivered webhook) repeats the last
//! emission's `amends`, so its content is identical and nothing new reaches the EHR.
//!
//! # Retries
//! [`PartitionWindows`] is cheap to clone: series and windows are shared and copied on write
//! (a window's samples once per batch that changes them). The stage processes a batch or a
//! tick on clones and keeps them only once the outputs are acknowledged, so a retried batch
//! sees the state it saw the first time, and a dropped change is redone identically.
//!
//! # Restart safety
//! No state store: the input topic is the state. [`PartitionWindows::commit_offset`] returns
//! the lowest offset still held by an open window, lowered to the first offset of an already
//! emitted window whose records lie on both sides of it (so a restart never rebuilds a part of
//! an emitted hour), or `next_offset` when nothing is held. A stage restarted from there
//! rebuilds the open windows from their records; progress travels with the records, so it
//! closes them as the crashed one would have. Two things are not replayed: idle closes follow
//! the wall clock (they rely on the whole-hour re-fetch rule), and hours emitted before the
//! commit point are not remembered, so a revision rebuilt after a restart carries
//! `amends = false` (same id and revision; the deduplicator orders contents by revision).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
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

/// How long an emitted hour is remembered (by hour start, against the tick's wall clock) so
/// that its revisions are marked `amends`: 8 days, the nightly re-fetch's 7 days and a margin.
pub const AMENDS_MEMORY_MS: i64 = 8 * 24 * HOUR_MS;

/// The default [`WindowConfig::max_future_skew_ms`]: 6 hours.
pub const DEFAULT_MAX_FUTURE_SKEW_MS: i64 = 6 * HOUR_MS;

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

/// Tuning of the windows of one partition. Durations are milliseconds and non-negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowConfig {
    /// How long after its hour ended, and after its latest sample, an idle window waits on a
    /// caught-up partition before it closes, e.g. 5 minutes.
    pub idle_grace_ms: i64,
    /// How far after `now` a sample (or a fetch progress) may be dated. A sample beyond is a
    /// device clock error and is rejected. Keep it well below the input's retention (24 h):
    /// a window of a future hour holds the commit point until that hour has passed.
    pub max_future_skew_ms: i64,
}

impl Default for WindowConfig {
    /// Returns 5 minutes of idle grace and [`DEFAULT_MAX_FUTURE_SKEW_MS`].
    fn default() -> Self {
        Self {
            idle_grace_ms: 5 * 60_000,
            max_future_skew_ms: DEFAULT_MAX_FUTURE_SKEW_MS,
        }
    }
}

/// Why a measurement cannot be aggregated; the caller sends it to the dead-letter topic. The
/// sample joins no window.
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
    /// `effective_start` lies more than the allowed skew after the clock. Names the bound,
    /// not the value.
    #[error("effective_start is more than {max_skew_ms} ms ahead of the clock (max future skew)")]
    FutureTimestamp {
        /// The configured [`WindowConfig::max_future_skew_ms`].
        max_skew_ms: i64,
    },
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
            Self::FutureTimestamp { .. } => "future_timestamp",
        }
    }
}

/// Counters of one partition's windows, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Windows currently open.
    pub open_windows: usize,
    /// Open windows of an hour already emitted (their aggregate amends it).
    pub revision_windows: usize,
    /// Samples currently held by open windows.
    pub held_samples: usize,
    /// Accepted samples of an hour already emitted, since creation.
    pub late_samples: u64,
    /// Accepted samples with the id and content of a held one (redeliveries, counted once),
    /// since creation.
    pub duplicate_samples: u64,
    /// Accepted samples that replaced a held one with the same id but other content (value,
    /// time, device or UTC offset), since creation.
    pub replaced_samples: u64,
    /// Aggregates emitted, since creation.
    pub emitted_aggregates: u64,
    /// Fetch progress ignored because it lay beyond the allowed future skew, since creation.
    pub ignored_progress: u64,
}

/// What one record did: the aggregates it closed, and why its sample was rejected (if it was).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleOutcome {
    /// Aggregates of the windows the record's fetch progress closed, sorted by hour.
    pub closed: Vec<HourlyAggregate>,
    /// Why the sample joined no window; send the record to the dead-letter topic.
    pub rejected: Option<WindowError>,
}

/// What an accepted sample did to the samples held for its hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SampleEffect {
    Added,
    Replaced,
    Duplicate,
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

/// The samples of one series in one hour, not yet emitted. Cloning shares the samples.
#[derive(Debug, Clone)]
struct Window {
    /// The hour was emitted before: the aggregate amends it.
    amends: bool,
    data_type: String,
    unit: String,
    /// Context of the most recently received sample.
    context: Context,
    /// Lowest and highest offset of any record that changed this window; the window holds all
    /// offsets in between for the commit rule.
    first_offset: i64,
    last_offset: i64,
    samples: Arc<HashMap<Arc<str>, Sample>>,
    /// The distinct devices of the samples.
    devices: Vec<Arc<Device>>,
    /// Received a sample since the last tick.
    touched: bool,
    /// Time of the first tick after the latest sample.
    heard_at: i64,
}

impl Window {
    /// Returns an empty window opened by the record at `offset`.
    fn new(amends: bool, m: &Measurement, unit: &str, offset: i64) -> Self {
        Self {
            amends,
            data_type: m.data_type.clone(),
            unit: unit.to_owned(),
            context: m.context.clone(),
            first_offset: offset,
            last_offset: offset,
            samples: Arc::new(HashMap::new()),
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
    fn add(&mut self, m: &Measurement, value: f64, offset: i64) -> SampleEffect {
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
        if self.samples.get(m.measurement_id.as_str()) == Some(&sample) {
            return SampleEffect::Duplicate;
        }
        let samples = Arc::make_mut(&mut self.samples);
        match samples.get_mut(m.measurement_id.as_str()) {
            Some(held) => {
                *held = sample;
                SampleEffect::Replaced
            }
            None => {
                samples.insert(Arc::from(m.measurement_id.as_str()), sample);
                SampleEffect::Added
            }
        }
    }

    /// Returns the aggregate of the held samples, `None` if there are none.
    fn aggregate(&self, series_key: &str, hour_start: i64) -> Option<HourlyAggregate> {
        let mut sorted: Vec<(&Arc<str>, &Sample)> = self.samples.iter().collect();
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
            amends: self.amends,
        })
    }
}

/// The open windows of one series, and the hours it emitted recently. Cloning shares the
/// windows.
#[derive(Debug, Clone, Default)]
struct Series {
    /// Open windows by hour start.
    windows: BTreeMap<i64, Arc<Window>>,
    /// Hours emitted within [`AMENDS_MEMORY_MS`], by hour start.
    emitted: BTreeMap<i64, Emitted>,
}

/// What is remembered of an hour's last emission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Emitted {
    /// [`content_fingerprint`] of the aggregate.
    content: u64,
    /// The aggregate's `amends`.
    amends: bool,
}

/// A closed window, ready to be emitted.
struct Closed {
    hour: i64,
    series_key: Arc<str>,
    range: ClosedRange,
    samples: usize,
    aggregate: Option<HourlyAggregate>,
}

impl Series {
    /// Removes the sample `id` from the open windows of other hours than `hour` (its time was
    /// corrected) and returns whether one held it. A window left empty is dropped without
    /// emitting.
    fn remove_from_other_hours(&mut self, id: &str, hour: i64, offset: i64) -> bool {
        let holders: Vec<i64> = self
            .windows
            .iter()
            .filter(|(h, w)| **h != hour && w.samples.contains_key(id))
            .map(|(h, _)| *h)
            .collect();
        for other in &holders {
            if let Some(shared) = self.windows.get_mut(other) {
                let window = Arc::make_mut(shared);
                Arc::make_mut(&mut window.samples).remove(id);
                window.touch(offset);
                if window.samples.is_empty() {
                    self.windows.remove(other);
                }
            }
        }
        !holders.is_empty()
    }

    /// Closes `window` of `hour`: computes its aggregate and remembers the hour as emitted. A
    /// revision whose content equals the hour's last emission keeps that emission's `amends`.
    fn close(&mut self, key: &Arc<str>, hour: i64, window: &Window) -> Closed {
        let mut aggregate = window.aggregate(key, hour);
        if let Some(a) = aggregate.as_mut() {
            let content = content_fingerprint(a);
            if let Some(last) = self.emitted.get(&hour)
                && last.content == content
            {
                a.amends = last.amends;
            }
            self.emitted.insert(
                hour,
                Emitted {
                    content,
                    amends: a.amends,
                },
            );
        }
        Closed {
            hour,
            series_key: Arc::clone(key),
            range: ClosedRange {
                first_offset: window.first_offset,
                last_offset: window.last_offset,
            },
            samples: window.samples.len(),
            aggregate,
        }
    }
}

/// Returns a fingerprint of what an aggregate says about its hour: everything but its
/// context, `revision` and `amends` (the aggregate id, series and hour are the window's).
fn content_fingerprint(a: &HourlyAggregate) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (&a.data_type, &a.unit, a.count).hash(&mut h);
    [a.min, a.max, a.mean, a.sum].map(f64::to_bits).hash(&mut h);
    (a.first_sample_at, a.last_sample_at, a.utc_offset_seconds).hash(&mut h);
    a.device
        .as_ref()
        .map(|d| (&d.device_id, &d.model, &d.model_id, &d.manufacturer))
        .hash(&mut h);
    h.finish()
}

/// Offsets of an emitted window, kept while a commit could split it.
#[derive(Debug, Clone, Copy)]
struct ClosedRange {
    first_offset: i64,
    last_offset: i64,
}

/// The open hourly windows of one input partition (see the module documentation for the
/// rules). Create one per assigned partition; drop it when the partition is revoked. Cheap to
/// clone (copy on write).
#[derive(Debug, Clone)]
pub struct PartitionWindows {
    config: WindowConfig,
    series: BTreeMap<Arc<str>, Arc<Series>>,
    /// Emitted windows that may still straddle the commit point.
    closed: Vec<ClosedRange>,
    /// One past the highest offset passed to `on_sample`.
    next_offset: Option<i64>,
    held_samples: usize,
    late_samples: u64,
    duplicate_samples: u64,
    replaced_samples: u64,
    emitted_aggregates: u64,
    ignored_progress: u64,
}

impl PartitionWindows {
    /// Returns the state of a partition read from its committed offset.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            series: BTreeMap::new(),
            closed: Vec::new(),
            next_offset: None,
            held_samples: 0,
            late_samples: 0,
            duplicate_samples: 0,
            replaced_samples: 0,
            emitted_aggregates: 0,
            ignored_progress: 0,
        }
    }

    /// Adds the sample of the measurement read at `offset` (offsets increase) to its window,
    /// then applies its fetch progress; `now_ms` is the wall clock, for the future-skew bound.
    /// Returns the aggregates of the windows the progress closed (sorted by hour) and why the
    /// sample was rejected, if it was (the offset counts as processed either way).
    pub fn on_sample(&mut self, offset: i64, m: &Measurement, now_ms: i64) -> SampleOutcome {
        let after = offset.saturating_add(1);
        self.next_offset = Some(self.next_offset.map_or(after, |next| next.max(after)));
        let rejected = self.add(offset, m, now_ms).err();
        let limit = now_ms.saturating_add(self.config.max_future_skew_ms);
        let closed = match m.fetched_through {
            Some(through) if through <= limit => self.close_through(&m.series_key, through),
            Some(_) => {
                self.ignored_progress += 1;
                Vec::new()
            }
            None => Vec::new(),
        };
        SampleOutcome { closed, rejected }
    }

    /// Adds the sample of `m` to its window, or returns why it cannot be aggregated.
    fn add(&mut self, offset: i64, m: &Measurement, now_ms: i64) -> Result<(), WindowError> {
        let (value, unit) = validate(m)?;
        let max_skew_ms = self.config.max_future_skew_ms;
        if m.effective_start > now_ms.saturating_add(max_skew_ms) {
            return Err(WindowError::FutureTimestamp { max_skew_ms });
        }
        let start = hour_start(m.effective_start);
        if let Some(window) = self
            .series
            .get(m.series_key.as_str())
            .and_then(|series| series.windows.get(&start))
            && window.unit != unit
        {
            return Err(WindowError::UnitMismatch {
                unit: unit.to_owned(),
                window_unit: window.unit.clone(),
            });
        }
        if !self.series.contains_key(m.series_key.as_str()) {
            self.series
                .insert(Arc::from(m.series_key.as_str()), Arc::default());
        }
        let Some(shared) = self.series.get_mut(m.series_key.as_str()) else {
            return Ok(());
        };
        let series = Arc::make_mut(shared);
        let moved = series.remove_from_other_hours(&m.measurement_id, start, offset);
        let amends = series.emitted.contains_key(&start);
        let window = Arc::make_mut(
            series
                .windows
                .entry(start)
                .or_insert_with(|| Arc::new(Window::new(amends, m, unit, offset))),
        );
        let late = window.amends;
        let mut effect = window.add(m, value, offset);
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
        Ok(())
    }

    /// Closes the open windows of a series whose hour ended at or before `through`.
    fn close_through(&mut self, series_key: &str, through: i64) -> Vec<HourlyAggregate> {
        let Some((key, shared)) = self.series.get_key_value(series_key) else {
            return Vec::new();
        };
        // Hours that end at or before `through` start at or before `through - HOUR_MS`.
        let last_due = through.saturating_sub(HOUR_MS);
        if shared.windows.range(..=last_due).next().is_none() {
            return Vec::new();
        }
        let key = Arc::clone(key);
        let Some(shared) = self.series.get_mut(series_key) else {
            return Vec::new();
        };
        let series = Arc::make_mut(shared);
        let open = series.windows.split_off(&last_due.saturating_add(1));
        let ended = std::mem::replace(&mut series.windows, open);
        let due = ended
            .into_iter()
            .map(|(hour, window)| series.close(&key, hour, &window))
            .collect();
        self.emit(due)
    }

    /// Notes the wall-clock time `now_ms` and, if the partition is `caught_up` (end of
    /// partition seen since the last record), returns the aggregates of the windows with
    /// `now >= max(hour_end, heard) + idle_grace`, `heard` being the time of the first tick
    /// after the window's latest sample. Forgets emitted hours older than
    /// [`AMENDS_MEMORY_MS`]. Call it at a fixed interval shorter than the grace.
    pub fn on_tick(&mut self, now_ms: i64, caught_up: bool) -> Vec<HourlyAggregate> {
        let threshold = now_ms.saturating_sub(self.config.idle_grace_ms);
        let forget_before = now_ms.saturating_sub(AMENDS_MEMORY_MS);
        let is_due = |hour: i64, heard_at: i64| {
            caught_up && hour.saturating_add(HOUR_MS) <= threshold && heard_at <= threshold
        };
        let mut due = Vec::new();
        for (key, shared) in &mut self.series {
            let changes = shared.windows.iter().any(|(hour, w)| {
                let heard_at = if w.touched { now_ms } else { w.heard_at };
                w.touched || is_due(*hour, heard_at)
            }) || shared
                .emitted
                .first_key_value()
                .is_some_and(|(h, _)| *h < forget_before);
            if !changes {
                continue;
            }
            let series = Arc::make_mut(shared);
            for shared_window in series.windows.values_mut() {
                if shared_window.touched {
                    let window = Arc::make_mut(shared_window);
                    window.touched = false;
                    window.heard_at = now_ms;
                }
            }
            let ended: Vec<i64> = series
                .windows
                .iter()
                .filter(|(hour, w)| is_due(**hour, w.heard_at))
                .map(|(hour, _)| *hour)
                .collect();
            for hour in ended {
                if let Some(window) = series.windows.remove(&hour) {
                    due.push(series.close(key, hour, &window));
                }
            }
            series.emitted = series.emitted.split_off(&forget_before);
        }
        self.series
            .retain(|_, series| !series.windows.is_empty() || !series.emitted.is_empty());
        self.emit(due)
    }

    /// Returns the offset that is safe to commit: the lowest first offset of an open window,
    /// lowered to the first offset of any emitted window whose offsets straddle it, or
    /// `next_offset` when none.
    ///
    /// `next_offset` is one past the last offset passed to [`PartitionWindows::on_sample`]
    /// (or skipped by the caller). Commit the result only once every aggregate returned so
    /// far has been acknowledged by the broker.
    pub fn commit_offset(&self, next_offset: i64) -> i64 {
        let mut offset = self
            .open()
            .map(|window| window.first_offset)
            .fold(next_offset, i64::min);
        // Terminates: the offset strictly decreases on every pass that changes it.
        loop {
            let mut lowered = false;
            for range in &self.closed {
                if range.first_offset < offset && offset <= range.last_offset {
                    offset = range.first_offset;
                    lowered = true;
                }
            }
            if !lowered {
                return offset;
            }
        }
    }

    /// Returns the number of open windows.
    pub fn open_windows(&self) -> usize {
        self.series.values().map(|s| s.windows.len()).sum()
    }

    /// Returns the number of samples held by open windows.
    pub fn held_samples(&self) -> usize {
        self.held_samples
    }

    /// Returns the number of late samples (of an hour already emitted) accepted since
    /// creation.
    pub fn late_samples(&self) -> u64 {
        self.late_samples
    }

    /// Returns all counters at once.
    pub fn stats(&self) -> WindowStats {
        WindowStats {
            open_windows: self.open_windows(),
            revision_windows: self.open().filter(|w| w.amends).count(),
            held_samples: self.held_samples,
            late_samples: self.late_samples,
            duplicate_samples: self.duplicate_samples,
            replaced_samples: self.replaced_samples,
            emitted_aggregates: self.emitted_aggregates,
            ignored_progress: self.ignored_progress,
        }
    }

    /// Returns all open windows.
    fn open(&self) -> impl Iterator<Item = &Window> {
        self.series
            .values()
            .flat_map(|series| series.windows.values().map(AsRef::as_ref))
    }

    /// Returns the aggregates of closed windows sorted by (hour, series key) and forgets them
    /// except for their offsets.
    fn emit(&mut self, mut due: Vec<Closed>) -> Vec<HourlyAggregate> {
        if due.is_empty() {
            return Vec::new();
        }
        due.sort_by(|a, b| (a.hour, &a.series_key).cmp(&(b.hour, &b.series_key)));
        let mut out = Vec::with_capacity(due.len());
        for closed in due {
            self.held_samples = self.held_samples.saturating_sub(closed.samples);
            self.closed.push(closed.range);
            out.extend(closed.aggregate);
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
                let floor = self.commit_offset(next);
                self.closed.retain(|range| range.last_offset >= floor);
            }
            None => self.closed.clear(),
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

    /// The wall clock of the tests that do not look at it: long after their samples.
    fn now() -> i64 {
        at(48, 0)
    }

    fn config() -> WindowConfig {
        WindowConfig {
            idle_grace_ms: 5 * MIN,
            max_future_skew_ms: 6 * HOUR_MS,
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
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
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
                decimals: None,
            }],
            device: Some(device("d1")),
            entry_method: Some("device".to_owned()),
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        }
    }

    /// Returns `m` as the last record of its series in a fetch that reached `through`.
    fn last_of_fetch(mut m: Measurement, through: i64) -> Measurement {
        m.fetched_through = Some(through);
        m
    }

    /// What one sample did.
    struct Sent {
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
        fn send(&mut self, m: &Measurement) -> Sent {
            let offset = self.next_offset;
            self.next_offset += 1;
            let before = self.windows.stats();
            let outcome = self.windows.on_sample(offset, m, now());
            assert_eq!(outcome.rejected, None, "rejected");
            let after = self.windows.stats();
            let effect = if after.replaced_samples > before.replaced_samples {
                SampleEffect::Replaced
            } else if after.duplicate_samples > before.duplicate_samples {
                SampleEffect::Duplicate
            } else {
                SampleEffect::Added
            };
            Sent {
                closed: outcome.closed,
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

        /// Sends a sample that ends a fetch of its series through `through`.
        fn last(
            &mut self,
            series_key: &str,
            id: &str,
            ts: i64,
            value: f64,
            through: i64,
        ) -> Vec<HourlyAggregate> {
            let m = last_of_fetch(measurement(series_key, id, ts, value), through);
            self.send(&m).closed
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
        let closed = p.last(HR, "c", at(11, 20), 3.0, at(11, 0));
        assert_eq!(ids(&closed), ["p1/heart_rate/PT1H/2026-03-01T10:00:00Z"]);
        assert_eq!(closed[0].count, 1);
        assert_eq!(closed[0].last_sample_at, at(11, 0) - 1);
        let closed = p.last(HR, "d", at(12, 10), 4.0, at(12, 0));
        assert_eq!(ids(&closed), ["p1/heart_rate/PT1H/2026-03-01T11:00:00Z"]);
        assert_eq!((closed[0].count, closed[0].sum), (2, 5.0));
        assert_eq!(closed[0].first_sample_at, at(11, 0));
    }

    #[test]
    fn test_window_closes_exactly_when_its_series_progress_passes_its_end() {
        let mut p = Partition::new();
        assert!(p.value(HR, "a", at(10, 5), 60.0).is_empty());
        // Later samples alone close nothing, however far they go.
        assert!(p.value(HR, "b", at(10, 30), 80.0).is_empty());
        assert!(p.value(HR, "c", at(13, 10), 70.0).is_empty());
        // Progress one millisecond short of the end.
        assert!(p.last(HR, "d", at(10, 40), 60.0, at(11, 0) - 1).is_empty());
        assert_eq!(p.windows.open_windows(), 2);
        let closed = p.last(HR, "e", at(10, 50), 80.0, at(11, 0));
        assert_eq!(closed.len(), 1);
        let aggregate = &closed[0];
        assert_eq!(aggregate.aggregate_id, aggregate_id(HR, at(10, 0)));
        assert_eq!(
            (aggregate.hour_start, aggregate.hour_end),
            (at(10, 0), at(11, 0))
        );
        // The record that carried the progress is in the hour it closed.
        assert_eq!(
            (aggregate.count, aggregate.sum, aggregate.mean),
            (4, 280.0, 70.0)
        );
        assert!(!aggregate.amends);
        assert_eq!(aggregate.revision, 104);
        assert_eq!(p.windows.open_windows(), 1);
        assert_eq!(p.windows.held_samples(), 1);
        // Progress past several hours closes each of them, sorted by hour.
        p.value(HR, "f", at(11, 10), 1.0);
        let closed = p.last(HR, "g", at(12, 10), 1.0, at(14, 0));
        assert_eq!(
            ids(&closed),
            [
                aggregate_id(HR, at(11, 0)),
                aggregate_id(HR, at(12, 0)),
                aggregate_id(HR, at(13, 0))
            ]
        );
        assert_eq!(p.windows.open_windows(), 0);
    }

    #[test]
    fn test_samples_of_a_later_hour_do_not_make_earlier_samples_late() {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 50), 1.0);
        assert!(p.value(HR, "b", at(11, 5), 2.0).is_empty());
        let outcome = p.send(&measurement(HR, "c", at(10, 58), 3.0));
        assert!(!outcome.late);
        assert!(outcome.closed.is_empty());
        let closed = p.last(HR, "d", at(11, 10), 4.0, at(11, 0));
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].count, closed[0].sum), (2, 4.0));
        assert_eq!(closed[0].last_sample_at, at(10, 58));
        assert_eq!(p.windows.late_samples(), 0);
    }

    #[test]
    fn test_one_series_progress_never_closes_another_series_hour() {
        // Two patients on one partition, interleaved; HR2's device syncs later than HR's.
        let mut p = Partition::new();
        for minute in (0..60).step_by(10) {
            p.value(HR, &format!("hr-{minute}"), at(10, minute), 60.0);
            if minute < 30 {
                p.value(HR2, &format!("h2-{minute}"), at(10, minute + 1), 90.0);
            }
        }
        // HR's fetch has gone far beyond hour 10; HR2's has not reported any progress yet.
        let closed = p.last(HR, "hr-next", at(12, 30), 61.0, at(12, 0));
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert_eq!(p.windows.open_windows(), 2);
        // HR2's next fetch delivers the rest of its hour, later, and only then closes it.
        for minute in (30..60).step_by(10) {
            assert!(
                p.value(HR2, &format!("h2-{minute}"), at(10, minute + 1), 90.0)
                    .is_empty()
            );
        }
        assert!(
            p.last(HR, "hr-more", at(12, 40), 62.0, at(12, 0))
                .is_empty()
        );
        let closed = p.last(HR2, "h2-end", at(10, 59), 90.0, at(11, 0));
        assert_eq!(ids(&closed), [aggregate_id(HR2, at(10, 0))]);
        assert_eq!((closed[0].count, closed[0].amends), (7, false));
        assert_eq!(p.windows.open_windows(), 1);
    }

    #[test]
    fn test_aggregate_statistics_follow_event_time_not_arrival() {
        let mut p = Partition::new();
        let mut latest = measurement(HR, "c", at(10, 40), 3.0);
        latest.utc_offset_seconds = Some(7200);
        latest.device = Some(device("d2"));
        p.send(&latest);
        p.value(HR, "a", at(10, 10), 1.0);
        let mut received_last = last_of_fetch(measurement(HR, "b", at(10, 25), 2.0), at(11, 0));
        received_last.context = context("sync-3");
        let closed = p.send(&received_last).closed;
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
        let closed = p.last(HR, "b", at(11, 10), 1.0, at(11, 0));
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
        let closed = p.last(HR, "c", at(11, 10), 1.0, at(11, 0));
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
        let closed = p.last(HR, "z", at(11, 15), 3.0, at(11, 0));
        assert_eq!((closed[0].count, closed[0].sum), (1, 2.0));

        // Moving the only sample of an hour drops that window without emitting.
        p.value(HR, "q", at(12, 2), 4.0);
        assert_eq!(p.windows.open_windows(), 2);
        let outcome = p.send(&measurement(HR, "q", at(11, 50), 4.0));
        assert!(outcome.closed.is_empty());
        assert_eq!(p.windows.open_windows(), 1);
        let closed = p.last(HR, "w", at(11, 5), 0.0, at(13, 0));
        assert_eq!(ids(&closed), [aggregate_id(HR, at(11, 0))]);
        assert_eq!((closed[0].count, closed[0].sum), (4, 8.0));
        assert_eq!(p.windows.open_windows(), 0);
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
        let future = measurement(HR, "a", now() + 6 * HOUR_MS + 1, 1.0);
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
            (
                future,
                WindowError::FutureTimestamp {
                    max_skew_ms: 6 * HOUR_MS,
                },
                "future_timestamp",
            ),
        ];
        for (offset, (m, error, label)) in (0..).zip(cases) {
            let outcome = p.windows.on_sample(offset, &m, now());
            assert_eq!(outcome.rejected, Some(error.clone()));
            assert!(outcome.closed.is_empty());
            assert_eq!(error.label(), label);
        }
        assert_eq!(p.windows.open_windows(), 0);
        assert_eq!(p.windows.commit_offset(8), 8);

        // The unit is fixed by the hour's first sample; other hours may differ.
        p.value(HR, "a", at(10, 0), 1.0);
        let mut other_unit = measurement(HR, "b", at(10, 5), 5.0);
        other_unit.components[0].unit = "mmol/L".to_owned();
        let error = p.windows.on_sample(200, &other_unit, now()).rejected;
        assert_eq!(
            error,
            Some(WindowError::UnitMismatch {
                unit: "mmol/L".to_owned(),
                window_unit: "/min".to_owned()
            })
        );
        assert_eq!(error.unwrap().label(), "unit_mismatch");
        assert_eq!(p.windows.held_samples(), 1);
        other_unit.effective_start = at(11, 5);
        assert_eq!(p.windows.on_sample(201, &other_unit, now()).rejected, None);
    }

    #[test]
    fn test_future_dated_sample_is_rejected_and_opens_or_closes_nothing() {
        let mut w = PartitionWindows::new(config());
        let clock = at(10, 30);
        w.on_sample(0, &measurement(HR, "a", at(10, 10), 1.0), clock);
        // At the bound: accepted (a device a little ahead of the clock).
        let edge = measurement(HR, "b", clock + 6 * HOUR_MS, 1.0);
        assert_eq!(w.on_sample(1, &edge, clock).rejected, None);
        assert_eq!(w.open_windows(), 2);
        // One millisecond beyond: rejected, names the bound and not the value.
        let year_9999 = last_of_fetch(measurement(HR, "c", MAX_EFFECTIVE_START, 1.0), at(10, 0));
        let beyond = measurement(HR2, "d", clock + 6 * HOUR_MS + 1, 1.0);
        for (offset, m) in [(2, &year_9999), (3, &beyond)] {
            let outcome = w.on_sample(offset, m, clock);
            let error = outcome.rejected.expect("rejected");
            assert_eq!(error.label(), "future_timestamp");
            assert_eq!(
                error.to_string(),
                "effective_start is more than 21600000 ms ahead of the clock (max future skew)"
            );
            assert!(outcome.closed.is_empty());
        }
        assert_eq!(w.open_windows(), 2);
        assert_eq!(w.held_samples(), 2);
        // The same sample is accepted once the clock has caught up with it.
        assert_eq!(w.on_sample(4, &beyond, clock + 1).rejected, None);
        assert_eq!(w.open_windows(), 3);
    }

    #[test]
    fn test_future_progress_is_ignored_and_a_rejected_sample_progress_counts() {
        let mut w = PartitionWindows::new(config());
        let clock = at(10, 30);
        w.on_sample(0, &measurement(HR, "a", at(10, 10), 1.0), clock);
        w.on_sample(1, &measurement(HR, "b", at(9, 10), 1.0), clock);
        // A fetch progress far in the future would close every window of the series.
        let far = last_of_fetch(measurement(HR, "c", at(10, 11), 1.0), MAX_EFFECTIVE_START);
        let outcome = w.on_sample(2, &far, clock);
        assert_eq!(outcome, SampleOutcome::default());
        assert_eq!(w.stats().ignored_progress, 1);
        assert_eq!(w.open_windows(), 2);
        // The fetcher's progress is not the device's value: it counts for an invalid sample.
        let nan = last_of_fetch(measurement(HR, "d", at(10, 12), f64::NAN), at(10, 0));
        let outcome = w.on_sample(3, &nan, clock);
        assert_eq!(outcome.rejected, Some(WindowError::NonFiniteValue));
        assert_eq!(ids(&outcome.closed), [aggregate_id(HR, at(9, 0))]);
        assert_eq!(w.open_windows(), 1);
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
        // A sample of the ended hour arrives at 11:03.
        p.value(HR, "b", at(10, 58), 2.0);
        assert!(p.tick(at(11, 3), true).is_empty());
        assert!(p.tick(at(11, 8) - 1, true).is_empty());
        let closed = p.tick(at(11, 8), true);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 2);
    }

    /// Emits hour 10 of HR with samples a (10:10, 60) and b (10:50, 70) at offsets 100 and
    /// 101, leaving hour 11 open with c (11:15, 80), which carried the progress to 11:00.
    fn partition_with_emitted_hour() -> Partition {
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 10), 60.0);
        p.value(HR, "b", at(10, 50), 70.0);
        let closed = p.last(HR, "c", at(11, 15), 80.0, at(11, 0));
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert_eq!((closed[0].count, closed[0].sum), (2, 130.0));
        assert_eq!((closed[0].revision, closed[0].amends), (101, false));
        p
    }

    #[test]
    fn test_revision_collects_the_refetched_hour_amends_it_with_a_higher_revision() {
        let mut p = partition_with_emitted_hour();
        // The fetcher re-fetches hour 10 (with one new sample) and the hour after it.
        for (id, minute, value) in [("a", 10, 60.0), ("m", 30, 65.0), ("b", 50, 70.0)] {
            let outcome = p.send(&measurement(HR, id, at(10, minute), value));
            assert!(outcome.late);
            assert!(outcome.closed.is_empty(), "closed without progress");
        }
        assert_eq!(p.windows.stats().revision_windows, 1);
        let outcome = p.send(&last_of_fetch(
            measurement(HR, "c", at(11, 15), 80.0),
            at(11, 0),
        ));
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
        assert!(revision.amends);
        assert_eq!(revision.revision, 105);
        assert_eq!(p.windows.stats().revision_windows, 0);
        assert_eq!(p.windows.late_samples(), 3);
        // A second re-fetch amends it again, with a still higher revision.
        let closed = p.last(HR, "a", at(10, 10), 61.0, at(11, 0));
        assert_eq!((closed[0].amends, closed[0].revision), (true, 107));
        assert_eq!(closed[0].count, 1);
    }

    #[test]
    fn test_revision_window_ignores_other_series_progress() {
        let mut p = partition_with_emitted_hour();
        p.value(HR, "a", at(10, 10), 60.0);
        // Another series' progress goes far past hour 10: HR's hours stay open.
        p.value(HR2, "x", at(12, 30), 1.0);
        let closed = p.last(HR2, "y", at(12, 40), 1.0, at(13, 0));
        assert_eq!(ids(&closed), [aggregate_id(HR2, at(12, 0))]);
        assert_eq!(p.windows.stats().revision_windows, 1);
        // A sample of HR still in hour 10 joins the revision.
        assert!(p.value(HR, "b", at(10, 59), 70.0).is_empty());
        let closed = p.last(HR, "d", at(11, 0), 1.0, at(11, 0));
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
        assert_eq!((closed[0].amends, closed[1].amends), (true, false));
        assert_eq!(p.windows.open_windows(), 0);
    }

    #[test]
    fn test_idle_closed_hour_completed_later_is_amended() {
        // A device that syncs late: its hour closes idle, partial; the fetch that brings the
        // rest re-fetches the whole hour and amends it.
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 10), 60.0);
        p.tick(at(10, 11), false);
        let closed = p.tick(at(11, 5), true);
        assert_eq!((closed[0].count, closed[0].amends), (1, false));
        p.value(HR, "a", at(10, 10), 60.0);
        let closed = p.last(HR, "b", at(10, 40), 70.0, at(11, 0));
        assert_eq!((closed[0].count, closed[0].amends), (2, true));
        assert!(closed[0].revision > 100);
    }

    /// Returns `a` without what differs between emissions of one content: the context (it
    /// names the sync request), `revision` and `amends`.
    fn content(a: &HourlyAggregate) -> HourlyAggregate {
        HourlyAggregate {
            context: context("any"),
            revision: 0,
            amends: false,
            ..a.clone()
        }
    }

    #[test]
    fn test_unchanged_refetch_of_an_emitted_hour_repeats_its_content_without_amends() {
        let mut p = partition_with_emitted_hour();
        // A redelivered webhook: the same hour fetched again, by another sync request.
        let mut again = |id: &str, minute: i64, value: f64, through: Option<i64>| {
            let mut m = measurement(HR, id, at(10, minute), value);
            m.context = context("sync-2");
            m.fetched_through = through;
            p.send(&m)
        };
        assert!(again("a", 10, 60.0, None).late);
        let closed = again("b", 50, 70.0, Some(at(11, 0))).closed;
        assert_eq!(ids(&closed), [aggregate_id(HR, at(10, 0))]);
        assert!(!closed[0].amends, "nothing changed, nothing amended");
        assert_eq!((closed[0].count, closed[0].sum), (2, 130.0));
        assert_eq!(
            closed[0].revision, 104,
            "a later revision of the same content"
        );
        assert_eq!(closed[0].context.sync_request_id, "sync-2");
        // The same content as the first emission, which the partition rebuilt from scratch
        // also emits.
        let mut replay = Partition::new();
        replay.value(HR, "a", at(10, 10), 60.0);
        let original = replay.last(HR, "b", at(10, 50), 70.0, at(11, 0));
        assert_eq!(content(&closed[0]), content(&original[0]));
    }

    #[test]
    fn test_unchanged_refetch_of_an_amended_hour_stays_amended() {
        let mut p = partition_with_emitted_hour();
        let amended = p.last(HR, "a", at(10, 10), 61.0, at(11, 0));
        assert_eq!((amended[0].count, amended[0].amends), (1, true));
        let again = p.last(HR, "a", at(10, 10), 61.0, at(11, 0));
        assert_eq!(content(&again[0]), content(&amended[0]));
        assert!(again[0].amends, "went back from amended to final");
        assert!(again[0].revision > amended[0].revision);
        // Back to the original content: a change from the last emission, so an amendment.
        p.value(HR, "a", at(10, 10), 60.0);
        let back = p.last(HR, "b", at(10, 50), 70.0, at(11, 0));
        assert_eq!(
            (back[0].count, back[0].sum, back[0].amends),
            (2, 130.0, true)
        );
    }

    #[test]
    fn test_refetch_that_changes_only_the_device_or_offset_amends() {
        let mut p = partition_with_emitted_hour();
        p.value(HR, "a", at(10, 10), 60.0);
        let mut b = last_of_fetch(measurement(HR, "b", at(10, 50), 70.0), at(11, 0));
        b.device = Some(device("d2"));
        let closed = p.send(&b).closed;
        assert!(closed[0].amends, "another device is another content");
        p.value(HR, "a", at(10, 10), 60.0);
        let mut b = last_of_fetch(measurement(HR, "b", at(10, 50), 70.0), at(11, 0));
        b.device = Some(device("d2"));
        b.utc_offset_seconds = Some(7200);
        let closed = p.send(&b).closed;
        assert!(closed[0].amends, "another UTC offset is another content");
    }

    #[test]
    fn test_emitted_hours_are_forgotten_after_the_amends_memory() {
        let mut p = partition_with_emitted_hour();
        p.tick(at(11, 16), false);
        assert_eq!(ids(&p.tick(at(12, 5), true)), [aggregate_id(HR, at(11, 0))]);
        let emitted = |p: &Partition| -> Vec<i64> {
            p.windows
                .series
                .get(HR)
                .map(|s| s.emitted.keys().copied().collect())
                .unwrap_or_default()
        };
        assert_eq!(emitted(&p), [at(10, 0), at(11, 0)]);
        p.tick(at(10, 0) + AMENDS_MEMORY_MS, true);
        assert_eq!(emitted(&p), [at(10, 0), at(11, 0)]);
        p.tick(at(10, 0) + AMENDS_MEMORY_MS + 1, true);
        assert_eq!(emitted(&p), [at(11, 0)]);
        // A re-fetch of a forgotten hour is emitted without `amends`.
        let closed = p.last(HR, "a", at(10, 10), 60.0, at(11, 0));
        assert!(!closed[0].amends);
        p.tick(at(12, 0) + AMENDS_MEMORY_MS + 1, true);
        assert!(p.windows.series.is_empty(), "series kept without state");
    }

    #[test]
    fn test_late_samples_are_counted() {
        let mut p = partition_with_emitted_hour();
        assert_eq!(p.windows.late_samples(), 0);
        assert!(p.send(&measurement(HR, "a", at(10, 10), 60.0)).late);
        assert!(p.send(&measurement(HR, "a", at(10, 10), 60.0)).late);
        assert!(!p.send(&measurement(HR2, "y", at(9, 0), 1.0)).late);
        assert!(!p.send(&measurement(HR, "e", at(11, 20), 1.0)).late);
        assert_eq!(p.windows.late_samples(), 2);
        assert_eq!(p.windows.stats().late_samples, 2);
        assert_eq!(p.windows.stats().revision_windows, 1);
    }

    #[test]
    fn test_clone_is_a_copy_on_write_snapshot() {
        // The stage works on a clone and keeps it only once the outputs are acknowledged.
        let mut p = Partition::new();
        p.value(HR, "a", at(10, 10), 60.0);
        p.value(HR2, "b", at(10, 20), 70.0);
        let kept = p.windows.clone();
        let close = last_of_fetch(measurement(HR, "c", at(10, 30), 80.0), at(11, 0));
        let mut attempt = kept.clone();
        let first = attempt.on_sample(102, &close, now());
        assert_eq!(first.closed.len(), 1);
        attempt.on_tick(at(12, 0), false);
        assert_eq!(attempt.on_tick(at(12, 10), true).len(), 1);
        assert_eq!(attempt.open_windows(), 0);
        // Not kept: the original is untouched, and a retry closes the same hour identically.
        assert_eq!(kept.open_windows(), 2);
        assert_eq!(kept.held_samples(), 2);
        assert_eq!(kept.commit_offset(103), 100);
        let mut retry = kept.clone();
        assert_eq!(retry.on_sample(102, &close, now()), first);
        assert_eq!(retry.open_windows(), 1);
        // HR2's hour holds 101, inside HR's emitted hour (100..=102).
        assert_eq!(retry.commit_offset(103), 100);
    }

    #[test]
    fn test_commit_offset_is_lowest_offset_held_by_an_open_window() {
        let mut w = PartitionWindows::new(config());
        let send = |w: &mut PartitionWindows, offset: i64, m: Measurement| {
            w.on_sample(offset, &m, now()).closed
        };
        send(&mut w, 100, measurement(HR, "a", at(10, 10), 1.0));
        send(&mut w, 101, measurement(HR2, "b", at(10, 20), 1.0));
        send(&mut w, 102, measurement(HR, "c", at(11, 1), 1.0));
        assert_eq!(w.commit_offset(103), 100);
        let m = last_of_fetch(measurement(HR, "d", at(11, 12), 1.0), at(11, 0));
        assert_eq!(send(&mut w, 103, m).len(), 1);
        assert_eq!(w.commit_offset(104), 101);
        w.on_tick(at(11, 30), false);
        assert_eq!(w.on_tick(at(12, 5), true).len(), 2);
        assert_eq!(w.commit_offset(104), 104);
    }

    #[test]
    fn test_commit_offset_is_next_offset_when_no_window_is_open() {
        let mut w = PartitionWindows::new(config());
        assert_eq!(w.commit_offset(42), 42);
        w.on_sample(42, &measurement(HR, "a", at(10, 10), 1.0), now());
        assert_eq!(w.commit_offset(43), 42);
        w.on_tick(at(10, 11), false);
        assert_eq!(w.on_tick(at(11, 5), true).len(), 1);
        assert_eq!(w.commit_offset(43), 43);
        assert_eq!(w.commit_offset(50), 50);
    }

    #[test]
    fn test_commit_offset_covers_an_emitted_window_straddling_an_open_one() {
        let mut w = PartitionWindows::new(config());
        for (offset, m) in [
            (0, measurement(HR, "a", at(10, 59), 1.0)),
            (1, measurement(HR2, "b", at(11, 1), 2.0)),
        ] {
            w.on_sample(offset, &m, now());
        }
        let m = last_of_fetch(measurement(HR, "c", at(10, 58), 3.0), at(11, 0));
        let closed = w.on_sample(2, &m, now()).closed;
        assert_eq!((closed[0].count, closed[0].sum), (2, 4.0));
        // HR2's hour holds offset 1, but HR's hour 10 (offsets 0 and 2) was emitted:
        // committing 1 would make a restart rebuild hour 10 from offset 2 alone.
        assert_eq!(w.commit_offset(3), 0);
        let mut from_one = PartitionWindows::new(config());
        from_one.on_sample(1, &measurement(HR2, "b", at(11, 1), 2.0), now());
        let partial = from_one.on_sample(2, &m, now()).closed;
        assert_ne!(partial, closed);

        w.on_sample(3, &measurement(HR2, "e", at(12, 11), 5.0), now());
        w.on_sample(
            4,
            &last_of_fetch(measurement(HR2, "f", at(12, 12), 5.0), at(12, 0)),
            now(),
        );
        assert_eq!(w.commit_offset(5), 3);
    }

    #[test]
    fn test_aggregates_closed_together_are_sorted_by_hour_then_series() {
        let mut p = Partition::new();
        p.value(STEPS, "s10", at(10, 10), 1.0);
        p.value(HR2, "b11", at(11, 5), 1.0);
        p.value(HR, "a10", at(10, 58), 1.0);
        p.value(HR, "a11", at(11, 6), 1.0);
        p.tick(at(11, 7), false);
        let closed = p.tick(at(12, 30), true);
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
        assert_eq!(p.last(HR, "next", at(11, 10), 1.0, at(11, 0)).len(), 1);
        assert_eq!(
            (p.windows.open_windows(), p.windows.held_samples()),
            (2, 31)
        );
        p.tick(at(11, 11), false);
        assert_eq!(p.tick(at(12, 5), true).len(), 2);
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
        // The end of the fetch: a sample of the next hour with the progress.
        let closer = last_of_fetch(measurement(HR, "next", at(11, 10), 0.0), at(11, 0));
        let aggregate_of = |order: &[usize], rng: &mut Lcg, by_tick: bool| {
            let mut w = PartitionWindows::new(config());
            let mut offset = 0;
            for &i in order {
                w.on_sample(offset, &samples[i], now());
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
                w.on_sample(offset, &closer, now()).closed
            };
            assert_eq!(closed.len(), 1);
            // The revision is the offset of the last sample, whatever the order.
            assert_eq!(closed[0].revision, values.len() as i64 - 1);
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
                Event::Sample(offset, m) => windows.on_sample(*offset, m, now()).closed,
                Event::Tick(now, caught_up) => windows.on_tick(*now, *caught_up),
            };
            out.extend(closed.into_iter().map(|a| (first_index + i, a)));
        }
        out
    }

    /// Returns the aggregates with `amends` cleared: a restarted stage does not remember the
    /// hours emitted before its commit point.
    fn without_amends(out: &[(usize, HourlyAggregate)]) -> Vec<(usize, HourlyAggregate)> {
        out.iter()
            .map(|(i, a)| {
                let mut a = a.clone();
                a.amends = false;
                (*i, a)
            })
            .collect()
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

    /// Crashes after every prefix of `events`, restarts a fresh state at the commit offset,
    /// replays and compares with a straight run: the replay must emit exactly what the
    /// straight run emitted after the crash (but for `amends`), and re-emit only aggregates
    /// the straight run emitted. Returns how many crash points committed below the next
    /// offset (windows held).
    fn assert_restart_equivalent(events: &[Event]) -> usize {
        let straight = without_amends(&run(&mut PartitionWindows::new(config()), events, 0));
        let offset_of = |e: &Event| match e {
            Event::Sample(offset, _) => Some(*offset),
            Event::Tick(..) => None,
        };
        let first_offset = events.iter().find_map(offset_of).unwrap();
        let mut held = 0;
        for crash in 0..=events.len() {
            let mut before_crash = PartitionWindows::new(config());
            let emitted = without_amends(&run(&mut before_crash, &events[..crash], 0));
            let next = events[..crash]
                .iter()
                .filter_map(offset_of)
                .max()
                .map_or(first_offset, |last| last + 1);
            let commit = before_crash.commit_offset(next);
            assert!(commit <= next);
            if commit < next {
                held += 1;
            }
            // Re-read from the committed offset; ticks after the last record before it too.
            let start = events
                .iter()
                .rposition(|e| offset_of(e).is_some_and(|o| o < commit))
                .map_or(0, |i| i + 1);
            let mut restarted = PartitionWindows::new(config());
            let replayed = without_amends(&run(&mut restarted, &events[start..], start));
            assert_eq!(
                last_wins(emitted.iter().chain(&replayed)),
                last_wins(&straight),
                "crash after {crash} events, restart at offset {commit}"
            );
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
        held
    }

    /// Live data of three series over five hours, in time order, delivered by fetches that
    /// end every 20 minutes (the last record of each series carries the progress, in whole
    /// hours), with a redelivery, a whole-hour re-fetch of hours 10 and 11 of HR (with a
    /// corrected and a new sample) in the middle of hour 12, ticks, and a final idle close.
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
        // The last sample of each series before every 20-minute fetch boundary ends a fetch.
        let fetch = |ts: i64| ts.div_euclid(20 * MIN);
        for i in 0..live.len() {
            let (key, f) = (live[i].series_key.clone(), fetch(live[i].effective_start));
            let more = live[i + 1..]
                .iter()
                .any(|m| m.series_key == key && fetch(m.effective_start) == f);
            if !more {
                live[i].fetched_through = Some(hour_start(live[i].effective_start));
            }
        }
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
                    .filter(|r| r.series_key == HR && r.effective_start < at(12, 0))
                    .cloned()
                    .collect();
                refetch[2].components[0].value += 5.0;
                refetch.push(measurement(HR, "hr-new", at(11, 30), 99.0));
                refetch.sort_by_key(|m| (m.effective_start, m.measurement_id.clone()));
                let last = refetch.len() - 1;
                for (i, mut r) in refetch.into_iter().enumerate() {
                    r.context = context("sync-refetch");
                    r.fetched_through = (i == last).then_some(at(12, 0));
                    push(&mut events, r);
                }
            }
        }
        events.push(Event::Tick(at(15, 1), false));
        events.push(Event::Tick(at(15, 10), true));
        events
    }

    #[test]
    fn test_restart_from_commit_offset_reproduces_exact_emissions_of_an_in_order_stream() {
        let events = in_order_events();
        let straight = run(&mut PartitionWindows::new(config()), &events, 0);
        // 3 series x 5 hours, plus the revisions of hours 10 and 11 of HR.
        assert_eq!(last_wins(&straight).len(), 15);
        assert_eq!(straight.len(), 17);
        let amending: Vec<&str> = straight
            .iter()
            .filter(|(_, a)| a.amends)
            .map(|(_, a)| a.aggregate_id.as_str())
            .collect();
        assert_eq!(
            amending,
            [aggregate_id(HR, at(10, 0)), aggregate_id(HR, at(11, 0))]
        );
        // Only the last hour of each series closes idle; the rest by fetch progress.
        let idle = straight.iter().filter(|(i, _)| *i >= events.len() - 2);
        assert_eq!(idle.count(), 3);
        assert!(assert_restart_equivalent(&events) > events.len() / 2);
    }

    /// HR's hours 10 and 11, HR2's hour 13 closed idle, then a re-fetch of HR's hours 10
    /// and 11 interleaved with HR2's live data of hour 14.
    fn interleaved_refetch_events() -> Vec<Event> {
        let mut events = Vec::new();
        let mut offset = 0;
        let mut push = |events: &mut Vec<Event>, m: Measurement| {
            events.push(Event::Sample(offset, Box::new(m)));
            offset += 1;
        };
        for minute in (0..120).step_by(10) {
            let m = measurement(HR, &format!("hr-{minute}"), at(10, minute), 60.0);
            push(&mut events, m);
        }
        push(&mut events, measurement(HR2, "live-0", at(13, 0), 80.0));
        events.push(Event::Tick(at(13, 1), true));
        events.push(Event::Tick(at(14, 6), true));
        for minute in (0..130).step_by(10) {
            let mut m = measurement(HR, &format!("hr-{minute}"), at(10, minute), 61.0);
            if minute == 120 {
                m.fetched_through = Some(at(12, 0));
            }
            push(&mut events, m);
            let ts = at(14, 6) + minute * SEC;
            push(
                &mut events,
                measurement(HR2, &format!("live-{minute}"), ts, 80.0),
            );
        }
        events.push(Event::Tick(at(14, 10), true));
        events.push(Event::Tick(at(15, 20), true));
        events
    }

    #[test]
    fn test_restart_from_commit_offset_survives_refetch_interleaved_with_newer_data() {
        let events = interleaved_refetch_events();
        let straight = run(&mut PartitionWindows::new(config()), &events, 0);
        let hour_10 = &last_wins(&straight)[&aggregate_id(HR, at(10, 0))];
        assert_eq!(
            (hour_10.count, hour_10.sum, hour_10.amends),
            (6, 366.0, true)
        );
        assert!(assert_restart_equivalent(&events) > 0);
    }

    /// Returns a random sequence: live samples with jitter, fetch progress, redeliveries,
    /// corrected values and times, whole-hour re-fetches, invalid records and ticks.
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
                let mut m = measurement(key, &format!("{key}-{}", events.len()), ts, value);
                latest.insert(m.measurement_id.clone(), m.clone());
                if rng.below(5) == 0 {
                    // The end of a fetch, in whole hours.
                    m.fetched_through = Some(hour_start(clock));
                }
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
                // Re-fetch whole hours of one series, up to the clock's hour.
                let chosen = pick(&mut rng);
                let hour = hour_start(chosen.effective_start);
                let mut refetch: Vec<Measurement> = known
                    .iter()
                    .filter(|m| m.series_key == chosen.series_key)
                    .filter(|m| m.effective_start >= hour)
                    .cloned()
                    .collect();
                refetch.sort_by_key(|m| (m.effective_start, m.measurement_id.clone()));
                if let Some(last) = refetch.last_mut() {
                    last.fetched_through = Some(hour_start(clock));
                }
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
    fn test_restart_from_commit_offset_reproduces_exact_emissions_of_random_streams() {
        let mut held = 0;
        let mut late = 0;
        let mut emitted = 0;
        let mut by_progress = 0;
        for seed in 1..=12 {
            let events = random_events(seed, 150);
            let mut straight = PartitionWindows::new(config());
            let out = run(&mut straight, &events, 0);
            emitted += out.len();
            by_progress += out
                .iter()
                .filter(|(i, _)| matches!(events[*i], Event::Sample(..)))
                .count();
            late += straight.late_samples();
            held += assert_restart_equivalent(&events);
        }
        // The sequences exercise what they are meant to.
        assert!(held > 1_000, "held {held}");
        assert!(late > 50, "late {late}");
        assert!(emitted > 100, "emitted {emitted}");
        assert!(
            by_progress > emitted / 3,
            "closed by progress {by_progress}"
        );
    }
}
