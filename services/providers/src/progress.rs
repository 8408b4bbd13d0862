//! Fetch progress: which part of a series a fetch covered, carried on its last measurement
//! (`fetched_through`) so the hourly-aggregator can close hours by event time. Pure functions,
//! shared by every provider.

use ohx_common::records::Measurement;
use std::collections::HashMap;

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The fetch progress of an hourly series: the widened window's end, but never past the start
/// of the hour now in progress (an unfinished or future hour is not fetched yet, whatever the
/// request said).
pub fn hourly_progress_end(widened_end_ms: i64, now_ms: i64) -> i64 {
    widened_end_ms.min(now_ms - now_ms.rem_euclid(HOUR_MS))
}

/// Orders one fetch's measurements by series and event time, and sets `fetched_through` on
/// the last measurement of each series to the end of the window fetched for it
/// (`progress_end`, by the measurement's source). The series is counted per aggregation
/// policy: a blood-pressure cuff's pulse (INDIVIDUAL) shares the `heart_rate` series key with
/// intraday heart rate (HOURLY), but the aggregator only reads HOURLY measurements, so each
/// policy's last measurement carries the progress of its own source window. A series without
/// any measurement in the fetch carries no progress (there is no record to carry it); the
/// aggregator closes its hours on wall-clock grace instead.
pub fn mark_progress(out: &mut [Measurement], progress_end: impl Fn(&Measurement) -> Option<i64>) {
    out.sort_by(|a, b| {
        (&a.series_key, a.effective_start, &a.measurement_id).cmp(&(
            &b.series_key,
            b.effective_start,
            &b.measurement_id,
        ))
    });
    let mut last: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, m) in out.iter().enumerate() {
        last.insert((m.series_key.as_str(), m.aggregation.as_str()), i);
    }
    let mut idx: Vec<usize> = last.into_values().collect();
    idx.sort_unstable();
    for i in idx {
        out[i].fetched_through = progress_end(&out[i]);
    }
}

/// Widens `[start_ms, end_ms)` to whole UTC hours: `start` floored to its hour, `end` ceiled
/// to the next hour boundary (unchanged when already on one). Used for hourly-aggregated
/// series so that a re-fetch of an hour carries the whole hour.
#[must_use]
pub fn widen_to_hours(start_ms: i64, end_ms: i64) -> (i64, i64) {
    let start = start_ms.saturating_sub(start_ms.rem_euclid(HOUR_MS));
    let rest = end_ms.rem_euclid(HOUR_MS);
    let end = if rest == 0 {
        end_ms
    } else {
        end_ms.saturating_add(HOUR_MS - rest)
    };
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ohx_common::records::{AGGREGATION_HOURLY, Context};

    fn ctx() -> Context {
        Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "1".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn meas(series: &str, aggregation: &str, t: i64) -> Measurement {
        Measurement {
            context: ctx(),
            measurement_id: format!("{series}-{aggregation}-{t}"),
            series_key: series.into(),
            data_type: series.rsplit('/').next().unwrap_or_default().into(),
            aggregation: aggregation.into(),
            effective_start: t,
            effective_end: None,
            utc_offset_seconds: None,
            components: vec![],
            device: None,
            entry_method: None,
            provider_group_id: None,
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        }
    }

    #[test]
    fn test_hourly_progress_end_never_claims_the_current_hour() {
        let h = HOUR_MS;
        // widened end in the past: kept
        assert_eq!(hourly_progress_end(10 * h, 12 * h + 5), 10 * h);
        // widened end past now: the start of the hour in progress
        assert_eq!(hourly_progress_end(13 * h, 12 * h + 5), 12 * h);
        assert_eq!(hourly_progress_end(40 * h, 12 * h), 12 * h);
    }

    #[test]
    fn test_mark_progress_sets_last_of_each_series_in_event_order() {
        use ohx_common::records::AGGREGATION_INDIVIDUAL as IND;
        let h = HOUR_MS;
        let mut out = vec![
            meas("p/blood_pressure", IND, 50),
            meas("p/heart_rate", IND, 300),
            meas("p/heart_rate", AGGREGATION_HOURLY, 200),
            meas("p/blood_pressure", IND, 10),
            meas("p/heart_rate", AGGREGATION_HOURLY, 100),
            meas("p/body_weight", IND, 5),
        ];
        mark_progress(&mut out, |m| {
            Some(if m.aggregation == AGGREGATION_HOURLY {
                3 * h
            } else {
                1_000
            })
        });
        // each series in event-time order
        for w in out.windows(2) {
            if w[0].series_key == w[1].series_key {
                assert!(w[0].effective_start <= w[1].effective_start);
            }
        }
        let marked: Vec<(&str, &str, i64, i64)> = out
            .iter()
            .filter_map(|m| {
                m.fetched_through.map(|f| {
                    (
                        m.series_key.as_str(),
                        m.aggregation.as_str(),
                        m.effective_start,
                        f,
                    )
                })
            })
            .collect();
        assert_eq!(
            marked,
            vec![
                ("p/blood_pressure", IND, 50, 1_000),
                ("p/body_weight", IND, 5, 1_000),
                ("p/heart_rate", AGGREGATION_HOURLY, 200, 3 * h),
                ("p/heart_rate", IND, 300, 1_000),
            ]
        );
    }

    #[test]
    fn test_widen_to_hours_exact_boundaries_unchanged() {
        let h = HOUR_MS;
        assert_eq!(widen_to_hours(10 * h, 12 * h), (10 * h, 12 * h));
        assert_eq!(widen_to_hours(0, h), (0, h));
        assert_eq!(widen_to_hours(5 * h, 5 * h), (5 * h, 5 * h));
    }

    #[test]
    fn test_widen_to_hours_rounds_outwards() {
        let h = HOUR_MS;
        assert_eq!(widen_to_hours(10 * h + 1, 12 * h - 1), (10 * h, 12 * h));
        assert_eq!(widen_to_hours(10 * h - 1, 12 * h + 1), (9 * h, 13 * h));
        assert_eq!(widen_to_hours(10 * h + 1, 10 * h + 2), (10 * h, 11 * h));
        // 2024-04-10 03:40:00.123 UTC → 03:00 .. 04:00.
        assert_eq!(
            widen_to_hours(1_712_720_400_123, 1_712_720_400_124),
            (1_712_718_000_000, 1_712_721_600_000)
        );
    }

    #[test]
    fn test_widen_to_hours_before_epoch_and_extremes() {
        let h = HOUR_MS;
        assert_eq!(widen_to_hours(-1, 1), (-h, h));
        assert_eq!(widen_to_hours(-h, -h), (-h, -h));
        assert_eq!(widen_to_hours(-h - 1, -1), (-2 * h, 0));
        let (s, e) = widen_to_hours(i64::MIN, i64::MAX);
        assert!(s <= i64::MIN + h && e == i64::MAX);
    }
}
