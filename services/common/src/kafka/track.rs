//! The runtime's bookkeeping, free of I/O so every rule is unit-tested: which partitions this
//! consumer owns and since when ([`Ownership`]), which polled records still belong to it
//! ([`Collected`]), which offsets may be committed ([`Offsets`]), and which partitions nobody
//! owns ([`lapsed`]).
//!
//! The rule that keeps a rebalance from losing records: librdkafka serves a rebalance inside a
//! poll, so one collection pass can see "record of P, revoke P, assign P, record of P". The
//! records polled before the revoke are stale (the new owner, maybe this very consumer, reads
//! them again from the committed offset); the ones polled after the assign are live. Every
//! polled record is tagged with its partition's *generation* (bumped by each revoke) and only
//! records of the current generation are processed and counted towards commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A topic partition.
pub type Tp = (String, i32);

/// A change of assignment, in the order librdkafka served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

/// The partitions this consumer owns, with a generation per partition.
#[derive(Debug, Default)]
pub struct Ownership {
    owned: BTreeSet<Tp>,
    generation: HashMap<Tp, u64>,
    /// Whether the group coordinator has given this member an assignment (possibly empty)
    /// since it last lost one: the stage is a working member of its group.
    member: bool,
}

impl Ownership {
    /// Applies a rebalance event.
    pub fn apply(&mut self, event: &RebalanceEvent) {
        match event {
            RebalanceEvent::Assigned(tps) => {
                self.owned.extend(tps.iter().cloned());
                self.member = true;
            }
            RebalanceEvent::Revoked(tps) => {
                for tp in tps {
                    self.owned.remove(tp);
                    *self.generation.entry(tp.clone()).or_default() += 1;
                }
                if self.owned.is_empty() {
                    self.member = false;
                }
            }
        }
    }

    /// The partition's current generation.
    pub fn generation(&self, tp: &Tp) -> u64 {
        self.generation.get(tp).copied().unwrap_or(0)
    }

    /// Whether this consumer owns the partition now.
    pub fn owns(&self, tp: &Tp) -> bool {
        self.owned.contains(tp)
    }

    /// Whether a record tagged with `generation` still belongs to this consumer.
    pub fn is_current(&self, tp: &Tp, generation: u64) -> bool {
        self.owns(tp) && self.generation(tp) == generation
    }

    /// The partitions owned now.
    pub fn owned(&self) -> &BTreeSet<Tp> {
        &self.owned
    }

    /// Whether the coordinator has assigned this member its share (possibly none).
    pub fn is_member(&self) -> bool {
        self.member
    }
}

/// A polled record (or anything positioned in a partition) tagged with its generation.
#[derive(Debug, Clone)]
pub struct Tagged<T> {
    pub tp: Tp,
    pub offset: i64,
    pub generation: u64,
    pub item: T,
}

/// The records collected for one batch, in poll order.
#[derive(Debug)]
pub struct Collected<T> {
    items: Vec<Tagged<T>>,
}

impl<T> Default for Collected<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

impl<T> Collected<T> {
    /// Adds a record polled now, tagging it with its partition's current generation.
    pub fn push(&mut self, ownership: &Ownership, tp: Tp, offset: i64, item: T) {
        let generation = ownership.generation(&tp);
        self.items.push(Tagged {
            tp,
            offset,
            generation,
            item,
        });
    }

    /// Drops the records whose partition was revoked since they were polled (even if it was
    /// assigned back: the new assignment reads them again from the committed offset).
    /// Returns how many were dropped.
    pub fn retain_current(&mut self, ownership: &Ownership) -> usize {
        let before = self.items.len();
        self.items
            .retain(|t| ownership.is_current(&t.tp, t.generation));
        before - self.items.len()
    }

    /// The next offset per partition after the collected records.
    pub fn next_offsets(&self) -> BTreeMap<Tp, i64> {
        self.spans()
            .into_iter()
            .map(|(tp, span)| (tp, span.next))
            .collect()
    }

    /// What the collected records cover, per partition.
    pub fn spans(&self) -> BTreeMap<Tp, Span> {
        let mut spans: BTreeMap<Tp, Span> = BTreeMap::new();
        for t in &self.items {
            let span = spans.entry(t.tp.clone()).or_insert(Span {
                first: t.offset,
                next: t.offset + 1,
                generation: t.generation,
            });
            span.first = span.first.min(t.offset);
            span.next = span.next.max(t.offset + 1);
        }
        spans
    }

    /// Drops the records of one partition (it is being read again from an earlier offset).
    pub fn retain_except(&mut self, tp: &Tp) {
        self.items.retain(|t| &t.tp != tp);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[Tagged<T>] {
        &self.items
    }

    pub fn into_items(self) -> Vec<Tagged<T>> {
        self.items
    }
}

/// The offsets a batch covers in one partition, and the generation they were polled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: i64,
    pub next: i64,
    pub generation: u64,
}

/// An offset to commit, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEntry {
    pub tp: Tp,
    pub offset: i64,
    pub metadata: Option<String>,
}

/// What has been acknowledged, sent for commit and confirmed, per owned partition.
#[derive(Debug, Default)]
pub struct Offsets {
    /// Next offset after the records whose outputs are all acknowledged.
    acked: BTreeMap<Tp, i64>,
    /// Offsets sent for commit and not yet answered.
    in_flight: HashMap<Tp, i64>,
    /// Offsets the broker confirmed as committed.
    confirmed: HashMap<Tp, i64>,
}

impl Offsets {
    /// Records that every output of the records of `spans` is acknowledged and their state
    /// applied. A span polled in an older generation of its partition is ignored: the
    /// partition's new assignment starts again from the committed offset.
    pub fn acknowledge(&mut self, spans: &BTreeMap<Tp, Span>, ownership: &Ownership) {
        for (tp, span) in spans {
            if !ownership.is_current(tp, span.generation) {
                continue;
            }
            let e = self.acked.entry(tp.clone()).or_insert(span.next);
            *e = (*e).max(span.next);
        }
    }

    /// The offsets to commit now: for each partition, what `commit_point` allows of its
    /// acknowledged position, if that is beyond what is committed or being committed.
    /// `commit_point(tp, next)` returns the allowed offset (≤ next) and its metadata.
    pub fn due(
        &self,
        mut commit_point: impl FnMut(&Tp, i64) -> (i64, Option<String>),
    ) -> Vec<CommitEntry> {
        let mut due = Vec::new();
        for (tp, next) in &self.acked {
            let (allowed, metadata) = commit_point(tp, *next);
            let allowed = allowed.min(*next);
            let done = self
                .confirmed
                .get(tp)
                .copied()
                .max(self.in_flight.get(tp).copied())
                .unwrap_or(-1);
            if allowed > done {
                due.push(CommitEntry {
                    tp: tp.clone(),
                    offset: allowed,
                    metadata,
                });
            }
        }
        due
    }

    /// Marks entries as sent for commit.
    pub fn sent(&mut self, entries: &[CommitEntry]) {
        for e in entries {
            self.in_flight.insert(e.tp.clone(), e.offset);
        }
    }

    /// Records the broker's answer to a commit of `offset` on `tp`.
    pub fn answered(&mut self, tp: &Tp, offset: i64, ok: bool) {
        if self.in_flight.get(tp) == Some(&offset) {
            self.in_flight.remove(tp);
        }
        if ok {
            let e = self.confirmed.entry(tp.clone()).or_insert(offset);
            *e = (*e).max(offset);
        }
    }

    /// Forgets revoked partitions: their offsets are the next owner's.
    pub fn forget(&mut self, tps: &[Tp]) {
        for tp in tps {
            self.acked.remove(tp);
            self.in_flight.remove(tp);
            self.confirmed.remove(tp);
        }
    }

    /// The confirmed committed offset of a partition, if any.
    pub fn confirmed(&self, tp: &Tp) -> Option<i64> {
        self.confirmed.get(tp).copied()
    }
}

/// Partitions nobody has claimed for `after_ms` at `now_ms`, from the owners' leases (see
/// `stage::Leases`): `leases` holds each partition of the input topics with the time (ms since
/// the epoch) its owner last claimed it, if ever. Claims older than `since_ms` (when this member
/// started watching, or last asked for a rebalance) count as made then, so a fresh member and a
/// fresh assignment get the whole grace. The member's own partitions never count.
pub fn lapsed(
    now_ms: i64,
    since_ms: i64,
    leases: &[(Tp, Option<i64>)],
    owned: &BTreeSet<Tp>,
    after_ms: i64,
) -> Vec<Tp> {
    leases
        .iter()
        .filter(|(tp, _)| !owned.contains(tp))
        .filter(|(_, claimed)| {
            let last = claimed.unwrap_or(since_ms).max(since_ms);
            now_ms.saturating_sub(last) >= after_ms
        })
        .map(|(tp, _)| tp.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("in".to_string(), p)
    }

    fn spans(o: &Ownership, next: &[(Tp, i64)]) -> BTreeMap<Tp, Span> {
        next.iter()
            .map(|(tp, n)| {
                (
                    tp.clone(),
                    Span {
                        first: 0,
                        next: *n,
                        generation: o.generation(tp),
                    },
                )
            })
            .collect()
    }

    fn owning(ps: &[i32]) -> Ownership {
        let mut o = Ownership::default();
        o.apply(&RebalanceEvent::Assigned(
            ps.iter().map(|p| tp(*p)).collect(),
        ));
        o
    }

    #[test]
    fn test_revoke_and_reassign_in_one_pass_keeps_records_polled_after_the_reassign() {
        // The lost-records bug: record of P0, then (inside one recv) revoke all and assign P0
        // back, then P0's records re-fetched from the committed offset.
        let mut o = owning(&[0, 1]);
        let mut c = Collected::default();
        c.push(&o, tp(0), 10, "a");
        c.push(&o, tp(0), 11, "b");
        c.push(&o, tp(1), 5, "x");
        o.apply(&RebalanceEvent::Revoked(vec![tp(0), tp(1)]));
        o.apply(&RebalanceEvent::Assigned(vec![tp(0)]));
        c.push(&o, tp(0), 10, "a");
        c.push(&o, tp(0), 11, "b");
        c.push(&o, tp(0), 12, "c");
        assert_eq!(c.retain_current(&o), 3);
        let kept: Vec<(i64, &str)> = c.items().iter().map(|t| (t.offset, t.item)).collect();
        assert_eq!(kept, vec![(10, "a"), (11, "b"), (12, "c")]);
        assert_eq!(c.next_offsets(), BTreeMap::from([(tp(0), 13)]));
    }

    #[test]
    fn test_records_of_a_partition_given_away_are_dropped() {
        let mut o = owning(&[0, 1]);
        let mut c = Collected::default();
        c.push(&o, tp(0), 1, ());
        c.push(&o, tp(1), 1, ());
        o.apply(&RebalanceEvent::Revoked(vec![tp(0), tp(1)]));
        o.apply(&RebalanceEvent::Assigned(vec![tp(1)]));
        assert_eq!(c.retain_current(&o), 2);
        assert!(c.is_empty());
        assert!(c.next_offsets().is_empty());
    }

    #[test]
    fn test_records_survive_when_no_rebalance_happened() {
        let o = owning(&[0]);
        let mut c = Collected::default();
        c.push(&o, tp(0), 7, ());
        c.push(&o, tp(0), 8, ());
        assert_eq!(c.retain_current(&o), 0);
        assert_eq!(c.next_offsets(), BTreeMap::from([(tp(0), 9)]));
    }

    #[test]
    fn test_membership_follows_assignment() {
        let mut o = Ownership::default();
        assert!(!o.is_member());
        o.apply(&RebalanceEvent::Assigned(vec![]));
        assert!(o.is_member(), "an empty assignment is still membership");
        o.apply(&RebalanceEvent::Assigned(vec![tp(0)]));
        o.apply(&RebalanceEvent::Revoked(vec![tp(0)]));
        assert!(
            !o.is_member(),
            "revoking everything ends membership until the next assign"
        );
        assert_eq!(o.generation(&tp(0)), 1);
    }

    #[test]
    fn test_commit_waits_for_acknowledgement() {
        let o = owning(&[0]);
        let mut off = Offsets::default();
        assert!(off.due(|_, n| (n, None)).is_empty());
        off.acknowledge(&spans(&o, &[(tp(0), 5)]), &o);
        assert_eq!(
            off.due(|_, n| (n, None)),
            vec![CommitEntry {
                tp: tp(0),
                offset: 5,
                metadata: None
            }]
        );
    }

    #[test]
    fn test_commit_point_limits_the_commit_and_never_exceeds_the_acknowledged_position() {
        let o = owning(&[0]);
        let mut off = Offsets::default();
        off.acknowledge(&spans(&o, &[(tp(0), 50)]), &o);
        let due = off.due(|_, _| (20, Some("md".into())));
        assert_eq!(due[0].offset, 20);
        assert_eq!(due[0].metadata.as_deref(), Some("md"));
        let due = off.due(|_, _| (99, None));
        assert_eq!(due[0].offset, 50);
    }

    #[test]
    fn test_a_failed_async_commit_is_sent_again() {
        let o = owning(&[0]);
        let mut off = Offsets::default();
        off.acknowledge(&spans(&o, &[(tp(0), 5)]), &o);
        let due = off.due(|_, n| (n, None));
        off.sent(&due);
        assert!(
            off.due(|_, n| (n, None)).is_empty(),
            "not sent twice while in flight"
        );
        off.answered(&tp(0), 5, false);
        assert_eq!(
            off.due(|_, n| (n, None)).len(),
            1,
            "a failed commit is due again"
        );
        off.sent(&due);
        off.answered(&tp(0), 5, true);
        assert!(off.due(|_, n| (n, None)).is_empty());
        assert_eq!(off.confirmed(&tp(0)), Some(5));
    }

    #[test]
    fn test_acknowledgements_never_move_backwards_and_skip_partitions_not_owned() {
        let o = owning(&[0]);
        let mut off = Offsets::default();
        off.acknowledge(&spans(&o, &[(tp(0), 9), (tp(1), 3)]), &o);
        off.acknowledge(&spans(&o, &[(tp(0), 4)]), &o);
        let due = off.due(|_, n| (n, None));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].offset, 9);
    }

    #[test]
    fn test_a_span_from_before_a_revoke_is_not_acknowledged_even_if_reassigned() {
        let mut o = owning(&[0]);
        let old = spans(&o, &[(tp(0), 9)]);
        o.apply(&RebalanceEvent::Revoked(vec![tp(0)]));
        o.apply(&RebalanceEvent::Assigned(vec![tp(0)]));
        let mut off = Offsets::default();
        off.acknowledge(&old, &o);
        assert!(off.due(|_, n| (n, None)).is_empty());
        off.acknowledge(&spans(&o, &[(tp(0), 4)]), &o);
        assert_eq!(off.due(|_, n| (n, None))[0].offset, 4);
    }

    #[test]
    fn test_spans_cover_first_and_next_offset_per_partition() {
        let o = owning(&[0, 1]);
        let mut c = Collected::default();
        c.push(&o, tp(0), 7, ());
        c.push(&o, tp(1), 3, ());
        c.push(&o, tp(0), 9, ());
        let s = c.spans();
        assert_eq!(
            s[&tp(0)],
            Span {
                first: 7,
                next: 10,
                generation: 0
            }
        );
        assert_eq!(s[&tp(1)].first, 3);
        assert_eq!(s[&tp(1)].next, 4);
    }

    #[test]
    fn test_revoked_partitions_are_forgotten() {
        let o = owning(&[0, 1]);
        let mut off = Offsets::default();
        off.acknowledge(&spans(&o, &[(tp(0), 9), (tp(1), 3)]), &o);
        off.forget(&[tp(0)]);
        let due = off.due(|_, n| (n, None));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tp, tp(1));
    }

    #[test]
    fn test_a_partition_whose_lease_lapsed_is_flagged_and_a_fresh_one_is_not() {
        let owned = BTreeSet::new();
        let leases = vec![(tp(0), Some(100_000)), (tp(1), Some(54_000))];
        assert_eq!(lapsed(100_000, 0, &leases, &owned, 45_000), vec![tp(1)]);
        assert!(lapsed(98_999, 0, &leases, &owned, 45_000).is_empty());
    }

    #[test]
    fn test_the_members_own_partitions_never_count_as_lapsed() {
        let owned = BTreeSet::from([tp(0)]);
        let leases = vec![(tp(0), None), (tp(1), Some(0))];
        assert_eq!(lapsed(1_000_000, 0, &leases, &owned, 45_000), vec![tp(1)]);
    }

    #[test]
    fn test_a_partition_never_claimed_gets_the_grace_from_when_the_watch_started() {
        let owned = BTreeSet::new();
        let leases = vec![(tp(0), None)];
        assert!(lapsed(50_000, 10_000, &leases, &owned, 45_000).is_empty());
        assert_eq!(lapsed(55_000, 10_000, &leases, &owned, 45_000), vec![tp(0)]);
    }

    #[test]
    fn test_after_a_rejoin_old_claims_get_the_grace_again() {
        // The member asked for a rebalance at 200 s: a lease from 100 s counts as made then.
        let owned = BTreeSet::new();
        let leases = vec![(tp(0), Some(100_000))];
        assert!(lapsed(240_000, 200_000, &leases, &owned, 45_000).is_empty());
        assert_eq!(
            lapsed(245_000, 200_000, &leases, &owned, 45_000),
            vec![tp(0)]
        );
    }
}
