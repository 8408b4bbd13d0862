//! Request throttling of the REST API, per source address (before authentication) and per
//! caller (after): the GCRA of [`ohx_common::ratelimit::Gcra`] with a burst tolerance, its
//! state in memory (each gateway replica limits what it serves).

use ohx_common::ratelimit::Gcra;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Beyond this many tracked keys, keys idle past their theoretical arrival time are dropped
/// (they would conform again anyway): memory stays bounded under a spray of addresses.
const PRUNE_ABOVE: usize = 10_000;

/// One limit over many keys.
#[derive(Debug)]
pub struct Throttle {
    gcra: Gcra,
    /// Theoretical arrival time (µs since the throttle's epoch) per key.
    tats: Mutex<HashMap<String, i64>>,
    epoch: std::time::Instant,
}

impl Throttle {
    /// At most `per_minute` requests per minute per key, in bursts of up to `burst`.
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        let mut gcra = Gcra::per_window(per_minute, Duration::from_secs(60));
        gcra.tolerance_us = gcra.emission_interval_us * i64::from(burst.saturating_sub(1));
        Self {
            gcra,
            tats: Mutex::new(HashMap::new()),
            epoch: std::time::Instant::now(),
        }
    }

    /// Admits a request of `key` at `now_us`, or returns how long to wait (µs).
    pub fn check_at(&self, key: &str, now_us: i64) -> Result<(), i64> {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        if tats.len() > PRUNE_ABOVE {
            tats.retain(|_, tat| *tat > now_us);
        }
        let tat = self.gcra.check(tats.get(key).copied(), now_us)?;
        tats.insert(key.to_owned(), tat);
        Ok(())
    }

    /// Admits a request of `key` now, or returns the seconds to wait.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        let now_us = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.check_at(key, now_us)
            .map_err(|wait_us| u64::try_from(wait_us).unwrap_or(0).div_ceil(1_000_000))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn test_a_burst_is_admitted_then_refused_until_the_interval_passes() {
        // 60/min = one per second, bursts of 3.
        let t = Throttle::per_minute(60, 3);
        for _ in 0..3 {
            assert_eq!(t.check_at("k", 0), Ok(()));
        }
        let wait = t.check_at("k", 0).unwrap_err();
        assert_eq!(wait, 1_000_000);
        assert_eq!(t.check_at("k", 1_000_000), Ok(()));
        assert!(t.check_at("k", 1_000_000).is_err());
    }

    #[test]
    fn test_keys_are_limited_independently() {
        let t = Throttle::per_minute(60, 1);
        assert_eq!(t.check_at("a", 0), Ok(()));
        assert!(t.check_at("a", 0).is_err());
        assert_eq!(t.check_at("b", 0), Ok(()));
    }

    #[test]
    fn test_idle_keys_are_pruned_and_a_pruned_key_conforms() {
        let t = Throttle::per_minute(60, 1);
        for i in 0..=PRUNE_ABOVE {
            t.check_at(&i.to_string(), 0).unwrap();
        }
        // All TATs are 1 s: at 2 s every key is idle and pruned by the next check.
        t.check_at("new", 2_000_000).unwrap();
        assert_eq!(t.tats.lock().unwrap().len(), 1);
        assert_eq!(t.check_at("0", 2_000_000), Ok(()));
    }
}
