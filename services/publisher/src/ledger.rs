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
//! Held records decide commits, so they are state: `process`/`tick` compute a [`LedgerChange`]
//! and [`Ledger::apply`] applies it once the outputs are acknowledged. Each change carries the
//! *epoch* of every partition it touches (bumped on each revoke), and only applies to
//! partitions whose epoch is unchanged: a revoked partition is re-read by its next owner from
//! its committed offset. A change the runtime dropped (because another partition of the batch
//! was revoked) must not lose the holds of partitions still owned, whose offsets the runtime
//! acknowledges anyway: the publisher keeps the last unapplied change, limits commits by it
//! ([`LedgerChange::commit_limit`]) and applies it before its next batch or tick.
//! `covered` tracks, per partition and epoch, up to where every record is accounted for
//! (delivered, dead-lettered, superseded or held); a partition revoked in this process's life
//! commits nothing until a batch of its new epoch is applied, so a batch acknowledged after its
//! partition was revoked and assigned back never commits past records only the old epoch held.

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
    /// Per partition: every record before this offset is accounted for.
    pub covered: Vec<(Tp, i64)>,
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
        self.covered.is_empty() && self.hold.is_empty() && self.release.is_empty()
    }

    /// The highest offset a partition may commit while this change is not applied (it holds
    /// records there): its lowest held offset, or `i64::MAX`.
    pub fn commit_limit(&self, tp: &Tp) -> i64 {
        self.hold
            .iter()
            .filter(|h| h.input.partition == tp.1 && h.input.topic == tp.0)
            .map(|h| h.input.offset)
            .min()
            .unwrap_or(i64::MAX)
    }
}

/// Held records and coverage per partition.
#[derive(Debug, Default)]
pub struct Ledger {
    held: BTreeMap<Tp, BTreeMap<i64, Held>>,
    covered: HashMap<Tp, i64>,
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
        for (tp, next) in &change.covered {
            if current(self, tp) {
                let c = self.covered.entry(tp.clone()).or_insert(*next);
                *c = (*c).max(*next);
            }
        }
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

    /// Forgets a revoked partition: its held records are re-read by its next owner.
    pub fn revoked(&mut self, tp: &Tp) {
        if let Some(slot) = self.held.remove(tp) {
            for h in slot.values() {
                if let Some(n) = self.counts.get_mut(&h.target) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        self.covered.remove(tp);
        *self.epochs.entry(tp.clone()).or_default() += 1;
    }

    /// The offset a partition whose acknowledged position is `next` may commit: never past a
    /// held record nor past what its current epoch accounted for. `-1` commits nothing.
    pub fn commit_point(&self, tp: &Tp, next: i64) -> i64 {
        let covered = match self.covered.get(tp) {
            Some(c) => *c,
            // Revoked earlier and nothing of the new epoch applied yet: what is acknowledged
            // may be a batch of the old epoch.
            None if self.epoch(tp) > 0 => return -1,
            // Nothing processed (records that did not decode): nothing held either.
            None => next,
        };
        let lowest_held = self
            .held
            .get(tp)
            .and_then(|slot| slot.keys().next().copied())
            .unwrap_or(i64::MAX);
        next.min(covered).min(lowest_held)
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

    /// A batch of partition `p` up to `next`, holding `holds` for target "down".
    fn batch(l: &Ledger, p: i32, next: i64, holds: &[i64]) -> LedgerChange {
        let mut c = LedgerChange::default();
        c.touch(&tp(p), l.epoch(&tp(p)));
        c.covered.push((tp(p), next));
        c.hold = holds.iter().map(|o| held("down", p, *o)).collect();
        c
    }

    #[test]
    fn test_commits_stop_at_the_lowest_held_record() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, 10, &[]));
        assert_eq!(l.commit_point(&tp(0), 10), 10);
        l.apply(&batch(&l, 0, 20, &[12, 15]));
        assert_eq!(l.commit_point(&tp(0), 20), 12);
        assert_eq!(l.held_count("down"), 2);
        // Other partitions are not held back.
        l.apply(&batch(&l, 1, 7, &[]));
        assert_eq!(l.commit_point(&tp(1), 7), 7);
    }

    #[test]
    fn test_release_moves_the_commit_point_and_is_idempotent() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, 20, &[12, 15]));
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
        let c = batch(&l, 0, 20, &[12]);
        l.apply(&c);
        l.apply(&c);
        assert_eq!(l.held_count("down"), 1);
        assert_eq!(l.held_for("down").len(), 1);
        assert!(l.held_for("up").is_empty());
    }

    #[test]
    fn test_a_change_computed_before_a_revoke_does_not_apply_to_that_partition() {
        let mut l = Ledger::default();
        let c = batch(&l, 0, 20, &[12]);
        l.revoked(&tp(0));
        assert_eq!(l.apply(&c), 1);
        assert_eq!(l.held_count("down"), 0);
    }

    #[test]
    fn test_revoked_partition_forgets_its_held_records_and_commits_nothing_until_a_new_batch() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, 20, &[12]));
        l.revoked(&tp(0));
        assert_eq!(l.held_count("down"), 0);
        // A batch of the old epoch acknowledged after the partition came back: nothing.
        assert_eq!(l.commit_point(&tp(0), 20), -1);
        // The new epoch re-reads from 12 and holds it again.
        l.apply(&batch(&l, 0, 16, &[12]));
        assert_eq!(l.commit_point(&tp(0), 20), 12);
        let mut r = LedgerChange::default();
        r.touch(&tp(0), l.epoch(&tp(0)));
        r.release.push((tp(0), 12));
        l.apply(&r);
        // Still not past what the new epoch has seen (16), though 20 is acknowledged.
        assert_eq!(l.commit_point(&tp(0), 20), 16);
    }

    #[test]
    fn test_a_dropped_change_limits_commits_until_applied() {
        let mut l = Ledger::default();
        l.apply(&batch(&l, 0, 10, &[]));
        let dropped = batch(&l, 0, 20, &[14]);
        // The runtime acknowledged 20 without applying: the ledger alone says 10 (covered).
        assert_eq!(l.commit_point(&tp(0), 20), 10);
        assert_eq!(dropped.commit_limit(&tp(0)), 14);
        assert_eq!(dropped.commit_limit(&tp(1)), i64::MAX);
        l.apply(&dropped);
        assert_eq!(l.commit_point(&tp(0), 20), 14);
    }

    #[test]
    fn test_never_processed_partition_commits_what_is_acknowledged() {
        let l = Ledger::default();
        assert_eq!(l.commit_point(&tp(3), 42), 42);
    }
}
