//! The records the publisher holds back for targets that cannot take them now, and what that
//! allows to commit (pure bookkeeping, unit-tested).
//!
//! # How per-target isolation works
//! A batch mixes the records of every target. Records of a target whose breaker is open, or
//! that has records held already (order per target is kept), or whose delivery just failed at
//! the target level, are **held in memory** while the other targets' records are delivered and
//! their offsets move on. The stage's tick retries held records when the target's breaker
//! allows a probe. [`Ledger::commit_point`] keeps the committed offset of each partition at or
//! below its lowest held record, so nothing held is ever committed past:
//! * after a restart or a rebalance the partition is re-read from there; records delivered
//!   meanwhile are read again and skipped by the server-side hash check (no new versions);
//! * held records are **not** persisted: they live in memory and in the topic. A target down
//!   for longer than the topic's retention (24 h) **loses** the records that retention deletes,
//!   and until then every partition holding its records cannot commit past them (the consumer
//!   lag grows; a restart re-reads from the oldest held record);
//! * memory grows with a down target's traffic: the count is exported as
//!   `ohx_publisher_held_records{target}` and logged.
//!
//! # Following the runtime's contract
//! Held records decide commits, so they are state: `process`/`tick` return a [`LedgerChange`]
//! and [`Ledger::apply`] applies it (idempotently) once the outputs are acknowledged.
//! * A change the runtime drops (a partition of its batch was revoked before the
//!   acknowledgement) is simply forgotten: the runtime acknowledges nothing of that batch and
//!   reads it again, so its held records are re-derived against the unchanged ledger (a
//!   dropped tick only released records: they stay held and the next tick sends them again).
//! * A partition revoked *before* the runtime decides (while the outputs were produced) is left
//!   out of that decision, so its change can still be applied: each change carries the epoch
//!   of the partitions it touches (bumped by [`Ledger::revoked`]) and skips the ones revoked
//!   since, whose records belong to their next owner.
//! * [`Ledger::commit_point`] never passes the lowest held record of a partition; everything
//!   else the runtime acknowledges is accounted for (delivered, dead-lettered or superseded).

use ohx_common::kafka::Input;
use ohx_common::records::FhirResource;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A topic partition.
pub type Tp = (String, i32);

/// A record held for a target.
#[derive(Debug, Clone)]
pub struct Held {
    pub target: String,
    pub input: Arc<Input<FhirResource>>,
}

impl Held {
    /// The record's partition.
    pub fn tp(&self) -> Tp {
        (self.input.topic.clone(), self.input.partition)
    }
}

/// What a batch or tick changes in the ledger.
#[derive(Debug, Clone, Default)]
pub struct LedgerChange {
    /// The epoch of every partition touched, when the change was computed.
    pub epochs: Vec<(Tp, u64)>,
    /// Records to hold.
    pub hold: Vec<Held>,
    /// Held records done with (delivered, dead-lettered, superseded).
    pub release: Vec<(Tp, i64)>,
}

impl LedgerChange {
    fn epoch_of(&self, tp: &Tp) -> Option<u64> {
        self.epochs.iter().find(|(t, _)| t == tp).map(|(_, e)| *e)
    }

    /// Records that it touches a partition at `epoch`.
    pub fn touch(&mut self, tp: &Tp, epoch: u64) {
        if self.epoch_of(tp).is_none() {
            self.epochs.push((tp.clone(), epoch));
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.hold.is_empty() && self.release.is_empty()
    }
}

/// Held records per partition.
#[derive(Debug, Default)]
pub struct Ledger {
    held: BTreeMap<Tp, BTreeMap<i64, Held>>,
    epochs: HashMap<Tp, u64>,
    counts: HashMap<String, usize>,
}

impl Ledger {
    /// The partition's epoch (revokes seen).
    pub fn epoch(&self, tp: &Tp) -> u64 {
        self.epochs.get(tp).copied().unwrap_or(0)
    }

    /// Applies a change to the partitions whose epoch is unchanged (idempotent). Returns how
    /// many of its partitions were skipped because they were revoked since.
    pub fn apply(&mut self, change: &LedgerChange) -> usize {
        let current = |l: &Ledger, tp: &Tp| change.epoch_of(tp) == Some(l.epoch(tp));
        for h in &change.hold {
            let tp = h.tp();
            if current(self, &tp) {
                let slot = self.held.entry(tp).or_default();
                if slot.insert(h.input.offset, h.clone()).is_none() {
                    *self.counts.entry(h.target.clone()).or_default() += 1;
                }
            }
        }
        for (tp, offset) in &change.release {
            if current(self, tp) {
                self.remove(tp, *offset);
            }
        }
        change
            .epochs
            .iter()
            .filter(|(tp, e)| self.epoch(tp) != *e)
            .count()
    }

    fn remove(&mut self, tp: &Tp, offset: i64) {
        let Some(slot) = self.held.get_mut(tp) else {
            return;
        };
        if let Some(h) = slot.remove(&offset)
            && let Some(n) = self.counts.get_mut(&h.target)
        {
            *n = n.saturating_sub(1);
        }
        if slot.is_empty() {
            self.held.remove(tp);
        }
    }

    /// Forgets a revoked partition: its held records are re-read by its next owner, and changes
    /// computed before now no longer apply to it.
    pub fn revoked(&mut self, tp: &Tp) {
        if let Some(slot) = self.held.remove(tp) {
            for h in slot.values() {
                if let Some(n) = self.counts.get_mut(&h.target) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        *self.epochs.entry(tp.clone()).or_default() += 1;
    }

    /// The offset a partition whose acknowledged position is `next` may commit: `next`, or its
    /// lowest held record if that is lower.
    pub fn commit_point(&self, tp: &Tp, next: i64) -> i64 {
        let lowest_held = self
            .held
            .get(tp)
            .and_then(|slot| slot.keys().next().copied())
            .unwrap_or(i64::MAX);
        next.min(lowest_held)
    }

    /// Records held for `target`.
    pub fn held_count(&self, target: &str) -> usize {
        self.counts.get(target).copied().unwrap_or(0)
    }

    /// Held records per target (targets that held some since start, possibly 0 now).
    pub fn counts(&self) -> &HashMap<String, usize> {
        &self.counts
    }

    /// Every record held for `target`, by partition then offset.
    pub fn held_for(&self, target: &str) -> Vec<&Held> {
        self.held
            .values()
            .flat_map(|slot| slot.values())
            .filter(|h| h.target == target)
            .collect()
    }

    /// The targets with held records.
    pub fn targets(&self) -> Vec<String> {
        self.counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ohx_common::records::Context;

    fn tp(p: i32) -> Tp {
        ("ohx.fhir-outbox.v1".to_string(), p)
    }

    pub(crate) fn input(p: i32, offset: i64) -> Arc<Input<FhirResource>> {
        Arc::new(Input {
            topic: "ohx.fhir-outbox.v1".into(),
            partition: p,
            offset,
            key: None,
            value: FhirResource {
                context: Context {
                    organization_id: "o".into(),
                    ehr_target_id: "t".into(),
                    patient_id: "p".into(),
                    patient_reference: "Patient/1".into(),
                    provider: "withings".into(),
                    link_id: "l".into(),
                    provider_user_id: "u".into(),
                    sync_request_id: "s".into(),
                    trigger: "WEBHOOK".into(),
                    received_at: 0,
                    fhir_version: ohx_common::records::FHIR_R5.into(),
                    deliveries: Vec::new(),
                },
                identity: format!("t/Observation/{offset}"),
                resource_type: "Observation".into(),
                resource_id: offset.to_string(),
                resource: "{}".into(),
                source_ids: vec![],
                source_revision: 0,
            },
            payload: vec![],
            headers: vec![],
        })
    }

    fn held(target: &str, p: i32, offset: i64) -> Held {
        Held {
            target: target.into(),
            input: input(p, offset),
        }
    }

    /// A batch of partition `p`, holding `holds` for target "down".
    fn batch(l: &Ledger, p: i32, holds: &[i64]) -> LedgerChange {
        let mut c = LedgerChange::default();
        c.touch(&tp(p), l.epoch(&tp(p)));
        c.hold = holds.iter().map(|o| held("down", p, *o)).collect();
        c
    }

    #[test]
    fn test_commits_stop_at_the_lowest_held_record() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, &[]));
        assert_eq!(l.commit_point(&tp(0), 10), 10);
        l.apply(&batch(&l, 0, &[12, 15]));
        assert_eq!(l.commit_point(&tp(0), 20), 12);
        assert_eq!(l.held_count("down"), 2);
        // Other partitions are not held back.
        l.apply(&batch(&l, 1, &[]));
        assert_eq!(l.commit_point(&tp(1), 7), 7);
    }

    #[test]
    fn test_release_moves_the_commit_point_and_is_idempotent() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, &[12, 15]));
        let mut r = LedgerChange::default();
        r.touch(&tp(0), 0);
        r.release.push((tp(0), 12));
        l.apply(&r);
        l.apply(&r);
        assert_eq!(l.commit_point(&tp(0), 20), 15);
        assert_eq!(l.held_count("down"), 1);
        r.release.push((tp(0), 15));
        l.apply(&r);
        assert_eq!(l.commit_point(&tp(0), 20), 20);
        assert_eq!(l.held_count("down"), 0);
        assert!(l.targets().is_empty());
    }

    #[test]
    fn test_holding_twice_counts_once() {
        let mut l = Ledger::default();
        let c = batch(&l, 0, &[12]);
        l.apply(&c);
        l.apply(&c);
        assert_eq!(l.held_count("down"), 1);
        assert_eq!(l.held_for("down").len(), 1);
        assert!(l.held_for("up").is_empty());
    }

    #[test]
    fn test_a_change_computed_before_a_revoke_does_not_apply_to_that_partition() {
        let mut l = Ledger::default();
        let c = batch(&l, 0, &[12]);
        l.revoked(&tp(0));
        assert_eq!(l.apply(&c), 1);
        assert_eq!(l.held_count("down"), 0);
    }

    #[test]
    fn test_revoked_partition_forgets_its_held_records_and_the_new_epoch_holds_them_again() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, &[12]));
        l.revoked(&tp(0));
        assert_eq!(l.held_count("down"), 0);
        // Nothing held: the runtime acknowledges only batches of the new assignment.
        assert_eq!(l.commit_point(&tp(0), 20), 20);
        // The new epoch re-reads from 12 and holds it again.
        l.apply(&batch(&l, 0, &[12]));
        assert_eq!(l.held_count("down"), 1);
        assert_eq!(l.commit_point(&tp(0), 20), 12);
        let mut r = LedgerChange::default();
        r.touch(&tp(0), l.epoch(&tp(0)));
        r.release.push((tp(0), 12));
        l.apply(&r);
        assert_eq!(l.commit_point(&tp(0), 20), 20);
        assert_eq!(l.held_count("down"), 0);
    }

    #[test]
    fn test_never_processed_partition_commits_what_is_acknowledged() {
        let l = Ledger::default();
        assert_eq!(l.commit_point(&tp(3), 42), 42);
    }
}
