//! A circuit breaker per EHR target, as a pure state machine over epoch milliseconds.
//!
//! * **closed**: calls go through. A transient failure (429, 5xx, timeout) holds the target for
//!   a short backoff (or the server's Retry-After); `threshold` consecutive failures open it.
//!   A target-level failure (refused credentials, wrong URL…) opens it at once.
//! * **open**: no call until the cool-down ends. The cool-down grows exponentially with each
//!   consecutive opening (`base · 2^(n-1)`, capped at `max`), with up to 25 % jitter, and is
//!   never shorter than a Retry-After.
//! * **half-open**: the cool-down is over; one probe call is allowed. Success closes the
//!   breaker (and forgets the failures); failure opens it again with a longer cool-down.
//!
//! The breaker never fails a record: a target that is not allowed a call keeps its records
//! held. The caller passes `jitter` (uniform in [0, 1)) so the machine stays deterministic.

use crate::classify::TargetFault;
use std::time::Duration;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive transient failures that open a closed breaker.
    pub threshold: u32,
    /// Backoff after a transient failure while closed (doubles per failure).
    pub retry_base_ms: i64,
    /// First open cool-down.
    pub base_ms: i64,
    /// Longest open cool-down.
    pub max_ms: i64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            threshold: 3,
            retry_base_ms: 1_000,
            base_ms: 5_000,
            max_ms: 300_000,
        }
    }
}

/// The state as exported by `ohx_circuit_breaker_state` (0 closed, 1 half-open, 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// What a failed call said about the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying soon (counts towards the threshold).
    Transient { retry_after: Option<Duration> },
    /// The target is misconfigured or refuses us: open now and flag it.
    Target(TargetFault),
}

/// One target's breaker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Breaker {
    open: bool,
    /// Consecutive failures since the last success.
    failures: u32,
    /// Consecutive openings since the last success (the cool-down's exponent).
    openings: u32,
    /// No call before this time (a closed backoff, or the end of an open cool-down).
    not_before_ms: i64,
    /// The last target-level fault, until a call succeeds.
    fault: Option<TargetFault>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Breaker {
    /// The state at `now_ms`.
    pub fn state(&self, now_ms: i64) -> State {
        match (self.open, now_ms >= self.not_before_ms) {
            (false, _) => State::Closed,
            (true, true) => State::HalfOpen,
            (true, false) => State::Open,
        }
    }

    /// Whether a call may be made at `now_ms` (closed and past any backoff, or a half-open
    /// probe).
    pub fn allows(&self, now_ms: i64) -> bool {
        now_ms >= self.not_before_ms
    }

    /// The earliest time a call is allowed.
    pub fn not_before_ms(&self) -> i64 {
        self.not_before_ms
    }

    /// The target-level fault the target is flagged with, if any.
    pub fn fault(&self) -> Option<TargetFault> {
        self.fault
    }

    /// Whether the breaker is open (calls only as half-open probes after `not_before_ms`).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The breaker after a successful call: closed, failures forgotten.
    pub fn on_success(&self) -> Breaker {
        Breaker::default()
    }

    /// The breaker after a failed call at `now_ms`.
    pub fn on_failure(
        &self,
        now_ms: i64,
        failure: Failure,
        settings: &BreakerSettings,
        jitter: f64,
    ) -> Breaker {
        let failures = self.failures.saturating_add(1);
        let (retry_after, fault) = match failure {
            Failure::Transient { retry_after } => (retry_after.map(ms).unwrap_or(0), self.fault),
            Failure::Target(f) => (0, Some(f)),
        };
        let opens = self.open
            || matches!(failure, Failure::Target(_))
            || failures >= settings.threshold.max(1);
        if !opens {
            let backoff = settings
                .retry_base_ms
                .saturating_mul(1i64 << (failures - 1).min(20));
            return Breaker {
                open: false,
                failures,
                openings: self.openings,
                not_before_ms: now_ms.saturating_add(backoff.max(retry_after)),
                fault,
            };
        }
        let openings = self.openings.saturating_add(1);
        let cooldown = settings
            .base_ms
            .saturating_mul(1i64 << (openings - 1).min(20))
            .min(settings.max_ms);
        let jitter = (cooldown as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as i64;
        Breaker {
            open: true,
            failures,
            openings,
            not_before_ms: now_ms.saturating_add((cooldown + jitter).max(retry_after)),
            fault,
        }
    }

    /// Allows a probe now (the target's configuration changed since it failed).
    pub fn probe_now(&self, now_ms: i64) -> Breaker {
        Breaker {
            not_before_ms: self.not_before_ms.min(now_ms),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: BreakerSettings = BreakerSettings {
        threshold: 3,
        retry_base_ms: 100,
        base_ms: 1_000,
        max_ms: 8_000,
    };
    const T: Failure = Failure::Transient { retry_after: None };

    #[test]
    fn test_new_breaker_is_closed_and_allows_calls() {
        let b = Breaker::default();
        assert_eq!(b.state(0), State::Closed);
        assert!(b.allows(0));
        assert_eq!(b.fault(), None);
    }

    #[test]
    fn test_closed_transient_failures_back_off_then_open_at_the_threshold() {
        let b = Breaker::default().on_failure(0, T, &S, 0.0);
        assert_eq!(b.state(0), State::Closed);
        assert!(!b.allows(99));
        assert!(b.allows(100));
        let b = b.on_failure(100, T, &S, 0.0);
        assert_eq!(b.state(100), State::Closed);
        assert!(!b.allows(299));
        assert!(b.allows(300));
        let b = b.on_failure(300, T, &S, 0.0);
        assert_eq!(b.state(300), State::Open);
        assert!(!b.allows(1_299));
        assert_eq!(b.state(1_300), State::HalfOpen);
        assert!(b.allows(1_300));
    }

    #[test]
    fn test_closed_failure_honours_retry_after() {
        let ra = Failure::Transient {
            retry_after: Some(Duration::from_secs(30)),
        };
        let b = Breaker::default().on_failure(0, ra, &S, 0.0);
        assert_eq!(b.state(0), State::Closed);
        assert!(!b.allows(29_999));
        assert!(b.allows(30_000));
    }

    #[test]
    fn test_target_fault_opens_at_once_and_flags() {
        let b = Breaker::default().on_failure(0, Failure::Target(TargetFault::Forbidden), &S, 0.0);
        assert_eq!(b.state(0), State::Open);
        assert_eq!(b.fault(), Some(TargetFault::Forbidden));
        assert_eq!(b.state(1_000), State::HalfOpen);
    }

    #[test]
    fn test_half_open_success_closes_and_forgets() {
        let b = Breaker::default().on_failure(0, Failure::Target(TargetFault::NotFound), &S, 0.0);
        assert_eq!(b.state(1_000), State::HalfOpen);
        let b = b.on_success();
        assert_eq!(b.state(1_000), State::Closed);
        assert_eq!(b.fault(), None);
        assert_eq!(b.failures(), 0);
        // The next failure starts from scratch: closed, short backoff.
        let b = b.on_failure(2_000, T, &S, 0.0);
        assert_eq!(b.state(2_000), State::Closed);
    }

    #[test]
    fn test_half_open_failure_reopens_with_a_doubled_capped_cooldown() {
        let f = Failure::Target(TargetFault::Unauthorized);
        let mut b = Breaker::default().on_failure(0, f, &S, 0.0);
        let mut now = 0;
        let mut cooldowns = Vec::new();
        for _ in 0..5 {
            now = b.not_before_ms();
            assert_eq!(b.state(now), State::HalfOpen);
            let next = b.on_failure(now, T, &S, 0.0);
            assert_eq!(next.state(now), State::Open);
            // A transient probe failure keeps the earlier fault flagged.
            assert_eq!(next.fault(), Some(TargetFault::Unauthorized));
            cooldowns.push(next.not_before_ms() - now);
            b = next;
        }
        assert_eq!(cooldowns, vec![2_000, 4_000, 8_000, 8_000, 8_000]);
        assert!(now > 0);
    }

    #[test]
    fn test_jitter_adds_at_most_a_quarter_and_retry_after_wins_when_longer() {
        let f = Failure::Target(TargetFault::Connection);
        let b = Breaker::default().on_failure(0, f, &S, 0.999);
        assert!(b.not_before_ms() > 1_000 && b.not_before_ms() <= 1_250);
        let open = Breaker::default().on_failure(0, f, &S, 0.0);
        let long = Failure::Transient {
            retry_after: Some(Duration::from_secs(60)),
        };
        let b = open.on_failure(1_000, long, &S, 0.0);
        assert_eq!(b.state(1_000), State::Open);
        assert_eq!(b.not_before_ms(), 61_000);
    }

    #[test]
    fn test_probe_now_turns_open_into_half_open() {
        let b = Breaker::default().on_failure(0, Failure::Target(TargetFault::NotFound), &S, 0.0);
        assert_eq!(b.state(10), State::Open);
        let p = b.probe_now(10);
        assert_eq!(p.state(10), State::HalfOpen);
        assert_eq!(p.fault(), Some(TargetFault::NotFound));
        // Never delays a breaker that already allows a call.
        assert_eq!(Breaker::default().probe_now(10).not_before_ms(), 0);
    }
}
