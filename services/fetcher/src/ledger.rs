//! Deletions at the source: which readings a fetch shows deleted, as pure functions.
//!
//! The fetcher keeps, per link, a ledger of the readings it emitted (ids and times, never
//! values; table `measurement_ledger`). A provider answer that lists every record of some data
//! types over a window ([`Coverage`]) makes every ledger row of those data types and that
//! window whose provider record is no longer listed a deleted reading: the fetcher emits its
//! retraction, a Measurement with status `entered-in-error` under the reading's own id, which
//! the fhir-mapper turns into the reading's Observation marked `entered-in-error`. The
//! retraction goes to the reading's series (the same partition, after the reading), so it is
//! mapped, deduplicated and published after it, and its revision (when the deletion was seen)
//! is newer than the reading's, so a replay of the reading never reverts it.

use ohx_common::records::{
    AGGREGATION_INDIVIDUAL, Context, Measurement, STATUS_ENTERED_IN_ERROR, series_key,
};
use ohx_providers::Coverage;
use std::collections::HashSet;

/// One reading the fetcher emitted, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub measurement_id: String,
    pub data_type: String,
    /// The provider's record the reading came from ([`Measurement::provider_group_id`]).
    pub source_id: String,
    pub effective_start: i64,
    pub effective_end: Option<i64>,
    pub utc_offset_seconds: Option<i32>,
    /// The reading's source revision ([`Measurement::provider_modified_at`]).
    pub revision: Option<i64>,
}

/// What the ledger of one link gets once a fetch's outputs are acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerChange {
    /// Readings emitted that a later answer could show deleted (upserted).
    pub record: Vec<LedgerRow>,
    /// Readings retracted (removed: they are never retracted twice).
    pub forget: Vec<String>,
}

impl LedgerChange {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.record.is_empty() && self.forget.is_empty()
    }
}

/// Whether `coverage` speaks for a reading of `data_type` at `at`.
fn covers(coverage: &Coverage, data_type: &str, at: i64) -> bool {
    coverage.data_types.contains(data_type) && coverage.window.0 <= at && at < coverage.window.1
}

/// The readings among `emitted` worth recording: INDIVIDUAL readings of a provider record,
/// of a data type and time some answer of the fetch covers (only those can later be shown
/// deleted). Retractions are not recorded.
#[must_use]
pub fn recordable(emitted: &[Measurement], coverage: &[Coverage]) -> Vec<LedgerRow> {
    emitted
        .iter()
        .filter(|m| m.status.is_none() && m.aggregation == AGGREGATION_INDIVIDUAL)
        .filter(|m| {
            coverage
                .iter()
                .any(|c| covers(c, &m.data_type, m.effective_start))
        })
        .filter_map(|m| {
            Some(LedgerRow {
                measurement_id: m.measurement_id.clone(),
                data_type: m.data_type.clone(),
                source_id: m.provider_group_id.clone()?,
                effective_start: m.effective_start,
                effective_end: m.effective_end,
                utc_offset_seconds: m.utc_offset_seconds,
                revision: m.provider_modified_at,
            })
        })
        .collect()
}

/// The ledger rows `coverage` shows deleted: of a covered data type and time, their provider
/// record no longer listed by any answer of the fetch that covers them, and not emitted
/// again by this fetch.
#[must_use]
pub fn deleted<'a>(
    recorded: &'a [LedgerRow],
    coverage: &[Coverage],
    emitted: &[Measurement],
) -> Vec<&'a LedgerRow> {
    // A backfill emits thousands of intraday samples: the readings are looked up, not scanned.
    let again: HashSet<&str> = emitted
        .iter()
        .filter(|m| m.aggregation == AGGREGATION_INDIVIDUAL)
        .map(|m| m.measurement_id.as_str())
        .collect();
    recorded
        .iter()
        .filter(|row| {
            let mut covering = coverage
                .iter()
                .filter(|c| covers(c, &row.data_type, row.effective_start))
                .peekable();
            covering.peek().is_some() && covering.all(|c| !c.present.contains(&row.source_id))
        })
        .filter(|row| !again.contains(row.measurement_id.as_str()))
        .collect()
}

/// The retraction of a deleted reading: the reading's id, series, data type and time, no
/// components and no device, status `entered-in-error`, and `seen_at` (when the deletion was
/// seen) as its source revision, or just above the reading's should the provider's clock be
/// ahead of ours: a retraction is always newer than what it retracts. `context` is the
/// fetch's: where the patient's data goes now.
#[must_use]
pub fn retraction(row: &LedgerRow, context: &Context, seen_at: i64) -> Measurement {
    Measurement {
        context: context.clone(),
        measurement_id: row.measurement_id.clone(),
        series_key: series_key(&context.patient_id, &context.provider, &row.data_type),
        data_type: row.data_type.clone(),
        aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
        effective_start: row.effective_start,
        effective_end: row.effective_end,
        utc_offset_seconds: row.utc_offset_seconds,
        components: Vec::new(),
        device: None,
        entry_method: None,
        provider_group_id: Some(row.source_id.clone()),
        provider_modified_at: Some(row.revision.map_or(seen_at, |r| seen_at.max(r + 1))),
        fetched_through: None,
        status: Some(STATUS_ENTERED_IN_ERROR.to_owned()),
        waveform: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ohx_common::records::{AGGREGATION_HOURLY, Component};
    use std::collections::BTreeSet;

    const T0: i64 = 1_764_000_000_000;
    const MIN: i64 = 60_000;

    fn ctx() -> Context {
        Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p1".into(),
            patient_reference: "Patient/p1".into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "42".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn reading(data_type: &str, group: &str, at: i64) -> Measurement {
        Measurement {
            context: ctx(),
            measurement_id: format!("withings:42:{group}:{data_type}"),
            series_key: series_key("p1", "withings", data_type),
            data_type: data_type.into(),
            aggregation: AGGREGATION_INDIVIDUAL.into(),
            effective_start: at,
            effective_end: None,
            utc_offset_seconds: Some(3600),
            components: vec![Component {
                code: "value".into(),
                value: 70.0,
                unit: "kg".into(),
                decimals: None,
            }],
            device: None,
            entry_method: Some("device".into()),
            provider_group_id: Some(group.into()),
            provider_modified_at: Some(at),
            fetched_through: None,
            status: None,
            waveform: None,
        }
    }

    fn coverage(types: &[&str], window: (i64, i64), present: &[&str]) -> Coverage {
        Coverage {
            window,
            data_types: types.iter().map(|t| (*t).to_owned()).collect(),
            present: present
                .iter()
                .map(|p| (*p).to_owned())
                .collect::<BTreeSet<_>>(),
        }
    }

    fn rows(ms: &[Measurement]) -> Vec<LedgerRow> {
        recordable(
            ms,
            &[coverage(
                &["body_weight", "blood_pressure"],
                (0, i64::MAX),
                &[],
            )],
        )
    }

    #[test]
    fn test_only_covered_individual_readings_of_a_record_are_recorded() {
        let w = reading("body_weight", "g1", T0);
        let mut hourly = reading("body_weight", "g2", T0);
        hourly.aggregation = AGGREGATION_HOURLY.into();
        let mut no_record = reading("body_weight", "g3", T0);
        no_record.provider_group_id = None;
        let steps = reading("steps", "g4", T0);
        let late = reading("body_weight", "g5", T0 + 60 * MIN);
        let retracted = retraction(&rows(std::slice::from_ref(&w))[0], &ctx(), T0);
        let c = [coverage(&["body_weight"], (T0, T0 + 60 * MIN), &[])];
        let got = recordable(&[w, hourly, no_record, steps, late, retracted], &c);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].source_id, "g1");
        assert_eq!(got[0].utc_offset_seconds, Some(3600));
    }

    #[test]
    fn test_a_record_no_longer_listed_in_a_covering_answer_is_deleted() {
        let recorded = rows(&[
            reading("body_weight", "g1", T0),
            reading("body_weight", "g2", T0 + MIN),
            reading("blood_pressure", "g3", T0 + 2 * MIN),
        ]);
        let c = [coverage(
            &["body_weight", "blood_pressure"],
            (T0, T0 + 10 * MIN),
            &["g1", "g3"],
        )];
        let gone = deleted(&recorded, &c, &[]);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].source_id, "g2");
    }

    #[test]
    fn test_nothing_outside_a_coverage_is_deleted() {
        let recorded = rows(&[
            reading("body_weight", "before", T0 - 1),
            reading("body_weight", "at_end", T0 + 10 * MIN),
            reading("blood_pressure", "other_type", T0 + MIN),
            reading("body_weight", "inside", T0),
        ]);
        // The window's end is exclusive, and blood pressure was not covered.
        let c = [coverage(&["body_weight"], (T0, T0 + 10 * MIN), &[])];
        let gone: Vec<&str> = deleted(&recorded, &c, &[])
            .iter()
            .map(|r| r.source_id.as_str())
            .collect();
        assert_eq!(gone, ["inside"]);
        // No coverage at all: nothing.
        assert!(deleted(&recorded, &[], &[]).is_empty());
    }

    #[test]
    fn test_a_record_listed_by_one_covering_answer_is_not_deleted() {
        let recorded = rows(&[reading("body_weight", "g1", T0)]);
        let c = [
            coverage(&["body_weight"], (T0, T0 + MIN), &[]),
            coverage(&["body_weight"], (T0 - MIN, T0 + MIN), &["g1"]),
        ];
        assert!(deleted(&recorded, &c, &[]).is_empty());
    }

    #[test]
    fn test_a_listed_record_made_into_no_reading_is_not_deleted() {
        // A group held back this time (an ambiguous reading under a new policy) is still the
        // provider's: present, so its earlier reading stays.
        let recorded = rows(&[reading("body_weight", "g1", T0)]);
        let c = [coverage(&["body_weight"], (T0, T0 + MIN), &["g1"])];
        assert!(deleted(&recorded, &c, &[]).is_empty());
    }

    #[test]
    fn test_a_reading_emitted_again_by_the_fetch_is_not_deleted() {
        let w = reading("body_weight", "g1", T0);
        let recorded = rows(std::slice::from_ref(&w));
        let c = [coverage(&["body_weight"], (T0, T0 + MIN), &[])];
        assert!(deleted(&recorded, &c, &[w]).is_empty());
    }

    #[test]
    fn test_a_retraction_is_the_reading_without_values_under_its_id_and_series() {
        let w = reading("blood_pressure", "g3", T0);
        let row = &rows(std::slice::from_ref(&w))[0];
        let seen = T0 + 5 * MIN;
        let r = retraction(row, &ctx(), seen);
        assert_eq!(r.measurement_id, w.measurement_id);
        assert_eq!(r.series_key, w.series_key);
        assert_eq!(r.data_type, w.data_type);
        assert_eq!(
            (r.effective_start, r.effective_end, r.utc_offset_seconds),
            (w.effective_start, w.effective_end, w.utc_offset_seconds)
        );
        assert!(r.components.is_empty() && r.device.is_none());
        assert_eq!(r.status.as_deref(), Some(STATUS_ENTERED_IN_ERROR));
        assert_eq!(r.provider_modified_at, Some(seen));
        assert!(r.provider_modified_at > w.provider_modified_at);
        // The provider's clock ahead of ours: still newer than the reading.
        let mut ahead = row.clone();
        ahead.revision = Some(seen + 60_000);
        assert_eq!(
            retraction(&ahead, &ctx(), seen).provider_modified_at,
            Some(seen + 60_001)
        );
    }
}
