//! Rate limits shared by every replica: the Generic Cell Rate Algorithm ([`Gcra`], pure) and
//! its state in PostgreSQL ([`PgRateGate`]), so that the fetcher's replicas and the gateway's
//! connect flow together stay within a provider's budget (Withings: 120 requests per minute for
//! the whole application).

use deadpool_postgres::Pool;
use std::time::Duration;

/// The database failed while taking a permit.
#[derive(Debug, thiserror::Error)]
#[error("rate limit database: {0}")]
pub struct RateLimitError(String);

impl From<tokio_postgres::Error> for RateLimitError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self(crate::db::error_text(&e))
    }
}

impl From<deadpool_postgres::PoolError> for RateLimitError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self(e.to_string())
    }
}

/// The Generic Cell Rate Algorithm over one limit: each conforming request moves the
/// theoretical arrival time (TAT) one emission interval later; a request conforms when the
/// TAT is at most `tolerance` ahead of now. Times are integer microseconds.
///
/// # Why the tolerance is zero
/// Take any `n + 1` conforming requests at `t_1 ≤ … ≤ t_{n+1}`. Each moves the TAT by `T`, and
/// TAT never falls below an allowed request's time, so before the last one TAT ≥ `t_1 + n·T`,
/// and it conforms only if `t_{n+1} ≥ TAT − τ ≥ t_1 + n·T − τ`. With `T = window / limit` and
/// `n = limit`: `t_{limit+1} − t_1 ≥ window − τ`. So `limit + 1` requests never fit in a
/// half-open window `[s, s + window)` exactly when `τ = 0`; any positive tolerance (a burst)
/// lets an idle limit admit `limit + 1` within one window (the old token bucket admitted up to
/// `2 × limit`). `T` is rounded up to whole microseconds so that `limit · T ≥ window`. The
/// price is pacing: requests leave one every `T` (500 ms at 120/min), never in bursts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`, in microseconds.
    pub emission_interval_us: i64,
    /// `τ`, in microseconds.
    pub tolerance_us: i64,
}

impl Gcra {
    /// At most `limit` requests in any `window`: `T = ⌈window / limit⌉`, `τ = 0`.
    pub fn per_window(limit: u32, window: Duration) -> Self {
        let window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        let limit = i64::from(limit.max(1));
        Self {
            emission_interval_us: (window_us + limit - 1) / limit,
            tolerance_us: 0,
        }
    }

    /// Decides a request at `now_us` against the stored TAT (`None`: never used). Returns the
    /// new TAT to store if the request conforms, else how long to wait (µs) before it would.
    pub fn check(&self, tat_us: Option<i64>, now_us: i64) -> Result<i64, i64> {
        let tat = tat_us.unwrap_or(now_us).max(now_us);
        let ahead = tat - now_us;
        if ahead > self.tolerance_us {
            Err(ahead - self.tolerance_us)
        } else {
            Ok(tat + self.emission_interval_us)
        }
    }
}

/// A GCRA limit in PostgreSQL shared by every replica of every stage that calls the provider (Withings allows 120 requests per
/// minute for the whole application): one row per limit in `rate_limits`, decided by one
/// atomic upsert against the database's clock (replicas' clocks need not agree).
#[derive(Clone)]
pub struct PgRateGate {
    pool: Pool,
    name: String,
    gcra: Gcra,
    calls: opentelemetry::metrics::Counter<u64>,
}

impl std::fmt::Debug for PgRateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRateGate")
            .field("name", &self.name)
            .field("gcra", &self.gcra)
            .finish()
    }
}

/// What one attempt on the shared limit decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Conforming: sent at this database time (epoch µs).
    Allowed { at_us: i64 },
    /// Not yet: try again after this long.
    Wait(Duration),
}

impl PgRateGate {
    /// Creates a gate named `name` allowing `per_minute` requests in any 60 s.
    pub fn new(
        pool: Pool,
        name: String,
        per_minute: u32,
        calls: opentelemetry::metrics::Counter<u64>,
    ) -> Self {
        Self::per_window(pool, name, per_minute, Duration::from_secs(60), calls)
    }

    /// Creates a gate allowing `limit` requests in any `window`.
    pub fn per_window(
        pool: Pool,
        name: String,
        limit: u32,
        window: Duration,
        calls: opentelemetry::metrics::Counter<u64>,
    ) -> Self {
        Self {
            pool,
            name,
            gcra: Gcra::per_window(limit, window),
            calls,
        }
    }

    /// Takes a permit if the limit allows one now ([`Gcra::check`] in one atomic statement:
    /// the upsert's `WHERE` is evaluated on the locked, latest row).
    pub async fn try_take(&self) -> Result<Take, RateLimitError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "WITH clock AS (SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint AS now_us), \
                 taken AS ( \
                   INSERT INTO rate_limits AS r (name, tat_us, updated_at) \
                   SELECT $1, clock.now_us + $2, clock_timestamp() FROM clock \
                   ON CONFLICT (name) DO UPDATE \
                     SET tat_us = GREATEST(r.tat_us, (SELECT now_us FROM clock)) + $2, updated_at = clock_timestamp() \
                     WHERE GREATEST(r.tat_us, (SELECT now_us FROM clock)) - (SELECT now_us FROM clock) <= $3 \
                   RETURNING r.tat_us) \
                 SELECT (SELECT now_us FROM clock), (SELECT tat_us FROM taken), \
                        (SELECT tat_us FROM rate_limits WHERE name = $1)",
                &[
                    &self.name,
                    &self.gcra.emission_interval_us,
                    &self.gcra.tolerance_us,
                ],
            )
            .await?;
        let now_us: i64 = row.get(0);
        let taken: Option<i64> = row.get(1);
        if taken.is_some() {
            return Ok(Take::Allowed { at_us: now_us });
        }
        // Denied: the TAT read from the statement's snapshot may be older than the row that
        // denied us; the wait is a hint, and the next attempt decides again.
        let tat: Option<i64> = row.get(2);
        let wait_us = match self.gcra.check(tat, now_us) {
            Err(w) => w,
            Ok(_) => 1_000,
        };
        Ok(Take::Wait(Duration::from_micros(
            u64::try_from(wait_us.max(1_000)).unwrap_or(1_000),
        )))
    }
}

impl PgRateGate {
    /// Waits until the limit admits one request, then counts it in the calls counter (by
    /// provider: bucket names start with the provider, `RatePolicy::bucket`).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn acquire_permit(&self) -> Result<(), RateLimitError> {
        loop {
            match self.try_take().await? {
                Take::Allowed { .. } => {
                    let provider = self.name.split(':').next().unwrap_or_default();
                    self.calls.add(
                        1,
                        &[opentelemetry::KeyValue::new(
                            "provider",
                            provider.to_owned(),
                        )],
                    );
                    return Ok(());
                }
                Take::Wait(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MINUTE_US: i64 = 60_000_000;

    /// The largest number of times in any half-open window `[t, t + window)` (sorted times).
    fn max_in_window(times: &[i64], window: i64) -> usize {
        let (mut best, mut lo) = (0, 0);
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    /// Hammers a limit for five simulated minutes: 8 clients, each retrying after the wait it
    /// was told (plus jitter) or right after a success, and one greedy client that asks every
    /// millisecond. Returns the allowed times.
    fn hammer(gcra: Gcra, minutes: i64) -> Vec<i64> {
        let mut tat: Option<i64> = None;
        let mut allowed = Vec::new();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: i64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            i64::try_from((seed >> 33) % u64::try_from(bound).unwrap()).unwrap()
        };
        let mut clients: Vec<i64> = (0..8).map(|_| next(1_000_000)).collect();
        let end = minutes * MINUTE_US;
        let mut greedy = 0;
        loop {
            // the earliest next attempt among the clients and the greedy one
            let (i, &t) = clients.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            let (who, now) = if greedy < t {
                (None, greedy)
            } else {
                (Some(i), t)
            };
            if now >= end {
                break;
            }
            let decision = gcra.check(tat, now);
            if let Ok(new_tat) = decision {
                tat = Some(new_tat);
                allowed.push(now);
            }
            match who {
                None => greedy += 1_000,
                Some(i) => {
                    clients[i] = now
                        + match decision {
                            Ok(_) => next(50_000),
                            Err(wait) => wait + next(3_000),
                        }
                }
            }
        }
        allowed
    }

    #[test]
    fn test_gcra_never_admits_more_than_the_limit_in_any_60s() {
        let gcra = Gcra::per_window(120, Duration::from_secs(60));
        assert_eq!(gcra.emission_interval_us, 500_000);
        assert_eq!(gcra.tolerance_us, 0);
        let allowed = hammer(gcra, 5);
        assert_eq!(max_in_window(&allowed, MINUTE_US), 120);
        // and it does not starve: the whole budget is used
        assert!(allowed.len() >= 5 * 120 - 1, "{}", allowed.len());
        // a limit that does not divide the window
        let gcra = Gcra::per_window(7, Duration::from_secs(60));
        assert!(max_in_window(&hammer(gcra, 5), MINUTE_US) <= 7);
    }

    #[test]
    fn test_gcra_with_a_burst_tolerance_would_exceed_the_limit() {
        // Why the tolerance is zero: one interval of tolerance already admits 121.
        let gcra = Gcra {
            emission_interval_us: 500_000,
            tolerance_us: 500_000,
        };
        assert!(max_in_window(&hammer(gcra, 5), MINUTE_US) > 120);
    }

    #[test]
    fn test_gcra_check_waits_until_the_tat() {
        let gcra = Gcra::per_window(120, Duration::from_secs(60));
        assert_eq!(gcra.check(None, 1_000), Ok(501_000));
        assert_eq!(gcra.check(Some(501_000), 1_000), Err(500_000));
        assert_eq!(gcra.check(Some(501_000), 501_000), Ok(1_001_000));
        // an idle limit does not bank credit
        assert_eq!(gcra.check(Some(0), 10_000_000), Ok(10_500_000));
    }

    /// The SQL makes the same decisions against the shared row, under concurrency (needs the
    /// local PostgreSQL): 4 tasks hammer a limit of 5 per second for 3 s.
    #[tokio::test]
    async fn test_pg_gate_holds_the_limit_under_concurrency() {
        let url = "postgres://postgres@127.0.0.1:5432/ohx_ratelimit_test";
        crate::db::create_database(url).await.unwrap();
        let pool = crate::db::pool(url, 8).unwrap();
        crate::db::migrate(&pool).await.unwrap();
        let counter = opentelemetry::global::meter("test")
            .u64_counter("calls")
            .build();
        let gate = PgRateGate::per_window(
            pool,
            format!("test:{}", uuid::Uuid::new_v4()),
            5,
            Duration::from_secs(1),
            counter,
        );
        let stop = std::time::Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let mut at = Vec::new();
                while std::time::Instant::now() < stop {
                    match gate.try_take().await.unwrap() {
                        Take::Allowed { at_us } => at.push(at_us),
                        Take::Wait(w) => tokio::time::sleep(w.min(Duration::from_millis(50))).await,
                    }
                }
                at
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert!(all.len() >= 12, "{}", all.len());
        assert!(max_in_window(&all, 1_000_000) <= 5, "{all:?}");
    }
}
