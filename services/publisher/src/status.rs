//! Each target's delivery status as this replica sees it (breaker, fault flag, failures, held
//! records), written to `ehr_target_status` for operators (`ohx targets`) when it changes.
//!
//! Bookkeeping only: nothing reads it back to decide delivery, so a write the database refuses
//! never stops the stage; it is retried with the next change.

use crate::Tracked;
use deadpool_postgres::Pool;
use std::collections::HashMap;

/// A target's status, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub open: bool,
    pub fault: Option<&'static str>,
    pub failures: u32,
    pub held: usize,
    /// No call before this time (ms since the epoch); `None` when calls are allowed any time.
    pub not_before_ms: Option<i64>,
}

/// The status of a target from its breaker and its held records.
pub fn status_of(tracked: &Tracked, held: usize) -> Status {
    let b = &tracked.breaker;
    Status {
        open: b.is_open(),
        fault: b.fault().map(|f| f.as_str()),
        failures: b.failures(),
        held,
        not_before_ms: (b.not_before_ms() > 0).then_some(b.not_before_ms()),
    }
}

/// The statuses in `current` that differ from what was last written.
pub fn changed<'a>(
    written: &HashMap<String, Status>,
    current: &'a HashMap<String, Status>,
) -> Vec<(&'a String, &'a Status)> {
    let mut out: Vec<_> = current
        .iter()
        .filter(|(t, s)| written.get(*t) != Some(*s))
        .collect();
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// Writes the statuses that changed, remembering what the database holds.
#[derive(Debug)]
pub struct StatusWriter {
    instance: String,
    written: HashMap<String, Status>,
    failing: bool,
}

impl StatusWriter {
    /// A writer for this replica (`instance` names it in the table).
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            written: HashMap::new(),
            failing: false,
        }
    }

    /// Upserts the statuses that changed; a failure is logged once and retried next time.
    pub async fn write(&mut self, pool: &Pool, current: &HashMap<String, Status>) {
        let changed = changed(&self.written, current);
        if changed.is_empty() {
            return;
        }
        match self.upsert(pool, &changed).await {
            Ok(()) => {
                for (t, s) in changed {
                    self.written.insert(t.clone(), s.clone());
                }
                self.failing = false;
            }
            Err(error) => {
                if !self.failing {
                    tracing::warn!(%error, "cannot record the EHR targets' status; retried with the next change");
                }
                self.failing = true;
            }
        }
    }

    async fn upsert(&self, pool: &Pool, changed: &[(&String, &Status)]) -> Result<(), String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO ehr_target_status
                   (ehr_target_id, instance, breaker, fault, failures, held, not_before, updated_at)
                 VALUES ($1::text::uuid, $2, $3, $4, $5, $6,
                         to_timestamp($7::bigint / 1000.0), now())
                 ON CONFLICT (ehr_target_id, instance) DO UPDATE SET
                   breaker = EXCLUDED.breaker, fault = EXCLUDED.fault,
                   failures = EXCLUDED.failures, held = EXCLUDED.held,
                   not_before = EXCLUDED.not_before, updated_at = now()",
            )
            .await
            .map_err(|e| ohx_common::db::error_text(&e))?;
        for (target, s) in changed {
            // Only configured targets (uuids) have a row to refer to.
            if uuid::Uuid::parse_str(target).is_err() {
                continue;
            }
            client
                .execute(
                    &stmt,
                    &[
                        target,
                        &self.instance,
                        &if s.open { "open" } else { "closed" },
                        &s.fault,
                        &i32::try_from(s.failures).unwrap_or(i32::MAX),
                        &i32::try_from(s.held).unwrap_or(i32::MAX),
                        &s.not_before_ms,
                    ],
                )
                .await
                .map_err(|e| ohx_common::db::error_text(&e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerSettings, Failure};
    use crate::classify::TargetFault;

    fn tracked(breaker: crate::breaker::Breaker) -> Tracked {
        Tracked {
            breaker,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn test_status_of_a_healthy_target_is_closed_with_no_deadline() {
        let s = status_of(&Tracked::default(), 0);
        assert_eq!(
            s,
            Status {
                open: false,
                fault: None,
                failures: 0,
                held: 0,
                not_before_ms: None
            }
        );
    }

    #[test]
    fn test_status_of_a_refused_target_is_open_flagged_with_its_held_records() {
        let b = crate::breaker::Breaker::default().on_failure(
            1_000,
            Failure::Target(TargetFault::Unauthorized),
            &BreakerSettings::default(),
            0.0,
        );
        let s = status_of(&tracked(b), 7);
        assert!(s.open);
        assert_eq!(s.fault, Some("unauthorized"));
        assert_eq!((s.failures, s.held), (1, 7));
        assert_eq!(
            s.not_before_ms,
            Some(1_000 + BreakerSettings::default().base_ms)
        );
    }

    #[test]
    fn test_a_transient_failure_below_the_threshold_backs_off_closed() {
        let b = crate::breaker::Breaker::default().on_failure(
            1_000,
            Failure::Transient { retry_after: None },
            &BreakerSettings::default(),
            0.0,
        );
        let s = status_of(&tracked(b), 2);
        assert!(!s.open);
        assert_eq!(s.fault, None);
        assert_eq!(s.not_before_ms, Some(2_000));
    }

    #[test]
    fn test_changed_lists_new_and_different_statuses_only() {
        let closed = status_of(&Tracked::default(), 0);
        let held = status_of(&Tracked::default(), 3);
        let written = HashMap::from([
            ("a".to_string(), closed.clone()),
            ("b".into(), closed.clone()),
        ]);
        let current = HashMap::from([
            ("a".to_string(), closed.clone()),
            ("b".into(), held.clone()),
            ("c".into(), closed.clone()),
        ]);
        let got: Vec<&str> = changed(&written, &current)
            .into_iter()
            .map(|(t, _)| t.as_str())
            .collect();
        assert_eq!(got, ["b", "c"]);
        assert!(changed(&current, &current).is_empty());
    }
}
