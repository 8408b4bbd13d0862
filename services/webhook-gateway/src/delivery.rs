//! Delivery status: the gateway consumes `ohx.publish-results.v1` and keeps the last outcome
//! of every resource per EHR target in `delivery_results`, which the REST API sums up per
//! patient and target. Rows are written before offsets are committed, and an older result
//! never replaces a newer one, so replays and rebalances count nothing twice.

use deadpool_postgres::Pool;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::PublishResult;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long delivery results are kept.
pub const KEEP_DAYS: i32 = 30;

/// Outcomes that count as delivered (`stale`: the server already holds newer content).
pub const DELIVERED: &[&str] = &["created", "updated", "unchanged", "stale"];

/// One row of `delivery_results`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRow {
    pub ehr_target_id: Uuid,
    pub identity: String,
    pub organization_id: Uuid,
    pub patient_id: Uuid,
    pub resource_type: String,
    pub outcome: String,
    pub http_status: i32,
    pub confirmed_at_ms: i64,
}

/// The rows of a batch: the latest result per (target, identity); results whose ids are not
/// UUIDs are left out (counted by the caller). Pure.
pub fn rows(batch: &[PublishResult]) -> (Vec<ResultRow>, usize) {
    let mut latest: std::collections::BTreeMap<(Uuid, String), ResultRow> = Default::default();
    let mut skipped = 0;
    for r in batch {
        let ids = (
            Uuid::parse_str(&r.ehr_target_id),
            Uuid::parse_str(&r.organization_id),
            Uuid::parse_str(&r.patient_id),
        );
        let (Ok(target), Ok(org), Ok(patient)) = ids else {
            skipped += 1;
            continue;
        };
        let row = ResultRow {
            ehr_target_id: target,
            identity: r.identity.clone(),
            organization_id: org,
            patient_id: patient,
            resource_type: r.resource_type.clone(),
            outcome: r.outcome.clone(),
            http_status: r.http_status,
            confirmed_at_ms: r.confirmed_at,
        };
        let key = (target, r.identity.clone());
        if latest
            .get(&key)
            .is_none_or(|old| old.confirmed_at_ms <= row.confirmed_at_ms)
        {
            latest.insert(key, row);
        }
    }
    (latest.into_values().collect(), skipped)
}

const UPSERT: &str = "INSERT INTO delivery_results (ehr_target_id, identity, organization_id, \
     patient_id, resource_type, outcome, http_status, confirmed_at) \
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], \
     $7::int[], $8::timestamptz[]) \
     ON CONFLICT (ehr_target_id, identity) DO UPDATE SET outcome = EXCLUDED.outcome, \
     http_status = EXCLUDED.http_status, confirmed_at = EXCLUDED.confirmed_at, \
     resource_type = EXCLUDED.resource_type, patient_id = EXCLUDED.patient_id, \
     organization_id = EXCLUDED.organization_id \
     WHERE delivery_results.confirmed_at <= EXCLUDED.confirmed_at";

/// The consumer of publish results.
pub struct DeliveryStatus {
    pool: Pool,
    last_prune: Option<Instant>,
}

impl DeliveryStatus {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            last_prune: None,
        }
    }
}

fn transient(e: impl std::fmt::Display) -> StageError {
    StageError::transient("database", e)
}

impl Processor for DeliveryStatus {
    type In = PublishResult;
    type Change = Vec<ResultRow>;

    async fn process(
        &mut self,
        batch: &[Input<PublishResult>],
        _out: &mut Emitter,
    ) -> Result<Vec<ResultRow>, StageError> {
        let values: Vec<PublishResult> = batch.iter().map(|i| i.value.clone()).collect();
        let (rows, skipped) = rows(&values);
        if skipped > 0 {
            tracing::warn!(skipped, "publish results without UUID ids left out");
        }
        Ok(rows)
    }

    async fn apply(&mut self, change: &Vec<ResultRow>) -> Result<(), StageError> {
        let client = self.pool.get().await.map_err(transient)?;
        if !change.is_empty() {
            let col = |f: fn(&ResultRow) -> Uuid| change.iter().map(f).collect::<Vec<_>>();
            let text = |f: fn(&ResultRow) -> &str| {
                change.iter().map(|r| f(r).to_owned()).collect::<Vec<_>>()
            };
            let times: Vec<chrono::DateTime<chrono::Utc>> = change
                .iter()
                .map(|r| {
                    chrono::DateTime::from_timestamp_millis(r.confirmed_at_ms).unwrap_or_default()
                })
                .collect();
            let statuses: Vec<i32> = change.iter().map(|r| r.http_status).collect();
            client
                .execute(
                    UPSERT,
                    &[
                        &col(|r| r.ehr_target_id),
                        &text(|r| &r.identity),
                        &col(|r| r.organization_id),
                        &col(|r| r.patient_id),
                        &text(|r| &r.resource_type),
                        &text(|r| &r.outcome),
                        &statuses,
                        &times,
                    ],
                )
                .await
                .map_err(|e| transient(ohx_common::db::error_text(&e)))?;
        }
        if self
            .last_prune
            .is_none_or(|t| t.elapsed() > Duration::from_secs(600))
        {
            client
                .execute(
                    "DELETE FROM delivery_results \
                     WHERE confirmed_at < now() - make_interval(days => $1)",
                    &[&KEEP_DAYS],
                )
                .await
                .map_err(|e| transient(ohx_common::db::error_text(&e)))?;
            self.last_prune = Some(Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn result(identity: &str, outcome: &str, at: i64, target: &str) -> PublishResult {
        PublishResult {
            identity: identity.into(),
            organization_id: "0b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d".into(),
            ehr_target_id: target.into(),
            patient_id: "1b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d".into(),
            link_id: "l".into(),
            sync_request_id: "s".into(),
            resource_type: "Observation".into(),
            resource_id: "o".into(),
            outcome: outcome.into(),
            http_status: 201,
            version_id: None,
            received_at: 0,
            confirmed_at: at,
        }
    }

    const T1: &str = "2b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d";
    const T2: &str = "3b4c4a4e-53a4-4d8e-9b1e-1d2f3a4b5c6d";

    #[test]
    fn test_the_latest_result_per_target_and_identity_wins_within_a_batch() {
        let (rows, skipped) = rows(&[
            result("a", "created", 2, T1),
            result("a", "rejected", 1, T1),
            result("a", "updated", 3, T2),
            result("b", "rejected", 5, T1),
        ]);
        assert_eq!(skipped, 0);
        let got: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.identity.as_str(), r.outcome.as_str()))
            .collect();
        assert_eq!(got, [("a", "created"), ("b", "rejected"), ("a", "updated")]);
    }

    #[test]
    fn test_results_with_malformed_ids_are_left_out() {
        let (rows, skipped) = rows(&[result("a", "created", 1, "not-a-uuid")]);
        assert!(rows.is_empty());
        assert_eq!(skipped, 1);
    }
}
